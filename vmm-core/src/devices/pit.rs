//! The 8254 programmable interval timer, channel 0 (IRQ 0), driven by the host's clock.
//!
//! Specification: Intel 8254 datasheet (order 231164): "Control Word Format", "Read-Back
//! Command", "Counter Latch Command", "Mode 0" to "Mode 5".
//!
//! Units: all time inside this module is in **PIT input ticks** of 1/1 193 182 s (the PC's
//! 14.31818 MHz crystal divided by 12). [`pit_ticks_from_host`] converts host timer ticks
//! exactly with 128-bit integer arithmetic; there are no floats. The host calls
//! [`Pit::advance_to`] with the current time (before any guest access to the PIT, and whenever
//! its own timer fires) and raises one virtual IRQ 0 when the returned edge count is non-zero
//! (the 8259A's single IRR bit coalesces several edges anyway; the count is for accounting and
//! for guests that measure lost ticks).

/// The 8254's input clock on the PC, in Hz.
pub const PIT_INPUT_HZ: u64 = 1_193_182;

/// Channel 0 data port.
pub const CHANNEL0_PORT: u16 = 0x40;
/// Control word port.
pub const CONTROL_PORT: u16 = 0x43;

/// Control word SC1–SC0 (bits 7–6): the counter selected, or 3 for read-back.
const CW_SELECT_SHIFT: u8 = 6;
/// SC = 3: the read-back command.
const CW_SELECT_READ_BACK: u8 = 0b11;
/// Control word RW1–RW0 (bits 5–4): 0 = counter latch command.
const CW_ACCESS_SHIFT: u8 = 4;
const CW_ACCESS_LATCH: u8 = 0b00;
const CW_ACCESS_LSB: u8 = 0b01;
const CW_ACCESS_MSB: u8 = 0b10;
const CW_ACCESS_LSB_MSB: u8 = 0b11;
/// Control word M2–M0 (bits 3–1).
const CW_MODE_SHIFT: u8 = 1;
/// Control word BCD (bit 0).
const CW_BCD: u8 = 0b0000_0001;
/// Read-back: bit 5 = 0 latches the count.
const RB_NOT_COUNT: u8 = 0b0010_0000;
/// Read-back: bit 4 = 0 latches the status.
const RB_NOT_STATUS: u8 = 0b0001_0000;
/// Read-back: bit 1 selects counter 0.
const RB_COUNTER0: u8 = 0b0000_0010;
/// Status byte bit 7: the OUT pin.
const STATUS_OUTPUT: u8 = 0b1000_0000;
/// Status byte bit 6: null count (a count was written but not yet loaded).
const STATUS_NULL_COUNT: u8 = 0b0100_0000;

/// The counter's register offsets from 0x40.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Register {
    Counter0,
    /// Counters 1 and 2: not modelled.
    OtherCounter,
    Control,
}

impl Register {
    fn decode(offset: u8) -> Self {
        match offset & 3 {
            0 => Register::Counter0,
            3 => Register::Control,
            _ => Register::OtherCounter,
        }
    }
}

/// How the guest reads and writes the 16-bit count (RW1–RW0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessMode {
    /// Least significant byte only.
    Lsb,
    /// Most significant byte only.
    Msb,
    /// LSB then MSB.
    LsbMsb,
}

/// Counting mode (M2–M0; 6 and 7 are aliases of 2 and 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Mode 0: interrupt on terminal count (one edge).
    InterruptOnTerminalCount,
    /// Mode 1: hardware retriggerable one-shot (needs a gate edge: never fires on channel 0).
    HardwareOneShot,
    /// Mode 2: rate generator (periodic).
    RateGenerator,
    /// Mode 3: square wave generator (periodic).
    SquareWave,
    /// Mode 4: software triggered strobe (one edge).
    SoftwareStrobe,
    /// Mode 5: hardware triggered strobe (needs a gate edge: never fires on channel 0).
    HardwareStrobe,
}

