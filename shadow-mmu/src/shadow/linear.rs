//! Linear memory for the instruction emulator: [`ShadowMmu::translate`],
//! [`ShadowMmu::read_linear`] and [`ShadowMmu::write_linear`] (page-crossing, every page
//! translated before any byte moves, A/D set like hardware, SDM vol. 3 §4.8), served from the
//! shadow itself when it already maps the access ([`ShadowMmu::shadow_lookup`], the emulator's
//! software TLB).
//!
//! Part of the "页表虚拟化" challenge: the emulator must see guest memory exactly as the guest's
//! own tables map it, at the guest's *virtual* privilege, and its stores to guest page tables
//! must zap the shadows that depend on them.

use alloc::vec::Vec;
use core::cell::Cell;
use core::ops::Range;

use crate::addr::{page_pieces, GuestPhysAddr, GuestVirtAddr, HostPhysAddr, PAGE_SIZE};
use crate::machine::{FrameAllocator, HostMemory};
use crate::p2m::MemoryError;
use crate::pte::PteFlags;
use crate::walk::{Access, AccessKind, Privilege, Translation, WalkError};

use super::{in_vmm_range, FaultOutcome, ShadowMmu, StopReason, TranslateError, View};

/// What the shadow maps at a linear address (for tests and the kernel's debug dumps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShadowMapping {
    /// The host frame of the 4 KiB page.
    pub frame: HostPhysAddr,
    /// Writable at CPL 3 (R/W in every level).
    pub writable: bool,
    /// Reachable at CPL 3 (U/S in every level).
    pub user: bool,
    /// XD in some level.
    pub execute_disable: bool,
}

/// One page's part of an access the shadow maps: its host address, and where it is in the
/// caller's bytes.
type HostPiece = (HostPhysAddr, Range<usize>);
/// One page's part of an access through a guest walk: its linear and guest-physical addresses,
/// and where it is in the caller's bytes.
type GuestPiece = (GuestVirtAddr, GuestPhysAddr, Range<usize>);

/// The caller's bytes of an emulator access.
enum Bytes<'a> {
    /// [`ShadowMmu::read_linear`]: guest memory is copied into this buffer.
    Into(&'a mut [u8]),
    /// [`ShadowMmu::write_linear`]: these bytes are copied into guest memory.
    From(&'a [u8]),
}

impl Bytes<'_> {
    fn len(&self) -> usize {
        match self {
            Bytes::Into(buf) => buf.len(),
            Bytes::From(data) => data.len(),
        }
    }

    /// Moves the bytes of `range` between the caller and host-physical `hpa`.
    fn copy_host<H: HostMemory>(&mut self, mem: &mut H, hpa: HostPhysAddr, range: Range<usize>) {
        match self {
            Bytes::Into(buf) => mem.read_bytes(hpa, buf.get_mut(range).unwrap_or_default()),
            Bytes::From(data) => mem.write_bytes(hpa, data.get(range).unwrap_or_default()),
        }
    }

    /// Moves the bytes of `range` between the caller and guest-physical `gpa` (a write zaps the
    /// shadows of the guest page-table entries it covers).
    fn copy_guest<M: HostMemory, A: FrameAllocator>(
        &mut self,
        mmu: &mut ShadowMmu<M, A>,
        gpa: GuestPhysAddr,
        range: Range<usize>,
    ) -> Result<(), MemoryError> {
        match self {
            Bytes::Into(buf) => mmu.read_guest_phys(gpa, buf.get_mut(range).unwrap_or_default()),
            Bytes::From(data) => mmu.write_guest_phys(gpa, data.get(range).unwrap_or_default()),
        }
    }
}

