//! The 8259A programmable interrupt controller, and the master/slave pair of the PC.
//!
//! Specification: Intel 8259A datasheet (order 231468), "Programming the 8259A" (ICW1–ICW4,
//! OCW1–OCW3), "Interrupt sequence" (the INTA cycles this model collapses into
//! [`PicPair::acknowledge`]) and "Edge and level triggered modes" (spurious IR7).
//!
//! Modelled: the initialisation sequence, IMR, IRR/ISR with fixed priority (IR0 highest),
//! specific and non-specific EOI, automatic EOI, reading IRR or ISR through OCW3, poll mode,
//! edge-triggered inputs (the request must still be there at acknowledge time, otherwise the chip
//! answers with the spurious IR7 vector), the vector base from ICW2, and the cascade of the slave
//! on the master's IR2.
//!
//! Not modelled: priority rotation (the rotate OCW2 commands act as their non-rotating EOI
//! counterparts; "set priority" is ignored), special mask mode, special fully nested mode,
//! level-triggered mode (ICW1.LTIM is recorded but inputs stay edge-triggered), buffered mode and
//! the MCS-80/85 call format (vectors are always 8086-style).

/// ICW1 is recognised on the command port by bit 4 set (datasheet: "D4 = 1").
const ICW1_INIT: u8 = 0b0001_0000;
/// ICW1.IC4: an ICW4 will follow.
const ICW1_IC4: u8 = 0b0000_0001;
/// ICW1.SNGL: single chip, no ICW3.
const ICW1_SNGL: u8 = 0b0000_0010;
/// ICW1.LTIM: level-triggered mode (recorded, not modelled).
const ICW1_LTIM: u8 = 0b0000_1000;
/// ICW2 bits T7–T3: the vector base; the low three bits come from the IR line.
const ICW2_VECTOR_MASK: u8 = 0b1111_1000;
/// ICW4.AEOI: automatic end of interrupt.
const ICW4_AEOI: u8 = 0b0000_0010;
/// OCW3 is recognised on the command port by D4 = 0, D3 = 1.
const OCW3_SELECT: u8 = 0b0000_1000;
/// OCW3.RR: the read-register command is valid.
const OCW3_RR: u8 = 0b0000_0010;
/// OCW3.RIS: read ISR (with RR) instead of IRR.
const OCW3_RIS: u8 = 0b0000_0001;
/// OCW3.P: poll command.
const OCW3_POLL: u8 = 0b0000_0100;
/// OCW2 R/SL/EOI field (bits 7–5).
const OCW2_COMMAND_MASK: u8 = 0b1110_0000;
/// OCW2 L2–L0: the IR level a specific command names.
const OCW2_LEVEL_MASK: u8 = 0b0000_0111;
/// OCW2: non-specific EOI.
const OCW2_NON_SPECIFIC_EOI: u8 = 0b0010_0000;
/// OCW2: specific EOI.
const OCW2_SPECIFIC_EOI: u8 = 0b0110_0000;
/// OCW2: rotate on non-specific EOI (rotation is off: acts as non-specific EOI).
const OCW2_ROTATE_NON_SPECIFIC_EOI: u8 = 0b1010_0000;
/// OCW2: rotate on specific EOI (rotation is off: acts as specific EOI).
const OCW2_ROTATE_SPECIFIC_EOI: u8 = 0b1110_0000;
/// Poll word bit 7: an interrupt was pending.
const POLL_INTERRUPT: u8 = 0b1000_0000;
/// The IR line a chip reports when the request vanished before acknowledge (datasheet:
/// "the 8259A will respond as if IR7 was requested").
pub const SPURIOUS_LINE: u8 = 7;
/// The master's input the slave's INT output drives on the PC.
pub const CASCADE_LINE: u8 = 2;

/// Command (even) port of the master.
pub const MASTER_COMMAND: u16 = 0x20;
/// Data (odd) port of the master.
pub const MASTER_DATA: u16 = 0x21;
/// Command (even) port of the slave.
pub const SLAVE_COMMAND: u16 = 0xA0;
/// Data (odd) port of the slave.
pub const SLAVE_DATA: u16 = 0xA1;

/// The vector base a PC BIOS leaves in the master (IRQ 0–7 → 0x08–0x0F).
pub const BIOS_MASTER_VECTOR_BASE: u8 = 0x08;
/// The vector base a PC BIOS leaves in the slave (IRQ 8–15 → 0x70–0x77).
pub const BIOS_SLAVE_VECTOR_BASE: u8 = 0x70;

/// Register offsets of one chip: A0 low is the command port, A0 high the data port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// A0 = 0: ICW1, OCW2, OCW3 on write; IRR, ISR or the poll word on read.
    Command,
    /// A0 = 1: ICW2–ICW4, OCW1 on write; IMR on read.
    Data,
}

impl Port {
    fn decode(offset: u8) -> Self {
        if offset & 1 == 0 {
            Port::Command
        } else {
            Port::Data
        }
    }
}

