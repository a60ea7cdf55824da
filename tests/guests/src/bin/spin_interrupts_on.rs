//! Spins at one instruction forever with interrupts enabled (`sti; jmp $`): the PIC is never
//! programmed, so no interrupt comes, and nothing traps except the host's own timer. The
//! watchdog must stop it by the registers and RIP not moving alone: unlike `spin`, whose
//! interrupts are off, its "interrupts disabled" rule never applies here.
#![no_std]
#![no_main]

use test_guests as _; // the runtime: panic handler

#[no_mangle]
extern "C" fn _start() -> ! {
    // SAFETY: enables interrupts (none is ever raised: the PIC is not programmed) and jumps to
    // itself forever; no memory is touched.
    unsafe { core::arch::asm!("sti", "2: jmp 2b", options(nomem, nostack, noreturn)) }
}
