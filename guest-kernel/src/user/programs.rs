//! The programs. Each is an `extern "C" fn(arg) -> !` in `.user.text`, entered at CPL 3 with
//! RDI = arg and RSP near the top of its demand-zero stack; each ends with `exit`. Exit status 0
//! means every step passed; any other value names the first step that failed (the self-test
//! prints it).

use super::sys::{
    self, call, exit, read, user_addr, write, PATH_INT80, PATH_SYSCALL, PATH_SYSENTER,
};
use crate::abi::*;
use crate::memory::{PAGE, USER_HEAP_MAX, USER_HEAP_START, USER_STACK_TOP};
use core::arch::asm;

macro_rules! user_bytes {
    ($name:ident = $s:expr) => {
        #[link_section = ".user.rodata"]
        static $name: [u8; $s.len()] = *$s;
    };
}

user_bytes!(HELLO_A = b"user: hello from pid ");
user_bytes!(HELLO_B = b" through int 0x80\n");
user_bytes!(VIA_SYSCALL = b"user: write through SYSCALL\n");
user_bytes!(VIA_SYSENTER = b"user: write through SYSENTER\n");
user_bytes!(VIA_INT80 = b"user: write through int 0x80\n");

/// A kernel address (the image starts at 2 MiB): present, supervisor-only.
pub const KERNEL_ADDR: u64 = 0x20_0000;

/// Writes `len` bytes at user address `addr`.
#[inline(always)]
fn write_str(path: u64, addr: u64, len: usize) -> i64 {
    call(path, SYS_WRITE, addr, len as u64, 0)
}

/// Writes `n` in decimal; returns the bytes written.
#[inline(always)]
fn write_decimal(path: u64, mut n: u64) -> i64 {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        // SAFETY: i < 20: a u64 has at most 20 decimal digits, so the offset stays inside buf.
        let digit = unsafe { buf.as_mut_ptr().add(i) };
        // SAFETY: `digit` points at byte i of buf, which we own.
        unsafe { digit.write(b'0' + (n % 10) as u8) };
        n /= 10;
        if n == 0 {
            break;
        }
    }
    // SAFETY: [i, 20) is inside buf.
    let ptr = unsafe { buf.as_ptr().add(i) };
    call(path, SYS_WRITE, ptr as u64, (buf.len() - i) as u64, 0)
}

/// A loop body the compiler cannot remove or vectorise.
#[inline(always)]
fn opaque(x: u64) -> u64 {
    let mut x = x;
    // SAFETY: an empty asm statement that "may change" x.
    unsafe { asm!("/* {0} */", inout(reg) x, options(nomem, nostack, preserves_flags)) };
    x
}

/// Greets through `int 0x80`; exits with the number of bytes written.
#[link_section = ".user.text"]
pub extern "C" fn hello(_: u64) -> ! {
    let p = PATH_INT80;
    let pid = call(p, SYS_GETPID, 0, 0, 0) as u64;
    let n = write_str(p, user_addr!(HELLO_A), HELLO_A.len())
        + write_decimal(p, pid)
        + write_str(p, user_addr!(HELLO_B), HELLO_B.len());
    exit(p, n as u64)
}

