//! User side of the system-call ABI (`abi`): one stub per entry path, all inlined into the
//! programs (see the parent module for why).

use crate::abi::*;
use core::arch::asm;

/// The address of a user static or function, computed RIP-relative (`lea`). The kernel is
/// compiled for the kernel code model, where `&STATIC as u64` becomes a sign-extended 32-bit
/// absolute that cannot hold a slot-1 address; a RIP-relative `lea` within the user sections
/// always reaches.
macro_rules! user_addr {
    ($sym:path) => {{
        let addr: u64;
        // SAFETY: computes an address; no memory is accessed.
        unsafe {
            core::arch::asm!("lea {}, [rip + {}]", out(reg) addr, sym $sym,
                             options(nomem, nostack, preserves_flags))
        };
        addr
    }};
}
pub(crate) use user_addr;

/// Which instruction enters the kernel.
pub const PATH_SYSCALL: u64 = 0;
/// SYSENTER.
pub const PATH_SYSENTER: u64 = 1;
/// `int 0x80`.
pub const PATH_INT80: u64 = 2;

/// SYSCALL: RCX and R11 are clobbered by the CPU.
#[inline(always)]
pub fn syscall(nr: u64, a: u64, b: u64, c: u64) -> i64 {
    let r: i64;
    // SAFETY: the kernel preserves every register but RAX, RCX, R11 and reads/writes only the
    // user memory the call names.
    unsafe {
        asm!("syscall", inlateout("rax") nr as i64 => r, in("rdi") a, in("rsi") b, in("r10") c,
             out("rcx") _, out("r11") _, options(nostack))
    };
    r
}

/// SYSENTER: we pass our RSP in RCX and the return RIP in RDX (SYSEXIT's inputs).
#[inline(always)]
pub fn sysenter(nr: u64, a: u64, b: u64, c: u64) -> i64 {
    let r: i64;
    // SAFETY: as for `syscall`; RCX and RDX are ours to give, RFLAGS is declared clobbered.
    unsafe {
        asm!("mov rcx, rsp", "lea rdx, [rip + 2f]", "sysenter", "2:",
             inlateout("rax") nr as i64 => r, in("rdi") a, in("rsi") b, in("r10") c,
             out("rcx") _, out("rdx") _, options(nostack))
    };
    r
}

/// `int 0x80`: nothing but RAX changes.
#[inline(always)]
pub fn int80(nr: u64, a: u64, b: u64, c: u64) -> i64 {
    let r: i64;
    // SAFETY: as for `syscall`.
    unsafe {
        asm!("int 0x80", inlateout("rax") nr as i64 => r, in("rdi") a, in("rsi") b, in("r10") c,
             options(nostack))
    };
    r
}

/// A system call through `path`.
#[inline(always)]
pub fn call(path: u64, nr: u64, a: u64, b: u64, c: u64) -> i64 {
    if path == PATH_SYSCALL {
        syscall(nr, a, b, c)
    } else if path == PATH_SYSENTER {
        sysenter(nr, a, b, c)
    } else {
        int80(nr, a, b, c)
    }
}

/// exit(status) through `path`.
#[inline(always)]
pub fn exit(path: u64, status: u64) -> ! {
    call(path, SYS_EXIT, status, 0, 0);
    // exit does not return; if it did, fault rather than run on.
    // SAFETY: ud2 only raises #UD, which kills this process.
    unsafe { asm!("ud2", options(noreturn)) }
}

