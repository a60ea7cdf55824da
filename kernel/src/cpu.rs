//! What the CPU can do (CPUID), checked and printed at boot, and the host's CR4 settings.

use vmm_core::cpu::state::{
    REAL_CR0_FOLLOWS as GUEST_CR0_BITS, REAL_CR4_FOLLOWS as GUEST_CR4_BITS,
};
use x86::controlregs::{cr0_write, cr4, cr4_write, Cr0, Cr4};
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
    /// Supervisor-mode execution prevention: CPL 0 cannot fetch from user pages.
    pub smep: bool,
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
            smep: leaf7.as_ref().is_some_and(|l| l.has_smep()),
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
/// UMIP they would silently reveal the host's tables. Turns on CR4.SMEP when the CPU has it, as
/// a second wall between guest code and the real CPL 0.
pub fn enable_host_features(features: &Features) {
    if features.umip {
        // SAFETY: reading CR4 at CPL 0 has no side effects.
        let now = unsafe { cr4() };
        // SAFETY: UMIP only affects those five instructions at CPL > 0; the host never runs them.
        // Every other bit is written back as just read.
        unsafe { cr4_write(now | Cr4::CR4_ENABLE_UMIP) };
        log::info!("cpu: CR4.UMIP on: SGDT/SIDT/SLDT/SMSW/STR trap in Ring 3");
    } else {
        log::warn!(
            "cpu: no UMIP: guest SGDT/SIDT/SLDT/SMSW/STR will not trap (ring-aliasing hole)"
        );
    }
    if features.smep {
        // SAFETY: reading CR4 at CPL 0 has no side effects.
        let now = unsafe { cr4() };
        // SAFETY: SMEP only stops CPL 0 from fetching instructions from user pages; the host's
        // code is on supervisor pages, and every guest page (the guest kernel's too: it runs
        // at CPL 3) is a user page of the shadow tables, so a guest that ever got the CPU to
        // CPL 0 at an address of its own (as the reset LDTR once allowed: gdt.rs) faults
        // instead of running. Every other bit is written back as just read.
        unsafe { cr4_write(now | Cr4::CR4_ENABLE_SMEP) };
        log::info!("cpu: CR4.SMEP on: CPL 0 never runs code from a guest page");
    }
}

extern "C" {
    fn syscall_entry();
    fn sysenter_entry();
}

