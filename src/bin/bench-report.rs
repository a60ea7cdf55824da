//! `bench-report`: turns the serial logs of the trap-cost experiment into `bench/results.csv` and
//! a markdown table (run by `bench/run.sh`, i.e. `./run-qemu.sh --bench`).
//!
//! usage: bench-report NATIVE.log FLUSH.log CACHED.log --judged flush|cached --trap-cost C --csv OUT

use std::process::ExitCode;
use trapvmm::bench::{combine, parse_run, to_csv, to_markdown, Judged};

fn usage(why: &str) -> ExitCode {
    eprintln!("bench-report: {why}");
    eprintln!(
        "usage: bench-report NATIVE.log FLUSH.log CACHED.log --judged flush|cached --trap-cost C --csv OUT"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut files = Vec::new();
    let (mut judged, mut trap_cost, mut csv_path) = (Judged::Flush, 700.0, None);
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
            s if s.starts_with("--") => return usage(&format!("unknown option '{s}'")),
            file => files.push(file.to_string()),
        }
    }
    let [native, flush, cached] = files.as_slice() else {
        return usage("three log files are needed: native, flush, cached");
    };
    let mut runs = Vec::new();
    for path in [native, flush, cached] {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => return usage(&format!("cannot read {path}: {e}")),
        };
        match parse_run(&text) {
            Ok(r) => runs.push(r),
            Err(e) => return usage(&format!("{path}: {e}")),
        }
    }
    let rows = match combine(&runs[0], &runs[1], &runs[2], judged, trap_cost) {
        Ok(r) => r,
        Err(e) => return usage(&e),
    };
    if let Some(path) = csv_path {
        if let Err(e) = std::fs::write(&path, to_csv(&rows)) {
            return usage(&format!("cannot write {path}: {e}"));
        }
    }
    print!("{}", to_markdown(&rows, judged, trap_cost));
    ExitCode::SUCCESS
}
