//! Lazy FPU switching and the x87/SSE enables, as a kernel uses them: CR0.TS makes the next x87
//! or SSE instruction raise #NM (vector 7, no error code) at the instruction; the #NM handler
//! does `clts` and returns, and the instruction is retried and retires (SDM Vol. 3 §2.5, §13.4,
//! Table 2-2). CR0.MP with TS makes WAIT/FWAIT #NM too (without MP it runs). CR0.EM makes x87
//! instructions #NM and SSE instructions #UD; without CR4.OSFXSR SSE instructions are #UD (x87
//! ones run). With CR4.OSXMMEXCPT an unmasked SIMD floating-point exception is #XM (vector 19),
//! without it #UD (SDM Vol. 3 §2.5, §13.1.4; Vol. 1 §11.5.1). The last phases do the same at
//! CPL 3 (a user process using the FPU after a context switch): #NM through the guest's IDT.
//!
//! A VMM that runs the guest's x87/SSE instructions natively must put the guest's TS, EM, MP,
//! OSFXSR and OSXMMEXCPT in the real CR0/CR4, or these instructions run (or fault) where they
//! would not on the CPU. Expected outcome, natively and under the VMM: every check "ok", exit
//! success.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use test_guests::machine::{self, Frame};
use test_guests::probe::{check, check_quirk, Outcome};
use test_guests::{println, probe, ring3};

const CR0_MP: u64 = 1 << 1;
const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;

const NM: Option<(u64, u64)> = Some((7, 0));
const UD: Option<(u64, u64)> = Some((6, 0));
const XM: Option<(u64, u64)> = Some((19, 0));

/// Whether the #NM handler does `clts` and retries (else it skips the instruction).
static NM_CLTS: AtomicBool = AtomicBool::new(false);
static NM_COUNT: AtomicU64 = AtomicU64::new(0);

fn handler(frame: &mut Frame) {
    if frame.vector == 7 {
        NM_COUNT.fetch_add(1, Ordering::SeqCst);
    }
    if ring3::catch(frame) {
        return;
    }
    if !probe::record(frame) {
        machine::unexpected(frame)
    }
    if frame.vector == 7 && NM_CLTS.load(Ordering::SeqCst) {
        // SAFETY: clears CR0.TS, as a lazy-FPU #NM handler does; the instruction is retried.
        unsafe { core::arch::asm!("clts", options(nomem, nostack)) };
    } else {
        probe::skip(frame);
    }
}

fn cr0_set(set: u64, clear: u64) {
    machine::write_cr0((machine::read_cr0() | set) & !clear);
}

fn cr4_set(set: u64, clear: u64) {
    machine::write_cr4((machine::read_cr4() | set) & !clear);
}

fn ts() -> u64 {
    u64::from(machine::read_cr0() & CR0_TS != 0)
}

/// Pops ST(0) as an integer.
fn pop_st0() -> u32 {
    let mut v = 0u32;
    // SAFETY: stores one dword to `v`; called with CR0.TS = EM = 0.
    unsafe { core::arch::asm!("fistp dword ptr [{}]", in(reg) &mut v, options(nostack)) };
    v
}

/// XMM1 = `v` (low dword), XMM0 = 0; called with TS = EM = 0 and OSFXSR = 1.
fn set_xmm(v: u32) {
    // SAFETY: only XMM0/XMM1 change; this soft-float code never uses them.
    unsafe {
        core::arch::asm!("movd xmm1, {0:e}", "pxor xmm0, xmm0", in(reg) v, options(nomem, nostack))
    };
}

/// The low dword of XMM0.
fn xmm0() -> u32 {
    let v: u32;
    // SAFETY: reads XMM0.
    unsafe { core::arch::asm!("movd {0:e}, xmm0", out(reg) v, options(nomem, nostack)) };
    v
}

/// XMM0 = 1.0, XMM1 = 0.0 (for `divss xmm0, xmm1`); TS = EM = 0, OSFXSR = 1.
fn set_divide_by_zero() {
    // SAFETY: only XMM0/XMM1 change; this soft-float code never uses them.
    unsafe {
        core::arch::asm!(
            "movd xmm0, {0:e}",
            "xorps xmm1, xmm1",
            in(reg) 0x3F80_0000u32,
            options(nomem, nostack)
        )
    };
}

fn ldmxcsr(v: u32) {
    // SAFETY: loads MXCSR (reserved bits are 0 in every value used here).
    unsafe { core::arch::asm!("ldmxcsr dword ptr [{}]", in(reg) &v, options(nostack)) };
}

core::arch::global_asm!(
    r#"
.section .utext, "ax"
.global lazy_user_fld1
lazy_user_fld1:
    fld1
    ud2
.global lazy_user_movaps
lazy_user_movaps:
    movaps xmm0, xmm1
    ud2
.section .text
"#
);

extern "C" {
    fn lazy_user_fld1();
    fn lazy_user_movaps();
}

fn user(name: &str, code: unsafe extern "C" fn()) {
    let frame = ring3::enter(code, 0x2);
    let at = code as usize as u64;
    check(
        name,
        Outcome::from_frame(&frame, at),
        NM,
        frame.cs == u64::from(ring3::USER_CS),
        format_args!("from cs={:#x}", frame.cs),
    );
}

