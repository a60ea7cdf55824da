// Shared by the build scripts of the three bare-metal images (kernel, guest-kernel, test
// guests), each of which `include!`s this file: link with the crate's own `linker.ld` when
// building for x86_64-unknown-none (host builds of the same crates link normally), and rebuild
// when the linker script, the crate's assembly or the shared Multiboot code (the trampoline
// multiboot32.S and the continuation boot64_continue.S) change.

/// Links the crate's binaries with `linker.ld`; `boot_src` is the path of boot/src relative to
/// the crate.
fn link_bare_metal(boot_src: &str) {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    if std::env::var("TARGET").unwrap_or_default() == "x86_64-unknown-none" {
        println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
        println!("cargo:rustc-link-arg-bins=-zmax-page-size=4096");
    }
    println!("cargo:rerun-if-changed=linker.ld");
    if std::path::Path::new(&dir).join("src/asm").exists() {
        println!("cargo:rerun-if-changed=src/asm");
    }
    println!("cargo:rerun-if-changed={boot_src}/multiboot32.S");
    println!("cargo:rerun-if-changed={boot_src}/boot64_continue.S");
}
