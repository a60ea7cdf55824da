//! SYSRETQ with a non-canonical RCX at CPL 0: Intel CPUs raise #GP(0) in the kernel (SDM vol. 2B,
//! SYSRET; the root of CVE-2012-0217). The guest must see exactly that fault, and the host must
//! never execute a real SYSRET to that address. The guest's #GP handler reports and halts.
#![no_std]
#![no_main]

const IA32_EFER: u32 = 0xC000_0080;
const IA32_STAR: u32 = 0xC000_0081;

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::install_fault_handlers();
    test_guests::wrmsr(IA32_EFER, test_guests::rdmsr(IA32_EFER) | 1); // SCE
    test_guests::wrmsr(IA32_STAR, (0x10u64 << 48) | (0x08u64 << 32));
    test_guests::println(format_args!(
        "sysret-noncanonical: sysretq to 0x800000000000"
    ));
    // SAFETY: deliberately faulting SYSRET: the #GP is the expected outcome.
    unsafe {
        core::arch::asm!("sysretq", in("rcx") 0x0000_8000_0000_0000u64, in("r11") 0x2u64,
            options(nomem, nostack))
    };
    test_guests::println(format_args!(
        "sysret-noncanonical: sysretq returned (wrong)"
    ));
    test_guests::exit(boot::exit_code::FAILURE)
}
