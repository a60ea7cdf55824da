//! The teaching labs' student code (docs/labs/README.md). Built with the cargo feature `labN`,
//! the student's file `labs/labN_*.rs` (at the repository root) is compiled in here as
//! `labs::labN`, and each swap point — a reference function marked "Lab N" where it is defined —
//! is replaced by the student's function of the same name and signature. Without a lab feature
//! this module is empty: the normal build never sees student code.

/// Lab 2, the virtual interrupt flag: CLI/STI, the real RFLAGS, PUSHF's image, IRET's RFLAGS.
#[cfg(feature = "lab2")]
#[path = "../../labs/lab2_virtual_if.rs"]
pub(crate) mod lab2;

/// Lab 5, virtual interrupt injection: the injection decision and the 8259A's priority resolver.
#[cfg(feature = "lab5")]
#[path = "../../labs/lab5_virtual_interrupts.rs"]
pub(crate) mod lab5;

/// Lab 6, system-call forwarding: SYSCALL into the guest kernel, SYSRETQ and CVE-2012-0217.
#[cfg(feature = "lab6")]
#[path = "../../labs/lab6_system_calls.rs"]
pub(crate) mod lab6;
