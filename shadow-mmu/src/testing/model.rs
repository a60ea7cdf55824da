//! The model the shadow MMU's property tests and its fuzz target (`fuzz/`) both run: random
//! guest page tables and random sequences of accesses, guest page-table writes, INVLPG, CR3
//! loads, flushes, CR0.WP changes and policy switches, and after every step the checks:
//! - the structural invariants of [`crate::ShadowMmu::audit`] hold (VMM slot intact in every
//!   root, every shadow leaf points at a frame the P2M gave this guest, quota respected, no
//!   writable mapping of a write-protected guest table);
//! - whatever the shadow of the current address space allows (the real CPU at CPL 3), the guest
//!   allows at the view's virtual privilege, to the same frame (never more); in particular the
//!   user view never maps a guest supervisor page, and a writable leaf has the guest D bit set;
//! - no root in the real CPU's CR3 is freed while it is there, and no frame leaks at the end.
//!
//! Each access is played like the real CPU: if the shadow allows it nothing happens; otherwise the
//! fault goes to `handle_page_fault`, whose outcome is checked against a side-effect-free walk of
//! the guest's tables (a reflected fault carries exactly the guest's error code).
//!
//! In the flush policy the guest behaves as the SDM requires (§4.10.4.2): after changing an entry
//! it invalidates the addresses that entry maps. In the cached policy it does not, and the
//! write-protection must keep the shadows exact on its own.
//!
//! CR4.PGE may be on: then the flush policy keeps the shadows of guest global pages across a
//! CR3 load, and the guest keeps its side by invalidating a global translation the new address
//! space does not share (§4.10.2.4).
//!
//! The test universe is small on purpose, so random steps collide: two tables per level, the
//! entries 0 and 1 of each (and the VMM's PML4 slot), 18 addresses. A broken check panics.
#![allow(missing_docs)]

use alloc::vec::Vec;

use super::fake::*;
use crate::addr::{GuestPhysAddr, GuestVirtAddr, PageFaultErrorCode as E};
use crate::p2m::{GuestPhysMemory, MemoryError};
use crate::shadow::{FaultOutcome, Policy, StopReason, View, VMM_PML4_SLOT};
use crate::walk::{walk, Access, AccessKind, PagingMode, Translation, WalkError};

pub const PML4S: [u64; 2] = [0x10000, 0x11000];
pub const PDPTS: [u64; 2] = [0x20000, 0x21000];
pub const PDS: [u64; 2] = [0x30000, 0x31000];
pub const PTS: [u64; 2] = [0x40000, 0x41000];
/// Leaf targets of a PTE: data frames, two guest tables (the guest maps its own page tables),
/// and a frame outside RAM.
pub const FRAMES: [u64; 6] = [0x100000, 0x101000, 0x102000, 0x40000, 0x30000, 0x2000_0000];
pub const OUTSIDE: u64 = 0x2000_0000;

const PML4_IDX: [u64; 3] = [0, 1, VMM_PML4_SLOT as u64];
const LOW_IDX: [u64; 2] = [0, 1];
/// 16 addresses below the VMM slot, two inside it.
pub const ADDRS: usize = 18;

/// Every entry slot the test addresses can reach: (level, entry gpa).
pub fn slots() -> Vec<(u8, u64)> {
    let mut v = Vec::new();
    for t in PML4S {
        for i in PML4_IDX {
            v.push((4, t + i * 8));
        }
    }
    for (level, tables) in [(3u8, PDPTS), (2, PDS), (1, PTS)] {
        for t in tables {
            for i in LOW_IDX {
                v.push((level, t + i * 8));
            }
        }
    }
    v
}

pub fn addresses() -> Vec<GuestVirtAddr> {
    let mut v = Vec::new();
    for a in PML4_IDX {
        for b in LOW_IDX {
            for c in LOW_IDX {
                for d in LOW_IDX {
                    // The VMM's slot needs only two probes.
                    if a == VMM_PML4_SLOT as u64 && !(b == c && c == d) {
                        continue;
                    }
                    let raw = (a << 39) | (b << 30) | (c << 21) | (d << 12) | 0x18;
                    let canon = if a >= 256 {
                        raw | 0xffff_0000_0000_0000
                    } else {
                        raw
                    };
                    v.push(GuestVirtAddr::new(canon).unwrap());
                }
            }
        }
    }
    v
}

