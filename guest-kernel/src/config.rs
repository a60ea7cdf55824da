//! The guest command line: `[selftest|bench|probe] [hz=N] [iters=N] [op=NAME] [fault=kernel]
//! [gdt=LAYOUT]`.

use crate::gdt::{self, Layout};
use core::fmt;

/// The one-line usage printed with every command-line error.
pub const USAGE: &str =
    "valid modes: selftest (default), bench, probe; valid options: hz=19..10000 (timer rate, default 100), iters=1..1000000 (bench iterations, default 1000), op=NAME (bench: only this operation), fault=kernel (fault in the kernel after boot, to show the fault report), gdt=sysret|linux|low|sparse (GDT selector layout, default sysret)";

/// What the OS does after booting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The named checks, then exit 0x10 / 0x11.
    Selftest,
    /// Timed loops of privileged and ordinary operations.
    Bench,
    /// What the kernel can observe about its own privilege.
    Probe,
}

impl Mode {
    /// The word that selects it.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Selftest => "selftest",
            Mode::Bench => "bench",
            Mode::Probe => "probe",
        }
    }
}

/// The parsed command line.
#[derive(Clone, Copy, Debug)]
pub struct Config {
    /// The mode.
    pub mode: Mode,
    /// Timer interrupts per second.
    pub hz: u32,
    /// Iterations of each bench loop.
    pub iters: u64,
    /// `op=NAME`: the bench runs only this op (an index into `bench::OPS`).
    pub op: Option<usize>,
    /// `fault=kernel`: take a page fault in the kernel right after boot (the fault report and
    /// exit status 0x11 are then what the test sees).
    pub kernel_fault: bool,
    /// `gdt=<layout>`: the GDT selector layout (`gdt::LAYOUTS`).
    pub gdt: &'static Layout,
}

/// A command-line error, naming the offending word.
#[derive(Clone, Copy, Debug)]
pub enum Error<'a> {
    /// A word that is neither a mode nor a known `key=value`.
    Unknown(&'a str),
    /// A known key with a value out of range or not a number.
    BadValue(&'a str),
    /// Two modes.
    TwoModes(&'a str),
    /// `gdt=` with a name that is not a layout.
    UnknownLayout(&'a str),
    /// `op=` with a name that is not a bench op.
    UnknownOp(&'a str),
    /// `op=` without the bench mode.
    OpWithoutBench(&'a str),
}

impl fmt::Display for Error<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Unknown(w) => write!(f, "unknown mode or option '{w}'"),
            Error::BadValue(w) => write!(f, "bad value in '{w}'"),
            Error::TwoModes(w) => write!(f, "a second mode '{w}'"),
            Error::UnknownLayout(w) => {
                write!(f, "unknown GDT layout '{w}' (valid layouts:")?;
                for l in gdt::LAYOUTS {
                    write!(f, " {}", l.name)?;
                }
                write!(f, ")")
            }
            Error::UnknownOp(w) => {
                write!(f, "unknown bench op in '{w}' (valid ops: ")?;
                crate::bench::write_op_names(f)?;
                write!(f, ")")
            }
            Error::OpWithoutBench(w) => write!(f, "'{w}' is an option of the bench mode"),
        }
    }
}

impl Config {
    /// Parses the words of the guest command line.
    pub fn parse(cmdline: &str) -> Result<Config, Error<'_>> {
        let mut config = Config {
            mode: Mode::Selftest,
            hz: 100,
            iters: 1000,
            op: None,
            kernel_fault: false,
            gdt: gdt::LAYOUTS[0],
        };
        let mut mode_seen = false;
        let mut op_word = None;
        for word in cmdline.split_ascii_whitespace() {
            let mode = match word {
                "selftest" => Some(Mode::Selftest),
                "bench" => Some(Mode::Bench),
                "probe" => Some(Mode::Probe),
                _ => None,
            };
            if let Some(mode) = mode {
                if mode_seen {
                    return Err(Error::TwoModes(word));
                }
                mode_seen = true;
                config.mode = mode;
                continue;
            }
            match word.split_once('=') {
                Some(("hz", v)) => {
                    config.hz = v
                        .parse()
                        .ok()
                        .filter(|hz| (19..=10_000).contains(hz))
                        .ok_or(Error::BadValue(word))?
                }
                Some(("iters", v)) => {
                    config.iters = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=1_000_000).contains(n))
                        .ok_or(Error::BadValue(word))?
                }
                Some(("op", name)) => {
                    config.op = Some(crate::bench::op_named(name).ok_or(Error::UnknownOp(word))?);
                    op_word = Some(word);
                }
                Some(("fault", "kernel")) => config.kernel_fault = true,
                Some(("fault", _)) => return Err(Error::BadValue(word)),
                Some(("gdt", name)) => {
                    config.gdt = gdt::by_name(name).ok_or(Error::UnknownLayout(word))?
                }
                _ => return Err(Error::Unknown(word)),
            }
        }
        match op_word {
            Some(word) if config.mode != Mode::Bench => Err(Error::OpWithoutBench(word)),
            _ => Ok(config),
        }
    }
}
