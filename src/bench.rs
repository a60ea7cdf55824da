//! The trap-cost experiment's report: reads the serial output of the guest's `bench` mode run
//! natively and under the VMM (both shadow policies, all under `-icount shift=0`, where the TSC
//! counts retired instructions), and produces `bench/results.csv` and the markdown table of
//! `./run-qemu.sh --bench` (docs/benchmarks.md explains the method).
//!
//! Inputs, per run: the guest's `bench,<op>,<iterations>,<total>,<per_op>` lines and, under the
//! VMM, its `[vmm] bench-traps,<op>,<traps>,<vmm instructions>` lines (the traps and the
//! instructions the VMM spent between the guest's previous console line and that op's CSV line).

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One op of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BenchRow {
    /// The op's name (`cli_sti`, ...).
    pub op: String,
    /// Iterations timed.
    pub iterations: u64,
    /// Total cycles (instructions under icount), loop overhead already subtracted by the guest.
    pub total: u64,
}

impl BenchRow {
    /// Cycles per iteration, as a fraction.
    pub fn per_op(&self) -> f64 {
        self.total as f64 / self.iterations.max(1) as f64
    }
}

/// What the VMM counted for one op.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpTraps {
    /// Traps taken during the op and its setup (not the printing of any line).
    pub traps: u64,
    /// Instructions the VMM's trap handler spent on them (its own rdtsc checkpoints).
    pub vmm_cost: u64,
}

/// Everything parsed from one run's serial output.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BenchRun {
    /// The guest's rows, in order.
    pub rows: Vec<BenchRow>,
    /// The VMM's per-op trap counts (empty for a native run).
    pub traps: BTreeMap<String, OpTraps>,
}

impl BenchRun {
    /// The row of `op`.
    pub fn row(&self, op: &str) -> Option<&BenchRow> {
        self.rows.iter().find(|r| r.op == op)
    }
}

/// Parses a run's serial output. Malformed bench lines are errors (the experiment must not
/// silently drop a row).
pub fn parse_run(serial: &str) -> Result<BenchRun, String> {
    let mut run = BenchRun::default();
    for line in serial.lines().map(|l| l.trim_end_matches('\r')) {
        if let Some(rest) = line.strip_prefix("[guest] bench,") {
            let (op, n) = numbers::<3>(rest, line)?;
            run.rows.push(BenchRow {
                op,
                iterations: n[0],
                total: n[1],
            });
        } else if let Some(rest) = line.strip_prefix("[vmm] bench-traps,") {
            let (op, n) = numbers::<2>(rest, line)?;
            run.traps.insert(
                op,
                OpTraps {
                    traps: n[0],
                    vmm_cost: n[1],
                },
            );
        }
    }
    if run.rows.is_empty() {
        return Err("no bench lines in the output (did the guest run `bench`?)".to_string());
    }
    Ok(run)
}

/// Splits `<op>,<N numbers>` into the op and the numbers.
fn numbers<const N: usize>(rest: &str, line: &str) -> Result<(String, [u64; N]), String> {
    let mut fields = rest.split(',');
    let op = fields.next().unwrap_or_default().to_string();
    let mut out = [0u64; N];
    for slot in out.iter_mut() {
        let f = fields
            .next()
            .ok_or_else(|| format!("malformed line: {line}"))?;
        *slot = f
            .parse()
            .map_err(|_| format!("not a number '{f}' in: {line}"))?;
    }
    if fields.next().is_some() {
        return Err(format!("malformed line: {line}"));
    }
    Ok((op, out))
}

/// A performance goal of the VMM for one op (issue "trap-cost experiments"), judged on the
/// default policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Target {
    /// VMM instructions added per op over native, at most this many.
    ExtraAtMost(f64),
    /// VMM instructions added per op over native, and traps per op, each at most this many:
    /// a path whose cost is bounded by coalescing traps must also show the traps it saved.
    ExtraAndTrapsAtMost {
        /// Instructions per op over native.
        extra: f64,
        /// Traps per op.
        traps: f64,
    },
    /// VMM per-op over native per-op, at most this ratio.
    RatioAtMost(f64),
    /// Modelled cycles (VMM) over native cycles, at most this ratio.
    ModelledRatioAtMost(f64),
}

