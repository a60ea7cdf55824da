//! Shadow page tables: what the real CPU walks while the guest runs (docs/design.md, "Shadow
//! page tables").
//!
//! For each guest address space (keyed by guest CR3) there are two shadow roots:
//! - the **kernel view**, used while the guest is at virtual CPL 0: guest supervisor *and* user
//!   pages, all mapped U = 1 because the guest kernel really runs at CPL 3, with the guest's R/W
//!   and XD kept;
//! - the **user view**, used while the guest is at virtual CPL 3: guest user pages only, so guest
//!   processes still cannot touch guest-kernel memory (ring compression made safe).
//!
//! PML4 slot [`VMM_PML4_SLOT`] (511) of every shadow root is the VMM's: a copy of the caller's
//! entry, supervisor-only.
//!
//! Shadow entries are filled on #PF from a fresh guest walk ([`ShadowMmu::handle_page_fault`]).
//! The rules this module keeps (SDM vol. 3 §4.6-§4.10):
//! - a shadow leaf is always a 4 KiB PTE (guest 2 MiB / 1 GiB pages are split, because the P2M
//!   backs each guest frame with an independent host frame); non-leaf shadow entries are
//!   P|R/W|U/S and all rights live in the leaf, computed from the whole guest walk;
//! - dirty tracking: a leaf is writable only once the guest's D bit is set (§4.8), so the first
//!   write faults, the walk sets D, and the entry is upgraded;
//! - guest CR0.WP = 0: a supervisor write to a read-only guest page is allowed by the guest, so the
//!   kernel view maps such a page writable (the user view never does, since user writes ignore
//!   WP). A change of any [`PagingMode`] bit flushes every shadow, so no writable entry outlives
//!   the WP = 0 period;
//! - the shadow never sets G: the real CR3 switches between views and roots, and a global real
//!   TLB entry would leak the kernel view into the user view. Guest G (with CR4.PGE) is remembered
//!   in a software bit so the flush policy can keep those entries across CR3 loads (§4.10.4.1);
//! - shadow tables mirror the guest's: the shadow table at level L under shadow entry i shadows the
//!   guest table the guest entry i points to (or, below a guest large page, is marked `large`).
//!   That is what lets the cached policy zap exactly the shadow entries that depend on one guest
//!   entry, and lets INVLPG drop a whole guest large page.
//!
//! Whenever an entry is removed or made less permissive the real TLB may hold the old
//! translation: [`ShadowMmu::take_tlb_flush`] tells the kernel to reload the real CR3.
//!
//! The roots that may be in the real CR3 during a call (those of the current guest CR3) are never
//! freed by that call, so their frames cannot be reused and zeroed under the running CPU (the VMM
//! itself runs on them, through the VMM slot). Contract for the kernel: after `load_cr3`,
//! `set_policy`, or when `take_tlb_flush()` is true, load `current_root(view)` into the real CR3
//! before resuming the guest.

use alloc::collections::{BTreeMap, BTreeSet};
use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, GuestVirtAddr, HostPhysAddr, PageFaultErrorCode, PAGE_SIZE};
use crate::machine::{FrameAllocator, HostMemory};
use crate::p2m::{GuestRam, MemoryError, P2m};
use crate::pte::{
    cr3_pml4, entry_index, entry_offset, PageTableEntry, PteFlags, ENTRIES_PER_TABLE, ENTRY_SIZE,
    PTE_PAT,
};
use crate::walk::{
    walk, Access, AccessKind, PageFault, PagingMode, Privilege, Translation, WalkError,
};

/// First linear address of the VMM's slot: the guest must never map or touch it. The one
/// definition is the boot protocol's ([`boot::VMM_RESERVED_VA_START`]), which the loader tells
/// the guest.
pub const VMM_RANGE_START: u64 = boot::VMM_RESERVED_VA_START;
/// The PML4 slot that belongs to the VMM in every shadow root (linear addresses
/// [`VMM_RANGE_START`]`..`): 511, the last one (the article's address-space compression).
pub const VMM_PML4_SLOT: usize = crate::addr::table_index(VMM_RANGE_START, 4);
// The reserved range is exactly one whole PML4 slot, up to the top of the address space.
const _: () = assert!(VMM_RANGE_START == 0xFFFF_0000_0000_0000 | ((VMM_PML4_SLOT as u64) << 39));
/// The smallest shadow quota that always lets a fill succeed after reclaim: two roots plus three
/// tables below each.
pub const MIN_SHADOW_QUOTA: usize = 8;

/// Flags of a non-leaf shadow entry: every right granted, the leaf decides.
const SHADOW_TABLE_FLAGS: u64 = PteFlags::PRESENT.bits()
    | PteFlags::READ_WRITE.bits()
    | PteFlags::USER_SUPERVISOR.bits()
    | PteFlags::ACCESSED.bits();

/// Which of the two shadow roots of a guest address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum View {
    /// Used while the guest runs at virtual CPL 0: accesses are checked as supervisor accesses.
    Kernel,
    /// Used while the guest runs at virtual CPL 3: accesses are checked as user accesses.
    User,
}

impl View {
    /// The guest privilege an access made in this view has.
    pub const fn privilege(self) -> Privilege {
        match self {
            View::Kernel => Privilege::Supervisor,
            View::User => Privilege::User,
        }
    }
}

