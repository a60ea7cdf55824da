//! Host-side helpers for the QEMU integration tests (`tests/*.rs`).
//!
//! Every QEMU test goes through `run-qemu.sh`, the same script a person uses, so the tests also
//! check its options and its exit-status mapping. The kernels are built once per test process
//! (`cargo build --release --target x86_64-unknown-none` into `target/qemu`, a separate target
//! directory so this nested cargo never waits on the outer `cargo test`'s lock); each boot then
//! runs `run-qemu.sh --no-build`.

pub mod bench;
pub mod chaos;
pub mod labs;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The workspace root (where run-qemu.sh lives).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The directory the bare-metal images are built into.
pub fn image_dir() -> PathBuf {
    root().join("target/qemu/x86_64-unknown-none/release")
}

/// What one run of run-qemu.sh produced.
#[derive(Debug)]
pub struct Run {
    /// run-qemu.sh's exit status (0 success, 1 guest failure, 3 host panic, 4 guest stopped,
    /// 2 anything else).
    pub status: i32,
    /// Everything QEMU's serial port printed (stdout).
    pub serial: String,
    /// run-qemu.sh's own messages (stderr).
    pub stderr: String,
}

impl Run {
    fn from_output(out: Output) -> Run {
        Run {
            status: out.status.code().unwrap_or(-1),
            serial: String::from_utf8_lossy(&out.stdout).replace('\r', ""),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The serial lines, CR removed.
    pub fn lines(&self) -> impl Iterator<Item = &str> {
        self.serial.lines()
    }

    /// True when some serial line contains `needle`.
    pub fn has_line(&self, needle: &str) -> bool {
        self.lines().any(|l| l.contains(needle))
    }

    /// Panics with the whole output unless some serial line contains `needle`.
    #[track_caller]
    pub fn expect_line(&self, needle: &str) {
        assert!(
            self.has_line(needle),
            "no serial line contains {needle:?}\n{self}"
        );
    }

    /// Panics with the whole output unless the exit status is `status`.
    #[track_caller]
    pub fn expect_status(&self, status: i32) {
        assert_eq!(self.status, status, "unexpected exit status\n{self}");
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "--- status {} ---", self.status)?;
        writeln!(f, "--- serial ---\n{}", self.serial)?;
        write!(f, "--- stderr ---\n{}", self.stderr)
    }
}

/// The one-line reason QEMU tests cannot run, if qemu-system-x86_64 is missing.
pub fn qemu_missing() -> Option<String> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|p| p.join("qemu-system-x86_64").is_file()))
        .unwrap_or(false);
    (!found).then(|| {
        "qemu-system-x86_64 is missing: install it with `sudo apt-get install -y qemu-system-x86` \
         (./run-qemu.sh does that by itself when run as root)"
            .to_string()
    })
}

/// The packages of the normal bare-metal build (run-qemu.sh builds the same).
pub const IMAGE_PACKAGES: &[&str] = &["-p", "kernel", "-p", "guest-kernel", "-p", "test-guests"];

/// `cargo build --release --target x86_64-unknown-none --target-dir <target_dir> <args>`, after
/// making sure the pinned toolchain has that target (as run-qemu.sh does: an installed toolchain
/// may lack it). `Err` holds cargo's messages.
pub fn build_bare_metal(target_dir: &Path, args: &[&str]) -> Result<(), String> {
    let installed = Command::new("rustup")
        .current_dir(root())
        .args(["target", "list", "--installed"])
        .output();
    if let Ok(out) = installed {
        if !String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == "x86_64-unknown-none")
        {
            let _ = Command::new("rustup")
                .current_dir(root())
                .args(["target", "add", "x86_64-unknown-none"])
                .status();
        }
    }
    let out = cargo()
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-none",
            "--target-dir",
        ])
        .arg(target_dir)
        .args(args)
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A `cargo` command in the workspace root (the cargo that runs us, if any).
pub fn cargo() -> Command {
    let mut command = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command.current_dir(root());
    command
}

