//! Loads CR3 with the address of memory the guest does not have (1.75 GiB, beyond its RAM): the
//! next access walks page tables outside guest RAM, and the VMM must stop the guest cleanly.
#![no_std]
#![no_main]

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::install_fault_handlers();
    test_guests::println(format_args!("garbage-cr3: loading CR3 = 0x70000000"));
    // SAFETY: deliberately bogus page tables: what happens next is the VMM's business.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) 0x7000_0000u64, options(nostack)) };
    test_guests::println(format_args!(
        "garbage-cr3: still running after the CR3 load (wrong)"
    ));
    test_guests::exit(boot::exit_code::FAILURE)
}
