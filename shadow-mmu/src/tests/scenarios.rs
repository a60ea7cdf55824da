//! Scenario tests of the fault path, the views, invalidation and the two policies.

use crate::addr::{GuestPhysAddr, GuestVirtAddr, HostPhysAddr, PageFaultErrorCode as E};
use crate::machine::HostMemory;
use crate::pte::entry_offset;
use crate::shadow::{
    FaultOutcome, Policy, StopReason, View, MIN_SHADOW_QUOTA, VMM_PML4_SLOT, VMM_RANGE_START,
};
use crate::testing::fake::*;
use crate::walk::{Access, AccessKind, PagingMode, Privilege};
use crate::TranslateError;

const T: [u64; 4] = [0x10000, 0x11000, 0x12000, 0x13000];
const CR3: u64 = T[0];
const KVA: u64 = 0xffff_8000_0000_5000;
const UVA: u64 = 0x0000_0000_0040_3000;

fn gva(v: u64) -> GuestVirtAddr {
    GuestVirtAddr::new(v).unwrap()
}

/// A hardware error code as the real CPU reports it (the guest runs at CPL 3).
fn hw(write: bool, present: bool) -> E {
    let mut c = E::USER;
    c.set(E::WRITE, write);
    c.set(E::PRESENT, present);
    c
}

fn frame_of(m: &Mmu, gpa: u64) -> HostPhysAddr {
    m.p2m().lookup(gpa / 4096).unwrap()
}

#[test]
fn new_rejects_a_tiny_quota_and_copies_the_vmm_slot_supervisor_only() {
    let m = mmu(Policy::Flush, MIN_SHADOW_QUOTA, CR3);
    for view in [View::Kernel, View::User] {
        let root = m.current_root(view);
        let e = m.host_memory().read_u64(HostPhysAddr::new(
            root.as_u64() + entry_offset(VMM_PML4_SLOT),
        ));
        assert_eq!(e, VMM_SLOT_ENTRY & !US);
    }
    assert_ne!(m.current_root(View::Kernel), m.current_root(View::User));
    let mut mem = FakeMemory::default();
    mem.zero_frame(HostPhysAddr::new(VMM_ROOT));
    let r = crate::ShadowMmu::new(
        mem,
        FakeAllocator::new(100),
        crate::MmuConfig {
            ram_bytes: RAM,
            shadow_quota: MIN_SHADOW_QUOTA - 1,
            policy: Policy::Flush,
            vmm_root: HostPhysAddr::new(VMM_ROOT),
            mode: PagingMode::ENTRY,
            guest_cr3: CR3,
        },
    );
    assert!(matches!(r, Err(crate::ConfigError::QuotaTooSmall)));
}

#[test]
fn kernel_view_fill_then_dirty_upgrade() {
    let mut m = mmu(Policy::Flush, 64, CR3);
    map_4k(&mut m, T, KVA, 0x20_0000, P | RW, P | RW);
    assert_eq!(
        m.handle_page_fault(View::Kernel, gva(KVA), hw(false, false)),
        FaultOutcome::Filled
    );
    let s = m.shadow_lookup(View::Kernel, gva(KVA)).unwrap();
    assert_eq!(s.frame, frame_of(&m, 0x20_0000));
    assert!(s.user, "kernel view maps guest supervisor pages U=1");
    assert!(!s.writable, "not writable before the guest's D bit is set");
    let pte = T[3] + ((KVA >> 12) & 0x1ff) * 8;
    assert_eq!(peek(&m, pte) & (A | D), A, "A set by the read, D not");
    // The first write faults (protection), sets D and upgrades.
    assert_eq!(
        m.handle_page_fault(View::Kernel, gva(KVA), hw(true, true)),
        FaultOutcome::Filled
    );
    assert_eq!(peek(&m, pte) & (A | D), A | D);
    assert!(m.shadow_lookup(View::Kernel, gva(KVA)).unwrap().writable);
    let st = m.stats();
    assert_eq!((st.fills, st.dirty_upgrades), (1, 1));
    // The user view never maps it: the guest sees a protection fault with U/S = 1.
    assert!(m.shadow_lookup(View::User, gva(KVA)).is_none());
    assert_eq!(
        m.handle_page_fault(View::User, gva(KVA), hw(false, false)),
        FaultOutcome::Reflect(crate::PageFault {
            error_code: E::PRESENT | E::USER,
            cr2: gva(KVA)
        })
    );
    assert!(m.shadow_lookup(View::User, gva(KVA)).is_none());
    m.audit().unwrap();
}

#[test]
fn supervisor_error_code_is_computed_from_the_virtual_privilege() {
    let mut m = mmu(Policy::Flush, 64, CR3);
    // Not mapped at all: the guest kernel sees P=0, U/S=0 although the hardware said U/S=1.
    assert_eq!(
        m.handle_page_fault(View::Kernel, gva(KVA), hw(true, false)),
        FaultOutcome::Reflect(crate::PageFault {
            error_code: E::WRITE,
            cr2: gva(KVA)
        })
    );
    assert_eq!(m.stats().reflections, 1);
}

#[test]
fn wp0_lets_the_kernel_view_write_read_only_pages_but_not_the_user_view() {
    let mode = PagingMode {
        cr0_wp: false,
        ..PagingMode::ENTRY
    };
    let mut m = mmu_with(Policy::Flush, 64, CR3, mode, usize::MAX);
    map_4k(&mut m, T, UVA, 0x20_0000, P | RW | US, P | US);
    assert_eq!(
        m.handle_page_fault(View::Kernel, gva(UVA), hw(true, false)),
        FaultOutcome::Filled
    );
    assert!(m.shadow_lookup(View::Kernel, gva(UVA)).unwrap().writable);
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(true, false)),
        FaultOutcome::Reflect(crate::PageFault {
            error_code: E::PRESENT | E::WRITE | E::USER,
            cr2: gva(UVA)
        })
    );
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(false, false)),
        FaultOutcome::Filled
    );
    assert!(!m.shadow_lookup(View::User, gva(UVA)).unwrap().writable);
    // Turning WP on drops the WP=0 writable entry.
    m.set_paging_mode(PagingMode::ENTRY);
    assert!(m.shadow_lookup(View::Kernel, gva(UVA)).is_none());
    assert!(m.take_tlb_flush());
    assert!(matches!(
        m.handle_page_fault(View::Kernel, gva(UVA), hw(true, false)),
        FaultOutcome::Reflect(_)
    ));
}

#[test]
fn execute_disable_is_kept_and_fetch_faults_report_i_d() {
    let mut m = mmu(Policy::Flush, 64, CR3);
    map_4k(&mut m, T, KVA, 0x20_0000, P | RW, P | RW | XD);
    assert_eq!(
        m.handle_page_fault(View::Kernel, gva(KVA), hw(false, false)),
        FaultOutcome::Filled
    );
    assert!(
        m.shadow_lookup(View::Kernel, gva(KVA))
            .unwrap()
            .execute_disable
    );
    assert_eq!(
        m.handle_page_fault(
            View::Kernel,
            gva(KVA),
            E::USER | E::PRESENT | E::INSTRUCTION_FETCH
        ),
        FaultOutcome::Reflect(crate::PageFault {
            error_code: E::PRESENT | E::INSTRUCTION_FETCH,
            cr2: gva(KVA)
        })
    );
}

