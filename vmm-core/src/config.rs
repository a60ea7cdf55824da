//! The host kernel's command line: `key=value` words, then `--` and the guest's own words.
//!
//! Parsed here rather than in the kernel so the rules (valid keys, ranges, error messages) are
//! host-tested. An unknown key or a bad value is an error that names every valid key, because the
//! person who typed it is reading the serial console and has nothing else to go on.

use crate::trace::{TraceConfig, TraceKind, TraceKinds};
use core::fmt;

/// How shadow page tables are kept across guest CR3 loads (see shadow-mmu).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShadowPolicy {
    /// Drop every shadow on each CR3 load: simple, slow context switches.
    Flush,
    /// Keep shadows per guest CR3 and write-protect guest page tables.
    Cached,
}

/// How the guest is run (docs/hardware-assist.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Trap-and-emulate: the guest kernel at real Ring 3, shadow page tables.
    Trap,
    /// AMD SVM with nested paging: the guest at its own Ring 0 under VMRUN (`crate::svm`).
    Svm,
}

/// What the host does after its boot self-checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Stop after the self-checks (the host kernel on its own).
    SelfCheck,
    /// Load the guest module and run it at Ring 3.
    Guest,
}

/// A fault the host can be told to commit on purpose, to test its own failure paths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DebugAction {
    /// Nothing.
    None,
    /// Panic right after parsing the command line (tests the panic path and its exit code).
    Panic,
}

/// Everything the host command line configures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig<'a> {
    /// Host timer (PIT channel 0) rate in Hz.
    pub timer_hz: u32,
    /// Guest RAM in MiB.
    pub guest_mem_mib: u32,
    /// The trap trace: how many lines, of which kinds, from where (`trace=`, `trace_kinds=`,
    /// `trace_skip=`, `trace_from=`; see [`crate::trace`]).
    pub trace: TraceConfig<'a>,
    /// Shadow page-table policy.
    pub shadow: ShadowPolicy,
    /// Whether an emulator read that misses the shadow fills it (shadow-mmu
    /// `set_emulator_fill`); off is the reference behaviour.
    pub emulator_fill: bool,
    /// Whether each trap's cost is split into the phases of the trap path (a few `rdtsc` more
    /// per trap; the exit report then has the per-phase table).
    pub profile_phases: bool,
    /// Whether the trap fast paths are on (docs/benchmarks.md, "Fast paths"): fixed encodings
    /// for MOV CRn/INVLPG, no injection or effects pass when nothing is pending, coalesced
    /// SYSCALL+SWAPGS and SWAPGS+SYSRETQ, the CR3 root cache. Off is the reference path.
    pub fastpath: bool,
    /// Whether the shadow MMU may leave guest leaf page tables unsynced (writable to the guest
    /// until its next CR3 load, shadow-mmu `set_unsync`); off write-protects every shadowed
    /// table, the reference path.
    pub unsync: bool,
    /// Whether the shadow MMU shares shadow tables between the guest's address spaces
    /// (shadow-mmu `set_sharing`: the kernel half is built once); off gives each its own, the
    /// reference path.
    pub shadow_share: bool,
    /// Whether a shadow fill also shadows the accessed neighbours of its leaf (shadow-mmu
    /// `set_prefetch`). Off by default: measured with the bench it does not pay for this guest
    /// (a fresh page's entry has A = 0, so nothing qualifies, and the look costs every fill;
    /// docs/benchmarks.md); off is also the reference path.
    pub prefetch: bool,
    /// Whether QEMU runs with `-icount` (run-qemu.sh `--icount` says so): the TSC then counts
    /// retired instructions, so the exit report labels its costs as instructions, not cycles.
    /// It changes nothing else; the host cannot tell by itself.
    pub icount: bool,
    /// Stop the guest when it has made no progress (no trap other than timer ticks) for this many
    /// timer ticks (0 = never).
    pub watchdog_ticks: u64,
    /// A deliberate host failure for tests.
    pub debug: DebugAction,
    /// Whether to run the guest after the self-checks.
    pub mode: RunMode,
    /// Trap-and-emulate or hardware-assisted (`backend=`).
    pub backend: Backend,
    /// The guest's command line: everything after `--`, as typed.
    pub guest_cmdline: &'a str,
}

