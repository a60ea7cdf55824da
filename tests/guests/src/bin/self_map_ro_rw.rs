//! A recursive PML4 entry flipped between read-only and writable (the shape of XSA-182, where a
//! fast path let a PV guest make its L4 self-map writable): PML4[K] points at the PML4 itself,
//! so every paging-structure entry appears at a fixed linear address. The guest
//!
//! 1. `ro`: clears R/W in the self-map entry by a store through the self-map (to that entry
//!    itself), reloads CR3, and then a read through the self-map still works while a store
//!    through it is #PF(0x3) with CR2 = the address (CR0.WP = 1: SDM Vol. 3 §4.6);
//! 2. `rw`: sets R/W again through the identity map, reloads CR3, and remaps a data page by a
//!    PTE store through the self-map: after INVLPG the read gives the new page.
//!
//! A shadowing VMM must give the self-map exactly the rights the guest's entries give: never a
//! writable view of a page table the guest made read-only, and every store through a writable
//! one seen as a page-table write. Expected outcome, natively and under the VMM: both phases
//! `-> ok`, exit success.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use test_guests::machine::{self, Frame, Page, PTE_P, PTE_W};
use test_guests::{exit, println, probe, ring3};

/// The self-map slot (the first of the upper half).
const K: u64 = 256;
/// A linear address the guest remaps: PML4 slot 0 (the identity map's PDPT), 1 GiB.
const VA: u64 = 0x4000_0000;
/// A tag in the first quadword of each data page.
const TAG: u64 = 0x5E1F_0000_0000_0000;
/// CR0.WP: supervisor writes honour R/W.
const CR0_WP: u64 = 1 << 16;
/// Accessed and dirty: the CPU sets them as it walks and writes.
const PTE_AD: u64 = 0x60;

static mut DATA: [Page; 2] = [const { Page::zeroed() }; 2];

/// CR2 at the last trap.
static CR2: AtomicU64 = AtomicU64::new(0);

fn handler(frame: &mut Frame) {
    if !probe::record(frame) {
        machine::unexpected(frame)
    }
    CR2.store(machine::read_cr2(), Ordering::SeqCst);
    probe::skip(frame);
}

/// A linear address from four table indices and an offset (sign-extended from bit 47).
const fn la(i4: u64, i3: u64, i2: u64, i1: u64, offset: u64) -> u64 {
    let v = (i4 << 39) | (i3 << 30) | (i2 << 21) | (i1 << 12) | offset;
    (((v << 16) as i64) >> 16) as u64
}

/// The self-map address of the PTE that maps `va`.
const fn pte_at(va: u64) -> u64 {
    la(
        K,
        (va >> 39) & 511,
        (va >> 30) & 511,
        (va >> 21) & 511,
        ((va >> 12) & 511) * 8,
    )
}

/// The self-map address of the self-map entry itself.
const SELF_ENTRY: u64 = la(K, K, K, K, K * 8);

fn rd(a: u64) -> u64 {
    // SAFETY: every address read is mapped: the identity map, the self-map or `VA`.
    unsafe { core::ptr::read_volatile(a as *const u64) }
}

fn wr(a: u64, v: u64) {
    // SAFETY: every address written is this guest's own page-table entry or data page.
    unsafe { core::ptr::write_volatile(a as *mut u64, v) }
}

fn data(i: u64) -> u64 {
    core::ptr::addr_of!(DATA) as u64 + 4096 * i
}

fn invlpg(a: u64) {
    // SAFETY: drops one translation; no memory effects.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) a, options(nostack)) };
}

/// Reloads CR3: every (non-global) translation through the self-map is dropped.
fn flush() {
    machine::write_cr3(machine::read_cr3());
}

#[no_mangle]
extern "C" fn _start() -> ! {
    let pt = ring3::setup(handler);
    machine::write_cr0(machine::read_cr0() | CR0_WP);
    wr(data(0), TAG);
    wr(data(1), TAG | 1);
    pt.map(VA, data(0), PTE_P | PTE_W);
    let identity_entry = pt.root + 8 * K;
    wr(identity_entry, pt.root | PTE_P | PTE_W);
    flush();
    println(format_args!(
        "self-map-ro-rw: PML4 at {:#x}, self-map slot {K}, its own entry at {SELF_ENTRY:#x}",
        pt.root
    ));
    // Phase 1: read-only, by a store through the self-map to the self-map entry itself.
    wr(SELF_ENTRY, pt.root | PTE_P);
    flush();
    let seen = rd(SELF_ENTRY) & !PTE_AD;
    let target = pte_at(VA);
    let store = || probe!("mov qword ptr [{p}], {v}"; p = in(reg) target, v = in(reg) data(1) | PTE_P | PTE_W,);
    let ro = store();
    let cr2 = CR2.swap(0, Ordering::SeqCst);
    let ro_ok = seen == pt.root | PTE_P && ro.is(Some((14, 0x3))) && cr2 == target && rd(VA) == TAG;
    println(format_args!(
        "self-map-ro-rw ro: own entry reads {}; store to a PTE through it: {ro} cr2={}; VA still maps page 0: {} -> {}",
        if seen == pt.root | PTE_P { "root|P" } else { "WRONG" },
        if cr2 == target { "the PTE's self-map address" } else { "WRONG" },
        rd(VA) == TAG,
        if ro_ok { "ok" } else { "WRONG" }
    ));
    // Phase 2: writable again (through the identity map), and a PTE store through the self-map.
    wr(identity_entry, pt.root | PTE_P | PTE_W);
    flush();
    let rw = store();
    invlpg(VA);
    let remapped = rd(VA);
    let rw_ok = rw.is(None) && remapped == TAG | 1;
    println(format_args!(
        "self-map-ro-rw rw: store to a PTE through it: {rw}; VA now maps page 1: {} -> {}",
        remapped == TAG | 1,
        if rw_ok { "ok" } else { "WRONG" }
    ));
    exit(if ro_ok && rw_ok {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
