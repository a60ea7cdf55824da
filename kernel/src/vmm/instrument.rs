//! Instrumentation of the trap path, kept out of the decisions: the dispatcher calls it in one
//! line per trap (`Vm::account`). The phase clock times each trap — and, with the host option
//! `profile=phases`, splits its cost into the phases of the benchmark breakdown
//! (docs/benchmarks.md), which costs a few `rdtsc` per trap and is therefore off by default —
//! `--trace` prints one line per trap, and the bench attribution charges traps to the guest's
//! benchmark ops.

use super::console::GuestConsole;
use super::{cli_sti_stub, Action, Vm};
use crate::trap::{self, vector};
use core::sync::atomic::{AtomicBool, Ordering};
use vmm_core::accounting::{Phase, TrapKind};
use vmm_core::cpu::emulate::LaneInstruction;
use vmm_core::trace::{TraceKind, Tracer};

/// The time-stamp counter (under `--icount`, retired instructions).
pub(super) fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

extern "C" {
    /// Written by `trap_common` (asm/trap_entry.S) once it has saved the guest's registers.
    static trap_entry_tsc: u64;
    /// Written by `trap_exit` (asm/trap_entry.S) before it restores them.
    static trap_exit_tsc: u64;
}

/// Instructions of one trap outside its two stamps (`trap_entry_tsc`, `trap_exit_tsc`), by the
/// way it came in; counted from the listings in asm/trap_entry.S and asm/cli_sti_stub.S, and
/// checked against the guest's own count by the bench (docs/benchmarks.md, "Every
/// instruction"). Under `--icount` each is one unit; without it, about one cycle each.
fn unstamped_instructions(vector: u64, error_code: u64, cli_sti_stub_on: bool) -> u64 {
    // Before the entry stamp: the 15 register pushes of trap_common and the way to it.
    const PUSHES: u64 = 15;
    // After the exit stamp: rdtsc, shl, or, mov, 15 pops, add, iretq.
    const EXIT: u64 = 20;
    let way_in = match vector {
        // mov, lea, seven pushes, jmp (syscall_entry).
        vector::SYSCALL => 10,
        // Seven pushes, jmp (sysenter_entry).
        vector::SYSENTER => 8,
        // The vector stub (push, jmp), then cli_sti_stub: its three tests (6); with it on,
        // three pushes, its stamp and RIP check (7), the fetch and the CLI/STI compares (5), and
        // the bail (4). An STI it leaves because an interrupt is pending takes 2 more.
        vector::GENERAL_PROTECTION if error_code == 0 && cli_sti_stub_on => 2 + 6 + 3 + 7 + 5 + 4,
        vector::GENERAL_PROTECTION if error_code == 0 => 2 + 6,
        vector::GENERAL_PROTECTION => 2 + 4,
        // The CPU pushed an error code (the stubs' list in asm/trap_entry.S, which the boot
        // self-check `error-code-vectors` compares with vmm-core's exception table): push
        // vector, jmp.
        8 | 10..=14 | 17 | 21 | 29 | 30 => 2,
        // push 0, push vector, jmp.
        _ => 3,
    };
    way_in + PUSHES + EXIT
}

/// Whether traps are split by phase (host option `profile=phases`).
static SPLIT_BY_PHASE: AtomicBool = AtomicBool::new(false);

/// Whether traps are split by phase now (the fast lane stays off then: its traps have no
/// phases to split).
pub(super) fn splitting_by_phase() -> bool {
    SPLIT_BY_PHASE.load(Ordering::Relaxed)
}

/// Turns the per-phase split on or off (from the host command line, before the guest runs).
pub(super) fn split_by_phase(on: bool) {
    SPLIT_BY_PHASE.store(on, Ordering::Relaxed);
}

/// Times one trap from the entry stub's stamp (`trap_entry_tsc`) to the exit stub's
/// (`trap_exit_tsc`), plus the fixed instructions outside them, so the trap table shows every
/// instruction a trap costs. The exit stamp is only written after the dispatcher has returned,
/// so a trap is booked when the next one begins (`Vm::book_last_trap`). With the split on, each
/// `mark` also charges the cycles since the previous one to the phase that just ended.
pub(super) struct PhaseClock {
    entered: u64,
    last: u64,
    skipped: u64,
    unstamped: u64,
    split: bool,
    /// Cycles charged to each phase so far (all zero without the split).
    pub(super) phases: [u64; Phase::COUNT],
}

