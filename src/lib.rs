//! Host-side helpers for the QEMU integration tests (`tests/*.rs`).
//!
//! Every QEMU test goes through `run-qemu.sh`, the same script a person uses, so the tests also
//! check its options and its exit-status mapping. The kernels are built once per test process
//! (`cargo build --release --target x86_64-unknown-none` into `target/qemu`, a separate target
//! directory so this nested cargo never waits on the outer `cargo test`'s lock); each boot then
//! runs `run-qemu.sh --no-build`.

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

/// Builds both kernels once per test process; panics with cargo's output if that fails.
pub fn build_images() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let result = BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let out = Command::new(cargo)
            .current_dir(root())
            .args([
                "build",
                "--release",
                "--target",
                "x86_64-unknown-none",
                "--target-dir",
            ])
            .arg(root().join("target/qemu"))
            .args(["-p", "kernel", "-p", "guest-kernel"])
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    if let Err(why) = result {
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

/// A path inside the repository, for `--guest` images the tests build or ship.
pub fn repo_path(relative: &str) -> PathBuf {
    root().join(Path::new(relative))
}
