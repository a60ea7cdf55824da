//! The trap trace (`--trace`): which traps get a line, and when the trace starts and stops.
//!
//! The kernel prints one `[vmm] trace:` line per trap while a trace is on; this module decides
//! which ones, so the rules are host-tested. A trap belongs to exactly one [`TraceKind`]
//! (page fault, MOV CR3, system call, port I/O, exception, any other instruction); a trap that
//! injected a virtual interrupt on its way out is also an `irq` trap. The host options are
//! `trace=N` (at most N lines), `trace_kinds=pf,cr3,...` (only these kinds), `trace_skip=N` (the
//! first N traps of those kinds print nothing) and `trace_from=MARKER` (nothing before the guest
//! prints a console line containing MARKER); see [`TraceConfig`] and [`Tracer`].

use crate::accounting::TrapKind;
use core::fmt;

/// The kinds a trace can be limited to (host option `trace_kinds=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceKind {
    /// A page fault, whatever the shadow MMU made of it (fill, reflection, page-table write).
    PageFault,
    /// MOV CR3: the guest switches address spaces (the shadow root switch).
    Cr3,
    /// The system-call path: SYSCALL and SYSENTER forwarded, INT n through a gate, SYSRETQ and
    /// SYSEXITQ (alone or coalesced with the SWAPGS before them). A SWAPGS on its own is `insn`:
    /// a guest kernel runs it on every entry from user mode, interrupts too.
    Syscall,
    /// Port I/O: IN, OUT, INS, OUTS (mostly the guest's serial console).
    Io,
    /// A virtual interrupt injected on the way out of the trap, and the host IRQ or interrupt
    /// window that made it deliverable.
    Irq,
    /// The guest's own exception (#DE, #UD, #GP of its own, ...) and INT3: delivered through its
    /// IDT.
    Exception,
    /// Every other privileged instruction emulated (HLT, IRETQ, MSRs, descriptor tables,
    /// INVLPG, the other control registers, ...).
    Insn,
}

impl TraceKind {
    /// Every kind, in the order `--help` lists them.
    pub const ALL: [TraceKind; 7] = [
        TraceKind::PageFault,
        TraceKind::Cr3,
        TraceKind::Syscall,
        TraceKind::Io,
        TraceKind::Irq,
        TraceKind::Exception,
        TraceKind::Insn,
    ];

