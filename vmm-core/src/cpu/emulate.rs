//! Decode (iced-x86) and emulation of the instructions that trap when a guest kernel runs at
//! CPL 3: each redone with the architectural checks at the guest's *virtual* CPL (SDM Vol. 2
//! per instruction; Vol. 3 §2.8 system instructions, §19.5 I/O permission).
//!
//! Article challenge "敏感指令的陷入和模拟": the privileged instruction faults into the VMM; this
//! module fetches it through guest memory (a fetch that faults is the guest's #PF), decodes it,
//! and applies its effect to the virtual CPU and devices. What it cannot or must not do itself
//! (reload the shadow CR3, INVLPG in the shadow tables) it records as [`super::Effects`].

use super::cpuid::{null_selector_clears_base, virtual_cpuid, HostCpu};
use super::deliver::deliver;
use super::event::{vector, CpuStop, Event, EventKind};
use super::memory::{access_fault, read_value, write_value, Fault, GuestMemory};
use super::msr::{read_msr, write_msr};
use super::segments::{far_jump, far_return, iret, load_data_segment, read_system_descriptor};
use super::state::{cr0, cr4, dr, efer, rflags, Gpr, SegReg, Segment, TableRegister, VCpu};
use super::syscall::{swapgs, syscall, sysenter, sysexit, sysret};
use crate::accounting::Phase;
use crate::io::PortIo;
use iced_x86::{
    Code, Decoder, DecoderError, DecoderOptions, Instruction, Mnemonic, OpKind, Register,
};
use shadow_mmu::addr::is_canonical;
use shadow_mmu::{AccessKind, Privilege};

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
enum Flow {
    /// Continue at the next instruction.
    Next,
    /// RIP was set by the instruction.
    Jumped,
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
    let single_stepping = cpu.rflags & rflags::TF != 0;
    let (decoded, result) = emulate(cpu, mem, ports, cpuid, cause, mark);
    let mnemonic = decoded.map(|d| d.0);
    let name = decoded.map_or("fetch", |d| d.1);
    // An instruction that opens an interrupt shadow (MOV SS, SDM Vol. 3 §6.8.3; STI that sets
    // IF, as QEMU's CPU does too) delays the single-step trap past the next instruction, which
    // the CPU then runs with TF set and traps after by itself.
    let opened_shadow = cpu.interrupt_shadow.is_some() && cpu.interrupt_shadow == Some(cpu.rip);
    let outcome = match result {
        Ok(Flow::Halted) => Outcome::Halted,
        Ok(Flow::Next | Flow::Jumped) if single_stepping && !opened_shadow => {
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
/// began, a #DB follows it once it retires, with RIP at the next instruction (SDM Vol. 3
/// §17.3.1.4). The hardware cannot raise it: the instruction trapped before it could retire.
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
/// the virtual RFLAGS with VM and RF clear (SDM Vol. 2B "PUSHF"). Returns whether it did; a
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
    let image = cpu.rflags & !(rflags::VM | rflags::RF);
    let rsp = cpu.reg(Gpr::Rsp).wrapping_sub(size as u64);
    if write_value(mem, rsp, size, image, cpu.privilege(), true).is_err() {
        return false;
    }
    cpu.set_reg(Gpr::Rsp, rsp);
    cpu.rip = ins.next_ip();
    cpu.interrupt_shadow = None;
    true
}

/// Fetches, decodes and executes one instruction without delivering what it raises.
fn emulate<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    cpuid: &dyn HostCpu,
    cause: Cause,
    mark: &mut dyn FnMut(Phase),
) -> (Option<(Mnemonic, &'static str)>, Result<Flow, Fault>)
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    let shadow_before = cpu.interrupt_shadow;
    let (bytes, first) = match fetch_bytes(cpu, mem) {
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
        quick(&bytes)
    };
    let (decoded, next, result) = match fast {
        Some((op, len, mnemonic)) => {
            mark(Phase::Decode);
            let next = cpu.rip.wrapping_add(len);
            let result = execute_quick(cpu, mem, ports, op, len as u8, next);
            ((mnemonic, mnemonic_name(mnemonic)), next, result)
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
    if let Ok(flow) = result {
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
            return (Some(decoded), Err(Event::gp(0).into()));
        }
    }
    (Some(decoded), result)
}

/// An instruction of the fast path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quick {
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
fn quick(b: &[u8; MAX_INSTRUCTION_LEN]) -> Option<(Quick, u64, Mnemonic)> {
    Some(match *b {
        [0xFA, ..] => (Quick::Cli, 1, Mnemonic::Cli),
        [0xFB, ..] => (Quick::Sti, 1, Mnemonic::Sti),
        [0xF4, ..] => (Quick::Hlt, 1, Mnemonic::Hlt),
        [0xEC, ..] => (Quick::In(None, 1), 1, Mnemonic::In),
        [0xED, ..] => (Quick::In(None, 4), 1, Mnemonic::In),
        [0xEE, ..] => (Quick::Out(None, 1), 1, Mnemonic::Out),
        [0xEF, ..] => (Quick::Out(None, 4), 1, Mnemonic::Out),
        [0xE4, port, ..] => (Quick::In(Some(port), 1), 2, Mnemonic::In),
        [0xE5, port, ..] => (Quick::In(Some(port), 4), 2, Mnemonic::In),
        [0xE6, port, ..] => (Quick::Out(Some(port), 1), 2, Mnemonic::Out),
        [0xE7, port, ..] => (Quick::Out(Some(port), 4), 2, Mnemonic::Out),
        [0x0F, 0x01, 0xF8, ..] => (Quick::Swapgs, 3, Mnemonic::Swapgs),
        [0x48, 0xCF, ..] => (Quick::Iretq, 2, Mnemonic::Iretq),
        [0x48, 0x0F, 0x07, ..] => (Quick::Sysretq, 3, Mnemonic::Sysretq),
        [0x48, 0x0F, 0x35, ..] => (Quick::Sysexitq, 3, Mnemonic::Sysexitq),
        [0x0F, 0x32, ..] => (Quick::Rdmsr, 2, Mnemonic::Rdmsr),
        [0x0F, 0x30, ..] => (Quick::Wrmsr, 2, Mnemonic::Wrmsr),
        [0xCD, vector, ..] => (Quick::Int(vector), 2, Mnemonic::Int),
        [0xCC, ..] => (Quick::Int3, 1, Mnemonic::Int3),
        _ => return None,
    })
}

/// Executes a fast-path instruction with the same handlers the decoded path uses.
fn execute_quick<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    op: Quick,
    len: u8,
    next: u64,
) -> Result<Flow, Fault>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    let port = |cpu: &VCpu, imm: Option<u8>| imm.map_or(cpu.reg(Gpr::Rdx) as u16, u16::from);
    match op {
        Quick::Cli => cli_sti(cpu, false, next),
        Quick::Sti => cli_sti(cpu, true, next),
        Quick::Hlt => hlt(cpu),
        Quick::In(imm, size) => {
            let p = port(cpu, imm);
            port_in(cpu, mem, ports, p, size)
        }
        Quick::Out(imm, size) => {
            let p = port(cpu, imm);
            port_out(cpu, mem, ports, p, size)
        }
        Quick::Swapgs => {
            swapgs(cpu)?;
            Ok(Flow::Next)
        }
        Quick::Iretq => {
            iret(cpu, mem, 8)?;
            Ok(Flow::Jumped)
        }
        Quick::Sysretq => {
            sysret(cpu, true)?;
            Ok(Flow::Jumped)
        }
        Quick::Sysexitq => {
            sysexit(cpu, true)?;
            Ok(Flow::Jumped)
        }
        Quick::Rdmsr => rdmsr(cpu),
        Quick::Wrmsr => wrmsr(cpu),
        Quick::Int(vector) => Err(Event::software(vector, len).into()),
        Quick::Int3 => Err(int3_event(len).into()),
    }
}

/// INT3 (a software exception: the gate DPL is checked, #DF rules apply as for exceptions).
fn int3_event(len: u8) -> Event {
    Event {
        vector: vector::BP,
        kind: EventKind::SoftwareException,
        error_code: None,
        cr2: None,
        instruction_len: len,
    }
}

/// CLI/STI at CPL > IOPL fault (CR4.PVI is not offered); STI that sets IF opens a
/// one-instruction interrupt shadow (SDM Vol. 3 §6.8.3).
fn cli_sti(cpu: &mut VCpu, sti: bool, next: u64) -> Result<Flow, Fault> {
    if !cpu.may_toggle_interrupts() {
        return Err(Event::gp(0).into());
    }
    if sti && !cpu.interrupts_enabled() {
        cpu.interrupt_shadow = Some(next);
    }
    cpu.set_interrupts_enabled(sti);
    Ok(Flow::Next)
}

/// RDMSR: ECX selects, EDX:EAX receive (CPL 0 only).
fn rdmsr(cpu: &mut VCpu) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    let value = read_msr(cpu, cpu.reg(Gpr::Rcx) as u32)?;
    cpu.set_reg(Gpr::Rax, value & 0xFFFF_FFFF);
    cpu.set_reg(Gpr::Rdx, value >> 32);
    Ok(Flow::Next)
}

