//! A guest kernel that executes random bytes: round after round it fills a buffer with bytes
//! from a seeded generator and jumps into it at (virtual) CPL 0; every exception lands in a
//! handler that abandons the round and starts the next. Whatever the bytes do — privileged
//! instructions with garbage operands, wild jumps, `hlt`, loads of garbage into CR3 or the
//! IDTR — the VMM must answer as the CPU would or stop the guest cleanly; it must never panic.
//!
//! Command line: `seed=N rounds=N user=0|1 diff=0|1 show=A,B,...` (`user=1`: the rounds run at
//! CPL 3, so every fault is delivered from user mode, as in a real kernel).
//!
//! `diff=1` is the differential mode (`tests/chaos_diff.rs`, docs/testing.md): the same seed
//! runs natively and under the VMM and the host compares what every round produced. For that a
//! round is deterministic: it starts from a register state drawn from the seed (all general
//! registers, the arithmetic flags and DF, a stack filled from the seed, a zeroed scratch
//! area that RBX, RSI and RDI point into, the x87 unit reset), and its end — the exception
//! that abandons it — is recorded: vector, error code, RIP, CS, RFLAGS, RSP, SS, CR2 for a
//! #PF, every general register, DS/ES/FS/GS and a digest of its stack and scratch memory. Each
//! round prints one line `r N vVV eERR hDIGEST [rf]` (the vector, the error code or `-`, and
//! a digest of all the rest but RFLAGS.RF, which follows when set); the rounds named in
//! `show=` print every field instead (the host recomputes their bytes from the seed). A
//! differential round runs with interrupts on and the PIT armed as a one-shot of about 55 ms,
//! so a round that loops ends on the timer (`r N timer`: where a loop is when the timer fires
//! is not deterministic, so such a round has no digest). The generator replaces the bytes of
//! instructions whose result cannot be compared (`chaos_rounds::filter`), and the stack words
//! never have RFLAGS.VM set (`chaos_rounds::STACK_WORD_CLEARED`).
#![no_std]
#![no_main]

use test_guests::chaos_rounds::{Rng, BLOB, STACK_WORD_CLEARED, STACK_WORD_SET};
use test_guests::machine::{code64, data, tss_descriptor, PTE_XD};
use test_guests::{boot_info, exit, inb, load_idt, outb, println};

/// The page the rounds run in: each round's bytes (`chaos_rounds::BLOB`) at `CODE_OFFSET`, then
/// a `ud2` so a round that runs off the end faults too, and `int3` everywhere else, refilled
/// every round, so a short jump out of the bytes lands on the same instructions natively and
/// under the VMM (and not on data that may differ, such as the native boot area).
#[repr(C, align(4096))]
struct CodePage([u8; 4096]);
#[no_mangle]
static mut CHAOS_CODE: CodePage = CodePage([0xCC; 4096]);
/// Where in the page a round's bytes start.
const CODE_OFFSET: usize = 2048;

/// The round's stack: RSP starts in the middle of `words`, so pushes and pops both stay
/// inside it. The page below it, `guard`, is left unmapped (`machine`): a round that pushes in
/// a loop page-faults there instead of writing down over this image's code, which would end
/// the run natively and under the VMM alike.
#[repr(C, align(4096))]
struct RoundStack {
    guard: [u8; 4096],
    words: [u64; 512],
}
static mut ROUND_STACK: RoundStack = RoundStack {
    guard: [0; 4096],
    words: [0; 512],
};
/// The memory RBX, RSI and RDI point into (their offsets are drawn in the middle 4 KiB, so a
/// displacement or a short string instruction stays inside).
#[repr(C, align(4096))]
struct Scratch([u8; 12288]);
static mut SCRATCH: Scratch = Scratch([0; 12288]);
/// The interrupt stack every vector switches to (IST1): a round may leave RSP anywhere.
#[repr(C, align(16))]
struct Stack([u64; 2048]);
#[no_mangle]
static mut HANDLER_STACK: Stack = Stack([0; 2048]);
/// The kernel's own stack, from `_start` to the first round.
#[no_mangle]
static mut KERNEL_STACK: Stack = Stack([0; 2048]);