/// Found by the fuzz target `shadow_mmu` (fuzz/corpus/shadow_mmu/crash-vmm-slot-tables-outside-ram):
/// the guest's entry for the VMM's PML4 slot names a PDPT beyond RAM. The MMU stops the guest
/// for the GPA (as for a table beyond RAM anywhere else); the property model expected only a
/// #PF or the VMM-range stop there and was widened. The MMU was right.
#[test]
fn a_guest_table_beyond_ram_under_the_vmm_slot_stops_for_the_gpa() {
    let mut m = mmu(Policy::Cached, 64, CR3);
    let vmm = gva(VMM_RANGE_START + 0x18);
    poke(
        &mut m,
        CR3 + 8 * VMM_PML4_SLOT as u64,
        (RAM + 0x1000) | P | RW | US,
    );
    m.load_cr3(CR3).unwrap();
    assert_eq!(
        m.handle_page_fault(View::Kernel, vmm, hw(false, false)),
        FaultOutcome::Stop(StopReason::GpaOutsideRam {
            gpa: GuestPhysAddr::new(RAM + 0x1000),
            gva: Some(vmm)
        })
    );
    m.audit().unwrap();
}

#[test]
fn vmm_range_and_gpa_outside_ram_stop_the_guest() {
    let mut m = mmu(Policy::Flush, 64, CR3);
    let vmm = gva(VMM_RANGE_START + 0x1000);
    // Not mapped by the guest (as the contract says): its own #PF, as on hardware.
    let not_present = crate::PageFault {
        error_code: E::empty(),
        cr2: vmm,
    };
    assert_eq!(
        m.handle_page_fault(View::Kernel, vmm, hw(false, true)),
        FaultOutcome::Reflect(not_present)
    );
    assert_eq!(
        m.translate(vmm, Access::new(AccessKind::Read, Privilege::Supervisor)),
        Err(TranslateError::PageFault(not_present))
    );
    // A guest mapping of the VMM slot is reported on CR3 load and never honoured: touching it
    // through that mapping stops the guest.
    const TVMM: [u64; 4] = [CR3, 0x60000, 0x61000, 0x62000];
    map_4k(&mut m, TVMM, vmm.as_u64(), 0x20_0000, P | RW, P | RW);
    m.load_cr3(CR3).unwrap();
    assert_eq!(m.stats().guest_vmm_slot_mappings, 1);
    assert_eq!(
        m.handle_page_fault(View::Kernel, vmm, hw(false, true)),
        FaultOutcome::Stop(StopReason::VmmRange { gva: vmm })
    );
    assert!(matches!(
        m.translate(vmm, Access::new(AccessKind::Read, Privilege::Supervisor)),
        Err(TranslateError::Stop(StopReason::VmmRange { .. }))
    ));
    // A leaf beyond RAM.
    map_4k(&mut m, T, KVA, RAM + 0x1000, P | RW, P | RW);
    assert_eq!(
        m.handle_page_fault(View::Kernel, gva(KVA + 8), hw(false, false)),
        FaultOutcome::Stop(StopReason::GpaOutsideRam {
            gpa: GuestPhysAddr::new(RAM + 0x1008),
            gva: Some(gva(KVA + 8))
        })
    );
    // A paging structure beyond RAM.
    poke(&mut m, T[0] + 5 * 8, (RAM + 0x10_0000) | P | RW | US);
    let far = gva(5 << 39);
    assert!(matches!(
        m.handle_page_fault(View::Kernel, far, hw(false, false)),
        FaultOutcome::Stop(StopReason::GpaOutsideRam { .. })
    ));
    // Guest-physical helpers report outside RAM as a typed error.
    let mut b = [0u8; 16];
    assert!(m
        .read_guest_phys(GuestPhysAddr::new(RAM - 8), &mut b)
        .is_err());
    assert!(m.host_frame(GuestPhysAddr::new(RAM)).is_err());
    assert!(m.host_frame(GuestPhysAddr::new(RAM - 1)).is_ok());
    m.audit().unwrap();
}

#[test]
fn guest_large_pages_are_split_and_invlpg_drops_the_whole_page() {
    let mut m = mmu(Policy::Flush, 64, CR3);
    let base = 0x0000_0000_4000_0000u64; // PML4 0, PDPT 1, PD 0
    poke(&mut m, T[0], T[1] | P | RW | US);
    poke(&mut m, T[1] + 8, T[2] | P | RW | US);
    poke(&mut m, T[2], 0x40_0000 | P | RW | US | PS | D);
    // A 4 KiB neighbour in the next 2 MiB, through a PT.
    poke(&mut m, T[2] + 8, T[3] | P | RW | US);
    poke(&mut m, T[3], 0x30_0000 | P | RW | US | D);
    for off in [0u64, 0x1000, 0x1f_f000] {
        assert_eq!(
            m.handle_page_fault(View::User, gva(base + off), hw(false, false)),
            FaultOutcome::Filled
        );
        let s = m.shadow_lookup(View::User, gva(base + off)).unwrap();
        assert_eq!(s.frame, frame_of(&m, 0x40_0000 + off));
        assert!(s.writable);
    }
    assert_eq!(
        m.handle_page_fault(View::User, gva(base + 0x20_0000), hw(false, false)),
        FaultOutcome::Filled
    );
    m.invlpg(gva(base + 0x1000));
    for off in [0u64, 0x1000, 0x1f_f000] {
        assert!(m.shadow_lookup(View::User, gva(base + off)).is_none());
    }
    assert!(
        m.shadow_lookup(View::User, gva(base + 0x20_0000)).is_some(),
        "neighbour kept"
    );
    // 1 GiB page.
    poke(&mut m, T[1] + 2 * 8, 0xC000_0000 | P | RW | US | PS);
    let big = 0x8000_0000u64; // PML4 0, PDPT index 2
    let r = m.handle_page_fault(View::User, gva(big + 0x1234), hw(false, false));
    // 0xC000_0000 is beyond the 16 MiB of RAM: a typed stop, not a panic.
    assert!(matches!(
        r,
        FaultOutcome::Stop(StopReason::GpaOutsideRam { .. })
    ));
    poke(&mut m, T[1] + 2 * 8, P | RW | US | PS);
    assert_eq!(
        m.handle_page_fault(View::User, gva(big + 0x5000), hw(false, false)),
        FaultOutcome::Filled
    );
    assert_eq!(
        m.shadow_lookup(View::User, gva(big + 0x5000))
            .unwrap()
            .frame,
        frame_of(&m, 0x5000)
    );
    m.invlpg(gva(big + 0x3f00_0000));
    assert!(m.shadow_lookup(View::User, gva(big + 0x5000)).is_none());
    m.audit().unwrap();
}

