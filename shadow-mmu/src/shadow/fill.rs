//! The #PF path: what a page fault taken while the guest ran means, and filling the shadow
//! (the "页表虚拟化" challenge). The guest's tables are walked at the view's *virtual*
//! privilege (SDM vol. 3 §4.6), and the fault is reflected with the guest's own error code
//! (§4.7), filled from the walk (a 4 KiB shadow leaf with the rights of the whole walk, writable
//! only once the guest's D bit is set, §4.8), handed to the emulator (a store to a
//! write-protected guest page table), or turned into a stop.

use crate::addr::{GuestPhysAddr, GuestVirtAddr, HostPhysAddr, PageFaultErrorCode, PAGE_SIZE};
use crate::machine::{FrameAllocator, HostMemory};
use crate::p2m::MemoryError;
use crate::pte::{PageTableEntry, PteFlags, PTE_PAT};
use crate::walk::{Access, AccessKind, Translation, WalkError};

use super::sharing::Role;
use super::{in_vmm_range, slot, FaultOutcome, Policy, ShadowMmu, StopReason, View};

/// Flags of a non-leaf shadow entry: every right granted, the leaf decides.
const SHADOW_TABLE_FLAGS: u64 = PteFlags::PRESENT.bits()
    | PteFlags::READ_WRITE.bits()
    | PteFlags::USER_SUPERVISOR.bits()
    | PteFlags::ACCESSED.bits();

/// Why one fill attempt failed; the first two are retried after a reclaim.
pub(super) enum FillError {
    NoShadowPage,
    NoHostFrame,
    OutsideRam(GuestPhysAddr),
}

/// How the shadow serves an access the guest's own tables allow: the rights of its shadow leaf,
/// and whether the access is a store the emulator must perform instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct LeafRights {
    /// The shadow leaf allows writes (R/W = 1, with D = 1).
    pub(crate) writable: bool,
    /// The access is a write to a guest page table the shadow keeps write-protected: the
    /// emulator performs the store, so the shadow MMU sees it (a page-table write).
    pub(crate) emulate_write: bool,
}

// Lab 4 (docs/labs/lab4-shadow-page-fault.md): built with the feature `lab4`, the student's
// shadow leaf rights (labs/lab4_shadow_page_fault.rs) stand in for the ones below.
#[cfg(feature = "lab4")]
use crate::labs::lab4::leaf_rights;

/// The shadow leaf for an access (`write` or not) in `view` through a guest walk whose entries
/// all have R/W = 1 (`guest_writable`) and whose leaf has D = 1 (`guest_dirty`), to a guest page
/// that is (`write_protected`) or is not a guest page table the cached policy write-protects:
/// writable only where the guest allows the write at the view's privilege (a supervisor write
/// ignores R/W while CR0.WP = 0, §4.6.1), once D is set (so the first write faults and the walk
/// sets D, §4.8), and never on a write-protected page table, a write to which is emulated.
#[cfg(not(feature = "lab4"))]
fn leaf_rights(
    view: View,
    write: bool,
    cr0_wp: bool,
    guest_writable: bool,
    guest_dirty: bool,
    write_protected: bool,
) -> LeafRights {
    let guest_allows_write = match view {
        View::Kernel => guest_writable || !cr0_wp,
        View::User => guest_writable,
    };
    LeafRights {
        writable: guest_allows_write && guest_dirty && !write_protected,
        emulate_write: write && write_protected,
    }
}

/// The kind of access a hardware #PF error code reports (§4.7: I/D, then W/R).
fn fault_kind(hw: PageFaultErrorCode) -> AccessKind {
    if hw.contains(PageFaultErrorCode::INSTRUCTION_FETCH) {
        AccessKind::Fetch
    } else if hw.contains(PageFaultErrorCode::WRITE) {
        AccessKind::Write
    } else {
        AccessKind::Read
    }
}

