//! QEMU boots of the VMM with a guest (`mode=guest`): loading, entering Ring 3, stops.

use trapvmm::{boot, repo_path, test_guest};

fn run_guest(guest: &str, extra: &str) -> trapvmm::Run {
    let append = format!("mode=guest {extra}");
    boot(&[
        "--timeout",
        "60",
        "--guest",
        guest,
        "--append",
        append.trim(),
    ])
}

#[test]
fn a_non_elf_guest_image_is_refused_with_the_reason() {
    let readme = repo_path("README.md");
    let run = run_guest(readme.to_str().unwrap(), "");
    run.expect_status(2);
    run.expect_line("[vmm] error: guest image '");
    run.expect_line("not an ELF file: bad magic");
}

#[test]
fn the_guest_is_loaded_and_entered_at_ring3_on_shadow_page_tables() {
    let run = run_guest(&test_guest("hello"), "trace=8");
    run.expect_line("[vmm] guest: '");
    run.expect_line(
        "loaded: 3 PT_LOAD segment(s), entry 0x200000, 32 MiB RAM, boot area 0x10000..",
    );
    run.expect_line("[vmm] guest: entering at Ring 3 (rip=0x200000");
    // The first instruction fetch at Ring 3 faults on the empty shadow (I/D = 1, U/S = 1) and is
    // filled from the guest's boot page tables.
    run.expect_line("[vmm] trace: rip=0x200000 #PF page fault error=0x14 -> shadow fill");
}

#[test]
fn a_guest_that_makes_no_progress_is_stopped_by_the_watchdog() {
    let run = run_guest(&test_guest("spin"), "watchdog=50");
    run.expect_status(4);
    run.expect_line(
        "[vmm] guest stopped: no progress: at the same instruction for 50 host timer ticks",
    );
    run.expect_line("[vmm] traps (cost in TSC cycles");
    run.expect_line("[vmm] irq 0 ");
}
