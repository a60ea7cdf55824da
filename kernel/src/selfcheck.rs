//! Boot self-checks: the host proves its own machinery works before it trusts it with a guest.
//!
//! Each check prints `[vmm] self-check <name>: ok` or `... FAILED (<why>)`; the summary line is
//! `[vmm] self-checks: N passed, M failed`.

use crate::memory::{frames, heap, phys_to_virt, FRAME_SIZE};
use crate::timer;
use crate::trap::{self, vector, TRAP_COUNTS};
use crate::{cpu, gdt};
use alloc::vec::Vec;
use core::sync::atomic::Ordering;

/// The outcome of all checks.
pub struct Summary {
    /// Checks that passed.
    pub passed: u32,
    /// Checks that failed.
    pub failed: u32,
}

/// One self-check: `Err` says what went wrong.
type Check = fn() -> Result<(), &'static str>;

fn breakpoint_returns() -> Result<(), &'static str> {
    let before = TRAP_COUNTS[vector::BREAKPOINT as usize].load(Ordering::Relaxed);
    // SAFETY: INT3 enters the breakpoint handler, which returns to the next instruction.
    unsafe { core::arch::asm!("int3") };
    let after = TRAP_COUNTS[vector::BREAKPOINT as usize].load(Ordering::Relaxed);
    if after == before + 1 {
        Ok(())
    } else {
        Err("the #BP handler did not run exactly once")
    }
}

fn trap_frame_preserves_registers() -> Result<(), &'static str> {
    let (mut a, mut b, mut c, mut d) = (
        0x1111_2222_3333_4444u64,
        0x5555u64,
        u64::MAX,
        0x8000_0000_0000_0001u64,
    );
    let (a0, b0, c0, d0) = (a, b, c, d);
    // SAFETY: INT3 returns to the next instruction; the registers are inputs and outputs, so the
    // compiler expects them to be read back and compares them with what went in.
    unsafe {
        core::arch::asm!("int3", inout("r12") a, inout("r15") b, inout("r13") c, inout("rsi") d)
    };
    if (a, b, c, d) == (a0, b0, c0, d0) {
        Ok(())
    } else {
        Err("a register changed across a trap")
    }
}

fn page_fault_is_caught() -> Result<(), &'static str> {
    // The lower half is the guest's: the host maps nothing there.
    let unmapped = 0x0000_4000_0000_1238;
    if trap::read_u64_or_fault(unmapped).is_some() {
        return Err("read of an unmapped address succeeded");
    }
    if trap::LAST_RECOVERED_CR2.load(Ordering::Relaxed) != unmapped {
        return Err("CR2 does not hold the faulting address");
    }
    let mapped = 42u64;
    if trap::read_u64_or_fault(&mapped as *const u64 as u64) != Some(42) {
        return Err("read of a mapped address through the fixup path failed");
    }
    log::info!("self-check detail: #PF at {unmapped:#x} caught, CR2 matched, execution resumed");
    Ok(())
}

fn timer_ticks_arrive() -> Result<(), &'static str> {
    const WANTED: u64 = 5;
    // Generous bound in TSC units so a dead timer fails the check instead of hanging the boot.
    const TSC_LIMIT: u64 = 20_000_000_000;
    let start_ticks = timer::ticks();
    // SAFETY: RDTSC has no side effects.
    let start = unsafe { core::arch::x86_64::_rdtsc() };
    while timer::ticks() < start_ticks + WANTED {
        // SAFETY: as above.
        if unsafe { core::arch::x86_64::_rdtsc() } - start > TSC_LIMIT {
            return Err("no timer ticks arrived");
        }
        core::hint::spin_loop();
    }
    Ok(())
}

