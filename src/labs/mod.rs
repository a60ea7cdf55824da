//! The teaching labs' grader (docs/labs/README.md): `./run-qemu.sh --lab N` runs
//! `src/bin/grade.rs`, which calls [`grade`] here.
//!
//! A lab is one entry of the catalogue ([`catalog::LABS`]): the student's file under `labs/`,
//! the cargo arguments that build the VMM (or a guest) with it, and its checks — host unit tests
//! of the student's functions and QEMU boots, each boot with a function that reads the run. The
//! same checks run against the student's code or the reference implementation ([`Code`]); each
//! prints one line, `name ..... OK` or `FAIL (why)`, and the report ends with `Score: k/n`.
//!
//! Where things are built:
//! - the reference is the normal build (`target/qemu`, as run-qemu.sh and the tests build it);
//! - the student's code is built into `target/lab`, one target directory shared by every lab
//!   (so the dependencies are compiled once), and the images the lab grades are copied from
//!   there into `target/lab/graded/labN/` before anything boots them, one lab at a time, so two
//!   labs graded at once (the tests do) never boot each other's images;
//! - host unit tests run with `cargo test --target-dir target/lab`, with the lab's feature for
//!   the student's code, without it for the reference.

pub mod catalog;
mod lab7;

use crate::{root, try_build_images, Run};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

pub use catalog::LABS;

/// One teaching lab.
#[derive(Debug)]
pub struct Lab {
    /// Its number (`--lab N`).
    pub number: u32,
    /// Its title.
    pub title: &'static str,
    /// Its document (task, hints, what is checked).
    pub doc: &'static str,
    /// The student's file.
    pub student_file: &'static str,
    /// The `cargo build` arguments (packages and features) that build the student's code for
    /// bare metal, into `target/lab`.
    pub build: &'static [&'static str],
    /// The host kernel the boots run.
    pub kernel: Image,
    /// Host unit tests of the student's functions, if any.
    pub host_tests: Option<HostTests>,
    /// QEMU boots.
    pub boots: &'static [Boot],
    /// Checks of the lab's own, after the boots, for what one boot cannot show (lab 7: a
    /// report the student writes, against three runs of the student's code).
    pub own_checks: Option<OwnChecks>,
}

/// A lab's own checks ([`Lab::own_checks`]).
#[derive(Debug)]
pub struct OwnChecks {
    /// The graded images they boot, copied out of `target/lab` as the boots' images are.
    pub images: &'static [Image],
    /// Runs them for `code`, with the images once built (`None` when the build failed: each
    /// check then says so). Always the same checks, by name, whatever happens.
    pub run: fn(Code, Option<&Images>) -> Vec<Check>,
}

/// A bare-metal image a boot uses.
#[derive(Clone, Copy, Debug)]
pub enum Image {
    /// The normal build's image of this name, whichever code is graded.
    Normal(&'static str),
    /// The student's build of `student` when the student's code is graded, the normal build's
    /// `reference` when the reference is.
    Graded {
        /// Its name in the student's build (`target/lab`).
        student: &'static str,
        /// Its name in the normal build (`target/qemu`).
        reference: &'static str,
    },
}

/// Host unit tests run by name: `cargo test -p <package> --lib [--features <feature>] --
/// --exact <module>::<test>...`.
#[derive(Debug)]
pub struct HostTests {
    /// The package they are in.
    pub package: &'static str,
    /// The feature that swaps the student's code in.
    pub feature: &'static str,
    /// Their module path inside the package's library; empty when the names are whole paths
    /// (tests in more than one module).
    pub module: &'static str,
    /// Their names: the rubric. Each is one check.
    pub tests: &'static [&'static str],
}

impl HostTests {
    /// The test's path in libtest's output.
    fn path(&self, name: &str) -> String {
        if self.module.is_empty() {
            name.to_string()
        } else {
            format!("{}::{name}", self.module)
        }
    }
}

/// One QEMU boot and what it must show.
#[derive(Debug)]
pub struct Boot {
    /// The guest image.
    pub guest: Image,
    /// More run-qemu.sh arguments (`--trace=...`, `--append ...`, `-- guest words`).
    pub args: &'static [&'static str],
    /// Seconds before QEMU is stopped.
    pub timeout_s: u32,
    /// What the run must show, each one check.
    pub checks: &'static [BootCheck],
}

/// One thing a boot must show.
#[derive(Debug)]
pub struct BootCheck {
    /// The check's name.
    pub name: &'static str,
    /// Reads the run: `Err` says what is wrong.
    pub expect: fn(&Run) -> Result<(), String>,
}

