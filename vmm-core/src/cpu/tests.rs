//! Unit and property tests of the virtual CPU: one per instruction and rule, with the state
//! before and after and exact error codes; property tests that random bytes and random tables
//! never panic. The rig they run on (a guest kernel's tables in a flat memory, fake ports and
//! CPUID) is `crate::testing`, shared with the fuzz targets.

use super::descriptor::encode_gate;
use super::msr::index;
use super::state::{cr0, cr4, efer, rflags};
use super::*;
use crate::testing::*;
use proptest::prelude::*;
use std::format;
use std::vec::Vec;

// ---- CLI / STI / HLT / interrupt shadow ----

#[test]
fn cli_at_cpl0_clears_the_virtual_if_and_retires() {
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::IF;
    r.ok(&[0xFA]);
    assert!(!r.cpu.interrupts_enabled());
    assert_eq!(r.cpu.rip, CODE + 1);
}

#[test]
fn cli_in_guest_user_mode_is_a_gp_delivered_on_the_tss_stack() {
    let mut r = Rig::user();
    r.raises(&[0xFA], 13, Some(0));
    // Frame: error code, RIP (at the CLI), CS, RFLAGS, RSP, SS; on RSP0 (aligned).
    assert_eq!(r.cpu.reg(Gpr::Rsp), RSP0 - 48);
    assert_eq!(r.stack(0), 0);
    assert_eq!(r.stack(1), UCODE);
    assert_eq!(r.stack(2), u64::from(UCODE_SEL));
    assert_ne!(
        r.stack(3) & rflags::IF,
        0,
        "the pushed RFLAGS has the user's IF"
    );
    assert_eq!(r.stack(4), USTACK_TOP);
    assert_eq!(r.stack(5), u64::from(UDATA));
    assert!(!r.cpu.interrupts_enabled(), "interrupt gate clears IF");
    assert_eq!(r.cpu.segment(SegReg::Cs).selector, KCODE);
    assert_eq!(
        r.cpu.segment(SegReg::Ss).selector,
        0,
        "null SS on a privilege change"
    );
    assert!(r.cpu.take_effects().privilege);
}

#[test]
fn cli_is_allowed_in_user_mode_when_iopl_is_3() {
    let mut r = Rig::user();
    r.cpu.rflags |= rflags::IOPL;
    r.ok(&[0xFA]);
    assert!(!r.cpu.interrupts_enabled());
}

#[test]
fn sti_in_guest_user_mode_is_gp_and_leaves_if_alone() {
    let mut r = Rig::user();
    r.cpu.rflags &= !rflags::IF;
    r.raises(&[0xFB], 13, Some(0));
    assert_eq!(
        r.stack(3) & rflags::IF,
        0,
        "the pushed RFLAGS still has IF = 0"
    );
    assert_eq!(
        r.cpu.interrupt_shadow, None,
        "no shadow from an STI that faulted"
    );
}

#[test]
fn sti_sets_if_and_a_one_instruction_shadow_only_when_if_was_clear() {
    let mut r = Rig::kernel();
    r.ok(&[0xFB, 0x90]);
    assert!(r.cpu.interrupts_enabled());
    assert_eq!(r.cpu.interrupt_shadow, Some(CODE + 1));
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::IF;
    r.ok(&[0xFB]);
    assert_eq!(r.cpu.interrupt_shadow, None);
}

#[test]
fn sti_then_hlt_never_loses_the_wakeup() {
    let mut r = Rig::kernel();
    r.ok(&[0xFB, 0xF4]);
    let mut pic = Pic {
        pending: Some(0x20),
    };
    // The shadow covers HLT: nothing is injected before it runs.
    assert_eq!(
        inject(&mut r.cpu, &mut r.mem, &mut pic),
        Ok(Injection::WindowNeeded)
    );
    let h = r.run().unwrap();
    assert_eq!(h.outcome, Outcome::Halted);
    assert_eq!(
        inject(&mut r.cpu, &mut r.mem, &mut pic),
        Ok(Injection::Delivered(0x20))
    );
    assert!(!r.cpu.halted);
    assert_eq!(r.cpu.rip, HANDLERS + 0x200);
    assert_eq!(r.stack(0), CODE + 2, "returns after the HLT");
}

#[test]
fn hlt_with_interrupts_enabled_idles_until_one_is_pending() {
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::IF;
    r.code(&[0xF4]);
    assert_eq!(r.run().unwrap().outcome, Outcome::Halted);
    let mut pic = Pic { pending: None };
    assert_eq!(
        inject(&mut r.cpu, &mut r.mem, &mut pic),
        Ok(Injection::Idle)
    );
    pic.pending = Some(0x21);
    assert_eq!(
        inject(&mut r.cpu, &mut r.mem, &mut pic),
        Ok(Injection::Delivered(0x21))
    );
}

#[test]
fn hlt_with_interrupts_disabled_is_a_stop_not_a_hang() {
    let mut r = Rig::kernel();
    r.code(&[0xF4]);
    r.run().unwrap();
    let mut pic = Pic {
        pending: Some(0x20),
    };
    assert_eq!(
        inject(&mut r.cpu, &mut r.mem, &mut pic),
        Err(CpuStop::HaltedForever)
    );
}

#[test]
fn hlt_in_user_mode_is_gp() {
    Rig::user().raises(&[0xF4], 13, Some(0));
}

#[test]
fn no_interrupt_is_injected_while_if_is_clear() {
    let mut r = Rig::kernel();
    let mut pic = Pic {
        pending: Some(0x20),
    };
    assert_eq!(
        inject(&mut r.cpu, &mut r.mem, &mut pic),
        Ok(Injection::None)
    );
    assert_eq!(pic.pending, Some(0x20), "not acknowledged");
}

#[test]
fn the_injection_decision_on_every_state_of_if_the_shadow_hlt_and_the_pic() {
    use inject::{injection_decision, Decision};
    /// Where the shadow is: none, covering the instruction at RIP, or left at an address RIP has
    /// moved past.
    #[derive(Clone, Copy, Debug)]
    enum Shadow {
        None,
        AtRip,
        Passed,
    }
    // IF, shadow, halted, INTR asserted -> what the CPU does at this instruction boundary.
    let halted_forever = Err(CpuStop::HaltedForever);
    #[rustfmt::skip]
    let table = [
        (false, Shadow::None,   false, false, Ok(Decision::Resume)),
        (false, Shadow::None,   false, true,  Ok(Decision::Resume)),
        (false, Shadow::AtRip,  false, true,  Ok(Decision::Resume)),
        (false, Shadow::None,   true,  false, halted_forever),
        (false, Shadow::None,   true,  true,  halted_forever),
        (true,  Shadow::None,   false, false, Ok(Decision::Resume)),
        (true,  Shadow::None,   false, true,  Ok(Decision::DeliverNow)),
        (true,  Shadow::AtRip,  false, false, Ok(Decision::Resume)),
        (true,  Shadow::AtRip,  false, true,  Ok(Decision::WindowNeeded)),
        (true,  Shadow::Passed, false, true,  Ok(Decision::DeliverNow)),
        (true,  Shadow::None,   true,  false, Ok(Decision::Idle)),
        (true,  Shadow::None,   true,  true,  Ok(Decision::DeliverNow)),
        (true,  Shadow::Passed, true,  true,  Ok(Decision::DeliverNow)),
    ];
    for (interrupts_enabled, shadow, halted, pending, want) in table {
        let mut cpu = Rig::kernel().cpu;
        cpu.set_interrupts_enabled(interrupts_enabled);
        cpu.halted = halted;
        cpu.interrupt_shadow = match shadow {
            Shadow::None => None,
            Shadow::AtRip => Some(cpu.rip),
            Shadow::Passed => Some(cpu.rip - 1),
        };
        assert_eq!(
            injection_decision(&cpu, pending),
            want,
            "IF={} shadow {shadow:?} halted={halted} pending={pending}",
            u8::from(interrupts_enabled)
        );
    }
}

#[test]
fn the_shadow_ends_once_rip_moves_on() {
    let mut r = Rig::kernel();
    r.ok(&[0xFB]);
    r.cpu.rip += 1; // the NOP after STI ran natively
    let mut pic = Pic {
        pending: Some(0x20),
    };
    assert_eq!(
        inject(&mut r.cpu, &mut r.mem, &mut pic),
        Ok(Injection::Delivered(0x20))
    );
    assert_eq!(r.cpu.interrupt_shadow, None);
}

// ---- control registers ----

#[test]
fn mov_to_cr3_records_a_shadow_root_switch() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 0x0020_5000);
    r.ok(&[0x0F, 0x22, 0xD8]);
    assert_eq!(r.cpu.cr3, 0x0020_5000);
    assert_eq!(r.cpu.take_effects().cr3_load, Some(0x0020_5000));
    assert!(r.cpu.take_effects().is_empty(), "effects are taken once");
}

#[test]
fn mov_to_cr3_with_reserved_bits_is_gp() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 1 << 63);
    r.raises(&[0x0F, 0x22, 0xD8], 13, Some(0));
    assert_eq!(r.cpu.cr3, 0x100000);
}

#[test]
fn mov_to_cr3_with_a_bit_at_or_above_maxphyaddr_is_gp() {
    let mut r = Rig::kernel();
    assert_eq!(r.cpu.max_phys_bits, 40);
    for bad in [1u64 << 40, 1 << 51, 1 << 52] {
        r.cpu.rip = CODE;
        r.cpu.set_reg(Gpr::Rax, 0x0020_5000 | bad);
        r.raises(&[0x0F, 0x22, 0xD8], 13, Some(0));
        assert_eq!(r.cpu.cr3, 0x100000);
        assert_eq!(r.cpu.take_effects().cr3_load, None);
    }
    // The highest address bit below MAXPHYADDR, PWT/PCD and the ignored low bits are fine.
    let mut r = Rig::kernel();
    let value = (1u64 << 39) | 0x0020_5000 | 0x18 | 0x7;
    r.cpu.set_reg(Gpr::Rax, value);
    r.ok(&[0x0F, 0x22, 0xD8]);
    assert_eq!(r.cpu.cr3, value);
}

#[test]
fn mov_from_cr0_cr2_cr3_cr4_reads_the_virtual_values() {
    let mut r = Rig::kernel();
    r.cpu.cr2 = 0xDEAD_0000;
    for (bytes, expected) in [
        ([0x0F, 0x20, 0xC0], boot::ENTRY_CR0),
        ([0x0F, 0x20, 0xD0], 0xDEAD_0000),
        ([0x0F, 0x20, 0xD8], 0x100000),
        ([0x0F, 0x20, 0xE0], boot::ENTRY_CR4),
    ] {
        r.cpu.rip = CODE;
        r.ok(&bytes);
        assert_eq!(r.cpu.reg(Gpr::Rax), expected);
    }
}

#[test]
fn mov_to_cr0_rules() {
    let mut r = Rig::kernel();
    // Clearing WP changes the paging mode.
    r.cpu.set_reg(Gpr::Rax, boot::ENTRY_CR0 & !cr0::WP);
    r.ok(&[0x0F, 0x22, 0xC0]);
    assert!(r.cpu.take_effects().paging_mode);
    assert!(!r.cpu.paging_mode(40).cr0_wp);
    // Clearing PG in long mode, NW without CD, and reserved bits are #GP.
    for bad in [
        boot::ENTRY_CR0 & !cr0::PG,
        boot::ENTRY_CR0 | cr0::NW,
        boot::ENTRY_CR0 | 1 << 40,
    ] {
        let mut r = Rig::kernel();
        r.cpu.set_reg(Gpr::Rax, bad);
        r.raises(&[0x0F, 0x22, 0xC0], 13, Some(0));
        assert_eq!(r.cpu.cr0, boot::ENTRY_CR0);
    }
}

#[test]
fn mov_to_cr0_ignores_the_reserved_bits_of_its_low_half() {
    let mut r = Rig::kernel();
    let reserved_low = (1 << 6) | (1 << 15) | (1 << 17) | (1 << 28);
    r.cpu.set_reg(Gpr::Rax, boot::ENTRY_CR0 | reserved_low);
    r.ok(&[0x0F, 0x22, 0xC0]);
    assert_eq!(
        r.cpu.cr0,
        boot::ENTRY_CR0,
        "ignored: not stored, read back as 0"
    );
    // CR0[63:32] is #GP(0).
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, boot::ENTRY_CR0 | 1 << 32);
    r.raises(&[0x0F, 0x22, 0xC0], 13, Some(0));
}

#[test]
fn mov_to_cr4_rules() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, boot::ENTRY_CR4 | cr4::PGE);
    r.ok(&[0x0F, 0x22, 0xE0]);
    let e = r.cpu.take_effects();
    assert!(e.paging_mode && e.flush_all);
    // VMXE (bit 13), FSGSBASE (16), PCIDE (17), OSXSAVE (18), SMEP (20), SMAP (21) and PKE
    // (22) are hidden by CPUID, so reserved; clearing PAE in long mode is #GP.
    for bad in [13, 16, 17, 18, 20, 21, 22]
        .map(|bit| boot::ENTRY_CR4 | 1 << bit)
        .into_iter()
        .chain([0])
    {
        let mut r = Rig::kernel();
        r.cpu.set_reg(Gpr::Rax, bad);
        r.raises(&[0x0F, 0x22, 0xE0], 13, Some(0));
    }
}

#[test]
fn cr8_holds_four_bits() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 5);
    r.ok(&[0x44, 0x0F, 0x22, 0xC0]);
    assert_eq!(r.cpu.cr8, 5);
    r.cpu.rip = CODE;
    r.cpu.set_reg(Gpr::Rax, 16);
    r.raises(&[0x44, 0x0F, 0x22, 0xC0], 13, Some(0));
}

#[test]
fn control_register_access_from_user_mode_is_gp() {
    Rig::user().raises(&[0x0F, 0x20, 0xD8], 13, Some(0));
}

#[test]
fn clts_lmsw_smsw() {
    let mut r = Rig::kernel();
    r.cpu.cr0 |= cr0::TS;
    r.ok(&[0x0F, 0x06]);
    assert_eq!(r.cpu.cr0 & cr0::TS, 0);
    // LMSW with AX = 0 cannot clear PE.
    r.cpu.rip = CODE;
    r.cpu.set_reg(Gpr::Rax, 0);
    r.ok(&[0x0F, 0x01, 0xF0]);
    assert_ne!(r.cpu.cr0 & cr0::PE, 0);
    assert_eq!(r.cpu.cr0 & cr0::MP, 0, "MP loaded from the source");
    r.cpu.rip = CODE;
    r.ok(&[0x48, 0x0F, 0x01, 0xE0]);
    assert_eq!(r.cpu.reg(Gpr::Rax), r.cpu.cr0, "SMSW r64 stores CR0");
}