impl Mode {
    fn decode(bits: u8) -> Self {
        match bits & 7 {
            0 => Mode::InterruptOnTerminalCount,
            1 => Mode::HardwareOneShot,
            2 | 6 => Mode::RateGenerator,
            3 | 7 => Mode::SquareWave,
            4 => Mode::SoftwareStrobe,
            _ => Mode::HardwareStrobe,
        }
    }
    fn bits(self) -> u8 {
        match self {
            Mode::InterruptOnTerminalCount => 0,
            Mode::HardwareOneShot => 1,
            Mode::RateGenerator => 2,
            Mode::SquareWave => 3,
            Mode::SoftwareStrobe => 4,
            Mode::HardwareStrobe => 5,
        }
    }
    fn periodic(self) -> bool {
        matches!(self, Mode::RateGenerator | Mode::SquareWave)
    }
}

/// A count the counter latch or read-back command froze, read per the access mode.
#[derive(Debug, Clone, Copy)]
struct LatchedCount {
    value: u16,
    msb_next: bool,
}

/// The counter is running: loaded with `reload` input ticks at time `start`.
#[derive(Debug, Clone, Copy)]
struct Counting {
    start: u64,
    reload: u64,
}

/// 8254 channel 0.
#[derive(Debug, Clone)]
pub struct Pit {
    now: u64,
    mode: Mode,
    access: AccessMode,
    bcd: bool,
    /// LSB received of an LSB-then-MSB count write.
    write_lsb: Option<u8>,
    /// An unlatched LSB-then-MSB read has returned the LSB.
    read_msb_next: bool,
    latch: Option<LatchedCount>,
    status_latch: Option<u8>,
    counting: Option<Counting>,
    /// A count written while a periodic mode runs takes effect at the end of the current period.
    pending_reload: Option<u64>,
    next_edge: u64,
    one_shot_fired: bool,
    /// Null count (read-back status bit 6) is set until this time, when the count last
    /// written reaches the counting element; `u64::MAX` while it never will (no count written
    /// since the control word, or a gate-triggered mode whose gate never rises).
    null_count_until: u64,
}

impl Default for Pit {
    fn default() -> Self {
        Self::new()
    }
}

/// Converts host timer ticks to PIT input ticks, exactly (floor), with no overflow for any
/// `u64` input. A zero `host_ticks_per_second` gives 0.
pub fn pit_ticks_from_host(host_ticks: u64, host_ticks_per_second: u64) -> u64 {
    if host_ticks_per_second == 0 {
        return 0;
    }
    let ticks =
        u128::from(host_ticks) * u128::from(PIT_INPUT_HZ) / u128::from(host_ticks_per_second);
    u64::try_from(ticks).unwrap_or(u64::MAX)
}

/// The period of a divisor (0 = 65536) in nanoseconds, rounded down.
pub fn divisor_period_ns(divisor: u16) -> u64 {
    let ticks = if divisor == 0 {
        65_536
    } else {
        u64::from(divisor)
    };
    ticks * 1_000_000_000 / PIT_INPUT_HZ
}

impl Pit {
    /// Channel 0 before the guest programs it: mode 3, LSB-then-MSB, not counting (a BIOS would
    /// have started it at 18.2 Hz; the guests here program it themselves).
    pub fn new() -> Self {
        Self {
            now: 0,
            mode: Mode::SquareWave,
            access: AccessMode::LsbMsb,
            bcd: false,
            write_lsb: None,
            read_msb_next: false,
            latch: None,
            status_latch: None,
            counting: None,
            pending_reload: None,
            next_edge: 0,
            one_shot_fired: false,
            null_count_until: u64::MAX,
        }
    }

