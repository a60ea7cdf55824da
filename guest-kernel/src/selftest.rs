//! `selftest`: named checks of everything the OS does, one line each, then a summary.
//!
//! Every check tests a relation that holds natively and under a VMM alike (a sleep lasts at
//! least its ticks, preemption happened at least once, a faulting process ends with that
//! exception), never a timing or an address that varies, so the output is the same on every
//! run. Observations of privilege itself (CS.RPL, IF through `pushf`, `lar`, CPUID's hypervisor
//! bit) belong to `probe`, never here. Every wait is bounded: a lost wakeup fails a check
//! instead of hanging.

use crate::abi::{KILLED_BY_EXCEPTION, KILLED_TIMEOUT};
use crate::config::Config;
use crate::memory::{self, PteFlags, KERNEL_SCRATCH_VA, USER_IMAGE_VA, USER_TLS_VA};
use crate::process::{self, Fault, Reaped};
use crate::syscall::{self, Path};
use crate::user::id;
use crate::{arch, devices, println, sync, trap};
use boot::BootInfo;
use core::fmt::{self, Write};

/// Why a check failed (a short message, truncated to fit).
pub struct Why {
    buf: [u8; 100],
    len: usize,
}

impl Write for Why {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

impl Why {
    fn new(args: fmt::Arguments) -> Why {
        let mut w = Why {
            buf: [0; 100],
            len: 0,
        };
        let _ = w.write_fmt(args);
        w
    }
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

type CheckResult = Result<(), Why>;

macro_rules! ensure {
    ($cond:expr, $($why:tt)*) => {
        if !$cond {
            return Err(Why::new(format_args!($($why)*)));
        }
    };
}

/// How long any child may run before the check gives up on it (ticks).
const DEADLINE_TICKS: u64 = 500;

struct Ctx<'a> {
    info: &'a BootInfo,
}

type Check = fn(&Ctx) -> CheckResult;

const CHECKS: &[(&str, Check)] = &[
    ("boot-info", boot_info),
    ("breakpoint", breakpoint),
    ("timer-ticks", timer_ticks),
    ("pic-imr", pic_imr),
    ("irq-held-while-cli", irq_held_while_cli),
    ("tpr", tpr),
    ("kernel-null-unmapped", kernel_null_unmapped),
    ("kernel-wp", kernel_wp),
    ("invlpg-remap", invlpg_remap),
    ("kernel-sleep", kernel_sleep),
    ("user-hello", user_hello),
    ("syscall-path", syscall_path),
    ("sysenter-path", sysenter_path),
    ("int80-path", int80_path),
    ("exit-status", exit_status),
    ("spawn-wait-from-user", spawn_wait_from_user),
    ("sleep", sleep),
    ("demand-zero", demand_zero),
    ("yield", yield_check),
    ("cr3-isolation", cr3_isolation),
    ("preemption", preemption),
    ("round-robin", round_robin),
    ("kill-null-deref", |_| killed(id::NULL_DEREF, 14)),
    ("kill-write-text", |_| killed(id::WRITE_TEXT, 14)),
    ("kill-read-kernel", |_| killed(id::READ_KERNEL, 14)),
    ("user-read-kernel-page", user_read_kernel_page),
    ("kill-ud2", |_| killed(id::UD2, 6)),
    ("kill-divide-zero", |_| killed(id::DIVIDE_ZERO, 0)),
    ("kill-non-canonical", |_| killed(id::NON_CANONICAL, 13)),
    ("kill-cli", |_| killed(id::CLI, 13)),
    ("kill-exec-heap", |_| killed(id::EXEC_HEAP, 14)),
    ("process-table-full", process_table_full),
    ("reserved-range-unmapped", reserved_range_unmapped),
    ("no-frame-leak", no_frame_leak),
    ("swapgs-balanced", swapgs_balanced),
];

/// Runs every check; true when all passed.
pub fn run(info: &BootInfo, _config: &Config) -> bool {
    let ctx = Ctx { info };
    let mut failed = 0;
    for (name, check) in CHECKS {
        match check(&ctx) {
            Ok(()) => println!("check {name}: ok"),
            Err(why) => {
                failed += 1;
                println!("check {name}: FAILED {}", why.as_str());
            }
        }
        process::reap_orphans();
    }
    println!(
        "selftest: {} passed, {} failed",
        CHECKS.len() - failed,
        failed
    );
    failed == 0
}

/// Spawns `program` with `arg` as kinit's child and waits for it (bounded).
fn run_program(program: u64, arg: u64) -> Result<Reaped, Why> {
    let pid = process::spawn(program, arg)
        .map_err(|e| Why::new(format_args!("spawn of program {program} failed: {e:?}")))?;
    collect(pid)
}

fn collect(pid: u64) -> Result<Reaped, Why> {
    let deadline = process::ticks() + DEADLINE_TICKS;
    let r = process::wait(pid, Some(deadline))
        .ok_or_else(|| Why::new(format_args!("pid {pid} is not a child")))?;
    ensure!(
        !(r.killed && r.status == KILLED_TIMEOUT),
        "pid {pid} ran past {DEADLINE_TICKS} ticks"
    );
    Ok(r)
}

fn expect_status(r: &Reaped, status: u64) -> CheckResult {
    ensure!(
        r.status == status,
        "pid {} ended with status {:#x} ({}), expected {status:#x}",
        r.pid,
        r.status,
        process::describe_status(r.status)
    );
    Ok(())
}

/// Waits (sti; hlt) until `cond` holds, at most `max_halts` interrupts.
fn halt_until(max_halts: u32, cond: impl Fn() -> bool) -> bool {
    for _ in 0..max_halts {
        if cond() {
            return true;
        }
        arch::sti_hlt();
    }
    cond()
}

fn boot_info(ctx: &Ctx) -> CheckResult {
    let i = ctx.info;
    ensure!(i.magic == boot::BOOT_INFO_MAGIC, "bad magic");
    ensure!(i.ram_bytes >= 4 << 20, "ram_bytes {:#x}", i.ram_bytes);
    ensure!(
        i.boot_area_start < i.boot_area_end && i.boot_area_end <= i.ram_bytes,
        "boot area outside RAM"
    );
    ensure!(
        i.reserved_va_start >= 0xFFFF_8000_0000_0000,
        "reserved range {:#x} not in the upper half",
        i.reserved_va_start
    );
    Ok(())
}

fn breakpoint(_: &Ctx) -> CheckResult {
    let before = trap::count(3);
    arch::int3();
    ensure!(
        trap::count(3) == before + 1,
        "int3 did not reach its handler once"
    );
    Ok(())
}

fn timer_ticks(_: &Ctx) -> CheckResult {
    let t0 = process::ticks();
    ensure!(
        halt_until(1000, || process::ticks() >= t0 + 3),
        "fewer than 3 ticks in 1000 halts"
    );
    Ok(())
}

fn pic_imr(_: &Ctx) -> CheckResult {
    let imr = devices::pic_master_imr();
    ensure!(
        imr == devices::PIC1_IMR,
        "IMR reads {imr:#x}, programmed {:#x}",
        devices::PIC1_IMR
    );
    devices::set_pic_master_imr(imr | 1);
    let masked = devices::pic_master_imr();
    devices::set_pic_master_imr(imr);
    ensure!(
        masked == imr | 1,
        "IMR with the timer masked reads {masked:#x}"
    );
    Ok(())
}

/// With interrupts off the timer's request stays pending in the PIC's IRR and no tick is
/// handled; after `sti` it is delivered.
fn irq_held_while_cli(_: &Ctx) -> CheckResult {
    // Start right after a tick so that the next one is a whole period away.
    let t = process::ticks();
    halt_until(1000, || process::ticks() > t);
    let saved = sync::save_and_cli();
    let t0 = process::ticks();
    let mut pending = false;
    // Bounded (a lost IRQ must fail the check, not hang): natively a tick takes a few
    // thousand polls, under a VMM (every `in` traps) a few hundred.
    for _ in 0..2_000_000u32 {
        if devices::pic_master_irr() & 1 != 0 {
            pending = true;
            break;
        }
    }
    let t1 = process::ticks();
    sync::restore(saved);
    arch::sti();
    ensure!(pending, "IRQ 0 never became pending in the IRR");
    ensure!(t1 == t0, "a tick was handled with interrupts off");
    ensure!(
        halt_until(1000, || process::ticks() > t0),
        "the pending tick was not delivered after sti"
    );
    Ok(())
}

fn tpr(_: &Ctx) -> CheckResult {
    let old = arch::cr8();
    arch::set_cr8(9);
    let seen = arch::cr8();
    arch::set_cr8(old);
    ensure!(seen == 9, "CR8 reads {seen} after writing 9");
    ensure!(arch::cr8() == old, "CR8 not restored");
    Ok(())
}

extern "C" {
    fn probe_read(addr: u64) -> i64;
    fn probe_write(addr: u64, byte: u8) -> i64;
}

fn kernel_null_unmapped(_: &Ctx) -> CheckResult {
    // SAFETY: probe_read has a fixup: a fault returns -14.
    let r = unsafe { probe_read(0) };
    ensure!(r == -14, "reading address 0 in the kernel did not fault");
    Ok(())
}

fn kernel_wp(_: &Ctx) -> CheckResult {
    static READ_ONLY: u8 = 0x5A;
    ensure!(arch::cr0() & (1 << 16) != 0, "CR0.WP is clear");
    let addr = &raw const READ_ONLY as u64;
    // SAFETY: probe_write has a fixup; the target is in .rodata, mapped read-only, so the write
    // faults (CR0.WP makes read-only apply to the kernel too) and nothing changes.
    let r = unsafe { probe_write(addr, 0xA5) };
    // SAFETY: reading a static through a volatile load (the compiler may not assume the value).
    let now = unsafe { core::ptr::read_volatile(&raw const READ_ONLY) };
    ensure!(r == -14, "a kernel write to read-only data did not fault");
    ensure!(now == 0x5A, "read-only data changed");
    Ok(())
}

/// Map a scratch page, remap it to another frame with `invlpg`, unmap it: each read through the
/// same address must see the new state.
fn invlpg_remap(_: &Ctx) -> CheckResult {
    let (Some(a), Some(b)) = (memory::alloc_frame(), memory::alloc_frame()) else {
        return Err(Why::new(format_args!("out of frames")));
    };
    // SAFETY: `a` is a fresh frame, identity-mapped and not used by anything else.
    unsafe { (a as *mut u8).write(0xAA) };
    // SAFETY: likewise for `b`.
    unsafe { (b as *mut u8).write(0xBB) };
    let pml4 = memory::kernel_pml4();
    let flags = PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE;
    let va = KERNEL_SCRATCH_VA;
    let result = (|| {
        memory::map(pml4, va, a, flags).map_err(|_| Why::new(format_args!("map failed")))?;
        // SAFETY: probe_read has a fixup.
        let first = unsafe { probe_read(va) };
        memory::unmap(pml4, va);
        memory::map(pml4, va, b, flags).map_err(|_| Why::new(format_args!("map failed")))?;
        // SAFETY: as above.
        let second = unsafe { probe_read(va) };
        memory::unmap(pml4, va);
        // SAFETY: as above.
        let third = unsafe { probe_read(va) };
        ensure!(first == 0xAA, "first mapping reads {first:#x}");
        ensure!(
            second == 0xBB,
            "after remap + invlpg reads {second:#x} (stale TLB?)"
        );
        ensure!(
            third == -14,
            "after unmap + invlpg the page is still readable"
        );
        Ok(())
    })();
    memory::free_frame(a);
    memory::free_frame(b);
    result
}

fn kernel_sleep(_: &Ctx) -> CheckResult {
    let t0 = process::ticks();
    process::sleep(2);
    let t1 = process::ticks();
    ensure!(t1 >= t0 + 2, "sleep(2) returned after {} ticks", t1 - t0);
    Ok(())
}

fn user_hello(_: &Ctx) -> CheckResult {
    let r = run_program(id::HELLO, 0)?;
    let digits = r.pid.checked_ilog10().unwrap_or(0) as u64 + 1;
    let expected =
        "user: hello from pid ".len() as u64 + digits + " through int 0x80\n".len() as u64;
    expect_status(&r, expected)
}

fn path_check(arg: u64, path: Path) -> CheckResult {
    let before = syscall::count(path);
    let r = run_program(id::PATHS, arg)?;
    expect_status(&r, 0)?;
    let calls = syscall::count(path) - before;
    ensure!(
        calls >= 10,
        "only {calls} system calls went through {path:?}"
    );
    Ok(())
}

fn syscall_path(_: &Ctx) -> CheckResult {
    path_check(0, Path::Syscall)
}

fn sysenter_path(_: &Ctx) -> CheckResult {
    path_check(1, Path::Sysenter)
}

fn int80_path(_: &Ctx) -> CheckResult {
    path_check(2, Path::Int80)
}

fn exit_status(_: &Ctx) -> CheckResult {
    let r = run_program(id::EXITER, 42)?;
    expect_status(&r, 42)
}

fn spawn_wait_from_user(_: &Ctx) -> CheckResult {
    let r = run_program(id::SPAWNER, 0)?;
    expect_status(&r, 0)
}

fn sleep(_: &Ctx) -> CheckResult {
    let t0 = process::ticks();
    let r = run_program(id::SLEEPER, 3)?;
    expect_status(&r, 0)?;
    ensure!(
        process::ticks() >= t0 + 3,
        "sleep(3) took less than 3 ticks"
    );
    Ok(())
}

fn demand_zero(_: &Ctx) -> CheckResult {
    let before = memory::demand_fills();
    let r = run_program(id::MEMORY, 0)?;
    expect_status(&r, 0)?;
    let fills = memory::demand_fills() - before;
    ensure!(fills >= 5, "only {fills} demand-zero fills");
    Ok(())
}

fn yield_check(_: &Ctx) -> CheckResult {
    let before = process::switches();
    let a = process::spawn(id::PINGPONG, 20).map_err(|e| Why::new(format_args!("{e:?}")))?;
    let b = process::spawn(id::PINGPONG, 20).map_err(|e| Why::new(format_args!("{e:?}")))?;
    let (ra, rb) = (collect(a)?, collect(b)?);
    expect_status(&ra, 0)?;
    expect_status(&rb, 0)?;
    let switches = process::switches() - before;
    ensure!(
        switches >= 40,
        "20 yields each made only {switches} switches"
    );
    Ok(())
}

/// Two processes map their heap at the same address with different contents; after running
/// interleaved, each still sees its own (pingpong checks after every yield), and a third
/// process's fresh heap page there reads zero.
fn cr3_isolation(_: &Ctx) -> CheckResult {
    let a = process::spawn(id::PINGPONG, 5).map_err(|e| Why::new(format_args!("{e:?}")))?;
    let b = process::spawn(id::PINGPONG, 5).map_err(|e| Why::new(format_args!("{e:?}")))?;
    let (pa, pb) = (process::pml4_of(a), process::pml4_of(b));
    let frame = |pml4: Option<u64>, va| {
        pml4.and_then(|p| memory::translate(p, va))
            .map(|e| e.frame())
    };
    let tls = (frame(pa, USER_TLS_VA), frame(pb, USER_TLS_VA));
    let code = (frame(pa, USER_IMAGE_VA), frame(pb, USER_IMAGE_VA));
    let (ra, rb) = (collect(a)?, collect(b)?);
    expect_status(&ra, 0)?;
    expect_status(&rb, 0)?;
    ensure!(pa.is_some() && pa != pb, "the two processes share a PML4");
    ensure!(
        tls.0.is_some() && tls.0 != tls.1,
        "their TLS pages are the same frame"
    );
    ensure!(
        code.0.is_some() && code.0 == code.1,
        "their (shared, read-only) program text is not the same frame"
    );
    Ok(())
}

fn spinners(n: usize, ticks: u64) -> Result<[Reaped; 3], Why> {
    let mut pids = [0u64; 3];
    for pid in pids.iter_mut().take(n) {
        *pid = process::spawn(id::SPINNER, ticks).map_err(|e| Why::new(format_args!("{e:?}")))?;
    }
    let mut out = [Reaped {
        pid: 0,
        status: 0,
        preemptions: 0,
        killed: false,
        fault: None,
    }; 3];
    for i in 0..n {
        out[i] = collect(pids[i])?;
        expect_status(&out[i], 0)?;
    }
    Ok(out)
}

fn preemption(_: &Ctx) -> CheckResult {
    let before = process::preemptions();
    spinners(2, 5)?;
    let n = process::preemptions() - before;
    ensure!(n >= 1, "two spinning processes were never preempted");
    Ok(())
}

fn round_robin(_: &Ctx) -> CheckResult {
    let r = spinners(3, 6)?;
    for s in &r {
        ensure!(
            s.preemptions >= 1,
            "pid {} was never preempted among three spinners",
            s.pid
        );
    }
    Ok(())
}

fn killed(program: u64, vector: u64) -> CheckResult {
    let r = run_program(program, 0)?;
    ensure!(r.killed, "pid {} was not killed", r.pid);
    expect_status(&r, KILLED_BY_EXCEPTION + vector)
}

/// A user read of a present, supervisor-only kernel page: #PF with error code 5 (P = 1, the
/// page is there, a protection fault; W/R = 0, a read; U/S = 1, from user mode; I/D = 0), CR2
/// the address read, and the process killed. A VMM whose shadow tables simply leave supervisor
/// pages out of the user's view takes a not-present fault there, and must still report P = 1.
fn user_read_kernel_page(_: &Ctx) -> CheckResult {
    let addr = crate::user::programs::KERNEL_ADDR;
    let pte = memory::translate(memory::kernel_pml4(), addr);
    ensure!(
        pte.is_some_and(|e| !e.flags().contains(PteFlags::USER)),
        "{addr:#x} is not a present supervisor-only kernel page"
    );
    let r = run_program(id::READ_KERNEL, 0)?;
    ensure!(r.killed, "pid {} was not killed", r.pid);
    expect_status(&r, KILLED_BY_EXCEPTION + 14)?;
    let expected = Fault {
        vector: 14,
        error: 5,
        addr,
    };
    let (vector, error, at) = r.fault.map_or((0, 0, 0), |f| (f.vector, f.error, f.addr));
    ensure!(
        r.fault == Some(expected),
        "vector {vector} error {error:#x} at {at:#x}, expected #PF error 0x5 at {addr:#x}"
    );
    Ok(())
}

fn process_table_full(_: &Ctx) -> CheckResult {
    let mut pids = [0u64; process::NPROC];
    let mut n = 0;
    let err = loop {
        match process::spawn(id::SLEEPER, 1) {
            Ok(pid) if n < pids.len() => {
                pids[n] = pid;
                n += 1;
            }
            Ok(_) => break None,
            Err(e) => break Some(e),
        }
    };
    let mut bad = 0;
    for &pid in &pids[..n] {
        if !matches!(collect(pid), Ok(Reaped { status: 0, .. })) {
            bad += 1;
        }
    }
    ensure!(
        err == Some(process::SpawnError::TableFull),
        "spawning {n} processes ended with {err:?}, not TableFull"
    );
    ensure!(
        n == process::NPROC - 1,
        "only {n} processes fit beside kinit"
    );
    ensure!(bad == 0, "{bad} of them did not exit cleanly");
    ensure!(process::live_processes() == 1, "processes left over");
    Ok(())
}

fn reserved_range_unmapped(_: &Ctx) -> CheckResult {
    let pid = process::spawn(id::SLEEPER, 1).map_err(|e| Why::new(format_args!("{e:?}")))?;
    let pml4 = process::pml4_of(pid);
    let user_ok = pml4.is_some_and(memory::upper_half_empty);
    let r = collect(pid)?;
    expect_status(&r, 0)?;
    ensure!(
        memory::upper_half_empty(memory::kernel_pml4()),
        "the kernel maps something in the upper half"
    );
    ensure!(user_ok, "a process maps something in the upper half");
    Ok(())
}

fn no_frame_leak(_: &Ctx) -> CheckResult {
    let before = memory::free_frames();
    for _ in 0..5 {
        expect_status(&run_program(id::EXITER, 0)?, 0)?;
    }
    expect_status(&run_program(id::MEMORY, 0)?, 0)?;
    expect_status(&run_program(id::NULL_DEREF, 0)?, KILLED_BY_EXCEPTION + 14)?;
    expect_status(&run_program(id::SPAWNER, 0)?, 0)?;
    let after = memory::free_frames();
    ensure!(
        after == before,
        "{} frames lost over 8 processes",
        before as i64 - after as i64
    );
    Ok(())
}

fn swapgs_balanced(_: &Ctx) -> CheckResult {
    let (percpu, seen) = syscall::gs_self_check();
    ensure!(
        percpu == seen,
        "GS is not the kernel's after all those user entries"
    );
    ensure!(
        arch::rdmsr(arch::msr::KERNEL_GS_BASE) == 0,
        "KERNEL_GS_BASE is not the user's (0)"
    );
    Ok(())
}
