//! Links every test guest at 2 MiB, identity-mapped (only when building for bare metal).
include!("../../boot/link_bare_metal.rs");

fn main() {
    link_bare_metal("../../boot/src");
}