/// Where `chaos_enter` loads the round's registers from before its `iretq`: RAX, RBX, RCX,
/// RDX, RSI, RDI, RBP, R8..R15, then the `iretq` frame RIP, CS, RFLAGS, RSP, SS.
#[repr(C)]
struct Entry([u64; 20]);
#[no_mangle]
static mut ROUND_ENTRY: Entry = Entry([0; 20]);

/// The run's settings, from the command line (written once by `_start`).
#[derive(Clone, Copy)]
struct Settings {
    seed: u64,
    rounds: u64,
    user: bool,
    diff: bool,
    show: [u64; 8],
}
static mut SETTINGS: Settings = Settings {
    seed: 1,
    rounds: 2000,
    user: false,
    diff: false,
    show: [0; 8],
};
static mut ROUND: u64 = 0;

/// Selectors of the guest's GDT: kernel code and data, user data and code (RPL 3), the TSS.
const KERNEL_CS: u64 = 0x08;
const KERNEL_SS: u64 = 0x10;
const USER_SS: u64 = 0x1b;
const USER_CS: u64 = 0x23;
const TSS_SELECTOR: u16 = 0x28;

/// RFLAGS bits a round's start state draws: CF, PF, AF, ZF, SF, OF and DF.
const DRAWN_FLAGS: u64 = 0x0CD5;
/// RFLAGS.IF, and the always-one bit 1.
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_FIXED: u64 = 0x2;

/// The 8259A master (command, data) and the 8254's channel 0 and control ports.
const PIC1: u16 = 0x20;
const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xA1;
const PIT_CHANNEL0: u16 = 0x40;
const PIT_CONTROL: u16 = 0x43;
/// The vector the master PIC is remapped to (IRQ 0, the timer).
const TIMER_VECTOR: u64 = 0x20;

// Every one of the 256 vectors has a 16-byte stub that pushes its number and joins
// `chaos_common`, which saves the registers and calls `round_end`. All gates use IST1, so the
// frame always starts at the top of HANDLER_STACK and `round_end` can tell from where it lies
// whether the CPU pushed an error code (a software `int 14` at CPL 0 pushes none, a #PF does).
// `chaos_enter` starts a round: registers from ROUND_ENTRY, then `iretq` into the code.
core::arch::global_asm!(
    r#"
.section .text
.balign 16
.global chaos_vectors
chaos_vectors:
.set chaos_vector, 0
.rept 256
    .balign 16
    pushq $chaos_vector
    jmp chaos_common
    .set chaos_vector, chaos_vector + 1
.endr
chaos_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    and $-16, %rsp
    cld
    call round_end
    ud2
.global chaos_enter
chaos_enter:
    lea ROUND_ENTRY(%rip), %rsp
    pop %rax
    pop %rbx
    pop %rcx
    pop %rdx
    pop %rsi
    pop %rdi
    pop %rbp
    pop %r8
    pop %r9
    pop %r10
    pop %r11
    pop %r12
    pop %r13
    pop %r14
    pop %r15
    iretq
.global chaos_start_on_own_stack
chaos_start_on_own_stack:
    lea KERNEL_STACK+16384(%rip), %rsp
    call chaos_main
    ud2
"#,
    options(att_syntax)
);

extern "C" {
    static chaos_vectors: u8;
    fn chaos_enter() -> !;
    fn chaos_start_on_own_stack() -> !;
}

/// What `chaos_common` saved, lowest address first: R15..RAX, the vector, then what the CPU
/// pushed (an error code or not, RIP, CS, RFLAGS, RSP, SS).
#[repr(C)]
struct Saved {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    // Then the CPU's words: `[error,] rip, cs, rflags, rsp, ss` (five or six).
}

/// The architectural state a round ended in.
struct Outcome {
    vector: u64,
    error: Option<u64>,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
    /// CR2, for a #PF only (other vectors leave it alone, so it would carry an older fault).
    cr2: Option<u64>,
    /// RAX, RBX, RCX, RDX, RSI, RDI, RBP, R8..R15 (RSP is `rsp`).
    gprs: [u64; 15],
    /// DS, ES, FS, GS.
    segments: [u64; 4],
    /// FNV-1a of the round's stack and scratch memory.
    memory: u64,
}

