//! IRETQ to a non-canonical RIP at the same privilege: #GP(0) in the guest (SDM vol. 2A, IRET:
//! "If the return instruction pointer is not within the limit / non-canonical"). The guest's #GP
//! handler reports and halts.
#![no_std]
#![no_main]

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::install_fault_handlers();
    test_guests::println(format_args!("iretq-noncanonical: iretq to 0x800000000000"));
    // SAFETY: builds an IRETQ frame (SS, RSP, RFLAGS, CS, RIP) for the boot GDT's selectors with
    // a non-canonical RIP: the #GP is the expected outcome.
    unsafe {
        core::arch::asm!(
            "mov rax, rsp",
            "push 0x10",
            "push rax",
            "push 0x2",
            "push 0x08",
            "push rcx",
            "iretq",
            in("rcx") 0x0000_8000_0000_0000u64,
            out("rax") _,
        )
    };
    test_guests::println(format_args!("iretq-noncanonical: iretq returned (wrong)"));
    test_guests::exit(boot::exit_code::FAILURE)
}
