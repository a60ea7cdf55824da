//! RFLAGS.NT set by the guest (POPF sets it at any CPL, SDM Vol. 2B, POPF), then SYSCALL and
//! SYSENTER from the guest kernel. Neither clears NT (SYSCALL clears what IA32_FMASK says, here
//! nothing; SYSENTER clears VM, IF and RF only), so each arrives at its entry point with NT
//! still set: SYSCALL's R11 holds it, and the entry point's own RFLAGS does. A host whose entry
//! stubs kept the guest's NT would run on with it and fault at its own IRETQ (an IRET with
//! NT = 1 in IA-32e mode is #GP(0), SDM Vol. 2A, IRET): the VMM's SYSCALL and SYSENTER stubs
//! clear it.
//!
//! Last, SYSENTER with NT and TF: the single step traps on the entry point (SYSENTER leaves TF
//! too), and under the VMM it first traps in the host's own SYSENTER stub, whose #DB path must
//! not give the host the guest's NT back (nor lose it for the guest): the #DB frame at the
//! guest's entry point holds NT = 1.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use test_guests::machine::{self, Frame, RFLAGS_CF, RFLAGS_DF, RFLAGS_NT, RFLAGS_TF};
use test_guests::{exit, println, rdmsr, wrmsr};

static mut ENTRY_STACK: [u64; 512] = [0; 512];
static SEEN_R11: AtomicU64 = AtomicU64::new(0);
static SEEN_FLAGS: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
.global nt_syscall
nt_syscall:
    pushfq
    or qword ptr [rsp], 0x4000
    popfq
    syscall
    ud2
/* An entry point: records RFLAGS as it arrived, clears NT and DF (Rust code follows), moves
 * to ENTRY_STACK and calls `after`. */
.macro entry name, after
.global \name
\name:
    pushfq
    pop rax
    mov [rip + {flags}], rax
    and rax, ~0x4400
    push rax
    popfq
    lea rsp, [rip + {stack} + 4096]
    call \after
    ud2
.endm
.global nt_syscall_entry
nt_syscall_entry:
    mov [rip + {r11}], r11
    entry nt_syscall_entry_flags, after_syscall
.global nt_sysenter
nt_sysenter:
    pushfq
    or qword ptr [rsp], 0x4000
    popfq
    stc
    std
    sysenter
    ud2
    entry nt_sysenter_entry, after_sysenter
.global nt_tf_sysenter
nt_tf_sysenter:
    pushfq
    or qword ptr [rsp], 0x4100
    popfq
    sysenter
    ud2
    entry nt_tf_sysenter_entry, after_tf_sysenter
"#,
    r11 = sym SEEN_R11,
    flags = sym SEEN_FLAGS,
    stack = sym ENTRY_STACK,
);

extern "C" {
    fn nt_syscall() -> !;
    fn nt_syscall_entry();
    fn nt_sysenter() -> !;
    fn nt_sysenter_entry();
    fn nt_tf_sysenter() -> !;
    fn nt_tf_sysenter_entry();
}

/// RFLAGS in the #DB frame at `nt_tf_sysenter_entry` (0: none came).
static DB_FLAGS: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: the entry contract: RDI is the identity-mapped address of a BootInfo.
    let boot_info = unsafe { test_guests::boot_info(info) };
    if boot_info.magic != boot::BOOT_INFO_MAGIC {
        exit(boot::exit_code::FAILURE);
    }
    machine::install_idt(boot::BOOT_CODE_SELECTOR);
    machine::set_handler(fault_handler);
    machine::mask_pics();
    let cs = u64::from(boot::BOOT_CODE_SELECTOR);
    wrmsr(0xC000_0080, rdmsr(0xC000_0080) | 1); // EFER.SCE
    wrmsr(0xC000_0081, cs << 32); // STAR: SYSCALL CS = 0x08, SS = 0x10
    wrmsr(0xC000_0082, nt_syscall_entry as *const () as u64); // LSTAR
    wrmsr(0xC000_0084, 0); // FMASK: nothing cleared
    wrmsr(0x174, cs); // SYSENTER_CS
    let stack = core::ptr::addr_of!(ENTRY_STACK) as u64 + 4096;
    wrmsr(0x175, stack); // SYSENTER_ESP
    wrmsr(0x176, nt_sysenter_entry as *const () as u64); // SYSENTER_EIP

    // SAFETY: the entry point moves to ENTRY_STACK and calls `after_syscall`.
    unsafe { nt_syscall() }
}

fn report(name: &str, nt: bool) {
    println!(
        "nt-{name}: NT at the entry point {} -> {}",
        u8::from(nt),
        if nt { "ok" } else { "WRONG" }
    );
}

#[no_mangle]
extern "C" fn after_syscall() -> ! {
    let r11 = SEEN_R11.load(Ordering::SeqCst);
    let flags = SEEN_FLAGS.load(Ordering::SeqCst);
    report("syscall-r11", r11 & RFLAGS_NT != 0);
    report("syscall", flags & RFLAGS_NT != 0);
    // SAFETY: the entry point moves to ENTRY_STACK and calls `after_sysenter`.
    unsafe { nt_sysenter() }
}

#[no_mangle]
extern "C" fn after_sysenter() -> ! {
    let flags = SEEN_FLAGS.load(Ordering::SeqCst);
    report("sysenter", flags & RFLAGS_NT != 0);
    // SYSENTER leaves the arithmetic flags and DF too (it clears only VM, IF and RF).
    let kept = flags & (RFLAGS_CF | RFLAGS_DF) == RFLAGS_CF | RFLAGS_DF;
    println!(
        "nt-sysenter: CF and DF at the entry point {} -> {}",
        u8::from(kept),
        if kept { "ok" } else { "WRONG" }
    );
    // SYSENTER_EIP: the entry point of the last phase.
    wrmsr(0x176, nt_tf_sysenter_entry as *const () as u64);
    // SAFETY: the entry point moves to ENTRY_STACK and calls `after_tf_sysenter`.
    unsafe { nt_tf_sysenter() }
}

#[no_mangle]
extern "C" fn after_tf_sysenter() -> ! {
    let db = DB_FLAGS.load(Ordering::SeqCst);
    report("tf-sysenter-db", db & RFLAGS_NT != 0);
    report(
        "tf-sysenter",
        SEEN_FLAGS.load(Ordering::SeqCst) & RFLAGS_NT != 0,
    );
    println!("nt-syscall-sysenter: done");
    exit(boot::exit_code::SUCCESS)
}

fn fault_handler(frame: &mut Frame) {
    if frame.vector == 1 && frame.rip == nt_tf_sysenter_entry as *const () as u64 {
        // The single step after SYSENTER, on the entry point: record, stop stepping, go on.
        DB_FLAGS.store(frame.rflags, Ordering::SeqCst);
        frame.rflags &= !RFLAGS_TF;
        return;
    }
    println!(
        "fault vector={} error={:#x} rip={:#x}",
        frame.vector, frame.error, frame.rip
    );
    exit(boot::exit_code::FAILURE)
}
