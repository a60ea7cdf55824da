//! Physical frames and 4-level page tables.
//!
//! The kernel half is PML4 slot 0: guest-physical RAM identity-mapped (page 0 left unmapped so a
//! null pointer faults), kernel text read-only and executable, everything else no-execute. Every
//! process's PML4 shares that slot's PDPT; the user half is slots 1..256, of which the OS uses
//! slot 1 (`USER_*` below). Slots 256..512 are never used, in particular not slot 511 where
//! `BootInfo.reserved_va_start` lies. README.md, "Memory layout", has the whole picture.

use crate::sync::IrqLock;
use crate::{arch, process};
use bitflags::bitflags;
use core::sync::atomic::{AtomicU64, Ordering};

/// Page size.
pub const PAGE: u64 = 4096;
const HUGE_PAGE: u64 = 2 << 20;

/// Where every process sees the user programs (text, then rodata): PML4 slot 1.
pub const USER_IMAGE_VA: u64 = 0x0000_0080_0000_0000;
/// A read-only page per process holding its pid (the process's FS base points here).
pub const USER_TLS_VA: u64 = 0x0000_0080_2000_0000;
/// Start of the demand-zero heap (`brk` grows it).
pub const USER_HEAP_START: u64 = 0x0000_0080_4000_0000;
/// Largest heap `brk` allows.
pub const USER_HEAP_MAX: u64 = 4 << 20;
/// Top of the demand-zero user stack (the first RSP is 8 below, as after a call).
pub const USER_STACK_TOP: u64 = 0x0000_0080_8000_0000;
/// Largest user stack; the page below is never mapped (a guard).
pub const USER_STACK_MAX: u64 = 256 << 10;
/// A kernel-half address outside RAM used by the self-test and bench to map and unmap a page.
pub const KERNEL_SCRATCH_VA: u64 = 0x0000_0040_0000_0000;
/// End (exclusive) of the user half the OS may map: PML4 slots 1..256.
pub const USER_HALF_END: u64 = 0x0000_8000_0000_0000;

bitflags! {
    /// Page-table entry bits (SDM vol. 3 §4.5, tables 4-14 to 4-20).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct PteFlags: u64 {
        /// Present.
        const PRESENT = 1 << 0;
        /// Writable.
        const WRITABLE = 1 << 1;
        /// User-accessible.
        const USER = 1 << 2;
        /// Accessed (set by the CPU).
        const ACCESSED = 1 << 5;
        /// Dirty (set by the CPU).
        const DIRTY = 1 << 6;
        /// A 2 MiB page (in a page-directory entry).
        const HUGE = 1 << 7;
        /// Software bit (ignored by the CPU): the frame belongs to this address space and is
        /// freed with it (user image pages are shared and lack it).
        const OWNED = 1 << 9;
        /// No-execute (EFER.NXE is on).
        const NO_EXECUTE = 1 << 63;
    }
}

/// One page-table entry.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageTableEntry(u64);

const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

impl PageTableEntry {
    const EMPTY: Self = Self(0);
    fn new(frame: u64, flags: PteFlags) -> Self {
        Self((frame & ADDR_MASK) | flags.bits())
    }
    /// The flags.
    pub fn flags(self) -> PteFlags {
        PteFlags::from_bits_retain(self.0 & !ADDR_MASK)
    }
    /// The physical address it points to.
    pub fn frame(self) -> u64 {
        self.0 & ADDR_MASK
    }
    /// Present?
    pub fn present(self) -> bool {
        self.flags().contains(PteFlags::PRESENT)
    }
}

type Table = [PageTableEntry; 512];

/// The table at physical address `pa`, through the identity map.
///
/// # Safety
/// `pa` must be a page-table frame this module allocated (or the kernel PML4), not aliased by a
/// live Rust reference.
unsafe fn table<'a>(pa: u64) -> &'a mut Table {
    // SAFETY: guaranteed by the caller; RAM is identity-mapped in the kernel half.
    unsafe { &mut *(pa as *mut Table) }
}

struct Frames {
    /// Next never-used frame (frames are handed out in address order first, so RAM the OS
    /// never needs is never touched).
    next_unused: u64,
    end: u64,
    /// Boot area to skip (the contract lets the loader put it anywhere in RAM).
    skip: (u64, u64),
    /// Freed frames, linked through their first word.
    free_list: u64,
    free_count: u64,
}

