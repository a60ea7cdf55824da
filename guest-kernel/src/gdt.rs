//! The OS's own GDT and TSS.
//!
//! Selector layout, fixed by SYSRET and SYSEXIT, which compute the user selectors from one MSR
//! value each (SDM vol. 2B "SYSRET", "SYSEXIT"):
//!
//! | selector | descriptor | used by |
//! |---|---|---|
//! | 0x08 | 64-bit code, DPL 0 | kernel CS; IA32_SYSENTER_CS; STAR[47:32] (SYSCALL CS) |
//! | 0x10 | data, DPL 0 | kernel SS/DS/ES; SYSCALL's and SYSENTER's SS (CS + 8) |
//! | 0x18 | 32-bit code, DPL 3 | STAR[63:48] base only (a 32-bit SYSRET would use it) |
//! | 0x20 | data, DPL 3 | user SS after SYSRET (base + 8) and on first entry (`iretq`) |
//! | 0x28 | 64-bit code, DPL 3 | user CS: SYSRETQ (base + 16) and SYSEXITQ (SYSENTER_CS + 32) |
//! | 0x30 | data, DPL 3 | user SS after SYSEXITQ (SYSENTER_CS + 40) |
//! | 0x38 | 64-bit TSS (two slots) | `ltr`: RSP0 for traps from Ring 3, IST1 for #DF |

use crate::arch::{self, DescriptorTablePointer};
use core::cell::UnsafeCell;
use core::mem::size_of;

/// Kernel code selector.
pub const KERNEL_CODE: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DATA: u16 = 0x10;
/// STAR[63:48]: the base SYSRET adds 8 (SS) and 16 (CS) to.
pub const SYSRET_BASE: u16 = 0x18 | 3;
/// User data selector (RPL 3), SS after `iretq` to a new process and after SYSRET.
pub const USER_DATA: u16 = 0x20 | 3;
/// User 64-bit code selector (RPL 3).
pub const USER_CODE: u16 = 0x28 | 3;
/// User data selector SYSEXIT loads into SS.
pub const USER_DATA_SYSEXIT: u16 = 0x30 | 3;
/// The TSS selector.
pub const TSS: u16 = 0x38;
// The layout rules SYSRET and SYSEXIT impose (SDM vol. 2B): CS = base + 16 / SYSENTER_CS + 32,
// SS = base + 8 / SYSENTER_CS + 40, RPL forced to 3.
const _: () = assert!(USER_CODE == (SYSRET_BASE + 16) | 3);
const _: () = assert!(USER_DATA == (SYSRET_BASE + 8) | 3);
const _: () = assert!(USER_CODE == (KERNEL_CODE + 32) | 3);
const _: () = assert!(USER_DATA_SYSEXIT == (KERNEL_CODE + 40) | 3);
const _: () = assert!(KERNEL_DATA == KERNEL_CODE + 8);

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

struct Tables {
    gdt: [u64; 9],
    tss: TaskStateSegment,
    double_fault_stack: Stack,
}

struct TablesCell(UnsafeCell<Tables>);
// SAFETY: filled once by `init` before interrupts are enabled; afterwards only RSP0 is written,
// by `set_rsp0` with interrupts off (one CPU).
unsafe impl Sync for TablesCell {}

static TABLES: TablesCell = TablesCell(UnsafeCell::new(Tables {
    gdt: [
        0,
        0x00AF_9A00_0000_FFFF, // 0x08 kernel code: P, DPL 0, exec/read, L
        0x00CF_9200_0000_FFFF, // 0x10 kernel data: P, DPL 0, read/write
        0x00CF_FA00_0000_FFFF, // 0x18 user code 32: P, DPL 3, exec/read, D
        0x00CF_F200_0000_FFFF, // 0x20 user data: P, DPL 3, read/write
        0x00AF_FA00_0000_FFFF, // 0x28 user code 64: P, DPL 3, exec/read, L
        0x00CF_F200_0000_FFFF, // 0x30 user data (SYSEXIT's SS)
        0,                     // 0x38 TSS low half (filled by init)
        0,                     // 0x40 TSS high half
    ],
    tss: TaskStateSegment {
        reserved0: 0,
        rsp: [0; 3],
        reserved1: 0,
        ist: [0; 7],
        reserved2: 0,
        reserved3: 0,
        // Beyond the limit: no I/O permission bitmap, so Ring 3 has no port access at all.
        iomap_base: size_of::<TaskStateSegment>() as u16,
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

/// Loads the GDT (`lgdt`), reloads every segment register (CS through a far return) and the task
/// register (`ltr`).
pub fn init() {
    let tables = TABLES.0.get();
    // SAFETY: runs once on the boot CPU with interrupts off, before anything else uses TABLES.
    unsafe {
        let tss = &raw const (*tables).tss;
        let [low, high] = tss_descriptor(tss as u64, size_of::<TaskStateSegment>() as u32 - 1);
        (*tables).gdt[7] = low;
        (*tables).gdt[8] = high;
        let df_top = (&raw const (*tables).double_fault_stack) as u64 + size_of::<Stack>() as u64;
        (*tables).tss.ist[IST_DOUBLE_FAULT as usize - 1] = df_top;
        let gdtr = DescriptorTablePointer {
            limit: (size_of::<[u64; 9]>() - 1) as u16,
            base: (&raw const (*tables).gdt) as u64,
        };
        load_gdt(&gdtr, KERNEL_CODE as u64, KERNEL_DATA as u64);
        arch::ltr(TSS);
    }
}

/// Sets TSS.RSP0, the stack the CPU switches to on an interrupt or exception from Ring 3.
pub fn set_rsp0(top: u64) {
    // SAFETY: an aligned-enough field write (packed(4) keeps it 4-byte aligned) with interrupts
    // off (callers are in the scheduler's critical section); the CPU reads it only on a trap.
    unsafe { (&raw mut (*TABLES.0.get()).tss.rsp[0]).write_unaligned(top) };
}

/// The GDTR this module loaded (base, limit), for the probe's comparison with `sgdt`.
pub fn gdtr() -> (u64, u16) {
    // SAFETY: reading the address of a static.
    let base = unsafe { (&raw const (*TABLES.0.get()).gdt) as u64 };
    (base, (size_of::<[u64; 9]>() - 1) as u16)
}