fn two_spaces(m: &mut Mmu, global: u64) {
    // Address space 1 at CR3, space 2 at 0x20000 sharing the kernel PDPT (T[1]).
    map_4k(m, T, KVA, 0x20_0000, P | RW, P | RW | D | global);
    map_4k(m, T, UVA, 0x21_0000, P | RW | US, P | RW | US | D);
    let cr3b = 0x20000;
    let kidx = (KVA >> 39) & 0x1ff;
    poke(m, cr3b + kidx * 8, T[1] | P | RW);
    map_4k(
        m,
        [cr3b, 0x21000, 0x22000, 0x23000],
        UVA,
        0x22_0000,
        P | RW | US,
        P | RW | US | D,
    );
}

#[test]
fn flush_policy_drops_shadows_on_cr3_load_but_keeps_globals_with_pge() {
    for pge in [false, true] {
        let mode = PagingMode {
            cr4_pge: pge,
            ..PagingMode::ENTRY
        };
        let mut m = mmu_with(Policy::Flush, 64, CR3, mode, usize::MAX);
        two_spaces(&mut m, G);
        for a in [KVA, UVA] {
            assert_eq!(
                m.handle_page_fault(View::Kernel, gva(a), hw(false, false)),
                FaultOutcome::Filled
            );
        }
        m.load_cr3(0x20000).unwrap();
        assert!(m.take_tlb_flush());
        assert!(m.shadow_lookup(View::Kernel, gva(UVA)).is_none());
        assert_eq!(m.shadow_lookup(View::Kernel, gva(KVA)).is_some(), pge);
        assert_eq!(m.stats().roots_live, 2);
        assert_eq!(
            m.handle_page_fault(View::Kernel, gva(UVA), hw(false, false)),
            FaultOutcome::Filled
        );
        assert_eq!(
            m.shadow_lookup(View::Kernel, gva(UVA)).unwrap().frame,
            frame_of(&m, 0x22_0000)
        );
        m.flush_all();
        assert!(m.shadow_lookup(View::Kernel, gva(KVA)).is_none());
        m.audit().unwrap();
    }
}

#[test]
fn cached_policy_keeps_shadows_per_cr3_and_zaps_exactly_on_pte_writes() {
    let mut m = mmu(Policy::Cached, 64, CR3);
    two_spaces(&mut m, 0);
    for a in [KVA, UVA] {
        assert_eq!(
            m.handle_page_fault(View::Kernel, gva(a), hw(false, false)),
            FaultOutcome::Filled
        );
    }
    m.load_cr3(0x20000).unwrap();
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(false, false)),
        FaultOutcome::Filled
    );
    m.load_cr3(CR3).unwrap();
    assert_eq!(m.stats().roots_live, 4);
    assert!(
        m.shadow_lookup(View::Kernel, gva(UVA)).is_some(),
        "kept across CR3 loads"
    );
    // The guest's tables are write-protected.
    for t in T {
        assert!(m.is_write_protected_gpa(GuestPhysAddr::new(t + 8)));
    }
    assert!(!m.is_write_protected_gpa(GuestPhysAddr::new(0x20_0000)));
    // Map the PT page itself at a guest address and write through it: emulate.
    let pt_alias = 0x0000_0000_0040_7000u64;
    map_4k(&mut m, T, pt_alias, T[3], P | RW | US, P | RW | US | D);
    assert_eq!(
        m.handle_page_fault(View::Kernel, gva(pt_alias), hw(true, false)),
        FaultOutcome::EmulatePageTableWrite {
            gpa: GuestPhysAddr::new(T[3])
        }
    );
    assert!(
        !m.shadow_lookup(View::Kernel, gva(pt_alias))
            .unwrap()
            .writable
    );
    // (Rewriting the upper entries above zapped the shared subtree: refill UVA.)
    for a in [KVA, UVA] {
        assert_eq!(
            m.handle_page_fault(View::Kernel, gva(a), hw(false, false)),
            FaultOutcome::Filled
        );
    }
    // Emulated write of the UVA PTE (make it read-only): exactly that leaf goes.
    let upte = T[3] + ((UVA >> 12) & 0x1ff) * 8;
    let zaps = m.stats().zaps;
    poke(&mut m, upte, 0x21_0000 | P | US | D);
    assert_eq!(m.stats().zaps, zaps + 1);
    assert!(m.shadow_lookup(View::Kernel, gva(UVA)).is_none());
    assert!(
        m.shadow_lookup(View::Kernel, gva(KVA)).is_some(),
        "other entries untouched"
    );
    assert!(m.take_tlb_flush());
    // A data page that becomes a page table loses its writable mappings.
    assert_eq!(
        m.handle_page_fault(View::Kernel, gva(KVA), hw(true, true)),
        FaultOutcome::Filled
    );
    assert!(m.shadow_lookup(View::Kernel, gva(KVA)).unwrap().writable);
    let new_pt_user = 0x0000_0000_8000_0000u64; // PML4 0, PDPT 2
    poke(&mut m, T[1] + 2 * 8, 0x20_0000 | P | RW | US); // frame 0x20_0000 is now a PD
    m.notify_guest_pte_write(GuestPhysAddr::new(T[1] + 16), 8);
    poke(&mut m, 0x20_0000, 0x60_0000 | P | RW | US | PS);
    assert_eq!(
        m.handle_page_fault(View::Kernel, gva(new_pt_user), hw(false, false)),
        FaultOutcome::Filled
    );
    assert!(m.is_write_protected_gpa(GuestPhysAddr::new(0x20_0000)));
    assert!(!m.shadow_lookup(View::Kernel, gva(KVA)).unwrap().writable);
    m.audit().unwrap();
}

#[test]
fn an_address_space_is_named_by_its_pml4_address_alone() {
    // CR3 bits 11:0 (PWT, PCD) and those from MAXPHYADDR up are not part of the address
    // (SDM Vol. 3 §4.5, Table 4-12).
    assert_eq!(crate::pte::cr3_pml4(CR3 | 0x18 | 0xFE7, 40), CR3);
    assert_eq!(crate::pte::cr3_pml4(CR3 | 1 << 40 | 1 << 51, 40), CR3);
    assert_eq!(crate::pte::cr3_pml4(CR3 | 1 << 40, 52), CR3 | 1 << 40);
    let mut m = mmu(Policy::Cached, 64, CR3);
    map_4k(&mut m, T, UVA, 0x20_0000, P | RW | US, P | RW | US | D);
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(false, false)),
        FaultOutcome::Filled
    );
    let roots = [m.current_root(View::Kernel), m.current_root(View::User)];
    // The same PML4 with PWT and PCD set is the same address space, its shadows kept.
    m.load_cr3(CR3 | 0x18).unwrap();
    assert_eq!(
        [m.current_root(View::Kernel), m.current_root(View::User)],
        roots
    );
    assert!(m.shadow_lookup(View::User, gva(UVA)).is_some());
    m.audit().unwrap();
}