/// WRMSR: ECX selects, EDX:EAX is written (CPL 0 only).
fn wrmsr(cpu: &mut VCpu) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    let value = (cpu.reg(Gpr::Rdx) << 32) | (cpu.reg(Gpr::Rax) & 0xFFFF_FFFF);
    write_msr(cpu, cpu.reg(Gpr::Rcx) as u32, value)?;
    cpu.note(|e| e.controls = true);
    Ok(Flow::Next)
}

/// The accumulator of an I/O access of `size` bytes.
fn accumulator(size: usize) -> Register {
    match size {
        1 => Register::AL,
        2 => Register::AX,
        _ => Register::EAX,
    }
}

/// IN AL/AX/EAX from `port` (EAX zero-extends into RAX).
fn port_in<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    port: u16,
    size: usize,
) -> Result<Flow, Fault>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    check_io_permission(cpu, mem, port, size)?;
    let value = ports.port_read(port, size as u8);
    write_reg(cpu, accumulator(size), u64::from(value));
    Ok(Flow::Next)
}

/// OUT AL/AX/EAX to `port`.
fn port_out<M, P>(
    cpu: &mut VCpu,
    mem: &mut M,
    ports: &mut P,
    port: u16,
    size: usize,
) -> Result<Flow, Fault>
where
    M: GuestMemory + ?Sized,
    P: PortIo + ?Sized,
{
    check_io_permission(cpu, mem, port, size)?;
    let value = read_reg(cpu, accumulator(size)) as u32;
    ports.port_write(port, size as u8, value);
    Ok(Flow::Next)
}

