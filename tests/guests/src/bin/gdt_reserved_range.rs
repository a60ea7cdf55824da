//! A kernel whose GDT fills the whole 64 KiB a GDTR can cover, with descriptors of its own at
//! the indices the VMM reserves at the top of the real GDT (docs/ARCHITECTURE.md, "Shadow
//! descriptor tables"): 64-bit data at 8188 (selector 0xFFE0) and 64-bit code at 8189 (0xFFE8).
//!
//! Natively both work: `mov ds, 0xFFE0` loads the data descriptor, and a far return to
//! 0xFFE8 runs on the code descriptor. Under the VMM the data-segment load is emulated against
//! the guest's table and succeeds too (the guest's own descriptor, not the VMM's host code that
//! sits at that real index); running on CS 0xFFE8 cannot be shadowed, so the VMM stops the guest
//! with a message naming the reserved range — a clean stop, never the VMM's own descriptor.
#![no_std]
#![no_main]

use test_guests::machine::{code64, data};
use test_guests::println;

const ENTRIES: usize = 8192;
static mut GDT: [u64; ENTRIES] = [0; ENTRIES];

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::install_fault_handlers();
    let gdt = core::ptr::addr_of_mut!(GDT);
    // SAFETY: single-threaded guest; the table is static and only the CPU reads it after LGDT.
    let gdt = unsafe { &mut *gdt };
    gdt[1] = code64(0);
    gdt[2] = data(0);
    gdt[8188] = data(0);
    gdt[8189] = code64(0);
    let mut pointer = [0u8; 10];
    pointer[..2].copy_from_slice(&0xFFFFu16.to_le_bytes());
    pointer[2..].copy_from_slice(&(gdt.as_ptr() as u64).to_le_bytes());
    let ds: u64;
    // SAFETY: the new table holds the boot selectors 0x08/0x10 as the boot GDT did, so the
    // reload of CS and SS keeps running this code; 0xFFE0 is a DPL-0 data descriptor.
    unsafe {
        core::arch::asm!(
            "lgdt [{p}]",
            "push 0x08",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {tmp:e}, 0x10",
            "mov ss, {tmp:e}",
            "mov {tmp:e}, 0xFFE0",
            "mov ds, {tmp:e}",
            "mov {ds:e}, ds",
            p = in(reg) pointer.as_ptr(),
            tmp = out(reg) _,
            ds = out(reg) ds,
        )
    };
    println(format_args!(
        "gdt-reserved-range: mov ds, 0xffe0 loaded the guest's data descriptor (ds reads {ds:#x})"
    ));
    let cs: u64;
    // SAFETY: 0xFFE8 is a 64-bit DPL-0 code descriptor in the guest's table; the far return
    // lands on the next instruction.
    unsafe {
        core::arch::asm!(
            "push 0xFFE8",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov {cs:e}, cs",
            tmp = out(reg) _,
            cs = out(reg) cs,
        )
    };
    println(format_args!("gdt-reserved-range: running on cs={cs:#x}"));
    test_guests::exit(boot::exit_code::SUCCESS)
}
