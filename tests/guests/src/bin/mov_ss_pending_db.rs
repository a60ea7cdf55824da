//! MOV SS followed by INT3, INT n or SYSCALL while a debug exception is pending: the shape of
//! CVE-2018-8897 ("POP SS/MOV SS", XSA-260).
//!
//! MOV SS (and, outside 64-bit mode, POP SS) inhibits interrupts, debug exceptions and
//! single-step traps until the boundary after the *next* instruction (SDM Vol. 3 §6.8.3). A debug
//! exception raised by the MOV SS itself — a data breakpoint on its memory operand — is held
//! pending across that next instruction; if it is an INT3, INT n or SYSCALL, the #DB is delivered
//! after the transfer, on the first instruction of the kernel's handler at CPL 0, with the user's
//! GS still loaded. Kernels that trusted "a #DB at CPL 0 came from kernel code" were taken over
//! (CVE-2018-8897). A trap-and-emulate VMM meets this twice: its own entry points are what the
//! real CPU's INT3 or SYSCALL transfers to, and when it *emulates* a guest's MOV SS it must give
//! the next instruction the same shadow (no single-step trap after the MOV SS, no interrupt
//! injected before the next instruction).
//!
//! Phases, each at CPL 3 and at CPL 0 (where the VMM emulates the MOV SS, the kernel's selectors
//! having RPL 0 under ring compression), with RFLAGS.TF set by a POPFQ before a `nop`:
//! - `tf-int3`: `mov ss, [m]; int3`. Expected (§17.3.1.4, §6.8.3): #DB after the `nop` (RIP = the
//!   MOV SS), then no single-step trap after the MOV SS, and INT3 clears TF, so the next event is
//!   #BP with RIP past the INT3; no #DB in the handler.
//! - `tf-int80`: `mov ss, [m]; int 0x80` through a DPL-3 gate: the same with vector 0x80.
//! - `tf-syscall`: `mov ss, [m]; syscall` with IA32_FMASK clearing TF (as Linux sets it): the
//!   SYSCALL entry is reached with no #DB before or on it.
//! - `pop-ss`: POP SS in 64-bit mode is #UD (SDM Vol. 2B, POP); after the #DB at it.
//!
//! Last, unless `dr=0` is given: `dr-int3` and `dr-syscall` at CPL 3 arm a data breakpoint (DR0,
//! R/W, 2 bytes) on the MOV SS's memory operand, without TF. On the CPU the #DB is pending across
//! the INT3/SYSCALL and arrives at CPL 0 on the handler's first instruction (the CVE). The VMM
//! does not arm hardware breakpoints: enabling one stops the guest cleanly ("unsupported:
//! hardware breakpoints"), so under the VMM the run ends there, by design, before any user code
//! can hold a #DB pending across the VMM's own entry points.
//!
//! Each phase prints the events its handler saw as `vector@where/cpl` (`where` names the MOV SS,
//! the instruction after it, the address after that one, the first instruction of the #BP,
//! vector-0x80 or SYSCALL entry, or a hex address) and whether they match the SDM's sequence.
//! Expected outcome: natively and under the VMM the same TF lines, each "ok", then (natively)
//! the data-breakpoint lines, and exit success; under the VMM the stop at the first `dr-` phase.
#![no_std]
#![no_main]

use core::fmt::Write as _;
use core::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

use test_guests::machine::{
    self, set_gate, Frame, Layout, Page, PageTables, LINUX_GDT, RFLAGS_IF, RFLAGS_TF,
};
use test_guests::{exit, println, rdmsr, wrmsr};

const KCS: u16 = 0x10;
const KDS: u16 = 0x18;
const UCS: u16 = 0x33;
const UDS: u16 = 0x2b;
const LAYOUT: Layout = Layout {
    name: "Linux selectors",
    gdt: &LINUX_GDT,
    kernel_cs: KCS,
    kernel_ds: KDS,
    user_cs: UCS,
    user_ds: UDS,
    tss: 0x40,
};

static mut USER_STACK: Page = Page::zeroed();
static mut RSP0_STACK: [Page; 2] = [const { Page::zeroed() }; 2];
#[no_mangle]
static mut KERNEL_STACK: [Page; 2] = [const { Page::zeroed() }; 2];

/// The selector each MOV SS loads (the current privilege's data segment), read from memory so
/// a data breakpoint can watch it; alone in its page, which `_start` opens to user mode.
#[repr(C, align(4096))]
struct SsPage(AtomicU16);
#[no_mangle]
static SS_VALUE: SsPage = SsPage(AtomicU16::new(0));

