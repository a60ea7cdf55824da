//! QEMU boots of the guest kernel with `--trace` narrowed: by trap kind (`--trace=KINDS`), from a
//! guest console marker (`trace_from=`), after skipped traps (`trace_skip=`), up to the limit
//! (`trace=N`), and the errors for kinds that do not exist.

use trapvmm::{boot, Run};

/// The `[vmm] trace: rip=...` lines: one per traced trap (not the lines about the trace).
fn trap_lines(run: &Run) -> Vec<&str> {
    run.lines()
        .filter(|l| l.starts_with("[vmm] trace: rip="))
        .collect()
}

/// The line number of the first line containing `needle`.
#[track_caller]
fn position(run: &Run, needle: &str) -> usize {
    run.lines()
        .position(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line contains {needle:?}\n{run}"))
}

#[test]
fn only_the_chosen_trap_kinds_are_traced_up_to_the_limit() {
    let run = boot(&[
        "--timeout",
        "60",
        "--trace=pf,cr3,syscall",
        "--append",
        "trace=400",
    ]);
    run.expect_status(0);
    let lines = trap_lines(&run);
    assert_eq!(lines.len(), 400, "trace=400 prints 400 lines\n{run}");
    // Each kind by the words of its line: a #PF with its error code in words and CR2, a MOV CR3,
    // a forwarded SYSCALL/SYSENTER, an INT n gate or a SYSRETQ/SYSEXITQ (alone or coalesced).
    let is_pf = |l: &str| l.contains(" #PF page fault error=0x") && l.contains(") cr2=0x");
    let is_cr3 = |l: &str| l.contains(" mov cr3,");
    const SYSCALL_WORDS: [&str; 7] = [
        " SYSCALL -> ",
        " SYSENTER -> ",
        " int 80h ",
        " sysretq",
        " sysexitq",
        "SYSRETQ) -> ",
        "SYSEXITQ) -> ",
    ];
    let is_syscall = |l: &str| SYSCALL_WORDS.iter().any(|w| l.contains(w));
    for line in &lines {
        assert!(
            is_pf(line) || is_cr3(line) || is_syscall(line),
            "{line:?} is none of pf, cr3, syscall\n{run}"
        );
    }
    for (kind, is) in [("pf", &is_pf as &dyn Fn(&str) -> bool), ("cr3", &is_cr3)] {
        assert!(lines.iter().any(|l| is(l)), "no {kind} line\n{run}");
    }
    assert!(
        lines.iter().any(|l| is_syscall(l)),
        "no syscall line\n{run}"
    );
    assert!(
        !run.has_line(" out dx,al") && !run.has_line(" in al,dx"),
        "port I/O was not chosen\n{run}"
    );
    // After the last line, one saying the limit is reached.
    let all: Vec<&str> = run.lines().collect();
    let last = all
        .iter()
        .rposition(|l| l.starts_with("[vmm] trace: rip="))
        .unwrap();
    let limit = position(
        &run,
        "[vmm] trace: limit reached: 400 lines (host option trace=400",
    );
    assert_eq!(limit, last + 1, "{run}");
}

#[test]
fn the_trace_starts_at_the_guest_marker_after_the_skipped_traps() {
    let run = boot(&[
        "--timeout",
        "60",
        "--trace=cr3",
        "--append",
        "trace=5 trace_skip=2 trace_from=user-hello:",
    ]);
    run.expect_status(0);
    let marker = position(&run, "[guest] check user-hello: ok");
    let starts = position(
        &run,
        "[vmm] trace: the guest printed 'user-hello:' (trace_from=): tracing traps of the kinds cr3 from here",
    );
    let skipped = position(
        &run,
        "[vmm] trace: 2 traps of the kinds cr3 skipped (trace_skip=); from here on, every one",
    );
    let lines = trap_lines(&run);
    assert_eq!(lines.len(), 5, "{run}");
    let first = position(&run, lines[0]);
    assert!(
        marker < starts && starts < skipped && skipped < first,
        "{run}"
    );
    assert!(lines.iter().all(|l| l.contains(" mov cr3,")), "{run}");
    run.expect_line("[vmm] trace: limit reached: 5 lines");
}

#[test]
fn a_marker_the_guest_never_prints_is_reported() {
    let run = boot(&[
        "--timeout",
        "60",
        "--trace",
        "--append",
        "trace_from=no-such-line",
    ]);
    run.expect_status(0);
    assert!(trap_lines(&run).is_empty(), "{run}");
    run.expect_line(
        "[vmm] trace: no guest line contained 'no-such-line' (trace_from=), so nothing was traced",
    );
}

#[test]
fn an_unknown_trace_kind_is_an_error_listing_the_kinds() {
    let run = boot(&["--timeout", "60", "--trace=pf,serial"]);
    run.expect_status(2);
    run.expect_line(
        "[vmm] error: unknown trace kind 'serial' in trace_kinds=; trace kinds: pf cr3 syscall io irq exception insn (or all)",
    );
    let run = boot(&["--timeout", "60", "--trace="]);
    run.expect_status(2);
    assert!(
        run.stderr
            .contains("--trace= needs trace kinds: pf cr3 syscall io irq exception insn"),
        "{run}"
    );
}
