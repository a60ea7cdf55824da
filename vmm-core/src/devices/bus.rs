//! The port bus: routes guest port I/O to the virtual devices and answers for the rest.
//!
//! Port map (PC/AT): 0x20–0x21 and 0xA0–0xA1 the 8259A pair, 0x40–0x43 the 8254, 0x80 the POST
//! delay port (writes dropped, reads 0xFF, not counted as unknown), 0xF4 isa-debug-exit,
//! 0x3F8–0x3FF COM1. Anything else is an unknown port: reads return all ones for the access size,
//! writes are dropped, and every access is counted per port for the exit report; each unknown
//! port is logged once, the first time the guest touches it.
//!
//! Access sizes: the devices here are 8-bit ISA devices. A 2- or 4-byte access whose first port
//! belongs to a device is split into byte accesses at consecutive ports, lowest port and lowest
//! byte first (what the ISA bus does for an 8-bit device); a byte that lands on no device reads
//! 0xFF and is dropped on write. isa-debug-exit takes its access whole. Sizes other than 1, 2 and
//! 4 are refused (reads all ones, writes dropped) and counted.
//!
//! Interrupt wiring: after each access to COM1 (and each [`PortBus::enqueue_rx`]) the bus drives
//! IRQ 4 to the UART's interrupt level; before each access to the PIT and in
//! [`PortBus::poll_timer`] it advances the PIT to the host clock and raises IRQ 0 on an edge.

use alloc::vec::Vec;
use core::fmt;

use super::debug_exit::{DebugExit, DEBUG_EXIT_PORT};
use super::pic::PicPair;
use super::pit::{pit_ticks_from_host, Pit, CHANNEL0_PORT, CONTROL_PORT};
use super::uart::{Serial, COM1_BASE, COM1_IRQ};
use super::InterruptSource;
use crate::io::{Clock, ConsoleSink, PortIo};

/// The POST code / I/O delay port: guests write to it to wait about a microsecond.
pub const POST_DELAY_PORT: u16 = 0x80;
/// The PIT's IRQ line.
pub const PIT_IRQ: u8 = 0;
/// How many distinct unknown ports the report keeps (accesses to more are counted as overflow).
pub const UNKNOWN_PORT_CAPACITY: usize = 32;

/// Which device a port belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    Pic,
    Pit,
    PostDelay,
    DebugExit,
    /// COM1, with the register offset.
    Com1(u8),
}

impl Device {
    fn decode(port: u16) -> Option<Self> {
        match port {
            0x20 | 0x21 | 0xA0 | 0xA1 => Some(Device::Pic),
            CHANNEL0_PORT..=CONTROL_PORT => Some(Device::Pit),
            POST_DELAY_PORT => Some(Device::PostDelay),
            DEBUG_EXIT_PORT => Some(Device::DebugExit),
            COM1_BASE..=0x3FF => Some(Device::Com1((port - COM1_BASE) as u8)),
            _ => None,
        }
    }
}

/// One unknown port the guest touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownPort {
    /// The port (the first port of the access).
    pub port: u16,
    /// Reads of it.
    pub reads: u64,
    /// Writes to it.
    pub writes: u64,
}

/// The unknown ports the guest touched, in first-seen order, bounded.
#[derive(Debug, Clone, Default)]
pub struct UnknownPorts {
    ports: Vec<UnknownPort>,
    reads: u64,
    writes: u64,
    overflow: u64,
}

impl UnknownPorts {
    /// Counts one access; returns true the first time `port` is seen (so it can be reported
    /// once).
    fn record(&mut self, port: u16, write: bool) -> bool {
        if write {
            self.writes = self.writes.saturating_add(1);
        } else {
            self.reads = self.reads.saturating_add(1);
        }
        if let Some(entry) = self.ports.iter_mut().find(|p| p.port == port) {
            if write {
                entry.writes = entry.writes.saturating_add(1);
            } else {
                entry.reads = entry.reads.saturating_add(1);
            }
            return false;
        }
        if self.ports.len() >= UNKNOWN_PORT_CAPACITY {
            self.overflow = self.overflow.saturating_add(1);
            return false;
        }
        self.ports.push(UnknownPort {
            port,
            reads: u64::from(!write),
            writes: u64::from(write),
        });
        true
    }

