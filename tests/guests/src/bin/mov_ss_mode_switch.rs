//! Segment loads whose privilege checks depend on the mode: a kernel with its own GDT, TSS, IDT
//! and page tables loads SS and DS with kernel and user selectors from CPL 0 and from CPL 3.
//!
//! The rules (SDM Vol. 2B, MOV "Loading a segment register in protected mode", LSS; Vol. 3
//! §5.7): SS takes only a writable data segment with RPL = CPL and DPL = CPL, else #GP(selector);
//! a null SS is allowed in 64-bit mode at CPL < 3 with RPL = CPL, and is #GP(0) at CPL 3; DS
//! takes a data segment with DPL >= max(CPL, RPL), else #GP(selector). The error code of a
//! selector fault is the selector with its RPL bits cleared (EXT = IDT = 0).
//!
//! So from the kernel (CPL 0) `mov ss, <user data, RPL 3>` and `mov ss, <user data, RPL 0>` are
//! #GP, and `mov ds, <user data>` works; from user mode (CPL 3) `mov ss, <kernel data | 3>` and
//! `mov ds, <kernel data>` are #GP, and `mov ds, <user data>` works. Every phase runs one routine
//! (`mov ss`, `lss` or `mov ds` of a selector in RDI, then reads the register back into EAX and
//! executes `ud2`); the handler checks the exception (#GP at the load with the error code, or
//! #UD at the `ud2` with the selector loaded), the saved CS/SS (a failed load leaves SS as it
//! was) and, for CPL 3, that the frame came on TSS.RSP0; then it resumes the kernel at the next
//! phase on a fresh stack.
//!
//! Command line: `layout=low|linux|swapped` (default low): the GDT's selector layout
//! (low: kernel 0x08/0x10, user data 0x1b, user code 0x23; Linux: kernel 0x10/0x18, user data
//! 0x2b, user code 0x33; swapped: user data 0x0b, user code 0x13, kernel 0x18/0x20);
//! `skip=NAME,NAME...` leaves those phases out (to look past a phase that stops the machine).
//! Expected outcome, natively and under the VMM: every phase "ok", exit success.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use test_guests::machine::{
    self, code64, data, Frame, Layout, Page, PageTables, LINUX_GDT, LOW_GDT,
};
use test_guests::{exit, println};

const LAYOUTS: [Layout; 3] = [
    Layout {
        name: "low",
        gdt: &LOW_GDT,
        kernel_cs: 0x08,
        kernel_ds: 0x10,
        user_cs: 0x23,
        user_ds: 0x1b,
        tss: 0x28,
    },
    Layout {
        name: "linux",
        gdt: &LINUX_GDT,
        kernel_cs: 0x10,
        kernel_ds: 0x18,
        user_cs: 0x33,
        user_ds: 0x2b,
        tss: 0x40,
    },
    Layout {
        name: "swapped",
        gdt: &[0, data(3), code64(3), code64(0), data(0)],
        kernel_cs: 0x18,
        kernel_ds: 0x20,
        user_cs: 0x13,
        user_ds: 0x0b,
        tss: 0x28,
    },
];

static LAYOUT: AtomicUsize = AtomicUsize::new(0);
static PHASE: AtomicUsize = AtomicUsize::new(0);
static FAILURES: AtomicU64 = AtomicU64::new(0);
/// Bit i: phase i is skipped (`skip=`).
static SKIP: AtomicU64 = AtomicU64::new(0);

static mut USER_STACK: Page = Page::zeroed();
static mut RSP0_STACK: [Page; 4] = [const { Page::zeroed() }; 4];
static mut KERNEL_STACK: [Page; 4] = [const { Page::zeroed() }; 4];

