//! `bench-report`: turns the serial logs of the trap-cost experiment into `bench/results.csv` and
//! a markdown table (run by `bench/run.sh`, i.e. `./run-qemu.sh --bench`). Each `--ablation`
//! lays the judged policy's default run beside the same policy with host switches changed
//! (`fastpath=off`), to show what each default buys: a second table, and with `--ablation-csv`
//! a CSV of op, default, one column per ablation.
//!
//! With `--meta FILE` (bench/results.meta, `key=value` lines) both CSVs start with that
//! metadata and their units as `# ` comment lines.
//!
//! With `--svm LOG` (the same bench under `backend=svm`) a third table lays the two backends
//! side by side, traps and exits per op with a modelled column each (`--exit-cost C`, default
//! [`DEFAULT_EXIT_COST`]), and `--backends-csv OUT` writes it.
//!
//! usage: bench-report NATIVE.log FLUSH.log CACHED.log --judged flush|cached --trap-cost C
//!        --csv OUT [--meta FILE] [--ablation OPTIONS LOG]... [--ablation-csv OUT]
//!        [--svm LOG [--exit-cost C] [--backends-csv OUT]]

use std::process::ExitCode;
use trapvmm::bench::{
    ablate, ablation_csv, ablation_markdown, backends_csv, backends_markdown, combine,
    compare_backends, csv_comment, parse_run, to_csv, to_markdown, Ablation, BenchRun, Judged,
    ABLATION_UNITS, BACKEND_UNITS, DEFAULT_EXIT_COST, RESULT_UNITS,
};

fn usage(why: &str) -> ExitCode {
    eprintln!("bench-report: {why}");
    eprintln!(
        "usage: bench-report NATIVE.log FLUSH.log CACHED.log --judged flush|cached --trap-cost C --csv OUT \
         [--meta FILE] [--ablation OPTIONS LOG]... [--ablation-csv OUT] \
         [--svm LOG [--exit-cost C] [--backends-csv OUT]]"
    );
    ExitCode::from(2)
}

/// Reads and parses one run's log.
fn read_run(path: &str) -> Result<BenchRun, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    parse_run(&text).map_err(|e| format!("{path}: {e}"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut files = Vec::new();
    let (mut judged, mut trap_cost, mut csv_path) = (Judged::Flush, 700.0, None);
    // (host options of the run, its log), in the order given: the table's column order.
    let mut ablation_logs: Vec<(String, String)> = Vec::new();
    let mut ablation_csv_path = None;
    let mut meta = String::new();
    let (mut svm_log, mut exit_cost, mut backends_csv_path) = (None, DEFAULT_EXIT_COST, None);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--judged" => match it.next().map(String::as_str) {
                Some("flush") => judged = Judged::Flush,
                Some("cached") => judged = Judged::Cached,
                _ => return usage("--judged needs flush or cached"),
            },
            "--trap-cost" => match it.next().and_then(|v| v.parse::<f64>().ok()) {
                Some(c) if c >= 0.0 => trap_cost = c,
                _ => return usage("--trap-cost needs a non-negative number"),
            },
            "--csv" => match it.next() {
                Some(p) => csv_path = Some(p.clone()),
                None => return usage("--csv needs a path"),
            },
            // Two values rather than OPTIONS=LOG: the options themselves contain '='.
            "--ablation" => match (it.next(), it.next()) {
                (Some(options), Some(log)) => ablation_logs.push((options.clone(), log.clone())),
                _ => return usage("--ablation needs the run's host options and its log"),
            },
            "--meta" => match it.next().map(std::fs::read_to_string) {
                Some(Ok(text)) => meta = text,
                Some(Err(e)) => return usage(&format!("cannot read the --meta file: {e}")),
                None => return usage("--meta needs a path"),
            },
            "--ablation-csv" => match it.next() {
                Some(p) => ablation_csv_path = Some(p.clone()),
                None => return usage("--ablation-csv needs a path"),
            },
            "--svm" => match it.next() {
                Some(p) => svm_log = Some(p.clone()),
                None => return usage("--svm needs the backend=svm run's log"),
            },
            "--exit-cost" => match it.next().and_then(|v| v.parse::<f64>().ok()) {
                Some(c) if c >= 0.0 => exit_cost = c,
                _ => return usage("--exit-cost needs a non-negative number"),
            },
            "--backends-csv" => match it.next() {
                Some(p) => backends_csv_path = Some(p.clone()),
                None => return usage("--backends-csv needs a path"),
            },
            s if s.starts_with("--") => return usage(&format!("unknown option '{s}'")),
            file => files.push(file.to_string()),
        }
    }
    let [native, flush, cached] = files.as_slice() else {
        return usage("three log files are needed: native, flush, cached");
    };
    let mut runs = Vec::new();
    for path in [native, flush, cached] {
        match read_run(path) {
            Ok(r) => runs.push(r),
            Err(e) => return usage(&e),
        }
    }
    let mut ablations = Vec::new();
    for (label, path) in ablation_logs {
        match read_run(&path) {
            Ok(run) => ablations.push(Ablation { label, run }),
            Err(e) => return usage(&e),
        }
    }
    let rows = match combine(&runs[0], &runs[1], &runs[2], judged, trap_cost) {
        Ok(r) => r,
        Err(e) => return usage(&e),
    };
    // The ablations change host switches of the judged policy, so they compare with its run.
    let default = match judged {
        Judged::Flush => &runs[1],
        Judged::Cached => &runs[2],
    };
    let ablation_rows = match ablate(default, &ablations) {
        Ok(r) => r,
        Err(e) => return usage(&e),
    };
    if let Some(path) = csv_path {
        if let Err(e) = std::fs::write(&path, to_csv(&rows, &csv_comment(&meta, RESULT_UNITS))) {
            return usage(&format!("cannot write {path}: {e}"));
        }
    }
    if let Some(path) = ablation_csv_path {
        let comment = csv_comment(&meta, ABLATION_UNITS);
        if let Err(e) = std::fs::write(&path, ablation_csv(&ablations, &ablation_rows, &comment)) {
            return usage(&format!("cannot write {path}: {e}"));
        }
    }
    print!("{}", to_markdown(&rows, judged, trap_cost));
    if !ablations.is_empty() {
        print!(
            "\n{}",
            ablation_markdown(judged, &ablations, &ablation_rows)
        );
    }
    if let Some(path) = svm_log {
        let svm = match read_run(&path) {
            Ok(run) => run,
            Err(e) => return usage(&e),
        };
        let backends = match compare_backends(&runs[0], default, &svm, trap_cost, exit_cost) {
            Ok(rows) => rows,
            Err(e) => return usage(&e),
        };
        if let Some(out) = backends_csv_path {
            let comment = csv_comment(&meta, BACKEND_UNITS);
            if let Err(e) = std::fs::write(&out, backends_csv(&backends, &comment)) {
                return usage(&format!("cannot write {out}: {e}"));
            }
        }
        print!("\n{}", backends_markdown(&backends, trap_cost, exit_cost));
    }
    ExitCode::SUCCESS
}