// Every phase: TF on, a `nop` (the single-step trap after it is the first event), then the MOV
// SS and the instruction under test. A label names each address the events are located by.
// `ud2` after the instruction under test ends a phase that would otherwise run on.
core::arch::global_asm!(
    r#"
.section .utext, "ax"
.macro phase name, insn
.global \name
\name:
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    nop
.global \name\()_mov
\name\()_mov:
    mov ss, word ptr [rip + SS_VALUE]
.global \name\()_next
\name\()_next:
    \insn
.global \name\()_after
\name\()_after:
    ud2
.endm
    phase tf_int3, int3
    phase tf_int80, "int 0x80"
    phase tf_syscall, syscall
.global pop_ss
pop_ss:
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    nop
.global pop_ss_mov
pop_ss_mov:
    .byte 0x17
.global pop_ss_next
pop_ss_next:
    ud2
.global pop_ss_after
pop_ss_after:
    ud2
.macro dr_phase name, insn
.global \name
\name:
    nop
.global \name\()_mov
\name\()_mov:
    mov ss, word ptr [rip + SS_VALUE]
.global \name\()_next
\name\()_next:
    \insn
.global \name\()_after
\name\()_after:
    ud2
.endm
    dr_phase dr_int3, int3
    dr_phase dr_syscall, syscall
.section .text
.global guest_syscall_entry
guest_syscall_entry:
    lea rsp, [rip + KERNEL_STACK + 8192]
    call after_syscall
    ud2
"#
);

extern "C" {
    fn guest_syscall_entry();
    static guest_trap_stubs: u8;
}

/// One phase: its code's labels and where it runs.
struct Phase {
    name: &'static str,
    start: unsafe extern "C" fn(),
    mov: *const u8,
    next: *const u8,
    after: *const u8,
    /// 3: entered by IRETQ to user mode; 0: called in the kernel.
    cpl: u8,
    /// What the SDM says happens, as the handler records it (see `Event::describe`).
    expected: &'static str,
    /// A data breakpoint on SS_VALUE instead of TF.
    data_breakpoint: bool,
    /// What QEMU's TCG does instead, where it differs from the SDM (a named quirk).
    tcg_quirk: Option<&'static str>,
}

/// A phase whose code is the `.utext` labels `$sym`, `${sym}_mov`, `${sym}_next`, `${sym}_after`.
macro_rules! phase {
    ($name:literal, [$sym:ident, $mov:ident, $next:ident, $after:ident], $cpl:expr, $expected:literal, $dr:expr) => {
        phase!(
            $name,
            [$sym, $mov, $next, $after],
            $cpl,
            $expected,
            $dr,
            None
        )
    };
    ($name:literal, [$sym:ident, $mov:ident, $next:ident, $after:ident], $cpl:expr, $expected:literal, $dr:expr, $tcg:expr) => {{
        extern "C" {
            fn $sym();
            static $mov: u8;
            static $next: u8;
            static $after: u8;
        }
        Phase {
            name: $name,
            start: $sym,
            mov: core::ptr::addr_of!($mov),
            next: core::ptr::addr_of!($next),
            after: core::ptr::addr_of!($after),
            cpl: $cpl,
            expected: $expected,
            data_breakpoint: $dr,
            tcg_quirk: $tcg,
        }
    }};
}

fn phases() -> [Phase; 10] {
    [
        phase!(
            "tf-int3 cpl3",
            [tf_int3, tf_int3_mov, tf_int3_next, tf_int3_after],
            3,
            "#DB@mov/3 #BP@after/3",
            false
        ),
        phase!(
            "tf-int3 cpl0",
            [tf_int3, tf_int3_mov, tf_int3_next, tf_int3_after],
            0,
            "#DB@mov/0 #BP@after/0",
            false
        ),
        phase!(
            "tf-int80 cpl3",
            [tf_int80, tf_int80_mov, tf_int80_next, tf_int80_after],
            3,
            "#DB@mov/3 int80@after/3",
            false
        ),
        phase!(
            "tf-int80 cpl0",
            [tf_int80, tf_int80_mov, tf_int80_next, tf_int80_after],
            0,
            "#DB@mov/0 int80@after/0",
            false
        ),
        phase!(
            "tf-syscall cpl3",
            [
                tf_syscall,
                tf_syscall_mov,
                tf_syscall_next,
                tf_syscall_after
            ],
            3,
            "#DB@mov/3 syscall-entry",
            false
        ),
        phase!(
            "tf-syscall cpl0",
            [
                tf_syscall,
                tf_syscall_mov,
                tf_syscall_next,
                tf_syscall_after
            ],
            0,
            "#DB@mov/0 syscall-entry",
            false
        ),
        phase!(
            "pop-ss cpl3",
            [pop_ss, pop_ss_mov, pop_ss_next, pop_ss_after],
            3,
            "#DB@mov/3 #UD@mov/3",
            false
        ),
        phase!(
            "pop-ss cpl0",
            [pop_ss, pop_ss_mov, pop_ss_next, pop_ss_after],
            0,
            "#DB@mov/0 #UD@mov/0",
            false
        ),
        phase!(
            "dr-int3 cpl3",
            [dr_int3, dr_int3_mov, dr_int3_next, dr_int3_after],
            3,
            "#DB@bp-entry/0 #BP@after/3",
            true,
            Some("#DB@next/3 #BP@after/3")
        ),
        phase!(
            "dr-syscall cpl3",
            [
                dr_syscall,
                dr_syscall_mov,
                dr_syscall_next,
                dr_syscall_after
            ],
            3,
            "#DB@syscall-entry/0 syscall-entry",
            true,
            Some("#DB@next/3 syscall-entry")
        ),
    ]
}

