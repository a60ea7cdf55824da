//! Why the guest exited: the `EXITCODE` of the VMCB and the details in `EXITINFO1/2` (APM vol. 2,
//! appendix C, and §15.10.2 for I/O). VT-x calls this the exit reason and exit qualification.

/// An exit code (APM vol. 2, table C-1), as the host handles it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitCode {
    /// A read of CRn (intercepted by the CR read vector).
    CrRead(u8),
    /// A write of CRn.
    CrWrite(u8),
    /// An exception by vector (intercepted by the exception vector).
    Exception(u8),
    /// A physical maskable interrupt arrived: it is the host's.
    Intr,
    /// A non-maskable interrupt.
    Nmi,
    /// The virtual interrupt window opened: the guest can take the V_IRQ the host posted.
    Vintr,
    /// CPUID.
    Cpuid,
    /// HLT.
    Hlt,
    /// IN, OUT, INS or OUTS ([`IoExit`] in `EXITINFO1`).
    Ioio,
    /// RDMSR (`EXITINFO1` = 0) or WRMSR (1).
    Msr,
    /// A task switch.
    TaskSwitch,
    /// Shutdown: a triple fault.
    Shutdown,
    /// An SVM instruction (VMRUN, VMMCALL, VMLOAD, VMSAVE, STGI, CLGI, SKINIT), INVD,
    /// WBINVD, RDTSCP, MONITOR or MWAIT, by its exit code: refused with #UD.
    Refused(u16),
    /// A nested page fault: `EXITINFO2` = the guest-physical address, `EXITINFO1` = the error
    /// code (VT-x's EPT violation).
    NestedPageFault,
    /// VMRUN found the VMCB's guest state invalid (`VMEXIT_INVALID`, -1).
    Invalid,
    /// Anything else, by code.
    Other(u64),
}

impl ExitCode {
    /// Decodes `EXITCODE`.
    pub fn decode(code: u64) -> Self {
        match code {
            0x00..=0x0F => Self::CrRead(code as u8),
            0x10..=0x1F => Self::CrWrite(code as u8 - 0x10),
            0x40..=0x5F => Self::Exception(code as u8 - 0x40),
            0x60 => Self::Intr,
            0x61 => Self::Nmi,
            0x64 => Self::Vintr,
            0x72 => Self::Cpuid,
            0x78 => Self::Hlt,
            0x7B => Self::Ioio,
            0x7C => Self::Msr,
            0x7D => Self::TaskSwitch,
            0x7F => Self::Shutdown,
            0x76 | 0x80..=0x8B => Self::Refused(code as u16),
            0x400 => Self::NestedPageFault,
            // -1, which QEMU stores as a 32-bit value.
            u64::MAX | 0xFFFF_FFFF => Self::Invalid,
            _ => Self::Other(code),
        }
    }

    /// The exit table's name for this exit: the APM's name and its exit code (a range for the
    /// codes that carry a number).
    pub fn name(self) -> &'static str {
        match self {
            Self::CrRead(_) => "CR read (0x00-0x0f)",
            Self::CrWrite(_) => "CR write (0x10-0x1f)",
            Self::Exception(_) => "exception (0x40-0x5f)",
            Self::Intr => "INTR (0x60)",
            Self::Nmi => "NMI (0x61)",
            Self::Vintr => "VINTR (0x64)",
            Self::Cpuid => "CPUID (0x72)",
            Self::Hlt => "HLT (0x78)",
            Self::Ioio => "IOIO (0x7b)",
            Self::Msr => "MSR (0x7c)",
            Self::TaskSwitch => "task switch (0x7d)",
            Self::Shutdown => "SHUTDOWN (0x7f)",
            Self::Refused(_) => "refused instruction (0x76, 0x80-0x8b)",
            Self::NestedPageFault => "NPF (0x400)",
            Self::Invalid => "INVALID (-1)",
            Self::Other(_) => "other",
        }
    }
}

