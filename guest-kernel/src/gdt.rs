//! The OS's own GDT and TSS, in one of several selector layouts (`gdt=LAYOUT` on the command
//! line).
//!
//! The layouts exist so that a VMM can be tested against guests whose selectors differ: a VMM
//! that assumes a guest uses particular selectors is wrong for some other guest. Every selector
//! the kernel uses (the `lretq` and `mov ss/ds/es` after `lgdt`, `ltr`, the IDT gates, STAR,
//! IA32_SYSENTER_CS, the frames the entry stubs build, the first `iretq` of a process, `probe`)
//! comes from the active [`Layout`] at run time; the assembly stubs read theirs from the
//! `gdt_sel_*` words that [`init`] fills in.
//!
//! Three instructions compute selectors from one MSR value instead of reading the GDT, which is
//! what constrains every layout (SDM vol. 2B "SYSCALL", "SYSRET", "SYSENTER", "SYSEXIT"):
//!
//! - SYSCALL: CS = STAR[47:32] & !3, SS = that + 8. Kernel data must follow kernel code.
//! - SYSRET (64-bit): CS = (STAR[63:48] + 16) | 3, SS = (STAR[63:48] + 8) | 3. User data must be
//!   the slot before user code; STAR[63:48] itself (the slot before that) is read only by a
//!   32-bit SYSRET, which this OS never executes.
//! - SYSENTER: CS = SYSENTER_CS & !3, SS = that + 8; #GP if SYSENTER_CS[15:2] = 0.
//! - SYSEXIT (64-bit): CS = (SYSENTER_CS + 32) | 3, SS = (SYSENTER_CS + 40) | 3; #GP if
//!   SYSENTER_CS[15:2] = 0. So user code 64 must sit four slots after a kernel code slot and be
//!   followed by a user data slot.
//!
//! None of them checks the descriptors, but anything that later reloads the selector (an
//! interrupt's `iretq`) does, so each selector they produce names a matching descriptor.
//!
//! `sysret` (default; the layout this OS always had):
//!
//! | selector | descriptor | used by |
//! |---|---|---|
//! | 0x08 | 64-bit code, DPL 0 | kernel CS; SYSENTER_CS; STAR[47:32] |
//! | 0x10 | data, DPL 0 | kernel SS/DS/ES; SYSCALL's and SYSENTER's SS |
//! | 0x18 | 32-bit code, DPL 3 | STAR[63:48] = 0x1b (base only) |
//! | 0x20 | data, DPL 3 | user SS: SYSRET, first `iretq` |
//! | 0x28 | 64-bit code, DPL 3 | user CS: SYSRET, SYSEXIT, first `iretq` |
//! | 0x30 | data, DPL 3 | SS after SYSEXIT |
//! | 0x38 | 64-bit TSS (two slots) | `ltr` |
//!
//! `linux` (Linux x86_64's, plus one slot: Linux never executes a 64-bit SYSEXIT, whose SS would
//! land on its TSS at 0x38; SYSENTER_CS = 0x10 is the only value giving SYSEXIT the user CS
//! 0x33, so slot 7 is an extra user data descriptor and the TSS moves to 0x40):
//!
//! | selector | descriptor | used by |
//! |---|---|---|
//! | 0x08 | 32-bit code, DPL 0 | nothing (Linux's `__KERNEL32_CS`) |
//! | 0x10 | 64-bit code, DPL 0 | kernel CS; SYSENTER_CS; STAR[47:32] |
//! | 0x18 | data, DPL 0 | kernel SS/DS/ES; SYSCALL's and SYSENTER's SS |
//! | 0x20 | 32-bit code, DPL 3 | STAR[63:48] = 0x23 (base only, as Linux) |
//! | 0x28 | data, DPL 3 | user SS: SYSRET, first `iretq` |
//! | 0x30 | 64-bit code, DPL 3 | user CS: SYSRET, SYSEXIT, first `iretq` |
//! | 0x38 | data, DPL 3 | SS after SYSEXIT (the extra slot) |
//! | 0x40 | 64-bit TSS | `ltr` |
//!
//! `low` (user code 0x23 at index 4, user data 0x1b at index 3). SYSRET fits (STAR[63:48] =
//! 0x13; its slot is the kernel data descriptor, only a 32-bit SYSRET would use it), but
//! SYSEXIT cannot: user code at 0x20 needs SYSENTER_CS = 0, which makes SYSENTER and SYSEXIT
//! #GP. SYSENTER still enters (SYSENTER_CS = 0x08) and that path returns with `iretq` instead:
//!
//! | selector | descriptor | used by |
//! |---|---|---|
//! | 0x08 | 64-bit code, DPL 0 | kernel CS; SYSENTER_CS; STAR[47:32] |
//! | 0x10 | data, DPL 0 | kernel SS/DS/ES; SYSCALL's and SYSENTER's SS; STAR[63:48] = 0x13 (base only) |
//! | 0x18 | data, DPL 3 | user SS: SYSRET, `iretq` (first entry and SYSENTER's return) |
//! | 0x20 | 64-bit code, DPL 3 | user CS: SYSRET, `iretq` (first entry and SYSENTER's return) |
//! | 0x28 | 64-bit TSS | `ltr` |
//!
//! `sparse` (5000 entries, limit 0x9c3f: more than 4000, and below the 0xffd8 a VMM may reserve
//! at the top of the real GDT; all else not present). Kernel at the bottom, user 4000 slots up,
//! TSS at the very end; SYSENTER gets its own kernel code/data pair four slots below user code
//! so that SYSEXIT returns to the layout's user CS:
//!
//! | selector | descriptor | used by |
//! |---|---|---|
//! | 0x08 | 64-bit code, DPL 0 | kernel CS; STAR[47:32] |
//! | 0x10 | data, DPL 0 | kernel SS/DS/ES; SYSCALL's SS |
//! | 0x7cf0 | 64-bit code, DPL 0 | SYSENTER_CS (kernel CS on the SYSENTER path) |
//! | 0x7cf8 | data, DPL 0 | SYSENTER's SS |
//! | 0x7d00 | 32-bit code, DPL 3 | STAR[63:48] = 0x7d03 (base only) |
//! | 0x7d08 | data, DPL 3 | user SS: SYSRET, first `iretq` |
//! | 0x7d10 | 64-bit code, DPL 3 | user CS: SYSRET, SYSEXIT, first `iretq` |
//! | 0x7d18 | data, DPL 3 | SS after SYSEXIT |
//! | 0x9c30 | 64-bit TSS | `ltr` |
//!
//! The rules above are checked for every layout at compile time (`check`).

