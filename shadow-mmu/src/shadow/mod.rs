//! Shadow page tables: what the real CPU walks while the guest runs (docs/design.md, "Shadow
//! page tables"; the article's "页表虚拟化" challenge, SDM vol. 3 ch. 4). This file holds the
//! [`ShadowMmu`] itself, its configuration and policies, CR3 loads and guest-physical access;
//! the rest is split by concern:
//!
//! | module | what |
//! |---|---|
//! | `fill` | the #PF decision: fill / reflect / page-table write / stop (§4.6-§4.8) |
//! | `write_protect` | cached policy: write-protected guest tables, zaps, write flooding |
//! | `unsync` | cached policy: guest tables (not roots) left writable until the next CR3 load |
//! | `sharing` | cached policy: shadow tables shared between address spaces (the kernel half) |
//! | `prefetch` | the accessed neighbours of a filled leaf shadowed with it |
//! | `invalidate` | INVLPG, full flushes and zapping shadow entries (§4.10.4) |
//! | `roots` | root pairs per guest CR3, the page pool and its quota, LRU reclaim |
//! | `linear` | the emulator's linear reads / writes / translations, the shadow hit path |
//! | `audit` | the invariants the property tests check |
//! | `outcome` | the answers: [`FaultOutcome`], [`TranslateError`], [`StopReason`], [`ConfigError`] |
//!
//! For each guest address space (keyed by guest CR3) there are two shadow roots:
//! - the **kernel view**, used while the guest is at virtual CPL 0: guest supervisor *and* user
//!   pages, all mapped U = 1 because the guest kernel really runs at CPL 3, with the guest's R/W
//!   and XD kept;
//! - the **user view**, used while the guest is at virtual CPL 3: guest user pages only, so guest
//!   processes still cannot touch guest-kernel memory (ring compression made safe).
//!
//! PML4 slot [`VMM_PML4_SLOT`] (511) of every shadow root is the VMM's: a copy of the caller's
//! entry, supervisor-only (the article's address-space compression).
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

use alloc::collections::BTreeSet;
use alloc::vec::Vec;

use crate::addr::{GuestPhysAddr, GuestVirtAddr, HostPhysAddr, PAGE_SIZE};
use crate::machine::{FrameAllocator, HostMemory};
use crate::p2m::{GuestRam, MemoryError, P2m};
use crate::pte::{cr3_pml4, entry_offset, PageTableEntry, PteFlags, ENTRIES_PER_TABLE, ENTRY_SIZE};
use crate::walk::{walk, Access, PagingMode, Privilege, Translation, WalkError};

mod audit;
mod fill;
mod invalidate;
/// Lab 3, the shadow root switch (docs/labs/lab3-shadow-root-switch.md): the student's file,
/// here because it uses the shadow MMU's private state (see `crate::labs`).
#[cfg(feature = "lab3")]
#[path = "../../../labs/lab3_shadow_root_switch.rs"]
pub(crate) mod lab3;
mod linear;
mod outcome;
mod prefetch;
mod roots;
mod sharing;
mod unsync;
mod write_protect;

pub use audit::AuditError;
// For the student's `leaf_rights` of lab 4 (`crate::labs`).
#[cfg(feature = "lab4")]
pub(crate) use fill::LeafRights;
pub use linear::ShadowMapping;
pub use outcome::{ConfigError, FaultOutcome, StopReason, TranslateError};
pub use write_protect::WRITE_FLOOD_THRESHOLD;