// ---- descriptor tables ----

#[test]
fn lgdt_and_lidt_load_from_memory() {
    let mut r = Rig::kernel();
    r.mem.poke(DATA, &0x0FFFu16.to_le_bytes());
    r.mem
        .poke(DATA + 2, &0xFFFF_8000_0000_1000u64.to_le_bytes());
    r.cpu.set_reg(Gpr::Rax, DATA);
    r.ok(&[0x0F, 0x01, 0x18]);
    assert_eq!(
        r.cpu.idtr,
        TableRegister {
            base: 0xFFFF_8000_0000_1000,
            limit: 0xFFF
        }
    );
    r.cpu.rip = CODE;
    r.ok(&[0x0F, 0x01, 0x10]);
    assert_eq!(r.cpu.gdtr.base, 0xFFFF_8000_0000_1000);
}

#[test]
fn lgdt_with_a_non_canonical_base_is_gp_and_from_user_mode_too() {
    let mut r = Rig::kernel();
    r.mem
        .poke(DATA + 2, &0x0000_8000_0000_0000u64.to_le_bytes());
    r.cpu.set_reg(Gpr::Rax, DATA);
    r.raises(&[0x0F, 0x01, 0x10], 13, Some(0));
    assert_eq!(r.cpu.gdtr.base, GDT);
    Rig::user().raises(&[0x0F, 0x01, 0x10], 13, Some(0));
}

#[test]
fn lgdt_operand_on_an_unmapped_page_is_a_page_fault_with_cr2() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 0x7700_0000);
    r.raises(&[0x0F, 0x01, 0x10], 14, Some(0));
    assert_eq!(r.cpu.cr2, 0x7700_0000);
}

#[test]
fn a_non_canonical_operand_is_gp_and_through_rsp_is_ss() {
    // The raw address becomes a `GuestVirtAddr` in the emulator's helpers: #GP(0) for a data
    // access, #SS(0) for a stack access (SDM Vol. 3 §6.15), and guest memory is never asked.
    let mut r = Rig::user();
    r.cpu.set_reg(Gpr::Rax, 0x8000_0000_0000_0000);
    r.raises(&[0x0F, 0x01, 0x00], 13, Some(0)); // sgdt [rax]
    let mut r = Rig::user();
    r.cpu.set_reg(Gpr::Rsp, 0x0000_8000_0000_0010);
    let writes = r.mem.writes;
    r.raises(&[0x0F, 0x01, 0x04, 0x24], 12, Some(0)); // sgdt [rsp]
    assert_eq!(r.mem.writes, writes + 1, "only the #SS frame was written");
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 0xFFFF_7FFF_FFFF_FFF8);
    r.raises(&[0x0F, 0x01, 0x10], 13, Some(0)); // lgdt [rax]
    assert_eq!(r.cpu.gdtr.base, GDT);
}

#[test]
fn sgdt_sidt_store_the_virtual_tables_unless_umip_forbids() {
    let mut r = Rig::user();
    r.cpu.set_reg(Gpr::Rax, 0x20000);
    r.ok(&[0x0F, 0x01, 0x00]);
    assert_eq!(r.mem.peek(0x20000, 2), (r.cpu.gdtr.limit).to_le_bytes());
    assert_eq!(r.mem.peek_u64(0x20002), GDT);
    let mut r = Rig::user();
    r.cpu.cr4 |= cr4::UMIP;
    r.cpu.set_reg(Gpr::Rax, 0x20000);
    r.raises(&[0x0F, 0x01, 0x08], 13, Some(0));
}

#[test]
fn ltr_marks_the_tss_busy_and_a_busy_one_cannot_be_loaded() {
    let mut r = Rig::kernel();
    r.cpu.tr = Segment::null(0);
    r.cpu.set_reg(Gpr::Rax, u64::from(TSS_SEL));
    r.ok(&[0x0F, 0x00, 0xD8]);
    assert_eq!(r.cpu.tr.selector, TSS_SEL);
    assert_eq!(r.cpu.tr.cache.base, TSS);
    assert_eq!(
        (r.mem.peek_u64(GDT + 0x28) >> 40) & 0xF,
        0xB,
        "busy in memory"
    );
    r.cpu.rip = CODE;
    r.raises(&[0x0F, 0x00, 0xD8], 13, Some(u32::from(TSS_SEL)));
}

#[test]
fn ltr_null_and_of_a_code_segment_are_gp() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 0);
    r.raises(&[0x0F, 0x00, 0xD8], 13, Some(0));
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, u64::from(KCODE));
    r.raises(&[0x0F, 0x00, 0xD8], 13, Some(u32::from(KCODE)));
}

#[test]
fn sldt_and_str_into_registers() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, u64::MAX);
    r.ok(&[0x0F, 0x00, 0xC8]);
    assert_eq!(
        r.cpu.reg(Gpr::Rax),
        u64::from(TSS_SEL),
        "STR r32 zero-extends"
    );
    r.cpu.rip = CODE;
    r.ok(&[0x48, 0x0F, 0x00, 0xC0]);
    assert_eq!(r.cpu.reg(Gpr::Rax), 0);
}

#[test]
fn lldt_null_clears_and_of_a_data_segment_is_gp() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 0);
    r.ok(&[0x0F, 0x00, 0xD0]);
    assert_eq!(r.cpu.ldtr.selector, 0);
    r.cpu.rip = CODE;
    r.cpu.set_reg(Gpr::Rax, u64::from(KDATA));
    r.raises(&[0x0F, 0x00, 0xD0], 13, Some(u32::from(KDATA)));
}

// ---- INVLPG, WBINVD, MSRs ----

#[test]
fn invlpg_records_the_address_for_the_shadow() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 0x7F_1234);
    r.ok(&[0x0F, 0x01, 0x38]);
    assert_eq!(r.cpu.take_effects().invlpg, Some(0x7F_1234));
    Rig::user().raises(&[0x0F, 0x01, 0x38], 13, Some(0));
}

#[test]
fn wbinvd_is_a_nop_at_cpl0_and_gp_in_user_mode() {
    Rig::kernel().ok(&[0x0F, 0x09]);
    Rig::user().raises(&[0x0F, 0x09], 13, Some(0));
}

fn wrmsr(r: &mut Rig, msr: u32, value: u64) {
    r.cpu.rip = CODE;
    r.cpu.set_reg(Gpr::Rcx, u64::from(msr));
    r.cpu.set_reg(Gpr::Rax, value & 0xFFFF_FFFF);
    r.cpu.set_reg(Gpr::Rdx, value >> 32);
    r.code(&[0x0F, 0x30]);
}

#[test]
fn wrmsr_then_rdmsr_round_trips_lstar() {
    let mut r = Rig::kernel();
    wrmsr(&mut r, index::LSTAR, 0xFFFF_FFFF_8000_1234);
    r.run().unwrap();
    assert_eq!(r.cpu.msr.lstar, 0xFFFF_FFFF_8000_1234);
    r.cpu.rip = CODE;
    r.cpu.set_reg(Gpr::Rax, 0);
    r.ok(&[0x0F, 0x32]);
    assert_eq!(r.cpu.reg(Gpr::Rax), 0x8000_1234);
    assert_eq!(r.cpu.reg(Gpr::Rdx), 0xFFFF_FFFF);
}

#[test]
fn msr_write_checks() {
    for (msr, value) in [
        (index::LSTAR, 0x0000_8000_0000_0000u64),
        (index::SFMASK, 1 << 32),
        (index::PAT, 0x02),
        (index::EFER, boot::ENTRY_EFER & !efer::LME),
        (index::EFER, boot::ENTRY_EFER | 1 << 20),
        (index::APIC_BASE, 0),
        (index::TSC_AUX, 1 << 40),
    ] {
        let mut r = Rig::kernel();
        wrmsr(&mut r, msr, value);
        let h = r.run().unwrap();
        assert_eq!(
            h.outcome,
            Outcome::Delivered(Event::gp(0)),
            "MSR {msr:#x} = {value:#x}"
        );
    }
}

#[test]
fn unknown_msrs_are_gp_and_counted() {
    let mut r = Rig::kernel();
    for _ in 0..3 {
        wrmsr(&mut r, 0x1234, 0);
        r.run().unwrap();
    }
    r.cpu.rip = CODE;
    r.raises(&[0x0F, 0x32], 13, Some(0));
    assert_eq!(
        r.cpu.msr.unknown()[0],
        super::msr::UnknownMsr {
            index: 0x1234,
            reads: 1,
            writes: 3
        }
    );
}

#[test]
fn efer_nxe_toggle_changes_the_paging_mode_and_lma_is_read_only() {
    let mut r = Rig::kernel();
    wrmsr(&mut r, index::EFER, efer::LME | efer::SCE);
    r.run().unwrap();
    assert_eq!(r.cpu.efer, efer::LME | efer::LMA | efer::SCE);
    assert!(r.cpu.take_effects().paging_mode);
}

#[test]
fn fs_and_gs_base_msrs_drive_the_real_bases() {
    let mut r = Rig::kernel();
    wrmsr(&mut r, index::GS_BASE, 0xFFFF_8000_0000_2000);
    r.run().unwrap();
    assert_eq!(r.cpu.gs_base(), 0xFFFF_8000_0000_2000);
    assert!(r.cpu.take_effects().segment_bases);
}

#[test]
fn apic_base_reads_the_fixed_value() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rcx, u64::from(index::APIC_BASE));
    r.ok(&[0x0F, 0x32]);
    assert_eq!(r.cpu.reg(Gpr::Rax), 0xFEE0_0900);
}

// ---- port I/O ----

#[test]
fn out_and_in_reach_the_port_bus() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 0x1234_5678_9ABC_DE11);
    r.ok(&[0xE6, 0x21]);
    assert_eq!(r.ports.writes, std::vec![(0x21, 1, 0x11)]);
    r.ports.values.insert(0x3F8, 0xAABB_CCDD);
    r.cpu.rip = CODE;
    r.cpu.set_reg(Gpr::Rdx, 0x3F8);
    r.ok(&[0xED]);
    assert_eq!(r.cpu.reg(Gpr::Rax), 0xAABB_CCDD, "IN EAX zero-extends");
    r.cpu.rip = CODE;
    r.cpu.set_reg(Gpr::Rax, 0xFFFF_FFFF_FFFF_FFFF);
    r.ok(&[0xEC]);
    assert_eq!(r.cpu.reg(Gpr::Rax), 0xFFFF_FFFF_FFFF_FFDD, "IN AL merges");
}

#[test]
fn port_io_in_user_mode_consults_the_tss_bitmap() {
    // No bitmap (base 0x68 = the limit): #GP.
    let mut r = Rig::user();
    r.raises(&[0xE4, 0x21], 13, Some(0));
    // A bitmap that allows port 0x21 only.
    let mut r = Rig::user();
    r.cpu.tr.cache.limit = 0x68 + 0x2000;
    let mut bitmap = std::vec![0xFFu8; 8];
    bitmap[4] = !(1 << 1);
    r.mem.poke(TSS + 0x68, &bitmap);
    r.ok(&[0xE4, 0x21]);
    r.cpu.rip = UCODE;
    r.raises(&[0xE4, 0x22], 13, Some(0));
}

#[test]
fn rep_outsb_writes_every_byte_in_order() {
    let mut r = Rig::kernel();
    r.mem.poke(DATA, b"hi!");
    r.cpu.set_reg(Gpr::Rsi, DATA);
    r.cpu.set_reg(Gpr::Rcx, 3);
    r.cpu.set_reg(Gpr::Rdx, 0xE9);
    r.ok(&[0xF3, 0x6E]);
    let bytes: Vec<u32> = r.ports.writes.iter().map(|w| w.2).collect();
    assert_eq!(
        bytes,
        std::vec![u32::from(b'h'), u32::from(b'i'), u32::from(b'!')]
    );
    assert_eq!((r.cpu.reg(Gpr::Rcx), r.cpu.reg(Gpr::Rsi)), (0, DATA + 3));
}

#[test]
fn rep_insw_stores_words_and_faults_restartably() {
    let mut r = Rig::kernel();
    r.ports.values.insert(0x1F0, 0xBEEF);
    r.cpu.set_reg(Gpr::Rdi, DATA + 0xFFC);
    r.cpu.set_reg(Gpr::Rcx, 4);
    r.cpu.set_reg(Gpr::Rdx, 0x1F0);
    r.raises(&[0x66, 0xF3, 0x6D], 14, Some(2));
    assert_eq!(r.mem.peek(DATA + 0xFFC, 4), [0xEF, 0xBE, 0xEF, 0xBE]);
    assert_eq!(r.cpu.reg(Gpr::Rcx), 2, "two elements done before the #PF");
    assert_eq!(r.stack(1), CODE, "the fault is at the instruction");
}

// ---- IRETQ ----

fn push_iret_frame(r: &mut Rig, rip: u64, cs: u16, flags: u64, rsp: u64, ss: u16) {
    let at = DATA + 0x100;
    for (i, v) in [rip, u64::from(cs), flags, rsp, u64::from(ss)]
        .iter()
        .enumerate()
    {
        r.mem.poke(at + 8 * i as u64, &v.to_le_bytes());
    }
    r.cpu.set_reg(Gpr::Rsp, at);
}

#[test]
fn iretq_to_user_mode_switches_privilege_and_loads_the_popped_state() {
    let mut r = Rig::kernel();
    push_iret_frame(
        &mut r,
        UCODE,
        UCODE_SEL,
        rflags::IF | 0x2 | rflags::CF,
        USTACK_TOP,
        UDATA,
    );
    r.code(&[0x48, 0xCF]);
    assert_eq!(r.run().unwrap().outcome, Outcome::Emulated);
    assert_eq!(
        (r.cpu.rip, r.cpu.cpl, r.cpu.reg(Gpr::Rsp)),
        (UCODE, 3, USTACK_TOP)
    );
    assert_eq!(r.cpu.segment(SegReg::Cs).selector, UCODE_SEL);
    assert_eq!(r.cpu.segment(SegReg::Ss).selector, UDATA);
    assert!(r.cpu.interrupts_enabled());
    assert_ne!(r.cpu.rflags & rflags::CF, 0);
    assert!(r.cpu.take_effects().privilege);
}