use crate::arch::{self, DescriptorTablePointer};
use core::cell::UnsafeCell;
use core::mem::size_of;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// 64-bit code, DPL 0: P, exec/read, L.
const KERNEL_CODE64: u64 = 0x00AF_9A00_0000_FFFF;
/// 32-bit code, DPL 0: P, exec/read, D (Linux's `__KERNEL32_CS`).
const KERNEL_CODE32: u64 = 0x00CF_9A00_0000_FFFF;
/// Data, DPL 0: P, read/write.
const KERNEL_DATA: u64 = 0x00CF_9200_0000_FFFF;
/// 32-bit code, DPL 3: P, exec/read, D.
const USER_CODE32: u64 = 0x00CF_FA00_0000_FFFF;
/// 64-bit code, DPL 3: P, exec/read, L.
const USER_CODE64: u64 = 0x00AF_FA00_0000_FFFF;
/// Data, DPL 3: P, read/write.
const USER_DATA: u64 = 0x00CF_F200_0000_FFFF;

/// The most entries any layout has (`sparse`); the table's storage.
const MAX_ENTRIES: usize = 5000;

/// A GDT selector layout.
#[derive(Debug)]
pub struct Layout {
    /// Its name on the command line (`gdt=<name>`).
    pub name: &'static str,
    /// Entries in the table (the limit is `8 * entries - 1`).
    entries: usize,
    /// The descriptors other than the null one and the TSS: (selector, descriptor).
    descriptors: &'static [(u16, u64)],
    /// Kernel code (CS after `lgdt`, IDT gates, STAR[47:32]).
    pub kernel_code: u16,
    /// Kernel data (SS/DS/ES after `lgdt`); SYSCALL's SS, so `kernel_code + 8`.
    pub kernel_data: u16,
    /// User 64-bit code, RPL 3 (every way into user mode).
    pub user_code: u16,
    /// User data, RPL 3 (SS after `iretq` and SYSRET).
    pub user_data: u16,
    /// The TSS (two slots).
    pub tss: u16,
    /// STAR[63:48]: SYSRET adds 16 (CS) and 8 (SS).
    pub sysret_base: u16,
    /// IA32_SYSENTER_CS.
    pub sysenter_cs: u16,
    /// Whether SYSEXITQ reaches `user_code` from `sysenter_cs`; if not, the SYSENTER path
    /// returns with `iretq` to `user_code`/`user_data`.
    pub sysexit: bool,
}

