//! The system instructions (SDM Vol. 3 §2.8): CLI/STI/HLT, MOV to and from control and debug
//! registers (Vol. 3 §2.5, §17.2), CLTS/LMSW/SMSW, INVLPG, WBINVD/INVD, RDMSR/WRMSR (Vol. 4),
//! CPUID, RDTSC/RDTSCP/RDPMC, and the descriptor-table registers: LGDT/LIDT/SGDT/SIDT,
//! LLDT/SLDT, LTR/STR (Vol. 3 §2.4).
//!
//! Article challenges "敏感指令的陷入和模拟" and "确保 VMM 控制所有的系统资源": each is redone on
//! the *virtual* registers at the guest's virtual CPL; the real ones stay the VMM's. What the
//! host must do afterwards (reload the shadow CR3, flush a TLB entry, rebuild the shadow GDT,
//! recompute the real control bits) is recorded with [`VCpu::note`] as `Effects`.

use super::super::cpuid::{virtual_cpuid, HostCpu};
use super::super::descriptor::{is_null_selector, system_type, TYPE_SHIFT};
use super::super::event::{vector, CpuStop, Event};
use super::super::memory::{read_obj, write_obj, write_slice, Fault, GuestMemory};
use super::super::msr::{index, read_msr, write_msr};
use super::super::segments::{read_system_descriptor, TableEntry};
use super::super::state::{cr0, cr4, dr, efer, Gpr, Segment, TableRegister, VCpu};
use super::operands::{
    address, is_memory, is_stack_access, read_operand, read_reg, write_operand, write_reg,
};
use super::Flow;
use iced_x86::{Code, Instruction, Mnemonic, Register};
use shadow_mmu::addr::is_canonical;
use shadow_mmu::Privilege;

/// The interrupt flag, HLT, control, debug and model-specific registers, caches and TLB,
/// CPUID and the time-stamp counter: `None` for any other instruction.
pub(super) fn execute_processor_control<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    cpuid: &dyn HostCpu,
    ins: &Instruction,
) -> Option<Result<Flow, Fault>> {
    Some(match ins.code() {
        Code::Cli | Code::Sti => cli_sti(cpu, ins.code() == Code::Sti, ins.next_ip()),
        Code::Hlt => hlt(cpu),
        Code::Mov_r64_cr | Code::Mov_r32_cr => mov_from(cpu, ins, |cpu, r| read_cr(cpu, r)),
        Code::Mov_cr_r64 | Code::Mov_cr_r32 => mov_to(cpu, ins, write_cr),
        Code::Mov_r64_dr | Code::Mov_r32_dr => mov_from(cpu, ins, read_dr),
        Code::Mov_dr_r64 | Code::Mov_dr_r32 => mov_to(cpu, ins, write_dr),
        Code::Clts => clts(cpu),
        Code::Lmsw_rm16 | Code::Lmsw_r32m16 | Code::Lmsw_r64m16 => lmsw(cpu, mem, ins),
        Code::Smsw_rm16 | Code::Smsw_r32m16 | Code::Smsw_r64m16 => smsw(cpu, mem, ins),
        Code::Invlpg_m => invlpg(cpu, ins),
        // The caches are the host's: nothing to do but the privilege check.
        Code::Wbinvd | Code::Invd => require_cpl0(cpu).map(|()| Flow::Next),
        Code::Rdmsr => rdmsr(cpu),
        Code::Wrmsr => wrmsr(cpu),
        Code::Rdtsc => rdtsc(cpu, cpuid),
        // CPUID hides RDTSCP (its TSC_AUX is the host's), so when TSD makes it trap it is #UD,
        // as on a CPU without it.
        Code::Rdtscp => Err(Event::ud().into()),
        // CPUID offers no performance-monitoring counters (leaf 0xA hidden), so no ECX names a
        // valid one: #GP(0) at any CPL, whatever CR4.PCE says (SDM Vol. 2B "RDPMC").
        Code::Rdpmc => Err(Event::gp(0).into()),
        Code::Cpuid => cpuid_instruction(cpu, cpuid),
        _ => return None,
    })
}

