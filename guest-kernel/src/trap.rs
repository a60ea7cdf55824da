//! The IDT, the one trap dispatcher, and what happens on a fault.
//!
//! All 256 vectors are interrupt gates (IF cleared on entry) into the stubs of `asm/trap.S`;
//! vector 0x80 is the only gate with DPL 3 (`int 0x80` system calls), #DF has its own IST stack.
//! A fault in user mode kills the process and the system carries on; a fault in the kernel is
//! either an expected one (a demand-zero fill on a user address, or an access with a fixup, see
//! `FIXUPS`) or fatal: the registers are printed and the OS exits with status 0x11.

use crate::arch::{self, DescriptorTablePointer};
use crate::{devices, gdt, memory, println, process, serial, syscall};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

/// What every entry path saves (asm/trap.S), lowest address first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
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
    /// The vector, or 0x100 for SYSCALL, 0x101 for SYSENTER.
    pub vector: u64,
    /// The CPU's error code, or 0.
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl TrapFrame {
    /// True when the trap came from Ring 3 (CS.RPL = 3).
    pub fn came_from_user(&self) -> bool {
        self.cs & 3 == 3
    }
}

/// The vector of `int 0x80`.
pub const VECTOR_INT80: u8 = 0x80;
const VECTOR_BP: u64 = 3;
const VECTOR_DF: u64 = 8;
const VECTOR_PF: u64 = 14;

/// Exception mnemonics (SDM vol. 3 §6.15).
pub fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 21] = [
        "#DE divide error",
        "#DB debug",
        "NMI",
        "#BP breakpoint",
        "#OF overflow",
        "#BR bound range",
        "#UD invalid opcode",
        "#NM device not available",
        "#DF double fault",
        "coprocessor segment overrun",
        "#TS invalid TSS",
        "#NP segment not present",
        "#SS stack fault",
        "#GP general protection",
        "#PF page fault",
        "reserved",
        "#MF x87 error",
        "#AC alignment check",
        "#MC machine check",
        "#XM SIMD error",
        "#VE virtualization exception",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("exception")
}

/// Interrupts and exceptions counted by vector (for the self-test's checks).
static COUNTS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

/// How many times `vector` was taken.
pub fn count(vector: u8) -> u64 {
    COUNTS[vector as usize].load(Ordering::Relaxed)
}

#[repr(C, align(16))]
struct Idt(UnsafeCell<[[u64; 2]; 256]>);
// SAFETY: written once by `init` with interrupts off before `lidt`; read only by the CPU after.
unsafe impl Sync for Idt {}
static IDT: Idt = Idt(UnsafeCell::new([[0; 2]; 256]));

extern "C" {
    static trap_vectors: [u8; 256 * 16];
}

/// A 64-bit interrupt gate (SDM vol. 3 §6.14.1, figure 6-8): type 0xE clears IF on entry.
fn interrupt_gate(handler: u64, dpl: u8, ist: u8) -> [u64; 2] {
    let low = (handler & 0xFFFF)
        | (gdt::layout().kernel_code as u64) << 16
        | (ist as u64 & 7) << 32
        | (0x8E | (dpl as u64 & 3) << 5) << 40
        | ((handler >> 16) & 0xFFFF) << 48;
    [low, handler >> 32]
}

/// Fills the IDT and loads it (`lidt`).
pub fn init() {
    let stubs = (&raw const trap_vectors) as u64;
    // SAFETY: interrupts are off and nothing uses the IDT yet (IDTR limit is still 0).
    let idt = unsafe { &mut *IDT.0.get() };
    for (vector, gate) in idt.iter_mut().enumerate() {
        let dpl = if vector == VECTOR_INT80 as usize {
            3
        } else {
            0
        };
        let ist = if vector as u64 == VECTOR_DF {
            gdt::IST_DOUBLE_FAULT
        } else {
            0
        };
        *gate = interrupt_gate(stubs + 16 * vector as u64, dpl, ist);
    }
    let idtr = DescriptorTablePointer {
        limit: (256 * 16 - 1) as u16,
        base: IDT.0.get() as u64,
    };
    // SAFETY: every gate points at a stub that saves the frame and calls guest_trap_dispatch.
    unsafe { arch::lidt(&idtr) };
}

/// The IDTR `init` loaded (base, limit), for the probe's comparison with `sidt`.
pub fn idtr() -> (u64, u16) {
    (IDT.0.get() as u64, (256 * 16 - 1) as u16)
}

extern "C" {
    static copy_user_fault_ip: u8;
    static copy_user_fixup: u8;
    static probe_write_fault_ip: u8;
    static probe_write_fixup: u8;
    static probe_read_fault_ip: u8;
    static probe_read_fixup: u8;
}

