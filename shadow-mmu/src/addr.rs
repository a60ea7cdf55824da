//! Address newtypes for the three address spaces a VMM juggles, and the page-fault error code.
//!
//! Keeping guest-virtual, guest-physical and host-physical addresses in different types makes the
//! compiler catch the classic shadow-paging bug: using a guest-physical address where a host one
//! is needed. Arithmetic is checked (`checked_add -> Option`); nothing here panics on guest data.
//!
//! The architecture behind it: canonical addresses (SDM vol. 1 §3.3.7.1), the split of a linear
//! address into table indices and page offset (vol. 3 §4.5), the #PF error code (vol. 3 §4.7).

use core::fmt;
use core::ops::Range;

/// Size of a 4 KiB page.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`]: the page offset is bits 11:0 of a linear address.
const PAGE_SHIFT: u64 = 12;
/// Bits of linear address each paging level translates (§4.5: 512 entries per table).
const TABLE_INDEX_BITS: u64 = 9;

/// The end of the canonical lower half of 48-bit linear addresses (exclusive).
pub const LOWER_HALF_END: u64 = 0x0000_8000_0000_0000;
/// The start of the canonical upper half of 48-bit linear addresses.
pub const UPPER_HALF_START: u64 = 0xFFFF_8000_0000_0000;

/// Returns true when `addr` is canonical for 48-bit linear addresses: bits 63..47 all equal
/// (SDM vol. 1 §3.3.7.1).
pub const fn is_canonical(addr: u64) -> bool {
    let top = addr >> 47;
    top == 0 || top == 0x1_ffff
}

/// Index into the page table at `level` (4 = PML4, 3 = PDPT, 2 = PD, 1 = PT) that translates the
/// linear address `addr`, 0..512 (SDM vol. 3 §4.5, figure 4-8).
pub const fn table_index(addr: u64, level: u8) -> usize {
    let shift = PAGE_SHIFT + TABLE_INDEX_BITS * (level as u64 - 1);
    ((addr >> shift) & ((1 << TABLE_INDEX_BITS) - 1)) as usize
}

/// Splits the `len` bytes from address `start` into pieces that each stay inside one 4 KiB page:
/// (first address of the piece, where the piece is in the `len` bytes), in order. Addresses wrap
/// around at 2^64: callers that care check the range first.
pub(crate) fn page_pieces(start: u64, len: usize) -> impl Iterator<Item = (u64, Range<usize>)> {
    let mut done = 0usize;
    core::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = start.wrapping_add(done as u64);
        let n = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - done);
        let range = done..done + n;
        done += n;
        Some((at, range))
    })
}

/// A guest-virtual (linear) address, as the guest's code and page tables see it.
///
/// Always canonical: the constructor rejects anything else, because a non-canonical access is a
/// #GP (or #SS) in the guest, never a page walk.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestVirtAddr(u64);

impl GuestVirtAddr {
    /// Returns the address when it is canonical, `None` otherwise.
    pub const fn new(addr: u64) -> Option<Self> {
        if is_canonical(addr) {
            Some(Self(addr))
        } else {
            None
        }
    }

    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Adds `offset`, returning `None` on overflow or when the result is not canonical.
    pub const fn checked_add(self, offset: u64) -> Option<Self> {
        match self.0.checked_add(offset) {
            Some(v) => Self::new(v),
            None => None,
        }
    }

    /// The address of the 4 KiB page that contains this address.
    pub const fn page_base(self) -> Self {
        Self(self.0 & !(PAGE_SIZE - 1))
    }

    /// Offset of the address inside its 4 KiB page.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }

    /// Index into the page table at `level` (4 = PML4, 3 = PDPT, 2 = PD, 1 = PT), 0..512.
    pub const fn table_index(self, level: u8) -> usize {
        table_index(self.0, level)
    }
}

/// A guest-physical address: what the guest believes is a physical address.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestPhysAddr(u64);

impl GuestPhysAddr {
    /// Wraps a raw guest-physical address.
    pub const fn new(addr: u64) -> Self {
        Self(addr)
    }

    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Adds `offset`, returning `None` on overflow.
    pub const fn checked_add(self, offset: u64) -> Option<Self> {
        match self.0.checked_add(offset) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }

    /// The guest frame number (address / 4 KiB).
    pub const fn frame_number(self) -> u64 {
        self.0 / PAGE_SIZE
    }

