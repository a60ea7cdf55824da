//! The guest loader: validates a guest ELF and builds the guest entry state in guest memory.
//!
//! Any guest that keeps the entry contract of `boot` (see `boot/src/lib.rs` and
//! docs/guest-contract.md, "The state at `e_entry`") can be run, so the image is untrusted
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

use alloc::vec::Vec;
use boot::{BootInfo, BOOT_GDT, BOOT_INFO_MAGIC, BOOT_STACK_SIZE, MIN_LOAD_PADDR};
use core::fmt;
use elf::abi::{EM_X86_64, ET_EXEC, PF_W, PF_X, PT_LOAD};
use elf::endian::AnyEndian;
use elf::file::Class;
use elf::ElfBytes;
use shadow_mmu::pte::{PteFlags, ADDRESS_MASK};

/// Guest-physical address of the boot area the loader builds.
pub const BOOT_AREA_BASE: u64 = 0x1_0000;
/// Where the boot area must end: the top of conventional memory (the EBDA and ROMs follow).
pub const BOOT_AREA_LIMIT: u64 = 0x9_F000;
/// Offset of the GDT in the boot area.
const GDT_OFFSET: u64 = 0x1000;
/// Offset of the top of the boot stack in the boot area.
const STACK_TOP_OFFSET: u64 = 0x2000 + BOOT_STACK_SIZE;
/// Offset of the first page table in the boot area.
const TABLES_OFFSET: u64 = STACK_TOP_OFFSET;
/// Offset of the command line (right after the `BootInfo`, 8-byte aligned).
const CMDLINE_OFFSET: u64 = 64;
/// The longest guest command line that fits in the boot area's first page.
pub const MAX_CMDLINE: usize = (GDT_OFFSET - CMDLINE_OFFSET) as usize;

const PAGE: u64 = 4096;
const HUGE_PAGE: u64 = 2 * 1024 * 1024;
const PTE_PRESENT: u64 = PteFlags::PRESENT.bits();
const PTE_WRITABLE: u64 = PteFlags::READ_WRITE.bits();
const PTE_HUGE: u64 = PteFlags::PS.bits();
const PTE_NO_EXECUTE: u64 = PteFlags::XD.bits();

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

/// The register state the loader prepared, per the entry contract. The control registers, EFER,
/// RFLAGS and selectors are the fixed `boot::ENTRY_*` / `BOOT_*_SELECTOR` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EntryState {
    /// RIP = `e_entry`.
    pub rip: u64,
    /// RSP = top of the boot stack.
    pub rsp: u64,
    /// RDI = guest-physical (identity-mapped) address of the `BootInfo`.
    pub rdi: u64,
    /// CR3 = the boot PML4.
    pub cr3: u64,
    /// GDTR base (identity-mapped) of the boot GDT.
    pub gdtr_base: u64,
    /// GDTR limit.
    pub gdtr_limit: u16,
    /// The `BootInfo` written for the guest.
    pub boot_info: BootInfo,
}

fn overlaps(a_start: u64, a_len: u64, b_start: u64, b_len: u64) -> bool {
    a_start < b_start.saturating_add(b_len) && b_start < a_start.saturating_add(a_len)
}

