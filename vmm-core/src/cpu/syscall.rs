//! Fast system calls: SYSCALL/SYSENTER forwarded into the guest kernel, SYSRET/SYSEXIT back to
//! its user programs (SDM Vol. 2 "SYSCALL", "SYSRET", "SYSENTER", "SYSEXIT"; Vol. 3 §5.8.7–8).
//!
//! Article challenge "系统调用": the real instructions enter the VMM (their real MSRs point at
//! its stubs); the architectural result the guest expects is computed here from its *virtual*
//! MSRs. SYSRET/SYSEXIT check the return address for canonical form before anything changes,
//! and the host never executes a real SYSRET: it returns with IRETQ (CVE-2012-0217).

use super::descriptor::Descriptor;
use super::event::{CpuStop, Event};
use super::memory::Fault;
use super::state::{efer, rflags, Gpr, SegReg, Segment, VCpu};
use shadow_mmu::addr::is_canonical;

/// The flat descriptors SYSCALL/SYSRET/SYSENTER/SYSEXIT load without reading the GDT.
fn flat(code: bool, dpl: u8) -> Descriptor {
    Descriptor {
        base: 0,
        limit: 0xFFFF_FFFF,
        typ: if code { 0xB } else { 0x3 },
        code_or_data: true,
        dpl,
        present: true,
        long: code,
        default_big: !code,
    }
}

/// The switch to the kernel that SYSCALL and SYSENTER make without reading the GDT: CS ←
/// `cs` (RPL cleared) and SS ← `cs` + 8 as flat 64-bit code and flat data of DPL 0, CPL 0, RIP ←
/// `rip`; any interrupt shadow ends.
pub(crate) fn enter_kernel(cpu: &mut VCpu, cs: u16, rip: u64) {
    cpu.set_segment(
        SegReg::Cs,
        Segment {
            selector: cs & !3,
            cache: flat(true, 0),
        },
    );
    cpu.set_segment(
        SegReg::Ss,
        Segment {
            selector: cs.wrapping_add(8) & !3,
            cache: flat(false, 0),
        },
    );
    cpu.set_cpl(0);
    cpu.rip = rip;
    cpu.interrupt_shadow = None;
}

/// The switch to user mode that SYSRET and SYSEXIT make without reading the GDT: CS ← `cs` and
/// SS ← `ss`, both with RPL 3, as flat 64-bit code and flat data of DPL 3, CPL 3, RIP ← `rip`;
/// any interrupt shadow ends.
pub(crate) fn enter_user(cpu: &mut VCpu, cs: u16, ss: u16, rip: u64) {
    cpu.set_segment(
        SegReg::Cs,
        Segment {
            selector: cs | 3,
            cache: flat(true, 3),
        },
    );
    cpu.set_segment(
        SegReg::Ss,
        Segment {
            selector: ss | 3,
            cache: flat(false, 3),
        },
    );
    cpu.set_cpl(3);
    cpu.rip = rip;
    cpu.interrupt_shadow = None;
}

// Lab 6 (docs/labs/lab6-system-calls.md): built with the feature `lab6`, the student's SYSCALL
// and SYSRET (labs/lab6_system_calls.rs) stand in for the two below.
#[cfg(feature = "lab6")]
pub use crate::labs::lab6::{syscall, sysret};

/// SYSCALL with RIP already at the next instruction: RCX ← RIP, R11 ← RFLAGS, RFLAGS masked
/// by IA32_FMASK, CS/SS from IA32_STAR[47:32], RIP ← IA32_LSTAR, CPL 0. #UD when EFER.SCE = 0
/// (then RIP is moved back onto the 2-byte instruction, where the fault belongs).
#[cfg(not(feature = "lab6"))]
pub fn syscall(cpu: &mut VCpu) -> Result<(), Fault> {
    if cpu.efer & efer::SCE == 0 {
        cpu.rip = cpu.rip.wrapping_sub(2);
        return Err(Event::ud().into());
    }
    cpu.set_reg(Gpr::Rcx, cpu.rip);
    cpu.set_reg(Gpr::R11, cpu.rflags & !rflags::RF);
    cpu.rflags = (cpu.rflags & !cpu.msr.sfmask & !rflags::RF) | rflags::FIXED;
    let cs = ((cpu.msr.star >> 32) & 0xFFFF) as u16;
    let lstar = cpu.msr.lstar;
    enter_kernel(cpu, cs, lstar);
    Ok(())
}

