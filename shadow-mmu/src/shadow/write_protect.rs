//! Cached policy: write protection of the guest's page tables, so that the shadow tables can
//! be kept across CR3 loads (the "页表虚拟化" challenge: a guest store to its own tables must
//! reach the VMM). Every guest table a shadow table mirrors has no writable shadow leaf; a store
//! to it faults and is emulated, and exactly the shadow entries that mirror the written guest
//! entries are zapped. Tables the guest writes in a flood, or recycles after leaving their
//! address space, are unshadowed instead.

use alloc::collections::BTreeSet;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::machine::{FrameAllocator, HostMemory};
use crate::pte::{entry_index, PageTableEntry, PteFlags, ENTRY_SIZE};
use crate::walk::Translation;

#[cfg(doc)] // only the doc links use them
use super::FaultOutcome;
use super::{is_vmm_slot, Policy, ShadowMmu};

/// Consecutive emulated writes to one guest table, with no fill in between, after which it is
/// unshadowed instead (KVM's "write flooding" heuristic uses 3), unless the stores' own walk goes
/// through it (see `write_flooded`).
pub const WRITE_FLOOD_THRESHOLD: u32 = 4;

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// Cached policy, after [`FaultOutcome::EmulatePageTableWrite`]: if only address spaces
    /// other than the running one shadow the guest table at `gpa`, drops them and returns true:
    /// the guest is recycling the frame of a table it no longer runs on (a process exited, its
    /// tables are being zeroed or reused), so keeping those shadows would only turn every store
    /// into a trap. The write can then be retried; the next fault finds the page unprotected.
    /// False when the running address space uses the table: emulate the write.
    pub fn release_inactive_shadows(&mut self, gpa: GuestPhysAddr) -> bool {
        let Some(list) = self.shadowed.get(&gpa.frame_number()) else {
            return true;
        };
        // The common case first, without building the set: the running address space uses it.
        if list.iter().any(|&h| self.reaches_current(h)) {
            return false;
        }
        let mut owners = BTreeSet::new();
        for &h in list {
            self.owning_keys(h, &mut owners);
        }
        if owners.contains(&self.current_key) {
            return false;
        }
        for key in owners {
            self.free_pair(key);
            self.stats.released_address_spaces += 1;
        }
        self.tlb_flush = true;
        !self.shadowed.contains_key(&gpa.frame_number())
    }

    /// Cached policy: stops shadowing the guest table at `gpa` in every address space (frees
    /// the shadow pages that mirror it, clearing the entries that point at them), which lifts
    /// its write protection; the tables are rebuilt, and protected again, when next used.
    /// False when a root mirrors it (a guest PML4): then nothing changes.
    pub fn unshadow_guest_table(&mut self, gpa: GuestPhysAddr) -> bool {
        let gfn = gpa.frame_number();
        let Some(list) = self.shadowed.get(&gfn).cloned() else {
            return true;
        };
        if list
            .iter()
            .any(|h| self.pages.get(h).is_some_and(|p| p.parents.is_empty()))
        {
            return false;
        }
        for hpa in list {
            let parents = self
                .pages
                .get(&hpa)
                .map(|p| p.parents.clone())
                .unwrap_or_default();
            for at in parents {
                let points_here =
                    PageTableEntry(self.mem.read_u64(HostPhysAddr::new(at))).addr() == hpa;
                if points_here {
                    self.zap_entry(at & !(PAGE_SIZE - 1), entry_index(at));
                }
            }
        }
        self.stats.unshadowed_tables += 1;
        !self.shadowed.contains_key(&gfn)
    }

    /// True when a guest write to `gpa` must be emulated because the page holds a guest page
    /// table the cached policy shadows.
    pub fn is_write_protected_gpa(&self, gpa: GuestPhysAddr) -> bool {
        let gfn = gpa.frame_number();
        self.policy == Policy::Cached && self.shadowed.contains_key(&gfn) && !self.is_unsync(gfn)
    }

    /// Cached policy: the VMM wrote `len` bytes at guest-physical `gpa` on the guest's behalf
    /// (an emulated write to a write-protected page table). Zaps exactly the shadow entries that
    /// shadow the guest entries written. Idempotent; a no-op under the flush policy.
    pub fn notify_guest_pte_write(&mut self, gpa: GuestPhysAddr, len: usize) {
        if self.policy != Policy::Cached || len == 0 {
            return;
        }
        let start = gpa.as_u64() & !(ENTRY_SIZE - 1);
        let end = gpa.as_u64().saturating_add(len as u64);
        let mut at = start;
        while at < end {
            let gfn = at / PAGE_SIZE;
            let Some(list) = self.shadowed.get(&gfn) else {
                // Not a shadowed table: skip to the next frame.
                at = (gfn + 1).saturating_mul(PAGE_SIZE);
                continue;
            };
            let list = list.clone();
            let idx = entry_index(at);
            for table in list {
                let Some(page) = self.pages.get(&table) else {
                    continue;
                };
                if is_vmm_slot(page.level, idx) {
                    continue;
                }
                if self.zap_entry(table, idx) {
                    self.stats.zaps += 1;
                }
            }
            at += ENTRY_SIZE;
        }
    }

    /// Cached policy: records that shadow page `hpa` mirrors guest table `gfn`, write-protecting
    /// the guest table when it is the first.
    pub(super) fn register_shadow(&mut self, hpa: u64, gfn: u64) {
        if self.policy != Policy::Cached {
            return;
        }
        let below_root = match self.pages.get_mut(&hpa) {
            // Once per page: a root is offered again on every fill (`shadow_path`).
            Some(page) if page.registered => return,
            Some(page) => {
                page.registered = true;
                page.level < 4 && !page.large
            }
            None => false,
        };
        if !below_root && self.is_unsync(gfn) {
            // A root never mirrors an unsynced table (`unsync.rs`).
            self.resync(gfn);
        }
        let list = self.shadowed.entry(gfn).or_default();
        if list.contains(&hpa) {
            return;
        }
        let first = list.is_empty();
        list.push(hpa);
        if first {
            self.write_protect(gfn);
        }
    }

    /// Cached policy: `gfn` became a shadowed guest table; no shadow leaf may map it writable.
    pub(super) fn write_protect(&mut self, gfn: u64) {
        let Some(frame) = self.p2m.lookup(gfn) else {
            return;
        };
        let leaves: alloc::vec::Vec<(u64, u64)> = self
            .writable_leaves
            .range((gfn, 0)..=(gfn, u64::MAX))
            .copied()
            .collect();
        for (_, at) in leaves {
            self.writable_leaves.remove(&(gfn, at));
            let e = self.mem.read_u64(HostPhysAddr::new(at));
            let pte = PageTableEntry(e);
            if pte.is_present() && pte.has(PteFlags::READ_WRITE) && pte.addr() == frame.as_u64() {
                self.mem
                    .write_u64(HostPhysAddr::new(at), e & !PteFlags::READ_WRITE.bits());
                self.shadow_changed();
                self.tlb_flush = true;
            }
        }
    }

    /// Forgets a shadow leaf that is being replaced or removed.
    pub(super) fn forget_leaf(&mut self, at: HostPhysAddr, old: PageTableEntry) {
        if !old.is_present() || !old.has(PteFlags::READ_WRITE) {
            return;
        }
        if let Some(gfn) = self.p2m.guest_frame_of(HostPhysAddr::new(old.addr())) {
            self.writable_leaves.remove(&(gfn, at.as_u64()));
        }
    }

    /// Write flooding, for a write `t` to a write-protected guest table: a run of stores to one
    /// guest table with no fill in between (the guest zeroing or rebuilding it) is cheaper to let
    /// run natively than to emulate store by store. Counts the store and, from the
    /// [`WRITE_FLOOD_THRESHOLD`]th in a row on, unshadows the table; true when it is no longer
    /// shadowed (the caller then maps the store's page writable).
    ///
    /// A table that the store's own walk goes through (a guest that reaches its page tables
    /// through a self-map, e.g. a PTE pointing at the PD of the same walk) is never unshadowed:
    /// the shadow path that maps the store mirrors every table of its walk, so the table would
    /// be shadowed, and write-protected, again by the very fill that maps the page, and the
    /// store could not run natively anyway. Those stores stay emulated.
    pub(super) fn write_flooded(&mut self, t: &Translation) -> bool {
        let gfn = t.gpa.frame_number();
        self.write_flood = match self.write_flood {
            Some((g, n)) if g == gfn => Some((g, n.saturating_add(1))),
            _ => Some((gfn, 1)),
        };
        if !matches!(self.write_flood, Some((_, n)) if n >= WRITE_FLOOD_THRESHOLD) {
            return false;
        }
        if t.used_entries().iter().any(|e| e.frame_number() == gfn) {
            return false;
        }
        // The tables of the walk are not `gfn`, so the shadow path just built for the store
        // (which mirrors exactly them) survives the unshadowing.
        if self.unshadow_guest_table(t.gpa) {
            self.write_flood = None;
            return true;
        }
        false
    }
}