#[test]
fn iretq_to_a_non_canonical_rip_is_gp_at_the_old_privilege() {
    let mut r = Rig::kernel();
    push_iret_frame(
        &mut r,
        0x0000_8000_0000_0000,
        UCODE_SEL,
        0x202,
        USTACK_TOP,
        UDATA,
    );
    r.raises(&[0x48, 0xCF], 13, Some(0));
    assert_eq!(r.cpu.cpl, 0);
    assert_eq!(r.stack(1), CODE, "RIP of the IRETQ itself");
    assert_eq!(r.stack(2), u64::from(KCODE), "still the kernel's CS");
}

#[test]
fn iretq_within_the_kernel_pops_ss_rsp_too() {
    let mut r = Rig::kernel();
    push_iret_frame(&mut r, CODE + 0x100, KCODE, 0x2, KSTACK_TOP - 0x100, KDATA);
    r.code(&[0x48, 0xCF]);
    r.run().unwrap();
    assert_eq!((r.cpu.rip, r.cpu.cpl), (CODE + 0x100, 0));
    assert_eq!(r.cpu.reg(Gpr::Rsp), KSTACK_TOP - 0x100);
    assert!(!r.cpu.take_effects().privilege);
}

#[test]
fn iretq_from_user_mode_to_the_kernel_is_gp_with_the_selector() {
    let mut r = Rig::user();
    r.mem.map(DATA, 0x1000, RW_USER);
    push_iret_frame(&mut r, CODE, KCODE, 0x2, KSTACK_TOP, KDATA);
    r.raises(&[0x48, 0xCF], 13, Some(u32::from(KCODE)));
}

#[test]
fn iretq_in_user_mode_cannot_change_if_or_iopl() {
    let mut r = Rig::user();
    r.mem.map(DATA, 0x1000, RW_USER);
    push_iret_frame(
        &mut r,
        UCODE + 0x10,
        UCODE_SEL,
        0x2 | rflags::IOPL,
        USTACK_TOP,
        UDATA,
    );
    r.code(&[0x48, 0xCF]);
    r.run().unwrap();
    assert!(r.cpu.interrupts_enabled(), "IF kept: CPL > IOPL");
    assert_eq!(r.cpu.iopl(), 0, "IOPL kept: CPL > 0");
}

#[test]
fn iretq_in_user_mode_with_iopl_3_loads_if_but_not_iopl() {
    let mut r = Rig::user();
    r.mem.map(DATA, 0x1000, RW_USER);
    r.cpu.rflags |= rflags::IOPL;
    push_iret_frame(&mut r, UCODE + 0x10, UCODE_SEL, 0x2, USTACK_TOP, UDATA);
    r.code(&[0x48, 0xCF]);
    r.run().unwrap();
    assert!(!r.cpu.interrupts_enabled(), "IF loaded: CPL <= IOPL");
    assert_eq!(r.cpu.iopl(), 3, "IOPL kept: CPL > 0");
}

#[test]
fn iretq_in_the_kernel_loads_if_and_iopl_but_no_reserved_bit() {
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::IF;
    // IF = 0, IOPL = 2, DF, and reserved bits 3, 5, 15 and 22..63 set in the image.
    let image = 0x2 | (2 << 12) | rflags::DF | 1 << 3 | 1 << 5 | 1 << 15 | !0u64 << 22;
    push_iret_frame(
        &mut r,
        CODE + 0x100,
        KCODE,
        image,
        KSTACK_TOP - 0x100,
        KDATA,
    );
    r.code(&[0x48, 0xCF]);
    r.run().unwrap();
    assert!(!r.cpu.interrupts_enabled(), "IF loaded at CPL 0");
    assert_eq!(r.cpu.iopl(), 2, "IOPL loaded at CPL 0");
    assert_ne!(r.cpu.rflags & rflags::DF, 0);
    assert_eq!(r.cpu.rflags & !rflags::DEFINED, 0, "reserved bits stay 0");
    assert_ne!(r.cpu.rflags & rflags::FIXED, 0, "bit 1 stays 1");
}

#[test]
fn iretq_with_a_mismatched_ss_rpl_is_gp() {
    let mut r = Rig::kernel();
    push_iret_frame(&mut r, UCODE, UCODE_SEL, 0x2, USTACK_TOP, KDATA);
    r.raises(&[0x48, 0xCF], 13, Some(u32::from(KDATA)));
}

#[test]
fn a_16_bit_iret_keeps_the_rflags_bits_above_the_popped_word() {
    let mut r = Rig::kernel();
    // (Not RF: every instruction clears it at its start, and IRETW does not pop it.)
    let high = rflags::AC | rflags::VIF | rflags::VIP | rflags::ID;
    r.cpu.rflags |= high;
    // IRETW pops five 16-bit slots: IP, CS, FLAGS, SP, SS.
    let at = DATA + 0x100;
    for (i, v) in [
        CODE + 0x10,
        u64::from(KCODE),
        0x2 | rflags::CF,
        0x8F00,
        u64::from(KDATA),
    ]
    .iter()
    .enumerate()
    {
        r.mem.poke(at + 2 * i as u64, &(*v as u16).to_le_bytes());
    }
    r.cpu.set_reg(Gpr::Rsp, at);
    r.ok(&[0x66, 0xCF]);
    assert_eq!(r.cpu.rip, CODE + 0x10);
    assert_eq!(r.cpu.reg(Gpr::Rsp), 0x8F00);
    assert_ne!(r.cpu.rflags & rflags::CF, 0, "the popped word is loaded");
    assert_eq!(r.cpu.rflags & high, high, "bits 16 and up are unchanged");
}

#[test]
fn iretq_to_a_32_bit_code_segment_is_an_unsupported_stop() {
    let mut r = Rig::kernel();
    push_iret_frame(&mut r, CODE, 0x40, 0x2, KSTACK_TOP, KDATA);
    r.code(&[0x48, 0xCF]);
    assert!(matches!(r.run(), Err(CpuStop::Unsupported(_))));
}

// ---- SYSCALL / SYSRET / SYSENTER / SYSEXIT / SWAPGS ----

fn fast_syscall_msrs(r: &mut Rig) {
    r.cpu.efer |= efer::SCE;
    r.cpu.msr.star = (0x10u64 << 48) | (u64::from(KCODE) << 32);
    r.cpu.msr.lstar = HANDLERS + 0x800;
    r.cpu.msr.sfmask = rflags::IF | rflags::DF;
    r.cpu.msr.sysenter_cs = u64::from(KCODE);
    r.cpu.msr.sysenter_eip = HANDLERS + 0x900;
    r.cpu.msr.sysenter_esp = RSP0;
}

#[test]
fn syscall_is_forwarded_to_lstar_at_cpl0() {
    let mut r = Rig::user();
    fast_syscall_msrs(&mut r);
    r.cpu.rflags |= rflags::DF;
    r.cpu.rip = UCODE + 2; // the entry stub reports the address after SYSCALL
    syscall::syscall(&mut r.cpu).unwrap();
    assert_eq!((r.cpu.rip, r.cpu.cpl), (HANDLERS + 0x800, 0));
    assert_eq!(r.cpu.reg(Gpr::Rcx), UCODE + 2);
    assert_ne!(r.cpu.reg(Gpr::R11) & rflags::IF, 0);
    assert_eq!(
        r.cpu.rflags & (rflags::IF | rflags::DF),
        0,
        "masked by SFMASK"
    );
    assert_eq!(r.cpu.segment(SegReg::Cs).selector, KCODE);
    assert_eq!(r.cpu.segment(SegReg::Ss).selector, KDATA);
    assert_eq!(r.cpu.reg(Gpr::Rsp), USTACK_TOP, "SYSCALL keeps RSP");
}

#[test]
fn syscall_without_efer_sce_is_ud_at_the_instruction() {
    let mut r = Rig::user();
    r.code(&[0x0F, 0x05]);
    let h = r.run_cause(Cause::Fault(Event::ud())).unwrap();
    assert_eq!(h.outcome, Outcome::Delivered(Event::ud()));
    assert_eq!(r.stack(0), UCODE);
}

#[test]
fn sysretq_returns_to_64_bit_user_code() {
    let mut r = Rig::kernel();
    fast_syscall_msrs(&mut r);
    r.cpu.set_reg(Gpr::Rcx, UCODE + 0x40);
    r.cpu.set_reg(Gpr::R11, 0x202 | rflags::IOPL | 1 << 16);
    r.ok(&[0x48, 0x0F, 0x07]);
    assert_eq!((r.cpu.rip, r.cpu.cpl), (UCODE + 0x40, 3));
    assert_eq!(r.cpu.segment(SegReg::Cs).selector, 0x23);
    assert_eq!(r.cpu.segment(SegReg::Ss).selector, 0x1B);
    assert_eq!(
        r.cpu.rflags,
        (0x202 | rflags::IOPL) & 0x3C_7FD7 | 2,
        "RF cleared"
    );
}

#[test]
fn sysretq_to_a_non_canonical_rcx_faults_in_the_kernel_not_the_host() {
    let mut r = Rig::kernel();
    fast_syscall_msrs(&mut r);
    r.cpu.set_reg(Gpr::Rcx, 0x0000_8000_0000_0000);
    r.cpu.set_reg(Gpr::Rsp, USTACK_TOP);
    r.raises(&[0x48, 0x0F, 0x07], 13, Some(0));
    assert_eq!(r.cpu.cpl, 0);
    assert_eq!(r.stack(1), CODE);
}

#[test]
fn sysretq_in_user_mode_is_gp_and_without_sce_ud() {
    let mut r = Rig::user();
    fast_syscall_msrs(&mut r);
    r.raises(&[0x48, 0x0F, 0x07], 13, Some(0));
    Rig::kernel().raises(&[0x48, 0x0F, 0x07], 6, None);
}

#[test]
fn syscall_saves_rflags_in_r11_and_clears_exactly_the_fmask_bits() {
    let mut r = Rig::user();
    fast_syscall_msrs(&mut r);
    r.cpu.msr.sfmask = rflags::IF | rflags::TF | rflags::AC;
    let user_flags = rflags::FIXED | rflags::IF | rflags::DF | rflags::CF | rflags::AC;
    r.cpu.rflags = user_flags;
    r.cpu.rip = UCODE + 2;
    syscall::syscall(&mut r.cpu).unwrap();
    assert_eq!(
        r.cpu.reg(Gpr::R11),
        user_flags,
        "R11 holds RFLAGS as it was"
    );
    assert_eq!(
        r.cpu.rflags,
        rflags::FIXED | rflags::DF | rflags::CF,
        "only the FMASK bits are cleared"
    );
}

#[test]
fn syscall_takes_its_selectors_from_star_with_the_rpl_cleared() {
    let mut r = Rig::user();
    fast_syscall_msrs(&mut r);
    // STAR[47:32] = 0x1B: RPL 3 in the MSR; SYSCALL loads CS with RPL 0 and SS = CS + 8.
    r.cpu.msr.star = (0x30u64 << 48) | (0x1Bu64 << 32);
    r.cpu.rip = UCODE + 2;
    syscall::syscall(&mut r.cpu).unwrap();
    assert_eq!(r.cpu.segment(SegReg::Cs).selector, 0x18);
    assert_eq!(r.cpu.segment(SegReg::Ss).selector, 0x20);
    assert_eq!(r.cpu.cpl, 0);
}

#[test]
fn syscall_without_sce_at_the_real_entry_is_ud_at_the_instruction() {
    let mut r = Rig::user();
    fast_syscall_msrs(&mut r);
    r.cpu.efer &= !efer::SCE;
    r.cpu.rip = UCODE + 2; // the entry stub reports the address after SYSCALL
    assert_eq!(syscall::syscall(&mut r.cpu), Err(Fault::Raise(Event::ud())));
    assert_eq!(r.cpu.rip, UCODE, "the #UD belongs to the SYSCALL itself");
    assert_eq!(r.cpu.cpl, 3);
}

#[test]
fn sysretq_loads_rflags_from_r11_without_rf_vm_or_reserved_bits() {
    let mut r = Rig::kernel();
    fast_syscall_msrs(&mut r);
    r.cpu.set_reg(Gpr::Rcx, UCODE + 0x40);
    // Every bit but TF (which would add the single-step trap after the SYSRET, tested in
    // syscall_and_sysret_single_step_by_the_tf_they_leave_not_the_tf_they_began_with).
    r.cpu.set_reg(Gpr::R11, !rflags::TF);
    r.ok(&[0x48, 0x0F, 0x07]);
    assert_eq!(r.cpu.rflags, 0x3C_7ED7, "(R11 & 3C7FD7H) | 2");
    let mut r = Rig::kernel();
    fast_syscall_msrs(&mut r);
    r.cpu.set_reg(Gpr::Rcx, UCODE + 0x40);
    r.cpu.set_reg(Gpr::R11, 0);
    r.ok(&[0x48, 0x0F, 0x07]);
    assert_eq!(r.cpu.rflags, rflags::FIXED, "bit 1 is always set");
}

#[test]
fn sysret_faults_in_the_manuals_order_before_anything_changes() {
    let gp = Err(Fault::Raise(Event::gp(0)));
    let ud = Err(Fault::Raise(Event::ud()));
    let non_canonical = 0x0000_8000_0000_0000;
    // (SCE, CPL, RCX) -> the fault: #UD first, then the CPL, then RCX.
    let cases = [
        (false, 3, non_canonical, ud),
        (false, 0, non_canonical, ud),
        (true, 3, non_canonical, gp),
        (true, 3, UCODE, gp),
        (true, 0, non_canonical, gp),
        (true, 0, 0xFFFF_8000_0000_0000 - 1, gp),
    ];
    for (sce, cpl, rcx, want) in cases {
        let mut r = if cpl == 0 { Rig::kernel() } else { Rig::user() };
        fast_syscall_msrs(&mut r);
        if !sce {
            r.cpu.efer &= !efer::SCE;
        }
        r.cpu.set_reg(Gpr::Rcx, rcx);
        r.cpu.set_reg(Gpr::R11, 0x202);
        let before = format!("{:?}", r.cpu);
        assert_eq!(
            syscall::sysret(&mut r.cpu, true),
            want,
            "SCE={sce} CPL={cpl} RCX={rcx:#x}"
        );
        assert_eq!(
            format!("{:?}", r.cpu),
            before,
            "SCE={sce} CPL={cpl} RCX={rcx:#x}: a faulting SYSRET changes nothing"
        );
    }
}

