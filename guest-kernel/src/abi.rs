//! The system-call ABI shared by the kernel (`syscall`) and the user programs (`user`).
//!
//! Number in RAX, arguments in RDI, RSI, R10, result in RAX (negative = `-errno`). Clobbered by
//! the entry path: SYSCALL clobbers RCX and R11 (the CPU's return RIP and RFLAGS), SYSENTER
//! clobbers RCX and RDX (the user passes its RSP and return RIP there, SYSEXIT takes them back)
//! and RFLAGS other than IF, `int 0x80` clobbers nothing. Every other register is preserved.

/// write(buf, len) -> len: prints the bytes on the console.
pub const SYS_WRITE: u64 = 0;
/// getpid() -> pid.
pub const SYS_GETPID: u64 = 1;
/// yield() -> 0: gives up the CPU to the next runnable process.
pub const SYS_YIELD: u64 = 2;
/// sleep(ticks) -> 0: returns after at least `ticks` timer ticks.
pub const SYS_SLEEP: u64 = 3;
/// exit(status): never returns.
pub const SYS_EXIT: u64 = 4;
/// spawn(program, arg) -> pid: starts built-in program number `program` with `arg` in RDI.
pub const SYS_SPAWN: u64 = 5;
/// wait(pid, *status) -> pid: waits for child `pid` (0 = any child) to end, stores its status.
pub const SYS_WAIT: u64 = 6;
/// brk(new_break) -> break: moves the end of the demand-zero heap (0 = query).
pub const SYS_BRK: u64 = 7;
/// uptime() -> ticks since boot.
pub const SYS_UPTIME: u64 = 8;

/// A bad pointer.
pub const EFAULT: i64 = 14;
/// No such child.
pub const ECHILD: i64 = 10;
/// The process table is full.
pub const EAGAIN: i64 = 11;
/// Out of memory.
pub const ENOMEM: i64 = 12;
/// A bad argument.
pub const EINVAL: i64 = 22;
/// No such system call.
pub const ENOSYS: i64 = 38;

/// Exit status of a process killed by exception `v`: `KILLED_BY_EXCEPTION + v`.
pub const KILLED_BY_EXCEPTION: u64 = 0x1000;
/// Exit status of a process the kernel stopped because it ran past its deadline.
pub const KILLED_TIMEOUT: u64 = 0x2000;