/// Points the real SYSCALL at the VMM's entry stub (asm/trap_entry.S): IA32_LSTAR, CS/SS from
/// IA32_STAR (host code and data), IA32_FMASK clearing IF, TF, DF and AC so nothing runs
/// between the instruction and the stub's stack switch, and NT, which a guest's POPF may set
/// at any CPL and which would make the host's own IRETQ #GP(0) (IA-32e mode has no task
/// return, SDM Vol. 2A, IRET; the `nt-syscall-sysenter` guest panicked the host that way).
/// Both SYSCALL (EFER.SCE) and SYSENTER start disabled: they follow the guest's own settings
/// ([`set_syscall_enabled`], [`set_sysenter_enabled`]).
pub fn enable_fast_syscall_entries() {
    use vmm_core::cpu::state::rflags;
    const FMASK: u64 = rflags::IF | rflags::TF | rflags::DF | rflags::AC | rflags::NT;
    let star = u64::from(crate::gdt::HOST_CODE) << 32;
    // SAFETY: only SYSCALL reads LSTAR, and the host itself never executes it; `syscall_entry`
    // is the stub that builds a TrapFrame on the trap stack and enters the dispatcher.
    unsafe { x86::msr::wrmsr(x86::msr::IA32_LSTAR, syscall_entry as *const () as u64) };
    // SAFETY: only SYSCALL from compatibility mode reads CSTAR. No guest reaches compatibility
    // mode here (the shadow GDT refuses a CS with L = 0), but left at its reset value 0 a
    // SYSCALL from there would enter CPL 0 at linear 0, in the guest's own memory (the kind of
    // hole the reset LDTR was: gdt.rs); the VMM's own stub is the only safe target.
    unsafe { x86::msr::wrmsr(x86::msr::IA32_CSTAR, syscall_entry as *const () as u64) };
    // SAFETY: only SYSCALL/SYSRET read STAR; bits 47:32 are the host's 64-bit code selector
    // (SS = that + 8, the host's data), which is what the stub expects to run on.
    unsafe { x86::msr::wrmsr(x86::msr::IA32_STAR, star) };
    // SAFETY: only SYSCALL reads FMASK; clearing IF, TF, DF and AC keeps interrupts, single
    // steps and alignment checks away until the stub has switched stacks, and NT the host's
    // IRETQ.
    unsafe { x86::msr::wrmsr(x86::msr::IA32_FMASK, FMASK) };
    // SAFETY: only SYSENTER reads SYSENTER_ESP; the trap stack's top is where the stub expects
    // to build its TrapFrame.
    unsafe { x86::msr::wrmsr(x86::msr::IA32_SYSENTER_ESP, crate::gdt::trap_stack_top()) };
    // SAFETY: only SYSENTER reads SYSENTER_EIP, and the host never executes it; `sysenter_entry`
    // is the VMM's SYSENTER stub.
    unsafe {
        x86::msr::wrmsr(
            x86::msr::IA32_SYSENTER_EIP,
            sysenter_entry as *const () as u64,
        )
    };
    // SAFETY: a null SYSENTER_CS makes SYSENTER raise #GP (handled like any guest #GP) until
    // `set_sysenter_enabled` turns it on.
    unsafe { x86::msr::wrmsr(x86::msr::IA32_SYSENTER_CS, 0) };
    set_syscall_enabled(false);
}

/// Lets the real SYSENTER enter the VMM (IA32_SYSENTER_CS = host code) or makes it raise #GP
/// at the instruction (IA32_SYSENTER_CS = 0), which keeps the guest's RIP for the #GP the guest
/// must see while its own SYSENTER_CS is still null.
pub fn set_sysenter_enabled(on: bool) {
    let cs = if on {
        u64::from(crate::gdt::HOST_CODE)
    } else {
        0
    };
    // SAFETY: either value is valid; the other SYSENTER MSRs were set by
    // `enable_fast_syscall_entries`.
    unsafe { x86::msr::wrmsr(x86::msr::IA32_SYSENTER_CS, cs) };
}

/// EFER.SCE: the real SYSCALL enters the VMM (on) or raises #UD at the instruction itself (off),
/// as it must for a guest that has not set its own EFER.SCE — only the CPU knows where an
/// instruction with prefixes began.
pub fn set_syscall_enabled(on: bool) {
    const EFER_SCE: u64 = 1;
    // SAFETY: IA32_EFER exists on every x86_64 CPU (long mode runs on it); reading it has no
    // side effects.
    let efer = unsafe { x86::msr::rdmsr(x86::msr::IA32_EFER) };
    let efer = if on {
        efer | EFER_SCE
    } else {
        efer & !EFER_SCE
    };
    // SAFETY: SCE only enables SYSCALL/SYSRET, which the host itself never executes; the
    // other EFER bits (LME, LMA, NXE) are written back unchanged.
    unsafe { x86::msr::wrmsr(x86::msr::IA32_EFER, efer) };
}

/// The real DR6's status bits after a #DB, and DR6 reset for the next one (the CPU never
/// clears them itself, SDM Vol. 3 §17.2.3).
pub fn take_debug_status() -> u64 {
    const DR6_INIT: usize = 0xFFFF_0FF0;
    // SAFETY: reading DR6 at CPL 0 has no side effects.
    let status = unsafe { x86::debugregs::dr6() }.bits() as u64;
    // SAFETY: DR6 only records debug conditions; the host sets no breakpoints of its own, so
    // resetting it loses nothing but the status just read.
    unsafe { x86::debugregs::dr6_write(x86::debugregs::Dr6::from_bits_truncate(DR6_INIT)) };
    status
}

