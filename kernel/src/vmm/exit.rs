//! The way back to the guest, after the trap was handled: apply what the vCPU changed (a new
//! CR3, a new view, control bits), inject a due virtual interrupt (SDM Vol. 3 §6.8, the
//! article's interrupt forwarding), bring the shadow descriptor table in line, and write the
//! vCPU back into the frame the entry stub returns with.

use super::instrument::{rdtsc, PhaseClock};
use super::registers::vcpu_to_frame;
use super::{cli_sti_stub, gdt, host, Action, StopWhy, Vm};
use crate::trap::TrapFrame;
use shadow_mmu::shadow::View;
use shadow_mmu::{GuestVirtAddr, PagingMode};
use vmm_core::accounting::{Phase, TrapKind};
use vmm_core::cpu::shadow_gdt::RealSelectors;
use vmm_core::cpu::state::rflags;
use vmm_core::cpu::{inject, CpuStop, Injection};

impl Vm {
    /// Completes a trap the guest continues from (anything else passes through): the guest's
    /// exit request, effects and injection, the descriptor table, and the frame.
    pub(super) fn leave(
        &mut self,
        frame: &mut TrapFrame,
        mut action: Action,
        clock: &mut PhaseClock,
    ) -> Action {
        let mut selectors = None;
        if let Action::Resume(_) = action {
            if let Some(code) = self.bus.exit_requested() {
                action = Action::Exit(code);
            } else {
                match self
                    .inject_and_apply(clock)
                    .and_then(|()| self.sync_descriptor_table())
                {
                    Ok(real) => selectors = Some(real),
                    Err(why) => action = Action::Stop(why),
                }
            }
        }
        if let (Action::Resume(_), false) = (&action, shadow_mmu::addr::is_canonical(self.cpu.rip))
        {
            // The host's IRETQ would fault at CPL 0 on a non-canonical RIP: whatever put it there
            // (a bug in the emulation), the guest stops, the host does not.
            action = Action::Stop(StopWhy::Cpu(CpuStop::Unsupported(
                "the guest's next RIP is not canonical",
            )));
        }
        if let (Action::Resume(_), Some(selectors)) = (&action, selectors) {
            vcpu_to_frame(&self.cpu, frame, selectors, self.single_step);
            self.cpu.resumed();
            let pending = vmm_core::devices::InterruptSource::has_pending(&self.bus);
            cli_sti_stub::publish(&self.cpu, pending, self.single_step);
        } else {
            cli_sti_stub::disable();
        }
        action
    }

