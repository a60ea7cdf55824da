//! Reading what the Multiboot loader left in memory: command line, memory map, modules.
//!
//! Everything is copied into a static [`BootData`] while the boot identity map is still loaded,
//! because the host's own page tables (memory::init) no longer map low memory.

use boot::multiboot::{
    MemoryMapEntry, ModuleEntry, MultibootInfo, INFO_CMDLINE, INFO_MEM_MAP, INFO_MODS,
    MEMORY_AVAILABLE,
};
use core::fmt;

/// How many memory map records and modules are kept (more is reported as an error).
pub const MAX_REGIONS: usize = 64;
/// How many modules are kept.
pub const MAX_MODULES: usize = 8;
const MAX_CMDLINE: usize = 2048;
const MAX_MODULE_NAME: usize = 128;

/// A physical range `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PhysRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// A module the loader placed in memory (the guest image).
#[derive(Clone, Copy, Debug)]
pub struct Module {
    /// Where it is in physical memory.
    pub range: PhysRange,
    name: [u8; MAX_MODULE_NAME],
    name_len: usize,
}

impl Module {
    /// The module's string (for QEMU's `-initrd "file args"`, the file name and its arguments).
    pub fn name(&self) -> &str {
        core::str::from_utf8(&self.name[..self.name_len]).unwrap_or("<not UTF-8>")
    }
}

/// Everything the host needs from the Multiboot information, copied out of it.
pub struct BootData {
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    /// Available RAM regions from the memory map.
    pub ram: [PhysRange; MAX_REGIONS],
    /// Number of valid entries in `ram`.
    pub ram_count: usize,
    /// Ranges the frame allocator must never hand out (Multiboot structures, modules).
    pub reserved: [PhysRange; MAX_REGIONS],
    /// Number of valid entries in `reserved`.
    pub reserved_count: usize,
    modules: [Option<Module>; MAX_MODULES],
}

/// Why the Multiboot information cannot be used.
#[derive(Debug)]
pub enum BootDataError {
    /// The loader gave no memory map (flags bit 6).
    NoMemoryMap,
    /// More memory map records or modules than the fixed tables hold.
    TooMany(&'static str),
    /// The command line is longer than the host accepts.
    CommandLineTooLong(usize),
}

impl fmt::Display for BootDataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoMemoryMap => write!(f, "the boot loader passed no memory map"),
            Self::TooMany(what) => write!(f, "too many {what} in the Multiboot information"),
            Self::CommandLineTooLong(n) => {
                write!(
                    f,
                    "command line is {n} bytes; at most {MAX_CMDLINE} are accepted"
                )
            }
        }
    }
}

static mut BOOT_DATA: BootData = BootData {
    cmdline: [0; MAX_CMDLINE],
    cmdline_len: 0,
    ram: [PhysRange { start: 0, end: 0 }; MAX_REGIONS],
    ram_count: 0,
    reserved: [PhysRange { start: 0, end: 0 }; MAX_REGIONS],
    reserved_count: 0,
    modules: [None; MAX_MODULES],
};

/// Reads a `T` at physical address `pa` through the boot identity map.
///
/// # Safety
/// `pa..pa + size_of::<T>()` must be identity-mapped readable memory.
unsafe fn read_phys<T: Copy>(pa: u64) -> T {
    // SAFETY: the caller guarantees the range is mapped; unaligned reads are allowed.
    unsafe { core::ptr::read_unaligned(pa as *const T) }
}

/// The length of the NUL-terminated string at `pa`, at most `max`.
///
/// # Safety
/// The string (or `max` bytes of it) must be identity-mapped.
unsafe fn c_string(pa: u64, max: usize) -> &'static [u8] {
    let mut len = 0;
    // SAFETY: each byte read is inside the string or its NUL, as the caller guarantees.
    while len < max && unsafe { read_phys::<u8>(pa + len as u64) } != 0 {
        len += 1;
    }
    // SAFETY: the `len` bytes just read are mapped; they are not written while we run.
    unsafe { core::slice::from_raw_parts(pa as *const u8, len) }
}

