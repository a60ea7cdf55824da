//! The 16550A UART as COM1 (0x3F8–0x3FF, IRQ 4).
//!
//! Specification: National Semiconductor / TI PC16550D datasheet, "Registers" (table 2: register
//! addresses and the DLAB bit), "Interrupt Identification Register" (table 4: priorities) and
//! "Line Status Register". The structure follows rust-vmm's vm-superio `Serial`: one `match`
//! over register offsets decoded through an enum, the interrupt line a level the caller reads.
//!
//! Transmission is instantaneous: a byte written to THR goes to the [`ConsoleSink`] at once, so
//! THR and the transmitter are always empty when the guest looks. Received bytes come from a
//! queue the host fills with [`Serial::enqueue_rx`].

use alloc::collections::VecDeque;

use crate::io::ConsoleSink;

/// COM1 base port.
pub const COM1_BASE: u16 = 0x3F8;
/// COM1's IRQ line on the PC.
pub const COM1_IRQ: u8 = 4;
/// Bytes the receive queue holds before it overruns (the 16550's FIFO holds 16; the host side
/// is deeper so pasted input is not lost while the guest is descheduled).
pub const RX_QUEUE_CAPACITY: usize = 64;
/// The 16550's receive FIFO.
pub const RX_FIFO_DEPTH: usize = 16;

// Register offsets (table 2).
const DATA: u8 = 0;
const IER: u8 = 1;
const IIR_FCR: u8 = 2;
const LCR: u8 = 3;
const MCR: u8 = 4;
const LSR: u8 = 5;
const MSR: u8 = 6;
const SCR: u8 = 7;

// IER bits.
const IER_RX_DATA: u8 = 0b0000_0001;
const IER_THR_EMPTY: u8 = 0b0000_0010;
const IER_LINE_STATUS: u8 = 0b0000_0100;
const IER_MODEM_STATUS: u8 = 0b0000_1000;
const IER_MASK: u8 = 0b0000_1111;

// IIR values (table 4), bit 0 clear = interrupt pending.
const IIR_NONE: u8 = 0b0000_0001;
const IIR_LINE_STATUS: u8 = 0b0000_0110;
const IIR_RX_DATA: u8 = 0b0000_0100;
const IIR_THR_EMPTY: u8 = 0b0000_0010;
const IIR_MODEM_STATUS: u8 = 0b0000_0000;
const IIR_FIFO_ENABLED: u8 = 0b1100_0000;

// FCR bits.
const FCR_FIFO_ENABLE: u8 = 0b0000_0001;
const FCR_CLEAR_RX: u8 = 0b0000_0010;

// LCR bits.
const LCR_DLAB: u8 = 0b1000_0000;

// MCR bits.
const MCR_DTR: u8 = 0b0000_0001;
const MCR_RTS: u8 = 0b0000_0010;
const MCR_OUT1: u8 = 0b0000_0100;
const MCR_OUT2: u8 = 0b0000_1000;
const MCR_LOOP: u8 = 0b0001_0000;
const MCR_MASK: u8 = 0b0001_1111;

// LSR bits.
const LSR_DATA_READY: u8 = 0b0000_0001;
const LSR_OVERRUN: u8 = 0b0000_0010;
const LSR_THR_EMPTY: u8 = 0b0010_0000;
const LSR_TRANSMITTER_EMPTY: u8 = 0b0100_0000;
/// Error bits cleared by reading LSR (OE, PE, FE, BI).
const LSR_ERRORS: u8 = 0b0001_1110;

// MSR bits.
const MSR_DELTAS: u8 = 0b0000_1111;
/// Delta CTS, delta DSR and delta DCD: bits 0, 1, 3, each the change of the status bit 4
/// places up.
const MSR_DCTS_DDSR_DDCD: u8 = 0b0000_1011;
/// Trailing edge of RI (bit 2): RI went from 1 to 0.
const MSR_TERI: u8 = 0b0000_0100;
const MSR_CTS: u8 = 0b0001_0000;
const MSR_DSR: u8 = 0b0010_0000;
const MSR_RI: u8 = 0b0100_0000;
const MSR_DCD: u8 = 0b1000_0000;

