//! Links the guest kernel with its own linker script (only when building for bare metal).
include!("../boot/link_bare_metal.rs");

fn main() {
    link_bare_metal("../boot/src");
}
