//! Decode (iced-x86) and emulation of the instructions that trap when a guest kernel runs at
//! CPL 3: each redone with the architectural checks at the guest's *virtual* CPL (SDM Vol. 2
//! per instruction; Vol. 3 §2.8 system instructions, §19.5 I/O permission).
//!
//! Article challenge "敏感指令的陷入和模拟": the privileged instruction faults into the VMM; this
//! module fetches it through guest memory (a fetch that faults is the guest's #PF), decodes it,
//! and applies its effect to the virtual CPU and devices. What it cannot or must not do itself
//! (reload the shadow CR3, INVLPG in the shadow tables) it records as [`super::Effects`].
//!
//! This file is the fetch-decode-execute flow: [`handle_instruction`], the single-step rule
//! (SDM Vol. 3 §17.3.1.4) and the end of an instruction (RIP, the interrupt shadow, RF). The
//! instructions themselves are grouped by concern:
//!
//! | module | instructions |
//! |---|---|
//! | `fixed_encodings` | instructions matched by their bytes, skipping the decoder: CLI, STI, HLT, IN/OUT, SWAPGS, IRETQ, SYSRETQ... by their bytes |
//! | `system` | CLI/STI/HLT, MOV CRn/DRn, CLTS/LMSW/SMSW, INVLPG, MSRs, CPUID, RDTSC; LGDT/LIDT/LLDT/LTR and their stores |
//! | `io` | IN/OUT/INS/OUTS with the I/O permission check (Vol. 1 §19.5) and the REP bound |
//! | `segment_loads` | MOV Sreg, POP FS/GS, LSS/LFS/LGS |
//! | `transfers` | far RET/JMP/CALL, IRET, SYSCALL/SYSRET, SYSENTER/SYSEXIT, SWAPGS, INT n/INT3/INT1 |
//! | `page_table_write` | the store to a write-protected page-table page (shadow MMU, cached policy) |
//! | `operands` | register and memory operands, addresses, far pointers |
//! | `names` | trap-table names and disassembly for the trace |

mod fixed_encodings;
mod io;
mod names;
mod operands;
mod page_table_write;
mod segment_loads;
mod system;
mod transfers;

pub use fixed_encodings::LaneInstruction;
pub use names::{disassemble, trap_name};

use super::cpuid::HostCpu;
use super::deliver::deliver;
use super::event::{vector, CpuStop, Event};
use super::memory::{read_slice, write_value, Fault, GuestMemory};
use super::state::{dr, rflags, Gpr, VCpu};
use crate::accounting::Phase;
use crate::io::PortIo;
use fixed_encodings::{execute_fixed, fixed_encoding, fixed_name};
use iced_x86::{Code, Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic};
use operands::not_emulated;
use shadow_mmu::addr::is_canonical;
use shadow_mmu::AccessKind;

/// Longest x86 instruction.
const MAX_INSTRUCTION_LEN: usize = 15;

/// Elements a REP string instruction (INS/OUTS, the page-table REP STOS/MOVS) moves in one
/// trap. A REP instruction is restartable between iterations (SDM Vol. 2B "REP/REPE/REPZ/
/// REPNE/REPNZ": an interrupt may be taken there with RCX/RSI/RDI updated and RIP on the
/// instruction), so the VMM stops after this many and lets the guest run it again, instead
/// of looping inside one trap for as long as RCX (up to 2^64) says.
pub const MAX_REP_ELEMENTS_PER_TRAP: u64 = 4096;

/// Ends a REP string instruction between two iterations: RIP stays on it (the next trap
/// carries on), and RF = 1 as the hardware pushes for an interrupt taken there (SDM Vol. 3
/// §17.3.1.1), so an injected interrupt's frame is what the hardware's would be.
fn rep_unfinished(cpu: &mut VCpu) -> Flow {
    cpu.rflags |= rflags::RF;
    Flow::Jumped
}

/// Why the VMM is emulating an instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The instruction raised this exception at real CPL 3 (#GP, #UD, ...). If it is not one
    /// the VMM emulates, the exception is the guest's own and is delivered to it unchanged.
    Fault(Event),
    /// It wrote to a page-table page the shadow MMU write-protects (cached policy): its store
    /// is emulated so the MMU sees it.
    PageTableWrite,
}