#[test]
fn sysret_to_compatibility_mode_is_an_unsupported_stop() {
    let mut r = Rig::kernel();
    fast_syscall_msrs(&mut r);
    r.cpu.set_reg(Gpr::Rcx, UCODE);
    assert!(matches!(
        syscall::sysret(&mut r.cpu, false),
        Err(Fault::Stop(CpuStop::Unsupported(_)))
    ));
    assert_eq!(r.cpu.cpl, 0);
}

#[test]
fn sysenter_and_sysexit_round_trip() {
    let mut r = Rig::user();
    fast_syscall_msrs(&mut r);
    r.cpu.rflags |= rflags::IF;
    syscall::sysenter(&mut r.cpu).unwrap();
    assert_eq!(
        (r.cpu.rip, r.cpu.cpl, r.cpu.reg(Gpr::Rsp)),
        (HANDLERS + 0x900, 0, RSP0)
    );
    assert!(!r.cpu.interrupts_enabled());
    r.cpu.rip = CODE;
    r.cpu.set_reg(Gpr::Rdx, UCODE + 0x20);
    r.cpu.set_reg(Gpr::Rcx, USTACK_TOP - 0x10);
    r.ok(&[0x48, 0x0F, 0x35]);
    assert_eq!(
        (r.cpu.rip, r.cpu.cpl, r.cpu.reg(Gpr::Rsp)),
        (UCODE + 0x20, 3, USTACK_TOP - 0x10)
    );
    assert_eq!(r.cpu.segment(SegReg::Cs).selector, (KCODE + 32) | 3);
    assert_eq!(r.cpu.segment(SegReg::Ss).selector, (KCODE + 40) | 3);
}

#[test]
fn sysenter_with_a_null_sysenter_cs_is_gp() {
    let mut r = Rig::user();
    r.raises(&[0x0F, 0x34], 13, Some(0));
    assert_eq!(r.stack(1), UCODE);
}

#[test]
fn sysexitq_to_a_non_canonical_rdx_is_gp() {
    let mut r = Rig::kernel();
    fast_syscall_msrs(&mut r);
    r.cpu.set_reg(Gpr::Rdx, 0x0000_8000_0000_0000);
    r.raises(&[0x48, 0x0F, 0x35], 13, Some(0));
}

#[test]
fn swapgs_exchanges_the_gs_bases() {
    let mut r = Rig::kernel();
    r.cpu.msr.kernel_gs_base = 0xFFFF_8000_0000_5000;
    r.cpu.set_segment_base(SegReg::Gs, 0x7000);
    r.cpu.take_effects();
    r.ok(&[0x0F, 0x01, 0xF8]);
    assert_eq!(
        (r.cpu.gs_base(), r.cpu.msr.kernel_gs_base),
        (0xFFFF_8000_0000_5000, 0x7000)
    );
    assert!(r.cpu.take_effects().segment_bases);
    Rig::user().raises(&[0x0F, 0x01, 0xF8], 13, Some(0));
}

// ---- segment loads and far transfers ----

#[test]
fn mov_ss_checks_the_descriptor_and_sets_the_shadow() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, u64::from(KDATA));
    r.ok(&[0x8E, 0xD0]);
    assert_eq!(r.cpu.interrupt_shadow, Some(CODE + 2));
    for (sel, code) in [
        (UDATA, u32::from(UDATA & !3)),
        (KCODE, u32::from(KCODE)),
        (0x1000, 0x1000),
    ] {
        let mut r = Rig::kernel();
        r.cpu.set_reg(Gpr::Rax, u64::from(sel));
        r.raises(&[0x8E, 0xD0], 13, Some(code));
    }
}

#[test]
fn mov_ds_of_a_not_present_segment_is_np() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 0x38);
    r.raises(&[0x8E, 0xD8], 11, Some(0x38));
}

#[test]
fn mov_ds_of_a_kernel_segment_from_user_mode_is_gp() {
    let mut r = Rig::user();
    r.cpu.set_reg(Gpr::Rax, u64::from(KDATA));
    r.raises(&[0x8E, 0xD8], 13, Some(u32::from(KDATA)));
    let mut r = Rig::user();
    r.cpu.set_reg(Gpr::Rax, u64::from(UDATA));
    r.ok(&[0x8E, 0xD8]);
    assert_eq!(r.cpu.segment(SegReg::Ds).selector, UDATA);
}

#[test]
fn a_null_selector_in_fs_or_gs_clears_the_base_as_on_intel() {
    // The test CPUID is not AMD's: the vendor the guest sees is Intel-like, and so is QEMU's
    // TCG (`-cpu max,vendor=GenuineIntel`), which clears the base on a null load.
    let mut r = Rig::kernel();
    r.cpu.set_segment_base(SegReg::Fs, 0x1234_5000);
    r.cpu.take_effects();
    r.cpu.set_reg(Gpr::Rax, 0);
    r.ok(&[0x8E, 0xE0]); // mov fs, ax
    assert_eq!(r.cpu.segment(SegReg::Fs).selector, 0);
    assert_eq!(r.cpu.fs_base(), 0);
    assert!(r.cpu.take_effects().segment_bases, "the real base follows");
    // With an AMD vendor (no NullSelectorClearsBase) the base is kept.
    let mut r = Rig::kernel();
    r.cpu.set_segment_base(SegReg::Gs, 0x1234_5000);
    super::segments::load_data_segment(&mut r.cpu, &mut r.mem, SegReg::Gs, 0, false).unwrap();
    assert_eq!(r.cpu.gs_base(), 0x1234_5000);
}

#[test]
fn pop_gs_loads_and_moves_rsp() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rsp, DATA);
    r.mem.poke(DATA, &u64::from(KDATA).to_le_bytes());
    r.ok(&[0x0F, 0xA9]);
    assert_eq!(r.cpu.segment(SegReg::Gs).selector, KDATA);
    assert_eq!(r.cpu.reg(Gpr::Rsp), DATA + 8);
}

#[test]
fn retfq_reloads_cs_after_lgdt() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rsp, DATA);
    r.mem.poke(DATA, &(CODE + 0x80).to_le_bytes());
    r.mem.poke(DATA + 8, &u64::from(KCODE).to_le_bytes());
    r.code(&[0x48, 0xCB]);
    r.run().unwrap();
    assert_eq!(r.cpu.rip, CODE + 0x80);
    assert_eq!(r.cpu.segment(SegReg::Cs).selector, KCODE);
    assert_eq!(r.cpu.reg(Gpr::Rsp), DATA + 16);
}

#[test]
fn retfq_to_user_mode_pops_ss_rsp() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rsp, DATA);
    for (i, v) in [UCODE, u64::from(UCODE_SEL), USTACK_TOP, u64::from(UDATA)]
        .iter()
        .enumerate()
    {
        r.mem.poke(DATA + 8 * i as u64, &v.to_le_bytes());
    }
    r.code(&[0x48, 0xCB]);
    r.run().unwrap();
    assert_eq!(
        (r.cpu.rip, r.cpu.cpl, r.cpu.reg(Gpr::Rsp)),
        (UCODE, 3, USTACK_TOP)
    );
}

#[test]
fn far_jmp_and_call_through_memory() {
    let mut r = Rig::kernel();
    r.mem.poke(DATA, &(CODE + 0x200).to_le_bytes());
    r.mem.poke(DATA + 8, &KCODE.to_le_bytes());
    r.cpu.set_reg(Gpr::Rax, DATA);
    r.code(&[0x48, 0xFF, 0x18]);
    r.run().unwrap();
    assert_eq!(r.cpu.rip, CODE + 0x200);
    assert_eq!(r.stack(0), CODE + 3, "return RIP");
    assert_eq!(r.stack(1), u64::from(KCODE), "return CS");
    let mut r = Rig::kernel();
    r.mem.poke(DATA, &(CODE + 0x200).to_le_bytes());
    r.mem.poke(DATA + 8, &UCODE_SEL.to_le_bytes());
    r.cpu.set_reg(Gpr::Rax, DATA);
    r.raises(&[0x48, 0xFF, 0x28], 13, Some(u32::from(UCODE_SEL & !3)));
}

// ---- CPUID ----

#[test]
fn cpuid_reports_the_hypervisor() {
    let mut r = Rig::user();
    r.cpu.set_reg(Gpr::Rax, 1);
    r.ok(&[0x0F, 0xA2]);
    assert_ne!(r.cpu.reg(Gpr::Rcx) & (1 << 31), 0);
    r.cpu.rip = UCODE;
    r.cpu.set_reg(Gpr::Rax, 0x4000_0000);
    r.ok(&[0x0F, 0xA2]);
    assert_eq!(r.cpu.reg(Gpr::Rbx).to_le_bytes()[..4], *b"Trap");
}

// ---- INT n, event delivery ----

#[test]
fn int_0x80_from_user_mode_reaches_the_kernel_through_a_dpl3_gate() {
    let mut r = Rig::user();
    r.raises(&[0xCD, 0x80], 0x80, None);
    assert_eq!(r.stack(0), UCODE + 2, "returns after INT");
    assert_eq!(r.stack(1), u64::from(UCODE_SEL));
    assert_eq!(r.stack(3), USTACK_TOP);
    assert_eq!(r.cpu.reg(Gpr::Rsp), RSP0 - 40);
}

#[test]
fn int_n_through_a_dpl0_gate_from_user_mode_is_gp_with_the_idt_selector() {
    let mut r = Rig::user();
    r.raises(&[0xCD, 0x21], 13, Some(0x21 * 8 + 2));
    assert_eq!(r.stack(1), UCODE, "#GP points at the INT");
}

#[test]
fn int3_from_user_mode_is_a_breakpoint() {
    let mut r = Rig::user();
    r.raises(&[0xCC], 3, None);
    assert_eq!(r.stack(0), UCODE + 1);
}

#[test]
fn a_fault_frame_has_rf_set_and_trap_and_interrupt_frames_do_not() {
    // #GP from a user CLI: a fault, RF = 1 in the pushed image (and cleared in RFLAGS).
    let mut r = Rig::user();
    r.raises(&[0xFA], 13, Some(0));
    assert_ne!(r.stack(3) & rflags::RF, 0, "fault: RF pushed as 1");
    assert_eq!(r.cpu.rflags & rflags::RF, 0);
    // INT 0x80 and INT3 (traps) and an external interrupt push RF as it is (0 here).
    let mut r = Rig::user();
    r.raises(&[0xCD, 0x80], 0x80, None);
    assert_eq!(r.stack(2) & rflags::RF, 0, "INT n: RF as it is");
    let mut r = Rig::user();
    r.raises(&[0xCC], 3, None);
    assert_eq!(r.stack(2) & rflags::RF, 0, "INT3: RF as it is");
    let mut r = Rig::kernel();
    deliver(&mut r.cpu, &mut r.mem, Event::external(0x20)).unwrap();
    assert_eq!(r.stack(2) & rflags::RF, 0, "interrupt: RF as it is");
}

#[test]
fn rf_is_cleared_by_the_next_emulated_instruction() {
    // RF = 1 (restored by an IRET from a fault frame) lasts one instruction: INT n after it
    // pushes RF = 0, and a retired instruction leaves it clear.
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::RF;
    r.raises(&[0xCD, 0x80], 0x80, None);
    assert_eq!(r.stack(2) & rflags::RF, 0);
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::RF;
    r.ok(&[0xFA]);
    assert_eq!(r.cpu.rflags & rflags::RF, 0);
}

#[test]
fn a_trap_gate_keeps_if() {
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::IF;
    deliver(&mut r.cpu, &mut r.mem, Event::software(0x81, 2)).unwrap();
    assert!(r.cpu.interrupts_enabled());
}

#[test]
fn an_ist_gate_switches_stacks_even_without_a_privilege_change() {
    let mut r = Rig::kernel();
    deliver(&mut r.cpu, &mut r.mem, Event::exception(2)).unwrap();
    assert_eq!(r.cpu.reg(Gpr::Rsp), IST1 - 40);
    assert_eq!(r.stack(3), KSTACK_TOP, "old RSP pushed");
    assert_eq!(
        r.stack(4),
        u64::from(KDATA),
        "old SS pushed; SS itself unchanged"
    );
    assert_eq!(r.cpu.segment(SegReg::Ss).selector, KDATA);
}

#[test]
fn the_kernel_stack_is_aligned_to_16_before_the_frame() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rsp, KSTACK_TOP - 8);
    deliver(&mut r.cpu, &mut r.mem, Event::external(0x20)).unwrap();
    assert_eq!(r.cpu.reg(Gpr::Rsp), KSTACK_TOP - 16 - 40);
}

#[test]
fn a_page_fault_sets_cr2_and_pushes_its_error_code() {
    let mut r = Rig::user();
    r.cpu.rip = 0x5555_0000;
    let h = r.run().unwrap();
    let expected = 0x4 | 0x10; // user, instruction fetch, not present
    assert_eq!(
        h.outcome,
        Outcome::Delivered(Event {
            vector: 14,
            kind: EventKind::Exception,
            error_code: Some(expected),
            cr2: Some(0x5555_0000),
            instruction_len: 0
        })
    );
    assert_eq!(r.cpu.cr2, 0x5555_0000);
    assert_eq!(r.stack(0), u64::from(expected));
}

/// Points the gates of `vectors` at selector 0xD000, whose descriptor (GDT + 0xD000 = 0xF000)
/// is on an unmapped page.
fn code_descriptor_on_an_unmapped_page(r: &mut Rig, vectors: &[u8]) {
    r.cpu.gdtr.limit = 0xFFFF;
    for &v in vectors {
        let v = u64::from(v);
        let [lo, hi] = encode_gate(HANDLERS + 0x10 * v, 0xD000, 0, 0xE, 0, true);
        r.mem.poke(IDT + 16 * v, &lo.to_le_bytes());
        r.mem.poke(IDT + 16 * v + 8, &hi.to_le_bytes());
    }
}