const GPR_NAMES: [&str; 15] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

/// FNV-1a, 64-bit: a digest that any changed bit changes.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    fn bytes(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn word(&mut self, w: u64) {
        self.bytes(&w.to_le_bytes());
    }
}

/// RFLAGS.RF: left out of the digest and printed apart (`rf`), because QEMU's TCG does not
/// set it in a fault's frame as the SDM says and the VMM does (docs/virtualization-holes.md).
const RFLAGS_RF: u64 = 1 << 16;

impl Outcome {
    fn digest(&self) -> u64 {
        let mut h = Fnv::new();
        for w in [
            self.vector,
            self.rip,
            self.cs,
            self.rflags & !RFLAGS_RF,
            self.rsp,
            self.ss,
            self.cr2.unwrap_or(u64::MAX),
            self.memory,
        ] {
            h.word(w);
        }
        self.gprs
            .iter()
            .chain(&self.segments)
            .for_each(|w| h.word(*w));
        h.0
    }
}

fn settings() -> Settings {
    let settings = core::ptr::addr_of!(SETTINGS);
    // SAFETY: written once by `_start` before any round; read-only afterwards.
    unsafe { settings.read() }
}

/// Fills the code buffer and the start state for `round` and enters it.
fn start_round(round: u64) -> ! {
    let s = settings();
    let mut rng = Rng::for_round(s.seed, round);
    let (code, stack, scratch, entry) = (
        core::ptr::addr_of_mut!(CHAOS_CODE),
        core::ptr::addr_of_mut!(ROUND_STACK),
        core::ptr::addr_of_mut!(SCRATCH),
        core::ptr::addr_of_mut!(ROUND_ENTRY),
    );
    // SAFETY: no round is running (we come from `_start` or `round_end`), so nothing else
    // touches the buffer, the stack, the scratch area or the entry block; one reference each.
    let code = unsafe { &mut *code };
    // SAFETY: as above.
    let stack = unsafe { &mut *stack };
    // SAFETY: as above.
    let scratch = unsafe { &mut *scratch };
    // SAFETY: as above.
    let entry = unsafe { &mut *entry };
    code.0.fill(0xCC);
    let bytes = &mut code.0[CODE_OFFSET..CODE_OFFSET + BLOB + 2];
    bytes[..BLOB].copy_from_slice(&rng.code(s.diff, !s.user));
    bytes[BLOB] = 0x0F;
    bytes[BLOB + 1] = 0x0B;
    let (cleared, set) = if s.diff {
        (STACK_WORD_CLEARED, STACK_WORD_SET)
    } else {
        (0, 0)
    };
    stack
        .words
        .iter_mut()
        .for_each(|w| *w = (rng.next_u64() & !cleared) | set);
    scratch.0.fill(0);
    let scratch_middle = scratch.0.as_ptr() as u64 + 4096;
    let stack_middle = stack.words.as_ptr() as u64 + 2048;
    for (i, value) in entry.0[..15].iter_mut().enumerate() {
        let r = rng.next_u64();
        *value = match GPR_NAMES[i] {
            "rbx" | "rsi" | "rdi" => scratch_middle + (r & 0xFFF),
            "rbp" => stack_middle + (r & 0x3F8) - 0x200,
            // Small counts: a REP string instruction or LOOP ends (inside the scratch area).
            "rcx" => r & 0xFF,
            _ => r,
        };
    }
    let (cs, ss) = if s.user {
        (USER_CS, USER_SS)
    } else {
        (KERNEL_CS, KERNEL_SS)
    };
    let interrupts = if s.diff { RFLAGS_IF } else { 0 };
    entry.0[15] = bytes.as_ptr() as u64;
    entry.0[16] = cs;
    entry.0[17] = (rng.next_u64() & DRAWN_FLAGS) | RFLAGS_FIXED | interrupts;
    entry.0[18] = stack_middle;
    entry.0[19] = ss;
    if s.diff {
        // Mode 0 with the largest count: one IRQ 0 about 55 ms from now, unless the round ends
        // first (`round_end` stops the count).
        outb(PIT_CHANNEL0, 0xFF);
        outb(PIT_CHANNEL0, 0xFF);
    }
    // SAFETY: resets the x87 unit (its state is not compared but a round may read it) and
    // null DS, ES, FS, GS, which are valid at any CPL in 64-bit mode; no memory is touched.
    unsafe {
        core::arch::asm!(
            "fninit",
            "mov ds, {z:e}",
            "mov es, {z:e}",
            "mov fs, {z:e}",
            "mov gs, {z:e}",
            z = in(reg) 0u64,
            options(nostack)
        )
    };
    // SAFETY: `chaos_enter` loads the registers just drawn and `iretq`s into the code buffer
    // just filled; every way out of it is an exception through the IDT, whose every gate leads
    // back to `round_end` on HANDLER_STACK.
    unsafe { chaos_enter() }
}

