//! The boot area the loader builds in guest-physical memory (layout in the module above): the
//! `PT_LOAD` segments copied to their `p_paddr`, the boot page tables (4-level paging, SDM
//! Vol. 3 §4.5: 2 MiB identity pages for low memory, 4 KiB pages for segments linked away from
//! their load address), the `BootInfo` and command line, the boot GDT and the boot stack.
//!
//! Article challenge "内存虚拟化": these are the *guest's* page tables, in guest memory, which the
//! shadow MMU then walks like any others; the entry state they lead to is the contract of
//! `boot` (docs/writing-a-guest.md, "The state at `e_entry`").

use super::elf_image::GuestImage;
use super::{GuestPhysWrite, LoadError};
use alloc::vec::Vec;
use boot::{BootInfo, BOOT_GDT, BOOT_INFO_MAGIC, BOOT_STACK_SIZE, MIN_LOAD_PADDR};
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

/// A 4 KiB page.
pub(super) const PAGE: u64 = 4096;
/// A 2 MiB page (a page-directory entry with PS).
pub(super) const HUGE_PAGE: u64 = 2 * 1024 * 1024;
/// The bits of a paging-structure entry the boot tables use (SDM Vol. 3 §4.5, Table 4-14..20).
pub(super) const PTE_PRESENT: u64 = PteFlags::PRESENT.bits();
/// R/W.
pub(super) const PTE_WRITABLE: u64 = PteFlags::READ_WRITE.bits();
/// PS: the entry maps a 2 MiB page.
pub(super) const PTE_HUGE: u64 = PteFlags::PS.bits();
/// XD: no instruction fetch.
pub(super) const PTE_NO_EXECUTE: u64 = PteFlags::XD.bits();

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
    copy_segments(mem, image_bytes, image)?;
    let tables = build_page_tables(image, ram_bytes);
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
    if !write_boot_area(mem, &boot_info, cmdline, &tables) {
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

/// Copies each `PT_LOAD` segment to its `p_paddr`: the file bytes, then zeros up to `p_memsz`.
fn copy_segments(
    mem: &mut impl GuestPhysWrite,
    image_bytes: &[u8],
    image: &GuestImage,
) -> Result<(), LoadError> {
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
    Ok(())
}

/// The boot page tables: guest-physical `[0, min(RAM, 4 GiB))` identity-mapped with 2 MiB
/// writable pages, and each segment linked away from its load address mapped at `p_vaddr`
/// with 4 KiB pages (writable if `PF_W`, no-execute unless `PF_X`).
fn build_page_tables(image: &GuestImage, ram_bytes: u64) -> BootTables {
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
    tables
}

/// Writes the boot area: `BootInfo`, the command line, the boot GDT, the zeroed boot stack and
/// the page tables. `false` if any of it lies outside guest RAM.
fn write_boot_area(
    mem: &mut impl GuestPhysWrite,
    boot_info: &BootInfo,
    cmdline: &str,
    tables: &BootTables,
) -> bool {
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
    ok
}
