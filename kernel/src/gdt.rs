//! The real GDT and TSS: the guest's shadow descriptor table below, the VMM's own descriptors
//! in a reserved range at the top (vmm-core `cpu::shadow_gdt` has the rules and the layout).
//!
//! | index | selector | what |
//! |---|---|---|
//! | 0 .. 8186 | 0x0000 .. 0xFFD0 | the guest's descriptors at their own index, DPL 3, absent except the guest's current CS and SS (written by the VMM) |
//! | 8187 | 0xFFDB | the null-SS stand-in (DPL 3 data), present only while the guest's SS is null |
//! | 8188 | 0xFFE0 | host code (64-bit, DPL 0): IDT gates, STAR, SYSENTER_CS |
//! | 8189 | 0xFFE8 | host data (DPL 0): SYSCALL/SYSENTER's SS (code + 8) |
//! | 8190, 8191 | 0xFFF0 | the 64-bit TSS: RSP0 (traps from Ring 3), IST stacks for #DF, NMI, #MC |
//!
//! The table is the whole 64 KiB a GDTR can cover, so no guest selector is ever beyond the real
//! limit: every one names either a guest entry the VMM wrote or a reserved entry.

use core::cell::UnsafeCell;
use core::mem::size_of;
use vmm_core::cpu::shadow_gdt::{self, REAL_GDT_ENTRIES, SHADOWED_ENTRIES};
use x86::bits64::task::TaskStateSegment;
use x86::dtables::{lgdt, DescriptorTablePointer};
use x86::segmentation::SegmentSelector;
use x86::Ring;

/// Host kernel code selector.
pub const HOST_CODE: u16 = shadow_gdt::HOST_CODE;
/// Host kernel data selector.
pub const HOST_DATA: u16 = shadow_gdt::HOST_DATA;
/// The task-state segment.
pub const TSS: u16 = shadow_gdt::HOST_TSS;

/// IST slot (1-based, as in the IDT gate) of the double-fault stack.
pub const IST_DOUBLE_FAULT: u8 = 1;
/// IST slot of the NMI stack.
pub const IST_NMI: u8 = 2;
/// IST slot of the machine-check stack.
pub const IST_MACHINE_CHECK: u8 = 3;

const STACK_SIZE: usize = 16 * 1024;

#[repr(C, align(16))]
struct Stack<const N: usize>(UnsafeCell<[u8; N]>);
// SAFETY: each stack is used by the CPU only, through the TSS; Rust code never reads it.
unsafe impl<const N: usize> Sync for Stack<N> {}
impl<const N: usize> Stack<N> {
    const fn new() -> Self {
        Self(UnsafeCell::new([0; N]))
    }
    fn top(&self) -> u64 {
        self.0.get() as u64 + N as u64
    }
}

static DOUBLE_FAULT_STACK: Stack<STACK_SIZE> = Stack::new();
static NMI_STACK: Stack<STACK_SIZE> = Stack::new();
static MACHINE_CHECK_STACK: Stack<STACK_SIZE> = Stack::new();

struct Tables {
    gdt: [u64; REAL_GDT_ENTRIES],
    tss: TaskStateSegment,
}

struct TablesCell(UnsafeCell<Tables>);
// SAFETY: written once by `init` on the boot CPU before interrupts are enabled; afterwards only
// the CPU reads the tables (and `set_rsp0` writes RSP0 with interrupts off).
unsafe impl Sync for TablesCell {}

static TABLES: TablesCell = TablesCell(UnsafeCell::new(Tables {
    gdt: [0; REAL_GDT_ENTRIES],
    tss: TaskStateSegment::new(),
}));

/// Host code: P, DPL 0, code exec/read, L.
const HOST_CODE_DESCRIPTOR: u64 = 0x00AF_9A00_0000_FFFF;
/// Host data: P, DPL 0, data read/write.
const HOST_DATA_DESCRIPTOR: u64 = 0x00CF_9200_0000_FFFF;

/// A 64-bit available-TSS descriptor (SDM vol. 3 §8.2.3, figure 8-4), as two GDT slots.
fn tss_descriptor(base: u64, limit: u32) -> [u64; 2] {
    let low = (limit as u64 & 0xFFFF)
        | ((base & 0xFF_FFFF) << 16)
        | (0x89 << 40) // P, DPL 0, type 9 = 64-bit TSS (available)
        | (((limit as u64 >> 16) & 0xF) << 48)
        | (((base >> 24) & 0xFF) << 56);
    [low, base >> 32]
}

