//! The Ring-0 host kernel: boots through boot/'s trampoline, takes over the CPU (GDT, TSS, IDT,
//! paging, PIC/PIT, serial), and runs the VMM. It is deliberately thin: architectural policy and
//! emulation live in `vmm-core` and `shadow-mmu`; this crate is the glue to real hardware and
//! the only place with `unsafe` code.
//!
//! Boot order (see docs/ARCHITECTURE.md): serial console -> command line -> GDT/TSS -> IDT ->
//! memory (frame allocator, own page tables with the direct map, heap) -> PIC/PIT -> CPU
//! features -> boot self-checks -> exit with the result.
#![no_std]
#![no_main]

extern crate alloc;

mod cpu;
mod exit;
mod gdt;
mod memory;
mod multiboot;
mod selfcheck;
mod serial;
mod timer;
mod trap;
mod vmm;

use vmm_core::config::{Backend, DebugAction, HostConfig, RunMode};

// The shared 32-bit Multiboot entry and long-mode trampoline, with the higher-half mapping the
// host kernel is linked for, then the host's own continuation and the trap entry stubs.
core::arch::global_asm!(
    ".set BOOT_HOST, 1",
    include_str!("../../boot/src/multiboot32.S"),
    options(att_syntax)
);
core::arch::global_asm!(include_str!("asm/entry64.S"), options(att_syntax));
core::arch::global_asm!(include_str!("asm/trap_entry.S"), options(att_syntax));
core::arch::global_asm!(include_str!("asm/cli_sti_stub.S"), options(att_syntax));
core::arch::global_asm!(include_str!("asm/fixups.S"), options(att_syntax));
core::arch::global_asm!(include_str!("asm/svm_run.S"), options(att_syntax));

/// The Rust entry point, called by `boot64_continue` on the higher-half kernel stack with the
/// physical address of the Multiboot information.
#[no_mangle]
extern "C" fn host_main(multiboot_info: u64) -> ! {
    serial::init();
    log::info!(
        "trap-and-emulate VMM host kernel {}",
        env!("CARGO_PKG_VERSION")
    );

    // SAFETY: the boot trampoline passes the Multiboot information address it was given in EBX;
    // its memory is identity-mapped by the boot page tables, which are still loaded.
    let boot = match unsafe { multiboot::BootData::read(multiboot_info) } {
        Ok(boot) => boot,
        Err(why) => exit::config_error(format_args!("{why}")),
    };
    let config = match HostConfig::parse(boot.cmdline(), true) {
        Ok(config) => config,
        Err(why) => exit::config_error(format_args!("{why}")),
    };
    log::info!("command line: {}", boot.cmdline());
    if config.debug == DebugAction::Panic {
        panic!("debug=panic on the command line: forced host panic");
    }

    gdt::init();
    trap::init();
    memory::init(boot);
    timer::init(config.timer_hz);
    let features = cpu::Features::detect();
    features.report();
    if let Err(missing) = features.require() {
        exit::config_error(format_args!(
            "this CPU lacks {missing}, which the VMM needs"
        ));
    }
    cpu::enable_host_features(&features);
    boot.report_modules();
    check_memory_fits(&config, boot);

    let result = selfcheck::run();
    if result.failed != 0 {
        exit::exit(boot::exit_code::FAILURE)
    }
    match (config.mode, boot.modules().next()) {
        (RunMode::Guest, Some(module)) => match config.backend {
            Backend::Trap => vmm::run(&config, module),
            Backend::Svm => vmm::run_svm(&config, module),
        },
        (RunMode::Guest, None) => exit::config_error(format_args!(
            "mode=guest but no guest module was loaded (QEMU: -initrd guest.elf; run-qemu.sh does that)"
        )),
        (RunMode::SelfCheck, _) => {
            log::info!("mode=selfcheck: not running the guest (mode=guest runs it)");
            exit::exit(boot::exit_code::SUCCESS)
        }
    }
}

/// Frames the VMM keeps for itself beyond guest RAM (shadow page tables, host structures).
const VMM_RESERVE_FRAMES: u64 = 1024;

/// Refuses configurations the machine cannot hold: guest RAM (plus the VMM's reserve) larger
/// than the free frames, or a guest image larger than guest RAM.
fn check_memory_fits(config: &HostConfig<'_>, boot: &multiboot::BootData) {
    let guest_bytes = u64::from(config.guest_mem_mib) << 20;
    let needed = guest_bytes / memory::FRAME_SIZE + VMM_RESERVE_FRAMES;
    let free = memory::frames::free_frames();
    if free < needed {
        exit::config_error(format_args!(
            "memory map too small: {} MiB free, but the guest needs {} MiB (mem=) plus {} MiB for the VMM",
            (free * memory::FRAME_SIZE) >> 20,
            config.guest_mem_mib,
            (VMM_RESERVE_FRAMES * memory::FRAME_SIZE) >> 20
        ));
    }
    for m in boot.modules() {
        let size = m.range.end.saturating_sub(m.range.start);
        if size > guest_bytes {
            exit::config_error(format_args!(
                "guest image '{}' is {size} bytes, larger than guest RAM ({} MiB)",
                m.name(),
                config.guest_mem_mib
            ));
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    serial::panic_print(format_args!("[vmm] PANIC: {info}"));
    exit::exit(boot::exit_code::HOST_PANIC)
}
