//! Port I/O: IN/OUT and the string forms INS/OUTS (with REP), each after the I/O permission
//! check of SDM Vol. 1 §19.5 (CPL ≤ IOPL, or the TSS's I/O permission bitmap), forwarded to the
//! virtual devices behind [`PortIo`].
//!
//! Article challenge "敏感指令的陷入和模拟": the guest kernel runs with IOPL 0 at CPL 3, so every
//! port access traps; the check is redone here at its *virtual* CPL and IOPL. A REP string
//! instruction moves at most [`MAX_REP_ELEMENTS_PER_TRAP`] elements per trap (SDM Vol. 2B
//! "REP": it is restartable between iterations).

use super::super::descriptor::{is_null_selector, tss};
use super::super::event::{CpuStop, Event};
use super::super::memory::{read_obj, read_value, write_value, Fault, GuestMemory};
use super::super::state::{rflags, Gpr, VCpu};
use super::operands::{read_reg, write_reg};
use super::{rep_unfinished, Flow, MAX_REP_ELEMENTS_PER_TRAP};
use crate::io::PortIo;
use iced_x86::{Code, Instruction, OpKind, Register};
use shadow_mmu::Privilege;

/// Which way a port access goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Direction {
    /// IN, INS: from the port.
    In,
    /// OUT, OUTS: to the port.
    Out,
}

/// IN, OUT, INS and OUTS: `None` for any other instruction.
pub(super) fn execute<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    ins: &Instruction,
) -> Option<Result<Flow, Fault>>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    Some(match ins.code() {
        Code::In_AL_imm8
        | Code::In_AX_imm8
        | Code::In_EAX_imm8
        | Code::In_AL_DX
        | Code::In_AX_DX
        | Code::In_EAX_DX => {
            let port = port_operand(cpu, ins, 1);
            let size = ins.op0_register().size();
            port_access(cpu, mem, ports, Direction::In, port, size)
        }
        Code::Out_imm8_AL
        | Code::Out_imm8_AX
        | Code::Out_imm8_EAX
        | Code::Out_DX_AL
        | Code::Out_DX_AX
        | Code::Out_DX_EAX => {
            let port = port_operand(cpu, ins, 0);
            let size = ins.op1_register().size();
            port_access(cpu, mem, ports, Direction::Out, port, size)
        }
        Code::Insb_m8_DX | Code::Insw_m16_DX | Code::Insd_m32_DX => {
            string_io(cpu, mem, ports, ins, Direction::In)
        }
        Code::Outsb_DX_m8 | Code::Outsw_DX_m16 | Code::Outsd_DX_m32 => {
            string_io(cpu, mem, ports, ins, Direction::Out)
        }
        _ => return None,
    })
}

/// The accumulator of an I/O access of `size` bytes.
fn accumulator(size: usize) -> Register {
    match size {
        1 => Register::AL,
        2 => Register::AX,
        _ => Register::EAX,
    }
}

/// The port of IN/OUT operand `op`: DX or an immediate byte.
fn port_operand(cpu: &VCpu, ins: &Instruction, op: u32) -> u16 {
    match ins.op_kind(op) {
        OpKind::Register => cpu.reg(Gpr::Rdx) as u16,
        _ => ins.immediate(op) as u16,
    }
}

/// IN AL/AX/EAX from `port` (EAX zero-extends into RAX), or OUT AL/AX/EAX to it.
pub(super) fn port_access<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    direction: Direction,
    port: u16,
    size: usize,
) -> Result<Flow, Fault>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    check_io_permission(cpu, mem, port, size)?;
    match direction {
        Direction::In => {
            let value = ports.port_read(port, size as u8);
            write_reg(cpu, accumulator(size), u64::from(value));
        }
        Direction::Out => {
            let value = read_reg(cpu, accumulator(size)) as u32;
            ports.port_write(port, size as u8, value);
        }
    }
    Ok(Flow::Next)
}

/// I/O permission (SDM Vol. 1 §19.5): at CPL ≤ IOPL every port; otherwise the bits of the
/// I/O permission bitmap in the guest's TSS must all be clear.
fn check_io_permission<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    port: u16,
    size: usize,
) -> Result<(), Fault> {
    if cpu.cpl <= cpu.iopl() {
        return Ok(());
    }
    let tr = &cpu.tr;
    let limit = u64::from(tr.cache.limit);
    if is_null_selector(tr.selector) || limit < tss::MIN_LIMIT {
        return Err(Event::gp(0).into());
    }
    let map_base: u16 = read_obj(
        mem,
        tr.cache.base + tss::IO_MAP_BASE,
        Privilege::Supervisor,
        false,
    )?;
    let byte = u64::from(map_base) + u64::from(port / 8);
    if byte + 1 > limit {
        return Err(Event::gp(0).into());
    }
    let bits: u16 = read_obj(mem, tr.cache.base + byte, Privilege::Supervisor, false)?;
    let bits = u64::from(bits);
    let mask = ((1u64 << size) - 1) << (port % 8);
    if bits & mask != 0 {
        return Err(Event::gp(0).into());
    }
    Ok(())
}

/// INS/OUTS, with or without REP, 64-bit addressing. Each element updates RDI/RSI and RCX
/// before the next, so a fault part-way leaves a restartable state, as on hardware.
fn string_io<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    ins: &Instruction,
    direction: Direction,
) -> Result<Flow, Fault>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    // The I/O permission check comes first: a user program's INS/OUTS is its #GP whatever
    // its address size.
    let size = ins.memory_size().size();
    let port = cpu.reg(Gpr::Rdx) as u16;
    check_io_permission(cpu, mem, port, size)?;
    let addressing = match direction {
        Direction::In => ins.op0_kind(),
        Direction::Out => ins.op1_kind(),
    };
    if !matches!(addressing, OpKind::MemoryESRDI | OpKind::MemorySegRSI) {
        return Err(CpuStop::Unsupported("string I/O with 16- or 32-bit addressing").into());
    }
    let rep = ins.has_rep_prefix();
    let step = if cpu.rflags & rflags::DF != 0 {
        (size as u64).wrapping_neg()
    } else {
        size as u64
    };
    let mut done = 0u64;
    loop {
        if rep && cpu.reg(Gpr::Rcx) == 0 {
            break;
        }
        if done == MAX_REP_ELEMENTS_PER_TRAP {
            return Ok(rep_unfinished(cpu));
        }
        done += 1;
        match direction {
            Direction::In => {
                let rdi = cpu.reg(Gpr::Rdi);
                let value = ports.port_read(port, size as u8);
                write_value(mem, rdi, size, u64::from(value), cpu.privilege(), false)?;
                cpu.set_reg(Gpr::Rdi, rdi.wrapping_add(step));
            }
            Direction::Out => {
                let rsi = cpu.reg(Gpr::Rsi);
                let base = match ins.memory_segment() {
                    Register::FS => cpu.fs_base(),
                    Register::GS => cpu.gs_base(),
                    _ => 0,
                };
                let value = read_value(mem, base.wrapping_add(rsi), size, cpu.privilege(), false)?;
                ports.port_write(port, size as u8, value as u32);
                cpu.set_reg(Gpr::Rsi, rsi.wrapping_add(step));
            }
        }
        if !rep {
            break;
        }
        cpu.set_reg(Gpr::Rcx, cpu.reg(Gpr::Rcx) - 1);
    }
    Ok(Flow::Next)
}
