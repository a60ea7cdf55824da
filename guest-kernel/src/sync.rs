//! Critical sections on one CPU: interrupts off, with the previous IF restored afterwards.
//!
//! The save/restore is `pushf` + `cli` ... `popf`, the classic bare-metal idiom. Under the VMM
//! `popf` at real CPL 3 does not restore IF, so nothing may *depend* on `restore` turning
//! interrupts back on: every place that waits does `sti; hlt` itself (`process::idle`), and user
//! mode is always entered with IF = 1 by `iretq`/`sysretq`/`sti; sysexit`.

use crate::arch;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// RFLAGS as they were before `save_and_cli`.
#[derive(Clone, Copy, Debug)]
#[must_use]
pub struct SavedFlags(u64);

/// Disables interrupts and returns the previous RFLAGS.
pub fn save_and_cli() -> SavedFlags {
    let flags = arch::rflags();
    arch::cli();
    SavedFlags(flags)
}

/// Restores RFLAGS saved by `save_and_cli` (`popf`).
pub fn restore(saved: SavedFlags) {
    arch::set_rflags(saved.0);
}

/// Kernel data shared with interrupt handlers: used only inside `with`, with interrupts off, so
/// on one CPU nothing else can run while the closure holds the `&mut`. A nested `with` on the same
/// lock is a kernel bug and panics instead of aliasing.
pub struct IrqLock<T> {
    held: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: one CPU; access is serialised by disabling interrupts and checked by `held`.
unsafe impl<T: Send> Sync for IrqLock<T> {}

impl<T> IrqLock<T> {
    /// A lock around `value`.
    pub const fn new(value: T) -> Self {
        Self {
            held: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Runs `f` on the value with interrupts off.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        let saved = save_and_cli();
        if self.held.swap(true, Ordering::Acquire) {
            panic!("IrqLock taken twice (a nested critical section on the same data)");
        }
        // SAFETY: interrupts are off and `held` was false, so this is the only reference.
        let r = f(unsafe { &mut *self.value.get() });
        self.held.store(false, Ordering::Release);
        restore(saved);
        r
    }

    /// True while some `with` is running (used by the panic path to avoid re-entering).
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::Relaxed)
    }
}

impl<T> core::fmt::Debug for IrqLock<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("IrqLock")
    }
}
