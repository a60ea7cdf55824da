//! Self-modifying code, where a VMM could run stale instructions: bytes it decodes on every
//! trap, a write by an *emulated* instruction over the instruction after it, and a code page
//! remapped by a PTE store that traps. The CPU runs the modified code once the store is done
//! (SDM Vol. 3 §11.6: a write to a code byte of the next instructions is detected; §4.10.4.1:
//! INVLPG is serializing, so the fetch after it uses the new translation).
//!
//! | phase | what | expected |
//! |---|---|---|
//! | `patch-immediate` | a `mov eax, imm32; ret` in a data page, called, its immediate rewritten, called again | 1, then 2 |
//! | `patch-privileged` | `mov rax, cr0; ret` (traps under the VMM), rewritten to `mov rax, cr4; ret` | CR0, then CR4 |
//! | `sgdt-over-next` | `sgdt [next]` over the 10 bytes after it, which were `ud2`s: with the GDT limit 0x08EB they become `jmp +8` and the GDT base (SGDT is emulated under the VMM: CR4.UMIP) | the `jmp` runs, not a `ud2` |
//! | `remap-code-page` | code at a linear page stores a new PTE for that very page (to a copy whose `mov eax, 1` says 2), INVLPGs it and goes on: the next instruction is fetched from the copy (under the VMM the store and the INVLPG trap) | 2 |
//!
//! Expected outcome, natively and under the VMM: each phase `-> ok`,
//! `self-modifying-code: 4 checks, 0 wrong`, exit success. `skip=sgdt-over-next` leaves that
//! phase out: under `backend=svm` QEMU 7.2's TCG runs the stale `ud2` (SGDT is not intercepted
//! there, so the store is the CPU's own; a quirk of the emulated SVM, named in tests/svm.rs).
#![no_std]
#![no_main]

use test_guests::machine::{self, Page, PTE_P, PTE_W};
use test_guests::{println, probe, ring3};

/// Code copied into data pages and run from there.
static mut CODE: Page = Page::zeroed();
/// The two frames of `remap-code-page`.
static mut FRAME_A: Page = Page::zeroed();
static mut FRAME_B: Page = Page::zeroed();
/// Where `remap-code-page` maps its code: outside the identity map.
const REMAPPED: u64 = 0x4000_0000;

/// A GDT large enough for the limit 0x08EB (the bytes `EB 08`: `jmp +8`).
#[repr(C, align(16))]
struct BigGdt([u64; 0x120]);
static mut BIG_GDT: BigGdt = BigGdt([0; 0x120]);
const JMP_LIMIT: u16 = 0x08EB;

core::arch::global_asm!(
    r#"
.section .text
// rdi = the PTE of REMAPPED, rsi = the new PTE, rdx = REMAPPED; returns eax.
.global remap_snippet
remap_snippet:
    mov qword ptr [rdi], rsi
    invlpg [rdx]
.global remap_snippet_imm
remap_snippet_imm:
    mov eax, 1
    ret
.global remap_snippet_end
remap_snippet_end:
"#
);

extern "C" {
    static remap_snippet: u8;
    static remap_snippet_imm: u8;
    static remap_snippet_end: u8;
}

fn code_page() -> *mut u8 {
    core::ptr::addr_of_mut!(CODE) as *mut u8
}

/// Calls the code at `at` (`extern "C" fn() -> u64`).
fn call(at: u64) -> u64 {
    // SAFETY: the caller put a complete function there (ending in `ret`), in a mapped page.
    let f = unsafe { core::mem::transmute::<u64, extern "C" fn() -> u64>(at) };
    f()
}

fn write_code(bytes: &[u8]) {
    // SAFETY: CODE is a page of our own; the bytes fit.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), code_page(), bytes.len()) };
}

fn patch_immediate() {
    write_code(&[0xB8, 1, 0, 0, 0, 0xC3]); // mov eax, 1; ret
    let first = call(code_page() as u64) as u32;
    write_code(&[0xB8, 2, 0, 0, 0, 0xC3]); // mov eax, 2; ret
    let second = call(code_page() as u64) as u32;
    probe::check(
        "self-modifying-code patch-immediate",
        probe::Outcome::NO_FAULT,
        None,
        (first, second) == (1, 2),
        format_args!("returned {first} then {second}"),
    );
}

fn patch_privileged() {
    write_code(&[0x0F, 0x20, 0xC0, 0xC3]); // mov rax, cr0; ret
    let cr0 = call(code_page() as u64);
    write_code(&[0x0F, 0x20, 0xE0, 0xC3]); // mov rax, cr4; ret
    let cr4 = call(code_page() as u64);
    let ok = cr0 == machine::read_cr0() && cr4 == machine::read_cr4() && cr0 != cr4;
    probe::check(
        "self-modifying-code patch-privileged",
        probe::Outcome::NO_FAULT,
        None,
        ok,
        format_args!("returned CR0 then CR4: {}", ok),
    );
}