/// What the handler saw, in order.
const MAX: usize = 8;
static COUNT: AtomicUsize = AtomicUsize::new(0);
static mut SEEN: [(u64, u64, u64); MAX] = [(0, 0, 0); MAX];
/// The phase running.
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static FAILURES: AtomicUsize = AtomicUsize::new(0);
/// 0x1_0000 marks the SYSCALL entry in SEEN (not a vector).
const SYSCALL_ENTRY: u64 = 0x1_0000;

fn record(vector: u64, rip: u64, cs: u64) {
    let n = COUNT.fetch_add(1, Ordering::SeqCst);
    if n < MAX {
        // SAFETY: single-threaded guest; the handler runs with interrupts off.
        unsafe { SEEN[n] = (vector, rip, cs) };
    }
}

fn handler(frame: &mut Frame) {
    record(frame.vector, frame.rip, frame.cs);
    if frame.vector == 1 {
        // A #DB: go on, stepping through the phase's own code only (a #DB elsewhere is in an
        // entry point the events went through), and not forever.
        let phases = phases();
        let phase = &phases[CURRENT.load(Ordering::SeqCst)];
        let in_phase = (phase.start as usize as u64..=phase.after as u64).contains(&frame.rip);
        if !in_phase || COUNT.load(Ordering::SeqCst) >= MAX {
            frame.rflags &= !RFLAGS_TF;
        }
        return;
    }
    // The phase's final event: back to the kernel for the next phase, on a fresh stack.
    frame.resume_kernel(after_phase, KCS, KDS, kernel_stack_top());
}

fn kernel_stack_top() -> u64 {
    core::ptr::addr_of!(KERNEL_STACK) as u64 + 8192
}

#[no_mangle]
extern "C" fn after_syscall() -> ! {
    record(SYSCALL_ENTRY, guest_syscall_entry as *const () as u64, 0);
    after_phase()
}

/// Names an address for the report.
fn locate(phase: &Phase, rip: u64, out: &mut Line) {
    let stub = |v: u64| core::ptr::addr_of!(guest_trap_stubs) as u64 + 16 * v;
    let _ = if rip == phase.mov as u64 {
        out.write_str("mov")
    } else if rip == phase.next as u64 {
        out.write_str("next")
    } else if rip == phase.after as u64 {
        out.write_str("after")
    } else if rip == stub(3) {
        out.write_str("bp-entry")
    } else if rip == stub(0x80) {
        out.write_str("int80-entry")
    } else if rip == guest_syscall_entry as *const () as u64 {
        out.write_str("syscall-entry")
    } else {
        write!(out, "{rip:#x}")
    };
}

/// A fixed-size line buffer.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    const fn new() -> Self {
        Line {
            buf: [0; 160],
            len: 0,
        }
    }
    fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?")
    }
}

impl core::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

fn describe(phase: &Phase) -> Line {
    let n = COUNT.swap(0, Ordering::SeqCst).min(MAX);
    let seen = core::ptr::addr_of!(SEEN);
    // SAFETY: the phase is over; nothing traps while we read.
    let seen = unsafe { *seen };
    let mut line = Line::new();
    for (i, &(vector, rip, cs)) in seen[..n].iter().enumerate() {
        if i > 0 {
            let _ = line.write_str(" ");
        }
        if vector == SYSCALL_ENTRY {
            let _ = line.write_str("syscall-entry");
            continue;
        }
        let _ = match vector {
            1 => line.write_str("#DB@"),
            3 => line.write_str("#BP@"),
            6 => line.write_str("#UD@"),
            0x80 => line.write_str("int80@"),
            v => write!(line, "vector{v}@"),
        };
        locate(phase, rip, &mut line);
        let _ = write!(line, "/{}", cs & 3);
    }
    line
}

