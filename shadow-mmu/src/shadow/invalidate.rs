//! Invalidation: the guest's INVLPG and full flushes (SDM vol. 3 §4.10.4), and the primitive
//! every other path uses to drop shadow entries ([`ShadowMmu::zap_entry`]).
//!
//! The shadow tables play the TLB's part for the guest (the "页表虚拟化" challenge), so whatever
//! the guest does to invalidate its TLB drops the matching shadow entries; any entry dropped
//! may still be cached in the real TLB, which `take_tlb_flush` reports.

use alloc::vec::Vec;

use crate::addr::GuestVirtAddr;
use crate::machine::{FrameAllocator, HostMemory};
use crate::pte::{PageTableEntry, PteFlags};

use super::{is_vmm_slot, slot, ShadowMmu};

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// The guest executed INVLPG `gva`: drop its translation in both views of the current address
    /// space, the whole page when the guest maps it with a large page (§4.10.4.1).
    pub fn invlpg(&mut self, gva: GuestVirtAddr) {
        self.stats.invlpgs += 1;
        if let Some(pair) = self.roots.get(&self.current_key).copied() {
            for root in [pair.kernel, pair.user] {
                self.invlpg_in(root.as_u64(), gva);
            }
        }
        self.invlpg_unsynced(gva);
    }

    /// The address's entry in *every* shadow of an unsynced guest table, not only those the
    /// current roots reach now. A shared shadow table (`sharing.rs`) keeps its links when no
    /// root reaches it, and a fill through another entry can link it into the current address
    /// space again, without a CR3 load to resync what hangs below it: an entry the guest changed
    /// natively and invalidated would then translate again as it was. Found by the `shadow_mmu`
    /// fuzz target (docs/fuzzing.md): a 2 MiB mapping the guest had replaced by a page table
    /// came back through a shadow page directory linked from another root's subtree. Zapping
    /// the entry at the address's index in each is at worst one refill too many.
    fn invlpg_unsynced(&mut self, gva: GuestVirtAddr) {
        if self.unsync.is_empty() {
            return;
        }
        let tables: Vec<u64> = self
            .unsync
            .iter()
            .filter_map(|gfn| self.shadowed.get(gfn))
            .flatten()
            .copied()
            .collect();
        for table in tables {
            // An earlier zap of this loop may have freed it (it hung below another's entry).
            let Some(level) = self.pages.get(&table).map(|p| p.level) else {
                continue;
            };
            let idx = gva.table_index(level);
            if !is_vmm_slot(level, idx) && self.zap_entry(table, idx) {
                self.stats.zaps += 1;
            }
        }
    }

    /// Drops every shadow entry of every address space (CR4.PGE toggles, INVPCID all-context,
    /// mode changes). The current roots stay and are refilled on demand.
    pub fn flush_all(&mut self) {
        self.stats.flushes += 1;
        self.free_other_pairs();
        if let Some(pair) = self.roots.get(&self.current_key).copied() {
            self.clear_root(pair.kernel.as_u64());
            self.clear_root(pair.user.as_u64());
        }
    }

    /// Clears entry `idx` of shadow table `table`, freeing the subtree below it. True if it was
    /// present.
    pub(super) fn zap_entry(&mut self, table: u64, idx: usize) -> bool {
        let at = slot(table, idx);
        let e = PageTableEntry(self.mem.read_u64(at));
        if !e.is_present() {
            return false;
        }
        self.set_shadow_entry(table, idx, 0);
        self.tlb_flush = true;
        let level = self.pages.get(&table).map_or(1, |p| p.level);
        if level == 1 {
            self.forget_leaf(at, e);
        } else {
            self.release_child(e.addr(), at.as_u64());
        }
        true
    }

    /// Clears every guest slot of a root (its tables are freed; the VMM slot stays).
    pub(super) fn clear_root(&mut self, root: u64) {
        for idx in self.present_entries(root).indices() {
            self.zap_entry(root, idx);
        }
    }

    /// Flush policy with CR4.PGE: drops every leaf not made from a guest global page, and every
    /// table left empty. True when something is kept below `table`.
    pub(super) fn retain_globals(&mut self, table: u64) -> bool {
        let level = self.pages.get(&table).map_or(1, |p| p.level);
        let mut kept = false;
        for idx in self.present_entries(table).indices() {
            let e = self.shadow_entry(table, idx);
            if !e.is_present() {
                continue;
            }
            let keep = if level == 1 {
                e.has(PteFlags::SHADOW_GUEST_GLOBAL)
            } else {
                self.retain_globals(e.addr())
            };
            if keep {
                kept = true;
            } else {
                self.zap_entry(table, idx);
            }
        }
        kept
    }

    fn invlpg_in(&mut self, root: u64, gva: GuestVirtAddr) {
        let mut table = root;
        for level in (2..=4u8).rev() {
            let idx = gva.table_index(level);
            if is_vmm_slot(level, idx) {
                return;
            }
            let e = self.shadow_entry(table, idx);
            if !e.is_present() {
                return;
            }
            // Below a guest large page: the whole page goes, so drop the table that holds it.
            // An entry of an unsynced guest directory goes too: the guest may have changed it
            // natively, and INVLPG also drops the paging-structure-cache entries for the
            // address (§4.10.4.1), which this shadow entry stands for. Kept, it would still
            // lead to the shadow of the table the guest replaced, and a fill through another
            // entry that shares that shadow would make this address translate through it.
            if self.pages.get(&e.addr()).is_some_and(|p| p.large) || self.mirrors_unsynced(table) {
                if self.zap_entry(table, idx) {
                    self.stats.zaps += 1;
                }
                return;
            }
            table = e.addr();
        }
        if self.zap_entry(table, gva.table_index(1)) {
            self.stats.zaps += 1;
        }
    }
}
