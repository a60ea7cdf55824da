//! QEMU's isa-debug-exit device at port 0xF4: the guest ends the run with a code.
//!
//! Under QEMU the process exits with status `(code << 1) | 1`; under the VMM the host reads
//! [`DebugExit::exit_requested`] after each OUT and stops the guest with that code.

/// The port QEMU's `-device isa-debug-exit,iobase=0xf4` decodes.
pub const DEBUG_EXIT_PORT: u16 = 0xF4;

/// The exit code a test guest writes when all its checks passed (blog_os convention).
pub const EXIT_SUCCESS: u32 = 0x10;
/// The exit code a test guest writes when a check failed.
pub const EXIT_FAILURE: u32 = 0x11;

/// isa-debug-exit: records the first value the guest wrote.
#[derive(Debug, Clone, Default)]
pub struct DebugExit {
    code: Option<u32>,
    writes: u64,
}

impl DebugExit {
    /// A device no guest has written to yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A guest write of `size` bytes (1, 2 or 4) of `value`. The first write wins: the guest
    /// stops there, and a later one cannot change the reported result.
    pub fn write(&mut self, size: u8, value: u32) {
        let value = match size {
            1 => value & 0xFF,
            2 => value & 0xFFFF,
            _ => value,
        };
        self.writes = self.writes.saturating_add(1);
        if self.code.is_none() {
            self.code = Some(value);
        }
    }

    /// The exit code the guest asked for, if it wrote one.
    pub fn exit_requested(&self) -> Option<u32> {
        self.code
    }

    /// How many writes the device received (more than one means the guest kept running after
    /// asking to stop).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    /// The process exit status QEMU would give for the requested code: `(code << 1) | 1`.
    pub fn qemu_exit_status(&self) -> Option<u32> {
        self.code.map(|code| (code << 1) | 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_first_code_only() {
        let mut dev = DebugExit::new();
        assert_eq!(dev.exit_requested(), None);
        dev.write(4, 0x10);
        dev.write(4, 0x11);
        assert_eq!(dev.exit_requested(), Some(0x10));
        assert_eq!(dev.writes(), 2);
    }

    #[test]
    fn narrow_writes_are_masked() {
        let mut dev = DebugExit::new();
        dev.write(1, 0xABCD_1234);
        assert_eq!(dev.exit_requested(), Some(0x34));
        let mut dev = DebugExit::new();
        dev.write(2, 0xABCD_1234);
        assert_eq!(dev.exit_requested(), Some(0x1234));
    }

    #[test]
    fn qemu_status_encoding() {
        let mut dev = DebugExit::new();
        dev.write(4, 0x10);
        assert_eq!(dev.qemu_exit_status(), Some(0x21));
    }
}
