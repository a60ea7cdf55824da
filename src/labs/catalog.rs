//! The labs and what each one checks: the rubric. To add a lab, add an entry here, its student
//! file under `labs/`, its swap points and its document (docs/labs/README.md, "Adding a lab").

use super::{exited_with, lab7, printed, Boot, BootCheck, HostTests, Image, Lab, OwnChecks};
use crate::Run;

/// Every lab, by number.
pub const LABS: &[Lab] = &[LAB1, LAB2, LAB3, LAB4, LAB5, LAB6, LAB7];

/// Lab 1: your first guest.
const LAB1: Lab = Lab {
    number: 1,
    title: "your first guest",
    doc: "docs/labs/lab1-first-guest.md",
    student_file: "labs/lab1_first_guest.rs",
    build: &["-p", "test-guests", "--features", "test-guests/lab1"],
    kernel: Image::Normal("kernel"),
    host_tests: None,
    boots: &[Boot {
        guest: Image::Graded {
            student: "lab1-first-guest",
            reference: "lab1-reference",
        },
        args: &["--trace=insn,cr3,pf"],
        timeout_s: 30,
        checks: &[
            BootCheck {
                name: "it exits with success",
                expect: |run| exited_with(run, 0),
            },
            BootCheck {
                name: "it prints CR0, CR3 and CR4 as the entry contract sets them",
                expect: |run| printed(run, &["lab1: cr0=0x80010033 cr3=0x16000 cr4=0x20"]),
            },
            BootCheck {
                name: "MOV from CR0, CR3 and CR4 trapped and were emulated",
                expect: |run| {
                    traced(
                        run,
                        &[",cr0 -> emulated", ",cr3 -> emulated", ",cr4 -> emulated"],
                    )
                },
            },
            BootCheck {
                name: "RDMSR trapped and read the virtual IA32_EFER",
                expect: |run| {
                    traced(run, &["rdmsr -> emulated"])?;
                    printed(run, &["lab1: efer=0xd00"])
                },
            },
            BootCheck {
                name: "MOV to CR3 trapped: the shadow root switch",
                expect: |run| {
                    traced(run, &["mov cr3,"])?;
                    printed(run, &["lab1: cr3 reloaded"])
                },
            },
            BootCheck {
                name: "CLI and STI trapped into the CLI/STI stub (not traced)",
                expect: lab1_cli_sti,
            },
            BootCheck {
                name: "the #PF at 0x40000000 was reflected to its handler",
                expect: |run| {
                    traced(run, &["cr2=0x40000000 -> #PF reflected"])?;
                    printed(run, &["lab1: page fault at 0x40000000 error=0x0"])
                },
            },
        ],
    }],
    own_checks: None,
};

/// `Ok` when some `--trace` line contains each of `needles`.
fn traced(run: &Run, needles: &[&str]) -> Result<(), String> {
    match needles.iter().find(|n| {
        !run.lines()
            .any(|l| l.starts_with("[vmm] trace: ") && l.contains(*n))
    }) {
        None => Ok(()),
        Some(missing) => Err(format!("no trace line says '{missing}'")),
    }
}

