//! SWAPGS then SYSRETQ to a non-canonical RCX, at CPL 0 with interrupts off: the pair a VMM's
//! fast path runs in one trap (docs/ARCHITECTURE.md, coalescing). The SWAPGS retires, then the
//! SYSRETQ raises #GP(0) at its own address (SDM vol. 2B, SYSRET; CVE-2012-0217), in the
//! kernel. The guest prints where the SYSRETQ is, and its #GP handler prints the RIP it got:
//! the test compares the two under the VMM with the fast paths on and off. (Natively, QEMU's
//! TCG raises this #GP after the switch to CPL 3, AMD-style, and the guest, without a TSS,
//! resets.)
#![no_std]
#![no_main]

const IA32_EFER: u32 = 0xC000_0080;
const IA32_STAR: u32 = 0xC000_0081;
const IA32_GS_BASE: u32 = 0xC000_0101;
const IA32_KERNEL_GS_BASE: u32 = 0xC000_0102;

// SWAPGS, then SYSRETQ to RCX = the argument (RDI), R11 = 2: the pair under test, back to back.
core::arch::global_asm!(
    ".global swapgs_sysretq",
    "swapgs_sysretq:",
    "mov rcx, rdi",
    "mov r11, 2",
    "swapgs",
    ".global swapgs_sysretq_at",
    "swapgs_sysretq_at:",
    "sysretq",
);

extern "C" {
    fn swapgs_sysretq(rcx: u64);
    static swapgs_sysretq_at: u8;
}

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::install_fault_handlers();
    test_guests::wrmsr(IA32_EFER, test_guests::rdmsr(IA32_EFER) | 1); // SCE
    test_guests::wrmsr(IA32_STAR, (0x10u64 << 48) | (0x08u64 << 32));
    test_guests::wrmsr(IA32_GS_BASE, 0x1000);
    test_guests::wrmsr(IA32_KERNEL_GS_BASE, 0x2000);
    let at = core::ptr::addr_of!(swapgs_sysretq_at) as u64;
    test_guests::println(format_args!("swapgs-sysretq: sysretq at {at:#x}"));
    // SAFETY: deliberately faulting SYSRET after a SWAPGS: the #GP is the expected outcome; its
    // handler reports and halts.
    unsafe { swapgs_sysretq(0x0000_8000_0000_0000) };
    test_guests::println(format_args!("swapgs-sysretq: sysretq returned (wrong)"));
    test_guests::exit(boot::exit_code::FAILURE)
}