impl Target {
    /// The target column's text (no commas: it is also a CSV field).
    fn describe(&self) -> String {
        match self {
            Target::ExtraAtMost(n) => format!("≤ {n:.0} extra"),
            Target::ExtraAndTrapsAtMost { extra, traps } => {
                format!("≤ {extra:.0} extra and ≤ {traps:.0} traps")
            }
            Target::RatioAtMost(r) => format!("≤ {r}×"),
            Target::ModelledRatioAtMost(r) => format!("≤ {r}× modelled"),
        }
    }

    /// The most the judged VMM column may be for an op whose native cost is `native` (for a
    /// modelled target, the most the modelled cycles may be): the target's line in the chart.
    /// A trap bound is not in it (the target column says it).
    fn limit(&self, native: f64) -> f64 {
        match *self {
            Target::ExtraAtMost(extra) | Target::ExtraAndTrapsAtMost { extra, .. } => {
                native + extra
            }
            Target::RatioAtMost(ratio) | Target::ModelledRatioAtMost(ratio) => native * ratio,
        }
    }

    /// Whether the target holds for one op: `extra` instructions over native, `ratio` VMM over
    /// native, `traps` per op, `modelled_ratio` modelled cycles over native.
    fn met(&self, extra: f64, ratio: f64, traps: f64, modelled_ratio: f64) -> bool {
        match *self {
            Target::ExtraAtMost(max) => extra <= max,
            Target::ExtraAndTrapsAtMost {
                extra: max,
                traps: max_traps,
            } => extra <= max && traps <= max_traps,
            Target::RatioAtMost(max) => ratio <= max,
            Target::ModelledRatioAtMost(max) => modelled_ratio <= max,
        }
    }
}

/// The goals per op, in the words: extra instructions over native per op (a pair for
/// cli+sti, a round trip for the system calls, int3 and the yield ping-pong), and for the
/// SYSCALL path also the number of traps. Ops without a goal (`mov cr3` of the same value,
/// `pushf+popf`) are measured for comparison only.
pub fn target(op: &str) -> Option<Target> {
    Some(match op {
        "cli_sti" => Target::ExtraAtMost(80.0),
        "syscall_null_getpid" => Target::ExtraAndTrapsAtMost {
            extra: 300.0,
            traps: 3.0,
        },
        "sysenter_null_getpid" => Target::ExtraAtMost(330.0),
        "int_0x80_null_getpid" => Target::ExtraAtMost(400.0),
        "mov_cr3_switch" => Target::ExtraAtMost(100.0),
        "invlpg" => Target::ExtraAtMost(250.0),
        "in_pic_imr" | "out_pic_ocw3" => Target::ExtraAtMost(150.0),
        "rdmsr_fs_base" | "wrmsr_fs_base" => Target::ExtraAtMost(350.0),
        "int3_kernel_trap_round_trip" => Target::ExtraAtMost(700.0),
        "demand_zero_page_fault" => Target::ExtraAtMost(2500.0),
        "yield_ping_pong_round_trip" => Target::ExtraAtMost(3000.0),
        "spawn_exit_wait" => Target::ModelledRatioAtMost(6.0),
        "compute_loop_user" => Target::RatioAtMost(1.01),
        _ => return None,
    })
}

/// One line of the result table.
#[derive(Clone, Debug, PartialEq)]
pub struct ResultRow {
    /// The op.
    pub op: String,
    /// Iterations (of the native run).
    pub iterations: u64,
    /// Native cycles per op.
    pub native: f64,
    /// Per op under the VMM, flush policy.
    pub vmm_flush: f64,
    /// Per op under the VMM, cached policy.
    pub vmm_cached: f64,
    /// The policy the targets are judged on.
    pub judged: f64,
    /// judged / native.
    pub ratio: f64,
    /// Traps per op (judged policy).
    pub traps_per_op: f64,
    /// VMM instructions per trap (judged policy), from the VMM's own checkpoints.
    pub vmm_per_trap: f64,
    /// judged + traps_per_op × C: what the op would cost with a trap round trip of C cycles.
    pub modelled_cycles: f64,
    /// The goal and whether it holds.
    pub target: Option<(Target, bool)>,
}

impl ResultRow {
    /// The target column and the met column (`missed` is how a miss is written).
    fn target_cells(&self, missed: &'static str) -> (String, &'static str) {
        match &self.target {
            Some((t, ok)) => (t.describe(), if *ok { "yes" } else { missed }),
            None => (String::new(), ""),
        }
    }
}

