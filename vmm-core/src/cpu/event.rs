//! Events the virtual CPU delivers (exceptions, interrupts) and the typed reasons it stops.
//!
//! Vectors and error-code rules follow SDM Vol. 3 §6.3 (sources), §6.13 (error code) and
//! §6.15 (the exception reference).

use super::exception::{exception, Kind};
use core::fmt;
use shadow_mmu::shadow::StopReason;
use shadow_mmu::PageFault;

/// Exception vectors (SDM Vol. 3 Table 6-1).
#[allow(missing_docs)]
pub mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const BR: u8 = 5;
    pub const UD: u8 = 6;
    pub const NM: u8 = 7;
    pub const DF: u8 = 8;
    pub const TS: u8 = 10;
    pub const NP: u8 = 11;
    pub const SS: u8 = 12;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const MF: u8 = 16;
    pub const AC: u8 = 17;
    pub const MC: u8 = 18;
    pub const XM: u8 = 19;
    pub const VE: u8 = 20;
    pub const CP: u8 = 21;
    pub const VC: u8 = 29;
    pub const SX: u8 = 30;
}

/// Where an event comes from: it decides the error-code EXT bit, the gate DPL check and the
/// return address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A processor exception (fault, trap or abort).
    Exception,
    /// A maskable interrupt from the virtual PIC.
    ExternalInterrupt,
    /// INT n: the gate DPL is checked against CPL; the return address is the next instruction.
    SoftwareInterrupt,
    /// INT3 or INTO: like INT n for the DPL check, but it is an exception for #DF purposes.
    SoftwareException,
}

/// One event to deliver through the guest's IDT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// IDT vector.
    pub vector: u8,
    /// Its source.
    pub kind: EventKind,
    /// The error code pushed for it, if the vector has one.
    pub error_code: Option<u32>,
    /// For #PF: the linear address that goes to CR2.
    pub cr2: Option<u64>,
    /// For INT n, INT3, INT1: the instruction's length. RIP stays on the instruction until
    /// delivery succeeds, so a fault during delivery (a gate DPL check, say) points at it; the
    /// pushed return address is RIP + this.
    pub instruction_len: u8,
}

/// The exception classes of SDM Vol. 3 Table 6-4, which decide when a second fault during
/// delivery becomes a double fault (Table 6-5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExceptionClass {
    /// #DB, NMI, #BP, #OF, #BR, #UD, #NM, #MF, #AC, #MC, #XM and interrupts.
    Benign,
    /// #DE, #TS, #NP, #SS, #GP.
    Contributory,
    /// #PF.
    PageFault,
}

impl Event {
    /// A processor exception without an error code.
    pub const fn exception(vector: u8) -> Self {
        Event {
            vector,
            kind: EventKind::Exception,
            error_code: None,
            cr2: None,
            instruction_len: 0,
        }
    }

    /// A processor exception with an error code.
    pub const fn exception_with_code(vector: u8, code: u32) -> Self {
        Event {
            vector,
            kind: EventKind::Exception,
            error_code: Some(code),
            cr2: None,
            instruction_len: 0,
        }
    }

    /// #GP(code).
    pub const fn gp(code: u32) -> Self {
        Self::exception_with_code(vector::GP, code)
    }

    /// #UD.
    pub const fn ud() -> Self {
        Self::exception(vector::UD)
    }

    /// #SS(code).
    pub const fn ss(code: u32) -> Self {
        Self::exception_with_code(vector::SS, code)
    }

    /// #NP(code).
    pub const fn np(code: u32) -> Self {
        Self::exception_with_code(vector::NP, code)
    }

    /// #TS(code).
    pub const fn ts(code: u32) -> Self {
        Self::exception_with_code(vector::TS, code)
    }

    /// #DF (error code always 0).
    pub const fn df() -> Self {
        Self::exception_with_code(vector::DF, 0)
    }

    /// #PF with its error code and CR2.
    pub fn page_fault(pf: PageFault) -> Self {
        Event {
            vector: vector::PF,
            kind: EventKind::Exception,
            error_code: Some(pf.error_code.bits()),
            cr2: Some(pf.cr2.as_u64()),
            instruction_len: 0,
        }
    }

    /// A maskable interrupt with this vector.
    pub const fn external(vector: u8) -> Self {
        Event {
            vector,
            kind: EventKind::ExternalInterrupt,
            error_code: None,
            cr2: None,
            instruction_len: 0,
        }
    }

    /// INT n, `len` bytes long.
    pub const fn software(vector: u8, len: u8) -> Self {
        Event {
            vector,
            kind: EventKind::SoftwareInterrupt,
            error_code: None,
            cr2: None,
            instruction_len: len,
        }
    }

    /// Whether the vector is one that pushes an error code when it is an exception (SDM Vol. 3
    /// §6.13, Table 6-1): #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, and AMD's #VC and #SX (the
    /// host's entry stubs treat the same set as hardware-pushed).
    pub fn vector_has_error_code(vector: u8) -> bool {
        exception(vector).is_some_and(|e| e.error_code)
    }

