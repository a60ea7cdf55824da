//! Page-table access rights, page-fault error codes and accessed/dirty updates by permutation,
//! after kvm-unit-tests' x86/access.c: for each case the guest writes the flags of the four
//! entries on the path to one linear address (PML4E, PDPTE, PDE and PTE, or a PDE with PS = 1
//! mapping a 2 MiB page, or a PDPTE with PS = 1 mapping 1 GiB), sets CR0.WP and IA32_EFER.NXE, INVLPGs the address (SDM Vol. 3
//! §4.10.4.1: a change to a paging-structure entry takes effect only once the translations it
//! made are invalidated) and performs one access — a read, a write or an instruction fetch, at
//! CPL 0 or at CPL 3 — and records what happened: fault or not, vector, error code, CR2, the
//! faulting RIP, whether a read found the tag every page holds (a wrong frame would not) and the
//! value of every entry on the path afterwards. It also computes the
//! outcome the SDM prescribes ([`expect`]: §4.6 access rights, §4.7 the error code, §4.8 the
//! accessed and dirty flags, §4.5 the reserved bits) and prints a line for each case where the
//! two differ (the first 200 of them; the count covers all).
//!
//! The cases (each run for the 4 combinations of CR0.WP and EFER.NXE × the 6 accesses, read,
//! write and fetch at CPL 0 and CPL 3: 24 per variant; in the three leaf sections each access is
//! also done right after a read at CPL 0 and, at CPL 3, right after one at CPL 3, without
//! INVLPG between — access.c's `AC_ACCESS_TWICE` — so that a write finds a translation with D = 0
//! cached: 60 per variant). The full product over every level is
//! 6.7 million cases, over a minute under the VMM, so, as access.c does, the default run takes
//! the full product at the leaf and varies one upper level at a time, the others permissive (P,
//! R/W, U/S and A set, XD clear); an upper level under test has its A clear, so a walk through
//! it must set it:
//!
//! | section | what varies | variants | cases |
//! |---|---|---|---|
//! | `pte` | the PTE's P, R/W, U/S, XD, A, D (all 64) | 64 | 3840 |
//! | `pde-2m` | a PDE with PS = 1 (a 2 MiB page): its P, R/W, U/S, XD, A, D (all 64) | 64 | 3840 |
//! | `pdpte-1g` | a PDPTE with PS = 1 (a 1 GiB page, at guest-physical 0): its 64 | 64 | 3840 |
//! | `pml4e`, `pdpte`, `pde` | that level's P, R/W, U/S, XD (16) × the PTE's 64 | 1024 each | 73728 |
//! | `reserved` | one reserved bit, the rest permissive: bit 51 (above MAXPHYADDR) in the PML4E, PDPTE, PDE, PTE and a 2 MiB PDE, PS in the PML4E, bit 13 in a 2 MiB PDE and in a 1 GiB PDPTE (§4.5, Tables 4-15 to 4-20) | 8 | 192 |
//! | `product` (`full` only) | P, R/W, U/S, XD of the PML4E, PDPTE and PDE (16 × 16 × 16) × the PTE's 64 | 262144 | 6291456 |
//! | `product-2m` (`full` only) | P, R/W, U/S, XD of the PML4E and PDPTE × a 2 MiB PDE's 64 | 16384 | 393216 |
//! | `product-1g` (`full` only) | P, R/W, U/S, XD of the PML4E × a 1 GiB PDPTE's 64 | 1024 | 24576 |
//!
//! That is 85440 cases by default (about 5 s under the VMM, under a second natively on QEMU's
//! TCG) and 6794688 with the guest option `full`, a soak (8½ minutes under the VMM, 24 s
//! natively, on a loaded 2-core machine; docs/hostile-guests.md has its result). A PDPTE with PS = 1 is reserved on a CPU without 1 GiB pages
//! (CPUID.80000001H:EDX[26]), and the model says so; QEMU's `-cpu max` has them. XD set while
//! EFER.NXE = 0 is a reserved bit too (§4.5), so every section with XD covers that rule at its
//! levels.
//!
//! What is recorded per case, and checksummed (FNV-1a over every case, printed at the end): the
//! vector (or none), the error code, CR2 relative to the page, whether the fault RIP is the
//! access, whether a read found the tag, and the A and D flags of every entry on the path (the rest of each entry is compared with the
//! model but never changes). Three known differences are taken out of the record:
//!
//! - on a faulting access, the A flag of a non-leaf entry the walk went through before the
//!   fault: §4.8 says the processor sets A in the entries it *uses* for a translation, and a
//!   faulting walk yields none; QEMU's TCG sets them as it walks, this VMM's walker does not
//!   (shadow-mmu `walk`), and access.c ignores them too (`ignore_pde`). The guest counts the
//!   walks that set one (`implementation-specific:` line), but they are neither a mismatch nor
//!   checksummed;
//! - QEMU's TCG's quirk: a reserved-bit #PF is pushed with P = 0 (the CPU sets P: §4.7, P is 0
//!   only when a P flag on the path was 0, and an entry with a reserved bit set is present;
//!   tests/guests/src/bin/reserved_bits.rs names the same quirk). It is accepted when the error
//!   code is the model's with P clear, counted on a `quirk:` line, and recorded as the model's
//!   code;
//! - QEMU's TCG's quirk: a faulting access through a 1 GiB page sets A in its PDPTE (TCG sets it
//!   before the access check there, unlike a 2 MiB PDE or a PTE, whose A a fault leaves as it
//!   is). It is accepted when it is the only change to the entry, counted on a `quirk:` line,
//!   and the entry is put back (with INVLPG) as the CPU leaves it.
//!
//! So the checksum is the same natively and under the VMM.
//!
//! SMEP, SMAP and protection keys are out of scope (CR4 keeps them clear).
//!
//! Expected outcome, natively and under the VMM with either shadow policy: every section
//! `0 mismatches`, `access: 85440 cases, 0 mismatches` with the same checksum, exit success.
//! Options: `full` (the soak above); anything else is refused with the list of options.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use test_guests::machine::{
    self, Frame, Page, PageTables, PF_ID, PF_P, PF_RSVD, PF_US, PF_W, PTE_A, PTE_D, PTE_P, PTE_PS,
    PTE_U, PTE_W, PTE_XD,
};
use test_guests::{exit, println, rdmsr, ring3, wrmsr};