impl Layout {
    /// The GDT limit (bytes - 1).
    pub const fn limit(&self) -> u16 {
        (self.entries * 8 - 1) as u16
    }
    /// CS after SYSRETQ.
    pub const fn sysret_cs(&self) -> u16 {
        (self.sysret_base + 16) | 3
    }
    /// SS after SYSRETQ.
    pub const fn sysret_ss(&self) -> u16 {
        (self.sysret_base + 8) | 3
    }
    /// CS after SYSEXITQ.
    pub const fn sysexit_cs(&self) -> u16 {
        (self.sysenter_cs + 32) | 3
    }
    /// SS after SYSEXITQ.
    pub const fn sysexit_ss(&self) -> u16 {
        (self.sysenter_cs + 40) | 3
    }
    /// The (CS, SS) user mode gets back from the SYSENTER path.
    pub const fn sysenter_return(&self) -> (u16, u16) {
        if self.sysexit {
            (self.sysexit_cs(), self.sysexit_ss())
        } else {
            (self.user_code, self.user_data)
        }
    }
    /// The first selector past the limit.
    pub const fn beyond_limit(&self) -> u16 {
        (self.entries * 8) as u16
    }
    /// The descriptor at `selector` (0 = not present or the TSS).
    const fn descriptor(&self, selector: u16) -> u64 {
        let mut i = 0;
        while i < self.descriptors.len() {
            if self.descriptors[i].0 == selector & !7 {
                return self.descriptors[i].1;
            }
            i += 1;
        }
        0
    }
}

/// Panics (at compile time, for the consts below) unless `l` obeys the rules in the module
/// doc.
const fn check(l: &Layout) {
    assert!(l.entries <= MAX_ENTRIES && l.limit() < 0xFFD8);
    let mut i = 0;
    while i < l.descriptors.len() {
        let sel = l.descriptors[i].0;
        assert!(sel & 7 == 0 && sel != 0 && (sel as usize) < l.entries * 8);
        assert!(sel != l.tss && sel != l.tss + 8);
        i += 1;
    }
    assert!((l.tss as usize) + 16 <= l.entries * 8 && l.tss & 7 == 0);
    // SYSCALL.
    assert!(l.descriptor(l.kernel_code) == KERNEL_CODE64 && l.kernel_code & 3 == 0);
    assert!(l.kernel_data == l.kernel_code + 8 && l.descriptor(l.kernel_data) == KERNEL_DATA);
    // User selectors for `iretq`.
    assert!(l.user_code & 3 == 3 && l.descriptor(l.user_code) == USER_CODE64);
    assert!(l.user_data & 3 == 3 && l.descriptor(l.user_data) == USER_DATA);
    // SYSRET lands exactly on them.
    assert!(l.sysret_cs() == l.user_code && l.sysret_ss() == l.user_data);
    // SYSENTER.
    assert!(l.sysenter_cs >> 2 != 0 && l.descriptor(l.sysenter_cs) == KERNEL_CODE64);
    assert!(l.descriptor(l.sysenter_cs + 8) == KERNEL_DATA);
    if l.sysexit {
        assert!(l.sysexit_cs() == l.user_code);
        assert!(l.descriptor(l.sysexit_ss()) == USER_DATA);
    } else {
        // Only allowed where SYSEXIT truly cannot reach user_code: SYSENTER_CS would be null.
        assert!((l.user_code & !7) < 40);
    }
}

