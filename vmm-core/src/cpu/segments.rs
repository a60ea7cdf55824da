//! Segment loads and far transfers checked against the guest's virtual GDT/LDT: MOV/POP to a
//! segment register (SDM Vol. 2 "MOV", "POP"), far RET/JMP/CALL, and IRET (Vol. 2 "IRET", Vol. 3
//! §5.8, §6.14.3).
//!
//! Article challenge "特权级压缩": the guest kernel's selectors have RPL 0 but it really runs at
//! CPL 3, so each of these faults on the real GDT (a shadow of the guest's in which only its
//! current CS and SS are present, `shadow_gdt`) and is redone here at the *virtual* CPL.

use super::descriptor::{is_null_selector, Descriptor};
use super::event::{CpuStop, Event};
use super::memory::{read_obj, read_value, write_value, Fault, GuestMemory};
use super::state::{rflags, Gpr, SegReg, Segment, VCpu};
use shadow_mmu::addr::is_canonical;
use shadow_mmu::Privilege;

/// A descriptor read from a table, with where it lives (for the busy bit of LTR).
#[derive(Clone, Copy, Debug)]
pub struct TableEntry {
    /// The decoded descriptor.
    pub descriptor: Descriptor,
    /// Linear address of its first byte.
    pub address: u64,
    /// Its first quadword as stored.
    pub raw: u64,
}

/// Reads the 8-byte descriptor `selector` names in the GDT or (TI = 1) the LDT. An index past
/// the table limit is #GP(selector).
pub fn read_descriptor<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    selector: u16,
) -> Result<TableEntry, Fault> {
    let (base, limit) = if selector & 4 != 0 {
        if is_null_selector(cpu.ldtr.selector) {
            return Err(Event::gp(u32::from(selector & !3)).into());
        }
        (cpu.ldtr.cache.base, u64::from(cpu.ldtr.cache.limit))
    } else {
        (cpu.gdtr.base, u64::from(cpu.gdtr.limit))
    };
    let offset = u64::from(selector & !7);
    if offset + 7 > limit {
        return Err(Event::gp(u32::from(selector & !3)).into());
    }
    let address = base.wrapping_add(offset);
    let raw: u64 = read_obj(mem, address, Privilege::Supervisor, false)?;
    Ok(TableEntry {
        descriptor: Descriptor::from_raw(raw),
        address,
        raw,
    })
}

/// Reads the 16-byte system descriptor (LDT or TSS) `selector` names in the GDT.
pub fn read_system_descriptor<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    selector: u16,
) -> Result<TableEntry, Fault> {
    let code = u32::from(selector & !3);
    if selector & 4 != 0 {
        return Err(Event::gp(code).into());
    }
    let offset = u64::from(selector & !7);
    if offset + 15 > u64::from(cpu.gdtr.limit) {
        return Err(Event::gp(code).into());
    }
    let address = cpu.gdtr.base.wrapping_add(offset);
    let raw: u64 = read_obj(mem, address, Privilege::Supervisor, false)?;
    let high: u64 = read_obj(mem, address + 8, Privilege::Supervisor, false)?;
    Ok(TableEntry {
        descriptor: Descriptor::from_raw_system(raw, high),
        address,
        raw,
    })
}

/// Checks a selector for SS at privilege `cpl` (MOV SS, and the SS popped by IRET/RETF).
fn check_stack_segment<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    selector: u16,
    cpl: u8,
) -> Result<Segment, Fault> {
    if is_null_selector(selector) {
        // 64-bit mode allows a null SS below CPL 3, with RPL = CPL.
        if cpl == 3 || (selector & 3) as u8 != cpl {
            return Err(Event::gp(0).into());
        }
        return Ok(Segment::null(cpl));
    }
    let code = u32::from(selector & !3);
    let d = read_descriptor(cpu, mem, selector)?.descriptor;
    if (selector & 3) as u8 != cpl || !d.is_writable_data() || d.dpl != cpl {
        return Err(Event::gp(code).into());
    }
    if !d.present {
        return Err(Event::ss(code).into());
    }
    Ok(Segment { selector, cache: d })
}

/// MOV/POP to SS, DS, ES, FS or GS with the protected-mode checks of the manual.
/// `null_clears_base`: whether a null selector clears the FS/GS base, which depends on the
/// vendor the guest sees ([`super::cpuid::null_selector_clears_base`]).
pub fn load_data_segment<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    seg: SegReg,
    selector: u16,
    null_clears_base: bool,
) -> Result<(), Fault> {
    let value = if seg == SegReg::Ss {
        check_stack_segment(cpu, mem, selector, cpu.cpl)?
    } else if is_null_selector(selector) {
        // A null selector may be loaded into DS, ES, FS, GS; it faults only on use. Intel
        // processors (and QEMU's TCG, whatever vendor it reports) clear the hidden base with
        // it; AMD's keep the FS/GS base unless CPUID.80000021H:EAX.NullSelectorClearsBase.
        let mut s = Segment::null((selector & 3) as u8);
        if !null_clears_base {
            s.cache.base = cpu.segment(seg).cache.base;
        }
        s
    } else {
        let code = u32::from(selector & !3);
        let d = read_descriptor(cpu, mem, selector)?.descriptor;
        if !(d.is_data() || d.is_readable_code()) {
            return Err(Event::gp(code).into());
        }
        let rpl = (selector & 3) as u8;
        if !d.is_conforming_code() && (rpl > d.dpl || cpu.cpl > d.dpl) {
            return Err(Event::gp(code).into());
        }
        if !d.present {
            return Err(Event::np(code).into());
        }
        let mut d = d;
        // §3.4.4: in 64-bit mode only FS and GS keep a base; the others are treated as 0.
        if !matches!(seg, SegReg::Fs | SegReg::Gs) {
            d.base = 0;
        }
        Segment { selector, cache: d }
    };
    cpu.set_segment(seg, value);
    Ok(())
}