/// The linear address under test: PML4 slot 2, nothing else maps there.
const VA: u64 = 2 << 39;
/// Data accesses go to this offset; the fetch goes to offset 0, where the page holds `jmp rcx`.
const DATA_OFFSET: u64 = 8;
/// A 2 MiB-aligned guest-physical address inside RAM (and above the image) for the 2 MiB page.
const LARGE_PAGE: u64 = 0x40_0000;
/// The 1 GiB page: the only 1 GiB-aligned guest-physical address in RAM. Its first bytes (the
/// real-mode IVT's place, unused in long mode) hold the `jmp rcx` and the data.
const HUGE_PAGE: u64 = 0;
/// `jmp rcx`: what a fetch at the page runs, back to the caller's resume point.
const JMP_RCX: [u8; 2] = [0xFF, 0xE1];
/// What each of the three pages holds at `DATA_OFFSET` and what every write stores there: a read
/// that returns anything else went to another frame.
const TAG: u64 = 0xACCE_55ED_0000_5A5A;

/// Bit 51: reserved in every entry when MAXPHYADDR < 52.
const BIT51: u64 = 1 << 51;
/// Bit 13: reserved in a PDE that maps a 2 MiB page (bits 20:13).
const BIT13: u64 = 1 << 13;
/// Bits 20:13 of a 2 MiB PDE: reserved (the page frame starts at bit 21).
const LARGE_RESERVED: u64 = 0x1F_E000;
/// Bits 29:13 of a 1 GiB PDPTE: reserved (the page frame starts at bit 30).
const HUGE_RESERVED: u64 = 0x3FFF_E000;
/// The flag bits of an entry (the rest is the address, or reserved).
const FLAGS: u64 = PTE_P | PTE_W | PTE_U | PTE_A | PTE_D | PTE_PS | PTE_XD;
/// Permissive: present, writable, user, already accessed.
const PERMISSIVE: u64 = PTE_P | PTE_W | PTE_U | PTE_A;

/// CR0.WP: supervisor writes honour R/W (§4.6).
const CR0_WP: u64 = 1 << 16;
/// IA32_EFER and its NXE bit: XD is honoured, and reserved when clear (§4.6, §4.5).
const IA32_EFER: u32 = 0xC000_0080;
const EFER_NXE: u64 = 1 << 11;

/// The paging structures on the path to `VA` below the PML4, and the 4 KiB page.
#[repr(C, align(4096))]
struct Table([u64; 512]);
static mut PDPT: Table = Table([0; 512]);
static mut PD: Table = Table([0; 512]);
static mut PT: Table = Table([0; 512]);
static mut DATA: Page = Page::zeroed();

// The accesses. At CPL 0 each is called with RDI = the page; a #PF resumes at `k_resume`, the
// `ret` (the faulting instruction pushed nothing, so the return address is on top). At CPL 3
// each ends in `ud2`, whose #UD is how a faultless access comes back (`ring3::enter`); a fetch
// jumps to the page with RCX = where to come back to, and the page's `jmp rcx` returns there.
core::arch::global_asm!(
    r#"
.section .text
.global access_k_read
access_k_read:
    mov rax, qword ptr [rdi + {off}]
.global access_k_resume
access_k_resume:
    ret
.global access_k_write
access_k_write:
    mov qword ptr [rdi + {off}], rsi
    ret
.global access_k_fetch
access_k_fetch:
    lea rcx, [rip + access_k_resume]
    jmp rdi
.section .utext, "ax"
.global access_u_read
access_u_read:
    movabs rdi, {va}
.global access_u_read_at
access_u_read_at:
    mov rax, qword ptr [rdi + {off}]
.global access_u_read_done
access_u_read_done:
    ud2
.global access_u_write
access_u_write:
    movabs rdi, {va}
    movabs rax, {tag}
.global access_u_write_at
access_u_write_at:
    mov qword ptr [rdi + {off}], rax
.global access_u_write_done
access_u_write_done:
    ud2
.global access_u_fetch
access_u_fetch:
    movabs rdi, {va}
    lea rcx, [rip + access_u_fetch_done]
    jmp rdi
.global access_u_fetch_done
access_u_fetch_done:
    ud2
.section .text
"#,
    off = const DATA_OFFSET,
    va = const VA,
    tag = const TAG,
);

