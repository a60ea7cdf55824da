//! The user-mode guests (`user-mode-low-selectors`, `user-mode-linux-selectors`): a small kernel
//! with its own GDT in a given selector layout, a TSS, an IDT and page tables in which only the
//! user code and stack pages are user-accessible, that enters CPL 3 and checks every way back.
//!
//! Phases, each entering user mode afresh and ending in the kernel's handler, which checks the
//! exception and resumes the kernel at the next phase on a fresh kernel stack:
//! 1. `iretq` to user CS:RIP, SS:RSP; the user code reads a supervisor-only kernel address:
//!    #PF, error code 5 (P | U/S; SDM Vol. 3 §4.7), CR2 = that address, RIP = the load;
//! 2. the same entered with a far return (`retfq` to an outer privilege level pops RIP, CS, RSP,
//!    SS: SDM Vol. 2B, RET);
//! 3. `int 0x81` through a DPL-0 interrupt gate: #GP with error code (0x81 << 3) | 2 = 0x40a (IDT
//!    bit, the index field holds the vector: SDM Vol. 3 §6.12.1.1, §6.13). QEMU's TCG (7.2,
//!    `do_interrupt64`) pushes `vector * 16 + 2` = 0x812 instead (the byte offset of the 16-byte
//!    gate): a QEMU bug, accepted and named as such so the native run stays the reference;
//! 4. `cli` at CPL 3 with IOPL 0: #GP(0) (SDM Vol. 2A, CLI);
//! 5. `hlt` at CPL 3: #GP(0) (SDM Vol. 2A, HLT).
//!
//! Every exception must arrive at CPL 0 through the guest's own IDT with the stack switched to
//! TSS.RSP0 (the CPU-pushed SS at RSP0 - 8: SDM Vol. 3 §6.14.2), the frame holding the *guest's*
//! user selectors and stack pointer; the handler itself executes privileged instructions
//! (`mov cr0`) and resumes the kernel with an `iretq` to the kernel selectors, both of which
//! fault unless it really runs at CPL 0.

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crate::machine::{self, Frame, Layout, Page, PageTables};
use crate::{exit, println};

static mut LAYOUT: Layout = Layout {
    name: "",
    gdt: &[],
    kernel_cs: 0,
    kernel_ds: 0,
    user_cs: 0,
    user_ds: 0,
    tss: 0,
};
static PHASE: AtomicUsize = AtomicUsize::new(0);
static FAILURES: AtomicU64 = AtomicU64::new(0);

/// Kernel data the user code must not read.
static mut SECRET: Page = Page::zeroed();
static mut USER_STACK: Page = Page::zeroed();
static mut RSP0_STACK: [Page; 4] = [const { Page::zeroed() }; 4];
static mut KERNEL_STACK: [Page; 4] = [const { Page::zeroed() }; 4];

fn layout() -> Layout {
    let layout = core::ptr::addr_of!(LAYOUT);
    // SAFETY: written once before any phase, read-only afterwards.
    unsafe { layout.read() }
}

fn secret_address() -> u64 {
    core::ptr::addr_of!(SECRET) as u64 + 0x48
}

fn user_stack_top() -> u64 {
    core::ptr::addr_of!(USER_STACK) as u64 + 4096
}

fn rsp0() -> u64 {
    core::ptr::addr_of!(RSP0_STACK) as u64 + 4 * 4096
}

fn kernel_stack_top() -> u64 {
    core::ptr::addr_of!(KERNEL_STACK) as u64 + 4 * 4096
}

// The user code: its own page-aligned section, mapped user-accessible and nothing else.
core::arch::global_asm!(
    r#"
.section .utext, "ax"
.global user_read
user_read:
    mov rax, qword ptr [rdi]
    ud2
.global user_int81
user_int81:
    int 0x81
    ud2
.global user_cli
user_cli:
    cli
    ud2
.global user_hlt
user_hlt:
    hlt
    ud2
.section .text
"#
);

extern "C" {
    fn user_read();
    fn user_int81();
    fn user_cli();
    fn user_hlt();
}

/// How a phase enters user mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Entry {
    Iretq,
    Retfq,
}