/// The exit report counts the CLIs and STIs the CLI/STI stub handled: at least one of each.
fn lab1_cli_sti(run: &Run) -> Result<(), String> {
    printed(run, &["lab1: interrupts off and on"])?;
    let stub = run
        .lines()
        .find_map(|l| l.split_once("CLI/STI stub (not in the tables): "))
        .map(|(_, counts)| counts)
        .ok_or("no CLI/STI stub line in the exit report")?;
    let count = |name: &str| {
        stub.split(", ")
            .find_map(|part| part.strip_prefix(name))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    if count("CLI ") >= 1 && count("STI ") >= 1 {
        Ok(())
    } else {
        Err(format!("the stub saw {stub}"))
    }
}

/// The host kernel built with the student's code (`target/lab`), or the normal one.
const GRADED_KERNEL: Image = Image::Graded {
    student: "kernel",
    reference: "kernel",
};

/// Lab 2: the virtual interrupt flag.
const LAB2: Lab = Lab {
    number: 2,
    title: "the virtual interrupt flag",
    doc: "docs/labs/lab2-virtual-if.md",
    student_file: "labs/lab2_virtual_if.rs",
    build: &["-p", "kernel", "--features", "kernel/lab2"],
    kernel: GRADED_KERNEL,
    host_tests: Some(HostTests {
        package: "vmm-core",
        feature: "lab2",
        module: "cpu::tests",
        tests: &[
            "real_rflags_keep_arithmetic_flags_but_force_if_and_iopl_0",
            "real_rflags_never_give_the_guest_the_machine",
            "cli_at_cpl0_clears_the_virtual_if_and_retires",
            "cli_in_guest_user_mode_is_a_gp_delivered_on_the_tss_stack",
            "cli_is_allowed_in_user_mode_when_iopl_is_3",
            "sti_in_guest_user_mode_is_gp_and_leaves_if_alone",
            "sti_sets_if_and_a_one_instruction_shadow_only_when_if_was_clear",
            "sti_then_hlt_never_loses_the_wakeup",
            "pushf_in_an_interrupt_shadow_is_pushed_with_the_virtual_flags_and_no_tf",
            "pushf_in_a_mov_ss_shadow_pushes_if_0_and_never_rf",
            "iretq_to_user_mode_switches_privilege_and_loads_the_popped_state",
            "iretq_in_the_kernel_loads_if_and_iopl_but_no_reserved_bit",
            "iretq_in_user_mode_cannot_change_if_or_iopl",
            "iretq_in_user_mode_with_iopl_3_loads_if_but_not_iopl",
            "a_16_bit_iret_keeps_the_rflags_bits_above_the_popped_word",
        ],
    }),
    boots: &[
        Boot {
            guest: Image::Normal("cli-hlt"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "after CLI the guest cannot be woken",
                expect: lab2_cli_hlt,
            }],
        },
        Boot {
            guest: Image::Normal("pushf-after-sti"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "STI's shadow and PUSHF's image",
                expect: lab2_pushf_after_sti,
            }],
        },
        Boot {
            guest: Image::Normal("user-mode-low-selectors"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "CLI in user mode is #GP(0)",
                expect: lab2_user_mode,
            }],
        },
        Boot {
            guest: Image::Normal("guest-kernel"),
            args: &[],
            timeout_s: 120,
            checks: &[BootCheck {
                name: "the self-test",
                expect: lab2_selftest,
            }],
        },
    ],
    own_checks: None,
};

fn lab2_cli_hlt(run: &Run) -> Result<(), String> {
    exited_with(run, 4)?;
    printed(run, &["[vmm] guest stopped: guest halted forever"])
}

fn lab2_pushf_after_sti(run: &Run) -> Result<(), String> {
    printed(
        run,
        &[
            "no-irq: pushed rflags=0x212 TF=0 IF=1 #DB=0 irqs=0 -> ok",
            "irq-pending: pushed rflags=0x212 TF=0 IF=1 #DB=0 irqs=",
            "first irq after pushfq -> ok",
        ],
    )?;
    exited_with(run, 0)
}

fn lab2_user_mode(run: &Run) -> Result<(), String> {
    printed(
        run,
        &["phase cli: vector=13 error=0x0", "5 phases, 0 wrong"],
    )?;
    exited_with(run, 0)
}

fn lab2_selftest(run: &Run) -> Result<(), String> {
    selftest_passes(
        run,
        &[
            "check irq-held-while-cli: ok",
            "check preemption: ok",
            "check kill-cli: ok",
        ],
    )
}

/// The guest kernel's self-test ran every check, these among them, and none failed.
fn selftest_passes(run: &Run, checks: &[&str]) -> Result<(), String> {
    printed(run, checks)?;
    let summary = run
        .lines()
        .find(|l| l.starts_with("[guest] selftest: "))
        .ok_or_else(|| format!("no self-test summary ({})", super::outcome(run)))?;
    if !summary.ends_with(", 0 failed") {
        return Err(summary.to_string());
    }
    exited_with(run, 0)
}