/// HLT: CPL 0 only; the vCPU then waits for an interrupt (the injection policy decides).
fn hlt(cpu: &mut VCpu) -> Result<Flow, Fault> {
    require_cpl0(cpu)?;
    cpu.halted = true;
    Ok(Flow::Halted)
}

/// The trap-table name of an instruction the emulator handles.
pub fn trap_name(ins: &Instruction) -> &'static str {
    match ins.code() {
        Code::Mov_cr_r64 | Code::Mov_cr_r32 => match ins.op0_register() {
            Register::CR0 => "MOV CR0",
            Register::CR3 => "MOV CR3",
            Register::CR4 => "MOV CR4",
            Register::CR8 => "MOV CR8",
            _ => "MOV CRn",
        },
        Code::Mov_r64_cr | Code::Mov_r32_cr => "MOV from CRn",
        Code::Mov_dr_r64 | Code::Mov_dr_r32 => "MOV DRn",
        Code::Mov_r64_dr | Code::Mov_r32_dr => "MOV from DRn",
        Code::Mov_Sreg_rm16 | Code::Mov_Sreg_r32m16 | Code::Mov_Sreg_r64m16 => "MOV Sreg",
        _ => mnemonic_name(ins.mnemonic()),
    }
}

/// The trap-table name of a mnemonic the emulator handles.
fn mnemonic_name(mnemonic: Mnemonic) -> &'static str {
    match mnemonic {
        Mnemonic::Cli => "CLI",
        Mnemonic::Sti => "STI",
        Mnemonic::Hlt => "HLT",
        Mnemonic::In => "IN",
        Mnemonic::Out => "OUT",
        Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => "INS",
        Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => "OUTS",
        Mnemonic::Rdmsr => "RDMSR",
        Mnemonic::Wrmsr => "WRMSR",
        Mnemonic::Invlpg => "INVLPG",
        Mnemonic::Iretq | Mnemonic::Iretd | Mnemonic::Iret => "IRETQ",
        Mnemonic::Sysretq | Mnemonic::Sysret => "SYSRETQ",
        Mnemonic::Sysexitq | Mnemonic::Sysexit => "SYSEXITQ",
        Mnemonic::Syscall => "SYSCALL",
        Mnemonic::Sysenter => "SYSENTER",
        Mnemonic::Swapgs => "SWAPGS",
        Mnemonic::Lgdt => "LGDT",
        Mnemonic::Lidt => "LIDT",
        Mnemonic::Sgdt => "SGDT",
        Mnemonic::Sidt => "SIDT",
        Mnemonic::Lldt => "LLDT",
        Mnemonic::Sldt => "SLDT",
        Mnemonic::Ltr => "LTR",
        Mnemonic::Str => "STR",
        Mnemonic::Smsw => "SMSW",
        Mnemonic::Lmsw => "LMSW",
        Mnemonic::Clts => "CLTS",
        Mnemonic::Wbinvd | Mnemonic::Invd => "WBINVD",
        Mnemonic::Cpuid => "CPUID",
        Mnemonic::Int => "INT n",
        Mnemonic::Int3 => "INT3",
        Mnemonic::Pop => "POP Sreg",
        Mnemonic::Retf => "RETF",
        Mnemonic::Rdtsc => "RDTSC",
        Mnemonic::Lss => "LSS",
        Mnemonic::Lfs => "LFS",
        Mnemonic::Lgs => "LGS",
        Mnemonic::Jmp => "JMP far",
        Mnemonic::Call => "CALL far",
        Mnemonic::Mov => "MOV",
        Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => "STOS",
        Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => "MOVS",
        _ => "other",
    }
}