fn frames_allocate_and_free() -> Result<(), &'static str> {
    let before = frames::free_frames();
    let mut got = [0u64; 3];
    for (i, slot) in got.iter_mut().enumerate() {
        let frame = frames::allocate_zeroed().ok_or("out of frames")?;
        if frame % FRAME_SIZE != 0 || frame < 0x10_0000 {
            return Err("frame misaligned or in low memory");
        }
        let p = phys_to_virt(frame).cast::<u64>();
        // SAFETY: word 511 is the last u64 of the 4 KiB frame `p` points at.
        let last = unsafe { p.add(511) };
        // SAFETY: the frame is ours and mapped by the direct map; `p` is 4 KiB aligned.
        let dirty = unsafe { p.read() } != 0 || {
            // SAFETY: as above, for the frame's last word.
            unsafe { last.read() != 0 }
        };
        if dirty {
            return Err("allocate_zeroed returned a dirty frame");
        }
        // SAFETY: as above: the frame is ours, mapped and aligned.
        unsafe { p.write(0xF00D_0000 + i as u64) };
        *slot = frame;
    }
    if got[0] == got[1] || got[1] == got[2] || got[0] == got[2] {
        return Err("the same frame was handed out twice");
    }
    for (i, &frame) in got.iter().enumerate() {
        // SAFETY: still ours; reading back what we wrote through the direct map.
        if unsafe { phys_to_virt(frame).cast::<u64>().read() } != 0xF00D_0000 + i as u64 {
            return Err("frame contents did not stick");
        }
    }
    for &frame in &got {
        // SAFETY: allocated above, not mapped or used anywhere else.
        unsafe { frames::deallocate(frame) };
    }
    if frames::free_frames() != before {
        return Err("free frame count not restored");
    }
    let again = frames::allocate().ok_or("out of frames")?;
    if again != got[2] {
        return Err("the free list did not hand back the last freed frame");
    }
    // SAFETY: just allocated, unused.
    unsafe { frames::deallocate(again) };
    Ok(())
}

fn heap_allocates() -> Result<(), &'static str> {
    let before = heap::used();
    let v: Vec<u64> = (0..10_000).collect();
    if heap::used() < before + 80_000 {
        return Err("heap usage did not grow");
    }
    if v.iter().sum::<u64>() != 49_995_000 {
        return Err("heap contents wrong");
    }
    drop(v);
    if heap::used() != before {
        return Err("heap usage did not shrink back");
    }
    Ok(())
}

/// The exception vectors with an error code are one table, vmm-core's
/// (`Event::vector_has_error_code`, SDM Vol. 3 §6.15): the assembly entry stubs must agree with
/// it, or a frame would be misread by one quadword.
fn error_code_vectors_agree() -> Result<(), &'static str> {
    if (0..32)
        .all(|v| trap::stub_expects_error_code(v) == vmm_core::cpu::Event::vector_has_error_code(v))
    {
        Ok(())
    } else {
        Err("trap_entry.S and Event::vector_has_error_code disagree on a vector")
    }
}

