//! Control transfers the VMM redoes: far RET/JMP/CALL and IRET against the guest's virtual GDT
//! (SDM Vol. 2 "RET", "JMP", "CALL", "IRET"; Vol. 3 §5.8, §6.14.3), the fast system calls
//! SYSCALL/SYSRET, SYSENTER/SYSEXIT and SWAPGS (Vol. 3 §5.8.7–8), and the software interrupts
//! INT n, INT3 and INT1 (Vol. 3 §6.4, delivered through the guest's IDT).
//!
//! Article challenges "特权级压缩" and "系统调用": a transfer that changes the (virtual) privilege
//! level, or that the real CPU would check against the real GDT, is emulated so that the guest
//! kernel keeps believing it runs at ring 0. The work is in `segments` and `syscall`; this
//! module reads the operands and says where execution goes on.

use super::super::event::{vector, Event, EventKind};
use super::super::memory::{Fault, GuestMemory};
use super::super::segments::{far_jump, far_return, iret};
use super::super::state::{efer, VCpu};
use super::super::syscall::{swapgs, syscall, sysenter, sysexit, sysret};
use super::operands::read_far_pointer;
use super::Flow;
use iced_x86::{Code, Instruction};

/// Far RET/JMP/CALL, IRET, the fast system calls, SWAPGS, INT n/INT3/INT1: `None` for any
/// other instruction.
pub(super) fn execute<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Option<Result<Flow, Fault>> {
    Some(match ins.code() {
        Code::Retfq | Code::Retfd | Code::Retfq_imm16 | Code::Retfd_imm16 => {
            far_return_instruction(cpu, mem, ins)
        }
        Code::Jmp_m1664 | Code::Jmp_m1632 | Code::Call_m1664 | Code::Call_m1632 => {
            far_jump_instruction(cpu, mem, ins)
        }
        Code::Iretq => iret_instruction(cpu, mem, 8),
        Code::Iretd => iret_instruction(cpu, mem, 4),
        Code::Iretw => iret_instruction(cpu, mem, 2),
        Code::Sysretq | Code::Sysretd => sysret_instruction(cpu, ins.code() == Code::Sysretq),
        Code::Sysexitq | Code::Sysexitd => sysexit_instruction(cpu, ins.code() == Code::Sysexitq),
        Code::Syscall => syscall_instruction(cpu, ins.next_ip()),
        Code::Sysenter => sysenter(cpu).map(|()| Flow::Jumped),
        Code::Swapgs => swapgs_instruction(cpu),
        Code::Int_imm8 => Err(Event::software(ins.immediate8(), ins.len() as u8).into()),
        Code::Int3 => Err(int3_event(ins.len() as u8).into()),
        Code::Int1 => {
            // ICEBP: a #DB delivered like a hardware exception (no DPL check) after the
            // instruction.
            cpu.rip = ins.next_ip();
            Err(Event::exception(vector::DB).into())
        }
        _ => return None,
    })
}

/// IRET with operand size `size` (8 for IRETQ).
pub(super) fn iret_instruction<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    size: usize,
) -> Result<Flow, Fault> {
    iret(cpu, mem, size)?;
    Ok(Flow::Jumped)
}

/// SYSRET (`to_64`: SYSRETQ, to 64-bit code).
pub(super) fn sysret_instruction(cpu: &mut VCpu, to_64: bool) -> Result<Flow, Fault> {
    sysret(cpu, to_64)?;
    Ok(Flow::JumpedWithNewFlags)
}

/// SYSEXIT (`to_64`: SYSEXITQ, to 64-bit code).
pub(super) fn sysexit_instruction(cpu: &mut VCpu, to_64: bool) -> Result<Flow, Fault> {
    sysexit(cpu, to_64)?;
    Ok(Flow::Jumped)
}

/// SWAPGS: exchanges the GS base with IA32_KERNEL_GS_BASE.
pub(super) fn swapgs_instruction(cpu: &mut VCpu) -> Result<Flow, Fault> {
    swapgs(cpu)?;
    Ok(Flow::Next)
}

/// SYSCALL that arrived as #UD: without EFER.SCE it is the guest's #UD at the instruction,
/// prefixes and all (the real EFER.SCE follows the virtual one, so this is where a SYSCALL
/// without SCE arrives); otherwise it is forwarded like the real entry, from `next`.
fn syscall_instruction(cpu: &mut VCpu, next: u64) -> Result<Flow, Fault> {
    if cpu.efer & efer::SCE == 0 {
        return Err(Event::ud().into());
    }
    cpu.rip = next;
    syscall(cpu)?;
    Ok(Flow::JumpedWithNewFlags)
}

/// INT3 (a software exception: the gate DPL is checked, #DF rules apply as for exceptions).
pub(super) fn int3_event(len: u8) -> Event {
    Event {
        vector: vector::BP,
        kind: EventKind::SoftwareException,
        error_code: None,
        cr2: None,
        instruction_len: len,
    }
}

/// RETF / RETF imm16, 64- or 32-bit operand size.
fn far_return_instruction<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
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

/// JMP/CALL m16:64 or m16:32; CALL pushes CS and the address of the next instruction.
fn far_jump_instruction<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    ins: &Instruction,
) -> Result<Flow, Fault> {
    let size = if matches!(ins.code(), Code::Jmp_m1664 | Code::Call_m1664) {
        8
    } else {
        4
    };
    let (offset, selector) = read_far_pointer(cpu, mem, ins, 0, size)?;
    let call = matches!(ins.code(), Code::Call_m1664 | Code::Call_m1632);
    far_jump(
        cpu,
        mem,
        selector,
        offset,
        call.then_some((ins.next_ip(), size)),
    )?;
    Ok(Flow::Jumped)
}
