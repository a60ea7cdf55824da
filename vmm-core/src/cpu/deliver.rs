//! Event delivery through the guest's own IDT (SDM Vol. 3 §6.12 "Exception and interrupt
//! handling", §6.14 "in 64-bit mode", §6.15 for #DF and the triple fault).
//!
//! Article challenge "中断和异常的虚拟化": the VMM, not the CPU, walks the guest's IDT, checks the
//! gate, switches to the stack its virtual TSS names, and builds the frame its handler expects
//! (its own selectors, its virtual RFLAGS), so the guest kernel cannot tell it was not the CPU.

use super::descriptor::{is_null_selector, tss, Descriptor, Gate};
use super::event::{is_double_fault, vector, CpuStop, Event, EventKind};
use super::memory::{read_obj, write_slice, Fault, GuestMemory};
use super::segments::read_descriptor;
use super::state::{rflags, Gpr, SegReg, Segment, VCpu};
use shadow_mmu::addr::is_canonical;
use shadow_mmu::Privilege;

/// Longest chain of faults-while-delivering before giving up: contributory → #DF → triple
/// fault needs three, a benign event in front one more.
const MAX_NESTED_FAULTS: usize = 8;

/// Delivers `event`, escalating faults met on the way as the manual says: a second fault is
/// delivered serially or becomes #DF (Table 6-5); a fault while delivering #DF is a triple
/// fault, which stops the guest. Returns the event that was finally delivered.
pub fn deliver<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    event: Event,
) -> Result<Event, CpuStop> {
    let mut current = event;
    for _ in 0..MAX_NESTED_FAULTS {
        match deliver_once(cpu, mem, &current) {
            Ok(()) => return Ok(current),
            Err(Fault::Stop(stop)) => return Err(stop),
            Err(Fault::Raise(second)) => {
                // CR2 is loaded when the #PF is detected, even when it then becomes #DF
                // (SDM Vol. 3 §6.15, interrupt 14: CR2 holds the address of the last #PF).
                if let Some(cr2) = second.cr2 {
                    cpu.cr2 = cr2;
                }
                if current.kind == EventKind::Exception && current.vector == vector::DF {
                    return Err(CpuStop::TripleFault {
                        vector: second.vector,
                    });
                }
                current = if is_double_fault(&current, &second) {
                    Event::df()
                } else {
                    second
                };
            }
        }
    }
    Err(CpuStop::TripleFault {
        vector: current.vector,
    })
}

/// Reads a stack pointer from the virtual TSS (RSPn or ISTn at `offset`).
fn tss_stack<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    offset: u64,
    ext: u32,
) -> Result<u64, Fault> {
    let tr = &cpu.tr;
    if is_null_selector(tr.selector) || u64::from(tr.cache.limit) < offset + 7 {
        return Err(Event::ts(u32::from(tr.selector & !3) | ext).into());
    }
    read_obj::<u64, _>(
        mem,
        tr.cache.base.wrapping_add(offset),
        Privilege::Supervisor,
        false,
    )
}

/// One attempt: every check and every write happens before any register changes, so a fault
/// here leaves the vCPU as it was (save CR2, which the manual loads when #PF is recognised).
fn deliver_once<M: GuestMemory + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    event: &Event,
) -> Result<(), Fault> {
    if let Some(cr2) = event.cr2 {
        cpu.cr2 = cr2;
    }
    let ext = u32::from(event.is_external());
    let gate = read_gate(cpu, mem, event, ext)?;
    let (code, new_cpl) = handler_code_segment(cpu, mem, &gate, ext)?;
    let privilege_change = new_cpl < cpu.cpl;
    let rsp = handler_stack(cpu, mem, &gate, new_cpl, ext)?;
    let new_rsp = push_frame(cpu, mem, event, rsp, new_cpl, ext)?;

    // Commit.
    cpu.set_reg(Gpr::Rsp, new_rsp);
    cpu.set_segment(
        SegReg::Cs,
        Segment {
            selector: (gate.selector & !3) | u16::from(new_cpl),
            cache: code,
        },
    );
    if privilege_change {
        cpu.set_segment(SegReg::Ss, Segment::null(new_cpl));
    }
    cpu.set_cpl(new_cpl);
    cpu.rip = gate.offset;
    cpu.rflags &= !(rflags::TF | rflags::NT | rflags::RF | rflags::VM);
    if gate.is_interrupt_gate() {
        cpu.rflags &= !rflags::IF;
    }
    cpu.interrupt_shadow = None;
    cpu.halted = false;
    Ok(())
}

/// Reads the IDT gate for `event` and checks it (SDM Vol. 3 §6.12.1): inside the IDT limit, an
/// interrupt or trap gate, DPL ≥ CPL for INT n/INT3/INTO, present. Its faults name the IDT
/// entry (`ext`: the event is external).
fn read_gate<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    event: &Event,
    ext: u32,
) -> Result<Gate, Fault> {
    let idt_code = (u32::from(event.vector) << 3) | 2 | ext;
    let software = matches!(
        event.kind,
        EventKind::SoftwareInterrupt | EventKind::SoftwareException
    );
    let offset = u64::from(event.vector) * 16;
    if offset + 15 > u64::from(cpu.idtr.limit) {
        return Err(Event::gp(idt_code).into());
    }
    let raw: u128 = read_obj(
        mem,
        cpu.idtr.base.wrapping_add(offset),
        Privilege::Supervisor,
        false,
    )?;
    let gate = Gate::from_raw(raw as u64, (raw >> 64) as u64);
    if !gate.is_valid_type() {
        return Err(Event::gp(idt_code).into());
    }
    // §6.12.1.1: INT n, INT3 and INTO check the gate's DPL; hardware events do not.
    if software && gate.dpl < cpu.cpl {
        return Err(Event::gp(idt_code).into());
    }
    if !gate.present {
        return Err(Event::np(idt_code).into());
    }
    Ok(gate)
}

