//! Paging-structure entries of 4-level paging (SDM vol. 3 §4.5, tables 4-15 to 4-20).
//!
//! One layout serves the guest's tables (read by the walker) and the shadow tables (written by
//! the VMM and walked by the real CPU). Flags have the manual's names; the address fields and the
//! reserved-bit masks, which depend on the level and on MAXPHYADDR, are computed here and nowhere
//! else.

use crate::addr::PAGE_SIZE;

bitflags::bitflags! {
    /// The flag bits of a paging-structure entry (SDM vol. 3 §4.5, tables 4-15 to 4-20).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct PteFlags: u64 {
        /// P: the entry references a page or a table.
        const PRESENT = 1 << 0;
        /// R/W: writes allowed (subject to CR0.WP for supervisor accesses).
        const READ_WRITE = 1 << 1;
        /// U/S: user-mode accesses allowed.
        const USER_SUPERVISOR = 1 << 2;
        /// PWT: page-level write-through.
        const PWT = 1 << 3;
        /// PCD: page-level cache disable.
        const PCD = 1 << 4;
        /// A: accessed; set by the processor when the entry is used for a translation (§4.8).
        const ACCESSED = 1 << 5;
        /// D: dirty; set in the entry that maps a page when the page is written (§4.8).
        const DIRTY = 1 << 6;
        /// PS: page size; the entry maps a 1 GiB (PDPTE) or 2 MiB (PDE) page. In a PTE this bit
        /// is PAT instead, and in a PML4E it is reserved.
        const PS = 1 << 7;
        /// G: global translation (with CR4.PGE), leaf entries only.
        const GLOBAL = 1 << 8;
        /// Bit 9, ignored by the processor: the VMM marks shadow leaves made from a guest
        /// global page with it, so a flush-policy CR3 load can keep them.
        const SHADOW_GUEST_GLOBAL = 1 << 9;
        /// XD: execute-disable (reserved unless EFER.NXE = 1).
        const XD = 1 << 63;
    }
}

/// PAT bit of a PTE (bit 7; the same position as PS in the upper levels).
pub const PTE_PAT: u64 = 1 << 7;
/// PAT bit of a PDE or PDPTE that maps a page (bit 12).
pub const LARGE_PAT: u64 = 1 << 12;
/// Bits 51:12, the widest physical-address field of any entry.
pub const ADDRESS_MASK: u64 = 0x000F_FFFF_FFFF_F000;
/// The largest MAXPHYADDR of 4-level paging (§4.1.4).
pub const MAX_PHYS_BITS: u8 = 52;
/// Entries in one paging structure: a 4 KiB table of 8-byte entries (§4.5).
pub const ENTRIES_PER_TABLE: usize = 512;
/// Size of one paging-structure entry in bytes.
pub const ENTRY_SIZE: u64 = 8;

/// Byte offset of entry `idx` inside its paging structure.
pub const fn entry_offset(idx: usize) -> u64 {
    idx as u64 * ENTRY_SIZE
}

/// The index of the entry at physical address `at` inside its (4 KiB-aligned) paging structure.
pub const fn entry_index(at: u64) -> usize {
    ((at % PAGE_SIZE) / ENTRY_SIZE) as usize
}

// Lab 3 (docs/labs/lab3-shadow-root-switch.md): built with the feature `lab3`, the student's
// PML4 address (labs/lab3_shadow_root_switch.rs) stands in for the one below.
#[cfg(feature = "lab3")]
pub use crate::shadow::lab3::cr3_pml4;

/// The physical address of the PML4 in a CR3 value: bits M-1:12, M = MAXPHYADDR (§4.5,
/// table 4-12; the flag bits PWT/PCD and bits above MAXPHYADDR are dropped).
#[cfg(not(feature = "lab3"))]
pub const fn cr3_pml4(cr3: u64, max_phys_bits: u8) -> u64 {
    cr3 & ADDRESS_MASK & !phys_reserved_mask(max_phys_bits)
}

/// The size of the page a translation ends in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageSize {
    /// 4 KiB, mapped by a PTE.
    Size4K,
    /// 2 MiB, mapped by a PDE with PS = 1.
    Size2M,
    /// 1 GiB, mapped by a PDPTE with PS = 1.
    Size1G,
}