/// LGDT/LIDT/SGDT/SIDT, LLDT/SLDT and LTR/STR: `None` for any other instruction.
pub(super) fn execute_descriptor_tables<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Option<Result<Flow, Fault>> {
    Some(match ins.code() {
        Code::Lgdt_m1664 | Code::Lidt_m1664 | Code::Lgdt_m1632 | Code::Lidt_m1632 => {
            lgdt_lidt(cpu, mem, ins)
        }
        Code::Sgdt_m1664 | Code::Sidt_m1664 | Code::Sgdt_m1632 | Code::Sidt_m1632 => {
            sgdt_sidt(cpu, mem, ins)
        }
        Code::Sldt_rm16
        | Code::Sldt_r32m16
        | Code::Sldt_r64m16
        | Code::Str_rm16
        | Code::Str_r32m16
        | Code::Str_r64m16 => sldt_str(cpu, mem, ins),
        Code::Lldt_rm16 | Code::Lldt_r32m16 | Code::Lldt_r64m16 => {
            load_selector_register(cpu, mem, ins, lldt)
        }
        Code::Ltr_rm16 | Code::Ltr_r32m16 | Code::Ltr_r64m16 => {
            load_selector_register(cpu, mem, ins, ltr)
        }
        _ => return None,
    })
}

/// #GP(0) unless the virtual CPL is 0.
pub(super) fn require_cpl0(cpu: &VCpu) -> Result<(), Fault> {
    if cpu.cpl == 0 {
        Ok(())
    } else {
        Err(Event::gp(0).into())
    }
}

/// SGDT, SIDT, SLDT, STR and SMSW at CPL > 0 are #GP when the guest set CR4.UMIP.
fn check_umip(cpu: &VCpu) -> Result<(), Fault> {
    if cpu.cpl > 0 && cpu.cr4 & cr4::UMIP != 0 {
        Err(Event::gp(0).into())
    } else {
        Ok(())
    }
}

// Lab 2 (docs/labs/lab2-virtual-if.md): built with the feature `lab2`, the student's CLI/STI
// (labs/lab2_virtual_if.rs) stands in for the one below.
#[cfg(feature = "lab2")]
pub(super) use crate::labs::lab2::cli_sti;

/// CLI/STI at CPL > IOPL fault (CR4.PVI is not offered); STI that sets IF opens a
/// one-instruction interrupt shadow (SDM Vol. 3 §6.8.3).
#[cfg(not(feature = "lab2"))]
pub(super) fn cli_sti(cpu: &mut VCpu, sti: bool, next: u64) -> Result<Flow, Fault> {
    if !cpu.may_toggle_interrupts() {
        return Err(Event::gp(0).into());
    }
    if sti && !cpu.interrupts_enabled() {
        cpu.interrupt_shadow = Some(next);
    }
    cpu.set_interrupts_enabled(sti);
    Ok(Flow::Next)
}

/// HLT: CPL 0 only; the vCPU then waits for an interrupt (the injection policy decides).
pub(super) fn hlt(cpu: &mut VCpu) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    cpu.halted = true;
    Ok(Flow::Halted)
}

/// RDMSR: ECX selects, EDX:EAX receive (CPL 0 only).
pub(super) fn rdmsr(cpu: &mut VCpu) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    let value = read_msr(cpu, cpu.reg(Gpr::Rcx) as u32)?;
    cpu.set_reg(Gpr::Rax, value & 0xFFFF_FFFF);
    cpu.set_reg(Gpr::Rdx, value >> 32);
    Ok(Flow::Next)
}

/// WRMSR: ECX selects, EDX:EAX is written (CPL 0 only).
pub(super) fn wrmsr(cpu: &mut VCpu) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    let value = (cpu.reg(Gpr::Rdx) << 32) | (cpu.reg(Gpr::Rax) & 0xFFFF_FFFF);
    let msr = cpu.reg(Gpr::Rcx) as u32;
    write_msr(cpu, msr, value)?;
    // Only EFER (SCE) and SYSENTER_CS change a real bit that follows the guest's
    // (`VCpu::real_controls`); with the fast paths off every write recomputes them, as the
    // reference path did.
    if !cpu.fast_paths || matches!(msr, index::EFER | index::SYSENTER_CS) {
        cpu.note(|e| e.controls = true);
    }
    Ok(Flow::Next)
}