/// Where a chip is in its initialisation sequence (datasheet, "Initialization Command Words").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InitState {
    /// Initialised: the data port takes OCW1.
    Ready,
    /// ICW1 written: the data port takes ICW2 next.
    ExpectIcw2,
    /// ICW2 written, not single: ICW3 next.
    ExpectIcw3,
    /// ICW3 (or ICW2 when single) written and IC4 set: ICW4 next.
    ExpectIcw4,
}

/// Which register a read of the command port returns (OCW3.RR/RIS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadSelect {
    Irr,
    Isr,
}

/// One 8259A as a pure state machine: `read`/`write` by register offset, input lines driven by
/// the caller, and the INTA sequence as [`Pic8259::acknowledge_line`].
#[derive(Debug, Clone)]
pub struct Pic8259 {
    irr: u8,
    isr: u8,
    imr: u8,
    /// The level of each IR input now (edge detection: IRR latches on a low-to-high transition).
    level: u8,
    vector_base: u8,
    init: InitState,
    icw1: u8,
    icw3: u8,
    icw4_expected: bool,
    aeoi: bool,
    read_select: ReadSelect,
    poll: bool,
}

impl Pic8259 {
    /// A chip as the BIOS leaves it: initialised with `vector_base`, 8086 mode, all lines masked.
    pub fn new(vector_base: u8) -> Self {
        Self {
            irr: 0,
            isr: 0,
            imr: 0xFF,
            level: 0,
            vector_base: vector_base & ICW2_VECTOR_MASK,
            init: InitState::Ready,
            icw1: ICW1_INIT | ICW1_IC4,
            icw3: 0,
            icw4_expected: false,
            aeoi: false,
            read_select: ReadSelect::Irr,
            poll: false,
        }
    }

    /// Interrupt request register.
    pub fn irr(&self) -> u8 {
        self.irr
    }
    /// In-service register.
    pub fn isr(&self) -> u8 {
        self.isr
    }
    /// Interrupt mask register (OCW1).
    pub fn imr(&self) -> u8 {
        self.imr
    }
    /// Vector of IR0 (ICW2 with the low three bits clear).
    pub fn vector_base(&self) -> u8 {
        self.vector_base
    }
    /// Automatic EOI mode (ICW4.AEOI).
    pub fn auto_eoi(&self) -> bool {
        self.aeoi
    }
    /// Whether the chip is between ICW1 and its last ICW.
    pub fn initialising(&self) -> bool {
        self.init != InitState::Ready
    }
    /// The ICW3 the guest wrote (master: slave bit map; slave: its id). Recorded only: the PC
    /// wiring (slave on IR2) is fixed.
    pub fn icw3(&self) -> u8 {
        self.icw3
    }
    /// Whether ICW1 asked for level-triggered mode (recorded, not modelled).
    pub fn level_triggered_requested(&self) -> bool {
        self.icw1 & ICW1_LTIM != 0
    }

    /// Drives input `line` (0–7) to `high`. A low-to-high transition latches the request in IRR;
    /// going low withdraws a request not yet acknowledged (datasheet: the IR input must stay high
    /// until the first INTA).
    pub fn set_level(&mut self, line: u8, high: bool) {
        let bit = line_bit(line);
        if high {
            if self.level & bit == 0 {
                self.irr |= bit;
            }
            self.level |= bit;
        } else {
            self.level &= !bit;
            self.irr &= !bit;
        }
    }

    /// A rising edge on `line` from a device that holds its output until the acknowledge (the
    /// PIT's OUT0): latches the request without leaving the input high.
    pub fn pulse(&mut self, line: u8) {
        let bit = line_bit(line);
        if self.level & bit == 0 {
            self.irr |= bit;
        }
    }

    /// Highest priority currently in service.
    fn highest_in_service(&self) -> Option<u8> {
        lowest_set_bit(self.isr)
    }

    /// The request the priority resolver signals now, if any (see [`priority_resolver`]). None
    /// between ICW1 and the last ICW: a chip being initialised has no vector base to answer
    /// with yet.
    fn signalled_request(&self) -> Option<u8> {
        if self.initialising() {
            return None;
        }
        priority_resolver(self.irr, self.imr, self.isr)
    }

    /// The INT output: an unmasked request of higher priority than everything in service
    /// (datasheet, "Priority Resolver"). Held low while the chip is being initialised.
    pub fn int_output(&self) -> bool {
        self.signalled_request().is_some()
    }

    /// The two INTA pulses: returns the IR line acknowledged, moving it from IRR to ISR (not into
    /// ISR with AEOI), or `None` when the request vanished (the caller reports the spurious IR7
    /// vector, and ISR is left alone, as the datasheet says).
    pub fn acknowledge_line(&mut self) -> Option<u8> {
        let line = self.signalled_request()?;
        let bit = line_bit(line);
        // Edge-triggered: the latch is consumed; a new request needs a new rising edge.
        self.irr &= !bit;
        if !self.aeoi {
            self.isr |= bit;
        }
        Some(line)
    }

