//! The smallest well-behaved guest: reads its BootInfo, prints it, does some port I/O and exits
//! with success (or with the code `exit=N` names). It proves the VMM runs a guest that is not our
//! guest-kernel.
#![no_std]
#![no_main]

use test_guests::{boot_info, exit, inb, println};

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let info = unsafe { boot_info(info) };
    if info.magic != boot::BOOT_INFO_MAGIC {
        println(format_args!("bad BootInfo magic {:#x}", info.magic));
        exit(boot::exit_code::FAILURE);
    }
    // SAFETY: the contract says the command line is identity-mapped at cmdline_addr.
    let cmdline = unsafe {
        core::slice::from_raw_parts(info.cmdline_addr as *const u8, info.cmdline_len as usize)
    };
    let cmdline = core::str::from_utf8(cmdline).unwrap_or("<not UTF-8>");
    println(format_args!(
        "hello from a minimal guest: ram={} MiB cmdline='{}' reserved_va_start={:#x}",
        info.ram_bytes >> 20,
        cmdline,
        info.reserved_va_start
    ));
    // The 16550's line status register says the transmitter is empty (bits 5 and 6) when idle.
    println(format_args!("uart lsr={:#x}", inb(0x3FD) & 0x60));
    // `exit=N` (hex): leave with that code instead, to test what the VMM makes of a guest's
    // exit code that is one of the host's own.
    let code = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("exit="))
        .and_then(|v| u32::from_str_radix(v.trim_start_matches("0x"), 16).ok());
    exit(code.unwrap_or(boot::exit_code::SUCCESS))
}
