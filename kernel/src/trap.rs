//! The IDT and the one trap dispatcher.
//!
//! All 256 vectors enter through the assembly stubs in `asm/trap_entry.S`, which build one
//! [`TrapFrame`] and call [`trap_dispatch`]. There is no `x86-interrupt` ABI: a VMM needs every
//! general register of the interrupted context anyway, and one frame shape for every vector
//! keeps the path from stub to handler easy to follow (docs/ARCHITECTURE.md, "The trap path").

use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use x86::dtables::{lidt, DescriptorTablePointer};

use crate::{gdt, timer};

/// Every general register plus the vector, the error code and the CPU's interrupt frame, in the
/// order the entry stub pushes them (lowest address first).
#[repr(C)]
#[derive(Clone, Debug, Default)]
#[allow(missing_docs)]
pub struct TrapFrame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    /// The IDT vector (pushed by the stub).
    pub vector: u64,
    /// The CPU's error code, or 0 for vectors without one (pushed by the stub).
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// True when the trap interrupted Ring 3 (the guest), false when it interrupted the host.
    pub fn interrupted_ring3(&self) -> bool {
        self.cs & 3 == 3 || self.interrupted_vm86()
    }

    /// True when the trap interrupted virtual-8086 mode. Real CPUs never enter it in long
    /// mode, but QEMU's TCG lets a 32-bit IRET at CPL 3 set RFLAGS.VM there: only the guest
    /// can have done that, and its frame carries real-mode selectors (CS RPL 0).
    pub fn interrupted_vm86(&self) -> bool {
        self.rflags & vmm_core::cpu::state::rflags::VM != 0
    }
}

/// Line break inside a multi-line host report: every line still starts with `[vmm]`.
pub const REPORT_NEWLINE: &str = "\r\n[vmm]   ";

impl fmt::Display for TrapFrame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nl = REPORT_NEWLINE;
        write!(
            f,
            "vector={} error={:#x} rip={:#018x} cs={:#x} rflags={:#x} rsp={:#018x} ss={:#x}",
            self.vector, self.error_code, self.rip, self.cs, self.rflags, self.rsp, self.ss
        )?;
        write!(
            f,
            "{nl}rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
            self.rax, self.rbx, self.rcx, self.rdx
        )?;
        write!(
            f,
            "{nl}rsi={:#018x} rdi={:#018x} rbp={:#018x} r8 ={:#018x}",
            self.rsi, self.rdi, self.rbp, self.r8
        )?;
        write!(
            f,
            "{nl}r9 ={:#018x} r10={:#018x} r11={:#018x} r12={:#018x}",
            self.r9, self.r10, self.r11, self.r12
        )?;
        write!(
            f,
            "{nl}r13={:#018x} r14={:#018x} r15={:#018x}",
            self.r13, self.r14, self.r15
        )
    }
}

/// Exception vectors by their manual names (SDM vol. 3 §6.3.1, table 6-1).
pub mod vector {
    use vmm_core::cpu::event::vector as sdm;

    /// NMI.
    pub const NMI: u64 = sdm::NMI as u64;
    /// #DB debug.
    pub const DEBUG: u64 = sdm::DB as u64;
    /// #BP breakpoint (INT3).
    pub const BREAKPOINT: u64 = sdm::BP as u64;
    /// #UD invalid opcode.
    pub const INVALID_OPCODE: u64 = sdm::UD as u64;
    /// #DF double fault.
    pub const DOUBLE_FAULT: u64 = sdm::DF as u64;
    /// #NP segment not present.
    pub const SEGMENT_NOT_PRESENT: u64 = sdm::NP as u64;
    /// #SS stack-segment fault.
    pub const STACK_FAULT: u64 = sdm::SS as u64;
    /// #GP general protection.
    pub const GENERAL_PROTECTION: u64 = sdm::GP as u64;
    /// #PF page fault.
    pub const PAGE_FAULT: u64 = sdm::PF as u64;
    /// #MC machine check.
    pub const MACHINE_CHECK: u64 = sdm::MC as u64;
    /// Pseudo-vector of a SYSCALL from the guest (`syscall_entry` in asm/trap_entry.S).
    pub const SYSCALL: u64 = 256;
    /// Pseudo-vector of a SYSENTER from the guest (`sysenter_entry`).
    pub const SYSENTER: u64 = 257;
    /// First vector of the remapped master 8259 (IRQ 0, the PIT).
    pub const IRQ_BASE: u64 = 0x20;
}