    /// The vector the chip puts on the bus for `line`.
    pub fn vector_for(&self, line: u8) -> u8 {
        self.vector_base | (line & 7)
    }

    /// Guest read of register `offset` (0 = command port, 1 = data port).
    pub fn read(&mut self, offset: u8) -> u8 {
        match Port::decode(offset) {
            Port::Command if self.poll => {
                // Poll command: the next read is the poll word, and it acts as an INTA.
                self.poll = false;
                match self.acknowledge_line() {
                    Some(line) => POLL_INTERRUPT | line,
                    None => 0,
                }
            }
            Port::Command => match self.read_select {
                ReadSelect::Irr => self.irr,
                ReadSelect::Isr => self.isr,
            },
            Port::Data => self.imr,
        }
    }

    /// Guest write of `value` to register `offset` (0 = command port, 1 = data port).
    pub fn write(&mut self, offset: u8, value: u8) {
        match Port::decode(offset) {
            Port::Command if value & ICW1_INIT != 0 => self.write_icw1(value),
            Port::Command if value & OCW3_SELECT != 0 => self.write_ocw3(value),
            Port::Command => self.write_ocw2(value),
            Port::Data => match self.init {
                InitState::ExpectIcw2 => {
                    self.vector_base = value & ICW2_VECTOR_MASK;
                    self.init = if self.icw1 & ICW1_SNGL == 0 {
                        InitState::ExpectIcw3
                    } else if self.icw4_expected {
                        InitState::ExpectIcw4
                    } else {
                        InitState::Ready
                    };
                }
                InitState::ExpectIcw3 => {
                    self.icw3 = value;
                    self.init = if self.icw4_expected {
                        InitState::ExpectIcw4
                    } else {
                        InitState::Ready
                    };
                }
                InitState::ExpectIcw4 => {
                    self.aeoi = value & ICW4_AEOI != 0;
                    self.init = InitState::Ready;
                }
                InitState::Ready => self.imr = value,
            },
        }
    }

    /// ICW1 (datasheet): the edge sense circuit is reset, IMR is cleared, the status read is
    /// set to IRR, and without IC4 every ICW4 function is zero. The reset edge sense forgets
    /// the inputs' levels: a device that drives its (still high) output again latches a new
    /// request, as QEMU's 8259 does, so a UART with data pending across the guest's PIC
    /// initialisation is not silenced for good.
    fn write_icw1(&mut self, value: u8) {
        self.icw1 = value;
        self.level = 0;
        self.icw4_expected = value & ICW1_IC4 != 0;
        self.init = InitState::ExpectIcw2;
        self.imr = 0;
        self.irr = 0;
        self.isr = 0;
        self.aeoi = false;
        self.read_select = ReadSelect::Irr;
        self.poll = false;
    }

    fn write_ocw2(&mut self, value: u8) {
        match value & OCW2_COMMAND_MASK {
            OCW2_NON_SPECIFIC_EOI | OCW2_ROTATE_NON_SPECIFIC_EOI => {
                if let Some(line) = self.highest_in_service() {
                    self.isr &= !line_bit(line);
                }
            }
            OCW2_SPECIFIC_EOI | OCW2_ROTATE_SPECIFIC_EOI => {
                self.isr &= !line_bit(value & OCW2_LEVEL_MASK);
            }
            // No operation, set/clear rotate in AEOI, set priority: rotation is not modelled.
            _ => {}
        }
    }

    fn write_ocw3(&mut self, value: u8) {
        if value & OCW3_RR != 0 {
            self.read_select = if value & OCW3_RIS != 0 {
                ReadSelect::Isr
            } else {
                ReadSelect::Irr
            };
        }
        self.poll = value & OCW3_POLL != 0;
    }
}

// Lab 5 (docs/labs/lab5-virtual-interrupts.md): built with the feature `lab5`, the student's
// priority resolver (labs/lab5_virtual_interrupts.rs) stands in for the one below.
#[cfg(feature = "lab5")]
pub use crate::labs::lab5::priority_resolver;

/// The 8259A's priority resolver in fully nested mode (datasheet, "Priority Resolver" and
/// "Fully Nested Mode"): the IR line the chip interrupts the CPU for, given its registers, or
/// `None` when its INT output stays low.
///
/// Priorities are fixed, IR0 highest and IR7 lowest. A request counts only while its IMR bit
/// is clear; it is signalled only when its priority is *strictly* above every level in
/// service, whether or not that level is masked now (an in-service level blocks itself and
/// everything below it until its EOI). Special mask mode, which would change that, is not
/// modelled.
#[cfg(not(feature = "lab5"))]
pub fn priority_resolver(irr: u8, imr: u8, isr: u8) -> Option<u8> {
    let request = lowest_set_bit(irr & !imr)?;
    match lowest_set_bit(isr) {
        Some(in_service) if in_service <= request => None,
        _ => Some(request),
    }
}

fn line_bit(line: u8) -> u8 {
    1u8 << (line & 7)
}

