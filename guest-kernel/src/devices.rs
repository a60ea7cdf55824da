//! The legacy devices the OS drives by port I/O: the 8259A PIC pair, the 8254 PIT channel 0 and
//! the isa-debug-exit port.

use crate::arch::{inb, outb, outl};

const PIC1_CMD: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_CMD: u16 = 0xA0;
const PIC2_DATA: u16 = 0xA1;
/// ICW1: edge-triggered, cascade, ICW4 follows (8259A datasheet, "Initialization Command Words").
const ICW1_INIT_ICW4: u8 = 0x11;
/// ICW4: 8086 mode, normal EOI.
const ICW4_8086: u8 = 0x01;
/// OCW2: non-specific end of interrupt.
const OCW2_EOI: u8 = 0x20;
/// OCW3: the next read of the command port returns the IRR / the ISR.
const OCW3_READ_IRR: u8 = 0x0A;
const OCW3_READ_ISR: u8 = 0x0B;

/// The vector of IRQ 0 (the master PIC's base); IRQ n is `IRQ_BASE + n`.
pub const IRQ_BASE: u8 = 0x20;
/// The PIT's IRQ.
pub const IRQ_TIMER: u8 = 0;
/// The master's spurious IRQ (IRQ 7) and the slave's (IRQ 15).
pub const IRQ_SPURIOUS_MASTER: u8 = 7;
/// See `IRQ_SPURIOUS_MASTER`.
pub const IRQ_SPURIOUS_SLAVE: u8 = 15;

/// The COM1 UART's IRQ.
pub const IRQ_COM1: u8 = 4;
/// The IMR written at init: only IRQ 0 (timer), IRQ 2 (the cascade) and IRQ 4 (COM1 receive)
/// unmasked.
pub const PIC1_IMR: u8 = !0b0001_0101;
/// All of the slave's IRQs masked.
pub const PIC2_IMR: u8 = 0xFF;

/// Initialises both PICs (ICW1-ICW4) with vectors 0x20-0x2F and masks every IRQ but the timer.
pub fn pic_init() {
    outb(PIC1_CMD, ICW1_INIT_ICW4);
    outb(PIC2_CMD, ICW1_INIT_ICW4);
    outb(PIC1_DATA, IRQ_BASE); // ICW2: vector base
    outb(PIC2_DATA, IRQ_BASE + 8);
    outb(PIC1_DATA, 1 << 2); // ICW3: slave on IRQ 2
    outb(PIC2_DATA, 2); // ICW3: slave identity
    outb(PIC1_DATA, ICW4_8086);
    outb(PIC2_DATA, ICW4_8086);
    outb(PIC1_DATA, PIC1_IMR);
    outb(PIC2_DATA, PIC2_IMR);
}

/// Sends EOI for `irq` (to the slave too when it came from there).
pub fn pic_eoi(irq: u8) {
    if irq >= 8 {
        outb(PIC2_CMD, OCW2_EOI);
    }
    outb(PIC1_CMD, OCW2_EOI);
}

/// The master's interrupt mask register.
pub fn pic_master_imr() -> u8 {
    inb(PIC1_DATA)
}

/// Writes the master's IMR.
pub fn set_pic_master_imr(imr: u8) {
    outb(PIC1_DATA, imr);
}

/// The master's interrupt request register (OCW3 read IRR).
pub fn pic_master_irr() -> u8 {
    outb(PIC1_CMD, OCW3_READ_IRR);
    inb(PIC1_CMD)
}

/// Selects the IRR for the next command-port read (OCW3): a harmless write, used by the bench.
pub fn pic_select_irr() {
    outb(PIC1_CMD, OCW3_READ_IRR);
}

/// True when `irq` (7 or 15) is really in service; false for a spurious interrupt, which must
/// not be acknowledged (8259A datasheet; the slave's spurious still needs the master's EOI).
pub fn pic_in_service(irq: u8) -> bool {
    let (cmd, bit) = if irq >= 8 {
        (PIC2_CMD, irq - 8)
    } else {
        (PIC1_CMD, irq)
    };
    outb(cmd, OCW3_READ_ISR);
    let isr = inb(cmd);
    outb(cmd, OCW3_READ_IRR);
    isr & (1 << bit) != 0
}

const PIT_CHANNEL0: u16 = 0x40;
const PIT_COMMAND: u16 = 0x43;
/// Channel 0, lobyte/hibyte access, mode 2 (rate generator), binary.
const PIT_CH0_RATE_GENERATOR: u8 = 0x34;
/// The PIT's input clock in Hz.
pub const PIT_HZ: u32 = 1_193_182;

/// The divisor for `hz`, rounded to nearest (callers keep `hz` within 19..=10000, so it fits in
/// 16 bits).
pub fn pit_divisor(hz: u32) -> u16 {
    ((PIT_HZ + hz / 2) / hz).clamp(1, 0xFFFF) as u16
}

/// Programs channel 0 to interrupt `hz` times a second.
pub fn pit_init(hz: u32) {
    let divisor = pit_divisor(hz);
    outb(PIT_COMMAND, PIT_CH0_RATE_GENERATOR);
    outb(PIT_CHANNEL0, divisor as u8);
    outb(PIT_CHANNEL0, (divisor >> 8) as u8);
}

/// Leaves through the isa-debug-exit device with `code` (`boot::exit_code`). If the device is
/// missing, halts with interrupts off (nothing else can be done).
pub fn exit(code: u32) -> ! {
    outl(boot::EXIT_PORT, code);
    loop {
        crate::arch::cli();
        crate::arch::hlt();
    }
}