extern "C" {
    fn access_k_read(page: u64) -> u64;
    fn access_k_write(page: u64, value: u64);
    fn access_k_fetch(page: u64);
    static access_k_resume: u8;
    fn access_u_read();
    fn access_u_write();
    fn access_u_fetch();
    static access_u_read_at: u8;
    static access_u_read_done: u8;
    static access_u_write_at: u8;
    static access_u_write_done: u8;
    static access_u_fetch_done: u8;
}

/// Set while a CPL 0 access runs: a trap then is the access's.
static ARMED: AtomicBool = AtomicBool::new(false);
/// The CPL 0 access's trap: vector (u64::MAX = none), error code, RIP; and CR2 at any trap.
static VECTOR: AtomicU64 = AtomicU64::new(u64::MAX);
static ERROR: AtomicU64 = AtomicU64::new(0);
static RIP: AtomicU64 = AtomicU64::new(0);
static CR2: AtomicU64 = AtomicU64::new(0);

fn handler(frame: &mut Frame) {
    CR2.store(machine::read_cr2(), Ordering::SeqCst);
    if ring3::catch(frame) {
        return;
    }
    if frame.cs & 3 == 0 && ARMED.swap(false, Ordering::SeqCst) {
        VECTOR.store(frame.vector, Ordering::SeqCst);
        ERROR.store(frame.error, Ordering::SeqCst);
        RIP.store(frame.rip, Ordering::SeqCst);
        frame.rip = core::ptr::addr_of!(access_k_resume) as u64;
        return;
    }
    machine::unexpected(frame)
}

/// The kind of access (§4.6).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    Write,
    Fetch,
}

/// One case: the flags of the PML4E, PDPTE, PDE and PTE (without the address; a PDE with PS
/// maps the 2 MiB page and the PTE is not on the path), CR0.WP, EFER.NXE and the access.
#[derive(Clone, Copy)]
struct Case {
    flags: [u64; 4],
    wp: bool,
    nxe: bool,
    kind: Kind,
    user: bool,
    /// A read of the page first, at CPL 3 (`Some(true)`) or CPL 0 (`Some(false)`), and this
    /// access right after it without INVLPG.
    read_first: Option<bool>,
}

impl Case {
    /// The number of entries on the path: 2 with a 1 GiB page, 3 with a 2 MiB page, else 4.
    fn levels(&self) -> usize {
        if self.flags[1] & PTE_PS != 0 {
            2
        } else if self.flags[2] & PTE_PS != 0 {
            3
        } else {
            4
        }
    }

    /// The linear address the access uses.
    fn address(&self) -> u64 {
        VA + if self.kind == Kind::Fetch {
            0
        } else {
            DATA_OFFSET
        }
    }
}

/// The names of the four levels, PML4E first.
const LEVELS: [&str; 4] = ["pml4e", "pdpte", "pde", "pte"];

/// Prints an entry's flags in the SDM's names (`-` for none).
struct Flags(u64);

impl core::fmt::Display for Flags {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let names = [
            (PTE_P, "P"),
            (PTE_W, "RW"),
            (PTE_U, "US"),
            (PTE_A, "A"),
            (PTE_D, "D"),
            (PTE_PS, "PS"),
            (PTE_XD, "XD"),
            (BIT51, "bit51"),
            (BIT13, "bit13"),
        ];
        let mut first = true;
        for (bit, name) in names {
            if self.0 & bit != 0 {
                write!(f, "{}{name}", if first { "" } else { "+" })?;
                first = false;
            }
        }
        if first {
            write!(f, "-")?;
        }
        Ok(())
    }
}

impl core::fmt::Display for Case {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, name) in LEVELS.iter().enumerate().take(self.levels()) {
            write!(f, "{name}={} ", Flags(self.flags[i]))?;
        }
        let kind = match self.kind {
            Kind::Read => "read",
            Kind::Write => "write",
            Kind::Fetch => "fetch",
        };
        write!(
            f,
            "wp={} nxe={} {kind} cpl{}{}",
            u8::from(self.wp),
            u8::from(self.nxe),
            if self.user { 3 } else { 0 },
            match self.read_first {
                None => "",
                Some(false) => " after a cpl0 read",
                Some(true) => " after a cpl3 read",
            }
        )
    }
}

/// What an access did, or must do.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Outcome {
    /// #PF taken.
    fault: bool,
    /// Its error code (0 without a fault).
    error: u64,
    /// CR2 (0 without a fault).
    cr2: u64,
    /// The fault was at the access (the data instruction, or the fetched address); true
    /// without a fault when the access ran to its end.
    at_access: bool,
    /// A read without a fault returned `TAG` (true for everything else).
    read_tag: bool,
    /// The entries on the path afterwards (the first `Case::levels`).
    entries: [u64; 4],
}