/// MOV r64, CRn/DRn (CPL 0 only): `read` reads the register the second operand names.
fn mov_from(
    cpu: &mut VCpu,
    ins: &Instruction,
    read: impl FnOnce(&mut VCpu, Register) -> Result<u64, Fault>,
) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    let value = read(cpu, ins.op1_register())?;
    write_reg(cpu, ins.op0_register().full_register(), value);
    Ok(Flow::Next)
}

/// MOV CRn/DRn, r64 (CPL 0 only): `write` writes the register the first operand names.
fn mov_to(
    cpu: &mut VCpu,
    ins: &Instruction,
    write: impl FnOnce(&mut VCpu, Register, u64) -> Result<(), Fault>,
) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    let value = read_reg(cpu, ins.op1_register().full_register());
    write(cpu, ins.op0_register(), value)?;
    Ok(Flow::Next)
}

/// MOV from CR0, CR2, CR3, CR4 or CR8 (any other is #UD).
fn read_cr(cpu: &VCpu, r: Register) -> Result<u64, Fault> {
    Ok(match r {
        Register::CR0 => cpu.cr0,
        Register::CR2 => cpu.cr2,
        Register::CR3 => cpu.cr3,
        Register::CR4 => cpu.cr4,
        Register::CR8 => cpu.cr8,
        _ => return Err(Event::ud().into()),
    })
}

/// MOV to a control register with the checks of SDM Vol. 2 "MOV—Move to/from Control
/// Registers" and Vol. 3 §2.5 for IA-32e mode.
fn write_cr(cpu: &mut VCpu, r: Register, value: u64) -> Result<(), Fault> {
    if matches!(r, Register::CR0 | Register::CR4) {
        cpu.note(|e| e.controls = true);
    }
    match r {
        Register::CR0 => write_cr0(cpu, value),
        Register::CR2 => {
            cpu.cr2 = value;
            Ok(())
        }
        Register::CR3 => write_cr3(cpu, value),
        Register::CR4 => write_cr4(cpu, value),
        Register::CR8 => {
            if value > 0xF {
                return Err(Event::gp(0).into());
            }
            cpu.cr8 = value;
            Ok(())
        }
        _ => Err(Event::ud().into()),
    }
}

/// MOV to CR0.
fn write_cr0(cpu: &mut VCpu, value: u64) -> Result<(), Fault> {
    // Leaving long mode by clearing PG or PE is not offered: on hardware it is legal only from
    // compatibility mode, which this CPU never runs. NW without CD is #GP. Reserved bits: only
    // CR0[63:32] fault (SDM Vol. 2 "MOV—Move to/from Control Registers", Vol. 3 §2.5); the
    // reserved bits of CR0[31:0] are ignored, so they are not stored and read back as 0, as on
    // the processor.
    if value >> 32 != 0
        || value & cr0::PG == 0
        || value & cr0::PE == 0
        || (value & cr0::NW != 0 && value & cr0::CD == 0)
    {
        return Err(Event::gp(0).into());
    }
    let value = (value & cr0::DEFINED) | cr0::ET;
    if (value ^ cpu.cr0) & cr0::WP != 0 {
        cpu.note(|e| e.paging_mode = true);
    }
    cpu.cr0 = value;
    Ok(())
}

/// MOV to CR3: the host reloads the shadow page tables for the new address space.
fn write_cr3(cpu: &mut VCpu, value: u64) -> Result<(), Fault> {
    // SDM Vol. 3 §4.5 Table 4-12 (4-level paging, CR4.PCIDE = 0, which is all this CPU offers):
    // bits 63:MAXPHYADDR are reserved, so setting one is #GP(0) (Vol. 2 "MOV—Move to/from
    // Control Registers"); bits 11:0 are ignored or PWT/PCD.
    if value & !((1u64 << cpu.max_phys_bits.min(52)) - 1) != 0 {
        return Err(Event::gp(0).into());
    }
    cpu.cr3 = value;
    cpu.note(|e| e.cr3_load = Some(value));
    Ok(())
}

