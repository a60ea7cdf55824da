//! Lab 3: MOV CR3 and the shadow root switch (docs/labs/lab3-shadow-root-switch.md).
//!
//! The article's worked example: the guest kernel switches address spaces with `mov cr3, rax`.
//! That traps (#GP: the guest really runs at CPL 3); vmm-core emulates it
//! (`vmm-core/src/cpu/emulate/system.rs`, `write_cr3`: the checks, then the *virtual* CR3 and an
//! effect `cr3_load`), and the host hands the new value to the shadow MMU
//! (`ShadowMmu::load_cr3`, `shadow-mmu/src/shadow/mod.rs`), which switches the *real* CR3 to
//! shadow tables of its own. You write the three pieces of that switch. Each function below
//! replaces the reference function of the same name when shadow-mmu is built with the feature
//! `lab3` (`./run-qemu.sh --lab 3` builds the VMM with it).
//!
//! What the shadow MMU keeps (`shadow-mmu/src/shadow/mod.rs`, `roots.rs`), and what you use:
//! - an address space is named by its *key*, the guest-physical address of its PML4
//!   ([`cr3_pml4`] of the guest's CR3);
//! - `mmu.roots`: a map from key to `RootPair { kernel, user, .. }`, the two shadow roots of
//!   that address space (ring compression: the guest kernel's pages are only in the kernel
//!   view's tables, so a guest user program cannot reach them);
//! - `mmu.current_key`: the key of the address space the guest runs in;
//! - `mmu.touch(key)`: marks `key`'s pair as just used (the pairs are reclaimed least recently
//!   used first when shadow memory runs short);
//! - `mmu.create_pair(key, live)`: creates `key`'s pair, empty, reclaiming other pairs if needed
//!   but never `key`'s nor `live`'s; it returns `Err(StopReason)` when nothing can be reclaimed;
//! - `mmu.shadow_changed()`: tells the shadow MMU that what the current roots map changed, so
//!   its cache of translations (a software TLB) is stale.

// The skeleton does not use its parameters and imports yet; delete this line when done.
#![allow(unused_variables, unused_imports)]

use super::{ShadowMmu, StopReason, View};
use crate::addr::HostPhysAddr;
use crate::machine::{FrameAllocator, HostMemory};

/// The guest-physical address of the PML4 named by the CR3 value `cr3`, on a CPU whose
/// physical addresses have `max_phys_bits` bits (MAXPHYADDR): SDM Vol. 3 §4.5, Table 4-12 (4-level
/// paging, CR4.PCIDE = 0). Bits 3 and 4 are the flags PWT and PCD, bits 11:0 are not part of the
/// address, and neither are the bits from MAXPHYADDR up (`max_phys_bits` may be anything up to
/// 52; vmm-core refuses a CR3 with such bits before it gets here, the walker relies on this
/// function ignoring them).
pub fn cr3_pml4(cr3: u64, max_phys_bits: u8) -> u64 {
    // TODO: keep bits max_phys_bits-1 .. 12.
    todo!("lab 3: cr3_pml4")
}

/// The shadow root the host loads into the real CR3 while the guest runs in `view`
/// (`View::Kernel` at virtual CPL 0, `View::User` at CPL 3): the root of that view in the pair
/// of the current address space. When there is no pair for it (only after a failed switch,
/// which stopped the guest), `HostPhysAddr::new(0)`.
pub fn current_root<M: HostMemory, A: FrameAllocator>(
    mmu: &ShadowMmu<M, A>,
    view: View,
) -> HostPhysAddr {
    // TODO: look up the current pair, pick the view's root.
    todo!("lab 3: current_root")
}

/// The cached policy's root switch to the address space whose PML4 is at `key` (the default
/// policy; `load_cr3` has already brought the guest's tables up to date and calls this for
/// `Policy::Cached`; the flush policy's switch, next to it in `load_cr3`, is the reference).
///
/// - `key`'s pair becomes the current one;
/// - if it exists, its shadows are kept from the address space's last run (that is the point
///   of this policy: switching back to a process costs no rebuild) and it counts as just used;
///   otherwise it is created, empty, and filled by the page faults to come;
/// - creating it must never reclaim the pair that was current until now: it may still be in the
///   real CR3, and the CPU may be walking it (SDM Vol. 3 §4.10.4);
/// - what the current roots map has changed: say so.
pub fn switch_cached<M: HostMemory, A: FrameAllocator>(
    mmu: &mut ShadowMmu<M, A>,
    key: u64,
) -> Result<(), StopReason> {
    // TODO: remember the live key, switch, then reuse or create.
    todo!("lab 3: switch_cached")
}