/// Divisor of 12 (9600 baud from 1.8432 MHz), as vm-superio and a PC BIOS leave it.
const DEFAULT_DIVISOR: u16 = 12;
/// 8 data bits, no parity, one stop bit.
const DEFAULT_LCR: u8 = 0b0000_0011;
/// OUT2 set: the PC routes the interrupt line through it.
const DEFAULT_MCR: u8 = MCR_OUT2;
/// A terminal is attached: CTS, DSR and DCD asserted.
const DEFAULT_MSR: u8 = MSR_CTS | MSR_DSR | MSR_DCD;

/// Read-side meaning of an offset (DLAB selects the divisor latch on 0 and 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadRegister {
    Rbr,
    Dll,
    Ier,
    Dlm,
    Iir,
    Lcr,
    Mcr,
    Lsr,
    Msr,
    Scr,
}

/// Write-side meaning of an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteRegister {
    Thr,
    Dll,
    Ier,
    Dlm,
    Fcr,
    Lcr,
    Mcr,
    /// LSR and MSR are read-only (writes are the factory test path): dropped.
    ReadOnly,
    Scr,
}

impl ReadRegister {
    fn decode(offset: u8, dlab: bool) -> Self {
        match (offset & 7, dlab) {
            (DATA, false) => ReadRegister::Rbr,
            (DATA, true) => ReadRegister::Dll,
            (IER, false) => ReadRegister::Ier,
            (IER, true) => ReadRegister::Dlm,
            (IIR_FCR, _) => ReadRegister::Iir,
            (LCR, _) => ReadRegister::Lcr,
            (MCR, _) => ReadRegister::Mcr,
            (LSR, _) => ReadRegister::Lsr,
            (MSR, _) => ReadRegister::Msr,
            (SCR, _) => ReadRegister::Scr,
            // `offset & 7` leaves no other value.
            _ => ReadRegister::Scr,
        }
    }
}

impl WriteRegister {
    fn decode(offset: u8, dlab: bool) -> Self {
        match (offset & 7, dlab) {
            (DATA, false) => WriteRegister::Thr,
            (DATA, true) => WriteRegister::Dll,
            (IER, false) => WriteRegister::Ier,
            (IER, true) => WriteRegister::Dlm,
            (IIR_FCR, _) => WriteRegister::Fcr,
            (LCR, _) => WriteRegister::Lcr,
            (MCR, _) => WriteRegister::Mcr,
            (LSR, _) | (MSR, _) => WriteRegister::ReadOnly,
            (SCR, _) => WriteRegister::Scr,
            // `offset & 7` leaves no other value.
            _ => WriteRegister::Scr,
        }
    }
}

/// A 16550A whose transmitter writes to `S`.
#[derive(Debug)]
pub struct Serial<S: ConsoleSink> {
    sink: S,
    divisor: u16,
    ier: u8,
    lcr: u8,
    mcr: u8,
    /// The error bits of LSR (the data-ready and THR bits are derived).
    lsr_errors: u8,
    /// MSR as the outside world drives it (outside loopback); its delta bits (0–3) are the
    /// chip's, set by either source and cleared by reading MSR.
    msr: u8,
    scr: u8,
    fifo_enabled: bool,
    /// THR-empty interrupt condition: set when THR empties or the interrupt is enabled while it
    /// is empty, cleared by reading IIR when it is the source or by writing THR.
    thr_empty_pending: bool,
    rx: VecDeque<u8>,
    transmitted: u64,
    overruns: u64,
}

impl<S: ConsoleSink> Serial<S> {
    /// A UART as firmware leaves it (8N1, 9600 baud, OUT2 set, interrupts disabled).
    pub fn new(sink: S) -> Self {
        Self {
            sink,
            divisor: DEFAULT_DIVISOR,
            ier: 0,
            lcr: DEFAULT_LCR,
            mcr: DEFAULT_MCR,
            lsr_errors: 0,
            msr: DEFAULT_MSR,
            scr: 0,
            fifo_enabled: false,
            thr_empty_pending: false,
            rx: VecDeque::new(),
            transmitted: 0,
            overruns: 0,
        }
    }

