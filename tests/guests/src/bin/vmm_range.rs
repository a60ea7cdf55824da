//! Maps a page at the start of PML4 slot 511 (the VMM's reserved range, `reserved_va_start`) in
//! its own page tables and writes to it. The VMM must never honour that mapping: it stops the
//! guest with a report.
#![no_std]
#![no_main]

#[repr(C, align(4096))]
struct Table([u64; 512]);
static mut PDPT: Table = Table([0; 512]);
static mut PD: Table = Table([0; 512]);
static mut PT: Table = Table([0; 512]);
static mut TARGET: Table = Table([0; 512]);

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    test_guests::install_fault_handlers();
    // SAFETY: RDI at entry, per the contract.
    let info = unsafe { test_guests::boot_info(info) };
    let va = info.reserved_va_start;
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack)) };
    // The image is identity-mapped, so its statics' addresses are their physical addresses.
    let pml4 = (cr3 & !0xFFF) as *mut u64;
    let (pdpt, pd, pt) = (
        core::ptr::addr_of_mut!(PDPT),
        core::ptr::addr_of_mut!(PD),
        core::ptr::addr_of_mut!(PT),
    );
    let target = core::ptr::addr_of_mut!(TARGET) as u64;
    // SAFETY: single-threaded; PDPT is our static and no reference to it exists.
    unsafe { (*pdpt).0[((va >> 30) & 511) as usize] = pd as u64 | 3 };
    // SAFETY: likewise for PD.
    unsafe { (*pd).0[((va >> 21) & 511) as usize] = pt as u64 | 3 };
    // SAFETY: likewise for PT.
    unsafe { (*pt).0[((va >> 12) & 511) as usize] = target | 3 };
    // SAFETY: the index is below 512, so the entry stays inside the PML4 page.
    let slot = unsafe { pml4.add(((va >> 39) & 511) as usize) };
    // SAFETY: the boot PML4 is identity-mapped and ours to change; slot 511 (where `va` lies)
    // maps nothing this code uses.
    unsafe { slot.write_volatile(pdpt as u64 | 3) };
    // SAFETY: reloading the same CR3 only flushes the TLB, so the new mapping takes effect.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) cr3, options(nostack)) };
    test_guests::println(format_args!("vmm-range: mapped {va:#x}, writing to it"));
    // SAFETY: natively this would be a normal write to a page we mapped; under the VMM the range
    // belongs to the host, which must refuse.
    unsafe { (va as *mut u64).write_volatile(0xBAD) };
    test_guests::println(format_args!(
        "vmm-range: the write to the VMM's range went through (wrong)"
    ));
    test_guests::exit(boot::exit_code::FAILURE)
}