use roots::{RootPair, ShadowPage};

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
    /// Shadow leaves filled for the emulator's reads (`set_emulator_fill`), not in `fills`.
    pub emulator_fills: u64,
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
    /// Guest tables unsynced instead of emulating a store to them (`set_unsync`).
    pub unsyncs: u64,
    /// Shadow tables linked into another address space instead of built again (`set_sharing`).
    pub shared_links: u64,
    /// Neighbouring leaves shadowed along with a fill (`set_prefetch`).
    pub prefetched: u64,
    /// Unsynced tables brought back in line (at CR3 loads, or before being mirrored higher).
    pub resyncs: u64,
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
    roots: FastMap<u64, RootPair>,
    /// Every shadow table by its host address. A hash map, not a tree: it is looked up at
    /// every level of every fill and on every entry write (measured under icount: a tree lookup
    /// cost ~60-100 instructions here, the hash ~20).
    pages: FastMap<u64, ShadowPage>,
    /// Cached policy: guest table frame -> shadow pages that shadow it (its write-protection).
    shadowed: FastMap<u64, Vec<u64>>,
    /// Cached policy: (guest frame, host address of a writable shadow PTE that maps it), one
    /// set ordered by frame rather than a set per frame: adding a leaf allocates no new set
    /// (measured under icount: a few hundred instructions per fill of a new frame).
    writable_leaves: BTreeSet<(u64, u64)>,
    quota: usize,
    clock: u64,
    tlb_flush: bool,
    stats: Stats,
    /// The guest table the last emulated page-table writes went to, and how many in a row.
    write_flood: Option<(u64, u32)>,
    /// Whether an emulator read that missed the shadow fills it (`set_emulator_fill`).
    emulator_fill: bool,
    /// Cached policy: whether guest tables may be unsynced (`set_unsync`, `unsync.rs`).
    unsync_enabled: bool,
    /// Cached policy: the guest tables (frame numbers) left writable to the guest until
    /// the next CR3 load (`unsync.rs`).
    unsync: BTreeSet<u64>,
    /// Moves on at every change of a shadow entry or of the current roots: what
    /// `lookup_cache` remembered from before is stale (`shadow_changed`).
    shadow_generation: u64,
    /// The last few `shadow_lookup` answers (`linear.rs`).
    lookup_cache: linear::LookupCache,
    /// Cached policy: whether shadow tables are shared between address spaces (`sharing.rs`).
    sharing: bool,
    /// Cached policy: the shared shadow table of each role (`sharing.rs`).
    by_role: FastMap<sharing::Role, u64>,
    /// Whether a fill also shadows the accessed neighbours of its leaf (`prefetch.rs`).
    prefetch: bool,
}

/// A hash map with a fixed, fast hasher (rustc's Fx): deterministic, and no random state to
/// seed on a bare-metal host.
pub(crate) type FastMap<K, V> =
    hashbrown::HashMap<K, V, core::hash::BuildHasherDefault<rustc_hash::FxHasher>>;

/// The host address of entry `idx` of the shadow table at `table`.
fn slot(table: u64, idx: usize) -> HostPhysAddr {
    HostPhysAddr::new(table + entry_offset(idx))
}

/// True for the one shadow entry that is the VMM's, not the guest's: slot [`VMM_PML4_SLOT`]
/// of a root (level 4).
const fn is_vmm_slot(level: u8, idx: usize) -> bool {
    level == 4 && idx == VMM_PML4_SLOT
}

/// The entries of a shadow table at `level` that mirror guest entries: all but the VMM's slot.
fn guest_slots(level: u8) -> impl Iterator<Item = usize> {
    (0..ENTRIES_PER_TABLE).filter(move |idx| !is_vmm_slot(level, *idx))
}

