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

/// What the guest's state allows on the way back, before the controller is asked for a vector
/// ([`injection_decision`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Deliver the pending interrupt now (acknowledge it at the controller, then build the
    /// frame through the guest's IDT).
    DeliverNow,
    /// An interrupt is pending and IF = 1, but the STI/MOV SS shadow holds it for one
    /// instruction: let that instruction run first.
    WindowNeeded,
    /// The guest is halted with IF = 1 and nothing is pending: wait for the next interrupt.
    Idle,
    /// Nothing to do: resume the guest where it is.
    Resume,
}

/// Whether interrupts are blocked by the shadow at the current RIP.
pub fn in_interrupt_shadow(cpu: &VCpu) -> bool {
    cpu.interrupt_shadow == Some(cpu.rip)
}

// Lab 5 (docs/labs/lab5-virtual-interrupts.md): built with the feature `lab5`, the student's
// decision (labs/lab5_virtual_interrupts.rs) stands in for the one below.
#[cfg(feature = "lab5")]
pub use crate::labs::lab5::injection_decision;

/// The injection policy's decision, from the vCPU and whether the virtual controller asserts
/// INTR (`pending`). An external interrupt is recognised only when IF = 1 (§6.8.1) and not in
/// the instruction after an STI that set IF or after a MOV SS/POP SS (§6.8.3: the shadow, here
/// `cpu.interrupt_shadow == Some(cpu.rip)`); a HLT ends only by an interrupt the CPU takes, so a
/// halted guest with IF = 0 can never be woken (this machine has no NMI source): that is a stop,
/// [`CpuStop::HaltedForever`], not a hang.
#[cfg(not(feature = "lab5"))]
pub fn injection_decision(cpu: &VCpu, pending: bool) -> Result<Decision, CpuStop> {
    if cpu.interrupts_enabled() && pending {
        return Ok(if in_interrupt_shadow(cpu) {
            Decision::WindowNeeded
        } else {
            Decision::DeliverNow
        });
    }
    match (cpu.halted, cpu.interrupts_enabled()) {
        (true, false) => Err(CpuStop::HaltedForever),
        (true, true) => Ok(Decision::Idle),
        (false, _) => Ok(Decision::Resume),
    }
}

/// Decides ([`injection_decision`]) and, when an interrupt is due, delivers it. First ends a
/// shadow the guest has moved past: it covers exactly one instruction.
pub fn inject<M: GuestMemory + ?Sized, S: InterruptSource + ?Sized>(
    cpu: &mut VCpu,
    mem: &mut M,
    pic: &mut S,
) -> Result<Injection, CpuStop> {
    if cpu.interrupt_shadow.is_some() && !in_interrupt_shadow(cpu) {
        cpu.interrupt_shadow = None;
    }
    // The controller is asked only when IF = 1: with IF = 0 no decision depends on it, and
    // asking on every trap that comes this way costs ~15 instructions a trap (the bench's int3
    // round trip, two traps: 3 952 against 3 922 instructions, measured under icount).
    let pending = cpu.interrupts_enabled() && pic.has_pending();
    let mut decision = injection_decision(cpu, pending)?;
    if decision == Decision::DeliverNow {
        match pic.acknowledge() {
            Some(vector) => {
                deliver(cpu, mem, Event::external(vector))?;
                return Ok(Injection::Delivered(vector));
            }
            // The controller has no vector after all (it is being initialised): decide as if
            // nothing were pending.
            None => decision = injection_decision(cpu, false)?,
        }
    }
    Ok(match decision {
        Decision::WindowNeeded => Injection::WindowNeeded,
        Decision::Idle => Injection::Idle,
        Decision::DeliverNow | Decision::Resume => Injection::None,
    })
}
