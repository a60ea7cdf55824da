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
//! loop runs `COMPUTE_SCALE` times more. Each CSV line is printed as soon as its op is
//! measured; the table comes at the end.

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

struct Result {
    op: &'static str,
    iterations: u64,
    total: u64,
}

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

/// Runs every benchmark; false when one of them could not run.
pub fn run(config: &Config) -> bool {
    let n = config.iters;
    let mut results: [Option<Result>; 20] = [const { None }; 20];
    let mut count = 0;
    let mut ok = true;
    // Each CSV line is printed as soon as its op is measured (a harness watching the console,
    // like the VMM's bench-traps report, can attribute what happened in between to that op);
    // the readable table follows at the end.
    let mut record = |op: &'static str, iterations: u64, total: Option<u64>| match total {
        Some(total) => {
            println!(
                "bench,{},{},{},{}",
                Slug(op),
                iterations,
                total,
                total / iterations.max(1)
            );
            results[count] = Some(Result {
                op,
                iterations,
                total,
            });
            count += 1;
        }
        None => {
            println!("bench,{},could not run", Slug(op));
            ok = false;
        }
    };

    let overhead = time_kernel(n, 0, |_| {});
    record(
        "cli+sti",
        n,
        Some(time_kernel(n, overhead, |_| {
            arch::cli();
            arch::sti();
        })),
    );
    record(
        "pushf+popf",
        n,
        Some(time_kernel(n, overhead, |_| {
            arch::set_rflags(arch::rflags())
        })),
    );
    let own = arch::cr3();
    record(
        "mov cr3 (same value)",
        n,
        // SAFETY: reloading the current CR3.
        Some(time_kernel(n, overhead, |_| unsafe { arch::set_cr3(own) })),
    );
    let other = memory::new_address_space().ok();
    record(
        "mov cr3 (switch)",
        n,
        other.map(|other| {
            time_kernel(n, overhead, |i| {
                // SAFETY: both PML4s share the kernel half kinit runs in.
                unsafe { arch::set_cr3(if i & 1 == 0 { other } else { own }) }
            })
        }),
    );
    // SAFETY: back on kinit's own tables.
    unsafe { arch::set_cr3(own) };
    if let Some(other) = other {
        memory::free_frame(other);
    }
    let scratch = memory::alloc_frame();
    let mapped = scratch.is_some_and(|f| {
        let flags = PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE;
        memory::map(memory::kernel_pml4(), KERNEL_SCRATCH_VA, f, flags).is_ok()
    });
    record(
        "invlpg",
        n,
        mapped.then(|| time_kernel(n, overhead, |_| arch::invlpg(KERNEL_SCRATCH_VA))),
    );
    memory::unmap(memory::kernel_pml4(), KERNEL_SCRATCH_VA);
    if let Some(f) = scratch {
        memory::free_frame(f);
    }
    record(
        "in (PIC IMR)",
        n,
        Some(time_kernel(n, overhead, |_| {
            opaque(devices::pic_master_imr() as u64);
        })),
    );
    record(
        "out (PIC OCW3)",
        n,
        Some(time_kernel(n, overhead, |_| devices::pic_select_irr())),
    );
    record(
        "rdmsr (FS_BASE)",
        n,
        Some(time_kernel(n, overhead, |_| {
            opaque(arch::rdmsr(arch::msr::FS_BASE));
        })),
    );
    record(
        "wrmsr (FS_BASE)",
        n,
        // SAFETY: kinit's FS base is unused (0).
        Some(time_kernel(n, overhead, |_| unsafe {
            arch::wrmsr(arch::msr::FS_BASE, 0)
        })),
    );
    record(
        "int3 (kernel trap round trip)",
        n,
        Some(time_kernel(n, overhead, |_| arch::int3())),
    );
    for (op, path) in [
        ("syscall null (getpid)", Path::Syscall),
        ("sysenter null (getpid)", Path::Sysenter),
        ("int 0x80 null (getpid)", Path::Int80),
    ] {
        record(op, n, run_user(id::BENCH_CALLS, n << 2 | path as u64));
    }
    let faults = n.min(FAULT_CAP);
    record(
        "demand-zero page fault",
        faults,
        run_user(id::BENCH_FAULTS, faults),
    );
    record("yield ping-pong (round trip)", n, yield_pingpong(n));
    let spawns = n.min(SPAWN_CAP);
    record("spawn+exit+wait", spawns, spawn_exit_wait(spawns));
    // The compute loop is COMPUTE_SCALE times longer: it measures what a VMM costs code that
    // never traps, where only the periodic timer interrupts remain, so it must run long enough
    // for those to be amortised as they are in real work.
    let compute = n.saturating_mul(COMPUTE_SCALE);
    record(
        "compute loop (user)",
        compute,
        run_user(id::BENCH_COMPUTE, compute),
    );

    println!(
        "{:<28} {:>10} {:>14} {:>12}",
        "operation", "iterations", "total cycles", "cycles/op"
    );
    for r in results.iter().flatten() {
        println!(
            "{:<28} {:>10} {:>14} {:>12}",
            r.op,
            r.iterations,
            r.total,
            r.total / r.iterations.max(1)
        );
    }
    ok
}

/// An operation's name for the CSV lines: lower case, every run of other characters one `_`
/// ("mov cr3 (same value)" -> "mov_cr3_same_value").
struct Slug(&'static str);

impl core::fmt::Display for Slug {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        use core::fmt::Write;
        let mut gap = false;
        let mut started = false;
        for c in self.0.chars() {
            if c.is_ascii_alphanumeric() {
                if gap && started {
                    f.write_char('_')?;
                }
                f.write_char(c.to_ascii_lowercase())?;
                started = true;
                gap = false;
            } else {
                gap = true;
            }
        }
        Ok(())
    }
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