/// Builds an entry for `level` from three random bytes.
pub fn entry(level: u8, kind: u8, target: u8, flags: u8) -> u64 {
    if kind.is_multiple_of(8) {
        return 0;
    }
    let mut e = P;
    for (bit, f) in [(0, RW), (1, US), (3, A), (7, G)] {
        if flags & (1 << bit) != 0 {
            e |= f;
        }
    }
    if flags & 0x18 == 0x18 {
        e |= D;
    }
    // Mostly user-accessible and writable so walks reach the leaf often.
    if kind % 4 != 1 {
        e |= US;
    }
    if kind % 5 != 1 {
        e |= RW;
    }
    if flags & 4 != 0 && kind.is_multiple_of(3) {
        e |= XD;
    }
    if kind == 255 {
        e |= 1 << 51; // reserved
    }
    let t = target as usize;
    let large = flags & 0x60 == 0x60;
    match level {
        4 => e | PDPTS[t % 2] | if kind == 254 { PS } else { 0 },
        3 if large => e | PS | if t.is_multiple_of(4) { OUTSIDE << 1 } else { 0 },
        3 => e | PDS[t % 2],
        2 if large => {
            e | PS
                | if t.is_multiple_of(4) {
                    OUTSIDE
                } else {
                    0x20_0000
                }
        }
        2 => e | PTS[t % 2],
        _ => e | FRAMES[t % FRAMES.len()],
    }
}

/// One step of the guest (or of the VMM on its behalf).
#[derive(Clone, Debug)]
pub enum Step {
    /// An access to `addresses()[addr]` through the kernel view (`view`) or the user view; `kind`
    /// 0 read, 1 write, 2 fetch.
    Access { view: bool, addr: usize, kind: u8 },
    /// A store of [`entry`]`(kind, target, flags)` to `slots()[slot]`.
    PteWrite {
        slot: usize,
        kind: u8,
        target: u8,
        flags: u8,
        /// A native store (to an unsynced table) is followed at once by INVLPG of every address,
        /// or the invalidation is owed until the next CR3 load.
        invalidate: bool,
    },
    /// A store of any value (reserved bits, addresses outside the test's tables or outside RAM)
    /// to `slots()[slot]`; `invalidate` as for [`Step::PteWrite`].
    RawPteWrite {
        slot: usize,
        value: u64,
        invalidate: bool,
    },
    /// A read, then a write, of the same address (the dirty-bit upgrade).
    ReadThenWrite { view: bool, addr: usize },
    /// INVLPG of `addresses()[addr]`.
    Invlpg { addr: usize },
    /// A CR3 load of `PML4S[which]`.
    LoadCr3 { which: usize },
    /// A flush of every shadow (the VMM's own, as on a paging-mode change).
    FlushAll,
    /// CR0.WP toggled.
    ToggleWp,
    /// The shadow policy switched at run time.
    SwitchPolicy,
}

/// Guest memory read through the MMU, writes discarded: a walk without side effects.
struct Pure<'a>(&'a Mmu);

impl GuestPhysMemory for Pure<'_> {
    fn read_u64(&mut self, gpa: GuestPhysAddr) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.0.read_guest_phys(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn write_u64(&mut self, _gpa: GuestPhysAddr, _value: u64) -> Result<(), MemoryError> {
        Ok(())
    }
}

fn pure_walk(m: &Mmu, gva: GuestVirtAddr, access: Access) -> Result<Translation, WalkError> {
    walk(&mut Pure(m), m.guest_cr3(), gva, access, m.paging_mode())
}

fn view_of(kernel: bool) -> View {
    if kernel {
        View::Kernel
    } else {
        View::User
    }
}

fn kind_of(k: u8) -> AccessKind {
    match k {
        0 => AccessKind::Read,
        1 => AccessKind::Write,
        _ => AccessKind::Fetch,
    }
}

