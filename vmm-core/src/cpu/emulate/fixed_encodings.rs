//! Fixed encodings: the privileged instructions a guest kernel runs most often, recognised by
//! their one fixed byte encoding (no prefix, no ModRM byte to decode) without calling the
//! decoder, and executed by the same handlers the decoded path uses.
//!
//! Article challenge "频繁访问特权资源" (frequent privileged access): CLI/STI, IN/OUT, SWAPGS,
//! IRETQ, SYSRETQ... trap on every use, so each saved step in their path is saved many times
//! (`docs/benchmarks.md`). The encodings are those of SDM Vol. 2 for each instruction.

use super::super::coalesce::{self, AfterSwapgs};
use super::super::event::Event;
use super::super::memory::{Fault, GuestMemory};
use super::super::state::{Gpr, VCpu};
use super::io::{port_access, Direction};
use super::system::{cli_sti, hlt, invlpg_at, mov_cr, rdmsr, wrmsr};
use super::transfers::{int3_event, iret_instruction, swapgs_instruction};
use super::transfers::{sysexit_instruction, sysret_instruction};
use super::{Flow, MAX_INSTRUCTION_LEN};
use crate::io::PortIo;
use iced_x86::{Mnemonic, Register};

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
    /// SWAPGS and the instruction right after it, in one trap (`cpu::coalesce`).
    SwapgsThen(AfterSwapgs),
    Iretq,
    Sysretq,
    Sysexitq,
    Rdmsr,
    Wrmsr,
    Int(u8),
    Int3,
    /// MOV r64, CRn (`to_cr` false) or MOV CRn, r64 (`to_cr` true): CR0, 2, 3, 4 or 8 and a
    /// general register by its number (`Gpr` order).
    MovCr {
        to_cr: bool,
        cr: Register,
        gpr: u8,
    },
    /// INVLPG [r64]: the address is the base register's value (no index, no displacement, DS,
    /// whose base long mode ignores).
    Invlpg {
        base: u8,
    },
}

/// Recognises the fast path's exact encodings: (instruction, length, mnemonic). `b` holds the
/// bytes at RIP, of which the first `fetched` were fetched (the rest of its page, at most 15).
#[inline(always)] // two callers (the dispatcher's path and the fast lane); measured per trap
pub(super) fn fixed_encoding(
    cpu: &VCpu,
    b: &[u8; MAX_INSTRUCTION_LEN],
    fetched: usize,
) -> Option<(FixedEncoding, u64, Mnemonic)> {
    use FixedEncoding as F;
    if b.starts_with(&coalesce::SWAPGS) {
        let after = b.get(coalesce::SWAPGS.len()..fetched).unwrap_or(&[]);
        if let Some(second) = coalesce::after_swapgs(cpu, after) {
            return Some((F::SwapgsThen(second), 3 + second.length(), Mnemonic::Swapgs));
        }
    }
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
        _ if cpu.fast_paths => return control_register_or_invlpg(b),
        _ => return None,
    })
}

/// MOV r64, CRn (`[REX] 0F 20 /r`), MOV CRn, r64 (`[REX] 0F 22 /r`) and INVLPG [r64]
/// (`[REX] 0F 01 /7` with mod = 00 and a plain base register: r/m not 4 (SIB) or 5
/// (RIP-relative)), with the operands the decoder would find. For MOV CRn the
/// ModRM byte always names registers in 64-bit mode, whatever its mod field (SDM Vol. 2B
/// "MOV—Move to/from Control Registers"): reg is the control register (REX.R adds 8), r/m the
/// general register (REX.B adds 8). Any other prefix (LOCK, a segment override, 66) leaves the
/// instruction to the decoder.
fn control_register_or_invlpg(
    b: &[u8; MAX_INSTRUCTION_LEN],
) -> Option<(FixedEncoding, u64, Mnemonic)> {
    let (rex, rest, rex_len) = match b[0] {
        rex @ 0x40..=0x4F => (rex, &b[1..], 1),
        _ => (0, &b[..], 0),
    };
    let [0x0F, op @ (0x20 | 0x22 | 0x01), modrm, ..] = *rest else {
        return None;
    };
    let reg = ((modrm >> 3) & 7) + if rex & 0b100 != 0 { 8 } else { 0 };
    let rm = (modrm & 7) + if rex & 0b001 != 0 { 8 } else { 0 };
    let (op, mnemonic) = match op {
        // CR1, CR5-7 and CR9-15 do not exist: the decoder's #UD, through the decoded path.
        0x20 | 0x22 => {
            let cr = match reg {
                0 => Register::CR0,
                2 => Register::CR2,
                3 => Register::CR3,
                4 => Register::CR4,
                8 => Register::CR8,
                _ => return None,
            };
            let to_cr = op == 0x22;
            (FixedEncoding::MovCr { to_cr, cr, gpr: rm }, Mnemonic::Mov)
        }
        0x01 if modrm >> 6 == 0 && (modrm >> 3) & 7 == 7 && !matches!(modrm & 7, 4 | 5) => {
            (FixedEncoding::Invlpg { base: rm }, Mnemonic::Invlpg)
        }
        _ => return None,
    };
    Some((op, rex_len + 3, mnemonic))
}