/// What the SDM prescribes for `case` with the entries holding `before`, and the bits of each
/// entry it leaves to the implementation.
fn expect(case: &Case, before: [u64; 4], cpu: &Cpu) -> (Outcome, [u64; 4]) {
    let levels = case.levels();
    // §4.5: bits 51:MAXPHYADDR are reserved in every entry; XD is reserved while EFER.NXE = 0
    // (Table 4-15 onwards, "Reserved (must be 0)" and "If IA32_EFER.NXE = 1 ... otherwise,
    // reserved"); PS is reserved in a PML4E, and in a PDPTE unless the CPU has 1 GiB pages;
    // bits 29:13 are reserved in a PDPTE mapping 1 GiB, bits 20:13 in a PDE mapping 2 MiB.
    let above_max_phys = ((1u64 << 52) - 1) & !((1u64 << cpu.max_phys_addr) - 1);
    let reserved = |level: usize, e: u64| {
        let mut mask = above_max_phys;
        if !case.nxe {
            mask |= PTE_XD;
        }
        if level == 0 || (level == 1 && !cpu.page_1g) {
            mask |= PTE_PS;
        }
        if level == 1 && e & PTE_PS != 0 {
            mask |= HUGE_RESERVED;
        }
        if level == 2 && e & PTE_PS != 0 {
            mask |= LARGE_RESERVED;
        }
        e & mask != 0
    };
    // §4.7: W/R is 1 for a write, U/S for a CPL 3 access, I/D for a fetch with EFER.NXE = 1
    // (no SMEP here); P is 0 only when the fault is a not-present entry; RSVD for a reserved bit.
    let mut error = 0;
    if case.kind == Kind::Write {
        error |= PF_W;
    }
    if case.user {
        error |= PF_US;
    }
    if case.kind == Kind::Fetch && case.nxe {
        error |= PF_ID;
    }
    let fault = |error: u64, walked: usize| {
        // §4.8: a faulting access updates no entry it stopped at or below; the A flags of the
        // `walked` entries above are left open (see the module doc).
        let mut open = [0; 4];
        for o in open.iter_mut().take(walked) {
            *o = PTE_A;
        }
        let outcome = Outcome {
            fault: true,
            error,
            cr2: case.address(),
            at_access: true,
            read_tag: true,
            entries: before,
        };
        (outcome, open)
    };
    let (mut writable, mut user, mut execute_disable) = (true, true, false);
    for (level, &e) in before.iter().enumerate().take(levels) {
        if e & PTE_P == 0 {
            return fault(error, level);
        }
        if reserved(level, e) {
            return fault(error | PF_P | PF_RSVD, level);
        }
        writable &= e & PTE_W != 0;
        user &= e & PTE_U != 0;
        execute_disable |= case.nxe && e & PTE_XD != 0;
    }
    // §4.6.1 without SMEP, SMAP and protection keys: a CPL 3 access needs U/S = 1 at every level,
    // and a write R/W = 1 at every level; a supervisor write needs R/W = 1 only with CR0.WP = 1;
    // a fetch at any privilege needs XD = 0 at every level when EFER.NXE = 1.
    let allowed = match case.kind {
        Kind::Read => !case.user || user,
        Kind::Write => {
            if case.user {
                user && writable
            } else {
                writable || !case.wp
            }
        }
        Kind::Fetch => (!case.user || user) && !execute_disable,
    };
    if !allowed {
        return fault(error | PF_P, levels - 1);
    }
    // §4.8: A is set in every entry used, D in the entry that maps the page for a write.
    let mut entries = before;
    for e in entries.iter_mut().take(levels) {
        *e |= PTE_A;
    }
    if case.kind == Kind::Write {
        entries[levels - 1] |= PTE_D;
    }
    let outcome = Outcome {
        fault: false,
        error: 0,
        cr2: 0,
        at_access: true,
        read_tag: true,
        entries,
    };
    (outcome, [0; 4])
}

/// The four entries on the path to `VA`.
fn entry_pointers(pt: &PageTables) -> [*mut u64; 4] {
    [
        (pt.root + 8 * ((VA >> 39) & 511)) as *mut u64,
        // VA's indices below the PML4 are 0: entry 0 of each table.
        core::ptr::addr_of_mut!(PDPT).cast::<u64>(),
        core::ptr::addr_of_mut!(PD).cast::<u64>(),
        core::ptr::addr_of_mut!(PT).cast::<u64>(),
    ]
}

/// The entry values a case writes: its flags with the next table's (or the page's) address.
fn entry_values(case: &Case) -> [u64; 4] {
    let pdpt = core::ptr::addr_of!(PDPT) as u64;
    let pd = core::ptr::addr_of!(PD) as u64;
    let pt = core::ptr::addr_of!(PT) as u64;
    let data = core::ptr::addr_of!(DATA) as u64;
    let pdpte_target = if case.flags[1] & PTE_PS != 0 {
        HUGE_PAGE
    } else {
        pd
    };
    let pde_target = if case.flags[2] & PTE_PS != 0 {
        LARGE_PAGE
    } else {
        pt
    };
    [
        pdpt | case.flags[0],
        pdpte_target | case.flags[1],
        pde_target | case.flags[2],
        data | case.flags[3],
    ]
}

fn invlpg(a: u64) {
    // SAFETY: drops the translations of one page (and the paging-structure caches); no memory
    // effects.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) a, options(nostack)) };
}