/// Loads the VMM's GDT and TSS and reloads every segment register.
pub fn init() {
    // SAFETY: single-threaded boot, interrupts off: nothing else accesses TABLES yet.
    let tables = unsafe { &mut *TABLES.0.get() };
    tables.tss.rsp[0] = trap_stack_top();
    tables.tss.ist[(IST_DOUBLE_FAULT - 1) as usize] = DOUBLE_FAULT_STACK.top();
    tables.tss.ist[(IST_NMI - 1) as usize] = NMI_STACK.top();
    tables.tss.ist[(IST_MACHINE_CHECK - 1) as usize] = MACHINE_CHECK_STACK.top();
    tables.tss.iomap_base = size_of::<TaskStateSegment>() as u16; // no I/O bitmap: all ports trap
    let tss_base = &tables.tss as *const TaskStateSegment as u64;
    let [low, high] = tss_descriptor(tss_base, size_of::<TaskStateSegment>() as u32 - 1);
    tables.gdt[usize::from(HOST_CODE / 8)] = HOST_CODE_DESCRIPTOR;
    tables.gdt[usize::from(HOST_DATA / 8)] = HOST_DATA_DESCRIPTOR;
    tables.gdt[usize::from(TSS / 8)] = low;
    tables.gdt[usize::from(TSS / 8) + 1] = high;

    let pointer = DescriptorTablePointer::new(&tables.gdt);
    // SAFETY: the GDT is static and valid: 0x08/0x10 are the same kinds of descriptors the boot
    // GDT had, so the segment registers loaded from the boot GDT stay usable until reloaded below.
    unsafe { lgdt(&pointer) };
    // SAFETY: HOST_CODE is a 64-bit DPL-0 code descriptor in the GDT just loaded, so the far
    // return keeps executing this code at the next label; HOST_DATA is a writable data
    // descriptor for SS/DS/ES, and FS/GS become null (the host does not address through them).
    unsafe {
        core::arch::asm!(
            "push {code}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {data:x}",
            "mov ds, {data:x}",
            "mov es, {data:x}",
            "mov {tmp:e}, 0",
            "mov fs, {tmp:x}",
            "mov gs, {tmp:x}",
            code = in(reg) u64::from(HOST_CODE),
            data = in(reg) HOST_DATA,
            tmp = out(reg) _,
        )
    };
    // SAFETY: the TSS descriptor in the loaded GDT points at the static TSS and is marked
    // available, as LTR requires.
    unsafe { x86::task::load_tr(SegmentSelector::new(TSS / 8, Ring::Ring0)) };
    // The real LDTR must be null, so that every guest LDT selector faults and is checked against
    // the guest's *virtual* LDT (vmm-core `cpu::shadow_gdt`). It is not null by itself: at reset
    // it is usable with base 0 and limit 0xFFFF (SDM Vol. 3 §10.1.1), and then the real CPU
    // resolves a guest's LDT selectors through linear 0..0xFFFF of the guest's own address
    // space: a call gate the guest writes there to the host code selector ran guest code at the
    // real CPL 0 (the `ldt-reset-value` test guest; docs/hostile-guests.md).
    // SAFETY: the null selector marks the LDTR unusable; the host uses no LDT selector.
    unsafe { core::arch::asm!("lldt {0:x}", in(reg) 0u16, options(nostack, preserves_flags)) };
}

/// The guest part of the real GDT (every guest index and the null-SS stand-in), for the VMM's
/// shadow descriptor table to write.
///
/// # Safety
/// Trap context (or before the guest first runs) with interrupts off, one CPU: the caller is
/// the only one holding the slice, and the CPU reads these entries only while loading a guest
/// segment, which cannot happen while the host runs.
pub unsafe fn guest_entries() -> &'static mut [u64] {
    // SAFETY: the caller's contract; the reserved entries above SHADOWED_ENTRIES stay out of the
    // slice, so the host's own descriptors cannot be changed through it.
    unsafe { &mut (&mut (*TABLES.0.get()).gdt)[..SHADOWED_ENTRIES] }
}

extern "C" {
    /// Top of the trap stack, defined in asm/trap_entry.S (the SYSCALL stub needs its address).
    #[link_name = "trap_stack_top"]
    static TRAP_STACK_TOP: u8;
}

/// Top of the stack the CPU switches to on a trap from Ring 3 (TSS.RSP0, IA32_SYSENTER_ESP).
pub fn trap_stack_top() -> u64 {
    core::ptr::addr_of!(TRAP_STACK_TOP) as u64
}