/// Which VMM run the targets are judged on: the policy the VMM uses by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Judged {
    /// `shadow=flush`.
    Flush,
    /// `shadow=cached`.
    Cached,
}

impl Judged {
    /// The policy's name, as the host option `shadow=` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Judged::Flush => "flush",
            Judged::Cached => "cached",
        }
    }
}

/// Combines the three runs. `trap_cost` is C of the modelled-cycles column.
pub fn combine(
    native: &BenchRun,
    flush: &BenchRun,
    cached: &BenchRun,
    judged: Judged,
    trap_cost: f64,
) -> Result<Vec<ResultRow>, String> {
    let mut out = Vec::new();
    for n in &native.rows {
        let f = flush
            .row(&n.op)
            .ok_or_else(|| format!("{}: missing from the flush run", n.op))?;
        let c = cached
            .row(&n.op)
            .ok_or_else(|| format!("{}: missing from the cached run", n.op))?;
        let (jrow, jrun) = match judged {
            Judged::Flush => (f, flush),
            Judged::Cached => (c, cached),
        };
        let traps = jrun.traps.get(&n.op).copied().unwrap_or(OpTraps {
            traps: 0,
            vmm_cost: 0,
        });
        let judged_per_op = jrow.per_op();
        let traps_per_op = traps.traps as f64 / jrow.iterations.max(1) as f64;
        let vmm_per_trap = if traps.traps == 0 {
            0.0
        } else {
            traps.vmm_cost as f64 / traps.traps as f64
        };
        let native_per_op = n.per_op();
        let ratio = if native_per_op > 0.0 {
            judged_per_op / native_per_op
        } else {
            f64::INFINITY
        };
        let modelled = judged_per_op + traps_per_op * trap_cost;
        let modelled_ratio = if native_per_op > 0.0 {
            modelled / native_per_op
        } else {
            f64::INFINITY
        };
        let target = target(&n.op).map(|t| {
            let extra = judged_per_op - native_per_op;
            (t, t.met(extra, ratio, traps_per_op, modelled_ratio))
        });
        out.push(ResultRow {
            op: n.op.clone(),
            iterations: n.iterations,
            native: native_per_op,
            vmm_flush: f.per_op(),
            vmm_cached: c.per_op(),
            judged: judged_per_op,
            ratio,
            traps_per_op,
            vmm_per_trap,
            modelled_cycles: modelled,
            target,
        });
    }
    Ok(out)
}

/// What each column of `bench/results.csv` counts, for its header comment.
pub const RESULT_UNITS: &str = "native, vmm_flush, vmm_cached: instructions per op (under -icount \
shift=0 the TSC counts retired instructions); iterations: of the native run; ratio: the judged \
VMM column over native; traps_per_op: traps per op under the judged policy; \
vmm_instructions_per_trap: the VMM's own instructions per trap; modelled_cycles: cycles per op \
= the judged VMM column + traps_per_op x trap_cost; target_limit: the most the judged VMM column \
may be for the target to hold, in instructions per op (for a 'modelled' target: the most \
modelled_cycles may be)";

/// What each column of `bench/ablation.csv` counts, for its header comment.
pub const ABLATION_UNITS: &str =
    "every column but op: instructions per op under -icount shift=0, the judged policy with \
the host options the column names (default: none changed)";

/// A CSV's header comment: the run's metadata (`key=value` lines, as bench/results.meta has
/// them) and the units, each line starting with `# ` (gnuplot, pandas' `comment='#'` and
/// [`check_csv`] skip them).
pub fn csv_comment(meta: &str, units: &str) -> String {
    let mut s = String::new();
    // The sidecar's one-line `units=` gives way to the CSV's own, which names every column.
    let lines = meta.lines().map(str::trim);
    for line in lines.filter(|l| !l.is_empty() && !l.starts_with("units=")) {
        let _ = writeln!(s, "# {line}");
    }
    let _ = writeln!(s, "# units: {units}");
    s
}