/// How an emulated instruction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It retired; the guest continues at the new RIP.
    Emulated,
    /// HLT retired: the guest waits for an interrupt.
    Halted,
    /// Not an instruction the VMM emulates (a user program's CLI, a load from a non-canonical
    /// address): the fault the hardware raised is the guest's own and was delivered as is (or
    /// the #GP/#DF its delivery turned into).
    Reflected(Event),
    /// It raised an event (or the original fault was the guest's own); this is the one
    /// delivered through the guest's IDT (a #GP or #DF if delivering the first one faulted).
    Delivered(Event),
}

/// The result of handling one instruction trap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Handled {
    /// The instruction, when it could be fetched and decoded.
    pub mnemonic: Option<Mnemonic>,
    /// Its name in the trap table ("CLI", "MOV CR3", "OUT", ...; "fetch" when the fetch
    /// faulted, "other" for an instruction whose own fault was reflected).
    pub name: &'static str,
    /// What happened.
    pub outcome: Outcome,
}

/// The control flow an executed instruction leaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flow {
    /// Continue at the next instruction.
    Next,
    /// RIP was set by the instruction.
    Jumped,
    /// RIP and RFLAGS were switched wholesale by SYSCALL or SYSRET. For these two the
    /// single-step trap after the instruction follows the TF it *leaves*, not the TF it began
    /// with as for every other instruction (SDM Vol. 3 §17.3.1.4: a POPF that clears TF still
    /// traps): IA32_FMASK clearing TF keeps a user program's TF from trapping on the kernel's
    /// first instruction (deciding by the old flags was Xen's XSA-204, a privilege escalation
    /// inside the guest), and a SYSRET that restores TF from R11 traps at once, in user mode
    /// before the first user instruction (Linux's entry code relies on both; QEMU's CPU
    /// behaves so).
    JumpedWithNewFlags,
    /// HLT: continue at the next instruction once an interrupt arrives.
    Halted,
    /// Not an instruction the VMM emulates: the hardware fault that brought it here is the
    /// guest's own, delivered unchanged (RIP stays on the instruction).
    Reflect(Event),
}

/// Emulates the instruction at RIP and delivers any exception it raises. `Err` is a stop:
/// the guest cannot continue (triple fault, an instruction this VMM does not emulate, memory
/// it must not touch). `mark` is called as each phase ends (decode, emulate, injection of a
/// raised fault), for the cost breakdown of the benchmarks.
pub fn handle_instruction<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    cpuid: &dyn HostCpu,
    cause: Cause,
    mark: &mut dyn FnMut(Phase),
) -> Result<Handled, CpuStop>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    handle_instruction_from(cpu, mem, ports, cpuid, cause, mark, None)
}

/// [`handle_instruction`], where the caller may already hold the first 8 bytes at RIP, read
/// from RIP's page with the rights of the fetch (`code`; the kernel's fast lane reads them for
/// every #GP): they stand for the fetch's first bytes, and the rest, if the decoder needs it,
/// is fetched as usual. `None` fetches them all.
pub fn handle_instruction_from<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    cpuid: &dyn HostCpu,
    cause: Cause,
    mark: &mut dyn FnMut(Phase),
    code: Option<&[u8; 8]>,
) -> Result<Handled, CpuStop>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    let tf_at_start = cpu.rflags & rflags::TF != 0;
    let (decoded, result) = emulate(cpu, mem, ports, cpuid, cause, mark, code);
    let mnemonic = decoded.map(|d| d.0);
    let name = decoded.map_or("fetch", |d| d.1);
    let single_stepping = match result {
        Ok(Flow::JumpedWithNewFlags) => cpu.rflags & rflags::TF != 0,
        _ => tf_at_start,
    };
    // An instruction that opens an interrupt shadow (MOV SS, SDM Vol. 3 §6.8.3; STI that sets
    // IF, as QEMU's CPU does too) delays the single-step trap past the next instruction, which
    // the CPU then runs with TF set and traps after by itself.
    let opened_shadow = cpu.interrupt_shadow.is_some() && cpu.interrupt_shadow == Some(cpu.rip);
    let outcome = match result {
        Ok(Flow::Halted) => Outcome::Halted,
        Ok(Flow::Next | Flow::Jumped | Flow::JumpedWithNewFlags)
            if single_stepping && !opened_shadow =>
        {
            let delivered = single_step_trap(cpu, mem);
            mark(Phase::Injection);
            Outcome::Delivered(delivered?)
        }
        Ok(Flow::Reflect(event)) => {
            let delivered = deliver(cpu, mem, event);
            mark(Phase::Injection);
            Outcome::Reflected(delivered?)
        }
        Ok(_) => Outcome::Emulated,
        Err(Fault::Raise(event)) => {
            let delivered = deliver(cpu, mem, event);
            mark(Phase::Injection);
            Outcome::Delivered(delivered?)
        }
        Err(Fault::Stop(stop)) => return Err(stop),
    };
    Ok(Handled {
        mnemonic,
        name,
        outcome,
    })
}

