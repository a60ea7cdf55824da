//! shadow-mmu: the memory half of a software VMM (the article's "影子页表" challenge).
//!
//! The guest's page tables map guest-virtual to guest-physical addresses; the real MMU needs
//! guest-virtual to host-physical. This crate holds:
//! - [`mod@walk`]: the guest page walker (SDM vol. 3 ch. 4: 4-level paging, access rights §4.6,
//!   page-fault error codes §4.7, accessed/dirty bits §4.8), which reads and updates the guest's
//!   own tables;
//! - [`p2m`]: the P2M, guest frame -> host frame, allocated and zeroed on first touch;
//! - [`shadow`]: shadow page tables, two views per guest address space (kernel view, user view),
//!   filled on #PF and invalidated on INVLPG / CR3 loads, with a `flush` and a `cached` policy.
//!
//! It never touches hardware: guest-physical memory, host frames and the shadow tables are reached
//! through small traits ([`machine`]), so every rule is unit-tested on the host.
//!
//! The host kernel owns one [`ShadowMmu`] per guest: it loads [`ShadowMmu::current_root`] of the
//! view matching the guest's virtual privilege into the real CR3, hands every #PF to
//! [`ShadowMmu::handle_page_fault`], forwards CR3 loads / INVLPG / paging-mode changes, and gives
//! the emulator [`ShadowMmu::read_linear`] / [`ShadowMmu::write_linear`]. `README.md` has the
//! picture of the two views and the two policies, and the call sequence.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod addr;
mod labs;
pub mod machine;
pub mod p2m;
pub mod pte;
pub mod shadow;
pub mod walk;

#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

pub use addr::{GuestPhysAddr, GuestVirtAddr, HostPhysAddr, PageFaultErrorCode, PAGE_SIZE};
pub use machine::{FrameAllocator, HostMemory};
pub use p2m::{GuestPhysMemory, GuestRam, MemoryError, P2m};
pub use pte::{PageSize, PageTableEntry, PteFlags};
pub use shadow::{
    AuditError, ConfigError, FaultOutcome, MmuConfig, Policy, ShadowMapping, ShadowMmu, Stats,
    StopReason, TranslateError, View, MIN_SHADOW_QUOTA, VMM_PML4_SLOT, VMM_RANGE_START,
};
pub use walk::{
    walk, Access, AccessKind, PageFault, PagingMode, Privilege, Translation, WalkError,
};