    /// Feeds host serial input and the host clock to the virtual devices.
    pub(super) fn poll_devices(&mut self) {
        poll_devices(&mut self.bus);
    }
    /// On the way back: apply what the trapping instruction changed (a new CR3, a new view)
    /// *before* an interrupt is delivered — the interrupt comes after the instruction retired,
    /// so its frame goes through the new address space — then inject a due virtual interrupt
    /// (idling on HLT until one is) and apply what the delivery changed.
    pub(super) fn inject_and_apply(&mut self, clock: &mut PhaseClock) -> Result<(), StopWhy> {
        if self.fastpath && self.nothing_pending() {
            // Fast path: nothing to inject and nothing to apply. What `inject` would still do
            // is end an interrupt shadow the guest has moved past.
            if self.cpu.interrupt_shadow.is_some()
                && self.cpu.interrupt_shadow != Some(self.cpu.rip)
            {
                self.cpu.interrupt_shadow = None;
            }
            return Ok(());
        }
        if self.cpu.halted || vmm_core::devices::InterruptSource::has_pending(&self.bus) {
            self.apply_effects()?;
        }
        let mut idle_since = None;
        loop {
            match inject(
                &mut self.cpu,
                &mut host::GuestAccess::new(&mut self.mmu, self.view),
                &mut self.bus,
            ) {
                Ok(Injection::Idle) => {
                    let since = *idle_since.get_or_insert(crate::timer::ticks());
                    let idle = crate::timer::ticks() - since;
                    if self.watchdog.idle_too_long(idle) {
                        return Err(StopWhy::IdleTooLong(idle));
                    }
                    // Sleep until the next host interrupt (the PIT at the latest), then look
                    // at the virtual devices again.
                    let before = rdtsc();
                    crate::cpu::wait_for_interrupt();
                    let idle = rdtsc().wrapping_sub(before);
                    clock.skip(idle);
                    self.accounting.record(TrapKind::Other("HLT idle"), idle);
                    self.poll_devices();
                }
                Ok(Injection::WindowNeeded) => {
                    let guest_stepping = self.cpu.rflags & rflags::TF != 0;
                    let mut mem = host::GuestAccess::new(&mut self.mmu, self.view);
                    if !guest_stepping
                        && vmm_core::cpu::emulate::pushf_in_interrupt_shadow(
                            &mut self.cpu,
                            &mut mem,
                        )
                    {
                        // The shadow is over without our TF for PUSHF to see: inject now.
                        continue;
                    }
                    // With the guest's own TF set, its #DB comes after the instruction anyway.
                    self.single_step = !guest_stepping;
                    break;
                }
                Ok(Injection::Delivered(vector)) => {
                    self.injected = Some(vector);
                    break;
                }
                Ok(_) => break,
                Err(stop) => return Err(StopWhy::Cpu(stop)),
            }
        }
        clock.mark(Phase::Injection);
        let applied = self.apply_effects();
        clock.mark(Phase::ShadowMmu);
        applied
    }
    /// Whether the way back has nothing to do but write the frame: the guest is not halted, no
    /// virtual interrupt is pending, the vCPU recorded no effect, the shadow MMU wants no TLB
    /// flush, and the real control bits were set up (the first entry sets them).
    pub(super) fn nothing_pending(&self) -> bool {
        !self.cpu.halted
            && !vmm_core::devices::InterruptSource::has_pending(&self.bus)
            && !self.cpu.has_effects()
            && !self.mmu.tlb_flush_pending()
            && self.real_controls.is_some()
    }

