//! Lab 5: virtual interrupt injection (docs/labs/lab5-virtual-interrupts.md).
//!
//! The guest's devices are virtual: the VMM's 8259A pair (`crate::devices::pic`) takes the
//! virtual timer's and UART's requests, and the guest never sees a real interrupt. So on every
//! way back into the guest the VMM must decide, as the CPU would at an instruction boundary,
//! whether a virtual interrupt is taken now: `crate::cpu::inject::inject` asks your
//! `injection_decision`, then acknowledges the vector at the virtual PIC and builds the frame
//! through the guest's IDT itself. Whether the PIC has a vector to give at all is decided by its
//! priority resolver, your `priority_resolver`. Each function below replaces the reference
//! function of the same name when the VMM is built with the feature `lab5`
//! (`./run-qemu.sh --lab 5` does that).
//!
//! Useful pieces of the vCPU (`vmm-core/src/cpu/state.rs`):
//! - `cpu.interrupts_enabled()`: the guest's *virtual* IF (lab 2);
//! - `cpu.rip`, and `cpu.interrupt_shadow`: `Some(rip)` after an STI that set IF or a MOV SS /
//!   POP SS at the instruction before `rip`;
//! - `cpu.halted`: the guest executed HLT and has not been woken since.
//!
//! Run `./run-qemu.sh --lab 5` after each step: the host tests name the rule you broke.

// The skeleton does not use its parameters and imports yet; delete this line when done.
#![allow(unused_variables, unused_imports)]

use crate::cpu::event::CpuStop;
use crate::cpu::inject::Decision;
use crate::cpu::state::VCpu;

/// What the way back into the guest does, given the vCPU and whether the virtual 8259 asserts
/// its INTR output (`pending`: an unmasked request above everything in service).
///
/// Decide as the CPU does at an instruction boundary (SDM Vol. 3 §6.8.1, §6.8.3, Vol. 2A
/// "HLT"):
/// - an external interrupt is taken only when IF = 1;
/// - ... and not while the interrupt shadow covers the instruction at RIP: the shadow opened by
///   an STI (or MOV SS) covers exactly the instruction after it, the one whose address was
///   recorded in `cpu.interrupt_shadow`. A shadow recorded for another address is over;
/// - when IF = 1, an interrupt is pending and the shadow holds it: `Decision::WindowNeeded`
///   (the VMM lets that one instruction run, then asks again);
/// - when it can be taken: `Decision::DeliverNow` (also for a halted guest: the interrupt
///   wakes it, and its handler returns after the HLT);
/// - a halted guest with nothing it can take: with IF = 1 it waits, `Decision::Idle`; with
///   IF = 0 nothing can ever wake it (no NMI source exists here), which is not a hang but a
///   stop: `Err(CpuStop::HaltedForever)`;
/// - otherwise `Decision::Resume`.
pub fn injection_decision(cpu: &VCpu, pending: bool) -> Result<Decision, CpuStop> {
    // TODO: IF, the shadow at RIP, HLT.
    todo!("lab 5: injection_decision")
}

/// The 8259A's priority resolver (datasheet 231468, "Priority Resolver", "Fully Nested Mode",
/// "Interrupt Mask Register"): the IR line (0–7) the chip interrupts the CPU for, given its
/// interrupt request register `irr`, interrupt mask register `imr` and in-service register
/// `isr` (bit n is IR n), or `None` when its INT output stays low.
///
/// - Priorities are fixed: IR0 is the highest, IR7 the lowest.
/// - A request whose IMR bit is set is not seen.
/// - A level in service (set at the acknowledge, cleared by the handler's EOI) blocks requests
///   of the same and of lower priority — whether or not that level is masked now (special mask
///   mode, which would change that, is not modelled).
pub fn priority_resolver(irr: u8, imr: u8, isr: u8) -> Option<u8> {
    // TODO: the highest unmasked request, then the highest level in service.
    todo!("lab 5: priority_resolver")
}