/// The shadow leaf for the guest translation `t` on host frame `frame`: always present, U = 1
/// (the guest really runs at CPL 3) and A = 1; R/W (with D) only when `writable`; the guest's XD,
/// PWT, PCD and PAT; guest G remembered in a software bit, never as G (§4.10.2.4).
pub(super) fn leaf_entry(frame: HostPhysAddr, t: &Translation, writable: bool) -> u64 {
    let mut v = frame.as_u64()
        | PteFlags::PRESENT.bits()
        | PteFlags::USER_SUPERVISOR.bits()
        | PteFlags::ACCESSED.bits();
    let optional = [
        (
            writable,
            PteFlags::READ_WRITE.bits() | PteFlags::DIRTY.bits(),
        ),
        (t.execute_disable, PteFlags::XD.bits()),
        (t.pwt, PteFlags::PWT.bits()),
        (t.pcd, PteFlags::PCD.bits()),
        (t.pat, PTE_PAT),
        (t.global, PteFlags::SHADOW_GUEST_GLOBAL.bits()),
    ];
    for (set, bits) in optional {
        if set {
            v |= bits;
        }
    }
    v
}

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// Handles a #PF the real CPU raised while the guest ran in `view` at linear address `gva`
    /// with hardware error code `hw` (always U/S = 1: the guest really runs at CPL 3). The guest
    /// walk is done at the view's *virtual* privilege, so a reflected error code is the one the
    /// guest would see on real hardware (§4.7).
    pub fn handle_page_fault(
        &mut self,
        view: View,
        gva: GuestVirtAddr,
        hw: PageFaultErrorCode,
    ) -> FaultOutcome {
        if hw.contains(PageFaultErrorCode::RESERVED_BIT) {
            // A reserved bit in a shadow entry is a VMM bug (e.g. a host frame above the host's
            // MAXPHYADDR); the refill below rewrites the leaf.
            log::warn!("shadow-mmu: RSVD #PF at {gva:?} in a shadow table");
        }
        let access = Access::new(fault_kind(hw), view.privilege());
        if !self.roots.contains_key(&self.current_key) {
            // Only after a failed CR3 load or policy switch: try again before filling.
            if let Err(reason) = self.create_pair(self.current_key, self.current_key) {
                return self.stop(reason);
            }
        }
        let t = match self.guest_walk(gva, access) {
            Ok(t) => t,
            // The VMM's slot included: the guest was told never to map it, and where it does not,
            // its own #PF is exactly what the hardware would give it (a wild pointer in a guest
            // process is the guest kernel's to handle, not a reason to stop the machine).
            Err(WalkError::PageFault(pf)) => {
                self.stats.reflections += 1;
                return FaultOutcome::Reflect(pf);
            }
            Err(WalkError::Memory(e)) => return self.stop(self.memory_stop(e, Some(gva))),
        };
        if in_vmm_range(gva) {
            // The guest maps the VMM's slot: that mapping can never be honoured.
            return self.stop(StopReason::VmmRange { gva });
        }
        self.fill_with_reclaim(view, gva, &t, access)
    }

    /// Fills the shadow for the guest translation `t`; when the quota or the host runs short,
    /// reclaims shadow memory and tries again, and stops the guest only when nothing is left.
    fn fill_with_reclaim(
        &mut self,
        view: View,
        gva: GuestVirtAddr,
        t: &Translation,
        access: Access,
    ) -> FaultOutcome {
        let mut budget = true;
        loop {
            match self.fill(view, gva, t, access) {
                Ok(outcome) => return outcome,
                Err(FillError::OutsideRam(gpa)) => {
                    return self.stop(StopReason::GpaOutsideRam {
                        gpa,
                        gva: Some(gva),
                    })
                }
                Err(FillError::NoShadowPage) => {
                    if !self.reclaim([self.current_key; 2], &mut budget) {
                        return self.stop(StopReason::ShadowMemoryExhausted);
                    }
                }
                Err(FillError::NoHostFrame) => {
                    if !self.reclaim([self.current_key; 2], &mut budget) {
                        return self.stop(StopReason::HostMemoryExhausted);
                    }
                }
            }
        }
    }

    /// Builds the shadow path for `gva` in `view` from the guest translation `t` and writes the
    /// leaf with the rights the guest grants at the view's privilege.
    pub(super) fn fill(
        &mut self,
        view: View,
        gva: GuestVirtAddr,
        t: &Translation,
        access: Access,
    ) -> Result<FaultOutcome, FillError> {
        let table = self.shadow_path(view, gva, t)?;
        let gfn = t.frame_number();
        let frame = self
            .p2m
            .host_frame(gfn, &mut self.mem, &mut self.alloc)
            .map_err(|e| match e {
                MemoryError::OutsideRam(_) => FillError::OutsideRam(t.gpa),
                MemoryError::OutOfHostFrames => FillError::NoHostFrame,
            })?;
        let mut protected = self.is_write_protected_gpa(t.gpa);
        if access.kind == AccessKind::Write && protected && self.try_unsync(t.gpa.frame_number()) {
            // Not a root: the store runs natively from now on (`unsync.rs`).
            protected = false;
        }
        if access.kind == AccessKind::Write && protected && self.write_flooded(t) {
            // Decided before the leaf is written, so that the leaf below is the writable one the
            // retry needs: `Filled` promises that the shadow now allows the access (returning it
            // over a read-only leaf cost the guest a second #PF for the same store).
            protected = false;
        }
        let rights = leaf_rights(
            view,
            access.kind == AccessKind::Write,
            self.mode.cr0_wp,
            t.writable,
            t.dirty,
            protected,
        );
        let writable = rights.writable;
        let at = slot(table, gva.table_index(1));
        let old = self.write_leaf(at, leaf_entry(frame, t, writable), gfn, writable);
        if rights.emulate_write {
            self.stats.page_table_writes += 1;
            return Ok(FaultOutcome::EmulatePageTableWrite { gpa: t.gpa });
        }
        self.write_flood = None;
        if old.is_present() && !old.has(PteFlags::READ_WRITE) && writable {
            self.stats.dirty_upgrades += 1;
        } else {
            self.stats.fills += 1;
            self.prefetch_around(view, gva, t, table);
        }
        Ok(FaultOutcome::Filled)
    }

    /// The shadow page table (level 1) that holds the leaf for `gva` in `view`, built where
    /// missing: each shadow table on the way mirrors the guest table the walk `t` used at that
    /// level, or holds pieces of the guest's large page below its leaf level.
    fn shadow_path(
        &mut self,
        view: View,
        gva: GuestVirtAddr,
        t: &Translation,
    ) -> Result<u64, FillError> {
        let mut table = self.current_root(view).as_u64();
        // The root mirrors the guest PML4 from its first fill on.
        self.register_shadow(table, self.current_key / PAGE_SIZE);
        let leaf_level = t.page_size.leaf_level();
        for level in (2..=4u8).rev() {
            let child_level = level - 1;
            // The shadow child mirrors the guest table the guest entry points to, or pieces of a
            // guest large page.
            let (guest_table, large) = if child_level >= leaf_level {
                let k = (4 - child_level) as usize;
                (t.entries.get(k).map(|e| e.frame_number()), false)
            } else {
                (None, true)
            };
            let idx = gva.table_index(level);
            let role = guest_table
                .filter(|_| !large)
                .and_then(|gfn| self.role_for(view, gfn, child_level, t));
            table = self.shadow_child(table, idx, child_level, guest_table, large, role)?;
        }
        Ok(table)
    }

    /// The shadow table at `level` under entry `idx` of shadow table `table`, mirroring
    /// `guest_table` (or pieces of a guest large page): the one there when it still mirrors
    /// them, else one another address space already built for the same `role` (`sharing.rs`),
    /// else a new one.
    fn shadow_child(
        &mut self,
        table: u64,
        idx: usize,
        level: u8,
        guest_table: Option<u64>,
        large: bool,
        role: Option<Role>,
    ) -> Result<u64, FillError> {
        let at = slot(table, idx);
        let e = PageTableEntry(self.mem.read_u64(at));
        if e.is_present() {
            match self.pages.get(&e.addr()) {
                Some(p)
                    if p.guest_table == guest_table
                        && p.large == large
                        && p.level == level
                        && (p.role.is_none() || p.role == role) =>
                {
                    return Ok(e.addr());
                }
                // The guest entry now points elsewhere (flush policy, no INVLPG yet): the old
                // subtree no longer mirrors the guest's, drop it.
                _ => {
                    self.zap_entry(table, idx);
                }
            }
        }
        let shared = role.and_then(|r| self.shared_page(r));
        let c = match shared {
            Some(c) => c,
            None => self.alloc_page(level, guest_table, large)?,
        };
        self.set_shadow_entry(table, idx, c | SHADOW_TABLE_FLAGS);
        if let Some(page) = self.pages.get_mut(&c) {
            page.parents.push(at.as_u64());
        }
        match (shared, role) {
            (Some(_), _) => self.stats.shared_links += 1,
            (None, Some(role)) => self.remember_role(role, c),
            (None, None) => {}
        }
        Ok(c)
    }

    /// Writes the shadow leaf `v` at `at` (mapping guest frame `gfn`) and returns the old one.
    /// Keeps the cached policy's index of writable leaves, and asks for a real TLB flush unless
    /// the new leaf only adds R/W and D to the old one (that #PF itself flushed the real TLB).
    pub(super) fn write_leaf(
        &mut self,
        at: HostPhysAddr,
        v: u64,
        gfn: u64,
        writable: bool,
    ) -> PageTableEntry {
        let old = PageTableEntry(self.mem.read_u64(at));
        self.forget_leaf(at, old);
        let upgrade = old.0 | PteFlags::READ_WRITE.bits() | PteFlags::DIRTY.bits();
        if old.is_present() && v != old.0 && v != upgrade {
            // Not a pure write upgrade: the real TLB may hold the old translation.
            self.tlb_flush = true;
        }
        let (table, idx) = (
            at.as_u64() & !(PAGE_SIZE - 1),
            (at.as_u64() & (PAGE_SIZE - 1)) as usize / 8,
        );
        self.set_shadow_entry(table, idx, v);
        if writable && self.policy == Policy::Cached {
            self.writable_leaves.insert((gfn, at.as_u64()));
        }
        old
    }
}