/// How shadows are kept across guest CR3 loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// Drop the shadows on every CR3 load (guest-global entries kept while CR4.PGE = 1).
    Flush,
    /// Keep shadows per guest CR3; write-protect guest page-table pages and zap the shadow entries
    /// that depend on an entry the guest writes.
    Cached,
}

/// Why the guest cannot continue; the kernel reports it and stops the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest touched the VMM's linear range ([`VMM_PML4_SLOT`]) through a mapping of its own
    /// there, which it is told never to make (without one, it just gets its #PF).
    VmmRange {
        /// The address it touched.
        gva: GuestVirtAddr,
    },
    /// A guest mapping or paging structure points at a guest-physical address outside its RAM
    /// (no MMIO is emulated through memory yet).
    GpaOutsideRam {
        /// The guest-physical address.
        gpa: GuestPhysAddr,
        /// The linear address whose translation led there, if any.
        gva: Option<GuestVirtAddr>,
    },
    /// Not even one fill fits in the shadow quota after every reclaim (quota misconfigured).
    ShadowMemoryExhausted,
    /// The host has no free frame left, even after giving back every reclaimable shadow page.
    HostMemoryExhausted,
}

impl core::fmt::Display for StopReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StopReason::VmmRange { gva } => {
                write!(f, "touched the VMM's reserved range at {:#x}", gva.as_u64())
            }
            StopReason::GpaOutsideRam { gpa, gva } => write!(
                f,
                "guest-physical address {:#x} is outside guest RAM (linear {:#x})",
                gpa.as_u64(),
                gva.map_or(0, |g| g.as_u64())
            ),
            StopReason::ShadowMemoryExhausted => {
                write!(
                    f,
                    "shadow page-table quota exhausted (no fill fits after reclaim)"
                )
            }
            StopReason::HostMemoryExhausted => write!(f, "the host has no free frame left"),
        }
    }
}

/// What the kernel does after a #PF taken while the guest ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The shadow now maps the access: resume the guest at the faulting instruction.
    Filled,
    /// The guest's own tables deny the access: deliver #PF to the guest with this error code and
    /// set its virtual CR2.
    Reflect(PageFault),
    /// Cached policy: a write to a write-protected guest page-table page. Emulate the instruction
    /// (vmm-core), write through [`ShadowMmu::write_guest_phys`] (which zaps the dependent shadow
    /// entries) or call [`ShadowMmu::notify_guest_pte_write`] after writing, then skip it.
    EmulatePageTableWrite {
        /// The guest-physical address the faulting access targets.
        gpa: GuestPhysAddr,
    },
    /// The guest cannot continue.
    Stop(StopReason),
}

/// Why [`ShadowMmu::translate`] produced no address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslateError {
    /// The guest's tables deny the access: the emulated instruction raises this #PF.
    PageFault(PageFault),
    /// The guest cannot continue.
    Stop(StopReason),
    /// The access runs past the end of the canonical range (a #GP in the guest, not a #PF):
    /// the first non-canonical address.
    NonCanonical(u64),
}

/// Why a [`ShadowMmu`] could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The shadow quota is below [`MIN_SHADOW_QUOTA`].
    QuotaTooSmall,
    /// The host could not provide the first two shadow roots.
    HostMemoryExhausted,
}

/// What a [`ShadowMmu`] is created with.
#[derive(Clone, Copy, Debug)]
pub struct MmuConfig {
    /// Guest RAM size in bytes.
    pub ram_bytes: u64,
    /// Most shadow page-table pages (roots included) alive at once.
    pub shadow_quota: usize,
    /// Initial policy.
    pub policy: Policy,
    /// A host PML4 whose slot [`VMM_PML4_SLOT`] (the VMM's mappings) is copied into every shadow root.
    pub vmm_root: HostPhysAddr,
    /// Initial guest paging mode.
    pub mode: PagingMode,
    /// Initial guest CR3.
    pub guest_cr3: u64,
}

/// Counters for the host's report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Shadow leaves filled (not counting dirty upgrades).
    pub fills: u64,
    /// Page faults reflected to the guest.
    pub reflections: u64,
    /// Read-only shadow leaves made writable by the first write (dirty tracking).
    pub dirty_upgrades: u64,
    /// Writes to write-protected guest page tables handed to the emulator (cached policy).
    pub page_table_writes: u64,
    /// Shadow entries zapped by INVLPG or guest page-table writes.
    pub zaps: u64,
    /// INVLPGs seen.
    pub invlpgs: u64,
    /// Guest CR3 loads seen.
    pub cr3_loads: u64,
    /// Full flushes (mode changes, policy changes, explicit flushes).
    pub flushes: u64,
    /// Reclaims because the shadow quota or the host ran short.
    pub reclaims: u64,
    /// Stop outcomes returned.
    pub stops: u64,
    /// Emulator accesses served from existing shadow entries without a guest walk.
    pub shadow_hits: u64,
    /// Cached address spaces dropped because the guest wrote one of their tables while not
    /// running on them ([`ShadowMmu::release_inactive_shadows`]).
    pub released_address_spaces: u64,
    /// Guest tables unshadowed after a flood of writes ([`ShadowMmu::unshadow_guest_table`]).
    pub unshadowed_tables: u64,
    /// CR3 loads whose guest PML4 maps the VMM's slot (never honoured).
    pub guest_vmm_slot_mappings: u64,
    /// Shadow roots alive (two per guest address space).
    pub roots_live: usize,
    /// Shadow page-table pages alive, roots included.
    pub shadow_pages: usize,
    /// The shadow quota.
    pub shadow_quota: usize,
    /// Host frames backing guest RAM.
    pub p2m_frames: usize,
}

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