/// Sets CR0.WP and EFER.NXE as `case` says (writing only what changes).
fn set_mode(case: &Case) {
    let cr0 = machine::read_cr0();
    let want = if case.wp { cr0 | CR0_WP } else { cr0 & !CR0_WP };
    if want != cr0 {
        // SAFETY: only CR0.WP changes (PE and PG stay), which changes which supervisor writes
        // fault; the kernel's own pages are all writable.
        unsafe { core::arch::asm!("mov cr0, {}", in(reg) want, options(nostack)) };
    }
    let efer = rdmsr(IA32_EFER);
    let want = if case.nxe {
        efer | EFER_NXE
    } else {
        efer & !EFER_NXE
    };
    if want != efer {
        // No entry the kernel itself runs on has XD set, so clearing NXE makes none of them
        // reserved.
        wrmsr(IA32_EFER, want);
    }
}

/// Runs `case`'s access with the entries as they are and returns what it did.
fn perform(case: &Case, entries: &[*mut u64; 4]) -> Outcome {
    if case.user {
        let (code, at, done): (unsafe extern "C" fn(), u64, u64) = match case.kind {
            Kind::Read => (
                access_u_read,
                core::ptr::addr_of!(access_u_read_at) as u64,
                core::ptr::addr_of!(access_u_read_done) as u64,
            ),
            Kind::Write => (
                access_u_write,
                core::ptr::addr_of!(access_u_write_at) as u64,
                core::ptr::addr_of!(access_u_write_done) as u64,
            ),
            Kind::Fetch => (
                access_u_fetch,
                VA,
                core::ptr::addr_of!(access_u_fetch_done) as u64,
            ),
        };
        // The user code is in `.utext`, mapped user-accessible, and comes back through an
        // exception: a #PF at the access, or without a fault the #UD of its final `ud2`.
        let frame = ring3::enter(code, 0x2);
        let fault = frame.vector == 14;
        return Outcome {
            fault,
            read_tag: fault || case.kind != Kind::Read || frame.rax == TAG,
            error: if fault { frame.error } else { 0 },
            cr2: if fault { CR2.load(Ordering::SeqCst) } else { 0 },
            at_access: if fault {
                frame.rip == at
            } else {
                frame.vector == 6 && frame.rip == done
            },
            entries: read_entries(entries),
        };
    }
    VECTOR.store(u64::MAX, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    // Each access touches only the page at VA (a #PF there resumes at `access_k_resume`, which
    // returns) and clobbers only caller-saved registers.
    let value = match case.kind {
        // SAFETY: as above.
        Kind::Read => unsafe { access_k_read(VA) },
        Kind::Write => {
            // SAFETY: as above.
            unsafe { access_k_write(VA, TAG) };
            TAG
        }
        Kind::Fetch => {
            // SAFETY: as above.
            unsafe { access_k_fetch(VA) };
            TAG
        }
    };
    ARMED.store(false, Ordering::SeqCst);
    let vector = VECTOR.load(Ordering::SeqCst);
    let fault = vector == 14;
    // Where the #PF must be: the data instruction (the first of its function) or the fetched
    // address.
    let at = match case.kind {
        Kind::Read => access_k_read as *const () as u64,
        Kind::Write => access_k_write as *const () as u64,
        Kind::Fetch => VA,
    };
    Outcome {
        fault,
        read_tag: fault || value == TAG,
        error: if fault {
            ERROR.load(Ordering::SeqCst)
        } else {
            0
        },
        cr2: if fault { CR2.load(Ordering::SeqCst) } else { 0 },
        // Another exception than #PF is neither: a mismatch whatever the case.
        at_access: if fault {
            RIP.load(Ordering::SeqCst) == at
        } else {
            vector == u64::MAX
        },
        entries: read_entries(entries),
    }
}

fn read_entries(entries: &[*mut u64; 4]) -> [u64; 4] {
    // SAFETY: the four entries are ours (`entry_pointers`).
    entries.map(|e| unsafe { e.read_volatile() })
}

/// Counts and the running checksum.
struct Totals {
    cases: u64,
    mismatches: u64,
    printed: u64,
    /// Reserved-bit faults pushed with P = 0 (QEMU's TCG).
    quirk_rsvd_without_p: u64,
    /// Faulting accesses through a 1 GiB page that set A in its PDPTE (QEMU's TCG).
    quirk_huge_page_a_on_fault: u64,
    /// Faulting walks that set A in a non-leaf entry above the fault (left open by §4.8).
    open_a_set: u64,
    checksum: u64,
}

/// At most this many mismatch lines are printed (the count covers all of them).
const PRINT_LIMIT: u64 = 200;

/// FNV-1a over the bytes of `v`.
fn fnv(hash: u64, v: u64) -> u64 {
    v.to_le_bytes().iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Runs one case: writes its entries (only those that change: under a shadowing VMM each write
/// to a page table is a trap), sets CR0.WP and EFER.NXE, INVLPGs, accesses, compares; a case
/// with `read_first` first does that read, checked the same way, and then its access without
/// INVLPG, through whatever the read left cached (access.c's `AC_ACCESS_TWICE`, which reads at
/// CPL 0; the read at CPL 3 fills this VMM's other shadow view, the user one).
fn run(index: u64, section: &str, case: &Case, entries: &[*mut u64; 4], cpu: &Cpu, t: &mut Totals) {
    let wanted = entry_values(case);
    for (p, &v) in entries.iter().zip(&wanted).take(case.levels()) {
        // SAFETY: the entries are ours (`entry_pointers`).
        if unsafe { p.read_volatile() } != v {
            // SAFETY: as above.
            unsafe { p.write_volatile(v) };
        }
    }
    set_mode(case);
    invlpg(VA);
    t.cases += 1;
    let mut before = read_entries(entries);
    let mut still_open = [0; 4];
    if let Some(user) = case.read_first {
        let read = Case {
            kind: Kind::Read,
            user,
            read_first: None,
            ..*case
        };
        (before, still_open) = check(index, section, &read, before, [0; 4], entries, cpu, t);
    }
    check(index, section, case, before, still_open, entries, cpu, t);
}

/// Performs `case`'s access on the entries holding `before`, compares it with [`expect`] (the A
/// flags `still_open` from an earlier faulting walk stay open if this access faults too), folds
/// it into the checksum and prints it if it differs. Returns the entries afterwards and the A
/// flags left open.
#[allow(clippy::too_many_arguments)]
fn check(
    index: u64,
    section: &str,
    case: &Case,
    before: [u64; 4],
    still_open: [u64; 4],
    entries: &[*mut u64; 4],
    cpu: &Cpu,
    t: &mut Totals,
) -> ([u64; 4], [u64; 4]) {
    let levels = case.levels();
    let (mut want, mut open) = expect(case, before, cpu);
    if want.fault {
        for (o, s) in open.iter_mut().zip(still_open) {
            *o |= s;
        }
    }
    let mut got = perform(case, entries);
    let mut after = got.entries;
    // QEMU's TCG pushes a reserved-bit #PF without P (the CPU sets it, §4.7): accepted when it
    // is the only difference, and recorded as the CPU's code.
    if got.fault && want.error & PF_RSVD != 0 && got.error == want.error & !PF_P {
        got.error = want.error;
        t.quirk_rsvd_without_p += 1;
    }
    // QEMU's TCG sets A in a PDPTE mapping 1 GiB before it checks the access (it does not for a
    // 2 MiB PDE or a PTE). Accepted when that is the only change to the entry, which is put back
    // as the CPU leaves it (§4.8: A is set in the entries a translation uses, and a fault makes
    // none), so that what follows starts from the CPU's state, natively as under the VMM.
    let leaf = levels - 1;
    if levels == 2
        && want.fault
        && before[leaf] & PTE_A == 0
        && got.entries[leaf] == before[leaf] | PTE_A
    {
        // SAFETY: the entry is ours (`entry_pointers`).
        unsafe { entries[leaf].write_volatile(before[leaf]) };
        invlpg(VA);
        got.entries[leaf] = before[leaf];
        after[leaf] = before[leaf];
        t.quirk_huge_page_a_on_fault += 1;
    }
    // The A flags §4.8 leaves open: counted when a faulting walk set one, never compared.
    let mut open_set = false;
    for i in 0..levels {
        open_set |= (got.entries[i] & !before[i]) & open[i] != 0;
        got.entries[i] &= !open[i];
        want.entries[i] &= !open[i];
    }
    t.open_a_set += u64::from(open_set);
    for i in levels..4 {
        // Not on the path: not recorded.
        got.entries[i] = 0;
        want.entries[i] = 0;
    }
    let mut h = fnv(t.checksum, index);
    h = fnv(h, u64::from(got.fault));
    h = fnv(h, got.error);
    h = fnv(h, got.cr2.wrapping_sub(VA));
    h = fnv(h, u64::from(got.at_access));
    h = fnv(h, u64::from(got.read_tag));
    for e in got.entries {
        h = fnv(h, e & (PTE_A | PTE_D));
    }
    t.checksum = h;
    if got != want {
        // A case whose first read and access both differ counts twice.
        t.mismatches += 1;
        if t.printed < PRINT_LIMIT {
            t.printed += 1;
            println(format_args!(
                "access MISMATCH {section} #{index} {case}: expected {}; got {}",
                Shown(&want, levels),
                Shown(&got, levels)
            ));
        }
    }
    (after, open)
}

/// An outcome as a mismatch line shows it.
struct Shown<'a>(&'a Outcome, usize);

impl core::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let o = self.0;
        if o.fault {
            write!(f, "#PF error={:#x} cr2={:#x}", o.error, o.cr2)?;
        } else {
            write!(f, "no fault")?;
        }
        if !o.at_access {
            write!(f, " NOT at the access")?;
        }
        if !o.read_tag {
            write!(f, " READ ANOTHER FRAME")?;
        }
        for (name, e) in LEVELS.iter().zip(o.entries).take(self.1) {
            // The flags only: the address bits (bit 13 and 51 among them) are the table's.
            write!(f, " {name}={}", Flags(e & FLAGS))?;
        }
        Ok(())
    }
}

