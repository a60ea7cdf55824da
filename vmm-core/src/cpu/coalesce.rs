//! Coalescing: the instruction right after a trapping one, run in the same trap when nothing
//! architectural can come between the two (Agesen, Garthwaite, Sheldon, Subrahmanyam, "The
//! Evolution of an x86 Virtual Machine Monitor", and ATC'12 "Software Techniques for Avoiding
//! Hardware Virtualization Exits": a 64-bit guest's system call is SYSCALL, SWAPGS at its
//! handler, ... SWAPGS, SYSRETQ — four traps of which two can go).
//!
//! Article challenge "频繁访问特权资源": the cost of a sensitive instruction is its trap, so two
//! back-to-back sensitive instructions cost one trap where the second is predictable. The pairs:
//!
//! - a forwarded SYSCALL or SYSENTER whose handler begins with SWAPGS ([`swapgs_at_handler`]);
//! - SWAPGS followed by SYSRETQ, SYSEXITQ, IRETQ or STI; SYSEXITQ ([`after_swapgs`]): the way
//!   back.
//!
//! The second instruction runs only when running it at once is indistinguishable from the CPU
//! running it next: the guest's IF is 0 (no interrupt could be taken between the two, SDM Vol. 3
//! §6.8.1), TF is 0 (no single-step trap between them, §17.3.1.4), no STI/MOV SS shadow is open,
//! and the virtual CPL is 0 (SWAPGS then cannot fault). The second instruction then runs with RIP
//! on it, so a fault it raises (SYSRET's non-canonical RCX, CVE-2012-0217; a bad IRET frame) is
//! delivered exactly as after a trap of its own. Its bytes must have been fetched with the
//! guest's rights (the caller's job). The host option
//! `fastpath=off` turns coalescing off ([`VCpu::fast_paths`]); the host tests compare the coalesced
//! result with the two instructions emulated one trap each.

use super::state::{rflags, VCpu};
use super::syscall::swapgs;
use shadow_mmu::addr::is_canonical;

/// SWAPGS (SDM Vol. 2B): `0F 01 F8`.
pub const SWAPGS: [u8; 3] = [0x0F, 0x01, 0xF8];
/// SYSRET with REX.W (SYSRETQ, back to 64-bit code): `48 0F 07`.
pub const SYSRETQ: [u8; 3] = [0x48, 0x0F, 0x07];

/// Whether the instruction after the current one may run in the same trap: coalescing is on,
/// and no interrupt, single-step trap or shadow could come between them.
fn nothing_can_come_between(cpu: &VCpu) -> bool {
    cpu.fast_paths
        && cpu.cpl == 0
        && cpu.rflags & (rflags::IF | rflags::TF) == 0
        && cpu.interrupt_shadow.is_none()
}

/// After a forwarded SYSCALL or SYSENTER (the vCPU at the first instruction of the guest's
/// handler): when
/// `handler`, the bytes at RIP fetched with the guest's rights, begin with SWAPGS, runs it too
/// and moves RIP past it. Returns whether it did.
pub fn swapgs_at_handler(cpu: &mut VCpu, handler: &[u8]) -> bool {
    let next = cpu.rip.wrapping_add(SWAPGS.len() as u64);
    if !handler.starts_with(&SWAPGS) || !nothing_can_come_between(cpu) || !is_canonical(next) {
        return false;
    }
    if swapgs(cpu).is_err() {
        return false; // unreachable at CPL 0; left to the trap of its own
    }
    cpu.rip = next;
    true
}

/// The instruction a SWAPGS may take along into its trap: the way back to the interrupted or
/// calling program that a guest kernel runs right after restoring the user GS base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterSwapgs {
    /// SYSRETQ (`48 0F 07`).
    Sysretq,
    /// SYSEXITQ (`48 0F 35`).
    Sysexitq,
    /// IRETQ (`48 CF`).
    Iretq,
    /// STI then SYSEXITQ (`FB 48 0F 35`): the STI's interrupt shadow covers the SYSEXITQ, so
    /// nothing can come between those two either (SDM Vol. 3 §6.8.3), and a pending interrupt
    /// is taken after the SYSEXITQ, in user mode, as on the CPU.
    StiSysexitq,
}

impl AfterSwapgs {
    /// Its length in bytes.
    pub fn length(self) -> u64 {
        match self {
            AfterSwapgs::Iretq => 2,
            AfterSwapgs::StiSysexitq => 4,
            _ => 3,
        }
    }

    /// Its name in the trap table, with the SWAPGS before it.
    pub fn pair_name(self) -> &'static str {
        match self {
            AfterSwapgs::Sysretq => "SWAPGS+SYSRETQ",
            AfterSwapgs::Sysexitq => "SWAPGS+SYSEXITQ",
            AfterSwapgs::Iretq => "SWAPGS+IRETQ",
            AfterSwapgs::StiSysexitq => "SWAPGS+STI+SYSEXITQ",
        }
    }
}

/// The instruction after a SWAPGS at RIP that may run in the same trap: `after` are the bytes
/// that follow the SWAPGS, fetched with it from the same page (so with the same rights).
pub fn after_swapgs(cpu: &VCpu, after: &[u8]) -> Option<AfterSwapgs> {
    let second = match after {
        [0x48, 0x0F, 0x07, ..] => AfterSwapgs::Sysretq,
        [0x48, 0x0F, 0x35, ..] => AfterSwapgs::Sysexitq,
        [0x48, 0xCF, ..] => AfterSwapgs::Iretq,
        [0xFB, 0x48, 0x0F, 0x35, ..] => AfterSwapgs::StiSysexitq,
        _ => return None,
    };
    let end = cpu.rip.wrapping_add(SWAPGS.len() as u64 + second.length());
    (nothing_can_come_between(cpu) && is_canonical(end)).then_some(second)
}

/// Runs the SWAPGS at RIP and moves RIP to the instruction after it, which the caller then
/// executes as it would have in a trap of its own: a fault it raises is delivered with RIP on
/// it and the GS base already swapped, as on the CPU.
pub fn swapgs_before(cpu: &mut VCpu) -> Result<(), super::Fault> {
    swapgs(cpu)?;
    cpu.rip = cpu.rip.wrapping_add(SWAPGS.len() as u64);
    Ok(())
}
