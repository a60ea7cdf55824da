//! `bench`: each operation in a loop timed with `rdtsc`.
//!
//! Method: `lfence; rdtsc; lfence` on both sides of the loop (`arch::rdtsc_fenced`), so the
//! interval covers exactly the loop. Every total has the cost of the same loop with an empty
//! body (an `opaque` value the compiler must keep) subtracted: kernel loops subtract
//! `loop_overhead` measured here, user loops measure and subtract their own (user::programs).
//! Kernel loops run with interrupts off (except cli+sti, which enables them by nature) so the
//! timer does not land in them. Per-op = total / iterations. Under QEMU `--icount` the TSC
//! counts instructions, which makes the numbers repeatable.
//!
//! CSV lines: `bench,<op>,<iterations>,<total cycles>,<cycles per op>`, `<op>` the table's name
//! in lower case with `_` for every run of other characters.
//!
//! Iterations come from `iters=` (default 1000); spawn+exit+wait and the demand-zero faults are
//! capped (`SPAWN_CAP`, `FAULT_CAP`: a process's heap holds at most 1024 pages); the compute
//! loop runs `COMPUTE_SCALE` times more. The ops are the list [`OPS`]; `op=NAME` runs one of
//! them. Each CSV line is printed as soon as its op is measured; the table comes at the end.

use crate::config::Config;
use crate::memory::{self, PteFlags, KERNEL_SCRATCH_VA};
use crate::syscall::Path;
use crate::user::id;
use crate::{arch, devices, println, process, sync};
use core::arch::asm;

const SPAWN_CAP: u64 = 200;
const FAULT_CAP: u64 = 1000;
/// The compute loop runs this many times `iters` iterations.
const COMPUTE_SCALE: u64 = 10_000;

fn opaque(x: u64) -> u64 {
    let mut x = x;
    // SAFETY: an empty asm statement that "may change" x.
    unsafe { asm!("/* {0} */", inout(reg) x, options(nomem, nostack, preserves_flags)) };
    x
}

/// Times `n` runs of `body` with interrupts off, minus the empty loop.
fn time_kernel(n: u64, overhead: u64, mut body: impl FnMut(u64)) -> u64 {
    let saved = sync::save_and_cli();
    let t0 = arch::rdtsc_fenced();
    for i in 0..n {
        body(opaque(i));
    }
    let t1 = arch::rdtsc_fenced();
    sync::restore(saved);
    (t1 - t0).saturating_sub(overhead)
}

/// Runs user program `program` with `arg` and returns its exit status (the cycles it
/// measured), or None if it failed.
fn run_user(program: u64, arg: u64) -> Option<u64> {
    let pid = process::spawn(program, arg).ok()?;
    let r = process::wait(pid, Some(process::ticks() + 60_000))?;
    (!r.killed).then_some(r.status)
}

/// One operation of the bench: its name and how to time it. To add one, write a function that
/// times it and add a line to [`OPS`] (docs/benchmarks.md, "Adding an operation").
pub struct Op {
    /// The table's name ("mov cr3 (switch)"); the CSV lines and `op=` use its [`slug`].
    pub label: &'static str,
    /// Times the op: `(iterations, total cycles)`, the loop overhead already subtracted, or
    /// `None` if it could not run.
    measure: fn(&Ctx) -> Option<(u64, u64)>,
}

/// What every op's measurement may use.
struct Ctx {
    /// Iterations asked for (`iters=`).
    iters: u64,
    /// The empty kernel loop's cycles for `iters` iterations (subtracted by `time_kernel`).
    overhead: u64,
}

