//! The guest boot protocol and the shared boot code of both kernels.
//!
//! Two images boot through the code in this crate's `src/*.S` files:
//! - the host kernel (`kernel/`), linked in the top 2 GiB, which includes `multiboot32.S` with
//!   `BOOT_HOST` defined so that the trampoline also maps the higher half;
//! - the test guest (`guest-kernel/`), linked identity-mapped, whose native boot uses the same
//!   trampoline and then builds the guest entry state described below.
//!
//! The Rust half of the crate is the one definition of the guest entry contract ([`BootInfo`],
//! the boot selectors, the exit codes) that both the VMM's loader and the guest's native
//! trampoline use, plus the Multiboot 1 structures both kernels read. It holds data layouts
//! only, no code that touches memory, so it is `forbid(unsafe_code)` and host-tested.
//!
//! # The guest entry contract (kept by the VMM loader and by the native trampoline)
//!
//! At `e_entry`: long mode, virtual CPL 0, RFLAGS = 0x2, CR0 = PE|MP|ET|NE|WP|PG, CR4 = PAE,
//! EFER = LME|LMA|NXE, IDTR limit 0, LDTR null (an LDT selector is #GP), GDTR at a boot GDT
//! with [`BOOT_CODE_SELECTOR`] (64-bit code, DPL 0) and [`BOOT_DATA_SELECTOR`] (data, DPL 0);
//! CS = 0x08, SS = DS = ES = 0x10, FS = GS = 0.
//! CR3 identity-maps guest-physical `[0, min(RAM, 4 GiB))` with 2 MiB supervisor writable pages
//! (plus every `PT_LOAD` at its `p_vaddr` when that differs). RSP = top of a 16 KiB boot stack,
//! RDI = identity-mapped address of a [`BootInfo`].
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod multiboot;

/// `BootInfo::magic`: the bytes "GTBOOT01" read as a little-endian u64.
pub const BOOT_INFO_MAGIC: u64 = 0x3130_544F_4F42_5447;

/// The boot GDT's 64-bit code selector (DPL 0), loaded in CS at the guest entry.
pub const BOOT_CODE_SELECTOR: u16 = 0x08;
/// The boot GDT's data selector (DPL 0), loaded in SS, DS and ES at the guest entry.
pub const BOOT_DATA_SELECTOR: u16 = 0x10;

/// Size of the boot stack whose top is in RSP at the guest entry.
pub const BOOT_STACK_SIZE: u64 = 16 * 1024;

/// The first linear address a guest must never map under the VMM: PML4 slot 511, where the
/// VMM lives in every shadow address space (the article's address-space compression).
pub const VMM_RESERVED_VA_START: u64 = 0xFFFF_FF80_0000_0000;

/// Lowest guest-physical address a `PT_LOAD` segment may be placed at.
pub const MIN_LOAD_PADDR: u64 = 0x10_0000;

/// What the guest finds at RDI on entry. One definition, used by the VMM loader and the native
/// trampoline alike; `#[repr(C)]` so its layout is the documented one.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootInfo {
    /// Always [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// Guest RAM in bytes, from guest-physical 0.
    pub ram_bytes: u64,
    /// Guest-physical (identity-mapped) address of the guest's command line (not NUL-terminated).
    pub cmdline_addr: u64,
    /// Length of the command line in bytes.
    pub cmdline_len: u64,
    /// Start of the guest-physical range holding the boot page tables, boot GDT, boot stack,
    /// this structure and the command line; the guest may reuse it once it has its own.
    pub boot_area_start: u64,
    /// End (exclusive) of that range.
    pub boot_area_end: u64,
    /// First linear address the guest must never map.
    pub reserved_va_start: u64,
}

/// CR0 at the guest entry: PE | MP | ET | NE | WP | PG.
pub const ENTRY_CR0: u64 = 0x8001_0033;
/// CR4 at the guest entry: PAE.
pub const ENTRY_CR4: u64 = 0x20;
/// IA32_EFER at the guest entry: LME | LMA | NXE.
pub const ENTRY_EFER: u64 = 0xD00;
/// RFLAGS at the guest entry: only the always-one bit 1 (IF = 0).
pub const ENTRY_RFLAGS: u64 = 0x2;
/// The boot GDT's descriptors, indexed by selector / 8: null, 64-bit code DPL 0 (L = 1),
/// data DPL 0 (writable). The same values as the native trampoline's GDT.
pub const BOOT_GDT: [u64; 3] = [0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF];

/// Values written to the isa-debug-exit port ([`EXIT_PORT`], 32-bit write). QEMU exits with
/// status `(code << 1) | 1`; run-qemu.sh turns that into its own exit status.
pub mod exit_code {
    /// The guest finished successfully.
    pub const SUCCESS: u32 = 0x10;
    /// The guest reports a failure.
    pub const FAILURE: u32 = 0x11;
    /// The host kernel panicked (always a bug in the VMM).
    pub const HOST_PANIC: u32 = 0x12;
    /// The VMM stopped the guest (triple fault, touched the VMM's range, ...).
    pub const GUEST_STOPPED: u32 = 0x13;
    /// The host's configuration is unusable (bad command line, missing or bad guest image,
    /// memory map too small, CPU lacks a required feature).
    pub const CONFIG_ERROR: u32 = 0x14;
}

/// The isa-debug-exit device's I/O port.
pub const EXIT_PORT: u16 = 0xf4;

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn magic_spells_gtboot01() {
        assert_eq!(&BOOT_INFO_MAGIC.to_le_bytes(), b"GTBOOT01");
    }

    #[test]
    fn boot_info_layout_is_the_documented_one() {
        assert_eq!(size_of::<BootInfo>(), 56);
        assert_eq!(offset_of!(BootInfo, magic), 0);
        assert_eq!(offset_of!(BootInfo, ram_bytes), 8);
        assert_eq!(offset_of!(BootInfo, cmdline_addr), 16);
        assert_eq!(offset_of!(BootInfo, cmdline_len), 24);
        assert_eq!(offset_of!(BootInfo, boot_area_start), 32);
        assert_eq!(offset_of!(BootInfo, boot_area_end), 40);
        assert_eq!(offset_of!(BootInfo, reserved_va_start), 48);
    }

    #[test]
    fn entry_control_registers_are_the_documented_bits() {
        // CR0: PE(0) MP(1) ET(4) NE(5) WP(16) PG(31); CR4: PAE(5); EFER: LME(8) LMA(10) NXE(11).
        let cr0 = [0, 1, 4, 5, 16, 31].iter().fold(0u64, |a, b| a | 1 << b);
        assert_eq!(ENTRY_CR0, cr0);
        assert_eq!(ENTRY_CR4, 1 << 5);
        assert_eq!(ENTRY_EFER, 1 << 8 | 1 << 10 | 1 << 11);
    }

    #[test]
    fn reserved_range_is_pml4_slot_511() {
        assert_eq!((VMM_RESERVED_VA_START >> 39) & 0x1ff, 511);
    }
}