/// getpid() with six registers the kernel must preserve (R8, R9, R12-R15) set to known values;
/// true when they all come back unchanged and RAX holds the pid.
#[inline(always)]
pub fn registers_preserved(path: u64, pid: u64) -> bool {
    let (mut r8, mut r9, mut r12, mut r13, mut r14, mut r15) = (
        0x8888_0000_0000_0008u64,
        0x9999_0000_0000_0009u64,
        0x1212_0000_0000_0012u64,
        0x1313_0000_0000_0013u64,
        0x1414_0000_0000_0014u64,
        0x1515_0000_0000_0015u64,
    );
    let (mut rdi, mut rsi, mut r10) = (0xD1D1u64, 0x5151u64, 0x1010u64);
    let r: u64;
    if path == PATH_SYSCALL {
        // SAFETY: as for `syscall`: getpid touches no memory; every register involved is
        // declared, RCX and R11 as clobbered by the CPU.
        unsafe {
            asm!("syscall", inlateout("rax") SYS_GETPID => r, inout("rdi") rdi, inout("rsi") rsi,
                 inout("r10") r10, inout("r8") r8, inout("r9") r9, inout("r12") r12,
                 inout("r13") r13, inout("r14") r14, inout("r15") r15,
                 out("rcx") _, out("r11") _, options(nostack));
        }
    } else if path == PATH_SYSENTER {
        // SAFETY: as for `sysenter`: every register involved is declared, RCX and RDX (our RSP
        // and return RIP for SYSEXIT) as clobbered.
        unsafe {
            asm!("mov rcx, rsp", "lea rdx, [rip + 2f]", "sysenter", "2:",
                 inlateout("rax") SYS_GETPID => r, inout("rdi") rdi, inout("rsi") rsi,
                 inout("r10") r10, inout("r8") r8, inout("r9") r9, inout("r12") r12,
                 inout("r13") r13, inout("r14") r14, inout("r15") r15,
                 out("rcx") _, out("rdx") _, options(nostack));
        }
    } else {
        // SAFETY: as for `int80`: only RAX changes, and every register involved is declared.
        unsafe {
            asm!("int 0x80", inlateout("rax") SYS_GETPID => r, inout("rdi") rdi,
                 inout("rsi") rsi, inout("r10") r10, inout("r8") r8, inout("r9") r9,
                 inout("r12") r12, inout("r13") r13, inout("r14") r14, inout("r15") r15,
                 options(nostack));
        }
    }
    r == pid
        && (rdi, rsi, r10) == (0xD1D1, 0x5151, 0x1010)
        && r8 == 0x8888_0000_0000_0008
        && r9 == 0x9999_0000_0000_0009
        && r12 == 0x1212_0000_0000_0012
        && r13 == 0x1313_0000_0000_0013
        && r14 == 0x1414_0000_0000_0014
        && r15 == 0x1515_0000_0000_0015
}

/// The pid stored in this process's TLS page, read through FS (`mov rax, fs:[0]`): FS.base is
/// the kernel's per-process IA32_FS_BASE.
#[inline(always)]
pub fn tls_pid() -> u64 {
    let pid: u64;
    // SAFETY: FS.base points at this process's read-only TLS page.
    unsafe { asm!("mov {}, fs:[0]", out(reg) pid, options(nostack, readonly, preserves_flags)) };
    pid
}

/// `rdtsc` between `lfence`s (user mode may read the TSC: CR4.TSD is clear).
#[inline(always)]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: no memory effects.
    unsafe {
        asm!("lfence", "rdtsc", "lfence", out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    (hi as u64) << 32 | lo as u64
}

/// Reads 8 bytes at `addr` (a deliberate fault when it is not readable).
#[inline(always)]
pub fn read(addr: u64) -> u64 {
    let v: u64;
    // SAFETY: a raw load; a fault kills only this process.
    unsafe { asm!("mov {}, [{}]", out(reg) v, in(reg) addr, options(nostack, readonly)) };
    v
}

/// Writes 8 bytes at `addr` (a deliberate fault when it is not writable).
#[inline(always)]
pub fn write(addr: u64, v: u64) {
    // SAFETY: a raw store into this process's own memory, or a fault that kills it.
    unsafe { asm!("mov [{}], {}", in(reg) addr, in(reg) v, options(nostack)) };
}