static FRAMES: IrqLock<Frames> = IrqLock::new(Frames {
    next_unused: 0,
    end: 0,
    skip: (0, 0),
    free_list: 0,
    free_count: 0,
});

static KERNEL_PML4: AtomicU64 = AtomicU64::new(0);
static RESERVED_VA_START: AtomicU64 = AtomicU64::new(u64::MAX);
static DEMAND_FILLS: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static __image_end: u8;
    static __text_start: u8;
    static __text_end: u8;
    static __rodata_start: u8;
    static __rodata_end: u8;
    static __user_phys_start: u8;
    static __user_text_size: u8;
    static __user_size: u8;
}

fn symbol(s: *const u8) -> u64 {
    s as u64
}

const fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

/// Frames still available (never used plus freed).
pub fn free_frames() -> u64 {
    FRAMES.with(|f| f.free_count + (f.end.saturating_sub(f.next_unused)) / PAGE)
}

/// Demand-zero pages filled so far.
pub fn demand_fills() -> u64 {
    DEMAND_FILLS.load(Ordering::Relaxed)
}

/// A zeroed frame, or None when RAM is exhausted.
pub fn alloc_frame() -> Option<u64> {
    let frame = FRAMES.with(|f| {
        if f.free_list != 0 {
            let frame = f.free_list;
            // SAFETY: a freed frame holds the next link in its first word (see free_frame).
            f.free_list = unsafe { (frame as *const u64).read() };
            f.free_count -= 1;
            return Some(frame);
        }
        if f.next_unused >= f.skip.0 && f.next_unused < f.skip.1 {
            f.next_unused = f.skip.1;
        }
        if f.next_unused + PAGE > f.end {
            return None;
        }
        let frame = f.next_unused;
        f.next_unused += PAGE;
        Some(frame)
    })?;
    // SAFETY: the frame is RAM (identity-mapped) that no one else owns now.
    unsafe { core::ptr::write_bytes(frame as *mut u8, 0, PAGE as usize) };
    Some(frame)
}

/// Returns a frame from `alloc_frame`.
pub fn free_frame(frame: u64) {
    FRAMES.with(|f| {
        // SAFETY: the caller gives the frame back; its first word becomes the list link.
        unsafe { (frame as *mut u64).write(f.free_list) };
        f.free_list = frame;
        f.free_count += 1;
    });
}

/// Sets up the frame allocator over `[end of image, ram_bytes)` minus the boot area, builds the
/// kernel half and switches to it (`mov cr3`).
pub fn init(ram_bytes: u64, boot_area: (u64, u64), reserved_va_start: u64) {
    RESERVED_VA_START.store(reserved_va_start, Ordering::Relaxed);
    let image_end = align_up(symbol(&raw const __image_end), PAGE);
    let ram_end = ram_bytes & !(PAGE - 1);
    FRAMES.with(|f| {
        f.next_unused = image_end;
        f.end = ram_end;
        f.skip = (boot_area.0 & !(PAGE - 1), align_up(boot_area.1, PAGE));
    });
    let pml4 = alloc_frame().expect("no RAM for the kernel PML4");
    let text = (
        symbol(&raw const __text_start),
        symbol(&raw const __text_end),
    );
    let rodata = (
        symbol(&raw const __rodata_start),
        symbol(&raw const __rodata_end),
    );
    // 4 KiB pages where permissions differ inside a 2 MiB region (the image) or RAM ends;
    // 2 MiB pages elsewhere.
    let fine_end = align_up(image_end, HUGE_PAGE);
    let mut region = 0;
    while region < ram_end {
        if region >= fine_end && region + HUGE_PAGE <= ram_end {
            let flags =
                PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::HUGE | PteFlags::NO_EXECUTE;
            map_at_level(pml4, region, region, flags, 2).expect("no RAM for kernel tables");
        } else {
            let mut page = region;
            while page < region + HUGE_PAGE && page < ram_end {
                let flags = if page == 0 {
                    None // a null pointer must fault, in the kernel too
                } else if (text.0..text.1).contains(&page) {
                    Some(PteFlags::PRESENT)
                } else if (rodata.0..rodata.1).contains(&page) {
                    Some(PteFlags::PRESENT | PteFlags::NO_EXECUTE)
                } else {
                    Some(PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::NO_EXECUTE)
                };
                if let Some(flags) = flags {
                    map_at_level(pml4, page, page, flags, 1).expect("no RAM for kernel tables");
                }
                page += PAGE;
            }
        }
        region += HUGE_PAGE;
    }
    KERNEL_PML4.store(pml4, Ordering::Relaxed);
    // SAFETY: the new tables map all of RAM as the boot tables did (minus page 0, which the
    // kernel never uses), so code, stack and data stay where they are.
    unsafe { arch::set_cr3(pml4) };
}