fn lowest_set_bit(bits: u8) -> Option<u8> {
    if bits == 0 {
        None
    } else {
        // trailing_zeros of a non-zero u8 is at most 7.
        Some(bits.trailing_zeros() as u8)
    }
}

/// The PC's two 8259As: master at 0x20/0x21 (IRQ 0–7), slave at 0xA0/0xA1 (IRQ 8–15) cascaded
/// on the master's IR2.
///
/// The cascade wire is followed as a level: after every change to the slave the master's IR2
/// input is set to the slave's INT output, so a slave request that stays asserted across an
/// acknowledge is not lost.
#[derive(Debug, Clone)]
pub struct PicPair {
    master: Pic8259,
    slave: Pic8259,
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    /// The pair as a PC BIOS leaves it: vector bases 0x08 and 0x70, all lines masked.
    pub fn new() -> Self {
        Self {
            master: Pic8259::new(BIOS_MASTER_VECTOR_BASE),
            slave: Pic8259::new(BIOS_SLAVE_VECTOR_BASE),
        }
    }

    /// The master chip (IRQ 0–7).
    pub fn master(&self) -> &Pic8259 {
        &self.master
    }
    /// The slave chip (IRQ 8–15).
    pub fn slave(&self) -> &Pic8259 {
        &self.slave
    }

    /// Whether `port` belongs to the pair.
    pub fn decodes(port: u16) -> bool {
        matches!(
            port,
            MASTER_COMMAND | MASTER_DATA | SLAVE_COMMAND | SLAVE_DATA
        )
    }

    /// Guest byte read of `port`; ports outside the pair read 0xFF.
    pub fn read_port(&mut self, port: u16) -> u8 {
        let value = match port {
            MASTER_COMMAND | MASTER_DATA => self.master.read((port & 1) as u8),
            SLAVE_COMMAND | SLAVE_DATA => self.slave.read((port & 1) as u8),
            _ => 0xFF,
        };
        self.sync_cascade();
        value
    }

    /// Guest byte write of `value` to `port`; ports outside the pair are ignored.
    pub fn write_port(&mut self, port: u16, value: u8) {
        match port {
            MASTER_COMMAND | MASTER_DATA => self.master.write((port & 1) as u8, value),
            SLAVE_COMMAND | SLAVE_DATA => self.slave.write((port & 1) as u8, value),
            _ => {}
        }
        self.sync_cascade();
    }

    /// Drives IRQ `line` (0–15) high: a rising edge latches a request.
    pub fn raise_irq(&mut self, line: u8) {
        self.set_irq_level(line, true);
    }

    /// Drives IRQ `line` (0–15) low: a request not yet acknowledged is withdrawn.
    pub fn lower_irq(&mut self, line: u8) {
        self.set_irq_level(line, false);
    }

    /// Drives IRQ `line` (0–15) to `high` (for level sources such as the 16550's interrupt).
    /// IRQ 2 is the cascade input and cannot be driven from outside; lines above 15 are ignored.
    pub fn set_irq_level(&mut self, line: u8, high: bool) {
        match line {
            CASCADE_LINE => {}
            0..=7 => self.master.set_level(line, high),
            8..=15 => {
                self.slave.set_level(line - 8, high);
                self.sync_cascade();
            }
            _ => {}
        }
    }

    /// A rising edge on IRQ `line` (0–15) from a device that holds it until acknowledged (the
    /// PIT's IRQ0).
    pub fn pulse_irq(&mut self, line: u8) {
        match line {
            CASCADE_LINE => {}
            0..=7 => self.master.pulse(line),
            8..=15 => {
                self.slave.pulse(line - 8);
                self.sync_cascade();
            }
            _ => {}
        }
    }

    /// The master's INT output: an unmasked request above the in-service priority (false while
    /// the guest is in the middle of initialising the master).
    pub fn has_pending_interrupt(&self) -> bool {
        !self.master.initialising() && self.master.int_output()
    }

    /// The INTA cycle of the pair: the vector of the highest-priority pending request, moving it
    /// from IRR to ISR on the master (and on the slave when it came through the cascade). When
    /// the request vanished the vector is the spurious IR7 of the chip that answered (the
    /// master's IRQ 7, or the slave's IRQ 15 with the master's IR2 left in service). Returns
    /// `None` only while the master is in the middle of its initialisation sequence.
    pub fn acknowledge(&mut self) -> Option<u8> {
        if self.master.initialising() {
            return None;
        }
        let vector = match self.master.acknowledge_line() {
            Some(CASCADE_LINE) => match self.slave.acknowledge_line() {
                Some(line) => self.slave.vector_for(line),
                None => self.slave.vector_for(SPURIOUS_LINE),
            },
            Some(line) => self.master.vector_for(line),
            None => self.master.vector_for(SPURIOUS_LINE),
        };
        self.sync_cascade();
        Some(vector)
    }

