//! The user-mode phases of `user-mode-low-selectors` under Linux's x86_64 GDT layout: 32-bit
//! kernel code 0x08, kernel code 0x10, kernel data 0x18, 32-bit user code 0x23, user data 0x2b,
//! user code 0x33, TSS 0x40 (arch/x86/include/asm/segment.h). Selectors a VMM's own GDT does not
//! have at those indices must still work as the guest's GDT says.
//! Expected outcome, natively and under the VMM: every phase "ok", exit success.
#![no_std]
#![no_main]

use test_guests::machine::{Layout, LINUX_GDT};
use test_guests::user_mode::run;

#[no_mangle]
extern "C" fn _start() -> ! {
    run(Layout {
        name: "Linux selectors",
        gdt: &LINUX_GDT,
        kernel_cs: 0x10,
        kernel_ds: 0x18,
        user_cs: 0x33,
        user_ds: 0x2b,
        tss: 0x40,
    })
}
