//! The trap-cost experiment is repeatable: under `--icount` the guest's TSC counts retired
//! instructions, so the same short bench run twice under the VMM prints identical numbers, and
//! the report built from it is a well-formed CSV.

use trapvmm::bench::{
    ablate, ablation_csv, backends_csv, check_csv, combine, compare_backends, parse_run, to_csv,
    Ablation, Judged,
};
use trapvmm::boot;

fn bench(extra: &[&str]) -> String {
    let mut args = vec!["--icount", "--timeout", "300"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "bench", "iters=20"]);
    let run = boot(&args);
    run.expect_status(0);
    run.serial
}

/// The lines the experiment reads: the guest's results and the VMM's per-op trap counts.
fn measured(serial: &str) -> Vec<String> {
    serial
        .lines()
        .filter(|l| l.starts_with("[guest] bench,") || l.starts_with("[vmm] bench-traps,"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_short_bench_under_icount_is_deterministic_and_its_csv_well_formed() {
    let first = bench(&[]);
    let second = bench(&[]);
    let (a, b) = (measured(&first), measured(&second));
    assert!(
        a.len() >= 28,
        "expected bench and bench-traps lines:\n{first}"
    );
    assert_eq!(
        a, b,
        "two identical runs under --icount measured differently"
    );

    let native = bench(&["--native"]);
    let flush = bench(&["--append", "shadow=flush"]);
    let runs = [&native, &flush, &first].map(|s| parse_run(s).expect("bench output"));
    let rows = combine(&runs[0], &runs[1], &runs[2], Judged::Cached, 700.0).expect("combine");
    let csv = to_csv(&rows, "");
    assert_eq!(check_csv(&csv), Ok(rows.len()), "{csv}");
    assert!(rows.len() >= 14, "{csv}");
    // Each op's traps are its own (per-op attribution, not a running total) and the CLI/STI
    // stub's traps are counted in: the trap count per iteration is what the op's loop body
    // traps on, within half a trap (10 stray traps over 20 iterations: a timer tick, the
    // setup and formatting around the loop).
    for (op, traps_per_iteration) in [
        ("cli_sti", 2.0),
        ("pushf_popf", 0.0),
        ("in_pic_imr", 1.0),
        ("compute_loop_user", 0.0),
    ] {
        let r = rows.iter().find(|r| r.op == op).expect(op);
        assert!(
            r.traps_per_op >= traps_per_iteration && r.traps_per_op - traps_per_iteration <= 0.5,
            "{op}: {} traps per op, expected {traps_per_iteration} (+ at most 0.5): {r:?}",
            r.traps_per_op
        );
    }
    // An op that traps under the VMM costs more than natively.
    let cli = rows
        .iter()
        .find(|r| r.op == "cli_sti")
        .expect("cli_sti row");
    assert!(cli.judged > cli.native, "{cli:?}");

    // The ablation table's CSV is well-formed too (the second identical run stands in for an
    // ablation run: no extra boot, and it must buy nothing).
    let same = [Ablation {
        label: "same".into(),
        run: parse_run(&second).expect("bench output"),
    }];
    let ablation = ablate(&runs[2], &same).expect("ablate");
    assert_eq!(
        check_csv(&ablation_csv(&same, &ablation, "")),
        Ok(rows.len())
    );

    // The same bench under backend=svm, beside trap-and-emulate: CLI/STI, CR3 loads and system
    // calls no longer exit, port I/O still does.
    let svm = parse_run(&bench(&["--append", "backend=svm"])).expect("svm bench output");
    let backends = compare_backends(&runs[0], &runs[2], &svm, 700.0, 761.0).expect("backends");
    assert_eq!(check_csv(&backends_csv(&backends, "")), Ok(rows.len()));
    let row = |op: &str| backends.iter().find(|r| r.op == op).expect(op).clone();
    for op in ["cli_sti", "mov_cr3_switch", "syscall_null_getpid"] {
        let r = row(op);
        // (With 20 iterations an op's few exits outside its loop still show: a quarter.)
        assert!(
            r.traps_per_op >= 1.0 && r.exits_per_op * 4.0 < r.traps_per_op && r.svm < r.trap,
            "{r:?}"
        );
    }
    let r = row("in_pic_imr");
    assert!(r.exits_per_op >= 1.0 && r.svm > r.native, "{r:?}");
    assert!(ablation.iter().all(|r| r.ablated == [r.default]));
}

/// The trap table counts every instruction a trap costs, the entry and exit stubs included:
/// what the guest's own instruction count says the VMM added to its RDMSR loop is what the
/// table booked for the RDMSR traps of that loop (the table's one RDMSR outside the loop, the
/// kernel's own, taken at the table's minimum), within two instructions a trap. Before every
/// instruction was counted, ~40 a trap were missing.
#[test]
fn the_trap_table_accounts_for_every_instruction_of_a_trap() {
    let loop_instructions = |serial: &str| -> (u64, u64) {
        let line = serial
            .lines()
            .find_map(|l| l.strip_prefix("[guest] bench,rdmsr_fs_base,"))
            .unwrap_or_else(|| panic!("no rdmsr_fs_base result:\n{serial}"));
        let fields: Vec<u64> = line.split(',').map(|f| f.parse().unwrap()).collect();
        (fields[0], fields[1])
    };
    let vmm = bench(&[]);
    let native = bench(&["--native"]);
    let (iters, under_vmm) = loop_instructions(&vmm);
    let (_, natively) = loop_instructions(&native);
    let added_by_vmm = under_vmm - natively;
    // kind, count, total, mean, min, max
    let row: Vec<u64> = vmm
        .lines()
        .find_map(|l| l.strip_prefix("[vmm] insn RDMSR "))
        .unwrap_or_else(|| panic!("no RDMSR row in the trap table:\n{vmm}"))
        .split_whitespace()
        .map(|f| f.parse().unwrap())
        .collect();
    let (count, total, min) = (row[0], row[1], row[3]);
    assert!(count >= iters, "{vmm}");
    let booked_for_loop = total - (count - iters) * min;
    assert!(
        booked_for_loop.abs_diff(added_by_vmm) <= 2 * iters,
        "the trap table booked {booked_for_loop} instructions for the {iters} RDMSR traps of the \
         loop, the guest counted {added_by_vmm} more than natively"
    );
}

/// `-- bench op=NAME` runs that op alone (under the VMM its traps are attributed to it as in a
/// full run); an unknown NAME is an error that lists the ops.
#[test]
fn one_op_runs_alone_and_an_unknown_op_lists_them() {
    let run = boot(&["--icount", "--", "bench", "op=invlpg", "iters=20"]);
    run.expect_status(0);
    let measured = measured(&run.serial);
    assert_eq!(measured.len(), 2, "{run}");
    assert!(measured[0].starts_with("[guest] bench,invlpg,20,"), "{run}");
    assert!(
        measured[1].starts_with("[vmm] bench-traps,invlpg,"),
        "{run}"
    );

    let run = boot(&["--native", "--", "bench", "op=nope"]);
    run.expect_status(1);
    run.expect_line(
        "[guest] error: unknown bench op in 'op=nope' (valid ops: cli_sti pushf_popf mov_cr3_same_value",
    );
    run.expect_line(" spawn_exit_wait compute_loop_user); valid modes:");
}