/// `bench/results.csv`: `comment` (from [`csv_comment`]), a header and one line per op.
pub fn to_csv(rows: &[ResultRow], comment: &str) -> String {
    let mut s = String::from(comment);
    s.push_str(
        "op,iterations,native,vmm_flush,vmm_cached,ratio,traps_per_op,vmm_instructions_per_trap,modelled_cycles,target,target_met,target_limit\n",
    );
    for r in rows {
        let (t, ok) = r.target_cells("no");
        let limit = match &r.target {
            Some((t, _)) => format!("{:.0}", t.limit(r.native)),
            None => String::new(),
        };
        let _ = writeln!(
            s,
            "{},{},{:.1},{:.1},{:.1},{:.2},{:.2},{:.0},{:.0},{},{},{}",
            r.op,
            r.iterations,
            r.native,
            r.vmm_flush,
            r.vmm_cached,
            r.ratio,
            r.traps_per_op,
            r.vmm_per_trap,
            r.modelled_cycles,
            t,
            ok,
            limit
        );
    }
    s
}

/// The markdown table printed by `./run-qemu.sh --bench`.
pub fn to_markdown(rows: &[ResultRow], judged: Judged, trap_cost: f64) -> String {
    let mut s = String::new();
    let policy = judged.name();
    let _ = writeln!(
        s,
        "| op | native | VMM flush | VMM cached | ratio ({policy}) | traps/op | VMM instr/trap | modelled cycles (C={trap_cost:.0}) | target | met |"
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|---|---|\n");
    for r in rows {
        let (t, ok) = r.target_cells("**no**");
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {} | {} |",
            r.op,
            r.native,
            r.vmm_flush,
            r.vmm_cached,
            r.ratio,
            r.traps_per_op,
            r.vmm_per_trap,
            r.modelled_cycles,
            t,
            ok
        );
    }
    s
}

/// The default exit round-trip cost (C) of the SVM modelled column: a VM exit and entry on
/// Westmere, the newest figure of Agesen et al. (USENIX ATC'12: 3 963 cycles on Prescott, 761 on
/// Westmere); the article's own (VM entry 2 409 cycles on the Pentium 4, 937 on Core) are in
/// docs/hardware-assist.md.
pub const DEFAULT_EXIT_COST: f64 = 761.0;

/// One line of the backends table: the same op natively, under trap-and-emulate (the judged
/// policy) and under SVM (`backend=svm`).
#[derive(Clone, Debug, PartialEq)]
pub struct BackendRow {
    /// The op.
    pub op: String,
    /// Native instructions per op.
    pub native: f64,
    /// Trap-and-emulate, per op, and its traps per op.
    pub trap: f64,
    /// Traps per op under trap-and-emulate.
    pub traps_per_op: f64,
    /// SVM, per op.
    pub svm: f64,
    /// `#VMEXIT`s per op.
    pub exits_per_op: f64,
    /// trap + traps_per_op x C (trap round trip).
    pub trap_modelled: f64,
    /// svm + exits_per_op x C (exit round trip).
    pub svm_modelled: f64,
}

/// Lays the SVM run beside the trap-and-emulate one. `trap_cost` and `exit_cost` are the C of
/// each modelled column.
pub fn compare_backends(
    native: &BenchRun,
    trap: &BenchRun,
    svm: &BenchRun,
    trap_cost: f64,
    exit_cost: f64,
) -> Result<Vec<BackendRow>, String> {
    let per_op = |run: &BenchRun, op: &str, what: &str| -> Result<(f64, f64), String> {
        let row = run
            .row(op)
            .ok_or_else(|| format!("{op}: missing from the {what} run"))?;
        let traps = run.traps.get(op).map_or(0, |t| t.traps);
        Ok((row.per_op(), traps as f64 / row.iterations.max(1) as f64))
    };
    native
        .rows
        .iter()
        .map(|n| {
            let (trap_per_op, traps_per_op) = per_op(trap, &n.op, "trap-and-emulate")?;
            let (svm_per_op, exits_per_op) = per_op(svm, &n.op, "svm")?;
            Ok(BackendRow {
                op: n.op.clone(),
                native: n.per_op(),
                trap: trap_per_op,
                traps_per_op,
                svm: svm_per_op,
                exits_per_op,
                trap_modelled: trap_per_op + traps_per_op * trap_cost,
                svm_modelled: svm_per_op + exits_per_op * exit_cost,
            })
        })
        .collect()
}

