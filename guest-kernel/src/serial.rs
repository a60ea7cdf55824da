//! The console: a 16550 UART on COM1, polled for output, interrupt-driven for input (each line
//! typed is echoed back as `[guest] input: <line>`).
//!
//! Every line the OS prints, its own or a user process's (`write`), starts with `[guest] `: the
//! console inserts the prefix at each line start, so native output and the VMM's (which passes
//! prefixed lines through unchanged) compare line by line.

use crate::arch::{inb, outb};
use crate::sync::IrqLock;
use core::fmt::{self, Write};

const COM1: u16 = 0x3F8;
/// Register offsets (16550 datasheet): with DLAB = 0, 0 is THR/RBR and 1 is IER; with DLAB = 1
/// they are the divisor latch.
const REG_DATA: u16 = 0;
const REG_IER: u16 = 1;
const REG_FCR: u16 = 2;
const REG_LCR: u16 = 3;
const REG_MCR: u16 = 4;
const REG_LSR: u16 = 5;
const LCR_DLAB: u8 = 0x80;
const LCR_8N1: u8 = 0x03;
const FCR_ENABLE_CLEAR: u8 = 0x07;
const MCR_DTR_RTS_OUT2: u8 = 0x0B;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_DATA_READY: u8 = 0x01;
/// IER: interrupt when a received byte is available.
const IER_RX_AVAILABLE: u8 = 0x01;
/// Bytes read per interrupt at most. The FIFO holds 16, but bytes keep arriving while we read;
/// the IRQ line is edge-triggered, so the handler must drain until LSR.DR clears or the line
/// never drops and no further interrupt comes. The bound only stops a stuck UART from hanging.
const RX_BURST: usize = 256;
const INPUT_MAX: usize = 120;
/// 115200 baud / 115200 = divisor 1.
const DIVISOR: u16 = 1;
/// How long to poll for an empty transmitter before sending anyway (a missing UART must not hang
/// the kernel).
const POLL_LIMIT: u32 = 100_000;

const PREFIX: &str = "[guest] ";

struct Console {
    at_line_start: bool,
}

static CONSOLE: IrqLock<Console> = IrqLock::new(Console {
    at_line_start: true,
});

struct Input {
    line: [u8; INPUT_MAX],
    len: usize,
}

static INPUT: IrqLock<Input> = IrqLock::new(Input {
    line: [0; INPUT_MAX],
    len: 0,
});

/// Programs COM1 for 115200 8N1 with FIFOs, interrupts off.
pub fn init() {
    outb(COM1 + REG_IER, 0);
    outb(COM1 + REG_LCR, LCR_DLAB);
    outb(COM1 + REG_DATA, DIVISOR as u8);
    outb(COM1 + REG_IER, (DIVISOR >> 8) as u8);
    outb(COM1 + REG_LCR, LCR_8N1);
    outb(COM1 + REG_FCR, FCR_ENABLE_CLEAR);
    outb(COM1 + REG_MCR, MCR_DTR_RTS_OUT2);
    outb(COM1 + REG_IER, IER_RX_AVAILABLE);
}

/// The COM1 receive interrupt: collects bytes into a line and echoes each complete line.
pub fn receive() {
    let mut done = [0u8; INPUT_MAX];
    let mut done_len = None;
    INPUT.with(|input| {
        for _ in 0..RX_BURST {
            if inb(COM1 + REG_LSR) & LSR_DATA_READY == 0 {
                break;
            }
            let byte = inb(COM1 + REG_DATA);
            if byte == b'\r' || byte == b'\n' {
                if input.len > 0 {
                    done[..input.len].copy_from_slice(&input.line[..input.len]);
                    done_len = Some(input.len);
                    input.len = 0;
                }
            } else if input.len < INPUT_MAX {
                input.line[input.len] = byte;
                input.len += 1;
            }
        }
    });
    if let Some(n) = done_len {
        let text = core::str::from_utf8(&done[..n]).unwrap_or("<not UTF-8>");
        crate::println!("input: {text}");
    }
}

fn put_raw(byte: u8) {
    for _ in 0..POLL_LIMIT {
        if inb(COM1 + REG_LSR) & LSR_THR_EMPTY != 0 {
            break;
        }
    }
    outb(COM1 + REG_DATA, byte);
}

impl Console {
    fn put(&mut self, byte: u8) {
        if self.at_line_start {
            PREFIX.bytes().for_each(put_raw);
            self.at_line_start = false;
        }
        if byte == b'\n' {
            put_raw(b'\r');
            self.at_line_start = true;
        }
        put_raw(byte);
    }
}

impl Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        s.bytes().for_each(|b| self.put(b));
        Ok(())
    }
}

/// Writes raw bytes (a user process's `write`), prefixing each line.
pub fn write_bytes(bytes: &[u8]) {
    CONSOLE.with(|c| bytes.iter().for_each(|&b| c.put(b)));
}

/// Prints formatted text (use `println!`).
pub fn print(args: fmt::Arguments) {
    if CONSOLE.is_held() {
        // Only the panic path can get here (a fault while printing): print without the lock.
        let _ = Console {
            at_line_start: true,
        }
        .write_fmt(args);
        return;
    }
    CONSOLE.with(|c| {
        let _ = c.write_fmt(args);
    });
}

/// Prints one line with the `[guest] ` prefix.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::serial::print(format_args!("{}\n", format_args!($($arg)*)))
    };
}