/// Builds both kernels and the test guests once per process (the normal build, into
/// `target/qemu`); `Err` holds cargo's messages.
pub fn try_build_images() -> Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build_bare_metal(&root().join("target/qemu"), IMAGE_PACKAGES))
        .clone()
}

/// Builds both kernels once per test process; panics with cargo's output if that fails.
pub fn build_images() {
    if let Err(why) = try_build_images() {
        panic!("building the kernels failed:\n{why}");
    }
}

/// Runs `run-qemu.sh` with `args` (without building; call [`build_images`] first, or use
/// [`boot`]).
pub fn run_script(args: &[&str]) -> Run {
    let out = Command::new(root().join("run-qemu.sh"))
        .current_dir(root())
        .args(args)
        .output()
        .expect("cannot run run-qemu.sh");
    Run::from_output(out)
}

/// Builds the images if needed, then boots QEMU through `run-qemu.sh --no-build` with `args`.
/// Fails the test with one line saying how to install QEMU when it is missing.
pub fn boot(args: &[&str]) -> Run {
    if let Some(why) = qemu_missing() {
        panic!("{why}");
    }
    build_images();
    let mut all = vec!["--no-build"];
    all.extend_from_slice(args);
    run_script(&all)
}

/// Like [`boot`], with `input` written to QEMU's standard input (the serial port's receive side),
/// then end-of-file.
pub fn boot_with_input(args: &[&str], input: &[u8]) -> Run {
    use std::io::Write;
    use std::process::Stdio;
    if let Some(why) = qemu_missing() {
        panic!("{why}");
    }
    build_images();
    let mut child = Command::new(root().join("run-qemu.sh"))
        .current_dir(root())
        .arg("--no-build")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run run-qemu.sh");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).expect("cannot write QEMU's input");
    }
    Run::from_output(
        child
            .wait_with_output()
            .expect("run-qemu.sh did not finish"),
    )
}

/// A path inside the repository, for `--guest` images the tests build or ship.
pub fn repo_path(relative: &str) -> PathBuf {
    root().join(Path::new(relative))
}

/// One line of guest output that the equivalence test compares: a selftest check
/// (`[guest] check <name>: <result>`) or a probe (`probe,<name>,<value>`), keyed by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The check's or probe's name.
    pub name: String,
    /// What it reported.
    pub value: String,
}

/// Extracts the observations from a run's serial output, in order.
pub fn observations(serial: &str) -> Vec<Observation> {
    let mut out = Vec::new();
    for line in serial.lines() {
        let line = line.trim_end_matches('\r');
        let Some(rest) = line.strip_prefix("[guest] ") else {
            continue;
        };
        if let Some(check) = rest.strip_prefix("check ") {
            if let Some((name, value)) = check.split_once(": ") {
                out.push(Observation {
                    name: name.to_string(),
                    value: value.to_string(),
                });
            }
        } else if let Some(probe) = rest.strip_prefix("probe,") {
            if let Some((name, value)) = probe.split_once(',') {
                out.push(Observation {
                    name: name.to_string(),
                    value: value.to_string(),
                });
            }
        }
    }
    out
}

/// Every other line the guest prints: the `[guest]` lines that are neither a check nor a probe
/// (what its user programs print, the kills they suffer with their fault and error code, the
/// summary). The native run is deterministic, so the equivalence tests require these to be
/// identical under the VMM, in order: no line of them is known to differ legitimately.
pub fn other_guest_lines(serial: &str) -> Vec<String> {
    serial
        .lines()
        .map(|line| line.trim_end_matches('\r'))
        .filter(|line| line.starts_with("[guest] ") && observations(line).is_empty())
        .map(str::to_string)
        .collect()
}

/// Compares the native run's [`other_guest_lines`] with the VMM's: the first difference, if
/// any, as a problem line.
pub fn compare_other_guest_lines(native: &[String], vmm: &[String]) -> Option<String> {
    let differ = native.iter().zip(vmm).position(|(n, v)| n != v);
    match differ {
        Some(i) => Some(format!(
            "guest line {} differs:\n  native: {}\n  vmm:    {}",
            i + 1,
            native[i],
            vmm[i]
        )),
        None if native.len() != vmm.len() => Some(format!(
            "the guest printed {} other lines natively but {} under the VMM",
            native.len(),
            vmm.len()
        )),
        None => None,
    }
}