/// What each column of `bench/backends.csv` counts, for its header comment.
pub const BACKEND_UNITS: &str = "native, trap, svm: instructions per op under -icount shift=0 \
(trap: trap-and-emulate, the judged policy; svm: backend=svm); traps_per_op, exits_per_op: traps \
or #VMEXITs per op; trap_modelled, svm_modelled: cycles per op = the column + traps (exits) per \
op x the trap (exit) round-trip cost";

/// `bench/backends.csv`.
pub fn backends_csv(rows: &[BackendRow], comment: &str) -> String {
    let mut s = String::from(comment);
    s.push_str("op,native,trap,traps_per_op,svm,exits_per_op,trap_modelled,svm_modelled\n");
    for r in rows {
        let _ = writeln!(
            s,
            "{},{:.1},{:.1},{:.2},{:.1},{:.2},{:.0},{:.0}",
            r.op,
            r.native,
            r.trap,
            r.traps_per_op,
            r.svm,
            r.exits_per_op,
            r.trap_modelled,
            r.svm_modelled
        );
    }
    s
}

/// The backends table printed by `./run-qemu.sh --bench`.
pub fn backends_markdown(rows: &[BackendRow], trap_cost: f64, exit_cost: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| op | native | trap-and-emulate | traps/op | SVM | exits/op | modelled, trap (C={trap_cost:.0}) | modelled, SVM (C={exit_cost:.0}) |"
    );
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0} |",
            r.op,
            r.native,
            r.trap,
            r.traps_per_op,
            r.svm,
            r.exits_per_op,
            r.trap_modelled,
            r.svm_modelled
        );
    }
    s
}

/// One ablation run: the judged policy again, with some host switches changed from their
/// defaults (`fastpath=off`), so the table can say what each default buys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ablation {
    /// The host options that differ from the default run (`fastpath=off`): the column's name.
    pub label: String,
    /// What the run printed.
    pub run: BenchRun,
}

/// One op of the ablation table, instructions per op.
#[derive(Clone, Debug, PartialEq)]
pub struct AblationRow {
    /// The op.
    pub op: String,
    /// The judged policy with every host option at its default.
    pub default: f64,
    /// The same under each ablation, in the order given.
    pub ablated: Vec<f64>,
}

/// Joins the default run of the judged policy with its ablation runs, op by op (the default
/// run's order). An op missing from an ablation run is an error, as in [`combine`]; so is a
/// label that could not be a CSV header or a markdown cell.
pub fn ablate(default: &BenchRun, ablations: &[Ablation]) -> Result<Vec<AblationRow>, String> {
    for a in ablations {
        if a.label.is_empty() || a.label.contains([',', '|', '\n']) {
            return Err(format!(
                "ablation label '{}' must be non-empty, without ',', '|' or a line break",
                a.label
            ));
        }
    }
    let mut out = Vec::new();
    for d in &default.rows {
        let mut ablated = Vec::new();
        for a in ablations {
            let row = a
                .run
                .row(&d.op)
                .ok_or_else(|| format!("{}: missing from the {} run", d.op, a.label))?;
            ablated.push(row.per_op());
        }
        out.push(AblationRow {
            op: d.op.clone(),
            default: d.per_op(),
            ablated,
        });
    }
    Ok(out)
}

/// `bench/ablation.csv`: `comment` (from [`csv_comment`]), then `op,default` and one column per
/// ablation named by its label; every value in instructions per op.
pub fn ablation_csv(ablations: &[Ablation], rows: &[AblationRow], comment: &str) -> String {
    let mut s = String::from(comment);
    s.push_str("op,default");
    for a in ablations {
        s.push(',');
        s.push_str(&a.label);
    }
    s.push('\n');
    for r in rows {
        let _ = write!(s, "{},{:.1}", r.op, r.default);
        for v in &r.ablated {
            let _ = write!(s, ",{v:.1}");
        }
        s.push('\n');
    }
    s
}