impl PhaseClock {
    /// Starts at the dispatcher for a trap through `vector`; what the entry stub spent since
    /// `trap_entry_tsc` is "entry".
    pub(super) fn start(vector: u64, error_code: u64) -> Self {
        // SAFETY: a plain read of a quadword only trap_common writes, with interrupts off.
        let entered = unsafe { core::ptr::addr_of!(trap_entry_tsc).read_volatile() };
        let unstamped = unstamped_instructions(vector, error_code, cli_sti_stub::enabled());
        let split = SPLIT_BY_PHASE.load(Ordering::Relaxed);
        let mut phases = [0; Phase::COUNT];
        let mut last = entered;
        if split {
            last = rdtsc();
            phases[Phase::EntryStub as usize] = last.saturating_sub(entered);
        }
        Self {
            entered,
            last,
            skipped: 0,
            unstamped,
            split,
            phases,
        }
    }

    /// The phase that just ended (only with the split on: otherwise nothing to do).
    pub(super) fn mark(&mut self, phase: Phase) {
        if !self.split {
            return;
        }
        let now = rdtsc();
        if let Some(slot) = self.phases.get_mut(phase as usize) {
            *slot += now.wrapping_sub(self.last);
        }
        self.last = now;
    }

    /// Time spent idle (guest HLT) is not a cost of the trap.
    pub(super) fn skip(&mut self, cycles: u64) {
        self.last = self.last.wrapping_add(cycles);
        self.skipped = self.skipped.wrapping_add(cycles);
    }

    /// What its booking needs once the exit stamp `left` is known: the cost is `left - base`
    /// (idle time left out, the fixed instructions outside the stamps in); with the split, the
    /// phases so far, the last mark and the fixed instructions, which `Vm::book_last_trap`
    /// completes. Kept small: it is stored at every trap.
    fn into_unbooked(self, booked: Booked, split: &mut SplitPending) -> Unbooked {
        let base = self
            .entered
            .wrapping_add(self.skipped)
            .wrapping_sub(self.unstamped);
        let booked = match booked {
            Booked::Kind(kind) if self.split => {
                *split = SplitPending {
                    phases: self.phases,
                    last: self.last,
                    unstamped: self.unstamped,
                };
                Booked::Split(kind)
            }
            other => other,
        };
        Unbooked { booked, base }
    }
}

/// The last trap, booked when the next one begins (`Vm::book_last_trap`).
pub(super) struct Unbooked {
    booked: Booked,
    /// Its cost is the exit stamp minus this.
    base: u64,
}

/// The per-phase split of the last trap until it is booked (host option `profile=phases`).
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct SplitPending {
    phases: [u64; Phase::COUNT],
    last: u64,
    unstamped: u64,
}

/// What a trap is booked as, once its cost is known.
pub(super) enum Booked {
    /// A row of the trap table by kind.
    Kind(TrapKind),
    /// A fast-lane instruction's row (`Vm::lane_rows`).
    Lane(LaneInstruction),
    /// A row by kind, with its phases in `Vm::split_pending`.
    Split(TrapKind),
}

/// What the trace and the trap table call a trap.
pub(super) enum TrapName {
    /// A vector and its error code.
    Vector(u64, u64),
    /// A #PF: its error code and the faulting linear address (CR2); for a page-table write the
    /// VMM emulated, the store.
    PageFault {
        error: u64,
        cr2: u64,
        store: Option<alloc::boxed::Box<TrapName>>,
    },
    Instruction(&'static str),
    /// An instruction as `--trace` shows it.
    Disassembled(alloc::string::String),
}

impl core::fmt::Display for TrapName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TrapName::Vector(vector::SYSCALL, _) => write!(f, "SYSCALL"),
            TrapName::Vector(vector::SYSENTER, _) => write!(f, "SYSENTER"),
            TrapName::Vector(v, e) => write!(f, "{} error={e:#x}", trap::vector_name(*v)),
            TrapName::PageFault { error, cr2, store } => {
                write!(
                    f,
                    "{} error={error:#x} ({}) cr2={cr2:#x}",
                    trap::vector_name(vector::PAGE_FAULT),
                    shadow_mmu::PageFaultErrorCode::from_bits_truncate(*error as u32)
                )?;
                match store {
                    Some(store) => write!(f, ", page-table write {store}"),
                    None => Ok(()),
                }
            }
            TrapName::Instruction(name) => write!(f, "{name}"),
            TrapName::Disassembled(text) => write!(f, "{text}"),
        }
    }
}

