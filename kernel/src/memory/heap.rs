//! The kernel heap: `talc` over a fixed region of the kernel's .bss.
//!
//! A static region needs no page-table work and is there before the frame allocator; the VMM's
//! big consumers (guest RAM, shadow page tables) take whole frames instead.
//!
//! Why talc and not a first-fit list: the shadow MMU allocates and frees small nodes on the
//! page-table-write path, and `linked_list_allocator`'s first-fit search over a fragmented hole
//! list cost ~2 000 instructions per allocation there (measured under icount:
//! docs/benchmarks.md, "Fast paths"); talc keeps free chunks in size bins.

use core::cell::UnsafeCell;
use talc::{ErrOnOom, Span, Talc, Talck};

/// Heap size in bytes.
pub const HEAP_SIZE: usize = 8 * 1024 * 1024;

#[repr(C, align(4096))]
struct HeapArea(UnsafeCell<[u8; HEAP_SIZE]>);
// SAFETY: handed to the allocator once by `init`; afterwards only the allocator touches it.
unsafe impl Sync for HeapArea {}
static HEAP_AREA: HeapArea = HeapArea(UnsafeCell::new([0; HEAP_SIZE]));

#[global_allocator]
static ALLOCATOR: Talck<spin::Mutex<()>, ErrOnOom> = Talc::new(ErrOnOom).lock();

/// Gives the heap area to the allocator.
pub fn init() {
    let span = Span::from_array(HEAP_AREA.0.get());
    // SAFETY: HEAP_AREA is a static region used by nothing else, and `init` runs once.
    let claimed = unsafe { ALLOCATOR.lock().claim(span) };
    assert!(claimed.is_ok(), "heap: the allocator refused its region");
}

/// Bytes currently allocated from the heap.
pub fn used() -> usize {
    ALLOCATOR.lock().get_counters().allocated_bytes
}
