//! `probe`: what a kernel can observe about its own privilege, one `probe,<name>,<value>` line
//! each.
//!
//! Natively these are the Ring-0 values. Under a trap-and-emulate VMM the OS really runs at
//! CPL 3, and every instruction here that does not trap shows it: the article's ring-aliasing
//! problem made visible (`mov r, cs`, `pushf`, `lar`/`lsl`/`verr`/`verw` are not privileged;
//! `sgdt`/`sidt`/`sldt`/`str`/`smsw` are only if CR4.UMIP is set; CPUID may reveal a
//! hypervisor). None of this is used by the self-test, which must pass under the VMM too.

use crate::arch::{self, DescriptorTablePointer};
use crate::{gdt, println, trap};
use core::arch::asm;

/// Prints every probe; always succeeds.
pub fn run() -> bool {
    let (cs, ss) = segment_selectors();
    println!("probe,cs_selector,{cs:#x}");
    println!("probe,cs_rpl,{}", cs & 3);
    println!("probe,ss_selector,{ss:#x}");
    println!("probe,ss_rpl,{}", ss & 3);

    let saved = arch::rflags();
    arch::cli();
    let if_after_cli = arch::rflags() & arch::RFLAGS_IF != 0;
    arch::set_rflags(saved | arch::RFLAGS_IF);
    let if_after_popf = arch::rflags() & arch::RFLAGS_IF != 0;
    arch::cli();
    arch::set_rflags(saved & !arch::RFLAGS_IF);
    let if_kept_clear_by_popf = arch::rflags() & arch::RFLAGS_IF == 0;
    arch::sti();
    println!("probe,pushf_if_after_cli,{}", if_after_cli as u8);
    println!("probe,popf_sets_if,{}", if_after_popf as u8);
    println!("probe,popf_clears_if,{}", if_kept_clear_by_popf as u8);

    let (gdt_base, gdt_limit) = gdt::gdtr();
    let sgdt = sgdt();
    let sgdt_base = sgdt.base;
    let sgdt_limit = sgdt.limit;
    println!("probe,sgdt_limit,{sgdt_limit:#x}");
    println!("probe,sgdt_base_is_own,{}", (sgdt_base == gdt_base) as u8);
    println!(
        "probe,sgdt_limit_is_own,{}",
        (sgdt_limit == gdt_limit) as u8
    );
    let (idt_base, idt_limit) = trap::idtr();
    let sidt = sidt();
    let sidt_base = sidt.base;
    let sidt_limit = sidt.limit;
    println!("probe,sidt_limit,{sidt_limit:#x}");
    println!("probe,sidt_base_is_own,{}", (sidt_base == idt_base) as u8);
    println!(
        "probe,sidt_limit_is_own,{}",
        (sidt_limit == idt_limit) as u8
    );
    println!("probe,sldt,{:#x}", sldt());
    println!("probe,str,{:#x}", str_selector());
    println!("probe,smsw,{:#x}", smsw());

    // The selectors of the layout in force (`gdt=`), and the first one past its limit, which
    // no descriptor backs. The `selector_*` lines say which selector the next four lines are
    // about, so runs under different layouts still compare line by line.
    let layout = gdt::layout();
    println!("probe,gdt_layout,{}", layout.name);
    for (name, selector) in [
        ("kernel_code", layout.kernel_code),
        ("kernel_data", layout.kernel_data),
        ("user_code", layout.user_code),
        ("user_data", layout.user_data),
        ("tss", layout.tss),
        ("beyond_limit", layout.beyond_limit()),
    ] {
        println!("probe,selector_{name},{selector:#x}");
        match lar(selector) {
            Some(v) => println!("probe,lar_{name},{v:#x}"),
            None => println!("probe,lar_{name},invalid"),
        }
        match lsl(selector) {
            Some(v) => println!("probe,lsl_{name},{v:#x}"),
            None => println!("probe,lsl_{name},invalid"),
        }
        println!("probe,verr_{name},{}", verr(selector) as u8);
        println!("probe,verw_{name},{}", verw(selector) as u8);
    }

    let (_, _, ecx, _) = arch::cpuid(1, 0);
    println!("probe,cpuid_hypervisor_bit,{}", (ecx >> 31) & 1);
    let (max, b, c, d) = arch::cpuid(0x4000_0000, 0);
    let mut sig = [0u8; 12];
    sig[..4].copy_from_slice(&b.to_le_bytes());
    sig[4..8].copy_from_slice(&c.to_le_bytes());
    sig[8..].copy_from_slice(&d.to_le_bytes());
    for byte in sig.iter_mut() {
        if !byte.is_ascii_graphic() {
            *byte = b'.';
        }
    }
    println!("probe,cpuid_40000000_eax,{max:#x}");
    println!(
        "probe,cpuid_40000000_signature,{}",
        core::str::from_utf8(&sig).unwrap_or("?")
    );
    true
}

