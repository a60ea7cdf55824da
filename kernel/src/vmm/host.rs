//! The machine as shadow-mmu sees it, implemented on real hardware: host frames come from the
//! kernel's frame allocator and are read and written through the direct map.

use crate::memory::{frames, phys_to_virt};
use shadow_mmu::{FrameAllocator, HostMemory, HostPhysAddr};

/// Host-physical memory through the direct map.
#[derive(Debug, Default, Clone, Copy)]
pub struct DirectMap;

impl HostMemory for DirectMap {
    fn read_u64(&self, hpa: HostPhysAddr) -> u64 {
        // SAFETY: shadow-mmu only passes addresses inside frames it got from `HostFrames` (its
        // trait contract), 8-byte aligned; the direct map covers all RAM.
        unsafe { phys_to_virt(hpa.as_u64()).cast::<u64>().read_volatile() }
    }

    fn write_u64(&mut self, hpa: HostPhysAddr, value: u64) {
        // SAFETY: as in `read_u64`; the frame belongs to shadow-mmu (guest RAM or shadow table).
        unsafe {
            phys_to_virt(hpa.as_u64())
                .cast::<u64>()
                .write_volatile(value)
        }
    }

    fn zero_frame(&mut self, frame: HostPhysAddr) {
        // SAFETY: a whole frame owned by shadow-mmu, mapped by the direct map.
        unsafe { core::ptr::write_bytes(phys_to_virt(frame.as_u64()), 0, 4096) }
    }

    fn read_bytes(&self, hpa: HostPhysAddr, buf: &mut [u8]) {
        // SAFETY: the range lies inside one frame owned by shadow-mmu (trait contract) and does
        // not overlap `buf`, which is host heap or stack memory.
        unsafe {
            core::ptr::copy_nonoverlapping(phys_to_virt(hpa.as_u64()), buf.as_mut_ptr(), buf.len())
        }
    }

    fn write_bytes(&mut self, hpa: HostPhysAddr, data: &[u8]) {
        // SAFETY: as in `read_bytes`, in the other direction.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), phys_to_virt(hpa.as_u64()), data.len())
        }
    }
}

/// The kernel's frame allocator.
#[derive(Debug, Default, Clone, Copy)]
pub struct HostFrames;

impl FrameAllocator for HostFrames {
    fn allocate_frame(&mut self) -> Option<HostPhysAddr> {
        frames::allocate().map(HostPhysAddr::new)
    }

    fn deallocate_frame(&mut self, frame: HostPhysAddr) {
        // SAFETY: shadow-mmu only gives back frames it got from `allocate_frame` and no longer
        // maps or uses (trait contract).
        unsafe { frames::deallocate(frame.as_u64()) }
    }
}