/// A known virtualization hole: an observation that differs between native and VMM runs, with
/// the reason, from `docs/virtualization-holes.md`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hole {
    /// The observation's name.
    pub name: String,
    /// Why it differs (for messages).
    pub why: String,
    /// The values the table documents, (native, under the VMM), when it gives both: a run
    /// where the hole takes other values fails, so a hole cannot take any wrong value.
    pub values: Option<(String, String)>,
}

/// Parses the holes table of `docs/virtualization-holes.md` for one backend (`trap` or `svm`):
/// rows `| name | backends | line | why | how |` after the header row, the name in backticks,
/// the backends a comma-separated list; only the rows whose list names `backend`. The line
/// cell reads `` `probe,<name>,<vmm value>` (native `<value>`) `` (or a `check <name>: <value>`
/// line): those are the hole's documented values.
pub fn parse_holes(markdown: &str, backend: &str) -> Vec<Hole> {
    let mut holes = Vec::new();
    for line in markdown.lines() {
        let cells: Vec<&str> = line
            .trim()
            .trim_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        if cells.len() < 5 || !line.trim_start().starts_with('|') {
            continue;
        }
        let name = cells[0].trim_matches('`');
        if name.is_empty() || name == "name" || name.starts_with('-') {
            continue;
        }
        if !cells[1].split(',').any(|b| b.trim() == backend) {
            continue;
        }
        holes.push(Hole {
            name: name.to_string(),
            why: cells[3].to_string(),
            values: documented_values(name, cells[2]),
        });
    }
    holes
}

/// The (native, VMM) values of the holes table's line cell for the observation `name`:
/// `` `probe,<name>,<vmm>` (native `<native>`) ``; `None` when the cell does not read so.
fn documented_values(name: &str, cell: &str) -> Option<(String, String)> {
    // The text between backticks: the line under the VMM first, then the native value.
    let quoted: Vec<&str> = cell.split('`').skip(1).step_by(2).collect();
    let [line, native, ..] = quoted[..] else {
        return None;
    };
    let observed = observations(&format!("[guest] {line}"));
    match &observed[..] {
        [o] if o.name == name => Some((native.to_string(), o.value.clone())),
        _ => None,
    }
}

/// Compares native and VMM observations. Every difference must be a listed hole, with the
/// values the list documents for it when it documents them, and every listed hole that appears
/// in these runs must still differ (so the list stays true). Returns the problems, one line each.
pub fn compare_observations(
    native: &[Observation],
    vmm: &[Observation],
    holes: &[Hole],
) -> Vec<String> {
    let mut problems = Vec::new();
    let names = |obs: &[Observation]| obs.iter().map(|o| o.name.clone()).collect::<Vec<_>>();
    if names(native) != names(vmm) {
        problems.push(format!(
            "different observations, or a different order:\n  native: {:?}\n  vmm:    {:?}",
            names(native),
            names(vmm)
        ));
        return problems;
    }
    for (n, v) in native.iter().zip(vmm) {
        let hole = holes.iter().find(|h| h.name == n.name);
        match (n.value == v.value, hole) {
            (true, None) => {}
            (false, Some(h)) => match &h.values {
                Some((native, vmm)) if (native, vmm) != (&n.value, &v.value) => {
                    problems.push(format!(
                        "{}: native '{}' and under the VMM '{}', but docs/virtualization-holes.md \
                         documents native '{native}' and '{vmm}' under the VMM",
                        n.name, n.value, v.value
                    ))
                }
                _ => {}
            },
            (false, None) => problems.push(format!(
                "{}: native '{}' but under the VMM '{}' (not a listed virtualization hole)",
                n.name, n.value, v.value
            )),
            (true, Some(h)) => problems.push(format!(
                "{}: listed as a virtualization hole ({}) but native and VMM agree ('{}'): \
                 remove it from docs/virtualization-holes.md",
                n.name, h.why, n.value
            )),
        }
    }
    problems
}