/// Address space `i` of the root-switch tests: its CR3, and the user page its four tables map
/// at `UVA + i * 2 MiB`. Built before anything runs: a store to the tables of an address space
/// that is not running drops its shadows (`write_protect.rs`).
fn space(i: u64) -> (u64, u64, [u64; 4]) {
    let cr3 = 0x100_000 + i * 0x10_000;
    (
        cr3,
        UVA + i * 0x20_0000,
        [cr3, cr3 + 0x1000, cr3 + 0x2000, cr3 + 0x3000],
    )
}

/// An MMU with `spaces` address spaces built (`space`).
fn mmu_with_spaces(quota: usize, spaces: u64) -> Mmu {
    let mut m = mmu(Policy::Cached, quota, CR3);
    for i in 0..spaces {
        let (_, va, tables) = space(i);
        map_4k(
            &mut m,
            tables,
            va,
            0x40_0000 + i * 0x1000,
            P | RW | US,
            P | RW | US,
        );
    }
    m
}

/// Switches to address space `i` and makes the shadow map its page (2 roots and 3 tables).
fn run_in(m: &mut Mmu, i: u64) {
    let (cr3, va, _) = space(i);
    m.load_cr3(cr3).unwrap();
    if m.shadow_lookup(View::User, gva(va)).is_none() {
        assert_eq!(
            m.handle_page_fault(View::User, gva(va), hw(false, false)),
            FaultOutcome::Filled
        );
    }
}

/// Whether the shadow of address space `i` still maps its page, once switched to.
fn still_mapped(m: &mut Mmu, i: u64) -> bool {
    let (cr3, va, _) = space(i);
    m.load_cr3(cr3).unwrap();
    m.shadow_lookup(View::User, gva(va)).is_some()
}

#[test]
fn switching_back_to_an_address_space_finds_its_shadows_and_makes_it_most_recently_used() {
    // Room for three address spaces of 5 shadow pages each.
    let mut m = mmu_with_spaces(16, 5);
    for i in 0..3 {
        run_in(&mut m, i);
    }
    assert!(still_mapped(&mut m, 0), "kept while there is room");
    // Two new address spaces: the least recently used ones go first (1, then 2), so 0, used
    // after them, survives both.
    run_in(&mut m, 3);
    run_in(&mut m, 4);
    assert!(m.stats().reclaims >= 2);
    assert!(
        still_mapped(&mut m, 0),
        "the most recently used address space was reclaimed"
    );
    m.audit().unwrap();
}

#[test]
fn a_root_switch_never_frees_the_roots_that_were_current() {
    // The quota is full with address space 0 when the guest switches to 1: 1's roots must come
    // from 0's subtrees, never from 0's roots, which are still in the real CR3 until the host
    // reloads it (SDM Vol. 3 §4.10.4).
    let mut m = mmu_with_spaces(MIN_SHADOW_QUOTA, 2);
    let (cr3_a, va, tables) = space(0);
    for i in 1..4 {
        let pt = 0x180_000 + i * 0x1000;
        let (at, tables) = (va + i * 0x20_0000, [tables[0], tables[1], tables[2], pt]);
        map_4k(
            &mut m,
            tables,
            at,
            0x50_0000 + i * 0x1000,
            P | RW | US,
            P | RW | US,
        );
    }
    m.load_cr3(cr3_a).unwrap();
    for i in 0..4 {
        let at = gva(va + i * 0x20_0000);
        assert_eq!(
            m.handle_page_fault(View::User, at, hw(false, false)),
            FaultOutcome::Filled
        );
    }
    assert_eq!(m.stats().shadow_pages, MIN_SHADOW_QUOTA);
    let roots_a = [m.current_root(View::Kernel), m.current_root(View::User)];
    m.load_cr3(space(1).0).unwrap();
    let roots_b = [m.current_root(View::Kernel), m.current_root(View::User)];
    assert!(
        roots_b.iter().all(|r| !roots_a.contains(r)),
        "1's roots {roots_b:?} reuse 0's {roots_a:?}"
    );
    m.load_cr3(cr3_a).unwrap();
    assert_eq!(
        [m.current_root(View::Kernel), m.current_root(View::User)],
        roots_a,
        "0's roots were freed"
    );
    m.audit().unwrap();
}

#[test]
fn a_root_switch_makes_remembered_shadow_lookups_stale() {
    let mut m = mmu_with_spaces(64, 2);
    run_in(&mut m, 0);
    run_in(&mut m, 1);
    assert!(still_mapped(&mut m, 0));
    // Address space 1 exists and does not map 0's page: what the lookup remembered from 0 is
    // stale.
    m.load_cr3(space(1).0).unwrap();
    assert_eq!(m.shadow_lookup(View::User, gva(space(0).1)), None);
    m.audit().unwrap();
}

#[test]
fn quota_is_respected_by_reclaiming_least_recently_used_roots() {
    let mut m = mmu(Policy::Cached, MIN_SHADOW_QUOTA, CR3);
    for i in 0..12u64 {
        let cr3 = 0x100_000 + i * 0x10_000;
        let tables = [cr3, cr3 + 0x1000, cr3 + 0x2000, cr3 + 0x3000];
        map_4k(
            &mut m,
            tables,
            UVA + i * 0x20_0000,
            0x40_0000 + i * 0x1000,
            P | RW | US,
            P | RW | US,
        );
        m.load_cr3(cr3).unwrap();
        for view in [View::Kernel, View::User] {
            assert_eq!(
                m.handle_page_fault(view, gva(UVA + i * 0x20_0000), hw(false, false)),
                FaultOutcome::Filled
            );
        }
        assert!(m.stats().shadow_pages <= MIN_SHADOW_QUOTA);
        m.audit().unwrap();
    }
    assert!(m.stats().reclaims > 0);
}

#[test]
fn host_memory_exhaustion_is_a_stop_not_a_panic() {
    let mut m = mmu_with(Policy::Flush, 64, CR3, PagingMode::ENTRY, 8);
    map_4k(&mut m, T, KVA, 0x20_0000, P | RW, P | RW);
    // 2 roots + 4 tables + nothing left for 3 shadow tables and the data frame.
    let r = m.handle_page_fault(View::Kernel, gva(KVA), hw(false, false));
    assert_eq!(r, FaultOutcome::Stop(StopReason::HostMemoryExhausted));
    m.audit().unwrap();
}

#[test]
fn translate_sets_accessed_and_dirty_and_policy_switch_rebuilds() {
    let mut m = mmu(Policy::Flush, 64, CR3);
    map_4k(&mut m, T, UVA, 0x20_0000, P | RW | US, P | RW | US);
    let t = m
        .translate(
            gva(UVA + 5),
            Access::new(AccessKind::Write, Privilege::User),
        )
        .unwrap();
    assert_eq!(t.gpa, GuestPhysAddr::new(0x20_0005));
    assert!(t.dirty);
    m.write_guest_phys(t.gpa, b"hi").unwrap();
    let mut b = [0u8; 2];
    m.read_guest_phys(t.gpa, &mut b).unwrap();
    assert_eq!(&b, b"hi");
    m.set_policy(Policy::Cached).unwrap();
    assert_eq!(m.policy(), Policy::Cached);
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(true, false)),
        FaultOutcome::Filled
    );
    assert!(m.is_write_protected_gpa(GuestPhysAddr::new(CR3)));
    m.set_policy(Policy::Flush).unwrap();
    assert!(!m.is_write_protected_gpa(GuestPhysAddr::new(CR3)));
    m.audit().unwrap();
    let (_, alloc) = m.into_parts();
    assert!(alloc.live.is_empty(), "every frame given back");
}

