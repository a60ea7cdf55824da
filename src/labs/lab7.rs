//! Lab 7's own checks (docs/labs/lab7-measure-a-trap.md): the student adds a bench operation
//! for a privileged instruction (labs/lab7_new_trap.rs) and writes a short report
//! (labs/lab7_report.md) of what it costs natively, under trap-and-emulate and under
//! `backend=svm`, beside Adams & Agesen's figures. No single boot can judge that, so these
//! checks read the report, run the report's op three times with `--icount` (every figure is
//! then a count of instructions, the same in every run) and compare. Nothing here knows the
//! answer: the figures the report must give are the runs', and the published ones are
//! docs/benchmarks.md's table.

use super::{Check, Code, Host, Image, Images};
use crate::{root, Run};
use std::collections::BTreeMap;

/// The student's report.
pub const STUDENT_REPORT: &str = "labs/lab7_report.md";
/// The reference's report (its op is the normal bench's `mov cr8 (write)`).
pub const REFERENCE_REPORT: &str = "docs/labs/lab7-reference-report.md";
/// The page whose table holds the published figures, and the table's heading.
const PUBLISHED: &str = "docs/benchmarks.md";
const PUBLISHED_HEADING: &str = "## Laid beside the published figures";
/// The guest the op runs in: the student's guest kernel (the bench with the new op) or the
/// normal one.
pub const GUEST: Image = Image::Graded {
    student: "guest-kernel",
    reference: "guest-kernel",
};
/// The report's `- name: value` fields, in the order the skeleton lists them.
const FIELDS: &[&str] = &[
    "op",
    "instruction",
    "native",
    "trap-and-emulate",
    "traps per op",
    "VMM instructions per trap",
    "modelled cycles",
    "svm",
    "svm exits per op",
    "compared with",
    "Adams & Agesen native",
    "Adams & Agesen BT",
    "Adams & Agesen VT-x",
];
/// The report's free-text section, and the fewest words it must have.
const CONCLUSION: &str = "## What the comparison says";
const CONCLUSION_WORDS: usize = 40;
/// C, the cycles docs/benchmarks.md adds per trap for its modelled column.
const TRAP_COST: f64 = 700.0;
/// Seconds before a bench run is stopped.
const TIMEOUT_S: u32 = 60;

/// Every check of lab 7 after the build, always the same ones.
pub fn checks(code: Code, images: Option<&Images>) -> Vec<Check> {
    let path = match code {
        Code::Student => STUDENT_REPORT,
        Code::Reference => REFERENCE_REPORT,
    };
    let report = std::fs::read_to_string(root().join(path))
        .map_err(|e| format!("cannot read {path}: {e}"))
        .map(|text| Report::parse(&text));
    let op = report
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|r| r.op().map(str::to_string));
    let runs = Runs::of(op.as_deref().map_err(Clone::clone), images);
    let mut checks = vec![Check::new(
        format!("report: every field filled in ({path})"),
        report
            .as_ref()
            .map_err(Clone::clone)
            .and_then(Report::complete),
    )];
    for (name, run) in [
        ("native: the op runs on bare QEMU", &runs.native),
        ("trap-and-emulate: the op runs under the VMM", &runs.vmm),
        ("backend=svm: the op runs under SVM", &runs.svm),
    ] {
        checks.push(Check::new(
            format!("boot guest-kernel {name}"),
            run.as_ref().map(|_| ()).map_err(Clone::clone),
        ));
    }
    checks.push(Check::new(
        "the op traps under trap-and-emulate (a privileged instruction)",
        runs.vmm
            .as_ref()
            .map_err(|_| "no run under the VMM".to_string())
            .and_then(traps),
    ));
    let with_report = |check: fn(&Report, &Runs) -> Result<(), String>| match &report {
        Ok(report) => check(report, &runs),
        Err(why) => Err(why.clone()),
    };
    checks.push(Check::new(
        "report: native, trap-and-emulate and svm per op are the runs'",
        with_report(per_op_figures),
    ));
    checks.push(Check::new(
        "report: traps, instructions per trap, exits and modelled cycles are the runs'",
        with_report(trap_figures),
    ));
    checks.push(Check::new(
        "report: Adams & Agesen's figures for the row it compares with",
        with_report(|report, _| published_figures(report)),
    ));
    checks.push(Check::new(
        format!("report: what the comparison says (at least {CONCLUSION_WORDS} words)"),
        with_report(|report, _| conclusion(report)),
    ));
    checks
}