/// The default layout.
pub const SYSRET: Layout = Layout {
    name: "sysret",
    entries: 9,
    descriptors: &[
        (0x08, KERNEL_CODE64),
        (0x10, KERNEL_DATA),
        (0x18, USER_CODE32),
        (0x20, USER_DATA),
        (0x28, USER_CODE64),
        (0x30, USER_DATA),
    ],
    kernel_code: 0x08,
    kernel_data: 0x10,
    user_code: 0x2b,
    user_data: 0x23,
    tss: 0x38,
    sysret_base: 0x1b,
    sysenter_cs: 0x08,
    sysexit: true,
};

/// Linux x86_64's layout, with one extra slot for SYSEXIT's SS.
pub const LINUX: Layout = Layout {
    name: "linux",
    entries: 10,
    descriptors: &[
        (0x08, KERNEL_CODE32),
        (0x10, KERNEL_CODE64),
        (0x18, KERNEL_DATA),
        (0x20, USER_CODE32),
        (0x28, USER_DATA),
        (0x30, USER_CODE64),
        (0x38, USER_DATA),
    ],
    kernel_code: 0x10,
    kernel_data: 0x18,
    user_code: 0x33,
    user_data: 0x2b,
    tss: 0x40,
    sysret_base: 0x23,
    sysenter_cs: 0x10,
    sysexit: true,
};

/// User code 0x23 and data 0x1b; the SYSENTER path returns with `iretq`.
pub const LOW: Layout = Layout {
    name: "low",
    entries: 7,
    descriptors: &[
        (0x08, KERNEL_CODE64),
        (0x10, KERNEL_DATA),
        (0x18, USER_DATA),
        (0x20, USER_CODE64),
    ],
    kernel_code: 0x08,
    kernel_data: 0x10,
    user_code: 0x23,
    user_data: 0x1b,
    tss: 0x28,
    sysret_base: 0x13,
    sysenter_cs: 0x08,
    sysexit: false,
};

/// 5000 entries, kernel at the bottom, user 4000 slots up, TSS at the end.
pub const SPARSE: Layout = Layout {
    name: "sparse",
    entries: MAX_ENTRIES,
    descriptors: &[
        (0x08, KERNEL_CODE64),
        (0x10, KERNEL_DATA),
        (3998 * 8, KERNEL_CODE64),
        (3999 * 8, KERNEL_DATA),
        (4000 * 8, USER_CODE32),
        (4001 * 8, USER_DATA),
        (4002 * 8, USER_CODE64),
        (4003 * 8, USER_DATA),
    ],
    kernel_code: 0x08,
    kernel_data: 0x10,
    user_code: (4002 * 8) | 3,
    user_data: (4001 * 8) | 3,
    tss: (MAX_ENTRIES as u16 - 2) * 8,
    sysret_base: (4000 * 8) | 3,
    sysenter_cs: 3998 * 8,
    sysexit: true,
};

