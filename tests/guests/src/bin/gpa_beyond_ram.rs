//! A paging-structure entry that points past the end of guest RAM: with `level=1` (the default)
//! a leaf PTE maps guest-physical 0x7000_0000 (1.75 GiB, beyond the guest's 32 MiB); with
//! `level=2`, `3` or `4` the PDE, PDPTE or PML4E names a next table there instead. The guest
//! then reads the linear address that walk translates.
//!
//! On the CPU an access to an address no memory answers is no fault: what it reads is the
//! platform's business (QEMU reads zeros), so a leaf there reads zeros, and a next table there
//! reads as all not-present entries (natively, #PF with error code 0). A VMM backs guest-physical memory with its
//! own frames and must never follow such an entry into host memory: it stops the guest cleanly
//! ("guest-physical address 0x70000000 is outside guest RAM"). Expected outcome: natively
//! (`level=1`) `no fault` and exit success; under the VMM a clean stop at every level.
#![no_std]
#![no_main]

use test_guests::machine::{read_cr3, write_cr3, PTE_P, PTE_W};
use test_guests::{exit, println};

#[repr(C, align(4096))]
struct Table([u64; 512]);
static mut PDPT: Table = Table([0; 512]);
static mut PD: Table = Table([0; 512]);
static mut PT: Table = Table([0; 512]);

/// Guest-physical 1.75 GiB: far beyond the guest's RAM.
const BEYOND_RAM: u64 = 0x7000_0000;
/// The linear address the tables translate: PML4 slot 1, every lower index 0.
const VA: u64 = 1 << 39;

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    test_guests::install_fault_handlers();
    // SAFETY: RDI at entry, per the contract.
    let cmdline = unsafe { test_guests::machine::cmdline(info) };
    let level = match cmdline.split(' ').find_map(|w| w.strip_prefix("level=")) {
        None => 1,
        Some("1") => 1,
        Some("2") => 2,
        Some("3") => 3,
        Some("4") => 4,
        Some(other) => {
            println(format_args!(
                "gpa-beyond-ram: level={other}? (valid: 1, 2, 3, 4)"
            ));
            exit(boot::exit_code::FAILURE)
        }
    };
    // The image is identity-mapped, so its statics' addresses are their physical addresses.
    let (pdpt, pd, pt) = (
        core::ptr::addr_of_mut!(PDPT),
        core::ptr::addr_of_mut!(PD),
        core::ptr::addr_of_mut!(PT),
    );
    // Each level's entry points at the next table, except the one at `level`, which points past
    // the end of RAM.
    let target = |l: u64, next: u64| if l == level { BEYOND_RAM } else { next };
    // SAFETY: single-threaded; the tables are our statics and no reference to them exists.
    unsafe { (*pdpt).0[0] = target(3, pd as u64) | PTE_P | PTE_W };
    // SAFETY: likewise.
    unsafe { (*pd).0[0] = target(2, pt as u64) | PTE_P | PTE_W };
    // SAFETY: likewise.
    unsafe { (*pt).0[0] = target(1, 0x1000) | PTE_P | PTE_W };
    let cr3 = read_cr3();
    let pml4 = (cr3 & !0xFFF) as *mut u64;
    // SAFETY: the boot PML4 is identity-mapped and ours; slot 1 maps nothing this code uses.
    unsafe {
        pml4.wrapping_add(1)
            .write_volatile(target(4, pdpt as u64) | PTE_P | PTE_W)
    };
    write_cr3(cr3);
    println(format_args!(
        "gpa-beyond-ram: level {level} entry -> {BEYOND_RAM:#x}, reading {VA:#x}"
    ));
    // SAFETY: natively a read of memory nobody answers; under the VMM the host must refuse.
    let value = unsafe { (VA as *const u64).read_volatile() };
    println(format_args!(
        "gpa-beyond-ram: level {level}: no fault (read {value:#x})"
    ));
    exit(boot::exit_code::SUCCESS)
}