impl Default for HostConfig<'_> {
    fn default() -> Self {
        Self {
            timer_hz: 1000,
            guest_mem_mib: 32,
            trace: TraceConfig::OFF,
            // Chosen from the trap-cost experiment (docs/benchmarks.md): cached shadows make
            // context switches ~7x cheaper (no rebuild on every CR3 load) and cost about the
            // same as flush for the self-test's process churn.
            shadow: ShadowPolicy::Cached,
            // Measured with the trap-cost experiment (docs/benchmarks.md): descriptor reads of
            // IRETQ and interrupt delivery stop walking the guest's tables.
            emulator_fill: true,
            profile_phases: false,
            fastpath: true,
            unsync: true,
            shadow_share: true,
            prefetch: false,
            icount: false,
            watchdog_ticks: 10_000,
            debug: DebugAction::None,
            // The VMM's job: run the guest module (after the host's own self-checks).
            mode: RunMode::Guest,
            backend: Backend::Trap,
            guest_cmdline: "",
        }
    }
}

/// The keys [`HostConfig::parse`] accepts, with their syntax, for error messages and docs.
pub const VALID_KEYS: &str =
    "timer_hz=<19..10000> mem=<4..3072 MiB> trace=<N> trace_kinds=<kind,...|all> \
trace_skip=<N> trace_from=<guest console text> shadow=flush|cached \
emulator_fill=on|off profile=phases|off fastpath=on|off unsync=on|off shadow_share=on|off prefetch=on|off icount=on|off watchdog=<ticks, 0=off> debug=none|panic(test hook: forced host panic) mode=selfcheck|guest backend=trap|svm";

/// Why a host command line was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError<'a> {
    /// A word that is not `key=value` (and not `--`).
    NotKeyValue(&'a str),
    /// A key this VMM does not know.
    UnknownKey(&'a str),
    /// A known key with a value out of range or of the wrong form.
    BadValue {
        /// The key.
        key: &'a str,
        /// The value given.
        value: &'a str,
    },
    /// A name in `trace_kinds=` that is not a trace kind (empty if the list has an empty item).
    UnknownTraceKind(&'a str),
}

impl fmt::Display for ConfigError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotKeyValue(w) => write!(f, "'{w}' is not key=value"),
            Self::UnknownKey(k) => write!(f, "unknown key '{k}'"),
            Self::BadValue { key, value } => write!(f, "bad value '{value}' for '{key}'"),
            Self::UnknownTraceKind(name) => {
                write!(
                    f,
                    "unknown trace kind '{name}' in trace_kinds=; trace kinds:"
                )?;
                for kind in TraceKind::ALL {
                    write!(f, " {}", kind.name())?;
                }
                write!(f, " (or all)")
            }
        }?;
        write!(f, "; valid keys: {VALID_KEYS}")
    }
}

/// `on` or `off`, the value of every switch.
fn on_off(value: &str) -> Option<bool> {
    match value {
        "on" => Some(true),
        "off" => Some(false),
        _ => None,
    }
}

fn parse_in_range<'a>(
    key: &'a str,
    value: &'a str,
    lo: u64,
    hi: u64,
) -> Result<u64, ConfigError<'a>> {
    match value.parse::<u64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(ConfigError::BadValue { key, value }),
    }
}