struct Phase {
    name: &'static str,
    entry: Entry,
    code: unsafe extern "C" fn(),
    vector: u64,
    error: u64,
    /// CR2 expected (only for #PF).
    cr2: bool,
    /// A known emulator deviation accepted in place of `error`, and its name.
    quirk: Option<(u64, &'static str)>,
}

const PHASES: [Phase; 5] = [
    Phase {
        name: "iretq-read-kernel",
        entry: Entry::Iretq,
        code: user_read,
        vector: 14,
        error: 5,
        cr2: true,
        quirk: None,
    },
    Phase {
        name: "retfq-read-kernel",
        entry: Entry::Retfq,
        code: user_read,
        vector: 14,
        error: 5,
        cr2: true,
        quirk: None,
    },
    Phase {
        name: "int81-dpl0-gate",
        entry: Entry::Iretq,
        code: user_int81,
        vector: 13,
        error: (0x81 << 3) | 2,
        cr2: false,
        quirk: Some((0x81 * 16 + 2, "QEMU TCG's vector*16+2, not the CPU's 0x40a")),
    },
    Phase {
        name: "cli",
        entry: Entry::Iretq,
        code: user_cli,
        vector: 13,
        error: 0,
        cr2: false,
        quirk: None,
    },
    Phase {
        name: "hlt",
        entry: Entry::Iretq,
        code: user_hlt,
        vector: 13,
        error: 0,
        cr2: false,
        quirk: None,
    },
];

/// Sets up the kernel in `layout` and runs the phases; exits success when every phase saw what
/// the CPU gives.
pub fn run(layout: Layout) -> ! {
    let slot = core::ptr::addr_of_mut!(LAYOUT);
    // SAFETY: single-threaded guest, before any phase.
    unsafe { slot.write(layout) };
    machine::mask_pics();
    let pt = PageTables::identity();
    let (us, ue) = pt.open_to_user(user_stack_top());
    pt.load();
    layout.load(rsp0(), handler);
    println(format_args!(
        "user-mode ({}): kernel CS={:#x} DS={:#x}, user CS={:#x} SS={:#x}, TSS {:#x}; user code {us:#x}..{ue:#x}, kernel secret at {:#x}",
        layout.name,
        layout.kernel_cs,
        layout.kernel_ds,
        layout.user_cs,
        layout.user_ds,
        layout.tss,
        secret_address()
    ));
    next_phase()
}

extern "C" fn next_phase() -> ! {
    let l = layout();
    let p = PHASE.load(Ordering::SeqCst);
    let Some(phase) = PHASES.get(p) else {
        let failures = FAILURES.load(Ordering::SeqCst);
        println(format_args!(
            "user-mode ({}): {} phases, {failures} wrong",
            l.name,
            PHASES.len()
        ));
        exit(if failures == 0 {
            boot::exit_code::SUCCESS
        } else {
            boot::exit_code::FAILURE
        })
    };
    let rip = phase.code as usize as u64;
    let rsp = user_stack_top();
    match phase.entry {
        Entry::Iretq => machine::iretq_to_user(l.user_cs, rip, l.user_ds, rsp, secret_address()),
        // SAFETY: enters the user code at CPL 3 on the user stack with a far return to an outer
        // privilege level; every way out is an exception into `handler`, which resumes the
        // kernel at the next phase.
        Entry::Retfq => unsafe {
            core::arch::asm!(
                "push {ss}",
                "push {rsp}",
                "push {cs}",
                "push {rip}",
                "retfq",
                ss = in(reg) u64::from(l.user_ds),
                rsp = in(reg) rsp,
                cs = in(reg) u64::from(l.user_cs),
                rip = in(reg) rip,
                in("rdi") secret_address(),
                options(noreturn)
            )
        },
    }
}

fn handler(frame: &mut Frame) {
    let l = layout();
    let p = PHASE.load(Ordering::SeqCst);
    let Some(phase) = PHASES.get(p) else {
        machine::unexpected(frame)
    };
    // Privileged: faults unless the handler really runs at CPL 0.
    let cr0: u64;
    // SAFETY: reads CR0; no memory effects.
    unsafe { core::arch::asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack)) };
    let cr2 = machine::read_cr2();
    let rip = phase.code as usize as u64;
    let mut wrong = [""; 8];
    let mut n = 0;
    let mut check = |ok: bool, what: &'static str| {
        if !ok {
            wrong[n] = what;
            n += 1;
        }
    };
    check(frame.vector == phase.vector, "vector");
    let quirk = phase
        .quirk
        .filter(|&(e, _)| e == frame.error && e != phase.error);
    check(frame.error == phase.error || quirk.is_some(), "error code");
    check(frame.rip == rip, "rip");
    check(!phase.cr2 || cr2 == secret_address(), "cr2");
    check(frame.cs == u64::from(l.user_cs), "saved cs");
    check(frame.ss == u64::from(l.user_ds), "saved ss");
    check(frame.rsp == user_stack_top(), "saved rsp");
    check(
        frame.ss_slot() == rsp0() - 8,
        "stack not switched to TSS.RSP0",
    );
    let _ = cr0;
    println(format_args!(
        "phase {}: vector={} error={:#x} cr2={:#x} rip=user+{:#x} cs={:#x} ss={:#x} rsp={:#x} on rsp0={} -> {}",
        phase.name,
        frame.vector,
        frame.error,
        if phase.cr2 { cr2 } else { 0 },
        frame.rip.wrapping_sub(user_read as *const () as u64),
        frame.cs,
        frame.ss,
        frame.rsp,
        frame.ss_slot() == rsp0() - 8,
        if n == 0 { "ok" } else { "WRONG" }
    ));
    if let Some((_, why)) = quirk {
        println(format_args!(
            "phase {}: error code {:#x}: {why}",
            phase.name, frame.error
        ));
    }
    if n > 0 {
        println(format_args!(
            "phase {}: wrong: {:?}",
            phase.name,
            &wrong[..n]
        ));
        FAILURES.fetch_add(1, Ordering::SeqCst);
    }
    PHASE.fetch_add(1, Ordering::SeqCst);
    frame.resume_kernel(next_phase, l.kernel_cs, l.kernel_ds, kernel_stack_top());
}
