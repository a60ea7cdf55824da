//! The guest page walker: 4-level paging as the processor does it (SDM vol. 3 §4.5), with the
//! access-rights rules of §4.6, the page-fault error code of §4.7 and the accessed/dirty updates
//! of §4.8, written into the guest's own paging-structure entries.
//!
//! It serves two callers: the shadow fault path (what does the guest allow at this address?) and
//! vmm-core's emulator (translate a linear address for an emulated access). Protection keys, SMEP,
//! SMAP and shadow stacks are not modelled: the guest is told (by CPUID, in vmm-core) they are
//! absent.

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PageFaultErrorCode};
use crate::p2m::{GuestPhysMemory, MemoryError};
use crate::pte::{cr3_pml4, entry_offset, PageSize, PageTableEntry, PteFlags, LARGE_PAT, PTE_PAT};

/// The guest control-register bits that change how a linear address is translated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PagingMode {
    /// CR0.WP: supervisor writes honour R/W (§4.6.1).
    pub cr0_wp: bool,
    /// IA32_EFER.NXE: the XD bit is honoured (and is reserved when clear).
    pub efer_nxe: bool,
    /// CR4.PGE: the G bit makes a translation global (§4.10.2.4).
    pub cr4_pge: bool,
    /// MAXPHYADDR the guest is told (CPUID.80000008H:EAX bits 7:0); bits 51:MAXPHYADDR of every
    /// entry are reserved.
    pub max_phys_bits: u8,
}

impl PagingMode {
    /// The guest entry state of docs/writing-a-guest.md (CR0.WP = 1, EFER.NXE = 1, CR4.PGE = 0)
    /// with MAXPHYADDR 40, QEMU's default for its TCG CPUs.
    pub const ENTRY: PagingMode = PagingMode {
        cr0_wp: true,
        efer_nxe: true,
        cr4_pge: false,
        max_phys_bits: 40,
    };
}

impl Default for PagingMode {
    fn default() -> Self {
        Self::ENTRY
    }
}

/// The kind of access (§4.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AccessKind {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// Whether an access is a supervisor-mode or a user-mode access (§4.6: CPL < 3 or implicit
/// supervisor accesses, versus CPL = 3). For the guest this is its *virtual* privilege.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Privilege {
    /// Supervisor-mode access (guest virtual CPL 0..2, or implicit accesses to GDT/IDT/TSS).
    Supervisor,
    /// User-mode access (guest virtual CPL 3).
    User,
}

/// An access to check: what and at which privilege.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Access {
    /// Read, write or fetch.
    pub kind: AccessKind,
    /// Supervisor or user.
    pub privilege: Privilege,
}

impl Access {
    /// A new access.
    pub const fn new(kind: AccessKind, privilege: Privilege) -> Self {
        Self { kind, privilege }
    }
}

/// A page fault the guest must see: its error code (§4.7) and the value of CR2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFault {
    /// The error code pushed on the guest's stack.
    pub error_code: PageFaultErrorCode,
    /// The faulting linear address (the guest's virtual CR2).
    pub cr2: GuestVirtAddr,
}

/// Why a walk did not produce a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The guest's own paging rules deny the access: reflect this #PF to the guest.
    PageFault(PageFault),
    /// A paging-structure entry lies at a guest-physical address the P2M cannot back.
    Memory(MemoryError),
}

/// A successful translation of a linear address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address of the accessed byte.
    pub gpa: GuestPhysAddr,
    /// The size of the guest page that maps it.
    pub page_size: PageSize,
    /// R/W = 1 in every entry of the walk (§4.6).
    pub writable: bool,
    /// U/S = 1 in every entry of the walk: a user-mode address (§4.6).
    pub user: bool,
    /// XD = 1 in some entry of the walk while EFER.NXE = 1 (§4.6).
    pub execute_disable: bool,
    /// G = 1 in the leaf while CR4.PGE = 1 (§4.10.2.4).
    pub global: bool,
    /// D of the leaf after the walk (set by this walk for a write).
    pub dirty: bool,
    /// PWT of the leaf.
    pub pwt: bool,
    /// PCD of the leaf.
    pub pcd: bool,
    /// PAT of the leaf (bit 7 of a PTE, bit 12 of a large-page entry).
    pub pat: bool,
    /// Guest-physical address of each entry used, PML4E first; `entries[k]` is the entry at level
    /// `4 - k`. Only the first `5 - page_size.leaf_level()` are meaningful.
    pub entries: [GuestPhysAddr; 4],
    /// The values of those entries after the walk (A/D as it set them), in the same order.
    pub values: [u64; 4],
}

impl Translation {
    /// The guest frame number of the 4 KiB frame holding the accessed byte.
    pub fn frame_number(&self) -> u64 {
        self.gpa.frame_number()
    }

    /// The entries the walk used, PML4E first.
    pub fn used_entries(&self) -> &[GuestPhysAddr] {
        let n = 5 - self.page_size.leaf_level() as usize;
        &self.entries[..n.min(4)]
    }
}

// Lab 4 (docs/labs/lab4-shadow-page-fault.md): built with the feature `lab4`, the student's
// error code and access check (labs/lab4_shadow_page_fault.rs) stand in for the two below.
#[cfg(feature = "lab4")]
pub use crate::labs::lab4::{access_allowed, error_code};