fn sgdt_over_next() {
    // The running GDT, copied into a table as long as the limit, then loaded with that limit.
    let mut old = [0u8; 10];
    // SAFETY: SGDT stores 10 bytes into `old`.
    unsafe { core::arch::asm!("sgdt [{0}]", in(reg) old.as_mut_ptr(), options(nostack)) };
    let limit = u16::from_le_bytes([old[0], old[1]]);
    let base = u64::from_le_bytes(old[2..].try_into().unwrap_or([0; 8]));
    let big = core::ptr::addr_of_mut!(BIG_GDT) as *mut u8;
    // SAFETY: the old table is `limit + 1` bytes at `base`; BIG_GDT is longer.
    unsafe { core::ptr::copy_nonoverlapping(base as *const u8, big, usize::from(limit) + 1) };
    let mut pointer = [0u8; 10];
    pointer[..2].copy_from_slice(&JMP_LIMIT.to_le_bytes());
    pointer[2..].copy_from_slice(&(big as u64).to_le_bytes());
    // SAFETY: the same descriptors at the same selectors, in a longer table.
    unsafe { core::arch::asm!("lgdt [{0}]", in(reg) pointer.as_ptr(), options(nostack)) };
    // The 10 bytes after the SGDT are `ud2`s until it stores the limit and base over them.
    let outcome = probe!(
        "sgdt [rip + 92f]",
        "92:",
        "ud2", "ud2", "ud2", "ud2", "ud2";
    );
    probe::check(
        "self-modifying-code sgdt-over-next",
        outcome,
        None,
        true,
        format_args!("the stored limit 0x{JMP_LIMIT:04x} ran as `jmp +8`"),
    );
    let restore = old;
    // SAFETY: the GDT that was running before.
    unsafe { core::arch::asm!("lgdt [{0}]", in(reg) restore.as_ptr(), options(nostack)) };
}

fn remap_code_page(pt: &machine::PageTables) {
    let start = core::ptr::addr_of!(remap_snippet) as usize;
    let len = core::ptr::addr_of!(remap_snippet_end) as usize - start;
    let imm = core::ptr::addr_of!(remap_snippet_imm) as usize - start + 1;
    let (a, b) = (
        core::ptr::addr_of_mut!(FRAME_A) as *mut u8,
        core::ptr::addr_of_mut!(FRAME_B) as *mut u8,
    );
    for frame in [a, b] {
        // SAFETY: a page of our own; the snippet is `len` bytes of our code.
        unsafe { core::ptr::copy_nonoverlapping(start as *const u8, frame, len) };
    }
    let immediate = b.wrapping_add(imm);
    // SAFETY: `imm` is the offset of the copy's `mov eax, 1` immediate, inside the page.
    unsafe { immediate.write(2) };
    pt.map(REMAPPED, a as u64, PTE_P | PTE_W);
    // SAFETY: invalidates our own new mapping.
    unsafe { core::arch::asm!("invlpg [{0}]", in(reg) REMAPPED, options(nostack)) };
    let pte = pt.pte(REMAPPED) as u64;
    let new_pte = b as u64 | PTE_P | PTE_W;
    let got: u64;
    // SAFETY: the code at REMAPPED is the snippet (in A, then B after its own store): it
    // stores the PTE, invalidates the page and returns EAX; RDI, RSI, RDX are its arguments.
    unsafe {
        core::arch::asm!(
            "call {f}",
            f = in(reg) REMAPPED,
            in("rdi") pte,
            in("rsi") new_pte,
            in("rdx") REMAPPED,
            lateout("rax") got,
            clobber_abi("C"),
        )
    };
    probe::check(
        "self-modifying-code remap-code-page",
        probe::Outcome::NO_FAULT,
        None,
        got == 2,
        format_args!("returned {got} (1: the old page's instruction ran)"),
    );
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let cmdline = unsafe { machine::cmdline(info) };
    let skip_sgdt = cmdline
        .split_whitespace()
        .any(|w| w == "skip=sgdt-over-next");
    let pt = ring3::setup(probe::handler);
    patch_immediate();
    patch_privileged();
    if skip_sgdt {
        println(format_args!("self-modifying-code sgdt-over-next: skipped"));
    } else {
        sgdt_over_next();
    }
    remap_code_page(&pt);
    probe::finish("self-modifying-code")
}