#[test]
fn linear_accesses_cross_pages_and_fault_before_writing() {
    let mut m = mmu(Policy::Cached, 64, CR3);
    let va = 0x0000_0000_0040_0000u64;
    map_4k(&mut m, T, va, 0x20_0000, P | RW | US, P | RW | US);
    map_4k(&mut m, T, va + 0x1000, 0x30_0000, P | RW | US, P | US);
    let user = Privilege::User;
    // Read across the boundary.
    poke(&mut m, 0x20_0ff8, 0x4433_2211 << 32);
    poke(&mut m, 0x30_0000, 0x99);
    let mut b = [0u8; 8];
    m.read_linear(gva(va + 0xffc), &mut b, AccessKind::Read, user)
        .unwrap();
    assert_eq!(b, [0x11, 0x22, 0x33, 0x44, 0x99, 0, 0, 0]);
    // A write whose second page is read-only faults there, and writes nothing.
    let r = m.write_linear(gva(va + 0xffe), &[1, 2, 3, 4], user);
    assert_eq!(
        r,
        Err(TranslateError::PageFault(crate::PageFault {
            error_code: E::PRESENT | E::WRITE | E::USER,
            cr2: gva(va + 0x1000)
        }))
    );
    assert_eq!(peek(&m, 0x20_0ff8) >> 48, 0x4433, "first page untouched");
    // A write inside the first page works and sets D.
    m.write_linear(gva(va + 0x10), &[7; 4], user).unwrap();
    assert_eq!(peek(&m, 0x20_0010), 0x0707_0707);
    assert_ne!(peek(&m, T[3] + ((va >> 12) & 0x1ff) * 8) & D, 0);
    // Writing the guest's own PTE through a mapping of its PT zaps the shadow.
    map_4k(&mut m, T, va + 0x2000, T[3], P | RW | US, P | RW | US);
    assert_eq!(
        m.handle_page_fault(View::User, gva(va), hw(false, false)),
        FaultOutcome::Filled
    );
    let pte_off = ((va >> 12) & 0x1ff) * 8;
    m.write_linear(gva(va + 0x2000 + pte_off), &0u64.to_le_bytes(), user)
        .unwrap();
    assert!(m.shadow_lookup(View::User, gva(va)).is_none());
    // Running off the canonical range.
    let top = 0x0000_7fff_ffff_fffc;
    assert_eq!(
        m.read_linear(gva(top), &mut b, AccessKind::Fetch, user),
        Err(TranslateError::PageFault(crate::PageFault {
            error_code: E::USER | E::INSTRUCTION_FETCH,
            cr2: gva(top)
        }))
    );
    let sup = Privilege::Supervisor;
    map_4k(&mut m, T, top & !0xfff, 0x40_0000, P | RW, P | RW);
    assert_eq!(
        m.read_linear(gva(top), &mut b, AccessKind::Read, sup),
        Err(TranslateError::NonCanonical(0x0000_8000_0000_0000))
    );
    m.audit().unwrap();
}

#[test]
fn a_root_the_guest_never_ran_on_protects_nothing() {
    // The kernel creates the MMU before the loader knows the guest's CR3 (guest_cr3 = 0).
    let mut m = mmu(Policy::Cached, 64, 0);
    map_4k(&mut m, T, UVA, 0x20_0000, P | RW | US, P | RW | US | D);
    m.load_cr3(CR3).unwrap();
    assert!(!m.is_write_protected_gpa(GuestPhysAddr::new(0)));
    assert!(
        !m.is_write_protected_gpa(GuestPhysAddr::new(CR3)),
        "nothing filled yet"
    );
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(true, false)),
        FaultOutcome::Filled
    );
    assert!(m.is_write_protected_gpa(GuestPhysAddr::new(CR3)));
    assert!(!m.is_write_protected_gpa(GuestPhysAddr::new(0)));
    m.audit().unwrap();
}

#[test]
fn emulator_accesses_hit_filled_shadow_entries_without_a_walk() {
    for policy in [Policy::Flush, Policy::Cached] {
        let mut m = mmu(policy, 64, CR3);
        let va = 0x0000_0000_0040_0000u64;
        map_4k(&mut m, T, va, 0x20_0000, P | RW | US, P | RW | US);
        poke(&mut m, 0x20_0010, 0x1122_3344_5566_7788);
        let user = Privilege::User;
        let mut b = [0u8; 8];
        // No shadow entry yet: the walk serves it.
        m.read_linear(gva(va + 0x10), &mut b, AccessKind::Read, user)
            .unwrap();
        assert_eq!(m.stats().shadow_hits, 0);
        // A read fault fills a read-only leaf (D not set yet): reads hit, a write does not.
        assert_eq!(
            m.handle_page_fault(View::User, gva(va), hw(false, false)),
            FaultOutcome::Filled
        );
        m.read_linear(gva(va + 0x10), &mut b, AccessKind::Read, user)
            .unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
        assert_eq!(m.stats().shadow_hits, 1);
        m.write_linear(gva(va + 0x10), &[9; 2], user).unwrap();
        assert_eq!(
            m.stats().shadow_hits,
            1,
            "a read-only leaf sends the write to the walk"
        );
        assert_ne!(
            peek(&m, T[3] + ((va >> 12) & 0x1ff) * 8) & D,
            0,
            "the walk set D"
        );
        // After the write fault upgrades the leaf, writes hit too.
        assert_eq!(
            m.handle_page_fault(View::User, gva(va), hw(true, true)),
            FaultOutcome::Filled
        );
        m.write_linear(gva(va + 0x20), &[5; 4], user).unwrap();
        assert_eq!(m.stats().shadow_hits, 2);
        assert_eq!(peek(&m, 0x20_0020) & 0xffff_ffff, 0x0505_0505);
        // A supervisor access uses the kernel view, which has no entry yet: the walk.
        m.read_linear(
            gva(va + 0x10),
            &mut b,
            AccessKind::Read,
            Privilege::Supervisor,
        )
        .unwrap();
        assert_eq!(m.stats().shadow_hits, 2);
        m.audit().unwrap();
    }
}