/// Every vector's handler: records how the round ended, prints it, starts the next round.
#[no_mangle]
extern "C" fn round_end(saved: &Saved) -> ! {
    let s = settings();
    if s.diff {
        // Stop the one-shot (a control word halts the count in mode 0) before anything else.
        outb(PIT_CONTROL, 0x30);
    }
    // The IDT, GDT, TSS and page tables live in writable memory and the round may have written
    // them: rebuild them before anything can fault.
    machine::load();
    let top = core::ptr::addr_of!(HANDLER_STACK) as u64 + 8 * 2048;
    let cpu_words = (saved as *const Saved).wrapping_add(1) as *const u64;
    // The CPU's frame ends at the IST top: six words with an error code, five without.
    let has_error = cpu_words as u64 == top - 48;
    let word = |i: usize| {
        // SAFETY: the five or six words between `saved` and the top of HANDLER_STACK are the
        // frame the CPU pushed; `i` stays below their count.
        let at = unsafe { cpu_words.add(i) };
        // SAFETY: as above: `at` is one of those words.
        unsafe { at.read() }
    };
    let (error, frame) = if has_error {
        (Some(word(0)), [word(1), word(2), word(3), word(4), word(5)])
    } else {
        (None, [word(0), word(1), word(2), word(3), word(4)])
    };
    let vector = saved.vector;
    let timer = s.diff && vector == TIMER_VECTOR && timer_in_service();
    let mut segments = [0u64; 4];
    // SAFETY: reads the data segment registers; no memory effects.
    unsafe {
        core::arch::asm!(
            "mov {0:e}, ds", "mov {1:e}, es", "mov {2:e}, fs", "mov {3:e}, gs",
            out(reg) segments[0], out(reg) segments[1], out(reg) segments[2], out(reg) segments[3],
            options(nomem, nostack)
        )
    };
    let mut memory = Fnv::new();
    let (stack, scratch) = (
        (core::ptr::addr_of!(ROUND_STACK) as *const u8).wrapping_add(4096) as *const [u8; 4096],
        core::ptr::addr_of!(SCRATCH),
    );
    // SAFETY: the round is over; only this handler reads its stack and scratch memory.
    memory.bytes(unsafe { &*stack });
    // SAFETY: as above.
    memory.bytes(unsafe { &(*scratch).0 });
    let outcome = Outcome {
        vector,
        error,
        rip: frame[0],
        cs: frame[1],
        rflags: frame[2],
        rsp: frame[3],
        ss: frame[4],
        cr2: (vector == 14).then(read_cr2),
        gprs: [
            saved.rax, saved.rbx, saved.rcx, saved.rdx, saved.rsi, saved.rdi, saved.rbp, saved.r8,
            saved.r9, saved.r10, saved.r11, saved.r12, saved.r13, saved.r14, saved.r15,
        ],
        segments,
        memory: memory.0,
    };
    // SAFETY: single-threaded guest: nothing else accesses ROUND.
    let round = unsafe { ROUND };
    if timer {
        outb(PIC1, 0x20); // EOI
        if s.diff {
            println(format_args!("r {round} timer"));
        }
    } else if s.show.contains(&round) {
        show(round, &outcome);
    } else if s.diff {
        let rf = if outcome.rflags & RFLAGS_RF != 0 {
            " rf"
        } else {
            ""
        };
        println(format_args!(
            "r {round} v{vector:02x} e{} h{:016x}{rf}",
            ErrorCode(outcome.error),
            outcome.digest()
        ));
    }
    next_round()
}