impl<'a> HostConfig<'a> {
    /// Parses the host command line. A Multiboot command line may start with the kernel's own
    /// path: QEMU's loader (and GRUB Legacy) put it first, GRUB 2 does not. With
    /// `skip_image_path = true` a first word that is a path (it starts with `/` or is not
    /// `key=value`) is dropped; any later word must be `key=value`.
    pub fn parse(cmdline: &'a str, skip_image_path: bool) -> Result<Self, ConfigError<'a>> {
        let mut config = Self::default();
        let (host_part, guest_part) = split_guest_words(cmdline);
        config.guest_cmdline = guest_part;
        let mut words = host_part.split_ascii_whitespace().peekable();
        if skip_image_path {
            // The image path names the kernel and configures nothing.
            let _ = words.next_if(|w| w.starts_with('/') || !w.contains('='));
        }
        let mut trace_limit = None;
        for word in words {
            let (key, value) = word.split_once('=').ok_or(ConfigError::NotKeyValue(word))?;
            let bad = ConfigError::BadValue { key, value };
            match key {
                // The 8254 counts down from at most 65 536 at 1.193 182 MHz: 19 Hz is the lowest
                // rate it can tick at (a lower one would silently become ~18.2 Hz).
                "timer_hz" => config.timer_hz = parse_in_range(key, value, 19, 10_000)? as u32,
                "mem" => config.guest_mem_mib = parse_in_range(key, value, 4, 3072)? as u32,
                "trace" => trace_limit = Some(parse_in_range(key, value, 0, u64::MAX)?),
                "trace_kinds" => {
                    config.trace.kinds =
                        TraceKinds::parse(value).map_err(ConfigError::UnknownTraceKind)?
                }
                "trace_skip" => config.trace.skip = parse_in_range(key, value, 0, u64::MAX)?,
                // A word of the command line: the marker cannot hold a space.
                "trace_from" if !value.is_empty() => config.trace.from = Some(value),
                "trace_from" => return Err(bad),
                "watchdog" => config.watchdog_ticks = parse_in_range(key, value, 0, u64::MAX)?,
                "shadow" => {
                    config.shadow = match value {
                        "flush" => ShadowPolicy::Flush,
                        "cached" => ShadowPolicy::Cached,
                        _ => return Err(bad),
                    }
                }
                "emulator_fill" => config.emulator_fill = on_off(value).ok_or(bad)?,
                "prefetch" => config.prefetch = on_off(value).ok_or(bad)?,
                "icount" => config.icount = on_off(value).ok_or(bad)?,
                "shadow_share" => config.shadow_share = on_off(value).ok_or(bad)?,
                "unsync" => config.unsync = on_off(value).ok_or(bad)?,
                "fastpath" => config.fastpath = on_off(value).ok_or(bad)?,
                "profile" => {
                    config.profile_phases = match value {
                        "phases" => true,
                        "off" => false,
                        _ => return Err(bad),
                    }
                }
                "backend" => {
                    config.backend = match value {
                        "trap" => Backend::Trap,
                        "svm" => Backend::Svm,
                        _ => return Err(bad),
                    }
                }
                "mode" => {
                    config.mode = match value {
                        "selfcheck" => RunMode::SelfCheck,
                        "guest" => RunMode::Guest,
                        _ => return Err(bad),
                    }
                }
                "debug" => {
                    config.debug = match value {
                        "none" => DebugAction::None,
                        "panic" => DebugAction::Panic,
                        _ => return Err(bad),
                    }
                }
                _ => return Err(ConfigError::UnknownKey(key)),
            }
        }
        // Choosing what to trace turns the trace on, at the limit of `--trace` unless `trace=`
        // says otherwise (an explicit `trace=0` keeps it off).
        let chosen = config.trace != TraceConfig::OFF;
        config.trace.limit = match trace_limit {
            Some(limit) => limit,
            None if chosen => TraceConfig::DEFAULT_LIMIT,
            None => 0,
        };
        Ok(config)
    }
}

/// Splits a command line at the first `--` word: (host words, guest words, trimmed).
pub fn split_guest_words(cmdline: &str) -> (&str, &str) {
    let mut offset = 0;
    for word in cmdline.split(' ') {
        if word == "--" {
            let rest = &cmdline[offset + word.len()..];
            return (&cmdline[..offset], rest.trim());
        }
        offset += word.len() + 1;
    }
    (cmdline, "")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn defaults_when_empty() {
        let c = HostConfig::parse("", false).unwrap();
        assert_eq!(c, HostConfig::default());
        assert_eq!(c.timer_hz, 1000);
        assert_eq!(c.guest_mem_mib, 32);
        assert_eq!(
            c.mode,
            RunMode::Guest,
            "the VMM runs its guest unless told otherwise"
        );
    }

    #[test]
    fn only_a_path_is_skipped_as_the_image_path() {
        // GRUB 2 passes the options alone: the first one is not a path and counts.
        let c = HostConfig::parse("mem=64 timer_hz=250 -- bench", true).unwrap();
        assert_eq!((c.guest_mem_mib, c.timer_hz), (64, 250));
        assert_eq!(c.guest_cmdline, "bench");
        // QEMU's path may hold a '=': a leading '/' still makes it the path.
        let c = HostConfig::parse("/a=b/kernel mem=64", true).unwrap();
        assert_eq!(c.guest_mem_mib, 64);
        // Only the first word can be the path.
        assert_eq!(
            HostConfig::parse("/boot/trapvmm mem=64 /boot/trapvmm", true),
            Err(ConfigError::NotKeyValue("/boot/trapvmm"))
        );
        // Without skip_image_path nothing is dropped.
        assert_eq!(
            HostConfig::parse("kernel mem=64", false),
            Err(ConfigError::NotKeyValue("kernel"))
        );
        let c = HostConfig::parse("/boot/trapvmm", true).unwrap();
        assert_eq!(c, HostConfig::default());
    }

    #[test]
    fn backends() {
        assert_eq!(HostConfig::default().backend, Backend::Trap);
        let c = HostConfig::parse("backend=svm", false).unwrap();
        assert_eq!(c.backend, Backend::Svm);
        assert_eq!(
            HostConfig::parse("backend=vmx", false),
            Err(ConfigError::BadValue {
                key: "backend",
                value: "vmx"
            })
        );
        assert!(VALID_KEYS.contains("backend=trap|svm"));
    }

    #[test]
    fn image_path_is_skipped_and_guest_words_split() {
        let c =
            HostConfig::parse("/path/kernel timer_hz=250 mem=64 -- bench iters=10", true).unwrap();
        assert_eq!(c.timer_hz, 250);
        assert_eq!(c.guest_mem_mib, 64);
        assert_eq!(c.guest_cmdline, "bench iters=10");
    }

    #[test]
    fn every_key_parses() {
        let c = HostConfig::parse(
            "trace=5 shadow=cached emulator_fill=off profile=phases fastpath=off unsync=off shadow_share=off prefetch=on icount=on debug=panic watchdog=0 mode=guest",
            false,
        )
        .unwrap();
        assert_eq!(c.mode, RunMode::Guest);
        assert_eq!(c.trace.limit, 5);
        assert_eq!(c.trace.kinds, TraceKinds::ALL);
        assert_eq!(c.shadow, ShadowPolicy::Cached);
        assert!(!c.emulator_fill);
        assert!(c.profile_phases);
        assert!(!c.fastpath);
        assert!(!c.unsync);
        assert!(!c.shadow_share);
        assert!(c.prefetch);
        assert!(c.icount);
        assert_eq!(c.debug, DebugAction::Panic);
        assert_eq!(c.watchdog_ticks, 0);
    }

    #[test]
    fn unknown_key_names_the_valid_ones() {
        let e = HostConfig::parse("bogus=1", false).unwrap_err();
        assert_eq!(e, ConfigError::UnknownKey("bogus"));
        let msg = e.to_string();
        assert!(msg.contains("unknown key 'bogus'"));
        for key in [
            "timer_hz=",
            "mem=",
            "trace=",
            "shadow=",
            "watchdog=",
            "debug=",
        ] {
            assert!(msg.contains(key), "{msg} lacks {key}");
        }
    }

    #[test]
    fn bad_values_are_rejected() {
        for line in [
            "timer_hz=0",
            "timer_hz=18",
            "timer_hz=x",
            "mem=1",
            "mem=99999",
            "shadow=maybe",
            "emulator_fill=yes",
            "fastpath=1",
            "unsync=",
            "shadow_share=yes",
            "prefetch=2",
            "icount=yes",
            "profile=all",
            "debug=oops",
        ] {
            assert!(
                matches!(
                    HostConfig::parse(line, false),
                    Err(ConfigError::BadValue { .. })
                ),
                "{line}"
            );
        }
        assert_eq!(
            HostConfig::parse("justaword", false),
            Err(ConfigError::NotKeyValue("justaword"))
        );
    }

    #[test]
    fn trace_options_choose_kinds_and_a_start() {
        let c = HostConfig::parse(
            "trace_kinds=syscall,cr3,pf trace_skip=7 trace_from=hello:",
            false,
        )
        .unwrap();
        assert_eq!(
            c.trace,
            TraceConfig {
                limit: TraceConfig::DEFAULT_LIMIT,
                kinds: TraceKinds::parse("pf,cr3,syscall").unwrap(),
                skip: 7,
                from: Some("hello:"),
            },
            "choosing what to trace turns it on at the default limit"
        );
        let c = HostConfig::parse("trace_kinds=io trace=3", false).unwrap();
        assert_eq!(c.trace.limit, 3);
        let c = HostConfig::parse("trace_kinds=io trace=0", false).unwrap();
        assert_eq!(c.trace.limit, 0, "an explicit trace=0 stays off");
        assert_eq!(HostConfig::parse("", false).unwrap().trace.limit, 0);
        for line in ["trace_skip=x", "trace_from=", "trace=-1"] {
            assert!(
                matches!(
                    HostConfig::parse(line, false),
                    Err(ConfigError::BadValue { .. })
                ),
                "{line}"
            );
        }
    }

    #[test]
    fn an_unknown_trace_kind_names_the_kinds() {
        let e = HostConfig::parse("trace_kinds=pf,serial", false).unwrap_err();
        assert_eq!(e, ConfigError::UnknownTraceKind("serial"));
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "unknown trace kind 'serial' in trace_kinds=; trace kinds: pf cr3 syscall io irq exception insn (or all)"
            ),
            "{msg}"
        );
        assert_eq!(
            HostConfig::parse("trace_kinds=", false).unwrap_err(),
            ConfigError::UnknownTraceKind("")
        );
    }

    #[test]
    fn guest_words_after_double_dash_are_not_parsed() {
        let c = HostConfig::parse("-- bogus=1 --", false).unwrap();
        assert_eq!(c.guest_cmdline, "bogus=1 --");
        let (h, g) = split_guest_words("a=1 --x b");
        assert_eq!((h, g), ("a=1 --x b", ""));
    }
}