    /// The distinct unknown ports kept, in the order the guest first touched them.
    pub fn ports(&self) -> &[UnknownPort] {
        &self.ports
    }
    /// Reads of unknown ports, all ports included.
    pub fn total_reads(&self) -> u64 {
        self.reads
    }
    /// Writes to unknown ports, all ports included.
    pub fn total_writes(&self) -> u64 {
        self.writes
    }
    /// Accesses to unknown ports beyond the first [`UNKNOWN_PORT_CAPACITY`] distinct ones.
    pub fn overflow_accesses(&self) -> u64 {
        self.overflow
    }
}

/// One line per port: `unknown port 0x0070: 1 reads, 2 writes`, then the overflow if any.
impl fmt::Display for UnknownPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.ports {
            writeln!(
                f,
                "unknown port {:#06x}: {} reads, {} writes",
                p.port, p.reads, p.writes
            )?;
        }
        if self.overflow != 0 {
            writeln!(
                f,
                "unknown ports beyond the first {UNKNOWN_PORT_CAPACITY}: {} accesses",
                self.overflow
            )?;
        }
        Ok(())
    }
}

/// All ones for an access of `size` bytes.
fn all_ones(size: u8) -> u32 {
    match size {
        1 => 0xFF,
        2 => 0xFFFF,
        _ => 0xFFFF_FFFF,
    }
}

/// The virtual machine's I/O port space: the devices, the clock that drives the PIT, and the
/// unknown-port report.
#[derive(Debug)]
pub struct PortBus<S: ConsoleSink, C: Clock> {
    pic: PicPair,
    pit: Pit,
    com1: Serial<S>,
    debug_exit: DebugExit,
    clock: C,
    unknown: UnknownPorts,
    invalid_size_accesses: u64,
    timer_edges: u64,
}

impl<S: ConsoleSink, C: Clock> PortBus<S, C> {
    /// A bus with every device in its reset state; COM1 transmits to `console`, the PIT runs on
    /// `clock`.
    pub fn new(console: S, clock: C) -> Self {
        Self {
            pic: PicPair::new(),
            pit: Pit::new(),
            com1: Serial::new(console),
            debug_exit: DebugExit::new(),
            clock,
            unknown: UnknownPorts::default(),
            invalid_size_accesses: 0,
            timer_edges: 0,
        }
    }

    /// The interrupt controllers.
    pub fn pic(&self) -> &PicPair {
        &self.pic
    }
    /// The interrupt controllers, mutably (for a host-side device that raises an IRQ).
    pub fn pic_mut(&mut self) -> &mut PicPair {
        &mut self.pic
    }
    /// The timer.
    pub fn pit(&self) -> &Pit {
        &self.pit
    }
    /// COM1.
    pub fn com1(&self) -> &Serial<S> {
        &self.com1
    }
    /// COM1, mutably (to reach its console sink).
    pub fn com1_mut(&mut self) -> &mut Serial<S> {
        &mut self.com1
    }
    /// isa-debug-exit.
    pub fn debug_exit(&self) -> &DebugExit {
        &self.debug_exit
    }
    /// The clock.
    pub fn clock(&self) -> &C {
        &self.clock
    }
    /// The clock, mutably (tests move time with it).
    pub fn clock_mut(&mut self) -> &mut C {
        &mut self.clock
    }
    /// The unknown ports the guest touched.
    pub fn unknown_ports(&self) -> &UnknownPorts {
        &self.unknown
    }
    /// Accesses refused because their size was not 1, 2 or 4.
    pub fn invalid_size_accesses(&self) -> u64 {
        self.invalid_size_accesses
    }
    /// IRQ 0 edges the PIT produced so far (more than the guest saw if it was slow to EOI).
    pub fn timer_edges(&self) -> u64 {
        self.timer_edges
    }

    /// The exit code the guest wrote to isa-debug-exit, if any: the host stops the guest.
    pub fn exit_requested(&self) -> Option<u32> {
        self.debug_exit.exit_requested()
    }

