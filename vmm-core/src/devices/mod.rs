//! Virtual devices behind a port bus: 8259A pair, 8254, 16550, isa-debug-exit.
//!
//! Each device is a pure state machine after rust-vmm's vm-superio and Oxide's propolis:
//! `read(offset) -> u8` / `write(offset, u8)`, one `match` over named register constants, offsets
//! decoded through an enum. A device never raises an interrupt itself: the caller queries a level
//! ([`Serial::intr_state`], [`Pit::advance_to`]'s edge count) and drives the [`PicPair`]. The
//! [`PortBus`] does that wiring and implements [`crate::io::PortIo`] for the emulator of
//! IN/OUT/INS/OUTS, and [`InterruptSource`] for the injection policy.
//!
//! # Devices
//!
//! - [`pic`]: 8259A master (0x20/0x21, IRQ 0–7) and slave (0xA0/0xA1, IRQ 8–15) on the master's
//!   IR2. ICW1–ICW4, OCW1 (IMR), OCW2 (specific and non-specific EOI), OCW3 (IRR/ISR read select,
//!   poll), AEOI, fixed priority, edge-triggered inputs, spurious IRQ 7/15 when a request vanished
//!   before the acknowledge, vector base from ICW2. Starts as a BIOS leaves it (bases 0x08/0x70,
//!   everything masked). *Not modelled*: rotation (rotate-on-EOI acts as plain EOI, set-priority
//!   ignored), special mask mode, special fully nested mode, level-triggered mode (LTIM recorded
//!   only), buffered mode, MCS-80 vectors, the ELCR (0x4D0/0x4D1).
//! - [`pit`]: 8254 channel 0 (0x40, control word at 0x43). Access modes LSB/MSB/LSB-then-MSB,
//!   modes 2 and 3 (periodic), 0 and 4 (one edge at terminal count), counter latch command,
//!   read-back (count and status), divisor 0 = 65536, input clock 1 193 182 Hz. Time is the
//!   host's, converted exactly with integers ([`pit::pit_ticks_from_host`]). *Not modelled*:
//!   channels 1 and 2 (their data ports read 0xFF, writes dropped; port 0x61 is not decoded),
//!   BCD counting (the BCD bit is recorded, counts are binary), modes 1 and 5 (the gate of
//!   channel 0 is tied high on the PC, so they never trigger; they count like mode 0 without an
//!   edge), the exact phase of the count inside one input clock.
//! - [`uart`]: 16550A COM1 (0x3F8–0x3FF). THR/RBR, IER, IIR/FCR, LCR (DLAB), MCR, LSR, MSR, SCR,
//!   divisor latch. Transmit goes to a [`crate::io::ConsoleSink`] at once (THR is always empty
//!   again by the next access); receive from a queue the host fills
//!   ([`Serial::enqueue_rx`], 64 bytes, overrun sets LSR.OE); interrupts for received data, THR
//!   empty, line status and modem status with the IIR priority encoding; loopback (MCR.LOOP).
//!   *Not modelled*: baud timing, the character-timeout interrupt and FIFO trigger levels (any
//!   received byte is "data available"), parity/framing/break errors, OUT2 gating of the IRQ line
//!   (QEMU does not gate either), the scratch-free 8250 variant.
//! - [`debug_exit`]: QEMU's isa-debug-exit at 0xF4: the first value written (1, 2 or 4 bytes) is
//!   recorded; the host ends the guest with it. QEMU's process status would be `(code << 1) | 1`.
//! - [`bus`]: the port map above plus the POST delay port 0x80 (writes dropped, reads 0xFF).
//!   Unknown ports read all ones and drop writes; each is counted per port in first-seen order
//!   (32 ports kept, the rest counted as overflow) and logged once. Multi-byte accesses to byte
//!   devices are split into byte accesses at consecutive ports, low byte first (as the ISA bus
//!   does for an 8-bit device).

pub mod bus;
pub mod debug_exit;
pub mod pic;
pub mod pit;
pub mod uart;

pub use bus::{PortBus, UnknownPort, UnknownPorts};
pub use debug_exit::DebugExit;
pub use pic::{Pic8259, PicPair};
pub use pit::Pit;
pub use uart::Serial;

/// The virtual interrupt controller as the injection policy sees it: the level of its INTR
/// output, and the INTA cycle. Implemented by [`PicPair`] and by [`PortBus`].
pub trait InterruptSource {
    /// Whether the controller asserts INTR (an unmasked request above the in-service priority).
    fn has_pending(&self) -> bool;
    /// The interrupt-acknowledge cycle: the vector to deliver (moving the request into service),
    /// a spurious vector if the request vanished, or `None` if the controller cannot answer (the
    /// guest is in the middle of re-initialising it).
    fn acknowledge(&mut self) -> Option<u8>;
}