    /// The kind's name in `trace_kinds=`.
    pub fn name(self) -> &'static str {
        match self {
            TraceKind::PageFault => "pf",
            TraceKind::Cr3 => "cr3",
            TraceKind::Syscall => "syscall",
            TraceKind::Io => "io",
            TraceKind::Irq => "irq",
            TraceKind::Exception => "exception",
            TraceKind::Insn => "insn",
        }
    }

    /// The kind of a trap as the trap table records it. Every trap has exactly one; whether it
    /// injected an interrupt (an `irq` trap as well) is the caller's to say to [`Tracer::step`].
    pub fn of(kind: &TrapKind) -> TraceKind {
        match kind {
            TrapKind::PageFault(_) => TraceKind::PageFault,
            TrapKind::SystemCall(_) => TraceKind::Syscall,
            TrapKind::Irq(_) | TrapKind::Other("interrupt window") => TraceKind::Irq,
            TrapKind::Exception(_) | TrapKind::Instruction("INT3") => TraceKind::Exception,
            TrapKind::Instruction("MOV CR3") => TraceKind::Cr3,
            TrapKind::Instruction("IN" | "OUT" | "INS" | "OUTS") => TraceKind::Io,
            TrapKind::Instruction(name)
                if name.ends_with("SYSRETQ")
                    || name.ends_with("SYSEXITQ")
                    || matches!(*name, "SYSCALL" | "SYSENTER" | "INT n") =>
            {
                TraceKind::Syscall
            }
            TrapKind::VmExit(name) if name.starts_with("NPF ") => TraceKind::PageFault,
            TrapKind::VmExit(name) if name.starts_with("IOIO ") => TraceKind::Io,
            TrapKind::VmExit(name) if name.starts_with("INTR ") || name.starts_with("VINTR ") => {
                TraceKind::Irq
            }
            TrapKind::Instruction(_) | TrapKind::Other(_) | TrapKind::VmExit(_) => TraceKind::Insn,
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// A set of [`TraceKind`]s.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceKinds(u8);

impl TraceKinds {
    /// Every kind: the trace of `--trace` without a list.
    pub const ALL: TraceKinds = TraceKinds((1 << TraceKind::ALL.len()) - 1);

    /// The kinds named in a `trace_kinds=` value: comma-separated names, or `all`. An empty
    /// name (`pf,,io`, a trailing comma) or an unknown one is an error naming it.
    pub fn parse(list: &str) -> Result<TraceKinds, &str> {
        if list == "all" {
            return Ok(TraceKinds::ALL);
        }
        let mut set = 0;
        for name in list.split(',') {
            let kind = TraceKind::ALL
                .into_iter()
                .find(|k| k.name() == name)
                .ok_or(name)?;
            set |= kind.bit();
        }
        Ok(TraceKinds(set))
    }

    /// Whether `kind` is in the set.
    pub fn contains(self, kind: TraceKind) -> bool {
        self.0 & kind.bit() != 0
    }
}

impl fmt::Debug for TraceKinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// Comma-separated names, as `trace_kinds=` takes them.
impl fmt::Display for TraceKinds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if *self == TraceKinds::ALL {
            return f.write_str("all");
        }
        let mut sep = "";
        for kind in TraceKind::ALL.into_iter().filter(|k| self.contains(*k)) {
            write!(f, "{sep}{}", kind.name())?;
            sep = ",";
        }
        Ok(())
    }
}

/// The trace's host options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceConfig<'a> {
    /// At most this many lines (`trace=N`; 0 = no trace).
    pub limit: u64,
    /// Only traps of these kinds (`trace_kinds=`).
    pub kinds: TraceKinds,
    /// The first this many traps of those kinds print nothing (`trace_skip=N`).
    pub skip: u64,
    /// Nothing before the guest prints a console line containing this (`trace_from=MARKER`).
    pub from: Option<&'a str>,
}

impl TraceConfig<'_> {
    /// The limit when `trace_kinds=`, `trace_skip=` or `trace_from=` is given without `trace=`
    /// (the same as `run-qemu.sh --trace`).
    pub const DEFAULT_LIMIT: u64 = 1000;

    /// No trace.
    pub const OFF: TraceConfig<'static> = TraceConfig {
        limit: 0,
        kinds: TraceKinds::ALL,
        skip: 0,
        from: None,
    };
}

/// What the kernel prints for one trap ([`Tracer::step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceLine {
    /// Print the line saying where the trace starts first (only with `trace_skip=`: the
    /// marker's own line is printed when the marker appears, [`Tracer::marker_seen`]).
    pub starts: bool,
    /// Print the line saying the limit is reached after it.
    pub last: bool,
}

/// The trace's state through a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tracer {
    kinds: TraceKinds,
    limit: u64,
    /// Lines still to print.
    left: u64,
    /// Traps of the chosen kinds still to pass over.
    skip_left: u64,
    /// `trace_skip=`, for the line saying where the trace starts.
    skip: u64,
    /// Skipped traps are announced when the trace starts.
    skipped_any: bool,
    /// `trace_from=` was given and its marker has not appeared yet.
    waiting_for_marker: bool,
}

impl Tracer {
    /// A trace as the host options ask.
    pub fn new(config: &TraceConfig<'_>) -> Tracer {
        Tracer {
            kinds: config.kinds,
            limit: config.limit,
            left: config.limit,
            skip_left: config.skip,
            skip: config.skip,
            skipped_any: config.skip > 0,
            waiting_for_marker: config.from.is_some(),
        }
    }