#[test]
fn a_write_to_a_table_of_an_address_space_not_running_releases_it() {
    const T2: [u64; 4] = [0x50000, 0x51000, 0x52000, 0x53000];
    let mut m = mmu(Policy::Cached, 64, CR3);
    map_4k(&mut m, T, UVA, 0x20_0000, P | RW | US, P | RW | US);
    map_4k(&mut m, T2, UVA, 0x30_0000, P | RW | US, P | RW | US);
    // Both address spaces run once, so both shadow (and write-protect) their tables.
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(false, false)),
        FaultOutcome::Filled
    );
    m.load_cr3(T2[0]).unwrap();
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(false, false)),
        FaultOutcome::Filled
    );
    assert!(m.is_write_protected_gpa(GuestPhysAddr::new(T[3])));
    assert_eq!(m.stats().roots_live, 4);
    // Running on T2, a write to T's page table (a process exited; its frames are reused)
    // drops T's shadows instead of being emulated...
    assert!(m.release_inactive_shadows(GuestPhysAddr::new(T[3])));
    assert!(!m.is_write_protected_gpa(GuestPhysAddr::new(T[3])));
    assert_eq!(m.stats().roots_live, 2);
    assert_eq!(m.stats().released_address_spaces, 1);
    // ...while the running address space's own tables stay protected and are emulated.
    assert!(!m.release_inactive_shadows(GuestPhysAddr::new(T2[3])));
    assert!(m.is_write_protected_gpa(GuestPhysAddr::new(T2[3])));
    m.audit().unwrap();
    // Switching back rebuilds T's shadow from scratch.
    m.load_cr3(CR3).unwrap();
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(false, false)),
        FaultOutcome::Filled
    );
    m.audit().unwrap();
}

#[test]
fn a_flood_of_writes_to_one_table_unshadows_it_until_it_is_used_again() {
    let mut m = mmu(Policy::Cached, 64, CR3);
    // The guest maps the page table T[3] (which maps UVA) at KVA, through other tables.
    const TK: [u64; 4] = [T[0], 0x14000, 0x15000, 0x16000];
    map_4k(&mut m, TK, KVA, T[3], P | RW, P | RW | A | D);
    map_4k(&mut m, T, UVA, 0x20_0000, P | RW | US, P | RW | US);
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(false, false)),
        FaultOutcome::Filled
    );
    assert!(m.is_write_protected_gpa(GuestPhysAddr::new(T[3])));
    let write = |m: &mut Mmu| m.handle_page_fault(View::Kernel, gva(KVA), hw(true, false));
    for _ in 1..crate::shadow::WRITE_FLOOD_THRESHOLD {
        assert!(matches!(
            write(&mut m),
            FaultOutcome::EmulatePageTableWrite { .. }
        ));
    }
    // The next one in a row unshadows the table instead: the guest retries natively, on a
    // writable mapping of the (no longer protected) table, without a second #PF.
    assert_eq!(write(&mut m), FaultOutcome::Filled);
    assert!(!m.is_write_protected_gpa(GuestPhysAddr::new(T[3])));
    assert_eq!(m.stats().unshadowed_tables, 1);
    assert!(
        m.shadow_lookup(View::User, gva(UVA)).is_none(),
        "its shadow is gone"
    );
    assert!(m.shadow_lookup(View::Kernel, gva(KVA)).unwrap().writable);
    m.audit().unwrap();
    // Using the table again shadows and protects it again.
    assert_eq!(
        m.handle_page_fault(View::User, gva(UVA), hw(false, false)),
        FaultOutcome::Filled
    );
    assert!(m.is_write_protected_gpa(GuestPhysAddr::new(T[3])));
    assert!(!m.shadow_lookup(View::Kernel, gva(KVA)).unwrap().writable);
    m.audit().unwrap();
}

#[test]
fn a_flood_of_writes_to_a_table_the_writes_own_walk_uses_keeps_emulating() {
    // Found by the property test (seed 325ec0b3 in proptest-regressions/tests/props.txt): the
    // guest kernel maps its own page directory T[2] at UVA, through T[2] itself (a self-map),
    // and stores to it. Unshadowing T[2] cannot let such a store run natively: the fill that
    // maps UVA mirrors, and so write-protects, every table of UVA's walk again. Returning
    // `Filled` there (as the flood heuristic did on every fourth store) resumed the guest on a
    // shadow that still denied the write: the store faulted again, after the shadows of T[2]
    // had been torn down and rebuilt for nothing.
    let mut m = mmu(Policy::Cached, 64, CR3);
    map_4k(&mut m, T, UVA, T[2], P | RW, P | RW | A | D);
    // An entry of T[2] that UVA's walk does not use (UVA uses PD entry 2).
    let target = UVA + 100 * 8;
    for i in 0..3 * crate::shadow::WRITE_FLOOD_THRESHOLD {
        let outcome = m.handle_page_fault(View::Kernel, gva(target), hw(true, i > 0));
        assert_eq!(
            outcome,
            FaultOutcome::EmulatePageTableWrite {
                gpa: GuestPhysAddr::new(T[2] + 100 * 8)
            },
            "store {i}"
        );
        assert!(
            !m.shadow_lookup(View::Kernel, gva(target)).unwrap().writable,
            "a protected table is never writable in the shadow"
        );
        // vmm-core emulates the store, through the MMU (which zaps what depends on it).
        poke(&mut m, T[2] + 100 * 8, 0);
        m.audit().unwrap();
    }
    assert!(m.is_write_protected_gpa(GuestPhysAddr::new(T[2])));
    assert_eq!(m.stats().unshadowed_tables, 0);
    assert_eq!(
        m.stats().page_table_writes,
        3 * crate::shadow::WRITE_FLOOD_THRESHOLD as u64
    );
}

#[test]
fn with_emulator_fill_a_read_that_missed_fills_the_shadow_of_its_view() {
    for policy in [Policy::Flush, Policy::Cached] {
        for fill in [false, true] {
            let mut m = mmu(policy, 64, CR3);
            m.set_emulator_fill(fill);
            let va = 0x0000_0000_0040_0000u64;
            map_4k(&mut m, T, va, 0x20_0000, P | RW | US, P | RW | US);
            poke(&mut m, 0x20_0010, 0x1122_3344_5566_7788);
            let mut b = [0u8; 8];
            let sup = Privilege::Supervisor;
            m.read_linear(gva(va + 0x10), &mut b, AccessKind::Read, sup)
                .unwrap();
            assert_eq!(m.stats().shadow_hits, 0, "the first read walks");
            // Filled or not, exactly as the switch says; only the kernel view (supervisor).
            let kernel = m.shadow_lookup(View::Kernel, gva(va));
            assert_eq!(kernel.is_some(), fill, "fill={fill}");
            assert!(m.shadow_lookup(View::User, gva(va)).is_none());
            if let Some(k) = kernel {
                assert!(
                    !k.writable,
                    "a read fill leaves the leaf read-only (D not set)"
                );
            }
            m.read_linear(gva(va + 0x10), &mut b, AccessKind::Read, sup)
                .unwrap();
            assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
            assert_eq!(
                m.stats().shadow_hits,
                u64::from(fill),
                "the second read hits"
            );
            assert_eq!(m.stats().emulator_fills, u64::from(fill));
            assert_eq!(m.stats().fills, 0, "not counted as a #PF fill");
            // Writes never fill.
            m.write_linear(gva(va + 0x20), &[1; 4], sup).unwrap();
            assert_eq!(m.stats().emulator_fills, u64::from(fill));
            m.audit().unwrap();
        }
    }
}

