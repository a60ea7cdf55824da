//! Touches every 4 KiB page of guest RAM above its own image: writes each page's address into
//! its first quadword (through the boot identity map), then reads every one back, printing a
//! line per 8 MiB written.
//!
//! On the CPU all of RAM is there: every read gives what was written. A VMM that backs guest RAM
//! with host frames must back every page of it, and hand no frame out twice (this VMM reserves
//! the frames for all of guest RAM before the guest starts, and refuses to start a guest it
//! cannot back: `mem=512` on the host command line with QEMU's default 128 MiB is "memory map
//! too small", before any guest code runs). Expected outcome, natively and under the VMM:
//! `memory-exhaustion: N pages written and read back, 0 wrong` (N depends on the RAM size the
//! loader reports), exit success.
#![no_std]
#![no_main]

use test_guests::{exit, println};

/// The first byte after the image (the linker script's end of `.bss`).
fn image_end() -> u64 {
    extern "C" {
        static __mb_bss_end: u8;
    }
    core::ptr::addr_of!(__mb_bss_end) as u64
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    test_guests::install_fault_handlers();
    // SAFETY: RDI at entry, per the contract.
    let info = unsafe { test_guests::boot_info(info) };
    let start = (image_end() + 0xFFF) & !0xFFF;
    let end = info.ram_bytes;
    println(format_args!(
        "memory-exhaustion: touching {:#x}..{end:#x} ({} MiB of RAM)",
        start,
        end >> 20
    ));
    let mut page = start;
    while page < end {
        // SAFETY: guest RAM [0, ram_bytes) is identity-mapped (the entry contract), and nothing
        // lives above the image.
        unsafe { (page as *mut u64).write_volatile(page) };
        page += 4096;
        if page.is_multiple_of(8 << 20) {
            println(format_args!(
                "memory-exhaustion: written up to {} MiB",
                page >> 20
            ));
        }
    }
    let (mut pages, mut wrong) = (0u64, 0u64);
    let mut page = start;
    while page < end {
        // SAFETY: as above.
        if unsafe { (page as *const u64).read_volatile() } != page {
            wrong += 1;
        }
        pages += 1;
        page += 4096;
    }
    println(format_args!(
        "memory-exhaustion: {pages} pages written and read back, {wrong} wrong"
    ));
    exit(if wrong == 0 {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