/// The manual's mnemonic and name for an exception vector (vmm-core's exception table), "reserved"
/// for the others below 32, or "interrupt" for vectors 32..=255.
pub fn vector_name(vector: u64) -> impl fmt::Display {
    struct Name(u64);
    impl fmt::Display for Name {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match u8::try_from(self.0)
                .ok()
                .and_then(vmm_core::cpu::exception::exception)
            {
                Some(e) => write!(f, "{} {}", e.mnemonic, e.name),
                None if self.0 < 32 => write!(f, "reserved ({})", self.0),
                None => f.write_str("interrupt"),
            }
        }
    }
    Name(vector)
}

/// A 64-bit IDT gate descriptor (SDM vol. 3 §6.14.1, figure 6-8).
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    /// A present 64-bit interrupt gate (type 0xE: IF cleared on entry), DPL 0, so a software
    /// INT n from Ring 3 faults with #GP instead of entering the host (the VMM then emulates it).
    fn interrupt(handler: u64, ist: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: gdt::HOST_CODE,
            ist,
            type_attr: 0x8E,
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

struct Idt(UnsafeCell<[Gate; 256]>);
// SAFETY: filled once by `init` before interrupts are enabled; afterwards only the CPU reads it.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([Gate::MISSING; 256]));

extern "C" {
    static trap_stubs: u8;
    fn fixup_read_u64(addr: *const u64, out: *mut u64) -> u64;
    static fixup_read_u64_insn: u8;
    static fixup_read_u64_recover: u8;
    fn fixup_rdmsr(msr: u32, out: *mut u64) -> u64;
    fn fixup_copy(dst: *mut u8, src: *const u8, len: usize) -> usize;
    static cli_sti_stub_fetch: u8;
    static cli_sti_stub_bail: u8;
    static fixup_copy_insn: u8;
    static fixup_copy_recover: u8;
    static fixup_rdmsr_insn: u8;
    static fixup_rdmsr_recover: u8;
    fn trap_return(frame: *const TrapFrame) -> !;
    #[link_name = "trap_stack_top"]
    static TRAP_STACK_TOP: u8;
}

/// Enters Ring 3 with `frame`'s registers by "returning" from a made-up trap: the frame is copied
/// to the top of the trap stack, where a real trap from Ring 3 would have put it, and leaves
/// through the common exit path (`iretq`).
///
/// # Safety
/// `frame` must describe a valid Ring-3 context (RPL-3 selectors of present DPL-3 descriptors in
/// the real GDT) and the
/// loaded CR3 must map the host (slot 511) as well as wherever the frame points.
pub unsafe fn enter_ring3(frame: &TrapFrame) -> ! {
    let top = core::ptr::addr_of!(TRAP_STACK_TOP) as u64;
    let slot = (top - core::mem::size_of::<TrapFrame>() as u64) as *mut TrapFrame;
    // SAFETY: the slot is the top of the trap stack, which nothing uses while we are on the
    // kernel stack, and is aligned for a TrapFrame (the stack top is page-aligned and the frame
    // is a whole number of u64s).
    unsafe { slot.write(frame.clone()) };
    // SAFETY: `slot` now holds a valid Ring-3 frame (caller's contract) where a trap from Ring 3
    // would have put it, so trap_return runs on it exactly as after a trap; CR3 maps the host
    // and the frame's targets (caller's contract).
    unsafe { trap_return(slot) }
}

/// Size of one entry stub in `asm/trap_entry.S`.
const STUB_SIZE: u64 = 16;

/// Whether the entry stub of `vector` expects the CPU to have pushed an error code: the other
/// stubs begin with `pushq $0` (bytes 6A 00) to give every frame the same shape.
pub fn stub_expects_error_code(vector: u8) -> bool {
    let stub = core::ptr::addr_of!(trap_stubs) as u64 + STUB_SIZE * u64::from(vector);
    // SAFETY: the stubs are 256 × STUB_SIZE bytes of this image's text, mapped readable.
    let first = unsafe { core::ptr::read_volatile(stub as *const [u8; 2]) };
    first != [0x6A, 0x00]
}

/// Fills all 256 gates with the entry stubs and loads the IDT.
pub fn init() {
    let stubs = core::ptr::addr_of!(trap_stubs) as u64;
    // SAFETY: single-threaded boot with interrupts off; nothing else touches the IDT yet.
    let idt = unsafe { &mut *IDT.0.get() };
    for (vector, gate) in idt.iter_mut().enumerate() {
        let ist = match vector as u64 {
            vector::DOUBLE_FAULT => gdt::IST_DOUBLE_FAULT,
            vector::NMI => gdt::IST_NMI,
            vector::MACHINE_CHECK => gdt::IST_MACHINE_CHECK,
            _ => 0,
        };
        *gate = Gate::interrupt(stubs + STUB_SIZE * vector as u64, ist);
    }
    let pointer = DescriptorTablePointer::new(idt);
    // SAFETY: the IDT is static, every gate points at a stub in this image, and the IST slots it
    // names were set up by gdt::init.
    unsafe { lidt(&pointer) };
}

/// Traps seen by the dispatcher, by vector (for the self-checks and the exit report).
pub static TRAP_COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];
/// A SYSENTER began with TF set (see the #DB case of `trap_dispatch`).
static SYSENTER_SINGLE_STEP: AtomicBool = AtomicBool::new(false);

