//! `int n` at CPL 0 through bad IDT gates (SDM Vol. 2B, INT n, 64-bit mode; Vol. 3 §6.14): the
//! guest breaks one gate per probe in its own IDT (read back with SIDT) and the CPU must refuse
//! the delivery with the fault its checks give, at the INT instruction:
//!
//! | gate | answer |
//! |---|---|
//! | 0x81 not present | #NP(0x40a): the vector's IDT index (0x81 * 8), IDT bit set |
//! | 0x82 a call gate (not an interrupt or trap gate) | #GP(0x412) |
//! | 0x83 selector 0x10, a data segment | #GP(0x10) |
//! | 0x84 selector 0x40, beyond the GDT limit (0x37) | #GP(0x40) |
//! | 0x85 the null selector | #GP(0) |
//!
//! QEMU's TCG (natively) gets the error code of the first two wrong (vector * 16 + 2: 0x812,
//! 0x822); the guest accepts that as a named quirk (a `quirk:` line).
//!
//! A VMM that delivers a guest kernel's software interrupts through the guest's IDT itself must
//! make every one of these checks, or it would jump through a gate the CPU refuses. Expected
//! outcome, natively and under the VMM: every probe `-> ok`, `idt-gate-attacks: 5 checks, 0
//! wrong`, exit success.
#![no_std]
#![no_main]

use test_guests::{probe, ring3};

/// The IDT's base (SIDT).
fn idt_base() -> u64 {
    let mut pointer = [0u8; 10];
    // SAFETY: SIDT stores 10 bytes into `pointer`.
    unsafe { core::arch::asm!("sidt [{}]", in(reg) pointer.as_mut_ptr(), options(nostack)) };
    let mut base = [0u8; 8];
    base.copy_from_slice(&pointer[2..]);
    u64::from_le_bytes(base)
}

/// Rewrites the low quadword of gate `vector` with `f`.
fn change_gate(vector: u64, f: impl FnOnce(u64) -> u64) {
    let gate = (idt_base() + 16 * vector) as *mut u64;
    // SAFETY: the IDT is this guest's (identity-mapped, 256 gates); the gate is not in use.
    let old = unsafe { gate.read_volatile() };
    // SAFETY: as above.
    unsafe { gate.write_volatile(f(old)) };
}

/// Gate bits: P (bit 47), the type (bits 43:40), the selector (bits 31:16).
const GATE_P: u64 = 1 << 47;
const GATE_TYPE: u64 = 0xF << 40;
const CALL_GATE: u64 = 0xC << 40;
const GATE_SELECTOR: u64 = 0xFFFF << 16;

/// The named quirk: QEMU's TCG's error code for a gate it refuses.
const TCG_GATE_INDEX: &str =
    "QEMU's TCG puts vector * 16 + 2 in the error code, the CPU vector * 8 + 2 (SDM Vol. 3 §6.13)";

#[no_mangle]
extern "C" fn _start() -> ! {
    ring3::setup(probe::handler);
    change_gate(0x81, |g| g & !GATE_P);
    change_gate(0x82, |g| (g & !GATE_TYPE) | CALL_GATE);
    change_gate(0x83, |g| (g & !GATE_SELECTOR) | (0x10 << 16));
    change_gate(0x84, |g| (g & !GATE_SELECTOR) | (0x40 << 16));
    change_gate(0x85, |g| g & !GATE_SELECTOR);
    probe::check_quirk(
        "idt-gate-attacks int 0x81 (not present)",
        probe!("int 0x81";),
        Some((11, 0x40a)),
        Some((11, 0x812)),
        TCG_GATE_INDEX,
    );
    probe::check_quirk(
        "idt-gate-attacks int 0x82 (a call gate)",
        probe!("int 0x82";),
        Some((13, 0x412)),
        Some((13, 0x822)),
        TCG_GATE_INDEX,
    );
    probe::check(
        "idt-gate-attacks int 0x83 (selector of a data segment)",
        probe!("int 0x83";),
        Some((13, 0x10)),
        true,
        format_args!(""),
    );
    probe::check(
        "idt-gate-attacks int 0x84 (selector beyond the GDT limit)",
        probe!("int 0x84";),
        Some((13, 0x40)),
        true,
        format_args!(""),
    );
    probe::check(
        "idt-gate-attacks int 0x85 (null selector)",
        probe!("int 0x85";),
        Some((13, 0)),
        true,
        format_args!(""),
    );
    probe::finish("idt-gate-attacks")
}
