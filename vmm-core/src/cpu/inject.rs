//! The injection policy: on every way back into the guest, decide whether a virtual
//! interrupt is delivered now (SDM Vol. 3 §6.8.1 masking by IF, §6.8.3 the STI/MOV SS shadow,
//! §6.9 priority; HLT, Vol. 2 "HLT").
//!
//! Article challenge "中断虚拟化": the guest's IF is virtual, so the VMM holds the interrupt
//! until the guest could take it, then builds the frame itself.
//!
//! CR8/TPR does not appear here on purpose: the task-priority register filters only
//! interrupts the local APIC delivers; the 8259's are ExtINT, which the TPR never blocks
//! (SDM Vol. 3 §10.8.3.1, §10.6.1). This virtual machine has only the 8259 pair.

use super::deliver::deliver;
use super::event::{CpuStop, Event};
use super::memory::GuestMemory;
use super::state::VCpu;
use crate::devices::InterruptSource;

/// What the way back into the guest does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Injection {
    /// Nothing to do: resume the guest.
    None,
    /// This external interrupt vector was delivered through the guest's IDT.
    Delivered(u8),
    /// An interrupt is pending but the STI/MOV SS shadow blocks it for one instruction: the
    /// caller may single-step that instruction (real TF) to come back right after it.
    WindowNeeded,
    /// The guest is halted with interrupts enabled and nothing is pending: idle until the
    /// next host interrupt, then ask again.
    Idle,
}

/// Whether interrupts are blocked by the shadow at the current RIP.
pub fn in_interrupt_shadow(cpu: &VCpu) -> bool {
    cpu.interrupt_shadow == Some(cpu.rip)
}

/// Decides and, when an interrupt is due, delivers it. A halted guest with IF = 0 can never
/// be woken (no NMI source exists): that is a stop, not a hang.
pub fn inject<M: GuestMemory + ?Sized, S: InterruptSource + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    pic: &mut S,
) -> Result<Injection, CpuStop> {
    if cpu.interrupt_shadow.is_some() && !in_interrupt_shadow(cpu) {
        cpu.interrupt_shadow = None;
    }
    if cpu.interrupts_enabled() && pic.has_pending() {
        if in_interrupt_shadow(cpu) {
            return Ok(Injection::WindowNeeded);
        }
        if let Some(vector) = pic.acknowledge() {
            deliver(cpu, mem, Event::external(vector))?;
            return Ok(Injection::Delivered(vector));
        }
    }
    if cpu.halted {
        if !cpu.interrupts_enabled() {
            return Err(CpuStop::HaltedForever);
        }
        return Ok(Injection::Idle);
    }
    Ok(Injection::None)
}