/// The path of a built test guest (`tests/guests/src/bin/<name>.rs`, dashes in the name).
pub fn test_guest(name: &str) -> String {
    image_dir().join(name).to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NATIVE: &str =
        "[guest] check timer: ok\n[guest] probe,cs_rpl,0\n[vmm] x\n[guest] probe,cpuid_hv,0\n";

    #[test]
    fn observations_are_extracted_in_order() {
        let obs = observations(NATIVE);
        let names: Vec<_> = obs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["timer", "cs_rpl", "cpuid_hv"]);
        assert_eq!(obs[0].value, "ok");
        assert_eq!(obs[1].value, "0");
    }

    #[test]
    fn other_guest_lines_are_compared_in_order() {
        let native = format!("{NATIVE}[guest] pid 9 killed: page fault at 0x0 (error 0x15)\n");
        let lines = other_guest_lines(&native);
        assert_eq!(
            lines,
            ["[guest] pid 9 killed: page fault at 0x0 (error 0x15)"]
        );
        assert_eq!(compare_other_guest_lines(&lines, &lines), None);
        let vmm = other_guest_lines(&native.replace("0x15", "0x5"));
        let problem = compare_other_guest_lines(&lines, &vmm).unwrap();
        assert!(problem.contains("(error 0x5)"), "{problem}");
        assert!(compare_other_guest_lines(&lines, &[]).is_some());
    }

    #[test]
    fn holes_table_is_parsed() {
        let md = "intro\n\n| name | backends | probe line | why | how to close |\n|---|---|---|---|---|\n| `cs_rpl` | trap | `probe,cs_rpl,3` (native `0`) | ring aliasing | patch |\n| `cpuid` | svm, trap | `probe,cpuid,1` | signature | none |\n";
        let hole = |name: &str, why: &str, values: Option<(&str, &str)>| Hole {
            name: name.into(),
            why: why.into(),
            values: values.map(|(n, v)| (n.into(), v.into())),
        };
        assert_eq!(
            parse_holes(md, "trap"),
            vec![
                hole("cs_rpl", "ring aliasing", Some(("0", "3"))),
                hole("cpuid", "signature", None)
            ]
        );
        assert_eq!(
            parse_holes(md, "svm"),
            vec![hole("cpuid", "signature", None)]
        );
    }

    #[test]
    fn differences_must_be_listed_and_listed_holes_must_show() {
        let native = observations(NATIVE);
        let vmm = observations(
            &NATIVE
                .replace("cs_rpl,0", "cs_rpl,3")
                .replace("cpuid_hv,0", "cpuid_hv,1"),
        );
        let hole = |n: &str| Hole {
            name: n.into(),
            why: "w".into(),
            values: None,
        };
        assert!(compare_observations(&native, &native, &[]).is_empty());
        let p = compare_observations(&native, &vmm, &[hole("cs_rpl")]);
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("cpuid_hv: native '0' but under the VMM '1'"));
        assert!(
            compare_observations(&native, &vmm, &[hole("cs_rpl"), hole("cpuid_hv")]).is_empty()
        );
        let stale = compare_observations(&native, &native, &[hole("cs_rpl")]);
        assert_eq!(stale.len(), 1);
        assert!(stale[0].contains("remove it"));
        // A listed hole with documented values must take them.
        let documented = |native: &str, vmm: &str| Hole {
            values: Some((native.into(), vmm.into())),
            ..hole("cs_rpl")
        };
        let both = |h: Hole| compare_observations(&native, &vmm, &[h, hole("cpuid_hv")]);
        assert!(both(documented("0", "3")).is_empty());
        let wrong = both(documented("0", "1"));
        assert_eq!(wrong.len(), 1, "{wrong:?}");
        assert!(wrong[0].contains("documents native '0' and '1' under the VMM"));
        assert_eq!(both(documented("2", "3")).len(), 1);
        let shorter = observations("[guest] check timer: ok\n");
        assert_eq!(compare_observations(&native, &shorter, &[]).len(), 1);
    }
}
