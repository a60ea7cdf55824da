//! QEMU boots of the guest kernel on its own (`run-qemu.sh --native`): the self-test (in every
//! GDT layout, `gdt=`), bench and probe modes, command-line errors, and the kernel-fault report.
//! No VMM is involved; these runs are the reference the VMM's runs of the same image are
//! compared with.

use trapvmm::{boot, observations, Run};

fn native(words: &[&str]) -> Run {
    let mut args = vec!["--native", "--timeout", "60", "--"];
    args.extend_from_slice(words);
    boot(&args)
}

fn assert_all_prefixed(run: &Run) {
    assert!(
        run.lines().all(|l| l.starts_with("[guest] ")),
        "every guest line must start with [guest]\n{run}"
    );
}

/// The checks the self-test must report, in order (README.md lists what each one covers).
const CHECKS: &[&str] = &[
    "boot-info",
    "breakpoint",
    "timer-ticks",
    "pic-imr",
    "irq-held-while-cli",
    "tpr",
    "kernel-null-unmapped",
    "kernel-wp",
    "invlpg-remap",
    "kernel-sleep",
    "user-hello",
    "syscall-path",
    "sysenter-path",
    "int80-path",
    "exit-status",
    "spawn-wait-from-user",
    "sleep",
    "demand-zero",
    "yield",
    "cr3-isolation",
    "preemption",
    "round-robin",
    "kill-null-deref",
    "kill-write-text",
    "kill-read-kernel",
    "user-read-kernel-page",
    "kill-ud2",
    "kill-divide-zero",
    "kill-non-canonical",
    "kill-cli",
    "kill-exec-heap",
    "process-table-full",
    "reserved-range-unmapped",
    "no-frame-leak",
    "swapgs-balanced",
];

#[test]
fn selftest_passes_natively_and_is_deterministic() {
    let first = native(&["selftest"]);
    first.expect_status(0);
    assert_all_prefixed(&first);
    let obs = observations(&first.serial);
    let names: Vec<&str> = obs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, CHECKS, "checks missing or out of order\n{first}");
    assert!(obs.iter().all(|o| o.value == "ok"), "{first}");
    first.expect_line(&format!(
        "[guest] selftest: {} passed, 0 failed",
        CHECKS.len()
    ));
    // What user programs print and the kills they suffer are part of the output too.
    first.expect_line("[guest] user: hello from pid 2 through int 0x80");
    first.expect_line("[guest] user: write through SYSCALL");
    first.expect_line("[guest] user: write through SYSENTER");
    first.expect_line("[guest] user: write through int 0x80");
    first.expect_line("(null-deref) killed: page fault at 0x0 (error 0x4)");
    first.expect_line("(read-kernel) killed: page fault at 0x200000 (error 0x5)");
    first.expect_line("mode selftest, gdt sysret");
    // The default --mem 32, as under the VMM (run-qemu.sh gives the firmware its own MiB).
    first.expect_line("[guest] guest-kernel: 32 MiB RAM");
    first.expect_line("(ud2) killed: #UD invalid opcode (vector 6");

    // The default mode is the self-test, and every run prints exactly the same lines.
    let second = native(&[]);
    second.expect_status(0);
    assert_eq!(first.serial, second.serial, "two runs differ");
}

#[test]
fn selftest_passes_at_another_timer_rate_and_ram_size() {
    let run = boot(&["--native", "--timeout", "60", "--mem", "64", "--", "hz=250"]);
    run.expect_status(0);
    run.expect_line("timer 250 Hz, mode selftest");
    run.expect_line(&format!(
        "[guest] selftest: {} passed, 0 failed",
        CHECKS.len()
    ));
}

#[test]
fn selftest_passes_natively_with_the_smallest_ram_size() {
    // --mem 4 passes under the VMM; natively the firmware's 132 KiB at the top of RAM must not
    // take the guest below its 4 MiB minimum.
    let run = boot(&["--native", "--timeout", "60", "--mem", "4"]);
    run.expect_status(0);
    run.expect_line("[guest] guest-kernel: 4 MiB RAM");
    run.expect_line(&format!(
        "[guest] selftest: {} passed, 0 failed",
        CHECKS.len()
    ));
}

#[test]
fn bench_prints_a_table_and_csv_rows() {
    let run = native(&["bench", "iters=200"]);
    run.expect_status(0);
    assert_all_prefixed(&run);
    run.expect_line("operation");
    let rows: Vec<Vec<&str>> = run
        .lines()
        .filter_map(|l| l.strip_prefix("[guest] bench,"))
        .map(|l| l.split(',').collect())
        .collect();
    assert!(rows.len() >= 14, "only {} bench rows\n{run}", rows.len());
    for row in &rows {
        assert_eq!(row.len(), 4, "bad row {row:?}\n{run}");
        let iterations: u64 = row[1].parse().expect("iterations");
        let total: u64 = row[2].parse().expect("total");
        let per_op: u64 = row[3].parse().expect("per_op");
        // The compute loop runs 10 000 times longer than the others (guest-kernel/src/bench.rs).
        let cap = if row[0] == "compute_loop_user" {
            2_000_000
        } else {
            200
        };
        assert!(iterations > 0 && iterations <= cap, "{row:?}");
        assert_eq!(per_op, total / iterations, "{row:?}");
    }
    let ops: Vec<&str> = rows.iter().map(|r| r[0]).collect();
    for op in [
        "cli_sti",
        "pushf_popf",
        "mov_cr3_same_value",
        "mov_cr3_switch",
        "invlpg",
        "in_pic_imr",
        "out_pic_ocw3",
        "syscall_null_getpid",
        "sysenter_null_getpid",
        "int_0x80_null_getpid",
        "demand_zero_page_fault",
        "yield_ping_pong_round_trip",
        "spawn_exit_wait",
        "compute_loop_user",
    ] {
        assert!(ops.contains(&op), "no bench row {op}\n{run}");
    }
}

