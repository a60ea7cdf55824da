//! A recursive ("self-map") PML4 entry: PML4[K] points at the PML4 itself, so the page tables
//! appear as ordinary memory at fixed linear addresses (a PTE of `va` at
//! `K:pml4i:pdpti:pdi:pti*8`, a PDE at `K:K:pml4i:pdpti:pdi*8`, a PML4 entry at `K:K:K:K:i*8`),
//! and the kernel (or a user program) edits its page tables by plain stores there. The CPU just
//! walks: nothing special happens natively (SDM Vol. 3 §4.5).
//!
//! Phases, each one `[guest]` line ending in `-> ok` or `-> WRONG`:
//!
//! 1. kernel, supervisor self-map: creates a PDPT entry and a PDE (a new page directory and page
//!    table) through the self-map, then 16 PTE stores in a row to the new table, reads through
//!    all 16 new mappings, 16 stores in a row remapping them (the table now in use, so
//!    write-protected by a shadowing VMM) and reads, remaps each again (PTE store, INVLPG,
//!    read), and 8 + 8 stores in a row to the PML4 through `K:K:K:K` (each store's own
//!    translation goes through the very table it writes), with reads through the 8 new PML4
//!    slots before they are cleared again (then a read through each is a #PF);
//! 2. user mode: the kernel makes the self-map entry user-accessible by a store through the
//!    self-map to that entry itself (its own translation uses it), then a CPL-3 program stores
//!    8 PTEs (user, writable) of its own address space through the self-map and reads and writes
//!    through each new mapping;
//! 3. kernel: a PTE store through the self-map maps the page table itself at another address
//!    (an alias); 8 stores in a row through the alias (whose translation goes through the table
//!    they write) create mappings that are then read, and a last store through the alias
//!    rewrites the alias's own PTE, after which the alias maps a data page;
//! 4. user mode: the same as 3 from CPL 3, through a user-accessible alias of the page table.
//!
//! A VMM that write-protects guest page tables must emulate these stores (or let them run) so
//! that every read gives what the CPU gives. Expected outcome, natively and under the VMM: every
//! phase "ok", exit success.
#![no_std]
#![no_main]

use core::ptr::addr_of;

use test_guests::machine::{self, Frame, Page, PTE_P, PTE_U, PTE_W};
use test_guests::{exit, println, probe, ring3};

/// The self-map slot of the PML4 (the first of the upper half: 0xFFFF_8000_0000_0000).
const K: u64 = 256;
/// Where the new mappings go: PML4[0], PDPT[1], a page directory and page table of our own.
const VA: u64 = 0x4000_0000;
/// Accessed and dirty.
const PTE_AD: u64 = 0x60;
/// A tag in the first quadword of each data page: `TAG | page index`.
const TAG: u64 = 0x5E1F_3A90_0000_0000;

static mut NEW_PD: Page = Page::zeroed();
static mut NEW_PT: Page = Page::zeroed();
/// Data pages mapped at `VA + i * 4096` by the kernel phases.
static mut DATA: [Page; 16] = [const { Page::zeroed() }; 16];
/// Data pages the user programs map.
static mut USER_DATA: [Page; 16] = [const { Page::zeroed() }; 16];

/// A linear address from four table indices and an offset (sign-extended from bit 47).
const fn la(i4: u64, i3: u64, i2: u64, i1: u64, offset: u64) -> u64 {
    let v = (i4 << 39) | (i3 << 30) | (i2 << 21) | (i1 << 12) | offset;
    (((v << 16) as i64) >> 16) as u64
}

const fn idx(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * level)) & 511
}

/// The self-map address of the PTE that maps `va`.
const fn pte_at(va: u64) -> u64 {
    la(K, idx(va, 3), idx(va, 2), idx(va, 1), idx(va, 0) * 8)
}

/// The self-map address of the PDE that maps `va`.
const fn pde_at(va: u64) -> u64 {
    la(K, K, idx(va, 3), idx(va, 2), idx(va, 1) * 8)
}

/// The self-map address of the PDPT entry that maps `va`.
const fn pdpte_at(va: u64) -> u64 {
    la(K, K, K, idx(va, 3), idx(va, 2) * 8)
}