/// The sections of the module doc, in order.
#[derive(Clone, Copy)]
enum Section {
    Pte,
    Pde2M,
    Pdpte1G,
    /// One upper level's sweep: 0 = PML4E, 1 = PDPTE, 2 = PDE.
    Upper(usize),
    Reserved,
    /// `full` only: every upper level's P, R/W, U/S, XD with the PTE's 64 combinations.
    Product,
    /// `full` only: the PML4E's and the PDPTE's with a 2 MiB PDE's 64.
    Product2M,
    /// `full` only: the PML4E's with a 1 GiB PDPTE's 64.
    Product1G,
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Section::Pte => "pte",
            Section::Pde2M => "pde-2m",
            Section::Pdpte1G => "pdpte-1g",
            Section::Upper(level) => LEVELS[level],
            Section::Reserved => "reserved",
            Section::Product => "product",
            Section::Product2M => "product-2m",
            Section::Product1G => "product-1g",
        }
    }

    /// The reads an access at CPL 3 (`user`) or CPL 0 is also done right after: none, and in
    /// the leaf sections a CPL 0 read and one at the access's own CPL (each leaves a translation
    /// with D = 0 cached for a write to find).
    fn reads_first(self, user: bool) -> &'static [Option<bool>] {
        match self {
            Section::Pte | Section::Pde2M | Section::Pdpte1G if user => {
                &[None, Some(false), Some(true)]
            }
            Section::Pte | Section::Pde2M | Section::Pdpte1G => &[None, Some(false)],
            _ => &[None],
        }
    }

    /// Variants per combination of CR0.WP, EFER.NXE and access.
    fn variants(self) -> u64 {
        match self {
            Section::Pte | Section::Pde2M | Section::Pdpte1G => 64,
            Section::Upper(_) => 16 * 64,
            Section::Reserved => RESERVED.len() as u64,
            Section::Product => 16 * 16 * 16 * 64,
            Section::Product2M => 16 * 16 * 64,
            Section::Product1G => 16 * 64,
        }
    }

    /// The entries' flags of variant `v`.
    fn flags(self, v: u64) -> [u64; 4] {
        let p = PERMISSIVE;
        // An upper level's P, R/W, U/S, XD from 4 bits of a variant, its A clear so that a walk
        // through it must set it.
        let upper = |bits: u64| leaf_flags(bits % 16);
        match self {
            Section::Pte => [p, p, p, leaf_flags(v)],
            Section::Pde2M => [p, p, PTE_PS | leaf_flags(v), 0],
            Section::Pdpte1G => [p, PTE_PS | leaf_flags(v), 0, 0],
            Section::Upper(level) => {
                let mut flags = [p, p, p, leaf_flags(v % 64)];
                flags[level] = upper(v / 64);
                flags
            }
            Section::Reserved => RESERVED[v as usize].1,
            Section::Product => [
                upper(v / (64 * 16 * 16)),
                upper(v / (64 * 16)),
                upper(v / 64),
                leaf_flags(v % 64),
            ],
            Section::Product2M => [
                upper(v / (64 * 16)),
                upper(v / 64),
                PTE_PS | leaf_flags(v % 64),
                0,
            ],
            Section::Product1G => [upper(v / 64), PTE_PS | leaf_flags(v % 64), 0, 0],
        }
    }
}

