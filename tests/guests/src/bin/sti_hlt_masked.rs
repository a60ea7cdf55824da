//! `sti; hlt` with every 8259 line masked: interrupts are enabled, but no interrupt can ever
//! come, so the CPU waits forever (natively the machine just sits there). The twin of `cli-hlt`
//! with IF = 1: a VMM cannot tell it from a guest waiting for its timer by the flags alone, so
//! it must not wait forever in the host either; this VMM's watchdog stops the guest after
//! `watchdog=` host ticks without a virtual interrupt. Expected outcome under the VMM (with
//! `watchdog=50`): a clean stop, "halted with interrupts enabled but no virtual interrupt for
//! ... host ticks (watchdog=)".
#![no_std]
#![no_main]

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::install_fault_handlers();
    test_guests::machine::mask_pics();
    test_guests::println(format_args!(
        "sti-hlt-masked: every IRQ masked, waiting with sti; hlt"
    ));
    loop {
        // SAFETY: waits for an interrupt that cannot come; no memory effects.
        unsafe { core::arch::asm!("sti", "hlt", options(nomem, nostack)) };
    }
}
