//! Faults with IDTR limit 0 (as at entry): #UD cannot be delivered -> #GP -> #DF -> triple fault.
#![no_std]
#![no_main]

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::println(format_args!("triple-fault: executing ud2 with no IDT"));
    // SAFETY: deliberately undefined instruction: the test is what the VMM does with it.
    unsafe { core::arch::asm!("ud2", options(nomem, nostack, noreturn)) }
}