fn shadow_allows(m: &Mmu, view: View, gva: GuestVirtAddr, kind: AccessKind) -> bool {
    match m.shadow_lookup(view, gva) {
        Some(s) => {
            s.user
                && match kind {
                    AccessKind::Read => true,
                    AccessKind::Write => s.writable,
                    AccessKind::Fetch => !s.execute_disable,
                }
        }
        None => false,
    }
}

/// Whatever the current shadows allow, the guest allows, to the same frame.
pub fn check_shadow_never_exceeds_guest(m: &Mmu) {
    m.audit().unwrap();
    for gva in addresses() {
        for view in [View::Kernel, View::User] {
            let Some(s) = m.shadow_lookup(view, gva) else {
                continue;
            };
            assert!(s.user, "shadow leaf not reachable at CPL 3");
            let p = view.privilege();
            let t = pure_walk(m, gva, Access::new(AccessKind::Read, p)).unwrap_or_else(|e| {
                panic!("{view:?} shadow maps {gva:?} but the guest says {e:?}")
            });
            assert_eq!(
                m.p2m().lookup(t.frame_number()),
                Some(s.frame),
                "{view:?} {gva:?} wrong frame"
            );
            if s.writable {
                assert!(
                    pure_walk(m, gva, Access::new(AccessKind::Write, p)).is_ok(),
                    "{view:?} {gva:?} writable"
                );
                assert!(t.dirty, "writable shadow before the guest's D bit");
                assert!(!m.is_write_protected_gpa(t.gpa));
            }
            if !s.execute_disable {
                assert!(
                    pure_walk(m, gva, Access::new(AccessKind::Fetch, p)).is_ok(),
                    "{view:?} {gva:?} exec"
                );
            }
        }
    }
}

/// Plays one access as the CPU would meet it: through the shadow when it allows it, else as
/// a page fault the MMU handles. Whether the MMU was asked (false: the shadow allowed it and
/// nothing changed, neither the MMU nor guest memory).
fn play(m: &mut Mmu, view: View, gva: GuestVirtAddr, kind: AccessKind) -> bool {
    let access = Access::new(kind, view.privilege());
    let expected = pure_walk(m, gva, access);
    if shadow_allows(m, view, gva, kind) {
        assert!(
            expected.is_ok(),
            "shadow allowed what the guest denies: {expected:?}"
        );
        return false;
    }
    let mut hw = E::USER;
    hw.set(E::WRITE, kind == AccessKind::Write);
    hw.set(E::INSTRUCTION_FETCH, kind == AccessKind::Fetch);
    hw.set(E::PRESENT, m.shadow_lookup(view, gva).is_some());
    let outcome = m.handle_page_fault(view, gva, hw);
    if gva.table_index(4) == VMM_PML4_SLOT {
        // The VMM's slot: the guest's own #PF where it does not map it, a stop where it does.
        match &expected {
            Ok(_) => assert_eq!(outcome, FaultOutcome::Stop(StopReason::VmmRange { gva })),
            Err(crate::WalkError::PageFault(pf)) => {
                assert_eq!(outcome, FaultOutcome::Reflect(*pf))
            }
            // Its tables outside RAM: a stop, as anywhere else.
            Err(WalkError::Memory(MemoryError::OutsideRam(gpa))) => assert!(matches!(
                outcome,
                FaultOutcome::Stop(StopReason::GpaOutsideRam { gpa: g, .. }) if g == *gpa
            )),
            Err(other) => panic!("unexpected walk result {other:?}, outcome {outcome:?}"),
        }
        return true;
    }
    match outcome {
        FaultOutcome::Filled => {
            assert!(
                expected.is_ok(),
                "filled what the guest denies: {expected:?}"
            );
            assert!(
                shadow_allows(m, view, gva, kind),
                "filled but the retry would fault again"
            );
        }
        FaultOutcome::Reflect(pf) => assert_eq!(expected, Err(WalkError::PageFault(pf))),
        FaultOutcome::EmulatePageTableWrite { gpa } => {
            assert_eq!(
                m.policy(),
                Policy::Cached,
                "only the cached policy protects tables"
            );
            assert_eq!(kind, AccessKind::Write);
            assert_eq!(expected.map(|t| t.gpa), Ok(gpa));
            assert!(m.is_write_protected_gpa(gpa));
            // Emulate: the guest stores the same value again.
            let at = gpa.as_u64() & !7;
            let v = peek(m, at);
            poke(m, at, v);
        }
        FaultOutcome::Stop(StopReason::GpaOutsideRam { gpa, .. }) => {
            assert!(gpa.as_u64() >= RAM);
            match expected {
                Ok(t) => assert!(t.gpa.as_u64() >= RAM),
                Err(e) => assert!(matches!(e, WalkError::Memory(MemoryError::OutsideRam(_)))),
            }
        }
        FaultOutcome::Stop(other) => panic!("unexpected stop {other:?}"),
    }
    true
}