/// Executes a fast-path instruction of `len` bytes with the same handlers the decoded path
/// uses; `next` is the address after it.
#[inline(always)] // as `fixed_encoding`
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
        FixedEncoding::SwapgsThen(second) => {
            coalesce::swapgs_before(cpu)?;
            match second {
                AfterSwapgs::Sysretq => sysret_instruction(cpu, true),
                AfterSwapgs::Sysexitq => sysexit_instruction(cpu, true),
                AfterSwapgs::Iretq => iret_instruction(cpu, mem, 8),
                AfterSwapgs::StiSysexitq => {
                    let sysexit_at = cpu.rip.wrapping_add(1);
                    cli_sti(cpu, true, sysexit_at)?;
                    cpu.rip = sysexit_at;
                    sysexit_instruction(cpu, true)
                }
            }
        }
        FixedEncoding::Iretq => iret_instruction(cpu, mem, 8),
        FixedEncoding::Sysretq => sysret_instruction(cpu, true),
        FixedEncoding::Sysexitq => sysexit_instruction(cpu, true),
        FixedEncoding::Rdmsr => rdmsr(cpu),
        FixedEncoding::Wrmsr => wrmsr(cpu),
        FixedEncoding::Int(vector) => Err(Event::software(vector, len).into()),
        FixedEncoding::Int3 => Err(int3_event(len).into()),
        FixedEncoding::MovCr { to_cr, cr, gpr } => mov_cr(cpu, to_cr, cr, usize::from(gpr)),
        FixedEncoding::Invlpg { base } => {
            let at = cpu.gpr.get(usize::from(base)).copied().unwrap_or(0);
            invlpg_at(cpu, at)
        }
    }
}

/// An instruction the kernel's fast lane runs (`super::execute_prefetched`), as a small number:
/// the kernel books each in its own accounting row (`accounting::KindRow`), found by this index
/// rather than by a lookup per trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LaneInstruction {
    /// IN from a port.
    In,
    /// OUT to a port.
    Out,
    /// RDMSR.
    Rdmsr,
    /// WRMSR.
    Wrmsr,
    /// MOV CR0, r64.
    MovToCr0,
    /// MOV CR3, r64: the guest's address-space switch.
    MovToCr3,
    /// MOV CR4, r64.
    MovToCr4,
    /// MOV CR8, r64 (the TPR).
    MovToCr8,
    /// MOV to CR2 (the other control registers fault before they get here).
    MovToOtherCr,
    /// MOV r64, CRn.
    MovFromCr,
    /// INVLPG [r64].
    Invlpg,
}

impl LaneInstruction {
    /// Every lane instruction, in index order.
    pub const ALL: [LaneInstruction; 11] = [
        Self::In,
        Self::Out,
        Self::Rdmsr,
        Self::Wrmsr,
        Self::MovToCr0,
        Self::MovToCr3,
        Self::MovToCr4,
        Self::MovToCr8,
        Self::MovToOtherCr,
        Self::MovFromCr,
        Self::Invlpg,
    ];

