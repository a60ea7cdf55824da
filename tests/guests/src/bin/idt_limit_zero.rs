//! Installs a working IDT, checks it, then sets the IDT limit to 0 and faults: a VMM must turn
//! the undeliverable fault into #DF and then a triple fault, not crash.
#![no_std]
#![no_main]

use test_guests::{install_fault_handlers, load_idt, println};

#[no_mangle]
extern "C" fn _start() -> ! {
    install_fault_handlers();
    println(format_args!(
        "idt-limit-zero: IDT installed, now loading limit 0 and executing int3"
    ));
    load_idt(0x1000, 0);
    // SAFETY: a breakpoint with an empty IDT: the fault is the test.
    unsafe { core::arch::asm!("int3", options(nomem, nostack)) };
    println(format_args!(
        "idt-limit-zero: survived int3 with IDT limit 0 (wrong)"
    ));
    test_guests::exit(boot::exit_code::FAILURE)
}