#[test]
fn a_page_fault_reading_the_handler_descriptor_stays_a_page_fault() {
    // #GP(0) from a user CLI; its gate's code descriptor is on an unmapped page: a #PF with
    // CR2 = the descriptor's address (contributory then #PF: delivered serially), not #GP(sel).
    let mut r = Rig::user();
    code_descriptor_on_an_unmapped_page(&mut r, &[13]);
    r.raises(&[0xFA], 14, Some(0));
    assert_eq!(r.cpu.cr2, 0xF000);
    assert_eq!(r.stack(1), UCODE, "the #PF points at the CLI");
}

#[test]
fn a_page_fault_reading_the_descriptor_while_delivering_a_page_fault_is_a_double_fault() {
    let mut r = Rig::user();
    code_descriptor_on_an_unmapped_page(&mut r, &[14]);
    let first = Event {
        vector: 14,
        kind: EventKind::Exception,
        error_code: Some(0x4),
        cr2: Some(0x5555_0000),
        instruction_len: 0,
    };
    let delivered = deliver(&mut r.cpu, &mut r.mem, first).unwrap();
    assert_eq!(delivered, Event::df());
    assert_eq!(r.cpu.rip, HANDLERS + 0x10 * 8);
    assert_eq!(r.cpu.cr2, 0xF000, "CR2 holds the second #PF's address");
}

#[test]
fn a_not_present_gate_is_np_with_the_idt_bit_and_ext() {
    let mut r = Rig::kernel();
    r.mem.poke(IDT + 16 * 0x20 + 5, &[0x0E]); // clear P
    deliver(&mut r.cpu, &mut r.mem, Event::external(0x20)).unwrap();
    assert_eq!(r.cpu.rip, HANDLERS + 0x10 * 11);
    assert_eq!(r.stack(0), 0x20 * 8 + 2 + 1);
}

#[test]
fn an_idt_limit_of_zero_ends_in_a_triple_fault() {
    let mut r = Rig::kernel();
    r.cpu.idtr.limit = 0;
    let stop = deliver(&mut r.cpu, &mut r.mem, Event::ud()).unwrap_err();
    assert_eq!(stop, CpuStop::TripleFault { vector: 13 });
}

#[test]
fn a_faulting_kernel_stack_escalates_pf_to_df_then_triple_fault() {
    let mut r = Rig::user();
    r.mem.poke(TSS + 4, &0x6666_0000u64.to_le_bytes()); // RSP0 on an unmapped page
    r.code(&[0xFA]);
    assert_eq!(r.run(), Err(CpuStop::TripleFault { vector: 14 }));
}

#[test]
fn a_double_fault_is_delivered_when_its_own_stack_works() {
    let mut r = Rig::kernel();
    // #GP's gate points at a 32-bit code segment: #GP(sel) while delivering #GP → #DF.
    let [lo, hi] = encode_gate(HANDLERS, 0x40, 0, 0xE, 0, true);
    r.mem.poke(IDT + 16 * 13, &lo.to_le_bytes());
    r.mem.poke(IDT + 16 * 13 + 8, &hi.to_le_bytes());
    deliver(&mut r.cpu, &mut r.mem, Event::gp(0)).unwrap();
    assert_eq!(r.cpu.rip, HANDLERS + 0x10 * 8);
    assert_eq!(r.stack(0), 0, "#DF pushes error code 0");
}

#[test]
fn a_read_only_kernel_stack_page_is_a_write_page_fault() {
    let mut r = Rig::kernel();
    r.mem.map(0x8000, 0x1000, RO_KERNEL);
    // #PF on the stack while delivering an IRQ is serial: the #PF handler also faults → #DF…
    assert!(matches!(
        deliver(&mut r.cpu, &mut r.mem, Event::external(0x20)),
        Err(CpuStop::TripleFault { .. })
    ));
    assert_eq!(r.cpu.cr2 & !0xFFF, 0x8000);
}

// ---- decode, fetch, fall-backs ----

#[test]
fn an_instruction_that_ends_before_an_unmapped_page_does_not_touch_it() {
    let mut r = Rig::kernel();
    r.cpu.rip = CODE + 0xFFF;
    r.ok(&[0xFA]);
}

#[test]
fn an_instruction_that_crosses_into_an_unmapped_page_faults_on_it() {
    let mut r = Rig::user();
    r.cpu.rip = UCODE + 0xFFF;
    r.code(&[0x0F]);
    let h = r.run().unwrap();
    assert!(matches!(
        h.outcome,
        Outcome::Delivered(Event {
            vector: 14,
            cr2: Some(0x11000),
            ..
        })
    ));
}

#[test]
fn garbage_bytes_are_ud() {
    let mut r = Rig::kernel();
    r.raises(&[0x06], 6, None); // PUSH ES does not exist in 64-bit mode
}

#[test]
fn an_ordinary_instruction_that_faulted_gets_its_own_fault_back() {
    let mut r = Rig::user();
    r.code(&[0x48, 0x8B, 0x03]); // mov rax, [rbx] with a non-canonical RBX
    r.cpu.set_reg(Gpr::Rbx, 0x8000_0000_0000_0000);
    let h = r.run_cause(Cause::Fault(Event::gp(0))).unwrap();
    assert_eq!(h.outcome, Outcome::Reflected(Event::gp(0)));
    assert_eq!(h.mnemonic, Some(iced_x86::Mnemonic::Mov));
    assert_eq!(r.stack(1), UCODE, "at the instruction");
}

#[test]
fn a_privileged_instruction_the_vmm_does_not_emulate_stops_the_guest_kernel() {
    let mut r = Rig::kernel();
    r.code(&[0x0F, 0x01, 0xD1]);
    assert_eq!(
        r.run(),
        Err(CpuStop::NotEmulated {
            mnemonic: iced_x86::Mnemonic::Xsetbv
        })
    );
    // From guest user mode the #GP is what the hardware would give.
    let mut r = Rig::user();
    r.raises(&[0x0F, 0x01, 0xD1], 13, Some(0));
}

// ---- page-table writes (cached shadow policy) ----

#[test]
fn page_table_stores_are_emulated() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rdi, DATA);
    r.cpu.set_reg(Gpr::Rax, 0x1234_5007);
    r.code(&[0x48, 0x89, 0x07]);
    assert_eq!(
        r.run_cause(Cause::PageTableWrite).unwrap().outcome,
        Outcome::Emulated
    );
    assert_eq!(r.mem.peek_u64(DATA), 0x1234_5007);
    // or qword [rdi], 0x20 (set A)
    r.cpu.rip = CODE;
    r.code(&[0x48, 0x83, 0x0F, 0x20]);
    r.run_cause(Cause::PageTableWrite).unwrap();
    assert_eq!(r.mem.peek_u64(DATA), 0x1234_5027);
    // btr qword [rdi], 1 (clear R/W); CF = old bit
    r.cpu.rip = CODE;
    r.code(&[0x48, 0x0F, 0xBA, 0x37, 0x01]);
    r.run_cause(Cause::PageTableWrite).unwrap();
    assert_eq!(r.mem.peek_u64(DATA), 0x1234_5025);
    assert_ne!(r.cpu.rflags & rflags::CF, 0);
}

#[test]
fn rep_stosq_zeroes_a_table() {
    let mut r = Rig::kernel();
    r.mem.poke(DATA, &[0xAA; 64]);
    r.cpu.set_reg(Gpr::Rdi, DATA);
    r.cpu.set_reg(Gpr::Rcx, 8);
    r.cpu.set_reg(Gpr::Rax, 0);
    r.code(&[0xF3, 0x48, 0xAB]);
    r.run_cause(Cause::PageTableWrite).unwrap();
    assert_eq!(r.mem.peek(DATA, 64), [0u8; 64]);
    assert_eq!(r.cpu.reg(Gpr::Rdi), DATA + 64);
}

#[test]
fn lock_cmpxchg_on_a_pte_sets_zf_on_success_and_loads_rax_on_failure() {
    let mut r = Rig::kernel();
    r.mem.poke(DATA, &5u64.to_le_bytes());
    r.cpu.set_reg(Gpr::Rdi, DATA);
    r.cpu.set_reg(Gpr::Rax, 5);
    r.cpu.set_reg(Gpr::Rcx, 9);
    r.code(&[0xF0, 0x48, 0x0F, 0xB1, 0x0F]);
    r.run_cause(Cause::PageTableWrite).unwrap();
    assert_eq!(r.mem.peek_u64(DATA), 9);
    assert_ne!(r.cpu.rflags & rflags::ZF, 0);
    r.cpu.rip = CODE;
    r.run_cause(Cause::PageTableWrite).unwrap();
    assert_eq!(r.cpu.reg(Gpr::Rax), 9);
    assert_eq!(r.cpu.rflags & rflags::ZF, 0);
}

#[test]
fn a_page_table_write_by_an_unsupported_instruction_stops_with_its_name() {
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rdi, DATA);
    r.code(&[0x48, 0xF7, 0x1F]); // neg qword [rdi]
    assert_eq!(
        r.run_cause(Cause::PageTableWrite),
        Err(CpuStop::NotEmulated {
            mnemonic: iced_x86::Mnemonic::Neg
        })
    );
}

#[test]
fn an_emulated_access_to_the_vmm_range_stops_the_guest() {
    let mut r = Rig::kernel();
    r.mem.stop_pages.push(DATA >> 12);
    r.cpu.set_reg(Gpr::Rax, DATA);
    r.code(&[0x0F, 0x01, 0x10]);
    assert!(matches!(r.run(), Err(CpuStop::Memory(_))));
}

// ---- state plumbing ----

#[test]
fn real_rflags_keep_arithmetic_flags_but_force_if_and_iopl_0() {
    let mut cpu = Rig::kernel().cpu;
    cpu.rflags = 0x2 | rflags::IOPL; // virtual IF = 0, IOPL = 3
    cpu.merge_hardware_rflags(0x202 | rflags::ZF | rflags::CF);
    assert_eq!(cpu.rflags, 0x2 | rflags::IOPL | rflags::ZF | rflags::CF);
    assert_eq!(cpu.real_rflags(), 0x202 | rflags::ZF | rflags::CF);
}

proptest! {
    /// Whatever the guest did to its virtual RFLAGS, it really runs with IF = 1 (the host keeps
    /// its timer) and IOPL = 0 (CLI, STI, IN, OUT and HLT trap), none of the virtual-only bits
    /// (RF, VM, VIF, VIP), and its own arithmetic flags, TF, DF, NT, AC and ID.
    #[test]
    fn real_rflags_never_give_the_guest_the_machine(virtual_flags in any::<u64>()) {
        let mut cpu = Rig::kernel().cpu;
        cpu.rflags = (virtual_flags & rflags::DEFINED) | rflags::FIXED;
        let real = cpu.real_rflags();
        prop_assert_eq!(real & rflags::IF, rflags::IF);
        prop_assert_eq!(real & rflags::IOPL, 0);
        prop_assert_eq!(
            real & (rflags::RF | rflags::VM | rflags::VIF | rflags::VIP),
            0
        );
        prop_assert_eq!(real & rflags::HARDWARE_OWNED, cpu.rflags & rflags::HARDWARE_OWNED);
        prop_assert_eq!(real & !rflags::DEFINED, 0);
        prop_assert_eq!(real & rflags::FIXED, rflags::FIXED);
    }
}

// ---- properties ----