/// Whether the SYSENTER that just entered the VMM began with TF set; clears the record.
pub fn take_sysenter_single_step() -> bool {
    SYSENTER_SINGLE_STEP.swap(false, Ordering::Relaxed)
}

/// The CR2 of the last page fault recovered through the fixup table.
pub static LAST_RECOVERED_CR2: AtomicU64 = AtomicU64::new(0);

/// Reads a u64 at `addr`, returning `None` instead of faulting when it is not mapped.
pub fn read_u64_or_fault(addr: u64) -> Option<u64> {
    let mut value = 0;
    // SAFETY: `fixup_read_u64` only reads `addr` (a fault there is recovered by the dispatcher)
    // and writes `value`, a valid local.
    let faulted = unsafe { fixup_read_u64(addr as *const u64, &mut value) };
    (faulted == 0).then_some(value)
}

/// Copies `len` bytes from `src` to `dst` where either side may be unmapped in the current
/// address space: returns false (after copying a prefix) instead of faulting.
///
/// # Safety
/// The mapped parts of both ranges must be memory the caller may read (`src`) and write
/// (`dst`); in practice one side is a host buffer and the other guest memory.
pub unsafe fn copy_or_fault(dst: *mut u8, src: *const u8, len: usize) -> bool {
    // SAFETY: the caller's contract; a #PF inside the copy is recovered by the dispatcher.
    unsafe { fixup_copy(dst, src, len) == 0 }
}

/// Whether `rip` is inside the SYSENTER entry stub (asm/trap_entry.S).
fn in_sysenter_entry(rip: u64) -> bool {
    extern "C" {
        static sysenter_entry: u8;
        static sysenter_entry_len: u64;
    }
    let start = core::ptr::addr_of!(sysenter_entry) as u64;
    // SAFETY: a constant quadword in .rodata (asm/trap_entry.S).
    let len = unsafe { core::ptr::addr_of!(sysenter_entry_len).read() };
    (start..start + len).contains(&rip)
}

