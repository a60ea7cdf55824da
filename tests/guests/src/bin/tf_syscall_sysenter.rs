//! SYSCALL and SYSENTER from user mode with RFLAGS.TF = 1. Neither clears TF (SYSCALL clears
//! what IA32_FMASK says, here nothing; SYSENTER clears VM, IF and RF only: SDM Vol. 2B, SYSCALL,
//! SYSENTER), so the single-step trap after each is taken at CPL 0 *on the first instruction of
//! the kernel's entry point*: #DB with RIP = IA32_LSTAR (resp. IA32_SYSENTER_EIP) and CS = the
//! kernel's code selector (SDM Vol. 3 §17.3.1.4; the reason Linux puts TF in its FMASK). Before
//! it, the step after the `nop` that precedes the instruction reports RIP = the SYSCALL/SYSENTER
//! itself at CS = the user selector. A VMM that forwards these to the guest's entry points must
//! deliver that #DB at the guest's entry point, as the CPU does.
//!
//! For SYSCALL and SYSRET the trap follows the TF the instruction *leaves*, not the TF it began
//! with (XSA-204: Xen decided by the old flags and so defeated the guest kernel's IA32_FMASK):
//! - `syscall-fmask`: IA32_FMASK clearing TF (as Linux sets it): no #DB on the entry point, only
//!   the one at the SYSCALL itself;
//! - `sysret-tf`: a kernel not stepping returns by SYSRETQ with TF set in R11: the #DB comes at
//!   once, at CPL 3 on the return address, before the user instruction there (a `ud2`) runs.
//!
//! Linux's selector layout (kernel CS 0x10, user CS 0x33), STAR/SYSENTER_CS = 0x10. The #DB
//! handler records RIP and CS and stops stepping once it is in the kernel; the entry points move
//! to a kernel stack and go on to the next phase; the guest exits success when the phases saw
//! exactly [(syscall insn, 0x33), (LSTAR, 0x10)], [(sysenter insn, 0x33), (SYSENTER_EIP, 0x10)],
//! [(syscall insn, 0x33)] and [(the SYSRET's return address, 0x33)].
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicUsize, Ordering};

use test_guests::machine::{self, Frame, Layout, Page, PageTables, LINUX_GDT, RFLAGS_TF};
use test_guests::{exit, println, rdmsr, wrmsr};

const KCS: u16 = 0x10;
const UCS: u16 = 0x33;
const LAYOUT: Layout = Layout {
    name: "Linux selectors",
    gdt: &LINUX_GDT,
    kernel_cs: KCS,
    kernel_ds: 0x18,
    user_cs: UCS,
    user_ds: 0x2b,
    tss: 0x40,
};

static mut USER_STACK: Page = Page::zeroed();
static mut RSP0_STACK: [Page; 2] = [const { Page::zeroed() }; 2];
#[no_mangle]
static mut ENTRY_STACK: [Page; 2] = [const { Page::zeroed() }; 2];

const MAX: usize = 8;
static COUNT: AtomicUsize = AtomicUsize::new(0);
static mut SEEN: [(u64, u64); MAX] = [(0, 0); MAX];

core::arch::global_asm!(
    r#"
.section .utext, "ax"
.global user_syscall
user_syscall:
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    nop
.global user_syscall_insn
user_syscall_insn:
    syscall
    ud2
.global user_sysenter
user_sysenter:
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    nop
.global user_sysenter_insn
user_sysenter_insn:
    sysenter
    ud2
.global user_after_sysret
user_after_sysret:
    ud2
.section .text
.global guest_syscall_entry
guest_syscall_entry:
    lea rsp, [rip + ENTRY_STACK + 8192]
    call after_syscall
    ud2
.global guest_sysenter_entry
guest_sysenter_entry:
    lea rsp, [rip + ENTRY_STACK + 8192]
    call after_sysenter
    ud2
"#
);

extern "C" {
    fn user_syscall();
    fn user_sysenter();
    static user_syscall_insn: u8;
    static user_sysenter_insn: u8;
    static user_after_sysret: u8;
    fn guest_syscall_entry();
    fn guest_sysenter_entry();
}

/// The phase running: 0 `syscall`, 1 `sysenter`, 2 `syscall-fmask`, 3 `sysret-tf`.
static PHASE: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);

fn handler(frame: &mut Frame) {
    if frame.vector == 6 && PHASE.load(Ordering::SeqCst) == 3 {
        // The `ud2` after the SYSRET's #DB: the last phase is over.
        finish_sysret_tf()
    }
    if frame.vector != 1 {
        machine::unexpected(frame);
    }
    let n = COUNT.fetch_add(1, Ordering::SeqCst);
    if n < MAX {
        // SAFETY: single-threaded guest; interrupts are off in the handler.
        unsafe { SEEN[n] = (frame.rip, frame.cs) };
    }
    if frame.cs & 3 == 0 || n >= MAX {
        frame.rflags &= !RFLAGS_TF; // in the kernel: stop stepping
    }
}

fn enter_user(rip: u64) -> ! {
    let rsp = core::ptr::addr_of!(USER_STACK) as u64 + 4096;
    // The user code leaves by SYSCALL/SYSENTER into our entries.
    machine::iretq_to_user(UCS, rip, LAYOUT.user_ds, rsp, 0)
}