/// The state the real CPU consults while the guest runs at CPL 3 is the isolation boundary,
/// including state the host itself never uses (a left-over reset value was an escape once:
/// docs/hostile-guests.md, "What the suite found"). This checks what `trap::init`, `gdt::init`
/// and `cpu::enable_host_features` set: every IDT gate present with DPL 0 (so a guest's INT n
/// faults and is emulated), no I/O permission bitmap in the TSS (so every port access at CPL 3
/// faults), the host's GDT descriptors DPL 0, and CR4.UMIP and CR4.SMEP on where the CPU has
/// them. Not the null LDTR: SLDT reads selector 0 for the reset LDTR too (base 0, limit 0xFFFF,
/// usable), and telling them apart means touching linear 0; the `ldt-reset-value` test guest
/// checks it from the guest's side.
fn isolation_registers() -> Result<(), &'static str> {
    let mut idtr = [0u8; 10];
    // SAFETY: SIDT stores 10 bytes into `idtr`.
    unsafe { core::arch::asm!("sidt [{0}]", in(reg) idtr.as_mut_ptr(), options(nostack)) };
    let idt_base = u64::from_le_bytes(idtr[2..].try_into().map_err(|_| "SIDT")?);
    if u16::from_le_bytes([idtr[0], idtr[1]]) != 256 * 16 - 1 {
        return Err("the IDT does not cover all 256 vectors");
    }
    for vector in 0..256u64 {
        // SAFETY: the IDT is the host's, 256 gates of 16 bytes at `idt_base` (just checked).
        let low = unsafe { ((idt_base + 16 * vector) as *const u64).read() };
        let (present, dpl, typ) = ((low >> 47) & 1, (low >> 45) & 3, (low >> 40) & 0xF);
        if present != 1 || dpl != 0 || typ != 0xE {
            return Err("an IDT gate is not a present DPL-0 interrupt gate");
        }
    }
    let mut gdtr = [0u8; 10];
    // SAFETY: SGDT stores 10 bytes into `gdtr`.
    unsafe { core::arch::asm!("sgdt [{0}]", in(reg) gdtr.as_mut_ptr(), options(nostack)) };
    let gdt_base = u64::from_le_bytes(gdtr[2..].try_into().map_err(|_| "SGDT")?);
    let descriptor = |selector: u16| {
        // SAFETY: the host's selectors index the real GDT, 64 KiB long.
        unsafe { ((gdt_base + u64::from(selector & !7)) as *const u64).read() }
    };
    for selector in [gdt::HOST_CODE, gdt::HOST_DATA, gdt::TSS] {
        if (descriptor(selector) >> 45) & 3 != 0 {
            return Err("a host GDT descriptor is not DPL 0");
        }
    }
    let tss = descriptor(gdt::TSS);
    let (tss_base, tss_limit) = (
        ((tss >> 16) & 0xFF_FFFF) | (((tss >> 56) & 0xFF) << 24) | (descriptor(gdt::TSS + 8) << 32),
        (tss & 0xFFFF) | (((tss >> 48) & 0xF) << 16),
    );
    // SAFETY: the TSS is the host's; the I/O map base is the u16 at offset 102.
    let io_map_base = unsafe { ((tss_base + 102) as *const u16).read_unaligned() };
    if u64::from(io_map_base) <= tss_limit {
        return Err("the TSS has an I/O permission bitmap");
    }
    let features = cpu::Features::detect();
    // SAFETY: reading CR4 at CPL 0 has no side effects.
    let cr4 = unsafe { x86::controlregs::cr4() };
    if features.umip && !cr4.contains(x86::controlregs::Cr4::CR4_ENABLE_UMIP) {
        return Err("CR4.UMIP is off");
    }
    if features.smep && !cr4.contains(x86::controlregs::Cr4::CR4_ENABLE_SMEP) {
        return Err("CR4.SMEP is off");
    }
    log::info!(
        "self-check detail: 256 DPL-0 gates, no I/O bitmap, host descriptors DPL 0, UMIP {}, SMEP {}",
        if features.umip { "on" } else { "absent" },
        if features.smep { "on" } else { "absent" }
    );
    Ok(())
}

/// Runs every check and prints the results.
pub fn run() -> Summary {
    let checks: [(&str, Check); 8] = [
        ("breakpoint-returns", breakpoint_returns),
        (
            "trap-frame-preserves-registers",
            trap_frame_preserves_registers,
        ),
        ("page-fault-caught", page_fault_is_caught),
        ("timer-ticks", timer_ticks_arrive),
        ("frame-allocator", frames_allocate_and_free),
        ("heap", heap_allocates),
        ("error-code-vectors", error_code_vectors_agree),
        ("isolation-registers", isolation_registers),
    ];
    let mut summary = Summary {
        passed: 0,
        failed: 0,
    };
    for (name, check) in checks {
        match check() {
            Ok(()) => {
                summary.passed += 1;
                log::info!("self-check {name}: ok");
            }
            Err(why) => {
                summary.failed += 1;
                log::error!("self-check {name}: FAILED ({why})");
            }
        }
    }
    log::info!(
        "self-checks: {} passed, {} failed (timer ticks so far: {} at {} Hz)",
        summary.passed,
        summary.failed,
        timer::ticks(),
        timer::tick_hz()
    );
    summary
}