impl PageSize {
    /// The page size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => PAGE_SIZE,
            PageSize::Size2M => 2 * 1024 * 1024,
            PageSize::Size1G => 1024 * 1024 * 1024,
        }
    }

    /// The paging level whose entry maps a page of this size (1 = PT .. 3 = PDPT).
    pub const fn leaf_level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
}

/// Bits 51:`max_phys_bits`: physical-address bits above MAXPHYADDR, reserved in every entry
/// (§4.5, "Reserved bits").
pub const fn phys_reserved_mask(max_phys_bits: u8) -> u64 {
    let bits = if max_phys_bits > MAX_PHYS_BITS {
        MAX_PHYS_BITS
    } else {
        max_phys_bits
    };
    ((1u64 << MAX_PHYS_BITS) - 1) & !((1u64 << bits) - 1)
}

/// A 64-bit paging-structure entry.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct PageTableEntry(pub u64);

impl PageTableEntry {
    /// The flags (bits that are not flags are dropped).
    pub const fn flags(self) -> PteFlags {
        PteFlags::from_bits_truncate(self.0)
    }

    /// True when every flag of `f` is set.
    pub const fn has(self, f: PteFlags) -> bool {
        self.0 & f.bits() == f.bits()
    }

    /// True when P = 1.
    pub const fn is_present(self) -> bool {
        self.has(PteFlags::PRESENT)
    }

    /// The 4 KiB-aligned physical address in bits 51:12 (a table, or a 4 KiB page).
    pub const fn addr(self) -> u64 {
        self.0 & ADDRESS_MASK
    }

    /// The reserved bits of this entry that are set, for an entry at `level` (4 = PML4E,
    /// 3 = PDPTE, 2 = PDE, 1 = PTE) under the given MAXPHYADDR and EFER.NXE (§4.5 tables
    /// 4-14..4-20; a set reserved bit is a #PF with RSVD = 1, §4.7).
    pub const fn reserved_bits(self, level: u8, max_phys_bits: u8, efer_nxe: bool) -> u64 {
        let mut mask = phys_reserved_mask(max_phys_bits);
        if !efer_nxe {
            // XD is reserved when IA32_EFER.NXE = 0 (§4.5, table 4-20 note).
            mask |= PteFlags::XD.bits();
        }
        let ps = self.0 & PteFlags::PS.bits() != 0;
        match level {
            // PML4E: PS must be 0 (no 512 GiB pages).
            4 => mask |= PteFlags::PS.bits(),
            // PDPTE mapping a 1 GiB page: bits 29:13 are reserved.
            3 if ps => mask |= 0x3FFF_E000,
            // PDE mapping a 2 MiB page: bits 20:13 are reserved.
            2 if ps => mask |= 0x001F_E000,
            _ => {}
        }
        self.0 & mask
    }
}

impl core::fmt::Debug for PageTableEntry {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "PageTableEntry({:#x} {:?})", self.0, self.flags())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_masks_follow_the_tables() {
        assert_eq!(phys_reserved_mask(52), 0);
        assert_eq!(phys_reserved_mask(40), 0x000F_FF00_0000_0000);
        let e = PageTableEntry(1 | (1 << 7));
        assert_ne!(e.reserved_bits(4, 52, true), 0, "PS is reserved in a PML4E");
        assert_eq!(e.reserved_bits(1, 52, true), 0, "bit 7 is PAT in a PTE");
        let big = PageTableEntry(1 | (1 << 7) | (1 << 13));
        assert_ne!(big.reserved_bits(3, 52, true), 0);
        assert_ne!(big.reserved_bits(2, 52, true), 0);
        let pd_not_leaf = PageTableEntry(1 | (1 << 13));
        assert_eq!(pd_not_leaf.reserved_bits(2, 52, true), 0);
        let xd = PageTableEntry(1 | (1 << 63));
        assert_ne!(xd.reserved_bits(1, 52, false), 0);
        assert_eq!(xd.reserved_bits(1, 52, true), 0);
    }
}
