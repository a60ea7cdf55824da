//! The small traits through which vmm-core sees the machine.
//!
//! The kernel implements them on real hardware (shadow-mmu walks for guest memory, the real
//! serial port for the console, the PIT tick counter for the clock); the tests implement them
//! with plain `Vec`s and counters. This is the boundary that keeps vmm-core host-testable.

/// Guest port I/O as the emulator of IN/OUT/INS/OUTS sees it: the device bus behind it decides
/// which virtual device answers. `size` is 1, 2 or 4 bytes.
pub trait PortIo {
    /// Reads `size` bytes from `port`; unknown ports read as all ones.
    fn port_read(&mut self, port: u16, size: u8) -> u32;
    /// Writes the low `size` bytes of `value` to `port`; writes to unknown ports are dropped.
    fn port_write(&mut self, port: u16, size: u8, value: u32);
}

/// Where guest console output goes (the host prints it behind a `[guest]` prefix).
pub trait ConsoleSink {
    /// One byte the guest transmitted on its serial port.
    fn write_byte(&mut self, byte: u8);
}

/// A monotonic clock for the virtual timer, in host timer ticks.
pub trait Clock {
    /// Host ticks elapsed since boot.
    fn now_ticks(&self) -> u64;
    /// Host ticks per second.
    fn ticks_per_second(&self) -> u64;
}
