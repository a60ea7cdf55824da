//! QEMU boots of the host kernel on its own: self-checks, command-line errors, the panic path,
//! and run-qemu.sh's option handling.

use trapvmm::{boot, run_script};

#[test]
fn host_boot_passes_its_self_checks() {
    let run = boot(&["--timeout", "60", "--append", "mode=selfcheck"]);
    run.expect_status(0);
    run.expect_line("[vmm] trap-and-emulate VMM host kernel");
    run.expect_line("[vmm] cpu: vendor-intel=yes long-mode=yes nx=yes");
    for check in [
        "breakpoint-returns",
        "trap-frame-preserves-registers",
        "page-fault-caught",
        "timer-ticks",
        "frame-allocator",
        "heap",
        "error-code-vectors",
        "isolation-registers",
    ] {
        run.expect_line(&format!("[vmm] self-check {check}: ok"));
    }
    run.expect_line("[vmm] self-checks: 8 passed, 0 failed");
    run.expect_line("[vmm] module 0: ");
    assert!(
        run.lines()
            .all(|l| l.starts_with("[vmm] ") || l.starts_with("[guest] ")),
        "every line must carry its [vmm] or [guest] prefix\n{run}"
    );
}

#[test]
fn unknown_host_key_is_an_error_naming_the_valid_keys() {
    let run = boot(&["--timeout", "60", "--append", "bogus=1"]);
    run.expect_status(2);
    run.expect_line("[vmm] error: unknown key 'bogus'; valid keys: timer_hz=");
    assert!(
        !run.has_line("self-check"),
        "the host must stop before running anything\n{run}"
    );
}

#[test]
fn bad_host_value_is_an_error() {
    let run = boot(&["--timeout", "60", "--append", "timer_hz=0"]);
    run.expect_status(2);
    run.expect_line("[vmm] error: bad value '0' for 'timer_hz'; valid keys:");
}

#[test]
fn forced_host_panic_exits_with_status_3() {
    let run = boot(&["--timeout", "60", "--append", "debug=panic"]);
    run.expect_status(3);
    run.expect_line("[vmm] PANIC: panicked at kernel/src/main.rs:");
    run.expect_line("forced host panic");
}

#[test]
fn guest_ram_larger_than_the_machine_is_an_error() {
    // QEMU gets --mem + 96 MiB; asking the host for far more guest RAM than that must be refused.
    let run = boot(&["--timeout", "60", "--mem", "32", "--append", "mem=1024"]);
    run.expect_status(2);
    run.expect_line("[vmm] error: memory map too small");
    // The --append mem= wins for the host, and the script says so instead of hiding it.
    assert!(
        run.stderr.contains(
            "note: --append mem=1024 overrides --mem 32 for the host; QEMU still gets --mem + 96 MiB (128 MiB)"
        ),
        "{run}"
    );
    run.expect_line("[vmm] command line: ");
    assert!(
        run.lines()
            .any(|l| l.starts_with("[vmm] command line: ") && l.ends_with("kernel mem=1024")),
        "the host must get the one mem= only\n{run}"
    );
}

#[test]
fn unknown_script_option_prints_usage_and_exits_2() {
    let run = run_script(&["--bogus"]);
    assert_eq!(run.status, 2, "{run}");
    assert!(run.stderr.contains("unknown option '--bogus'"), "{run}");
    assert!(run.stderr.contains("usage: ./run-qemu.sh"), "{run}");
    assert!(
        run.stderr.contains("--native"),
        "usage must list the options\n{run}"
    );
}

#[test]
fn bad_script_values_are_rejected() {
    for args in [
        &["--mem", "lots"][..],
        &["--timeout", "0"],
        &["--guest", "/nonexistent/guest.elf"],
        &["--mem"],
    ] {
        let run = run_script(args);
        assert_eq!(run.status, 2, "{args:?}\n{run}");
        assert!(run.stderr.contains("usage:"), "{args:?}\n{run}");
    }
}

#[test]
fn help_exits_0() {
    let run = run_script(&["--help"]);
    assert_eq!(run.status, 0, "{run}");
    assert!(run.serial.contains("--icount"), "{run}");
    // The ranges and the test hook are in the help, not only in the README.
    assert!(run.serial.contains("guest RAM in MiB, 4..3072"), "{run}");
    assert!(run.serial.contains("debug=panic is a test hook"), "{run}");
    assert!(run.serial.contains("mem=N overrides --mem"), "{run}");
}

#[test]
fn script_options_that_cannot_apply_are_refused_with_the_reason() {
    // --trace and --append configure the VMM, which --native does not run.
    for args in [
        &["--native", "--trace"][..],
        &["--native", "--append", "trace=5"],
    ] {
        let run = run_script(args);
        assert_eq!(run.status, 2, "{args:?}\n{run}");
        assert!(
            run.stderr.contains("--native runs the guest with no VMM"),
            "{args:?}\n{run}"
        );
    }
    // A directory is not a guest image.
    let run = run_script(&["--guest", "docs"]);
    assert_eq!(run.status, 2, "{run}");
    assert!(
        run.stderr.contains("is a directory, not a guest ELF file"),
        "{run}"
    );
    // Native boot needs a Multiboot header: said so, not QEMU's "PVH ELF Note" error.
    let run = boot(&["--native", "--guest", "README.md"]);
    assert_eq!(run.status, 2, "{run}");
    assert!(run.stderr.contains("has no Multiboot 1 header"), "{run}");
}

#[test]
fn a_timer_rate_below_what_the_8254_can_tick_is_refused() {
    let run = boot(&["--timeout", "60", "--append", "timer_hz=18"]);
    run.expect_status(2);
    run.expect_line("[vmm] error: bad value '18' for 'timer_hz'; valid keys: timer_hz=<19..10000>");
}