/// Every layout, the default first.
pub const LAYOUTS: [&Layout; 4] = [&SYSRET, &LINUX, &LOW, &SPARSE];
const _: () = {
    let mut i = 0;
    while i < LAYOUTS.len() {
        check(LAYOUTS[i]);
        i += 1;
    }
};

/// The layout named `name`.
pub fn by_name(name: &str) -> Option<&'static Layout> {
    LAYOUTS.iter().copied().find(|l| l.name == name)
}

/// Index into LAYOUTS of the layout `init` loaded.
static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// The layout in force (the default before `init`).
pub fn layout() -> &'static Layout {
    LAYOUTS[ACTIVE.load(Ordering::Relaxed)]
}

// The selectors the entry stubs in asm/trap.S put in the frames they build, read with a memory
// operand (`pushq gdt_sel_user_code(%rip)`) because they differ by layout. Written by `init`
// before interrupts or user mode exist, read-only afterwards.
/// User CS in a SYSCALL frame (SYSRETQ's).
#[export_name = "gdt_sel_user_code"]
static SEL_USER_CODE: AtomicU64 = AtomicU64::new(0);
/// User SS in a SYSCALL frame (SYSRETQ's).
#[export_name = "gdt_sel_user_data"]
static SEL_USER_DATA: AtomicU64 = AtomicU64::new(0);
/// User CS in a SYSENTER frame (SYSEXITQ's, or `iretq`'s when SYSEXIT cannot reach it).
#[export_name = "gdt_sel_sysenter_ret_cs"]
static SEL_SYSENTER_RET_CS: AtomicU64 = AtomicU64::new(0);
/// User SS in a SYSENTER frame.
#[export_name = "gdt_sel_sysenter_ret_ss"]
static SEL_SYSENTER_RET_SS: AtomicU64 = AtomicU64::new(0);
/// Non-zero: the SYSENTER path returns with `iretq` (layout `low`).
#[export_name = "gdt_sysenter_ret_iretq"]
static SYSENTER_RET_IRETQ: AtomicU64 = AtomicU64::new(0);

/// IST slot (1-based, as in the gate) of the double-fault stack.
pub const IST_DOUBLE_FAULT: u8 = 1;

/// The 64-bit TSS (SDM vol. 3 §8.7, figure 8-11).
#[repr(C, packed(4))]
struct TaskStateSegment {
    reserved0: u32,
    rsp: [u64; 3],
    reserved1: u64,
    ist: [u64; 7],
    reserved2: u64,
    reserved3: u16,
    iomap_base: u16,
}

#[repr(C, align(16))]
struct Stack([u8; 16 * 1024]);

// All zero, so it lives in .bss (the sparse table alone is 40 000 bytes); `init` fills it.
struct Tables {
    gdt: [u64; MAX_ENTRIES],
    tss: TaskStateSegment,
    double_fault_stack: Stack,
}

struct TablesCell(UnsafeCell<Tables>);
// SAFETY: filled once by `init` before interrupts are enabled; afterwards only RSP0 is written,
// by `set_rsp0` with interrupts off (one CPU).
unsafe impl Sync for TablesCell {}

static TABLES: TablesCell = TablesCell(UnsafeCell::new(Tables {
    gdt: [0; MAX_ENTRIES],
    tss: TaskStateSegment {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        iomap_base: 0,
    },
    double_fault_stack: Stack([0; 16 * 1024]),
}));