pub fn run(policy: Policy, pge: bool, quota: usize, initial: Vec<(u8, u8, u8)>, steps: Vec<Step>) {
    let switches = Switches {
        pge,
        ..Switches::default()
    };
    run_with(policy, switches, quota, initial, steps)
}

/// The optional behaviours a run turns on.
#[derive(Clone, Copy, Debug, Default)]
pub struct Switches {
    /// Guest tables may be unsynced (`ShadowMmu::set_unsync`); a write to one is then a native
    /// store nobody is told about, and the guest keeps its side of the TLB contract by
    /// invalidating what it changed, as on the CPU.
    pub unsync: bool,
    /// Address spaces share shadow tables (`ShadowMmu::set_sharing`).
    pub sharing: bool,
    /// Fills shadow the accessed neighbours too (`ShadowMmu::set_prefetch`).
    pub prefetch: bool,
    /// CR4.PGE = 1: in the flush policy, shadows of guest global pages survive a CR3 load
    /// (§4.10.4.1).
    pub pge: bool,
}

pub fn run_with(
    policy: Policy,
    switches: Switches,
    quota: usize,
    initial: Vec<(u8, u8, u8)>,
    steps: Vec<Step>,
) {
    let Switches {
        unsync,
        sharing,
        prefetch,
        pge,
    } = switches;
    let mode = PagingMode {
        cr4_pge: pge,
        ..PagingMode::ENTRY
    };
    let mut m = mmu_with(policy, quota, PML4S[0], mode, usize::MAX);
    m.set_unsync(unsync);
    m.set_sharing(sharing);
    m.set_prefetch(prefetch);
    let slots = slots();
    for (&(level, at), &(kind, target, flags)) in slots.iter().zip(initial.iter()) {
        poke(&mut m, at, entry(level, kind, target, flags));
    }
    m.load_cr3(PML4S[0]).unwrap();
    let addrs = addresses();
    assert_eq!(addrs.len(), ADDRS);
    check_shadow_never_exceeds_guest(&m);
    let mut stale = false;
    for s in steps {
        if stale
            && !matches!(
                s,
                Step::LoadCr3 { .. } | Step::PteWrite { .. } | Step::RawPteWrite { .. }
            )
        {
            continue;
        }
        // The roots in the real CR3 during this step must outlive it (never freed, never reused).
        let live = [m.current_root(View::Kernel), m.current_root(View::User)];
        let freed_before = m.frame_allocator().freed.len();
        // Whether the step may have changed the MMU or guest memory: an access the shadow
        // allowed changed neither, so the checks that passed after the step before would see
        // exactly the same state (skipping them halves the fuzz target's time per input).
        let mut changed = true;
        match s {
            Step::Access { view, addr, kind } => {
                changed = play(&mut m, view_of(view), addrs[addr], kind_of(kind));
            }
            Step::PteWrite { .. } | Step::RawPteWrite { .. } => {
                let (slot, value, invalidate) = match s {
                    Step::PteWrite {
                        slot,
                        kind,
                        target,
                        flags,
                        invalidate,
                    } => (slot, entry(slots[slot].0, kind, target, flags), invalidate),
                    Step::RawPteWrite {
                        slot,
                        value,
                        invalidate,
                    } => (slot, value, invalidate),
                    _ => unreachable!(),
                };
                let at = slots[slot].1;
                let native = m.is_unsync(at / 4096);
                if native {
                    m.write_guest_phys_natively(GuestPhysAddr::new(at), &value.to_le_bytes())
                        .unwrap();
                } else {
                    poke(&mut m, at, value);
                }
                if native && !invalidate {
                    // The shadow may now allow what the guest no longer does, as the TLB may,
                    // until the guest's next CR3 load: it does not touch memory until then.
                    stale = true;
                } else if m.policy() == Policy::Flush || native {
                    // The guest keeps its side of the contract: invalidate what the entry maps.
                    for &a in &addrs {
                        m.invlpg(a);
                    }
                }
            }
            Step::ReadThenWrite { view, addr } => {
                let read = play(&mut m, view_of(view), addrs[addr], AccessKind::Read);
                if read {
                    check_shadow_never_exceeds_guest(&m);
                }
                let write = play(&mut m, view_of(view), addrs[addr], AccessKind::Write);
                changed = read || write;
            }
            Step::Invlpg { addr } => m.invlpg(addrs[addr]),
            Step::LoadCr3 { which } => {
                let globals = global_translations(&m);
                m.load_cr3(PML4S[which]).unwrap();
                // A guest keeps a global translation the same in every address space, or
                // invalidates it when it is not (§4.10.2.4): the flush policy keeps the shadows
                // of global pages across the load, as the TLB does.
                for (gva, before) in globals {
                    if translations(&m, gva) != before {
                        m.invlpg(gva);
                    }
                }
                stale = false;
            }
            Step::FlushAll => m.flush_all(),
            Step::SwitchPolicy => {
                let other = match m.policy() {
                    Policy::Flush => Policy::Cached,
                    Policy::Cached => Policy::Flush,
                };
                m.set_policy(other).unwrap();
            }
            Step::ToggleWp => {
                let mut mode = m.paging_mode();
                mode.cr0_wp = !mode.cr0_wp;
                m.set_paging_mode(mode);
            }
        }
        for f in &m.frame_allocator().freed[freed_before..] {
            assert!(
                !live.iter().any(|r| r.as_u64() == *f),
                "live root {f:#x} freed"
            );
        }
        if !changed {
            continue;
        }
        if stale {
            m.audit().unwrap();
        } else {
            check_shadow_never_exceeds_guest(&m);
        }
    }
    let (_, alloc) = m.into_parts();
    assert!(alloc.live.is_empty(), "frames leaked");
}