/// Lab 3: MOV CR3 and the shadow root switch.
const LAB3: Lab = Lab {
    number: 3,
    title: "MOV CR3 and the shadow root switch",
    doc: "docs/labs/lab3-shadow-root-switch.md",
    student_file: "labs/lab3_shadow_root_switch.rs",
    build: &["-p", "kernel", "--features", "kernel/lab3"],
    kernel: GRADED_KERNEL,
    host_tests: Some(HostTests {
        package: "shadow-mmu",
        feature: "lab3",
        module: "tests",
        tests: &[
            "scenarios::an_address_space_is_named_by_its_pml4_address_alone",
            "exhaustive::walker_matches_reference_on_every_permutation",
            "scenarios::new_rejects_a_tiny_quota_and_copies_the_vmm_slot_supervisor_only",
            "scenarios::kernel_view_fill_then_dirty_upgrade",
            "scenarios::cached_policy_keeps_shadows_per_cr3_and_zaps_exactly_on_pte_writes",
            "scenarios::switching_back_to_an_address_space_finds_its_shadows_and_makes_it_most_recently_used",
            "scenarios::a_root_switch_never_frees_the_roots_that_were_current",
            "scenarios::a_root_switch_makes_remembered_shadow_lookups_stale",
            "scenarios::quota_is_respected_by_reclaiming_least_recently_used_roots",
        ],
    }),
    boots: &[
        Boot {
            guest: Image::Normal("interrupt-after-mov-cr3"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "an interrupt right after MOV CR3 uses the new address space",
                expect: |run| {
                    printed(
                        run,
                        &["interrupt-after-mov-cr3: the interrupt after mov cr3 went through the new address space: ok"],
                    )?;
                    exited_with(run, 0)
                },
            }],
        },
        Boot {
            guest: Image::Normal("garbage-cr3"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "a CR3 beyond guest RAM is a clean stop",
                expect: |run| {
                    exited_with(run, 4)?;
                    printed(
                        run,
                        &["[vmm] guest stopped: guest-physical address 0x70000000 is outside guest RAM"],
                    )
                },
            }],
        },
        Boot {
            guest: Image::Normal("guest-kernel"),
            args: &[],
            timeout_s: 120,
            checks: &[BootCheck {
                name: "the self-test",
                expect: |run| {
                    selftest_passes(
                        run,
                        &[
                            "check cr3-isolation: ok",
                            "check spawn-wait-from-user: ok",
                            "check yield: ok",
                            "check round-robin: ok",
                            "check no-frame-leak: ok",
                        ],
                    )
                },
            }],
        },
    ],
    own_checks: None,
};

/// Lab 4: the shadow page fault.
const LAB4: Lab = Lab {
    number: 4,
    title: "the shadow page fault",
    doc: "docs/labs/lab4-shadow-page-fault.md",
    student_file: "labs/lab4_shadow_page_fault.rs",
    build: &["-p", "kernel", "--features", "kernel/lab4"],
    kernel: GRADED_KERNEL,
    host_tests: Some(HostTests {
        package: "shadow-mmu",
        feature: "lab4",
        module: "tests",
        tests: &[
            "exhaustive::walker_matches_reference_on_every_permutation",
            "scenarios::supervisor_error_code_is_computed_from_the_virtual_privilege",
            "scenarios::execute_disable_is_kept_and_fetch_faults_report_i_d",
            "scenarios::wp0_lets_the_kernel_view_write_read_only_pages_but_not_the_user_view",
            "scenarios::kernel_view_fill_then_dirty_upgrade",
            "scenarios::cached_policy_keeps_shadows_per_cr3_and_zaps_exactly_on_pte_writes",
        ],
    }),
    boots: &[
        Boot {
            guest: Image::Normal("user-mode-low-selectors"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "a user read of a kernel page is the guest's #PF(0x5)",
                expect: |run| {
                    printed(
                        run,
                        &[
                            "phase iretq-read-kernel: vector=14 error=0x5 cr2=0x",
                            "5 phases, 0 wrong",
                        ],
                    )?;
                    exited_with(run, 0)
                },
            }],
        },
        Boot {
            guest: Image::Normal("rep-bomb"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "a kernel read and write of an unmapped page: #PF(0x0), #PF(0x2)",
                expect: |run| {
                    printed(
                        run,
                        &[
                            "rep-bomb outsb: #PF error=0x0 cr2=0x4000001000 rip=insn+0",
                            "rep-bomb insb: #PF error=0x2 cr2=0x4000001000 rip=insn+0",
                        ],
                    )?;
                    exited_with(run, 0)
                },
            }],
        },
        Boot {
            guest: Image::Normal("page-table-self-map"),
            args: &[],
            timeout_s: 60,
            checks: &[BootCheck {
                name: "page-table stores through a self-map, emulated",
                expect: |run| {
                    printed(run, &["page-table-self-map: 4 phases, 0 wrong"])?;
                    exited_with(run, 0)
                },
            }],
        },
        Boot {
            guest: Image::Normal("guest-kernel"),
            args: &[],
            timeout_s: 120,
            checks: &[BootCheck {
                name: "the self-test",
                expect: lab4_selftest,
            }],
        },
    ],
    own_checks: None,
};

