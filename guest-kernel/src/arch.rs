//! Single-instruction wrappers for the privileged and sensitive instructions the OS uses.
//!
//! Everything here is what a bare-metal kernel does at Ring 0; under the VMM each of these traps
//! and is emulated, which is why they are kept in one place (and why the self-test never depends
//! on what `popf` does to IF, see `sync`).

use core::arch::asm;

/// RFLAGS.IF (SDM vol. 1 §3.4.3.3).
pub const RFLAGS_IF: u64 = 1 << 9;

/// Model-specific registers the OS programs (SDM vol. 4, table 2-2).
pub mod msr {
    /// IA32_SYSENTER_CS: SYSENTER's code selector; SS is this + 8, SYSEXIT's CS/SS + 32/+ 40.
    pub const SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP: the kernel stack SYSENTER switches to.
    pub const SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP: SYSENTER's entry point.
    pub const SYSENTER_EIP: u32 = 0x176;
    /// IA32_EFER (SCE = bit 0 enables SYSCALL/SYSRET).
    pub const EFER: u32 = 0xC000_0080;
    /// IA32_STAR: SYSCALL CS in 47:32, SYSRET CS base in 63:48.
    pub const STAR: u32 = 0xC000_0081;
    /// IA32_LSTAR: SYSCALL's 64-bit entry point.
    pub const LSTAR: u32 = 0xC000_0082;
    /// IA32_FMASK: RFLAGS bits SYSCALL clears.
    pub const FMASK: u32 = 0xC000_0084;
    /// IA32_FS_BASE.
    pub const FS_BASE: u32 = 0xC000_0100;
    /// IA32_GS_BASE.
    pub const GS_BASE: u32 = 0xC000_0101;
    /// IA32_KERNEL_GS_BASE: swapped with GS_BASE by `swapgs`.
    pub const KERNEL_GS_BASE: u32 = 0xC000_0102;
    /// EFER.SCE.
    pub const EFER_SCE: u64 = 1;
}

/// Clears RFLAGS.IF.
#[inline(always)]
pub fn cli() {
    // SAFETY: masking interrupts has no memory effect; the kernel owns the machine.
    unsafe { asm!("cli", options(nomem, nostack)) };
}

/// Sets RFLAGS.IF.
#[inline(always)]
pub fn sti() {
    // SAFETY: every interrupt the kernel unmasks has a handler in the IDT (idt::init runs first).
    unsafe { asm!("sti", options(nomem, nostack)) };
}

/// `sti; hlt`: wait for the next interrupt without losing one that arrives in between (the STI
/// shadow covers HLT, SDM vol. 2B "STI"). Returns with interrupts enabled.
#[inline(always)]
pub fn sti_hlt() {
    // SAFETY: as for `sti`; HLT only waits.
    unsafe { asm!("sti", "hlt", options(nomem, nostack)) };
}

/// `hlt` with interrupts as they are.
#[inline(always)]
pub fn hlt() {
    // SAFETY: HLT only waits for an interrupt.
    unsafe { asm!("hlt", options(nomem, nostack)) };
}

/// Reads RFLAGS (`pushfq; pop`).
#[inline(always)]
pub fn rflags() -> u64 {
    let flags: u64;
    // SAFETY: pushes and pops one word on the current stack.
    unsafe { asm!("pushfq", "pop {}", out(reg) flags, options(nomem, preserves_flags)) };
    flags
}

/// Writes RFLAGS (`push; popfq`). At CPL 0 this restores IF; under the VMM (real CPL 3) IF is
/// silently kept, so callers must not depend on it re-enabling interrupts.
#[inline(always)]
pub fn set_rflags(flags: u64) {
    // SAFETY: the caller passes a value read by `rflags` (only IF may differ from now).
    unsafe { asm!("push {}", "popfq", in(reg) flags, options(nomem)) };
}

/// `in al, dx`.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input has no memory effects.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack)) };
    value
}

/// `out dx, al`.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output has no memory effects; the kernel owns every device it drives.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack)) };
}

