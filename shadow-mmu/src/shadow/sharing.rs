//! Cached policy: shadow tables shared between address spaces (KVM's shadow-page hash by
//! role). Every process of a guest OS maps the kernel half through the same guest tables, so
//! a new process's shadow would otherwise rebuild the whole kernel half, one fault at a time.
//! A shadow table below the root is found again by its role — the guest table it mirrors, its
//! level, the view, and the rights the guest entries above it grant — and linked from the new
//! address space's root instead of being built again.
//!
//! The role carries the rights above because a shadow leaf holds the rights of the whole walk
//! (SDM Vol. 3 §4.6: R/W and U/S are ANDed, XD ORed, over every level): two paths to the same
//! guest table through entries with different rights must not share one shadow. A shared page
//! counts its parents; it goes when the last one drops it. The write protection, zaps and
//! unsync of `write_protect.rs`/`unsync.rs` already act on every shadow page that mirrors a
//! guest table, shared or not. The host option `shadow_share=off` gives every address space its
//! own shadow tables (the reference path).

use crate::machine::{FrameAllocator, HostMemory};
use crate::pte::{PageTableEntry, PteFlags};
use crate::walk::Translation;

use super::{Policy, ShadowMmu, View};

/// What a shared shadow table stands for: (guest table frame, level, user view, the rights
/// the guest entries above it grant: bit 0 R/W, bit 1 U/S, bit 2 XD).
pub(crate) type Role = (u64, u8, bool, u8);

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// Turns sharing on or off (the host option `shadow_share=`); it acts on tables made from
    /// then on.
    pub fn set_sharing(&mut self, on: bool) {
        self.sharing = on;
    }

    /// The role of the shadow table at `level` that mirrors guest table `gfn` on the walk `t`
    /// in `view`, when sharing is on (cached policy only: the flush policy drops every shadow
    /// at each CR3 load anyway).
    pub(super) fn role_for(
        &self,
        view: View,
        gfn: u64,
        level: u8,
        t: &Translation,
    ) -> Option<Role> {
        if !self.sharing || self.policy != Policy::Cached {
            return None;
        }
        // The entries above the table: levels 4 down to `level + 1`, `values[0]` the PML4E.
        let above = usize::from(4 - level);
        let mut rights = 0b011u8;
        for &v in t.values.get(..above)? {
            let e = PageTableEntry(v);
            if !e.has(PteFlags::READ_WRITE) {
                rights &= !0b001;
            }
            if !e.has(PteFlags::USER_SUPERVISOR) {
                rights &= !0b010;
            }
            if self.mode.efer_nxe && e.has(PteFlags::XD) {
                rights |= 0b100;
            }
        }
        Some((gfn, level, view == View::User, rights))
    }

    /// A shadow table already built for `role`.
    pub(super) fn shared_page(&self, role: Role) -> Option<u64> {
        self.by_role.get(&role).copied()
    }

    /// Records `hpa` as the shadow table of `role`.
    pub(super) fn remember_role(&mut self, role: Role, hpa: u64) {
        self.by_role.insert(role, hpa);
        if let Some(page) = self.pages.get_mut(&hpa) {
            page.role = Some(role);
        }
    }

    /// `hpa`, the shadow table of `role`, is being freed.
    pub(super) fn forget_role(&mut self, role: Role, hpa: u64) {
        if self.by_role.get(&role) == Some(&hpa) {
            self.by_role.remove(&role);
        }
    }

    /// Whether the roots of the running address space reach shadow table `hpa`.
    pub(super) fn reaches_current(&self, hpa: u64) -> bool {
        let Some(page) = self.pages.get(&hpa) else {
            return false;
        };
        if page.parents.is_empty() {
            return page.owner == self.current_key;
        }
        page.parents
            .iter()
            .any(|&at| self.reaches_current(at & !(crate::addr::PAGE_SIZE - 1)))
    }

    /// The keys of the address spaces whose roots reach shadow table `hpa`.
    pub(super) fn owning_keys(&self, hpa: u64, keys: &mut alloc::collections::BTreeSet<u64>) {
        let Some(page) = self.pages.get(&hpa) else {
            return;
        };
        if page.parents.is_empty() {
            keys.insert(page.owner);
            return;
        }
        for &at in &page.parents {
            self.owning_keys(at & !(crate::addr::PAGE_SIZE - 1), keys);
        }
    }
}
