//! Hammers ports no device answers (reads must be all ones, writes dropped), then reads an MSR
//! no CPU has: #GP(0) in the guest, whose handler reports and halts.
#![no_std]
#![no_main]

use test_guests::{inb, inl, outb, println};

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::install_fault_handlers();
    let mut all_ones = true;
    for port in [0x100u16, 0x2F8, 0x510, 0xCF8, 0xE000, 0xFFFF] {
        for _ in 0..100 {
            outb(port, 0x5A);
            all_ones &= inb(port) == 0xFF;
        }
    }
    all_ones &= inl(0x1230) == 0xFFFF_FFFF;
    println(format_args!(
        "unknown-ports: reads all ones: {}",
        if all_ones { "yes" } else { "no" }
    ));
    println(format_args!("unknown-msrs: rdmsr 0x12345678"));
    let v = test_guests::rdmsr(0x1234_5678);
    println(format_args!("unknown-msrs: rdmsr returned {v:#x} (wrong)"));
    test_guests::exit(boot::exit_code::FAILURE)
}