fn arbitrary_state() -> impl Strategy<Value = (Vec<u8>, u8, u64, [u64; 4], bool)> {
    (
        proptest::collection::vec(any::<u8>(), 1..16),
        prop_oneof![Just(0u8), Just(3u8)],
        any::<u64>(),
        any::<[u64; 4]>(),
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Any bytes, any privilege, registers and flags, also at the top of the canonical lower
    /// half: the emulator ends in "emulated", "fault delivered" or a typed stop, never panics,
    /// and never leaves a non-canonical RIP.
    #[test]
    fn arbitrary_instructions_never_panic((bytes, cpl, flags, regs, pt_write) in arbitrary_state()) {
        let mut r = if cpl == 0 { Rig::kernel() } else { Rig::user() };
        r.cpu.rflags = (flags & rflags::DEFINED) | 2;
        for (i, v) in regs.iter().enumerate() {
            r.cpu.gpr[i] = *v;
            r.cpu.gpr[i + 4] = v.rotate_left(17);
        }
        r.cpu.set_reg(Gpr::Rcx, regs[1] % 64);
        if regs[3] & 1 != 0 {
            // The bytes end at the last canonical byte.
            r.mem.map(LAST_CANONICAL & !0xFFF, 0x1000, RW_USER);
            r.cpu.rip = LAST_CANONICAL + 1 - bytes.len() as u64;
        }
        r.code(&bytes);
        let cause = if pt_write { Cause::PageTableWrite } else { Cause::Fault(Event::gp(0)) };
        if r.run_cause(cause).is_ok() {
            prop_assert!(shadow_mmu::addr::is_canonical(r.cpu.rip), "rip {:#x}", r.cpu.rip);
        }
        let mut pic = Pic { pending: Some(0x20) };
        let _ = inject(&mut r.cpu, &mut r.mem, &mut pic);
    }

    /// Random IDT, GDT and TSS contents: delivery ends delivered or in a typed stop.
    #[test]
    fn delivery_with_random_tables_never_panics(
        idt in proptest::collection::vec(any::<u8>(), 64),
        gdt in proptest::collection::vec(any::<u8>(), 64),
        tss in proptest::collection::vec(any::<u8>(), 112),
        vector in 0u8..4,
        user in any::<bool>(),
        kind in 0u8..3,
    ) {
        let mut r = if user { Rig::user() } else { Rig::kernel() };
        for v in 0..4u64 {
            r.mem.poke(IDT + 16 * v, &idt[16 * v as usize..16 * v as usize + 16]);
        }
        r.mem.poke(IDT + 16 * 8, &idt[..16]);
        r.mem.poke(IDT + 16 * 13, &idt[16..32]);
        r.mem.poke(IDT + 16 * 14, &idt[32..48]);
        r.mem.poke(GDT + 8, &gdt);
        r.mem.poke(TSS, &tss);
        r.cpu.idtr.limit = 16 * 15 - 1;
        let event = match kind {
            0 => Event::external(vector),
            1 => Event::software(vector, 2),
            _ => Event::gp(0),
        };
        if deliver(&mut r.cpu, &mut r.mem, event).is_ok() {
            prop_assert!(r.cpu.cpl <= 3);
        }
    }

    /// IRETQ from random frames: either a clean return, a delivered fault or a typed stop; a
    /// non-canonical RIP is never loaded. The interesting cases are drawn on purpose (a random
    /// u64 is canonical once in 65 536 draws, a random selector rarely names the right
    /// descriptors): canonical RIPs of both halves and the edges of the hole, and the kernel's
    /// and the user's selectors; a frame with those returns to that RIP at the selector's RPL.
    #[test]
    fn iretq_from_random_frames_never_loads_a_non_canonical_rip(
        rip in iret_rip(),
        (cs, ss) in prop_oneof![
            (Just(KCODE), Just(KDATA)),
            (Just(UCODE_SEL), Just(UDATA)),
            (0u16..0x48, 0u16..0x48),
        ],
        flags in any::<u64>(),
        rsp in any::<u64>(),
    ) {
        let mut r = Rig::kernel();
        push_iret_frame(&mut r, rip, cs, flags, rsp, ss);
        r.code(&[0x48, 0xCF]);
        let result = r.run();
        if let Ok(h) = &result {
            prop_assert!(shadow_mmu::addr::is_canonical(r.cpu.rip));
            if h.outcome == Outcome::Emulated {
                prop_assert_eq!(r.cpu.rip, rip);
            }
        }
        let valid = [(KCODE, KDATA), (UCODE_SEL, UDATA)].contains(&(cs, ss));
        if valid && shadow_mmu::addr::is_canonical(rip) {
            prop_assert_eq!(result.map(|h| h.outcome), Ok(Outcome::Emulated));
            prop_assert_eq!((r.cpu.rip, r.cpu.cpl), (rip, (cs & 3) as u8));
        } else if valid {
            prop_assert_eq!(r.cpu.cpl, 0, "a non-canonical RIP faults at the old privilege");
        }
    }
}

/// RIPs for the IRETQ property: any u64, canonical addresses of either half, and the edges of
/// the non-canonical hole.
fn iret_rip() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        0..=LAST_CANONICAL,
        !LAST_CANONICAL..=u64::MAX,
        prop::sample::select(std::vec![
            LAST_CANONICAL,
            LAST_CANONICAL + 1,
            !LAST_CANONICAL - 1,
            !LAST_CANONICAL,
        ]),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    /// The fixed encodings (no decoder) and the decoded path give the same result:
    /// same outcome, same vCPU, same port traffic, same memory.
    #[test]
    fn the_fixed_encodings_agree_with_the_decoder(
        which in 0usize..19,
        imm in any::<u8>(),
        regs in any::<[u64; 4]>(),
        flags in any::<u64>(),
        user in any::<bool>(),
    ) {
        let encodings: [&[u8]; 19] = [
            &[0xFA], &[0xFB], &[0xF4], &[0xEC], &[0xED], &[0xEE], &[0xEF],
            &[0xE4, imm], &[0xE5, imm], &[0xE6, imm], &[0xE7, imm],
            &[0x0F, 0x01, 0xF8], &[0x48, 0xCF], &[0x48, 0x0F, 0x07], &[0x48, 0x0F, 0x35],
            &[0x0F, 0x32], &[0x0F, 0x30], &[0xCD, imm], &[0xCC],
        ];
        let mut r = if user { Rig::user() } else { Rig::kernel() };
        r.cpu.rflags = (flags & rflags::DEFINED & !rflags::NT) | 2;
        for (i, v) in regs.iter().enumerate() {
            r.cpu.gpr[i] = *v;
        }
        r.cpu.set_reg(Gpr::Rsp, DATA + 0x100);
        r.cpu.efer |= efer::SCE;
        r.cpu.msr.sysenter_cs = u64::from(KCODE);
        push_iret_frame(&mut r, regs[0] & 0x7FFF_FFFF, UCODE_SEL, regs[1], USTACK_TOP, UDATA);
        r.code(encodings[which]);
        let mut slow = Rig { cpu: r.cpu.clone(), mem: r.mem.clone(), ports: Ports::default() };
        let fast_result = r.run_cause(Cause::Fault(Event::gp(0)));
        // PageTableWrite never takes the fixed encodings, and these instructions are handled before
        // the cause matters.
        let slow_result = slow.run_cause(Cause::PageTableWrite);
        prop_assert_eq!(
            fast_result.map(|h| (h.mnemonic, h.name, h.outcome)),
            slow_result.map(|h| (h.mnemonic, h.name, h.outcome))
        );
        prop_assert_eq!(format!("{:?}", r.cpu), format!("{:?}", slow.cpu));
        prop_assert_eq!(&r.ports.writes, &slow.ports.writes);
        prop_assert_eq!(format!("{:?}", r.mem.pages), format!("{:?}", slow.mem.pages));
    }
}

#[test]
fn rep_stosq_writes_page_by_page_and_stops_restartably_at_a_fault() {
    let mut r = Rig::kernel();
    r.mem.poke(DATA, &[0xAA; 4096]);
    r.cpu.set_reg(Gpr::Rdi, DATA);
    r.cpu.set_reg(Gpr::Rcx, 520);
    r.cpu.set_reg(Gpr::Rax, 0x1111_2222_3333_4444);
    r.code(&[0xF3, 0x48, 0xAB]);
    let h = r.run_cause(Cause::PageTableWrite).unwrap();
    assert!(matches!(
        h.outcome,
        Outcome::Delivered(Event { vector: 14, .. })
    ));
    assert_eq!(
        r.mem.peek_u64(DATA + 0xFF8),
        0x1111_2222_3333_4444,
        "the mapped page is done"
    );
    // The guest's #PF frame is on the kernel stack; the registers it will restart with:
    assert_eq!(r.cpu.cr2, DATA + 0x1000);
    assert_eq!(r.cpu.reg(Gpr::Rcx), 8, "512 elements written, 8 left");
    assert_eq!(r.cpu.reg(Gpr::Rdi), DATA + 0x1000);
}

#[test]
fn rep_movsb_backwards_copies_one_element_at_a_time() {
    let mut r = Rig::kernel();
    r.mem.poke(DATA + 0x100, b"abcd");
    r.cpu.rflags |= rflags::DF;
    r.cpu.set_reg(Gpr::Rsi, DATA + 0x103);
    r.cpu.set_reg(Gpr::Rdi, DATA + 0x203);
    r.cpu.set_reg(Gpr::Rcx, 4);
    r.code(&[0xF3, 0xA4]);
    r.run_cause(Cause::PageTableWrite).unwrap();
    assert_eq!(r.mem.peek(DATA + 0x200, 4), b"abcd");
    assert_eq!(
        (r.cpu.reg(Gpr::Rsi), r.cpu.reg(Gpr::Rdi)),
        (DATA + 0xFF, DATA + 0x1FF)
    );
}

#[test]
fn string_io_from_user_mode_is_gp_before_its_address_size_matters() {
    // outsb with a 32-bit address size (not emulated) from a user program: the I/O permission
    // check comes first, so the program gets its #GP instead of the guest being stopped.
    Rig::user().raises(&[0x67, 0x6E], 13, Some(0));
    let mut r = Rig::kernel();
    r.code(&[0x67, 0x6E]);
    assert!(matches!(r.run(), Err(CpuStop::Unsupported(_))));
}

// ---- single-step, debug registers, LSS (issue: resource control without holes) ----

#[test]
fn an_emulated_instruction_begun_with_tf_is_followed_by_a_single_step_db_at_the_next_rip() {
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::TF;
    // OUT 0x80, AL (2 bytes).
    r.code(&[0xE6, 0x80]);
    let h = r.run().expect("stopped");
    match h.outcome {
        Outcome::Delivered(e) => assert_eq!((e.vector, e.error_code), (1, None)),
        other => panic!("expected the single-step #DB, got {other:?}"),
    }
    assert_eq!(r.cpu.rip, HANDLERS + 0x10, "at the #DB handler");
    assert_eq!(r.stack(0), CODE + 2, "the #DB frame points past the OUT");
    assert_ne!(r.stack(2) & rflags::TF, 0, "the pushed RFLAGS keeps TF");
    assert_eq!(r.cpu.rflags & rflags::TF, 0, "the handler runs without TF");
    assert_ne!(r.cpu.dr6 & state::dr::DR6_BS, 0, "DR6.BS says single step");
    assert_eq!(r.ports.writes.len(), 1, "the OUT itself retired");
}

#[test]
fn no_single_step_db_without_tf_or_after_an_instruction_that_opens_an_interrupt_shadow() {
    let mut r = Rig::kernel();
    r.ok(&[0xE6, 0x80]);
    assert_eq!(r.cpu.rip, CODE + 2);
    // STI setting IF opens the shadow: the #DB comes after the next instruction, which the CPU
    // runs natively with TF.
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::TF;
    r.ok(&[0xFB, 0x90]);
    assert_eq!(r.cpu.rip, CODE + 1);
    // MOV SS, AX likewise.
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::TF;
    r.cpu.set_reg(Gpr::Rax, u64::from(KDATA));
    r.ok(&[0x8E, 0xD0]);
    assert_eq!(r.cpu.interrupt_shadow, Some(CODE + 2));
}

#[test]
fn syscall_and_sysret_single_step_by_the_tf_they_leave_not_the_tf_they_began_with() {
    // SYSCALL from a user program with TF set, through the emulator: with IA32_FMASK clearing
    // TF no #DB follows (XSA-204), without it the #DB is on the kernel's first instruction.
    for (fmask_clears_tf, traps) in [(true, false), (false, true)] {
        let mut r = Rig::user();
        fast_syscall_msrs(&mut r);
        if fmask_clears_tf {
            r.cpu.msr.sfmask |= rflags::TF;
        }
        r.cpu.rflags |= rflags::TF;
        r.code(&[0x0F, 0x05]);
        let h = r.run().expect("stopped");
        match (traps, h.outcome) {
            (true, Outcome::Delivered(e)) => {
                assert_eq!(e.vector, 1);
                assert_eq!(r.stack(0), HANDLERS + 0x800, "#DB at the SYSCALL entry");
            }
            (false, Outcome::Emulated) => assert_eq!(r.cpu.rip, HANDLERS + 0x800),
            (_, other) => panic!("fmask clears TF: {fmask_clears_tf}: got {other:?}"),
        }
    }
    // SYSRETQ restoring TF from R11 traps at once, in user mode at the return address, before
    // the first user instruction...
    let mut r = Rig::kernel();
    fast_syscall_msrs(&mut r);
    r.cpu.set_reg(Gpr::Rcx, UCODE + 0x40);
    r.cpu.set_reg(Gpr::R11, 0x202 | rflags::TF);
    r.code(&[0x48, 0x0F, 0x07]);
    match r.run().expect("stopped").outcome {
        Outcome::Delivered(e) => assert_eq!((e.vector, e.error_code), (1, None)),
        other => panic!("expected the single-step #DB after SYSRET, got {other:?}"),
    }
    assert_eq!((r.stack(0), r.stack(1)), (UCODE + 0x40, 0x23), "at CPL 3");
    assert_ne!(r.cpu.dr6 & state::dr::DR6_BS, 0);
    // ...and a kernel single-stepping through a SYSRETQ that clears TF gets no trap after it.
    let mut r = Rig::kernel();
    fast_syscall_msrs(&mut r);
    r.cpu.rflags |= rflags::TF;
    r.cpu.set_reg(Gpr::Rcx, UCODE + 0x40);
    r.cpu.set_reg(Gpr::R11, 0x202);
    r.ok(&[0x48, 0x0F, 0x07]);
    assert_eq!((r.cpu.rip, r.cpu.cpl), (UCODE + 0x40, 3));
}

#[test]
fn mov_to_and_from_debug_registers_at_cpl0_and_the_rules_around_them() {
    let mut r = Rig::kernel();
    // mov rax, dr6 reads the reset value.
    r.ok(&[0x0F, 0x21, 0xF0]);
    assert_eq!(r.cpu.reg(Gpr::Rax), 0xFFFF_0FF0);
    // mov dr0, rax keeps the address.
    r.cpu.rip = CODE;
    r.cpu.set_reg(Gpr::Rax, 0x1234_5678);
    r.ok(&[0x0F, 0x23, 0xC0]);
    assert_eq!(r.cpu.dr_address[0], 0x1234_5678);
    // mov dr6, rax with bits 63:32 set is #GP(0).
    r.cpu.rip = CODE;
    r.cpu.set_reg(Gpr::Rax, 1 << 32);
    r.raises(&[0x0F, 0x23, 0xF0], 13, Some(0));
    // DR4 is DR6 while CR4.DE is clear, #UD once it is set.
    let mut r = Rig::kernel();
    r.ok(&[0x0F, 0x21, 0xE0]);
    assert_eq!(r.cpu.reg(Gpr::Rax), 0xFFFF_0FF0);
    let mut r = Rig::kernel();
    r.cpu.cr4 |= cr4::DE;
    r.raises(&[0x0F, 0x21, 0xE0], 6, None);
    // At CPL 3: #GP(0).
    let mut r = Rig::user();
    r.raises(&[0x0F, 0x21, 0xF0], 13, Some(0));
    // Enabling a breakpoint this CPU does not arm is a stop, not a silent miss.
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rax, 0x401);
    r.code(&[0x0F, 0x23, 0xF8]);
    assert!(matches!(r.run(), Err(CpuStop::Unsupported(_))));
}

#[test]
fn lss_loads_ss_and_the_register_and_opens_no_interrupt_shadow() {
    let mut r = Rig::kernel();
    // lss rax, [DATA]: offset 0x5555 (8 bytes), selector KDATA.
    r.mem.poke(DATA, &0x5555u64.to_le_bytes());
    r.mem.poke(DATA + 8, &KDATA.to_le_bytes());
    r.cpu.set_reg(Gpr::Rbx, DATA);
    r.ok(&[0x48, 0x0F, 0xB2, 0x03]);
    assert_eq!(r.cpu.reg(Gpr::Rax), 0x5555);
    assert_eq!(r.cpu.segment(SegReg::Ss).selector, KDATA);
    assert_eq!(r.cpu.interrupt_shadow, None);
    // LSS with a user data selector at CPL 0: #GP(selector), the register unchanged.
    let mut r = Rig::kernel();
    r.mem.poke(DATA, &0x5555u64.to_le_bytes());
    r.mem.poke(DATA + 8, &UDATA.to_le_bytes());
    r.cpu.set_reg(Gpr::Rbx, DATA);
    r.raises(&[0x48, 0x0F, 0xB2, 0x03], 13, Some(u32::from(UDATA & !3)));
    assert_eq!(r.cpu.reg(Gpr::Rax), 0);
}