    /// The class of this event for the double-fault rules.
    pub fn class(&self) -> ExceptionClass {
        if self.kind != EventKind::Exception {
            return ExceptionClass::Benign;
        }
        exception(self.vector).map_or(ExceptionClass::Benign, |e| e.class)
    }

    /// Whether it is a fault-class exception (SDM Vol. 3 Table 6-1): the return address is the
    /// faulting instruction, and the RFLAGS image pushed for it has RF = 1 (Vol. 3 §17.3.1.1),
    /// so the IRET back re-executes it without a second instruction-breakpoint #DB. #DB is
    /// left out: the VMM delivers it only for single steps and ICEBP, which are traps (an
    /// instruction-breakpoint #DB, the one fault-class #DB it could be, also pushes RF as it
    /// is). #BP/#OF are traps, #DF and #MC aborts.
    pub fn is_fault(&self) -> bool {
        self.kind == EventKind::Exception
            && exception(self.vector).is_some_and(|e| e.kind == Kind::Fault)
    }

    /// Whether a fault while delivering it sets EXT (bit 0) in the new fault's error code: the
    /// event came from outside the program (SDM Vol. 3 §6.13).
    pub fn is_external(&self) -> bool {
        matches!(
            self.kind,
            EventKind::ExternalInterrupt | EventKind::Exception
        )
    }
}

/// What the second fault during delivery of `first` turns into (SDM Vol. 3 Table 6-5): `true`
/// means a double fault, `false` means the second is handled serially (delivered instead).
pub fn is_double_fault(first: &Event, second: &Event) -> bool {
    use ExceptionClass::*;
    matches!(
        (first.class(), second.class()),
        (Contributory, Contributory) | (PageFault, Contributory) | (PageFault, PageFault)
    )
}

/// Why the virtual CPU cannot go on: the VMM reports it and stops the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuStop {
    /// A fault while delivering a double fault: on hardware, a shutdown (SDM Vol. 3 §6.15,
    /// interrupt 8). `vector` is the fault that hit the #DF delivery.
    TripleFault {
        /// The exception raised while delivering #DF.
        vector: u8,
    },
    /// HLT with interrupts disabled: nothing can ever wake the guest.
    HaltedForever,
    /// A privileged instruction this VMM does not emulate, executed by the guest kernel.
    NotEmulated {
        /// The instruction's mnemonic.
        mnemonic: iced_x86::Mnemonic,
    },
    /// An architecturally valid request this virtual CPU does not support.
    Unsupported(&'static str),
    /// Guest memory cannot be used (the VMM's range, a GPA outside RAM, out of shadow memory).
    Memory(StopReason),
}

impl fmt::Display for CpuStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CpuStop::TripleFault { vector } => {
                write!(f, "triple fault (vector {vector} while delivering #DF)")
            }
            CpuStop::HaltedForever => {
                write!(f, "guest halted forever (HLT with interrupts disabled)")
            }
            CpuStop::NotEmulated { mnemonic } => {
                write!(f, "instruction {mnemonic:?} is not emulated")
            }
            CpuStop::Unsupported(what) => write!(f, "unsupported: {what}"),
            CpuStop::Memory(reason) => write!(f, "{reason}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn double_fault_table_6_5() {
        let gp = Event::gp(0);
        let pf = Event {
            vector: vector::PF,
            kind: EventKind::Exception,
            error_code: Some(0),
            cr2: Some(0),
            instruction_len: 0,
        };
        let ud = Event::ud();
        let irq = Event::external(0x20);
        assert!(is_double_fault(&gp, &gp));
        assert!(is_double_fault(&pf, &gp));
        assert!(is_double_fault(&pf, &pf));
        assert!(
            !is_double_fault(&gp, &pf),
            "contributory then #PF is serial"
        );
        assert!(!is_double_fault(&ud, &gp), "benign then anything is serial");
        assert!(!is_double_fault(&irq, &gp));
        assert!(!is_double_fault(&Event::software(0x80, 2), &gp));
    }

    #[test]
    fn fault_class_exceptions() {
        for v in 0..32u8 {
            // AMD's #VC and #SX are faults too (AMD APM Vol. 2 §8.2).
            let expected = matches!(
                v,
                0 | 5 | 6 | 7 | 10..=14 | 16 | 17 | 19 | 20 | 21 | 29 | 30
            );
            assert_eq!(Event::exception(v).is_fault(), expected, "vector {v}");
        }
        assert!(!Event::software(13, 2).is_fault(), "INT 13 is not a fault");
        assert!(!Event::external(14).is_fault());
    }

    #[test]
    fn error_code_vectors() {
        for v in 0..32u8 {
            let expected = matches!(v, 8 | 10 | 11 | 12 | 13 | 14 | 17 | 21 | 29 | 30);
            assert_eq!(Event::vector_has_error_code(v), expected, "vector {v}");
        }
    }
}