#[test]
fn emulator_fill_respects_the_guests_rights_and_the_vmm_slot() {
    let mut m = mmu(Policy::Cached, 64, CR3);
    m.set_emulator_fill(true);
    let va = 0x0000_0000_0040_0000u64;
    // A supervisor-only page: a user read faults (no fill), a supervisor read fills the kernel
    // view only.
    map_4k(&mut m, T, va, 0x20_0000, P | RW | US, P | RW);
    let mut b = [0u8; 4];
    assert!(m
        .read_linear(gva(va), &mut b, AccessKind::Read, Privilege::User)
        .is_err());
    assert_eq!(m.stats().emulator_fills, 0);
    m.read_linear(gva(va), &mut b, AccessKind::Read, Privilege::Supervisor)
        .unwrap();
    assert_eq!(m.stats().emulator_fills, 1);
    assert!(m.shadow_lookup(View::User, gva(va)).is_none());
    m.audit().unwrap();
}

/// Unsynced leaf tables, step by step: the first store to a shadowed leaf table unsyncs it
/// (filled writable, not emulated); later stores run natively; a not-present → present store
/// is seen at the next access; a changed present entry is seen after the guest's CR3 load
/// (resync), not before — as with a TLB. With unsync off the store is emulated.
#[test]
fn a_leaf_table_is_unsynced_by_a_store_and_resynced_by_a_cr3_load() {
    for unsync in [false, true] {
        let mut m = mmu(Policy::Cached, 64, CR3);
        m.set_unsync(unsync);
        let (a, b, c) = (0x40_0000u64, 0x40_1000u64, 0x40_2000u64);
        // A maps frame F1; B maps the leaf table T[3] itself (the guest's window on it); C is
        // not present yet.
        map_4k(&mut m, T, a, 0x20_0000, P | RW | US, P | RW | US);
        map_4k(&mut m, T, b, T[3], P | RW | US, P | RW | US);
        let access = |m: &mut Mmu, va: u64, write: bool| {
            let present = m.shadow_lookup(View::Kernel, gva(va)).is_some();
            m.handle_page_fault(View::Kernel, gva(va), hw(write, present))
        };
        assert_eq!(access(&mut m, a, false), FaultOutcome::Filled);
        // The first store to the table through B.
        let outcome = access(&mut m, b, true);
        if !unsync {
            assert!(matches!(
                outcome,
                FaultOutcome::EmulatePageTableWrite { .. }
            ));
            assert!(m.is_write_protected_gpa(GuestPhysAddr::new(T[3])));
            m.audit().unwrap();
            continue;
        }
        assert_eq!(outcome, FaultOutcome::Filled);
        assert!(m.is_unsync(T[3] / 4096));
        assert_eq!(m.stats().unsyncs, 1);
        assert!(m.shadow_lookup(View::Kernel, gva(b)).unwrap().writable);
        m.audit().unwrap();
        // Native stores: C becomes present, A moves to F2.
        let pte = |va: u64| T[3] + ((va >> 12) & 0x1FF) * 8;
        let store = |m: &mut Mmu, at: u64, v: u64| {
            m.write_guest_phys_natively(GuestPhysAddr::new(at), &v.to_le_bytes())
                .unwrap()
        };
        store(&mut m, pte(c), 0x30_0000 | P | RW | US);
        store(&mut m, pte(a), 0x31_0000 | P | RW | US);
        assert_eq!(access(&mut m, c, false), FaultOutcome::Filled);
        assert_eq!(
            m.shadow_lookup(View::Kernel, gva(c)).unwrap().frame,
            frame_of(&m, 0x30_0000)
        );
        // A still translates to F1, as a TLB may, until the guest's CR3 load.
        assert_eq!(
            m.shadow_lookup(View::Kernel, gva(a)).unwrap().frame,
            frame_of(&m, 0x20_0000)
        );
        m.load_cr3(CR3).unwrap();
        assert_eq!(m.stats().resyncs, 1);
        assert!(!m.is_unsync(T[3] / 4096));
        assert!(m.shadow_lookup(View::Kernel, gva(a)).is_none());
        assert_eq!(access(&mut m, a, false), FaultOutcome::Filled);
        assert_eq!(
            m.shadow_lookup(View::Kernel, gva(a)).unwrap().frame,
            frame_of(&m, 0x31_0000)
        );
        // Write-protected again: the next store is emulated (or unsyncs the table again).
        assert!(!m
            .shadow_lookup(View::Kernel, gva(b))
            .is_some_and(|s| s.writable));
        m.audit().unwrap();
    }
}

#[test]
fn prefetch_shadows_only_accessed_neighbours_and_sets_no_guest_bit() {
    for on in [false, true] {
        let mut m = mmu(Policy::Cached, 64, CR3);
        m.set_prefetch(on);
        let base = 0x40_0000u64;
        // Four neighbours in one guest page table: accessed, accessed and dirty, never
        // accessed, accessed but supervisor-only (not for the user view).
        map_4k(&mut m, T, base, 0x20_0000, P | RW | US, P | RW | US | A);
        map_4k(
            &mut m,
            T,
            base + 0x1000,
            0x20_1000,
            P | RW | US,
            P | RW | US | A | D,
        );
        map_4k(
            &mut m,
            T,
            base + 0x2000,
            0x20_2000,
            P | RW | US,
            P | RW | US,
        );
        map_4k(&mut m, T, base + 0x3000, 0x20_3000, P | RW | US, P | RW | A);
        for f in [0x20_0000u64, 0x20_1000, 0x20_2000, 0x20_3000] {
            poke(&mut m, f, 1); // back the frames (a prefetch allocates none)
        }
        let pte = |va: u64| T[3] + ((va >> 12) & 0x1FF) * 8;
        // The fault on the first page, in the user view.
        assert_eq!(
            m.handle_page_fault(View::User, gva(base), hw(false, false)),
            FaultOutcome::Filled
        );
        let user = |m: &Mmu, va: u64| m.shadow_lookup(View::User, gva(va));
        assert_eq!(user(&m, base + 0x1000).is_some(), on, "accessed and dirty");
        if on {
            assert!(user(&m, base + 0x1000).unwrap().writable, "D set: writable");
        }
        assert!(user(&m, base + 0x2000).is_none(), "never accessed");
        assert_eq!(peek(&m, pte(base + 0x2000)) & A, 0, "its A bit untouched");
        assert!(
            user(&m, base + 0x3000).is_none(),
            "supervisor page in the user view"
        );
        assert_eq!(m.stats().prefetched, u64::from(on));
        m.audit().unwrap();
    }
}

/// An access through the kernel view, faulting as the real CPU reports it.
fn kernel_access(m: &mut Mmu, va: u64, write: bool) -> FaultOutcome {
    let present = m.shadow_lookup(View::Kernel, gva(va)).is_some();
    m.handle_page_fault(View::Kernel, gva(va), hw(write, present))
}