fn layout() -> Layout {
    LAYOUTS[LAYOUT.load(Ordering::SeqCst)]
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

// The routines, once in kernel text and once in the user-accessible text: load the selector in
// RDI (`lss` from a far pointer offset 0 : selector built on the stack), read the register back
// into EAX, `ud2`. `*_insn` is the load, `*_ud2` the end.
macro_rules! routines {
    ($section:literal, $p:literal) => {
        concat!(
            ".section ",
            $section,
            ", \"ax\"\n",
            ".global ",
            $p,
            "_mov_ss\n",
            $p,
            "_mov_ss:\n",
            "    mov ss, edi\n",
            "    mov eax, ss\n",
            ".global ",
            $p,
            "_mov_ss_ud2\n",
            $p,
            "_mov_ss_ud2:\n",
            "    ud2\n",
            ".global ",
            $p,
            "_mov_ds\n",
            $p,
            "_mov_ds:\n",
            "    mov ds, edi\n",
            "    mov eax, ds\n",
            ".global ",
            $p,
            "_mov_ds_ud2\n",
            $p,
            "_mov_ds_ud2:\n",
            "    ud2\n",
            ".global ",
            $p,
            "_lss\n",
            $p,
            "_lss:\n",
            "    sub rsp, 16\n",
            "    mov dword ptr [rsp], 0\n",
            "    mov word ptr [rsp + 4], di\n",
            ".global ",
            $p,
            "_lss_insn\n",
            $p,
            "_lss_insn:\n",
            "    lss eax, fword ptr [rsp]\n",
            "    mov eax, ss\n",
            ".global ",
            $p,
            "_lss_ud2\n",
            $p,
            "_lss_ud2:\n",
            "    ud2\n",
            ".section .text\n",
        )
    };
}

core::arch::global_asm!(routines!(".text", "k"));
core::arch::global_asm!(routines!(".utext", "u"));

extern "C" {
    static k_mov_ss: u8;
    static k_mov_ss_ud2: u8;
    static k_mov_ds: u8;
    static k_mov_ds_ud2: u8;
    static k_lss: u8;
    static k_lss_insn: u8;
    static k_lss_ud2: u8;
    static u_mov_ss: u8;
    static u_mov_ss_ud2: u8;
    static u_mov_ds: u8;
    static u_mov_ds_ud2: u8;
    static u_lss: u8;
    static u_lss_insn: u8;
    static u_lss_ud2: u8;
}

/// Which load a phase executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    MovSs,
    Lss,
    MovDs,
}

/// Where one routine starts, where its load is and where its `ud2` is, and how much stack it
/// uses before the load.
struct Routine {
    start: u64,
    insn: u64,
    ud2: u64,
    stack: u64,
}

fn addr(s: &u8) -> u64 {
    s as *const u8 as u64
}

fn routine(load: Load, user: bool) -> Routine {
    // SAFETY: only the addresses of the assembly labels are taken.
    let (start, insn, ud2) = unsafe {
        match (load, user) {
            (Load::MovSs, false) => (&k_mov_ss, &k_mov_ss, &k_mov_ss_ud2),
            (Load::MovDs, false) => (&k_mov_ds, &k_mov_ds, &k_mov_ds_ud2),
            (Load::Lss, false) => (&k_lss, &k_lss_insn, &k_lss_ud2),
            (Load::MovSs, true) => (&u_mov_ss, &u_mov_ss, &u_mov_ss_ud2),
            (Load::MovDs, true) => (&u_mov_ds, &u_mov_ds, &u_mov_ds_ud2),
            (Load::Lss, true) => (&u_lss, &u_lss_insn, &u_lss_ud2),
        }
    };
    Routine {
        start: addr(start),
        insn: addr(insn),
        ud2: addr(ud2),
        stack: if load == Load::Lss { 16 } else { 0 },
    }
}

/// The selector a phase loads, in terms of the layout.
#[derive(Debug, Clone, Copy)]
enum Sel {
    UserData,
    UserDataRpl0,
    UserCode,
    KernelData,
    KernelDataRpl3,
    Null,
    NullRpl3,
}

impl Sel {
    fn value(self, l: &Layout) -> u16 {
        match self {
            Sel::UserData => l.user_ds,
            Sel::UserDataRpl0 => l.user_ds & !3,
            Sel::UserCode => l.user_cs,
            Sel::KernelData => l.kernel_ds,
            Sel::KernelDataRpl3 => l.kernel_ds | 3,
            Sel::Null => 0,
            Sel::NullRpl3 => 3,
        }
    }
}

struct Phase {
    name: &'static str,
    user: bool,
    load: Load,
    sel: Sel,
    /// True: #GP(selector & 0xfffc) at the load; false: the load works (#UD at the `ud2`).
    gp: bool,
}

