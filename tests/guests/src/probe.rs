//! Probing single instructions at CPL 0: [`probe!`](crate::probe!) runs instructions between
//! two labels and records the first exception raised there; the guest's trap handler calls
//! [`record`] and then either returns (the instruction is retried, e.g. after `clts` in a #NM
//! handler) or [`skip`]s to the end of the probe. [`check`] prints one line per check and counts
//! the wrong ones.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::machine::Frame;
use crate::println;

/// Address of the probed instruction while a probe runs (0 otherwise).
pub static PROBE_AT: AtomicU64 = AtomicU64::new(0);
/// Address just after the probed instructions.
pub static PROBE_RESUME: AtomicU64 = AtomicU64::new(0);
static TRAPS: AtomicU64 = AtomicU64::new(0);
static VECTOR: AtomicU64 = AtomicU64::new(0);
static ERROR: AtomicU64 = AtomicU64::new(0);
static RIP: AtomicU64 = AtomicU64::new(0);
static WRONG: AtomicU64 = AtomicU64::new(0);
static CHECKS: AtomicU64 = AtomicU64::new(0);

/// What a probe saw: how many exceptions, and the first one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// Exceptions taken while the probe ran.
    pub traps: u64,
    /// The first one's vector.
    pub vector: u64,
    /// Its error code (0 when the CPU pushes none).
    pub error: u64,
    /// Whether its saved RIP was the probed instruction.
    pub at_insn: bool,
}

impl Outcome {
    /// No exception (for a check whose instructions ran outside a probe).
    pub const NO_FAULT: Outcome = Outcome {
        traps: 0,
        vector: 0,
        error: 0,
        at_insn: false,
    };

    /// An outcome from a trap frame (one exception, `at_insn` when RIP is `insn`).
    pub fn from_frame(frame: &Frame, insn: u64) -> Self {
        Outcome {
            traps: 1,
            vector: frame.vector,
            error: frame.error,
            at_insn: frame.rip == insn,
        }
    }

    /// Whether this is exactly `expected`: `None` = no exception, `Some((vector, error))` = that
    /// exception at the instruction.
    pub fn is(&self, expected: Option<(u64, u64)>) -> bool {
        match expected {
            None => self.traps == 0,
            Some((v, e)) => self.traps >= 1 && self.vector == v && self.error == e && self.at_insn,
        }
    }
}

/// The mnemonic of an exception vector.
pub fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "#DE",
        1 => "#DB",
        3 => "#BP",
        6 => "#UD",
        7 => "#NM",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        19 => "#XM",
        _ => "#?",
    }
}

impl core::fmt::Display for Outcome {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.traps == 0 {
            return write!(f, "no fault");
        }
        write!(
            f,
            "{} vector={} error={:#x} {} ({} trap{})",
            vector_name(self.vector),
            self.vector,
            self.error,
            if self.at_insn {
                "at the instruction"
            } else {
                "ELSEWHERE"
            },
            self.traps,
            if self.traps == 1 { "" } else { "s" }
        )
    }
}

/// Starts a probe (called by `probe!`).
pub fn begin() {
    TRAPS.store(0, Ordering::SeqCst);
    VECTOR.store(0, Ordering::SeqCst);
    ERROR.store(0, Ordering::SeqCst);
    RIP.store(0, Ordering::SeqCst);
}

/// Ends a probe (called by `probe!`) and returns what it saw.
pub fn end() -> Outcome {
    let at = PROBE_AT.swap(0, Ordering::SeqCst);
    Outcome {
        traps: TRAPS.load(Ordering::SeqCst),
        vector: VECTOR.load(Ordering::SeqCst),
        error: ERROR.load(Ordering::SeqCst),
        at_insn: RIP.load(Ordering::SeqCst) == at,
    }
}

