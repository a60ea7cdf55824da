//! Tests of the loader: the ELF checks and the boot area they lead to.

use super::boot_area::{HUGE_PAGE, PAGE, PTE_HUGE, PTE_NO_EXECUTE, PTE_PRESENT, PTE_WRITABLE};
use super::*;
use alloc::vec::Vec;
use boot::{BOOT_GDT, BOOT_INFO_MAGIC};
use elf::abi::{EM_X86_64, ET_EXEC, PF_W, PF_X, PT_LOAD};
use shadow_mmu::pte::ADDRESS_MASK;
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
    // e_phnum = PN_XNUM is named, not reported as "no PT_LOAD segment".
    let mut img = simple_image();
    img[56..58].copy_from_slice(&0xFFFFu16.to_le_bytes());
    assert!(matches!(
        parse_guest(&img, 32 * MIB),
        Err(LoadError::WrongKind(why)) if why.contains("PN_XNUM")
    ));
    // ... also when section header 0, where the real count would be, is outside the file.
    img[40..48].copy_from_slice(&0x10_0000u64.to_le_bytes()); // e_shoff
    assert!(matches!(
        parse_guest(&img, 32 * MIB),
        Err(LoadError::WrongKind(why)) if why.contains("PN_XNUM")
    ));
}

#[test]
fn a_bad_program_header_table_is_named() {
    let table_error = |img: &[u8]| match parse_guest(img, 32 * MIB) {
        Err(LoadError::BadHeaderTable(why)) => why,
        other => panic!("expected BadHeaderTable, got {other:?}"),
    };
    // The table reaches past the end of the file: through e_phnum or e_phoff.
    let mut img = simple_image();
    img[56..58].copy_from_slice(&0x100u16.to_le_bytes());
    assert!(table_error(&img).contains("program header table (e_phoff, e_phnum"));
    let mut img = simple_image();
    img[32..40].copy_from_slice(&0x10_0000u64.to_le_bytes());
    assert!(table_error(&img).contains("reaches past the end of the file"));
    // A program header that is not the ELF-64 size.
    let mut img = simple_image();
    img[54..56].copy_from_slice(&40u16.to_le_bytes());
    assert!(table_error(&img).contains("e_phentsize"));
    // No program header at all is what it says.
    let mut img = simple_image();
    img[56..58].copy_from_slice(&0u16.to_le_bytes());
    assert_eq!(parse_guest(&img, 32 * MIB), Err(LoadError::NoLoadSegments));
    // Shorter than the ELF-64 header is not an ELF file.
    assert_eq!(
        parse_guest(&simple_image()[..40], 32 * MIB),
        Err(LoadError::NotElf(
            "truncated: shorter than an ELF-64 header"
        ))
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