/// The kernel's own PML4 (kinit runs on it).
pub fn kernel_pml4() -> u64 {
    KERNEL_PML4.load(Ordering::Relaxed)
}

/// Out of frames while mapping.
#[derive(Debug)]
pub struct OutOfMemory;

fn index(va: u64, level: u32) -> usize {
    ((va >> (12 + 9 * (level - 1))) & 0x1FF) as usize
}

/// Maps `va` -> `pa` with `flags` in a leaf at `level` (1 = 4 KiB PTE, 2 = 2 MiB PDE),
/// allocating intermediate tables (user-accessible in the user half, so the leaf decides).
fn map_at_level(
    pml4: u64,
    va: u64,
    pa: u64,
    flags: PteFlags,
    leaf_level: u32,
) -> Result<(), OutOfMemory> {
    assert!(
        va < RESERVED_VA_START.load(Ordering::Relaxed) && va < USER_HALF_END,
        "mapping {va:#x}: at or above the reserved range / outside the halves this OS uses"
    );
    let parent_flags = if va >= USER_IMAGE_VA {
        PteFlags::PRESENT | PteFlags::WRITABLE | PteFlags::USER
    } else {
        PteFlags::PRESENT | PteFlags::WRITABLE
    };
    let mut table_pa = pml4;
    for level in (leaf_level + 1..=4).rev() {
        // SAFETY: table_pa is a page-table frame of this address space.
        let t = unsafe { table(table_pa) };
        let e = &mut t[index(va, level)];
        if !e.present() {
            let new = alloc_frame().ok_or(OutOfMemory)?;
            *e = PageTableEntry::new(new, parent_flags);
        }
        table_pa = e.frame();
    }
    // SAFETY: as above.
    let t = unsafe { table(table_pa) };
    t[index(va, leaf_level)] = PageTableEntry::new(pa, flags);
    Ok(())
}

/// Maps one 4 KiB page.
pub fn map(pml4: u64, va: u64, pa: u64, flags: PteFlags) -> Result<(), OutOfMemory> {
    map_at_level(pml4, va, pa, flags, 1)
}

/// The leaf entry for `va` (4 KiB or 2 MiB), if present.
pub fn translate(pml4: u64, va: u64) -> Option<PageTableEntry> {
    let mut table_pa = pml4;
    for level in (1..=4).rev() {
        // SAFETY: walking tables of a live address space.
        let e = unsafe { table(table_pa) }[index(va, level)];
        if !e.present() {
            return None;
        }
        if level == 1 || (level == 2 && e.flags().contains(PteFlags::HUGE)) {
            return Some(e);
        }
        table_pa = e.frame();
    }
    None
}

/// Removes the 4 KiB mapping of `va` and, when `pml4` is the current address space, drops its
/// TLB entry (`invlpg`): without it the CPU may keep using the old translation (SDM vol. 3
/// §4.10.4). Returns the old entry.
pub fn unmap(pml4: u64, va: u64) -> Option<PageTableEntry> {
    let mut table_pa = pml4;
    for level in (2..=4).rev() {
        // SAFETY: walking tables of a live address space.
        let e = unsafe { table(table_pa) }[index(va, level)];
        if !e.present() || e.flags().contains(PteFlags::HUGE) {
            return None;
        }
        table_pa = e.frame();
    }
    // SAFETY: as above.
    let t = unsafe { table(table_pa) };
    let old = t[index(va, 1)];
    if !old.present() {
        return None;
    }
    t[index(va, 1)] = PageTableEntry::EMPTY;
    if arch::cr3() & ADDR_MASK == pml4 {
        arch::invlpg(va);
    }
    Some(old)
}

