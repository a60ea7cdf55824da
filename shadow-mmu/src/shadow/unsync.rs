//! Cached policy: unsynced leaf page tables (KVM's "unsync" shadow pages). A guest page table
//! that only shadow page tables (level 1) mirror may be left writable to the guest: its stores
//! then run natively instead of trapping, and the shadow of it may fall behind it — exactly as a
//! TLB may hold a translation the guest has since changed.
//!
//! Why that is still the CPU's behaviour (SDM Vol. 3 §4.10.4): a guest that changes a present
//! entry must invalidate it (INVLPG, or a CR3 load) before it can rely on the change, and the
//! VMM resynchronises there — INVLPG zaps the address's shadow entries ([`ShadowMmu::invlpg`]),
//! and every CR3 load resyncs every unsynced table (zaps all the shadow entries that mirror it,
//! and write-protects it again). A not-present → present store needs no invalidation on the
//! CPU, and none here: the shadow has no entry for it, so the next access faults and the fill
//! walks the guest's table as it is now. That store is the one a demand-paging guest kernel
//! makes on every page fault, and the reason for this module.
//!
//! Only leaf tables are unsynced: a change to a directory entry reshapes the shadow below it.
//! When a table that is unsynced is about to be mirrored at another level (the guest reuses the
//! frame as a directory), it is resynced first. The host option `unsync=off` keeps every
//! shadowed table write-protected (the reference path).

use crate::machine::{FrameAllocator, HostMemory};

use super::{Policy, ShadowMmu};

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// Turns unsynced leaf tables on or off (the host option `unsync=`); off resyncs every
    /// table now.
    pub fn set_unsync(&mut self, on: bool) {
        self.unsync_enabled = on;
        if !on {
            self.resync_all();
        }
    }

    /// Whether the guest table in frame `gfn` is unsynced (writable to the guest).
    pub fn is_unsync(&self, gfn: u64) -> bool {
        self.unsync.contains(&gfn)
    }

    /// A guest store faulted on the write-protected guest table `gfn`: unsync it instead of
    /// emulating the store, when unsync is on and only leaf shadow tables mirror it. True when
    /// it did (the store may then run natively).
    pub(super) fn try_unsync(&mut self, gfn: u64) -> bool {
        if !self.unsync_enabled || self.policy != Policy::Cached {
            return false;
        }
        let Some(list) = self.shadowed.get(&gfn) else {
            return false;
        };
        let only_leaf_tables = list
            .iter()
            .all(|h| self.pages.get(h).is_some_and(|p| p.level == 1 && !p.large));
        if !only_leaf_tables {
            return false;
        }
        self.unsync.insert(gfn);
        self.stats.unsyncs += 1;
        true
    }

    /// Brings the shadows of the unsynced guest table `gfn` back in line: every shadow entry
    /// that mirrors one of its entries is zapped (refilled from the guest's table on the next
    /// access), and the table is write-protected again.
    pub(super) fn resync(&mut self, gfn: u64) {
        if !self.unsync.remove(&gfn) {
            return;
        }
        if let Some(list) = self.shadowed.get(&gfn).cloned() {
            for table in list {
                for idx in self.present_entries(table).indices() {
                    if self.zap_entry(table, idx) {
                        self.stats.zaps += 1;
                    }
                }
            }
        }
        self.write_protect(gfn);
        self.stats.resyncs += 1;
    }

    /// Resyncs every unsynced table (at a CR3 load: the guest's TLB flush).
    pub(super) fn resync_all(&mut self) {
        while let Some(gfn) = self.unsync.first().copied() {
            self.resync(gfn);
        }
    }
}
