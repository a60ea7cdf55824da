//! The guest loader: validates a guest ELF and builds the guest entry state in guest memory.
//!
//! Any guest that keeps the entry contract of `boot` (see `boot/src/lib.rs` and
//! docs/writing-a-guest.md, "The state at `e_entry`") can be run, so the image is untrusted
//! input: every field is checked and every failure is a [`LoadError`] that names the problem,
//! never a panic.
//!
//! What [`load_guest`] writes into guest-physical memory:
//! - every `PT_LOAD` segment at its `p_paddr` (file bytes, then zeros up to `p_memsz`);
//! - the boot area at [`BOOT_AREA_BASE`] (below 1 MiB, where no segment may be):
//!
//! | offset            | contents                                                  |
//! |-------------------|-----------------------------------------------------------|
//! | `0x0000`          | `BootInfo` (56 bytes), then the command line              |
//! | `0x1000`          | the boot GDT (`boot::BOOT_GDT`)                           |
//! | `0x2000..0x6000`  | the 16 KiB boot stack (RSP = `BOOT_AREA_BASE + 0x6000`)   |
//! | `0x6000..`        | the boot page tables: PML4, identity PDPT, page directories, then any tables for segments linked away from their load address |
//!
//! The page tables identity-map guest-physical `[0, min(RAM, 4 GiB))` with 2 MiB supervisor
//! writable pages and map each `PT_LOAD` whose `p_vaddr != p_paddr` at `p_vaddr` with 4 KiB pages
//! (writable if `PF_W`, no-execute unless `PF_X`).
//!
//! | module | what |
//! |---|---|
//! | `elf_image` | the ELF checks: [`parse_guest`] turns untrusted bytes into a [`GuestImage`] |
//! | `boot_area` | [`load_guest`]: the segments copied, the boot page tables, `BootInfo`, boot GDT and stack, the [`EntryState`] |

mod boot_area;
mod elf_image;
#[cfg(test)]
mod tests;

pub use boot_area::{load_guest, EntryState, BOOT_AREA_BASE, BOOT_AREA_LIMIT, MAX_CMDLINE};
pub use elf_image::{parse_guest, GuestImage, Segment};

use core::fmt;

/// Writes into guest-physical memory (the P2M behind it allocates frames on first touch).
pub trait GuestPhysWrite {
    /// Writes `bytes` at guest-physical `gpa`; `false` when any byte lies outside guest RAM.
    fn write_phys(&mut self, gpa: u64, bytes: &[u8]) -> bool;
}

/// Why a guest image cannot be run, in the terms of the ELF file or of guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// Not a parsable ELF file (bad magic, truncated headers, ...).
    NotElf(&'static str),
    /// An ELF file, but not a 64-bit little-endian x86-64 executable.
    WrongKind(&'static str),
    /// An ELF header, but its program or section header table cannot be read (outside the
    /// file, wrong entry size).
    BadHeaderTable(&'static str),
    /// The image has no `PT_LOAD` segment.
    NoLoadSegments,
    /// A segment's file bytes lie outside the file, or `p_filesz > p_memsz`.
    BadSegment {
        /// Index of the program header.
        index: usize,
    },
    /// A segment is placed below 1 MiB or beyond guest RAM.
    SegmentOutsideRam {
        /// Index of the program header.
        index: usize,
        /// Its `p_paddr`.
        paddr: u64,
        /// Its `p_memsz`.
        memsz: u64,
    },
    /// A segment is mapped at a non-canonical address or reaches into the VMM's reserved range.
    SegmentInReservedRange {
        /// Index of the program header.
        index: usize,
        /// Its `p_vaddr`.
        vaddr: u64,
    },
    /// A segment linked away from its load address overlaps the identity map of low memory.
    SegmentOverlapsIdentityMap {
        /// Index of the program header.
        index: usize,
    },
    /// Two segments occupy the same guest-physical memory.
    SegmentsOverlap,
    /// `e_entry` is not inside an executable `PT_LOAD` segment.
    EntryOutsideCode(u64),
    /// The guest command line does not fit in the boot area.
    CommandLineTooLong(usize),
    /// Guest RAM is too small for the image and the boot area.
    RamTooSmall,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotElf(why) => write!(f, "not an ELF file: {why}"),
            Self::WrongKind(why) => write!(f, "not a 64-bit x86-64 ELF executable: {why}"),
            Self::BadHeaderTable(why) => write!(f, "bad ELF header table: {why}"),
            Self::NoLoadSegments => write!(f, "the ELF file has no PT_LOAD segment"),
            Self::BadSegment { index } => {
                write!(f, "program header {index}: file bytes outside the file or p_filesz > p_memsz")
            }
            Self::SegmentOutsideRam { index, paddr, memsz } => write!(
                f,
                "program header {index}: p_paddr {paddr:#x} + p_memsz {memsz:#x} is not inside guest RAM above 1 MiB"
            ),
            Self::SegmentInReservedRange { index, vaddr } => write!(
                f,
                "program header {index}: p_vaddr {vaddr:#x} is non-canonical or inside the VMM's reserved range (from {:#x})",
                boot::VMM_RESERVED_VA_START
            ),
            Self::SegmentOverlapsIdentityMap { index } => write!(
                f,
                "program header {index}: p_vaddr differs from p_paddr but lies in the identity-mapped first 4 GiB"
            ),
            Self::SegmentsOverlap => write!(f, "two PT_LOAD segments overlap in guest-physical memory"),
            Self::EntryOutsideCode(entry) => {
                write!(f, "e_entry {entry:#x} is not inside an executable PT_LOAD segment")
            }
            Self::CommandLineTooLong(len) => {
                write!(f, "guest command line is {len} bytes; at most {MAX_CMDLINE} fit")
            }
            Self::RamTooSmall => write!(f, "guest RAM is too small for the image and its boot area"),
        }
    }
}