/// The self-map address of PML4 entry `i`.
const fn pml4e_at(i: u64) -> u64 {
    la(K, K, K, K, i * 8)
}

fn rd(a: u64) -> u64 {
    // SAFETY: every address read is mapped (identity map, or a mapping this guest just made).
    unsafe { core::ptr::read_volatile(a as *const u64) }
}

fn wr(a: u64, v: u64) {
    // SAFETY: every address written is this guest's own page-table entry or data page, mapped
    // writable (through the self-map, an alias, or the identity map).
    unsafe { core::ptr::write_volatile(a as *mut u64, v) }
}

fn invlpg(a: u64) {
    // SAFETY: drops one translation; no memory effects.
    unsafe { core::arch::asm!("invlpg [{}]", in(reg) a, options(nostack)) };
}

fn data(i: usize) -> u64 {
    addr_of!(DATA) as u64 + 4096 * i as u64
}

fn user_data(i: usize) -> u64 {
    addr_of!(USER_DATA) as u64 + 4096 * i as u64
}

fn new_pt() -> u64 {
    addr_of!(NEW_PT) as u64
}

fn new_pd() -> u64 {
    addr_of!(NEW_PD) as u64
}

/// Counts checks; remembers the first wrong one.
struct Checks {
    n: u32,
    wrong: u32,
    first: Option<(&'static str, u64, u64, u64)>,
}

impl Checks {
    const fn new() -> Self {
        Checks {
            n: 0,
            wrong: 0,
            first: None,
        }
    }

    fn eq(&mut self, what: &'static str, i: u64, got: u64, expected: u64) {
        self.n += 1;
        if got != expected {
            self.wrong += 1;
            if self.first.is_none() {
                self.first = Some((what, i, got, expected));
            }
        }
    }

    /// An entry: equal but for the accessed and dirty bits, which the CPU sets as it walks.
    fn entry(&mut self, what: &'static str, i: u64, got: u64, expected: u64) {
        self.eq(what, i, got & !PTE_AD, expected & !PTE_AD);
    }

