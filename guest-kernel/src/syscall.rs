//! The three system-call entries and the one dispatcher behind them.
//!
//! - SYSCALL/SYSRETQ: EFER.SCE, STAR (selectors), LSTAR (entry), FMASK (IF, TF, DF, AC, NT
//!   cleared on entry); the entry finds its kernel stack through GS after `swapgs`
//!   (IA32_KERNEL_GS_BASE holds the per-CPU block while user code runs).
//! - SYSENTER/SYSEXITQ: IA32_SYSENTER_CS/EIP, and IA32_SYSENTER_ESP rewritten on every switch to
//!   the next process's kernel stack. In a GDT layout where SYSEXIT cannot reach the user code
//!   selector (`gdt=low`), the SYSENTER path returns with `iretq` instead.
//! - `int 0x80`: a DPL-3 interrupt gate; back with `iretq`.
//!
//! The ABI (numbers, registers) is in `abi`.

use crate::abi::{self, *};
use crate::arch::{self, msr};
use crate::trap::TrapFrame;
use crate::{gdt, process, serial};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

/// The per-CPU block GS points at in the kernel (layout used by asm/trap.S).
#[repr(C)]
struct PerCpu {
    /// Its own address (`gs:[0]`), to check that GS is the kernel's.
    self_ptr: u64,
    /// Scratch: the user RSP during SYSCALL entry.
    user_rsp: u64,
    /// The running process's kernel stack top (SYSCALL switches to it).
    kernel_rsp: u64,
}

struct PerCpuCell(UnsafeCell<PerCpu>);
// SAFETY: one CPU; written with interrupts off (init, set_kernel_stack) and by the SYSCALL entry.
unsafe impl Sync for PerCpuCell {}
static PERCPU: PerCpuCell = PerCpuCell(UnsafeCell::new(PerCpu {
    self_ptr: 0,
    user_rsp: 0,
    kernel_rsp: 0,
}));

/// System calls taken, by path: SYSCALL, SYSENTER, `int 0x80`.
static BY_PATH: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

/// The entry path of a system call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// SYSCALL / SYSRETQ.
    Syscall = 0,
    /// SYSENTER / SYSEXITQ.
    Sysenter = 1,
    /// `int 0x80` / `iretq`.
    Int80 = 2,
}

/// System calls taken through `path` so far.
pub fn count(path: Path) -> u64 {
    BY_PATH[path as usize].load(Ordering::Relaxed)
}

extern "C" {
    fn guest_syscall_entry();
    fn guest_sysenter_entry();
}

/// RFLAGS bits SYSCALL clears: TF, IF, DF, NT, AC.
const FMASK: u64 = 1 << 8 | 1 << 9 | 1 << 10 | 1 << 14 | 1 << 18;

/// Programs the SYSCALL and SYSENTER MSRs and the GS bases.
pub fn init() {
    let percpu = PERCPU.0.get();
    let layout = gdt::layout();
    // Boot CPU, interrupts off: no system call or trap can use these MSRs before they are all
    // set. The entries are the stubs in asm/trap.S and the selectors are the active layout's,
    // which gdt.rs loaded and checked against what SYSCALL, SYSRET, SYSENTER and SYSEXIT
    // compute from these MSRs.
    // SAFETY: `percpu` points at the static PERCPU block, which nothing else accesses yet.
    unsafe { (*percpu).self_ptr = percpu as u64 };
    // SAFETY: the kernel's GS base is the per-CPU block the entry stubs address through `gs:`.
    unsafe { arch::wrmsr(msr::GS_BASE, percpu as u64) };
    // SAFETY: the base `swapgs` gives user code; the kernel never addresses through it.
    unsafe { arch::wrmsr(msr::KERNEL_GS_BASE, 0) };
    // SAFETY: FS is only used by user code (its TLS page, set per process by the scheduler).
    unsafe { arch::wrmsr(msr::FS_BASE, 0) };
    // SAFETY: the layout's kernel code selector for SYSCALL and SYSRET base (see above).
    unsafe {
        arch::wrmsr(
            msr::STAR,
            (layout.sysret_base as u64) << 48 | (layout.kernel_code as u64) << 32,
        )
    };
    // SAFETY: SYSCALL's entry is the `guest_syscall_entry` stub.
    unsafe { arch::wrmsr(msr::LSTAR, guest_syscall_entry as *const () as u64) };
    // SAFETY: SYSCALL clears TF, IF, DF, NT and AC, so the stub starts with interrupts off.
    unsafe { arch::wrmsr(msr::FMASK, FMASK) };
    // SAFETY: sets only SCE (SYSCALL/SYSRET enable), with LSTAR, STAR and FMASK now set; the
    // other EFER bits are written back as read.
    unsafe { arch::wrmsr(msr::EFER, arch::rdmsr(msr::EFER) | msr::EFER_SCE) };
    // SAFETY: the layout's SYSENTER code selector (see above).
    unsafe { arch::wrmsr(msr::SYSENTER_CS, layout.sysenter_cs as u64) };
    // SAFETY: SYSENTER's entry is the `guest_sysenter_entry` stub (SYSENTER_ESP is set per process by
    // `set_kernel_stack` before any user code runs).
    unsafe { arch::wrmsr(msr::SYSENTER_EIP, guest_sysenter_entry as *const () as u64) };
}