/// RDMSR that returns `None` instead of faulting when the MSR does not exist.
pub fn rdmsr_or_fault(msr: u32) -> Option<u64> {
    let mut value = 0;
    // SAFETY: RDMSR only reads; a #GP there is recovered by the dispatcher; `value` is a local.
    let faulted = unsafe { fixup_rdmsr(msr, &mut value) };
    (faulted == 0).then_some(value)
}

/// The one Rust entry for every trap, called by `trap_common` with the saved frame.
#[no_mangle]
extern "C" fn trap_dispatch(frame: &mut TrapFrame) {
    if let Some(counter) = TRAP_COUNTS.get(frame.vector as usize) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
    if frame.interrupted_ring3() || frame.vector >= 256 {
        return crate::vmm::handle_guest_trap(frame);
    }
    match frame.vector {
        vector::BREAKPOINT => {} // INT3 is a trap: RIP is already past it
        vector::PAGE_FAULT if frame.rip == core::ptr::addr_of!(fixup_read_u64_insn) as u64 => {
            // SAFETY: reading CR2 has no side effects; we are in the #PF handler, so it holds
            // the faulting address.
            LAST_RECOVERED_CR2.store(unsafe { x86::controlregs::cr2() } as u64, Ordering::Relaxed);
            frame.rip = core::ptr::addr_of!(fixup_read_u64_recover) as u64;
        }
        vector::PAGE_FAULT | vector::GENERAL_PROTECTION
            if frame.rip == core::ptr::addr_of!(cli_sti_stub_fetch) as u64 =>
        {
            // The CLI/STI stub could not read the guest's instruction (not mapped, or a
            // non-canonical RIP, which QEMU reports for a jump there): take the slow path.
            frame.rip = core::ptr::addr_of!(cli_sti_stub_bail) as u64;
        }
        vector::DEBUG if in_sysenter_entry(frame.rip) => {
            // SYSENTER does not clear TF (SDM Vol. 2B): a guest that single-steps into it
            // traps once in our stub. Finish the stub without TF, and tell the VMM, which
            // gives the guest its single-step trap at its own SYSENTER handler.
            // The step comes before the stub's first instruction, which records the guest's
            // NT and clears it: leave NT to the stub (this IRETQ runs with NT clear, as every
            // exception handler does, and may restore it).
            frame.rflags &= !vmm_core::cpu::state::rflags::TF;
            SYSENTER_SINGLE_STEP.store(true, Ordering::Relaxed);
        }
        vector::PAGE_FAULT if frame.rip == core::ptr::addr_of!(fixup_copy_insn) as u64 => {
            // RCX still counts the bytes left; the recovery label returns it.
            frame.rip = core::ptr::addr_of!(fixup_copy_recover) as u64;
        }
        vector::GENERAL_PROTECTION if frame.rip == core::ptr::addr_of!(fixup_rdmsr_insn) as u64 => {
            frame.rip = core::ptr::addr_of!(fixup_rdmsr_recover) as u64;
        }
        v if (vector::IRQ_BASE..vector::IRQ_BASE + 16).contains(&v) => {
            timer::handle_irq((v - vector::IRQ_BASE) as u8)
        }
        _ => fatal(frame),
    }
}

/// A trap the host cannot handle: print everything and panic (exit code HOST_PANIC).
fn fatal(frame: &TrapFrame) -> ! {
    // SAFETY: reading CR2 has no side effects.
    let cr2 = unsafe { x86::controlregs::cr2() };
    crate::serial::write_line(format_args!(
        "[vmm] unexpected {} in the host, cr2={:#x}{}{}",
        vector_name(frame.vector),
        cr2,
        REPORT_NEWLINE,
        frame
    ));
    panic!(
        "unexpected {} (vector {}) at rip={:#x}",
        vector_name(frame.vector),
        frame.vector,
        frame.rip
    )
}
