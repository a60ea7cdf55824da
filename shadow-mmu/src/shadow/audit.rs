//! The invariant checks the property tests run after every step ([`ShadowMmu::audit`]): the
//! VMM's slot intact in every root (address-space compression: the guest never sees or changes
//! the VMM's PML4 slot), every shadow table known and reachable exactly once, every leaf on a
//! frame the P2M gave this guest, each table's present bits, unsynced tables never mirrored by
//! a root, the quota, and (cached policy) no writable leaf over a
//! write-protected guest page table (the "页表虚拟化" challenge's write protection).

use alloc::collections::BTreeMap;

use crate::addr::{GuestPhysAddr, HostPhysAddr, PAGE_SIZE};
use crate::machine::{FrameAllocator, HostMemory};
use crate::pte::{PageTableEntry, PteFlags};

use super::roots::PresentBits;
use super::{slot, ShadowMmu, VMM_PML4_SLOT};

/// A broken invariant found by [`ShadowMmu::audit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditError {
    /// Which invariant.
    pub what: &'static str,
    /// The address (host-physical table or frame) where it broke.
    pub at: u64,
}

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// Checks the structural invariants: the VMM slot is intact in every root, every shadow table
    /// is known and reachable exactly once, every leaf points at a frame the P2M gave this guest,
    /// the quota holds, and (cached policy) no writable leaf maps a write-protected guest table.
    pub fn audit(&self) -> Result<(), AuditError> {
        if self.pages.len() > self.quota {
            return Err(AuditError {
                what: "shadow quota exceeded",
                at: self.pages.len() as u64,
            });
        }
        if !self.roots.contains_key(&self.current_key) {
            return Err(AuditError {
                what: "no roots for the current CR3",
                at: self.current_key,
            });
        }
        // How many shadow entries point at each table (a shared table has several).
        let mut refs: BTreeMap<u64, usize> = BTreeMap::new();
        for pair in self.roots.values() {
            for root in [pair.kernel, pair.user] {
                let r = root.as_u64();
                if self.mem.read_u64(slot(r, VMM_PML4_SLOT)) != self.vmm_slot_entry {
                    return Err(AuditError {
                        what: "VMM slot altered",
                        at: r,
                    });
                }
                if refs.contains_key(&r) {
                    return Err(AuditError {
                        what: "a root is also a child",
                        at: r,
                    });
                }
                self.audit_table(r, 4, &mut refs)?;
            }
        }
        for (&hpa, page) in &self.pages {
            let is_root = page.parents.is_empty();
            let counted = refs.get(&hpa).copied().unwrap_or(0);
            if !is_root && counted != page.parents.len() {
                return Err(AuditError {
                    what: "a shadow table's parents disagree with the entries that point at it",
                    at: hpa,
                });
            }
            if let Some(role) = page.role {
                if self.by_role.get(&role) != Some(&hpa) {
                    return Err(AuditError {
                        what: "a shared shadow table is not the one recorded for its role",
                        at: hpa,
                    });
                }
            }
        }
        for (&hpa, page) in &self.pages {
            let listed = page
                .guest_table
                .and_then(|gfn| self.shadowed.get(&gfn))
                .is_some_and(|list| list.contains(&hpa));
            if page.registered && self.policy == super::Policy::Cached && !listed {
                return Err(AuditError {
                    what: "a shadow table marked registered is not in the write-protection index",
                    at: hpa,
                });
            }
        }
        for (view, page, cached) in self.lookup_cache.valid(self.shadow_generation) {
            let walked = crate::addr::GuestVirtAddr::new(page)
                .and_then(|gva| self.shadow_lookup_uncached(view, gva));
            if walked != Some(cached) {
                return Err(AuditError {
                    what: "a remembered shadow lookup disagrees with the shadow tables",
                    at: page,
                });
            }
        }
        for &gfn in &self.unsync {
            let below_roots_only = self.shadowed.get(&gfn).is_some_and(|list| {
                list.iter()
                    .all(|h| self.pages.get(h).is_some_and(|p| p.level < 4 && !p.large))
            });
            if !below_roots_only {
                return Err(AuditError {
                    what: "an unsynced guest table mirrored by a root",
                    at: gfn,
                });
            }
        }
        let reachable = refs.len() + 2 * self.roots.len();
        if reachable != self.pages.len() {
            return Err(AuditError {
                what: "unreachable shadow pages",
                at: reachable as u64,
            });
        }
        Ok(())
    }

    fn audit_table(
        &self,
        table: u64,
        level: u8,
        refs: &mut BTreeMap<u64, usize>,
    ) -> Result<(), AuditError> {
        match self.pages.get(&table) {
            Some(p) if p.level == level => {}
            _ => {
                return Err(AuditError {
                    what: "shadow table unknown or at the wrong level",
                    at: table,
                })
            }
        }
        // One read of the whole table: the audit runs after every step of the property tests
        // and the fuzz target, and reading entry by entry was most of their time.
        let mut raw = [0u8; PAGE_SIZE as usize];
        self.mem.read_bytes(HostPhysAddr::new(table), &mut raw);
        let entry = |idx: usize| {
            let bytes = raw[idx * 8..idx * 8 + 8].try_into().expect("8 bytes");
            PageTableEntry(u64::from_le_bytes(bytes))
        };
        let mut present = PresentBits::of_table(&raw);
        if level == 4 {
            present.set(VMM_PML4_SLOT, false);
        }
        if present != self.present_entries(table) {
            return Err(AuditError {
                what: "present bits disagree with the shadow table",
                at: table,
            });
        }
        for idx in present.indices() {
            let e = entry(idx);
            if level > 1 {
                let child = e.addr();
                let at = slot(table, idx).as_u64();
                if !self
                    .pages
                    .get(&child)
                    .is_some_and(|p| p.parents.contains(&at))
                {
                    return Err(AuditError {
                        what: "a shadow entry points at a table that does not list it as a parent",
                        at,
                    });
                }
                let count = refs.entry(child).or_insert(0);
                *count += 1;
                if *count == 1 {
                    self.audit_table(child, level - 1, refs)?;
                }
                continue;
            }
            let Some(gfn) = self.p2m.guest_frame_of(HostPhysAddr::new(e.addr())) else {
                return Err(AuditError {
                    what: "shadow leaf outside the guest's frames",
                    at: e.0,
                });
            };
            if e.has(PteFlags::READ_WRITE)
                && self.is_write_protected_gpa(GuestPhysAddr::new(gfn * PAGE_SIZE))
            {
                return Err(AuditError {
                    what: "writable leaf maps a write-protected guest table",
                    at: e.0,
                });
            }
        }
        Ok(())
    }
}