/// Sets the real CR0/CR4 bits that follow the guest's (vmm-core `REAL_CR0_FOLLOWS`,
/// `REAL_CR4_FOLLOWS`) to the guest's. The host
/// itself runs no x87 or SSE code (the x86_64-unknown-none target is soft-float) and no
/// unaligned access at CPL 3, so the guest's choices cannot hurt it.
pub fn set_guest_controls(cr0_bits: u64, cr4_bits: u64) {
    // SAFETY: reading CR0 at CPL 0 has no side effects.
    let cr0 = unsafe { x86::controlregs::cr0() }.bits() as u64;
    let cr0 = (cr0 & !GUEST_CR0_BITS) | (cr0_bits & GUEST_CR0_BITS);
    // SAFETY: only TS, EM, MP and AM change (see above); PE, PG, WP and the rest of CR0 are
    // written back as just read.
    unsafe { cr0_write(Cr0::from_bits_truncate(cr0 as usize)) };
    // SAFETY: reading CR4 at CPL 0 has no side effects.
    let cr4 = unsafe { x86::controlregs::cr4() }.bits() as u64;
    let cr4 = (cr4 & !GUEST_CR4_BITS) | (cr4_bits & GUEST_CR4_BITS);
    // SAFETY: only OSFXSR, OSXMMEXCPT and TSD change (see above); paging and the host's own
    // CR4 bits (PAE, PGE, UMIP) are written back as just read.
    unsafe { cr4_write(Cr4::from_bits_truncate(cr4 as usize)) };
}

/// Waits for the next interrupt with interrupts enabled just for the wait: `sti; hlt` is
/// atomic (the STI shadow covers HLT), so an interrupt cannot slip in between and be missed.
/// The handler runs on this stack (a host-context trap) before we return with IF = 0.
pub fn wait_for_interrupt() {
    // SAFETY: the IDT and the host IRQ handlers are set up; the only state this changes is IF,
    // restored to 0 before returning.
    unsafe { core::arch::asm!("sti; hlt; cli", options(nomem, nostack)) };
}

/// Lets a physical interrupt that is already waiting in (a `#VMEXIT` for INTR leaves it pending
/// with the host's IF = 0) be taken now: one instruction with IF = 1. The handler runs on this
/// stack (a host-context trap) before we return with IF = 0.
pub fn take_pending_interrupts() {
    // SAFETY: as in `wait_for_interrupt`: only IF changes, and it is 0 again on return.
    unsafe { core::arch::asm!("sti; nop; cli", options(nomem, nostack)) };
}

/// MSR_PLATFORM_INFO (bit 31: CPUID faulting supported) and MSR_MISC_FEATURES_ENABLES (bit 0:
/// CPUID at CPL > 0 raises #GP). Intel SDM Vol. 4, Table 2-12 ("CPUID faulting").
const MSR_PLATFORM_INFO: u32 = 0xCE;
const MSR_MISC_FEATURES_ENABLES: u32 = 0x140;

/// Makes CPUID trap at Ring 3 when the CPU can (CPUID faulting), so the guest sees the
/// virtual CPU's CPUID (hypervisor leaf, hidden VMX/XSAVE...) instead of the host's. Returns
/// whether it is on; without it CPUID is one more sensitive instruction that does not trap.
pub fn enable_cpuid_faulting() -> bool {
    let supported =
        crate::trap::rdmsr_or_fault(MSR_PLATFORM_INFO).is_some_and(|v| v & (1 << 31) != 0);
    if supported {
        if let Some(v) = crate::trap::rdmsr_or_fault(MSR_MISC_FEATURES_ENABLES) {
            // SAFETY: bit 0 only makes CPUID fault at CPL > 0; the host runs at CPL 0.
            unsafe { x86::msr::wrmsr(MSR_MISC_FEATURES_ENABLES, v | 1) };
            return true;
        }
    }
    false
}
