//! Multiboot 1 structures (Multiboot Specification 0.6.96, §3.3 "Boot information format").
//!
//! Layouts only: the kernels read them from physical memory with their own (unsafe) accessors.

/// The magic value a Multiboot loader leaves in EAX.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;

/// `MultibootInfo::flags` bit: `mem_lower`/`mem_upper` are valid.
pub const INFO_MEMORY: u32 = 1 << 0;
/// `MultibootInfo::flags` bit: `cmdline` is valid.
pub const INFO_CMDLINE: u32 = 1 << 2;
/// `MultibootInfo::flags` bit: `mods_count`/`mods_addr` are valid.
pub const INFO_MODS: u32 = 1 << 3;
/// `MultibootInfo::flags` bit: `mmap_length`/`mmap_addr` are valid.
pub const INFO_MEM_MAP: u32 = 1 << 6;

/// The boot information structure whose physical address the loader leaves in EBX.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MultibootInfo {
    /// Which of the following fields are valid (`INFO_*`).
    pub flags: u32,
    /// KiB of memory below 1 MiB.
    pub mem_lower: u32,
    /// KiB of contiguous memory from 1 MiB.
    pub mem_upper: u32,
    /// BIOS boot device.
    pub boot_device: u32,
    /// Physical address of the NUL-terminated command line.
    pub cmdline: u32,
    /// Number of modules.
    pub mods_count: u32,
    /// Physical address of the first [`ModuleEntry`].
    pub mods_addr: u32,
    /// a.out symbol table or ELF section header table (unused here).
    pub syms: [u32; 4],
    /// Length in bytes of the memory map buffer.
    pub mmap_length: u32,
    /// Physical address of the memory map buffer ([`MemoryMapEntry`] records).
    pub mmap_addr: u32,
}

/// One module (a file the loader placed in memory, e.g. the guest image).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ModuleEntry {
    /// Physical start address.
    pub mod_start: u32,
    /// Physical end address (exclusive).
    pub mod_end: u32,
    /// Physical address of the module's NUL-terminated string.
    pub string: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

/// One memory map record. `size` does not count itself: the next record starts `size + 4`
/// bytes after this one's start. The structure is packed in the buffer.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct MemoryMapEntry {
    /// Size of the rest of this record.
    pub size: u32,
    /// Physical start address.
    pub base_addr: u64,
    /// Length in bytes.
    pub length: u64,
    /// 1 = available RAM; anything else is reserved.
    pub kind: u32,
}

/// `MemoryMapEntry::kind` for usable RAM.
pub const MEMORY_AVAILABLE: u32 = 1;
