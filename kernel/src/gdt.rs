//! The VMM-owned GDT and TSS.
//!
//! Layout (selectors): 0x08 host code (64-bit, DPL 0), 0x10 host data (DPL 0), 0x18 guest data
//! (DPL 3), 0x20 guest code (64-bit, DPL 3), 0x28 the 64-bit TSS (two slots). The guest always
//! runs on 0x23/0x1b (RPL 3); the selectors the guest *thinks* it uses are virtual (vmm-core), so
//! any real load of them from CPL 3 traps. The TSS gives RSP0 (traps from Ring 3) and the IST
//! stacks for #DF, NMI and #MC, which must work even when the current stack is broken.

use core::cell::UnsafeCell;
use core::mem::size_of;
use x86::bits64::task::TaskStateSegment;
use x86::dtables::{lgdt, DescriptorTablePointer};
use x86::segmentation::SegmentSelector;
use x86::Ring;

/// Host kernel code selector.
pub const HOST_CODE: u16 = 0x08;
/// Host kernel data selector.
pub const HOST_DATA: u16 = 0x10;
/// The real data/stack selector the guest runs on (RPL 3).
pub const GUEST_DATA: u16 = 0x18 | 3;
/// The real code selector the guest runs on (RPL 3).
pub const GUEST_CODE: u16 = 0x20 | 3;
/// The task-state segment.
pub const TSS: u16 = 0x28;

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
    gdt: [u64; 7],
    tss: TaskStateSegment,
}

struct TablesCell(UnsafeCell<Tables>);
// SAFETY: written once by `init` on the boot CPU before interrupts are enabled; afterwards only
// the CPU reads the tables (and `set_rsp0` writes RSP0 with interrupts off).
unsafe impl Sync for TablesCell {}

static TABLES: TablesCell = TablesCell(UnsafeCell::new(Tables {
    gdt: [
        0,
        0x00AF_9A00_0000_FFFF, // 0x08 host code: P, DPL 0, code exec/read, L
        0x00CF_9200_0000_FFFF, // 0x10 host data: P, DPL 0, data read/write
        0x00CF_F200_0000_FFFF, // 0x18 guest data: P, DPL 3, data read/write
        0x00AF_FA00_0000_FFFF, // 0x20 guest code: P, DPL 3, code exec/read, L
        0,                     // 0x28 TSS, low half (filled by init)
        0,                     // 0x30 TSS, high half
    ],
    tss: TaskStateSegment::new(),
}));

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
    tables.gdt[5] = low;
    tables.gdt[6] = high;

    let pointer = DescriptorTablePointer::new(&tables.gdt);
    // SAFETY: the GDT is static and valid: 0x08/0x10 are the same kinds of descriptors the boot
    // GDT had, so reloading CS/SS with them keeps executing this code; the TSS descriptor points
    // at a static TSS and is marked available, as LTR requires.
    unsafe {
        lgdt(&pointer);
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
        );
        x86::task::load_tr(SegmentSelector::new(TSS / 8, Ring::Ring0));
    }
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