    /// Its trap-table name: the one the decoded path gives the same instruction, so both
    /// paths book into one row.
    pub fn name(self) -> &'static str {
        use super::names::{mnemonic_name, mov_cr_name};
        match self {
            Self::In => mnemonic_name(Mnemonic::In),
            Self::Out => mnemonic_name(Mnemonic::Out),
            Self::Rdmsr => mnemonic_name(Mnemonic::Rdmsr),
            Self::Wrmsr => mnemonic_name(Mnemonic::Wrmsr),
            Self::MovToCr0 => mov_cr_name(true, Register::CR0),
            Self::MovToCr3 => mov_cr_name(true, Register::CR3),
            Self::MovToCr4 => mov_cr_name(true, Register::CR4),
            Self::MovToCr8 => mov_cr_name(true, Register::CR8),
            Self::MovToOtherCr => mov_cr_name(true, Register::CR2),
            Self::MovFromCr => mov_cr_name(false, Register::CR0),
            Self::Invlpg => mnemonic_name(Mnemonic::Invlpg),
        }
    }

    /// Its place in [`LaneInstruction::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// The fast-lane instruction `op` is, if the kernel's fast lane takes it: instructions that
/// neither load a segment, transfer control nor touch guest memory, so the lane's exit can keep
/// the real CS/SS and the data segments as they are.
pub(super) fn lane_instruction(op: FixedEncoding) -> Option<LaneInstruction> {
    Some(match op {
        FixedEncoding::In(..) => LaneInstruction::In,
        FixedEncoding::Out(..) => LaneInstruction::Out,
        FixedEncoding::Rdmsr => LaneInstruction::Rdmsr,
        FixedEncoding::Wrmsr => LaneInstruction::Wrmsr,
        FixedEncoding::MovCr { to_cr: false, .. } => LaneInstruction::MovFromCr,
        FixedEncoding::MovCr { cr, .. } => match cr {
            Register::CR0 => LaneInstruction::MovToCr0,
            Register::CR3 => LaneInstruction::MovToCr3,
            Register::CR4 => LaneInstruction::MovToCr4,
            Register::CR8 => LaneInstruction::MovToCr8,
            _ => LaneInstruction::MovToOtherCr,
        },
        FixedEncoding::Invlpg { .. } => LaneInstruction::Invlpg,
        _ => return None,
    })
}

/// A quick look at the first bytes, before `fixed_encoding`: false for every instruction the
/// fast lane does not take (SWAPGS, IRETQ, SYSRETQ, CLI/STI, ... go to the dispatcher without
/// paying for the full match twice). True for all it takes (`lane_instruction`); the match decides.
pub(super) fn may_be_in_fast_lane(b: &[u8; 8]) -> bool {
    let rest = match b[0] {
        0x40..=0x4F => &b[1..],
        _ => &b[..],
    };
    match *rest {
        [0xE4..=0xE7 | 0xEC..=0xEF, ..] => true,
        [0x0F, 0x20 | 0x22 | 0x30 | 0x32, ..] => true,
        // INVLPG is 0F 01 /7 with a memory operand; SWAPGS (0F 01 F8) has mod = 11.
        [0x0F, 0x01, modrm, ..] => modrm >> 6 != 3 && (modrm >> 3) & 7 == 7,
        _ => false,
    }
}