/// Checks a code-segment selector a far RET or IRET returns to (SDM "RET", "IRET").
fn check_return_code_segment<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    selector: u16,
) -> Result<Descriptor, Fault> {
    let code = u32::from(selector & !3);
    if is_null_selector(selector) {
        return Err(Event::gp(0).into());
    }
    let d = read_descriptor(cpu, mem, selector)?.descriptor;
    let rpl = (selector & 3) as u8;
    if rpl < cpu.cpl || !d.is_code() {
        return Err(Event::gp(code).into());
    }
    if d.is_conforming_code() {
        if d.dpl > rpl {
            return Err(Event::gp(code).into());
        }
    } else if d.dpl != rpl {
        return Err(Event::gp(code).into());
    }
    if !d.present {
        return Err(Event::np(code).into());
    }
    Ok(d)
}

/// On a return to an outer level, data segments the new CPL may not use are nulled (SDM
/// "RET", "IRET": the ES/DS/FS/GS step).
fn null_inaccessible_data_segments(cpu: &mut VCpu) {
    for seg in [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs] {
        let s = *cpu.segment(seg);
        let d = s.cache;
        if !is_null_selector(s.selector)
            && (d.is_data() || !d.is_conforming_code())
            && cpu.cpl > d.dpl
        {
            let mut nulled = Segment::null(0);
            nulled.cache.base = d.base;
            cpu.set_segment(seg, nulled);
        }
    }
}

/// Reads `count` stack slots of `size` bytes at RSP.
fn read_stack<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    size: usize,
    out: &mut [u64],
) -> Result<(), Fault> {
    let rsp = cpu.reg(Gpr::Rsp);
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = read_value(
            mem,
            rsp.wrapping_add((i * size) as u64),
            size,
            cpu.privilege(),
            true,
        )?;
    }
    Ok(())
}

/// IRET with operand size `size` (8 for IRETQ) in 64-bit mode, which always pops SS:RSP.
pub fn iret<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    size: usize,
) -> Result<(), Fault> {
    if cpu.rflags & rflags::NT != 0 {
        // Task returns do not exist in IA-32e mode.
        return Err(Event::gp(0).into());
    }
    let mut slots = [0u64; 5];
    read_stack(cpu, mem, size, &mut slots)?;
    let [new_rip, cs, new_flags, new_rsp, ss] = slots;
    let cs = cs as u16;
    let ss = ss as u16;
    let code = check_return_code_segment(cpu, mem, cs)?;
    let rpl = (cs & 3) as u8;
    let stack = check_stack_segment(cpu, mem, ss, rpl)?;
    if !code.is_long_code() {
        return Err(CpuStop::Unsupported("IRET to a compatibility-mode code segment").into());
    }
    // The CVE-2012-0217 lesson: the new RIP is checked while still at the old privilege.
    if !is_canonical(new_rip) {
        return Err(Event::gp(0).into());
    }
    cpu.rflags = rflags_after_iret(cpu, new_flags, size);
    commit_return(cpu, new_rip, cs, code, Some(stack), new_rsp);
    Ok(())
}

// Lab 2 (docs/labs/lab2-virtual-if.md): built with the feature `lab2`, the student's IRET
// RFLAGS rule (labs/lab2_virtual_if.rs) stands in for the one below.
#[cfg(feature = "lab2")]
use crate::labs::lab2::rflags_after_iret;

/// The RFLAGS an IRET of operand size `size` loads from the image `popped` (SDM Vol. 2A "IRET",
/// IA-32e mode): the arithmetic flags, TF, DF, NT, RF, AC and ID always; IF only at CPL ≤ IOPL;
/// IOPL, VIF and VIP only at CPL 0. Every other bit keeps its value, as do the bits above the
/// popped word (doubleword) of a 16-bit (32-bit) IRET.
#[cfg(not(feature = "lab2"))]
fn rflags_after_iret(cpu: &VCpu, popped: u64, size: usize) -> u64 {
    let mut mask = rflags::STATUS
        | rflags::TF
        | rflags::DF
        | rflags::NT
        | rflags::RF
        | rflags::AC
        | rflags::ID;
    if cpu.cpl <= cpu.iopl() {
        mask |= rflags::IF;
    }
    if cpu.cpl == 0 {
        mask |= rflags::IOPL | rflags::VIF | rflags::VIP;
    }
    // Vol. 2A "IRET": a 16-bit (or 32-bit) IRET pops only the low word (doubleword) of
    // RFLAGS; the bits above it (RF, AC, VIF, VIP, ID for IRETW) keep their current values.
    let size_mask = if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    };
    let mask = mask & size_mask;
    (cpu.rflags & !mask) | (popped & mask) | rflags::FIXED
}

