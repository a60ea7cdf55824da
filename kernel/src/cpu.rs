//! What the CPU can do (CPUID), checked and printed at boot, and the host's CR4 settings.

use x86::controlregs::{cr4, cr4_write, Cr4};
use x86::cpuid::CpuId;

/// The CPU features the VMM cares about.
#[derive(Clone, Copy, Debug, Default)]
pub struct Features {
    /// CPUID vendor string is "GenuineIntel".
    pub intel: bool,
    /// Long mode (the boot trampoline already required it).
    pub long_mode: bool,
    /// Execute-disable (NX) page protection.
    pub nx: bool,
    /// SYSENTER/SYSEXIT.
    pub sysenter: bool,
    /// SYSCALL/SYSRET in 64-bit mode.
    pub syscall: bool,
    /// User-mode instruction prevention: SGDT/SIDT/SLDT/SMSW/STR fault at CPL > 0.
    pub umip: bool,
    /// Global pages.
    pub pge: bool,
    /// 1 GiB pages.
    pub huge_1g: bool,
    /// Time-stamp counter.
    pub tsc: bool,
}

impl Features {
    /// Reads CPUID.
    pub fn detect() -> Self {
        let cpuid = CpuId::new();
        let basic = cpuid.get_feature_info();
        let ext = cpuid.get_extended_processor_and_feature_identifiers();
        let leaf7 = cpuid.get_extended_feature_info();
        Features {
            intel: cpuid
                .get_vendor_info()
                .is_some_and(|v| v.as_str() == "GenuineIntel"),
            long_mode: ext.as_ref().is_some_and(|e| e.has_64bit_mode()),
            nx: ext.as_ref().is_some_and(|e| e.has_execute_disable()),
            syscall: ext.as_ref().is_some_and(|e| e.has_syscall_sysret()),
            huge_1g: ext.as_ref().is_some_and(|e| e.has_1gib_pages()),
            sysenter: basic.as_ref().is_some_and(|b| b.has_sysenter_sysexit()),
            pge: basic.as_ref().is_some_and(|b| b.has_pge()),
            tsc: basic.as_ref().is_some_and(|b| b.has_tsc()),
            umip: leaf7.as_ref().is_some_and(|l| l.has_umip()),
        }
    }

    /// Prints one line with every feature.
    pub fn report(&self) {
        let yn = |b: bool| if b { "yes" } else { "no" };
        log::info!(
            "cpu: vendor-intel={} long-mode={} nx={} sysenter={} syscall={} umip={} pge={} tsc={} 1g-pages={}",
            yn(self.intel),
            yn(self.long_mode),
            yn(self.nx),
            yn(self.sysenter),
            yn(self.syscall),
            yn(self.umip),
            yn(self.pge),
            yn(self.tsc),
            yn(self.huge_1g)
        );
    }

    /// The features the VMM cannot run without; `Err` names the first one missing.
    /// SYSENTER in 64-bit mode is an Intel feature (AMD CPUs #UD on it in long mode), hence
    /// `-cpu max,vendor=GenuineIntel` in run-qemu.sh.
    pub fn require(&self) -> Result<(), &'static str> {
        for (present, name) in [
            (self.long_mode, "long mode"),
            (self.nx, "NX"),
            (self.sysenter, "SYSENTER/SYSEXIT"),
            (self.syscall, "SYSCALL/SYSRET"),
            (self.tsc, "the time-stamp counter"),
        ] {
            if !present {
                return Err(name);
            }
        }
        Ok(())
    }
}

/// Turns on CR4.UMIP when the CPU has it, so the guest's SGDT/SIDT/SLDT/SMSW/STR at real CPL 3
/// fault with #GP and the VMM can emulate them (the article's ring-aliasing challenge); without
/// UMIP they would silently reveal the host's tables.
pub fn enable_host_features(features: &Features) {
    if features.umip {
        // SAFETY: UMIP only affects those five instructions at CPL > 0; the host never runs them.
        unsafe { cr4_write(cr4() | Cr4::CR4_ENABLE_UMIP) };
        log::info!("cpu: CR4.UMIP on: SGDT/SIDT/SLDT/SMSW/STR trap in Ring 3");
    } else {
        log::warn!(
            "cpu: no UMIP: guest SGDT/SIDT/SLDT/SMSW/STR will not trap (ring-aliasing hole)"
        );
    }
}
