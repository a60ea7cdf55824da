//! The host console: COM1 through `uart_16550`, behind the `log` facade.
//!
//! Every host line starts with `[vmm]` (errors with `[vmm] error:`, warnings with
//! `[vmm] warning:`), so a reader and the tests can tell host lines from guest lines.

use core::fmt::{self, Write};
use spin::Mutex;
use uart_16550::SerialPort;

const COM1: u16 = 0x3F8;

// SAFETY: COM1 at 0x3F8 is the standard PC serial port; this is the only owner of its ports.
static SERIAL: Mutex<SerialPort> = Mutex::new(unsafe { SerialPort::new(COM1) });

struct Logger;

impl log::Log for Logger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = match record.level() {
            log::Level::Error => "error: ",
            log::Level::Warn => "warning: ",
            _ => "",
        };
        write_line(format_args!("[vmm] {level}{}", record.args()));
    }

    fn flush(&self) {}
}

static LOGGER: Logger = Logger;

/// Bytes received on COM1 and not yet taken: filled by the IRQ 4 handler (in any context), drained
/// by the VMM into the guest's virtual 16550.
struct RxRing {
    bytes: [u8; 256],
    head: usize,
    len: usize,
    received: u64,
    dropped: u64,
}

static RX: Mutex<RxRing> = Mutex::new(RxRing {
    bytes: [0; 256],
    head: 0,
    len: 0,
    received: 0,
    dropped: 0,
});

/// Bytes received on COM1 so far, and how many of them the full ring dropped.
pub fn rx_counts() -> (u64, u64) {
    let rx = RX.lock();
    (rx.received, rx.dropped)
}

/// IRQ 4 (and the VMM's polling): moves every byte the UART holds into the receive ring
/// (dropping when it is full).
pub fn handle_rx_irq() {
    let mut port = SERIAL.lock();
    let mut rx = RX.lock();
    while let Ok(byte) = port.try_receive() {
        rx.received += 1;
        if rx.len == rx.bytes.len() {
            rx.dropped += 1;
            continue;
        }
        let at = (rx.head + rx.len) % rx.bytes.len();
        rx.bytes[at] = byte;
        rx.len += 1;
    }
}

/// The oldest received byte not yet taken.
pub fn take_rx() -> Option<u8> {
    let mut rx = RX.lock();
    if rx.len == 0 {
        return None;
    }
    let byte = rx.bytes[rx.head];
    rx.head = (rx.head + 1) % rx.bytes.len();
    rx.len -= 1;
    Some(byte)
}

/// Initialises COM1 (8N1, FIFOs on, receive interrupt enabled) and installs the logger.
pub fn init() {
    SERIAL.lock().init();
    // A second call would fail only if a logger were already set, which is harmless.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Writes one line (CR LF terminated) with interrupts off, so a trap cannot interleave its own
/// output with it.
pub fn write_line(args: fmt::Arguments<'_>) {
    without_interrupts(|| {
        let mut port = SERIAL.lock();
        let _ = port.write_fmt(args);
        let _ = port.write_str("\r\n");
    });
}

/// Writes a line even if the lock is held (a panic while printing): used by the panic handler.
pub fn panic_print(args: fmt::Arguments<'_>) {
    // SAFETY: called once on the way to the exit; if the lock was held, its owner will never run
    // again (we exit right after), so taking the port over cannot race with it.
    unsafe { SERIAL.force_unlock() };
    write_line(args);
}

/// Runs `f` with interrupts disabled, restoring the previous IF afterwards.
pub fn without_interrupts<R>(f: impl FnOnce() -> R) -> R {
    let rflags: u64;
    // SAFETY: reading RFLAGS and clearing IF only changes interrupt delivery on this CPU.
    unsafe { core::arch::asm!("pushfq; pop {}; cli", out(reg) rflags, options(nomem)) };
    let result = f();
    if rflags & (1 << 9) != 0 {
        // SAFETY: IF was set before we cleared it; setting it again restores the caller's state.
        unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    }
    result
}