/// SYSENTER: CS ← IA32_SYSENTER_CS, SS ← CS + 8, RIP/RSP ← SYSENTER_EIP/ESP, IF/RF/VM
/// cleared, CPL 0. #GP(0) when SYSENTER_CS is null (RIP must then be at the instruction).
pub fn sysenter(cpu: &mut VCpu) -> Result<(), Fault> {
    let cs = (cpu.msr.sysenter_cs & 0xFFFC) as u16;
    if cs == 0 {
        return Err(Event::gp(0).into());
    }
    cpu.rflags &= !(rflags::VM | rflags::IF | rflags::RF);
    cpu.set_reg(Gpr::Rsp, cpu.msr.sysenter_esp);
    let eip = cpu.msr.sysenter_eip;
    enter_kernel(cpu, cs, eip);
    Ok(())
}

/// SYSRET with operand size 64 (`rex_w`): back to 64-bit user code at RCX with RFLAGS from
/// R11. Checks in the manual's order: #UD without EFER.SCE, #GP(0) at CPL ≠ 0, #GP(0) for a
/// non-canonical RCX — raised at CPL 0, on the kernel's stack, as Intel CPUs do.
#[cfg(not(feature = "lab6"))]
pub fn sysret(cpu: &mut VCpu, rex_w: bool) -> Result<(), Fault> {
    if cpu.efer & efer::SCE == 0 {
        return Err(Event::ud().into());
    }
    if cpu.cpl != 0 {
        return Err(Event::gp(0).into());
    }
    if !rex_w {
        return Err(CpuStop::Unsupported("SYSRET to compatibility mode").into());
    }
    let rip = cpu.reg(Gpr::Rcx);
    if !is_canonical(rip) {
        return Err(Event::gp(0).into());
    }
    cpu.rflags = (cpu.reg(Gpr::R11) & 0x3C_7FD7) | rflags::FIXED;
    let base = ((cpu.msr.star >> 48) & 0xFFFF) as u16;
    enter_user(cpu, base.wrapping_add(16), base.wrapping_add(8), rip);
    Ok(())
}

/// SYSEXIT with operand size 64: back to 64-bit user code at RDX with RSP = RCX; CS/SS are
/// SYSENTER_CS + 32 / + 40 with RPL 3.
pub fn sysexit(cpu: &mut VCpu, rex_w: bool) -> Result<(), Fault> {
    let cs = (cpu.msr.sysenter_cs & 0xFFFC) as u16;
    if cs == 0 || cpu.cpl != 0 {
        return Err(Event::gp(0).into());
    }
    if !rex_w {
        return Err(CpuStop::Unsupported("SYSEXIT to compatibility mode").into());
    }
    let rip = cpu.reg(Gpr::Rdx);
    let rsp = cpu.reg(Gpr::Rcx);
    if !is_canonical(rip) || !is_canonical(rsp) {
        return Err(Event::gp(0).into());
    }
    cpu.set_reg(Gpr::Rsp, rsp);
    enter_user(cpu, cs.wrapping_add(32), cs.wrapping_add(40), rip);
    Ok(())
}

/// SWAPGS: exchanges GS base with IA32_KERNEL_GS_BASE; CPL 0 only.
pub fn swapgs(cpu: &mut VCpu) -> Result<(), Fault> {
    if cpu.cpl != 0 {
        return Err(Event::gp(0).into());
    }
    let kernel = cpu.msr.kernel_gs_base;
    cpu.msr.kernel_gs_base = cpu.gs_base();
    cpu.set_segment_base(SegReg::Gs, kernel);
    Ok(())
}