/// `mov r, cs` and `mov r, ss`: never trap, so they show the real RPL.
fn segment_selectors() -> (u16, u16) {
    let (cs, ss): (u16, u16);
    // SAFETY: reading segment registers has no side effects.
    unsafe {
        asm!("mov {0:x}, cs", "mov {1:x}, ss", out(reg) cs, out(reg) ss,
             options(nomem, nostack, preserves_flags))
    };
    (cs, ss)
}

fn sgdt() -> DescriptorTablePointer {
    let mut d = DescriptorTablePointer::default();
    // SAFETY: stores 10 bytes into `d`.
    unsafe { asm!("sgdt [{}]", in(reg) &raw mut d, options(nostack, preserves_flags)) };
    d
}

fn sidt() -> DescriptorTablePointer {
    let mut d = DescriptorTablePointer::default();
    // SAFETY: stores 10 bytes into `d`.
    unsafe { asm!("sidt [{}]", in(reg) &raw mut d, options(nostack, preserves_flags)) };
    d
}

fn sldt() -> u16 {
    let v: u16;
    // SAFETY: reads the LDTR selector.
    unsafe { asm!("sldt {0:x}", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

fn str_selector() -> u16 {
    let v: u16;
    // SAFETY: reads the task register's selector.
    unsafe { asm!("str {0:x}", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

fn smsw() -> u64 {
    let v: u64;
    // SAFETY: reads the low bits of CR0.
    unsafe { asm!("smsw {}", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v & 0xFFFF
}

/// `lar`: the access-rights bytes of a descriptor, if the CPU considers it visible at the
/// current CPL/RPL (ZF = 1).
fn lar(selector: u16) -> Option<u64> {
    let (v, ok): (u64, u8);
    // SAFETY: lar only reads the descriptor table.
    unsafe {
        asm!("xor {0:e}, {0:e}", "lar {0}, {1}", "setz {2}", out(reg) v, in(reg) selector as u64,
             out(reg_byte) ok, options(nostack))
    };
    (ok != 0).then_some(v)
}

/// `lsl`: the segment limit, if visible (ZF = 1).
fn lsl(selector: u16) -> Option<u64> {
    let (v, ok): (u64, u8);
    // SAFETY: lsl only reads the descriptor table.
    unsafe {
        asm!("xor {0:e}, {0:e}", "lsl {0}, {1}", "setz {2}", out(reg) v, in(reg) selector as u64,
             out(reg_byte) ok, options(nostack))
    };
    (ok != 0).then_some(v)
}

/// `verr`: readable at the current privilege?
fn verr(selector: u16) -> bool {
    let ok: u8;
    // SAFETY: verr only reads the descriptor table.
    unsafe { asm!("verr {0:x}", "setz {1}", in(reg) selector, out(reg_byte) ok, options(nostack)) };
    ok != 0
}

/// `verw`: writable at the current privilege?
fn verw(selector: u16) -> bool {
    let ok: u8;
    // SAFETY: verw only reads the descriptor table.
    unsafe { asm!("verw {0:x}", "setz {1}", in(reg) selector, out(reg_byte) ok, options(nostack)) };
    ok != 0
}