/// Prints every field of a round's outcome and its bytes, as `show r=N key=value ...` lines
/// of a few fields each (a long line is more than the UART should have to buffer).
fn show(round: u64, o: &Outcome) {
    let code = core::ptr::addr_of!(CHAOS_CODE) as u64 + CODE_OFFSET as u64;
    println(format_args!(
        "show r={round} vec={:#x} err={} rip={:#x} code={code:#x} cs={:#x} rflags={:#x} rsp={:#x} ss={:#x} cr2={}",
        o.vector,
        o.error.map(Hex).unwrap_or(Hex::NONE),
        o.rip,
        o.cs,
        o.rflags,
        o.rsp,
        o.ss,
        o.cr2.map(Hex).unwrap_or(Hex::NONE),
    ));
    for (names, values) in GPR_NAMES.chunks(3).zip(o.gprs.chunks(3)) {
        println(format_args!(
            "show r={round} {}={:#x} {}={:#x} {}={:#x}",
            names[0], values[0], names[1], values[1], names[2], values[2]
        ));
    }
    let [ds, es, fs, gs] = o.segments;
    println(format_args!(
        "show r={round} ds={ds:#x} es={es:#x} fs={fs:#x} gs={gs:#x} memory={:#x}",
        o.memory
    ));
}

/// An error code in a summary line: hex without `0x`, or `-` when the CPU pushed none.
struct ErrorCode(Option<u64>);

impl core::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(e) => write!(f, "{e:x}"),
            None => f.write_str("-"),
        }
    }
}

/// A value printed in hex, or `none` (for an absent error code or CR2).
#[derive(Clone, Copy)]
struct Hex(u64);

impl Hex {
    const NONE: Hex = Hex(u64::MAX);
}

impl core::fmt::Display for Hex {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 == u64::MAX {
            f.write_str("none")
        } else {
            write!(f, "{:#x}", self.0)
        }
    }
}

fn read_cr2() -> u64 {
    let cr2: u64;
    // SAFETY: reads CR2 (the handler runs at CPL 0); no memory effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    cr2
}

/// Whether the master PIC has IRQ 0 in service (OCW3: read the ISR), i.e. vector 0x20 came
/// from the timer and not from an `int 0x20` in the round.
fn timer_in_service() -> bool {
    outb(PIC1, 0x0B);
    let isr = inb(PIC1);
    outb(PIC1, 0x0A);
    isr & 1 != 0
}

/// Counts the round and starts the next, or ends the run after the last.
fn next_round() -> ! {
    let counter = core::ptr::addr_of_mut!(ROUND);
    // SAFETY: single-threaded guest: nothing else accesses ROUND.
    let round = unsafe { counter.read() } + 1;
    // SAFETY: as above.
    unsafe { counter.write(round) };
    if round > settings().rounds {
        println(format_args!("chaos: {} rounds survived", round - 1));
        exit(boot::exit_code::SUCCESS);
    }
    start_round(round)
}

fn arg(cmdline: &str, key: &str, default: u64) -> u64 {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let info = unsafe { boot_info(info) };
    // SAFETY: the contract says the command line is identity-mapped at cmdline_addr.
    let cmdline = unsafe {
        core::slice::from_raw_parts(info.cmdline_addr as *const u8, info.cmdline_len as usize)
    };
    let cmdline = core::str::from_utf8(cmdline).unwrap_or("");
    let mut show = [0u64; 8];
    let listed = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("show="))
        .unwrap_or("");
    for (slot, n) in show
        .iter_mut()
        .zip(listed.split(',').filter_map(|n| n.parse().ok()))
    {
        *slot = n;
    }
    let settings = Settings {
        seed: arg(cmdline, "seed=", 1).max(1),
        rounds: arg(cmdline, "rounds=", 2000),
        user: arg(cmdline, "user=", 0) != 0,
        diff: arg(cmdline, "diff=", 0) != 0,
        show,
    };
    // SAFETY: single-threaded guest, before any round runs (the only readers).
    unsafe { SETTINGS = settings };
    let boot = Boot {
        ram_bytes: info.ram_bytes,
        area: (info.boot_area_start, info.boot_area_end),
    };
    // SAFETY: single-threaded guest, before any round runs (the only readers).
    unsafe { BOOT = boot };
    // SAFETY: switches to KERNEL_STACK (in this image) before the boot area, which holds the
    // boot stack, is unmapped.
    unsafe { chaos_start_on_own_stack() }
}