    /// Advances the PIT to the clock's now and raises IRQ 0 if OUT0 had a rising edge. Returns
    /// the number of edges (the host calls this from its timer interrupt and before injecting).
    pub fn poll_timer(&mut self) -> u32 {
        let now = pit_ticks_from_host(self.clock.now_ticks(), self.clock.ticks_per_second());
        let edges = self.pit.advance_to(now);
        if edges != 0 {
            self.timer_edges = self.timer_edges.saturating_add(u64::from(edges));
            self.pic.pulse_irq(PIT_IRQ);
        }
        edges
    }

    /// A byte of host console input for the guest's COM1. Returns false if the receive queue
    /// was full (the guest sees an overrun).
    pub fn enqueue_rx(&mut self, byte: u8) -> bool {
        let accepted = self.com1.enqueue_rx(byte);
        self.sync_com1_irq();
        accepted
    }

    fn sync_com1_irq(&mut self) {
        let level = self.com1.intr_state();
        self.pic.set_irq_level(COM1_IRQ, level);
    }

    /// A byte read from a device port; `None` when no device decodes `port`.
    fn read_byte(&mut self, port: u16) -> Option<u8> {
        Some(match Device::decode(port)? {
            Device::Pic => self.pic.read_port(port),
            Device::Pit => {
                self.poll_timer();
                self.pit.read((port - CHANNEL0_PORT) as u8)
            }
            Device::PostDelay | Device::DebugExit => 0xFF,
            Device::Com1(offset) => {
                let value = self.com1.read(offset);
                self.sync_com1_irq();
                value
            }
        })
    }

    /// A byte written to a device port; false when no device decodes `port`.
    fn write_byte(&mut self, port: u16, value: u8) -> bool {
        match Device::decode(port) {
            Some(Device::Pic) => self.pic.write_port(port, value),
            Some(Device::Pit) => {
                self.poll_timer();
                self.pit.write((port - CHANNEL0_PORT) as u8, value);
            }
            Some(Device::PostDelay) => {}
            Some(Device::DebugExit) => self.debug_exit.write(1, u32::from(value)),
            Some(Device::Com1(offset)) => {
                self.com1.write(offset, value);
                self.sync_com1_irq();
            }
            None => return false,
        }
        true
    }

    fn unknown_access(&mut self, port: u16, write: bool) {
        if self.unknown.record(port, write) {
            log::warn!(
                "unknown I/O port {port:#06x} ({}): reads all ones, writes dropped",
                if write { "write" } else { "read" }
            );
        }
    }
}

impl<S: ConsoleSink, C: Clock> PortIo for PortBus<S, C> {
    fn port_read(&mut self, port: u16, size: u8) -> u32 {
        if !matches!(size, 1 | 2 | 4) {
            self.invalid_size_accesses = self.invalid_size_accesses.saturating_add(1);
            return all_ones(size);
        }
        match Device::decode(port) {
            None => {
                self.unknown_access(port, false);
                all_ones(size)
            }
            Some(_) => {
                let mut value = 0u32;
                for i in 0..size {
                    let byte = self
                        .read_byte(port.wrapping_add(u16::from(i)))
                        .unwrap_or(0xFF);
                    value |= u32::from(byte) << (8 * u32::from(i));
                }
                value
            }
        }
    }

    fn port_write(&mut self, port: u16, size: u8, value: u32) {
        if !matches!(size, 1 | 2 | 4) {
            self.invalid_size_accesses = self.invalid_size_accesses.saturating_add(1);
            return;
        }
        match Device::decode(port) {
            None => self.unknown_access(port, true),
            Some(Device::DebugExit) => self.debug_exit.write(size, value),
            Some(_) => {
                for (i, byte) in value
                    .to_le_bytes()
                    .into_iter()
                    .take(usize::from(size))
                    .enumerate()
                {
                    // `i` < 4.
                    self.write_byte(port.wrapping_add(i as u16), byte);
                }
            }
        }
    }
}