/// Every system call that returns a checkable value, through path `arg`.
#[link_section = ".user.text"]
pub extern "C" fn paths(path: u64) -> ! {
    let pid = call(path, SYS_GETPID, 0, 0, 0);
    if pid <= 0 || pid as u64 != sys::tls_pid() {
        exit(path, 1);
    }
    let t0 = call(path, SYS_UPTIME, 0, 0, 0);
    let t1 = call(path, SYS_UPTIME, 0, 0, 0);
    if t0 < 0 || t1 < t0 {
        exit(path, 2);
    }
    if call(path, 999, 0, 0, 0) != -ENOSYS {
        exit(path, 3);
    }
    if !sys::registers_preserved(path, pid as u64) {
        exit(path, 4);
    }
    let (msg, len) = if path == PATH_SYSCALL {
        (user_addr!(VIA_SYSCALL), VIA_SYSCALL.len())
    } else if path == PATH_SYSENTER {
        (user_addr!(VIA_SYSENTER), VIA_SYSENTER.len())
    } else {
        (user_addr!(VIA_INT80), VIA_INT80.len())
    };
    if write_str(path, msg, len) != len as i64 {
        exit(path, 5);
    }
    if call(path, SYS_WRITE, KERNEL_ADDR, 8, 0) != -EFAULT {
        exit(path, 6);
    }
    if call(path, SYS_BRK, 0, 0, 0) != USER_HEAP_START as i64 {
        exit(path, 7);
    }
    if call(path, SYS_YIELD, 0, 0, 0) != 0 {
        exit(path, 8);
    }
    exit(path, 0)
}

/// Computes without yielding until `ticks` timer ticks have passed (SYSCALL for uptime).
#[link_section = ".user.text"]
pub extern "C" fn spinner(ticks: u64) -> ! {
    let p = PATH_SYSCALL;
    let start = call(p, SYS_UPTIME, 0, 0, 0);
    let mut x = 1u64;
    loop {
        for _ in 0..10_000 {
            x = opaque(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1));
        }
        if call(p, SYS_UPTIME, 0, 0, 0) - start >= ticks as i64 {
            break;
        }
    }
    opaque(x);
    exit(p, 0)
}

/// Writes its pid into its first heap page, then yields `rounds` times checking that the word
/// is still its own: another pingpong writes its pid at the same address in its own address
/// space (SYSENTER).
#[link_section = ".user.text"]
pub extern "C" fn pingpong(rounds: u64) -> ! {
    let p = PATH_SYSENTER;
    let pid = call(p, SYS_GETPID, 0, 0, 0) as u64;
    let base = call(p, SYS_BRK, 0, 0, 0) as u64;
    if call(p, SYS_BRK, base + PAGE, 0, 0) as u64 != base + PAGE {
        exit(p, 1);
    }
    if read(base) != 0 {
        exit(p, 2);
    }
    write(base, pid);
    for _ in 0..rounds {
        call(p, SYS_YIELD, 0, 0, 0);
        if read(base) != pid {
            exit(p, 3);
        }
    }
    exit(p, 0)
}

/// Demand-zero heap and stack, brk limits, and a shrink that must drop the old page (SYSCALL).
#[link_section = ".user.text"]
pub extern "C" fn memory(_: u64) -> ! {
    let p = PATH_SYSCALL;
    let base = call(p, SYS_BRK, 0, 0, 0) as u64;
    if base != USER_HEAP_START {
        exit(p, 1);
    }
    if call(p, SYS_BRK, base + 3 * PAGE, 0, 0) as u64 != base + 3 * PAGE {
        exit(p, 2);
    }
    let mut a = base;
    while a < base + 3 * PAGE {
        if read(a) != 0 {
            exit(p, 3);
        }
        a += 8;
    }
    a = base;
    while a < base + 3 * PAGE {
        write(a, a ^ 0x5A5A);
        a += 8;
    }
    a = base;
    while a < base + 3 * PAGE {
        if read(a) != a ^ 0x5A5A {
            exit(p, 4);
        }
        a += 8;
    }
    let deep = USER_STACK_TOP - 200 * 1024;
    if read(deep) != 0 {
        exit(p, 5);
    }
    write(deep, 0x55);
    if read(deep) != 0x55 {
        exit(p, 6);
    }
    if call(p, SYS_BRK, USER_HEAP_START + USER_HEAP_MAX + PAGE, 0, 0) as u64 != base + 3 * PAGE {
        exit(p, 7);
    }
    // Shrink to one page and grow back: the second page was unmapped (and its TLB entry
    // invalidated), so it must read zero again, not the pattern.
    if call(p, SYS_BRK, base + PAGE, 0, 0) as u64 != base + PAGE {
        exit(p, 8);
    }
    if call(p, SYS_BRK, base + 2 * PAGE, 0, 0) as u64 != base + 2 * PAGE {
        exit(p, 9);
    }
    if read(base + PAGE) != 0 || read(base) != base ^ 0x5A5A {
        exit(p, 10);
    }
    exit(p, 0)
}