/// True when `gva` lies in the VMM's reserved range (its PML4 slot).
const fn in_vmm_range(gva: GuestVirtAddr) -> bool {
    gva.table_index(4) == VMM_PML4_SLOT
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
            roots: FastMap::default(),
            pages: FastMap::default(),
            shadowed: FastMap::default(),
            writable_leaves: BTreeSet::new(),
            quota: config.shadow_quota,
            clock: 0,
            tlb_flush: false,
            write_flood: None,
            emulator_fill: false,
            unsync_enabled: false,
            unsync: BTreeSet::new(),
            shadow_generation: 0,
            lookup_cache: linear::LookupCache::default(),
            sharing: false,
            by_role: FastMap::default(),
            prefetch: false,
            stats: Stats::default(),
        };
        mmu.current_key = mmu.cr3_key(config.guest_cr3);
        match mmu.create_pair(mmu.current_key, mmu.current_key) {
            Ok(()) => Ok(mmu),
            Err(_) => Err(ConfigError::HostMemoryExhausted),
        }
    }

    /// The shadow root the kernel loads into the real CR3 while the guest runs in `view`.
    #[cfg(not(feature = "lab3"))]
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

    /// Lab 3 (docs/labs/lab3-shadow-root-switch.md): the student's real CR3
    /// (labs/lab3_shadow_root_switch.rs).
    #[cfg(feature = "lab3")]
    pub fn current_root(&self, view: View) -> HostPhysAddr {
        lab3::current_root(self, view)
    }

    /// Whether a shadow entry was removed or downgraded since the last `take_tlb_flush`, without
    /// forgetting it.
    pub fn tlb_flush_pending(&self) -> bool {
        self.tlb_flush
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

    /// The shadow entry `idx` of the shadow table at `table`.
    fn shadow_entry(&self, table: u64, idx: usize) -> PageTableEntry {
        PageTableEntry(self.mem.read_u64(slot(table, idx)))
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
        self.unsync.clear();
        self.by_role.clear();
        self.policy = policy;
        self.stats.flushes += 1;
        for root in [pair.kernel, pair.user] {
            if let Some(p) = self.pages.get_mut(&root.as_u64()) {
                p.guest_table = Some(self.current_key / PAGE_SIZE);
                p.registered = false;
            }
        }
        Ok(())
    }

    /// The guest loaded CR3 (MOV to CR3, task switch...): switch to its shadow roots, creating
    /// them if absent. Flush policy: drop the previous shadows, keeping entries from guest global
    /// pages while CR4.PGE = 1 (§4.10.4.1). Cached policy: reuse the shadows of this CR3.
    pub fn load_cr3(&mut self, cr3: u64) -> Result<(), StopReason> {
        self.stats.cr3_loads += 1;
        // The guest's TLB flush: unsynced tables are brought back in line (`unsync.rs`).
        self.resync_all();
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
                    self.shadow_changed();
                    self.touch(key);
                    Ok(())
                } else {
                    let live = self.current_key;
                    self.current_key = key;
                    self.shadow_changed();
                    self.create_pair(key, live)
                }
            }
            Policy::Cached => switch_cached(self, key),
        }
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

    /// A guest store that runs natively (no trap, so nobody is notified): what the guest does to
    /// an unsynced table. Tests and fuzzing only.
    #[cfg(any(test, feature = "testing"))]
    pub(crate) fn write_guest_phys_natively(
        &mut self,
        gpa: GuestPhysAddr,
        data: &[u8],
    ) -> Result<(), MemoryError> {
        self.p2m.write(gpa, data, &mut self.mem, &mut self.alloc)
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
}

// Lab 3 (docs/labs/lab3-shadow-root-switch.md): built with the feature `lab3`, the student's
// cached-policy root switch (labs/lab3_shadow_root_switch.rs) stands in for the one below.
#[cfg(feature = "lab3")]
use lab3::switch_cached;

/// The cached policy's root switch to the address space whose PML4 is at `key`: its pair of
/// roots becomes the current one, kept from its last use (a context switch back to a process
/// finds its shadows as they were) or created empty; the lookup cache is stale from here on.
/// Creating a pair may reclaim the least recently used ones, never the pair that may still be
/// in the real CR3 (the one current until now: the CPU may be walking it, SDM Vol. 3 §4.10.4).
#[cfg(not(feature = "lab3"))]
fn switch_cached<M: HostMemory, A: FrameAllocator>(
    mmu: &mut ShadowMmu<M, A>,
    key: u64,
) -> Result<(), StopReason> {
    let live = mmu.current_key;
    mmu.current_key = key;
    mmu.shadow_changed();
    if mmu.roots.contains_key(&key) {
        mmu.touch(key);
        Ok(())
    } else {
        mmu.create_pair(key, live)
    }
}