impl Vm {
    /// After a trap: the trace line now; its cost (and with it the benchmark attribution) when
    /// it has left (`book_last_trap`), or now if the run ends with it.
    pub(super) fn account(
        &mut self,
        kind: TrapKind,
        trap_rip: u64,
        action: &Action,
        clock: PhaseClock,
    ) {
        self.unbooked = Some(clock.into_unbooked(Booked::Kind(kind), &mut self.split_pending));
        if !matches!(action, Action::Resume(_)) {
            self.book_last_trap(rdtsc());
        }
        if self.tracer.on() {
            self.trace(kind, trap_rip, action);
        } else {
            // Nothing to trace (the usual case): only the injected vector is consumed.
            self.injected = None;
        }
    }

    /// The trap's `--trace` line, if the trace takes it; then whether the guest line that starts
    /// the trace (`trace_from=`) has appeared (the trap that printed it is not traced).
    fn trace(&mut self, kind: TrapKind, trap_rip: u64, action: &Action) {
        let injected = self.injected.take();
        // A host IRQ that made no virtual interrupt deliverable is the host's own business.
        let host_only = matches!(action, Action::Resume("host IRQ")) && injected.is_none();
        let event = (!host_only).then(|| (TraceKind::of(&kind), injected.is_some()));
        let last_trap = &self.last_trap;
        let line = || {
            let then = match injected {
                Some(vector) => alloc::format!(", then interrupt {vector:#x} injected"),
                None => alloc::string::String::new(),
            };
            crate::serial::write_line(format_args!(
                "[vmm] trace: rip={trap_rip:#x} {last_trap} -> {action}{then}"
            ));
        };
        trace_event(
            &mut self.tracer,
            self.bus.com1().sink(),
            event,
            "traps",
            line,
        );
    }

    /// After a trap the fast lane finished (no trace: the lane is off while trace lines
    /// remain): booked when it has left.
    pub(super) fn account_fast_lane(&mut self, lane: LaneInstruction, clock: PhaseClock) {
        self.unbooked = Some(clock.into_unbooked(Booked::Lane(lane), &mut self.split_pending));
    }

    /// Books the last trap, which left at `left` (the exit stamp, or now when the run ends):
    /// its cost in the trap table, then the benchmark attribution. Called when the next trap
    /// begins — nothing the guest ran in between changed the console, which only traps do.
    pub(super) fn book_last_trap(&mut self, left: u64) {
        let Some(Unbooked { booked, base }) = self.unbooked.take() else {
            return;
        };
        match booked {
            Booked::Kind(kind) => self.accounting.record(kind, left.wrapping_sub(base)),
            Booked::Split(kind) => {
                // The way back after the last mark is "exit"; the fixed instructions outside
                // the stamps are charged to "entry" and "exit" (as entry, all of them).
                let SplitPending {
                    mut phases,
                    last,
                    unstamped,
                } = self.split_pending;
                phases[Phase::Exit as usize] += left.saturating_sub(last);
                phases[Phase::EntryStub as usize] += unstamped;
                self.accounting.record_phases(kind, &phases);
            }
            Booked::Lane(lane) => {
                if let Some(row) = self.lane_rows.get_mut(lane.index()) {
                    self.accounting.record_in(row, left.wrapping_sub(base));
                }
            }
        }
        self.note_guest_lines();
    }

    /// `book_last_trap` at the start of a trap: the last one left at its exit stamp.
    pub(super) fn book_trap_before(&mut self) {
        if self.unbooked.is_some() {
            // SAFETY: a plain read of a quadword only trap_exit writes, with interrupts off.
            let left = unsafe { core::ptr::addr_of!(trap_exit_tsc).read_volatile() };
            self.book_last_trap(left);
        }
    }

    /// After a trap is booked: the benchmark attribution (`BenchAttribution`), with the
    /// CLI/STI stub's traps counted in.
    pub(super) fn note_guest_lines(&mut self) {
        let accounting = &self.accounting;
        self.bench.note(self.bus.com1_mut().sink_mut(), || {
            let totals = accounting.totals();
            let (cli, sti, fast_cost) = cli_sti_stub::counts();
            (totals.count() + cli + sti, totals.total() + fast_cost)
        });
    }
}