/// Spawns children and collects them (`int 0x80`): a normal exit, a wait with no child left,
/// a child killed by a fault, a bad program number.
#[link_section = ".user.text"]
pub extern "C" fn spawner(_: u64) -> ! {
    let p = PATH_INT80;
    let mut status = 0u64;
    let status_ptr = &raw mut status as u64;
    let child = call(p, SYS_SPAWN, super::id::EXITER, 42, 0);
    if child <= 0 {
        exit(p, 1);
    }
    if call(p, SYS_WAIT, child as u64, status_ptr, 0) != child {
        exit(p, 2);
    }
    // SAFETY: the kernel wrote the status into this local.
    if unsafe { core::ptr::read_volatile(&raw const status) } != 42 {
        exit(p, 3);
    }
    if call(p, SYS_WAIT, 0, status_ptr, 0) != -ECHILD {
        exit(p, 4);
    }
    let victim = call(p, SYS_SPAWN, super::id::NULL_DEREF, 0, 0);
    if victim <= 0 || call(p, SYS_WAIT, 0, status_ptr, 0) != victim {
        exit(p, 5);
    }
    // SAFETY: as above.
    if unsafe { core::ptr::read_volatile(&raw const status) } != KILLED_BY_EXCEPTION + 14 {
        exit(p, 6);
    }
    if call(p, SYS_SPAWN, 9999, 0, 0) != -EINVAL {
        exit(p, 7);
    }
    if call(p, SYS_WAIT, child as u64, KERNEL_ADDR, 0) != -EFAULT {
        exit(p, 8);
    }
    exit(p, 0)
}

/// Exits with `status` (SYSCALL).
#[link_section = ".user.text"]
pub extern "C" fn exiter(status: u64) -> ! {
    exit(PATH_SYSCALL, status)
}

/// Sleeps `ticks` and checks the uptime moved at least that far (SYSENTER).
#[link_section = ".user.text"]
pub extern "C" fn sleeper(ticks: u64) -> ! {
    let p = PATH_SYSENTER;
    let t0 = call(p, SYS_UPTIME, 0, 0, 0);
    if call(p, SYS_SLEEP, ticks, 0, 0) != 0 {
        exit(p, 1);
    }
    let t1 = call(p, SYS_UPTIME, 0, 0, 0);
    exit(p, if t1 - t0 >= ticks as i64 { 0 } else { 2 })
}

/// Reads address 0 (not present): #PF.
#[link_section = ".user.text"]
pub extern "C" fn null_deref(_: u64) -> ! {
    let v = read(0);
    exit(PATH_INT80, v | 1)
}

/// Writes to its own code (present, read-only): #PF.
#[link_section = ".user.text"]
pub extern "C" fn write_text(_: u64) -> ! {
    write(user_addr!(write_text), 0xCC);
    exit(PATH_INT80, 1)
}

/// Reads kernel memory (present, supervisor-only): #PF.
#[link_section = ".user.text"]
pub extern "C" fn read_kernel(_: u64) -> ! {
    let v = read(KERNEL_ADDR);
    exit(PATH_INT80, v | 1)
}

/// `ud2`: #UD.
#[link_section = ".user.text"]
pub extern "C" fn ud2(_: u64) -> ! {
    // SAFETY: raises #UD, which kills this process.
    unsafe { asm!("ud2", options(nomem, nostack)) };
    exit(PATH_INT80, 1)
}

/// `div` by zero: #DE.
#[link_section = ".user.text"]
pub extern "C" fn divide_zero(arg: u64) -> ! {
    let q: u64;
    // SAFETY: raises #DE (arg is 0), which kills this process.
    unsafe {
        asm!("xor edx, edx", "div {}", in(reg) arg, inlateout("rax") 7u64 => q, out("rdx") _,
             options(nomem, nostack))
    };
    exit(PATH_INT80, q | 1)
}

