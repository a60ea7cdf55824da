//! Reserved bits at every level of the guest's page tables (SDM Vol. 3 §4.5 tables 4-15..4-20,
//! "Reserved bits"; §4.7): for each case the guest builds a private walk (PML4E, PDPTE, PDE,
//! PTE) for one linear address, reads through it (no fault), sets one reserved bit in the entry
//! the case names, and then a read and a write there must be #PF with P = 1 and RSVD = 1 (error
//! code 0x9 for the read, 0xb for the write: supervisor, bit 3 RSVD) and CR2 = the address; with
//! the bit cleared again (and INVLPG) the read works again. The cases:
//!
//! - `pml4e-bit51`, `pdpte-bit51`, `pde-bit51`, `pte-bit51`: bit 51, above MAXPHYADDR (the guest
//!   checks CPUID.80000008H:EAX[7:0] < 52, so bit 51 is reserved in every entry);
//! - `pml4e-ps`: bit 7 (PS) of a PML4E, reserved in 4-level paging;
//! - `pde-2m-bit13`: a PDE mapping a 2 MiB page with bit 13 set (bits 20:13 are reserved there).
//!
//! QEMU's TCG (natively) pushes the error code without P (0x8, 0xa): the guest accepts that as
//! a named quirk (a `quirk:` line), so the native run stays the reference for everything else.
//!
//! A shadowing VMM that copies entries without checking would map the page (no fault), or put a
//! reserved bit into a real table. Expected outcome, natively and under the VMM: each case
//! `-> ok`, `reserved-bits: 6 cases, 0 wrong`, exit success.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use test_guests::machine::{self, Frame, PageTables, PF_P, PF_RSVD, PF_W, PTE_P, PTE_PS, PTE_W};
use test_guests::{exit, println, probe, ring3};

#[repr(C, align(4096))]
struct Table([u64; 512]);

/// One case's private walk and the page it maps.
#[repr(C)]
struct Walk {
    pdpt: Table,
    pd: Table,
    pt: Table,
    data: Table,
}

const CASES: usize = 6;
static mut WALKS: [Walk; CASES] = [const {
    Walk {
        pdpt: Table([0; 512]),
        pd: Table([0; 512]),
        pt: Table([0; 512]),
        data: Table([0; 512]),
    }
}; CASES];

/// A 2 MiB-aligned guest-physical address inside RAM, for the large-page case.
const LARGE_PAGE: u64 = 0x40_0000;
/// Bit 51: above MAXPHYADDR when MAXPHYADDR < 52.
const BIT51: u64 = 1 << 51;
/// Bit 13: reserved in a PDE that maps a 2 MiB page (bits 20:13).
const BIT13: u64 = 1 << 13;

/// CR2 at the last trap.
static CR2: AtomicU64 = AtomicU64::new(0);

fn handler(frame: &mut Frame) {
    if !probe::record(frame) {
        machine::unexpected(frame)
    }
    CR2.store(machine::read_cr2(), Ordering::SeqCst);
    probe::skip(frame);
}

fn invlpg(a: u64) {
    // SAFETY: drops one translation; no memory effects.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) a, options(nostack)) };
}

/// The level whose entry a case corrupts.
#[derive(Clone, Copy)]
enum Level {
    Pml4e,
    Pdpte,
    Pde,
    Pte,
}

fn max_phys_addr() -> u64 {
    let eax: u32;
    // SAFETY: CPUID has no memory effects; RBX is saved by hand (LLVM reserves it).
    unsafe {
        core::arch::asm!("mov {t:r}, rbx", "cpuid", "mov rbx, {t:r}", t = out(reg) _,
            inout("eax") 0x8000_0008u32 => eax, out("ecx") _, out("edx") _, options(nostack))
    };
    u64::from(eax & 0xFF)
}