/// Maps `window` onto the guest's page directory T[2] (through page table 0x14000) and stores
/// to the directory through it: the first store unsyncs it (a directory, not a root).
fn unsync_directory_through(m: &mut Mmu, window: u64) {
    let tables = [T[0], T[1], T[2], 0x14000];
    map_4k(m, tables, window, T[2], P | RW | US, P | RW | US);
    assert_eq!(kernel_access(m, window, false), FaultOutcome::Filled);
    assert_eq!(kernel_access(m, window, true), FaultOutcome::Filled);
    assert!(
        m.is_unsync(T[2] / 4096),
        "a directory, not a root: unsynced"
    );
}

/// Unsynced directories: a store to a shadowed page directory unsyncs it too. A directory
/// entry the guest then clears natively (a process's teardown) keeps the old subtree until the
/// guest's CR3 load, as the paging-structure caches may; one it points at another page table,
/// followed by INVLPG of an address, is replaced on that address's next fill.
#[test]
fn a_directory_is_unsynced_and_its_entries_catch_up_at_invlpg_and_cr3_loads() {
    let mut m = mmu(Policy::Cached, 64, CR3);
    m.set_unsync(true);
    let (a, window) = (0x40_0000u64, 0x60_0000u64);
    map_4k(&mut m, T, a, 0x20_0000, P | RW | US, P | RW | US);
    let access = kernel_access;
    assert_eq!(access(&mut m, a, false), FaultOutcome::Filled);
    unsync_directory_through(&mut m, window);
    m.audit().unwrap();
    let pde = T[2] + ((a >> 21) & 0x1FF) * 8;
    let store = |m: &mut Mmu, at: u64, v: u64| {
        m.write_guest_phys_natively(GuestPhysAddr::new(at), &v.to_le_bytes())
            .unwrap()
    };
    // The directory entry now points at another page table mapping A elsewhere; INVLPG(A).
    let new_pte = 0x15000 + ((a >> 12) & 0x1FF) * 8;
    poke(&mut m, new_pte, 0x21_0000 | P | RW | US);
    store(&mut m, pde, 0x15000 | P | RW | US);
    m.invlpg(gva(a));
    assert_eq!(access(&mut m, a, false), FaultOutcome::Filled);
    assert_eq!(
        m.shadow_lookup(View::Kernel, gva(a)).unwrap().frame,
        frame_of(&m, 0x21_0000),
        "the fill walked the new page table"
    );
    m.audit().unwrap();
    // Teardown: the entry cleared natively; the old translation may stay until the CR3 load.
    store(&mut m, pde, 0);
    assert!(
        m.shadow_lookup(View::Kernel, gva(a)).is_some(),
        "stale until the CR3 load"
    );
    m.load_cr3(CR3).unwrap();
    assert!(!m.is_unsync(T[2] / 4096));
    assert!(
        m.shadow_lookup(View::Kernel, gva(a)).is_none(),
        "resynced at the CR3 load"
    );
    assert!(matches!(access(&mut m, a, false), FaultOutcome::Reflect(_)));
    m.audit().unwrap();
}

/// Found by the fuzz target `shadow_mmu` (fuzz/corpus/shadow_mmu/crash-stale-unsynced-pde):
/// the guest repoints an entry of an unsynced directory natively and invalidates the addresses
/// it maps, as the SDM asks (§4.10.4.2). INVLPG drops the paging-structure-cache entries for
/// the address too (§4.10.4.1), so the shadow directory entry must go with the leaf. It used to
/// stay: still linked to the shadow of the old page table, which a fill through another
/// directory entry then gave a leaf, so the address translated through the table the guest
/// had replaced, to the frame the old one maps.
#[test]
fn invlpg_drops_the_stale_entry_of_an_unsynced_directory() {
    for sharing in [false, true] {
        let mut m = mmu(Policy::Cached, 64, CR3);
        m.set_unsync(true);
        m.set_sharing(sharing);
        // Directory entries 2 (a) and 3 (b) both point at page table T[3]: a + 0x1000 and
        // b + 0x1000 both map frame 0x21_0000 through its entry 1.
        let (a, b, window) = (0x40_0000u64, 0x60_0000u64, 0x80_0000u64);
        map_4k(&mut m, T, a, 0x20_0000, P | RW | US, P | RW | US);
        map_4k(&mut m, T, b + 0x1000, 0x21_0000, P | RW | US, P | RW | US);
        let access = kernel_access;
        assert_eq!(access(&mut m, a, false), FaultOutcome::Filled);
        unsync_directory_through(&mut m, window);
        // Natively: directory entry 2 now points at page table 0x15000, which maps a + 0x1000
        // to 0x22_0000; then INVLPG of both addresses the entry maps here.
        poke(&mut m, 0x15000 + 8, 0x22_0000 | P | RW | US);
        let pde = T[2] + ((a >> 21) & 0x1FF) * 8;
        m.write_guest_phys_natively(
            GuestPhysAddr::new(pde),
            &(0x15000 | P | RW | US).to_le_bytes(),
        )
        .unwrap();
        m.invlpg(gva(a));
        m.invlpg(gva(a + 0x1000));
        // A fill through directory entry 3 gives the shadow of T[3] a leaf for entry 1.
        assert_eq!(access(&mut m, b + 0x1000, false), FaultOutcome::Filled);
        if let Some(s) = m.shadow_lookup(View::Kernel, gva(a + 0x1000)) {
            assert_eq!(
                Some(s.frame),
                m.p2m().lookup(0x22_0000 / 4096),
                "a + 0x1000 through the replaced page table (sharing {sharing})"
            );
        }
        assert_eq!(access(&mut m, a + 0x1000, false), FaultOutcome::Filled);
        assert_eq!(
            m.shadow_lookup(View::Kernel, gva(a + 0x1000))
                .unwrap()
                .frame,
            frame_of(&m, 0x22_0000)
        );
        m.audit().unwrap();
    }
}

/// `read_through_shadow` reads only what the shadow maps for the access, inside one page, and
/// walks nothing (no guest bit set, nothing filled).
#[test]
fn read_through_shadow_reads_only_what_the_shadow_maps() {
    let mut m = mmu(Policy::Cached, 64, CR3);
    let va = 0x40_0000u64;
    map_4k(&mut m, T, va, 0x20_0000, P | RW | US, P | RW | US | A);
    poke(&mut m, 0x20_0010, 0x0807_0605_0403_0201);
    let sup = Privilege::Supervisor;
    let mut b = [0u8; 3];
    assert!(
        !m.read_through_shadow(gva(va + 0x10), &mut b, AccessKind::Fetch, sup),
        "not filled"
    );
    assert_eq!(m.stats().fills, 0);
    assert_eq!(
        m.handle_page_fault(View::Kernel, gva(va), hw(false, false)),
        FaultOutcome::Filled
    );
    assert!(m.read_through_shadow(gva(va + 0x10), &mut b, AccessKind::Fetch, sup));
    assert_eq!(b, [1, 2, 3]);
    assert!(
        !m.read_through_shadow(gva(va + 0xFFE), &mut b, AccessKind::Read, sup),
        "across a page"
    );
    assert!(
        !m.read_through_shadow(gva(va + 0x10), &mut b, AccessKind::Write, sup),
        "read-only until D"
    );
}