/// What `_start` learnt from the BootInfo, for after the switch to this image's own stack.
#[derive(Clone, Copy)]
struct Boot {
    ram_bytes: u64,
    /// The boot area (`BootInfo::boot_area_start..end`): natively inside this image.
    area: (u64, u64),
}
static mut BOOT: Boot = Boot {
    ram_bytes: 0,
    area: (0, 0),
};

#[no_mangle]
extern "C" fn chaos_main() -> ! {
    let s = settings();
    let cpl = if s.user { 3 } else { 0 };
    println(format_args!(
        "chaos: seed {}, {} rounds of random code at CPL {cpl}{}",
        s.seed,
        s.rounds,
        if s.diff { ", differential" } else { "" }
    ));
    let boot = core::ptr::addr_of!(BOOT);
    // SAFETY: written by `_start`, read-only afterwards.
    machine::setup(unsafe { boot.read() });
    if s.diff {
        timer_setup();
    }
    next_round()
}

/// The master PIC remapped to vector 0x20 with only IRQ 0 unmasked (the slave all masked),
/// the PIT's channel 0 in mode 0 with no count yet (`start_round` arms it).
fn timer_setup() {
    // The PIT first: until it is in mode 0 without a count, the firmware's periodic mode may
    // still raise IRQ 0, which must not be left pending in the PIC.
    for (port, value) in [
        (PIT_CONTROL, 0x30), // channel 0, LSB then MSB, mode 0, binary
        (PIC1, 0x11),        // ICW1: edge, cascade, ICW4 follows
        (PIC1_DATA, 0x20),   // ICW2: vectors 0x20..0x27
        (PIC1_DATA, 0x04),   // ICW3: a slave on IRQ 2
        (PIC1_DATA, 0x01),   // ICW4: 8086 mode
        (PIC1_DATA, 0xFE),   // OCW1: only IRQ 0
        (PIC2_DATA, 0xFF),
    ] {
        outb(port, value);
    }
}

/// The machine the rounds run on, rebuilt after every round: a GDT with kernel and user
/// segments and a TSS whose IST1 is HANDLER_STACK, an IDT whose 256 interrupt gates all use
/// IST1, and page tables that map RAM from 2 MiB up to a whole number of 2 MiB pages,
/// user-accessible (so the CPL 3 rounds reach it too, the kernel's tables included: the rounds
/// may trash them, which is part of the chaos). The first 2 MiB is left unmapped: there
/// natively lie the firmware's data, VGA memory and the BIOS ROM, under the VMM the boot area,
/// so a round reading it would see different bytes for reasons that are not the CPU's.
mod machine {
    use super::*;

    #[repr(C, align(4096))]
    struct Table([u64; 512]);
    #[repr(C, align(16))]
    struct Tss([u32; 26]);
    #[repr(C, align(16))]
    struct Idt([u64; 512]);

    /// Everything the machine is made of, in one static.
    #[repr(C)]
    struct Tables {
        pml4: Table,
        pdpt: Table,
        pd: Table,
        /// The 4 KiB pages of the 2 MiB that hold the round stack's guard page.
        pt: Table,
        idt: Idt,
        tss: Tss,
        gdt: [u64; 7],
        /// 2 MiB pages mapped (from the second), set by `setup`.
        pages: usize,
    }
    static mut TABLES: Tables = Tables {
        pml4: Table([0; 512]),
        pdpt: Table([0; 512]),
        pd: Table([0; 512]),
        pt: Table([0; 512]),
        idt: Idt([0; 512]),
        tss: Tss([0; 26]),
        gdt: [0; 7],
        pages: 0,
    };

