//! The CLI/STI stub's shared state: `cli_sti_stub` (`asm/cli_sti_stub.S`) flips the guest's
//! virtual IF without entering Rust (article challenge "频繁访问特权资源": a guest kernel masks and
//! unmasks interrupts all the time). The vCPU stays the one truth: its IF and STI shadow are
//! read back from here at every trap, and written here, with whether the fast path may run, at
//! every exit.

use vmm_core::cpu::state::rflags;
use vmm_core::cpu::VCpu;

extern "C" {
    static mut cli_sti_enabled: u8;
    static mut cli_sti_vif: u8;
    static mut cli_sti_pending: u8;
    static mut cli_sti_shadow: u64;
    static cli_sti_cli_count: u64;
    static cli_sti_sti_count: u64;
    static cli_sti_cycles: u64;
}

/// At trap entry: what the fast path did since the last exit goes into the vCPU.
pub fn absorb(cpu: &mut VCpu) {
    // SAFETY: trap context with interrupts off: the stub that writes these cannot run now.
    let (vif, shadow) = unsafe {
        let shadow = core::ptr::addr_of!(cli_sti_shadow).read_volatile();
        core::ptr::addr_of_mut!(cli_sti_shadow).write_volatile(0);
        (core::ptr::addr_of!(cli_sti_vif).read_volatile(), shadow)
    };
    cpu.set_interrupts_enabled(vif != 0);
    if shadow != 0 {
        cpu.interrupt_shadow = Some(shadow);
    }
}

/// At trap exit: the vCPU's IF, whether a virtual interrupt is pending (then STI must take the
/// slow path to be injected), and whether the fast path may run at all: only where CLI/STI are
/// allowed (virtual CPL <= IOPL) and nobody single-steps (our interrupt window, or the guest's
/// own TF, whose #DB the fast path would swallow).
pub fn publish(cpu: &VCpu, pending: bool, single_step: bool) {
    let allowed = cpu.may_toggle_interrupts() && !single_step && cpu.rflags & rflags::TF == 0;
    // SAFETY: as in `absorb`.
    unsafe {
        core::ptr::addr_of_mut!(cli_sti_vif).write_volatile(u8::from(cpu.interrupts_enabled()));
        core::ptr::addr_of_mut!(cli_sti_pending).write_volatile(u8::from(pending));
        core::ptr::addr_of_mut!(cli_sti_enabled).write_volatile(u8::from(allowed));
    }
}

/// Turns the fast path off (the guest is stopping).
pub fn disable() {
    // SAFETY: as in `absorb`.
    unsafe { core::ptr::addr_of_mut!(cli_sti_enabled).write_volatile(0) };
}

/// CLIs and STIs handled by the fast path, and the cycles it spent (from its first `rdtsc` to
/// its last; the stub's two pushes before and the `iretq` after are not included).
pub fn counts() -> (u64, u64, u64) {
    // SAFETY: plain reads of counters only the stub writes, in trap context like us.
    unsafe {
        (
            core::ptr::addr_of!(cli_sti_cli_count).read_volatile(),
            core::ptr::addr_of!(cli_sti_sti_count).read_volatile(),
            core::ptr::addr_of!(cli_sti_cycles).read_volatile(),
        )
    }
}