/// The page-fault error code for `access` (§4.7): W/R, U/S and I/D (I/D only when EFER.NXE = 1,
/// as SMEP is not modelled), plus the caller's P and RSVD.
#[cfg(not(feature = "lab4"))]
pub fn error_code(
    access: Access,
    mode: PagingMode,
    present: bool,
    rsvd: bool,
) -> PageFaultErrorCode {
    let mut code = PageFaultErrorCode::empty();
    code.set(PageFaultErrorCode::PRESENT, present);
    code.set(PageFaultErrorCode::WRITE, access.kind == AccessKind::Write);
    code.set(
        PageFaultErrorCode::USER,
        access.privilege == Privilege::User,
    );
    code.set(PageFaultErrorCode::RESERVED_BIT, rsvd);
    code.set(
        PageFaultErrorCode::INSTRUCTION_FETCH,
        access.kind == AccessKind::Fetch && mode.efer_nxe,
    );
    code
}

/// Whether the combined rights of a walk allow `access` (§4.6.1, without SMEP/SMAP/PKEYS).
#[cfg(not(feature = "lab4"))]
pub fn access_allowed(
    access: Access,
    mode: PagingMode,
    writable: bool,
    user: bool,
    execute_disable: bool,
) -> bool {
    match access.privilege {
        // User-mode accesses are allowed only to user-mode addresses; writes need R/W = 1 at
        // every level whatever CR0.WP says.
        Privilege::User => {
            user && match access.kind {
                AccessKind::Read => true,
                AccessKind::Write => writable,
                AccessKind::Fetch => !execute_disable,
            }
        }
        // Supervisor-mode accesses may read any address; writes honour R/W only with CR0.WP = 1;
        // fetches honour XD (no SMEP: fetching from user-mode addresses is allowed).
        Privilege::Supervisor => match access.kind {
            AccessKind::Read => true,
            AccessKind::Write => writable || !mode.cr0_wp,
            AccessKind::Fetch => !execute_disable,
        },
    }
}

/// Walks the guest's 4-level tables rooted at `cr3` for `access` at `gva`.
///
/// On success the accessed flag is set in every entry used and, for a write, the dirty flag in
/// the leaf (§4.8), written back into guest memory. On a fault nothing is written: §4.8 sets A in
/// entries "used during linear-address translation", and a walk that faults yields no
/// translation (KVM's software walker makes the same choice). Keeping faults side-effect free
/// also makes the walker usable for probing.
pub fn walk<G: GuestPhysMemory + ?Sized>(
    mem: &mut G,
    cr3: u64,
    gva: GuestVirtAddr,
    access: Access,
    mode: PagingMode,
) -> Result<Translation, WalkError> {
    let fault = |present: bool, rsvd: bool| {
        WalkError::PageFault(PageFault {
            error_code: error_code(access, mode, present, rsvd),
            cr2: gva,
        })
    };
    let mut entries = [GuestPhysAddr::default(); 4];
    let mut values = [0u64; 4];
    let mut table = cr3_pml4(cr3, mode.max_phys_bits);
    let mut writable = true;
    let mut user = true;
    let mut execute_disable = false;
    let mut used = 0usize;
    let mut size = PageSize::Size4K;
    for level in (1..=4u8).rev() {
        let at = GuestPhysAddr::new(table + entry_offset(gva.table_index(level)));
        let e = PageTableEntry(mem.read_u64(at).map_err(WalkError::Memory)?);
        entries[used] = at;
        values[used] = e.0;
        used += 1;
        if !e.is_present() {
            return Err(fault(false, false));
        }
        if e.reserved_bits(level, mode.max_phys_bits, mode.efer_nxe) != 0 {
            return Err(fault(true, true));
        }
        writable &= e.has(PteFlags::READ_WRITE);
        user &= e.has(PteFlags::USER_SUPERVISOR);
        execute_disable |= mode.efer_nxe && e.has(PteFlags::XD);
        if level == 1 {
            break;
        }
        if e.has(PteFlags::PS) {
            size = if level == 3 {
                PageSize::Size1G
            } else {
                PageSize::Size2M
            };
            break;
        }
        table = e.addr();
    }
    if !access_allowed(access, mode, writable, user, execute_disable) {
        return Err(fault(true, false));
    }
    // §4.8: A in every entry used, D in the leaf for a write.
    let write = access.kind == AccessKind::Write;
    set_accessed_dirty(mem, &entries[..used], &mut values[..used], write)?;
    let leaf_entry = PageTableEntry(values[used - 1]);
    let offset_mask = size.bytes() - 1;
    let base = leaf_entry.addr() & !offset_mask;
    let pat = match size {
        PageSize::Size4K => leaf_entry.0 & PTE_PAT != 0,
        _ => leaf_entry.0 & LARGE_PAT != 0,
    };
    Ok(Translation {
        gpa: GuestPhysAddr::new(base | (gva.as_u64() & offset_mask)),
        page_size: size,
        writable,
        user,
        execute_disable,
        global: mode.cr4_pge && leaf_entry.has(PteFlags::GLOBAL),
        dirty: leaf_entry.has(PteFlags::DIRTY),
        pwt: leaf_entry.has(PteFlags::PWT),
        pcd: leaf_entry.has(PteFlags::PCD),
        pat,
        entries,
        values,
    })
}

/// §4.8 for a walk that succeeded through the paging-structure entries at `entries` (PML4E
/// first, the leaf last) holding `values`: sets A in every one and, for a `write`, D in the
/// leaf, writing back (and updating in `values`) only the entries that change.
fn set_accessed_dirty<G: GuestPhysMemory + ?Sized>(
    mem: &mut G,
    entries: &[GuestPhysAddr],
    values: &mut [u64],
    write: bool,
) -> Result<(), WalkError> {
    let leaf = values.len() - 1;
    for (i, (at, value)) in entries.iter().zip(values.iter_mut()).enumerate() {
        let mut v = *value | PteFlags::ACCESSED.bits();
        if i == leaf && write {
            v |= PteFlags::DIRTY.bits();
        }
        if v != *value {
            mem.write_u64(*at, v).map_err(WalkError::Memory)?;
            *value = v;
        }
    }
    Ok(())
}
