//! The emulated store of a write-protected page-table page: the stores a kernel makes to its
//! page tables (MOV, STOS, MOVS, XCHG, CMPXCHG, OR/AND/XOR/ADD/SUB, BTS/BTR), redone through
//! guest memory so the shadow MMU sees each one, with the flags of SDM Vol. 2 for each.
//!
//! Article challenge "内存虚拟化" (shadow page tables): with the cached policy the shadow MMU
//! write-protects the guest's page-table pages, so every store to one is a #PF the VMM turns
//! into [`super::Cause::PageTableWrite`]. Anything else writing a page-table page stops the
//! guest with the instruction named.

use super::super::memory::{read_slice, write_slice, Fault, GuestMemory};
use super::super::state::{rflags, Gpr, VCpu};
use super::operands::{
    not_emulated, operand_size, read_operand, read_reg, write_operand, write_reg,
};
use super::{rep_unfinished, Flow, MAX_REP_ELEMENTS_PER_TRAP};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};
use shadow_mmu::AccessKind;

/// The stores a kernel makes to its page tables: MOV, STOS, MOVS, XCHG, CMPXCHG, the bitwise
/// and additive read-modify-writes, BTS/BTR. Anything else writing a page-table page stops the
/// guest with the instruction named.
pub(super) fn data_write<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    match ins.mnemonic() {
        Mnemonic::Mov => mov(cpu, mem, ins),
        Mnemonic::Stosb
        | Mnemonic::Stosw
        | Mnemonic::Stosd
        | Mnemonic::Stosq
        | Mnemonic::Movsb
        | Mnemonic::Movsw
        | Mnemonic::Movsd
        | Mnemonic::Movsq => string_store(cpu, mem, ins),
        Mnemonic::Xchg => xchg(cpu, mem, ins),
        Mnemonic::Cmpxchg => cmpxchg(cpu, mem, ins),
        Mnemonic::Or | Mnemonic::And | Mnemonic::Xor | Mnemonic::Add | Mnemonic::Sub => {
            arithmetic(cpu, mem, ins)
        }
        Mnemonic::Bts | Mnemonic::Btr => bit_test_and_modify(cpu, mem, ins),
        _ => Err(not_emulated(ins)),
    }
}

/// All ones in the low `size` bytes.
fn width_mask(size: usize) -> u64 {
    let bits = size * 8;
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Parity flag of the low byte.
fn parity(v: u64) -> bool {
    (v as u8).count_ones().is_multiple_of(2)
}

/// The sign bit of a `size`-byte value.
fn sign(v: u64, size: usize) -> bool {
    v >> (size * 8 - 1) & 1 != 0
}

/// `a - b` of `size` bytes (both already masked to it), with CF and OF as SUB and CMP set them.
fn subtract(a: u64, b: u64, size: usize) -> (u64, bool, bool) {
    let r = a.wrapping_sub(b) & width_mask(size);
    let of = sign(a, size) != sign(b, size) && sign(r, size) != sign(a, size);
    (r, a < b, of)
}

/// Sets SF, ZF, PF from `result` of `size` bytes, CF and OF as given.
fn set_result_flags(cpu: &mut VCpu, result: u64, size: usize, cf: bool, of: bool) {
    let r = result & width_mask(size);
    let mut f = cpu.rflags & !(rflags::CF | rflags::PF | rflags::ZF | rflags::SF | rflags::OF);
    if cf {
        f |= rflags::CF;
    }
    if of {
        f |= rflags::OF;
    }
    if r == 0 {
        f |= rflags::ZF;
    }
    if sign(r, size) {
        f |= rflags::SF;
    }
    if parity(r) {
        f |= rflags::PF;
    }
    cpu.rflags = f;
}

/// MOV r/m, r/imm (a sign-extended imm32 taken whole, as `read_operand` gives it).
fn mov<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    let size = operand_size(ins, 0);
    let value = read_operand(cpu, mem, ins, 1, size)?;
    write_operand(cpu, mem, ins, 0, size, value)?;
    Ok(Flow::Next)
}

/// STOS/MOVS, with or without REP, 64-bit addressing (ES:RDI destination).
///
/// Whole runs of elements inside one page at a time (one guest walk and one write each,
/// instead of one per element: zeroing a page table is one `rep stosq`); the registers move
/// only after a run is written, so a fault leaves a restartable state.
fn string_store<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    if ins.op0_kind() != OpKind::MemoryESRDI {
        return Err(not_emulated(ins));
    }
    let stos = matches!(
        ins.mnemonic(),
        Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq
    );
    let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
    let mut run = [0u8; 4096];
    let mut done = 0u64;
    loop {
        let left = if rep { cpu.reg(Gpr::Rcx) } else { 1 };
        if left == 0 {
            break;
        }
        if done == MAX_REP_ELEMENTS_PER_TRAP {
            return Ok(rep_unfinished(cpu));
        }
        let n = run_length(cpu, ins.memory_size().size(), stos, left, done);
        done += n;
        store_run(cpu, mem, ins, stos, n, &mut run)?;
        if !rep {
            break;
        }
        cpu.set_reg(Gpr::Rcx, left - n);
    }
    Ok(Flow::Next)
}