/// Points SYSCALL (per-CPU block) and SYSENTER (IA32_SYSENTER_ESP) at a process's kernel stack.
pub fn set_kernel_stack(top: u64) {
    let percpu = PERCPU.0.get();
    // SAFETY: `percpu` points at the static PERCPU block; interrupts are off (scheduler or
    // init), so the SYSCALL entry, its only other user, cannot run until the next system call.
    unsafe { (*percpu).kernel_rsp = top };
    // SAFETY: SYSENTER_ESP is read only by the next SYSENTER, which then runs on `top`, the
    // process's kernel stack.
    unsafe { arch::wrmsr(msr::SYSENTER_ESP, top) };
}

/// The per-CPU block's address, and what `gs:[0]` reads now (equal while GS is the kernel's).
pub fn gs_self_check() -> (u64, u64) {
    let seen: u64;
    // SAFETY: GS.base is the per-CPU block in the kernel; reading its first word.
    unsafe { core::arch::asm!("mov {}, gs:[0]", out(reg) seen, options(nostack, readonly)) };
    (PERCPU.0.get() as u64, seen)
}

extern "C" {
    fn copy_user(dst: *mut u8, src: *const u8, len: u64) -> i64;
}

/// True when `[addr, addr + len)` lies in the user half.
fn user_range(addr: u64, len: u64) -> bool {
    addr >= crate::memory::USER_IMAGE_VA
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= crate::memory::USER_HALF_END)
}

/// Copies user bytes into `dst`; Err(-EFAULT) when the range is not (or not all) user memory.
pub fn copy_from_user(dst: &mut [u8], src: u64) -> Result<(), i64> {
    if !user_range(src, dst.len() as u64) {
        return Err(-EFAULT);
    }
    // SAFETY: dst is a kernel buffer of that length; src faults are fixed up by trap.rs.
    match unsafe { copy_user(dst.as_mut_ptr(), src as *const u8, dst.len() as u64) } {
        0 => Ok(()),
        e => Err(e),
    }
}

/// Copies bytes to user memory at `dst`.
pub fn copy_to_user(dst: u64, src: &[u8]) -> Result<(), i64> {
    if !user_range(dst, src.len() as u64) {
        return Err(-EFAULT);
    }
    // SAFETY: as for copy_from_user, the other way round.
    match unsafe { copy_user(dst as *mut u8, src.as_ptr(), src.len() as u64) } {
        0 => Ok(()),
        e => Err(e),
    }
}

/// Called by the SYSCALL and SYSENTER entries.
#[no_mangle]
extern "C" fn syscall_dispatch(frame: &mut TrapFrame) {
    dispatch(frame);
}

/// Runs the system call in the frame (from any path) and stores the result in RAX.
pub fn dispatch(frame: &mut TrapFrame) {
    let path = match frame.vector {
        0x100 => Path::Syscall,
        0x101 => Path::Sysenter,
        _ => Path::Int80,
    };
    BY_PATH[path as usize].fetch_add(1, Ordering::Relaxed);
    let (a, b) = (frame.rdi, frame.rsi);
    let result: i64 = match frame.rax {
        SYS_WRITE => sys_write(a, b),
        SYS_GETPID => process::current_pid() as i64,
        SYS_YIELD => {
            process::schedule();
            0
        }
        SYS_SLEEP => {
            process::sleep(a);
            0
        }
        SYS_EXIT => process::exit_current(a),
        SYS_SPAWN => match process::spawn(a, b) {
            Ok(pid) => pid as i64,
            Err(e) => e.errno(),
        },
        SYS_WAIT => sys_wait(a, b),
        SYS_BRK => process::brk(a) as i64,
        SYS_UPTIME => process::ticks() as i64,
        _ => -ENOSYS,
    };
    frame.rax = result as u64;
}

fn sys_write(buf: u64, len: u64) -> i64 {
    let mut chunk = [0u8; 128];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len() as u64) as usize;
        if let Err(e) = copy_from_user(&mut chunk[..n], buf.wrapping_add(done)) {
            return if done > 0 { done as i64 } else { e };
        }
        serial::write_bytes(&chunk[..n]);
        done += n as u64;
    }
    len as i64
}

fn sys_wait(pid: u64, status_ptr: u64) -> i64 {
    if status_ptr != 0 && !user_range(status_ptr, 8) {
        return -EFAULT;
    }
    match process::wait(pid, None) {
        None => -abi::ECHILD,
        Some(r) => {
            if status_ptr != 0 {
                if let Err(e) = copy_to_user(status_ptr, &r.status.to_le_bytes()) {
                    return e;
                }
            }
            r.pid as i64
        }
    }
}
