//! The real 8259A pair (via `pic8259`) and the 8254 PIT channel 0: the host's clock, and the
//! handling of every host IRQ (timer ticks, COM1 input).
//!
//! The PICs are remapped to vectors 0x20..0x2F (the CPU's exceptions own 0..31). The PIT runs
//! in mode 2 (rate generator) at the rate from the command line; every IRQ 0 adds one tick.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use pic8259::ChainedPics;
use spin::Mutex;

/// Vector of master IRQ 0.
pub const PIC_MASTER_OFFSET: u8 = 0x20;
/// Vector of slave IRQ 8.
pub const PIC_SLAVE_OFFSET: u8 = 0x28;

/// The PIT's input clock in Hz (8254 datasheet; the PC's 14.31818 MHz / 12).
pub const PIT_INPUT_HZ: u32 = 1_193_182;

// SAFETY: the offsets do not overlap the CPU exception vectors 0..31.
static PICS: Mutex<ChainedPics> =
    Mutex::new(unsafe { ChainedPics::new(PIC_MASTER_OFFSET, PIC_SLAVE_OFFSET) });

static TICKS: AtomicU64 = AtomicU64::new(0);
static TICK_HZ: AtomicU32 = AtomicU32::new(0);
/// IRQs seen per line (index = IRQ number), spurious ones included.
pub static IRQ_COUNTS: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];
/// Spurious IRQs seen (IRQ 7/15 with no bit in the in-service register), for a debugger.
static SPURIOUS: AtomicU64 = AtomicU64::new(0);

/// Remaps and unmasks the PICs (timer and cascade only), programs PIT channel 0 at `hz`, and
/// enables interrupts.
pub fn init(hz: u32) {
    let divisor = (PIT_INPUT_HZ / hz.max(1)).clamp(1, 65535);
    {
        let mut pics = PICS.lock();
        // SAFETY: pic8259's ICW1-4 on the standard PIC ports, remapping to the offsets PICS
        // was built with (clear of the CPU exceptions). Interrupts are still disabled here.
        unsafe { pics.initialize() };
        // SAFETY: unmasks only IRQs with a handler: IRQ 0 (PIT), 2 (cascade), 4 (COM1).
        unsafe { pics.write_masks(!0b0001_0101, 0xFF) };
    }
    program_pit(divisor as u16);
    TICK_HZ.store(PIT_INPUT_HZ / divisor, Ordering::Relaxed);
    log::info!("timer: PIT channel 0 at {} Hz (divisor {divisor}), PIC vectors {PIC_MASTER_OFFSET:#x}..{:#x}", PIT_INPUT_HZ / divisor, PIC_SLAVE_OFFSET + 7);
    // SAFETY: the IDT is loaded and every vector has a handler.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
}

/// Programs PIT channel 0 as a rate generator (mode 2, binary) with `divisor`.
fn program_pit(divisor: u16) {
    let [low, high] = divisor.to_le_bytes();
    // SAFETY: port 0x43 is the PIT mode/command register; this selects channel 0, lobyte/hibyte
    // access, mode 2, binary, and only changes the rate of IRQ 0.
    unsafe { x86::io::outb(0x43, 0b0011_0100) };
    // SAFETY: port 0x40 is channel 0's data port; the command above expects the low byte now.
    unsafe { x86::io::outb(0x40, low) };
    // SAFETY: as above, then the high byte, which starts the new count.
    unsafe { x86::io::outb(0x40, high) };
}

/// Timer ticks since `init`.
pub fn ticks() -> u64 {
    TICKS.load(Ordering::Relaxed)
}

/// The tick rate actually programmed (the divisor rounds the requested one).
pub fn tick_hz() -> u32 {
    TICK_HZ.load(Ordering::Relaxed)
}

/// Reads the in-service register of the PIC that owns `irq` (OCW3, "read ISR").
fn in_service(irq: u8) -> bool {
    let (command, bit) = if irq < 8 {
        (0x20, irq)
    } else {
        (0xA0, irq - 8)
    };
    // SAFETY: OCW3 0x0B selects the ISR for the next read of the command port; no other state
    // changes.
    unsafe { x86::io::outb(command, 0x0B) };
    // SAFETY: reading the command port returns the register OCW3 just selected; no side effects.
    let isr = unsafe { x86::io::inb(command) };
    isr & (1 << bit) != 0
}

/// Handles IRQ `irq` (0..16): counts it, ticks for the PIT, drains COM1 input, and sends the
/// EOI. A spurious
/// IRQ 7/15 (8259A datasheet: the request went away before the acknowledge) gets no EOI from
/// its own PIC (the slave's still needs the master's EOI for the cascade line).
pub fn handle_irq(irq: u8) {
    if let Some(count) = IRQ_COUNTS.get(irq as usize) {
        count.fetch_add(1, Ordering::Relaxed);
    }
    if (irq == 7 || irq == 15) && !in_service(irq) {
        SPURIOUS.fetch_add(1, Ordering::Relaxed);
        if irq == 15 {
            // SAFETY: a non-specific EOI to the master (port 0x20) for the cascade IRQ 2.
            unsafe { x86::io::outb(0x20, 0x20) };
        }
        return;
    }
    match irq {
        0 => {
            TICKS.fetch_add(1, Ordering::Relaxed);
        }
        4 => crate::serial::handle_rx_irq(),
        _ => {}
    }
    // SAFETY: `irq` is in service at the PIC (checked above for the spurious lines).
    unsafe { PICS.lock().notify_end_of_interrupt(PIC_MASTER_OFFSET + irq) };
}