impl Image {
    /// Its name in the check lines (the student's name of a graded image).
    fn name(self) -> &'static str {
        match self {
            Image::Normal(name) | Image::Graded { student: name, .. } => name,
        }
    }
}

/// Whose code is graded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Code {
    /// The student's file under `labs/`.
    Student,
    /// The reference implementation (the normal build).
    Reference,
}

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// `Err(why)` when it failed.
    pub result: Result<(), String>,
    /// Lines to show under the check (a build's error messages).
    pub details: Vec<String>,
}

impl Check {
    fn new(name: impl Into<String>, result: Result<(), String>) -> Check {
        Check {
            name: name.into(),
            result,
            details: Vec::new(),
        }
    }

    /// `name ...... OK` or `name ...... FAIL (why)`, make-grade style.
    pub fn line(&self) -> String {
        const WIDTH: usize = 72;
        let dots = ".".repeat(WIDTH.saturating_sub(self.name.len() + 2).max(3));
        match &self.result {
            Ok(()) => format!("{} {dots} OK", self.name),
            Err(why) => format!("{} {dots} FAIL ({why})", self.name),
        }
    }
}

/// Every check of one grading run.
#[derive(Debug)]
pub struct Report {
    /// The checks, in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// How many passed.
    pub fn passed(&self) -> usize {
        self.checks.iter().filter(|c| c.result.is_ok()).count()
    }

    /// Whether every check passed.
    pub fn all_passed(&self) -> bool {
        self.passed() == self.checks.len()
    }

    /// `Score: k/n`.
    pub fn score(&self) -> String {
        format!("Score: {}/{}", self.passed(), self.checks.len())
    }
}

/// The lab numbered `number`.
pub fn find(number: u32) -> Option<&'static Lab> {
    LABS.iter().find(|lab| lab.number == number)
}

/// The labs, one line each, for a usage message.
pub fn list() -> String {
    LABS.iter()
        .map(|lab| {
            format!(
                "  {:>2}  {:<36} {:<34} {}\n",
                lab.number, lab.title, lab.student_file, lab.doc
            )
        })
        .collect()
}

/// Runs every check of `lab` against `code`, calling `progress` as each one ends.
pub fn grade(lab: &Lab, code: Code, progress: &mut dyn FnMut(&Check)) -> Report {
    let mut checks = Vec::new();
    let mut done = |check: Check, checks: &mut Vec<Check>| {
        progress(&check);
        checks.push(check);
    };
    let images = build(lab, code);
    let build_name = match code {
        Code::Student => format!("build: {}", lab.student_file),
        Code::Reference => "build: the reference (the normal build)".to_string(),
    };
    done(
        build_check(build_name, images.as_ref().map(|_| ())),
        &mut checks,
    );

    if let Some(tests) = &lab.host_tests {
        for check in host_tests(tests, code) {
            done(check, &mut checks);
        }
    }
    for boot in lab.boots {
        let run = match &images {
            Ok(images) => run_boot(boot, images),
            Err(_) => Err("not run: the build failed".to_string()),
        };
        for check in boot.checks {
            let name = format!("boot {}: {}", boot.guest.name(), check.name);
            let result = match &run {
                Ok(run) => (check.expect)(run),
                Err(why) => Err(why.clone()),
            };
            done(Check::new(name, result), &mut checks);
        }
    }
    if let Some(own) = &lab.own_checks {
        for check in (own.run)(code, images.as_ref().ok()) {
            done(check, &mut checks);
        }
    }
    Report { checks }
}

/// The build check: cargo's error messages go under it.
fn build_check(name: String, result: Result<(), &String>) -> Check {
    match result {
        Ok(()) => Check::new(name, Ok(())),
        Err(messages) => Check {
            name,
            result: Err("cargo build failed; its errors are below".to_string()),
            details: compiler_errors(messages),
        },
    }
}

/// The error lines of cargo's output and what follows each (at most 60 lines).
fn compiler_errors(messages: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_error = false;
    for line in messages.lines() {
        if line.starts_with("error") {
            in_error = true;
        } else if line.starts_with("warning") {
            in_error = false;
        }
        if in_error {
            out.push(line.to_string());
        }
    }
    if out.is_empty() {
        out = messages.lines().map(str::to_string).collect();
    }
    out.truncate(60);
    out
}

/// Where the images the boots use are, once built.
#[derive(Debug)]
pub struct Images {
    kernel: PathBuf,
    graded_dir: Option<PathBuf>,
}

