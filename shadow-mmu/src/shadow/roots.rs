//! Shadow page memory: the pair of roots (kernel view, user view) kept per guest CR3, the pool
//! of shadow pages bounded by the quota, and LRU reclaim when the quota or the host runs short.
//!
//! The roots are where the article's address-space compression happens: each one gets a copy of
//! the VMM's PML4 slot ([`VMM_PML4_SLOT`]) when it is made. The roots that may be in the real CR3
//! during a call are never freed by it (SDM vol. 3 §4.10.4: the CPU may still be walking them).

use alloc::vec::Vec;

use crate::addr::{HostPhysAddr, PAGE_SIZE};
use crate::machine::{FrameAllocator, HostMemory};
use crate::pte::PageTableEntry;

use super::fill::FillError;
use super::{guest_slots, slot, ShadowMmu, StopReason, VMM_PML4_SLOT};

#[derive(Clone, Debug)]
pub(super) struct ShadowPage {
    /// 4 = PML4 .. 1 = PT.
    pub(super) level: u8,
    /// The guest table (frame number) this page shadows; `None` below a guest large page.
    pub(super) guest_table: Option<u64>,
    /// Holds pieces of a guest 2 MiB or 1 GiB page.
    pub(super) large: bool,
    /// For a root: the key of its address space (root pair). Other pages belong to every
    /// address space whose roots reach them (`owning_keys`).
    pub(super) owner: u64,
    /// The host addresses of the shadow entries that point at this page: none for a root, one
    /// for a page of one address space, several for a shared one (`ShadowMmu::set_sharing`).
    pub(super) parents: Vec<u64>,
    /// The role under which the page is shared (`sharing.rs`), if it is.
    pub(super) role: Option<super::sharing::Role>,
    /// Which entries are present, one bit per index: freeing or clearing a table visits only
    /// those instead of reading all 512 (measured under icount: ~2 400 instructions per freed
    /// leaf table). Kept by `ShadowMmu::set_shadow_entry`, the one writer of guest slots; the
    /// audit checks it against the table.
    pub(super) present: PresentBits,
    /// Cached policy: recorded in `shadowed` as a mirror of its guest table
    /// (`register_shadow`).
    pub(super) registered: bool,
}

/// One bit per entry of a shadow table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct PresentBits([u64; 8]);

impl PresentBits {
    pub(super) fn set(&mut self, idx: usize, present: bool) {
        let (word, bit) = (idx / 64, 1u64 << (idx % 64));
        if let Some(w) = self.0.get_mut(word) {
            if present {
                *w |= bit;
            } else {
                *w &= !bit;
            }
        }
    }

    /// The present bits of a table's 512 entries as stored in memory (the present bit is bit 0
    /// of an entry's first byte).
    pub(super) fn of_table(raw: &[u8; 4096]) -> Self {
        let mut words = [0u64; 8];
        // Constant bounds, no early exit: the compiler unrolls the inner loop, which keeps the
        // fuzz build's comparison tracing (one call per compare) off the audit's hottest loop.
        for (w, word) in words.iter_mut().enumerate() {
            for bit in 0..64 {
                *word |= u64::from(raw[(w * 64 + bit) * 8] & 1) << bit;
            }
        }
        Self(words)
    }

    /// The indices whose bit is set, in order.
    pub(super) fn indices(self) -> impl Iterator<Item = usize> {
        self.0.into_iter().enumerate().flat_map(|(word, mut bits)| {
            core::iter::from_fn(move || {
                (bits != 0).then(|| {
                    let bit = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    word * 64 + bit
                })
            })
        })
    }
}

