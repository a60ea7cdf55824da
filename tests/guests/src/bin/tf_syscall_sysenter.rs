//! SYSCALL and SYSENTER from user mode with RFLAGS.TF = 1. Neither clears TF (SYSCALL clears
//! what IA32_FMASK says, here nothing; SYSENTER clears VM, IF and RF only: SDM Vol. 2B, SYSCALL,
//! SYSENTER), so the single-step trap after each is taken at CPL 0 *on the first instruction of
//! the kernel's entry point*: #DB with RIP = IA32_LSTAR (resp. IA32_SYSENTER_EIP) and CS = the
//! kernel's code selector (SDM Vol. 3 §17.3.1.4; the reason Linux puts TF in its FMASK). Before
//! it, the step after the `nop` that precedes the instruction reports RIP = the SYSCALL/SYSENTER
//! itself at CS = the user selector. A VMM that forwards these to the guest's entry points must
//! deliver that #DB at the guest's entry point, as the CPU does.
//!
//! Linux's selector layout (kernel CS 0x10, user CS 0x33), STAR/SYSENTER_CS = 0x10. The #DB
//! handler records RIP and CS and stops stepping once it is in the kernel; the entry points move
//! to a kernel stack and go on to the next phase; the guest exits success when both phases saw
//! exactly [(syscall insn, 0x33), (LSTAR, 0x10)] and [(sysenter insn, 0x33), (SYSENTER_EIP, 0x10)].
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
    fn guest_syscall_entry();
    fn guest_sysenter_entry();
}

fn handler(frame: &mut Frame) {
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

/// Checks and prints the traps seen since the last call.
fn check(name: &str, insn: u64, entry: u64) -> bool {
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
    let ok = n == 2 && seen[0] == (insn, u64::from(UCS)) && seen[1] == (entry, u64::from(KCS));
    println(format_args!(
        "tf-{name}: {n} single-step traps, last in the kernel at the entry point: {} -> {}",
        n >= 1 && seen[n - 1] == (entry, u64::from(KCS)),
        if ok { "ok" } else { "WRONG" }
    ));
    ok
}

static mut SYSCALL_OK: bool = false;

#[no_mangle]
extern "C" fn after_syscall() -> ! {
    let ok = check(
        "syscall",
        core::ptr::addr_of!(user_syscall_insn) as u64,
        guest_syscall_entry as *const () as u64,
    );
    // SAFETY: single-threaded guest.
    unsafe { SYSCALL_OK = ok };
    enter_user(user_sysenter as *const () as u64)
}

#[no_mangle]
extern "C" fn after_sysenter() -> ! {
    let ok = check(
        "sysenter",
        core::ptr::addr_of!(user_sysenter_insn) as u64,
        guest_sysenter_entry as *const () as u64,
    );
    // SAFETY: single-threaded guest.
    let both = ok && unsafe { SYSCALL_OK };
    exit(if both {
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