impl<S: ConsoleSink, C: Clock> InterruptSource for PortBus<S, C> {
    fn has_pending(&self) -> bool {
        self.pic.has_pending_interrupt()
    }
    fn acknowledge(&mut self) -> Option<u8> {
        self.pic.acknowledge()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Default)]
    struct Console {
        bytes: Vec<u8>,
    }
    impl ConsoleSink for Console {
        fn write_byte(&mut self, byte: u8) {
            self.bytes.push(byte);
        }
    }

    /// A clock in microseconds the test moves by hand.
    #[derive(Debug, Default)]
    struct TestClock {
        micros: u64,
    }
    impl Clock for TestClock {
        fn now_ticks(&self) -> u64 {
            self.micros
        }
        fn ticks_per_second(&self) -> u64 {
            1_000_000
        }
    }

    fn bus() -> PortBus<Console, TestClock> {
        PortBus::new(Console::default(), TestClock::default())
    }

    /// The guest's PIC setup: master 0x20, slave 0x28, everything unmasked.
    fn init_pic(bus: &mut PortBus<Console, TestClock>) {
        for (port, value) in [
            (0x20, 0x11),
            (0x21, 0x20),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xA0, 0x11),
            (0xA1, 0x28),
            (0xA1, 0x02),
            (0xA1, 0x01),
            (0x21, 0x00),
            (0xA1, 0x00),
        ] {
            bus.port_write(port, 1, value);
        }
    }

    #[test]
    fn unknown_ports_read_all_ones_and_are_counted_once_per_port() {
        let mut bus = bus();
        assert_eq!(bus.port_read(0x1234, 1), 0xFF);
        assert_eq!(bus.port_read(0x1234, 2), 0xFFFF);
        assert_eq!(bus.port_read(0x70, 4), 0xFFFF_FFFF);
        bus.port_write(0x70, 1, 0x8F);
        let unknown = bus.unknown_ports();
        assert_eq!(
            unknown.ports(),
            &[
                UnknownPort {
                    port: 0x1234,
                    reads: 2,
                    writes: 0
                },
                UnknownPort {
                    port: 0x70,
                    reads: 1,
                    writes: 1
                },
            ]
        );
        assert_eq!(unknown.total_reads(), 3);
        assert_eq!(unknown.total_writes(), 1);
        let text = alloc::format!("{unknown}");
        assert!(text.contains("unknown port 0x0070: 1 reads, 1 writes"));
    }

    #[test]
    fn unknown_port_list_is_bounded() {
        let mut bus = bus();
        for port in 0x1000..0x1000 + UNKNOWN_PORT_CAPACITY as u16 + 5 {
            bus.port_read(port, 1);
        }
        assert_eq!(bus.unknown_ports().ports().len(), UNKNOWN_PORT_CAPACITY);
        assert_eq!(bus.unknown_ports().overflow_accesses(), 5);
    }

    #[test]
    fn post_delay_port_is_known_and_silent() {
        let mut bus = bus();
        bus.port_write(0x80, 1, 0x55);
        assert_eq!(bus.port_read(0x80, 1), 0xFF);
        assert!(bus.unknown_ports().ports().is_empty());
    }

    #[test]
    fn com1_transmit_through_bus() {
        let mut bus = bus();
        for b in b"hi" {
            bus.port_write(0x3F8, 1, u32::from(*b));
        }
        assert_eq!(bus.com1().sink().bytes, b"hi");
        // LSR: THR empty and transmitter empty.
        assert_eq!(bus.port_read(0x3FD, 1), 0x60);
    }

    #[test]
    fn wide_access_to_byte_device_is_split_low_byte_first() {
        let mut bus = bus();
        // 16-bit write at 0x3FB: LCR = 0x03, MCR = 0x0B.
        bus.port_write(0x3FB, 2, 0x0B03);
        assert_eq!(bus.port_read(0x3FB, 1), 0x03);
        assert_eq!(bus.port_read(0x3FC, 1), 0x0B);
        assert_eq!(bus.port_read(0x3FB, 2), 0x0B03);
        // A 4-byte read at 0x3FE runs off COM1 into an unmapped port: that byte is 0xFF.
        let value = bus.port_read(0x3FE, 4);
        assert_eq!(value >> 16, 0xFFFF);
        assert!(bus.unknown_ports().ports().is_empty());
    }

    #[test]
    fn debug_exit_takes_a_dword_whole() {
        let mut bus = bus();
        assert_eq!(bus.exit_requested(), None);
        bus.port_write(0xF4, 4, 0x11);
        assert_eq!(bus.exit_requested(), Some(0x11));
    }

    #[test]
    fn invalid_sizes_are_refused() {
        let mut bus = bus();
        assert_eq!(bus.port_read(0x3F8, 3), 0xFFFF_FFFF);
        bus.port_write(0x3F8, 0, b'x'.into());
        assert_eq!(bus.invalid_size_accesses(), 2);
        assert!(bus.com1().sink().bytes.is_empty());
    }

    #[test]
    fn serial_rx_raises_irq4_through_pic() {
        let mut bus = bus();
        init_pic(&mut bus);
        bus.port_write(0x3F9, 1, 0x01); // IER: received data available
        assert!(!bus.has_pending());
        assert!(bus.enqueue_rx(b'k'));
        assert!(bus.has_pending());
        assert_eq!(bus.acknowledge(), Some(0x24));
        assert_eq!(bus.port_read(0x3FA, 1), 0x04); // IIR: received data
        assert_eq!(bus.port_read(0x3F8, 1), u32::from(b'k'));
        assert_eq!(bus.port_read(0x3FA, 1), 0x01);
        bus.port_write(0x20, 1, 0x20); // EOI
        assert!(!bus.has_pending());
        // The line went low with the read: the next byte is a new edge.
        bus.enqueue_rx(b'l');
        assert_eq!(bus.acknowledge(), Some(0x24));
    }

    #[test]
    fn pit_drives_irq0_from_host_clock() {
        let mut bus = bus();
        init_pic(&mut bus);
        // 100 Hz: divisor 11932 (0x2E9C), mode 2.
        bus.port_write(0x43, 1, 0x34);
        bus.port_write(0x40, 1, 0x9C);
        bus.port_write(0x40, 1, 0x2E);
        bus.clock_mut().micros = 9_000;
        assert_eq!(bus.poll_timer(), 0);
        assert!(!bus.has_pending());
        bus.clock_mut().micros = 10_001;
        assert_eq!(bus.poll_timer(), 1);
        assert_eq!(bus.acknowledge(), Some(0x20));
        bus.port_write(0x20, 1, 0x20);
        bus.clock_mut().micros = 50_010;
        assert_eq!(bus.poll_timer(), 4);
        assert_eq!(bus.timer_edges(), 5);
        assert!(bus.has_pending());
    }

    #[test]
    fn pit_read_sees_current_time() {
        let mut bus = bus();
        bus.port_write(0x43, 1, 0x34);
        bus.port_write(0x40, 1, 0xFF);
        bus.port_write(0x40, 1, 0xFF);
        assert_eq!(bus.pit().divisor(), Some(0xFFFF));
        bus.clock_mut().micros = 1_000; // 1193 PIT ticks
        bus.port_write(0x43, 1, 0x00); // latch
        let low = bus.port_read(0x40, 1);
        let high = bus.port_read(0x40, 1);
        assert_eq!(low | (high << 8), 0xFFFF - 1193);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random port accesses of any size never panic; unknown-port reads are all ones; the
        /// unknown list stays bounded and distinct.
        #[test]
        fn random_port_accesses_never_panic(
            accesses in proptest::collection::vec(
                (prop_oneof![
                    any::<u16>(),
                    0x20u16..0x22, 0xA0u16..0xA2, 0x40u16..0x44, 0x3F8u16..0x400,
                    Just(0xF4u16), Just(0x80u16), Just(0xFFFFu16)
                ], 0u8..6, any::<u32>(), any::<bool>(), 0u64..100_000),
                1..128)
        ) {
            let mut bus = bus();
            for (port, size, value, write, dt) in accesses {
                bus.clock_mut().micros += dt;
                if write {
                    bus.port_write(port, size, value);
                } else {
                    let v = bus.port_read(port, size);
                    if matches!(size, 1 | 2 | 4) && Device::decode(port).is_none() {
                        prop_assert_eq!(v, all_ones(size));
                    }
                    if size == 1 { prop_assert!(v <= 0xFF); }
                    if size == 2 { prop_assert!(v <= 0xFFFF); }
                }
                bus.poll_timer();
                if bus.has_pending() {
                    prop_assert!(bus.acknowledge().is_some());
                }
                let ports = bus.unknown_ports().ports();
                prop_assert!(ports.len() <= UNKNOWN_PORT_CAPACITY);
                for (i, p) in ports.iter().enumerate() {
                    prop_assert!(ports.iter().skip(i + 1).all(|q| q.port != p.port));
                }
            }
        }
    }
}
