//! The trap fast paths that need the machine (host option `fastpath=on|off`, on by default;
//! docs/benchmarks.md "Fast paths"): the fast lane, what vmm-core's coalescing needs fetched,
//! and the way back without an injection pass when nothing is pending (`exit.rs`,
//! `Vm::nothing_pending`). With `fastpath=off` every trap takes the reference path: one
//! instruction per trap through `route`, the full injection and effects pass.
//!
//! The fast lane takes the guest kernel's most frequent privileged instructions that touch
//! neither segments, control flow nor guest memory (IN/OUT, RDMSR/WRMSR, MOV CRn, INVLPG:
//! vmm-core `emulate::execute_prefetched`) from the #GP with the instruction's bytes read in
//! one 8-byte load, and returns without the dispatcher's generic steps when nothing else is to
//! be done: no fetch through `GuestAccess`, no outcome plumbing, no shadow descriptor table or
//! data-segment pass (the instruction changed neither), no injection pass. Its effects (a CR3
//! load, an INVLPG, a control bit, an FS/GS base) are applied by the same `apply_effects`.
//! Anything else — a fault it raised, an interrupt now pending, the guest's exit request —
//! continues on the dispatcher's way back (`Lane::Rest`).

use super::registers::vcpu_to_frame;
use super::{cli_sti_stub, host, instrument, Action, StopWhy, Vm};
use crate::trap::{vector, TrapFrame};
use shadow_mmu::{AccessKind, GuestVirtAddr, Privilege};
use vmm_core::accounting::TrapKind;
use vmm_core::cpu::emulate::LaneInstruction;
use vmm_core::cpu::shadow_gdt::RealSelectors;
use vmm_core::cpu::Fault;

/// What the fast lane did with a trap.
pub(super) enum Lane {
    /// Handled, the frame written: the guest resumes at once.
    Done(LaneInstruction),
    /// Executed, but the rest of the trap (delivering its fault, applying its effects, an
    /// injection, the exit request) takes the dispatcher's way back.
    Rest(Action, TrapKind),
}

impl Vm {
    /// The fast lane, after `enter`: `None` when the trap is not one it takes (nothing changed).
    /// Not inlined: the dispatcher's own code stays as it was without it (measured: inlined,
    /// it cost every other trap ~200 instructions under icount).
    #[inline(never)]
    pub(super) fn fast_lane(&mut self, frame: &mut TrapFrame) -> Option<Lane> {
        self.prefetched = None;
        if !self.fastpath
            || self.tracer.on()
            || self.stepped
            || instrument::splitting_by_phase()
            || frame.vector != vector::GENERAL_PROTECTION
            || frame.error_code != 0
        {
            return None;
        }
        let bytes = host::guest_code_bytes(frame.rip)?;
        let Some((lane, result)) = vmm_core::cpu::emulate::execute_prefetched(
            &mut self.cpu,
            &mut host::GuestAccess::new(&mut self.mmu, self.view),
            &mut self.bus,
            &bytes,
        ) else {
            // Not the lane's: the dispatcher emulates it from these bytes, without a fetch.
            self.prefetched = Some(bytes);
            return None;
        };
        let kind = TrapKind::Instruction(lane.name());
        if result.is_ok() && self.cpu.has_effects() {
            if let Err(why) = self.apply_lane_effects() {
                return Some(Lane::Rest(Action::Stop(why), kind));
            }
        }
        match result {
            Ok(()) if self.nothing_pending() && self.bus.exit_requested().is_none() => {
                // Neither CS/SS nor a data segment changed: the real ones stay.
                let selectors = RealSelectors {
                    cs: frame.cs as u16,
                    ss: frame.ss as u16,
                };
                vcpu_to_frame(&self.cpu, frame, selectors, false);
                self.cpu.resumed();
                cli_sti_stub::publish(&self.cpu, false, false);
                Some(Lane::Done(lane))
            }
            Ok(()) => Some(Lane::Rest(Action::Resume("emulated"), kind)),
            Err(Fault::Raise(event)) => {
                Some(Lane::Rest(self.deliver(event, "fault injected"), kind))
            }
            Err(Fault::Stop(stop)) => Some(Lane::Rest(
                Action::Stop(StopWhy::Cpu(stop)),
                TrapKind::Other("stop"),
            )),
        }
    }

    /// What a lane instruction changed (a CR3 load, an INVLPG, a control bit, an FS/GS base),
    /// applied as on the dispatcher's way back (`exit.rs`), before any injection. Kept out of
    /// line: most lane instructions have no effect, and inlined it cost them ~50 instructions
    /// each under icount.
    #[inline(never)]
    fn apply_lane_effects(&mut self) -> Result<(), StopWhy> {
        self.apply_effects()
    }

    /// After a forwarded SYSCALL or SYSENTER: when the guest's handler begins with SWAPGS, run it in this
    /// trap (vmm-core `coalesce::swapgs_at_handler` decides whether it may).
    pub(super) fn coalesce_swapgs_at_handler(&mut self) {
        if !self.cpu.fast_paths {
            return;
        }
        if let Some(handler) = self.kernel_code_bytes::<3>(self.cpu.rip) {
            vmm_core::cpu::coalesce::swapgs_at_handler(&mut self.cpu, &handler);
        }
    }

    /// The `N` bytes of guest code at `rip` as the guest kernel would fetch them: only when the
    /// kernel view's shadow maps them, executable, within one page (shadow-mmu
    /// `read_through_shadow`). The shadow is what the real CPU would translate through (filled
    /// only from the guest's own tables, with their rights, and zapped when they change), so a
    /// hit is a fetch the CPU would make; a miss just means no coalescing this time.
    fn kernel_code_bytes<const N: usize>(&self, rip: u64) -> Option<[u8; N]> {
        let mut bytes = [0u8; N];
        let fetched = self.mmu.read_through_shadow(
            GuestVirtAddr::new(rip)?,
            &mut bytes,
            AccessKind::Fetch,
            Privilege::Supervisor,
        );
        fetched.then_some(bytes)
    }
}