/// The report: its fields by lower-case name, and the words of its conclusion.
#[derive(Debug)]
struct Report {
    fields: BTreeMap<String, String>,
    conclusion_words: usize,
}

impl Report {
    /// Reads `- name: value` lines and the section under [`CONCLUSION`]; HTML comments (the
    /// skeleton's instructions) are not part of it.
    fn parse(text: &str) -> Report {
        let text = without_comments(text);
        let mut fields = BTreeMap::new();
        for line in text.lines() {
            let Some((name, value)) = line
                .trim()
                .strip_prefix("- ")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            fields.insert(name.trim().to_lowercase(), value.trim().to_string());
        }
        let conclusion_words = text
            .split_once(CONCLUSION)
            .map(|(_, after)| {
                after
                    .lines()
                    .take_while(|l| !l.starts_with('#'))
                    .flat_map(str::split_whitespace)
                    .count()
            })
            .unwrap_or(0);
        Report {
            fields,
            conclusion_words,
        }
    }

    /// The value of field `name`, if filled in.
    fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .get(&name.to_lowercase())
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    /// The field `name` as a number.
    fn number(&self, name: &str) -> Result<f64, String> {
        let value = self
            .field(name)
            .ok_or_else(|| format!("the field '{name}' is empty"))?;
        number(value).ok_or_else(|| format!("'{name}: {value}' is not a number"))
    }

    /// The op's CSV name (`bench,<op>,...`, `-- bench op=<op>`).
    fn op(&self) -> Result<&str, String> {
        match self.field("op") {
            Some(op)
                if !op.is_empty() && op.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
            {
                Ok(op)
            }
            Some(op) => Err(format!(
                "'op: {op}' is not an op's CSV name (lower case, digits and _)"
            )),
            None => Err("the report names no op (its field 'op')".to_string()),
        }
    }

    fn complete(&self) -> Result<(), String> {
        let missing: Vec<&str> = FIELDS
            .iter()
            .copied()
            .filter(|name| self.field(name).is_none())
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("empty: {}", missing.join(", ")))
        }
    }
}

/// `text` without its `<!-- ... -->` comments.
fn without_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("<!--") {
        out.push_str(&rest[..start]);
        rest = rest[start..]
            .find("-->")
            .map_or("", |end| &rest[start + end + "-->".len()..]);
    }
    out.push_str(rest);
    out
}

/// The number at the start of `value`: digits, one `.`, and spaces or commas between groups
/// of digits (`3 388`, `3,388`, `1.02 traps`).
fn number(value: &str) -> Option<f64> {
    let digits: String = value
        .trim()
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | ',' | ' ' | '\u{a0}' | '\u{202f}'))
        .filter(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    digits.parse().ok()
}

/// What one bench run of the op measured.
#[derive(Debug, Clone, Copy)]
struct Measured {
    /// The loop's iterations.
    iterations: f64,
    /// Instructions per op (`bench,<op>,<iterations>,<total>,...`: total / iterations).
    per_op: f64,
    /// Traps (exits under SVM) the VMM counted for the op, and its instructions for them
    /// (`[vmm] bench-traps,<op>,<traps>,<instructions>`); none natively.
    traps: Option<(f64, f64)>,
}

/// The three runs, each `Err(why)` when it did not run or did not measure the op.
#[derive(Debug)]
struct Runs {
    native: Result<Measured, String>,
    vmm: Result<Measured, String>,
    svm: Result<Measured, String>,
}

impl Runs {
    fn of(op: Result<&str, String>, images: Option<&Images>) -> Runs {
        let run = |host: Host, append: Option<&str>| -> Result<Measured, String> {
            let op = op.clone().map_err(|why| format!("not run: {why}"))?;
            let images = images.ok_or("not run: the build failed")?;
            let op_word = format!("op={op}");
            let mut args = vec!["--icount"];
            if let Some(append) = append {
                args.extend(["--append", append]);
            }
            args.extend(["--", "bench", &op_word]);
            let run = images.boot(host, GUEST, TIMEOUT_S, &args)?;
            measured(&run, op, host == Host::Vmm)
        };
        Runs {
            native: run(Host::Native, None),
            vmm: run(Host::Vmm, None),
            svm: run(Host::Vmm, Some("backend=svm")),
        }
    }
}

