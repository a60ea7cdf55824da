//! Leaving the machine: every host exit goes through QEMU's isa-debug-exit device (port 0xf4),
//! whose value becomes QEMU's exit status `(value << 1) | 1` (codes in `boot::exit_code`).

use core::fmt;

/// Writes `code` to the isa-debug-exit port. Without that device (real hardware) the CPU halts.
pub fn exit(code: u32) -> ! {
    // SAFETY: port 0xf4 is the isa-debug-exit device run-qemu.sh configures; a 32-bit write ends
    // the virtual machine. On a machine without it the write goes nowhere and we halt below.
    unsafe { x86::io::outl(boot::EXIT_PORT, code) };
    halt_forever()
}

/// Stops the CPU for good: interrupts off, then `hlt` in a loop (an NMI would resume it).
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: disabling interrupts and halting has no memory effects; this is the end.
        unsafe { core::arch::asm!("cli; hlt", options(nomem, nostack)) };
    }
}

/// Reports an unusable configuration (`[vmm] error: ...`) and exits with CONFIG_ERROR.
pub fn config_error(why: fmt::Arguments<'_>) -> ! {
    log::error!("{why}");
    exit(boot::exit_code::CONFIG_ERROR)
}
