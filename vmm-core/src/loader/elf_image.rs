//! The ELF checks of the loader: a guest image is untrusted input, so every field `load_guest`
//! relies on is checked here and every failure is a [`LoadError`] (ELF-64 "System V ABI,
//! AMD64": `ET_EXEC`, `EM_X86_64`, `PT_LOAD` program headers).
//!
//! Article challenge "内存虚拟化" (the guest's physical memory): each segment must lie in guest
//! RAM above 1 MiB (`p_paddr`), at a canonical address outside the VMM's reserved range
//! (`p_vaddr`), and no two may overlap; the entry point must be in an executable segment.

use super::LoadError;
use alloc::vec::Vec;
use boot::MIN_LOAD_PADDR;
use elf::abi::{EM_X86_64, ET_EXEC, PF_W, PF_X, PT_LOAD};
use elf::endian::AnyEndian;
use elf::file::{Class, FileHeader};
use elf::segment::ProgramHeader;
use elf::ElfBytes;

/// One `PT_LOAD` segment, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Offset of its bytes in the file.
    pub file_offset: u64,
    /// Bytes taken from the file.
    pub file_size: u64,
    /// Bytes in memory (the rest is zero).
    pub mem_size: u64,
    /// Guest-physical load address.
    pub paddr: u64,
    /// Linear address it is mapped at.
    pub vaddr: u64,
    /// `PF_W`.
    pub writable: bool,
    /// `PF_X`.
    pub executable: bool,
}

/// A validated guest image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestImage {
    /// The 64-bit entry point (`e_entry`).
    pub entry: u64,
    /// The `PT_LOAD` segments, in file order.
    pub segments: Vec<Segment>,
}

/// Whether `[a_start, a_start + a_len)` and `[b_start, b_start + b_len)` share a byte.
fn overlaps(a_start: u64, a_len: u64, b_start: u64, b_len: u64) -> bool {
    a_start < b_start.saturating_add(b_len) && b_start < a_start.saturating_add(a_len)
}

/// Parses and validates a guest ELF for a guest with `ram_bytes` of RAM.
pub fn parse_guest(image: &[u8], ram_bytes: u64) -> Result<GuestImage, LoadError> {
    let file = ElfBytes::<AnyEndian>::minimal_parse(image).map_err(|e| {
        // The crate reads the header tables too: with PN_XNUM it looks for the real count in
        // section header 0, so a bad one fails here. Name the escape value, the real cause.
        if raw_e_phnum(image) == Some(PN_XNUM) {
            return LoadError::WrongKind(PN_XNUM_UNSUPPORTED);
        }
        match e {
            elf::ParseError::BadMagic(_) => {
                LoadError::NotElf("bad magic (expected 0x7f 'E' 'L' 'F')")
            }
            elf::ParseError::UnsupportedElfClass(_) => LoadError::NotElf("unsupported ELF class"),
            elf::ParseError::UnsupportedElfEndianness(_) => {
                LoadError::NotElf("unsupported byte order")
            }
            elf::ParseError::UnsupportedVersion(_) => LoadError::NotElf("unsupported ELF version"),
            _ if image.len() < ELF64_EHDR_SIZE => {
                LoadError::NotElf("truncated: shorter than an ELF-64 header")
            }
            elf::ParseError::BadEntsize(_) => LoadError::BadHeaderTable(
                "e_phentsize or e_shentsize is not the ELF-64 entry size (56 or 64 bytes)",
            ),
            elf::ParseError::SliceReadError(_)
            | elf::ParseError::TryFromSliceError(_)
            | elf::ParseError::IntegerOverflow
            | elf::ParseError::BadOffset(_) => LoadError::BadHeaderTable(
                "the program header table (e_phoff, e_phnum x e_phentsize) or the section \
                 header table (e_shoff, e_shnum x e_shentsize) reaches past the end of the file",
            ),
            _ => LoadError::BadHeaderTable("malformed program or section header table"),
        }
    })?;
    check_header(&file.ehdr)?;
    let table = file
        .segments()
        .ok_or(LoadError::NotElf("no program header table"))?;
    let mut segments = Vec::new();
    for (index, ph) in table.iter().enumerate() {
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        segments.push(check_segment(&ph, index, image.len() as u64, ram_bytes)?);
    }
    if segments.is_empty() {
        return Err(LoadError::NoLoadSegments);
    }
    for (i, a) in segments.iter().enumerate() {
        for b in &segments[i + 1..] {
            if overlaps(a.paddr, a.mem_size, b.paddr, b.mem_size) {
                return Err(LoadError::SegmentsOverlap);
            }
        }
    }
    let entry = file.ehdr.e_entry;
    if !segments
        .iter()
        .any(|s| s.executable && entry >= s.vaddr && entry - s.vaddr < s.mem_size)
    {
        return Err(LoadError::EntryOutsideCode(entry));
    }
    Ok(GuestImage { entry, segments })
}