/// The single-step trap after an instruction the guest did not really execute (one the VMM
/// emulated, or a SYSCALL/SYSENTER it forwarded): with RFLAGS.TF set when the instruction
/// began (for SYSCALL and SYSRET: left set by it, see [`Flow::JumpedWithNewFlags`]), a #DB
/// follows it once it retires, with RIP at the next instruction (SDM Vol. 3 §17.3.1.4). The
/// hardware cannot raise it: the instruction trapped before it could retire.
pub fn single_step_trap<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
) -> Result<Event, CpuStop> {
    cpu.dr6 |= dr::DR6_BS;
    deliver(cpu, mem, Event::exception(vector::DB))
}

/// Executes PUSHF when it is the instruction in an STI/MOV SS interrupt shadow, so that the VMM
/// need not single-step it to open the interrupt window: single-stepping sets the real TF, and
/// PUSHF would push it, so the guest would see (and later POPF) a TF it never set. The image is
/// the virtual RFLAGS with VM and RF clear ([`pushf_image`]). Returns whether it did; a
/// PUSHF whose push would fault is left to the CPU.
pub fn pushf_in_interrupt_shadow<M: GuestMemory + ?Sized>(cpu: &mut VCpu, mem: &mut M) -> bool {
    let Ok(ins) = fetch(cpu, mem) else {
        return false;
    };
    let size = match ins.code() {
        Code::Pushfq => 8,
        Code::Pushfw => 2,
        _ => return false,
    };
    let image = pushf_image(cpu.rflags);
    let rsp = cpu.reg(Gpr::Rsp).wrapping_sub(size as u64);
    if write_value(mem, rsp, size, image, cpu.privilege(), true).is_err() {
        return false;
    }
    cpu.set_reg(Gpr::Rsp, rsp);
    cpu.rip = ins.next_ip();
    cpu.interrupt_shadow = None;
    true
}

// Lab 2 (docs/labs/lab2-virtual-if.md): built with the feature `lab2`, the student's PUSHF
// image (labs/lab2_virtual_if.rs) stands in for the one below.
#[cfg(feature = "lab2")]
use crate::labs::lab2::pushf_image;

/// The RFLAGS image PUSHF pushes, given the virtual RFLAGS: the flags as they are, with VM and
/// RF read as 0 (SDM Vol. 2B "PUSHF/PUSHFD/PUSHFQ").
#[cfg(not(feature = "lab2"))]
fn pushf_image(rflags: u64) -> u64 {
    rflags & !(rflags::VM | rflags::RF)
}

/// The fast lane (host option `fastpath=`; the kernel's `vmm/fast_path.rs`): the instruction at
/// RIP, whose first bytes the caller has already read (`bytes`, all on RIP's page), when it is
/// one the lane takes — IN/OUT, RDMSR/WRMSR, MOV to/from CRn or INVLPG, at virtual CPL 0, with
/// no single-step and no interrupt shadow — executed by the same handlers and ended by the same
/// rules as [`handle_instruction`] (RF cleared at its start, RIP, the canonical check at its
/// end). `None`: not one of them, and nothing changed. Otherwise which one it was (its
/// trap-table name is [`LaneInstruction::name`]) and whether it retired; `Err(fault)`: it raised `fault` (the vCPU as at the fault, RIP on the
/// instruction), for the caller to deliver as [`handle_instruction`] would.
pub fn execute_prefetched<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    bytes: &[u8; 8],
) -> Option<(LaneInstruction, Result<(), Fault>)>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    if !cpu.fast_paths
        || cpu.cpl != 0
        || cpu.rflags & rflags::TF != 0
        || cpu.interrupt_shadow.is_some()
        || !fixed_encodings::may_be_in_fast_lane(bytes)
    {
        return None;
    }
    let mut b = [0u8; MAX_INSTRUCTION_LEN];
    b[..bytes.len()].copy_from_slice(bytes);
    let (op, len, _) = fixed_encoding(cpu, &b, bytes.len())?;
    let lane = fixed_encodings::lane_instruction(op)?;
    cpu.rflags &= !rflags::RF;
    let next = cpu.rip.wrapping_add(len);
    let result = execute_fixed(cpu, mem, ports, op, len as u8, next)
        .and_then(|flow| retire(cpu, flow, next, None))
        .map(|_| ());
    Some((lane, result))
}