#[test]
fn pushf_in_an_interrupt_shadow_is_pushed_with_the_virtual_flags_and_no_tf() {
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::IF;
    r.cpu.interrupt_shadow = Some(CODE);
    r.code(&[0x9C]);
    assert!(emulate::pushf_in_interrupt_shadow(&mut r.cpu, &mut r.mem));
    assert_eq!(r.cpu.rip, CODE + 1);
    assert_eq!(r.cpu.interrupt_shadow, None);
    assert_eq!(r.cpu.reg(Gpr::Rsp), KSTACK_TOP - 8);
    assert_eq!(r.stack(0), rflags::IF | rflags::FIXED);
    // Anything else in the shadow is left to the CPU.
    let mut r = Rig::kernel();
    r.code(&[0x90]);
    assert!(!emulate::pushf_in_interrupt_shadow(&mut r.cpu, &mut r.mem));
    assert_eq!(r.cpu.rip, CODE);
}

#[test]
fn pushf_in_a_mov_ss_shadow_pushes_if_0_and_never_rf() {
    // After MOV SS the shadow covers the next instruction whatever IF is; an IRET may have
    // left RF = 1 in the virtual RFLAGS.
    let mut r = Rig::kernel();
    r.cpu.rflags = rflags::FIXED | rflags::RF | rflags::CF | rflags::IOPL;
    r.cpu.interrupt_shadow = Some(CODE);
    r.code(&[0x9C]);
    assert!(emulate::pushf_in_interrupt_shadow(&mut r.cpu, &mut r.mem));
    assert_eq!(
        r.stack(0),
        rflags::FIXED | rflags::CF | rflags::IOPL,
        "IF = 0 as it is; RF never pushed as 1"
    );
}

#[test]
fn syscall_without_sce_is_ud_at_the_instruction_even_with_a_prefix() {
    let mut r = Rig::user();
    r.cpu.efer &= !efer::SCE;
    // A REX prefix before SYSCALL: the #UD frame points at the prefix.
    r.code(&[0x48, 0x0F, 0x05]);
    let h = r.run_cause(Cause::Fault(Event::ud())).expect("stopped");
    assert!(
        matches!(h.outcome, Outcome::Delivered(e) if e.vector == 6),
        "{h:?}"
    );
    assert_eq!(r.stack(0), UCODE);
}

#[test]
fn rep_outsb_with_a_huge_rcx_stops_after_a_bounded_run_and_resumes() {
    use super::emulate::MAX_REP_ELEMENTS_PER_TRAP as MAX;
    let mut r = Rig::kernel();
    r.mem.map(DATA, 0x4000, RW_KERNEL);
    r.cpu.set_reg(Gpr::Rsi, DATA);
    r.cpu.set_reg(Gpr::Rcx, u64::MAX);
    r.cpu.set_reg(Gpr::Rdx, 0xE9);
    r.ok(&[0xF3, 0x6E]);
    assert_eq!(r.ports.writes.len() as u64, MAX);
    assert_eq!(r.cpu.rip, CODE, "RIP stays on the REP OUTSB");
    assert_eq!(r.cpu.reg(Gpr::Rcx), u64::MAX - MAX);
    assert_eq!(r.cpu.reg(Gpr::Rsi), DATA + MAX);
    assert_ne!(r.cpu.rflags & rflags::RF, 0, "between iterations RF = 1");
    // The next trap carries on from there.
    r.ok(&[0xF3, 0x6E]);
    assert_eq!(r.ports.writes.len() as u64, 2 * MAX);
    assert_eq!(r.cpu.reg(Gpr::Rcx), u64::MAX - 2 * MAX);
    assert_eq!(r.cpu.reg(Gpr::Rsi), DATA + 2 * MAX);
    assert_eq!(r.cpu.rip, CODE);
}

#[test]
fn rep_insb_with_a_huge_rcx_stops_after_a_bounded_run() {
    use super::emulate::MAX_REP_ELEMENTS_PER_TRAP as MAX;
    let mut r = Rig::kernel();
    r.mem.map(DATA, 0x4000, RW_KERNEL);
    r.cpu.set_reg(Gpr::Rdi, DATA);
    r.cpu.set_reg(Gpr::Rcx, u64::MAX);
    r.cpu.set_reg(Gpr::Rdx, 0x60);
    r.ok(&[0xF3, 0x6C]);
    assert_eq!(r.cpu.rip, CODE);
    assert_eq!(r.cpu.reg(Gpr::Rcx), u64::MAX - MAX);
    assert_eq!(r.cpu.reg(Gpr::Rdi), DATA + MAX);
}

#[test]
fn a_page_table_rep_stosq_with_a_huge_rcx_stops_after_a_bounded_run() {
    use super::emulate::MAX_REP_ELEMENTS_PER_TRAP as MAX;
    let mut r = Rig::kernel();
    r.mem.map(DATA, 0x10000, RW_KERNEL);
    r.cpu.set_reg(Gpr::Rdi, DATA);
    r.cpu.set_reg(Gpr::Rcx, u64::MAX);
    r.cpu.set_reg(Gpr::Rax, 0x1234);
    r.code(&[0xF3, 0x48, 0xAB]);
    let h = r.run_cause(Cause::PageTableWrite).unwrap();
    assert_eq!(h.outcome, Outcome::Emulated);
    assert_eq!(r.cpu.rip, CODE);
    assert_eq!(r.cpu.reg(Gpr::Rcx), u64::MAX - MAX);
    assert_eq!(r.cpu.reg(Gpr::Rdi), DATA + 8 * MAX);
    assert_eq!(r.mem.peek_u64(DATA + 8 * (MAX - 1)), 0x1234);
    assert_eq!(r.mem.peek_u64(DATA + 8 * MAX), 0, "not one element more");
    // A count that fits finishes in this trap and moves RIP on.
    r.cpu.set_reg(Gpr::Rcx, 3);
    let h = r.run_cause(Cause::PageTableWrite).unwrap();
    assert_eq!(h.outcome, Outcome::Emulated);
    assert_eq!(r.cpu.rip, CODE + 3);
    assert_eq!(r.cpu.reg(Gpr::Rcx), 0);
}

// ---- canonical RIP ----

/// The last canonical byte of the lower half.
const LAST_CANONICAL: u64 = 0x0000_7FFF_FFFF_FFFF;

#[test]
fn an_instruction_ending_at_the_last_canonical_byte_retires_then_the_next_fetch_is_gp() {
    // CLI (a fixed encoding) as the last byte: it retires (IF = 0), then #GP(0) with the saved RIP
    // the non-canonical address after it; the vCPU never holds a non-canonical RIP.
    let mut r = Rig::kernel();
    r.mem.map(LAST_CANONICAL & !0xFFF, 0x1000, RW_KERNEL);
    r.cpu.rflags |= rflags::IF;
    r.cpu.rip = LAST_CANONICAL;
    r.raises(&[0xFA], 13, Some(0));
    assert_eq!(
        r.stack(1),
        0x0000_8000_0000_0000,
        "saved RIP: the next fetch"
    );
    assert_eq!(r.stack(3) & rflags::IF, 0, "the CLI retired");
    // MOV CR3 (decoded path), three bytes ending there: the load happened.
    let mut r = Rig::kernel();
    r.mem.map(LAST_CANONICAL & !0xFFF, 0x1000, RW_KERNEL);
    r.cpu.rip = LAST_CANONICAL - 2;
    r.cpu.set_reg(Gpr::Rax, 0x0020_5000);
    r.raises(&[0x0F, 0x22, 0xD8], 13, Some(0));
    assert_eq!(r.cpu.cr3, 0x0020_5000);
    assert_eq!(r.stack(1), 0x0000_8000_0000_0000);
}

#[test]
fn far_jmp_call_and_retf_to_a_non_canonical_offset_are_gp_at_the_instruction() {
    for bytes in [[0x48, 0xFF, 0x28], [0x48, 0xFF, 0x18]] {
        let mut r = Rig::kernel();
        r.mem.poke(DATA, &0x0000_8000_0000_0000u64.to_le_bytes());
        r.mem.poke(DATA + 8, &KCODE.to_le_bytes());
        r.cpu.set_reg(Gpr::Rax, DATA);
        r.cpu.set_reg(Gpr::Rsp, KSTACK_TOP - 0x100);
        r.raises(&bytes, 13, Some(0));
        assert_eq!(r.stack(1), CODE, "at the far JMP/CALL");
        assert_eq!(r.stack(4), KSTACK_TOP - 0x100, "nothing was pushed");
    }
    let mut r = Rig::kernel();
    r.cpu.set_reg(Gpr::Rsp, DATA + 0x100);
    r.mem
        .poke(DATA + 0x100, &0xFFFF_0000_0000_0000u64.to_le_bytes());
    r.mem.poke(DATA + 0x108, &u64::from(KCODE).to_le_bytes());
    r.raises(&[0x48, 0xCB], 13, Some(0));
    assert_eq!(r.stack(1), CODE, "at the RETF");
}

#[test]
fn a_gate_with_a_non_canonical_offset_is_gp_with_ext() {
    let mut r = Rig::kernel();
    let [lo, hi] = encode_gate(0x0000_8000_0000_0000, KCODE, 0, 0xE, 0, true);
    r.mem.poke(IDT + 16 * 0x20, &lo.to_le_bytes());
    r.mem.poke(IDT + 16 * 0x20 + 8, &hi.to_le_bytes());
    let delivered = deliver(&mut r.cpu, &mut r.mem, Event::external(0x20)).unwrap();
    assert_eq!(delivered, Event::gp(1), "#GP(EXT)");
    assert_eq!(r.cpu.rip, HANDLERS + 0x10 * 13);
}

#[test]
fn wrmsr_of_a_non_canonical_syscall_or_sysenter_target_is_gp() {
    for msr in [index::LSTAR, index::SYSENTER_EIP, index::SYSENTER_ESP] {
        let mut r = Rig::kernel();
        r.cpu.set_reg(Gpr::Rcx, u64::from(msr));
        r.cpu.set_reg(Gpr::Rdx, 0x0000_8000);
        r.cpu.set_reg(Gpr::Rax, 0);
        r.raises(&[0x0F, 0x30], 13, Some(0));
    }
}

#[test]
fn rdtsc_trapped_by_cr4_tsd_reads_the_counter_at_cpl0_and_is_gp_above() {
    let mut r = Rig::kernel();
    r.cpu.cr4 |= cr4::TSD;
    r.ok(&[0x0F, 0x31]);
    assert_eq!(
        (r.cpu.reg(Gpr::Rax), r.cpu.reg(Gpr::Rdx)),
        (0x9ABC_DEF0, 0x1234_5678)
    );
    assert_eq!(r.cpu.rip, CODE + 2);
    let mut r = Rig::user();
    r.cpu.cr4 |= cr4::TSD;
    r.raises(&[0x0F, 0x31], 13, Some(0));
    // RDTSCP, hidden by CPUID: #UD.
    let mut r = Rig::kernel();
    r.cpu.cr4 |= cr4::TSD;
    r.raises(&[0x0F, 0x01, 0xF9], 6, None);
}

#[test]
fn dr7_general_detect_makes_the_next_mov_dr_a_db_fault_with_bd() {
    let mut r = Rig::kernel();
    r.cpu.dr7 |= state::dr::DR7_GD;
    r.code(&[0x0F, 0x21, 0xC0]); // mov rax, dr0
    let h = r.run().expect("stopped");
    assert!(
        matches!(h.outcome, Outcome::Delivered(e) if e.vector == 1),
        "{h:?}"
    );
    assert_eq!(r.stack(0), CODE, "a fault: the frame points at the MOV");
    assert_ne!(r.cpu.dr6 & state::dr::DR6_BD, 0);
    assert_eq!(
        r.cpu.dr7 & state::dr::DR7_GD,
        0,
        "GD cleared for the handler"
    );
}

#[test]
fn rdpmc_is_gp_because_cpuid_offers_no_counters() {
    let mut r = Rig::kernel();
    r.cpu.cr4 |= cr4::PCE;
    r.raises(&[0x0F, 0x33], 13, Some(0));
}

#[test]
fn the_real_controls_follow_the_guest_with_alignment_checks_only_in_user_mode() {
    use super::state::{cr0, RealControls};
    let mut r = Rig::kernel();
    r.cpu.cr0 |= cr0::TS | cr0::AM;
    r.cpu.cr4 |= cr4::OSFXSR | cr4::TSD | cr4::PGE;
    r.cpu.efer |= efer::SCE;
    let k = r.cpu.real_controls();
    assert_eq!(
        k,
        RealControls {
            cr0: cr0::TS | cr0::MP,
            cr4: cr4::OSFXSR | cr4::TSD,
            syscall: true,
            sysenter: false,
        },
        "no AM for the guest kernel, which really runs at CPL 3; PGE is the VMM's business"
    );
    r.cpu.cpl = 3;
    r.cpu.msr.sysenter_cs = u64::from(KCODE);
    let u = r.cpu.real_controls();
    assert_eq!(u.cr0, cr0::TS | cr0::MP | cr0::AM);
    assert!(u.sysenter);
}

#[test]
fn an_rf_an_iret_restored_ends_once_an_instruction_retired_natively() {
    let mut r = Rig::kernel();
    r.cpu.rflags |= rflags::RF;
    r.cpu.resumed();
    // A trap at the very instruction it was resumed at (an interrupt before it ran): RF stays.
    r.cpu.trapped_at(CODE);
    assert_ne!(r.cpu.rflags & rflags::RF, 0);
    // A trap further on: the instruction retired, RF is gone.
    r.cpu.trapped_at(CODE + 4);
    assert_eq!(r.cpu.rflags & rflags::RF, 0);
}

// ---- coalescing (fast paths): one trap for two instructions, the same end state ----

/// The vCPU and the kernel stacks, for comparing two ways of running the same code.
fn observable(r: &Rig) -> std::string::String {
    let mut cpu = r.cpu.clone();
    cpu.fast_paths = false;
    let stacks: Vec<u64> = (0..0x40)
        .flat_map(|i| {
            [
                r.mem.peek_u64(KSTACK_TOP - 8 * i),
                r.mem.peek_u64(RSP0 - 8 * i),
            ]
        })
        .collect();
    format!("{cpu:?} {stacks:x?}")
}

