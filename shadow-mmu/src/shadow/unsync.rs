//! Cached policy: unsynced guest page tables (KVM's "unsync" shadow pages, extended from leaf
//! tables to directories). A guest page table that only non-root shadow tables mirror may be
//! left writable to the guest: its stores then run natively instead of trapping, and the
//! shadow of it may fall behind it — exactly as a TLB and the paging-structure caches may hold
//! translations the guest has since changed.
//!
//! Why that is still the CPU's behaviour (SDM Vol. 3 §4.10.4): a guest that changes a present
//! entry must invalidate it (INVLPG, or a CR3 load) before it can rely on the change, and the
//! VMM catches up there. Every CR3 load resyncs every unsynced table (zaps all the shadow
//! entries that mirror it, freeing what hangs below a directory's, and write-protects it
//! again). INVLPG zaps the address's leaf ([`ShadowMmu::invlpg`]), or its entry in the first
//! unsynced directory on the way down (INVLPG drops the paging-structure caches for the
//! address too, SDM §4.10.4.1); the next access then walks the guest's tables as they are,
//! and a shadow directory entry that no longer mirrors the guest's (another table below it,
//! other rights above it) is replaced on the way (`fill.rs`, `shadow_child`). A not-present → present store needs no invalidation on the CPU, and none
//! here: the shadow has no entry for it, so the next access faults and fills from the guest's
//! table as it is now. That store is the one a demand-paging guest kernel makes on every page
//! fault; a process's teardown makes the present → not-present ones, in its page tables and
//! directories, right before its CR3 is loaded no more.
//!
//! Roots are never unsynced: a root is the address space (keyed by the guest CR3). When a table
//! that is unsynced is about to be mirrored by a root (the guest reuses the frame as a PML4), it
//! is resynced first. The host option `unsync=off` keeps every shadowed table write-protected
//! (the reference path).

use crate::machine::{FrameAllocator, HostMemory};

use super::{Policy, ShadowMmu};

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// Turns unsynced tables on or off (the host option `unsync=`); off resyncs every
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

    /// Whether the shadow table `table` mirrors a guest table that is unsynced (its entries
    /// may be behind the guest's).
    pub(super) fn mirrors_unsynced(&self, table: u64) -> bool {
        self.pages
            .get(&table)
            .and_then(|p| p.guest_table)
            .is_some_and(|gfn| self.unsync.contains(&gfn))
    }

    /// A guest store faulted on the write-protected guest table `gfn`: unsync it instead of
    /// emulating the store, when unsync is on and no root mirrors it. True when it did (the
    /// store may then run natively).
    pub(super) fn try_unsync(&mut self, gfn: u64) -> bool {
        if !self.unsync_enabled || self.policy != Policy::Cached {
            return false;
        }
        let Some(list) = self.shadowed.get(&gfn) else {
            return false;
        };
        let no_root = list
            .iter()
            .all(|h| self.pages.get(h).is_some_and(|p| p.level < 4 && !p.large));
        if !no_root {
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