/// The trap-table name of a fixed-encoding instruction.
#[inline(always)] // as `fixed_encoding`
pub(super) fn fixed_name(op: FixedEncoding, mnemonic: Mnemonic) -> &'static str {
    match op {
        FixedEncoding::SwapgsThen(second) => second.pair_name(),
        FixedEncoding::MovCr { to_cr, cr, .. } => super::names::mov_cr_name(to_cr, cr),
        _ => super::names::mnemonic_name(mnemonic),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Code, Decoder, DecoderOptions};

    /// `ALL` lists every lane instruction at its own index, each with its own name.
    #[test]
    fn lane_instructions_are_indexed_in_order() {
        for (i, lane) in LaneInstruction::ALL.iter().enumerate() {
            assert_eq!(lane.index(), i);
        }
        let mut names: std::vec::Vec<_> = LaneInstruction::ALL.iter().map(|l| l.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), LaneInstruction::ALL.len());
    }

    /// Every MOV CRn and INVLPG [reg] encoding the fixed path builds is the instruction the
    /// decoder decodes from the same bytes (same code, registers, memory base, length); the
    /// encodings it leaves alone are left to the decoder.
    #[test]
    fn built_instructions_match_the_decoder() {
        let mut built_count = 0;
        for rex in core::iter::once(None).chain((0x40..=0x4Fu8).map(Some)) {
            for op in [0x20u8, 0x22, 0x01] {
                for modrm in 0..=0xFFu8 {
                    let mut b = [0x90u8; MAX_INSTRUCTION_LEN];
                    let bytes: &[u8] = match rex {
                        Some(r) => &[r, 0x0F, op, modrm],
                        None => &[0x0F, op, modrm],
                    };
                    b[..bytes.len()].copy_from_slice(bytes);
                    let decoded = Decoder::with_ip(64, &b, 0x1000, DecoderOptions::NONE).decode();
                    let Some((op, len, _)) = control_register_or_invlpg(&b) else {
                        // Not recognised: it must not be one of the shapes the fixed path takes.
                        let shape = matches!(decoded.code(), Code::Mov_r64_cr | Code::Mov_cr_r64)
                            || (decoded.code() == Code::Invlpg_m
                                && decoded.memory_index() == Register::None
                                && decoded.memory_displacement64() == 0
                                && decoded.memory_base() != Register::RIP
                                && decoded.memory_base().is_gpr64());
                        assert!(
                            !shape || decoded.len() != bytes.len(),
                            "{bytes:02x?} not taken"
                        );
                        continue;
                    };
                    built_count += 1;
                    assert_eq!(len as usize, decoded.len(), "{bytes:02x?}");
                    let gpr = |n: u8| Register::RAX + u32::from(n);
                    match op {
                        FixedEncoding::MovCr {
                            to_cr: false,
                            cr,
                            gpr: g,
                        } => {
                            assert_eq!(decoded.code(), Code::Mov_r64_cr, "{bytes:02x?}");
                            assert_eq!(
                                (decoded.op0_register(), decoded.op1_register()),
                                (gpr(g), cr)
                            );
                        }
                        FixedEncoding::MovCr {
                            to_cr: true,
                            cr,
                            gpr: g,
                        } => {
                            assert_eq!(decoded.code(), Code::Mov_cr_r64, "{bytes:02x?}");
                            assert_eq!(
                                (decoded.op0_register(), decoded.op1_register()),
                                (cr, gpr(g))
                            );
                        }
                        FixedEncoding::Invlpg { base } => {
                            assert_eq!(decoded.code(), Code::Invlpg_m, "{bytes:02x?}");
                            assert_eq!(decoded.memory_base(), gpr(base), "{bytes:02x?}");
                            assert_eq!(decoded.memory_index(), Register::None, "{bytes:02x?}");
                            assert_eq!(decoded.memory_displacement64(), 0, "{bytes:02x?}");
                        }
                        other => panic!("{bytes:02x?}: {other:?}"),
                    }
                }
            }
        }
        // MOV CRn: 2 directions x 4 mod values x 8 r/m x (CR0/2/3/4 under the 9 prefixes
        // without REX.R + CR8 under the 8 with it) = 2 816; INVLPG: 6 base registers x 17.
        assert_eq!(built_count, 2_816 + 102);
    }

    /// The fast lane's byte filter lets through every encoding the lane takes, and keeps out
    /// the coalesced SWAPGS pairs and the other fixed encodings.
    #[test]
    fn the_fast_lane_filter_passes_exactly_what_the_lane_may_take() {
        let mut cpu = crate::cpu::VCpu::at_entry(0x1000, 0, 0, 0x10_0000, Default::default());
        cpu.fast_paths = true;
        let mut seen = 0;
        for first in 0..=0xFFu8 {
            for second in 0..=0xFFu8 {
                for third in [0x00u8, 0x38, 0xC0, 0xD8, 0xF8] {
                    let eight = [first, second, third, 0x0F, 0x07, 0x90, 0x90, 0x90];
                    let mut b = [0x90u8; MAX_INSTRUCTION_LEN];
                    b[..8].copy_from_slice(&eight);
                    let taken = fixed_encoding(&cpu, &b, 8)
                        .is_some_and(|(op, ..)| lane_instruction(op).is_some());
                    if taken {
                        seen += 1;
                        assert!(may_be_in_fast_lane(&eight), "{eight:02x?} filtered out");
                    }
                }
            }
        }
        assert!(seen > 100, "{seen}");
        for swapgs_pair in [
            [0x0F, 0x01, 0xF8, 0x48, 0x0F, 0x07, 0x90, 0x90],
            [0x0F, 0x01, 0xF8, 0x48, 0xCF, 0, 0, 0],
        ] {
            assert!(!may_be_in_fast_lane(&swapgs_pair));
        }
    }
}