    /// Offset of the address inside its 4 KiB frame.
    pub const fn page_offset(self) -> u64 {
        self.0 & (PAGE_SIZE - 1)
    }
}

/// A host-physical address: a real frame the VMM owns.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostPhysAddr(u64);

impl HostPhysAddr {
    /// Wraps a raw host-physical address.
    pub const fn new(addr: u64) -> Self {
        Self(addr)
    }

    /// The raw value.
    pub const fn as_u64(self) -> u64 {
        self.0
    }

    /// Adds `offset`, returning `None` on overflow.
    pub const fn checked_add(self, offset: u64) -> Option<Self> {
        match self.0.checked_add(offset) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }
}

macro_rules! impl_hex_debug {
    ($($t:ident),*) => {$(
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($t), "({:#x})"), self.0)
            }
        }
        impl fmt::LowerHex for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::LowerHex::fmt(&self.0, f)
            }
        }
    )*};
}
impl_hex_debug!(GuestVirtAddr, GuestPhysAddr, HostPhysAddr);

bitflags::bitflags! {
    /// The page-fault error code pushed with #PF (SDM vol. 3 §4.7).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
    pub struct PageFaultErrorCode: u32 {
        /// P: 0 = the page was not present, 1 = a protection violation.
        const PRESENT = 1 << 0;
        /// W/R: the access was a write.
        const WRITE = 1 << 1;
        /// U/S: the access was a user-mode access (CPL 3).
        const USER = 1 << 2;
        /// RSVD: a reserved bit was set in some paging-structure entry.
        const RESERVED_BIT = 1 << 3;
        /// I/D: the access was an instruction fetch (only reported with NX or SMEP enabled).
        const INSTRUCTION_FETCH = 1 << 4;
        /// PK: protection-key violation.
        const PROTECTION_KEY = 1 << 5;
        /// SS: shadow-stack access.
        const SHADOW_STACK = 1 << 6;
    }
}

/// The error code in words, as `--trace` shows it: `not-present read user fetch`. P, W/R and
/// U/S are always named (their 0 means something too); the other bits only when set.
impl fmt::Display for PageFaultErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pick = |flag, set, clear| if self.contains(flag) { set } else { clear };
        write!(
            f,
            "{} {} {}",
            pick(Self::PRESENT, "protection", "not-present"),
            pick(Self::WRITE, "write", "read"),
            pick(Self::USER, "user", "supervisor"),
        )?;
        for (flag, name) in [
            (Self::RESERVED_BIT, "reserved-bit"),
            (Self::INSTRUCTION_FETCH, "fetch"),
            (Self::PROTECTION_KEY, "protection-key"),
            (Self::SHADOW_STACK, "shadow-stack"),
        ] {
            if self.contains(flag) {
                write!(f, " {name}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    #[test]
    fn error_codes_in_words() {
        let code = |bits| PageFaultErrorCode::from_bits_truncate(bits).to_string();
        assert_eq!(code(0x14), "not-present read user fetch");
        assert_eq!(code(0x7), "protection write user");
        assert_eq!(code(0x0), "not-present read supervisor");
        assert_eq!(
            code(0x69),
            "protection read supervisor reserved-bit protection-key shadow-stack"
        );
    }

    #[test]
    fn canonical_boundaries() {
        assert!(GuestVirtAddr::new(0x0000_7fff_ffff_ffff).is_some());
        assert!(GuestVirtAddr::new(0x0000_8000_0000_0000).is_none());
        assert!(GuestVirtAddr::new(0xffff_7fff_ffff_ffff).is_none());
        assert!(GuestVirtAddr::new(0xffff_8000_0000_0000).is_some());
    }

    #[test]
    fn checked_add_rejects_crossing_the_hole() {
        let a = GuestVirtAddr::new(0x0000_7fff_ffff_f000).unwrap();
        assert!(a.checked_add(0xfff).is_some());
        assert!(a.checked_add(0x1000).is_none());
        assert!(GuestPhysAddr::new(u64::MAX).checked_add(1).is_none());
    }

    #[test]
    fn table_indices() {
        let a = GuestVirtAddr::new(0xffff_ff80_0020_3000).unwrap();
        assert_eq!(a.table_index(4), 511);
        assert_eq!(a.table_index(3), 0);
        assert_eq!(a.table_index(2), 1);
        assert_eq!(a.table_index(1), 3);
    }
}
