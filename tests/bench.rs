//! The trap-cost experiment is repeatable: under `--icount` the guest's TSC counts retired
//! instructions, so the same short bench run twice under the VMM prints identical numbers, and
//! the report built from it is a well-formed CSV.

use trapvmm::bench::{
    ablate, ablation_csv, check_csv, combine, parse_run, to_csv, Ablation, Judged,
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
    let csv = to_csv(&rows);
    assert_eq!(check_csv(&csv), Ok(rows.len()), "{csv}");
    assert!(rows.len() >= 14, "{csv}");
    // Every op that traps under the VMM costs more than natively; the compute loop does not trap.
    let cli = rows
        .iter()
        .find(|r| r.op == "cli_sti")
        .expect("cli_sti row");
    assert!(
        cli.traps_per_op >= 2.0 && cli.judged > cli.native,
        "{cli:?}"
    );

    // The ablation table's CSV is well-formed too (the second identical run stands in for an
    // ablation run: no extra boot, and it must buy nothing).
    let same = [Ablation {
        label: "same".into(),
        run: parse_run(&second).expect("bench output"),
    }];
    let ablation = ablate(&runs[2], &same).expect("ablate");
    assert_eq!(check_csv(&ablation_csv(&same, &ablation)), Ok(rows.len()));
    assert!(ablation.iter().all(|r| r.ablated == [r.default]));
}