fn lab4_selftest(run: &Run) -> Result<(), String> {
    selftest_passes(
        run,
        &[
            "check kernel-wp: ok",
            "check demand-zero: ok",
            "check cr3-isolation: ok",
            "check kill-null-deref: ok",
            "check kill-write-text: ok",
            "check kill-read-kernel: ok",
            "check user-read-kernel-page: ok",
            "check kill-exec-heap: ok",
        ],
    )
}

/// Lab 5: virtual interrupt injection.
const LAB5: Lab = Lab {
    number: 5,
    title: "virtual interrupt injection",
    doc: "docs/labs/lab5-virtual-interrupts.md",
    student_file: "labs/lab5_virtual_interrupts.rs",
    build: &["-p", "kernel", "--features", "kernel/lab5"],
    kernel: GRADED_KERNEL,
    host_tests: Some(HostTests {
        package: "vmm-core",
        feature: "lab5",
        module: "",
        tests: &[
            "cpu::tests::the_injection_decision_on_every_state_of_if_the_shadow_hlt_and_the_pic",
            "cpu::tests::no_interrupt_is_injected_while_if_is_clear",
            "cpu::tests::the_shadow_ends_once_rip_moves_on",
            "cpu::tests::sti_then_hlt_never_loses_the_wakeup",
            "cpu::tests::hlt_with_interrupts_enabled_idles_until_one_is_pending",
            "cpu::tests::hlt_with_interrupts_disabled_is_a_stop_not_a_hang",
            "devices::pic::tests::the_priority_resolver_follows_the_datasheet_on_every_register_state",
            "devices::pic::tests::fixed_priority_and_nesting",
            "devices::pic::tests::a_masked_level_in_service_still_blocks_lower_requests",
            "devices::pic::tests::a_level_in_service_blocks_a_new_request_on_the_same_line",
            "devices::pic::tests::ocw1_masks_and_reads_back",
            "devices::pic::tests::second_slave_request_waits_for_both_eois",
        ],
    }),
    boots: &[
        Boot {
            guest: Image::Normal("cli-hlt"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "CLI then HLT is a guest halted forever, not a hang",
                expect: lab2_cli_hlt,
            }],
        },
        Boot {
            guest: Image::Normal("pushf-after-sti"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "the interrupt pending at STI comes after the next instruction",
                expect: lab2_pushf_after_sti,
            }],
        },
        Boot {
            guest: Image::Normal("interrupt-after-mov-cr3"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "the interrupt held by STI's shadow, taken after MOV CR3",
                expect: |run| {
                    printed(
                        run,
                        &["interrupt-after-mov-cr3: the interrupt after mov cr3 went through the new address space: ok"],
                    )?;
                    exited_with(run, 0)
                },
            }],
        },
        Boot {
            guest: Image::Normal("guest-kernel"),
            args: &[],
            timeout_s: 120,
            checks: &[BootCheck {
                name: "the self-test",
                expect: |run| {
                    selftest_passes(
                        run,
                        &[
                            "check timer-ticks: ok",
                            "check pic-imr: ok",
                            "check irq-held-while-cli: ok",
                            "check kernel-sleep: ok",
                            "check preemption: ok",
                        ],
                    )
                },
            }],
        },
    ],
    own_checks: None,
};