/// MOV to CR4.
fn write_cr4(cpu: &mut VCpu, value: u64) -> Result<(), Fault> {
    if value & !cr4::DEFINED != 0 || (value & cr4::PAE == 0 && cpu.efer & efer::LMA != 0) {
        return Err(Event::gp(0).into());
    }
    let changed = value ^ cpu.cr4;
    if changed & cr4::PGE != 0 {
        // §4.10.4.1: toggling PGE flushes every TLB entry, global ones included.
        cpu.note(|e| {
            e.paging_mode = true;
            e.flush_all = true;
        });
    }
    cpu.cr4 = value;
    Ok(())
}

/// The debug register a MOV names: DR4/DR5 are DR6/DR7 unless CR4.DE makes them #UD (SDM
/// Vol. 3 §17.2.2). With DR7.GD set the MOV is a #DB fault instead, with DR6.BD set and GD
/// cleared so the handler itself can use the registers (§17.2.4).
fn debug_register(cpu: &mut VCpu, r: Register) -> Result<u8, Fault> {
    if cpu.dr7 & dr::DR7_GD != 0 {
        cpu.dr7 &= !dr::DR7_GD;
        cpu.dr6 |= dr::DR6_BD;
        return Err(Event::exception(vector::DB).into());
    }
    let n = (r as u32).wrapping_sub(Register::DR0 as u32);
    match n {
        0..=3 | 6 | 7 => Ok(n as u8),
        4 | 5 if cpu.cr4 & cr4::DE == 0 => Ok(n as u8 + 2),
        _ => Err(Event::ud().into()),
    }
}

/// MOV from DR0–DR7 (SDM Vol. 2B "MOV—Move to/from Debug Registers").
fn read_dr(cpu: &mut VCpu, r: Register) -> Result<u64, Fault> {
    Ok(match debug_register(cpu, r)? {
        n @ 0..=3 => cpu.dr_address[usize::from(n)],
        6 => cpu.dr6,
        _ => cpu.dr7,
    })
}

/// MOV to DR0–DR7: bits 63:32 of DR6/DR7 must be 0 (#GP(0)); reserved bits read back fixed.
/// The virtual CPU keeps the values but does not arm hardware breakpoints, so a guest that
/// enables one in DR7 stops with a message instead of silently never hitting it.
fn write_dr(cpu: &mut VCpu, r: Register, value: u64) -> Result<(), Fault> {
    let n = debug_register(cpu, r)?;
    if matches!(n, 6 | 7) && value >> 32 != 0 {
        return Err(Event::gp(0).into());
    }
    match n {
        0..=3 => cpu.dr_address[usize::from(n)] = value,
        6 => cpu.dr6 = (value & dr::DR6_STATUS) | dr::DR6_INIT,
        _ => {
            if value & dr::DR7_ENABLES != 0 {
                return Err(CpuStop::Unsupported("hardware breakpoints (DR7 enables one)").into());
            }
            cpu.dr7 = (value & dr::DR7_DEFINED) | dr::DR7_INIT;
        }
    }
    Ok(())
}

/// CLTS: clears CR0.TS (CPL 0 only).
fn clts(cpu: &mut VCpu) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    cpu.cr0 &= !cr0::TS;
    cpu.note(|e| e.controls = true);
    Ok(Flow::Next)
}

/// LMSW: loads PE, MP, EM, TS and can set PE but never clear it (CPL 0 only).
fn lmsw<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    let src = read_operand(cpu, mem, ins, 0, 2)?;
    let low = (src & 0xF) | (cpu.cr0 & cr0::PE);
    cpu.cr0 = (cpu.cr0 & !0xF) | low;
    cpu.note(|e| e.controls = true);
    Ok(Flow::Next)
}