    /// The mode the guest selected.
    pub fn mode(&self) -> Mode {
        self.mode
    }
    /// The access mode the guest selected.
    pub fn access_mode(&self) -> AccessMode {
        self.access
    }
    /// Whether the guest asked for BCD counting (recorded; counting is binary).
    pub fn bcd_requested(&self) -> bool {
        self.bcd
    }
    /// The time of the last [`Pit::advance_to`], in PIT input ticks.
    pub fn now(&self) -> u64 {
        self.now
    }
    /// The divisor now counting, in input ticks (1..=65536), if a count was loaded.
    pub fn divisor(&self) -> Option<u64> {
        self.counting.map(|c| c.reload)
    }
    /// When the next IRQ 0 edge is due, in PIT input ticks, if one is (for the host to program
    /// its own timer).
    pub fn next_edge_at(&self) -> Option<u64> {
        let counting = self.counting?;
        if self.mode.periodic() {
            Some(self.next_edge)
        } else if self.edge_mode_one_shot() && !self.one_shot_fired {
            Some(counting.start.saturating_add(counting.reload))
        } else {
            None
        }
    }

    fn edge_mode_one_shot(&self) -> bool {
        matches!(
            self.mode,
            Mode::InterruptOnTerminalCount | Mode::SoftwareStrobe
        )
    }

    /// Moves time to `now` (PIT input ticks; earlier values are ignored) and returns how many
    /// rising edges of OUT0 (IRQ 0) happened since the last call, saturated to `u32::MAX`.
    /// Modes 2 and 3 give one edge per period from the moment the count was loaded; modes 0 and
    /// 4 one edge at terminal count.
    pub fn advance_to(&mut self, now: u64) -> u32 {
        if now > self.now {
            self.now = now;
        }
        let now = self.now;
        let Some(mut counting) = self.counting else {
            return 0;
        };
        let mut edges: u64 = 0;
        if self.mode.periodic() {
            if let Some(reload) = self.pending_reload {
                if now >= self.next_edge {
                    edges += 1;
                    counting = Counting {
                        start: self.next_edge,
                        reload,
                    };
                    self.next_edge = self.next_edge.saturating_add(reload);
                    self.pending_reload = None;
                }
            }
            if now >= self.next_edge {
                let more = (now - self.next_edge) / counting.reload + 1;
                edges = edges.saturating_add(more);
                self.next_edge = self
                    .next_edge
                    .saturating_add(more.saturating_mul(counting.reload));
            }
            self.counting = Some(counting);
        } else if self.edge_mode_one_shot()
            && !self.one_shot_fired
            && now >= counting.start.saturating_add(counting.reload)
        {
            self.one_shot_fired = true;
            edges = 1;
        }
        u32::try_from(edges).unwrap_or(u32::MAX)
    }

    /// The count as the counting element holds it at the current time (16 bits: a divisor of
    /// 65536 reads as 0). Mode 3 decrements by two per input tick in each half period.
    pub fn current_count(&self) -> u16 {
        let Some(counting) = self.counting else {
            return 0;
        };
        let elapsed = self.now.saturating_sub(counting.start);
        let n = counting.reload;
        let count = match self.mode {
            Mode::RateGenerator => n - elapsed % n,
            Mode::SquareWave => {
                let high_half = n.div_ceil(2);
                let phase = elapsed % n;
                let within = if phase < high_half {
                    phase
                } else {
                    phase - high_half
                };
                n.saturating_sub(2 * within)
            }
            Mode::InterruptOnTerminalCount | Mode::SoftwareStrobe => n.wrapping_sub(elapsed),
            Mode::HardwareOneShot | Mode::HardwareStrobe => n,
        };
        (count & 0xFFFF) as u16
    }

    /// The OUT0 pin now.
    pub fn output(&self) -> bool {
        let Some(counting) = self.counting else {
            return self.mode != Mode::InterruptOnTerminalCount;
        };
        let elapsed = self.now.saturating_sub(counting.start);
        let n = counting.reload;
        match self.mode {
            Mode::InterruptOnTerminalCount => elapsed >= n,
            Mode::SoftwareStrobe => elapsed != n,
            Mode::RateGenerator => elapsed % n != n - 1,
            Mode::SquareWave => elapsed % n < n.div_ceil(2),
            Mode::HardwareOneShot | Mode::HardwareStrobe => true,
        }
    }

