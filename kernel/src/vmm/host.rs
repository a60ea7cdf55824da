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

/// Guest memory as the emulator sees it, with one fast path: an instruction fetch first reads
/// the bytes through the shadow page tables that are loaded in CR3 right now (the CPU has just
/// fetched the same instruction through them to trap on it, so they map it exactly as the guest's
/// tables allowed, like a TLB would). Only if that read faults (the shadow entry is not filled
/// yet) does the fetch walk the guest's tables in shadow-mmu. Data accesses always take the
/// walk, which sets A/D bits and honours write protection of guest page tables.
pub struct GuestAccess<'a> {
    /// The guest's shadow MMU.
    pub mmu: &'a mut crate::vmm::Mmu,
}

impl GuestAccess<'_> {
    /// 16 bytes at `gva` read through the current CR3, or `None` if a page is not mapped there.
    fn fetch_through_shadow(gva: u64) -> Option<[u8; 16]> {
        // Only the guest's lower half: the host's own slot 511 is mapped in CR3 too (supervisor
        // only, readable from here), and the guest must never read it through us.
        let end = gva.checked_add(16)?;
        if end > 0x0000_8000_0000_0000 {
            return None;
        }
        let low = crate::trap::read_u64_or_fault(gva)?;
        let high = crate::trap::read_u64_or_fault(gva + 8)?;
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&low.to_le_bytes());
        bytes[8..].copy_from_slice(&high.to_le_bytes());
        Some(bytes)
    }
}

impl vmm_core::cpu::GuestMemory for GuestAccess<'_> {
    fn read_linear(
        &mut self,
        gva: u64,
        buf: &mut [u8],
        kind: shadow_mmu::AccessKind,
        privilege: shadow_mmu::Privilege,
    ) -> Result<(), shadow_mmu::TranslateError> {
        if kind == shadow_mmu::AccessKind::Fetch && buf.len() <= 16 {
            if let Some(bytes) = Self::fetch_through_shadow(gva) {
                buf.copy_from_slice(&bytes[..buf.len()]);
                return Ok(());
            }
        }
        vmm_core::cpu::GuestMemory::read_linear(self.mmu, gva, buf, kind, privilege)
    }

    fn write_linear(
        &mut self,
        gva: u64,
        data: &[u8],
        privilege: shadow_mmu::Privilege,
    ) -> Result<(), shadow_mmu::TranslateError> {
        vmm_core::cpu::GuestMemory::write_linear(self.mmu, gva, data, privilege)
    }
}