/// Runs the code at RIP the reference way: one `handle_instruction` per trap, for as long as the
/// guest stays in the kernel's code page and each one retires (at most `max` instructions).
fn run_one_per_trap(r: &mut Rig, max: usize) {
    for _ in 0..max {
        let at_kernel_code = (CODE..CODE + 0x1000).contains(&r.cpu.rip) && r.cpu.cpl == 0;
        if !at_kernel_code {
            return;
        }
        match r.run() {
            Ok(h) if h.outcome == Outcome::Emulated => {}
            _ => return,
        }
    }
}

/// The ways back a guest kernel ends a system call or an interrupt with.
fn swapgs_pairs() -> [&'static [u8]; 5] {
    [
        &[0x0F, 0x01, 0xF8, 0x48, 0x0F, 0x07],       // swapgs; sysretq
        &[0x0F, 0x01, 0xF8, 0x48, 0x0F, 0x35],       // swapgs; sysexitq
        &[0x0F, 0x01, 0xF8, 0x48, 0xCF],             // swapgs; iretq
        &[0x0F, 0x01, 0xF8, 0xFB, 0x48, 0x0F, 0x35], // swapgs; sti; sysexitq
        &[0x0F, 0x01, 0xF8, 0xFA],                   // swapgs; cli (never paired)
    ]
}

proptest! {
    /// SWAPGS followed by SYSRETQ, SYSEXITQ or IRETQ: with the fast paths the pair runs in one
    /// trap when it may, and the vCPU, its stacks and the trap count agree with two traps, for
    /// any IF/TF, canonical or not RCX/RDX, IRET frame, EFER.SCE and interrupt shadow.
    #[test]
    fn swapgs_pairs_in_one_trap_end_as_two_traps_do(
        pair in 0usize..5,
        flags in prop::sample::select(std::vec![0u64, rflags::IF, rflags::TF, rflags::IF | rflags::TF]),
        sce in any::<bool>(),
        shadow in any::<bool>(),
        rcx_ok in any::<bool>(),
        frame_cs in prop::sample::select(std::vec![UCODE_SEL, KCODE, 0x38, 0x0B]),
        frame_rip_ok in any::<bool>(),
        gs in any::<u64>(),
        kgs in any::<u64>(),
    ) {
        let mut reference = Rig::kernel();
        fast_syscall_msrs(&mut reference);
        if !sce {
            reference.cpu.efer &= !efer::SCE;
        }
        reference.cpu.rflags |= flags;
        if shadow {
            reference.cpu.interrupt_shadow = Some(CODE);
        }
        let canonical = |ok: bool, at: u64| if ok { at } else { 0x0000_8000_0000_0000 };
        reference.cpu.set_reg(Gpr::Rcx, canonical(rcx_ok, UCODE + 0x40));
        reference.cpu.set_reg(Gpr::Rdx, canonical(rcx_ok, UCODE + 0x80));
        reference.cpu.set_reg(Gpr::R11, 0x202);
        reference.cpu.msr.kernel_gs_base = kgs;
        reference.cpu.set_segment_base(SegReg::Gs, gs);
        // An IRET frame on the kernel stack: RIP, CS, RFLAGS, RSP, SS.
        let rsp = KSTACK_TOP - 0x100;
        reference.cpu.set_reg(Gpr::Rsp, rsp);
        let ss = if frame_cs == KCODE { KDATA } else { UDATA };
        for (i, v) in [canonical(frame_rip_ok, UCODE + 0x10), u64::from(frame_cs), 0x202, USTACK_TOP - 8, u64::from(ss)].iter().enumerate() {
            reference.mem.poke(rsp + 8 * i as u64, &v.to_le_bytes());
        }
        reference.code(swapgs_pairs()[pair]);
        reference.cpu.take_effects();
        let mut fast = Rig { cpu: reference.cpu.clone(), mem: reference.mem.clone(), ports: Ports::default() };
        fast.cpu.fast_paths = true;

        run_one_per_trap(&mut reference, 3);
        let coalesced = fast.run();
        if let Ok(h) = coalesced {
            if h.outcome == Outcome::Emulated {
                run_one_per_trap(&mut fast, 2);
            }
        }
        prop_assert_eq!(observable(&fast), observable(&reference));
        prop_assert_eq!(fast.cpu.take_effects(), reference.cpu.take_effects());
    }

    /// A forwarded SYSCALL or SYSENTER whose handler begins with SWAPGS: running the SWAPGS in
    /// the same trap (`coalesce::swapgs_at_handler`) ends as its own trap would, for any FMASK
    /// (IF and TF kept or cleared) and GS bases; and it runs only when nothing could come between.
    #[test]
    fn swapgs_at_the_system_call_handler_ends_as_its_own_trap(
        sysenter in any::<bool>(),
        fmask in prop::sample::select(std::vec![0u64, rflags::IF, rflags::TF, rflags::IF | rflags::TF]),
        user_flags in prop::sample::select(std::vec![rflags::IF, rflags::IF | rflags::TF]),
        handler_is_swapgs in any::<bool>(),
        gs in any::<u64>(),
        kgs in any::<u64>(),
    ) {
        let mut reference = Rig::user();
        fast_syscall_msrs(&mut reference);
        reference.cpu.msr.sfmask = fmask;
        reference.cpu.msr.lstar = CODE;
        reference.cpu.msr.sysenter_eip = CODE;
        reference.cpu.rflags = (reference.cpu.rflags & !(rflags::IF | rflags::TF)) | user_flags;
        reference.cpu.msr.kernel_gs_base = kgs;
        reference.cpu.set_segment_base(SegReg::Gs, gs);
        let handler: &[u8] = if handler_is_swapgs { &coalesce::SWAPGS } else { &[0x90, 0x90, 0x90] };
        reference.mem.poke(CODE, handler);
        reference.cpu.rip = UCODE + 2;
        reference.cpu.take_effects();
        let mut fast = Rig { cpu: reference.cpu.clone(), mem: reference.mem.clone(), ports: Ports::default() };
        fast.cpu.fast_paths = true;

        let forward = |cpu: &mut VCpu| if sysenter { syscall::sysenter(cpu) } else { syscall::syscall(cpu) };
        forward(&mut reference.cpu).unwrap();
        forward(&mut fast.cpu).unwrap();
        let stepping = reference.cpu.rflags & rflags::TF != 0;
        let coalesced = coalesce::swapgs_at_handler(&mut fast.cpu, handler);
        prop_assert_eq!(
            coalesced,
            handler_is_swapgs && fast.cpu.rflags & (rflags::IF | rflags::TF) == 0
        );
        if handler_is_swapgs && !stepping {
            // The reference: the SWAPGS traps on its own (after any interrupt, none pending here).
            run_one_per_trap(&mut reference, 1);
            if !coalesced {
                run_one_per_trap(&mut fast, 1);
            }
        }
        prop_assert_eq!(observable(&fast), observable(&reference));
        prop_assert_eq!(fast.cpu.take_effects(), reference.cpu.take_effects());
    }
}

#[test]
fn without_fast_paths_nothing_is_coalesced_or_built() {
    let mut r = Rig::kernel();
    fast_syscall_msrs(&mut r);
    r.cpu.set_reg(Gpr::Rcx, UCODE + 0x40);
    let h = r.ok(&[0x0F, 0x01, 0xF8, 0x48, 0x0F, 0x07]);
    assert_eq!((h.name, r.cpu.rip, r.cpu.cpl), ("SWAPGS", CODE + 3, 0));
    let mut r = Rig::kernel();
    fast_syscall_msrs(&mut r);
    r.cpu.fast_paths = true;
    r.cpu.set_reg(Gpr::Rcx, UCODE + 0x40);
    let h = r.ok(&[0x0F, 0x01, 0xF8, 0x48, 0x0F, 0x07]);
    assert_eq!(
        (h.name, r.cpu.rip, r.cpu.cpl),
        ("SWAPGS+SYSRETQ", UCODE + 0x40, 3)
    );
    let mut r = Rig::kernel();
    let h = r.ok(&[0x0F, 0x20, 0xD8]);
    assert_eq!((h.name, r.cpu.reg(Gpr::Rax)), ("MOV from CRn", 0x100000));
    r.cpu.fast_paths = true;
    r.cpu.rip = CODE;
    let h = r.ok(&[0x0F, 0x20, 0xD8]);
    assert_eq!((h.name, r.cpu.reg(Gpr::Rax)), ("MOV from CRn", 0x100000));
}

// ---- the fast lane: the same instruction, the same end state ----

/// The encodings the fast lane takes, and a few it must leave alone.
fn lane_encodings() -> Vec<Vec<u8>> {
    let mut v: Vec<Vec<u8>> = std::vec![
        std::vec![0xE4, 0x21],             // in al, 0x21
        std::vec![0xE6, 0x20],             // out 0x20, al
        std::vec![0xE5, 0x40],             // in eax, 0x40
        std::vec![0xEC],                   // in al, dx
        std::vec![0xEF],                   // out dx, eax
        std::vec![0x0F, 0x32],             // rdmsr
        std::vec![0x0F, 0x30],             // wrmsr
        std::vec![0x0F, 0x01, 0x38],       // invlpg [rax]
        std::vec![0x41, 0x0F, 0x01, 0x3B], // invlpg [r11]
        std::vec![0x0F, 0x01, 0x7B, 0x08], // invlpg [rbx+8]: not the lane's
        std::vec![0x0F, 0x01, 0xF8],       // swapgs: not the lane's
        std::vec![0xFA],                   // cli: not the lane's
    ];
    for (op, cr) in [
        (0x20u8, 0u8),
        (0x20, 2),
        (0x20, 3),
        (0x20, 4),
        (0x22, 0),
        (0x22, 3),
        (0x22, 4),
    ] {
        v.push(std::vec![0x0F, op, 0xC0 | (cr << 3) | 1]); // rcx
    }
    v.push(std::vec![0x44, 0x0F, 0x22, 0xC2]); // mov cr8, rdx
    v.push(std::vec![0x44, 0x0F, 0x20, 0xC0]); // mov rax, cr8
    v
}

proptest! {
    /// The fast lane (`execute_prefetched`, its fault then delivered as `handle_instruction`
    /// delivers it) and `handle_instruction` end in the same vCPU, stacks, ports and effects,
    /// for its instructions at any CPL, TF, RF and shadow, any register values (reserved CR
    /// bits, unknown MSRs, non-canonical INVLPG addresses); anything it does not take is left
    /// untouched for the dispatcher.
    #[test]
    fn the_fast_lane_ends_as_the_dispatcher_does(
        which in 0usize..21,
        cpl3 in any::<bool>(),
        tf in any::<bool>(),
        rf in any::<bool>(),
        shadow in any::<bool>(),
        rax in prop::sample::select(std::vec![0u64, 0x20, 0x8000_0000_0000_0000, 0xFFFF_8000_0000_1000, 0x8005_0033]),
        rcx in prop::sample::select(std::vec![0u64, 0xC000_0100, 0xC000_0080, 0x1B, 0x10, 0x8000_0011, 0x0000_8000_0000_0000, 0x20_0000]),
        rdx in prop::sample::select(std::vec![0u64, 0x20, 0x21, 0xF, 0x10, 0xFFFF_FFFF]),
    ) {
        let encodings = lane_encodings();
        let code = &encodings[which % encodings.len()];
        let mut reference = if cpl3 { Rig::user() } else { Rig::kernel() };
        reference.cpu.rip = CODE;
        reference.cpu.cpl = if cpl3 { 3 } else { 0 };
        if tf {
            reference.cpu.rflags |= rflags::TF;
        }
        if rf {
            reference.cpu.rflags |= rflags::RF;
        }
        if shadow {
            reference.cpu.interrupt_shadow = Some(CODE);
        }
        for (r, v) in [(Gpr::Rax, rax), (Gpr::Rcx, rcx), (Gpr::Rdx, rdx), (Gpr::Rbx, rax), (Gpr::R11, rcx)] {
            reference.cpu.set_reg(r, v);
        }
        reference.code(code);
        reference.ports.values.insert(0x21, 0xB8);
        reference.cpu.take_effects();
        // The dispatcher with the same options: the lane must end as it does.
        reference.cpu.fast_paths = true;
        let mut lane = Rig { cpu: reference.cpu.clone(), mem: reference.mem.clone(), ports: reference.ports.clone() };

        let expected = reference.run();
        let mut bytes = [0x90u8; 8];
        bytes[..code.len()].copy_from_slice(code);
        let before = observable(&lane);
        let got = match emulate::execute_prefetched(&mut lane.cpu, &mut lane.mem, &mut lane.ports, &bytes) {
            None => {
                // Not the lane's: nothing changed, the dispatcher takes it from here.
                prop_assert_eq!(observable(&lane), before);
                lane.run()
            }
            Some((lane_insn, Ok(()))) => {
                Ok(Handled { mnemonic: None, name: lane_insn.name(), outcome: Outcome::Emulated })
            }
            Some((lane_insn, Err(Fault::Raise(event)))) => deliver(&mut lane.cpu, &mut lane.mem, event)
                .map(|e| Handled { mnemonic: None, name: lane_insn.name(), outcome: Outcome::Delivered(e) }),
            Some((_, Err(Fault::Stop(stop)))) => Err(stop),
        };
        match (&expected, &got) {
            (Ok(e), Ok(g)) => {
                prop_assert_eq!(e.name, g.name);
                prop_assert_eq!(e.outcome, g.outcome);
            }
            (e, g) => prop_assert_eq!(e.is_err(), g.is_err()),
        }
        prop_assert_eq!(observable(&lane), observable(&reference));
        prop_assert_eq!(format!("{:?}", lane.ports), format!("{:?}", reference.ports));
        prop_assert_eq!(lane.cpu.take_effects(), reference.cpu.take_effects());
    }
}

#[test]
fn with_fast_paths_only_efer_and_sysenter_cs_writes_recompute_the_real_controls() {
    for (msr, controls) in [
        (index::LSTAR, false),
        (index::SYSENTER_ESP, false),
        (index::EFER, true),
        (index::SYSENTER_CS, true),
    ] {
        for fast in [false, true] {
            let mut r = Rig::kernel();
            r.cpu.fast_paths = fast;
            let value = if msr == index::EFER { r.cpu.efer } else { 0x10 };
            wrmsr(&mut r, msr, value);
            assert_eq!(r.run().unwrap().outcome, Outcome::Emulated);
            assert_eq!(
                r.cpu.take_effects().controls,
                controls || !fast,
                "{msr:#x} fast={fast}"
            );
        }
    }
}