impl Images {
    /// The file of `image`: the student's build of a graded image when the student's code is
    /// graded, the normal build's otherwise.
    pub fn path(&self, image: Image) -> PathBuf {
        match (image, &self.graded_dir) {
            (Image::Normal(name), _)
            | (
                Image::Graded {
                    reference: name, ..
                },
                None,
            ) => crate::image_dir().join(name),
            (Image::Graded { student, .. }, Some(dir)) => dir.join(student),
        }
    }
}

/// The normal build and, for the student's code, the lab's own build into `target/lab`, whose
/// graded images are then copied into `target/lab/graded/labN/`.
fn build(lab: &Lab, code: Code) -> Result<Images, String> {
    try_build_images()?;
    let graded_dir = match code {
        Code::Reference => None,
        Code::Student => Some(build_student(lab)?),
    };
    let mut images = Images {
        kernel: PathBuf::new(),
        graded_dir,
    };
    images.kernel = images.path(lab.kernel);
    Ok(images)
}

/// Builds the student's code and copies the images it graded out of the shared target directory.
fn build_student(lab: &Lab) -> Result<PathBuf, String> {
    // target/lab is shared by every lab: one build and copy at a time, so a lab never copies
    // an image another lab's build just overwrote.
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let target_dir = root().join("target/lab");
    crate::build_bare_metal(&target_dir, lab.build)?;
    let built = target_dir.join("x86_64-unknown-none/release");
    let graded = target_dir.join(format!("graded/lab{}", lab.number));
    std::fs::create_dir_all(&graded).map_err(|e| format!("{}: {e}", graded.display()))?;
    let own_images = lab.own_checks.as_ref().map_or(&[][..], |own| own.images);
    let mut names: Vec<&str> = lab
        .boots
        .iter()
        .map(|b| b.guest)
        .chain(own_images.iter().copied())
        .chain([lab.kernel])
        .filter_map(|image| match image {
            Image::Graded { student, .. } => Some(student),
            Image::Normal(_) => None,
        })
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        let (from, to) = (built.join(name), graded.join(name));
        std::fs::copy(&from, &to).map_err(|e| format!("{}: {e}", from.display()))?;
    }
    Ok(graded)
}

/// Runs the lab's host unit tests; one check per test of the rubric.
fn host_tests(tests: &HostTests, code: Code) -> Vec<Check> {
    let mut command = crate::cargo();
    command.args(["test", "--target-dir"]);
    command.arg(root().join("target/lab"));
    command.args(["-p", tests.package, "--lib"]);
    if code == Code::Student {
        command.args(["--features", tests.feature]);
    }
    // A failure's message, not the backtrace a caller's RUST_BACKTRACE would add.
    command.env("RUST_BACKTRACE", "0");
    command.args(["--", "--exact"]);
    command.args(tests.tests.iter().map(|t| tests.path(t)));
    let results = match command.output() {
        Ok(out) => parse_test_output(&String::from_utf8_lossy(&out.stdout)),
        Err(e) => BTreeMap::from([(String::new(), Err(format!("cannot run cargo: {e}")))]),
    };
    let ran = !results.is_empty();
    let mut checks: Vec<Check> = tests
        .tests
        .iter()
        .map(|name| {
            let path = tests.path(name);
            let result = match results.get(&path) {
                Some(result) => result.clone(),
                None if ran => Err("did not run: no such test".to_string()),
                None => Err("did not run: the host tests did not build".to_string()),
            };
            Check::new(format!("host test: {name}"), result)
        })
        .collect();
    // A test the filter ran that the rubric does not list (a prefix of another name) is a
    // mistake in the catalogue, not a check.
    for path in results.keys() {
        if !tests.tests.iter().any(|t| tests.path(t) == *path) {
            checks.push(Check::new(
                format!("host test: {path}"),
                Err("ran but is not in the lab's rubric (src/labs/catalog.rs)".to_string()),
            ));
        }
    }
    checks
}