/// The op's figures in `run`, which must have ended with success.
fn measured(run: &Run, op: &str, under_vmm: bool) -> Result<Measured, String> {
    let csv = format!("bench,{op},");
    let line = run
        .lines()
        .find_map(|l| l.split_once(&csv).map(|(_, rest)| rest))
        .ok_or_else(|| {
            let unknown = run.lines().find(|l| l.contains("unknown bench op"));
            match unknown {
                Some(line) => line.trim_start_matches("[guest] ").to_string(),
                None => format!("{}; no '{csv}' line", super::outcome(run)),
            }
        })?;
    let fields: Vec<&str> = line.split(',').collect();
    let (iterations, total) = match fields[..] {
        [iterations, total, _per_op] => (iterations.parse::<f64>(), total.parse::<f64>()),
        _ => return Err(format!("the op did not measure: '{csv}{line}'")),
    };
    let (Ok(iterations), Ok(total)) = (iterations, total) else {
        return Err(format!("the op did not measure: '{csv}{line}'"));
    };
    super::exited_with(run, 0)?;
    let traps = if under_vmm {
        let prefix = format!("[vmm] bench-traps,{op},");
        let counts = run
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .ok_or_else(|| format!("no '{prefix}' line in the exit report"))?;
        let (traps, instructions) = counts
            .split_once(',')
            .and_then(|(t, i)| Some((t.parse().ok()?, i.parse().ok()?)))
            .ok_or_else(|| format!("'{prefix}{counts}' is not two numbers"))?;
        Some((traps, instructions))
    } else {
        None
    };
    Ok(Measured {
        iterations: iterations.max(1.0),
        per_op: total / iterations.max(1.0),
        traps,
    })
}

impl Measured {
    fn traps_per_op(&self) -> f64 {
        self.traps.map_or(0.0, |(traps, _)| traps / self.iterations)
    }

    fn instructions_per_trap(&self) -> f64 {
        self.traps
            .map_or(0.0, |(traps, instructions)| instructions / traps.max(1.0))
    }
}

/// A trapping instruction traps at least once per op (setup traps only add).
fn traps(vmm: &Measured) -> Result<(), String> {
    let per_op = vmm.traps_per_op();
    if per_op >= 0.9 {
        Ok(())
    } else {
        Err(format!(
            "{per_op:.2} traps per op: the instruction runs natively at real CPL 3 — not a \
             privileged instruction, or a virtualization hole (docs/virtualization-holes.md)"
        ))
    }
}

/// `Ok` when the report's `name` is `measured`, within 20% or 3 instructions (a figure
/// copied from the run, rounded any way, passes; one from another op or made up does not).
fn close(report: &Report, name: &str, measured: f64) -> Result<(), String> {
    let said = report.number(name)?;
    let slack = (measured.abs() * 0.2).max(3.0);
    if (said - measured).abs() <= slack {
        Ok(())
    } else {
        Err(format!(
            "'{name}: {said}' but the run measured {measured:.2}"
        ))
    }
}

/// The per-op figures of all three runs.
fn per_op_figures(report: &Report, runs: &Runs) -> Result<(), String> {
    for (name, run) in [
        ("native", &runs.native),
        ("trap-and-emulate", &runs.vmm),
        ("svm", &runs.svm),
    ] {
        let measured = run
            .as_ref()
            .map_err(|_| format!("no {name} run to compare with"))?;
        close(report, name, measured.per_op)?;
    }
    Ok(())
}

/// The trap counts and the modelled cycles.
fn trap_figures(report: &Report, runs: &Runs) -> Result<(), String> {
    let vmm = runs
        .vmm
        .as_ref()
        .map_err(|_| "no trap-and-emulate run to compare with".to_string())?;
    let svm = runs
        .svm
        .as_ref()
        .map_err(|_| "no svm run to compare with".to_string())?;
    let traps_per_op = vmm.traps_per_op();
    let said = report.number("traps per op")?;
    if (said - traps_per_op).abs() > 0.1 {
        return Err(format!(
            "'traps per op: {said}' but the run measured {traps_per_op:.2}"
        ));
    }
    close(
        report,
        "VMM instructions per trap",
        vmm.instructions_per_trap(),
    )?;
    close(
        report,
        "modelled cycles",
        vmm.per_op + traps_per_op * TRAP_COST,
    )?;
    let said = report.number("svm exits per op")?;
    if (said - svm.traps_per_op()).abs() > 0.1 {
        return Err(format!(
            "'svm exits per op: {said}' but the run measured {:.2}",
            svm.traps_per_op()
        ));
    }
    Ok(())
}

