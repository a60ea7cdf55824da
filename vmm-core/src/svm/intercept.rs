//! What makes the guest exit: the VMCB's intercept vectors, the I/O permission map (IOPM) and the
//! MSR permission map (MSRPM) — VT-x's execution controls, I/O bitmaps and MSR bitmaps (APM vol. 2
//! §15.9-15.11, appendix B).
//!
//! The article's point about hardware assistance: the VMM no longer needs the guest to trap by
//! accident of privilege; it *chooses* which events leave the guest. This VMM chooses the ones it
//! must own: every port (the devices are virtual), HLT, physical interrupts (they are the host's),
//! the interrupt window, shutdown (a triple fault), CPUID (the guest sees the same CPU model as
//! under trap-and-emulate), the MSRs that would touch the host, and the SVM instructions.

/// The intercepts of the 64-bit word at VMCB offset 0x0C, by bit (APM vol. 2, table B-1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Intercept {
    /// Physical maskable interrupts.
    Intr = 0,
    /// Non-maskable interrupts.
    Nmi = 1,
    /// System-management interrupts.
    Smi = 2,
    /// INIT.
    Init = 3,
    /// The virtual interrupt window: the guest can take the V_IRQ the host posted.
    Vintr = 4,
    /// RDTSC.
    Rdtsc = 14,
    /// CPUID.
    Cpuid = 18,
    /// INVD.
    Invd = 22,
    /// HLT.
    Hlt = 24,
    /// IN, OUT, INS, OUTS, through the IOPM.
    IoioProt = 27,
    /// RDMSR and WRMSR, through the MSRPM.
    MsrProt = 28,
    /// Task switches.
    TaskSwitch = 29,
    /// Shutdown: a triple fault, or a fault the CPU cannot deliver.
    Shutdown = 31,
    /// VMRUN. Required: a VMCB without it is invalid.
    Vmrun = 32,
    /// VMMCALL.
    Vmmcall = 33,
    /// VMLOAD.
    Vmload = 34,
    /// VMSAVE.
    Vmsave = 35,
    /// STGI.
    Stgi = 36,
    /// CLGI.
    Clgi = 37,
    /// SKINIT.
    Skinit = 38,
    /// RDTSCP.
    Rdtscp = 39,
    /// ICEBP.
    Icebp = 40,
    /// WBINVD.
    Wbinvd = 41,
    /// MONITOR.
    Monitor = 42,
    /// MWAIT.
    Mwait = 43,
}

/// The intercepts this VMM turns on. RDTSC is not among them: under `--icount` the guest's TSC
/// counts instructions, as under trap-and-emulate, and it is not a resource the host owns.
pub const VMM_INTERCEPTS: [Intercept; 20] = [
    Intercept::Intr,
    Intercept::Nmi,
    Intercept::Smi,
    Intercept::Init,
    Intercept::Cpuid,
    Intercept::Invd,
    Intercept::Hlt,
    Intercept::IoioProt,
    Intercept::MsrProt,
    Intercept::TaskSwitch,
    Intercept::Shutdown,
    Intercept::Vmrun,
    Intercept::Vmmcall,
    Intercept::Vmload,
    Intercept::Vmsave,
    Intercept::Stgi,
    Intercept::Clgi,
    Intercept::Skinit,
    Intercept::Wbinvd,
    Intercept::Rdtscp,
];

/// Size of the I/O permission map: one bit per port, and the bits a multi-byte access at port
/// 0xFFFF reaches past it (APM vol. 2 §15.10.1: 12 KiB, physically contiguous).
pub const IOPM_SIZE: usize = 12 * 1024;

/// Size of the MSR permission map (APM vol. 2 §15.11: 8 KiB, physically contiguous).
pub const MSRPM_SIZE: usize = 8 * 1024;

/// Fills an I/O permission map so that every port exits: all the guest's devices are virtual.
pub fn intercept_all_ports(iopm: &mut [u8; IOPM_SIZE]) {
    iopm.fill(0xFF);
}

/// Where an MSR's two bits (read, then write) are in the MSR permission map: its byte and the
/// bit of the read intercept (the write's is the next). `None` for MSRs outside the three ranges
/// the map covers; those always exit (APM vol. 2 §15.11, table 15-6).
pub fn msrpm_position(msr: u32) -> Option<(usize, u8)> {
    let (base, index) = match msr {
        0..=0x1FFF => (0, msr),
        0xC000_0000..=0xC000_1FFF => (0x800, msr - 0xC000_0000),
        0xC001_0000..=0xC001_1FFF => (0x1000, msr - 0xC001_0000),
        _ => return None,
    };
    let bit = index as usize * 2;
    Some((base + bit / 8, (bit % 8) as u8))
}