impl BootData {
    /// Copies the Multiboot information at physical `info_pa` into the static `BootData`.
    ///
    /// # Safety
    /// Must be called once, with the boot identity map still loaded and `info_pa` the address the
    /// loader passed in EBX.
    pub unsafe fn read(info_pa: u64) -> Result<&'static BootData, BootDataError> {
        let boot_data = core::ptr::addr_of_mut!(BOOT_DATA);
        // SAFETY: called once at boot, before anything else refers to BOOT_DATA.
        let data = unsafe { &mut *boot_data };
        // SAFETY: the loader's information structure is identity-mapped (caller's contract).
        let info: MultibootInfo = unsafe { read_phys(info_pa) };
        data.reserve(info_pa, core::mem::size_of::<MultibootInfo>() as u64)?;

        if info.flags & INFO_CMDLINE != 0 {
            // SAFETY: flag bit 2 says `cmdline` is the address of a NUL-terminated string.
            let bytes = unsafe { c_string(info.cmdline as u64, MAX_CMDLINE + 1) };
            if bytes.len() > MAX_CMDLINE {
                return Err(BootDataError::CommandLineTooLong(bytes.len()));
            }
            data.cmdline[..bytes.len()].copy_from_slice(bytes);
            data.cmdline_len = bytes.len();
            data.reserve(info.cmdline as u64, bytes.len() as u64 + 1)?;
        }

        if info.flags & INFO_MEM_MAP == 0 {
            return Err(BootDataError::NoMemoryMap);
        }
        data.reserve(info.mmap_addr as u64, info.mmap_length as u64)?;
        let mut offset = 0u64;
        while offset + 4 <= info.mmap_length as u64 {
            // SAFETY: flag bit 6: the records lie in [mmap_addr, mmap_addr + mmap_length).
            let entry: MemoryMapEntry = unsafe { read_phys(info.mmap_addr as u64 + offset) };
            let (base, length, kind) = (entry.base_addr, entry.length, entry.kind);
            if kind == MEMORY_AVAILABLE && length > 0 {
                if data.ram_count == MAX_REGIONS {
                    return Err(BootDataError::TooMany("memory map records"));
                }
                data.ram[data.ram_count] = PhysRange {
                    start: base,
                    end: base.saturating_add(length),
                };
                data.ram_count += 1;
            }
            offset += entry.size as u64 + 4;
        }

        if info.flags & INFO_MODS != 0 {
            let size = core::mem::size_of::<ModuleEntry>() as u64;
            data.reserve(info.mods_addr as u64, size * info.mods_count as u64)?;
            for i in 0..info.mods_count as u64 {
                // SAFETY: flag bit 3: `mods_count` records start at `mods_addr`.
                let m: ModuleEntry = unsafe { read_phys(info.mods_addr as u64 + i * size) };
                let slot = data
                    .modules
                    .get_mut(i as usize)
                    .ok_or(BootDataError::TooMany("modules"))?;
                let mut module = Module {
                    range: PhysRange {
                        start: m.mod_start as u64,
                        end: m.mod_end as u64,
                    },
                    name: [0; MAX_MODULE_NAME],
                    name_len: 0,
                };
                if m.string != 0 {
                    // SAFETY: a non-zero `string` is the module's NUL-terminated string.
                    let name = unsafe { c_string(m.string as u64, MAX_MODULE_NAME) };
                    module.name[..name.len()].copy_from_slice(name);
                    module.name_len = name.len();
                }
                *slot = Some(module);
                let (start, end) = (module.range.start, module.range.end);
                data.reserve(start, end.saturating_sub(start))?;
            }
        }
        Ok(data)
    }

    fn reserve(&mut self, start: u64, len: u64) -> Result<(), BootDataError> {
        if self.reserved_count == MAX_REGIONS {
            return Err(BootDataError::TooMany("reserved ranges"));
        }
        self.reserved[self.reserved_count] = PhysRange {
            start,
            end: start.saturating_add(len),
        };
        self.reserved_count += 1;
        Ok(())
    }

    /// The kernel command line, as the loader gave it (its first word is the image path).
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }

    /// The modules, in the loader's order.
    pub fn modules(&self) -> impl Iterator<Item = &Module> {
        self.modules.iter().flatten()
    }

    /// Prints the modules with their sizes.
    pub fn report_modules(&self) {
        let mut any = false;
        for (i, m) in self.modules().enumerate() {
            any = true;
            log::info!(
                "module {i}: '{}' at {:#x}..{:#x} ({} bytes)",
                m.name(),
                m.range.start,
                m.range.end,
                m.range.end.saturating_sub(m.range.start)
            );
        }
        if !any {
            log::info!("modules: none");
        }
    }
}
