//! Lab 1's reference solution (docs/labs/lab1-first-guest.md): the template's guest
//! (`template.rs`) doing the privileged instructions the lab asks for, each of which traps to
//! the VMM: MOV from CR0, CR3 and CR4, RDMSR of IA32_EFER, MOV to CR3, CLI and STI, and a read
//! of an unmapped address whose #PF the VMM reflects to the guest's own handler.
#![no_std]
#![no_main]

use test_guests::machine::{self, Frame};
use test_guests::{exit, println};

/// An address the boot page tables do not map (they identity-map guest RAM only).
const UNMAPPED: u64 = 0x4000_0000;

/// IA32_EFER (SDM Vol. 4, Table 2-2).
const IA32_EFER: u32 = 0xC000_0080;

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: the entry contract: RDI is the identity-mapped address of a BootInfo.
    let boot_info = unsafe { test_guests::boot_info(info) };
    if boot_info.magic != boot::BOOT_INFO_MAGIC {
        println!("lab1: bad BootInfo magic {:#x}", boot_info.magic);
        exit(boot::exit_code::FAILURE);
    }
    machine::install_idt(boot::BOOT_CODE_SELECTOR);
    machine::set_handler(fault_handler);
    machine::mask_pics();
    main();
    println!("lab1: the read of {UNMAPPED:#x} did not fault");
    exit(boot::exit_code::FAILURE)
}

fn main() {
    println!(
        "lab1: cr0={:#x} cr3={:#x} cr4={:#x}",
        machine::read_cr0(),
        machine::read_cr3(),
        machine::read_cr4()
    );
    println!("lab1: efer={:#x}", test_guests::rdmsr(IA32_EFER));
    machine::write_cr3(machine::read_cr3());
    println!("lab1: cr3 reloaded");
    // SAFETY: CLI then STI: nothing can interrupt in between (the 8259s are masked).
    unsafe { core::arch::asm!("cli", "sti", options(nomem, nostack)) };
    println!("lab1: interrupts off and on");
    // SAFETY: a read of an unmapped address, on purpose: its #PF ends the guest in
    // `fault_handler`.
    let _ = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
}

fn fault_handler(frame: &mut Frame) {
    let cr2 = machine::read_cr2();
    if frame.vector == 14 && cr2 == UNMAPPED {
        println!("lab1: page fault at {cr2:#x} error={:#x}", frame.error);
        exit(boot::exit_code::SUCCESS);
    }
    println!(
        "fault vector={} error={:#x} cr2={cr2:#x} rip={:#x}",
        frame.vector, frame.error, frame.rip
    );
    exit(boot::exit_code::FAILURE)
}