/// What a walk of the guest's tables gives for one access: the guest-physical address, R/W,
/// U/S, XD and D, or a fault.
type Seen = Vec<Option<(u64, (bool, bool, bool, bool))>>;

/// What the guest's tables give at `gva` for every access and privilege, without the addresses
/// of the entries walked (they differ between address spaces that map a page alike).
fn translations(m: &Mmu, gva: GuestVirtAddr) -> Seen {
    let mut out = Vec::new();
    for view in [View::Kernel, View::User] {
        for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
            let t = pure_walk(m, gva, Access::new(kind, view.privilege()));
            let seen = t.ok().map(|t| {
                let rights = (t.writable, t.user, t.execute_disable, t.dirty);
                (t.gpa.as_u64(), rights)
            });
            out.push(seen);
        }
    }
    out
}

/// The test addresses the current address space maps with a global page (G = 1, CR4.PGE = 1),
/// with their translations.
fn global_translations(m: &Mmu) -> Vec<(GuestVirtAddr, Seen)> {
    addresses()
        .into_iter()
        .filter(|&gva| {
            [View::Kernel, View::User].iter().any(|v| {
                pure_walk(m, gva, Access::new(AccessKind::Read, v.privilege()))
                    .is_ok_and(|t| t.global)
            })
        })
        .map(|gva| (gva, translations(m, gva)))
        .collect()
}
