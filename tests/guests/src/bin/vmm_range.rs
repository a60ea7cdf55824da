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
    // SAFETY: single-threaded; the boot page tables are ours to change (identity-mapped).
    unsafe {
        let pml4 = (cr3 & !0xFFF) as *mut u64;
        let (pdpt, pd, pt) = (
            core::ptr::addr_of_mut!(PDPT) as u64,
            core::ptr::addr_of_mut!(PD) as u64,
            core::ptr::addr_of_mut!(PT) as u64,
        );
        (*core::ptr::addr_of_mut!(PDPT)).0[((va >> 30) & 511) as usize] = pd | 3;
        (*core::ptr::addr_of_mut!(PD)).0[((va >> 21) & 511) as usize] = pt | 3;
        (*core::ptr::addr_of_mut!(PT)).0[((va >> 12) & 511) as usize] =
            core::ptr::addr_of_mut!(TARGET) as u64 | 3;
        pml4.add(((va >> 39) & 511) as usize)
            .write_volatile(pdpt | 3);
        core::arch::asm!("mov cr3, {}", in(reg) cr3, options(nostack));
    }
    test_guests::println(format_args!("vmm-range: mapped {va:#x}, writing to it"));
    // SAFETY: natively this would be a normal write to a page we mapped; under the VMM the range
    // belongs to the host, which must refuse.
    unsafe { (va as *mut u64).write_volatile(0xBAD) };
    test_guests::println(format_args!(
        "vmm-range: the write to the VMM's range went through (wrong)"
    ));
    test_guests::exit(boot::exit_code::FAILURE)
}