    fn status_byte(&self) -> u8 {
        let access = match self.access {
            AccessMode::Lsb => CW_ACCESS_LSB,
            AccessMode::Msb => CW_ACCESS_MSB,
            AccessMode::LsbMsb => CW_ACCESS_LSB_MSB,
        };
        let mut status = (access << CW_ACCESS_SHIFT) | (self.mode.bits() << CW_MODE_SHIFT);
        if self.bcd {
            status |= CW_BCD;
        }
        if self.output() {
            status |= STATUS_OUTPUT;
        }
        if self.now < self.null_count_until {
            status |= STATUS_NULL_COUNT;
        }
        status
    }

    fn latch_count(&mut self) {
        // A second latch before the first is read is ignored (datasheet, "Counter Latch Command").
        if self.latch.is_none() {
            self.latch = Some(LatchedCount {
                value: self.current_count(),
                msb_next: false,
            });
        }
    }

    /// Guest read of register `offset` (0–3 from port 0x40) at the time of the last
    /// [`Pit::advance_to`].
    pub fn read(&mut self, offset: u8) -> u8 {
        match Register::decode(offset) {
            Register::Counter0 => {
                if let Some(status) = self.status_latch.take() {
                    return status;
                }
                if let Some(mut latched) = self.latch {
                    let [lsb, msb] = latched.value.to_le_bytes();
                    return match self.access {
                        AccessMode::Lsb => {
                            self.latch = None;
                            lsb
                        }
                        AccessMode::Msb => {
                            self.latch = None;
                            msb
                        }
                        AccessMode::LsbMsb if latched.msb_next => {
                            self.latch = None;
                            msb
                        }
                        AccessMode::LsbMsb => {
                            latched.msb_next = true;
                            self.latch = Some(latched);
                            lsb
                        }
                    };
                }
                let [lsb, msb] = self.current_count().to_le_bytes();
                match self.access {
                    AccessMode::Lsb => lsb,
                    AccessMode::Msb => msb,
                    AccessMode::LsbMsb => {
                        self.read_msb_next = !self.read_msb_next;
                        if self.read_msb_next {
                            lsb
                        } else {
                            msb
                        }
                    }
                }
            }
            // The control word register cannot be read; counters 1 and 2 are not modelled.
            Register::OtherCounter | Register::Control => 0xFF,
        }
    }

    /// Guest write of `value` to register `offset` (0–3 from port 0x40) at the time of the last
    /// [`Pit::advance_to`].
    pub fn write(&mut self, offset: u8, value: u8) {
        match Register::decode(offset) {
            Register::Counter0 => match self.access {
                AccessMode::Lsb => self.load(u16::from(value)),
                AccessMode::Msb => self.load(u16::from(value) << 8),
                AccessMode::LsbMsb => match self.write_lsb.take() {
                    None => self.write_lsb = Some(value),
                    Some(lsb) => self.load(u16::from_le_bytes([lsb, value])),
                },
            },
            Register::OtherCounter => {}
            Register::Control => self.write_control(value),
        }
    }

