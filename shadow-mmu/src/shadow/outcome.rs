//! What the shadow MMU answers: the outcome of a #PF ([`FaultOutcome`]), why an emulator
//! access has no address ([`TranslateError`]), why the guest must stop ([`StopReason`]), and why
//! an MMU could not be made ([`ConfigError`]).
//!
//! The article's "页表虚拟化" challenge in one enum: every #PF taken while the guest runs is
//! either the shadow's (fill it and resume), the guest's own (reflect it, with the error code of
//! SDM vol. 3 §4.7), a store to a guest page table the VMM must see (emulate it), or a reason to
//! stop.

use crate::addr::{GuestPhysAddr, GuestVirtAddr};
use crate::walk::PageFault;

#[cfg(doc)] // only the doc links use them
use super::{ShadowMmu, MIN_SHADOW_QUOTA, VMM_PML4_SLOT};

/// Why the guest cannot continue; the kernel reports it and stops the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The guest touched the VMM's linear range ([`VMM_PML4_SLOT`]) through a mapping of its own
    /// there, which it is told never to make (without one, it just gets its #PF).
    VmmRange {
        /// The address it touched.
        gva: GuestVirtAddr,
    },
    /// A guest mapping or paging structure points at a guest-physical address outside its RAM
    /// (no MMIO is emulated through memory yet).
    GpaOutsideRam {
        /// The guest-physical address.
        gpa: GuestPhysAddr,
        /// The linear address whose translation led there, if any.
        gva: Option<GuestVirtAddr>,
    },
    /// Not even one fill fits in the shadow quota after every reclaim (quota misconfigured).
    ShadowMemoryExhausted,
    /// The host has no free frame left, even after giving back every reclaimable shadow page.
    HostMemoryExhausted,
}

impl core::fmt::Display for StopReason {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StopReason::VmmRange { gva } => {
                write!(f, "touched the VMM's reserved range at {:#x}", gva.as_u64())
            }
            StopReason::GpaOutsideRam { gpa, gva } => write!(
                f,
                "guest-physical address {:#x} is outside guest RAM (linear {:#x})",
                gpa.as_u64(),
                gva.map_or(0, |g| g.as_u64())
            ),
            StopReason::ShadowMemoryExhausted => {
                write!(
                    f,
                    "shadow page-table quota exhausted (no fill fits after reclaim)"
                )
            }
            StopReason::HostMemoryExhausted => write!(f, "the host has no free frame left"),
        }
    }
}

/// What the kernel does after a #PF taken while the guest ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOutcome {
    /// The shadow now maps the access: resume the guest at the faulting instruction.
    Filled,
    /// The guest's own tables deny the access: deliver #PF to the guest with this error code and
    /// set its virtual CR2.
    Reflect(PageFault),
    /// Cached policy: a write to a write-protected guest page-table page. Emulate the instruction
    /// (vmm-core), write through [`ShadowMmu::write_guest_phys`] (which zaps the dependent shadow
    /// entries) or call [`ShadowMmu::notify_guest_pte_write`] after writing, then skip it.
    EmulatePageTableWrite {
        /// The guest-physical address the faulting access targets.
        gpa: GuestPhysAddr,
    },
    /// The guest cannot continue.
    Stop(StopReason),
}

/// Why [`ShadowMmu::translate`] produced no address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TranslateError {
    /// The guest's tables deny the access: the emulated instruction raises this #PF.
    PageFault(PageFault),
    /// The guest cannot continue.
    Stop(StopReason),
    /// The access runs past the end of the canonical range (a #GP in the guest, not a #PF):
    /// the first non-canonical address.
    NonCanonical(u64),
}

/// Why a [`ShadowMmu`] could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The shadow quota is below [`MIN_SHADOW_QUOTA`].
    QuotaTooSmall,
    /// The host could not provide the first two shadow roots.
    HostMemoryExhausted,
}
