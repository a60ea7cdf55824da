//! A far CALL through an LDT selector after `lldt 0`, with a call gate planted where the LDTR's
//! *reset* value points: an escape attempt against a VMM that never loads the real LDTR.
//!
//! At reset the LDTR is usable, with base 0 and limit 0xFFFF (SDM Vol. 3 §10.1.1, Table 10-1).
//! A trap-and-emulate VMM keeps the real LDTR null so that every LDT selector traps and is
//! checked against the guest's *virtual* LDT (vmm-core `cpu::shadow_gdt`). If the host never
//! executes `lldt` itself, the real LDTR keeps its reset value, and the real CPU resolves a guest
//! LDT selector through linear addresses 0..0xFFFF of the guest's own address space — the VMM's
//! virtual LDTR (null after the guest's `lldt 0`, which the VMM emulates) is never consulted. A
//! guest then writes a 64-bit call gate there whose target is the host's own code selector and
//! whose offset is guest code, and a far CALL runs that code at the real CPL 0.
//!
//! The guest: `lldt 0` (no LDT, as a kernel that uses none says), a call gate (DPL 3, to
//! selector 0xFFE0 — the host code selector of this VMM's real GDT — at `payload`) written at
//! linear 0x8 (LDT index 1), then `call far [m16:64]` with selector 0x0F (index 1, TI = 1,
//! RPL 3). The payload, if it ever runs, writes `[guest] ESCAPED: ...` to COM1 itself and stops
//! the machine through the exit port with code 0x77.
//!
//! Expected outcome (SDM Vol. 3 §3.4.2: a TI = 1 selector with a null LDTR is #GP): #GP(0x0c)
//! at the CALL, natively and under the VMM; `ldt-reset-value: 1 checks, 0 wrong`, exit success.
#![no_std]
#![no_main]

use test_guests::{probe, ring3};

/// The host code selector of this VMM's real GDT (vmm-core `cpu::shadow_gdt::HOST_CODE`).
const HOST_CODE: u16 = 0xFFE0;
/// LDT index 1, TI = 1, RPL 3.
const LDT_GATE: u16 = 0x0F;

core::arch::global_asm!(
    r#"
.section .text
.global ldt_escape_payload
ldt_escape_payload:
    cli
    lea rsi, [rip + 2f]
    mov dx, 0x3f8
1:
    lodsb
    test al, al
    jz 3f
    out dx, al
    jmp 1b
3:
    mov eax, 0x77
    out 0xf4, eax
    hlt
    jmp 3b
2:
    .asciz "[guest] ESCAPED: guest code runs at the real CPL 0 through a call gate in the reset LDT\n"
.section .rodata
.global ldt_gate_pointer
ldt_gate_pointer:
    .quad 0
    .word {sel}
"#,
    sel = const LDT_GATE,
);

extern "C" {
    fn ldt_escape_payload();
    static ldt_gate_pointer: u8;
}

#[no_mangle]
extern "C" fn _start() -> ! {
    ring3::setup(probe::handler);
    // SAFETY: the null selector only marks the LDTR unusable.
    unsafe { core::arch::asm!("lldt {0:x}", in(reg) 0u16, options(nostack)) };
    let offset = ldt_escape_payload as *const () as u64;
    // A 64-bit call gate (type 0xC, DPL 3, present) to HOST_CODE:offset (§5.8.3.1).
    let gate = [
        (offset & 0xFFFF)
            | (u64::from(HOST_CODE) << 16)
            | (0xC << 40)
            | (3 << 45)
            | (1 << 47)
            | (((offset >> 16) & 0xFFFF) << 48),
        offset >> 32,
    ];
    // Linear 0x8..0x18 lies in the identity-mapped, writable first page of the guest's own
    // memory, which nothing else uses (LDT index 1 of an LDT at base 0).
    let slot = core::ptr::without_provenance_mut::<[u64; 2]>(0x8);
    // SAFETY: as above; 8-byte aligned.
    unsafe { slot.write_volatile(gate) };
    let pointer = core::ptr::addr_of!(ldt_gate_pointer) as u64;
    // REX.W FF /3 with ModRM 0x19: CALL m16:64 at [RCX] (written out: assemblers disagree on
    // the mnemonic).
    let outcome = probe!(".byte 0x48, 0xff, 0x19"; in("rcx") pointer,);
    probe::check(
        "ldt-reset-value call far 0x0f (a gate at linear 0x8, LDTR null)",
        outcome,
        Some((13, 0x0c)),
        true,
        format_args!(""),
    );
    probe::finish("ldt-reset-value")
}