/// A leaf's flags from the 6 bits of `v`: P, R/W, U/S, XD, A, D.
fn leaf_flags(v: u64) -> u64 {
    [PTE_P, PTE_W, PTE_U, PTE_XD, PTE_A, PTE_D]
        .iter()
        .enumerate()
        .filter(|&(i, _)| v & (1 << i) != 0)
        .fold(0, |f, (_, &bit)| f | bit)
}

/// The reserved-bit variants: one reserved bit in one entry, the rest permissive (the leaf's A
/// clear).
const RESERVED: [(&str, [u64; 4]); 8] = {
    let p = PERMISSIVE;
    let leaf = PTE_P | PTE_W | PTE_U;
    [
        ("pml4e-bit51", [p | BIT51, p, p, leaf]),
        ("pml4e-ps", [p | PTE_PS, p, p, leaf]),
        ("pdpte-bit51", [p, p | BIT51, p, leaf]),
        ("pde-bit51", [p, p, p | BIT51, leaf]),
        ("pte-bit51", [p, p, p, leaf | BIT51]),
        ("pde-2m-bit51", [p, p, leaf | PTE_PS | BIT51, 0]),
        ("pde-2m-bit13", [p, p, leaf | PTE_PS | BIT13, 0]),
        ("pdpte-1g-bit13", [p, leaf | PTE_PS | BIT13, 0, 0]),
    ]
};

/// The default run's sections, and the ones `full` adds.
const SECTIONS: [Section; 7] = [
    Section::Pte,
    Section::Pde2M,
    Section::Pdpte1G,
    Section::Upper(0),
    Section::Upper(1),
    Section::Upper(2),
    Section::Reserved,
];
const FULL_SECTIONS: [Section; 3] = [Section::Product, Section::Product2M, Section::Product1G];

/// The six accesses: read, write, fetch at CPL 0, then at CPL 3.
const ACCESSES: [(Kind, bool); 6] = [
    (Kind::Read, false),
    (Kind::Write, false),
    (Kind::Fetch, false),
    (Kind::Read, true),
    (Kind::Write, true),
    (Kind::Fetch, true),
];

