//! A kernel whose GDT puts user data at 0x1b and user code at 0x23 (indices 3 and 4, the order
//! SYSRET needs), kernel code 0x08 and data 0x10, TSS 0x28: it enters CPL 3 by `iretq` and by
//! `retfq` and checks that a read of a supervisor-only page is #PF(5) with CR2, that `int 0x81`
//! through a DPL-0 gate is #GP(0x40a), and that `cli` and `hlt` are #GP(0), each delivered through
//! its own IDT on TSS.RSP0 (the phases and their SDM sections: `test_guests::user_mode`).
//! Expected outcome, natively and under the VMM: every phase "ok", exit success.
#![no_std]
#![no_main]

use test_guests::machine::{Layout, LOW_GDT};
use test_guests::user_mode::run;

#[no_mangle]
extern "C" fn _start() -> ! {
    run(Layout {
        name: "low selectors",
        gdt: &LOW_GDT,
        kernel_cs: 0x08,
        kernel_ds: 0x10,
        user_cs: 0x23,
        user_ds: 0x1b,
        tss: 0x28,
    })
}