#[no_mangle]
extern "C" fn after_phase() -> ! {
    let phases = phases();
    let i = CURRENT.load(Ordering::SeqCst);
    let phase = &phases[i];
    set_debug_registers(0, 0);
    let seen = describe(phase);
    let verdict = if seen.as_str() == phase.expected {
        "ok"
    } else if phase.tcg_quirk == Some(seen.as_str()) {
        // QEMU's TCG takes a data breakpoint's #DB at the next instruction boundary even after
        // MOV SS, instead of holding it pending across the next instruction.
        "QEMU TCG quirk: the #DB is not held pending across the instruction after MOV SS"
    } else {
        FAILURES.fetch_add(1, Ordering::SeqCst);
        "WRONG"
    };
    println(format_args!(
        "mov-ss-pending-db {}: {} (expected {}) -> {verdict}",
        phase.name,
        seen.as_str(),
        phase.expected,
    ));
    run_phase(i + 1)
}

/// DR0 and DR7 (with DR6 cleared): `dr7 = 0` disarms.
fn set_debug_registers(dr0: u64, dr7: u64) {
    machine::write_dr6(0);
    // SAFETY: CPL 0; DR0 holds any canonical address, DR7 the enables written by the caller.
    unsafe {
        core::arch::asm!("mov dr0, {}", "mov dr7, {}", in(reg) dr0, in(reg) dr7, options(nostack));
    }
}

static DATA_BREAKPOINTS: AtomicUsize = AtomicUsize::new(1);

fn run_phase(i: usize) -> ! {
    let phases = phases();
    let Some(phase) = phases.get(i) else {
        finish(phases.len())
    };
    if phase.data_breakpoint && DATA_BREAKPOINTS.load(Ordering::SeqCst) == 0 {
        finish(i);
    }
    CURRENT.store(i, Ordering::SeqCst);
    COUNT.store(0, Ordering::SeqCst);
    let (ss, cs) = if phase.cpl == 3 {
        (UDS, UCS)
    } else {
        (KDS, KCS)
    };
    SS_VALUE.0.store(ss, Ordering::SeqCst);
    if phase.data_breakpoint {
        println(format_args!(
            "mov-ss-pending-db {}: arming DR0 = {:#x} (R/W, 2 bytes)",
            phase.name,
            SS_VALUE.0.as_ptr() as u64
        ));
        // DR7: L0 (bit 0), R/W0 = 11 (bits 17:16, data reads and writes), LEN0 = 01 (2 bytes).
        set_debug_registers(SS_VALUE.0.as_ptr() as u64, 1 | (0b11 << 16) | (0b01 << 18));
    }
    let start = phase.start as usize as u64;
    if phase.cpl == 3 {
        let rsp = core::ptr::addr_of!(USER_STACK) as u64 + 4096;
        machine::iretq_to_user(cs, start, ss, rsp, 0)
    }
    // SAFETY: the phase's code runs at CPL 0 on this stack; it never returns (its last event
    // resumes `after_phase` on a fresh stack).
    unsafe { core::arch::asm!("jmp {}", in(reg) start, options(noreturn)) }
}

fn finish(ran: usize) -> ! {
    let wrong = FAILURES.load(Ordering::SeqCst);
    println(format_args!(
        "mov-ss-pending-db: {ran} phases, {wrong} wrong"
    ));
    exit(if wrong == 0 {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let cmdline = unsafe { machine::cmdline(info) };
    for word in cmdline.split_whitespace() {
        match word {
            "dr=0" => DATA_BREAKPOINTS.store(0, Ordering::SeqCst),
            "dr=1" => DATA_BREAKPOINTS.store(1, Ordering::SeqCst),
            _ => {}
        }
    }
    machine::mask_pics();
    let pt = PageTables::identity();
    pt.open_to_user(core::ptr::addr_of!(USER_STACK) as u64 + 4096);
    // SS_VALUE is read by the user-mode MOV SS: its page is opened to user mode (writable: the
    // kernel stores to it, and CR0.WP holds the kernel to the page's R/W too).
    pt.set_flags(
        SS_VALUE.0.as_ptr() as u64,
        2,
        machine::PTE_P | machine::PTE_W | machine::PTE_U,
    );
    pt.load();
    LAYOUT.load(core::ptr::addr_of!(RSP0_STACK) as u64 + 8192, handler);
    set_gate(3, KCS, 3, 0);
    set_gate(0x80, KCS, 3, 0);
    wrmsr(0xC000_0080, rdmsr(0xC000_0080) | 1); // EFER.SCE
    wrmsr(0xC000_0081, (0x23u64 << 48) | (u64::from(KCS) << 32)); // STAR
    wrmsr(0xC000_0082, guest_syscall_entry as *const () as u64); // LSTAR
    wrmsr(0xC000_0084, RFLAGS_TF | RFLAGS_IF); // FMASK: SYSCALL clears TF, as Linux's
    println(format_args!(
        "mov-ss-pending-db: MOV SS then INT3 / INT 0x80 / SYSCALL / POP SS with TF, then with a \
         data breakpoint{}",
        if DATA_BREAKPOINTS.load(Ordering::SeqCst) == 0 {
            " (off: dr=0)"
        } else {
            ""
        }
    ));
    run_phase(0)
}