/// A new address space: a PML4 whose kernel half (slot 0) is the kernel's own PDPT.
pub fn new_address_space() -> Result<u64, OutOfMemory> {
    let pml4 = alloc_frame().ok_or(OutOfMemory)?;
    // SAFETY: the kernel PML4 is a table this module owns; the reference lives only for this
    // read.
    let kernel_half = unsafe { table(kernel_pml4()) }[0];
    // SAFETY: a PML4 frame just allocated, not yet in use or referenced anywhere else.
    unsafe { table(pml4)[0] = kernel_half };
    Ok(pml4)
}

/// Frees the user half of `pml4` (owned frames and every table below slot 1..256) and clears
/// those slots; the PML4 frame itself stays (it may still be in CR3). When it is the current
/// address space the TLB is flushed by reloading CR3 with the same value.
pub fn free_user_half(pml4: u64) {
    fn free_table(pa: u64, level: u32) {
        // SAFETY: a table of the address space being torn down; nothing else uses it.
        let t = unsafe { table(pa) };
        for e in t.iter_mut().filter(|e| e.present()) {
            if level > 1 {
                free_table(e.frame(), level - 1);
            } else if e.flags().contains(PteFlags::OWNED) {
                free_frame(e.frame());
            }
            *e = PageTableEntry::EMPTY;
        }
        free_frame(pa);
    }
    // SAFETY: the PML4 of the address space being torn down.
    let t = unsafe { table(pml4) };
    for e in t[1..256].iter_mut().filter(|e| e.present()) {
        free_table(e.frame(), 3);
        *e = PageTableEntry::EMPTY;
    }
    if arch::cr3() & ADDR_MASK == pml4 {
        // SAFETY: the same tables; the reload only flushes the TLB.
        unsafe { arch::set_cr3(pml4) };
    }
}

/// True when no PML4 slot at or above `reserved_va_start`'s (nor any of the upper half) is used.
pub fn upper_half_empty(pml4: u64) -> bool {
    // SAFETY: reading a live PML4.
    let t = unsafe { table(pml4) };
    t[256..].iter().all(|e| !e.present())
}

/// The user image: (virtual start, end of text, end, physical start).
pub fn user_image() -> (u64, u64, u64, u64) {
    let start = USER_IMAGE_VA;
    (
        start,
        start + symbol(&raw const __user_text_size),
        start + symbol(&raw const __user_size),
        symbol(&raw const __user_phys_start),
    )
}

/// Maps the user programs into `pml4`: text read-only and executable, rodata read-only and
/// no-execute, all shared (not OWNED).
pub fn map_user_image(pml4: u64) -> Result<(), OutOfMemory> {
    let (start, text_end, end, phys) = user_image();
    let mut va = start;
    while va < end {
        let mut flags = PteFlags::PRESENT | PteFlags::USER;
        if va >= text_end {
            flags |= PteFlags::NO_EXECUTE;
        }
        map(pml4, va, phys + (va - start), flags)?;
        va += PAGE;
    }
    Ok(())
}

/// A not-present page fault at `addr`: fill it with a zeroed page if it lies in the current
/// process's heap (below its break) or stack region. True when filled (the faulting
/// instruction is then restarted).
pub fn handle_demand_fault(addr: u64, error: u64) -> bool {
    const PF_PRESENT: u64 = 1 << 0;
    const PF_RESERVED: u64 = 1 << 3;
    if error & (PF_PRESENT | PF_RESERVED) != 0 {
        return false;
    }
    let Some(regions) = process::current_regions() else {
        return false;
    };
    let in_heap = (regions.heap_start..regions.brk).contains(&addr);
    let in_stack = (USER_STACK_TOP - USER_STACK_MAX..USER_STACK_TOP).contains(&addr);
    if !in_heap && !in_stack {
        return false;
    }
    let Some(frame) = alloc_frame() else {
        return false;
    };
    let flags = PteFlags::PRESENT
        | PteFlags::WRITABLE
        | PteFlags::USER
        | PteFlags::NO_EXECUTE
        | PteFlags::OWNED;
    if map(regions.pml4, addr & !(PAGE - 1), frame, flags).is_err() {
        free_frame(frame);
        return false;
    }
    DEMAND_FILLS.fetch_add(1, Ordering::Relaxed);
    true
}