/// What the CPU's paging has that changes the rules (CPUID, SDM Vol. 3 §4.1.4).
struct Cpu {
    /// MAXPHYADDR: CPUID.80000008H:EAX[7:0].
    max_phys_addr: u32,
    /// 1 GiB pages: CPUID.80000001H:EDX[26].
    page_1g: bool,
}

/// CPUID leaf `leaf`'s EAX and EDX.
fn cpuid(leaf: u32) -> (u32, u32) {
    let (eax, edx): (u32, u32);
    // SAFETY: CPUID has no memory effects; RBX is saved by hand (LLVM reserves it).
    unsafe {
        core::arch::asm!("mov {t:r}, rbx", "cpuid", "mov rbx, {t:r}", t = out(reg) _,
            inout("eax") leaf => eax, inout("ecx") 0 => _, out("edx") edx, options(nostack))
    };
    (eax, edx)
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: `info` is the RDI the entry contract gives `_start`.
    let cmdline = unsafe { machine::cmdline(info) };
    let mut full = false;
    for word in cmdline.split(' ').filter(|w| !w.is_empty()) {
        match word {
            "full" => full = true,
            other => {
                println(format_args!(
                    "access: unknown option '{other}' (valid: full)"
                ));
                exit(boot::exit_code::FAILURE);
            }
        }
    }
    let pt = ring3::setup(handler);
    let cpu = Cpu {
        max_phys_addr: cpuid(0x8000_0008).0 & 0xFF,
        page_1g: cpuid(0x8000_0001).1 & (1 << 26) != 0,
    };
    let m = cpu.max_phys_addr;
    if m >= 52 {
        println(format_args!(
            "access: MAXPHYADDR {m}: bit 51 is not reserved here"
        ));
        exit(boot::exit_code::FAILURE);
    }
    // The bytes a fetch runs at offset 0 of the three pages, and the tag a read finds at
    // `DATA_OFFSET` (each page identity-mapped, supervisor-writable). Address 0 is no pointer
    // Rust may write through: the stores are the assembler's.
    for page in [core::ptr::addr_of!(DATA) as u64, LARGE_PAGE, HUGE_PAGE] {
        // SAFETY: DATA is ours, a page long; LARGE_PAGE is guest RAM above the image and
        // HUGE_PAGE (0) guest RAM below it, both used by nothing else.
        unsafe {
            core::arch::asm!(
                "mov word ptr [{p}], {code:x}",
                "mov qword ptr [{p} + {off}], {tag}",
                p = in(reg) page,
                code = in(reg) u16::from_le_bytes(JMP_RCX),
                off = const DATA_OFFSET,
                tag = in(reg) TAG,
                options(nostack)
            )
        };
    }
    let entries = entry_pointers(&pt);
    println(format_args!(
        "access: MAXPHYADDR {m}, 1 GiB pages {}, page at {VA:#x}, {}",
        if cpu.page_1g { "yes" } else { "no" },
        if full { "full run" } else { "default run" }
    ));
    let mut t = Totals {
        cases: 0,
        mismatches: 0,
        printed: 0,
        quirk_rsvd_without_p: 0,
        quirk_huge_page_a_on_fault: 0,
        open_a_set: 0,
        checksum: 0xCBF2_9CE4_8422_2325,
    };
    let mut index = 0;
    let extra: &[Section] = if full { &FULL_SECTIONS } else { &[] };
    for &section in SECTIONS.iter().chain(extra) {
        let (cases, mismatches) = (t.cases, t.mismatches);
        // CR0.WP and EFER.NXE outermost, so each is written rarely (a trap under the VMM).
        for env in 0..4 {
            for v in 0..section.variants() {
                for ((kind, user), &read_first) in ACCESSES
                    .into_iter()
                    .flat_map(|(k, u)| section.reads_first(u).iter().map(move |r| ((k, u), r)))
                {
                    let case = Case {
                        flags: section.flags(v),
                        wp: env & 1 != 0,
                        nxe: env & 2 != 0,
                        kind,
                        user,
                        read_first,
                    };
                    run(index, section.name(), &case, &entries, &cpu, &mut t);
                    index += 1;
                }
            }
        }
        println(format_args!(
            "access section {}: {} cases, {} mismatches",
            section.name(),
            t.cases - cases,
            t.mismatches - mismatches
        ));
    }
    if t.quirk_rsvd_without_p > 0 {
        println(format_args!(
            "access: quirk: QEMU's TCG left P = 0 in {} reserved-bit #PF error codes (the CPU sets it, SDM Vol. 3 §4.7)",
            t.quirk_rsvd_without_p
        ));
    }
    if t.quirk_huge_page_a_on_fault > 0 {
        println(format_args!(
            "access: quirk: QEMU's TCG set A in the PDPTE of a 1 GiB page in {} faulting accesses (the CPU leaves it, SDM Vol. 3 §4.8)",
            t.quirk_huge_page_a_on_fault
        ));
    }
    println(format_args!(
        "access: implementation-specific: {} faulting walks set A in a non-leaf entry above the fault (SDM Vol. 3 §4.8 leaves it open)",
        t.open_a_set
    ));
    println(format_args!(
        "access: {} cases, {} mismatches, checksum {:#018x}",
        t.cases, t.mismatches, t.checksum
    ));
    exit(if t.mismatches == 0 {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