/// Runs case `i`: builds its walk for `va` (slot `2 + i` of the PML4), checks the clean read,
/// sets `bit` in the entry at `level`, checks the read and the write faults, clears it and
/// checks the read again.
fn case(pt: &PageTables, i: usize, name: &str, level: Level, bit: u64) {
    let va = (2 + i as u64) << 39;
    // SAFETY: single-threaded; only the address of entry `i` (< CASES) is taken. The image is
    // identity-mapped, so the address is also the physical address.
    let w = unsafe { core::ptr::addr_of_mut!(WALKS[i]) };
    // SAFETY: `w` is one of our statics and no other reference to it exists.
    let w = unsafe { &mut *w };
    w.pdpt.0[0] = core::ptr::addr_of!(w.pd) as u64 | PTE_P | PTE_W;
    w.pd.0[0] = if bit == BIT13 {
        LARGE_PAGE | PTE_P | PTE_W | PTE_PS
    } else {
        core::ptr::addr_of!(w.pt) as u64 | PTE_P | PTE_W
    };
    w.pt.0[0] = core::ptr::addr_of!(w.data) as u64 | PTE_P | PTE_W;
    let pml4e = (pt.root + 8 * (2 + i as u64)) as *mut u64;
    // SAFETY: the PML4 is the pool's, identity-mapped, and slot 2 + i maps nothing else.
    unsafe { pml4e.write_volatile(core::ptr::addr_of!(w.pdpt) as u64 | PTE_P | PTE_W) };
    let entry: *mut u64 = match level {
        Level::Pml4e => pml4e,
        Level::Pdpte => &mut w.pdpt.0[0],
        Level::Pde => &mut w.pd.0[0],
        Level::Pte => &mut w.pt.0[0],
    };
    // Sets or clears `bit` in `entry`, one of this case's entries (the CPU reads it as it walks).
    let flip = |set: bool| {
        // SAFETY: `entry` points at one of this case's entries (above).
        let old = unsafe { entry.read_volatile() };
        // SAFETY: as above.
        unsafe { entry.write_volatile(if set { old | bit } else { old & !bit }) };
        invlpg(va);
    };
    let read = || probe!("mov {v}, qword ptr [{p}]"; p = in(reg) va, v = out(reg) _,);
    let write = || probe!("mov qword ptr [{p}], {v}"; p = in(reg) va, v = in(reg) 1u64,);
    let clean = read();
    flip(true);
    let r = read();
    let r_cr2 = CR2.swap(0, Ordering::SeqCst);
    let wr = write();
    let w_cr2 = CR2.swap(0, Ordering::SeqCst);
    flip(false);
    let again = read();
    // The CPU's error codes, or QEMU's TCG's (its quirk: P = 0), both for the read and write.
    let cpu = r.is(Some((14, PF_P | PF_RSVD))) && wr.is(Some((14, PF_P | PF_W | PF_RSVD)));
    let quirk = r.is(Some((14, PF_RSVD))) && wr.is(Some((14, PF_W | PF_RSVD)));
    let ok = clean.is(None) && (cpu || quirk) && r_cr2 == va && w_cr2 == va && again.is(None);
    CHECKS.fetch_add(1, Ordering::SeqCst);
    if !ok {
        WRONG.fetch_add(1, Ordering::SeqCst);
    }
    println(format_args!(
        "reserved-bits {name}: clean read {clean}; read {r} cr2={r_cr2:#x}; write {wr} cr2={w_cr2:#x}; cleared read {again} -> {}",
        if ok { "ok" } else { "WRONG" }
    ));
    if quirk {
        println(format_args!(
            "reserved-bits {name}: quirk: QEMU's TCG leaves P = 0 in a reserved-bit #PF (the CPU sets it, SDM Vol. 3 §4.7)"
        ));
    }
    if !ok {
        println(format_args!(
            "reserved-bits {name}: expected #PF error {:#x} (read) and {:#x} (write) at the instruction, cr2={va:#x}",
            PF_P | PF_RSVD,
            PF_P | PF_W | PF_RSVD
        ));
    }
}

/// Cases run, and wrong ones.
static CHECKS: AtomicU64 = AtomicU64::new(0);
static WRONG: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
extern "C" fn _start() -> ! {
    let pt = ring3::setup(handler);
    let m = max_phys_addr();
    println(format_args!("reserved-bits: MAXPHYADDR {m}"));
    if m >= 52 {
        println(format_args!(
            "reserved-bits: bit 51 is not reserved here (wrong setup)"
        ));
        exit(boot::exit_code::FAILURE);
    }
    let cases = [
        ("pml4e-bit51", Level::Pml4e, BIT51),
        ("pml4e-ps", Level::Pml4e, PTE_PS),
        ("pdpte-bit51", Level::Pdpte, BIT51),
        ("pde-bit51", Level::Pde, BIT51),
        ("pde-2m-bit13", Level::Pde, BIT13),
        ("pte-bit51", Level::Pte, BIT51),
    ];
    for (i, (name, level, bit)) in cases.into_iter().enumerate() {
        case(&pt, i, name, level, bit);
    }
    let (n, wrong) = (CHECKS.load(Ordering::SeqCst), WRONG.load(Ordering::SeqCst));
    println(format_args!("reserved-bits: {n} cases, {wrong} wrong"));
    exit(if wrong == 0 {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
