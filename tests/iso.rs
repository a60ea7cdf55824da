//! The bootable CD image (`run-qemu.sh --iso`): GRUB boots the VMM with the guest kernel as its
//! Multiboot module, from `target/trapvmm.iso`, and the guest's self-test passes under the VMM.
//! Without grub-mkrescue (and no way to install it) this test fails with run-qemu.sh's message
//! saying what to install; it never skips.

use trapvmm::{boot, root, run_script};

#[test]
fn the_iso_boots_from_the_cd_and_the_selftest_passes_under_the_vmm() {
    let run = boot(&["--iso", "--timeout", "120"]);
    run.expect_status(0);
    assert!(
        run.stderr
            .contains("/target/trapvmm.iso (GRUB entry: multiboot /boot/trapvmm 'mem=32')"),
        "run-qemu.sh must say where the ISO is and what its GRUB entry holds\n{run}"
    );
    // GRUB, not QEMU's -kernel, loaded the VMM: GRUB 2 passes the options without the kernel's
    // path, and they are run-qemu.sh's default ones.
    assert!(
        run.lines().any(|l| l == "[vmm] command line: mem=32"),
        "the GRUB entry must carry exactly run-qemu.sh's default command line\n{run}"
    );
    run.expect_line("[vmm] module 0: '/boot/guest-kernel'");
    run.expect_line("[vmm] guest: entering at Ring 3");
    run.expect_line("[guest] selftest: 35 passed, 0 failed");
    run.expect_line("[vmm] traps (cost in TSC cycles");

    // An ISO 9660 image: the primary volume descriptor's "CD001" at byte 0x8001.
    let iso = std::fs::read(root().join("target/trapvmm.iso")).expect("target/trapvmm.iso");
    assert_eq!(iso.get(0x8001..0x8006), Some(&b"CD001"[..]));
}

#[test]
fn iso_options_that_cannot_apply_are_refused() {
    for (args, why) in [
        (
            &["--iso", "--native"][..],
            "--iso holds the VMM; --native boots the guest with no VMM",
        ),
        (
            &["--iso", "--icount"],
            "--icount is a QEMU setting; the ISO boots on machines without it",
        ),
    ] {
        let run = run_script(args);
        assert_eq!(run.status, 2, "{args:?}\n{run}");
        assert!(run.stderr.contains(why), "{args:?}\n{run}");
        assert!(run.stderr.contains("usage:"), "{args:?}\n{run}");
    }
}