    /// The tables.
    fn tables() -> &'static mut Tables {
        let tables = core::ptr::addr_of_mut!(TABLES);
        // SAFETY: single-threaded guest, and only the handler and the setup before any round
        // use the tables, never at the same time: one reference at a time.
        unsafe { &mut *tables }
    }

    /// Builds and loads everything once and zeroes RAM above the image (natively it holds
    /// the boot loader's data; under the VMM nothing) and the boot area when it is inside the
    /// mapped RAM (natively it is in this image, filled by the trampoline; under the VMM it is
    /// below 2 MiB): a round that reads or jumps there then finds the same bytes.
    pub fn setup(boot: Boot) {
        let pages = (boot.ram_bytes >> 21).clamp(2, 512) as usize;
        tables().pages = pages;
        load_tables(true);
        extern "C" {
            static __mb_bss_end: u8;
        }
        // Only the address of the linker symbol is taken.
        let end = core::ptr::addr_of!(__mb_bss_end) as u64;
        let ram_end = (pages as u64) << 21;
        let start = (end + 4095) & !4095;
        // SAFETY: [start, ram_end) is RAM above this image, mapped by the tables just loaded,
        // and nothing lives there.
        unsafe { core::ptr::write_bytes(start as *mut u8, 0, (ram_end - start) as usize) };
        let (area_start, area_end) = boot.area;
        if area_start >= 1 << 21 && area_end <= ram_end && area_start < area_end {
            // SAFETY: the boot area is no longer used (this code runs on KERNEL_STACK and the
            // command line was read by `_start`) and is mapped by the tables just loaded.
            unsafe {
                core::ptr::write_bytes(area_start as *mut u8, 0, (area_end - area_start) as usize)
            };
        }
    }

    /// Rebuilds the tables a round may have written and reloads the registers that cache them.
    pub fn load() {
        load_tables(false);
    }

    fn load_tables(first: bool) {
        let t = tables();
        let (pml4_address, pdpt_address, pd_address, pt_address, tss_base, idt_base) = (
            t.pml4.0.as_ptr() as u64,
            t.pdpt.0.as_ptr() as u64,
            t.pd.0.as_ptr() as u64,
            t.pt.0.as_ptr() as u64,
            t.tss.0.as_ptr() as u64,
            t.idt.0.as_ptr() as u64,
        );
        let guard = core::ptr::addr_of!(ROUND_STACK) as u64;
        let Tables {
            pml4,
            pdpt,
            pd,
            pt,
            idt,
            tss,
            gdt,
            pages,
        } = t;
        let pages = *pages;
        // Every table is written only where it differs from what it should hold: under the VMM
        // a write to a page table (or to the GDT or IDT) may trap, and most rounds change
        // nothing. CR3 is reloaded after a page-table change, to flush what the TLB holds.
        let mut changed = first;
        for (i, e) in pd.0.iter_mut().enumerate() {
            // 2 MiB pages, present, writable, user, PS; none for the first 2 MiB; 4 KiB pages
            // (present, writable, user) where the guard page is.
            let value = if i as u64 == guard >> 21 {
                pt_address | 0x7
            } else if (1..pages).contains(&i) {
                ((i as u64) << 21) | 0x87 | PTE_XD
            } else {
                0
            };
            changed |= update(e, value);
        }
        // This image's code, read-only data and GOT are read-only (CR0.WP = 1 holds CPL 0 to
        // them too): a round's stray store would otherwise rewrite the handler or
        // `chaos_enter`, or the GOT entry every `memset` is called through, and every later
        // round would run that (natively and under the VMM alike), not the round's own bytes.
        // (Seed 2018 at CPL 0, round 352: an `sbb [rdi], edx` rewrote the GOT's `memset`; each
        // later round then ended in a #PF inside this harness, the frames differing only where
        // QEMU's IST delivery departs from the SDM, docs/virtualization-holes.md.)
        // And only the code runs: the rest (read-only data, the GOT, the round's stack and
        // scratch area, the tables, every 2 MiB page) is execute-disable (EFER.NXE = 1 by the
        // entry contract). A round that jumps into its stack (seed 2004 at CPL 0, round 298:
        // `push rsp; ret`) would otherwise run the stack's random words, which the generator
        // never filtered (port I/O whose answer is the platform's, not the CPU's).
        extern "C" {
            static __utext_end: u8;
            static __rodata_end: u8;
        }
        let code_end = core::ptr::addr_of!(__utext_end) as u64;
        let read_only_end = core::ptr::addr_of!(__rodata_end) as u64;
        let round_code = core::ptr::addr_of!(CHAOS_CODE) as u64;
        let region = guard & !((1 << 21) - 1);
        for (i, e) in pt.0.iter_mut().enumerate() {
            let page = region + ((i as u64) << 12);
            let value = if page == guard {
                0
            } else if page < code_end {
                page | 0x5
            } else if page < read_only_end {
                page | 0x5 | PTE_XD
            } else if page == round_code {
                page | 0x7
            } else {
                page | 0x7 | PTE_XD
            };
            changed |= update(e, value);
        }
        for (i, e) in pdpt.0.iter_mut().enumerate() {
            let value = if i == 0 { pd_address | 0x7 } else { 0 };
            changed |= update(e, value);
        }
        for (i, e) in pml4.0.iter_mut().enumerate() {
            let value = if i == 0 { pdpt_address | 0x7 } else { 0 };
            changed |= update(e, value);
        }
        if changed {
            let root = pml4_address;
            // SAFETY: the tables identity-map RAM above 2 MiB, where this image, its stacks
            // and data are.
            unsafe { core::arch::asm!("mov cr3, {}", in(reg) root, options(nostack)) };
        }
        let ist1 = core::ptr::addr_of!(HANDLER_STACK) as u64 + 8 * 2048;
        let mut want = [0u32; 26];
        want[9] = ist1 as u32; // IST1 at byte 36
        want[10] = (ist1 >> 32) as u32;
        want[25] = 104 << 16; // I/O map base beyond the limit: no bitmap
        if tss.0 != want {
            tss.0 = want;
        }
        let [tss_low, tss_high] = tss_descriptor(tss_base);
        // The TSS descriptor as the CPU leaves it once TR is loaded: busy (type 0xB).
        let busy = 0x2 << 40;
        let want = [
            0,
            code64(0),
            data(0),
            data(3),
            code64(3),
            tss_low | if first { 0 } else { busy },
            tss_high,
        ];
        for (e, value) in gdt.iter_mut().zip(want) {
            update(e, value);
        }
        let mut pointer = [0u8; 10];
        pointer[..2].copy_from_slice(&(7u16 * 8 - 1).to_le_bytes());
        pointer[2..].copy_from_slice(&(gdt.as_ptr() as u64).to_le_bytes());
        // SAFETY: the GDT keeps 0x08/0x10 as the boot GDT had them, so CS and SS stay valid.
        unsafe { core::arch::asm!("lgdt [{}]", in(reg) pointer.as_ptr(), options(nostack)) };
        if first {
            // SAFETY: 0x28 is the available TSS just described.
            unsafe { core::arch::asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack)) };
        }
        // Only the address of the stubs is taken.
        let stubs = core::ptr::addr_of!(chaos_vectors) as u64;
        for v in 0..256 {
            let h = stubs + 16 * v as u64;
            // Interrupt gate (IF cleared on entry), DPL 0, IST1, the kernel code selector.
            let low = (h & 0xFFFF)
                | (KERNEL_CS << 16)
                | (1 << 32)
                | (0x8E << 40)
                | ((h >> 16) & 0xFFFF) << 48;
            update(&mut idt.0[2 * v], low);
            update(&mut idt.0[2 * v + 1], h >> 32);
        }
        load_idt(idt_base, (256 * 16 - 1) as u16);
    }

    /// Writes `value` into `entry` unless it already holds it; whether it wrote.
    fn update(entry: &mut u64, value: u64) -> bool {
        let differs = *entry != value;
        if differs {
            *entry = value;
        }
        differs
    }
}