#[derive(Clone, Copy, Debug)]
pub(super) struct RootPair {
    pub(super) kernel: HostPhysAddr,
    pub(super) user: HostPhysAddr,
    pub(super) last_used: u64,
}

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    pub(super) fn touch(&mut self, key: u64) {
        self.clock += 1;
        let now = self.clock;
        if let Some(p) = self.roots.get_mut(&key) {
            p.last_used = now;
        }
    }

    /// Creates the two roots of `key`, reclaiming other address spaces if needed, never the
    /// roots of `live` (the pair that may be in the real CR3 now).
    pub(super) fn create_pair(&mut self, key: u64, live: u64) -> Result<(), StopReason> {
        self.shadow_changed();
        let mut made = Vec::new();
        let mut budget = true;
        while made.len() < 2 {
            match self.alloc_page(4, Some(key / PAGE_SIZE), false) {
                Ok(r) => {
                    self.mem
                        .write_u64(slot(r, VMM_PML4_SLOT), self.vmm_slot_entry);
                    made.push(r);
                }
                Err(e) => {
                    if !self.reclaim([key, live], &mut budget) {
                        for r in made {
                            self.free_page(r);
                        }
                        return Err(match e {
                            FillError::NoHostFrame => StopReason::HostMemoryExhausted,
                            _ => StopReason::ShadowMemoryExhausted,
                        });
                    }
                }
            }
        }
        self.clock += 1;
        self.roots.insert(
            key,
            RootPair {
                kernel: HostPhysAddr::new(made[0]),
                user: HostPhysAddr::new(made[1]),
                last_used: self.clock,
            },
        );
        Ok(())
    }

    /// Frees the shadow roots of every address space but the current one.
    pub(super) fn free_other_pairs(&mut self) {
        let others: Vec<u64> = self
            .roots
            .keys()
            .copied()
            .filter(|k| *k != self.current_key)
            .collect();
        for k in others {
            self.free_pair(k);
        }
    }

    pub(super) fn free_pair(&mut self, key: u64) {
        if let Some(pair) = self.roots.remove(&key) {
            self.free_page(pair.kernel.as_u64());
            self.free_page(pair.user.as_u64());
        }
    }

    /// Frees shadow memory: first the least recently used address space not in `protect`, then
    /// (once per operation: `current_too` is cleared when used, so a retry loop always ends) the
    /// subtrees of the protected pairs. Protected roots themselves are never freed: one of them
    /// may be loaded in the real CR3 right now, and its frame must not be reused (and zeroed)
    /// under the running CPU's feet. False when nothing is left to free.
    pub(super) fn reclaim(&mut self, protect: [u64; 2], current_too: &mut bool) -> bool {
        let victim = self
            .roots
            .iter()
            .filter(|(k, _)| !protect.contains(k))
            .min_by_key(|(_, p)| p.last_used)
            .map(|(k, _)| *k);
        if let Some(k) = victim {
            self.free_pair(k);
            self.stats.reclaims += 1;
            return true;
        }
        if !core::mem::take(current_too) {
            return false;
        }
        let mut freed = false;
        for key in protect {
            let Some(pair) = self.roots.get(&key).copied() else {
                continue;
            };
            let has_children = [pair.kernel, pair.user]
                .iter()
                .any(|r| guest_slots(4).any(|i| self.shadow_entry(r.as_u64(), i).is_present()));
            if has_children {
                self.clear_root(pair.kernel.as_u64());
                self.clear_root(pair.user.as_u64());
                freed = true;
            }
        }
        if freed {
            self.stats.reclaims += 1;
        }
        freed
    }

    pub(super) fn alloc_page(
        &mut self,
        level: u8,
        guest_table: Option<u64>,
        large: bool,
    ) -> Result<u64, FillError> {
        if self.pages.len() >= self.quota {
            return Err(FillError::NoShadowPage);
        }
        let frame = self.alloc.allocate_frame().ok_or(FillError::NoHostFrame)?;
        self.mem.zero_frame(frame);
        let hpa = frame.as_u64();
        self.pages.insert(
            hpa,
            ShadowPage {
                level,
                guest_table,
                large,
                owner: self.current_key,
                parents: Vec::new(),
                role: None,
                present: PresentBits::default(),
                registered: false,
            },
        );
        // Roots register lazily, on their first fill (see `fill`): a root the guest never ran on
        // (e.g. the one for the CR3 passed to `new`) must not write-protect anything.
        if level < 4 {
            if let Some(gfn) = guest_table {
                self.register_shadow(hpa, gfn);
            }
        }
        Ok(hpa)
    }

    /// Frees a shadow table and everything below it.
    pub(super) fn free_page(&mut self, hpa: u64) {
        let Some(page) = self.pages.remove(&hpa) else {
            return;
        };
        self.shadow_changed();
        for idx in page.present.indices() {
            let e = self.shadow_entry(hpa, idx);
            if !e.is_present() {
                continue;
            }
            if page.level > 1 {
                self.release_child(e.addr(), slot(hpa, idx).as_u64());
            } else {
                self.forget_leaf(slot(hpa, idx), e);
            }
        }
        if let Some(gfn) = page.guest_table {
            if let Some(list) = self.shadowed.get_mut(&gfn) {
                list.retain(|p| *p != hpa);
                if list.is_empty() {
                    self.shadowed.remove(&gfn);
                    // Nothing mirrors it any more: nothing to resync.
                    self.unsync.remove(&gfn);
                }
            }
        }
        if let Some(role) = page.role {
            self.forget_role(role, hpa);
        }
        self.tlb_flush = true;
        self.alloc.deallocate_frame(HostPhysAddr::new(hpa));
    }

    /// The shadow entry at host address `parent_at` no longer points at shadow table `child`:
    /// the child goes when nothing else points at it (a shared page stays for its other
    /// parents).
    pub(super) fn release_child(&mut self, child: u64, parent_at: u64) {
        let Some(page) = self.pages.get_mut(&child) else {
            return;
        };
        page.parents.retain(|p| *p != parent_at);
        if page.parents.is_empty() {
            self.free_page(child);
        }
    }
}

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// Writes entry `idx` of shadow table `table` (a guest slot, never the VMM's) and keeps the
    /// table's present bits.
    pub(super) fn set_shadow_entry(&mut self, table: u64, idx: usize, value: u64) {
        self.mem.write_u64(slot(table, idx), value);
        self.shadow_changed();
        if let Some(page) = self.pages.get_mut(&table) {
            page.present.set(idx, PageTableEntry(value).is_present());
        }
    }

    /// A shadow entry, a shadow page or the current roots changed: `shadow_lookup`'s cache is
    /// stale from here on.
    pub(super) fn shadow_changed(&mut self) {
        self.shadow_generation = self.shadow_generation.wrapping_add(1);
    }

    /// The entries of `table` that are present, by its present bits.
    pub(super) fn present_entries(&self, table: u64) -> PresentBits {
        self.pages
            .get(&table)
            .map_or_else(PresentBits::default, |p| p.present)
    }
}
