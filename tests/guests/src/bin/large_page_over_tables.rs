//! A PDE with PS = 1 whose writable 2 MiB page covers the guest's own page tables, the page
//! directory holding that very PDE included (the shape of XSA-148, where a PV guest's superpage
//! mapping gave it write access to its own page tables). The guest keeps its tables, data pages
//! and this alias in the 2 MiB of guest-physical memory at `REGION` and then, through the alias:
//!
//! 1. `pte`: rewrites 8 PTEs (swapping the pages they map), INVLPG, and reads through each;
//! 2. `pde`: points the PDE of the 4 KiB mappings at a second page table, INVLPG, and reads;
//! 3. `own-pde-ro`: clears R/W in the alias's own PDE by a store through the alias itself; after
//!    INVLPG a store through the alias is #PF(0x3) with CR2 = the address (CR0.WP = 1, so
//!    supervisor writes honour R/W: SDM Vol. 3 §4.6); setting R/W again through the identity
//!    map, INVLPG, the store works.
//!
//! On the CPU a large page is just memory (SDM Vol. 3 §4.5): each store changes the tables and
//! the next walk sees it. A shadowing VMM has to notice guest page-table writes that arrive
//! through a large-page alias (it tracks guest tables at 4 KiB granularity), or a guest keeps a
//! stale or unchecked shadow. Expected outcome, natively and under the VMM: three phases `-> ok`,
//! exit success.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use test_guests::machine::{self, Frame, PTE_P, PTE_PS, PTE_W};
use test_guests::{exit, println, probe, ring3};

/// 2 MiB of guest-physical memory no part of the image uses (the image ends below 4 MiB),
/// identity-mapped by `PageTables::identity`'s 2 MiB pages.
const REGION: u64 = 0xC0_0000;
/// The tables and pages in it (offsets from `REGION`).
const PDPT: u64 = REGION;
const PD: u64 = REGION + 0x1000;
const PT: u64 = REGION + 0x2000;
const PT2: u64 = REGION + 0x3000;
/// Eight data pages.
const DATA: u64 = REGION + 0x10_000;
/// Linear addresses: PML4 slot 1; PD[0] -> 4 KiB pages at `VA`, PD[1] -> the 2 MiB alias.
const VA: u64 = 1 << 39;
const ALIAS: u64 = VA + (2 << 20);
/// A tag in the first quadword of each data page: `TAG | index`.
const TAG: u64 = 0x1A26_E000_0000_0000;
/// What phase 3 stores through the alias into the first data page.
const STORED: u64 = TAG | 0xFF;
/// CR0.WP: supervisor writes honour R/W.
const CR0_WP: u64 = 1 << 16;
/// Accessed and dirty: the CPU sets them as it walks and writes.
const PTE_AD: u64 = 0x60;

/// CR2 at the last trap.
static CR2: AtomicU64 = AtomicU64::new(0);

fn handler(frame: &mut Frame) {
    if !probe::record(frame) {
        machine::unexpected(frame)
    }
    CR2.store(machine::read_cr2(), Ordering::SeqCst);
    probe::skip(frame);
}

fn rd(a: u64) -> u64 {
    // SAFETY: every address read is mapped: the identity map, `VA`'s pages or the alias.
    unsafe { core::ptr::read_volatile(a as *const u64) }
}

fn wr(a: u64, v: u64) {
    // SAFETY: every address written is this guest's own table or data page in `REGION`.
    unsafe { core::ptr::write_volatile(a as *mut u64, v) }
}

fn invlpg(a: u64) {
    // SAFETY: drops one translation; no memory effects.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) a, options(nostack)) };
}

/// The alias of guest-physical `pa` (in `REGION`).
const fn alias(pa: u64) -> u64 {
    ALIAS + (pa - REGION)
}

/// Reads the 8 pages at `VA` and checks page `i` holds tag `expected(i)`; prints the phase.
fn check_reads(phase: &str, expected: impl Fn(u64) -> u64) -> bool {
    let mut wrong = 0;
    for i in 0..8 {
        invlpg(VA + i * 4096);
        if rd(VA + i * 4096) != TAG | expected(i) {
            wrong += 1;
        }
    }
    println(format_args!(
        "large-page-over-tables {phase}: 8 reads through the tables, {wrong} wrong -> {}",
        if wrong == 0 { "ok" } else { "WRONG" }
    ));
    wrong == 0
}

#[no_mangle]
extern "C" fn _start() -> ! {
    let pt = ring3::setup(handler);
    machine::write_cr0(machine::read_cr0() | CR0_WP);
    for i in 0..8 {
        wr(DATA + i * 4096, TAG | i);
        wr(PT + 8 * i, (DATA + i * 4096) | PTE_P | PTE_W);
        wr(PT2 + 8 * i, (DATA + ((i + 3) % 8) * 4096) | PTE_P | PTE_W);
    }
    wr(PD, PT | PTE_P | PTE_W);
    wr(PD + 8, REGION | PTE_P | PTE_W | PTE_PS);
    wr(PDPT, PD | PTE_P | PTE_W);
    wr(pt.root + 8, PDPT | PTE_P | PTE_W);
    pt.load();
    println(format_args!(
        "large-page-over-tables: PDE {:#x} maps {REGION:#x} (its own PD at {PD:#x}) at {ALIAS:#x}",
        PD + 8
    ));
    let mut ok = check_reads("before", |i| i);
    // Phase 1: PTE stores through the alias.
    for i in 0..8 {
        wr(alias(PT + 8 * i), (DATA + (7 - i) * 4096) | PTE_P | PTE_W);
    }
    ok &= check_reads("pte", |i| 7 - i);
    // Phase 2: the PDE of the 4 KiB mappings, through the alias.
    wr(alias(PD), PT2 | PTE_P | PTE_W);
    ok &= check_reads("pde", |i| (i + 3) % 8);
    // Phase 3: the alias's own PDE, read-only, by a store through the alias.
    let own = alias(PD + 8);
    let seen = rd(own) & !PTE_AD;
    wr(own, REGION | PTE_P | PTE_PS);
    invlpg(ALIAS);
    let store = || probe!("mov qword ptr [{p}], {v}"; p = in(reg) alias(DATA), v = in(reg) STORED,);
    let ro = store();
    let cr2 = CR2.swap(0, Ordering::SeqCst);
    wr(PD + 8, REGION | PTE_P | PTE_W | PTE_PS);
    invlpg(ALIAS);
    let rw = store();
    let phase3 = seen == REGION | PTE_P | PTE_W | PTE_PS
        && ro.is(Some((14, 0x3)))
        && cr2 == alias(DATA)
        && rw.is(None)
        && rd(DATA) == STORED;
    println(format_args!(
        "large-page-over-tables own-pde-ro: read own PDE {seen:#x}; store after clearing R/W: {ro} cr2={cr2:#x}; after setting it: {rw} -> {}",
        if phase3 { "ok" } else { "WRONG" }
    ));
    ok &= phase3;
    exit(if ok {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