/// The pieces of `[gva, gva + len)` that each stay inside one 4 KiB page, in order: where the
/// piece is in the caller's bytes, and its linear address (or, when that is not canonical or
/// wraps around, the raw value).
fn linear_pieces(
    gva: GuestVirtAddr,
    len: usize,
) -> impl Iterator<Item = (Range<usize>, Result<GuestVirtAddr, u64>)> {
    page_pieces(gva.as_u64(), len).map(move |(raw, range)| {
        let va = gva.checked_add(range.start as u64).ok_or(raw);
        (range, va)
    })
}

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// Translates `gva` for an emulated access with the guest's current CR3 and paging mode,
    /// setting A/D like hardware (§4.8). In the VMM's slot, the guest's own #PF when its
    /// tables do not map it, a stop when they do (never honoured).
    pub fn translate(
        &mut self,
        gva: GuestVirtAddr,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        match self.guest_walk(gva, access) {
            Ok(_) if in_vmm_range(gva) => Err(TranslateError::Stop(StopReason::VmmRange { gva })),
            Ok(t) => Ok(t),
            Err(WalkError::PageFault(pf)) => Err(TranslateError::PageFault(pf)),
            Err(WalkError::Memory(e)) => Err(TranslateError::Stop(self.memory_stop(e, Some(gva)))),
        }
    }

    /// Reads `buf.len()` bytes at linear address `gva` for the emulator, as data reads
    /// (`AccessKind::Read`) or instruction fetches (`AccessKind::Fetch`) at `privilege`, across
    /// page boundaries. Every page is translated (A bits set) before any byte is read.
    pub fn read_linear(
        &mut self,
        gva: GuestVirtAddr,
        buf: &mut [u8],
        kind: AccessKind,
        privilege: Privilege,
    ) -> Result<(), TranslateError> {
        let kind = if kind == AccessKind::Write {
            AccessKind::Read
        } else {
            kind
        };
        self.access_linear(gva, Bytes::Into(buf), Access::new(kind, privilege))
    }

    /// Writes `data` at linear address `gva` for the emulator at `privilege`, across page
    /// boundaries: every page is translated (A/D set) before any byte is written, so a fault on
    /// the second page leaves the first untouched. Writes to guest page tables zap their shadows
    /// (see [`ShadowMmu::write_guest_phys`]).
    pub fn write_linear(
        &mut self,
        gva: GuestVirtAddr,
        data: &[u8],
        privilege: Privilege,
    ) -> Result<(), TranslateError> {
        self.access_linear(
            gva,
            Bytes::From(data),
            Access::new(AccessKind::Write, privilege),
        )
    }

    /// `read_linear` and `write_linear`: from the shadow when it maps every page for `access`,
    /// else through guest walks of every page before any byte moves.
    fn access_linear(
        &mut self,
        gva: GuestVirtAddr,
        mut bytes: Bytes<'_>,
        access: Access,
    ) -> Result<(), TranslateError> {
        let len = bytes.len();
        // The common case first: one page, mapped by the shadow (no piece iterators).
        if len > 0 && gva.page_offset() + len as u64 <= PAGE_SIZE {
            if let Some(hpa) = self.shadow_hit_in_page(gva, access.kind, access.privilege) {
                bytes.copy_host(&mut self.mem, hpa, 0..len);
                self.stats.shadow_hits += 1;
                return Ok(());
            }
        }
        if let Some(pieces) = self.shadow_hit(gva, len, access.kind, access.privilege) {
            for (hpa, range) in pieces.into_iter().flatten() {
                bytes.copy_host(&mut self.mem, hpa, range);
            }
            self.stats.shadow_hits += 1;
            return Ok(());
        }
        let pieces = self.translate_range(gva, len, access)?;
        for (va, gpa, range) in pieces.iter().cloned() {
            bytes
                .copy_guest(self, gpa, range)
                .map_err(|e| TranslateError::Stop(self.memory_stop(e, Some(va))))?;
        }
        if self.emulator_fill && access.kind != AccessKind::Write {
            for (va, _, _) in pieces {
                self.fill_for_emulator(va, access);
            }
        }
        Ok(())
    }

    /// Switches the emulator fill on or off (the host option `emulator_fill=`): when on, an
    /// emulator read or fetch that missed the shadow fills the shadow entry of the view that
    /// stands for its privilege, as the hardware's own access would have — so the next access
    /// (the VMM's copy through the loaded CR3, or this software TLB) hits instead of walking
    /// the guest's tables again. Off is the reference behaviour: the emulator never changes the
    /// shadow.
    pub fn set_emulator_fill(&mut self, on: bool) {
        self.emulator_fill = on;
    }

    /// Fills the shadow entry for a read or fetch the emulator just made at `va` (a second
    /// walk: cheap next to the walks it saves). Never reclaims (a fill that needs memory is
    /// skipped: the emulator must not free shadow pages the loaded CR3 may still use), never in
    /// the VMM's slot, and only where the guest's tables allow the access.
    fn fill_for_emulator(&mut self, va: GuestVirtAddr, access: Access) {
        if in_vmm_range(va) || !self.roots.contains_key(&self.current_key) {
            return;
        }
        let view = match access.privilege {
            Privilege::Supervisor => View::Kernel,
            Privilege::User => View::User,
        };
        if self.shadow_lookup(view, va).is_some() {
            return;
        }
        let Ok(t) = self.guest_walk(va, access) else {
            return;
        };
        let fills = self.stats.fills;
        if let Ok(FaultOutcome::Filled) = self.fill(view, va, &t, access) {
            self.stats.emulator_fills += 1;
        }
        self.stats.fills = fills;
    }

    /// Translates every page of `[gva, gva + len)`: (linear address, guest-physical address,
    /// where the piece is in the caller's bytes) per piece.
    fn translate_range(
        &mut self,
        gva: GuestVirtAddr,
        len: usize,
        access: Access,
    ) -> Result<Vec<GuestPiece>, TranslateError> {
        let mut pieces = Vec::new();
        for (range, va) in linear_pieces(gva, len) {
            let va = va.map_err(TranslateError::NonCanonical)?;
            // Canonical boundaries are page-aligned: a piece inside one page is canonical iff
            // its first byte is.
            let t = self.translate(va, access)?;
            pieces.push((va, t.gpa, range));
        }
        Ok(pieces)
    }

    /// The emulator's software TLB: when the shadow of the view that stands for `privilege`
    /// already maps every page of `[gva, gva + len)` for this access (present; writable for a
    /// write; not execute-disabled for a fetch), the access needs no guest walk — the fill that
    /// made the shadow entry walked the guest's tables, set A (and D, for a writable entry), and
    /// a write-protected guest page table is never writable in the shadow. Returns the host
    /// pieces (address, where the piece is in the caller's bytes), at most two pages; `None`
    /// means: take the walk.
    fn shadow_hit(
        &self,
        gva: GuestVirtAddr,
        len: usize,
        kind: AccessKind,
        privilege: Privilege,
    ) -> Option<[Option<HostPiece>; 2]> {
        if len == 0 || len > PAGE_SIZE as usize {
            return None;
        }
        let view = match privilege {
            Privilege::Supervisor => View::Kernel,
            Privilege::User => View::User,
        };
        let mut pieces = [None, None];
        let mut done = 0usize;
        for (piece, (range, va)) in pieces.iter_mut().zip(linear_pieces(gva, len)) {
            let va = va.ok()?;
            let m = self.shadow_lookup(view, va)?;
            let allowed = match kind {
                AccessKind::Read => true,
                AccessKind::Write => m.writable,
                AccessKind::Fetch => !m.execute_disable,
            };
            if !allowed || !m.user {
                return None;
            }
            done = range.end;
            *piece = Some((
                HostPhysAddr::new(m.frame.as_u64() + va.page_offset()),
                range,
            ));
        }
        (done == len).then_some(pieces)
    }

    /// Reads `buf.len()` bytes at `gva` only where the shadow of the view that stands for
    /// `privilege` already maps them for `kind` (inside one page): what the real CPU would read
    /// or fetch through the shadow, without a guest walk and without setting any guest bit.
    /// False (nothing read) on a miss.
    pub fn read_through_shadow(
        &self,
        gva: GuestVirtAddr,
        buf: &mut [u8],
        kind: AccessKind,
        privilege: Privilege,
    ) -> bool {
        let in_page = !buf.is_empty() && gva.page_offset() + buf.len() as u64 <= PAGE_SIZE;
        match self.shadow_hit_in_page(gva, kind, privilege) {
            Some(hpa) if in_page => {
                self.mem.read_bytes(hpa, buf);
                true
            }
            _ => false,
        }
    }

    /// `shadow_hit` for an access that stays inside `gva`'s page: the host address of `gva`.
    #[inline]
    fn shadow_hit_in_page(
        &self,
        gva: GuestVirtAddr,
        kind: AccessKind,
        privilege: Privilege,
    ) -> Option<HostPhysAddr> {
        let view = match privilege {
            Privilege::Supervisor => View::Kernel,
            Privilege::User => View::User,
        };
        let m = self.shadow_lookup(view, gva)?;
        let allowed = match kind {
            AccessKind::Read => true,
            AccessKind::Write => m.writable,
            AccessKind::Fetch => !m.execute_disable,
        };
        (allowed && m.user).then(|| HostPhysAddr::new(m.frame.as_u64() + gva.page_offset()))
    }

    /// What the shadow of `view` maps at `gva`, walked like the real CPU would at CPL 3 — or
    /// remembered from the last walks while no shadow entry has changed since
    /// ([`LookupCache`]).
    pub fn shadow_lookup(&self, view: View, gva: GuestVirtAddr) -> Option<ShadowMapping> {
        if let Some(hit) = self.lookup_cache.get(view, gva, self.shadow_generation) {
            return Some(hit);
        }
        let walked = self.shadow_lookup_uncached(view, gva)?;
        self.lookup_cache
            .put(view, gva, self.shadow_generation, walked);
        Some(walked)
    }

    /// `shadow_lookup` by a walk of the shadow tables, always.
    pub(super) fn shadow_lookup_uncached(
        &self,
        view: View,
        gva: GuestVirtAddr,
    ) -> Option<ShadowMapping> {
        if in_vmm_range(gva) {
            return None;
        }
        let pair = self.roots.get(&self.current_key)?;
        let mut table = match view {
            View::Kernel => pair.kernel.as_u64(),
            View::User => pair.user.as_u64(),
        };
        let mut writable = true;
        let mut user = true;
        let mut xd = false;
        for level in (1..=4u8).rev() {
            let e = self.shadow_entry(table, gva.table_index(level));
            if !e.is_present() {
                return None;
            }
            writable &= e.has(PteFlags::READ_WRITE);
            user &= e.has(PteFlags::USER_SUPERVISOR);
            xd |= e.has(PteFlags::XD);
            table = e.addr();
        }
        Some(ShadowMapping {
            frame: HostPhysAddr::new(table),
            writable,
            user,
            execute_disable: xd,
        })
    }
}