/// Records a trap taken while a probe runs; false when no probe runs at CPL 0 (the caller's
/// business). At most 16 traps per probe: more means the handler keeps retrying a faulting
/// instruction, so the probe is skipped.
pub fn record(frame: &mut Frame) -> bool {
    if PROBE_AT.load(Ordering::SeqCst) == 0 || frame.cs & 3 != 0 {
        return false;
    }
    if TRAPS.fetch_add(1, Ordering::SeqCst) == 0 {
        VECTOR.store(frame.vector, Ordering::SeqCst);
        ERROR.store(frame.error, Ordering::SeqCst);
        RIP.store(frame.rip, Ordering::SeqCst);
    }
    if TRAPS.load(Ordering::SeqCst) >= 16 {
        skip(frame);
    }
    true
}

/// A whole trap handler for guests that only probe: records the trap and skips to the end of
/// the probe; a trap outside a probe is unexpected (the guest fails).
pub fn handler(frame: &mut Frame) {
    if !record(frame) {
        crate::machine::unexpected(frame)
    }
    skip(frame);
}

/// Makes the trap return after the probed instructions.
pub fn skip(frame: &mut Frame) {
    frame.rip = PROBE_RESUME.load(Ordering::SeqCst);
}

/// Prints `{name}: {outcome}[; {extra}] -> ok|WRONG` (with the expectation when wrong) and
/// counts it; `extra_ok` is a further condition named by `extra`.
pub fn check(
    name: &str,
    outcome: Outcome,
    expected: Option<(u64, u64)>,
    extra_ok: bool,
    extra: core::fmt::Arguments<'_>,
) -> bool {
    let ok = outcome.is(expected) && extra_ok;
    CHECKS.fetch_add(1, Ordering::SeqCst);
    if !ok {
        WRONG.fetch_add(1, Ordering::SeqCst);
    }
    let sep = if extra.as_str() == Some("") { "" } else { "; " };
    println(format_args!(
        "{name}: {outcome}{sep}{extra} -> {}",
        if ok { "ok" } else { "WRONG" }
    ));
    if !outcome.is(expected) {
        match expected {
            None => println(format_args!("{name}: expected no fault")),
            Some((v, e)) => println(format_args!(
                "{name}: expected {} vector={v} error={e:#x} at the instruction",
                vector_name(v)
            )),
        }
    }
    ok
}

/// [`check`] that also accepts `quirk` (a known emulator deviation from the CPU, named by
/// `why`, so the native run stays the reference): prints `{name}: quirk: {why}` when that is
/// what happened.
pub fn check_quirk(
    name: &str,
    outcome: Outcome,
    expected: Option<(u64, u64)>,
    quirk: Option<(u64, u64)>,
    why: &str,
) -> bool {
    if !outcome.is(expected) && outcome.is(quirk) {
        CHECKS.fetch_add(1, Ordering::SeqCst);
        println(format_args!("{name}: {outcome} -> ok"));
        println(format_args!("{name}: quirk: {why}"));
        return true;
    }
    check(name, outcome, expected, true, format_args!(""))
}

/// Prints `{guest}: N checks, M wrong` and exits (success when none was wrong).
pub fn finish(guest: &str) -> ! {
    let (n, wrong) = (CHECKS.load(Ordering::SeqCst), WRONG.load(Ordering::SeqCst));
    println(format_args!("{guest}: {n} checks, {wrong} wrong"));
    crate::exit(if wrong == 0 {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}

/// Runs the instruction strings at CPL 0 between a start and an end label, with the probe
/// armed, and returns the [`Outcome`]. Operands after `;` (each with a trailing comma) are
/// passed to `asm!`; RAX is clobbered, so they must not use it.
#[macro_export]
macro_rules! probe {
    ($($insn:literal),+ $(,)? ; $($operands:tt)*) => {{
        $crate::probe::begin();
        // SAFETY: the caller's instructions run between the labels; an exception there is
        // caught by the guest's handler (`probe::record`), which retries or skips them.
        unsafe {
            core::arch::asm!(
                "lea rax, [rip + 91f]",
                "mov qword ptr [rip + {probe_resume}], rax",
                "lea rax, [rip + 90f]",
                "mov qword ptr [rip + {probe_at}], rax",
                "90:",
                $($insn,)+
                "91:",
                probe_at = sym $crate::probe::PROBE_AT,
                probe_resume = sym $crate::probe::PROBE_RESUME,
                $($operands)*
                out("rax") _,
            )
        }
        $crate::probe::end()
    }};
}
