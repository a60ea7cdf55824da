//! The guest's registers between the real trap frame and the vCPU: copied in at every trap
//! (`Vm::enter`) and out at every return (`vcpu_to_frame`).
//!
//! The vCPU owns its register file and the frame is copied both ways, rather than the frame
//! being the vCPU's registers: vmm-core never touches hardware, so its tests build a `VCpu` on
//! the host without any trap frame, and the copy (about 40 instructions) is the price. Only the
//! arithmetic half of RFLAGS comes from the frame (IF and IOPL stay virtual); CS and SS go back
//! as the guest's own descriptors in the shadow descriptor table; DS/ES/FS/GS live in the real
//! registers (`data_segments.rs`).

use super::{cli_sti_stub, Vm};
use crate::trap::{self, vector, TrapFrame};
use vmm_core::cpu::shadow_gdt::RealSelectors;
use vmm_core::cpu::state::rflags;
use vmm_core::cpu::VCpu;

impl Vm {
    /// At trap entry: the interrupted guest's registers into the vCPU, with what happened
    /// natively since the last return (our single step, the CLI/STI stub, native segment loads).
    /// Returns whether a SYSENTER began with the guest's own TF set.
    pub(super) fn enter(&mut self, frame: &mut TrapFrame) -> bool {
        // Our single step for an interrupt window ends with whatever trap comes next: the TF in the
        // frame is ours, not the guest's (we only set it when the guest's TF was clear).
        self.stepped = core::mem::take(&mut self.single_step);
        if self.stepped {
            frame.rflags &= !rflags::TF;
            if frame.vector == vector::SYSCALL {
                // SYSCALL saved the flags, our TF included, in R11.
                frame.r11 &= !rflags::TF;
            }
        }
        // The guest's own TF when a SYSENTER began (SYSENTER keeps TF, so it trapped once in
        // our entry stub, which took it out of the frame).
        let sysenter_stepping =
            trap::take_sysenter_single_step() && frame.vector == vector::SYSENTER && !self.stepped;
        self.cpu.trapped_at(frame.rip);
        frame_to_vcpu(frame, &mut self.cpu);
        self.data_segments.absorb(&mut self.cpu);
        cli_sti_stub::absorb(&mut self.cpu);
        sysenter_stepping
    }
}

/// Copies the interrupted guest's registers into the vCPU. The real RFLAGS only contributes
/// its arithmetic half; IF/IOPL are the vCPU's own.
fn frame_to_vcpu(frame: &TrapFrame, cpu: &mut VCpu) {
    let regs = [
        frame.rax, frame.rcx, frame.rdx, frame.rbx, frame.rsp, frame.rbp, frame.rsi, frame.rdi,
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15,
    ];
    cpu.gpr = regs;
    cpu.rip = frame.rip;
    cpu.merge_hardware_rflags(frame.rflags);
}

/// Copies the vCPU back into the frame the stub will `iretq` with: always Ring 3, on the real
/// selectors of the guest's shadow descriptor table, real IF = 1, IOPL = 0.
pub(super) fn vcpu_to_frame(
    cpu: &VCpu,
    frame: &mut TrapFrame,
    selectors: RealSelectors,
    single_step: bool,
) {
    let [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15] = cpu.gpr;
    (frame.rax, frame.rcx, frame.rdx, frame.rbx) = (rax, rcx, rdx, rbx);
    (frame.rsp, frame.rbp, frame.rsi, frame.rdi) = (rsp, rbp, rsi, rdi);
    (frame.r8, frame.r9, frame.r10, frame.r11) = (r8, r9, r10, r11);
    (frame.r12, frame.r13, frame.r14, frame.r15) = (r12, r13, r14, r15);
    frame.rip = cpu.rip;
    frame.rflags = cpu.real_rflags() | if single_step { rflags::TF } else { 0 };
    frame.cs = u64::from(selectors.cs);
    frame.ss = u64::from(selectors.ss);
}