/// How many of the `left` elements of `size` bytes the next run of a STOS/MOVS moves: as many
/// as stay inside the page of RDI (and of RSI for MOVS), one when going backwards (DF = 1),
/// at least one, and no more than the per-trap bound leaves after `done`.
fn run_length(cpu: &VCpu, size: usize, stos: bool, left: u64, done: u64) -> u64 {
    let (rdi, rsi) = (cpu.reg(Gpr::Rdi), cpu.reg(Gpr::Rsi));
    let room = |addr: u64| (0x1000 - (addr & 0xFFF)) / size as u64;
    let n = if cpu.rflags & rflags::DF != 0 {
        1
    } else if stos {
        room(rdi)
    } else {
        room(rdi).min(room(rsi))
    };
    n.clamp(1, left).min(MAX_REP_ELEMENTS_PER_TRAP - done)
}

/// Writes one run of `n` STOS/MOVS elements (RAX's low bytes, or the bytes at RSI) at RDI,
/// then moves RDI (and RSI) past it; `buffer` holds the run.
fn store_run<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
    stos: bool,
    n: u64,
    buffer: &mut [u8; 4096],
) -> Result<(), Fault> {
    let size = ins.memory_size().size();
    let (rdi, rsi) = (cpu.reg(Gpr::Rdi), cpu.reg(Gpr::Rsi));
    let bytes = n as usize * size;
    let chunk = buffer.get_mut(..bytes).unwrap_or_default();
    if stos {
        let value = cpu.reg(Gpr::Rax).to_le_bytes();
        for element in chunk.chunks_exact_mut(size) {
            element.copy_from_slice(value.get(..size).unwrap_or_default());
        }
    } else {
        read_slice(mem, rsi, chunk, AccessKind::Read, cpu.privilege(), false)?;
    }
    write_slice(mem, rdi, chunk, cpu.privilege(), false)?;
    let advance = if cpu.rflags & rflags::DF != 0 {
        (bytes as u64).wrapping_neg()
    } else {
        bytes as u64
    };
    cpu.set_reg(Gpr::Rdi, rdi.wrapping_add(advance));
    if !stos {
        cpu.set_reg(Gpr::Rsi, rsi.wrapping_add(advance));
    }
    Ok(())
}

/// XCHG r/m, r.
fn xchg<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    let size = operand_size(ins, 0);
    let a = read_operand(cpu, mem, ins, 0, size)?;
    let b = read_operand(cpu, mem, ins, 1, size)?;
    write_operand(cpu, mem, ins, 0, size, b)?;
    write_operand(cpu, mem, ins, 1, size, a)?;
    Ok(Flow::Next)
}

/// CMPXCHG r/m, r: compares with the accumulator (flags as for CMP); equal stores the source,
/// unequal loads the destination into the accumulator.
fn cmpxchg<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    let size = operand_size(ins, 0);
    let dest = read_operand(cpu, mem, ins, 0, size)?;
    let acc_reg = match size {
        1 => Register::AL,
        2 => Register::AX,
        4 => Register::EAX,
        _ => Register::RAX,
    };
    let acc = read_reg(cpu, acc_reg);
    let mask = width_mask(size);
    let (diff, cf, of) = subtract(acc & mask, dest & mask, size);
    set_result_flags(cpu, diff, size, cf, of);
    if acc & mask == dest & mask {
        let src = read_operand(cpu, mem, ins, 1, size)?;
        write_operand(cpu, mem, ins, 0, size, src)?;
    } else {
        // The destination is written back even on failure (a locked RMW).
        write_operand(cpu, mem, ins, 0, size, dest)?;
        write_reg(cpu, acc_reg, dest);
    }
    Ok(Flow::Next)
}

/// OR, AND, XOR, ADD, SUB r/m, r/imm, with CF and OF as each defines them.
fn arithmetic<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    let size = operand_size(ins, 0);
    let a = read_operand(cpu, mem, ins, 0, size)?;
    let b = read_operand(cpu, mem, ins, 1, size)?;
    let mask = width_mask(size);
    let (a, b) = (a & mask, b & mask);
    let (r, cf, of) = match ins.mnemonic() {
        Mnemonic::Or => (a | b, false, false),
        Mnemonic::And => (a & b, false, false),
        Mnemonic::Xor => (a ^ b, false, false),
        Mnemonic::Add => {
            let r = a.wrapping_add(b) & mask;
            let of = sign(a, size) == sign(b, size) && sign(r, size) != sign(a, size);
            (r, r < a, of)
        }
        _ => subtract(a, b, size),
    };
    write_operand(cpu, mem, ins, 0, size, r)?;
    set_result_flags(cpu, r, size, cf, of);
    Ok(Flow::Next)
}

/// BTS/BTR r/m, imm8: CF = the old bit, then the bit set or cleared.
fn bit_test_and_modify<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    let size = operand_size(ins, 0);
    if ins.op1_kind() == OpKind::Register {
        // A register bit offset can address beyond the operand: not a PTE update.
        return Err(not_emulated(ins));
    }
    let bit = ins.immediate(1) % (size as u64 * 8);
    let a = read_operand(cpu, mem, ins, 0, size)?;
    let old = a >> bit & 1 != 0;
    let r = if ins.mnemonic() == Mnemonic::Bts {
        a | (1 << bit)
    } else {
        a & !(1 << bit)
    };
    write_operand(cpu, mem, ins, 0, size, r)?;
    cpu.rflags = (cpu.rflags & !rflags::CF) | if old { rflags::CF } else { 0 };
    Ok(Flow::Next)
}