#[test]
fn probe_reports_ring_0_natively() {
    let run = native(&["probe"]);
    run.expect_status(0);
    assert_all_prefixed(&run);
    for line in [
        "probe,cs_rpl,0",
        "probe,ss_rpl,0",
        "probe,pushf_if_after_cli,0",
        "probe,popf_sets_if,1",
        "probe,sgdt_base_is_own,1",
        "probe,sidt_base_is_own,1",
        "probe,str,0x38",
        "probe,sldt,0x0",
        "probe,verr_kernel_data,1",
        "probe,verw_kernel_data,1",
    ] {
        run.expect_line(&format!("[guest] {line}"));
    }
    let obs = observations(&run.serial);
    for name in [
        "smsw",
        "lar_kernel_code",
        "lsl_kernel_code",
        "lar_tss",
        "cpuid_hypervisor_bit",
        "cpuid_40000000_signature",
    ] {
        assert!(obs.iter().any(|o| o.name == name), "no probe {name}\n{run}");
    }
}

#[test]
fn bad_command_line_names_the_valid_words() {
    for (words, what) in [
        (&["bogus"][..], "unknown mode or option 'bogus'"),
        (&["hz=5"][..], "bad value in 'hz=5'"),
        (&["probe", "bench"][..], "a second mode 'bench'"),
        (
            &["gdt=bogus"][..],
            "unknown GDT layout 'gdt=bogus' (valid layouts: sysret linux low sparse)",
        ),
    ] {
        let run = native(words);
        run.expect_status(1);
        run.expect_line(&format!("[guest] error: {what}"));
        run.expect_line("valid modes: selftest (default), bench, probe; valid options: hz=");
        assert!(!run.has_line("check "), "nothing may run\n{run}");
    }
}

/// The whole self-test under a non-default GDT layout (`gdt=`): every check passes, in order.
fn selftest_passes_with_layout(layout: &str) {
    let run = native(&[&format!("gdt={layout}")]);
    run.expect_status(0);
    run.expect_line(&format!("mode selftest, gdt {layout}"));
    let obs = observations(&run.serial);
    let names: Vec<&str> = obs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, CHECKS, "checks missing or out of order\n{run}");
    assert!(obs.iter().all(|o| o.value == "ok"), "{run}");
    run.expect_line(&format!(
        "[guest] selftest: {} passed, 0 failed",
        CHECKS.len()
    ));
}

#[test]
fn selftest_passes_with_the_linux_gdt_layout() {
    selftest_passes_with_layout("linux");
}

#[test]
fn selftest_passes_with_the_low_gdt_layout() {
    selftest_passes_with_layout("low");
}

#[test]
fn selftest_passes_with_the_sparse_gdt_layout() {
    selftest_passes_with_layout("sparse");
}

#[test]
fn probe_reports_the_selectors_of_the_layout() {
    for (layout, lines) in [
        (
            "sysret",
            &[
                "selector_kernel_code,0x8",
                "selector_user_code,0x2b",
                "selector_user_data,0x23",
                "selector_tss,0x38",
                "selector_beyond_limit,0x48",
            ][..],
        ),
        (
            "low",
            &[
                "sgdt_limit,0x37",
                "str,0x28",
                "selector_kernel_code,0x8",
                "selector_user_code,0x23",
                "lar_user_code,0xa0fa00",
                "selector_user_data,0x1b",
                "lar_user_data,0xc0f200",
                "selector_beyond_limit,0x38",
            ][..],
        ),
        (
            "sparse",
            &[
                "sgdt_limit,0x9c3f",
                "str,0x9c30",
                "cs_selector,0x8",
                "ss_selector,0x10",
                "selector_user_code,0x7d13",
                "lar_user_code,0xa0fa00",
                "selector_beyond_limit,0x9c40",
            ][..],
        ),
    ] {
        let run = native(&["probe", &format!("gdt={layout}")]);
        run.expect_status(0);
        run.expect_line(&format!("[guest] probe,gdt_layout,{layout}"));
        for line in lines {
            run.expect_line(&format!("[guest] probe,{line}"));
        }
        for probe in ["lar", "lsl"] {
            run.expect_line(&format!("[guest] probe,{probe}_beyond_limit,invalid"));
        }
        for probe in ["verr", "verw"] {
            run.expect_line(&format!("[guest] probe,{probe}_beyond_limit,0"));
        }
    }
}

#[test]
fn kernel_fault_prints_registers_and_fails() {
    let run = native(&["fault=kernel"]);
    run.expect_status(1);
    run.expect_line("[guest] kernel fault: vector 14 (#PF page fault) error 0x0 at rip 0x");
    run.expect_line("[guest]   rax 0x");
    run.expect_line("cr2 0x8 ");
}
