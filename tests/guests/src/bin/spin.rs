//! Spins at one instruction forever without touching anything privileged (`jmp $`): nothing
//! traps except the host's own timer, and the VMM's no-progress watchdog must stop it.
#![no_std]
#![no_main]

use test_guests as _; // the runtime: panic handler

#[no_mangle]
extern "C" fn _start() -> ! {
    // SAFETY: an endless jump to itself; no memory is touched.
    unsafe { core::arch::asm!("2: jmp 2b", options(nomem, nostack, noreturn)) }
}
