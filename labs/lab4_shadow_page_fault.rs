//! Lab 4: the shadow page fault (docs/labs/lab4-shadow-page-fault.md).
//!
//! The guest kernel runs on *shadow* page tables: the real CR3 points at tables the VMM builds
//! from the guest's own, mapping guest-linear addresses straight to host frames, filled lazily.
//! So every #PF the real CPU raises while the guest runs is one of three things, and the shadow
//! MMU (`shadow-mmu/src/shadow/fill.rs`, `handle_page_fault`) must tell which:
//!
//! - **reflect**: the guest's own tables deny the access. Walking them (`shadow-mmu/src/walk.rs`)
//!   at the guest's *virtual* privilege fails, and the guest gets the #PF it would get on bare
//!   metal, with the error code the CPU would push for it;
//! - **fill**: the guest's tables allow it, the shadow just had no entry yet (or a read-only
//!   one): build the shadow leaf with the rights the guest grants, and resume;
//! - **page-table write**: the guest's tables allow a store, but the page is one of the guest's
//!   own page tables, which the shadow keeps read-only so that it sees every change: the
//!   emulator performs the store instead.
//!
//! You write the three decisions behind that split. Each function below replaces the reference
//! function of the same name when shadow-mmu is built with the feature `lab4`
//! (`./run-qemu.sh --lab 4` builds the VMM with it).

// The skeleton does not use its parameters and imports yet; delete this line when done.
#![allow(unused_variables, unused_imports)]

use crate::addr::PageFaultErrorCode;
use crate::shadow::{LeafRights, View};
use crate::walk::{Access, AccessKind, PagingMode, Privilege};

/// Whether the combined rights of a guest walk allow `access` (SDM Vol. 3 §4.6.1, "Determination
/// of Access Rights"; this CPU has no SMEP, SMAP or protection keys).
///
/// - `writable`: R/W = 1 in every paging-structure entry of the walk;
/// - `user`: U/S = 1 in every entry (a *user-mode address*);
/// - `execute_disable`: XD = 1 in some entry while EFER.NXE = 1 (already combined for you);
/// - `access.privilege`: `Supervisor` for the guest kernel (virtual CPL 0), `User` for its
///   programs (CPL 3); `access.kind`: `Read`, `Write` or `Fetch`;
/// - `mode.cr0_wp`: CR0.WP, which decides whether supervisor writes honour R/W.
pub fn access_allowed(
    access: Access,
    mode: PagingMode,
    writable: bool,
    user: bool,
    execute_disable: bool,
) -> bool {
    // TODO: user accesses first (which addresses, which kinds), then supervisor accesses.
    todo!("lab 4: access_allowed")
}

/// The page-fault error code the guest must see for a faulting `access` (SDM Vol. 3 §4.7,
/// "Page-Fault Exceptions", Figure 4-12): P (`present`: the fault was a protection violation,
/// not a not-present entry), W/R, U/S, RSVD (`rsvd`: a reserved bit was set in an entry), and
/// I/D (an instruction fetch, reported only while EFER.NXE = 1, `mode.efer_nxe`: this CPU has
/// no SMEP). The bits are `PageFaultErrorCode::PRESENT`, `WRITE`, `USER`, `RESERVED_BIT` and
/// `INSTRUCTION_FETCH`; build one with `PageFaultErrorCode::empty()` and `.set(bit, bool)`.
///
/// The real #PF the CPU raised always says U/S = 1: the guest kernel really runs at CPL 3.
/// This code is computed from the guest's *virtual* privilege (`access.privilege`).
pub fn error_code(
    access: Access,
    mode: PagingMode,
    present: bool,
    rsvd: bool,
) -> PageFaultErrorCode {
    // TODO: one bit at a time.
    todo!("lab 4: error_code")
}

/// The shadow leaf for an access the guest's own tables allow (the walk succeeded): in `view`
/// (`View::Kernel` while the guest runs at virtual CPL 0, `View::User` at CPL 3), a `write` or
/// not, through a walk whose entries all have R/W = 1 (`guest_writable`) and whose leaf has
/// D = 1 (`guest_dirty`, after the walk set it for a write), to a guest page that is
/// (`write_protected`) one of the guest's page tables the shadow keeps read-only.
///
/// Return `LeafRights { writable, emulate_write }`:
/// - `writable`: whether the shadow leaf allows writes. The shadow leaf is used by the real CPU
///   at real CPL 3, for the guest kernel too, so it must say *exactly* whether the guest may
///   write there at the view's privilege — including what CR0.WP (`cr0_wp`) means for a
///   supervisor write (§4.6.1). A leaf whose guest D bit is still 0 stays read-only, so that the
///   first write faults and the walk sets D (§4.8). A write-protected page table is never
///   writable in the shadow;
/// - `emulate_write`: the access is a write to a write-protected page table: the emulator must
///   perform it (the outcome `FaultOutcome::EmulatePageTableWrite`).
pub fn leaf_rights(
    view: View,
    write: bool,
    cr0_wp: bool,
    guest_writable: bool,
    guest_dirty: bool,
    write_protected: bool,
) -> LeafRights {
    // TODO: first whether the guest allows the write in this view, then the leaf's R/W.
    todo!("lab 4: leaf_rights")
}