/// Kernel instructions allowed to fault, and where each resumes (`asm/trap.S`); like Linux's
/// exception table, this is what lets the kernel touch user memory without trusting it.
fn fixup_for(rip: u64) -> Option<u64> {
    let table = [
        (&raw const copy_user_fault_ip, &raw const copy_user_fixup),
        (
            &raw const probe_write_fault_ip,
            &raw const probe_write_fixup,
        ),
        (&raw const probe_read_fault_ip, &raw const probe_read_fixup),
    ];
    table
        .iter()
        .find(|(ip, _)| *ip as u64 == rip)
        .map(|(_, fix)| *fix as u64)
}

/// Called by every interrupt-gate stub with the saved frame.
#[no_mangle]
extern "C" fn guest_trap_dispatch(frame: &mut TrapFrame) {
    let vector = frame.vector;
    COUNTS[vector as usize & 0xFF].fetch_add(1, Ordering::Relaxed);
    match vector {
        v if v == VECTOR_INT80 as u64 => syscall::dispatch(frame),
        v if (devices::IRQ_BASE as u64..devices::IRQ_BASE as u64 + 16).contains(&v) => {
            irq(frame, (v - devices::IRQ_BASE as u64) as u8)
        }
        VECTOR_BP if !frame.came_from_user() => {} // the self-test's breakpoint: just return
        v if v < 32 => exception(frame),
        _ => {
            if frame.came_from_user() {
                process::kill_current(frame, "unexpected interrupt vector");
            }
            kernel_fault(frame, "unexpected interrupt vector");
        }
    }
}

fn irq(frame: &mut TrapFrame, irq: u8) {
    if (irq == devices::IRQ_SPURIOUS_MASTER || irq == devices::IRQ_SPURIOUS_SLAVE)
        && !devices::pic_in_service(irq)
    {
        if irq == devices::IRQ_SPURIOUS_SLAVE {
            devices::pic_eoi(0); // the master did see the cascade
        }
        return;
    }
    devices::pic_eoi(irq);
    if irq == devices::IRQ_TIMER {
        process::timer_tick(frame.came_from_user());
    } else if irq == devices::IRQ_COM1 {
        serial::receive();
    }
}

fn exception(frame: &mut TrapFrame) {
    if frame.vector == VECTOR_PF {
        let addr = arch::cr2();
        // A not-present fault on a demand-zero page, from user mode or from the kernel copying
        // user data, is filled and the instruction restarted.
        if memory::handle_demand_fault(addr, frame.error) {
            return;
        }
        if frame.came_from_user() {
            process::kill_current(frame, "page fault");
        }
    } else if frame.came_from_user() {
        process::kill_current(frame, exception_name(frame.vector));
    }
    if let Some(fixup) = fixup_for(frame.rip) {
        frame.rip = fixup;
        return;
    }
    kernel_fault(frame, exception_name(frame.vector));
}

/// Reads an unmapped kernel address on purpose (`fault=kernel`): a #PF with no fixup.
pub fn fault_in_kernel() {
    // SAFETY: not safe at all by design: the fault ends the OS through kernel_fault.
    unsafe { core::arch::asm!("mov rax, [8]", out("rax") _, options(nostack, readonly)) };
}

/// A fault the kernel did not expect: print everything and exit with failure (never hang).
pub fn kernel_fault(frame: &TrapFrame, what: &str) -> ! {
    let f = frame;
    println!(
        "kernel fault: vector {} ({}) error {:#x} at rip {:#x} cs {:#x} rflags {:#x} rsp {:#x} ss {:#x}",
        f.vector, what, f.error, f.rip, f.cs, f.rflags, f.rsp, f.ss
    );
    println!(
        "  rax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}",
        f.rax, f.rbx, f.rcx, f.rdx
    );
    println!(
        "  rsi {:#018x} rdi {:#018x} rbp {:#018x} r8  {:#018x}",
        f.rsi, f.rdi, f.rbp, f.r8
    );
    println!(
        "  r9  {:#018x} r10 {:#018x} r11 {:#018x} r12 {:#018x}",
        f.r9, f.r10, f.r11, f.r12
    );
    println!(
        "  r13 {:#018x} r14 {:#018x} r15 {:#018x}",
        f.r13, f.r14, f.r15
    );
    println!(
        "  cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} pid {}",
        arch::cr0(),
        arch::cr2(),
        arch::cr3(),
        arch::cr4(),
        process::current_pid()
    );
    devices::exit(boot::exit_code::FAILURE)
}
