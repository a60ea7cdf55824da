//! Segment and system-register loads of bad descriptors at CPL 0 (SDM Vol. 2B, MOV, LLDT, LTR;
//! Vol. 3 §3.4, §5.5..5.6): the guest loads its own GDT with, besides the usual kernel and user
//! segments and a TSS, an absent data segment (0x38), an execute-only code segment (0x40) and a
//! read-only data segment (0x48), limit 0x57, and loads a null LDTR. Each probe loads one selector and
//! the CPU must answer with the fault its checks give, the error code the selector with RPL
//! cleared, at the instruction:
//!
//! | probe | answer |
//! |---|---|
//! | `mov ds` 0x38 (absent) | #NP(0x38) |
//! | `mov ss` 0x38 (absent) | #SS(0x38) |
//! | `mov ds` 0x58 (beyond the GDT limit) | #GP(0x58) |
//! | `mov ds` 0x40 (execute-only code) | #GP(0x40) |
//! | `mov ss` 0x48 (read-only data) | #GP(0x48) |
//! | `mov ds` 0x28 (the TSS, a system descriptor) | #GP(0x28) |
//! | `mov ds` 0x0c (TI = 1, LDTR null) | #GP(0x0c) |
//! | `lldt` 0x10 (a data segment) | #GP(0x10) |
//! | `lldt` 0x58 (beyond the limit) | #GP(0x58) |
//! | `ltr` 0x10 (a data segment) | #GP(0x10) |
//!
//! A VMM that keeps shadow descriptor tables (rewriting DPLs so a guest kernel can run at Ring 3)
//! must keep every one of these answers, and never load a descriptor the guest did not make
//! valid. Expected outcome, natively and under the VMM: every probe `-> ok`,
//! `descriptor-attacks: 10 checks, 0 wrong`, exit success.
#![no_std]
#![no_main]

use test_guests::machine::{self, code64, data};
use test_guests::{probe, ring3};

/// P (bit 47), R for code / W for data (bit 41).
const DESC_P: u64 = 1 << 47;
const DESC_RW: u64 = 1 << 41;

const NP: u64 = 11;
const SS: u64 = 12;
const GP: u64 = 13;

/// The register a probe loads.
#[derive(Clone, Copy)]
enum Load {
    Ds,
    Ss,
    Ldtr,
    Tr,
}

/// Puts DS and SS back to the kernel's data segment (after a probe that should have faulted).
fn restore_segments() {
    // SAFETY: 0x10 is the kernel data segment of the loaded GDT.
    unsafe {
        core::arch::asm!("mov ds, {0:e}", "mov ss, {0:e}", in(reg) 0x10u32, options(nostack))
    };
}

#[no_mangle]
extern "C" fn _start() -> ! {
    ring3::setup(probe::handler);
    let tss = machine::tss_descriptor(machine::tss_base());
    let gdt = [
        0,
        code64(0),
        data(0),
        data(3),
        code64(3),
        tss[0],
        tss[1],
        data(0) & !DESC_P,
        code64(0) & !DESC_RW,
        data(0) & !DESC_RW,
        0,
    ];
    machine::load_gdt(&gdt, ring3::KERNEL_CS, ring3::KERNEL_DS);
    // A null LDTR (natively it still holds its reset value: base 0, limit 0xFFFF).
    // SAFETY: loading the null selector only marks the LDTR unusable.
    unsafe { core::arch::asm!("lldt {0:x}", in(reg) 0u16, options(nostack)) };
    for (name, load, sel, vector) in [
        (
            "descriptor-attacks mov ds, 0x38 (absent)",
            Load::Ds,
            0x38u16,
            NP,
        ),
        (
            "descriptor-attacks mov ss, 0x38 (absent)",
            Load::Ss,
            0x38,
            SS,
        ),
        (
            "descriptor-attacks mov ds, 0x58 (beyond the limit)",
            Load::Ds,
            0x58,
            GP,
        ),
        (
            "descriptor-attacks mov ds, 0x40 (execute-only code)",
            Load::Ds,
            0x40,
            GP,
        ),
        (
            "descriptor-attacks mov ss, 0x48 (read-only data)",
            Load::Ss,
            0x48,
            GP,
        ),
        (
            "descriptor-attacks mov ds, 0x28 (the TSS)",
            Load::Ds,
            0x28,
            GP,
        ),
        (
            "descriptor-attacks mov ds, 0x0c (TI = 1, null LDTR)",
            Load::Ds,
            0x0c,
            GP,
        ),
        (
            "descriptor-attacks lldt 0x10 (data segment)",
            Load::Ldtr,
            0x10,
            GP,
        ),
        (
            "descriptor-attacks lldt 0x58 (beyond the limit)",
            Load::Ldtr,
            0x58,
            GP,
        ),
        (
            "descriptor-attacks ltr 0x10 (data segment)",
            Load::Tr,
            0x10,
            GP,
        ),
    ] {
        let outcome = match load {
            Load::Ds => probe!("mov ds, {s:e}"; s = in(reg) u32::from(sel),),
            Load::Ss => probe!("mov ss, {s:e}"; s = in(reg) u32::from(sel),),
            Load::Ldtr => probe!("lldt {s:x}"; s = in(reg) sel,),
            Load::Tr => probe!("ltr {s:x}"; s = in(reg) sel,),
        };
        restore_segments();
        probe::check(
            name,
            outcome,
            Some((vector, u64::from(sel))),
            true,
            format_args!(""),
        );
    }
    probe::finish("descriptor-attacks")
}