/// The benchmark harness: the guest prints `bench,<op>,...` right after each op, so the traps
/// (and their cost) between the end of its previous console line and the first byte of that one
/// belong to the op — its setup, its loop, the formatting of its result, not the printing of any
/// line. Reported as `bench-traps` lines at exit; the same for both backends (under
/// `backend=svm` the "traps" are exits).
#[derive(Debug, Default)]
pub(super) struct BenchAttribution {
    mark: BenchMark,
    /// (op, traps, cost) for each `bench,` line so far.
    ops: alloc::vec::Vec<(alloc::string::String, u64, u64)>,
}

impl BenchAttribution {
    /// After a trap: `now` gives the (traps, cost) booked so far, asked only when a guest line
    /// began or ended since the last call.
    pub(super) fn note(
        &mut self,
        console: &mut super::console::GuestConsole,
        now: impl FnOnce() -> (u64, u64),
    ) {
        let (lines, begun) = (console.lines, console.lines_begun);
        let mark = self.mark;
        if lines == mark.lines && begun == mark.begun {
            return;
        }
        let now = now();
        // A line begun in this trap: the op before it ended here (a line printed whole in one
        // trap, REP OUTSB, ends its op here too).
        let line_start = if begun != mark.begun {
            now
        } else {
            mark.line_start
        };
        if lines != mark.lines {
            for op in console.take_bench_ops() {
                self.ops.push((
                    op,
                    line_start.0 - mark.line_end.0,
                    line_start.1 - mark.line_end.1,
                ));
            }
        }
        self.mark = BenchMark {
            lines,
            begun,
            line_start,
            line_end: if lines != mark.lines {
                now
            } else {
                mark.line_end
            },
        };
    }

    /// The `bench-traps,<op>,<traps>,<cost>` lines of the exit report.
    pub(super) fn report(&self) {
        for (op, traps, cost) in &self.ops {
            crate::serial::write_line(format_args!("[vmm] bench-traps,{op},{traps},{cost}"));
        }
    }
}

/// Where the benchmark harness stands in the guest's console output: the lines ended and
/// begun so far, and the (trap count, cost) when the current line began and the last one ended.
#[derive(Clone, Copy, Debug, Default)]
struct BenchMark {
    lines: u64,
    begun: u64,
    line_start: (u64, u64),
    line_end: (u64, u64),
}

/// One trap's (or, under `backend=svm`, one exit's) `--trace` output, the same for both
/// backends: `event` (its kind, and whether it injected an interrupt) goes through the tracer's
/// filters, and when it is traced: the start line after `trace_skip=`, `line` (which prints the
/// event itself), the limit line after the last. Then whether the guest has printed the
/// `trace_from=` marker. `what` names the events ("traps", "exits").
pub(super) fn trace_event(
    tracer: &mut Tracer,
    console: &GuestConsole,
    event: Option<(TraceKind, bool)>,
    what: &str,
    line: impl FnOnce(),
) {
    if let Some(traced) = event.and_then(|(kind, injected)| tracer.step(kind, injected)) {
        if traced.starts {
            crate::serial::write_line(format_args!(
                "[vmm] trace: {} {what} of the kinds {} skipped (trace_skip=); from here on, every one",
                tracer.skip(),
                tracer.kinds()
            ));
        }
        line();
        if traced.last {
            let limit = tracer.limit();
            crate::serial::write_line(format_args!(
                "[vmm] trace: limit reached: {limit} lines (host option trace={limit}; --append trace=N for more); no more trace lines"
            ));
        }
    }
    if tracer.waiting_for_marker() && console.marker_seen {
        tracer.marker_seen();
        crate::serial::write_line(format_args!(
            "[vmm] trace: the guest printed '{}' (trace_from=): tracing {what} of the kinds {} from here",
            console.marker.as_deref().unwrap_or_default(),
            tracer.kinds()
        ));
    }
}

/// At the end of the run: a `trace_from=` marker the guest never printed.
pub(super) fn report_unseen_marker(tracer: &Tracer, console: &GuestConsole) {
    if tracer.waiting_for_marker() {
        crate::serial::write_line(format_args!(
            "[vmm] trace: no guest line contained '{}' (trace_from=), so nothing was traced",
            console.marker.as_deref().unwrap_or_default()
        ));
    }
}
