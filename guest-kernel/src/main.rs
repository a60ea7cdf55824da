//! guest-kernel: a small 64-bit OS written for Ring 0, the VMM's test guest.
//!
//! It knows nothing of the VMM: it boots natively through the shared Multiboot trampoline
//! (`boot/`) and `asm/entry.S`, or is entered by the VMM's loader at the same `e_entry` in the
//! same state (the guest boot protocol in `boot/src/lib.rs`). It then does what a kernel does
//! with privileged state (own GDT/TSS/IDT, per-process page tables, PIC/PIT/UART, the SYSCALL
//! and SYSENTER MSRs, Ring-3 processes with preemptive scheduling) and runs one mode from its
//! command line: `selftest` (default), `bench` or `probe`. README.md describes the whole OS.
#![no_std]
#![no_main]

mod abi;
mod arch;
mod bench;
mod config;
mod devices;
mod gdt;
mod memory;
mod probe;
mod process;
mod selftest;
mod serial;
mod sync;
mod syscall;
mod trap;
mod user;

use boot::BootInfo;
use config::{Config, Mode};

// The shared Multiboot 1 header and 32->64-bit trampoline and the shared continuation that
// builds the BootInfo (native boot) and enters e_entry, then this kernel's entries: e_entry, the
// GDT loader (entry.S), and the trap, system-call and context-switch stubs (trap.S).
core::arch::global_asm!(
    include_str!("../../boot/src/multiboot32.S"),
    options(att_syntax)
);
core::arch::global_asm!(
    ".set BOOT_ENTRY, guest_entry",
    include_str!("../../boot/src/boot64_continue.S"),
    options(att_syntax)
);
core::arch::global_asm!(include_str!("asm/entry.S"), options(att_syntax));
core::arch::global_asm!(include_str!("asm/trap.S"), options(att_syntax));

/// The longest command line kept.
const CMDLINE_MAX: usize = 512;

/// Called by `guest_entry` (e_entry) on kinit's stack with RDI = the BootInfo.
#[no_mangle]
extern "C" fn guest_main(info: *const BootInfo) -> ! {
    serial::init();
    // SAFETY: the entry contract puts an identity-mapped BootInfo at RDI.
    let info = unsafe { info.read() };
    if info.magic != boot::BOOT_INFO_MAGIC {
        println!(
            "error: BootInfo magic is {:#x}, not {:#x} (entered without the guest boot protocol)",
            info.magic,
            boot::BOOT_INFO_MAGIC
        );
        devices::exit(boot::exit_code::FAILURE);
    }
    let mut cmdline_buf = [0u8; CMDLINE_MAX];
    let len = (info.cmdline_len as usize).min(CMDLINE_MAX);
    // SAFETY: the contract says the command line is identity-mapped at cmdline_addr with that
    // length; copied before anything may reuse the boot area.
    unsafe {
        core::ptr::copy_nonoverlapping(
            info.cmdline_addr as *const u8,
            cmdline_buf.as_mut_ptr(),
            len,
        )
    };
    let cmdline = core::str::from_utf8(&cmdline_buf[..len]).unwrap_or("<not UTF-8>");
    let config = match Config::parse(cmdline) {
        Ok(c) => c,
        Err(e) => {
            println!("error: {e}; {}", config::USAGE);
            devices::exit(boot::exit_code::FAILURE);
        }
    };
    if info.ram_bytes < 4 << 20 {
        println!(
            "error: {} bytes of RAM reported; at least 4 MiB needed",
            info.ram_bytes
        );
        devices::exit(boot::exit_code::FAILURE);
    }

    gdt::init(config.gdt);
    trap::init();
    memory::init(
        info.ram_bytes,
        (info.boot_area_start, info.boot_area_end),
        info.reserved_va_start,
    );
    syscall::init();
    process::init();
    devices::pic_init();
    devices::pit_init(config.hz);
    println!(
        "guest-kernel: {} MiB RAM, timer {} Hz, mode {}, gdt {}",
        info.ram_bytes >> 20,
        config.hz,
        config.mode.name(),
        config.gdt.name
    );
    arch::sti();
    if config.kernel_fault {
        trap::fault_in_kernel();
    }

    let ok = match config.mode {
        Mode::Selftest => selftest::run(&info, &config),
        Mode::Bench => bench::run(&config),
        Mode::Probe => probe::run(),
    };
    devices::exit(if ok {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    arch::cli();
    println!("kernel panic: {info}");
    devices::exit(boot::exit_code::FAILURE)
}