    /// IRR of both chips as IRQ 0–15 (bit n = IRQ n).
    pub fn irr(&self) -> u16 {
        u16::from(self.master.irr) | (u16::from(self.slave.irr) << 8)
    }
    /// ISR of both chips as IRQ 0–15.
    pub fn isr(&self) -> u16 {
        u16::from(self.master.isr) | (u16::from(self.slave.isr) << 8)
    }
    /// IMR of both chips as IRQ 0–15.
    pub fn imr(&self) -> u16 {
        u16::from(self.master.imr) | (u16::from(self.slave.imr) << 8)
    }

    /// Follows the cascade wire: the master's IR2 input is the slave's INT output.
    fn sync_cascade(&mut self) {
        let bit = line_bit(CASCADE_LINE);
        if self.slave.int_output() {
            self.master.level |= bit;
            self.master.irr |= bit;
        } else {
            self.master.level &= !bit;
            self.master.irr &= !bit;
        }
    }
}

impl super::InterruptSource for PicPair {
    fn has_pending(&self) -> bool {
        self.has_pending_interrupt()
    }
    fn acknowledge(&mut self) -> Option<u8> {
        PicPair::acknowledge(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::InterruptSource;
    use proptest::prelude::*;

    // Register values written again from the 8259A datasheet, as a driver would.
    const CMD_M: u16 = 0x20;
    const DATA_M: u16 = 0x21;
    const CMD_S: u16 = 0xA0;
    const DATA_S: u16 = 0xA1;
    /// ICW1: D4 = 1 (ICW1), IC4 = 1, cascade, edge.
    const ICW1_WITH_ICW4: u8 = 0x11;
    /// ICW4: µPM = 1 (8086).
    const ICW4_8086: u8 = 0x01;
    /// ICW4: µPM = 1, AEOI = 1.
    const ICW4_8086_AEOI: u8 = 0x03;
    /// OCW2 non-specific EOI: R=0 SL=0 EOI=1.
    const EOI: u8 = 0x20;
    /// OCW2 specific EOI: R=0 SL=1 EOI=1, level in L2–L0.
    const SPECIFIC_EOI: u8 = 0x60;
    /// OCW3 read IRR: D3 = 1, RR = 1, RIS = 0.
    const READ_IRR: u8 = 0x0A;
    /// OCW3 read ISR: D3 = 1, RR = 1, RIS = 1.
    const READ_ISR: u8 = 0x0B;
    /// OCW3 poll: D3 = 1, P = 1.
    const POLL: u8 = 0x0C;

    /// The Linux/BIOS remap: master 0x20, slave 0x28, slave on IR2, all unmasked.
    fn init_pair(icw4: u8) -> PicPair {
        let mut pic = PicPair::new();
        pic.write_port(CMD_M, ICW1_WITH_ICW4);
        pic.write_port(DATA_M, 0x20);
        pic.write_port(DATA_M, 0x04); // slave on IR2
        pic.write_port(DATA_M, icw4);
        pic.write_port(CMD_S, ICW1_WITH_ICW4);
        pic.write_port(DATA_S, 0x28);
        pic.write_port(DATA_S, 0x02); // slave id 2
        pic.write_port(DATA_S, icw4);
        pic.write_port(DATA_M, 0x00);
        pic.write_port(DATA_S, 0x00);
        pic
    }

    /// Highest-priority unmasked request (fixed priority: IR0 highest), whatever is in service.
    fn highest_request(chip: &Pic8259) -> Option<u8> {
        lowest_set_bit(chip.irr & !chip.imr)
    }

    /// The datasheet's priority resolver as a walk down the priorities, IR0 first: the first
    /// level in service blocks itself and everything below it; the first unmasked request
    /// above it wins.
    fn resolve_by_walking_the_priorities(irr: u8, imr: u8, isr: u8) -> Option<u8> {
        for level in 0..8u8 {
            let bit = 1u8 << level;
            if isr & bit != 0 {
                return None;
            }
            if irr & bit != 0 && imr & bit == 0 {
                return Some(level);
            }
        }
        None
    }

    #[test]
    fn the_priority_resolver_follows_the_datasheet_on_every_register_state() {
        for irr in 0..=u8::MAX {
            for imr in 0..=u8::MAX {
                for isr in 0..=u8::MAX {
                    let got = priority_resolver(irr, imr, isr);
                    let want = resolve_by_walking_the_priorities(irr, imr, isr);
                    assert_eq!(
                        got, want,
                        "IRR={irr:#010b} IMR={imr:#010b} ISR={isr:#010b}: IR0 is the highest \
                         priority, a masked request is not seen, and a level in service blocks \
                         itself and all below it, masked or not"
                    );
                }
            }
        }
    }

    #[test]
    fn a_masked_level_in_service_still_blocks_lower_requests() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x23));
        // The handler masks its own line before its EOI, as Linux's mask_and_ack does.
        pic.write_port(DATA_M, 1 << 3);
        pic.raise_irq(5);
        assert!(
            !pic.has_pending_interrupt(),
            "IR3 in service blocks IR5 though IR3 is masked"
        );
        pic.raise_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x21), "IR1 is above IR3");
        pic.write_port(CMD_M, SPECIFIC_EOI | 1);
        pic.write_port(CMD_M, SPECIFIC_EOI | 3);
        assert_eq!(pic.acknowledge(), Some(0x25));
    }

    #[test]
    fn a_level_in_service_blocks_a_new_request_on_the_same_line() {
        let mut pic = init_pair(ICW4_8086);
        pic.pulse_irq(0);
        assert_eq!(pic.acknowledge(), Some(0x20));
        pic.pulse_irq(0); // the next timer tick, before the handler's EOI
        assert!(
            !pic.has_pending_interrupt(),
            "IR0 in service: the new IR0 request waits for the EOI"
        );
        pic.write_port(CMD_M, EOI);
        assert_eq!(pic.acknowledge(), Some(0x20));
    }

    #[test]
    fn a_line_held_high_across_icw1_latches_again_when_driven() {
        let mut p = Pic8259::new(0x08);
        p.set_level(4, true);
        assert_eq!(p.irr() & 0x10, 0x10);
        // The guest (re)initialises the PIC while the device still holds its line high.
        p.write(0, 0x11);
        p.write(1, 0x20);
        p.write(1, 0x04);
        p.write(1, 0x01);
        assert_eq!(p.irr(), 0, "ICW1 clears IRR");
        // The next time the device drives its output, the request is latched again.
        p.set_level(4, true);
        assert_eq!(p.irr() & 0x10, 0x10);
    }

    #[test]
    fn reset_state_is_bios_like_and_masked() {
        let mut pic = PicPair::new();
        assert_eq!(pic.read_port(DATA_M), 0xFF);
        assert_eq!(pic.read_port(DATA_S), 0xFF);
        pic.raise_irq(0);
        assert!(!pic.has_pending_interrupt());
        assert_eq!(pic.master().vector_base(), 0x08);
        assert_eq!(pic.slave().vector_base(), 0x70);
    }

    #[test]
    fn init_sequence_sets_vector_base_and_clears_imr() {
        let mut pic = init_pair(ICW4_8086);
        assert_eq!(pic.master().vector_base(), 0x20);
        assert_eq!(pic.slave().vector_base(), 0x28);
        assert_eq!(pic.master().icw3(), 0x04);
        assert_eq!(pic.slave().icw3(), 0x02);
        assert!(!pic.master().auto_eoi());
        assert_eq!(pic.read_port(DATA_M), 0);
        pic.raise_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x21));
    }

    #[test]
    fn icw2_low_bits_are_ignored() {
        let mut pic = PicPair::new();
        pic.write_port(CMD_M, ICW1_WITH_ICW4);
        pic.write_port(DATA_M, 0x37);
        pic.write_port(DATA_M, 0x04);
        pic.write_port(DATA_M, ICW4_8086);
        assert_eq!(pic.master().vector_base(), 0x30);
    }

    #[test]
    fn single_mode_without_icw4_skips_icw3_and_icw4() {
        let mut chip = Pic8259::new(0);
        chip.write(0, 0x12); // ICW1: SNGL, no IC4
        chip.write(1, 0x40); // ICW2
        assert!(!chip.initialising());
        chip.write(1, 0xFE); // now OCW1
        assert_eq!(chip.read(1), 0xFE);
        assert_eq!(chip.vector_base(), 0x40);
    }

    #[test]
    fn ocw1_masks_and_reads_back() {
        let mut pic = init_pair(ICW4_8086);
        pic.write_port(DATA_M, 0b1111_1010);
        assert_eq!(pic.read_port(DATA_M), 0b1111_1010);
        pic.raise_irq(3);
        assert!(!pic.has_pending_interrupt());
        pic.raise_irq(0);
        assert!(pic.has_pending_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x20));
        // Unmasking a latched request makes it pending.
        pic.write_port(CMD_M, EOI);
        pic.write_port(DATA_M, 0);
        assert_eq!(pic.acknowledge(), Some(0x23));
    }

    #[test]
    fn fixed_priority_and_nesting() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(5);
        pic.raise_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x23));
        // IRQ 5 is lower priority than IRQ 3 in service.
        assert!(!pic.has_pending_interrupt());
        pic.raise_irq(1);
        assert!(pic.has_pending_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x21));
        assert_eq!(pic.isr(), 0b1010);
        pic.write_port(CMD_M, EOI); // clears IRQ 1, the highest in service
        assert_eq!(pic.isr(), 0b1000);
        pic.write_port(CMD_M, EOI);
        assert_eq!(pic.acknowledge(), Some(0x25));
    }

    #[test]
    fn specific_eoi_clears_named_level_only() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(4);
        pic.acknowledge();
        pic.raise_irq(1);
        pic.acknowledge();
        pic.write_port(CMD_M, SPECIFIC_EOI | 4);
        assert_eq!(pic.isr(), 0b10);
    }

    #[test]
    fn read_irr_and_isr_through_ocw3() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(6);
        pic.raise_irq(7);
        pic.write_port(CMD_M, READ_IRR);
        assert_eq!(pic.read_port(CMD_M), 0b1100_0000);
        pic.acknowledge();
        assert_eq!(pic.read_port(CMD_M), 0b1000_0000);
        pic.write_port(CMD_M, READ_ISR);
        assert_eq!(pic.read_port(CMD_M), 0b0100_0000);
        // OCW3 without RR keeps the selection.
        pic.write_port(CMD_M, 0x08);
        assert_eq!(pic.read_port(CMD_M), 0b0100_0000);
    }

    #[test]
    fn auto_eoi_leaves_isr_clear() {
        let mut pic = init_pair(ICW4_8086_AEOI);
        assert!(pic.master().auto_eoi());
        pic.raise_irq(3);
        assert_eq!(pic.acknowledge(), Some(0x23));
        assert_eq!(pic.isr(), 0);
        pic.raise_irq(5);
        assert!(pic.has_pending_interrupt());
    }

    #[test]
    fn edge_triggered_needs_new_rising_edge() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(1);
        assert_eq!(pic.acknowledge(), Some(0x21));
        pic.write_port(CMD_M, EOI);
        pic.raise_irq(1); // still high: no edge
        assert!(!pic.has_pending_interrupt());
        pic.lower_irq(1);
        pic.raise_irq(1);
        assert!(pic.has_pending_interrupt());
    }

    #[test]
    fn pulse_latches_without_holding_the_line() {
        let mut pic = init_pair(ICW4_8086);
        pic.pulse_irq(0);
        pic.pulse_irq(0); // coalesces in the single IRR bit
        assert_eq!(pic.acknowledge(), Some(0x20));
        pic.write_port(CMD_M, EOI);
        assert!(!pic.has_pending_interrupt());
        pic.pulse_irq(0);
        assert!(pic.has_pending_interrupt());
    }

    #[test]
    fn spurious_irq7_when_request_vanished() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(4);
        pic.lower_irq(4);
        assert!(!pic.has_pending_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x27));
        // A spurious IRQ 7 is not put in service.
        assert_eq!(pic.isr(), 0);
    }

    #[test]
    fn slave_interrupt_goes_through_cascade() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(12);
        assert!(pic.has_pending_interrupt());
        assert_eq!(pic.acknowledge(), Some(0x2C));
        assert_eq!(pic.isr(), (1 << 12) | (1 << 2));
        // The guest ends the interrupt on both chips.
        pic.write_port(CMD_S, EOI);
        pic.write_port(CMD_M, EOI);
        assert_eq!(pic.isr(), 0);
    }

    #[test]
    fn slave_masked_by_master_imr_bit2() {
        let mut pic = init_pair(ICW4_8086);
        pic.write_port(DATA_M, 0b0000_0100);
        pic.raise_irq(9);
        assert!(!pic.has_pending_interrupt());
        pic.write_port(DATA_M, 0);
        assert_eq!(pic.acknowledge(), Some(0x29));
    }

    #[test]
    fn second_slave_request_waits_for_both_eois() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(10);
        pic.raise_irq(11);
        assert_eq!(pic.acknowledge(), Some(0x2A));
        assert!(!pic.has_pending_interrupt());
        pic.write_port(CMD_S, EOI);
        assert!(!pic.has_pending_interrupt(), "master IR2 still in service");
        pic.write_port(CMD_M, EOI);
        assert_eq!(pic.acknowledge(), Some(0x2B));
    }

    #[test]
    fn spurious_irq15_leaves_master_ir2_in_service() {
        let mut pic = init_pair(ICW4_8086);
        // The master latched IR2, then the slave's request vanished before the INTA cycle.
        pic.master.irr |= 1 << CASCADE_LINE;
        pic.master.level |= 1 << CASCADE_LINE;
        assert_eq!(pic.acknowledge(), Some(0x2F));
        assert_eq!(pic.isr(), 1 << 2);
    }

    #[test]
    fn poll_mode_acknowledges_highest_request() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(6);
        pic.write_port(CMD_M, POLL);
        assert_eq!(pic.read_port(CMD_M), 0x86);
        assert_eq!(pic.isr(), 1 << 6);
        pic.write_port(CMD_M, POLL);
        assert_eq!(pic.read_port(CMD_M), 0x00);
        // Poll is one-shot: the next read is IRR again.
        assert_eq!(pic.read_port(CMD_M), 0);
    }

    #[test]
    fn reinit_clears_state_and_is_not_acknowledged_midway() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(1);
        pic.acknowledge();
        pic.write_port(CMD_M, ICW1_WITH_ICW4);
        assert_eq!(pic.acknowledge(), None);
        pic.write_port(DATA_M, 0x50);
        pic.write_port(DATA_M, 0x04);
        pic.write_port(DATA_M, ICW4_8086);
        assert_eq!(pic.isr() & 0xFF, 0);
        assert_eq!(pic.imr() & 0xFF, 0);
        // The line is still high: no new edge after re-initialisation.
        assert!(!pic.has_pending_interrupt());
    }

    #[test]
    fn slave_being_initialised_does_not_interrupt() {
        let mut pic = init_pair(ICW4_8086);
        pic.write_port(CMD_S, ICW1_WITH_ICW4);
        pic.raise_irq(8);
        assert!(!pic.has_pending_interrupt());
        pic.write_port(DATA_S, 0x70);
        pic.write_port(DATA_S, 0x02);
        pic.write_port(DATA_S, ICW4_8086);
        // Initialisation left IMR clear and the request latched: it is delivered with the new base.
        assert_eq!(pic.acknowledge(), Some(0x70));
    }

    #[test]
    fn interrupt_source_trait_delegates() {
        let mut pic = init_pair(ICW4_8086);
        pic.raise_irq(0);
        let source: &mut dyn InterruptSource = &mut pic;
        assert!(source.has_pending());
        assert_eq!(source.acknowledge(), Some(0x20));
        assert!(!source.has_pending());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Raise(u8),
        Lower(u8),
        Pulse(u8),
        Write(u16, u8),
        Read(u16),
        Ack,
    }

    fn op() -> impl Strategy<Value = Op> {
        let port = prop_oneof![Just(CMD_M), Just(DATA_M), Just(CMD_S), Just(DATA_S)];
        prop_oneof![
            (0u8..18).prop_map(Op::Raise),
            (0u8..18).prop_map(Op::Lower),
            (0u8..18).prop_map(Op::Pulse),
            (port.clone(), any::<u8>()).prop_map(|(p, v)| Op::Write(p, v)),
            port.prop_map(Op::Read),
            Just(Op::Ack),
            Just(Op::Ack),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Under any command sequence: acknowledge never returns a masked vector; a
        /// non-spurious acknowledge moves exactly one bit into service, above every bit already
        /// in service; the cascade IR2 follows the slave's INT output.
            #[test]
        fn pic_invariants(init_first in any::<bool>(), ops in proptest::collection::vec(op(), 1..64)) {
            let mut pic = if init_first { init_pair(ICW4_8086) } else { PicPair::new() };
            for op in ops {
                let isr_before = pic.isr();
                let may_acknowledge = matches!(op, Op::Ack | Op::Read(_));
                match op {
                    Op::Raise(l) => pic.raise_irq(l),
                    Op::Lower(l) => pic.lower_irq(l),
                    Op::Pulse(l) => pic.pulse_irq(l),
                    Op::Write(p, v) => pic.write_port(p, v),
                    Op::Read(p) => { pic.read_port(p); }
                    Op::Ack => {
                        let pending = pic.has_pending_interrupt();
                        let master_before = pic.master().clone();
                        let mut slave_before = pic.slave().clone();
                        let vector = pic.acknowledge();
                        if master_before.initialising() {
                            prop_assert_eq!(vector, None);
                            continue;
                        }
                        let vector = vector.unwrap_or(0);
                        let m_base = master_before.vector_base();
                        let s_base = slave_before.vector_base();
                        if !pending {
                            prop_assert_eq!(vector, m_base | 7);
                            prop_assert_eq!(pic.master().isr(), master_before.isr());
                            continue;
                        }
                        let line = highest_request(&master_before).unwrap_or(8);
                        prop_assert!(line < 8);
                        // Never masked, and strictly above everything in service.
                        prop_assert_eq!(master_before.imr() & (1 << line), 0);
                        if let Some(top) = master_before.highest_in_service() {
                            prop_assert!(line < top);
                        }
                        if !master_before.auto_eoi() {
                            prop_assert_eq!(pic.master().isr(), master_before.isr() | (1 << line));
                            prop_assert_eq!(pic.master().highest_in_service(), Some(line));
                        }
                        if line == CASCADE_LINE {
                            match slave_before.acknowledge_line() {
                                Some(sl) => {
                                    prop_assert_eq!(vector, s_base | sl);
                                    prop_assert_eq!(slave_before.imr() & (1 << sl), 0);
                                }
                                None => prop_assert_eq!(vector, s_base | 7),
                            }
                        } else {
                            prop_assert_eq!(vector, m_base | line);
                        }
                    }
                }
                // ISR only grows through an acknowledge (INTA or poll read), by one bit per chip.
                if !may_acknowledge {
                    prop_assert_eq!(pic.isr() & !isr_before, 0);
                }
                let grown = pic.isr() & !isr_before;
                prop_assert!((grown as u8).count_ones() <= 1 && ((grown >> 8) as u8).count_ones() <= 1);
                // The cascade wire: the master's IR2 request is exactly the slave's INT output.
                let master_ir2 = pic.master().irr() & (1 << CASCADE_LINE) != 0;
                prop_assert_eq!(master_ir2, pic.slave().int_output());
                if !pic.master().initialising() {
                    prop_assert_eq!(pic.has_pending(), pic.master().int_output());
                }
            }
        }
    }
}
