//! Prefetch on fill (KVM's `pte_prefetch`): after a shadow leaf is filled, the neighbouring
//! entries of the same guest page table — the ones the guest has already accessed — are
//! shadowed too, so the accesses that follow (the next instructions of a program's code, the
//! next page of its stack) do not each take a fault.
//!
//! A neighbour is shadowed only where its fill would give exactly this leaf: the guest entry is
//! present, its A bit already set (a prefetch must not set A or D, which the guest can see),
//! no reserved bit set, its frame already backed (a prefetch allocates nothing), and the rights
//! of the whole walk — the entries above are the ones the fill just walked (same guest table) —
//! allow the view's access: the user view maps only user pages. It is writable only where a
//! write fill would make it so (R/W on every level or CR0.WP = 0 in the kernel view, D already
//! set, not a write-protected guest page table). The host option `prefetch=off` turns it off
//! (the reference path: one fill per fault).

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::machine::{FrameAllocator, HostMemory};
use crate::pte::{PageSize, PageTableEntry, PteFlags, PTE_PAT};
use crate::walk::Translation;

use super::{slot, ShadowMmu, View};

/// Entries prefetched around a fill: the aligned group of this many guest entries that holds
/// the filled one (KVM uses 8).
const PREFETCH_GROUP: usize = 16;

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// Turns prefetch on fill on or off (the host option `prefetch=`).
    pub fn set_prefetch(&mut self, on: bool) {
        self.prefetch = on;
    }

    /// After the leaf for `gva` was filled in `view` from the walk `t` into shadow table
    /// `table`: shadows the neighbours `t`'s guest page table allows (see the module doc).
    pub(super) fn prefetch_around(
        &mut self,
        view: View,
        gva: GuestVirtAddr,
        t: &Translation,
        table: u64,
    ) {
        if !self.prefetch || t.page_size != PageSize::Size4K {
            return;
        }
        let filled = gva.table_index(1);
        let first = filled & !(PREFETCH_GROUP - 1);
        let guest_table = t.entries[3].as_u64() & !(PAGE_SIZE - 1);
        let mut upper_writable = true;
        let mut upper_user = true;
        let mut upper_xd = false;
        for &v in &t.values[..3] {
            let e = PageTableEntry(v);
            upper_writable &= e.has(PteFlags::READ_WRITE);
            upper_user &= e.has(PteFlags::USER_SUPERVISOR);
            upper_xd |= self.mode.efer_nxe && e.has(PteFlags::XD);
        }
        for idx in first..first + PREFETCH_GROUP {
            if idx == filled || self.shadow_entry(table, idx).is_present() {
                continue;
            }
            let mut raw = [0u8; 8];
            let at = GuestPhysAddr::new(guest_table + 8 * idx as u64);
            if self.read_guest_phys(at, &mut raw).is_err() {
                continue;
            }
            let e = PageTableEntry(u64::from_le_bytes(raw));
            let usable = e.is_present()
                && e.has(PteFlags::ACCESSED)
                && e.reserved_bits(1, self.mode.max_phys_bits, self.mode.efer_nxe) == 0;
            if !usable {
                continue;
            }
            let gfn = e.addr() / PAGE_SIZE;
            let Some(frame) = self.p2m.lookup(gfn) else {
                continue;
            };
            let user = upper_user && e.has(PteFlags::USER_SUPERVISOR);
            if view == View::User && !user {
                continue;
            }
            let rw = upper_writable && e.has(PteFlags::READ_WRITE);
            let guest_allows_write = match view {
                View::Kernel => rw || !self.mode.cr0_wp,
                View::User => rw,
            };
            let neighbour = Translation {
                gpa: GuestPhysAddr::new(gfn * PAGE_SIZE),
                writable: rw,
                user,
                execute_disable: upper_xd || (self.mode.efer_nxe && e.has(PteFlags::XD)),
                global: self.mode.cr4_pge && e.has(PteFlags::GLOBAL),
                dirty: e.has(PteFlags::DIRTY),
                pwt: e.has(PteFlags::PWT),
                pcd: e.has(PteFlags::PCD),
                pat: e.0 & PTE_PAT != 0,
                ..*t
            };
            let protected = self.is_write_protected_gpa(neighbour.gpa);
            let writable = guest_allows_write && neighbour.dirty && !protected;
            let leaf = super::fill::leaf_entry(frame, &neighbour, writable);
            self.write_leaf(slot(table, idx), leaf, gfn, writable);
            self.stats.prefetched += 1;
        }
    }
}
