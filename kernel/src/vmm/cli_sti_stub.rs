//! The CLI/STI stub's shared state: `cli_sti_stub` (`asm/cli_sti_stub.S`) flips the guest's
//! virtual IF without entering Rust (article challenge "频繁访问特权资源": a guest kernel masks and
//! unmasks interrupts all the time). The vCPU stays the one truth: its IF and STI shadow are
//! read back from here at every trap, and written here, with whether the stub may run, at
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

/// At trap entry: what the stub did since the last exit goes into the vCPU.
pub fn absorb(cpu: &mut VCpu) {
    let shadow_ptr = core::ptr::addr_of_mut!(cli_sti_shadow);
    // SAFETY: trap context with interrupts off: the stub that writes these cannot run now; the
    // asm defines `cli_sti_shadow` as an aligned u64.
    let shadow = unsafe { shadow_ptr.read_volatile() };
    // SAFETY: as above; clearing it consumes the shadow the stub recorded.
    unsafe { shadow_ptr.write_volatile(0) };
    let vif_ptr = core::ptr::addr_of!(cli_sti_vif);
    // SAFETY: as above, for the u8 `cli_sti_vif`.
    let vif = unsafe { vif_ptr.read_volatile() };
    cpu.set_interrupts_enabled(vif != 0);
    if shadow != 0 {
        cpu.interrupt_shadow = Some(shadow);
    }
}

/// At trap exit: the vCPU's IF, whether a virtual interrupt is pending (then STI must take the
/// slow path to be injected), and whether the stub may run at all: only where CLI/STI are
/// allowed (virtual CPL <= IOPL) and nobody single-steps (our interrupt window, or the guest's
/// own TF, whose #DB the stub would swallow). Never in a VMM built for lab 2
/// (docs/labs/lab2-virtual-if.md): the stub is a second CLI/STI, so every CLI/STI must reach the
/// student's in vmm-core.
pub fn publish(cpu: &VCpu, pending: bool, single_step: bool) {
    let allowed = !cfg!(feature = "lab2")
        && cpu.may_toggle_interrupts()
        && !single_step
        && cpu.rflags & rflags::TF == 0;
    let vif = core::ptr::addr_of_mut!(cli_sti_vif);
    let pending_ptr = core::ptr::addr_of_mut!(cli_sti_pending);
    let enabled = core::ptr::addr_of_mut!(cli_sti_enabled);
    // SAFETY: as in `absorb`: the stub cannot run until we return to the guest.
    unsafe { vif.write_volatile(u8::from(cpu.interrupts_enabled())) };
    // SAFETY: as above.
    unsafe { pending_ptr.write_volatile(u8::from(pending)) };
    // SAFETY: as above; written last, as before, after the state the stub reads.
    unsafe { enabled.write_volatile(u8::from(allowed)) };
}

/// Whether the stub is on: as it was when the current trap came through it, until `publish`.
pub fn enabled() -> bool {
    let enabled = core::ptr::addr_of!(cli_sti_enabled);
    // SAFETY: as in `absorb`.
    unsafe { enabled.read_volatile() != 0 }
}

/// Turns the stub off (the guest is stopping).
pub fn disable() {
    let enabled = core::ptr::addr_of_mut!(cli_sti_enabled);
    // SAFETY: as in `absorb`.
    unsafe { enabled.write_volatile(0) };
}

/// Instructions of one CLI/STI the stub handles outside its two `rdtsc`s (asm/cli_sti_stub.S):
/// the vector stub's push and jmp, its three tests, its three pushes before the first; the
/// second itself, then shl, or, sub, add, three pops, add, iretq. Like the trap table's
/// (`instrument::unstamped_instructions`), checked against the guest's count by the bench.
const UNSTAMPED_INSTRUCTIONS: u64 = 2 + 6 + 3 + 10;

/// CLIs and STIs handled by the stub, and the cycles it spent: between its two `rdtsc`s,
/// plus its instructions outside them, one unit each (exact under `--icount`).
pub fn counts() -> (u64, u64, u64) {
    let (cli, sti, cycles) = (
        core::ptr::addr_of!(cli_sti_cli_count),
        core::ptr::addr_of!(cli_sti_sti_count),
        core::ptr::addr_of!(cli_sti_cycles),
    );
    // SAFETY: a plain read of an aligned u64 counter only the stub writes, in trap context
    // like us.
    let cli = unsafe { cli.read_volatile() };
    // SAFETY: as above.
    let sti = unsafe { sti.read_volatile() };
    // SAFETY: as above.
    let cycles = unsafe { cycles.read_volatile() };
    (cli, sti, cycles + (cli + sti) * UNSTAMPED_INSTRUCTIONS)
}