/// Fetches, decodes and executes one instruction without delivering what it raises.
fn emulate<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    cpuid: &dyn HostCpu,
    cause: Cause,
    mark: &mut dyn FnMut(Phase),
    code: Option<&[u8; 8]>,
) -> (Option<(Mnemonic, &'static str)>, Result<Flow, Fault>)
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    let shadow_before = cpu.interrupt_shadow;
    let fetched = match code {
        Some(code) => {
            let mut bytes = [0u8; MAX_INSTRUCTION_LEN];
            bytes[..code.len()].copy_from_slice(code);
            Ok((bytes, code.len()))
        }
        None => fetch_bytes(cpu, mem),
    };
    let (bytes, first) = match fetched {
        Ok(fetched) => fetched,
        Err(fault) => {
            mark(Phase::Decode);
            return (None, Err(fault));
        }
    };
    // SDM Vol. 3 §17.3.1.1: RF is cleared at the start of each instruction (a fault in it
    // pushes RF = 1 anyway; IRET and SYSRET load it), so the RF = 1 an IRET restored from a
    // fault frame does not outlive the instruction it was for.
    cpu.rflags &= !rflags::RF;
    // The fast path: a few privileged instructions with one fixed encoding and no operand
    // byte to decode (exact byte patterns, no prefixes) skip the decoder.
    let fast = if cause == Cause::PageTableWrite {
        None
    } else {
        fixed_encoding(cpu, &bytes, first)
    };
    let (decoded, next, result) = match fast {
        Some((op, len, mnemonic)) => {
            mark(Phase::Decode);
            let next = cpu.rip.wrapping_add(len);
            let result = execute_fixed(cpu, mem, ports, op, len as u8, next);
            ((mnemonic, fixed_name(op, mnemonic)), next, result)
        }
        None => {
            let decoded = decode(cpu, mem, bytes, first);
            mark(Phase::Decode);
            let ins = match decoded {
                Ok(ins) => ins,
                Err(fault) => return (None, Err(fault)),
            };
            let result = execute(cpu, mem, ports, cpuid, &ins, cause);
            ((ins.mnemonic(), trap_name(&ins)), ins.next_ip(), result)
        }
    };
    mark(Phase::Emulate);
    let result = result.and_then(|flow| retire(cpu, flow, next, shadow_before));
    (Some(decoded), result)
}

/// The end of an instruction that completed with `flow`: RIP moves to `next` unless the
/// instruction set it, and an interrupt shadow that was open before it (`shadow_before`) closes.
#[inline(always)] // two callers, as `fixed_encoding`
fn retire(
    cpu: &mut VCpu,
    flow: Flow,
    next: u64,
    shadow_before: Option<u64>,
) -> Result<Flow, Fault> {
    if matches!(flow, Flow::Next | Flow::Halted) {
        cpu.rip = next;
    }
    // The shadow covers one instruction: it ends with this one unless this one set it.
    if cpu.interrupt_shadow == shadow_before {
        cpu.interrupt_shadow = None;
    }
    // An instruction that ends at the last canonical byte retires; the fetch of the next
    // one is the #GP(0), a fault whose saved RIP is that non-canonical address (SDM Vol. 3
    // §6.5 "Faults", §6.15 interrupt 13 "in 64-bit mode, a memory address in
    // non-canonical form"; Bochs' prefetch does the same). Raised here, so the VMM never
    // returns to the guest with a non-canonical RIP (its own IRETQ would fault at CPL 0).
    // Every transfer that loads RIP from elsewhere (far JMP/CALL/RET, IRET, SYSRET,
    // SYSEXIT, delivery to a gate, WRMSR of LSTAR/SYSENTER_EIP) checks first and faults
    // at the instruction, so this is reached only by sequential execution (a HLT there
    // takes its #GP at once instead of after the wake-up interrupt).
    if !is_canonical(cpu.rip) {
        return Err(Event::gp(0).into());
    }
    Ok(flow)
}

/// Executes a decoded instruction. Each group of instructions is one module, and at most one
/// of them knows a given instruction; one none knows is the guest's own fault (reflected),
/// the store of a page-table write, or an instruction this VMM does not emulate.
fn execute<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    cpuid: &dyn HostCpu,
    ins: &Instruction,
    cause: Cause,
) -> Result<Flow, Fault>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    let known = system::execute_processor_control(cpu, mem, cpuid, ins)
        .or_else(|| system::execute_descriptor_tables(cpu, mem, ins))
        .or_else(|| io::execute(cpu, mem, ports, ins))
        .or_else(|| segment_loads::execute(cpu, mem, cpuid, ins))
        .or_else(|| transfers::execute(cpu, mem, ins));
    match known {
        Some(result) => result,
        None if cause == Cause::PageTableWrite => page_table_write::data_write(cpu, mem, ins),
        None => match cause {
            Cause::Fault(event) if cpu.cpl != 0 || !is_privileged(ins) => Ok(Flow::Reflect(event)),
            _ => Err(not_emulated(ins)),
        },
    }
}

