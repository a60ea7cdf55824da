//! Exhaustive permutation test in the spirit of kvm-unit-tests' `access.c`: every combination of
//! per-level R/W, U/S, XD, A, D, PS and of terminating entries (not present, each reserved bit
//! class) × read/write/fetch × user/supervisor × CR0.WP × EFER.NXE, walker against reference,
//! including the error code and the A/D bits written back.
//!
//! To stay fast it enumerates walk *paths* rather than independent levels: a not-present or
//! reserved entry ends the walk, so the levels below it are not multiplied in.

use std::vec;
use std::vec::Vec;

use super::reference::reference;
use crate::addr::{GuestPhysAddr, GuestVirtAddr};
use crate::p2m::{GuestPhysMemory, MemoryError};
use crate::walk::{walk, Access, AccessKind, PagingMode, Privilege, WalkError};

const MAXPHY: u8 = 40;
/// Tables live at 0x1000 (PML4), 0x2000 (PDPT), 0x3000 (PD), 0x4000 (PT).
const TABLE: [u64; 4] = [0x1000, 0x2000, 0x3000, 0x4000];
const FRAME: u64 = 0x4000_0000;
const GVA: u64 = 0x0000_4080_6040_2abc;

const P: u64 = 1;
const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const PS: u64 = 1 << 7;
const XD: u64 = 1 << 63;
/// Bits every level ignores: 11:9 and 62:52 (and G, D in non-leaf entries).
const IGNORED_NONLEAF: u64 = 0x7FF0_0000_0000_0E00 | (1 << 8) | D;

struct Tiny {
    tables: [[u64; 512]; 4],
}

impl GuestPhysMemory for Tiny {
    fn read_u64(&mut self, gpa: GuestPhysAddr) -> Result<u64, MemoryError> {
        let g = gpa.as_u64();
        let t = (g >> 12).wrapping_sub(1) as usize;
        match self.tables.get(t) {
            Some(tab) => Ok(tab[(g as usize & 0xfff) / 8]),
            None => Err(MemoryError::OutsideRam(gpa)),
        }
    }
    fn write_u64(&mut self, gpa: GuestPhysAddr, value: u64) -> Result<(), MemoryError> {
        let g = gpa.as_u64();
        let t = (g >> 12).wrapping_sub(1) as usize;
        match self.tables.get_mut(t) {
            Some(tab) => {
                tab[(g as usize & 0xfff) / 8] = value;
                Ok(())
            }
            None => Err(MemoryError::OutsideRam(gpa)),
        }
    }
}

fn index(level: usize) -> usize {
    GuestVirtAddr::new(GVA).unwrap().table_index(level as u8)
}

/// Present non-leaf variants: every R/W × U/S × XD, plus one with every ignored bit set.
fn nonleaf_variants() -> Vec<u64> {
    let mut v = Vec::new();
    for bits in 0..8u64 {
        let mut e = P;
        if bits & 1 != 0 {
            e |= RW;
        }
        if bits & 2 != 0 {
            e |= US;
        }
        if bits & 4 != 0 {
            e |= XD;
        }
        v.push(e);
    }
    v.push(P | RW | US | IGNORED_NONLEAF);
    v
}

/// Leaf variants: every R/W × U/S × XD × D × A (the PS bit is added by the caller).
fn leaf_variants() -> Vec<u64> {
    let mut v = Vec::new();
    for bits in 0..32u64 {
        let mut e = P;
        for (i, b) in [RW, US, XD, D, A].iter().enumerate() {
            if bits & (1 << i) != 0 {
                e |= b;
            }
        }
        v.push(e);
    }
    v
}

/// Entries that end the walk at `level` (4..1): not present, and each class of reserved bit.
fn terminators(level: usize) -> Vec<u64> {
    let mut v = vec![
        !P,                      // not present, every other bit set
        0,                       // not present, clear
        P | RW | US | (1 << 51), // above MAXPHYADDR (bit 51)
        P | RW | US | (1 << 40), // above MAXPHYADDR (bit MAXPHYADDR)
    ];
    match level {
        4 => v.push(P | RW | US | PS),
        3 => {
            v.push(P | RW | US | PS | FRAME | (1 << 13));
            v.push(P | RW | US | PS | FRAME | (1 << 29));
        }
        2 => {
            v.push(P | RW | US | PS | FRAME | (1 << 13));
            v.push(P | RW | US | PS | FRAME | (1 << 20));
        }
        _ => {}
    }
    v
}

