//! The kernel heap: `linked_list_allocator` over a fixed region of the kernel's .bss.
//!
//! A static region needs no page-table work and is there before the frame allocator; the VMM's
//! big consumers (guest RAM, shadow page tables) take whole frames instead.

use core::cell::UnsafeCell;
use linked_list_allocator::LockedHeap;

/// Heap size in bytes.
pub const HEAP_SIZE: usize = 8 * 1024 * 1024;

#[repr(C, align(4096))]
struct HeapArea(UnsafeCell<[u8; HEAP_SIZE]>);
// SAFETY: handed to the allocator once by `init`; afterwards only the allocator touches it.
unsafe impl Sync for HeapArea {}
static HEAP_AREA: HeapArea = HeapArea(UnsafeCell::new([0; HEAP_SIZE]));

#[global_allocator]
static ALLOCATOR: LockedHeap = LockedHeap::empty();

/// Gives the heap area to the allocator.
pub fn init() {
    // SAFETY: HEAP_AREA is a static region used by nothing else, and `init` runs once.
    unsafe {
        ALLOCATOR
            .lock()
            .init(HEAP_AREA.0.get().cast::<u8>(), HEAP_SIZE)
    };
}

/// Bytes currently allocated from the heap.
pub fn used() -> usize {
    ALLOCATOR.lock().used()
}
