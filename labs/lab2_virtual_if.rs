//! Lab 2: the virtual interrupt flag (docs/labs/lab2-virtual-if.md).
//!
//! The guest kernel believes it runs at CPL 0 and switches interrupts off and on with `cli`,
//! `sti`, `pushf`/`popf` and `iretq`. It really runs at CPL 3 with IOPL 0, so the *real*
//! RFLAGS.IF must stay the VMM's (the host needs its timer), and the IF the guest sees is a
//! *virtual* one, kept in the vCPU (`cpu.rflags`, `crate::cpu::state`). You write the four
//! places where the two meet. Each function below replaces the reference function of the same
//! name when the VMM is built with the feature `lab2` (`./run-qemu.sh --lab 2` does that).
//!
//! Useful pieces of the vCPU (`vmm-core/src/cpu/state.rs`):
//! - `cpu.rflags`: the whole virtual RFLAGS; `rflags::IF`, `rflags::IOPL`, `rflags::RF`, ... are
//!   its bits; `rflags::HARDWARE_OWNED` are the bits the real register carries for the guest;
//! - `cpu.cpl`: the guest's virtual CPL (0 for its kernel, 3 for its user programs);
//! - `cpu.iopl()`, `cpu.interrupts_enabled()`, `cpu.set_interrupts_enabled(bool)`;
//! - `cpu.interrupt_shadow`: `Some(rip)` blocks interrupts while the guest's RIP is `rip`.
//!
//! Run `./run-qemu.sh --lab 2` after each step: the host tests name the rule you broke.

// The skeleton does not use its parameters and imports yet; delete this line when done.
#![allow(unused_variables, unused_imports)]

use crate::cpu::emulate::Flow;
use crate::cpu::memory::Fault;
use crate::cpu::state::{rflags, VCpu};
use crate::cpu::Event;

/// The RFLAGS value the guest must *really* run with, given the vCPU: what the host kernel puts
/// in the trap frame before its `iretq` back to the guest (`kernel/src/vmm/registers.rs`).
///
/// The real register carries the guest's own flags where the hardware updates them without
/// trapping (`rflags::HARDWARE_OWNED`: the arithmetic flags, TF, DF, NT, AC, ID); everything else
/// must keep the host in control. Think about what happens to the host's timer if IF is 0 while
/// the guest runs, and to `cli` if IOPL is 3. Bit 1 (`rflags::FIXED`) always reads 1.
pub fn real_rflags(cpu: &VCpu) -> u64 {
    // TODO: the guest's hardware-owned bits, plus whatever keeps the host in control.
    todo!("lab 2: real_rflags")
}

/// CLI (`sti == false`) or STI (`sti == true`) at the guest's RIP, which trapped with #GP(0)
/// because the guest really runs at CPL 3 with IOPL 0. `next` is the address of the instruction
/// after it.
///
/// Redo what the CPU would have done at the guest's *virtual* CPL (SDM Vol. 2A "CLI", Vol. 2B
/// "STI"; this CPU has no CR4.PVI, so there is no VIF path):
/// - allowed only when CPL ≤ IOPL; otherwise the guest gets #GP(0) and nothing changes
///   (`return Err(Event::gp(0).into())`);
/// - CLI clears the virtual IF, STI sets it;
/// - STI that *sets* IF (IF was 0) blocks interrupts until the instruction after it has run
///   (SDM Vol. 3 §6.8.3): `cpu.interrupt_shadow = Some(next)`. STI with IF already 1 opens no
///   shadow.
///
/// Return `Ok(Flow::Next)`: the instruction retired and the guest continues at `next` (the
/// emulator moves RIP and ends an older shadow itself).
pub fn cli_sti(cpu: &mut VCpu, sti: bool, next: u64) -> Result<Flow, Fault> {
    // TODO: the privilege check (#GP(0): `Err(Event::gp(0).into())`), the interrupt shadow,
    // the flag.
    todo!("lab 2: cli_sti")
}

/// The image PUSHF pushes, given the virtual RFLAGS (`rflags`).
///
/// PUSHF does not trap: the guest's own `pushf` pushes the *real* RFLAGS (a virtualization hole,
/// docs/virtualization-holes.md `pushf_if_after_cli`). The VMM runs one PUSHF itself: the one
/// right after an STI, while it would otherwise single-step that instruction with the real TF
/// (the interrupt window, `vmm-core/src/cpu/emulate/mod.rs` `pushf_in_interrupt_shadow`). Its
/// image must be what the CPU would push for the guest (SDM Vol. 2B "PUSHF/PUSHFD/PUSHFQ": the
/// flags as they are, except two that are never pushed as 1).
pub fn pushf_image(rflags: u64) -> u64 {
    // TODO: which bits does PUSHF clear in the image?
    todo!("lab 2: pushf_image")
}

/// The new virtual RFLAGS after an IRET of operand size `size` bytes (8 for IRETQ, 4 for
/// IRETD, 2 for IRETW) popped the image `popped`, with the vCPU still at the old privilege
/// (`cpu.cpl`, `cpu.iopl()` are the values before the IRET).
///
/// IRET is how a guest kernel returns from an interrupt and re-enables interrupts; unlike POPF
/// it always traps here, so this is where the virtual IF comes back. SDM Vol. 2A "IRET" (the
/// IA-32e mode return) says which bits the image may change:
/// - the arithmetic flags (`rflags::STATUS`), TF, DF, NT, RF, AC and ID: always;
/// - IF: only when CPL ≤ IOPL;
/// - IOPL, VIF and VIP: only at CPL 0;
/// - any other bit keeps its value, bit 1 (`rflags::FIXED`) is 1;
/// - a 16-bit (32-bit) IRET pops only the low 16 (32) bits of RFLAGS: the bits above keep their
///   value.
pub fn rflags_after_iret(cpu: &VCpu, popped: u64, size: usize) -> u64 {
    // TODO: build the mask of the bits this IRET may change, then merge the image into
    // `cpu.rflags` through it.
    todo!("lab 2: rflags_after_iret")
}
