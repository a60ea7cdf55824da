//! Hundreds of address spaces: 300 PML4s, each a copy of the boot PML4 plus a private chain
//! (PDPT, page directory, page table) that maps one data page of its own at the same linear
//! address. The guest loads each CR3 in turn, reads the data page's tag through it and writes a
//! marker back, twice round all 300, then checks every tag read and every marker from the
//! identity map.
//!
//! A shadowing VMM keeps shadow tables per guest CR3 and must bound them (its shadow quota):
//! 300 address spaces need more shadow pages than it may hold, so it has to reclaim shadows of
//! older address spaces and refill them when they come back, without ever letting one address
//! space see another's page. On the CPU every read just gives its own tag (SDM Vol. 3 §4.10.4:
//! a CR3 load invalidates the non-global translations). Expected outcome, natively and under the
//! VMM: `1200 checks, 0 wrong`, exit success.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut};

use test_guests::machine::{read_cr3, write_cr3, PTE_P, PTE_W};
use test_guests::{exit, println};

/// How many address spaces: more than a shadow quota of 1024 pages can hold at once.
const SPACES: usize = 300;
/// How many times round all of them.
const PASSES: u64 = 2;
/// The linear address every address space maps to its own data page: PML4 slot 1.
const VA: u64 = 1 << 39;
/// A tag in the first quadword of each data page: `TAG | index`.
const TAG: u64 = 0x5AAD_0000_0000_0000;

#[repr(C, align(4096))]
struct Table([u64; 512]);

/// One address space: its PML4, its private chain for `VA`, and the page `VA` maps.
#[repr(C)]
struct Space {
    pml4: Table,
    pdpt: Table,
    pd: Table,
    pt: Table,
    data: Table,
}

static mut SPACE: [Space; SPACES] = [const {
    Space {
        pml4: Table([0; 512]),
        pdpt: Table([0; 512]),
        pd: Table([0; 512]),
        pt: Table([0; 512]),
        data: Table([0; 512]),
    }
}; SPACES];

/// Address space `i` (< SPACES); the image is identity-mapped, so this is also its physical
/// address.
fn space(i: usize) -> *mut Space {
    // SAFETY: only the address of entry `i` is taken (out of range panics); no reference made.
    unsafe { addr_of_mut!(SPACE[i]) }
}

/// Runs `f` on one address space through the identity map.
fn with<R>(s: *mut Space, f: impl FnOnce(&mut Space) -> R) -> R {
    // SAFETY: single-threaded; `s` is one of our statics and no other reference to it exists.
    f(unsafe { &mut *s })
}

#[no_mangle]
extern "C" fn _start() -> ! {
    test_guests::install_fault_handlers();
    let boot_cr3 = read_cr3();
    let boot_pml4 = (boot_cr3 & !0xFFF) as *const u64;
    for i in 0..SPACES {
        let s = space(i);
        for e in 0..512 {
            // SAFETY: the boot PML4 is identity-mapped and e < 512.
            let boot_entry = unsafe { boot_pml4.wrapping_add(e).read_volatile() };
            with(s, |s| s.pml4.0[e] = boot_entry);
        }
        with(s, |s| {
            s.pml4.0[1] = addr_of!(s.pdpt) as u64 | PTE_P | PTE_W;
            s.pdpt.0[0] = addr_of!(s.pd) as u64 | PTE_P | PTE_W;
            s.pd.0[0] = addr_of!(s.pt) as u64 | PTE_P | PTE_W;
            s.pt.0[0] = addr_of!(s.data) as u64 | PTE_P | PTE_W;
            s.data.0[0] = TAG | i as u64;
        });
    }
    println(format_args!(
        "shadow-quota: {SPACES} address spaces, each mapping its own page at {VA:#x}"
    ));
    let (mut checks, mut wrong) = (0u64, 0u64);
    for pass in 0..PASSES {
        for i in 0..SPACES {
            // The PML4 is the first field (`repr(C)`): the address space's address is its CR3.
            // The copy maps everything the boot tables map (this code, its stack).
            write_cr3(space(i) as u64);
            // SAFETY: VA is mapped, writable, to this address space's data page.
            let tag = unsafe { (VA as *const u64).read_volatile() };
            // SAFETY: as above.
            unsafe { ((VA + 8) as *mut u64).write_volatile(pass << 32 | i as u64) };
            write_cr3(boot_cr3);
            checks += 1;
            if tag != TAG | i as u64 {
                wrong += 1;
                println(format_args!(
                    "shadow-quota: pass {pass} space {i}: read {tag:#x}, expected {:#x}",
                    TAG | i as u64
                ));
            }
        }
        for i in 0..SPACES {
            let marker = with(space(i), |s| s.data.0[1]);
            checks += 1;
            if marker != pass << 32 | i as u64 {
                wrong += 1;
                println(format_args!(
                    "shadow-quota: pass {pass} space {i}: marker {marker:#x}, expected {:#x}",
                    pass << 32 | i as u64
                ));
            }
        }
    }
    println(format_args!(
        "shadow-quota: {SPACES} address spaces, {PASSES} passes: {checks} checks, {wrong} wrong"
    ));
    exit(if wrong == 0 {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