/// A broken invariant found by [`ShadowMmu::audit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditError {
    /// Which invariant.
    pub what: &'static str,
    /// The address (host-physical table or frame) where it broke.
    pub at: u64,
}

#[derive(Clone, Copy, Debug)]
struct ShadowPage {
    /// 4 = PML4 .. 1 = PT.
    level: u8,
    /// The guest table (frame number) this page shadows; `None` below a guest large page.
    guest_table: Option<u64>,
    /// Holds pieces of a guest 2 MiB or 1 GiB page.
    large: bool,
    /// The key of the address space (root pair) this page belongs to, when it was made.
    owner: u64,
    /// The host address of the shadow entry that points at this page (`None` for roots).
    parent: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
struct RootPair {
    kernel: HostPhysAddr,
    user: HostPhysAddr,
    last_used: u64,
}

enum FillError {
    NoShadowPage,
    NoHostFrame,
    OutsideRam(GuestPhysAddr),
}

/// The shadow MMU of one guest: P2M, shadow roots, policy and statistics.
#[derive(Debug)]
pub struct ShadowMmu<M, A> {
    mem: M,
    alloc: A,
    p2m: P2m,
    mode: PagingMode,
    policy: Policy,
    vmm_slot_entry: u64,
    guest_cr3: u64,
    current_key: u64,
    roots: BTreeMap<u64, RootPair>,
    pages: BTreeMap<u64, ShadowPage>,
    /// Cached policy: guest table frame -> shadow pages that shadow it (its write-protection).
    shadowed: BTreeMap<u64, Vec<u64>>,
    /// Cached policy: guest frame -> host addresses of writable shadow PTEs that map it.
    writable_leaves: BTreeMap<u64, BTreeSet<u64>>,
    quota: usize,
    clock: u64,
    tlb_flush: bool,
    stats: Stats,
    /// The guest table the last emulated page-table writes went to, and how many in a row.
    write_flood: Option<(u64, u32)>,
}

/// Consecutive emulated writes to one guest table, with no fill in between, after which it is
/// unshadowed instead (KVM's "write flooding" heuristic uses 3), unless the stores' own walk goes
/// through it (see `write_flooded`).
pub const WRITE_FLOOD_THRESHOLD: u32 = 4;

fn slot(table: u64, idx: usize) -> HostPhysAddr {
    HostPhysAddr::new(table + entry_offset(idx))
}

impl<M: HostMemory, A: FrameAllocator> ShadowMmu<M, A> {
    /// Creates the MMU of one guest and the shadow roots for `config.guest_cr3`.
    pub fn new(mem: M, alloc: A, config: MmuConfig) -> Result<Self, ConfigError> {
        if config.shadow_quota < MIN_SHADOW_QUOTA {
            return Err(ConfigError::QuotaTooSmall);
        }
        // The VMM's slot is supervisor-only in every shadow root, whatever the caller's entry says.
        let vmm_slot_entry = mem.read_u64(slot(config.vmm_root.as_u64(), VMM_PML4_SLOT))
            & !PteFlags::USER_SUPERVISOR.bits();
        let mut mmu = Self {
            mem,
            alloc,
            p2m: P2m::new(config.ram_bytes),
            mode: config.mode,
            policy: config.policy,
            vmm_slot_entry,
            guest_cr3: config.guest_cr3,
            current_key: 0,
            roots: BTreeMap::new(),
            pages: BTreeMap::new(),
            shadowed: BTreeMap::new(),
            writable_leaves: BTreeMap::new(),
            quota: config.shadow_quota,
            clock: 0,
            tlb_flush: false,
            write_flood: None,
            stats: Stats::default(),
        };
        mmu.current_key = mmu.cr3_key(config.guest_cr3);
        match mmu.create_pair(mmu.current_key, mmu.current_key) {
            Ok(()) => Ok(mmu),
            Err(_) => Err(ConfigError::HostMemoryExhausted),
        }
    }

    /// The shadow root the kernel loads into the real CR3 while the guest runs in `view`.
    pub fn current_root(&self, view: View) -> HostPhysAddr {
        match self.roots.get(&self.current_key) {
            Some(pair) => match view {
                View::Kernel => pair.kernel,
                View::User => pair.user,
            },
            // Only after a failed `load_cr3`/`set_policy` (which returned a stop reason): the
            // guest must not run; nothing in this crate writes through this value.
            None => HostPhysAddr::new(0),
        }
    }

    /// True once after any shadow entry was removed or downgraded: the kernel must reload the real
    /// CR3 (flushing the real TLB) before resuming the guest.
    pub fn take_tlb_flush(&mut self) -> bool {
        core::mem::take(&mut self.tlb_flush)
    }

    /// The counters, with the current sizes filled in.
    pub fn stats(&self) -> Stats {
        Stats {
            roots_live: self.roots.len() * 2,
            shadow_pages: self.pages.len(),
            shadow_quota: self.quota,
            p2m_frames: self.p2m.frames_used(),
            ..self.stats
        }
    }