const fn kernel(name: &'static str, load: Load, sel: Sel, gp: bool) -> Phase {
    Phase {
        name,
        user: false,
        load,
        sel,
        gp,
    }
}

const fn user(name: &'static str, load: Load, sel: Sel, gp: bool) -> Phase {
    Phase {
        name,
        user: true,
        load,
        sel,
        gp,
    }
}

const PHASES: [Phase; 21] = [
    // CPL 0.
    kernel("k-mov-ss-user-rpl3", Load::MovSs, Sel::UserData, true),
    kernel("k-mov-ss-user-rpl0", Load::MovSs, Sel::UserDataRpl0, true),
    kernel("k-lss-user-rpl3", Load::Lss, Sel::UserData, true),
    kernel(
        "k-mov-ss-kernel-rpl3",
        Load::MovSs,
        Sel::KernelDataRpl3,
        true,
    ),
    kernel(
        "k-mov-ds-kernel-rpl3",
        Load::MovDs,
        Sel::KernelDataRpl3,
        true,
    ),
    kernel("k-mov-ss-kernel", Load::MovSs, Sel::KernelData, false),
    kernel("k-lss-kernel", Load::Lss, Sel::KernelData, false),
    kernel("k-mov-ss-null", Load::MovSs, Sel::Null, false),
    kernel("k-mov-ds-user", Load::MovDs, Sel::UserData, false),
    // CPL 3.
    user(
        "u-mov-ss-kernel-rpl3",
        Load::MovSs,
        Sel::KernelDataRpl3,
        true,
    ),
    user("u-mov-ss-kernel", Load::MovSs, Sel::KernelData, true),
    user("u-lss-kernel-rpl3", Load::Lss, Sel::KernelDataRpl3, true),
    user("u-mov-ss-user-rpl0", Load::MovSs, Sel::UserDataRpl0, true),
    user("u-mov-ss-user-code", Load::MovSs, Sel::UserCode, true),
    user("u-mov-ss-null", Load::MovSs, Sel::NullRpl3, true),
    user("u-mov-ds-kernel", Load::MovDs, Sel::KernelData, true),
    user(
        "u-mov-ds-kernel-rpl3",
        Load::MovDs,
        Sel::KernelDataRpl3,
        true,
    ),
    user("u-mov-ss-user", Load::MovSs, Sel::UserData, false),
    user("u-lss-user", Load::Lss, Sel::UserData, false),
    user("u-mov-ds-user", Load::MovDs, Sel::UserData, false),
    user("u-mov-ds-user-rpl0", Load::MovDs, Sel::UserDataRpl0, false),
];

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let cmdline = unsafe { machine::cmdline(info) };
    let name = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("layout="))
        .unwrap_or("low");
    let Some(index) = LAYOUTS.iter().position(|l| l.name == name) else {
        println(format_args!(
            "mov-ss-mode-switch: unknown layout={name} (low, linux, swapped)"
        ));
        exit(boot::exit_code::FAILURE)
    };
    LAYOUT.store(index, Ordering::SeqCst);
    for skipped in cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("skip="))
        .flat_map(|list| list.split(','))
    {
        let Some(i) = PHASES.iter().position(|p| p.name == skipped) else {
            println(format_args!(
                "mov-ss-mode-switch: unknown phase skip={skipped}"
            ));
            exit(boot::exit_code::FAILURE)
        };
        SKIP.fetch_or(1 << i, Ordering::SeqCst);
    }
    let l = layout();

    machine::mask_pics();
    let pt = PageTables::identity();
    pt.open_to_user(user_stack_top());
    pt.load();
    l.load(rsp0(), handler);
    println(format_args!(
        "mov-ss-mode-switch ({}): kernel CS={:#x} DS={:#x}, user CS={:#x} DS={:#x}, TSS {:#x}",
        l.name, l.kernel_cs, l.kernel_ds, l.user_cs, l.user_ds, l.tss
    ));
    next_phase()
}

