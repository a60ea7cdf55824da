//! What debugging with `--gdb` relies on (docs/debugging.md): the VMM's and a guest's symbols do
//! not collide, so `break NAME` with both symbol files loaded means one place; and a debugging
//! session is not killed by the default timeout, while an explicit `--timeout` still applies.

use elf::endian::AnyEndian;
use elf::ElfBytes;
use std::collections::BTreeSet;
use std::path::Path;
use trapvmm::{boot, build_images, image_dir, repo_path};

/// The names of the symbols an ELF file defines (in a section: not undefined, not absolute).
fn defined_symbols(path: &Path) -> BTreeSet<String> {
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = ElfBytes::<AnyEndian>::minimal_parse(&data).expect("an ELF file");
    let (symbols, names) = file
        .symbol_table()
        .expect("a readable symbol table")
        .expect("a symbol table");
    symbols
        .iter()
        .filter(|s| s.st_shndx != elf::abi::SHN_UNDEF && s.st_shndx != elf::abi::SHN_ABS)
        .filter_map(|s| names.get(s.st_name as usize).ok())
        .filter(|name| !name.is_empty())
        .map(String::from)
        .collect()
}

/// The labels defined in the assembly files under `dir` (`name:` starting a line).
fn assembly_labels(dir: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    for entry in std::fs::read_dir(repo_path(dir)).expect("the directory") {
        let path = entry.expect("an entry").path();
        if path.extension().is_some_and(|e| e == "S") {
            let text = std::fs::read_to_string(&path).expect("the file");
            labels.extend(text.lines().filter_map(|line| {
                let (label, _) = line.split_once(':')?;
                let is_name = !label.is_empty()
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                is_name.then(|| label.to_string())
            }));
        }
    }
    labels
}

/// Whether both the VMM and a guest may define `name`: the shared Multiboot trampoline's labels
/// (the same code in both), the linker scripts' section bounds (`__text_start`), the compiler's
/// memory builtins, and Rust's mangled names (`_R...`: their paths say which crate, `kernel::`
/// or `guest_kernel::`, so gdb tells them apart).
fn shared_on_purpose(name: &str, trampoline: &BTreeSet<String>) -> bool {
    trampoline.contains(name)
        || name.starts_with("__")
        || name.starts_with("_R")
        || name.starts_with("_ZN")
        || matches!(name, "memcpy" | "memmove" | "memset" | "memcmp" | "bcmp")
}

#[test]
fn the_vmm_and_its_guests_have_no_symbol_in_common() {
    build_images();
    let trampoline = assembly_labels("boot/src");
    assert!(trampoline.contains("boot64_continue"), "{trampoline:?}");
    let host = defined_symbols(&image_dir().join("kernel"));
    assert!(host.contains("host_main") && host.contains("trap_common"));
    let mut guests = vec!["guest-kernel".to_string()];
    for entry in std::fs::read_dir(repo_path("tests/guests/src/bin")).expect("test guests") {
        let file = entry.expect("an entry").file_name();
        let name = file.to_string_lossy();
        guests.push(name.trim_end_matches(".rs").replace('_', "-"));
    }
    for guest in &guests {
        let theirs = defined_symbols(&image_dir().join(guest));
        let common: Vec<_> = host
            .intersection(&theirs)
            .filter(|name| !shared_on_purpose(name, &trampoline))
            .collect();
        assert!(
            common.is_empty(),
            "the VMM and {guest} both define {common:?}: `break` in gdb would stop in both"
        );
    }
}

#[test]
fn gdb_sessions_have_no_timeout_unless_one_is_asked_for() {
    // QEMU waits for a debugger that never comes: only the explicit --timeout ends it.
    let run = boot(&["--gdb", "--timeout", "3", "--append", "mode=selfcheck"]);
    run.expect_status(2);
    assert!(
        run.stderr.contains("run-qemu.sh: timed out after 3s"),
        "{run}"
    );
    assert!(!run.stderr.contains("no timeout while debugging"), "{run}");
    assert!(
        run.stderr.contains(" -ex 'add-symbol-file ")
            && run.stderr.contains(" -ex 'target remote localhost:1234'"),
        "the gdb command loads both symbol files\n{run}"
    );
}