/// SMSW: the low word of CR0 to memory, all of it to a register (UMIP applies).
fn smsw<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    check_umip(cpu)?;
    if is_memory(ins.op0_kind()) {
        write_operand(cpu, mem, ins, 0, 2, cpu.cr0 & 0xFFFF)?;
    } else {
        write_reg(cpu, ins.op0_register(), cpu.cr0);
    }
    Ok(Flow::Next)
}

/// INVLPG (CPL 0 only): the host drops the shadow entries for the page; a non-canonical
/// address is a no-op.
fn invlpg(cpu: &mut VCpu, ins: &Instruction) -> Result<Flow, Fault> {
    invlpg_at(cpu, address(cpu, ins, 0))
}

/// INVLPG of the linear address `at` (already computed from the operand).
pub(super) fn invlpg_at(cpu: &mut VCpu, at: u64) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    if is_canonical(at) {
        cpu.note(|e| e.invlpg = Some(at));
    }
    Ok(Flow::Next)
}

/// MOV r64, CRn or MOV CRn, r64 (`to_cr`) with the general register by number, for the
/// fixed-encoding path: the same checks as the decoded path's `mov_from`/`mov_to` (in 64-bit
/// mode the operand is always the whole 64-bit register).
pub(super) fn mov_cr(cpu: &mut VCpu, to_cr: bool, cr: Register, gpr: usize) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    if to_cr {
        let value = cpu.gpr.get(gpr).copied().unwrap_or(0);
        write_cr(cpu, cr, value)?;
    } else {
        let value = read_cr(cpu, cr)?;
        if let Some(r) = cpu.gpr.get_mut(gpr) {
            *r = value;
        }
    }
    Ok(Flow::Next)
}

/// RDTSC: only CR4.TSD makes it trap (the real TSD follows the guest's): at CPL 0 it reads the
/// counter, above it is #GP(0) (SDM Vol. 2B "RDTSC").
fn rdtsc(cpu: &mut VCpu, cpuid: &dyn HostCpu) -> Result<Flow, Fault> {
    if cpu.cr4 & cr4::TSD != 0 && cpu.cpl != 0 {
        return Err(Event::gp(0).into());
    }
    let tsc = cpuid.rdtsc();
    cpu.set_reg(Gpr::Rax, tsc & 0xFFFF_FFFF);
    cpu.set_reg(Gpr::Rdx, tsc >> 32);
    Ok(Flow::Next)
}

/// CPUID: EAX (leaf) and ECX (subleaf) select; EAX, EBX, ECX, EDX receive the virtual answer.
fn cpuid_instruction(cpu: &mut VCpu, cpuid: &dyn HostCpu) -> Result<Flow, Fault> {
    let r = virtual_cpuid(cpuid, cpu.reg(Gpr::Rax) as u32, cpu.reg(Gpr::Rcx) as u32);
    for (reg, value) in [Gpr::Rax, Gpr::Rbx, Gpr::Rcx, Gpr::Rdx].into_iter().zip(r) {
        cpu.set_reg(reg, u64::from(value));
    }
    Ok(Flow::Next)
}

/// LGDT/LIDT (CPL 0 only): a 2-byte limit, then an 8-byte base that must be canonical. Only the
/// virtual register changes; a new GDT makes the host rebuild the shadow GDT.
fn lgdt_lidt<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    let at = address(cpu, ins, 0);
    let stack = is_stack_access(ins);
    let limit: u16 = read_obj(mem, at, cpu.privilege(), stack)?;
    let base: u64 = read_obj(mem, at.wrapping_add(2), cpu.privilege(), stack)?;
    if !is_canonical(base) {
        return Err(Event::gp(0).into());
    }
    let table = TableRegister { base, limit };
    if matches!(ins.code(), Code::Lgdt_m1664 | Code::Lgdt_m1632) {
        cpu.gdtr = table;
        cpu.note(|e| e.descriptor_table = true);
    } else {
        cpu.idtr = table;
    }
    Ok(Flow::Next)
}

