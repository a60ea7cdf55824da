//! Guest console output: the bytes the guest transmits on its virtual 16550 become host lines.
//!
//! Every guest line is printed as one `[guest] ...` line. A guest that already prefixes its own
//! lines with `[guest] ` (our guest-kernel does, so that its native output looks the same) is
//! not prefixed twice, which is what makes native and VMM output comparable line by line.

use vmm_core::io::ConsoleSink;

/// The longest line kept; longer lines are split.
const LINE_MAX: usize = 512;
const PREFIX: &[u8] = b"[guest] ";

/// Line-buffers guest output and prints whole lines.
#[derive(Debug)]
pub struct GuestConsole {
    line: [u8; LINE_MAX],
    len: usize,
    /// Bytes received in total.
    pub bytes: u64,
}

impl GuestConsole {
    /// An empty console.
    pub const fn new() -> Self {
        Self {
            line: [0; LINE_MAX],
            len: 0,
            bytes: 0,
        }
    }

    /// Prints what is buffered as a line (if anything).
    pub fn flush(&mut self) {
        if self.len == 0 {
            return;
        }
        let text = &self.line[..self.len];
        let body = text.strip_prefix(PREFIX).unwrap_or(text);
        let shown = core::str::from_utf8(body).unwrap_or("<guest output is not UTF-8>");
        crate::serial::write_line(format_args!("[guest] {shown}"));
        self.len = 0;
    }
}

impl ConsoleSink for GuestConsole {
    fn write_byte(&mut self, byte: u8) {
        self.bytes += 1;
        match byte {
            b'\n' => self.flush(),
            b'\r' => {}
            _ => {
                if self.len == LINE_MAX {
                    self.flush();
                }
                self.line[self.len] = byte;
                self.len += 1;
            }
        }
    }
}