/// The last few answers of [`ShadowMmu::shadow_lookup`], by (view, page): the emulator's
/// accesses during one event delivery or IRET (IDT gate, GDT descriptor, TSS, the stack) and the
/// next trap's come back to the same pages, and each walk of the shadow tables costs a root
/// lookup and four entry reads (measured under icount: an `int 0x80` delivery spent ~1 200
/// instructions in them). An entry is valid only while `shadow_generation` is what it was:
/// every change to a shadow entry or to the current roots moves the generation on.
#[derive(Debug, Default)]
pub(super) struct LookupCache {
    slots: [Cell<Option<(u64, u64, ShadowMapping)>>; LOOKUP_CACHE_SLOTS],
}

const LOOKUP_CACHE_SLOTS: usize = 8;

impl LookupCache {
    /// The key of (view, page): the page number with the view in bit 0.
    fn tag(view: View, gva: GuestVirtAddr) -> u64 {
        (gva.as_u64() >> 12) << 1 | u64::from(view == View::User)
    }

    fn slot(&self, tag: u64) -> &Cell<Option<(u64, u64, ShadowMapping)>> {
        &self.slots[(tag >> 1) as usize % LOOKUP_CACHE_SLOTS]
    }

    fn get(&self, view: View, gva: GuestVirtAddr, generation: u64) -> Option<ShadowMapping> {
        let tag = Self::tag(view, gva);
        match self.slot(tag).get() {
            Some((t, g, mapping)) if t == tag && g == generation => Some(mapping),
            _ => None,
        }
    }

    fn put(&self, view: View, gva: GuestVirtAddr, generation: u64, mapping: ShadowMapping) {
        let tag = Self::tag(view, gva);
        self.slot(tag).set(Some((tag, generation, mapping)));
    }

    /// Every entry still valid at `generation`, as (view, page address, mapping), for the audit.
    pub(super) fn valid(
        &self,
        generation: u64,
    ) -> impl Iterator<Item = (View, u64, ShadowMapping)> + '_ {
        self.slots.iter().filter_map(move |slot| match slot.get() {
            Some((tag, g, mapping)) if g == generation => {
                let view = if tag & 1 == 1 {
                    View::User
                } else {
                    View::Kernel
                };
                Some((view, (tag >> 1) << 12, mapping))
            }
            _ => None,
        })
    }
}