/// `e_phnum`'s escape value: more program headers than fit in 16 bits.
const PN_XNUM: u16 = 0xFFFF;

/// Why an image with `e_phnum` = [`PN_XNUM`] is refused.
const PN_XNUM_UNSUPPORTED: &str =
    "e_phnum is PN_XNUM (0xffff): extended program-header numbering is not supported";

/// Size of the ELF-64 file header; `e_phnum` is at offset 56 in it.
const ELF64_EHDR_SIZE: usize = 64;

/// `e_phnum` read straight from the bytes of an ELF-64 little-endian header, for error
/// messages when the header tables cannot be parsed.
fn raw_e_phnum(image: &[u8]) -> Option<u16> {
    let is_elf64_le = image.get(..6) == Some(&[0x7F, b'E', b'L', b'F', 2, 1]);
    let bytes = image.get(56..58)?;
    is_elf64_le.then(|| u16::from_le_bytes([bytes[0], bytes[1]]))
}

/// The ELF header must describe a 64-bit little-endian x86-64 executable.
fn check_header(ehdr: &FileHeader<AnyEndian>) -> Result<(), LoadError> {
    if ehdr.class != Class::ELF64 {
        return Err(LoadError::WrongKind("ELF class is not 64-bit"));
    }
    if !matches!(ehdr.endianness, AnyEndian::Little) {
        return Err(LoadError::WrongKind("not little-endian"));
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(LoadError::WrongKind("e_machine is not x86-64"));
    }
    if ehdr.e_type != ET_EXEC {
        return Err(LoadError::WrongKind("e_type is not ET_EXEC"));
    }
    if ehdr.e_phnum == PN_XNUM {
        // The real count would be in section header 0's sh_info (ELF gABI, "Extended numbering").
        return Err(LoadError::WrongKind(PN_XNUM_UNSUPPORTED));
    }
    Ok(())
}

/// Checks program header `index` (a non-empty `PT_LOAD`) of a file of `file_len` bytes: its
/// bytes inside the file, its `p_paddr` in guest RAM above 1 MiB, its `p_vaddr` canonical and
/// below the VMM's reserved range, and, when linked away from its load address, above the
/// identity-mapped first 4 GiB.
fn check_segment(
    ph: &ProgramHeader,
    index: usize,
    file_len: u64,
    ram_bytes: u64,
) -> Result<Segment, LoadError> {
    let file_end = ph.p_offset.checked_add(ph.p_filesz);
    if ph.p_filesz > ph.p_memsz || file_end.is_none_or(|end| end > file_len) {
        return Err(LoadError::BadSegment { index });
    }
    let outside_ram = LoadError::SegmentOutsideRam {
        index,
        paddr: ph.p_paddr,
        memsz: ph.p_memsz,
    };
    let paddr_end = ph
        .p_paddr
        .checked_add(ph.p_memsz)
        .ok_or(outside_ram.clone())?;
    if ph.p_paddr < MIN_LOAD_PADDR || paddr_end > ram_bytes {
        return Err(outside_ram);
    }
    let vaddr_last = ph.p_vaddr.checked_add(ph.p_memsz - 1);
    let reserved = LoadError::SegmentInReservedRange {
        index,
        vaddr: ph.p_vaddr,
    };
    let canonical = |a: u64| (a >> 47) == 0 || (a >> 47) == 0x1_ffff;
    match vaddr_last {
        Some(last)
            if canonical(ph.p_vaddr)
                && canonical(last)
                && (ph.p_vaddr >> 47) == (last >> 47)
                && last < boot::VMM_RESERVED_VA_START => {}
        _ => return Err(reserved),
    }
    if ph.p_vaddr != ph.p_paddr && ph.p_vaddr < (4u64 << 30) {
        return Err(LoadError::SegmentOverlapsIdentityMap { index });
    }
    Ok(Segment {
        file_offset: ph.p_offset,
        file_size: ph.p_filesz,
        mem_size: ph.p_memsz,
        paddr: ph.p_paddr,
        vaddr: ph.p_vaddr,
        writable: ph.p_flags & PF_W != 0,
        executable: ph.p_flags & PF_X != 0,
    })
}