struct Counter {
    walks: usize,
    faults: usize,
    rsvd: usize,
}

/// Runs every access × mode on one path and compares walker and reference.
fn check_path(mem: &mut Tiny, path: &[u64], counter: &mut Counter) {
    for (i, &e) in path.iter().enumerate() {
        mem.tables[i][index(4 - i)] = e;
    }
    for kind in [AccessKind::Read, AccessKind::Write, AccessKind::Fetch] {
        for privilege in [Privilege::Supervisor, Privilege::User] {
            for wp in [false, true] {
                for nxe in [false, true] {
                    for (i, &e) in path.iter().enumerate() {
                        mem.tables[i][index(4 - i)] = e;
                    }
                    let mode = PagingMode {
                        cr0_wp: wp,
                        efer_nxe: nxe,
                        cr4_pge: false,
                        max_phys_bits: MAXPHY,
                    };
                    let access = Access::new(kind, privilege);
                    let got = walk(
                        mem,
                        TABLE[0],
                        GuestVirtAddr::new(GVA).unwrap(),
                        access,
                        mode,
                    );
                    let want = reference(
                        path,
                        GVA,
                        kind == AccessKind::Write,
                        kind == AccessKind::Fetch,
                        privilege == Privilege::User,
                        wp,
                        nxe,
                        u32::from(MAXPHY),
                    );
                    let got_outcome = match got {
                        Ok(t) => Ok(t.gpa.as_u64()),
                        Err(WalkError::PageFault(pf)) => {
                            assert_eq!(pf.cr2.as_u64(), GVA);
                            Err(pf.error_code.bits())
                        }
                        Err(WalkError::Memory(m)) => {
                            panic!("walk left the tables: {m:?} {path:x?}")
                        }
                    };
                    let after: Vec<u64> = (0..path.len())
                        .map(|i| mem.tables[i][index(4 - i)])
                        .collect();
                    assert_eq!(
                        (got_outcome, &after),
                        (want.outcome, &want.entries_after),
                        "path {path:#x?} {access:?} wp={wp} nxe={nxe}"
                    );
                    counter.walks += 1;
                    if let Err(code) = want.outcome {
                        counter.faults += 1;
                        if code & 8 != 0 {
                            counter.rsvd += 1;
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn walker_matches_reference_on_every_permutation() {
    let mut mem = Tiny {
        tables: [[0; 512]; 4],
    };
    let mut counter = Counter {
        walks: 0,
        faults: 0,
        rsvd: 0,
    };
    let nonleaf = nonleaf_variants();
    let leaves = leaf_variants();
    // A non-leaf entry at level `l` (4..2) points at the next table.
    let link = |level: usize, v: u64| v | TABLE[4 - level + 1];
    // Upper A pattern: all clear or all set (the leaf's A is part of the leaf variants).
    for upper_a in [0, A] {
        // Pages of each size: leaf at level 1 (4 KiB), 2 (2 MiB) or 3 (1 GiB).
        for leaf_level in 1..=3usize {
            let uppers = 4 - leaf_level;
            let mut prefix = vec![0u64; uppers];
            let combos = nonleaf.len().pow(uppers as u32);
            for c in 0..combos {
                let mut k = c;
                for (i, slot) in prefix.iter_mut().enumerate() {
                    *slot = link(4 - i, nonleaf[k % nonleaf.len()] | upper_a);
                    k /= nonleaf.len();
                }
                for &leaf in &leaves {
                    let ps = if leaf_level > 1 { PS } else { 0 };
                    let mut path = prefix.clone();
                    path.push(leaf | ps | FRAME);
                    check_path(&mut mem, &path, &mut counter);
                }
                // The walk may also stop at any level of this prefix's length or below.
                if c % 3 == 0 {
                    for stop in 0..=uppers {
                        for t in terminators(4 - stop) {
                            let mut path = prefix[..stop].to_vec();
                            path.push(t);
                            check_path(&mut mem, &path, &mut counter);
                        }
                    }
                }
            }
        }
    }
    // The test must have seen every outcome class, or it proves nothing.
    assert!(counter.walks > 500_000, "{} walks", counter.walks);
    assert!(counter.faults > 0 && counter.rsvd > 0 && counter.faults < counter.walks);
}
