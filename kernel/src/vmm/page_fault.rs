//! A #PF from the guest: shadow-mmu decides (article challenge "页表虚拟化", SDM Vol. 3 §4.7)
//! between filling the shadow, reflecting the fault to the guest, emulating a write to a
//! write-protected guest page table, and stopping the guest; this wires the decision to the
//! real TLB and CR3.

use super::instrument::{PhaseClock, TrapName};
use super::{Action, StopWhy, Vm};
use crate::trap::TrapFrame;
use shadow_mmu::shadow::FaultOutcome;
use shadow_mmu::{GuestVirtAddr, PageFaultErrorCode};
use vmm_core::accounting::{PageFaultOutcome, Phase, TrapKind};
use vmm_core::cpu::{Cause, CpuStop, Event};

impl Vm {
    /// #PF from the guest: shadow-mmu decides between filling the shadow, reflecting the fault
    /// to the guest, emulating a page-table write, and stopping it.
    pub(super) fn page_fault(
        &mut self,
        frame: &TrapFrame,
        clock: &mut PhaseClock,
    ) -> (Action, TrapKind) {
        // SAFETY: reading CR2 has no side effects; this is the #PF handler.
        let cr2 = unsafe { x86::controlregs::cr2() } as u64;
        self.last_trap = TrapName::PageFault {
            error: frame.error_code,
            cr2,
            store: None,
        };
        let Some(gva) = GuestVirtAddr::new(cr2) else {
            return (
                Action::Stop(StopWhy::Unexpected),
                TrapKind::PageFault(PageFaultOutcome::Stop),
            );
        };
        let hw = PageFaultErrorCode::from_bits_truncate(frame.error_code as u32);
        let outcome = self.mmu.handle_page_fault(self.view, gva, hw);
        clock.mark(Phase::ShadowMmu);
        match outcome {
            FaultOutcome::Filled => {
                if self.mmu.take_tlb_flush() {
                    self.load_shadow_root();
                } else {
                    // SAFETY: INVLPG only drops a translation; the next access refills it from
                    // the shadow entry just written (needed when a read-only entry was upgraded).
                    unsafe { x86::tlb::flush(cr2 as usize) };
                }
                (
                    Action::Resume("shadow fill"),
                    TrapKind::PageFault(PageFaultOutcome::Fill),
                )
            }
            FaultOutcome::Stop(reason) => (
                Action::Stop(StopWhy::Mmu(reason)),
                TrapKind::PageFault(PageFaultOutcome::Stop),
            ),
            FaultOutcome::Reflect(pf) => (
                self.deliver(Event::page_fault(pf), "#PF reflected"),
                TrapKind::PageFault(PageFaultOutcome::Reflect),
            ),
            FaultOutcome::EmulatePageTableWrite { gpa } => {
                // A table of an address space that is not running: the guest is recycling its
                // frame; drop those shadows and let the store run natively. A guest user program
                // never writes page tables, and a kernel store that is not PTE-style (PUSH,
                // CALL, ...) means the frame was freed and reused as data: stop shadowing
                // everything (real VMMs call this unshadowing) and retry natively too.
                let store = (self.cpu.rip, gpa.as_u64());
                let retried = self.unshadowed_for.take() == Some(store);
                let action = if self.mmu.release_inactive_shadows(gpa) {
                    Action::Resume("released an inactive address space")
                } else if retried {
                    // Unshadowing did not let this store run: its own translation goes through
                    // the table it writes (a self-map), so every retry protects the table
                    // again. It is emulated whatever the CPL, or the guest stops: never a loop.
                    match self.emulate(Cause::PageTableWrite, clock) {
                        (Action::Stop(StopWhy::Cpu(CpuStop::NotEmulated { .. })), _) => {
                            Action::Stop(StopWhy::Cpu(CpuStop::Unsupported(
                                "a store to a page table its own translation goes through, of a kind the emulator does not emulate",
                            )))
                        }
                        (action, _) => action,
                    }
                } else if self.cpu.cpl == 3 {
                    self.unshadowed_for = Some(store);
                    self.unshadow()
                } else {
                    match self.emulate(Cause::PageTableWrite, clock) {
                        (Action::Stop(StopWhy::Cpu(CpuStop::NotEmulated { .. })), _) => {
                            self.unshadowed_for = Some(store);
                            self.unshadow()
                        }
                        (action, _) => action,
                    }
                };
                (action, TrapKind::PageFault(PageFaultOutcome::EmulatedWrite))
            }
        }
    }
    /// Drops every shadow (and with them the write protection of every guest page table); the
    /// current address space refills on demand.
    pub(super) fn unshadow(&mut self) -> Action {
        self.mmu.flush_all();
        self.load_shadow_root();
        Action::Resume("unshadowed")
    }
}
