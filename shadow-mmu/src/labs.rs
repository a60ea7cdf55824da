//! The teaching labs' student code (docs/labs/README.md). Built with the cargo feature `labN`,
//! the student's file `labs/labN_*.rs` (at the repository root) is compiled in here as
//! `labs::labN`, and each swap point — a reference function marked "Lab N" where it is defined —
//! is replaced by the student's function of the same name and signature. Without a lab feature
//! this module is empty: the normal build never sees student code.

// Lab 3, the shadow root switch, needs the shadow MMU's private state: its module is declared in
// `shadow/mod.rs` (`shadow::lab3`), where that state is visible.

/// Lab 4, the shadow page fault: the guest's access rights, its error code, the shadow leaf.
#[cfg(feature = "lab4")]
#[path = "../../labs/lab4_shadow_page_fault.rs"]
pub(crate) mod lab4;
