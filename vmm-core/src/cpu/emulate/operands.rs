//! Operand access for the decoded path: general registers (with AH/CH/DH/BH and the
//! zero-extension of 32-bit results, SDM Vol. 1 §3.4.1.1), memory operands at their linear
//! address (segment base + base + index·scale + displacement, Vol. 1 §3.7.5), immediates, and
//! far pointers (`m16:16/32/64`).
//!
//! Article challenge "敏感指令的陷入和模拟": an emulated instruction reads and writes its
//! operands through guest memory with the guest's rights, so a fault is the guest's own.

use super::super::event::CpuStop;
use super::super::memory::{read_obj, read_value, write_value, Fault, GuestMemory};
use super::super::state::{SegReg, VCpu};
use iced_x86::{Instruction, OpKind, Register};

/// The register file slot of a general register, its size, and whether it is AH/CH/DH/BH.
fn gpr_slot(r: Register) -> Option<(usize, usize, bool)> {
    if !r.is_gpr() {
        return None;
    }
    let high = matches!(r, Register::AH | Register::CH | Register::DH | Register::BH);
    let slot = if high {
        r.number() - 4
    } else {
        r.full_register().number()
    };
    Some((slot, r.size(), high))
}

/// Reads a general register of any width (FS/GS read their bases; anything else reads 0).
pub(super) fn read_reg(cpu: &VCpu, r: Register) -> u64 {
    match gpr_slot(r) {
        Some((slot, size, high)) => {
            let v = cpu.gpr.get(slot).copied().unwrap_or(0);
            match (size, high) {
                (1, true) => (v >> 8) & 0xFF,
                (1, false) => v & 0xFF,
                (2, _) => v & 0xFFFF,
                (4, _) => v & 0xFFFF_FFFF,
                _ => v,
            }
        }
        None => match r {
            Register::FS => cpu.fs_base(),
            Register::GS => cpu.gs_base(),
            _ => 0,
        },
    }
}

/// Writes a general register of any width, merging 8- and 16-bit writes into the rest.
pub(super) fn write_reg(cpu: &mut VCpu, r: Register, value: u64) {
    if let Some((slot, size, high)) = gpr_slot(r) {
        if let Some(v) = cpu.gpr.get_mut(slot) {
            *v = match (size, high) {
                (1, true) => (*v & !0xFF00) | ((value & 0xFF) << 8),
                (1, false) => (*v & !0xFF) | (value & 0xFF),
                (2, _) => (*v & !0xFFFF) | (value & 0xFFFF),
                // §3.4.1.1: 32-bit results are zero-extended to 64 bits.
                (4, _) => value & 0xFFFF_FFFF,
                _ => value,
            };
        }
    }
}

/// Linear address of memory operand `op` (segment base, base, index, displacement).
pub(super) fn address(cpu: &VCpu, ins: &Instruction, op: u32) -> u64 {
    ins.virtual_address(op, 0, |r, _, _| Some(read_reg(cpu, r)))
        .unwrap_or(0)
}

/// Whether an operand is in memory (rather than a register or an immediate).
pub(super) fn is_memory(kind: OpKind) -> bool {
    matches!(kind, OpKind::Memory)
}

/// Whether the memory operand goes through SS (its faults are #SS, not #GP).
pub(super) fn is_stack_access(ins: &Instruction) -> bool {
    ins.memory_segment() == Register::SS
}

/// The stop for an operand form the emulator does not handle.
pub(super) fn not_emulated(ins: &Instruction) -> Fault {
    CpuStop::NotEmulated {
        mnemonic: ins.mnemonic(),
    }
    .into()
}

/// Reads operand `op` of `size` bytes (register, memory or immediate).
pub(super) fn read_operand<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    ins: &Instruction,
    op: u32,
    size: usize,
) -> Result<u64, Fault> {
    match ins.op_kind(op) {
        OpKind::Register => Ok(read_reg(cpu, ins.op_register(op))),
        OpKind::Memory => read_value(
            mem,
            address(cpu, ins, op),
            size,
            cpu.privilege(),
            is_stack_access(ins),
        ),
        OpKind::Immediate8
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to16
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => Ok(ins.immediate(op)),
        _ => Err(not_emulated(ins)),
    }
}

/// Writes operand `op` of `size` bytes.
pub(super) fn write_operand<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
    op: u32,
    size: usize,
    value: u64,
) -> Result<(), Fault> {
    match ins.op_kind(op) {
        OpKind::Register => {
            write_reg(cpu, ins.op_register(op), value);
            Ok(())
        }
        OpKind::Memory => write_value(
            mem,
            address(cpu, ins, op),
            size,
            value,
            cpu.privilege(),
            is_stack_access(ins),
        ),
        _ => Err(not_emulated(ins)),
    }
}

/// Size in bytes of operand `op`.
pub(super) fn operand_size(ins: &Instruction, op: u32) -> usize {
    match ins.op_kind(op) {
        OpKind::Register => ins.op_register(op).size(),
        OpKind::Memory => ins.memory_size().size(),
        OpKind::Immediate8 => 1,
        OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
        OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
        _ => 8,
    }
}

/// Reads the far pointer `m16:xx` of memory operand `op`: the `size`-byte offset, then the
/// selector (SDM Vol. 2A "LDS/LES/LFS/LGS/LSS", "JMP", "CALL").
pub(super) fn read_far_pointer<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    ins: &Instruction,
    op: u32,
    size: usize,
) -> Result<(u64, u16), Fault> {
    let at = address(cpu, ins, op);
    let stack = is_stack_access(ins);
    let offset = read_value(mem, at, size, cpu.privilege(), stack)?;
    let selector: u16 = read_obj(mem, at.wrapping_add(size as u64), cpu.privilege(), stack)?;
    Ok((offset, selector))
}

/// The segment register a register operand names.
pub(super) fn segment_register(r: Register) -> Option<SegReg> {
    Some(match r {
        Register::ES => SegReg::Es,
        Register::CS => SegReg::Cs,
        Register::SS => SegReg::Ss,
        Register::DS => SegReg::Ds,
        Register::FS => SegReg::Fs,
        Register::GS => SegReg::Gs,
        _ => return None,
    })
}