/// The ablation table printed after the results: per op the default, and per ablation its
/// cost and what the default buys over it (ablated − default, and that as a share of the
/// ablated cost; negative when the default is the slower one).
pub fn ablation_markdown(judged: Judged, ablations: &[Ablation], rows: &[AblationRow]) -> String {
    let mut s = format!(
        "Ablation ({} policy, instructions per op):\n\n| op | default |",
        judged.name()
    );
    let mut rule = String::from("|---|---:|");
    for a in ablations {
        let _ = write!(s, " {0} | what the default buys vs {0} |", a.label);
        rule.push_str("---:|---:|");
    }
    let _ = writeln!(s, "\n{rule}");
    for r in rows {
        let _ = write!(s, "| {} | {:.0} |", r.op, r.default);
        for &v in &r.ablated {
            let buys = v - r.default;
            if v > 0.0 {
                let _ = write!(s, " {v:.0} | {buys:.0} ({:.0}%) |", 100.0 * buys / v);
            } else {
                let _ = write!(s, " {v:.0} | {buys:.0} |");
            }
        }
        s.push('\n');
    }
    s
}

/// Checks a CSV produced by [`to_csv`]: the header comment skipped, the header, and every line
/// with the same number of fields, numbers where numbers belong.
pub fn check_csv(csv: &str) -> Result<usize, String> {
    let mut lines = csv.lines().skip_while(|l| l.starts_with('#'));
    let header = lines.next().ok_or("empty CSV")?;
    let columns = header.split(',').count();
    let mut n = 0;
    for line in lines {
        let f: Vec<&str> = line.split(',').collect();
        if f.len() != columns {
            return Err(format!("{} fields, expected {columns}: {line}", f.len()));
        }
        for (i, v) in f.iter().enumerate().skip(1).take(8) {
            v.parse::<f64>()
                .map_err(|_| format!("column {i} is not a number: {line}"))?;
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NATIVE: &str =
        "[guest] bench,cli_sti,1000,2000,2\r\n[guest] bench,compute_loop_user,1000,4000,4\n";
    const VMM: &str =
        "[guest] bench,cli_sti,1000,1002000,1002\n[guest] bench,compute_loop_user,1000,4040,4\n\
[vmm] bench-traps,cli_sti,2010,900000\n[vmm] bench-traps,compute_loop_user,3,3000\n";

    #[test]
    fn parses_guest_and_vmm_lines() {
        let r = parse_run(VMM).unwrap();
        assert_eq!(r.rows.len(), 2);
        assert_eq!(r.row("cli_sti").unwrap().total, 1_002_000);
        assert_eq!(
            r.traps["cli_sti"],
            OpTraps {
                traps: 2010,
                vmm_cost: 900_000
            }
        );
    }

    #[test]
    fn a_malformed_line_is_an_error() {
        assert!(parse_run("[guest] bench,cli_sti,x,1,1\n").is_err());
        assert!(parse_run("[vmm] nothing here\n").is_err());
    }

    #[test]
    fn combines_runs_into_ratios_traps_and_targets() {
        let n = parse_run(NATIVE).unwrap();
        let v = parse_run(VMM).unwrap();
        let rows = combine(&n, &v, &v, Judged::Flush, 700.0).unwrap();
        let cli = &rows[0];
        assert_eq!(cli.native, 2.0);
        assert!((cli.traps_per_op - 2.01).abs() < 1e-9);
        assert!((cli.vmm_per_trap - 900_000.0 / 2010.0).abs() < 1e-9);
        assert!((cli.modelled_cycles - (1002.0 + 2.01 * 700.0)).abs() < 1e-9);
        assert_eq!(cli.target, Some((Target::ExtraAtMost(80.0), false)));
        let compute = &rows[1];
        assert!((compute.ratio - 1.01).abs() < 1e-9);
        assert_eq!(compute.target, Some((Target::RatioAtMost(1.01), true)));
        let meta = "commit=abc1234\nqemu=QEMU 7.2\nunits=instructions per op\n";
        let comment = csv_comment(meta, RESULT_UNITS);
        let csv = to_csv(&rows, &comment);
        assert!(csv.starts_with("# commit=abc1234\n# qemu=QEMU 7.2\n# units: native, "));
        assert_eq!(check_csv(&csv), Ok(2));
        // The target's limit: native + 80 for cli_sti, native × 1.01 for the compute loop.
        assert!(csv.contains(",≤ 80 extra,no,82\n"), "{csv}");
        assert!(csv.contains(",≤ 1.01×,yes,4\n"), "{csv}");
        assert!(to_markdown(&rows, Judged::Flush, 700.0).contains("| cli_sti | 2 | 1002 |"));
    }

    #[test]
    fn a_missing_op_in_a_vmm_run_is_an_error() {
        let n = parse_run(NATIVE).unwrap();
        let v = parse_run("[guest] bench,cli_sti,1000,1,0\n").unwrap();
        assert!(combine(&n, &v, &v, Judged::Cached, 700.0).is_err());
    }

    #[test]
    fn a_target_with_a_trap_bound_needs_both() {
        let native = parse_run("[guest] bench,syscall_null_getpid,100,10000,100\n").unwrap();
        let judged = |traps: u64| {
            parse_run(&format!(
                "[guest] bench,syscall_null_getpid,100,35000,350\n\
                 [vmm] bench-traps,syscall_null_getpid,{traps},1000\n"
            ))
            .unwrap()
        };
        let met = |traps| {
            let v = judged(traps);
            combine(&native, &v, &v, Judged::Cached, 700.0).unwrap()[0]
                .target
                .unwrap()
                .1
        };
        // 250 instructions over native: within 300, so the trap count decides.
        assert!(met(300), "3 traps per op");
        assert!(!met(301), "more than 3 traps per op");
        let slow = parse_run("[guest] bench,syscall_null_getpid,100,45000,450\n").unwrap();
        let rows = combine(&native, &slow, &slow, Judged::Cached, 700.0).unwrap();
        assert_eq!(
            rows[0].target,
            Some((
                Target::ExtraAndTrapsAtMost {
                    extra: 300.0,
                    traps: 3.0
                },
                false
            ))
        );
        assert!(to_csv(&rows, "").contains(",≤ 300 extra and ≤ 3 traps,no,400\n"));
    }

    /// The cached run's VMM log again, with the fast paths off: cli_sti costs more.
    const FASTPATH_OFF: &str =
        "[guest] bench,cli_sti,1000,2004000,2004\n[guest] bench,compute_loop_user,1000,4040,4\n\
[vmm] bench-traps,cli_sti,4000,1900000\n";

    fn fastpath_off() -> Vec<Ablation> {
        vec![Ablation {
            label: "fastpath=off".into(),
            run: parse_run(FASTPATH_OFF).unwrap(),
        }]
    }

    #[test]
    fn ablation_joins_the_default_with_each_ablated_run() {
        let default = parse_run(VMM).unwrap();
        let ablations = fastpath_off();
        let rows = ablate(&default, &ablations).unwrap();
        assert_eq!(
            rows[0],
            AblationRow {
                op: "cli_sti".into(),
                default: 1002.0,
                ablated: vec![2004.0],
            }
        );
        let csv = ablation_csv(&ablations, &rows, &csv_comment("", ABLATION_UNITS));
        assert_eq!(
            csv,
            format!(
                "# units: {ABLATION_UNITS}\n\
                 op,default,fastpath=off\ncli_sti,1002.0,2004.0\ncompute_loop_user,4.0,4.0\n"
            )
        );
        assert_eq!(check_csv(&csv), Ok(2));
        let md = ablation_markdown(Judged::Cached, &ablations, &rows);
        assert!(md.starts_with("Ablation (cached policy, instructions per op):"));
        assert!(md.contains(
            "| op | default | fastpath=off | what the default buys vs fastpath=off |\n|---|---:|---:|---:|\n"
        ));
        assert!(
            md.contains("| cli_sti | 1002 | 2004 | 1002 (50%) |"),
            "{md}"
        );
        assert!(
            md.contains("| compute_loop_user | 4 | 4 | 0 (0%) |"),
            "{md}"
        );
    }

    #[test]
    fn ablation_rejects_a_missing_op_and_a_label_that_breaks_the_csv() {
        let default = parse_run(VMM).unwrap();
        let short = vec![Ablation {
            label: "fastpath=off".into(),
            run: parse_run("[guest] bench,cli_sti,1000,1,0\n").unwrap(),
        }];
        let err = ablate(&default, &short).unwrap_err();
        assert!(
            err.contains("compute_loop_user") && err.contains("fastpath=off"),
            "{err}"
        );
        let mut comma = fastpath_off();
        comma[0].label = "a=1,b=2".into();
        assert!(ablate(&default, &comma).is_err());
    }

    #[test]
    fn check_csv_rejects_ragged_lines() {
        assert!(check_csv("a,b\n1\n").is_err());
        assert!(check_csv("op,x,y,z,w,v,u,t,s,r\nop,1,2,3,4,5,6,7,zz,t\n").is_err());
    }
}