/// Fetches up to 15 bytes at RIP with the guest's rights and decodes them. Bytes on a second
/// page are fetched only if the instruction needs them, so an instruction that ends before an
/// unmapped page does not fault on it.
fn fetch_bytes<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
) -> Result<([u8; MAX_INSTRUCTION_LEN], usize), Fault> {
    let rip = cpu.rip;
    let mut bytes = [0u8; MAX_INSTRUCTION_LEN];
    let to_page_end = (0x1000 - (rip & 0xFFF)) as usize;
    let first = to_page_end.min(MAX_INSTRUCTION_LEN);
    mem.read_linear(rip, &mut bytes[..first], AccessKind::Fetch, cpu.privilege())
        .map_err(|e| access_fault(e, false))?;
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
    let mut decoder = Decoder::with_ip(64, &bytes[..first], rip, DecoderOptions::NONE);
    let mut ins = decoder.decode();
    if ins.is_invalid()
        && decoder.last_error() == DecoderError::NoMoreBytes
        && first < MAX_INSTRUCTION_LEN
    {
        mem.read_linear(
            rip.wrapping_add(first as u64),
            &mut bytes[first..],
            AccessKind::Fetch,
            cpu.privilege(),
        )
        .map_err(|e| access_fault(e, false))?;
        let mut decoder = Decoder::with_ip(64, &bytes, rip, DecoderOptions::NONE);
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

fn require_cpl0(cpu: &VCpu) -> Result<(), Fault> {
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

/// The register file slot of a general register, and whether it is AH/CH/DH/BH.
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

fn read_reg(cpu: &VCpu, r: Register) -> u64 {
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

fn write_reg(cpu: &mut VCpu, r: Register, value: u64) {
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
fn address(cpu: &VCpu, ins: &Instruction, op: u32) -> u64 {
    ins.virtual_address(op, 0, |r, _, _| Some(read_reg(cpu, r)))
        .unwrap_or(0)
}

fn is_memory(kind: OpKind) -> bool {
    matches!(kind, OpKind::Memory)
}

fn is_stack_access(ins: &Instruction) -> bool {
    ins.memory_segment() == Register::SS
}

/// Reads operand `op` of `size` bytes (register, memory or immediate).
fn read_operand<M: GuestMemory + ?Sized>(
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
        _ => Err(CpuStop::NotEmulated {
            mnemonic: ins.mnemonic(),
        }
        .into()),
    }
}

/// Writes operand `op` of `size` bytes.
fn write_operand<M: GuestMemory + ?Sized>(
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
        _ => Err(CpuStop::NotEmulated {
            mnemonic: ins.mnemonic(),
        }
        .into()),
    }
}

/// Size in bytes of operand `op`.
fn operand_size(ins: &Instruction, op: u32) -> usize {
    match ins.op_kind(op) {
        OpKind::Register => ins.op_register(op).size(),
        OpKind::Memory => ins.memory_size().size(),
        OpKind::Immediate8 => 1,
        OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
        OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
        _ => 8,
    }
}

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
    let next = ins.next_ip();
    match ins.code() {
        Code::Cli | Code::Sti => cli_sti(cpu, ins.code() == Code::Sti, next),
        Code::Hlt => hlt(cpu),
        Code::Mov_r64_cr | Code::Mov_r32_cr => {
            require_cpl0(cpu)?;
            let value = read_cr(cpu, ins.op1_register())?;
            write_reg(cpu, ins.op0_register().full_register(), value);
            Ok(Flow::Next)
        }
        Code::Mov_cr_r64 | Code::Mov_cr_r32 => {
            require_cpl0(cpu)?;
            let value = read_reg(cpu, ins.op1_register().full_register());
            write_cr(cpu, ins.op0_register(), value)?;
            Ok(Flow::Next)
        }
        Code::Mov_r64_dr | Code::Mov_r32_dr => {
            require_cpl0(cpu)?;
            let value = read_dr(cpu, ins.op1_register())?;
            write_reg(cpu, ins.op0_register().full_register(), value);
            Ok(Flow::Next)
        }
        Code::Mov_dr_r64 | Code::Mov_dr_r32 => {
            require_cpl0(cpu)?;
            let value = read_reg(cpu, ins.op1_register().full_register());
            write_dr(cpu, ins.op0_register(), value)?;
            Ok(Flow::Next)
        }
        Code::Clts => {
            require_cpl0(cpu)?;
            cpu.cr0 &= !cr0::TS;
            cpu.note(|e| e.controls = true);
            Ok(Flow::Next)
        }
        Code::Lmsw_rm16 | Code::Lmsw_r32m16 | Code::Lmsw_r64m16 => {
            require_cpl0(cpu)?;
            let src = read_operand(cpu, mem, ins, 0, 2)?;
            // LMSW loads PE, MP, EM, TS and can set PE but never clear it.
            let low = (src & 0xF) | (cpu.cr0 & cr0::PE);
            cpu.cr0 = (cpu.cr0 & !0xF) | low;
            cpu.note(|e| e.controls = true);
            Ok(Flow::Next)
        }
        Code::Smsw_rm16 | Code::Smsw_r32m16 | Code::Smsw_r64m16 => {
            check_umip(cpu)?;
            if is_memory(ins.op0_kind()) {
                write_operand(cpu, mem, ins, 0, 2, cpu.cr0 & 0xFFFF)?;
            } else {
                write_reg(cpu, ins.op0_register(), cpu.cr0);
            }
            Ok(Flow::Next)
        }
        Code::Lgdt_m1664 | Code::Lidt_m1664 | Code::Lgdt_m1632 | Code::Lidt_m1632 => {
            require_cpl0(cpu)?;
            let at = address(cpu, ins, 0);
            let stack = is_stack_access(ins);
            let limit = read_value(mem, at, 2, cpu.privilege(), stack)? as u16;
            let base = read_value(mem, at.wrapping_add(2), 8, cpu.privilege(), stack)?;
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
        Code::Sgdt_m1664 | Code::Sidt_m1664 | Code::Sgdt_m1632 | Code::Sidt_m1632 => {
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
            mem.write_linear(at, &bytes, cpu.privilege())
                .map_err(|e| access_fault(e, is_stack_access(ins)))?;
            Ok(Flow::Next)
        }
        Code::Sldt_rm16
        | Code::Sldt_r32m16
        | Code::Sldt_r64m16
        | Code::Str_rm16
        | Code::Str_r32m16
        | Code::Str_r64m16 => {
            check_umip(cpu)?;
            let sel = if ins.mnemonic() == Mnemonic::Sldt {
                cpu.ldtr.selector
            } else {
                cpu.tr.selector
            };
            // Register forms zero-extend the selector; memory forms store 16 bits.
            if is_memory(ins.op0_kind()) {
                write_operand(cpu, mem, ins, 0, 2, u64::from(sel))?;
            } else {
                let r = ins.op0_register();
                let full = if r.size() == 2 { r } else { r.full_register() };
                write_reg(cpu, full, u64::from(sel));
            }
            Ok(Flow::Next)
        }
        Code::Lldt_rm16 | Code::Lldt_r32m16 | Code::Lldt_r64m16 => {
            require_cpl0(cpu)?;
            let sel = read_operand(cpu, mem, ins, 0, 2)? as u16;
            lldt(cpu, mem, sel)?;
            Ok(Flow::Next)
        }
        Code::Ltr_rm16 | Code::Ltr_r32m16 | Code::Ltr_r64m16 => {
            require_cpl0(cpu)?;
            let sel = read_operand(cpu, mem, ins, 0, 2)? as u16;
            ltr(cpu, mem, sel)?;
            Ok(Flow::Next)
        }
        Code::Invlpg_m => {
            require_cpl0(cpu)?;
            let at = address(cpu, ins, 0);
            if is_canonical(at) {
                cpu.note(|e| e.invlpg = Some(at));
            }
            Ok(Flow::Next)
        }
        Code::Wbinvd | Code::Invd => {
            require_cpl0(cpu)?;
            Ok(Flow::Next)
        }
        Code::Rdmsr => rdmsr(cpu),
        Code::Wrmsr => wrmsr(cpu),
        Code::In_AL_imm8
        | Code::In_AX_imm8
        | Code::In_EAX_imm8
        | Code::In_AL_DX
        | Code::In_AX_DX
        | Code::In_EAX_DX => {
            let port = port_operand(cpu, ins, 1);
            port_in(cpu, mem, ports, port, ins.op0_register().size())
        }
        Code::Out_imm8_AL
        | Code::Out_imm8_AX
        | Code::Out_imm8_EAX
        | Code::Out_DX_AL
        | Code::Out_DX_AX
        | Code::Out_DX_EAX => {
            let port = port_operand(cpu, ins, 0);
            port_out(cpu, mem, ports, port, ins.op1_register().size())
        }
        Code::Insb_m8_DX | Code::Insw_m16_DX | Code::Insd_m32_DX => {
            string_io(cpu, mem, ports, ins, true)
        }
        Code::Outsb_DX_m8 | Code::Outsw_DX_m16 | Code::Outsd_DX_m32 => {
            string_io(cpu, mem, ports, ins, false)
        }
        Code::Iretq | Code::Iretd | Code::Iretw => {
            let size = match ins.code() {
                Code::Iretq => 8,
                Code::Iretd => 4,
                _ => 2,
            };
            iret(cpu, mem, size)?;
            Ok(Flow::Jumped)
        }
        Code::Sysretq | Code::Sysretd => {
            sysret(cpu, ins.code() == Code::Sysretq)?;
            Ok(Flow::Jumped)
        }
        Code::Sysexitq | Code::Sysexitd => {
            sysexit(cpu, ins.code() == Code::Sysexitq)?;
            Ok(Flow::Jumped)
        }
        Code::Syscall => {
            // #UD at the instruction, prefixes and all (the real EFER.SCE follows the virtual
            // one, so this is where a SYSCALL without SCE arrives).
            if cpu.efer & efer::SCE == 0 {
                return Err(Event::ud().into());
            }
            cpu.rip = next;
            syscall(cpu)?;
            Ok(Flow::Jumped)
        }
        Code::Sysenter => {
            sysenter(cpu)?;
            Ok(Flow::Jumped)
        }
        Code::Swapgs => {
            swapgs(cpu)?;
            Ok(Flow::Next)
        }
        Code::Mov_Sreg_rm16 | Code::Mov_Sreg_r32m16 | Code::Mov_Sreg_r64m16 => {
            let seg = match segment_register(ins.op0_register()) {
                Some(SegReg::Cs) | None => return Err(Event::ud().into()),
                Some(seg) => seg,
            };
            let selector = read_operand(cpu, mem, ins, 1, 2)? as u16;
            load_data_segment(cpu, mem, seg, selector, null_selector_clears_base(cpuid))?;
            if seg == SegReg::Ss {
                // §6.8.3: MOV SS blocks interrupts and debug traps for one instruction.
                cpu.interrupt_shadow = Some(next);
            }
            Ok(Flow::Next)
        }
        Code::Popw_FS | Code::Popq_FS | Code::Popw_GS | Code::Popq_GS => {
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
        Code::Lss_r16_m1616
        | Code::Lss_r32_m1632
        | Code::Lss_r64_m1664
        | Code::Lfs_r16_m1616
        | Code::Lfs_r32_m1632
        | Code::Lfs_r64_m1664
        | Code::Lgs_r16_m1616
        | Code::Lgs_r32_m1632
        | Code::Lgs_r64_m1664 => {
            // LSS/LFS/LGS r, m16:xx: the offset, then the selector (SDM Vol. 2A "LDS/LES/LFS/
            // LGS/LSS"); the segment is loaded first, the register only if that succeeds.
            let seg = match ins.mnemonic() {
                Mnemonic::Lss => SegReg::Ss,
                Mnemonic::Lfs => SegReg::Fs,
                _ => SegReg::Gs,
            };
            let dest = ins.op0_register();
            let size = dest.size();
            let at = address(cpu, ins, 1);
            let stack = is_stack_access(ins);
            let offset = read_value(mem, at, size, cpu.privilege(), stack)?;
            let selector =
                read_value(mem, at.wrapping_add(size as u64), 2, cpu.privilege(), stack)? as u16;
            load_data_segment(cpu, mem, seg, selector, null_selector_clears_base(cpuid))?;
            write_reg(cpu, dest, offset);
            // Unlike MOV SS, LSS opens no interrupt shadow (SDM Vol. 3 §6.8.3).
            Ok(Flow::Next)
        }
        Code::Retfq | Code::Retfd | Code::Retfq_imm16 | Code::Retfd_imm16 => {
            let size = if matches!(ins.code(), Code::Retfq | Code::Retfq_imm16) {
                8
            } else {
                4
            };
            let imm = if ins.op_count() > 0 {
                ins.immediate(0)
            } else {
                0
            };
            far_return(cpu, mem, size, imm)?;
            Ok(Flow::Jumped)
        }
        Code::Jmp_m1664 | Code::Jmp_m1632 | Code::Call_m1664 | Code::Call_m1632 => {
            let size = if matches!(ins.code(), Code::Jmp_m1664 | Code::Call_m1664) {
                8
            } else {
                4
            };
            let at = address(cpu, ins, 0);
            let stack = is_stack_access(ins);
            let offset = read_value(mem, at, size, cpu.privilege(), stack)?;
            let selector =
                read_value(mem, at.wrapping_add(size as u64), 2, cpu.privilege(), stack)? as u16;
            let call = matches!(ins.code(), Code::Call_m1664 | Code::Call_m1632);
            far_jump(cpu, mem, selector, offset, call.then_some((next, size)))?;
            Ok(Flow::Jumped)
        }
        Code::Rdtsc => {
            // Only CR4.TSD makes RDTSC trap (the real TSD follows the guest's): at CPL 0 it
            // reads the counter, above it is #GP(0) (SDM Vol. 2B "RDTSC").
            if cpu.cr4 & cr4::TSD != 0 && cpu.cpl != 0 {
                return Err(Event::gp(0).into());
            }
            let tsc = cpuid.rdtsc();
            cpu.set_reg(Gpr::Rax, tsc & 0xFFFF_FFFF);
            cpu.set_reg(Gpr::Rdx, tsc >> 32);
            Ok(Flow::Next)
        }
        // CPUID hides RDTSCP (its TSC_AUX is the host's), so when TSD makes it trap it is #UD,
        // as on a CPU without it.
        Code::Rdtscp => Err(Event::ud().into()),
        // CPUID offers no performance-monitoring counters (leaf 0xA hidden), so no ECX names a
        // valid one: #GP(0) at any CPL, whatever CR4.PCE says (SDM Vol. 2B "RDPMC").
        Code::Rdpmc => Err(Event::gp(0).into()),
        Code::Cpuid => {
            let r = virtual_cpuid(cpuid, cpu.reg(Gpr::Rax) as u32, cpu.reg(Gpr::Rcx) as u32);
            for (reg, value) in [Gpr::Rax, Gpr::Rbx, Gpr::Rcx, Gpr::Rdx].into_iter().zip(r) {
                cpu.set_reg(reg, u64::from(value));
            }
            Ok(Flow::Next)
        }
        Code::Int_imm8 => Err(Event::software(ins.immediate8(), ins.len() as u8).into()),
        Code::Int3 => Err(int3_event(ins.len() as u8).into()),
        Code::Int1 => {
            // ICEBP: a #DB delivered like a hardware exception (no DPL check) after the
            // instruction.
            cpu.rip = next;
            Err(Event::exception(vector::DB).into())
        }
        _ if cause == Cause::PageTableWrite => data_write(cpu, mem, ins),
        _ => match cause {
            Cause::Fault(event) if cpu.cpl != 0 || !is_privileged(ins) => Ok(Flow::Reflect(event)),
            _ => Err(CpuStop::NotEmulated {
                mnemonic: ins.mnemonic(),
            }
            .into()),
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

fn segment_register(r: Register) -> Option<SegReg> {
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
    let gp = Err(Event::gp(0).into());
    if matches!(r, Register::CR0 | Register::CR4) {
        cpu.note(|e| e.controls = true);
    }
    match r {
        Register::CR0 => {
            // Leaving long mode by clearing PG or PE is not offered: on hardware it is legal
            // only from compatibility mode, which this CPU never runs. NW without CD is #GP.
            // Reserved bits: only CR0[63:32] fault (SDM Vol. 2 "MOV—Move to/from Control
            // Registers", Vol. 3 §2.5); the reserved bits of CR0[31:0] are ignored, so they
            // are not stored and read back as 0, as on the processor.
            if value >> 32 != 0
                || value & cr0::PG == 0
                || value & cr0::PE == 0
                || (value & cr0::NW != 0 && value & cr0::CD == 0)
            {
                return gp;
            }
            let value = (value & cr0::DEFINED) | cr0::ET;
            if (value ^ cpu.cr0) & cr0::WP != 0 {
                cpu.note(|e| e.paging_mode = true);
            }
            cpu.cr0 = value;
        }
        Register::CR2 => cpu.cr2 = value,
        Register::CR3 => {
            // SDM Vol. 3 §4.5 Table 4-12 (4-level paging, CR4.PCIDE = 0, which is all this CPU
            // offers): bits 63:MAXPHYADDR are reserved, so setting one is #GP(0) (Vol. 2
            // "MOV—Move to/from Control Registers"); bits 11:0 are ignored or PWT/PCD.
            if value & !((1u64 << cpu.max_phys_bits.min(52)) - 1) != 0 {
                return gp;
            }
            cpu.cr3 = value;
            cpu.note(|e| e.cr3_load = Some(value));
        }
        Register::CR4 => {
            if value & !cr4::DEFINED != 0 || (value & cr4::PAE == 0 && cpu.efer & efer::LMA != 0) {
                return gp;
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
        }
        Register::CR8 => {
            if value > 0xF {
                return gp;
            }
            cpu.cr8 = value;
        }
        _ => return Err(Event::ud().into()),
    }
    Ok(())
}

fn lldt<M: GuestMemory + ?Sized>(cpu: &mut VCpu, mem: &mut M, sel: u16) -> Result<(), Fault> {
    if sel & !3 == 0 {
        cpu.ldtr = Segment::null(0);
        return Ok(());
    }
    let code = u32::from(sel & !3);
    let entry = read_system_descriptor(cpu, mem, sel)?;
    let d = entry.descriptor;
    if d.code_or_data || d.typ != super::descriptor::system_type::LDT {
        return Err(Event::gp(code).into());
    }
    if !d.present {
        return Err(Event::np(code).into());
    }
    if !is_canonical(d.base) {
        return Err(Event::gp(code).into());
    }
    cpu.ldtr = Segment {
        selector: sel,
        cache: d,
    };
    Ok(())
}

/// LTR: loads an available 64-bit TSS and marks it busy in the guest's GDT, as the CPU does.
fn ltr<M: GuestMemory + ?Sized>(cpu: &mut VCpu, mem: &mut M, sel: u16) -> Result<(), Fault> {
    if sel & !3 == 0 {
        return Err(Event::gp(0).into());
    }
    let code = u32::from(sel & !3);
    let entry = read_system_descriptor(cpu, mem, sel)?;
    let d = entry.descriptor;
    if d.code_or_data || d.typ != super::descriptor::system_type::TSS_AVAILABLE {
        return Err(Event::gp(code).into());
    }
    if !d.present {
        return Err(Event::np(code).into());
    }
    if !is_canonical(d.base) {
        return Err(Event::gp(code).into());
    }
    let busy = entry.raw | (0x2 << 40);
    write_value(mem, entry.address, 8, busy, Privilege::Supervisor, false)?;
    cpu.note(|e| e.descriptor_table = true);
    let mut d = d;
    d.typ = super::descriptor::system_type::TSS_BUSY;
    cpu.tr = Segment {
        selector: sel,
        cache: d,
    };
    Ok(())
}

fn port_operand(cpu: &VCpu, ins: &Instruction, op: u32) -> u16 {
    match ins.op_kind(op) {
        OpKind::Register => cpu.reg(Gpr::Rdx) as u16,
        _ => ins.immediate(op) as u16,
    }
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
    if tr.selector & !3 == 0 || limit < 0x67 {
        return Err(Event::gp(0).into());
    }
    let map_base = read_value(mem, tr.cache.base + 0x66, 2, Privilege::Supervisor, false)?;
    let byte = map_base + u64::from(port / 8);
    if byte + 1 > limit {
        return Err(Event::gp(0).into());
    }
    let bits = read_value(mem, tr.cache.base + byte, 2, Privilege::Supervisor, false)?;
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
    input: bool,
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
    let addressing = if input {
        ins.op0_kind()
    } else {
        ins.op1_kind()
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
        if input {
            let rdi = cpu.reg(Gpr::Rdi);
            let value = ports.port_read(port, size as u8);
            write_value(mem, rdi, size, u64::from(value), cpu.privilege(), false)?;
            cpu.set_reg(Gpr::Rdi, rdi.wrapping_add(step));
        } else {
            let rsi = cpu.reg(Gpr::Rsi);
            let base = if ins.memory_segment() == Register::FS {
                cpu.fs_base()
            } else if ins.memory_segment() == Register::GS {
                cpu.gs_base()
            } else {
                0
            };
            let value = read_value(mem, base.wrapping_add(rsi), size, cpu.privilege(), false)?;
            ports.port_write(port, size as u8, value as u32);
            cpu.set_reg(Gpr::Rsi, rsi.wrapping_add(step));
        }
        if !rep {
            break;
        }
        cpu.set_reg(Gpr::Rcx, cpu.reg(Gpr::Rcx) - 1);
    }
    Ok(Flow::Next)
}

/// Parity flag of the low byte.
fn parity(v: u64) -> bool {
    (v as u8).count_ones().is_multiple_of(2)
}

/// Sets SF, ZF, PF from `result` of `size` bytes, CF and OF as given.
fn set_result_flags(cpu: &mut VCpu, result: u64, size: usize, cf: bool, of: bool) {
    let bits = size * 8;
    let mask = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let r = result & mask;
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
    if r >> (bits - 1) & 1 != 0 {
        f |= rflags::SF;
    }
    if parity(r) {
        f |= rflags::PF;
    }
    cpu.rflags = f;
}

/// The stores a kernel makes to its page tables: MOV, STOS, MOVS, XCHG, CMPXCHG, the bitwise
/// and additive read-modify-writes, BTS/BTR. Anything else writing a page-table page stops the
/// guest with the instruction named.
fn data_write<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    let not_emulated = || -> Result<Flow, Fault> {
        Err(CpuStop::NotEmulated {
            mnemonic: ins.mnemonic(),
        }
        .into())
    };
    match ins.mnemonic() {
        Mnemonic::Mov => {
            let size = operand_size(ins, 0);
            let mut value = read_operand(cpu, mem, ins, 1, size)?;
            if ins.op1_kind() == OpKind::Immediate32to64 {
                value = ins.immediate(1);
            }
            write_operand(cpu, mem, ins, 0, size, value)?;
            Ok(Flow::Next)
        }
        Mnemonic::Stosb
        | Mnemonic::Stosw
        | Mnemonic::Stosd
        | Mnemonic::Stosq
        | Mnemonic::Movsb
        | Mnemonic::Movsw
        | Mnemonic::Movsd
        | Mnemonic::Movsq => {
            if ins.op0_kind() != OpKind::MemoryESRDI {
                return not_emulated();
            }
            let size = ins.memory_size().size();
            let stos = matches!(
                ins.mnemonic(),
                Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq
            );
            let rep = ins.has_rep_prefix() || ins.has_repne_prefix();
            let backwards = cpu.rflags & rflags::DF != 0;
            // Whole runs of elements inside one page at a time (one guest walk and one write
            // each, instead of one per element: zeroing a page table is one `rep stosq`); the
            // registers move only after a run is written, so a fault leaves a restartable state.
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
                let (rdi, rsi) = (cpu.reg(Gpr::Rdi), cpu.reg(Gpr::Rsi));
                let room = |addr: u64| (0x1000 - (addr & 0xFFF)) / size as u64;
                let mut n = if backwards {
                    1
                } else if stos {
                    room(rdi)
                } else {
                    room(rdi).min(room(rsi))
                };
                n = n.clamp(1, left).min(MAX_REP_ELEMENTS_PER_TRAP - done);
                done += n;
                let bytes = n as usize * size;
                let chunk = run.get_mut(..bytes).unwrap_or_default();
                if stos {
                    let value = cpu.reg(Gpr::Rax).to_le_bytes();
                    for element in chunk.chunks_exact_mut(size) {
                        element.copy_from_slice(value.get(..size).unwrap_or_default());
                    }
                } else {
                    mem.read_linear(rsi, chunk, AccessKind::Read, cpu.privilege())
                        .map_err(|e| access_fault(e, false))?;
                }
                mem.write_linear(rdi, chunk, cpu.privilege())
                    .map_err(|e| access_fault(e, false))?;
                let advance = if backwards {
                    (bytes as u64).wrapping_neg()
                } else {
                    bytes as u64
                };
                cpu.set_reg(Gpr::Rdi, rdi.wrapping_add(advance));
                if !stos {
                    cpu.set_reg(Gpr::Rsi, rsi.wrapping_add(advance));
                }
                if !rep {
                    break;
                }
                cpu.set_reg(Gpr::Rcx, left - n);
            }
            Ok(Flow::Next)
        }
        Mnemonic::Xchg => {
            let size = operand_size(ins, 0);
            let a = read_operand(cpu, mem, ins, 0, size)?;
            let b = read_operand(cpu, mem, ins, 1, size)?;
            write_operand(cpu, mem, ins, 0, size, b)?;
            write_operand(cpu, mem, ins, 1, size, a)?;
            Ok(Flow::Next)
        }
        Mnemonic::Cmpxchg => {
            let size = operand_size(ins, 0);
            let dest = read_operand(cpu, mem, ins, 0, size)?;
            let acc_reg = match size {
                1 => Register::AL,
                2 => Register::AX,
                4 => Register::EAX,
                _ => Register::RAX,
            };
            let acc = read_reg(cpu, acc_reg);
            let diff = acc.wrapping_sub(dest);
            let bits = size * 8;
            let sign = |v: u64| v >> (bits - 1) & 1 != 0;
            let mask = if bits >= 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let of = sign(acc) != sign(dest) && sign(diff) != sign(acc);
            set_result_flags(cpu, diff, size, (acc & mask) < (dest & mask), of);
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
        Mnemonic::Or | Mnemonic::And | Mnemonic::Xor | Mnemonic::Add | Mnemonic::Sub => {
            let size = operand_size(ins, 0);
            let a = read_operand(cpu, mem, ins, 0, size)?;
            let mut b = read_operand(cpu, mem, ins, 1, size)?;
            if ins.op1_kind() == OpKind::Immediate8to64 || ins.op1_kind() == OpKind::Immediate32to64
            {
                b = ins.immediate(1);
            }
            let bits = size * 8;
            let mask = if bits >= 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            let (a, b) = (a & mask, b & mask);
            let sign = |v: u64| v >> (bits - 1) & 1 != 0;
            let (r, cf, of) = match ins.mnemonic() {
                Mnemonic::Or => (a | b, false, false),
                Mnemonic::And => (a & b, false, false),
                Mnemonic::Xor => (a ^ b, false, false),
                Mnemonic::Add => {
                    let r = a.wrapping_add(b) & mask;
                    (r, r < a, sign(a) == sign(b) && sign(r) != sign(a))
                }
                _ => {
                    let r = a.wrapping_sub(b) & mask;
                    (r, a < b, sign(a) != sign(b) && sign(r) != sign(a))
                }
            };
            write_operand(cpu, mem, ins, 0, size, r)?;
            set_result_flags(cpu, r, size, cf, of);
            Ok(Flow::Next)
        }
        Mnemonic::Bts | Mnemonic::Btr => {
            let size = operand_size(ins, 0);
            if ins.op1_kind() == OpKind::Register {
                // A register bit offset can address beyond the operand: not a PTE update.
                return not_emulated();
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
        _ => not_emulated(),
    }
}

/// Decodes one instruction so the decoder's one-time setup happens before the guest runs (it
/// costs millions of instructions once, which would otherwise land on the guest's first trap).
pub fn warm_up_decoder() {
    let mut decoder = Decoder::with_ip(64, &[0x0F, 0x01, 0x10], 0, DecoderOptions::NONE);
    let _ = decoder.decode();
}

/// The instruction in Intel syntax, for `--trace` (`out dx, al`, `mov cr3, rax`).
pub fn disassemble(ins: &Instruction) -> alloc::string::String {
    use iced_x86::Formatter;
    let mut text = alloc::string::String::new();
    iced_x86::IntelFormatter::new().format(ins, &mut text);
    text
}
