//! The trap fast paths that need the machine (host option `fastpath=on|off`, on by default;
//! docs/benchmarks.md "Fast paths"): what vmm-core's coalescing needs fetched, and the way back
//! without an injection pass when nothing is pending (`exit.rs`, `Vm::nothing_pending`). With
//! `fastpath=off` every trap takes the reference path: one instruction per trap, the full
//! injection and effects pass.

use super::Vm;
use shadow_mmu::shadow::View;
use shadow_mmu::{GuestVirtAddr, HostMemory, HostPhysAddr};

impl Vm {
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
    /// kernel view's shadow maps them, executable, within one page. The shadow is what the real
    /// CPU would translate through (it is filled only from the guest's own tables, with their
    /// rights, and zapped when they change), so a hit here is a fetch the CPU would make; a miss
    /// (not filled yet, execute-disabled, across a page) just means no coalescing this time.
    fn kernel_code_bytes<const N: usize>(&self, rip: u64) -> Option<[u8; N]> {
        let gva = GuestVirtAddr::new(rip)?;
        let offset = gva.page_offset();
        if offset + N as u64 > 0x1000 {
            return None;
        }
        let mapping = self.mmu.shadow_lookup(View::Kernel, gva)?;
        if mapping.execute_disable {
            return None;
        }
        let mut bytes = [0u8; N];
        self.mmu.host_memory().read_bytes(
            HostPhysAddr::new(mapping.frame.as_u64() + offset),
            &mut bytes,
        );
        Some(bytes)
    }
}