/// `out dx, eax`.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack)) };
}

/// `rdmsr`.
#[inline(always)]
pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only MSRs listed in `msr` are read; all exist on every x86_64 CPU.
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    (hi as u64) << 32 | lo as u64
}

/// `wrmsr`.
///
/// # Safety
/// The MSR must exist and the value must keep the kernel running (a wrong LSTAR, EFER or GS base
/// breaks the next system call or trap).
#[inline(always)]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the MSR and value are valid.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack))
    };
}

/// Reads CR0.
#[inline(always)]
pub fn cr0() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effect.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Reads CR2 (the last page-fault linear address).
#[inline(always)]
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effect.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack)) };
    v
}

/// Reads CR3.
#[inline(always)]
pub fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effect.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes CR3 (flushes the non-global TLB entries, SDM vol. 3 §4.10.4.1).
///
/// # Safety
/// `pml4` must be the physical address of a PML4 that maps the running kernel (code, stack,
/// data) exactly as the current one does.
#[inline(always)]
pub unsafe fn set_cr3(pml4: u64) {
    // SAFETY: the caller guarantees the new tables keep the kernel mapped.
    unsafe { asm!("mov cr3, {}", in(reg) pml4, options(nostack)) };
}

/// Reads CR4.
#[inline(always)]
pub fn cr4() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effect.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}

/// Reads CR8 (the task-priority register, SDM vol. 3 "Task Priority in IA-32e Mode").
#[inline(always)]
pub fn cr8() -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effect.
    unsafe { asm!("mov {}, cr8", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes CR8: interrupts of priority class (vector >> 4) at or below it are held back.
#[inline(always)]
pub fn set_cr8(v: u64) {
    // SAFETY: the TPR only delays interrupt delivery.
    unsafe { asm!("mov cr8, {}", in(reg) v, options(nomem, nostack)) };
}

/// Invalidates the TLB entry of one linear address.
#[inline(always)]
pub fn invlpg(va: u64) {
    // SAFETY: dropping a TLB entry only forces a fresh page walk.
    unsafe { asm!("invlpg [{}]", in(reg) va, options(nostack)) };
}

/// A GDTR/IDTR image for `lgdt`/`lidt`/`sgdt`/`sidt`.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DescriptorTablePointer {
    /// Size in bytes minus one.
    pub limit: u16,
    /// Linear address of the table.
    pub base: u64,
}

/// `lidt`.
///
/// # Safety
/// The table must stay valid and hold correct gates for every vector that can be raised.
#[inline(always)]
pub unsafe fn lidt(ptr: &DescriptorTablePointer) {
    // SAFETY: the caller guarantees the IDT is valid for as long as it is loaded.
    unsafe { asm!("lidt [{}]", in(reg) ptr, options(nostack)) };
}

/// `ltr`.
///
/// # Safety
/// The selector must name an available 64-bit TSS descriptor in the loaded GDT.
#[inline(always)]
pub unsafe fn ltr(selector: u16) {
    // SAFETY: guaranteed by the caller.
    unsafe { asm!("ltr {:x}", in(reg) selector, options(nostack)) };
}

/// `rdtsc` fenced on both sides (`lfence` waits for earlier instructions to complete and keeps
/// later ones from starting, SDM vol. 2B "RDTSC"), so the interval is the work in between.
#[inline(always)]
pub fn rdtsc_fenced() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: fences and the time-stamp counter have no memory effect.
    unsafe {
        asm!("lfence", "rdtsc", "lfence", out("eax") lo, out("edx") hi, options(nomem, nostack))
    };
    (hi as u64) << 32 | lo as u64
}

/// `cpuid` (leaf, subleaf) -> (eax, ebx, ecx, edx).
#[inline(always)]
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// `int3`.
#[inline(always)]
pub fn int3() {
    // SAFETY: the breakpoint handler returns to the next instruction.
    unsafe { asm!("int3", options(nomem, nostack)) };
}