/// Parses and validates a guest ELF for a guest with `ram_bytes` of RAM.
pub fn parse_guest(image: &[u8], ram_bytes: u64) -> Result<GuestImage, LoadError> {
    let file = ElfBytes::<AnyEndian>::minimal_parse(image).map_err(|e| {
        LoadError::NotElf(match e {
            elf::ParseError::BadMagic(_) => "bad magic (expected 0x7f 'E' 'L' 'F')",
            elf::ParseError::UnsupportedElfClass(_) => "unsupported ELF class",
            elf::ParseError::UnsupportedElfEndianness(_) => "unsupported byte order",
            elf::ParseError::UnsupportedVersion(_) => "unsupported ELF version",
            elf::ParseError::SliceReadError(_) | elf::ParseError::TryFromSliceError(_) => {
                "truncated headers"
            }
            _ => "malformed headers",
        })
    })?;
    let ehdr = &file.ehdr;
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
    let table = file
        .segments()
        .ok_or(LoadError::NotElf("no program header table"))?;
    let mut segments = Vec::new();
    for (index, ph) in table.iter().enumerate() {
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        let file_end = ph.p_offset.checked_add(ph.p_filesz);
        if ph.p_filesz > ph.p_memsz || file_end.is_none_or(|end| end > image.len() as u64) {
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
        segments.push(Segment {
            file_offset: ph.p_offset,
            file_size: ph.p_filesz,
            mem_size: ph.p_memsz,
            paddr: ph.p_paddr,
            vaddr: ph.p_vaddr,
            writable: ph.p_flags & PF_W != 0,
            executable: ph.p_flags & PF_X != 0,
        });
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
    let entry = ehdr.e_entry;
    if !segments
        .iter()
        .any(|s| s.executable && entry >= s.vaddr && entry - s.vaddr < s.mem_size)
    {
        return Err(LoadError::EntryOutsideCode(entry));
    }
    Ok(GuestImage { entry, segments })
}

/// The boot page tables, built in host memory and then copied into the boot area.
struct BootTables {
    tables: Vec<[u64; 512]>,
    base: u64,
}

impl BootTables {
    fn new(base: u64) -> Self {
        let mut t = Self {
            tables: Vec::new(),
            base,
        };
        t.tables.push([0; 512]); // the PML4
        t
    }

    fn gpa(&self, index: usize) -> u64 {
        self.base + index as u64 * PAGE
    }

    /// The table the entry `index` of table `table` points to, created if absent.
    fn next_table(&mut self, table: usize, index: usize) -> usize {
        let entry = self.tables[table][index];
        if entry & PTE_PRESENT != 0 {
            return ((entry & ADDRESS_MASK) - self.base) as usize / PAGE as usize;
        }
        self.tables.push([0; 512]);
        let new = self.tables.len() - 1;
        self.tables[table][index] = self.gpa(new) | PTE_PRESENT | PTE_WRITABLE;
        new
    }

    fn map(&mut self, va: u64, pa: u64, leaf_level: u32, flags: u64) {
        let mut table = 0;
        for level in (leaf_level + 1..=4).rev() {
            let index = ((va >> (12 + 9 * (level - 1))) & 0x1ff) as usize;
            table = self.next_table(table, index);
        }
        let index = ((va >> (12 + 9 * (leaf_level - 1))) & 0x1ff) as usize;
        self.tables[table][index] = pa | flags | PTE_PRESENT;
    }
}

/// Loads a validated image and builds the boot area: after this, a vCPU set to the returned
/// [`EntryState`] (plus the fixed `boot::ENTRY_*` values) is exactly at the guest entry.
pub fn load_guest(
    mem: &mut impl GuestPhysWrite,
    image_bytes: &[u8],
    image: &GuestImage,
    ram_bytes: u64,
    cmdline: &str,
) -> Result<EntryState, LoadError> {
    if cmdline.len() > MAX_CMDLINE {
        return Err(LoadError::CommandLineTooLong(cmdline.len()));
    }
    if ram_bytes < MIN_LOAD_PADDR {
        return Err(LoadError::RamTooSmall);
    }
    for s in &image.segments {
        let bad = LoadError::BadSegment { index: 0 };
        let start = usize::try_from(s.file_offset).map_err(|_| bad.clone())?;
        let end = usize::try_from(s.file_size)
            .ok()
            .and_then(|n| start.checked_add(n));
        let bytes = end.and_then(|end| image_bytes.get(start..end)).ok_or(bad)?;
        if !mem.write_phys(s.paddr, bytes) {
            return Err(LoadError::RamTooSmall);
        }
        let zeros = [0u8; 4096];
        let mut at = s.paddr + s.file_size;
        let end = s.paddr + s.mem_size;
        while at < end {
            let n = (end - at).min(zeros.len() as u64) as usize;
            if !mem.write_phys(at, &zeros[..n]) {
                return Err(LoadError::RamTooSmall);
            }
            at += n as u64;
        }
    }

    let mut tables = BootTables::new(BOOT_AREA_BASE + TABLES_OFFSET);
    let identity_end = ram_bytes.min(4 << 30).next_multiple_of(HUGE_PAGE);
    let mut pa = 0;
    while pa < identity_end {
        tables.map(pa, pa, 2, PTE_WRITABLE | PTE_HUGE);
        pa += HUGE_PAGE;
    }
    for s in image.segments.iter().filter(|s| s.vaddr != s.paddr) {
        let flags = if s.writable { PTE_WRITABLE } else { 0 }
            | if s.executable { 0 } else { PTE_NO_EXECUTE };
        let first = s.vaddr & !(PAGE - 1);
        let mut va = first;
        while va < s.vaddr + s.mem_size {
            tables.map(va, (s.paddr & !(PAGE - 1)) + (va - first), 1, flags);
            va += PAGE;
        }
    }
    let area_end = tables.gpa(tables.tables.len());
    if area_end > BOOT_AREA_LIMIT {
        return Err(LoadError::RamTooSmall);
    }

    let boot_info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        ram_bytes,
        cmdline_addr: BOOT_AREA_BASE + CMDLINE_OFFSET,
        cmdline_len: cmdline.len() as u64,
        boot_area_start: BOOT_AREA_BASE,
        boot_area_end: area_end,
        reserved_va_start: boot::VMM_RESERVED_VA_START,
    };
    let mut ok = true;
    let info_bytes: Vec<u8> = [
        boot_info.magic,
        boot_info.ram_bytes,
        boot_info.cmdline_addr,
        boot_info.cmdline_len,
        boot_info.boot_area_start,
        boot_info.boot_area_end,
        boot_info.reserved_va_start,
    ]
    .iter()
    .flat_map(|v| v.to_le_bytes())
    .collect();
    ok &= mem.write_phys(BOOT_AREA_BASE, &info_bytes);
    ok &= mem.write_phys(BOOT_AREA_BASE + CMDLINE_OFFSET, cmdline.as_bytes());
    let gdt: Vec<u8> = BOOT_GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    ok &= mem.write_phys(BOOT_AREA_BASE + GDT_OFFSET, &gdt);
    ok &= mem.write_phys(BOOT_AREA_BASE + 0x2000, &[0u8; BOOT_STACK_SIZE as usize]);
    for (i, table) in tables.tables.iter().enumerate() {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        ok &= mem.write_phys(tables.gpa(i), &bytes);
    }
    if !ok {
        return Err(LoadError::RamTooSmall);
    }
    Ok(EntryState {
        rip: image.entry,
        rsp: BOOT_AREA_BASE + STACK_TOP_OFFSET,
        rdi: BOOT_AREA_BASE,
        cr3: tables.gpa(0),
        gdtr_base: BOOT_AREA_BASE + GDT_OFFSET,
        gdtr_limit: (BOOT_GDT.len() * 8 - 1) as u16,
        boot_info,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    /// Guest RAM as a plain byte vector.
    struct Ram(Vec<u8>);
    impl GuestPhysWrite for Ram {
        fn write_phys(&mut self, gpa: u64, bytes: &[u8]) -> bool {
            let start = gpa as usize;
            match self.0.get_mut(start..start + bytes.len()) {
                Some(dst) => {
                    dst.copy_from_slice(bytes);
                    true
                }
                None => false,
            }
        }
    }
    impl Ram {
        fn u64_at(&self, gpa: u64) -> u64 {
            let s = gpa as usize;
            u64::from_le_bytes(self.0[s..s + 8].try_into().unwrap())
        }
        /// Walks the 4-level tables at `cr3` like the CPU: returns (physical address, writable,
        /// no-execute) of `va`.
        fn translate(&self, cr3: u64, va: u64) -> Option<(u64, bool, bool)> {
            let mut table = cr3;
            let (mut w, mut nx) = (true, false);
            for level in (1..=4).rev() {
                let e = self.u64_at(table + ((va >> (12 + 9 * (level - 1))) & 0x1ff) * 8);
                if e & PTE_PRESENT == 0 {
                    return None;
                }
                w &= e & PTE_WRITABLE != 0;
                nx |= e & PTE_NO_EXECUTE != 0;
                if level == 2 && e & PTE_HUGE != 0 {
                    return Some((
                        (e & ADDRESS_MASK & !(HUGE_PAGE - 1)) + (va & (HUGE_PAGE - 1)),
                        w,
                        nx,
                    ));
                }
                table = e & ADDRESS_MASK;
            }
            Some((table + (va & (PAGE - 1)), w, nx))
        }
    }

    /// One program header for [`elf_image`]: (p_type, flags, offset, vaddr, paddr, filesz, memsz).
    type Ph = (u32, u32, u64, u64, u64, u64, u64);

    /// A minimal ELF64 x86-64 executable with the given program headers, followed by `payload`
    /// at file offset 0x1000.
    fn elf_image(entry: u64, phs: &[Ph], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 0x1000];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // ELFCLASS64
        f[5] = 1; // little-endian
        f[6] = 1; // EV_CURRENT
        f[16..18].copy_from_slice(&ET_EXEC.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f[56..58].copy_from_slice(&(phs.len() as u16).to_le_bytes());
        for (i, &(ty, flags, off, va, pa, fsz, msz)) in phs.iter().enumerate() {
            let p = 64 + i * 56;
            f[p..p + 4].copy_from_slice(&ty.to_le_bytes());
            f[p + 4..p + 8].copy_from_slice(&flags.to_le_bytes());
            for (j, v) in [off, va, pa, fsz, msz, 0x1000].iter().enumerate() {
                f[p + 8 + j * 8..p + 16 + j * 8].copy_from_slice(&v.to_le_bytes());
            }
        }
        f.extend_from_slice(payload);
        f
    }

    const MIB: u64 = 1 << 20;

    fn simple_image() -> Vec<u8> {
        let code = [0xF4u8; 32]; // hlt
        elf_image(
            0x20_0000,
            &[(PT_LOAD, PF_X, 0x1000, 0x20_0000, 0x20_0000, 32, 0x3000)],
            &code,
        )
    }

    #[test]
    fn valid_image_parses() {
        let img = parse_guest(&simple_image(), 32 * MIB).unwrap();
        assert_eq!(img.entry, 0x20_0000);
        assert_eq!(img.segments.len(), 1);
        assert!(img.segments[0].executable && !img.segments[0].writable);
    }

    #[test]
    fn not_elf_and_wrong_kind_are_named() {
        assert!(matches!(
            parse_guest(b"hello", 32 * MIB),
            Err(LoadError::NotElf(_))
        ));
        assert!(matches!(
            parse_guest(&[], 32 * MIB),
            Err(LoadError::NotElf(_))
        ));
        let mut img = simple_image();
        img[18] = 3; // EM_386
        assert_eq!(
            parse_guest(&img, 32 * MIB),
            Err(LoadError::WrongKind("e_machine is not x86-64"))
        );
        let mut img = simple_image();
        img[16] = 3; // ET_DYN
        assert_eq!(
            parse_guest(&img, 32 * MIB),
            Err(LoadError::WrongKind("e_type is not ET_EXEC"))
        );
    }

    #[test]
    fn segments_are_checked_against_ram_and_the_reserved_range() {
        let below = elf_image(
            0x8000,
            &[(PT_LOAD, PF_X, 0x1000, 0x8000, 0x8000, 16, 16)],
            &[0; 16],
        );
        assert!(matches!(
            parse_guest(&below, 32 * MIB),
            Err(LoadError::SegmentOutsideRam { .. })
        ));
        let beyond = elf_image(
            0x1F0_0000,
            &[(PT_LOAD, PF_X, 0x1000, 0x1F0_0000, 0x1F0_0000, 16, 0x20_0000)],
            &[0; 16],
        );
        assert!(matches!(
            parse_guest(&beyond, 32 * MIB),
            Err(LoadError::SegmentOutsideRam { .. })
        ));
        let vmm = elf_image(
            0xFFFF_FF80_0000_0000,
            &[(
                PT_LOAD,
                PF_X,
                0x1000,
                0xFFFF_FF80_0000_0000,
                0x20_0000,
                16,
                16,
            )],
            &[0; 16],
        );
        assert!(matches!(
            parse_guest(&vmm, 32 * MIB),
            Err(LoadError::SegmentInReservedRange { .. })
        ));
        let noncanonical = elf_image(
            0x0000_8000_0000_0000,
            &[(
                PT_LOAD,
                PF_X,
                0x1000,
                0x0000_8000_0000_0000,
                0x20_0000,
                16,
                16,
            )],
            &[0; 16],
        );
        assert!(matches!(
            parse_guest(&noncanonical, 32 * MIB),
            Err(LoadError::SegmentInReservedRange { .. })
        ));
        let truncated = elf_image(
            0x20_0000,
            &[(PT_LOAD, PF_X, 0x1000, 0x20_0000, 0x20_0000, 0x5000, 0x5000)],
            &[0; 16],
        );
        assert!(matches!(
            parse_guest(&truncated, 32 * MIB),
            Err(LoadError::BadSegment { .. })
        ));
    }

    #[test]
    fn entry_must_be_in_code_and_segments_must_not_overlap() {
        let data_entry = elf_image(
            0x20_0000,
            &[(PT_LOAD, PF_W, 0x1000, 0x20_0000, 0x20_0000, 16, 16)],
            &[0; 16],
        );
        assert_eq!(
            parse_guest(&data_entry, 32 * MIB),
            Err(LoadError::EntryOutsideCode(0x20_0000))
        );
        let overlap = elf_image(
            0x20_0000,
            &[
                (PT_LOAD, PF_X, 0x1000, 0x20_0000, 0x20_0000, 16, 0x2000),
                (PT_LOAD, PF_W, 0x1000, 0x20_1000, 0x20_1000, 16, 0x2000),
            ],
            &[0; 16],
        );
        assert_eq!(
            parse_guest(&overlap, 32 * MIB),
            Err(LoadError::SegmentsOverlap)
        );
        let none = elf_image(0x20_0000, &[], &[]);
        assert_eq!(parse_guest(&none, 32 * MIB), Err(LoadError::NoLoadSegments));
    }

    #[test]
    fn load_builds_the_entry_contract() {
        let bytes = simple_image();
        let img = parse_guest(&bytes, 32 * MIB).unwrap();
        let mut ram = Ram(vec![0xAA; 32 * MIB as usize]);
        let entry = load_guest(&mut ram, &bytes, &img, 32 * MIB, "selftest fast").unwrap();
        assert_eq!(entry.rip, 0x20_0000);
        assert_eq!(entry.rsp % 16, 0);
        // Segment: file bytes then zeros up to p_memsz.
        assert_eq!(ram.0[0x20_0000], 0xF4);
        assert_eq!(ram.0[0x20_0000 + 32], 0);
        assert_eq!(ram.0[0x20_0000 + 0x2FFF], 0);
        assert_eq!(ram.0[0x20_3000], 0xAA, "nothing written past p_memsz");
        // BootInfo at RDI, command line where it says.
        assert_eq!(ram.u64_at(entry.rdi), BOOT_INFO_MAGIC);
        assert_eq!(ram.u64_at(entry.rdi + 8), 32 * MIB);
        let (addr, len) = (
            ram.u64_at(entry.rdi + 16) as usize,
            ram.u64_at(entry.rdi + 24) as usize,
        );
        assert_eq!(&ram.0[addr..addr + len], b"selftest fast");
        assert_eq!(ram.u64_at(entry.rdi + 48), boot::VMM_RESERVED_VA_START);
        let (start, end) = (ram.u64_at(entry.rdi + 32), ram.u64_at(entry.rdi + 40));
        assert!(start <= entry.cr3 && entry.cr3 < end && end <= BOOT_AREA_LIMIT);
        assert!(start < entry.rsp && entry.rsp <= end);
        // GDT.
        assert_eq!(ram.u64_at(entry.gdtr_base + 8), BOOT_GDT[1]);
        assert_eq!(entry.gdtr_limit, 23);
        // Identity map of all of RAM, nothing beyond it.
        for va in [0, 0x1000, 0x20_0000, 32 * MIB - 8] {
            assert_eq!(
                ram.translate(entry.cr3, va),
                Some((va, true, false)),
                "{va:#x}"
            );
        }
        assert_eq!(ram.translate(entry.cr3, 32 * MIB), None);
        assert_eq!(ram.translate(entry.cr3, 0xFFFF_8000_0000_0000), None);
    }

    #[test]
    fn segments_linked_high_are_mapped_at_their_vaddr() {
        let va = 0xFFFF_8000_0010_0000;
        let bytes = elf_image(
            va,
            &[
                (PT_LOAD, PF_X, 0x1000, va, 0x40_0000, 16, 0x1800),
                (PT_LOAD, PF_W, 0x1000, va + 0x2000, 0x40_2000, 16, 0x1000),
            ],
            &[0x90; 16],
        );
        let img = parse_guest(&bytes, 32 * MIB).unwrap();
        let mut ram = Ram(vec![0; 32 * MIB as usize]);
        let entry = load_guest(&mut ram, &bytes, &img, 32 * MIB, "").unwrap();
        assert_eq!(
            ram.translate(entry.cr3, va + 0x10),
            Some((0x40_0010, false, false))
        );
        assert_eq!(
            ram.translate(entry.cr3, va + 0x1008),
            Some((0x40_1008, false, false))
        );
        assert_eq!(
            ram.translate(entry.cr3, va + 0x2008),
            Some((0x40_2008, true, true))
        );
        assert_eq!(ram.translate(entry.cr3, va + 0x3000), None);
        let low = elf_image(
            0x30_0000,
            &[(PT_LOAD, PF_X, 0x1000, 0x30_0000, 0x40_0000, 16, 16)],
            &[0; 16],
        );
        assert!(matches!(
            parse_guest(&low, 32 * MIB),
            Err(LoadError::SegmentOverlapsIdentityMap { .. })
        ));
    }

    #[test]
    fn command_line_too_long_is_refused() {
        let bytes = simple_image();
        let img = parse_guest(&bytes, 32 * MIB).unwrap();
        let mut ram = Ram(vec![0; 32 * MIB as usize]);
        let long = "x".repeat(MAX_CMDLINE + 1);
        assert_eq!(
            load_guest(&mut ram, &bytes, &img, 32 * MIB, &long),
            Err(LoadError::CommandLineTooLong(MAX_CMDLINE + 1))
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Arbitrary bytes, and arbitrary mutations of a valid image, never panic the parser.
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512),
                               flips in proptest::collection::vec((0usize..0x1020, proptest::prelude::any::<u8>()), 0..8)) {
            let _ = parse_guest(&bytes, 32 * MIB);
            let mut img = simple_image();
            for (at, v) in flips {
                if let Some(b) = img.get_mut(at) { *b = v; }
            }
            if let Ok(parsed) = parse_guest(&img, 32 * MIB) {
                let mut ram = Ram(vec![0; 32 * MIB as usize]);
                let _ = load_guest(&mut ram, &img, &parsed, 32 * MIB, "x");
            }
        }
    }
}
