//! Guest console output: the bytes the guest transmits on its virtual 16550 become host lines.
//!
//! Every guest line is printed as one `[guest] ...` line. A guest that already prefixes its own
//! lines with `[guest] ` (our guest-kernel does, so that its native output looks the same) is
//! not prefixed twice, which is what makes native and VMM output comparable line by line.

use alloc::string::String;
use alloc::vec::Vec;
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
    /// Guest lines printed so far.
    pub lines: u64,
    /// Guest lines begun so far (their first byte received): the benchmark harness ends an op's
    /// window there, so the traps of printing its result line are not the op's.
    pub lines_begun: u64,
    /// The op names of `bench,<op>,...` lines not yet taken by the VMM (the benchmark harness
    /// attributes the traps since the previous guest line to that op).
    bench_ops: Vec<String>,
    /// The text whose first line starts the trace (host option `trace_from=`).
    pub marker: Option<String>,
    /// A guest line has contained `marker`.
    pub marker_seen: bool,
}

impl GuestConsole {
    /// An empty console.
    pub const fn new() -> Self {
        Self {
            line: [0; LINE_MAX],
            len: 0,
            bytes: 0,
            lines: 0,
            lines_begun: 0,
            bench_ops: Vec::new(),
            marker: None,
            marker_seen: false,
        }
    }

    /// An empty console that notes the first line containing `marker` (if any).
    pub fn watching_for(marker: Option<&str>) -> Self {
        Self {
            marker: marker.map(String::from),
            ..Self::new()
        }
    }

    /// The ops of the guest's `bench,` result lines printed since the last call.
    pub fn take_bench_ops(&mut self) -> Vec<String> {
        core::mem::take(&mut self.bench_ops)
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
        if let Some(marker) = &self.marker {
            self.marker_seen |= shown.contains(marker.as_str());
        }
        if let Some(op) = shown
            .strip_prefix("bench,")
            .and_then(|rest| rest.split(',').next())
        {
            self.bench_ops.push(String::from(op));
        }
        self.lines += 1;
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
                if self.len == 0 {
                    self.lines_begun += 1;
                }
                self.line[self.len] = byte;
                self.len += 1;
            }
        }
    }
}
