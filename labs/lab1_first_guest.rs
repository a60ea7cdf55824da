//! Lab 1: your first guest (docs/labs/lab1-first-guest.md).
//!
//! This file starts as a copy of the guest template (`tests/guests/src/bin/template.rs`): it
//! keeps the entry contract, prints on the serial port, reports any exception and leaves
//! through the exit port. Your guest believes it runs at CPL 0 on a bare machine; under the VMM
//! it really runs at CPL 3, so each privileged instruction it executes traps into the VMM,
//! which emulates it against the *virtual* CPU. Write `main` (and finish `fault_handler`) so
//! that the guest, in this order:
//!
//! 1. reads CR0, CR3 and CR4 and prints `lab1: cr0=0x... cr3=0x... cr4=0x...` (`{:#x}`);
//! 2. reads the MSR IA32_EFER (0xC000_0080) with RDMSR and prints `lab1: efer=0x...`;
//! 3. writes CR3 back with the value it read (the article's worked example: the VMM keeps a
//!    shadow of the page tables CR3 names) and prints `lab1: cr3 reloaded`;
//! 4. turns interrupts off and on again, `cli` then `sti`, and prints
//!    `lab1: interrupts off and on`;
//! 5. reads the 8 bytes at [`UNMAPPED`], which the boot page tables do not map: the page fault
//!    arrives in `fault_handler`, which prints `lab1: page fault at 0x40000000 error=0x...` (the
//!    error code the CPU pushed) and exits with success.
//!
//! Build and grade it with `./run-qemu.sh --lab 1`; then watch it trap:
//! `./run-qemu.sh --trace=insn,cr3,pf --guest target/lab/graded/lab1/lab1-first-guest`.
//! Helpers (each one instruction, see their source): `machine::read_cr0()`, `read_cr3()`,
//! `read_cr4()`, `write_cr3(v)`, `read_cr2()` in `tests/guests/src/machine.rs`;
//! `test_guests::rdmsr(msr)` in `tests/guests/src/lib.rs`; or write the `asm!` yourself.
#![no_std]
#![no_main]

use test_guests::machine::{self, Frame};
use test_guests::{exit, println};

/// An address the boot page tables do not map (they identity-map guest RAM only).
#[allow(dead_code)] // The skeleton does not read it yet; delete this line when done.
const UNMAPPED: u64 = 0x4000_0000;

/// The entry point: the VMM's loader (or, natively, the Multiboot trampoline) jumps here in
/// 64-bit mode at (virtual) CPL 0, with interrupts off, low memory identity-mapped, no IDT, and
/// RDI = the address of the `BootInfo`.
#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: the entry contract: RDI is the identity-mapped address of a BootInfo.
    let boot_info = unsafe { test_guests::boot_info(info) };
    if boot_info.magic != boot::BOOT_INFO_MAGIC {
        println!("lab1: bad BootInfo magic {:#x}", boot_info.magic);
        exit(boot::exit_code::FAILURE);
    }
    // An IDT before anything that may fault: with IDTR's limit at 0, as at entry, any exception
    // is a triple fault. Every vector goes to `fault_handler`.
    machine::install_idt(boot::BOOT_CODE_SELECTOR);
    machine::set_handler(fault_handler);
    // Both 8259s masked: natively the firmware may leave the timer unmasked (at vector 8), and
    // an interrupt would arrive at `fault_handler` the first time the guest sets IF.
    machine::mask_pics();
    main();
    exit(boot::exit_code::SUCCESS)
}

/// Steps 1 to 5 of the lab.
fn main() {
    println!("lab1: hello from my first guest");
    // TODO 1: CR0, CR3, CR4.
    // TODO 2: IA32_EFER.
    // TODO 3: CR3 reloaded.
    // TODO 4: cli; sti.
    // TODO 5: read the u64 at UNMAPPED (`core::ptr::read_volatile`).
}

/// Every exception and interrupt arrives here, with the registers the CPU and the stub saved:
/// `frame.vector`, `frame.error` (the error code, 0 when the vector has none), `frame.rip`.
/// CR2 holds the linear address of the last page fault.
fn fault_handler(frame: &mut Frame) {
    // TODO 5: the page fault you caused: print it and exit with success.
    println!(
        "fault vector={} error={:#x} cr2={:#x} rip={:#x}",
        frame.vector,
        frame.error,
        machine::read_cr2(),
        frame.rip
    );
    exit(boot::exit_code::FAILURE)
}