    /// Whether a later trap may still be traced: the kernel keeps its fast lane off then (every
    /// trap takes the path the trace describes).
    pub fn on(&self) -> bool {
        self.left > 0
    }

    /// Whether the next trap may be printed, so the kernel should disassemble its instruction.
    pub fn printing(&self) -> bool {
        self.left > 0 && !self.waiting_for_marker
    }

    /// Whether the trace still waits for its `trace_from=` marker.
    pub fn waiting_for_marker(&self) -> bool {
        self.waiting_for_marker && self.left > 0
    }

    /// The guest printed the marker: returns whether the trace starts now (it was waiting).
    pub fn marker_seen(&mut self) -> bool {
        core::mem::replace(&mut self.waiting_for_marker, false) && self.left > 0
    }

    /// The limit (`trace=N`), for the line saying it is reached.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The kinds traced, for the line saying where the trace starts.
    pub fn kinds(&self) -> TraceKinds {
        self.kinds
    }

    /// How many traps `trace_skip=` passes over, for the line saying where the trace starts.
    pub fn skip(&self) -> u64 {
        self.skip
    }

    /// One trap of `kind`, which injected a virtual interrupt on its way out or not: its line, or
    /// `None` if it gets none.
    pub fn step(&mut self, kind: TraceKind, injected: bool) -> Option<TraceLine> {
        let chosen = self.kinds.contains(kind) || (injected && self.kinds.contains(TraceKind::Irq));
        if !chosen || !self.printing() {
            return None;
        }
        if self.skip_left > 0 {
            self.skip_left -= 1;
            return None;
        }
        self.left -= 1;
        Some(TraceLine {
            starts: core::mem::take(&mut self.skipped_any),
            last: self.left == 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::accounting::{PageFaultOutcome, SyscallKind};
    use std::string::ToString;

    fn config(limit: u64, kinds: &str, skip: u64, from: Option<&'static str>) -> Tracer {
        Tracer::new(&TraceConfig {
            limit,
            kinds: TraceKinds::parse(kinds).unwrap(),
            skip,
            from,
        })
    }

    #[test]
    fn every_trap_has_its_kind() {
        let cases = [
            (TrapKind::PageFault(PageFaultOutcome::Fill), "pf"),
            (TrapKind::PageFault(PageFaultOutcome::EmulatedWrite), "pf"),
            (TrapKind::Instruction("MOV CR3"), "cr3"),
            (TrapKind::Instruction("MOV CR0"), "insn"),
            (TrapKind::SystemCall(SyscallKind::Syscall), "syscall"),
            (TrapKind::SystemCall(SyscallKind::Sysenter), "syscall"),
            (TrapKind::Instruction("SYSRETQ"), "syscall"),
            (TrapKind::Instruction("SYSEXITQ"), "syscall"),
            (TrapKind::Instruction("SWAPGS+SYSRETQ"), "syscall"),
            (TrapKind::Instruction("SWAPGS+SYSEXITQ"), "syscall"),
            (TrapKind::Instruction("SWAPGS"), "insn"),
            (TrapKind::Instruction("SWAPGS+IRETQ"), "insn"),
            (TrapKind::Instruction("INT n"), "syscall"),
            (TrapKind::Instruction("OUT"), "io"),
            (TrapKind::Instruction("IN"), "io"),
            (TrapKind::Instruction("OUTS"), "io"),
            (TrapKind::Instruction("INS"), "io"),
            (TrapKind::Irq(0), "irq"),
            (TrapKind::Other("interrupt window"), "irq"),
            (TrapKind::Exception(6), "exception"),
            (TrapKind::Instruction("INT3"), "exception"),
            (TrapKind::Instruction("HLT"), "insn"),
            (TrapKind::Instruction("IRETQ"), "insn"),
            (TrapKind::Instruction("WRMSR"), "insn"),
            (TrapKind::Other("stop"), "insn"),
        ];
        for (trap, name) in cases {
            assert_eq!(TraceKind::of(&trap).name(), name, "{trap}");
        }
    }

    #[test]
    fn kind_lists_parse_and_print_back() {
        assert_eq!(TraceKinds::parse("all"), Ok(TraceKinds::ALL));
        let every = TraceKind::ALL.map(TraceKind::name).join(",");
        assert_eq!(TraceKinds::parse(&every), Ok(TraceKinds::ALL));
        let some = TraceKinds::parse("syscall,cr3,pf").unwrap();
        assert!(some.contains(TraceKind::PageFault) && some.contains(TraceKind::Cr3));
        assert!(!some.contains(TraceKind::Io));
        assert_eq!(some.to_string(), "pf,cr3,syscall");
        assert_eq!(TraceKinds::ALL.to_string(), "all");
        assert_eq!(TraceKinds::parse("pf,serial"), Err("serial"));
        assert_eq!(TraceKinds::parse("pf,"), Err(""));
        assert_eq!(TraceKinds::parse(""), Err(""));
        assert_eq!(TraceKinds::parse("PF"), Err("PF"));
    }

    #[test]
    fn only_the_chosen_kinds_print_and_the_last_line_says_so() {
        let mut t = config(2, "pf,cr3", 0, None);
        assert!(t.on() && t.printing());
        assert_eq!(t.step(TraceKind::Io, false), None);
        assert_eq!(
            t.step(TraceKind::PageFault, false),
            Some(TraceLine {
                starts: false,
                last: false
            })
        );
        assert_eq!(t.step(TraceKind::Insn, false), None);
        assert_eq!(
            t.step(TraceKind::Cr3, false),
            Some(TraceLine {
                starts: false,
                last: true
            })
        );
        assert!(!t.on());
        assert_eq!(t.step(TraceKind::PageFault, false), None);
    }

    #[test]
    fn irq_takes_any_trap_that_injected() {
        let mut t = config(10, "irq", 0, None);
        assert_eq!(t.step(TraceKind::Io, false), None);
        assert!(t.step(TraceKind::Io, true).is_some());
        assert!(t.step(TraceKind::Irq, false).is_some());
        let mut t = config(10, "io", 0, None);
        assert!(t.step(TraceKind::Insn, true).is_none());
    }

    #[test]
    fn skipped_traps_are_of_the_chosen_kinds_and_the_start_is_announced_once() {
        let mut t = config(5, "pf", 2, None);
        assert_eq!(t.step(TraceKind::Io, false), None);
        assert_eq!(t.step(TraceKind::PageFault, false), None);
        assert_eq!(t.step(TraceKind::Io, false), None);
        assert_eq!(t.step(TraceKind::PageFault, false), None);
        assert_eq!(
            t.step(TraceKind::PageFault, false),
            Some(TraceLine {
                starts: true,
                last: false
            })
        );
        assert_eq!(
            t.step(TraceKind::PageFault, false).map(|l| l.starts),
            Some(false)
        );
    }

    #[test]
    fn nothing_prints_before_the_marker() {
        let mut t = config(5, "all", 1, Some("MARK"));
        assert!(t.on() && !t.printing() && t.waiting_for_marker());
        assert_eq!(t.step(TraceKind::PageFault, false), None);
        assert!(t.marker_seen());
        assert!(!t.marker_seen(), "the trace starts once");
        // The skip counts from the marker on.
        assert_eq!(t.step(TraceKind::PageFault, false), None);
        assert!(t.step(TraceKind::PageFault, false).is_some());
    }

    #[test]
    fn no_trace_stays_off() {
        let mut t = Tracer::new(&TraceConfig::OFF);
        assert!(!t.on() && !t.printing() && !t.waiting_for_marker());
        assert_eq!(t.step(TraceKind::PageFault, true), None);
        assert!(!t.marker_seen());
    }
}