extern "C" fn next_phase() -> ! {
    let l = layout();
    let skip = SKIP.load(Ordering::SeqCst);
    while let Some(phase) = PHASES.get(PHASE.load(Ordering::SeqCst)) {
        if skip & 1 << PHASE.load(Ordering::SeqCst) == 0 {
            break;
        }
        println(format_args!("phase {}: skipped", phase.name));
        PHASE.fetch_add(1, Ordering::SeqCst);
    }
    let p = PHASE.load(Ordering::SeqCst);
    let Some(phase) = PHASES.get(p) else {
        let failures = FAILURES.load(Ordering::SeqCst);
        println(format_args!(
            "mov-ss-mode-switch ({}): {} phases, {} skipped, {failures} wrong -> {}",
            l.name,
            PHASES.len(),
            skip.count_ones(),
            if failures == 0 { "ok" } else { "WRONG" }
        ));
        exit(if failures == 0 {
            boot::exit_code::SUCCESS
        } else {
            boot::exit_code::FAILURE
        })
    };
    let r = routine(phase.load, phase.user);
    let sel = u64::from(phase.sel.value(&l));
    if phase.user {
        machine::iretq_to_user(l.user_cs, r.start, l.user_ds, user_stack_top(), sel)
    } else {
        // SAFETY: the kernel routine ends in an exception into `handler`, which resumes the
        // kernel at the next phase on a fresh stack.
        unsafe { core::arch::asm!("jmp {}", in(reg) r.start, in("rdi") sel, options(noreturn)) }
    }
}

fn handler(frame: &mut Frame) {
    let l = layout();
    let p = PHASE.load(Ordering::SeqCst);
    let Some(phase) = PHASES.get(p) else {
        machine::unexpected(frame)
    };
    let r = routine(phase.load, phase.user);
    let sel = phase.sel.value(&l);
    let (vector, error, rip) = if phase.gp {
        (13, u64::from(sel & 0xFFFC), r.insn)
    } else {
        (6, 0, r.ud2)
    };
    // SS as the CPU pushed it: unchanged after a failed load, the selector after a good one.
    let old_ss = if phase.user { l.user_ds } else { l.kernel_ds };
    let ss = if !phase.gp && phase.load != Load::MovDs {
        sel
    } else {
        old_ss
    };
    let cs = if phase.user { l.user_cs } else { l.kernel_cs };
    let mut wrong = [""; 8];
    let mut n = 0;
    let mut check = |ok: bool, what: &'static str| {
        if !ok {
            wrong[n] = what;
            n += 1;
        }
    };
    check(frame.vector == vector, "vector");
    check(frame.error == error, "error code");
    check(frame.rip == rip, "rip");
    check(frame.cs == u64::from(cs), "saved cs");
    check(frame.ss == u64::from(ss), "saved ss");
    check(
        phase.gp || frame.rax & 0xFFFF == u64::from(sel),
        "register read back",
    );
    if phase.user {
        check(frame.rsp == user_stack_top() - r.stack, "saved rsp");
        check(
            frame.ss_slot() == rsp0() - 8,
            "stack not switched to TSS.RSP0",
        );
    }
    let at = if frame.rip == r.insn {
        "load"
    } else if frame.rip == r.ud2 {
        "ud2"
    } else {
        "elsewhere"
    };
    println(format_args!(
        "phase {}: sel={sel:#x} vector={} error={:#x} rip={at} cs={:#x} ss={:#x}{} -> {}",
        phase.name,
        frame.vector,
        frame.error,
        frame.cs,
        frame.ss,
        if frame.vector == 6 {
            DisplayLoaded(Some(frame.rax & 0xFFFF))
        } else {
            DisplayLoaded(None)
        },
        if n == 0 { "ok" } else { "WRONG" }
    ));
    if n > 0 {
        println(format_args!(
            "phase {}: wrong: {:?} (expected vector={vector} error={error:#x} cs={cs:#x} ss={ss:#x})",
            phase.name,
            &wrong[..n]
        ));
        FAILURES.fetch_add(1, Ordering::SeqCst);
    }
    PHASE.fetch_add(1, Ordering::SeqCst);
    frame.resume_kernel(next_phase, l.kernel_cs, l.kernel_ds, kernel_stack_top());
}

/// ` loaded=0x..` after a `ud2` (the register read back), nothing otherwise.
struct DisplayLoaded(Option<u64>);

impl core::fmt::Display for DisplayLoaded {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self.0 {
            Some(v) => write!(f, " loaded={v:#x}"),
            None => Ok(()),
        }
    }
}