    /// The console the transmitter writes to.
    pub fn sink(&self) -> &S {
        &self.sink
    }
    /// The console, mutably (to flush it).
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.sink
    }
    /// The divisor latch (baud = 115200 / divisor).
    pub fn divisor(&self) -> u16 {
        self.divisor
    }
    /// Bytes transmitted so far.
    pub fn transmitted(&self) -> u64 {
        self.transmitted
    }
    /// Received bytes dropped because the queue was full.
    pub fn overruns(&self) -> u64 {
        self.overruns
    }
    /// Bytes waiting in the receive queue.
    pub fn rx_len(&self) -> usize {
        self.rx.len()
    }

    fn dlab(&self) -> bool {
        self.lcr & LCR_DLAB != 0
    }
    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    /// Whether the receiver can take a byte now, as a real 16550 on a serial line would (and as
    /// QEMU's does): while the FIFO is off, only when the receive buffer is empty; with the FIFO
    /// on, while it has room. A host feeding input should wait otherwise, not pile bytes up in
    /// front of a guest that has not set up its UART yet (its FIFO reset would drop them).
    pub fn can_receive(&self) -> bool {
        if self.fifo_enabled {
            self.rx.len() < RX_FIFO_DEPTH
        } else {
            self.rx.is_empty()
        }
    }

    /// A byte from the host's input for the guest. Returns false (and sets LSR.OE for the
    /// guest) if the queue was full.
    pub fn enqueue_rx(&mut self, byte: u8) -> bool {
        if self.rx.len() >= RX_QUEUE_CAPACITY {
            self.lsr_errors |= LSR_OVERRUN;
            self.overruns = self.overruns.saturating_add(1);
            return false;
        }
        self.rx.push_back(byte);
        true
    }

    fn lsr(&self) -> u8 {
        let mut lsr = self.lsr_errors | LSR_THR_EMPTY | LSR_TRANSMITTER_EMPTY;
        if !self.rx.is_empty() {
            lsr |= LSR_DATA_READY;
        }
        lsr
    }

    fn msr(&self) -> u8 {
        if self.loopback() {
            // Loopback: the modem outputs are wired back to the inputs (RTS→CTS, DTR→DSR,
            // OUT1→RI, OUT2→DCD).
            let mut msr = 0;
            if self.mcr & MCR_RTS != 0 {
                msr |= MSR_CTS;
            }
            if self.mcr & MCR_DTR != 0 {
                msr |= MSR_DSR;
            }
            if self.mcr & MCR_OUT1 != 0 {
                msr |= MSR_RI;
            }
            if self.mcr & MCR_OUT2 != 0 {
                msr |= MSR_DCD;
            }
            msr | (self.msr & MSR_DELTAS)
        } else {
            self.msr
        }
    }

    /// The highest-priority pending interrupt as IIR encodes it (table 4), without FIFO bits.
    fn interrupt_id(&self) -> u8 {
        if self.ier & IER_LINE_STATUS != 0 && self.lsr_errors != 0 {
            IIR_LINE_STATUS
        } else if self.ier & IER_RX_DATA != 0 && !self.rx.is_empty() {
            IIR_RX_DATA
        } else if self.ier & IER_THR_EMPTY != 0 && self.thr_empty_pending {
            IIR_THR_EMPTY
        } else if self.ier & IER_MODEM_STATUS != 0 && self.msr() & MSR_DELTAS != 0 {
            IIR_MODEM_STATUS
        } else {
            IIR_NONE
        }
    }

    /// The level of the interrupt output (IRQ 4): some enabled condition is pending.
    pub fn intr_state(&self) -> bool {
        self.interrupt_id() != IIR_NONE
    }

    /// Guest read of register `offset` (0–7 from the base port).
    pub fn read(&mut self, offset: u8) -> u8 {
        match ReadRegister::decode(offset, self.dlab()) {
            ReadRegister::Rbr => self.rx.pop_front().unwrap_or(0),
            ReadRegister::Dll => self.divisor.to_le_bytes()[0],
            ReadRegister::Ier => self.ier,
            ReadRegister::Dlm => self.divisor.to_le_bytes()[1],
            ReadRegister::Iir => {
                let id = self.interrupt_id();
                // Reading IIR while it reports THR empty clears that condition.
                if id == IIR_THR_EMPTY {
                    self.thr_empty_pending = false;
                }
                if self.fifo_enabled {
                    id | IIR_FIFO_ENABLED
                } else {
                    id
                }
            }
            ReadRegister::Lcr => self.lcr,
            ReadRegister::Mcr => self.mcr,
            ReadRegister::Lsr => {
                let lsr = self.lsr();
                self.lsr_errors &= !LSR_ERRORS;
                lsr
            }
            ReadRegister::Msr => {
                let msr = self.msr();
                self.msr &= !MSR_DELTAS;
                msr
            }
            ReadRegister::Scr => self.scr,
        }
    }

    /// Guest write of `value` to register `offset` (0–7 from the base port).
    pub fn write(&mut self, offset: u8, value: u8) {
        match WriteRegister::decode(offset, self.dlab()) {
            WriteRegister::Thr => {
                if self.loopback() {
                    // Loopback: the transmitter feeds the receiver, nothing leaves the chip.
                    self.enqueue_rx(value);
                } else {
                    self.sink.write_byte(value);
                    self.transmitted = self.transmitted.saturating_add(1);
                }
                // The byte left THR at once: THR is empty again.
                self.thr_empty_pending = true;
            }
            WriteRegister::Dll => {
                let [_, high] = self.divisor.to_le_bytes();
                self.divisor = u16::from_le_bytes([value, high]);
            }
            WriteRegister::Dlm => {
                let [low, _] = self.divisor.to_le_bytes();
                self.divisor = u16::from_le_bytes([low, value]);
            }
            WriteRegister::Ier => {
                let enabling_thre = value & IER_THR_EMPTY != 0 && self.ier & IER_THR_EMPTY == 0;
                self.ier = value & IER_MASK;
                // Enabling the THR-empty interrupt while THR is empty raises it at once.
                if enabling_thre {
                    self.thr_empty_pending = true;
                }
            }
            WriteRegister::Fcr => {
                self.fifo_enabled = value & FCR_FIFO_ENABLE != 0;
                if value & FCR_CLEAR_RX != 0 {
                    self.rx.clear();
                }
            }
            WriteRegister::Lcr => self.lcr = value,
            WriteRegister::Mcr => {
                let before = self.msr();
                let was_loopback = self.loopback();
                self.mcr = value & MCR_MASK;
                if was_loopback && self.loopback() {
                    // PC16550D, "Modem Status Register" and the loopback description of MCR
                    // bit 4: in loopback the modem-status inputs are the MCR outputs, and the
                    // delta bits and modem-status interrupt work on them: DCTS, DDSR, DDCD on
                    // any change, TERI when RI (OUT1) goes from 1 to 0.
                    let after = self.msr();
                    let changed = (before ^ after) >> 4;
                    let mut deltas = changed & MSR_DCTS_DDSR_DDCD;
                    if before & MSR_RI != 0 && after & MSR_RI == 0 {
                        deltas |= MSR_TERI;
                    }
                    self.msr |= deltas;
                }
            }
            WriteRegister::ReadOnly => {}
            WriteRegister::Scr => self.scr = value,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    // Written again from the PC16550D datasheet.
    const THR: u8 = 0;
    const RBR: u8 = 0;
    const DLL: u8 = 0;
    const DLM: u8 = 1;
    const IER_: u8 = 1;
    const IIR_: u8 = 2;
    const FCR_: u8 = 2;
    const LCR_: u8 = 3;
    const MCR_: u8 = 4;
    const LSR_: u8 = 5;
    const MSR_: u8 = 6;
    const SCR_: u8 = 7;
    const DLAB_BIT: u8 = 0x80;
    const ERBFI: u8 = 0x01;
    const ETBEI: u8 = 0x02;
    const ELSI: u8 = 0x04;
    const EDSSI: u8 = 0x08;
    const NO_INT: u8 = 0x01;
    const RLS_INT: u8 = 0x06;
    const RDA_INT: u8 = 0x04;
    const THRE_INT: u8 = 0x02;
    const LSR_DR: u8 = 0x01;
    const LSR_OE: u8 = 0x02;
    const LSR_THRE: u8 = 0x20;
    const LSR_TEMT: u8 = 0x40;
    const LOOP: u8 = 0x10;

    /// A counting console mock.
    #[derive(Debug, Default)]
    struct Console {
        bytes: Vec<u8>,
        writes: usize,
    }
    impl ConsoleSink for Console {
        fn write_byte(&mut self, byte: u8) {
            self.bytes.push(byte);
            self.writes += 1;
        }
    }

    fn serial() -> Serial<Console> {
        Serial::new(Console::default())
    }

    #[test]
    fn reset_values() {
        let mut s = serial();
        assert_eq!(s.read(IER_), 0);
        assert_eq!(s.read(IIR_), NO_INT);
        assert_eq!(s.read(LCR_), 0x03);
        assert_eq!(s.read(MCR_), 0x08);
        assert_eq!(s.read(LSR_), LSR_THRE | LSR_TEMT);
        assert_eq!(s.read(MSR_), 0xB0);
        assert!(!s.intr_state());
    }

    #[test]
    fn transmit_goes_to_sink() {
        let mut s = serial();
        for b in b"ok\n" {
            s.write(THR, *b);
        }
        assert_eq!(s.sink().bytes, b"ok\n");
        assert_eq!(s.sink().writes, 3);
        assert_eq!(s.transmitted(), 3);
        assert_eq!(s.read(LSR_) & (LSR_THRE | LSR_TEMT), LSR_THRE | LSR_TEMT);
    }

    #[test]
    fn dlab_switches_data_and_ier_to_divisor_latch() {
        let mut s = serial();
        s.write(IER_, ERBFI);
        s.write(LCR_, DLAB_BIT | 0x03);
        s.write(DLL, 0x01);
        s.write(DLM, 0x00);
        assert_eq!(s.read(DLL), 0x01);
        assert_eq!(s.read(DLM), 0x00);
        assert_eq!(s.divisor(), 1);
        // No byte was transmitted through the latch.
        assert_eq!(s.sink().writes, 0);
        s.write(LCR_, 0x03);
        assert_eq!(s.read(IER_), ERBFI);
    }

    #[test]
    fn receive_queue_sets_data_ready_and_reads_in_order() {
        let mut s = serial();
        assert!(s.enqueue_rx(b'a'));
        assert!(s.enqueue_rx(b'b'));
        assert_eq!(s.read(LSR_) & LSR_DR, LSR_DR);
        assert_eq!(s.read(RBR), b'a');
        assert_eq!(s.read(RBR), b'b');
        assert_eq!(s.read(LSR_) & LSR_DR, 0);
        assert_eq!(s.read(RBR), 0);
    }

    #[test]
    fn rx_interrupt_follows_data() {
        let mut s = serial();
        s.enqueue_rx(b'x');
        assert!(!s.intr_state(), "interrupt disabled");
        s.write(IER_, ERBFI);
        assert!(s.intr_state());
        assert_eq!(s.read(IIR_), RDA_INT);
        s.read(RBR);
        assert!(!s.intr_state());
        assert_eq!(s.read(IIR_), NO_INT);
    }

    #[test]
    fn thr_empty_interrupt_on_enable_cleared_by_iir_read() {
        let mut s = serial();
        s.write(IER_, ETBEI);
        assert!(s.intr_state());
        assert_eq!(s.read(IIR_), THRE_INT);
        assert!(!s.intr_state());
        assert_eq!(s.read(IIR_), NO_INT);
        // Each transmitted byte empties THR again.
        s.write(THR, b'z');
        assert!(s.intr_state());
    }

    #[test]
    fn iir_priority_rx_over_thre_and_line_status_over_rx() {
        let mut s = serial();
        s.write(IER_, ERBFI | ETBEI | ELSI);
        s.enqueue_rx(1);
        assert_eq!(s.read(IIR_), RDA_INT);
        s.read(RBR);
        assert_eq!(s.read(IIR_), THRE_INT);
        for _ in 0..=RX_QUEUE_CAPACITY {
            s.enqueue_rx(2);
        }
        assert_eq!(s.overruns(), 1);
        assert_eq!(s.read(IIR_), RLS_INT);
        assert_eq!(s.read(LSR_) & LSR_OE, LSR_OE);
        // Reading LSR cleared the overrun: back to received data.
        assert_eq!(s.read(IIR_), RDA_INT);
    }

    #[test]
    fn fifo_enable_sets_iir_high_bits_and_clear_rx() {
        let mut s = serial();
        s.enqueue_rx(7);
        s.write(FCR_, 0x01);
        assert_eq!(s.read(IIR_), 0xC0 | NO_INT);
        s.write(FCR_, 0x03); // enable + clear receive FIFO
        assert_eq!(s.rx_len(), 0);
        s.write(FCR_, 0x00);
        assert_eq!(s.read(IIR_), NO_INT);
    }

    #[test]
    fn the_receiver_takes_one_byte_without_a_fifo_and_sixteen_with_one() {
        let mut s = serial();
        assert!(s.can_receive());
        s.enqueue_rx(1);
        assert!(!s.can_receive(), "RBR holds a byte, no FIFO");
        s.read(RBR);
        assert!(s.can_receive());
        s.write(FCR_, 0x01);
        for i in 0..RX_FIFO_DEPTH {
            assert!(s.can_receive(), "room for byte {i}");
            s.enqueue_rx(i as u8);
        }
        assert!(!s.can_receive(), "the 16-byte FIFO is full");
    }

    #[test]
    fn scratch_register_holds_value() {
        let mut s = serial();
        s.write(SCR_, 0x5A);
        assert_eq!(s.read(SCR_), 0x5A);
    }

    #[test]
    fn lsr_and_msr_writes_are_ignored() {
        let mut s = serial();
        s.write(LSR_, 0xFF);
        s.write(MSR_, 0x00);
        assert_eq!(s.read(LSR_), LSR_THRE | LSR_TEMT);
        assert_eq!(s.read(MSR_), 0xB0);
    }

    #[test]
    fn loopback_returns_transmitted_byte_and_mirrors_modem_lines() {
        let mut s = serial();
        s.write(MCR_, LOOP | 0x03); // DTR, RTS
        s.write(THR, 0x42);
        assert_eq!(s.sink().writes, 0);
        assert_eq!(s.read(RBR), 0x42);
        assert_eq!(s.read(MSR_), 0x30); // CTS, DSR
        s.write(MCR_, LOOP | 0x0C); // OUT1, OUT2
                                    // RI, DCD; and the deltas of the change: DCTS, DDSR, DDCD (RI rose: no TERI).
        assert_eq!(s.read(MSR_), 0xCB);
        assert_eq!(s.read(MSR_), 0xC0, "deltas clear on read");
    }

    #[test]
    fn loopback_modem_line_changes_set_the_deltas_and_the_modem_status_interrupt() {
        let mut s = serial();
        s.write(MCR_, LOOP | 0x04); // OUT1 → RI
        assert_eq!(s.read(MSR_), 0x40, "entering loopback: no deltas");
        s.write(IER_, EDSSI);
        assert!(!s.intr_state());
        s.write(MCR_, LOOP | 0x08); // RI falls (TERI), DCD rises (DDCD)
        assert!(s.intr_state(), "modem-status interrupt");
        assert_eq!(s.read(MSR_), 0x80 | 0x04 | 0x08);
        assert!(!s.intr_state(), "cleared by reading MSR");
        s.write(MCR_, LOOP | 0x08 | 0x01); // DTR → DSR rises
        assert_eq!(s.read(MSR_), 0xA0 | 0x02);
        s.write(MCR_, LOOP | 0x08 | 0x01 | 0x02); // RTS → CTS rises
        assert_eq!(s.read(MSR_), 0xB0 | 0x01);
        s.write(MCR_, LOOP | 0x08 | 0x01 | 0x02); // no change
        assert_eq!(s.read(MSR_), 0xB0);
    }

    #[test]
    fn modem_status_interrupt_is_not_raised_without_deltas() {
        let mut s = serial();
        s.write(IER_, EDSSI);
        assert!(!s.intr_state());
    }
}
