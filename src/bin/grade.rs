//! The teaching labs' grader: `grade N [--reference]`, what `./run-qemu.sh --lab N
//! [--reference]` runs (docs/labs/README.md). It builds the VMM with the student's code for lab
//! N (or takes the reference build), runs the lab's checks, prints one line per check and a
//! score, and exits with 0 only when every check passed (1 otherwise, 2 for bad usage).

use std::process::ExitCode;
use trapvmm::labs::{self, Code};

fn usage(problem: &str) -> ExitCode {
    eprintln!("grade: {problem}");
    eprintln!("usage: ./run-qemu.sh --lab N [--reference]   (or: grade N [--reference])");
    eprintln!("labs:");
    eprint!("{}", labs::list());
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut number = None;
    let mut code = Code::Student;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--reference" => code = Code::Reference,
            n if number.is_none() => match n.parse::<u32>() {
                Ok(n) => number = Some(n),
                Err(_) => return usage(&format!("'{n}' is not a lab number")),
            },
            other => return usage(&format!("unexpected argument '{other}'")),
        }
    }
    let Some(number) = number else {
        return usage("which lab?");
    };
    let Some(lab) = labs::find(number) else {
        return usage(&format!("there is no lab {number}"));
    };
    let whose = match code {
        Code::Student => format!("your code, {}", lab.student_file),
        Code::Reference => "the reference implementation".to_string(),
    };
    println!("lab {number}: {} ({whose}; {})", lab.title, lab.doc);
    let report = labs::grade(lab, code, &mut |check| {
        println!("{}", check.line());
        for line in &check.details {
            println!("    {line}");
        }
    });
    println!("{}", report.score());
    if report.all_passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
