//! The user programs built into the image, and the kernel's table of them.
//!
//! The programs run at Ring 3 in every process's PML4 slot 1 (`memory::USER_IMAGE_VA`). Their
//! code is in `.user.text` and their constants in `.user.rodata`, sections the linker script
//! places 512 GiB away from the kernel: any reference from user code to kernel code or data
//! (a helper that was not inlined, a panic path, a `memcpy`) cannot be encoded and fails the
//! link, so user code provably depends on nothing a Ring-3 process cannot reach. Hence the
//! style of `programs`: `#[inline(always)]` helpers, raw pointers instead of indexing, inline
//! assembly for the deliberate faults.

pub mod programs;
pub mod sys;

/// A built-in program.
#[derive(Clone, Copy, Debug)]
pub struct Program {
    /// Its name (in kill messages).
    pub name: &'static str,
    /// Its entry point (a user virtual address).
    pub entry: u64,
}

type Entry = extern "C" fn(u64) -> !;

/// Program numbers (the `spawn` system call's first argument).
pub mod id {
    /// Prints a greeting through `int 0x80`.
    pub const HELLO: u64 = 0;
    /// Exercises one system-call path (arg: 0 SYSCALL, 1 SYSENTER, 2 `int 0x80`).
    pub const PATHS: u64 = 1;
    /// Burns CPU for `arg` ticks without yielding.
    pub const SPINNER: u64 = 2;
    /// Yields `arg` times, checking its heap word is still its own pid.
    pub const PINGPONG: u64 = 3;
    /// Heap and stack demand-zero paging, brk growth and shrink.
    pub const MEMORY: u64 = 4;
    /// Spawns children and waits for them.
    pub const SPAWNER: u64 = 5;
    /// Exits with status `arg`.
    pub const EXITER: u64 = 6;
    /// Sleeps `arg` ticks and checks the uptime moved that far.
    pub const SLEEPER: u64 = 7;
    /// Reads address 0.
    pub const NULL_DEREF: u64 = 8;
    /// Writes to its own (read-only) code.
    pub const WRITE_TEXT: u64 = 9;
    /// Reads kernel memory.
    pub const READ_KERNEL: u64 = 10;
    /// Executes `ud2`.
    pub const UD2: u64 = 11;
    /// Divides by zero.
    pub const DIVIDE_ZERO: u64 = 12;
    /// Reads a non-canonical address.
    pub const NON_CANONICAL: u64 = 13;
    /// Executes `cli` at CPL 3.
    pub const CLI: u64 = 14;
    /// Jumps into its (no-execute) heap.
    pub const EXEC_HEAP: u64 = 15;
    /// Times `arg >> 2` null system calls through path `arg & 3`; exits with the cycles.
    pub const BENCH_CALLS: u64 = 16;
    /// Times `arg` demand-zero page faults; exits with the cycles.
    pub const BENCH_FAULTS: u64 = 17;
    /// Yields `arg` times as fast as it can; exits with the cycles.
    pub const BENCH_YIELD: u64 = 18;
    /// A pure compute loop of `arg` iterations; exits with the cycles.
    pub const BENCH_COMPUTE: u64 = 19;
}

/// The programs by number: entry `n` is program `id::*` = `n` (a slice, so adding one is adding
/// a line here and its `id`).
static PROGRAMS: &[(&str, Entry)] = &[
    ("hello", programs::hello),
    ("paths", programs::paths),
    ("spinner", programs::spinner),
    ("pingpong", programs::pingpong),
    ("memory", programs::memory),
    ("spawner", programs::spawner),
    ("exiter", programs::exiter),
    ("sleeper", programs::sleeper),
    ("null-deref", programs::null_deref),
    ("write-text", programs::write_text),
    ("read-kernel", programs::read_kernel),
    ("ud2", programs::ud2),
    ("divide-zero", programs::divide_zero),
    ("non-canonical", programs::non_canonical),
    ("cli", programs::cli),
    ("exec-heap", programs::exec_heap),
    ("bench-calls", programs::bench_calls),
    ("bench-faults", programs::bench_faults),
    ("bench-yield", programs::bench_yield),
    ("bench-compute", programs::bench_compute),
];

/// Program number `n`.
pub fn program(n: u64) -> Option<Program> {
    let (name, entry) = PROGRAMS.get(usize::try_from(n).ok()?)?;
    // A volatile read, so the compiler loads the (absolute, link-time) address from the table
    // instead of materialising it with a RIP-relative `lea`, which cannot reach slot 1.
    // SAFETY: reading an initialised static.
    let entry = unsafe { core::ptr::read_volatile(entry) };
    Some(Program {
        name,
        entry: entry as usize as u64,
    })
}
