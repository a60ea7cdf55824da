//! Event injection at VMRUN (`EVENTINJ`) and the virtual interrupt window (`V_IRQ` with the VINTR
//! intercept): APM vol. 2 §15.20-15.21. VT-x's VM-entry interruption-information field and
//! interrupt-window exiting.
//!
//! Under trap-and-emulate the VMM delivered an interrupt itself, through the guest's IDT, by
//! emulating every step of the delivery (`cpu::deliver`). Here it writes one word and the CPU
//! delivers the event as the guest's first action after VMRUN, with every check of the IDT, the
//! gate and the stack done by the hardware.

/// `EVENTINJ`'s type field (APM vol. 2 table 15-7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    /// An external (maskable) interrupt: the virtual PIC's.
    ExternalInterrupt = 0,
    /// A non-maskable interrupt.
    Nmi = 2,
    /// An exception (fault or trap).
    Exception = 3,
    /// A software interrupt (INT n).
    SoftwareInterrupt = 4,
}

const VALID: u64 = 1 << 31;
const ERROR_VALID: u64 = 1 << 11;

/// One event to inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventInjection {
    /// IDT vector.
    pub vector: u8,
    /// Its type.
    pub kind: EventType,
    /// The error code pushed with it (exceptions that have one).
    pub error_code: Option<u32>,
}

impl EventInjection {
    /// An external interrupt through `vector`.
    pub fn external_interrupt(vector: u8) -> Self {
        Self {
            vector,
            kind: EventType::ExternalInterrupt,
            error_code: None,
        }
    }

    /// An exception, with its error code when its vector has one.
    pub fn exception(vector: u8, error_code: Option<u32>) -> Self {
        Self {
            vector,
            kind: EventType::Exception,
            error_code,
        }
    }

    /// The `EVENTINJ` word: vector (7:0), type (10:8), EV (11), V (31), error code (63:32).
    pub fn encode(self) -> u64 {
        let mut word = VALID | u64::from(self.vector) | (self.kind as u64) << 8;
        if let Some(code) = self.error_code {
            word |= ERROR_VALID | u64::from(code) << 32;
        }
        word
    }

    /// Decodes an `EVENTINJ` or `EXITINTINFO` word (same layout); `None` when not valid or of
    /// a reserved type.
    pub fn decode(word: u64) -> Option<Self> {
        if word & VALID == 0 {
            return None;
        }
        let kind = match (word >> 8) & 7 {
            0 => EventType::ExternalInterrupt,
            2 => EventType::Nmi,
            3 => EventType::Exception,
            4 => EventType::SoftwareInterrupt,
            _ => return None,
        };
        Some(Self {
            vector: word as u8,
            kind,
            error_code: (word & ERROR_VALID != 0).then_some((word >> 32) as u32),
        })
    }
}

/// `INT_CTL` bits (APM vol. 2 table B-1, offset 0x60).
pub mod int_ctl {
    /// A virtual interrupt is pending.
    pub const V_IRQ: u32 = 1 << 8;
    /// Its priority (bits 19:16): 0xF, so no virtual TPR ever holds it back.
    pub const V_INTR_PRIO_MAX: u32 = 0xF << 16;
    /// Ignore the virtual TPR for it.
    pub const V_IGN_TPR: u32 = 1 << 20;
    /// Physical interrupts are masked by the host's RFLAGS.IF, not the guest's, and the guest's
    /// CR8 writes go to V_TPR (VT-x's TPR shadow).
    pub const V_INTR_MASKING: u32 = 1 << 24;
    /// The virtual TPR (bits 3:0): the guest's CR8.
    pub const V_TPR_MASK: u32 = 0xF;
}

/// What to do about the virtual PIC before VMRUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptWindow {
    /// Deliver the PIC's interrupt now, through `EVENTINJ`.
    InjectNow,
    /// An interrupt waits but the guest cannot take it now (IF = 0, an interrupt shadow, or
    /// another event being injected): post `V_IRQ` and intercept VINTR, which exits as soon as
    /// it can.
    OpenWindow,
    /// Nothing waits.
    Nothing,
}

/// Whether a pending virtual interrupt goes in now (SDM vol. 3 §6.8.1 and §6.8.3: IF = 1 and
/// no interrupt shadow; APM §15.20: one event per VMRUN).
pub fn interrupt_window(
    pic_pending: bool,
    guest_if: bool,
    interrupt_shadow: bool,
    event_already_injected: bool,
) -> InterruptWindow {
    match (
        pic_pending,
        guest_if && !interrupt_shadow && !event_already_injected,
    ) {
        (false, _) => InterruptWindow::Nothing,
        (true, true) => InterruptWindow::InjectNow,
        (true, false) => InterruptWindow::OpenWindow,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventinj_encoding() {
        let timer = EventInjection::external_interrupt(0x20);
        assert_eq!(timer.encode(), 0x8000_0020);
        let gp = EventInjection::exception(13, Some(0x18));
        assert_eq!(gp.encode(), 0x0000_0018_8000_0B0D);
        let ud = EventInjection::exception(6, None);
        assert_eq!(ud.encode(), 0x8000_0306);
        for event in [timer, gp, ud] {
            assert_eq!(EventInjection::decode(event.encode()), Some(event));
        }
        assert_eq!(EventInjection::decode(0x20), None);
        assert_eq!(EventInjection::decode(0x8000_0120), None);
    }

    #[test]
    fn the_window_opens_only_when_the_guest_can_take_it() {
        use InterruptWindow::*;
        assert_eq!(interrupt_window(false, true, false, false), Nothing);
        assert_eq!(interrupt_window(true, true, false, false), InjectNow);
        assert_eq!(interrupt_window(true, false, false, false), OpenWindow);
        assert_eq!(interrupt_window(true, true, true, false), OpenWindow);
        assert_eq!(interrupt_window(true, true, false, true), OpenWindow);
    }
}