/// The row the report compares with, from docs/benchmarks.md, and its three figures.
fn published_figures(report: &Report) -> Result<(), String> {
    let row_name = report
        .field("compared with")
        .ok_or("the field 'compared with' is empty")?;
    let page = std::fs::read_to_string(root().join(PUBLISHED))
        .map_err(|e| format!("cannot read {PUBLISHED}: {e}"))?;
    let table = page
        .split_once(PUBLISHED_HEADING)
        .map(|(_, after)| after)
        .ok_or_else(|| format!("{PUBLISHED} has no '{PUBLISHED_HEADING}'"))?;
    let rows: Vec<Vec<&str>> = table
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    let names: Vec<&str> = rows.iter().filter_map(|r| r.first().copied()).collect();
    let row = rows
        .iter()
        .find(|r| {
            r.first()
                .is_some_and(|n| n.eq_ignore_ascii_case(row_name.trim()))
        })
        .ok_or_else(|| {
            format!(
                "'compared with: {row_name}' is not a row of the table in {PUBLISHED} (rows: {})",
                names.join(", ")
            )
        })?;
    for (column, name) in [
        (1, "Adams & Agesen native"),
        (2, "Adams & Agesen BT"),
        (3, "Adams & Agesen VT-x"),
    ] {
        let published = row.get(column).and_then(|cell| number(cell));
        let said = report.number(name)?;
        if published != Some(said) {
            return Err(format!(
                "'{name}: {said}' but {PUBLISHED} gives {} for {row_name}",
                row.get(column).copied().unwrap_or("nothing")
            ));
        }
    }
    Ok(())
}

fn conclusion(report: &Report) -> Result<(), String> {
    if report.conclusion_words >= CONCLUSION_WORDS {
        Ok(())
    } else {
        Err(format!(
            "{} words under '{CONCLUSION}'",
            report.conclusion_words
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILLED: &str = "# Lab 7 report\n<!-- fill in every field -->\n\n- op: mov_cr8_write\n\
        - instruction: mov cr8, rax\n- native: 1\n- trap-and-emulate: 1 352\n\
        - traps per op: 1.00 <!-- from bench-traps -->\n- Adams & Agesen VT-x: 15,826\n\n\
        ## What the comparison says\n<!-- at least 40 words -->\none two three\n\n## Next\nfour\n";

    #[test]
    fn the_report_is_read_field_by_field_without_its_comments() {
        let report = Report::parse(FILLED);
        assert_eq!(report.op(), Ok("mov_cr8_write"));
        assert_eq!(report.field("Instruction"), Some("mov cr8, rax"));
        assert_eq!(report.number("trap-and-emulate"), Ok(1352.0));
        assert_eq!(report.number("traps per op"), Ok(1.0));
        assert_eq!(report.number("Adams & Agesen VT-x"), Ok(15826.0));
        assert_eq!(
            report.conclusion_words, 3,
            "only the words of its own section"
        );
        let missing = report.complete().unwrap_err();
        assert!(
            missing.starts_with("empty: VMM instructions per trap"),
            "{missing}"
        );
    }

    #[test]
    fn the_skeletons_report_names_no_op_and_is_incomplete() {
        let skeleton = std::fs::read_to_string(root().join(STUDENT_REPORT)).unwrap();
        let report = Report::parse(&skeleton);
        assert!(report.op().is_err());
        assert!(report.complete().is_err());
        assert_eq!(report.conclusion_words, 0);
    }

    #[test]
    fn the_reference_report_has_every_field_and_a_published_row() {
        let text = std::fs::read_to_string(root().join(REFERENCE_REPORT)).unwrap();
        let report = Report::parse(&text);
        assert_eq!(report.complete(), Ok(()));
        assert_eq!(published_figures(&report), Ok(()));
        assert_eq!(conclusion(&report), Ok(()));
    }

    #[test]
    fn a_figure_is_the_runs_within_20_percent_or_3_instructions() {
        let report = Report::parse("- native: 2\n- svm: 700\n");
        assert_eq!(close(&report, "native", 4.9), Ok(()));
        assert!(close(&report, "native", 5.1).is_err());
        assert_eq!(close(&report, "svm", 840.0), Ok(()));
        assert!(close(&report, "svm", 900.0).is_err());
        assert!(
            close(&report, "op", 1.0).is_err(),
            "an empty field is no figure"
        );
    }

    #[test]
    fn numbers_may_group_their_digits() {
        assert_eq!(number("3 388 (native 103)"), Some(3388.0));
        assert_eq!(number("15,826"), Some(15826.0));
        assert_eq!(number("1.02 traps"), Some(1.02));
        assert_eq!(number("~650"), None);
        assert_eq!(number(""), None);
    }
}