/// Sets whether reads and writes of `msr` exit.
pub fn set_msr_intercept(msrpm: &mut [u8; MSRPM_SIZE], msr: u32, read: bool, write: bool) {
    let Some((byte, bit)) = msrpm_position(msr) else {
        return;
    };
    if let Some(b) = msrpm.get_mut(byte) {
        *b &= !(0b11 << bit);
        *b |= u8::from(read) << bit | u8::from(write) << (bit + 1);
    }
}

/// Whether reads (or writes) of `msr` exit under this map.
pub fn msr_intercepted(msrpm: &[u8; MSRPM_SIZE], msr: u32, write: bool) -> bool {
    match msrpm_position(msr) {
        Some((byte, bit)) => msrpm
            .get(byte)
            .is_some_and(|b| b >> (bit + u8::from(write)) & 1 != 0),
        None => true,
    }
}

/// The MSRs the guest may read and write without exiting: the ones the VMCB and VMLOAD/VMSAVE
/// switch between host and guest (so the guest only ever changes its own copy), and the FS/GS
/// bases. Every other MSR exits and is emulated against the same model as under
/// trap-and-emulate, or refused with #GP: EFER in particular, whose SVME bit the guest must not
/// see or clear, and the TSC, which is the host's.
pub const GUEST_OWNED_MSRS: [u32; 11] = [
    0x174,       // IA32_SYSENTER_CS
    0x175,       // IA32_SYSENTER_ESP
    0x176,       // IA32_SYSENTER_EIP
    0xC000_0081, // STAR
    0xC000_0082, // LSTAR
    0xC000_0083, // CSTAR
    0xC000_0084, // SFMASK
    0xC000_0100, // FS.base
    0xC000_0101, // GS.base
    0xC000_0102, // KernelGSbase
    0xC000_0103, // TSC_AUX (RDTSCP exits anyway)
];

/// Fills an MSR permission map: every MSR exits but [`GUEST_OWNED_MSRS`].
pub fn build_msrpm(msrpm: &mut [u8; MSRPM_SIZE]) {
    msrpm.fill(0xFF);
    for msr in GUEST_OWNED_MSRS {
        set_msr_intercept(msrpm, msr, false, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::boxed::Box;

    /// The three ranges of APM table 15-6, two bits per MSR.
    #[test]
    fn msrpm_positions_follow_the_manual() {
        assert_eq!(msrpm_position(0), Some((0, 0)));
        assert_eq!(msrpm_position(0x174), Some((0x5D, 0)));
        assert_eq!(msrpm_position(0x1FFF), Some((0x7FF, 6)));
        assert_eq!(msrpm_position(0xC000_0080), Some((0x800 + 0x20, 0)));
        assert_eq!(msrpm_position(0xC000_0082), Some((0x820, 4)));
        assert_eq!(msrpm_position(0xC001_0117), Some((0x1000 + 0x45, 6)));
        assert_eq!(msrpm_position(0x2000), None);
        assert_eq!(msrpm_position(0xC000_2000), None);
        assert_eq!(msrpm_position(0x4000_0000), None);
    }

    /// Every MSR exits except the guest-owned ones; EFER and the TSC always do.
    #[test]
    fn the_vmms_msr_map() {
        let mut map = Box::new([0u8; MSRPM_SIZE]);
        build_msrpm(&mut map);
        for msr in GUEST_OWNED_MSRS {
            assert!(!msr_intercepted(&map, msr, false), "{msr:#x}");
            assert!(!msr_intercepted(&map, msr, true), "{msr:#x}");
        }
        for msr in [0x10, 0x1B, 0xC000_0080, 0xC001_0117, 0x2000] {
            assert!(msr_intercepted(&map, msr, false), "{msr:#x}");
            assert!(msr_intercepted(&map, msr, true), "{msr:#x}");
        }
        set_msr_intercept(&mut map, 0x10, false, true);
        assert!(!msr_intercepted(&map, 0x10, false));
        assert!(msr_intercepted(&map, 0x10, true));
    }

    /// VMRUN must be intercepted (a VMCB without it is invalid, APM §15.5.1).
    #[test]
    fn vmrun_is_intercepted() {
        assert!(VMM_INTERCEPTS.contains(&Intercept::Vmrun));
        assert!(VMM_INTERCEPTS.contains(&Intercept::Shutdown));
    }
}