/// SGDT/SIDT (UMIP applies): the *virtual* register, so the guest sees its own table.
fn sgdt_sidt<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    check_umip(cpu)?;
    let table = if matches!(ins.code(), Code::Sgdt_m1664 | Code::Sgdt_m1632) {
        cpu.gdtr
    } else {
        cpu.idtr
    };
    let at = address(cpu, ins, 0);
    let mut bytes = [0u8; 10];
    bytes[..2].copy_from_slice(&table.limit.to_le_bytes());
    bytes[2..].copy_from_slice(&table.base.to_le_bytes());
    write_slice(mem, at, &bytes, cpu.privilege(), is_stack_access(ins))?;
    Ok(Flow::Next)
}

/// SLDT/STR (UMIP applies): register forms zero-extend the selector; memory forms store 16 bits.
fn sldt_str<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    check_umip(cpu)?;
    let sel = if ins.mnemonic() == Mnemonic::Sldt {
        cpu.ldtr.selector
    } else {
        cpu.tr.selector
    };
    if is_memory(ins.op0_kind()) {
        write_operand(cpu, mem, ins, 0, 2, u64::from(sel))?;
    } else {
        let r = ins.op0_register();
        let full = if r.size() == 2 { r } else { r.full_register() };
        write_reg(cpu, full, u64::from(sel));
    }
    Ok(Flow::Next)
}

/// LLDT/LTR (CPL 0 only): reads the selector operand and loads it with `load`.
fn load_selector_register<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
    load: fn(&mut VCpu, &mut M, u16) -> Result<(), Fault>,
) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    let sel = read_operand(cpu, mem, ins, 0, 2)? as u16;
    load(cpu, mem, sel)?;
    Ok(Flow::Next)
}

/// Reads the GDT's 16-byte system descriptor `sel` names and checks it is a present descriptor
/// of type `typ` with a canonical base (SDM Vol. 2A "LLDT", "LTR").
fn read_system_segment<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    sel: u16,
    typ: u8,
) -> Result<TableEntry, Fault> {
    let code = u32::from(sel & !3);
    let entry = read_system_descriptor(cpu, mem, sel)?;
    let d = entry.descriptor;
    if d.code_or_data || d.typ != typ {
        return Err(Event::gp(code).into());
    }
    if !d.present {
        return Err(Event::np(code).into());
    }
    if !is_canonical(d.base) {
        return Err(Event::gp(code).into());
    }
    Ok(entry)
}

/// LLDT: a null selector leaves the LDTR unusable; otherwise an LDT descriptor from the GDT.
fn lldt<M: GuestMemory + ?Sized>(cpu: &mut VCpu, mem: &mut M, sel: u16) -> Result<(), Fault> {
    if is_null_selector(sel) {
        cpu.ldtr = Segment::null(0);
        return Ok(());
    }
    let entry = read_system_segment(cpu, mem, sel, system_type::LDT)?;
    cpu.ldtr = Segment {
        selector: sel,
        cache: entry.descriptor,
    };
    Ok(())
}

/// LTR: loads an available 64-bit TSS and marks it busy in the guest's GDT, as the CPU does.
fn ltr<M: GuestMemory + ?Sized>(cpu: &mut VCpu, mem: &mut M, sel: u16) -> Result<(), Fault> {
    if is_null_selector(sel) {
        return Err(Event::gp(0).into());
    }
    let entry = read_system_segment(cpu, mem, sel, system_type::TSS_AVAILABLE)?;
    // The busy bit is the one bit that tells the two 64-bit TSS types apart.
    let busy_bit = u64::from(system_type::TSS_BUSY ^ system_type::TSS_AVAILABLE) << TYPE_SHIFT;
    let busy = entry.raw | busy_bit;
    write_obj(mem, entry.address, busy, Privilege::Supervisor, false)?;
    cpu.note(|e| e.descriptor_table = true);
    let mut d = entry.descriptor;
    d.typ = system_type::TSS_BUSY;
    cpu.tr = Segment {
        selector: sel,
        cache: d,
    };
    Ok(())
}
