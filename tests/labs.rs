//! The teaching labs' graders (docs/labs/README.md): for every lab, the reference implementation
//! passes every check, and the shipped skeleton in `labs/` builds and fails at least one — a
//! grader that cannot fail would be a defect. They run the grader itself (`src/bin/grade.rs`),
//! as `./run-qemu.sh --lab N` does.

use std::process::Command;
use trapvmm::labs::LABS;

/// `grade <args>`: its exit status and output.
fn grade(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_grade"))
        .args(args)
        .output()
        .expect("cannot run the grader");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// The check lines of a grader's output, and its score line.
fn checks_and_score(output: &str) -> (Vec<&str>, &str) {
    let checks = output
        .lines()
        .filter(|l| l.ends_with(" OK") || l.contains(" FAIL ("))
        .collect();
    let score = output
        .lines()
        .find(|l| l.starts_with("Score: "))
        .unwrap_or("no score line");
    (checks, score)
}

fn reference_passes(number: u32) {
    let (status, output) = grade(&[&number.to_string(), "--reference"]);
    let (checks, score) = checks_and_score(&output);
    assert!(!checks.is_empty(), "no checks\n{output}");
    let n = checks.len();
    assert_eq!(score, format!("Score: {n}/{n}"), "\n{output}");
    assert_eq!(status, 0, "\n{output}");
}

fn skeleton_fails(number: u32) {
    let lab = LABS.iter().find(|l| l.number == number).unwrap();
    let (status, output) = grade(&[&number.to_string()]);
    let (checks, score) = checks_and_score(&output);
    assert!(
        checks.first().is_some_and(|c| c.ends_with(" OK")),
        "the skeleton {} must build (its first check)\n{output}",
        lab.student_file
    );
    assert!(
        checks.iter().any(|c| c.contains(" FAIL (")),
        "{} passes every check of its grader: either it is no longer the shipped skeleton \
         (restore it with `git checkout {0}`) or the grader cannot fail\n{output}",
        lab.student_file
    );
    let passed = checks.iter().filter(|c| c.ends_with(" OK")).count();
    assert_eq!(score, format!("Score: {passed}/{}", checks.len()));
    assert_eq!(status, 1, "\n{output}");
}

/// One pair of tests per lab.
macro_rules! lab {
    ($number:expr, $reference:ident, $skeleton:ident) => {
        #[test]
        fn $reference() {
            reference_passes($number);
        }

        #[test]
        fn $skeleton() {
            skeleton_fails($number);
        }
    };
}

lab!(
    1,
    lab1_the_reference_passes_its_grader,
    lab1_the_skeleton_fails_its_grader
);

lab!(
    2,
    lab2_the_reference_passes_its_grader,
    lab2_the_skeleton_fails_its_grader
);

lab!(
    3,
    lab3_the_reference_passes_its_grader,
    lab3_the_skeleton_fails_its_grader
);

lab!(
    4,
    lab4_the_reference_passes_its_grader,
    lab4_the_skeleton_fails_its_grader
);

lab!(
    5,
    lab5_the_reference_passes_its_grader,
    lab5_the_skeleton_fails_its_grader
);

lab!(
    6,
    lab6_the_reference_passes_its_grader,
    lab6_the_skeleton_fails_its_grader
);

lab!(
    7,
    lab7_the_reference_passes_its_grader,
    lab7_the_skeleton_fails_its_grader
);

#[test]
fn every_lab_is_tested_here() {
    let source = include_str!("labs.rs");
    for lab in LABS {
        assert!(
            source.contains(&format!("lab!(\n    {},", lab.number)),
            "lab {} has no lab!(...) line in tests/labs.rs",
            lab.number
        );
    }
}

#[test]
fn an_unknown_lab_lists_the_labs_and_exits_2() {
    let (status, output) = grade(&["99"]);
    assert_eq!(status, 2, "{output}");
    assert!(output.contains("there is no lab 99"), "{output}");
    for lab in LABS {
        assert!(output.contains(lab.student_file), "{output}");
    }
    let (status, output) = grade(&["two"]);
    assert_eq!(status, 2, "{output}");
    assert!(output.contains("'two' is not a lab number"), "{output}");
}
