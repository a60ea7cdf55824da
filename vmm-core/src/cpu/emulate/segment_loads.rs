//! Loads of data-segment registers: MOV to SS/DS/ES/FS/GS, POP FS/GS and LSS/LFS/LGS, each
//! checked against the guest's *virtual* GDT/LDT at its virtual CPL (SDM Vol. 2 "MOV",
//! "POP", "LDS/LES/LFS/LGS/LSS"; Vol. 3 §5.8 and §6.8.3 for the MOV SS interrupt shadow).
//!
//! Article challenge "特权级别名" (ring aliasing): the guest kernel's selectors have RPL 0 but
//! it runs at CPL 3, so these loads fault on the real (shadow) GDT and are redone here by
//! [`load_data_segment`] with the privilege checks the guest expects.

use super::super::cpuid::{null_selector_clears_base, HostCpu};
use super::super::event::Event;
use super::super::memory::{read_value, Fault, GuestMemory};
use super::super::segments::load_data_segment;
use super::super::state::{Gpr, SegReg, VCpu};
use super::operands::{read_far_pointer, read_operand, segment_register, write_reg};
use super::Flow;
use iced_x86::{Code, Instruction, Mnemonic};

/// MOV Sreg, POP FS/GS, LSS/LFS/LGS: `None` for any other instruction.
pub(super) fn execute<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    cpuid: &dyn HostCpu,
    ins: &Instruction,
) -> Option<Result<Flow, Fault>> {
    Some(match ins.code() {
        Code::Mov_Sreg_rm16 | Code::Mov_Sreg_r32m16 | Code::Mov_Sreg_r64m16 => {
            mov_sreg(cpu, mem, ins, cpuid)
        }
        Code::Popw_FS | Code::Popq_FS | Code::Popw_GS | Code::Popq_GS => {
            pop_fs_gs(cpu, mem, ins, cpuid)
        }
        Code::Lss_r16_m1616
        | Code::Lss_r32_m1632
        | Code::Lss_r64_m1664
        | Code::Lfs_r16_m1616
        | Code::Lfs_r32_m1632
        | Code::Lfs_r64_m1664
        | Code::Lgs_r16_m1616
        | Code::Lgs_r32_m1632
        | Code::Lgs_r64_m1664 => load_far_pointer(cpu, mem, ins, cpuid),
        _ => return None,
    })
}

/// MOV Sreg, r/m16 (MOV CS is #UD); MOV SS blocks interrupts and debug traps for one
/// instruction (SDM Vol. 3 §6.8.3).
fn mov_sreg<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
    cpuid: &dyn HostCpu,
) -> Result<Flow, Fault> {
    let seg = match segment_register(ins.op0_register()) {
        Some(SegReg::Cs) | None => return Err(Event::ud().into()),
        Some(seg) => seg,
    };
    let selector = read_operand(cpu, mem, ins, 1, 2)? as u16;
    load_data_segment(cpu, mem, seg, selector, null_selector_clears_base(cpuid))?;
    if seg == SegReg::Ss {
        cpu.interrupt_shadow = Some(ins.next_ip());
    }
    Ok(Flow::Next)
}

/// POP FS/GS: the selector from the stack; RSP moves only once the load succeeded.
fn pop_fs_gs<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
    cpuid: &dyn HostCpu,
) -> Result<Flow, Fault> {
    let size = if matches!(ins.code(), Code::Popw_FS | Code::Popw_GS) {
        2
    } else {
        8
    };
    let seg = if matches!(ins.code(), Code::Popw_FS | Code::Popq_FS) {
        SegReg::Fs
    } else {
        SegReg::Gs
    };
    let rsp = cpu.reg(Gpr::Rsp);
    let selector = read_value(mem, rsp, size, cpu.privilege(), true)? as u16;
    load_data_segment(cpu, mem, seg, selector, null_selector_clears_base(cpuid))?;
    cpu.set_reg(Gpr::Rsp, rsp.wrapping_add(size as u64));
    Ok(Flow::Next)
}

/// LSS/LFS/LGS r, m16:xx: the offset, then the selector (SDM Vol. 2A "LDS/LES/LFS/LGS/LSS");
/// the segment is loaded first, the register only if that succeeds. Unlike MOV SS, LSS opens
/// no interrupt shadow (SDM Vol. 3 §6.8.3).
fn load_far_pointer<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
    cpuid: &dyn HostCpu,
) -> Result<Flow, Fault> {
    let seg = match ins.mnemonic() {
        Mnemonic::Lss => SegReg::Ss,
        Mnemonic::Lfs => SegReg::Fs,
        _ => SegReg::Gs,
    };
    let dest = ins.op0_register();
    let (offset, selector) = read_far_pointer(cpu, mem, ins, 1, dest.size())?;
    load_data_segment(cpu, mem, seg, selector, null_selector_clears_base(cpuid))?;
    write_reg(cpu, dest, offset);
    Ok(Flow::Next)
}