/// An I/O intercept's `EXITINFO1` (APM vol. 2 §15.10.2, figure 15-2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoExit {
    /// The port.
    pub port: u16,
    /// 1, 2 or 4 bytes.
    pub size: u8,
    /// IN or INS (else OUT or OUTS).
    pub is_in: bool,
    /// INS or OUTS.
    pub string: bool,
    /// With a REP prefix.
    pub rep: bool,
    /// The address size of a string instruction, in bytes (2, 4 or 8).
    pub address_size: u8,
    /// The segment of OUTS's source (0 = ES ... 5 = GS, the SDM's Sreg order).
    pub segment: u8,
}

impl IoExit {
    /// Decodes `EXITINFO1` of an IOIO exit; `None` if its size bits are not exactly one of
    /// 1, 2 or 4 bytes.
    pub fn decode(info: u64) -> Option<Self> {
        let size = match (info >> 4) & 7 {
            1 => 1,
            2 => 2,
            4 => 4,
            _ => return None,
        };
        let address_size = match (info >> 7) & 7 {
            1 => 2,
            2 => 4,
            _ => 8,
        };
        Some(Self {
            port: (info >> 16) as u16,
            size,
            is_in: info & 1 != 0,
            string: info & 1 << 2 != 0,
            rep: info & 1 << 3 != 0,
            address_size,
            segment: ((info >> 10) & 7) as u8,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_appendix_c() {
        assert_eq!(ExitCode::decode(0x03), ExitCode::CrRead(3));
        assert_eq!(ExitCode::decode(0x13), ExitCode::CrWrite(3));
        assert_eq!(ExitCode::decode(0x4E), ExitCode::Exception(14));
        assert_eq!(ExitCode::decode(0x60), ExitCode::Intr);
        assert_eq!(ExitCode::decode(0x64), ExitCode::Vintr);
        assert_eq!(ExitCode::decode(0x78), ExitCode::Hlt);
        assert_eq!(ExitCode::decode(0x7B), ExitCode::Ioio);
        assert_eq!(ExitCode::decode(0x7F), ExitCode::Shutdown);
        assert_eq!(ExitCode::decode(0x80), ExitCode::Refused(0x80));
        assert_eq!(ExitCode::decode(0x400), ExitCode::NestedPageFault);
        assert_eq!(ExitCode::decode(u64::MAX), ExitCode::Invalid);
        assert_eq!(ExitCode::decode(0xFFFF_FFFF), ExitCode::Invalid);
        assert_eq!(ExitCode::decode(0x99), ExitCode::Other(0x99));
    }

    /// `--trace=pf,io,irq` picks exits by these names.
    #[test]
    fn exit_names_have_trace_kinds() {
        use crate::accounting::TrapKind;
        use crate::trace::TraceKind;
        let kind = |code: ExitCode| TraceKind::of(&TrapKind::VmExit(code.name()));
        assert_eq!(kind(ExitCode::NestedPageFault), TraceKind::PageFault);
        assert_eq!(kind(ExitCode::Ioio), TraceKind::Io);
        assert_eq!(kind(ExitCode::Intr), TraceKind::Irq);
        assert_eq!(kind(ExitCode::Vintr), TraceKind::Irq);
        assert_eq!(kind(ExitCode::Hlt), TraceKind::Insn);
        assert!(ExitCode::Ioio.name().contains("0x7b"));
    }

    /// `out dx, al` to 0x3F8; `rep insw` from 0x1F0 with 64-bit addresses; `in eax, 0x60`.
    #[test]
    fn io_exit_info() {
        let out = IoExit::decode(0x03F8_0000 | 1 << 4 | 4 << 7).unwrap();
        assert_eq!(
            (out.port, out.size, out.is_in, out.string),
            (0x3F8, 1, false, false)
        );
        let ins = IoExit::decode(0x01F0_0000 | 2 << 4 | 4 << 7 | 1 << 3 | 1 << 2 | 1).unwrap();
        assert_eq!(
            (ins.size, ins.is_in, ins.string, ins.rep, ins.address_size),
            (2, true, true, true, 8)
        );
        let inl = IoExit::decode(0x0060_0000 | 4 << 4 | 1).unwrap();
        assert_eq!((inl.port, inl.size, inl.is_in), (0x60, 4, true));
        assert_eq!(IoExit::decode(3 << 4), None);
    }
}