    /// Prints the phase's line; true when every check held.
    fn report(&self, phase: &str, what: core::fmt::Arguments<'_>) -> bool {
        println(format_args!(
            "page-table-self-map phase {phase}: {what}; {} checks, {} wrong -> {}",
            self.n,
            self.wrong,
            if self.wrong == 0 { "ok" } else { "WRONG" }
        ));
        if let Some((what, i, got, expected)) = self.first {
            println(format_args!(
                "page-table-self-map phase {phase}: first wrong: {what} [{i}] = {got:#x}, expected {expected:#x}"
            ));
        }
        self.wrong == 0
    }
}

fn handler(frame: &mut Frame) {
    if ring3::catch(frame) {
        return;
    }
    if !probe::record(frame) {
        machine::unexpected(frame)
    }
    probe::skip(frame);
}

/// Reads `a` at CPL 0: the #PF error code, or `u64::MAX` when there was no #PF there.
fn read_fault(a: u64) -> u64 {
    let o = probe!("mov {v}, qword ptr [{p}]"; p = in(reg) a, v = out(reg) _,);
    if o.traps == 1 && o.vector == 14 && o.at_insn {
        o.error
    } else {
        u64::MAX
    }
}

// The user program: stores `count` quadwords from `values` at `entries` (PTEs, through the
// self-map or an alias), then for each of the `count` pages from `va` on reads its first
// quadword into `results` and writes `marker + j` at offset 8; `ud2` returns to the kernel.
// Its parameters are at the bottom of the user stack page (RSP - 4096 at entry): count, entries,
// va, marker, then values at +64 and results at +512.
core::arch::global_asm!(
    r#"
.section .utext, "ax"
.global selfmap_user
selfmap_user:
    lea rbx, [rsp - 4096]
    mov rcx, qword ptr [rbx]
    mov rdi, qword ptr [rbx + 8]
    lea r8, [rbx + 64]
.Lselfmap_store:
    mov rax, qword ptr [r8]
    mov qword ptr [rdi], rax
    add r8, 8
    add rdi, 8
    dec rcx
    jnz .Lselfmap_store
    mov rcx, qword ptr [rbx]
    mov rdi, qword ptr [rbx + 16]
    mov rdx, qword ptr [rbx + 24]
    lea r8, [rbx + 512]
.Lselfmap_use:
    mov rax, qword ptr [rdi]
    mov qword ptr [r8], rax
    mov qword ptr [rdi + 8], rdx
    inc rdx
    add r8, 8
    add rdi, 4096
    dec rcx
    jnz .Lselfmap_use
.global selfmap_user_end
selfmap_user_end:
    ud2
.section .text
"#
);

extern "C" {
    fn selfmap_user();
    static selfmap_user_end: u8;
}

const PARAMS_COUNT: u64 = 0;
const PARAMS_ENTRIES: u64 = 8;
const PARAMS_VA: u64 = 16;
const PARAMS_MARKER: u64 = 24;
const PARAMS_VALUES: u64 = 64;
const PARAMS_RESULTS: u64 = 512;

/// Runs the user program over `values.len()` entries at `entries` and pages from `va`; checks
/// that it came back by its `ud2`, read each page's tag and wrote each marker.
fn run_user(c: &mut Checks, entries: u64, values: &[u64], va: u64, marker: u64, pages: &[u64]) {
    let params = ring3::user_stack_top() - 4096;
    wr(params + PARAMS_COUNT, values.len() as u64);
    wr(params + PARAMS_ENTRIES, entries);
    wr(params + PARAMS_VA, va);
    wr(params + PARAMS_MARKER, marker);
    for (i, v) in values.iter().enumerate() {
        wr(params + PARAMS_VALUES + 8 * i as u64, *v);
        wr(params + PARAMS_RESULTS + 8 * i as u64, 0);
    }
    let frame = ring3::enter(selfmap_user, 0x2);
    let end = addr_of!(selfmap_user_end) as u64;
    c.eq("trap vector (6: the ud2 at the end)", 0, frame.vector, 6);
    c.eq("trap rip (the ud2 at the end)", 0, frame.rip, end);
    c.eq("trap cs", 0, frame.cs, u64::from(ring3::USER_CS));
    for (j, &page) in pages.iter().enumerate() {
        let j64 = j as u64;
        c.eq(
            "user read through the new mapping",
            j64,
            rd(params + PARAMS_RESULTS + 8 * j64),
            rd(page),
        );
        c.eq(
            "user write through the new mapping",
            j64,
            rd(page + 8),
            marker + j64,
        );
    }
}

fn phase1(root: u64) -> bool {
    let mut c = Checks::new();
    // The self-map, written as the kernel writes its PML4 before it has one.
    wr(root + 8 * K, root | PTE_P | PTE_W);
    machine::write_cr3(root);
    c.entry(
        "PML4[K] read through K:K:K:K",
        K,
        rd(pml4e_at(K)),
        root | PTE_P | PTE_W,
    );
    c.entry("PML4[0] read through K:K:K:K", 0, rd(pml4e_at(0)), rd(root));

    // A PDPT entry and a PDE through the self-map: a new page directory and page table for VA
    // (user-accessible above the leaves, as most kernels make them; the leaves decide).
    wr(pdpte_at(VA), new_pd() | PTE_P | PTE_W | PTE_U);
    wr(pde_at(VA), new_pt() | PTE_P | PTE_W | PTE_U);
    c.entry(
        "new PDPT entry",
        1,
        rd(pdpte_at(VA)),
        new_pd() | PTE_P | PTE_W | PTE_U,
    );
    c.entry(
        "new PDE (in the new PD)",
        0,
        rd(new_pd()),
        new_pt() | PTE_P | PTE_W | PTE_U,
    );

    // 16 PTE stores in a row to the new table, then a read through each new mapping.
    for i in 0..16u64 {
        wr(pte_at(VA + i * 4096), data(i as usize) | PTE_P | PTE_W);
    }
    for i in 0..16u64 {
        c.entry(
            "PTE in the new table",
            i,
            rd(new_pt() + 8 * i),
            data(i as usize) | PTE_P | PTE_W,
        );
        c.eq("read through a new PTE", i, rd(VA + i * 4096), TAG | i);
    }
    // The table is in use now: 16 stores in a row remap every page to another one, then
    // INVLPG and a read through each.
    for i in 0..16u64 {
        wr(
            pte_at(VA + i * 4096),
            data((i as usize + 5) % 16) | PTE_P | PTE_W,
        );
    }
    for i in 0..16u64 {
        invlpg(VA + i * 4096);
        c.eq(
            "read through a PTE remapped in a burst",
            i,
            rd(VA + i * 4096),
            TAG | ((i + 5) % 16),
        );
    }
    // Remap each page once more: store, INVLPG, read.
    for i in 0..16u64 {
        let to = 15 - i;
        wr(pte_at(VA + i * 4096), data(to as usize) | PTE_P | PTE_W);
        invlpg(VA + i * 4096);
        c.eq(
            "read through a remapped PTE",
            i,
            rd(VA + i * 4096),
            TAG | to,
        );
    }
    // 8 stores in a row to the PML4 through K:K:K:K (a translation that uses only PML4[K]: the
    // table written is the one every step of the store's own walk reads), each slot taking
    // PML4[0]'s PDPT, so slot s aliases the low 512 GiB.
    let pml4_0 = rd(pml4e_at(0));
    for s in 2..10u64 {
        wr(pml4e_at(s), pml4_0);
    }
    for s in 2..10u64 {
        c.entry("PML4 entry", s, rd(root + 8 * s), pml4_0);
        let i = s - 2;
        c.eq(
            "read through a new PML4 slot (identity alias)",
            s,
            rd((s << 39) + data(i as usize)),
            TAG | i,
        );
        c.eq(
            "read through a new PML4 slot (VA alias)",
            s,
            rd((s << 39) + VA + i * 4096),
            TAG | (15 - i),
        );
    }
    // And 8 more clearing them again.
    for s in 2..10u64 {
        wr(pml4e_at(s), 0);
    }
    for s in 2..10u64 {
        invlpg((s << 39) + data((s - 2) as usize));
        invlpg((s << 39) + VA + (s - 2) * 4096);
        c.entry("cleared PML4 entry", s, rd(root + 8 * s), 0);
        c.entry("cleared PML4 entry through K:K:K:K", s, rd(pml4e_at(s)), 0);
        // A read through the cleared slot: #PF(0), a supervisor read of a not-present page.
        let a = (s << 39) + data((s - 2) as usize);
        c.eq(
            "#PF error code of a read through a cleared slot",
            s,
            read_fault(a),
            0,
        );
        c.eq(
            "CR2 of a read through a cleared slot",
            s,
            machine::read_cr2(),
            a,
        );
    }
    c.report(
        "1 (kernel)",
        format_args!(
            "self-map PML4[{K}] (supervisor); a PDPT entry and a PDE, 16 PTE stores in a row then 16 reads, 16 remapping stores in a row then INVLPG and 16 reads, 16 remaps each with INVLPG and a read, 8+8 stores in a row to the PML4 through its own self-map with reads through the 8 new slots and a #PF through each cleared one"
        ),
    )
}

fn phase2(root: u64) -> bool {
    let mut c = Checks::new();
    // The kernel makes the self-map user-accessible by a store to PML4[K] through K:K:K:K: the
    // store's translation goes through the very entry it rewrites.
    wr(pml4e_at(K), root | PTE_P | PTE_W | PTE_U);
    machine::write_cr3(root);
    c.entry("PML4[K]", K, rd(root + 8 * K), root | PTE_P | PTE_W | PTE_U);
    // The user program maps USER_DATA[0..8] at VA + (32 + j) * 4096 through the self-map.
    let mut values = [0u64; 8];
    let mut pages = [0u64; 8];
    for j in 0..8 {
        values[j] = user_data(j) | PTE_P | PTE_W | PTE_U;
        pages[j] = user_data(j);
    }
    run_user(
        &mut c,
        pte_at(VA + 32 * 4096),
        &values,
        VA + 32 * 4096,
        0xA11C_E000,
        &pages,
    );
    for (j, v) in values.iter().enumerate() {
        c.entry(
            "PTE the user stored",
            32 + j as u64,
            rd(new_pt() + 8 * (32 + j as u64)),
            *v,
        );
    }
    c.report(
        "2 (user)",
        format_args!(
            "self-map made user-accessible by a store through itself; 8 PTE stores in a row at CPL 3 through the self-map, then a read and a write through each new mapping"
        ),
    )
}

fn phase3() -> bool {
    let mut c = Checks::new();
    // The page table itself, mapped at VA + 48 * 4096 by a store through the self-map.
    let alias = VA + 48 * 4096;
    wr(pte_at(alias), new_pt() | PTE_P | PTE_W);
    c.entry(
        "alias PTE",
        48,
        rd(new_pt() + 8 * 48),
        new_pt() | PTE_P | PTE_W,
    );
    for i in 0..16u64 {
        c.entry(
            "read the table through the alias",
            i,
            rd(alias + 8 * i),
            rd(new_pt() + 8 * i),
        );
    }
    // 8 stores in a row through the alias (each one's walk reads entry 48 of the table written).
    for i in 0..8u64 {
        wr(alias + 8 * (49 + i), data(i as usize) | PTE_P | PTE_W);
    }
    for i in 0..8u64 {
        c.entry(
            "PTE stored through the alias",
            49 + i,
            rd(new_pt() + 8 * (49 + i)),
            data(i as usize) | PTE_P | PTE_W,
        );
        c.eq(
            "read through a PTE stored through the alias",
            49 + i,
            rd(VA + (49 + i) * 4096),
            TAG | i,
        );
    }
    // The last store through the alias rewrites the alias's own PTE: afterwards it maps a data
    // page.
    wr(alias + 8 * 48, data(9) | PTE_P | PTE_W);
    invlpg(alias);
    c.entry(
        "alias PTE rewritten through the alias",
        48,
        rd(new_pt() + 8 * 48),
        data(9) | PTE_P | PTE_W,
    );
    c.eq("read through the rewritten alias", 48, rd(alias), TAG | 9);
    c.report(
        "3 (kernel)",
        format_args!(
            "a PTE store through the self-map maps the page table at VA+48 pages; 8 PTE stores in a row through that alias then reads through them; a store through the alias to its own PTE, then a read"
        ),
    )
}

fn phase4() -> bool {
    let mut c = Checks::new();
    // A user-accessible alias of the page table at VA + 64 * 4096 (a store through the
    // self-map), through which the user program maps USER_DATA[8..16] at VA + (65 + j) pages.
    let alias = VA + 64 * 4096;
    wr(pte_at(alias), new_pt() | PTE_P | PTE_W | PTE_U);
    let mut values = [0u64; 8];
    let mut pages = [0u64; 8];
    for j in 0..8 {
        values[j] = user_data(8 + j) | PTE_P | PTE_W | PTE_U;
        pages[j] = user_data(8 + j);
    }
    run_user(
        &mut c,
        alias + 8 * 65,
        &values,
        VA + 65 * 4096,
        0xA11A_5000,
        &pages,
    );
    for (j, v) in values.iter().enumerate() {
        c.entry(
            "PTE the user stored through the alias",
            65 + j as u64,
            rd(new_pt() + 8 * (65 + j as u64)),
            *v,
        );
    }
    c.report(
        "4 (user)",
        format_args!(
            "a user-accessible alias of the page table; 8 PTE stores in a row at CPL 3 through it (their walk reads the table they write), then a read and a write through each new mapping"
        ),
    )
}

#[no_mangle]
extern "C" fn _start() -> ! {
    let pt = ring3::setup(handler);
    for i in 0..16 {
        wr(data(i), TAG | i as u64);
        wr(user_data(i), TAG | 0x100 | i as u64);
    }
    println(format_args!(
        "page-table-self-map: PML4 at {:#x}, self-map slot {K} ({:#x}), new PD {:#x}, new PT {:#x}, mappings at {VA:#x}",
        pt.root,
        la(K, 0, 0, 0, 0),
        new_pd(),
        new_pt()
    ));
    let results = [phase1(pt.root), phase2(pt.root), phase3(), phase4()];
    let wrong = results.iter().filter(|ok| !**ok).count();
    println(format_args!(
        "page-table-self-map: {} phases, {wrong} wrong",
        results.len()
    ));
    exit(if wrong == 0 {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
