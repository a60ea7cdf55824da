//! The host's own page tables and the helpers that build them.
//!
//! `init` builds a fresh PML4 whose only entry is slot 511: the direct map of RAM (2 MiB pages,
//! no-execute) and the kernel image (4 KiB pages: text read-only and executable, rodata read-only,
//! data and bss writable and no-execute), then loads it. The boot identity map is gone afterwards:
//! the lower half belongs to the guest.

use super::{frames, DIRECT_MAP_BASE, FRAME_SIZE, KERNEL_VMA};
use crate::multiboot::BootData;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use shadow_mmu::pte::{PteFlags, ADDRESS_MASK};

/// Physical address of the host PML4 (whose slot 511 every shadow root copies).
static HOST_ROOT: AtomicU64 = AtomicU64::new(0);
static DIRECT_MAP_LOADED: AtomicBool = AtomicBool::new(false);

/// A pointer through which the page-table frame at physical `pa` can be read and written: the
/// boot identity map before `init` switches CR3 (tables are allocated low), the direct map after.
pub fn table_ptr(pa: u64) -> *mut u64 {
    if DIRECT_MAP_LOADED.load(Ordering::Relaxed) {
        (DIRECT_MAP_BASE + pa) as *mut u64
    } else {
        pa as *mut u64
    }
}

/// Physical address of the host PML4.
pub fn host_root() -> u64 {
    HOST_ROOT.load(Ordering::Relaxed)
}

/// Maps one page of `size` bytes (4 KiB or 2 MiB) at `va` to `pa` under the PML4 at `root`,
/// creating intermediate tables as needed (writable, supervisor: the leaf decides). Returns
/// `None` if a frame could not be allocated or a huge page is in the way.
pub fn map(root: u64, va: u64, pa: u64, size: u64, flags: PteFlags) -> Option<()> {
    let leaf_level = if size == FRAME_SIZE { 1 } else { 2 };
    let mut table = root;
    for level in (leaf_level + 1..=4).rev() {
        let index = ((va >> (12 + 9 * (level - 1))) & 0x1FF) as usize;
        // SAFETY: index < 512 keeps the pointer inside the 4 KiB table at `table_ptr(table)`.
        let slot = unsafe { table_ptr(table).add(index) };
        // SAFETY: `table` is a page-table frame owned by the host (the root or one we created),
        // mapped where `table_ptr` says; no other reference to this entry is live.
        let entry = unsafe { &mut *slot };
        if *entry & PteFlags::PRESENT.bits() == 0 {
            let next = frames::allocate_zeroed()?;
            *entry = next | (PteFlags::PRESENT | PteFlags::READ_WRITE).bits();
        } else if *entry & PteFlags::PS.bits() != 0 {
            return None;
        }
        table = *entry & ADDRESS_MASK;
    }
    let index = ((va >> (12 + 9 * (leaf_level - 1))) & 0x1FF) as usize;
    let leaf_flags = if leaf_level == 2 {
        flags | PteFlags::PS
    } else {
        flags
    };
    // SAFETY: index < 512, as above, for the last-level table.
    let slot = unsafe { table_ptr(table).add(index) };
    // SAFETY: the last-level table is a host-owned frame reached through the entries above.
    unsafe { *slot = pa | (leaf_flags | PteFlags::PRESENT).bits() };
    Some(())
}

extern "C" {
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __data_end: u8;
}

/// Builds and loads the host page tables (see the module doc).
pub fn init(boot: &BootData) {
    let out_of_memory = || -> ! {
        crate::exit::config_error(format_args!(
            "memory map too small to build the host page tables"
        ))
    };
    let root = frames::allocate_zeroed().unwrap_or_else(|| out_of_memory());

    const HUGE: u64 = 2 * 1024 * 1024;
    let ram_end = boot.ram[..boot.ram_count]
        .iter()
        .map(|r| r.end)
        .max()
        .unwrap_or(0);
    let direct_end = ram_end.next_multiple_of(HUGE);
    let mut pa = 0;
    while pa < direct_end {
        let flags = PteFlags::READ_WRITE | PteFlags::XD;
        map(root, DIRECT_MAP_BASE + pa, pa, HUGE, flags).unwrap_or_else(|| out_of_memory());
        pa += HUGE;
    }

    let text_start = core::ptr::addr_of!(__text_start) as u64;
    let text_end = core::ptr::addr_of!(__text_end) as u64;
    let rodata_end = core::ptr::addr_of!(__rodata_end) as u64;
    let data_end = core::ptr::addr_of!(__data_end) as u64;
    let mut va = text_start;
    while va < data_end {
        let flags = if va < text_end {
            PteFlags::empty()
        } else if va < rodata_end {
            PteFlags::XD
        } else {
            PteFlags::READ_WRITE | PteFlags::XD
        };
        map(root, va, va - KERNEL_VMA, FRAME_SIZE, flags).unwrap_or_else(|| out_of_memory());
        va += FRAME_SIZE;
    }

    HOST_ROOT.store(root, Ordering::Relaxed);
    // SAFETY: the new tables map the kernel image (this code, its stacks, statics) at the same
    // addresses as the boot tables did, and everything else the host uses is reached through the
    // direct map from now on. The identity map is dropped: nothing after this uses it.
    unsafe { x86::controlregs::cr3_write(root) };
    DIRECT_MAP_LOADED.store(true, Ordering::Relaxed);
    frames::direct_map_ready();
    log::info!(
        "paging: host root {root:#x}; direct map of {} MiB at {DIRECT_MAP_BASE:#x}; kernel image {:#x}..{:#x} (W^X)",
        direct_end >> 20,
        text_start,
        data_end
    );
}