/// Every op, in the order they run and are listed. A `const`, so that the results array below
/// is as long as the list, whatever its length.
pub const OPS: &[Op] = &[
    Op {
        label: "cli+sti",
        measure: |c| {
            Some((
                c.iters,
                time_kernel(c.iters, c.overhead, |_| {
                    arch::cli();
                    arch::sti();
                }),
            ))
        },
    },
    Op {
        label: "pushf+popf",
        measure: |c| {
            Some((
                c.iters,
                time_kernel(c.iters, c.overhead, |_| arch::set_rflags(arch::rflags())),
            ))
        },
    },
    Op {
        label: "mov cr3 (same value)",
        measure: |c| {
            let own = arch::cr3();
            // SAFETY: reloading the current CR3.
            let total = time_kernel(c.iters, c.overhead, |_| unsafe { arch::set_cr3(own) });
            Some((c.iters, total))
        },
    },
    Op {
        label: "mov cr3 (switch)",
        measure: mov_cr3_switch,
    },
    Op {
        label: "invlpg",
        measure: invlpg,
    },
    Op {
        label: "in (PIC IMR)",
        measure: |c| {
            let total = time_kernel(c.iters, c.overhead, |_| {
                opaque(devices::pic_master_imr() as u64);
            });
            Some((c.iters, total))
        },
    },
    Op {
        label: "out (PIC OCW3)",
        measure: |c| {
            let total = time_kernel(c.iters, c.overhead, |_| devices::pic_select_irr());
            Some((c.iters, total))
        },
    },
    Op {
        label: "rdmsr (FS_BASE)",
        measure: |c| {
            let total = time_kernel(c.iters, c.overhead, |_| {
                opaque(arch::rdmsr(arch::msr::FS_BASE));
            });
            Some((c.iters, total))
        },
    },
    Op {
        label: "wrmsr (FS_BASE)",
        measure: |c| {
            // SAFETY: kinit's FS base is unused (0).
            let total = time_kernel(c.iters, c.overhead, |_| unsafe {
                arch::wrmsr(arch::msr::FS_BASE, 0)
            });
            Some((c.iters, total))
        },
    },
    Op {
        label: "mov cr8 (write)",
        measure: |c| {
            // The task priority the kernel runs at, written back: nothing changes.
            let tpr = arch::cr8();
            let total = time_kernel(c.iters, c.overhead, |_| arch::set_cr8(tpr));
            Some((c.iters, total))
        },
    },
    Op {
        label: "int3 (kernel trap round trip)",
        measure: |c| Some((c.iters, time_kernel(c.iters, c.overhead, |_| arch::int3()))),
    },
    Op {
        label: "syscall null (getpid)",
        measure: |c| null_calls(c, Path::Syscall),
    },
    Op {
        label: "sysenter null (getpid)",
        measure: |c| null_calls(c, Path::Sysenter),
    },
    Op {
        label: "int 0x80 null (getpid)",
        measure: |c| null_calls(c, Path::Int80),
    },
    Op {
        label: "demand-zero page fault",
        measure: |c| {
            let faults = c.iters.min(FAULT_CAP);
            Some((faults, run_user(id::BENCH_FAULTS, faults)?))
        },
    },
    Op {
        label: "yield ping-pong (round trip)",
        measure: |c| Some((c.iters, yield_pingpong(c.iters)?)),
    },
    Op {
        label: "spawn+exit+wait",
        measure: |c| {
            let spawns = c.iters.min(SPAWN_CAP);
            Some((spawns, spawn_exit_wait(spawns)?))
        },
    },
    Op {
        label: "compute loop (user)",
        // COMPUTE_SCALE times longer: it measures what a VMM costs code that never traps,
        // where only the periodic timer interrupts remain, so it must run long enough for those
        // to be amortised as they are in real work.
        measure: |c| {
            let n = c.iters.saturating_mul(COMPUTE_SCALE);
            Some((n, run_user(id::BENCH_COMPUTE, n)?))
        },
    },
    // Lab 7 (docs/labs/lab7-measure-a-trap.md): built with the feature `lab7`, the student's
    // operation comes last.
    #[cfg(feature = "lab7")]
    lab7::OP,
];

/// Lab 7's student code: one more operation.
#[cfg(feature = "lab7")]
#[path = "../../labs/lab7_new_trap.rs"]
mod lab7;

/// The op whose CSV name is `name`, if any.
pub fn op_named(name: &str) -> Option<usize> {
    OPS.iter().position(|op| slug(op.label).eq(name.chars()))
}

/// Writes the CSV names of every op, space-separated (for the error of an unknown `op=`).
pub fn write_op_names(f: &mut impl core::fmt::Write) -> core::fmt::Result {
    for (i, op) in OPS.iter().enumerate() {
        write!(f, "{}{}", if i == 0 { "" } else { " " }, Slug(op.label))?;
    }
    Ok(())
}

/// The first name two ops share, if any: `op=` and the CSV lines could not tell them apart.
fn duplicate_name() -> Option<&'static str> {
    OPS.iter().enumerate().find_map(|(i, op)| {
        OPS[..i]
            .iter()
            .any(|earlier| slug(earlier.label).eq(slug(op.label)))
            .then_some(op.label)
    })
}

