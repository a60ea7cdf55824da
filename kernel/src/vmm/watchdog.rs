//! The no-progress watchdog (host option `watchdog=`): stops a guest that is hung (`jmp $`,
//! `cli` and a loop, a trapping instruction in a loop that goes nowhere) instead of letting the
//! machine spin forever. The classic "`cli; jmp $`" hang.

/// Detects a guest that makes no progress, sampled at every host timer tick that interrupts
/// it. It is stopped when, for `limit` consecutive ticks, everything it did (every trap and
/// every sample) stayed within a few bytes of code with its registers unchanged (`jmp $`, a
/// spin on a flag nothing will set), or it ran with its virtual interrupts disabled either
/// without a single trap or without leaving those few bytes (`cli` and then any loop: nothing
/// can ever reach it; `1: out dx, al; inc ecx; jmp 1b`). A real kernel's own timer interrupts
/// move it elsewhere long before; one that keeps interrupts off for seconds in one spot is hung.
/// `watchdog=0` turns it off.
#[derive(Debug, Clone, Copy)]
pub(super) struct Watchdog {
    limit: u64,
    /// The code window the guest has stayed in: the lowest and highest RIP seen.
    low: u64,
    high: u64,
    /// The window was left, or a trap came, since the last tick.
    moved: bool,
    trapped: bool,
    /// Ticks spent in the window with the same registers.
    stuck_ticks: u64,
    /// Ticks with interrupts disabled, in the window or with no trap in between.
    quiet_ticks: u64,
    /// A digest of the general registers at the last tick.
    last_registers: u64,
}

/// How far apart (bytes) the RIPs of a loop that goes nowhere can be.
const STUCK_WINDOW: u64 = 32;

impl Watchdog {
    pub(super) fn new(limit: u64) -> Self {
        Self {
            limit,
            low: u64::MAX,
            high: 0,
            moved: true,
            trapped: false,
            stuck_ticks: 0,
            quiet_ticks: 0,
            last_registers: 0,
        }
    }

    /// The guest was at `rip`; leaving the window is progress.
    fn observe(&mut self, rip: u64) {
        let (low, high) = (self.low.min(rip), self.high.max(rip));
        if high - low <= STUCK_WINDOW {
            (self.low, self.high) = (low, high);
        } else {
            (self.low, self.high) = (rip, rip);
            self.moved = true;
        }
    }

    /// A trap other than a host timer tick, at `rip`.
    pub(super) fn trap(&mut self, rip: u64) {
        self.trapped = true;
        self.observe(rip);
    }

    /// A host timer tick found the guest at `rip` with general registers digesting to
    /// `registers`; true when the guest has stalled.
    pub(super) fn tick(&mut self, rip: u64, registers: u64, interrupts_off: bool) -> bool {
        self.observe(rip);
        let moved = core::mem::take(&mut self.moved);
        let trapped = core::mem::take(&mut self.trapped);
        if moved || registers != self.last_registers {
            self.last_registers = registers;
            self.stuck_ticks = 0;
        } else {
            self.stuck_ticks += 1;
        }
        if interrupts_off && (!trapped || !moved) {
            self.quiet_ticks += 1;
        } else {
            self.quiet_ticks = 0;
        }
        self.limit != 0 && self.stalled_ticks() >= self.limit
    }

    /// Whether `ticks` of HLT with nothing pending is too long an idle (`watchdog=0`: never).
    pub(super) fn idle_too_long(&self, ticks: u64) -> bool {
        self.limit != 0 && ticks > self.limit
    }

    pub(super) fn stalled_ticks(&self) -> u64 {
        self.stuck_ticks.max(self.quiet_ticks)
    }
}