    /// The active policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The guest paging mode in force.
    pub fn paging_mode(&self) -> PagingMode {
        self.mode
    }

    /// The guest CR3 last loaded.
    pub fn guest_cr3(&self) -> u64 {
        self.guest_cr3
    }

    /// The guest's P2M.
    pub fn p2m(&self) -> &P2m {
        &self.p2m
    }

    /// Host memory (for the kernel's debug dumps and the tests).
    pub fn host_memory(&self) -> &M {
        &self.mem
    }

    /// The frame allocator.
    pub fn frame_allocator(&self) -> &A {
        &self.alloc
    }

    /// Gives every shadow page and P2M frame back to the allocator and returns the machine.
    pub fn into_parts(mut self) -> (M, A) {
        let keys: Vec<u64> = self.roots.keys().copied().collect();
        for k in keys {
            self.free_pair(k);
        }
        self.p2m.release_all(&mut self.alloc);
        (self.mem, self.alloc)
    }

    /// Records a change of guest CR0.WP, EFER.NXE, CR4.PGE or MAXPHYADDR. Shadow rights depend on
    /// them, so a change flushes every shadow (over-invalidation is always allowed).
    pub fn set_paging_mode(&mut self, mode: PagingMode) {
        if mode != self.mode {
            self.mode = mode;
            self.flush_all();
        }
    }

    /// Switches policy at run time: every shadow is dropped; the current roots stay (emptied).
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), StopReason> {
        if policy == self.policy {
            return Ok(());
        }
        // Keep the current roots' frames (one is in the real CR3): empty them, free the rest.
        self.free_other_pairs();
        let Some(pair) = self.roots.get(&self.current_key).copied() else {
            self.policy = policy;
            return self.create_pair(self.current_key, self.current_key);
        };
        self.clear_root(pair.kernel.as_u64());
        self.clear_root(pair.user.as_u64());
        // Only the two roots are left: rebuild the cached policy's bookkeeping for them.
        self.shadowed.clear();
        self.writable_leaves.clear();
        self.policy = policy;
        self.stats.flushes += 1;
        for root in [pair.kernel, pair.user] {
            if let Some(p) = self.pages.get_mut(&root.as_u64()) {
                p.guest_table = Some(self.current_key / PAGE_SIZE);
            }
        }
        Ok(())
    }

    /// The guest loaded CR3 (MOV to CR3, task switch...): switch to its shadow roots, creating
    /// them if absent. Flush policy: drop the previous shadows, keeping entries from guest global
    /// pages while CR4.PGE = 1 (§4.10.4.1). Cached policy: reuse the shadows of this CR3.
    pub fn load_cr3(&mut self, cr3: u64) -> Result<(), StopReason> {
        self.stats.cr3_loads += 1;
        self.guest_cr3 = cr3;
        let key = self.cr3_key(cr3);
        self.check_guest_vmm_slot(key);
        match self.policy {
            Policy::Flush => {
                if let Some(pair) = self.roots.remove(&self.current_key) {
                    for root in [pair.kernel, pair.user] {
                        if self.mode.cr4_pge {
                            self.retain_globals(root.as_u64());
                        } else {
                            self.clear_root(root.as_u64());
                        }
                        if let Some(p) = self.pages.get_mut(&root.as_u64()) {
                            p.guest_table = Some(key / PAGE_SIZE);
                        }
                    }
                    self.roots.insert(key, pair);
                    self.current_key = key;
                    self.touch(key);
                    Ok(())
                } else {
                    let live = self.current_key;
                    self.current_key = key;
                    self.create_pair(key, live)
                }
            }
            Policy::Cached => {
                let live = self.current_key;
                self.current_key = key;
                if self.roots.contains_key(&key) {
                    self.touch(key);
                    Ok(())
                } else {
                    self.create_pair(key, live)
                }
            }
        }
    }

