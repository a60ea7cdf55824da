//! Host memory: the physical frame allocator, the host's own page tables (kernel image with
//! W^X permissions plus a direct map of all RAM, both in PML4 slot 511), and the heap.
//!
//! Memory layout (also in docs/ARCHITECTURE.md):
//!
//! | linear range                                  | what                                      |
//! |-----------------------------------------------|-------------------------------------------|
//! | `0 .. 0x0000_8000_0000_0000`                  | nothing for the host: the guest's half    |
//! | `0xFFFF_8000_0000_0000 .. 0xFFFF_FF80_0000_0000` | nothing for the host (guest kernel half) |
//! | `0xFFFF_FF80_0000_0000 ..` ([`DIRECT_MAP_BASE`]) | all RAM, physical address + base (2 MiB pages, NX) |
//! | `0xFFFF_FFFF_8000_0000 ..` ([`KERNEL_VMA`])   | the kernel image (4 KiB pages, W^X)       |
//!
//! Everything the host owns is in PML4 slot 511, so one PML4 entry, copied into every shadow
//! root, brings the VMM along into each guest address space, supervisor-only.

pub mod frames;
pub mod heap;
pub mod paging;

use crate::multiboot::BootData;

/// Where the kernel image is linked: physical address + KERNEL_VMA.
pub const KERNEL_VMA: u64 = 0xFFFF_FFFF_8000_0000;
/// Where all of physical memory is mapped: physical address + DIRECT_MAP_BASE.
pub const DIRECT_MAP_BASE: u64 = 0xFFFF_FF80_0000_0000;
/// Size of a 4 KiB frame.
pub const FRAME_SIZE: u64 = 4096;

/// The host-virtual address through which physical address `pa` is reached.
pub fn phys_to_virt(pa: u64) -> *mut u8 {
    (DIRECT_MAP_BASE + pa) as *mut u8
}

/// Builds the heap, the frame allocator and the host page tables, then switches to them.
pub fn init(boot: &BootData) {
    heap::init();
    let stats = frames::init(boot);
    paging::init(boot);
    log::info!(
        "memory: {} MiB usable in {} regions, {} free frames after the kernel image and boot data, heap {} KiB",
        stats.usable_bytes >> 20,
        stats.regions,
        stats.free_frames,
        heap::HEAP_SIZE / 1024
    );
}