    fn write_control(&mut self, value: u8) {
        let select = value >> CW_SELECT_SHIFT;
        if select == CW_SELECT_READ_BACK {
            if value & RB_COUNTER0 != 0 {
                if value & RB_NOT_COUNT == 0 {
                    self.latch_count();
                }
                if value & RB_NOT_STATUS == 0 && self.status_latch.is_none() {
                    self.status_latch = Some(self.status_byte());
                }
            }
            return;
        }
        if select != 0 {
            return; // counters 1 and 2
        }
        let access = match (value >> CW_ACCESS_SHIFT) & 3 {
            CW_ACCESS_LATCH => {
                self.latch_count();
                return;
            }
            CW_ACCESS_LSB => AccessMode::Lsb,
            CW_ACCESS_MSB => AccessMode::Msb,
            _ => AccessMode::LsbMsb,
        };
        // A control word stops the counter until a new count is written ("Write Operations").
        self.access = access;
        self.mode = Mode::decode(value >> CW_MODE_SHIFT);
        self.bcd = value & CW_BCD != 0;
        self.write_lsb = None;
        self.read_msb_next = false;
        self.latch = None;
        self.status_latch = None;
        self.counting = None;
        self.pending_reload = None;
        self.one_shot_fired = false;
        self.null_count_until = u64::MAX;
    }