/// A 64-bit available-TSS descriptor (SDM vol. 3 §8.2.3, figure 8-4) as two GDT slots.
fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let low = (limit as u64 & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40) // P, DPL 0, type 9 (64-bit TSS, available)
        | (((limit as u64 >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    [low, base >> 32]
}

extern "C" {
    fn load_gdt(gdtr: *const DescriptorTablePointer, code: u64, data: u64);
}

/// Builds the GDT of `layout`, loads it (`lgdt`), reloads every segment register (CS through a
/// far return) and the task register (`ltr`), and publishes the selectors for the entry stubs.
pub fn init(layout: &'static Layout) {
    // By name, not address: each use of the `LAYOUTS` const may be a different copy.
    let index = LAYOUTS
        .iter()
        .position(|l| l.name == layout.name)
        .expect("a layout from LAYOUTS");
    ACTIVE.store(index, Ordering::Relaxed);
    let (ret_cs, ret_ss) = layout.sysenter_return();
    SEL_USER_CODE.store(layout.user_code as u64, Ordering::Relaxed);
    SEL_USER_DATA.store(layout.user_data as u64, Ordering::Relaxed);
    SEL_SYSENTER_RET_CS.store(ret_cs as u64, Ordering::Relaxed);
    SEL_SYSENTER_RET_SS.store(ret_ss as u64, Ordering::Relaxed);
    SYSENTER_RET_IRETQ.store(!layout.sysexit as u64, Ordering::Relaxed);

    // SAFETY: runs once on the boot CPU with interrupts off, before anything else uses TABLES,
    // so this is the only reference to them (the CPU only reads them after `load_gdt`).
    let tables = unsafe { &mut *TABLES.0.get() };
    // Every index is below `entries` <= MAX_ENTRIES (checked at compile time).
    let gdt = &mut tables.gdt;
    for &(selector, descriptor) in layout.descriptors {
        gdt[selector as usize / 8] = descriptor;
    }
    // Beyond the limit: no I/O permission bitmap, so Ring 3 has no port access at all.
    tables.tss.iomap_base = size_of::<TaskStateSegment>() as u16;
    let df_top = (&raw const tables.double_fault_stack) as u64 + size_of::<Stack>() as u64;
    tables.tss.ist[IST_DOUBLE_FAULT as usize - 1] = df_top;
    let tss = &raw const tables.tss;
    let [low, high] = tss_descriptor(tss as u64, size_of::<TaskStateSegment>() as u32 - 1);
    gdt[layout.tss as usize / 8] = low;
    gdt[layout.tss as usize / 8 + 1] = high;
    let gdtr = DescriptorTablePointer {
        limit: layout.limit(),
        base: gdt.as_ptr() as u64,
    };
    // SAFETY: the GDT is static and holds the layout's descriptors (checked against what the
    // entry stubs and SYSCALL/SYSENTER expect); its kernel code and data selectors are the ones
    // `load_gdt` reloads CS and the data segment registers with, at the CPL we run at.
    unsafe { load_gdt(&gdtr, layout.kernel_code as u64, layout.kernel_data as u64) };
    // SAFETY: `layout.tss` names the available 64-bit TSS descriptor just written into the
    // loaded GDT, pointing at the static TSS.
    unsafe { arch::ltr(layout.tss) };
}

/// Sets TSS.RSP0, the stack the CPU switches to on an interrupt or exception from Ring 3.
pub fn set_rsp0(top: u64) {
    // SAFETY: an aligned-enough field write (packed(4) keeps it 4-byte aligned) with interrupts
    // off (callers are in the scheduler's critical section); the CPU reads it only on a trap.
    let rsp0 = {
        let tables = TABLES.0.get();
        // SAFETY: `tables` points at the static TABLES; this only computes a field address
        // inside it (no reference is made).
        unsafe { &raw mut (*tables).tss.rsp[0] }
    };
    // SAFETY: `rsp0` is inside TABLES; unaligned write because packed(4) only keeps it 4-byte
    // aligned; interrupts are off (callers are in the scheduler's critical section) and the CPU
    // reads it only on a trap.
    unsafe { rsp0.write_unaligned(top) };
}

/// The GDTR this module loaded (base, limit), for the probe's comparison with `sgdt`.
pub fn gdtr() -> (u64, u16) {
    // SAFETY: reading the address of a static.
    let base = unsafe { (&raw const (*TABLES.0.get()).gdt) as u64 };
    (base, layout().limit())
}
