//! The physical frame allocator, built from the Multiboot memory map.
//!
//! Usable frames are the available RAM regions above 1 MiB minus the kernel image, the Multiboot
//! structures and the modules. Frames are handed out from the lowest region upward (a bump
//! pointer) and freed frames go on a free list threaded through the frames themselves (reached
//! through the direct map), so the allocator needs no memory of its own.

use super::{phys_to_virt, FRAME_SIZE};
use crate::multiboot::{BootData, PhysRange, MAX_REGIONS};
use spin::Mutex;

/// The first MiB holds firmware tables and the VGA hole: never used.
const LOW_MEMORY_END: u64 = 0x10_0000;
/// Free ranges after subtracting reserved ones (each reservation can split one range in two).
const MAX_FREE_RANGES: usize = 2 * MAX_REGIONS + 8;

extern "C" {
    static __kernel_phys_start: u8;
    static __kernel_phys_end: u8;
}

struct FrameAllocator {
    ranges: [PhysRange; MAX_FREE_RANGES],
    count: usize,
    /// Index of the range the bump pointer is in, and the next never-used frame in it.
    current: usize,
    next: u64,
    /// Head of the free list (physical address, 0 = empty): each free frame's first u64 is the
    /// next free frame.
    free_head: u64,
    free_frames: u64,
    direct_map_ready: bool,
}

static FRAMES: Mutex<FrameAllocator> = Mutex::new(FrameAllocator {
    ranges: [PhysRange { start: 0, end: 0 }; MAX_FREE_RANGES],
    count: 0,
    current: 0,
    next: 0,
    free_head: 0,
    free_frames: 0,
    direct_map_ready: false,
});

/// What `init` found.
pub struct FrameStats {
    /// Bytes of available RAM in the memory map.
    pub usable_bytes: u64,
    /// Available regions in the memory map.
    pub regions: usize,
    /// Frames the allocator can hand out.
    pub free_frames: u64,
}

/// Removes `cut` from every range in `ranges[..*count]`, splitting where needed.
fn subtract(ranges: &mut [PhysRange; MAX_FREE_RANGES], count: &mut usize, cut: PhysRange) {
    let mut i = 0;
    while i < *count {
        let r = ranges[i];
        if cut.end <= r.start || cut.start >= r.end {
            i += 1;
            continue;
        }
        let left = PhysRange {
            start: r.start,
            end: cut.start.max(r.start),
        };
        let right = PhysRange {
            start: cut.end.min(r.end),
            end: r.end,
        };
        ranges[i] = left;
        if right.start < right.end && *count < MAX_FREE_RANGES {
            ranges[*count] = right;
            *count += 1;
        }
        i += 1;
    }
    // Drop emptied ranges.
    let mut kept = 0;
    for j in 0..*count {
        if ranges[j].start < ranges[j].end {
            ranges[kept] = ranges[j];
            kept += 1;
        }
    }
    *count = kept;
}

/// Builds the allocator from the memory map.
pub fn init(boot: &BootData) -> FrameStats {
    let mut a = FRAMES.lock();
    let mut usable = 0;
    for r in &boot.ram[..boot.ram_count] {
        usable += r.end - r.start;
        let start = r.start.max(LOW_MEMORY_END).next_multiple_of(FRAME_SIZE);
        let end = r.end & !(FRAME_SIZE - 1);
        if start < end && a.count < MAX_FREE_RANGES {
            let n = a.count;
            a.ranges[n] = PhysRange { start, end };
            a.count += 1;
        }
    }
    let kernel = PhysRange {
        start: core::ptr::addr_of!(__kernel_phys_start) as u64,
        end: core::ptr::addr_of!(__kernel_phys_end) as u64,
    };
    // The symbols are linker-script absolute values (physical addresses), not real objects.
    let fa = &mut *a;
    subtract(&mut fa.ranges, &mut fa.count, kernel);
    for r in &boot.reserved[..boot.reserved_count] {
        let page_aligned = PhysRange {
            start: r.start & !(FRAME_SIZE - 1),
            end: r.end.next_multiple_of(FRAME_SIZE),
        };
        subtract(&mut fa.ranges, &mut fa.count, page_aligned);
    }
    fa.ranges[..fa.count].sort_unstable_by_key(|r| r.start);
    fa.current = 0;
    fa.next = fa.ranges.first().map_or(0, |r| r.start);
    fa.free_frames = fa.ranges[..fa.count]
        .iter()
        .map(|r| (r.end - r.start) / FRAME_SIZE)
        .sum();
    FrameStats {
        usable_bytes: usable,
        regions: boot.ram_count,
        free_frames: fa.free_frames,
    }
}

/// Called once the direct map is loaded: from then on freed frames can hold the free list.
pub fn direct_map_ready() {
    FRAMES.lock().direct_map_ready = true;
}

/// Allocates one 4 KiB frame (contents undefined); `None` when memory is exhausted.
pub fn allocate() -> Option<u64> {
    let mut a = FRAMES.lock();
    if a.free_head != 0 {
        let frame = a.free_head;
        // SAFETY: frames on the free list are owned by the allocator and mapped by the direct
        // map; their first u64 is the next entry, written by `deallocate`.
        a.free_head = unsafe { phys_to_virt(frame).cast::<u64>().read() };
        a.free_frames -= 1;
        return Some(frame);
    }
    while a.current < a.count {
        let range = a.ranges[a.current];
        if a.next < range.end {
            let frame = a.next;
            a.next += FRAME_SIZE;
            a.free_frames -= 1;
            return Some(frame);
        }
        a.current += 1;
        a.next = a.ranges.get(a.current).map_or(0, |r| r.start);
    }
    None
}

/// Allocates one frame and fills it with zeros.
pub fn allocate_zeroed() -> Option<u64> {
    let frame = allocate()?;
    // SAFETY: the frame was just handed out, so nothing else uses it; it is mapped at
    // `phys_to_virt` (the direct map, or the boot identity map before the switch, see paging).
    unsafe {
        core::ptr::write_bytes(
            super::paging::table_ptr(frame).cast::<u8>(),
            0,
            FRAME_SIZE as usize,
        )
    };
    Some(frame)
}

/// Returns a frame to the allocator.
///
/// # Safety
/// `frame` must have come from [`allocate`] and must no longer be used or mapped anywhere.
pub unsafe fn deallocate(frame: u64) {
    let mut a = FRAMES.lock();
    assert!(
        a.direct_map_ready,
        "frame freed before the direct map exists"
    );
    // SAFETY: the caller gives the frame back; it is reachable through the direct map.
    unsafe { phys_to_virt(frame).cast::<u64>().write(a.free_head) };
    a.free_head = frame;
    a.free_frames += 1;
}

/// Frames still available.
pub fn free_frames() -> u64 {
    FRAMES.lock().free_frames
}
