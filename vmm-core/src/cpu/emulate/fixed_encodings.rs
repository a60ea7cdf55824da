//! Fixed encodings: the privileged instructions a guest kernel runs most often, recognised by
//! their one fixed byte encoding (no prefix, no ModRM byte to decode) without calling the
//! decoder, and executed by the same handlers the decoded path uses.
//!
//! Article challenge "频繁访问特权资源" (frequent privileged access): CLI/STI, IN/OUT, SWAPGS,
//! IRETQ, SYSRETQ... trap on every use, so each saved step in their path is saved many times
//! (`docs/benchmarks.md`). The encodings are those of SDM Vol. 2 for each instruction.

use super::super::event::Event;
use super::super::memory::{Fault, GuestMemory};
use super::super::state::{Gpr, VCpu};
use super::io::{port_access, Direction};
use super::system::{cli_sti, hlt, rdmsr, wrmsr};
use super::transfers::{int3_event, iret_instruction, swapgs_instruction};
use super::transfers::{sysexit_instruction, sysret_instruction};
use super::{Flow, MAX_INSTRUCTION_LEN};
use crate::io::PortIo;
use iced_x86::Mnemonic;

/// An instruction the fast path recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FixedEncoding {
    Cli,
    Sti,
    Hlt,
    /// IN from DX (`None`) or an immediate port, of 1 or 4 bytes.
    In(Option<u8>, usize),
    /// OUT to DX (`None`) or an immediate port, of 1 or 4 bytes.
    Out(Option<u8>, usize),
    Swapgs,
    Iretq,
    Sysretq,
    Sysexitq,
    Rdmsr,
    Wrmsr,
    Int(u8),
    Int3,
}

/// Recognises the fast path's exact encodings: (instruction, length, mnemonic).
pub(super) fn fixed_encoding(
    b: &[u8; MAX_INSTRUCTION_LEN],
) -> Option<(FixedEncoding, u64, Mnemonic)> {
    use FixedEncoding as F;
    Some(match *b {
        [0xFA, ..] => (F::Cli, 1, Mnemonic::Cli),
        [0xFB, ..] => (F::Sti, 1, Mnemonic::Sti),
        [0xF4, ..] => (F::Hlt, 1, Mnemonic::Hlt),
        [0xEC, ..] => (F::In(None, 1), 1, Mnemonic::In),
        [0xED, ..] => (F::In(None, 4), 1, Mnemonic::In),
        [0xEE, ..] => (F::Out(None, 1), 1, Mnemonic::Out),
        [0xEF, ..] => (F::Out(None, 4), 1, Mnemonic::Out),
        [0xE4, port, ..] => (F::In(Some(port), 1), 2, Mnemonic::In),
        [0xE5, port, ..] => (F::In(Some(port), 4), 2, Mnemonic::In),
        [0xE6, port, ..] => (F::Out(Some(port), 1), 2, Mnemonic::Out),
        [0xE7, port, ..] => (F::Out(Some(port), 4), 2, Mnemonic::Out),
        [0x0F, 0x01, 0xF8, ..] => (F::Swapgs, 3, Mnemonic::Swapgs),
        [0x48, 0xCF, ..] => (F::Iretq, 2, Mnemonic::Iretq),
        [0x48, 0x0F, 0x07, ..] => (F::Sysretq, 3, Mnemonic::Sysretq),
        [0x48, 0x0F, 0x35, ..] => (F::Sysexitq, 3, Mnemonic::Sysexitq),
        [0x0F, 0x32, ..] => (F::Rdmsr, 2, Mnemonic::Rdmsr),
        [0x0F, 0x30, ..] => (F::Wrmsr, 2, Mnemonic::Wrmsr),
        [0xCD, vector, ..] => (F::Int(vector), 2, Mnemonic::Int),
        [0xCC, ..] => (F::Int3, 1, Mnemonic::Int3),
        _ => return None,
    })
}

/// Executes a fast-path instruction of `len` bytes with the same handlers the decoded path
/// uses; `next` is the address after it.
pub(super) fn execute_fixed<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    op: FixedEncoding,
    len: u8,
    next: u64,
) -> Result<Flow, Fault>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    let port = |cpu: &VCpu, imm: Option<u8>| imm.map_or(cpu.reg(Gpr::Rdx) as u16, u16::from);
    match op {
        FixedEncoding::Cli => cli_sti(cpu, false, next),
        FixedEncoding::Sti => cli_sti(cpu, true, next),
        FixedEncoding::Hlt => hlt(cpu),
        FixedEncoding::In(imm, size) => {
            let p = port(cpu, imm);
            port_access(cpu, mem, ports, Direction::In, p, size)
        }
        FixedEncoding::Out(imm, size) => {
            let p = port(cpu, imm);
            port_access(cpu, mem, ports, Direction::Out, p, size)
        }
        FixedEncoding::Swapgs => swapgs_instruction(cpu),
        FixedEncoding::Iretq => iret_instruction(cpu, mem, 8),
        FixedEncoding::Sysretq => sysret_instruction(cpu, true),
        FixedEncoding::Sysexitq => sysexit_instruction(cpu, true),
        FixedEncoding::Rdmsr => rdmsr(cpu),
        FixedEncoding::Wrmsr => wrmsr(cpu),
        FixedEncoding::Int(vector) => Err(Event::software(vector, len).into()),
        FixedEncoding::Int3 => Err(int3_event(len).into()),
    }
}