    /// A complete count was written: 0 is the largest divisor, 65536.
    ///
    /// Null count stays set until the count register is copied into the counting element
    /// (8254 datasheet, "Read-Back Command", NULL COUNT): at the next CLK pulse for a first
    /// count or in modes 0 and 4, at the end of the current period for a new count while
    /// modes 2 and 3 run, and never in modes 1 and 5 (their trigger is a rising GATE, which
    /// channel 0's gate, tied high, never gives).
    fn load(&mut self, count: u16) {
        let reload = if count == 0 { 65_536 } else { u64::from(count) };
        match self.counting {
            Some(_) if self.mode.periodic() => {
                self.pending_reload = Some(reload);
                self.null_count_until = self.next_edge;
            }
            _ => {
                self.null_count_until =
                    if matches!(self.mode, Mode::HardwareOneShot | Mode::HardwareStrobe) {
                        u64::MAX
                    } else {
                        self.now.saturating_add(1)
                    };
                self.counting = Some(Counting {
                    start: self.now,
                    reload,
                });
                self.next_edge = self.now.saturating_add(reload);
                self.one_shot_fired = false;
                self.pending_reload = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Written again from the 8254 datasheet.
    const DATA0: u8 = 0;
    const CONTROL: u8 = 3;
    /// SC=00, RW=11 (LSB then MSB), M=010 (mode 2), binary.
    const CH0_LOHI_MODE2: u8 = 0x34;
    /// SC=00, RW=11, M=011 (mode 3), binary.
    const CH0_LOHI_MODE3: u8 = 0x36;
    /// SC=00, RW=11, M=000 (mode 0).
    const CH0_LOHI_MODE0: u8 = 0x30;
    /// SC=00, RW=01 (LSB only), mode 2.
    const CH0_LSB_MODE2: u8 = 0x14;
    /// SC=00, RW=10 (MSB only), mode 2.
    const CH0_MSB_MODE2: u8 = 0x24;
    /// SC=00, RW=00: counter latch command.
    const CH0_LATCH: u8 = 0x00;
    /// Read-back: SC=11, COUNT=0, STATUS=0, CNT0=1.
    const READ_BACK_COUNT_STATUS_CH0: u8 = 0xC2;

    fn program(pit: &mut Pit, control: u8, divisor: u16) {
        pit.write(CONTROL, control);
        let [lo, hi] = divisor.to_le_bytes();
        pit.write(DATA0, lo);
        pit.write(DATA0, hi);
    }

    #[test]
    fn host_tick_conversion_is_exact_and_does_not_overflow() {
        assert_eq!(
            pit_ticks_from_host(1_000_000_000, 1_000_000_000),
            PIT_INPUT_HZ
        );
        assert_eq!(pit_ticks_from_host(1, 1_000), 1_193);
        assert_eq!(pit_ticks_from_host(u64::MAX, 1), u64::MAX);
        assert_eq!(pit_ticks_from_host(5, 0), 0);
    }

    #[test]
    fn divisor_to_period() {
        assert_eq!(divisor_period_ns(0), 54_925_401); // 18.2 Hz
        assert_eq!(divisor_period_ns(1193), 999_847); // ~1 kHz
        assert_eq!(divisor_period_ns(11_932), 10_000_150); // ~100 Hz
    }

    #[test]
    fn no_edges_before_a_count_is_written() {
        let mut pit = Pit::new();
        assert_eq!(pit.advance_to(1_000_000), 0);
        pit.write(CONTROL, CH0_LOHI_MODE2);
        pit.write(DATA0, 0x10); // only the LSB so far
        assert_eq!(pit.advance_to(2_000_000), 0);
        assert_eq!(pit.divisor(), None);
    }

    #[test]
    fn mode2_gives_one_edge_per_period() {
        let mut pit = Pit::new();
        program(&mut pit, CH0_LOHI_MODE2, 1000);
        assert_eq!(pit.divisor(), Some(1000));
        assert_eq!(pit.advance_to(999), 0);
        assert_eq!(pit.advance_to(1000), 1);
        assert_eq!(pit.advance_to(1000), 0);
        assert_eq!(pit.advance_to(4500), 3);
        assert_eq!(pit.next_edge_at(), Some(5000));
        // Time never goes backwards.
        assert_eq!(pit.advance_to(10), 0);
        assert_eq!(pit.now(), 4500);
    }

    #[test]
    fn mode3_period_and_count_decrements_by_two() {
        let mut pit = Pit::new();
        program(&mut pit, CH0_LOHI_MODE3, 100);
        assert_eq!(pit.mode(), Mode::SquareWave);
        assert!(pit.output());
        pit.advance_to(10);
        assert_eq!(pit.current_count(), 80);
        assert!(pit.output());
        pit.advance_to(60);
        assert_eq!(pit.current_count(), 80);
        assert!(!pit.output());
        assert_eq!(pit.advance_to(250), 2);
    }

    #[test]
    fn divisor_zero_is_65536() {
        let mut pit = Pit::new();
        program(&mut pit, CH0_LOHI_MODE2, 0);
        assert_eq!(pit.divisor(), Some(65_536));
        assert_eq!(pit.advance_to(65_535), 0);
        assert_eq!(pit.advance_to(65_536), 1);
        assert_eq!(pit.advance_to(10 * 65_536), 9);
    }

    #[test]
    fn lsb_only_and_msb_only_access() {
        let mut pit = Pit::new();
        pit.write(CONTROL, CH0_LSB_MODE2);
        pit.write(DATA0, 200);
        assert_eq!(pit.divisor(), Some(200));
        assert_eq!(pit.access_mode(), AccessMode::Lsb);
        pit.write(CONTROL, CH0_MSB_MODE2);
        pit.write(DATA0, 0x12);
        assert_eq!(pit.divisor(), Some(0x1200));
        pit.advance_to(0x100);
        assert_eq!(pit.read(DATA0), 0x11); // 0x1200 - 0x100
    }

    #[test]
    fn unlatched_lohi_read_alternates_bytes() {
        let mut pit = Pit::new();
        program(&mut pit, CH0_LOHI_MODE2, 0x1234);
        pit.advance_to(0x34);
        assert_eq!(pit.read(DATA0), 0x00);
        assert_eq!(pit.read(DATA0), 0x12);
    }

    #[test]
    fn counter_latch_freezes_the_count_until_read() {
        let mut pit = Pit::new();
        program(&mut pit, CH0_LOHI_MODE2, 0x1000);
        pit.advance_to(0x10);
        pit.write(CONTROL, CH0_LATCH);
        pit.advance_to(0x800);
        pit.write(CONTROL, CH0_LATCH); // ignored: the first latch is not read yet
        assert_eq!(pit.read(DATA0), 0xF0);
        assert_eq!(pit.read(DATA0), 0x0F);
        // Latch consumed: reads follow the counter again.
        assert_eq!(pit.read(DATA0), 0x00);
        assert_eq!(pit.read(DATA0), 0x08);
    }

    #[test]
    fn read_back_latches_status_then_count() {
        let mut pit = Pit::new();
        program(&mut pit, CH0_LOHI_MODE2, 0x0300);
        pit.advance_to(0x100);
        pit.write(CONTROL, READ_BACK_COUNT_STATUS_CH0);
        // Status: OUT high, count loaded, RW=11, mode 2, binary.
        assert_eq!(pit.read(DATA0), 0b1011_0100);
        assert_eq!(pit.read(DATA0), 0x00);
        assert_eq!(pit.read(DATA0), 0x02);
    }

    #[test]
    fn null_count_after_control_word() {
        let mut pit = Pit::new();
        pit.write(CONTROL, CH0_LOHI_MODE0);
        pit.write(CONTROL, READ_BACK_COUNT_STATUS_CH0 | 0x20); // status only
        assert_eq!(pit.read(DATA0), 0b0111_0000); // OUT low in mode 0, null count
    }

    fn null_count_bit(pit: &mut Pit) -> bool {
        pit.write(CONTROL, READ_BACK_COUNT_STATUS_CH0 | 0x20); // status only
        pit.read(DATA0) & 0x40 != 0
    }

    #[test]
    fn null_count_stays_set_until_the_count_reaches_the_counting_element() {
        // First count in mode 2: loaded at the next CLK pulse after the write.
        let mut pit = Pit::new();
        pit.advance_to(10);
        program(&mut pit, CH0_LOHI_MODE2, 1000);
        assert!(null_count_bit(&mut pit), "written, not yet loaded");
        pit.advance_to(11);
        assert!(!null_count_bit(&mut pit), "loaded at the next CLK");
        // A new count while mode 2 runs: loaded at the end of the current period (t = 1010).
        pit.advance_to(500);
        let [lo, hi] = 100u16.to_le_bytes();
        pit.write(DATA0, lo);
        assert!(
            !null_count_bit(&mut pit),
            "set only once both bytes are written"
        );
        pit.write(DATA0, hi);
        assert!(null_count_bit(&mut pit));
        pit.advance_to(1009);
        assert!(null_count_bit(&mut pit), "still counting the old period");
        pit.advance_to(1010);
        assert!(!null_count_bit(&mut pit), "reloaded");
        // Mode 1 waits for a GATE edge channel 0 never gets.
        let mut pit = Pit::new();
        program(&mut pit, 0x32, 100);
        pit.advance_to(1000);
        assert!(null_count_bit(&mut pit));
    }

    #[test]
    fn mode0_fires_once_at_terminal_count() {
        let mut pit = Pit::new();
        program(&mut pit, CH0_LOHI_MODE0, 500);
        assert!(!pit.output());
        assert_eq!(pit.advance_to(499), 0);
        assert_eq!(pit.advance_to(500), 1);
        assert!(pit.output());
        assert_eq!(pit.advance_to(100_000), 0);
        assert_eq!(pit.next_edge_at(), None);
    }

    #[test]
    fn new_count_in_mode2_waits_for_end_of_period() {
        let mut pit = Pit::new();
        program(&mut pit, CH0_LOHI_MODE2, 1000);
        pit.advance_to(500);
        let [lo, hi] = 100u16.to_le_bytes();
        pit.write(DATA0, lo);
        pit.write(DATA0, hi);
        assert_eq!(pit.advance_to(999), 0);
        // The old period ends at 1000, then 100-tick periods.
        assert_eq!(pit.advance_to(1000), 1);
        assert_eq!(pit.advance_to(1300), 3);
        assert_eq!(pit.divisor(), Some(100));
    }

    #[test]
    fn other_channels_are_not_modelled() {
        let mut pit = Pit::new();
        pit.write(CONTROL, 0x74); // channel 1
        pit.write(1, 0x10);
        assert_eq!(pit.read(1), 0xFF);
        assert_eq!(pit.read(CONTROL), 0xFF);
        assert_eq!(pit.divisor(), None);
    }
}