/// Reads a non-canonical address: #GP.
#[link_section = ".user.text"]
pub extern "C" fn non_canonical(_: u64) -> ! {
    let v = read(0x8000_0000_0000_0000);
    exit(PATH_INT80, v | 1)
}

/// `cli` at CPL 3 with IOPL 0: #GP.
#[link_section = ".user.text"]
pub extern "C" fn cli(_: u64) -> ! {
    // SAFETY: raises #GP at CPL 3, which kills this process.
    unsafe { asm!("cli", options(nomem, nostack)) };
    exit(PATH_INT80, 1)
}

/// Puts a `ret` in its heap and calls it: the heap is no-execute, so #PF (instruction fetch).
#[link_section = ".user.text"]
pub extern "C" fn exec_heap(_: u64) -> ! {
    let p = PATH_INT80;
    let base = call(p, SYS_BRK, 0, 0, 0) as u64;
    call(p, SYS_BRK, base + PAGE, 0, 0);
    write(base, 0xC3);
    // SAFETY: the call faults (NX) and kills this process; were it to run, it would return.
    unsafe { asm!("call {}", in(reg) base, clobber_abi("C")) };
    exit(p, 1)
}

/// `arg >> 2` null system calls (getpid) through path `arg & 3`; exits with the cycles they
/// took minus the same loop without the call.
#[link_section = ".user.text"]
pub extern "C" fn bench_calls(arg: u64) -> ! {
    let (path, n) = (arg & 3, arg >> 2);
    let t0 = sys::rdtsc();
    for i in 0..n {
        opaque(i);
    }
    let t1 = sys::rdtsc();
    for _ in 0..n {
        call(path, SYS_GETPID, 0, 0, 0);
    }
    let t2 = sys::rdtsc();
    exit(PATH_SYSCALL, (t2 - t1).saturating_sub(t1 - t0))
}

/// Touches `n` fresh heap pages (one demand-zero fault each); exits with their cycles minus a
/// second pass over the same, now mapped, pages.
#[link_section = ".user.text"]
pub extern "C" fn bench_faults(n: u64) -> ! {
    let p = PATH_SYSCALL;
    let base = call(p, SYS_BRK, 0, 0, 0) as u64;
    if call(p, SYS_BRK, base + n * PAGE, 0, 0) as u64 != base + n * PAGE {
        exit(p, u64::MAX);
    }
    let t0 = sys::rdtsc();
    for i in 0..n {
        write(base + i * PAGE, i);
    }
    let t1 = sys::rdtsc();
    for i in 0..n {
        write(base + i * PAGE, i);
    }
    let t2 = sys::rdtsc();
    exit(p, (t1 - t0).saturating_sub(t2 - t1))
}

/// Yields `n` times (SYSCALL); exits with the cycles.
#[link_section = ".user.text"]
pub extern "C" fn bench_yield(n: u64) -> ! {
    let p = PATH_SYSCALL;
    let t0 = sys::rdtsc();
    for _ in 0..n {
        call(p, SYS_YIELD, 0, 0, 0);
    }
    let t1 = sys::rdtsc();
    exit(p, t1 - t0)
}

/// `n` rounds of a multiply-add in user mode; exits with the cycles of the whole loop. Unlike
/// the other ops nothing is subtracted: the point is what code that never traps pays in total
/// (natively nothing extra; under a VMM the timer interrupts it takes on the way).
#[link_section = ".user.text"]
pub extern "C" fn bench_compute(n: u64) -> ! {
    let mut x = 1u64;
    let t1 = sys::rdtsc();
    for _ in 0..n {
        x = opaque(
            x.wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407),
        );
    }
    let t2 = sys::rdtsc();
    opaque(x);
    exit(PATH_SYSCALL, t2 - t1)
}
