//! The machine as shadow-mmu sees it, implemented on real hardware: host frames come from the
//! kernel's frame allocator and are read and written through the direct map.

use crate::memory::{frames, phys_to_virt};
use shadow_mmu::{FrameAllocator, GuestVirtAddr, HostMemory, HostPhysAddr};
use vmm_core::cpu::HostCpu;
use vmm_core::io::Clock;

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

/// Guest memory as the emulator sees it, with a loaded-CR3 copy: an access first goes through the
/// shadow page tables loaded in CR3 right now, as if it hit in a TLB. The shadow maps a page
/// only as the guest's own tables allow it (filled by a guest walk that set the accessed bit;
/// writable only once the dirty bit is set; page-table pages read-only under the cached
/// policy), so whatever succeeds here is what the walk would allow. On any fault (not filled
/// yet, read-only, supervisor-only in the user view) the access falls back to the guest walk in
/// shadow-mmu, which sets A/D bits, reports guest page-table writes, and raises the guest's
/// #PF. Only the privilege the loaded view stands for takes the loaded-CR3 copy (the kernel view maps
/// every guest page user-accessible), and a write that crosses a page never does (it must not
/// half-happen before the walk decides).
pub struct GuestAccess<'a> {
    /// The guest's shadow MMU.
    pub mmu: &'a mut crate::vmm::Mmu,
    /// The shadow view loaded in CR3.
    pub view: shadow_mmu::View,
}

impl<'a> GuestAccess<'a> {
    /// Guest memory through `mmu`, with `view` the shadow view loaded in CR3.
    pub fn new(mmu: &'a mut crate::vmm::Mmu, view: shadow_mmu::View) -> Self {
        Self { mmu, view }
    }
}

impl GuestAccess<'_> {
    /// Whether `[gva, gva + len)` is guest linear space (in one canonical half, below the VMM's
    /// slot) that an access with `privilege` may try through the loaded view.
    fn loaded_cr3_copy_allowed(
        &self,
        gva: GuestVirtAddr,
        len: usize,
        privilege: shadow_mmu::Privilege,
    ) -> bool {
        let same_privilege = matches!(
            (self.view, privilege),
            (shadow_mmu::View::Kernel, shadow_mmu::Privilege::Supervisor)
                | (shadow_mmu::View::User, shadow_mmu::Privilege::User)
        );
        let gva = gva.as_u64();
        let Some(end) = gva.checked_add(len as u64) else {
            return false;
        };
        let lower = end <= shadow_mmu::addr::LOWER_HALF_END;
        let upper = gva >= shadow_mmu::addr::UPPER_HALF_START && end <= boot::VMM_RESERVED_VA_START;
        same_privilege && len > 0 && (lower || upper)
    }
}

impl vmm_core::cpu::GuestMemory for GuestAccess<'_> {
    fn read_linear(
        &mut self,
        gva: GuestVirtAddr,
        buf: &mut [u8],
        kind: shadow_mmu::AccessKind,
        privilege: shadow_mmu::Privilege,
    ) -> Result<(), shadow_mmu::TranslateError> {
        // An instruction fetch may use any view: the CPU has just fetched the same bytes
        // through it to trap on them.
        let allowed = if kind == shadow_mmu::AccessKind::Fetch {
            self.loaded_cr3_copy_allowed(gva, buf.len(), self.view.privilege())
        } else {
            self.loaded_cr3_copy_allowed(gva, buf.len(), privilege)
        };
        if allowed {
            // SAFETY: the source is guest linear memory below the VMM's slot (checked), read
            // through the loaded shadow; a fault is recovered; `buf` is ours.
            let copied = unsafe {
                crate::trap::copy_or_fault(buf.as_mut_ptr(), gva.as_u64() as *const u8, buf.len())
            };
            if copied {
                return Ok(());
            }
        }
        vmm_core::cpu::GuestMemory::read_linear(self.mmu, gva, buf, kind, privilege)
    }

    fn write_linear(
        &mut self,
        gva: GuestVirtAddr,
        data: &[u8],
        privilege: shadow_mmu::Privilege,
    ) -> Result<(), shadow_mmu::TranslateError> {
        let one_page = gva.page_offset() + data.len() as u64 <= 0x1000;
        if one_page && self.loaded_cr3_copy_allowed(gva, data.len(), privilege) {
            // SAFETY: the destination is guest linear memory below the VMM's slot (checked)
            // that the loaded shadow maps writable, or the copy faults before writing (one
            // page: all or nothing); `data` is ours.
            if unsafe {
                crate::trap::copy_or_fault(gva.as_u64() as *mut u8, data.as_ptr(), data.len())
            } {
                return Ok(());
            }
        }
        vmm_core::cpu::GuestMemory::write_linear(self.mmu, gva, data, privilege)
    }
}

/// The 8 bytes at the guest's `rip`, read through the loaded shadow tables in one load, when
/// they lie on RIP's page in guest linear space (below the VMM's slot): the CPU has just
/// fetched the instruction there to trap on it, so the page is mapped and executable in the
/// loaded view. `None` otherwise, or when the read faults (the caller takes the slow path).
pub fn guest_code_bytes(rip: u64) -> Option<[u8; 8]> {
    let on_one_page = rip & 0xFFF <= 0x1000 - 8;
    let lower = rip < shadow_mmu::addr::LOWER_HALF_END;
    let upper = (shadow_mmu::addr::UPPER_HALF_START..boot::VMM_RESERVED_VA_START).contains(&rip);
    if !on_one_page || !(lower || upper) {
        return None;
    }
    crate::trap::read_u64_or_fault(rip).map(u64::to_le_bytes)
}

/// The host timer as the virtual devices' clock.
#[derive(Debug, Clone, Copy)]
pub struct HostClock;

impl Clock for HostClock {
    fn now_ticks(&self) -> u64 {
        crate::timer::ticks()
    }

    fn ticks_per_second(&self) -> u64 {
        u64::from(crate::timer::tick_hz())
    }
}

/// The host CPU's own CPUID and TSC, which vmm-core passes on to the guest.
#[derive(Debug, Clone, Copy)]
pub struct RealCpu;

impl HostCpu for RealCpu {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = x86::cpuid::cpuid!(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }

    fn rdtsc(&self) -> u64 {
        super::instrument::rdtsc()
    }
}