/// Instructions that succeed at CPL 0 on hardware but that this VMM does not emulate: run by
/// the guest kernel they stop the guest instead of raising a #GP it would never see natively.
fn is_privileged(ins: &Instruction) -> bool {
    matches!(
        ins.mnemonic(),
        Mnemonic::Xsetbv
            | Mnemonic::Invpcid
            | Mnemonic::Monitor
            | Mnemonic::Mwait
            | Mnemonic::Xsaves
            | Mnemonic::Xrstors
            | Mnemonic::Clac
            | Mnemonic::Stac
            | Mnemonic::Invlpga
            | Mnemonic::Invlpgb
            | Mnemonic::Tlbsync
    )
}

/// Fetches the bytes at RIP up to the end of its page (at most 15) with the guest's rights, and
/// says how many; `decode` fetches from the next page only if the instruction needs it, so an
/// instruction that ends before an unmapped page does not fault on it.
fn fetch_bytes<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
) -> Result<([u8; MAX_INSTRUCTION_LEN], usize), Fault> {
    let rip = cpu.rip;
    let mut bytes = [0u8; MAX_INSTRUCTION_LEN];
    let to_page_end = (0x1000 - (rip & 0xFFF)) as usize;
    let first = to_page_end.min(MAX_INSTRUCTION_LEN);
    read_slice(
        mem,
        rip,
        &mut bytes[..first],
        AccessKind::Fetch,
        cpu.privilege(),
        false,
    )?;
    Ok((bytes, first))
}

/// Decodes the instruction whose first `first` bytes are in `bytes`, fetching the rest from the
/// next page only if the decoder runs out.
fn decode<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    mut bytes: [u8; MAX_INSTRUCTION_LEN],
    first: usize,
) -> Result<Instruction, Fault> {
    let rip = cpu.rip;
    let mut have = first;
    let mut decoder = Decoder::with_ip(64, &bytes[..have], rip, DecoderOptions::NONE);
    let mut ins = decoder.decode();
    // Out of bytes: the rest of this page first, the next page only if still needed (an
    // instruction that ends before an unmapped page must not fault on it).
    while ins.is_invalid()
        && decoder.last_error() == DecoderError::NoMoreBytes
        && have < MAX_INSTRUCTION_LEN
    {
        let at = rip.wrapping_add(have as u64);
        let to_page_end = (0x1000 - (at & 0xFFF)) as usize;
        let more = (MAX_INSTRUCTION_LEN - have).min(to_page_end);
        read_slice(
            mem,
            at,
            &mut bytes[have..have + more],
            AccessKind::Fetch,
            cpu.privilege(),
            false,
        )?;
        have += more;
        decoder = Decoder::with_ip(64, &bytes[..have], rip, DecoderOptions::NONE);
        ins = decoder.decode();
    }
    if ins.is_invalid() {
        return Err(Event::ud().into());
    }
    Ok(ins)
}

/// Fetches up to 15 bytes at RIP with the guest's rights and decodes them. Bytes on a second
/// page are fetched only if the instruction needs them, so an instruction that ends before an
/// unmapped page does not fault on it.
pub fn fetch<M: GuestMemory + ?Sized>(cpu: &VCpu, mem: &mut M) -> Result<Instruction, Fault> {
    let (bytes, first) = fetch_bytes(cpu, mem)?;
    decode(cpu, mem, bytes, first)
}

/// Decodes one instruction so the decoder's one-time setup happens before the guest runs (it
/// costs millions of instructions once, which would otherwise land on the guest's first trap).
pub fn warm_up_decoder() {
    let mut decoder = Decoder::with_ip(64, &[0x0F, 0x01, 0x10], 0, DecoderOptions::NONE);
    let _ = decoder.decode();
}