/// The outcome of each test in libtest's output: `test <path> ... ok|FAILED`, and for a failure
/// the panic message from its `---- <path> stdout ----` section.
pub fn parse_test_output(stdout: &str) -> BTreeMap<String, Result<(), String>> {
    let mut results = BTreeMap::new();
    for line in stdout.lines() {
        let Some(rest) = line.strip_prefix("test ") else {
            continue;
        };
        if let Some(path) = rest.strip_suffix(" ... ok") {
            results.insert(path.to_string(), Ok(()));
        } else if let Some(path) = rest.strip_suffix(" ... FAILED") {
            results.insert(path.to_string(), Err("failed".to_string()));
        }
    }
    // The failures' messages: in each `---- <path> stdout ----` section, the lines after
    // "panicked at <where>:" up to the "note:" line (or the next section).
    let mut section: Option<(&str, &str, Vec<&str>)> = None;
    let mut finish = |section: Option<(&str, &str, Vec<&str>)>| {
        let Some((path, place, message)) = section else {
            return;
        };
        if let Some(result @ Err(_)) = results.get_mut(path) {
            let mut why = message.join("; ");
            if !place.is_empty() {
                why = format!("{why} at {}", repository_path(place));
            }
            *result = Err(shorten(&why, 240));
        }
    };
    for line in stdout.lines() {
        if let Some(path) = line
            .strip_prefix("---- ")
            .and_then(|l| l.strip_suffix(" stdout ----"))
        {
            finish(section.take());
            section = Some((path, "", Vec::new()));
        } else if line.starts_with("note: ") || line == "failures:" || line == "stack backtrace:" {
            finish(section.take());
        } else if let Some((_, place, message)) = section.as_mut() {
            if let Some((_, at)) = line.split_once("panicked at ") {
                *place = at.trim_end_matches(':');
            } else if !place.is_empty() && !line.trim().is_empty() {
                message.push(line.trim());
            }
        }
    }
    finish(section);
    results
}

/// A source location as the student sees the file: `vmm-core/src/../../labs/x.rs:3:5` (how a
/// `#[path]` module's location reads) is `labs/x.rs:3:5`.
fn repository_path(place: &str) -> &str {
    match place.rfind("/../../") {
        Some(at) => &place[at + "/../../".len()..],
        None => place,
    }
}

/// `text` cut to `max` characters.
fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_string()
    } else {
        let cut: String = text.chars().take(max).collect();
        format!("{cut}...")
    }
}

/// Boots the lab's kernel with the boot's guest through run-qemu.sh.
fn run_boot(boot: &Boot, images: &Images) -> Result<Run, String> {
    images.boot(Host::Vmm, boot.guest, boot.timeout_s, boot.args)
}

/// What a boot runs the guest on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// The lab's kernel: the VMM (its `backend=` from the arguments).
    Vmm,
    /// Bare QEMU (`--native`).
    Native,
}

impl Images {
    /// Boots `guest` on `host` through run-qemu.sh with `args` after the image options.
    pub fn boot(
        &self,
        host: Host,
        guest: Image,
        timeout_s: u32,
        args: &[&str],
    ) -> Result<Run, String> {
        if let Some(why) = crate::qemu_missing() {
            return Err(why);
        }
        let mut words = vec!["--no-build".to_string()];
        match host {
            Host::Vmm => words.extend([
                "--kernel".to_string(),
                self.kernel.to_string_lossy().into_owned(),
            ]),
            Host::Native => words.push("--native".to_string()),
        }
        words.extend([
            "--guest".to_string(),
            self.path(guest).to_string_lossy().into_owned(),
            "--timeout".to_string(),
            timeout_s.to_string(),
        ]);
        words.extend(args.iter().map(|a| a.to_string()));
        let words: Vec<&str> = words.iter().map(String::as_str).collect();
        Ok(crate::run_script(&words))
    }
}

/// How a run ended, in one line: the exit status and the line that explains it.
pub fn outcome(run: &Run) -> String {
    let line_after = |prefix: &str| {
        run.lines().find_map(|l| {
            l.find(prefix)
                .map(|at| l[at + prefix.len()..].trim().to_string())
        })
    };
    match run.status {
        0 => "the guest exited with success".to_string(),
        1 => {
            let last_guest = run
                .lines()
                .filter(|l| l.starts_with("[guest]"))
                .last()
                .unwrap_or("no guest output");
            format!("the guest reported failure; its last line: {last_guest}")
        }
        3 => {
            // `[vmm] PANIC: panicked at <where>:` and the message on the next line.
            let mut lines = run.lines().skip_while(|l| !l.contains("PANIC: "));
            let place = lines.next().map_or("", |l| {
                let after = &l[l.find("PANIC: ").map_or(0, |at| at + "PANIC: ".len())..];
                after
                    .trim_start_matches("panicked at ")
                    .trim_end_matches(':')
            });
            let message = lines.next().unwrap_or("no panic message").trim();
            format!("host panic: {message} at {}", repository_path(place))
        }
        4 => format!(
            "the VMM stopped the guest: {}",
            line_after("guest stopped: ").unwrap_or_default()
        ),
        _ => {
            let why = line_after("[vmm] error: ")
                .or_else(|| run.stderr.lines().last().map(str::to_string))
                .unwrap_or_default();
            format!("exit status {}: {why}", run.status)
        }
    }
}