/// Far RET (RETF) with operand size `size`, releasing `imm` extra bytes of parameters.
pub fn far_return<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    size: usize,
    imm: u64,
) -> Result<(), Fault> {
    let mut slots = [0u64; 2];
    read_stack(cpu, mem, size, &mut slots)?;
    let [new_rip, cs] = slots;
    let cs = cs as u16;
    let code = check_return_code_segment(cpu, mem, cs)?;
    let rpl = (cs & 3) as u8;
    let after_cs = cpu
        .reg(Gpr::Rsp)
        .wrapping_add(2 * size as u64)
        .wrapping_add(imm);
    let (stack, new_rsp) = if rpl > cpu.cpl {
        let rsp = read_value(mem, after_cs, size, cpu.privilege(), true)?;
        let ss = read_value(mem, after_cs + size as u64, size, cpu.privilege(), true)? as u16;
        let stack = check_stack_segment(cpu, mem, ss, rpl)?;
        (Some(stack), rsp.wrapping_add(imm))
    } else {
        (None, after_cs)
    };
    if !code.is_long_code() {
        return Err(CpuStop::Unsupported("far return to a compatibility-mode code segment").into());
    }
    let new_rip = if size == 8 {
        new_rip
    } else {
        new_rip & 0xFFFF_FFFF
    };
    if !is_canonical(new_rip) {
        return Err(Event::gp(0).into());
    }
    commit_return(cpu, new_rip, cs, code, stack, new_rsp);
    Ok(())
}

/// The register changes of a far RET or IRET, once every check passed: RIP, CS (whose RPL is
/// the new CPL), SS if one was popped, RSP; on a return to an outer level, the data segments
/// the new CPL may not use are nulled.
fn commit_return(
    cpu: &mut VCpu,
    new_rip: u64,
    cs: u16,
    code: Descriptor,
    stack: Option<Segment>,
    new_rsp: u64,
) {
    let rpl = (cs & 3) as u8;
    cpu.rip = new_rip;
    cpu.set_segment(
        SegReg::Cs,
        Segment {
            selector: cs,
            cache: code,
        },
    );
    if let Some(stack) = stack {
        cpu.set_segment(SegReg::Ss, stack);
    }
    cpu.set_reg(Gpr::Rsp, new_rsp);
    let outward = rpl > cpu.cpl;
    cpu.set_cpl(rpl);
    if outward {
        null_inaccessible_data_segments(cpu);
    }
}

/// Far JMP or CALL through memory (`m16:32`/`m16:64`) to a code segment at the same
/// privilege (SDM "JMP", "CALL"); call gates are not offered.
pub fn far_jump<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    selector: u16,
    offset: u64,
    push_return: Option<(u64, usize)>,
) -> Result<(), Fault> {
    let code = u32::from(selector & !3);
    if is_null_selector(selector) {
        return Err(Event::gp(0).into());
    }
    let d = read_descriptor(cpu, mem, selector)?.descriptor;
    if !d.code_or_data {
        return Err(CpuStop::Unsupported("far transfer through a call gate or TSS").into());
    }
    if !d.is_code() {
        return Err(Event::gp(code).into());
    }
    let rpl = (selector & 3) as u8;
    if d.is_conforming_code() {
        if d.dpl > cpu.cpl {
            return Err(Event::gp(code).into());
        }
    } else if rpl > cpu.cpl || d.dpl != cpu.cpl {
        return Err(Event::gp(code).into());
    }
    if !d.present {
        return Err(Event::np(code).into());
    }
    if !d.is_long_code() {
        return Err(
            CpuStop::Unsupported("far transfer to a compatibility-mode code segment").into(),
        );
    }
    if !is_canonical(offset) {
        return Err(Event::gp(0).into());
    }
    if let Some((return_rip, size)) = push_return {
        let rsp = cpu.reg(Gpr::Rsp);
        let cs_slot = rsp.wrapping_sub(size as u64);
        let rip_slot = rsp.wrapping_sub(2 * size as u64);
        let old_cs = u64::from(cpu.segment(SegReg::Cs).selector);
        write_value(mem, cs_slot, size, old_cs, cpu.privilege(), true)?;
        write_value(mem, rip_slot, size, return_rip, cpu.privilege(), true)?;
        cpu.set_reg(Gpr::Rsp, rip_slot);
    }
    cpu.rip = offset;
    cpu.set_segment(
        SegReg::Cs,
        Segment {
            selector: (selector & !3) | u16::from(cpu.cpl),
            cache: d,
        },
    );
    Ok(())
}
