//! The exception table: one row per vector the architecture defines (SDM Vol. 3 §6.3.1,
//! Table 6-1; §6.15 for each exception), with its mnemonic, its name, whether the CPU pushes an
//! error code, its type (fault, trap, abort) and its double-fault class (Table 6-4).
//!
//! Everything that needs one of these facts reads it here: event delivery (the error code,
//! RF in fault frames, the double-fault rules), the trap table's names (`accounting`), and the
//! host kernel's trap names and entry stubs (a boot self-check compares the stubs' error-code
//! table with this one).

use super::event::ExceptionClass;

/// How an exception reports where it happened (SDM Vol. 3 §6.5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Reported before the instruction: the saved RIP points at it, and it can be restarted.
    Fault,
    /// Reported after the instruction: the saved RIP points at the next one.
    Trap,
    /// Not restartable (#DF, #MC).
    Abort,
    /// NMI (and AMD's #HV, injected by a hypervisor): an interrupt, not an exception.
    Interrupt,
    /// #DB: a fault for instruction breakpoints and general detect, a trap for single steps,
    /// data breakpoints and task switches.
    FaultOrTrap,
}

/// One row of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exception {
    /// The vector.
    pub vector: u8,
    /// The manual's mnemonic ("#GP").
    pub mnemonic: &'static str,
    /// The manual's name ("general protection").
    pub name: &'static str,
    /// Whether the CPU pushes an error code for it.
    pub error_code: bool,
    /// Fault, trap or abort.
    pub kind: Kind,
    /// Its class for the double-fault rules.
    pub class: ExceptionClass,
}

const fn row(
    vector: u8,
    mnemonic: &'static str,
    name: &'static str,
    error_code: bool,
    kind: Kind,
    class: ExceptionClass,
) -> Exception {
    Exception {
        vector,
        mnemonic,
        name,
        error_code,
        kind,
        class,
    }
}

use ExceptionClass::{Benign, Contributory, PageFault};
use Kind::{Abort, Fault, FaultOrTrap, Interrupt, Trap};

/// Every vector below 32 the architecture defines (15, 22–27 and 31 are reserved; 9, the
/// coprocessor segment overrun, no longer occurs; 28–30 are AMD's).
pub const EXCEPTIONS: [Exception; 24] = [
    row(0, "#DE", "divide error", false, Fault, Contributory),
    row(1, "#DB", "debug", false, FaultOrTrap, Benign),
    row(2, "NMI", "non-maskable interrupt", false, Interrupt, Benign),
    row(3, "#BP", "breakpoint", false, Trap, Benign),
    row(4, "#OF", "overflow", false, Trap, Benign),
    row(5, "#BR", "bound range", false, Fault, Benign),
    row(6, "#UD", "invalid opcode", false, Fault, Benign),
    row(7, "#NM", "device not available", false, Fault, Benign),
    row(8, "#DF", "double fault", true, Abort, Benign),
    row(
        9,
        "CSO",
        "coprocessor segment overrun",
        false,
        Abort,
        Benign,
    ),
    row(10, "#TS", "invalid TSS", true, Fault, Contributory),
    row(11, "#NP", "segment not present", true, Fault, Contributory),
    row(12, "#SS", "stack fault", true, Fault, Contributory),
    row(13, "#GP", "general protection", true, Fault, Contributory),
    row(14, "#PF", "page fault", true, Fault, PageFault),
    row(16, "#MF", "x87 error", false, Fault, Benign),
    row(17, "#AC", "alignment check", true, Fault, Benign),
    row(18, "#MC", "machine check", false, Abort, Benign),
    row(19, "#XM", "SIMD exception", false, Fault, Benign),
    row(20, "#VE", "virtualization exception", false, Fault, Benign),
    row(21, "#CP", "control protection", true, Fault, Benign),
    row(28, "#HV", "hypervisor injection", false, Interrupt, Benign),
    row(29, "#VC", "VMM communication", true, Fault, Benign),
    row(30, "#SX", "security exception", true, Fault, Benign),
];

/// The row of `vector`, if the architecture defines one.
pub fn exception(vector: u8) -> Option<&'static Exception> {
    EXCEPTIONS.iter().find(|e| e.vector == vector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_vector_order_without_duplicates() {
        assert!(EXCEPTIONS.windows(2).all(|w| w[0].vector < w[1].vector));
    }

    #[test]
    fn exactly_the_manuals_vectors_push_an_error_code() {
        // SDM Vol. 3 §6.13 / Table 6-1: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP; AMD's #VC, #SX.
        let with: std::vec::Vec<u8> = (0..32)
            .filter(|&v| exception(v).is_some_and(|e| e.error_code))
            .collect();
        assert_eq!(with, [8, 10, 11, 12, 13, 14, 17, 21, 29, 30]);
    }
}