/// Lab 7: measure a new trap. Its checks are its own (`lab7`): a report against three runs.
const LAB7: Lab = Lab {
    number: 7,
    title: "measure a new trap",
    doc: "docs/labs/lab7-measure-a-trap.md",
    student_file: "labs/lab7_new_trap.rs",
    build: &["-p", "guest-kernel", "--features", "guest-kernel/lab7"],
    kernel: Image::Normal("kernel"),
    host_tests: None,
    boots: &[],
    own_checks: Some(OwnChecks {
        images: &[lab7::GUEST],
        run: lab7::checks,
    }),
};

/// Lab 6: system-call forwarding.
const LAB6: Lab = Lab {
    number: 6,
    title: "system-call forwarding",
    doc: "docs/labs/lab6-system-calls.md",
    student_file: "labs/lab6_system_calls.rs",
    build: &["-p", "kernel", "--features", "kernel/lab6"],
    kernel: GRADED_KERNEL,
    host_tests: Some(HostTests {
        package: "vmm-core",
        feature: "lab6",
        module: "cpu::tests",
        tests: &[
            "syscall_is_forwarded_to_lstar_at_cpl0",
            "syscall_saves_rflags_in_r11_and_clears_exactly_the_fmask_bits",
            "syscall_takes_its_selectors_from_star_with_the_rpl_cleared",
            "syscall_without_sce_at_the_real_entry_is_ud_at_the_instruction",
            "sysretq_returns_to_64_bit_user_code",
            "sysretq_loads_rflags_from_r11_without_rf_vm_or_reserved_bits",
            "sysretq_to_a_non_canonical_rcx_faults_in_the_kernel_not_the_host",
            "sysretq_in_user_mode_is_gp_and_without_sce_ud",
            "sysret_faults_in_the_manuals_order_before_anything_changes",
            "sysret_to_compatibility_mode_is_an_unsupported_stop",
        ],
    }),
    boots: &[
        Boot {
            guest: Image::Normal("sysret-noncanonical"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "SYSRETQ to a non-canonical RCX is the guest kernel's #GP(0)",
                expect: |run| {
                    printed(run, &["[guest] fault vector=13 error=0x0 rip=0x"])?;
                    exited_with(run, 4)
                },
            }],
        },
        Boot {
            guest: Image::Normal("swapgs-sysretq-fault"),
            args: &[],
            timeout_s: 30,
            checks: &[BootCheck {
                name: "the #GP is at the SYSRETQ, after the SWAPGS before it",
                expect: lab6_fault_at_the_sysretq,
            }],
        },
        Boot {
            guest: Image::Normal("guest-kernel"),
            args: &[],
            timeout_s: 120,
            checks: &[BootCheck {
                name: "the self-test",
                expect: |run| {
                    selftest_passes(
                        run,
                        &[
                            "check user-hello: ok",
                            "check syscall-path: ok",
                            "check exit-status: ok",
                            "check spawn-wait-from-user: ok",
                            "check yield: ok",
                            "check swapgs-balanced: ok",
                        ],
                    )
                },
            }],
        },
    ],
    own_checks: None,
};

/// The guest prints where its SYSRETQ is (`sysretq at 0x...`) and its #GP handler the RIP it
/// got (`fault vector=13 error=0x0 rip=0x...`): the two must be the same address.
fn lab6_fault_at_the_sysretq(run: &Run) -> Result<(), String> {
    let address_after = |prefix: &str| {
        run.lines().find_map(|l| {
            let (_, rest) = l.split_once(prefix)?;
            let hex: String = rest
                .trim_start_matches("0x")
                .chars()
                .take_while(char::is_ascii_hexdigit)
                .collect();
            u64::from_str_radix(&hex, 16).ok()
        })
    };
    let sysretq = address_after("sysretq at ")
        .ok_or_else(|| format!("{}; no 'sysretq at' line", super::outcome(run)))?;
    let fault = address_after("fault vector=13 error=0x0 rip=")
        .ok_or_else(|| format!("{}; no #GP(0) reported", super::outcome(run)))?;
    if fault != sysretq {
        return Err(format!(
            "the #GP(0) is at {fault:#x}, the SYSRETQ at {sysretq:#x}"
        ));
    }
    // The guest's #GP handler halts with interrupts off.
    exited_with(run, 4)
}