/// Runs every op, or only `config.op`; false when one of them could not run, or two ops have
/// one name.
pub fn run(config: &Config) -> bool {
    if let Some(label) = duplicate_name() {
        println!(
            "bench: two ops are named {}: give each its own label",
            Slug(label)
        );
        return false;
    }
    let ctx = Ctx {
        iters: config.iters,
        overhead: time_kernel(config.iters, 0, |_| {}),
    };
    // (iterations, total) per op of OPS, for the table at the end.
    let mut results: [Option<(u64, u64)>; OPS.len()] = [None; OPS.len()];
    let mut ok = true;
    for (i, op) in OPS.iter().enumerate() {
        if config.op.is_some_and(|only| only != i) {
            continue;
        }
        // Each CSV line is printed as soon as its op is measured (a harness watching the
        // console, like the VMM's bench-traps report, can attribute what happened in between
        // to that op); the readable table follows at the end.
        match (op.measure)(&ctx) {
            Some((iterations, total)) => {
                println!(
                    "bench,{},{},{},{}",
                    Slug(op.label),
                    iterations,
                    total,
                    total / iterations.max(1)
                );
                results[i] = Some((iterations, total));
            }
            None => {
                println!("bench,{},could not run", Slug(op.label));
                ok = false;
            }
        }
    }

    println!(
        "{:<28} {:>10} {:>14} {:>12}",
        "operation", "iterations", "total cycles", "cycles/op"
    );
    for (op, result) in OPS.iter().zip(results) {
        if let Some((iterations, total)) = result {
            println!(
                "{:<28} {:>10} {:>14} {:>12}",
                op.label,
                iterations,
                total,
                total / iterations.max(1)
            );
        }
    }
    ok
}

/// An operation's name for the CSV lines and `op=`: lower case, every run of other characters
/// one `_` ("mov cr3 (same value)" -> "mov_cr3_same_value").
fn slug(label: &str) -> impl Iterator<Item = char> + '_ {
    label
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
        .enumerate()
        .flat_map(|(i, word)| {
            let gap = (i > 0).then_some('_');
            gap.into_iter()
                .chain(word.chars().map(|c| c.to_ascii_lowercase()))
        })
}

/// [`slug`] for `format!`.
struct Slug(&'static str);

impl core::fmt::Display for Slug {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        slug(self.0).try_for_each(|c| core::fmt::Write::write_char(f, c))
    }
}

/// MOV CR3 alternating between kinit's address space and a second, empty one.
fn mov_cr3_switch(c: &Ctx) -> Option<(u64, u64)> {
    let own = arch::cr3();
    let other = memory::new_address_space().ok()?;
    let total = time_kernel(c.iters, c.overhead, |i| {
        // SAFETY: both PML4s share the kernel half kinit runs in.
        unsafe { arch::set_cr3(if i & 1 == 0 { other } else { own }) }
    });
    // SAFETY: back on kinit's own tables.
    unsafe { arch::set_cr3(own) };
    memory::free_frame(other);
    Some((c.iters, total))
}

/// INVLPG of a page mapped for the purpose.
fn invlpg(c: &Ctx) -> Option<(u64, u64)> {
    let scratch = memory::alloc_frame();
    let mapped = scratch.is_some_and(|f| {
        let flags = PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE;
        memory::map(memory::kernel_pml4(), KERNEL_SCRATCH_VA, f, flags).is_ok()
    });
    let total =
        mapped.then(|| time_kernel(c.iters, c.overhead, |_| arch::invlpg(KERNEL_SCRATCH_VA)));
    memory::unmap(memory::kernel_pml4(), KERNEL_SCRATCH_VA);
    if let Some(f) = scratch {
        memory::free_frame(f);
    }
    Some((c.iters, total?))
}

/// Null system calls (getpid) through `path`, timed by a user process.
fn null_calls(c: &Ctx, path: Path) -> Option<(u64, u64)> {
    Some((
        c.iters,
        run_user(id::BENCH_CALLS, c.iters << 2 | path as u64)?,
    ))
}

/// Two processes yielding `n` times each: every yield switches to the other, so one process's
/// loop time covers `n` round trips (two switches each).
fn yield_pingpong(n: u64) -> Option<u64> {
    let a = process::spawn(id::BENCH_YIELD, n).ok()?;
    let b = process::spawn(id::BENCH_YIELD, n).ok()?;
    let deadline = Some(process::ticks() + 60_000);
    let ra = process::wait(a, deadline)?;
    let rb = process::wait(b, deadline)?;
    (!ra.killed && !rb.killed).then_some(ra.status.max(rb.status))
}

/// kinit spawns a process that exits at once and waits for it, `n` times.
fn spawn_exit_wait(n: u64) -> Option<u64> {
    let t0 = arch::rdtsc_fenced();
    for _ in 0..n {
        let pid = process::spawn(id::EXITER, 0).ok()?;
        process::wait(pid, Some(process::ticks() + 1000))?;
    }
    Some(arch::rdtsc_fenced() - t0)
}