/// Checks and prints the traps seen since the last call: the one at the instruction, and the
/// one at the kernel's entry point when `trap_at_entry`.
fn check(name: &str, insn: u64, entry: u64, trap_at_entry: bool) -> bool {
    let n = COUNT.swap(0, Ordering::SeqCst).min(MAX);
    let seen = core::ptr::addr_of!(SEEN);
    // SAFETY: the handler is done (TF is off).
    let seen = unsafe { *seen };
    for &(rip, cs) in &seen[..n] {
        let at = if rip == insn {
            "the instruction"
        } else if rip == entry {
            "the entry point"
        } else {
            "elsewhere"
        };
        println(format_args!(
            "tf-{name}: #DB rip={rip:#x} ({at}) cs={cs:#x}"
        ));
    }
    let in_kernel = n >= 1 && seen[n - 1] == (entry, u64::from(KCS));
    let ok = if trap_at_entry {
        n == 2 && seen[0] == (insn, u64::from(UCS)) && in_kernel
    } else {
        n == 1 && seen[0] == (insn, u64::from(UCS))
    };
    println(format_args!(
        "tf-{name}: {n} single-step traps, last in the kernel at the entry point: {in_kernel} -> {}",
        if ok { "ok" } else { "WRONG" }
    ));
    if !ok {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
    ok
}

#[no_mangle]
extern "C" fn after_syscall() -> ! {
    let fmask_clears_tf = PHASE.load(Ordering::SeqCst) == 2;
    check(
        if fmask_clears_tf {
            "syscall-fmask"
        } else {
            "syscall"
        },
        core::ptr::addr_of!(user_syscall_insn) as u64,
        guest_syscall_entry as *const () as u64,
        !fmask_clears_tf,
    );
    if fmask_clears_tf {
        sysret_with_tf()
    }
    PHASE.store(1, Ordering::SeqCst);
    enter_user(user_sysenter as *const () as u64)
}

#[no_mangle]
extern "C" fn after_sysenter() -> ! {
    check(
        "sysenter",
        core::ptr::addr_of!(user_sysenter_insn) as u64,
        guest_sysenter_entry as *const () as u64,
        true,
    );
    PHASE.store(2, Ordering::SeqCst);
    wrmsr(0xC000_0084, RFLAGS_TF); // FMASK: SYSCALL now clears TF
    enter_user(user_syscall as *const () as u64)
}

/// Returns to user mode by SYSRETQ with TF set in R11, the kernel itself not stepping.
fn sysret_with_tf() -> ! {
    PHASE.store(3, Ordering::SeqCst);
    let rsp = core::ptr::addr_of!(USER_STACK) as u64 + 4096;
    let rip = core::ptr::addr_of!(user_after_sysret) as u64;
    // SAFETY: SYSRETQ enters the user code at RIP = RCX with RFLAGS = R11 (TF set, interrupts
    // off) on the user stack; its `ud2` brings the handler back, which ends the run.
    unsafe {
        core::arch::asm!(
            "mov rsp, {rsp}",
            "sysretq",
            rsp = in(reg) rsp,
            in("rcx") rip,
            in("r11") RFLAGS_TF | 0x2,
            options(noreturn)
        )
    }
}

fn finish_sysret_tf() -> ! {
    let n = COUNT.swap(0, Ordering::SeqCst).min(MAX);
    let seen = core::ptr::addr_of!(SEEN);
    // SAFETY: stepping is over (the #DB handler cleared nothing, but the `ud2` ended it).
    let seen = unsafe { *seen };
    let ret = core::ptr::addr_of!(user_after_sysret) as u64;
    for &(rip, cs) in &seen[..n] {
        let at = if rip == ret {
            "the return address"
        } else {
            "elsewhere"
        };
        println(format_args!(
            "tf-sysret: #DB rip={rip:#x} ({at}) cs={cs:#x}"
        ));
    }
    let ok = n == 1 && seen[0] == (ret, u64::from(UCS));
    println(format_args!(
        "tf-sysret: {n} single-step traps, at once in user mode: {} -> {}",
        ok,
        if ok { "ok" } else { "WRONG" }
    ));
    if !ok {
        FAILED.fetch_add(1, Ordering::SeqCst);
    }
    exit(if FAILED.load(Ordering::SeqCst) == 0 {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}

#[no_mangle]
extern "C" fn _start() -> ! {
    machine::mask_pics();
    let pt = PageTables::identity();
    pt.open_to_user(core::ptr::addr_of!(USER_STACK) as u64 + 4096);
    pt.load();
    LAYOUT.load(core::ptr::addr_of!(RSP0_STACK) as u64 + 8192, handler);
    wrmsr(0xC000_0080, rdmsr(0xC000_0080) | 1); // EFER.SCE
    wrmsr(0xC000_0081, (0x23u64 << 48) | (u64::from(KCS) << 32)); // STAR
    wrmsr(0xC000_0082, guest_syscall_entry as *const () as u64); // LSTAR
    wrmsr(0xC000_0084, 0); // FMASK: TF stays set
    wrmsr(0x174, u64::from(KCS)); // SYSENTER_CS
    wrmsr(0x175, core::ptr::addr_of!(ENTRY_STACK) as u64 + 8192); // SYSENTER_ESP
    wrmsr(0x176, guest_sysenter_entry as *const () as u64); // SYSENTER_EIP
    println(format_args!(
        "tf-syscall-sysenter: LSTAR={:#x} SYSENTER_EIP={:#x}, user CS {UCS:#x}, kernel CS {KCS:#x}",
        guest_syscall_entry as *const () as u64, guest_sysenter_entry as *const () as u64
    ));
    enter_user(user_syscall as *const () as u64)
}