/// Checks the code segment the gate names (present 64-bit code, DPL ≤ CPL) and its canonical
/// entry point; returns its descriptor and the handler's CPL (the DPL, or the CPL for
/// conforming code).
fn handler_code_segment<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    gate: &Gate,
    ext: u32,
) -> Result<(Descriptor, u8), Fault> {
    let sel_code = u32::from(gate.selector & !3) | ext;
    if is_null_selector(gate.selector) {
        return Err(Event::gp(ext).into());
    }
    // A #PF reading the descriptor stays a #PF (CR2 = the descriptor's address) and goes
    // through the double-fault rules like any fault met during delivery (SDM Vol. 3 §6.15,
    // Table 6-5); only the selector's own faults (beyond the limit) name the selector.
    let code = read_descriptor(cpu, mem, gate.selector)
        .map_err(|f| match f {
            Fault::Raise(e) if e.vector != vector::PF => Fault::Raise(Event::gp(sel_code)),
            other => other,
        })?
        .descriptor;
    if !code.is_code() || code.dpl > cpu.cpl {
        return Err(Event::gp(sel_code).into());
    }
    if !code.present {
        return Err(Event::np(sel_code).into());
    }
    // §6.14.1: in IA-32e mode the handler must be 64-bit code.
    if !code.is_long_code() {
        return Err(Event::gp(sel_code).into());
    }
    let new_cpl = if code.is_conforming_code() {
        cpu.cpl
    } else {
        code.dpl
    };
    if !is_canonical(gate.offset) {
        return Err(Event::gp(ext).into());
    }
    Ok((code, new_cpl))
}

/// The stack the handler runs on (§6.14.2, §6.14.5): the gate's IST entry, else TSS.RSPn on a
/// change to CPL `new_cpl`, else the current one; canonical (#SS otherwise) and 16-byte aligned.
fn handler_stack<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    gate: &Gate,
    new_cpl: u8,
    ext: u32,
) -> Result<u64, Fault> {
    let rsp = if gate.ist != 0 {
        tss_stack(cpu, mem, tss::IST1 + 8 * u64::from(gate.ist - 1), ext)?
    } else if new_cpl < cpu.cpl {
        tss_stack(cpu, mem, tss::RSP0 + 8 * u64::from(new_cpl), ext)?
    } else {
        cpu.reg(Gpr::Rsp)
    };
    if !is_canonical(rsp) {
        return Err(Event::ss(ext).into());
    }
    // §6.14.2: the new stack is aligned to 16 bytes before the frame is pushed.
    Ok(rsp & !0xF)
}

/// Writes the frame the handler expects below `rsp` (error code if any, RIP, CS, RFLAGS, RSP,
/// SS: SDM Vol. 3 Figure 6-9) with the rights of `new_cpl`; returns the new RSP. A fault
/// writing it is #SS(`ext`) or the #PF it was.
fn push_frame<M: GuestMemory + ?Sized>(
    cpu: &VCpu,
    mem: &mut M,
    event: &Event,
    rsp: u64,
    new_cpl: u8,
    ext: u32,
) -> Result<u64, Fault> {
    let mut frame = [0u64; 6];
    let mut n = 0;
    if let Some(code) = event.error_code {
        frame[n] = u64::from(code);
        n += 1;
    }
    let return_rip = cpu.rip.wrapping_add(u64::from(event.instruction_len));
    // SDM Vol. 3 §17.3.1.1: a fault-class exception pushes RF = 1 (the IRET back re-executes
    // the instruction without another instruction-breakpoint #DB); traps and interrupts push
    // RF as it is.
    let pushed_rflags = if event.is_fault() {
        cpu.rflags | rflags::RF
    } else {
        cpu.rflags
    };
    for value in [
        return_rip,
        u64::from(cpu.segment(SegReg::Cs).selector),
        pushed_rflags,
        cpu.reg(Gpr::Rsp),
        u64::from(cpu.segment(SegReg::Ss).selector),
    ] {
        frame[n] = value;
        n += 1;
    }
    let new_rsp = rsp.wrapping_sub(8 * n as u64);
    let mut bytes = [0u8; 48];
    for (chunk, value) in bytes.chunks_exact_mut(8).zip(frame.iter()) {
        chunk.copy_from_slice(&value.to_le_bytes());
    }
    let privilege = if new_cpl == 3 {
        Privilege::User
    } else {
        Privilege::Supervisor
    };
    write_slice(mem, new_rsp, &bytes[..8 * n], privilege, true).map_err(|f| match f {
        Fault::Raise(ev) if ev.vector == vector::SS => Fault::Raise(Event::ss(ext)),
        other => other,
    })?;
    Ok(new_rsp)
}
