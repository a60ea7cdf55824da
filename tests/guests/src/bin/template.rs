//! A guest template: copy this file to start a guest of your own (docs/writing-a-guest.md).
//!
//! ```sh
//! cp tests/guests/src/bin/template.rs tests/guests/src/bin/my_guest.rs
//! cargo build --release --target x86_64-unknown-none --target-dir target/qemu -p test-guests
//! ./run-qemu.sh --guest target/qemu/x86_64-unknown-none/release/my_guest            # the VMM
//! ./run-qemu.sh --native --guest target/qemu/x86_64-unknown-none/release/my_guest   # bare QEMU
//! ```
//!
//! Every file in `tests/guests/src/bin/` is a guest (cargo names it after the file); the build
//! links it at 2 MiB with a Multiboot header, so it boots under the VMM and natively alike. It
//! keeps the entry contract (docs/writing-a-guest.md, "The state at `e_entry`") and shows the four
//! things every guest needs: reading its `BootInfo`, printing on the serial port, an IDT whose
//! handler reports any exception (vector, error code, CR2), and leaving through the exit port.
//! Put your code in `main`. The runtime it uses is `tests/guests/src/lib.rs` (serial output,
//! exit, port and MSR helpers) and `tests/guests/src/machine.rs` (IDT, GDT, page tables, control
//! registers).
#![no_std]
#![no_main]

use test_guests::machine::{self, Frame};
use test_guests::{exit, println};

/// The entry point: the VMM's loader (or, natively, the Multiboot trampoline) jumps here in
/// 64-bit mode at (virtual) CPL 0, with interrupts off, low memory identity-mapped, no IDT, and
/// RDI = the address of the `BootInfo`.
#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: the entry contract: RDI is the identity-mapped address of a BootInfo.
    let boot_info = unsafe { test_guests::boot_info(info) };
    if boot_info.magic != boot::BOOT_INFO_MAGIC {
        println!("template: bad BootInfo magic {:#x}", boot_info.magic);
        exit(boot::exit_code::FAILURE);
    }
    // SAFETY: as above; the command line is identity-mapped at `cmdline_addr`.
    let cmdline = unsafe { machine::cmdline(info) };
    // An IDT before anything that may fault: with IDTR's limit at 0, as at entry, any exception
    // is a triple fault. Every vector goes to `fault_handler`.
    machine::install_idt(boot::BOOT_CODE_SELECTOR);
    machine::set_handler(fault_handler);
    // Both 8259s masked: natively the firmware may leave the timer unmasked (at vector 8), and
    // an interrupt would arrive at `fault_handler` the first time the guest sets IF.
    machine::mask_pics();
    println!(
        "template: {} MiB of RAM, command line '{cmdline}'",
        boot_info.ram_bytes >> 20
    );
    main(&boot_info);
    exit(boot::exit_code::SUCCESS)
}

/// Your guest: it runs at CPL 0 as far as it can tell. Return to exit with success; call
/// `exit(boot::exit_code::FAILURE)` to fail.
fn main(info: &boot::BootInfo) {
    println!(
        "template: hello; the VMM's range starts at {:#x}",
        info.reserved_va_start
    );
}

/// Every exception and interrupt arrives here, with the registers the CPU and the stub saved.
/// This one reports it and fails: `fault vector=14 error=0x0 cr2=0x40000000 rip=0x200123`.
/// Change it to handle what you expect (return to resume at `frame.rip`).
fn fault_handler(frame: &mut Frame) {
    println!(
        "fault vector={} error={:#x} cr2={:#x} rip={:#x}",
        frame.vector,
        frame.error,
        machine::read_cr2(),
        frame.rip
    );
    exit(boot::exit_code::FAILURE)
}