/// `Ok` when the run exited with `status` (run-qemu.sh's: 0 success, 1 guest failure, 3 host
/// panic, 4 stopped by the VMM, 2 anything else); otherwise what happened instead.
pub fn exited_with(run: &Run, status: i32) -> Result<(), String> {
    if run.status == status {
        Ok(())
    } else {
        Err(outcome(run))
    }
}

/// `Ok` when some serial line contains each of `needles`; otherwise the first one missing.
pub fn printed(run: &Run, needles: &[&str]) -> Result<(), String> {
    match needles.iter().find(|n| !run.has_line(n)) {
        None => Ok(()),
        Some(missing) if run.status == 0 => Err(format!("no line says '{missing}'")),
        Some(missing) => Err(format!("{}; no line says '{missing}'", outcome(run))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIBTEST: &str = "
running 4 tests
test cpu::tests::a ... ok
test cpu::tests::b ... FAILED
test cpu::tests::c ... FAILED
test cpu::tests::d ... FAILED

failures:

---- cpu::tests::b stdout ----

thread 'cpu::tests::b' panicked at vmm-core/src/../../labs/lab2_virtual_if.rs:40:5:
not yet implemented: lab 2: cli_sti
note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace

---- cpu::tests::c stdout ----

thread 'cpu::tests::c' panicked at vmm-core/src/cpu/tests.rs:250:5:
assertion `left == right` failed: IF kept
  left: 512
 right: 0

---- cpu::tests::d stdout ----

thread 'cpu::tests::d' (4242) panicked at vmm-core/src/cpu/tests.rs:309:5:
assertion `left == right` failed
  left: None
 right: Some(4097)


failures:
    cpu::tests::b
    cpu::tests::c
    cpu::tests::d

test result: FAILED. 1 passed; 3 failed; 0 ignored; 0 measured; 240 filtered out
";

    #[test]
    fn libtest_output_gives_each_test_and_its_panic_message() {
        let results = parse_test_output(LIBTEST);
        assert_eq!(results.len(), 4);
        assert_eq!(results["cpu::tests::a"], Ok(()));
        assert_eq!(
            results["cpu::tests::b"],
            Err("not yet implemented: lab 2: cli_sti at labs/lab2_virtual_if.rs:40:5".into())
        );
        assert_eq!(
            repository_path("vmm-core/src/../../labs/lab2_virtual_if.rs:36:5"),
            "labs/lab2_virtual_if.rs:36:5"
        );
        assert_eq!(
            results["cpu::tests::c"],
            Err("assertion `left == right` failed: IF kept; left: 512; right: 0 at vmm-core/src/cpu/tests.rs:250:5".into())
        );
        // The "note:" line comes after the first failure only.
        assert_eq!(
            results["cpu::tests::d"],
            Err("assertion `left == right` failed; left: None; right: Some(4097) at vmm-core/src/cpu/tests.rs:309:5".into())
        );
    }

    #[test]
    fn a_check_is_one_line_with_dots_and_the_score_counts_passes() {
        let ok = Check::new("build: labs/lab2_virtual_if.rs", Ok(()));
        let fail = Check::new("host test: x", Err("why".into()));
        assert!(ok.line().starts_with("build: labs/lab2_virtual_if.rs ...."));
        assert!(ok.line().ends_with(" OK"));
        assert_eq!(
            ok.line().len(),
            72 + "OK".len(),
            "the result starts at column 72"
        );
        assert!(fail.line().ends_with(" FAIL (why)"));
        let report = Report {
            checks: vec![ok, fail],
        };
        assert_eq!(report.score(), "Score: 1/2");
        assert!(!report.all_passed());
    }

    #[test]
    fn only_the_compiler_errors_are_kept_from_a_failed_build() {
        let messages = "   Compiling vmm-core\nwarning: unused\n  --> a.rs:1\nerror[E0308]: mismatched types\n  --> labs/lab2_virtual_if.rs:3:5\nerror: could not compile `vmm-core`\n";
        assert_eq!(
            compiler_errors(messages),
            [
                "error[E0308]: mismatched types",
                "  --> labs/lab2_virtual_if.rs:3:5",
                "error: could not compile `vmm-core`"
            ]
        );
    }

    #[test]
    fn every_lab_has_its_student_file_and_document_and_a_unique_number() {
        let mut numbers: Vec<u32> = LABS.iter().map(|l| l.number).collect();
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), LABS.len());
        for lab in LABS {
            assert!(
                root().join(lab.student_file).is_file(),
                "{}",
                lab.student_file
            );
            assert!(root().join(lab.doc).is_file(), "{}", lab.doc);
            assert!(find(lab.number).is_some());
            assert!(list().contains(lab.student_file));
        }
    }
}