#[no_mangle]
extern "C" fn _start() -> ! {
    ring3::setup(handler);
    cr4_set(CR4_OSFXSR | CR4_OSXMMEXCPT, 0);
    cr0_set(CR0_MP, CR0_EM | CR0_TS);
    // SAFETY: initialises the x87 unit (all exceptions masked); TS = EM = 0.
    unsafe { core::arch::asm!("fninit", options(nomem, nostack)) };
    ldmxcsr(0x1F80);
    println(format_args!(
        "lazy-fpu: cr0={:#x} cr4={:#x}",
        machine::read_cr0(),
        machine::read_cr4()
    ));

    // CR0.TS: #NM, clts, retried, retired.
    NM_CLTS.store(true, Ordering::SeqCst);
    let before = NM_COUNT.load(Ordering::SeqCst);
    cr0_set(CR0_TS, 0);
    let o = probe!("fld1";);
    let st0 = pop_st0();
    check(
        "lazy-fpu ts-x87 fld1",
        o,
        NM,
        o.traps == 1 && st0 == 1 && ts() == 0,
        format_args!("retired after clts: st0={st0} TS={}", ts()),
    );
    cr0_set(CR0_TS, 0);
    let o = probe!("fninit";);
    check(
        "lazy-fpu ts-x87 fninit",
        o,
        NM,
        o.traps == 1 && ts() == 0,
        format_args!("retired after clts: TS={}", ts()),
    );
    set_xmm(0x1234_5678);
    cr0_set(CR0_TS, 0);
    let o = probe!("movaps xmm0, xmm1";);
    let x = xmm0();
    check(
        "lazy-fpu ts-sse movaps",
        o,
        NM,
        o.traps == 1 && x == 0x1234_5678 && ts() == 0,
        format_args!("retired after clts: xmm0={x:#x} TS={}", ts()),
    );
    cr0_set(CR0_TS | CR0_MP, 0);
    let o = probe!("fwait";);
    check(
        "lazy-fpu ts-mp-fwait",
        o,
        NM,
        o.traps == 1 && ts() == 0,
        format_args!("retired after clts: TS={}", ts()),
    );
    cr0_set(CR0_TS, CR0_MP);
    let o = probe!("fwait";);
    check(
        "lazy-fpu ts-without-mp-fwait",
        o,
        None,
        ts() == 1,
        format_args!("TS={}", ts()),
    );
    cr0_set(CR0_MP, CR0_TS);
    let nms = NM_COUNT.load(Ordering::SeqCst) - before;
    check(
        "lazy-fpu ts #NM count",
        Outcome {
            traps: 0,
            vector: 0,
            error: 0,
            at_insn: false,
        },
        None,
        nms == 4,
        format_args!("{nms} #NM, 4 expected"),
    );

    // CR0.EM: x87 #NM, SSE #UD (also with TS set).
    NM_CLTS.store(false, Ordering::SeqCst);
    cr0_set(CR0_EM, 0);
    let o = probe!("fld1";);
    check(
        "lazy-fpu em-x87 fld1",
        o,
        NM,
        machine::read_cr0() & CR0_EM != 0,
        format_args!(""),
    );
    let o = probe!("movaps xmm0, xmm1";);
    check("lazy-fpu em-sse movaps", o, UD, true, format_args!(""));
    let o = probe!("fwait";);
    check("lazy-fpu em-fwait", o, None, true, format_args!(""));
    cr0_set(CR0_TS, 0);
    let o = probe!("movaps xmm0, xmm1";);
    check_quirk(
        "lazy-fpu em-ts-sse movaps",
        o,
        UD,
        NM,
        "QEMU TCG checks CR0.TS before CR0.EM for SSE; the CPU gives #UD (SDM Vol. 3 Table 13-1)",
    );
    let o = probe!("fld1";);
    check("lazy-fpu em-ts-x87 fld1", o, NM, true, format_args!(""));
    cr0_set(0, CR0_EM | CR0_TS);

    // CR4.OSFXSR = 0: SSE #UD (also with TS set), x87 unaffected.
    cr4_set(0, CR4_OSFXSR);
    let o = probe!("movaps xmm0, xmm1";);
    check(
        "lazy-fpu no-osfxsr-sse movaps",
        o,
        UD,
        true,
        format_args!(""),
    );
    cr0_set(CR0_TS, 0);
    let o = probe!("movaps xmm0, xmm1";);
    check(
        "lazy-fpu no-osfxsr-ts-sse movaps",
        o,
        UD,
        true,
        format_args!(""),
    );
    cr0_set(0, CR0_TS);
    let o = probe!("fld1";);
    let st0 = pop_st0();
    check(
        "lazy-fpu no-osfxsr-x87 fld1",
        o,
        None,
        st0 == 1,
        format_args!("st0={st0}"),
    );
    cr4_set(CR4_OSFXSR, 0);

    // An unmasked SIMD divide-by-zero: #XM with OSXMMEXCPT, #UD without.
    for (name, osxmmexcpt, expected) in [
        ("lazy-fpu osxmmexcpt-divss-by-zero", true, XM),
        ("lazy-fpu no-osxmmexcpt-divss-by-zero", false, UD),
    ] {
        if osxmmexcpt {
            cr4_set(CR4_OSXMMEXCPT, 0);
        } else {
            cr4_set(0, CR4_OSXMMEXCPT);
        }
        set_divide_by_zero();
        ldmxcsr(0x1F80 & !(1 << 9)); // ZM = 0: divide-by-zero unmasked
        let o = probe!("divss xmm0, xmm1";);
        ldmxcsr(0x1F80);
        check_quirk(
            name,
            o,
            expected,
            None,
            "QEMU TCG raises no SIMD floating-point exceptions (MXCSR flags only)",
        );
    }
    cr4_set(CR4_OSXMMEXCPT, 0);

    // CPL 3 with TS set: #NM through the IDT from user mode.
    cr0_set(CR0_TS, 0);
    user("lazy-fpu user-ts-x87 fld1", lazy_user_fld1);
    cr0_set(CR0_TS, 0);
    user("lazy-fpu user-ts-sse movaps", lazy_user_movaps);
    cr0_set(0, CR0_TS);
    probe::finish("lazy-fpu")
}
