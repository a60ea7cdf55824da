//! A tiny runtime for the test guests: serial output, exit codes, and a fault-reporting IDT.
//!
//! The guests here keep the entry contract (boot/src/lib.rs) and nothing more, like a stranger's
//! guest would: they start at `_start` with RDI = BootInfo, write to COM1 directly and leave
//! through the isa-debug-exit port. Each hostile guest does one thing a VMM must survive.
#![no_std]

use core::fmt::{self, Write};

pub mod chaos_rounds;
pub mod machine;
pub mod probe;
pub mod ring3;
pub mod user_mode;

// Native boot (`./run-qemu.sh --native --guest PATH`): the shared Multiboot header and 32->64-bit
// trampoline, then the shared continuation that builds the BootInfo and enters `_start` as the
// VMM's loader does (linker.ld keeps the file laid out as memory and pulls these in).
core::arch::global_asm!(
    include_str!("../../../boot/src/multiboot32.S"),
    options(att_syntax)
);
core::arch::global_asm!(
    ".set BOOT_ENTRY, _start",
    include_str!("../../../boot/src/boot64_continue.S"),
    options(att_syntax)
);

const COM1: u16 = 0x3F8;

/// Writes a byte to an I/O port.
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output has no memory effects; the guest owns its (virtual) machine.
    unsafe {
        core::arch::asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack))
    };
}

/// Reads a byte from an I/O port.
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input has no memory effects.
    unsafe {
        core::arch::asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack))
    };
    value
}

/// Writes a 32-bit value to an I/O port.
pub fn outl(port: u16, value: u32) {
    // SAFETY: port output has no memory effects.
    unsafe {
        core::arch::asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack))
    };
}

/// Reads a 32-bit value from an I/O port.
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: port input has no memory effects.
    unsafe {
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack))
    };
    value
}

/// COM1 as a `fmt::Write` sink (polls the line status register, bounded, then writes THR).
#[derive(Debug)]
pub struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for b in s.bytes() {
            for _ in 0..100_000 {
                if inb(COM1 + 5) & 0x20 != 0 {
                    break;
                }
            }
            outb(COM1, b);
        }
        Ok(())
    }
}

/// Prints one `[guest] ...` line.
pub fn println(args: fmt::Arguments<'_>) {
    let _ = Serial.write_str("[guest] ");
    let _ = Serial.write_fmt(args);
    let _ = Serial.write_str("\n");
}

/// `println!("format", args...)`: one `[guest] ...` line, as [`println()`](fn@println) prints.
#[macro_export]
macro_rules! println {
    ($($arg:tt)*) => {
        $crate::println(format_args!($($arg)*))
    };
}

/// Leaves through isa-debug-exit (0x10 success, 0x11 failure).
pub fn exit(code: u32) -> ! {
    outl(boot::EXIT_PORT, code);
    halt_forever()
}

/// `cli; hlt` forever: the VMM must notice a guest that can never wake up.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: stops the CPU; no memory effects.
        unsafe { core::arch::asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Reads an MSR.
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: RDMSR has no memory effects; an unknown MSR faults (#GP), which is the point.
    unsafe {
        core::arch::asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes an MSR.
pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: WRMSR has no memory effects on this program's data.
    unsafe {
        core::arch::asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
            options(nomem, nostack))
    };
}

// Fault stubs for vectors 0..31: push a zero error code where the CPU pushes none, push the
// vector, and call `report_fault(vector, error_code, rip)`.
core::arch::global_asm!(
    r#"
.section .text
.balign 16
.global fault_stubs
fault_stubs:
.set fault_vector, 0
.rept 32
    .balign 16
    .if (fault_vector == 8) | ((fault_vector >= 10) & (fault_vector <= 14)) | (fault_vector == 17) | (fault_vector == 21) | (fault_vector == 29) | (fault_vector == 30)
    .else
    pushq $0
    .endif
    pushq $fault_vector
    jmp fault_common
    .set fault_vector, fault_vector + 1
.endr
fault_common:
    mov (%rsp), %rdi
    mov 8(%rsp), %rsi
    mov 16(%rsp), %rdx
    and $-16, %rsp
    call report_fault
    ud2
"#,
    options(att_syntax)
);

#[no_mangle]
extern "C" fn report_fault(vector: u64, error_code: u64, rip: u64) -> ! {
    println(format_args!(
        "fault vector={vector} error={error_code:#x} rip={rip:#x}"
    ));
    halt_forever()
}

#[repr(C, align(16))]
struct Idt([u64; 64]);
static mut IDT: Idt = Idt([0; 64]);

/// Loads an IDT whose 32 exception gates print `[guest] fault vector=N error=E rip=R` and then
/// halt with interrupts off (so the VMM stops the guest: exit status 4).
pub fn install_fault_handlers() {
    extern "C" {
        static fault_stubs: u8;
    }
    let base = core::ptr::addr_of!(fault_stubs) as u64;
    let idt = core::ptr::addr_of_mut!(IDT);
    // SAFETY: single-threaded guest; nothing else uses the IDT array.
    let idt = unsafe { &mut *idt };
    for v in 0..32u64 {
        let h = base + 16 * v;
        // 64-bit interrupt gate, DPL 0, present, selector 0x08 (the boot GDT's code segment).
        idt.0[2 * v as usize] =
            (h & 0xFFFF) | (0x08 << 16) | (0x8E00 << 32) | ((h >> 16) & 0xFFFF) << 48;
        idt.0[2 * v as usize + 1] = h >> 32;
    }
    load_idt(core::ptr::addr_of!(IDT) as u64, (32 * 16 - 1) as u16);
}

/// Loads IDTR.
pub fn load_idt(base: u64, limit: u16) {
    let mut pointer = [0u8; 10];
    pointer[..2].copy_from_slice(&limit.to_le_bytes());
    pointer[2..].copy_from_slice(&base.to_le_bytes());
    // SAFETY: LIDT only loads the register; the table is static (or deliberately bogus, which is
    // what the hostile guests test).
    unsafe { core::arch::asm!("lidt [{}]", in(reg) pointer.as_ptr(), options(readonly, nostack)) };
}

/// Reads the `BootInfo` the loader left at RDI.
///
/// # Safety
/// `info` must be the RDI value `_start` received.
pub unsafe fn boot_info(info: *const boot::BootInfo) -> boot::BootInfo {
    // SAFETY: the entry contract: RDI is the identity-mapped address of a BootInfo.
    unsafe { info.read() }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println(format_args!("panic: {info}"));
    exit(boot::exit_code::FAILURE)
}
