//! Lab 6: system-call forwarding (docs/labs/lab6-system-calls.md).
//!
//! The guest kernel programs its fast system call as it would on bare metal: EFER.SCE, STAR,
//! LSTAR and FMASK, all through WRMSR, which traps. The VMM keeps those values in the vCPU
//! (`cpu.msr`, `cpu.efer`) and points the *real* MSRs at its own entry stub, so a user
//! program's `syscall` enters the VMM; and the guest kernel's `sysretq`, a privileged
//! instruction at real CPL 3, traps too. You write what each must do to the virtual CPU, from
//! the guest's *virtual* MSRs: SYSCALL forwarded into the guest kernel at its LSTAR, SYSRETQ back
//! to its user program — with the check whose absence was CVE-2012-0217. Each function below
//! replaces the reference function of the same name when the VMM is built with the feature
//! `lab6` (`./run-qemu.sh --lab 6` does that).
//!
//! Useful pieces (`vmm-core/src/cpu/state.rs`, `vmm-core/src/cpu/syscall.rs`):
//! - `cpu.rip`, `cpu.rflags`, `cpu.cpl`, `cpu.reg(Gpr::Rcx)` / `cpu.set_reg(Gpr::R11, v)`;
//! - `cpu.efer` and `efer::SCE`; `cpu.msr.star`, `cpu.msr.lstar`, `cpu.msr.sfmask` (IA32_FMASK);
//! - `rflags::RF`, `rflags::FIXED` (bit 1, always 1), ...;
//! - `enter_kernel(cpu, cs, rip)` and `enter_user(cpu, cs, ss, rip)`: the segment, CPL and RIP
//!   switch both instructions make (flat descriptors, not read from the GDT); you pick the
//!   selectors and the address;
//! - `is_canonical(address)`; `Event::ud()`, `Event::gp(0)` for the guest's faults (`.into()`
//!   makes a `Fault`), `CpuStop::Unsupported("...")` for what this VMM does not emulate.
//!
//! Run `./run-qemu.sh --lab 6` after each step: the host tests name the rule you broke.

// The skeleton does not use its parameters and imports yet; delete this line when done.
#![allow(unused_variables, unused_imports)]

use crate::cpu::event::{CpuStop, Event};
use crate::cpu::memory::Fault;
use crate::cpu::state::{efer, rflags, Gpr, VCpu};
use crate::cpu::syscall::{enter_kernel, enter_user};
use shadow_mmu::addr::is_canonical;

/// SYSCALL from the guest (SDM Vol. 2B "SYSCALL", 64-bit mode), with `cpu.rip` already at the
/// instruction after it (the real SYSCALL entered the VMM's stub, which reports that address).
///
/// - `#UD` when EFER.SCE = 0; the fault belongs to the SYSCALL itself, so move `cpu.rip` back
///   onto the 2-byte instruction first;
/// - RCX ← the address of the next instruction; R11 ← RFLAGS, with RF clear;
/// - RFLAGS: every bit set in IA32_FMASK is cleared, and RF (bit 1 stays 1);
/// - CS ← IA32_STAR[47:32] with its RPL cleared, SS ← that + 8, CPL 0, RIP ← IA32_LSTAR
///   (`enter_kernel` does the switch). RSP is *not* changed: the guest kernel's entry stub
///   switches stacks itself (after SWAPGS).
pub fn syscall(cpu: &mut VCpu) -> Result<(), Fault> {
    // TODO: the SCE check, RCX and R11, FMASK, then the switch to LSTAR.
    todo!("lab 6: syscall")
}

/// SYSRET from the guest kernel (SDM Vol. 2B "SYSRET"); `rex_w` is true for SYSRETQ (REX.W:
/// back to 64-bit code), the only form the guest kernel uses.
///
/// In the manual's order, *before anything changes*:
/// - `#UD` when EFER.SCE = 0;
/// - `#GP(0)` when CPL ≠ 0;
/// - without REX.W (a return to 32-bit compatibility mode): not emulated here, stop the guest
///   with `CpuStop::Unsupported("SYSRET to compatibility mode")`;
/// - `#GP(0)` when RCX is not canonical, raised as Intel CPUs raise it: at CPL 0, RIP still at
///   the SYSRET, nothing changed. (That is the root of CVE-2012-0217: a kernel that had already
///   loaded the user's RSP took this #GP in ring 0 on a stack the user chose. Here, checking
///   only after the switch would give the guest an AMD-style fault at CPL 3, and not checking
///   would leave a non-canonical RIP for the host's own IRETQ back into the guest.)
///
/// Then: RIP ← RCX; RFLAGS ← (R11 AND 3C7FD7H) OR 2 (RF, VM and the reserved bits cleared, bit 1
/// set); CS ← IA32_STAR[63:48] + 16, SS ← IA32_STAR[63:48] + 8, both with RPL 3, CPL 3
/// (`enter_user` does the switch).
pub fn sysret(cpu: &mut VCpu, rex_w: bool) -> Result<(), Fault> {
    // TODO: the three checks in order, the compatibility-mode stop, then RFLAGS and the switch.
    todo!("lab 6: sysret")
}