    /// Brings the real GDT in line with the vCPU (vmm-core `shadow_gdt`): only the guest's
    /// virtual CS and SS are loadable, so every other segment load traps, whatever selectors the
    /// guest uses. Returns the real selectors to run it on.
    pub(super) fn sync_descriptor_table(&mut self) -> Result<RealSelectors, StopWhy> {
        // SAFETY: trap context (or before the first entry) with interrupts off: nothing else
        // uses the guest part of the real GDT now.
        let real = unsafe { gdt::guest_entries() };
        // The common case first, before building the guest-memory access `sync` would need
        // (measured: ~30 instructions a trap under icount).
        if let Some(selectors) = self.gdt.unchanged(&self.cpu) {
            if self.data_segments.publish(&self.cpu, real) {
                self.write_segment_bases();
            }
            return Ok(selectors);
        }
        let selectors = self
            .gdt
            .sync(
                &self.cpu,
                &mut host::GuestAccess::new(&mut self.mmu, self.view),
                real,
            )
            .map_err(StopWhy::Cpu)?;
        if self.data_segments.publish(&self.cpu, real) {
            self.write_segment_bases();
        }
        Ok(selectors)
    }
    /// The real FS and GS bases follow the virtual ones.
    pub(super) fn write_segment_bases(&self) {
        // SAFETY: the host never addresses through FS; its base only matters in Ring 3.
        unsafe { x86::msr::wrmsr(x86::msr::IA32_FS_BASE, self.cpu.fs_base()) };
        // SAFETY: likewise for GS.
        unsafe { x86::msr::wrmsr(x86::msr::IA32_GS_BASE, self.cpu.gs_base()) };
    }
    /// Applies the vCPU's effects: CR3 loads, INVLPG, paging-mode changes, view switches,
    /// FS/GS bases, and whether real SYSENTER may enter the VMM.
    pub(super) fn apply_effects(&mut self) -> Result<(), StopWhy> {
        let effects = self.cpu.take_effects();
        if effects.descriptor_table {
            self.gdt.invalidate();
        }
        let mut reload = false;
        let mut view_changed = false;
        if effects.paging_mode {
            self.mmu
                .set_paging_mode(self.cpu.paging_mode(PagingMode::ENTRY.max_phys_bits));
            reload = true;
        }
        if effects.flush_all {
            self.mmu.flush_all();
            reload = true;
        }
        if let Some(cr3) = effects.cr3_load {
            self.mmu.load_cr3(cr3).map_err(StopWhy::Mmu)?;
            reload = true;
        }
        if let Some(gva) = effects.invlpg.and_then(GuestVirtAddr::new) {
            self.mmu.invlpg(gva);
            // SAFETY: INVLPG only drops a translation.
            unsafe { x86::tlb::flush(gva.as_u64() as usize) };
        }
        if effects.privilege {
            // The virtual CPL changed: the other shadow view (ring compression: the guest
            // kernel's pages are only in the kernel view).
            let view = if self.cpu.cpl == 3 {
                View::User
            } else {
                View::Kernel
            };
            if view != self.view {
                self.view = view;
                reload = true;
                view_changed = true;
            }
        }
        if self.mmu.take_tlb_flush() {
            reload = true;
        }
        if reload {
            self.load_shadow_root();
        }
        if effects.segment_bases {
            self.write_segment_bases();
        }
        // The real bits that follow the guest's: only after a CR0/CR4/MSR write, a change of
        // view (CR0.AM depends on the virtual CPL) or before the first entry; with the fast
        // paths off, after every shadow-root reload too (the reference path, as before).
        let reference = !self.fastpath && reload;
        if effects.controls || view_changed || reference || self.real_controls.is_none() {
            self.follow_guest_controls();
        }
        Ok(())
    }
    /// The real registers that follow the guest's where the CPU acts on them natively.
    pub(super) fn follow_guest_controls(&mut self) {
        let want = self.cpu.real_controls();
        let had = self.real_controls;
        if had.is_none_or(|h| (h.cr0, h.cr4) != (want.cr0, want.cr4)) {
            crate::cpu::set_guest_controls(want.cr0, want.cr4);
        }
        if had.is_none_or(|h| h.sysenter != want.sysenter) {
            crate::cpu::set_sysenter_enabled(want.sysenter);
        }
        if had.is_none_or(|h| h.syscall != want.syscall) {
            crate::cpu::set_syscall_enabled(want.syscall);
        }
        self.real_controls = Some(want);
    }
    /// Loads the real CR3 with the shadow root of the current view (flushing the real TLB).
    pub(super) fn load_shadow_root(&self) {
        // SAFETY: every shadow root maps the VMM's slot like the host root (see `run`).
        unsafe { x86::controlregs::cr3_write(self.mmu.current_root(self.view).as_u64()) };
    }
}

/// Serial input into the virtual UART, and the virtual timer's edges: what the host's own
/// interrupts brought, for either backend.
pub(super) fn poll_devices(bus: &mut super::GuestBus) {
    // Also poll the UART: an edge-triggered IRQ 4 is lost for good if input was already
    // pending when the PIC was initialised (the line never drops, so it never rises again).
    crate::serial::handle_rx_irq();
    // Only as fast as the virtual UART can receive (as QEMU paces its own serial input),
    // and a new burst only once the guest has drained the last one: bytes wait in the
    // host's ring until the guest has set up its UART, and every burst raises a fresh edge
    // on the (edge-triggered) IRQ 4 line, even for a driver that reads a bounded number of
    // bytes per interrupt.
    let drained = bus.com1().rx_len() == 0;
    while drained && bus.com1().can_receive() {
        let Some(byte) = crate::serial::take_rx() else {
            break;
        };
        bus.enqueue_rx(byte);
    }
    bus.poll_timer();
}