    /// The guest executed INVLPG `gva`: drop its translation in both views of the current address
    /// space, the whole page when the guest maps it with a large page (§4.10.4.1).
    pub fn invlpg(&mut self, gva: GuestVirtAddr) {
        self.stats.invlpgs += 1;
        if let Some(pair) = self.roots.get(&self.current_key).copied() {
            for root in [pair.kernel, pair.user] {
                self.invlpg_in(root.as_u64(), gva);
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
        let owners: BTreeSet<u64> = list
            .iter()
            .filter_map(|h| self.pages.get(h).map(|p| p.owner))
            .collect();
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
            .any(|h| self.pages.get(h).is_some_and(|p| p.parent.is_none()))
        {
            return false;
        }
        for hpa in list {
            let Some(at) = self.pages.get(&hpa).and_then(|p| p.parent) else {
                continue;
            };
            let points_here =
                PageTableEntry(self.mem.read_u64(HostPhysAddr::new(at))).addr() == hpa;
            if points_here {
                self.zap_entry(at & !(PAGE_SIZE - 1), entry_index(at));
            }
        }
        self.stats.unshadowed_tables += 1;
        !self.shadowed.contains_key(&gfn)
    }

    /// True when a guest write to `gpa` must be emulated because the page holds a guest page
    /// table the cached policy shadows.
    pub fn is_write_protected_gpa(&self, gpa: GuestPhysAddr) -> bool {
        self.policy == Policy::Cached && self.shadowed.contains_key(&gpa.frame_number())
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
                if page.level == 4 && idx == VMM_PML4_SLOT {
                    continue;
                }
                if self.zap_entry(table, idx) {
                    self.stats.zaps += 1;
                }
            }
            at += ENTRY_SIZE;
        }
    }

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
        let kind = if hw.contains(PageFaultErrorCode::INSTRUCTION_FETCH) {
            AccessKind::Fetch
        } else if hw.contains(PageFaultErrorCode::WRITE) {
            AccessKind::Write
        } else {
            AccessKind::Read
        };
        let access = Access::new(kind, view.privilege());
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
        if gva.table_index(4) == VMM_PML4_SLOT {
            // The guest maps the VMM's slot: that mapping can never be honoured.
            return self.stop(StopReason::VmmRange { gva });
        }
        let mut budget = true;
        loop {
            match self.fill(view, gva, &t, access) {
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

    /// Translates `gva` for an emulated access with the guest's current CR3 and paging mode,
    /// setting A/D like hardware (§4.8). In the VMM's slot, the guest's own #PF when its
    /// tables do not map it, a stop when they do (never honoured).
    pub fn translate(
        &mut self,
        gva: GuestVirtAddr,
        access: Access,
    ) -> Result<Translation, TranslateError> {
        match self.guest_walk(gva, access) {
            Ok(_) if gva.table_index(4) == VMM_PML4_SLOT => {
                Err(TranslateError::Stop(StopReason::VmmRange { gva }))
            }
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
        if let Some(pieces) = self.shadow_hit(gva, buf.len(), kind, privilege) {
            let mut done = 0usize;
            for (frame, offset, len) in pieces.into_iter().flatten() {
                let chunk = buf.get_mut(done..done + len).unwrap_or_default();
                self.mem
                    .read_bytes(HostPhysAddr::new(frame + offset), chunk);
                done += len;
            }
            self.stats.shadow_hits += 1;
            return Ok(());
        }
        let pieces = self.translate_range(gva, buf.len(), Access::new(kind, privilege))?;
        let mut done = 0usize;
        for (va, gpa, len) in pieces {
            let chunk = buf.get_mut(done..done + len).unwrap_or_default();
            self.read_guest_phys(gpa, chunk)
                .map_err(|e| TranslateError::Stop(self.memory_stop(e, Some(va))))?;
            done += len;
        }
        Ok(())
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
        if let Some(pieces) = self.shadow_hit(gva, data.len(), AccessKind::Write, privilege) {
            let mut done = 0usize;
            for (frame, offset, len) in pieces.into_iter().flatten() {
                let chunk = data.get(done..done + len).unwrap_or_default();
                self.mem
                    .write_bytes(HostPhysAddr::new(frame + offset), chunk);
                done += len;
            }
            self.stats.shadow_hits += 1;
            return Ok(());
        }
        let pieces =
            self.translate_range(gva, data.len(), Access::new(AccessKind::Write, privilege))?;
        let mut done = 0usize;
        for (va, gpa, len) in pieces {
            let chunk = data.get(done..done + len).unwrap_or_default();
            self.write_guest_phys(gpa, chunk)
                .map_err(|e| TranslateError::Stop(self.memory_stop(e, Some(va))))?;
            done += len;
        }
        Ok(())
    }

    /// Translates every page of `[gva, gva + len)`: (linear address, guest-physical address,
    /// length) per piece.
    fn translate_range(
        &mut self,
        gva: GuestVirtAddr,
        len: usize,
        access: Access,
    ) -> Result<Vec<(GuestVirtAddr, GuestPhysAddr, usize)>, TranslateError> {
        let mut pieces = Vec::new();
        let mut done = 0usize;
        while done < len {
            let raw = gva.as_u64().wrapping_add(done as u64);
            let va = gva
                .checked_add(done as u64)
                .ok_or(TranslateError::NonCanonical(raw))?;
            let n = ((PAGE_SIZE - va.page_offset()) as usize).min(len - done);
            // Canonical boundaries are page-aligned: a piece inside one page is canonical iff
            // its first byte is.
            let t = self.translate(va, access)?;
            pieces.push((va, t.gpa, n));
            done += n;
        }
        Ok(pieces)
    }

    /// Reads guest-physical bytes (untouched RAM reads as zeros).
    pub fn read_guest_phys(&self, gpa: GuestPhysAddr, buf: &mut [u8]) -> Result<(), MemoryError> {
        self.p2m.read(gpa, buf, &self.mem)
    }

    /// Writes guest-physical bytes, allocating frames on first touch, and zaps the shadow entries
    /// of any guest page-table entry written (cached policy).
    pub fn write_guest_phys(&mut self, gpa: GuestPhysAddr, data: &[u8]) -> Result<(), MemoryError> {
        let mut budget = true;
        loop {
            match self.p2m.write(gpa, data, &mut self.mem, &mut self.alloc) {
                Err(MemoryError::OutOfHostFrames)
                    if self.reclaim([self.current_key; 2], &mut budget) => {}
                Err(e) => return Err(e),
                Ok(()) => break,
            }
        }
        self.notify_guest_pte_write(gpa, data.len());
        Ok(())
    }

    /// The host frame backing the guest frame of `gpa`, allocated and zeroed on first touch (the
    /// loader uses it to place the guest image).
    pub fn host_frame(&mut self, gpa: GuestPhysAddr) -> Result<HostPhysAddr, MemoryError> {
        let mut budget = true;
        loop {
            match self
                .p2m
                .host_frame(gpa.frame_number(), &mut self.mem, &mut self.alloc)
            {
                Err(MemoryError::OutOfHostFrames)
                    if self.reclaim([self.current_key; 2], &mut budget) => {}
                other => return other,
            }
        }
    }

    /// The emulator's software TLB: when the shadow of the view that stands for `privilege`
    /// already maps every page of `[gva, gva + len)` for this access (present; writable for a
    /// write; not execute-disabled for a fetch), the access needs no guest walk — the fill that
    /// made the shadow entry walked the guest's tables, set A (and D, for a writable entry), and
    /// a write-protected guest page table is never writable in the shadow. Returns the host
    /// pieces (frame, offset, length), at most two pages; `None` means: take the walk.
    fn shadow_hit(
        &self,
        gva: GuestVirtAddr,
        len: usize,
        kind: AccessKind,
        privilege: Privilege,
    ) -> Option<[Option<(u64, u64, usize)>; 2]> {
        if len == 0 || len > PAGE_SIZE as usize {
            return None;
        }
        let view = match privilege {
            Privilege::Supervisor => View::Kernel,
            Privilege::User => View::User,
        };
        let mut pieces = [None; 2];
        let mut done = 0usize;
        for piece in pieces.iter_mut() {
            if done == len {
                break;
            }
            let va = gva.checked_add(done as u64)?;
            let n = ((PAGE_SIZE - va.page_offset()) as usize).min(len - done);
            let m = self.shadow_lookup(view, va)?;
            let allowed = match kind {
                AccessKind::Read => true,
                AccessKind::Write => m.writable,
                AccessKind::Fetch => !m.execute_disable,
            };
            if !allowed || !m.user {
                return None;
            }
            *piece = Some((m.frame.as_u64(), va.page_offset(), n));
            done += n;
        }
        (done == len).then_some(pieces)
    }

    /// What the shadow of `view` maps at `gva`, walked like the real CPU would at CPL 3.
    pub fn shadow_lookup(&self, view: View, gva: GuestVirtAddr) -> Option<ShadowMapping> {
        if gva.table_index(4) == VMM_PML4_SLOT {
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
            let e = PageTableEntry(self.mem.read_u64(slot(table, gva.table_index(level))));
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
        let mut seen = BTreeSet::new();
        for pair in self.roots.values() {
            for root in [pair.kernel, pair.user] {
                let r = root.as_u64();
                if self.mem.read_u64(slot(r, VMM_PML4_SLOT)) != self.vmm_slot_entry {
                    return Err(AuditError {
                        what: "VMM slot altered",
                        at: r,
                    });
                }
                self.audit_table(r, 4, &mut seen)?;
            }
        }
        if seen.len() != self.pages.len() {
            return Err(AuditError {
                what: "unreachable shadow pages",
                at: seen.len() as u64,
            });
        }
        Ok(())
    }

    fn audit_table(
        &self,
        table: u64,
        level: u8,
        seen: &mut BTreeSet<u64>,
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
        if !seen.insert(table) {
            return Err(AuditError {
                what: "shadow table reachable twice",
                at: table,
            });
        }
        for idx in 0..ENTRIES_PER_TABLE {
            if level == 4 && idx == VMM_PML4_SLOT {
                continue;
            }
            let e = PageTableEntry(self.mem.read_u64(slot(table, idx)));
            if !e.is_present() {
                continue;
            }
            if level > 1 {
                self.audit_table(e.addr(), level - 1, seen)?;
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

    // ----- internals -----

    fn cr3_key(&self, cr3: u64) -> u64 {
        cr3_pml4(cr3, self.mode.max_phys_bits)
    }

    fn stop(&mut self, reason: StopReason) -> FaultOutcome {
        self.stats.stops += 1;
        log::warn!("shadow-mmu: stopping the guest: {reason:?}");
        FaultOutcome::Stop(reason)
    }

    fn memory_stop(&self, e: MemoryError, gva: Option<GuestVirtAddr>) -> StopReason {
        match e {
            MemoryError::OutsideRam(gpa) => StopReason::GpaOutsideRam { gpa, gva },
            MemoryError::OutOfHostFrames => StopReason::HostMemoryExhausted,
        }
    }

    fn guest_walk(&mut self, gva: GuestVirtAddr, access: Access) -> Result<Translation, WalkError> {
        let mut budget = true;
        loop {
            let mut ram = GuestRam {
                p2m: &mut self.p2m,
                mem: &mut self.mem,
                alloc: &mut self.alloc,
            };
            match walk(&mut ram, self.guest_cr3, gva, access, self.mode) {
                Err(WalkError::Memory(MemoryError::OutOfHostFrames))
                    if self.reclaim([self.current_key; 2], &mut budget) => {}
                other => return other,
            }
        }
    }

    /// A guest PML4 that maps the VMM's slot is never honoured; say so.
    fn check_guest_vmm_slot(&mut self, key: u64) {
        let gpa = GuestPhysAddr::new(key + entry_offset(VMM_PML4_SLOT));
        let mut b = [0u8; ENTRY_SIZE as usize];
        if self.p2m.read(gpa, &mut b, &self.mem).is_ok()
            && PageTableEntry(u64::from_le_bytes(b)).is_present()
        {
            self.stats.guest_vmm_slot_mappings += 1;
            log::warn!(
                "shadow-mmu: guest CR3 {key:#x} maps PML4 slot {VMM_PML4_SLOT} (the VMM's); ignored"
            );
        }
    }

    fn touch(&mut self, key: u64) {
        self.clock += 1;
        let now = self.clock;
        if let Some(p) = self.roots.get_mut(&key) {
            p.last_used = now;
        }
    }

    /// Creates the two roots of `key`, reclaiming other address spaces if needed, never the
    /// roots of `live` (the pair that may be in the real CR3 now).
    fn create_pair(&mut self, key: u64, live: u64) -> Result<(), StopReason> {
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
    fn free_other_pairs(&mut self) {
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

    fn free_pair(&mut self, key: u64) {
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
    fn reclaim(&mut self, protect: [u64; 2], current_too: &mut bool) -> bool {
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
            let has_children = [pair.kernel, pair.user].iter().any(|r| {
                (0..ENTRIES_PER_TABLE)
                    .filter(|i| *i != VMM_PML4_SLOT)
                    .any(|i| PageTableEntry(self.mem.read_u64(slot(r.as_u64(), i))).is_present())
            });
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

    fn alloc_page(
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
                parent: None,
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

    /// Cached policy: records that shadow page `hpa` mirrors guest table `gfn`, write-protecting
    /// the guest table when it is the first.
    fn register_shadow(&mut self, hpa: u64, gfn: u64) {
        if self.policy != Policy::Cached {
            return;
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
    fn write_protect(&mut self, gfn: u64) {
        let Some(frame) = self.p2m.lookup(gfn) else {
            return;
        };
        let Some(leaves) = self.writable_leaves.remove(&gfn) else {
            return;
        };
        for at in leaves {
            let e = self.mem.read_u64(HostPhysAddr::new(at));
            let pte = PageTableEntry(e);
            if pte.is_present() && pte.has(PteFlags::READ_WRITE) && pte.addr() == frame.as_u64() {
                self.mem
                    .write_u64(HostPhysAddr::new(at), e & !PteFlags::READ_WRITE.bits());
                self.tlb_flush = true;
            }
        }
    }

    /// Forgets a shadow leaf that is being replaced or removed.
    fn forget_leaf(&mut self, at: HostPhysAddr, old: PageTableEntry) {
        if !old.is_present() || !old.has(PteFlags::READ_WRITE) {
            return;
        }
        if let Some(gfn) = self.p2m.guest_frame_of(HostPhysAddr::new(old.addr())) {
            if let Some(set) = self.writable_leaves.get_mut(&gfn) {
                set.remove(&at.as_u64());
                if set.is_empty() {
                    self.writable_leaves.remove(&gfn);
                }
            }
        }
    }

    /// Clears entry `idx` of shadow table `table`, freeing the subtree below it. True if it was
    /// present.
    fn zap_entry(&mut self, table: u64, idx: usize) -> bool {
        let at = slot(table, idx);
        let e = PageTableEntry(self.mem.read_u64(at));
        if !e.is_present() {
            return false;
        }
        self.mem.write_u64(at, 0);
        self.tlb_flush = true;
        let level = self.pages.get(&table).map_or(1, |p| p.level);
        if level == 1 {
            self.forget_leaf(at, e);
        } else {
            self.free_page(e.addr());
        }
        true
    }

    /// Frees a shadow table and everything below it.
    fn free_page(&mut self, hpa: u64) {
        let Some(page) = self.pages.remove(&hpa) else {
            return;
        };
        for idx in 0..ENTRIES_PER_TABLE {
            if page.level == 4 && idx == VMM_PML4_SLOT {
                continue;
            }
            let at = slot(hpa, idx);
            let e = PageTableEntry(self.mem.read_u64(at));
            if !e.is_present() {
                continue;
            }
            if page.level > 1 {
                self.free_page(e.addr());
            } else {
                self.forget_leaf(at, e);
            }
        }
        if let Some(gfn) = page.guest_table {
            if let Some(list) = self.shadowed.get_mut(&gfn) {
                list.retain(|p| *p != hpa);
                if list.is_empty() {
                    self.shadowed.remove(&gfn);
                }
            }
        }
        self.tlb_flush = true;
        self.alloc.deallocate_frame(HostPhysAddr::new(hpa));
    }

    /// Clears every guest slot of a root (its tables are freed; the VMM slot stays).
    fn clear_root(&mut self, root: u64) {
        for idx in 0..ENTRIES_PER_TABLE {
            if idx != VMM_PML4_SLOT {
                self.zap_entry(root, idx);
            }
        }
    }

    /// Flush policy with CR4.PGE: drops every leaf not made from a guest global page, and every
    /// table left empty. True when something is kept below `table`.
    fn retain_globals(&mut self, table: u64) -> bool {
        let level = self.pages.get(&table).map_or(1, |p| p.level);
        let mut kept = false;
        for idx in 0..ENTRIES_PER_TABLE {
            if level == 4 && idx == VMM_PML4_SLOT {
                continue;
            }
            let e = PageTableEntry(self.mem.read_u64(slot(table, idx)));
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
            if level == 4 && idx == VMM_PML4_SLOT {
                return;
            }
            let e = PageTableEntry(self.mem.read_u64(slot(table, idx)));
            if !e.is_present() {
                return;
            }
            // Below a guest large page: the whole page goes, so drop the table that holds it.
            if self.pages.get(&e.addr()).is_some_and(|p| p.large) {
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
    fn write_flooded(&mut self, t: &Translation) -> bool {
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

    /// Builds the shadow path for `gva` in `view` from the guest translation `t` and writes the
    /// leaf with the rights the guest grants at the view's privilege.
    fn fill(
        &mut self,
        view: View,
        gva: GuestVirtAddr,
        t: &Translation,
        access: Access,
    ) -> Result<FaultOutcome, FillError> {
        let mut table = self.current_root(view).as_u64();
        // The root mirrors the guest PML4 from its first fill on.
        self.register_shadow(table, self.current_key / PAGE_SIZE);
        let leaf_level = t.page_size.leaf_level();
        for level in (2..=4u8).rev() {
            let idx = gva.table_index(level);
            let child_level = level - 1;
            // The shadow child mirrors the guest table the guest entry points to, or pieces of a
            // guest large page.
            let (guest_table, large) = if child_level >= leaf_level {
                let k = (4 - child_level) as usize;
                (t.entries.get(k).map(|e| e.frame_number()), false)
            } else {
                (None, true)
            };
            let at = slot(table, idx);
            let e = PageTableEntry(self.mem.read_u64(at));
            let mut child = None;
            if e.is_present() {
                match self.pages.get(&e.addr()) {
                    Some(p)
                        if p.guest_table == guest_table
                            && p.large == large
                            && p.level == child_level =>
                    {
                        child = Some(e.addr());
                    }
                    // The guest entry now points elsewhere (flush policy, no INVLPG yet): the old
                    // subtree no longer mirrors the guest's, drop it.
                    _ => {
                        self.zap_entry(table, idx);
                    }
                }
            }
            table = match child {
                Some(c) => c,
                None => {
                    let c = self.alloc_page(child_level, guest_table, large)?;
                    self.mem.write_u64(at, c | SHADOW_TABLE_FLAGS);
                    if let Some(page) = self.pages.get_mut(&c) {
                        page.parent = Some(at.as_u64());
                    }
                    c
                }
            };
        }
        let gfn = t.frame_number();
        let frame = self
            .p2m
            .host_frame(gfn, &mut self.mem, &mut self.alloc)
            .map_err(|e| match e {
                MemoryError::OutsideRam(_) => FillError::OutsideRam(t.gpa),
                MemoryError::OutOfHostFrames => FillError::NoHostFrame,
            })?;
        let guest_allows_write = match view {
            // Supervisor writes ignore R/W while guest CR0.WP = 0 (§4.6.1).
            View::Kernel => t.writable || !self.mode.cr0_wp,
            View::User => t.writable,
        };
        let mut protected = self.is_write_protected_gpa(t.gpa);
        if access.kind == AccessKind::Write && protected && self.write_flooded(t) {
            // Decided before the leaf is written, so that the leaf below is the writable one the
            // retry needs: `Filled` promises that the shadow now allows the access (returning it
            // over a read-only leaf cost the guest a second #PF for the same store).
            protected = false;
        }
        let writable = guest_allows_write && t.dirty && !protected;
        let mut v = frame.as_u64()
            | PteFlags::PRESENT.bits()
            | PteFlags::USER_SUPERVISOR.bits()
            | PteFlags::ACCESSED.bits();
        if writable {
            v |= PteFlags::READ_WRITE.bits() | PteFlags::DIRTY.bits();
        }
        if t.execute_disable {
            v |= PteFlags::XD.bits();
        }
        if t.pwt {
            v |= PteFlags::PWT.bits();
        }
        if t.pcd {
            v |= PteFlags::PCD.bits();
        }
        if t.pat {
            v |= PTE_PAT;
        }
        if t.global {
            v |= PteFlags::SHADOW_GUEST_GLOBAL.bits();
        }
        let at = slot(table, gva.table_index(1));
        let old = PageTableEntry(self.mem.read_u64(at));
        self.forget_leaf(at, old);
        let upgrade = old.0 | PteFlags::READ_WRITE.bits() | PteFlags::DIRTY.bits();
        if old.is_present() && v != old.0 && v != upgrade {
            // Not a pure write upgrade (which the #PF itself flushed from the real TLB): the real
            // TLB may hold the old translation.
            self.tlb_flush = true;
        }
        self.mem.write_u64(at, v);
        if writable && self.policy == Policy::Cached {
            self.writable_leaves
                .entry(gfn)
                .or_default()
                .insert(at.as_u64());
        }
        if access.kind == AccessKind::Write && protected {
            self.stats.page_table_writes += 1;
            return Ok(FaultOutcome::EmulatePageTableWrite { gpa: t.gpa });
        }
        self.write_flood = None;
        if old.is_present() && !old.has(PteFlags::READ_WRITE) && writable {
            self.stats.dirty_upgrades += 1;
        } else {
            self.stats.fills += 1;
        }
        Ok(FaultOutcome::Filled)
    }
}
