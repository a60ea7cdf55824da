//! The fuzz target of vmm-core's instruction emulator and event delivery: an arbitrary vCPU
//! (every general register, RIP, RFLAGS, CPL with CS/SS to match, CR0/CR2/CR3/CR4/CR8, EFER,
//! GDTR/IDTR, the data segments and FS/GS bases, the fast-system-call MSRs, DR6/DR7, the
//! interrupt shadow, the fast paths) on vmm-core's test rig (a guest kernel's GDT, IDT and TSS
//! in a flat page-granular memory), whose memory the input rewrites and remaps, then a few of
//! the calls the host kernel makes on a trap: emulate the instruction at RIP (for a #GP, #NP,
//! #SS, #UD or a page-table write; with or without the first bytes prefetched), the fast lane,
//! a forwarded SYSCALL or SYSENTER, the reflection of a hardware exception, the injection of
//! an interrupt.
//!
//! A stop (`CpuStop`) is a legitimate end. After every call that did not stop, [`check`]
//! asserts what the emulator promises the host (a broken promise panics, which the engine
//! reports as a crash):
//! - RIP is canonical (the host's own IRETQ to a non-canonical RIP would fault at CPL 0);
//! - CS and SS hold the CPL as their RPL, CS is a present 64-bit code segment;
//! - RFLAGS has bit 1 set, no reserved bit and no VM; long mode stays on (CR0.PG/PE, CR4.PAE,
//!   EFER.LME/LMA), CR3 has no reserved bit, CR8 four bits;
//! - an event delivered or reflected is one the architecture defines: an exception vector
//!   that exists, with an error code exactly when the vector has one, CR2 for a #PF (and the
//!   virtual CR2 then holds it), a software interrupt with its instruction length;
//! - every change the host must apply is in the effects: a CR3 write, a CPL change (the shadow
//!   view), CR0.WP/CR4.PGE/EFER.NXE (the paging mode), FS/GS bases, the GDTR, and whatever
//!   changes the real controls (CR0.TS/EM/MP/AM, CR4 bits, EFER.SCE, SYSENTER_CS);
//!
//! The memory model is the rig's [`FlatMemory`]: it refuses, with the #PF the hardware would
//! raise, any access to a page it does not map or maps without the rights, so an emulator
//! write never lands outside the model.

use arbitrary::{Result, Unstructured};
use shadow_mmu::addr::is_canonical;
use shadow_mmu::{AccessKind, GuestVirtAddr, Privilege};
use std::sync::OnceLock;
use vmm_core::cpu::descriptor::{encode_segment, Descriptor};
use vmm_core::cpu::emulate::{
    execute_prefetched, handle_instruction, handle_instruction_from, single_step_trap,
};
use vmm_core::cpu::event::EventKind;
use vmm_core::cpu::exception::exception;
use vmm_core::cpu::msr::{index, write_msr};
use vmm_core::cpu::state::{cr0, cr4, dr, efer, rflags, RealControls};
use vmm_core::cpu::{
    coalesce, deliver, inject, syscall, Cause, CpuStop, Event, Fault, GuestMemory, Outcome, SegReg,
    Segment, TableRegister, VCpu,
};
use vmm_core::testing::{
    FakeCpu, Pic, Rig, Rights, CODE, DATA, GDT, HANDLERS, IDT, KDATA, RO_KERNEL, RW_KERNEL,
    RW_USER, TSS, UCODE, UDATA, USTACK_TOP,
};

/// The last canonical lower-half byte: code ending there tests the end-of-instruction #GP.
const LAST_CANONICAL: u64 = 0x0000_7FFF_FFFF_FFFF;
/// The first byte of the canonical upper half.
const UPPER_HALF: u64 = 0xFFFF_8000_0000_0000;
/// Most calls one input makes.
const MAX_CALLS: usize = 8;

/// Runs one input: builds the guest it describes and makes its calls, checking after each.
/// Never fails on a short or malformed input (missing bytes read as zeros).
pub fn run(data: &[u8]) {
    let mut u = Unstructured::new(data);
    // A too-short input just means fewer choices: arbitrary yields defaults when out of data.
    let Ok(mut rig) = guest(&mut u) else {
        return;
    };
    for _ in 0..MAX_CALLS {
        if u.is_empty() {
            break;
        }
        let Ok(call) = call(&mut u) else {
            break;
        };
        let before = rig.cpu.clone();
        rig.cpu.take_effects();
        match make(&mut rig, call) {
            Ok(events) => check(&before, &mut rig.cpu, &events),
            // A stop (triple fault, not emulated, unsupported) ends the guest cleanly.
            Err(_stop) => break,
        }
    }
}

/// A value likely to be an address in the rig's memory (so operands and stacks hit mapped
/// pages), or anything.
fn address(u: &mut Unstructured) -> Result<u64> {
    let bases = [
        CODE, GDT, IDT, TSS, 0x5000, 0x9000, DATA, HANDLERS, UCODE, USTACK_TOP, 0,
    ];
    Ok(match u.int_in_range(0..=3u8)? {
        0 => u.arbitrary()?,
        1 => LAST_CANONICAL - u64::from(u.int_in_range(0..=31u8)?),
        2 => UPPER_HALF.wrapping_add(u64::from(u.arbitrary::<u16>()?)),
        _ => u
            .choose(&bases)?
            .wrapping_add(u64::from(u.int_in_range(0..=0x1FFFu16)?))
            .wrapping_sub(0x10),
    })
}

/// The guest the input describes: the rig's kernel or user program, then every part of the
/// vCPU and of its memory the input chooses to change.
fn guest(u: &mut Unstructured) -> Result<Rig> {
    let cpl = *u.choose(&[0u8, 3, 0, 3, 1, 2])?;
    // Built once: a clone is much cheaper than laying out 256 gates per input.
    static RIGS: OnceLock<(Rig, Rig)> = OnceLock::new();
    let (kernel, user) = RIGS.get_or_init(|| (Rig::kernel(), Rig::user()));
    let mut rig = if cpl == 3 {
        user.clone()
    } else {
        kernel.clone()
    };
    let cpu = &mut rig.cpu;
    if cpl == 1 || cpl == 2 {
        // An inner ring other than 0: 64-bit code of that DPL, a null SS of that RPL (what an
        // interrupt to that ring loads, SDM Vol. 3 §6.14.4).
        let code = Descriptor::from_raw(encode_segment(true, true, cpl, true, true));
        cpu.set_segment(
            SegReg::Cs,
            Segment {
                selector: 0x48 | u16::from(cpl),
                cache: code,
            },
        );
        cpu.set_segment(SegReg::Ss, Segment::null(cpl));
        cpu.set_cpl(cpl);
    } else if cpl == 0 && u.arbitrary()? {
        cpu.set_segment(SegReg::Ss, Segment::null(0));
    }
    for r in 0..16 {
        cpu.gpr[r] = address(u)?;
    }
    cpu.rip = match u.int_in_range(0..=4u8)? {
        // RIP is canonical whenever the VMM holds it (its own checks keep it so).
        0 => canonical_or(address(u)?, CODE),
        1 => LAST_CANONICAL + 1 - u64::from(u.int_in_range(1..=15u8)?),
        // Near the end of the code page: the instruction may run onto the next page.
        2 => cpu.rip + 0xFF0 + u64::from(u.int_in_range(0..=15u8)?),
        _ => cpu.rip,
    };
    cpu.rflags = (u.arbitrary::<u64>()? & rflags::DEFINED & !rflags::VM) | rflags::FIXED;
    // Long mode as the VMM keeps it; any combination of the other bits a MOV CRn accepts.
    let mut c0 = (u.arbitrary::<u64>()? & cr0::DEFINED) | cr0::PE | cr0::PG | cr0::ET;
    if c0 & cr0::NW != 0 {
        c0 |= cr0::CD;
    }
    cpu.cr0 = c0;
    cpu.cr2 = u.arbitrary()?;
    let phys_mask = (1u64 << cpu.max_phys_bits) - 1;
    cpu.cr3 = u.arbitrary::<u64>()? & phys_mask & !0xFE7;
    cpu.cr4 = (u.arbitrary::<u64>()? & cr4::DEFINED) | cr4::PAE;
    cpu.cr8 = u.arbitrary::<u64>()? & 0xF;
    cpu.efer = (u.arbitrary::<u64>()? & (efer::SCE | efer::NXE)) | efer::LME | efer::LMA;
    if u.arbitrary()? {
        cpu.gdtr = TableRegister {
            base: canonical_or(address(u)?, GDT),
            limit: u.arbitrary()?,
        };
    }
    if u.arbitrary()? {
        cpu.idtr = TableRegister {
            base: canonical_or(address(u)?, IDT),
            limit: u.arbitrary()?,
        };
    }
    for s in [SegReg::Ds, SegReg::Es, SegReg::Fs, SegReg::Gs] {
        let selector = *u.choose(&[0, KDATA, UDATA, 0x38, 0x43])?;
        let mut seg = *cpu.segment(SegReg::Ds);
        seg.selector = selector;
        if selector == 0 {
            seg = Segment::null(0);
        }
        cpu.set_segment(s, seg);
    }
    for (msr, value) in [
        (index::FS_BASE, address(u)?),
        (index::GS_BASE, address(u)?),
        (index::KERNEL_GS_BASE, address(u)?),
        (index::STAR, u.arbitrary()?),
        (index::LSTAR, address(u)?),
        (index::SFMASK, u.arbitrary()?),
        (
            index::SYSENTER_CS,
            u64::from(*u.choose(&[0u16, 0x08, 0x10, 0x18, 0x3B])?),
        ),
        (index::SYSENTER_ESP, address(u)?),
        (index::SYSENTER_EIP, address(u)?),
    ] {
        // WRMSR keeps the MSR file valid (canonical bases and entry points): an input the
        // guest could not write is dropped as WRMSR would drop it.
        let _ = write_msr(cpu, msr, value);
    }
    cpu.dr6 = dr::DR6_INIT | (u.arbitrary::<u64>()? & dr::DR6_STATUS);
    cpu.dr7 = dr::DR7_INIT | (u.arbitrary::<u64>()? & dr::DR7_DEFINED & !dr::DR7_ENABLES);
    for a in &mut cpu.dr_address {
        *a = address(u)?;
    }
    cpu.interrupt_shadow = match u.int_in_range(0..=3u8)? {
        0 => Some(cpu.rip),
        1 => Some(address(u)?),
        _ => None,
    };
    cpu.fast_paths = u.arbitrary()?;
    cpu.take_effects();
    memory(u, &mut rig)?;
    Ok(rig)
}

/// `addr` if canonical (GDTR and IDTR bases are: LGDT/LIDT check), else `fallback`.
fn canonical_or(addr: u64, fallback: u64) -> u64 {
    if is_canonical(addr) {
        addr
    } else {
        fallback
    }
}

/// Rewrites and remaps the rig's memory as the input says: the instruction bytes at RIP, then
/// byte runs anywhere the model maps (descriptor tables, TSS, stacks, handlers), pages with
/// other rights, unmapped, or newly mapped (the canonical edge, the upper half).
fn memory(u: &mut Unstructured, rig: &mut Rig) -> Result<()> {
    let rip = rig.cpu.rip;
    for page in [rip >> 12, rip.wrapping_add(15) >> 12] {
        if is_canonical(page << 12) && !rig.mem.pages.contains_key(&page) && u.arbitrary()? {
            let rights = *u.choose(&[RW_KERNEL, RW_USER, RO_KERNEL])?;
            rig.mem.map(page << 12, 0x1000, rights);
        }
    }
    let code: [u8; 15] = u.arbitrary()?;
    poke_mapped(rig, rip, &code);
    let edits = u.int_in_range(0..=6u8)?;
    for _ in 0..edits {
        match u.int_in_range(0..=3u8)? {
            0 | 1 => {
                let at = address(u)?;
                let len = u.int_in_range(1..=16usize)?;
                let bytes = u.bytes(len)?;
                poke_mapped(rig, at, bytes);
            }
            2 => {
                let page = address(u)? >> 12;
                let rights = Rights {
                    user: u.arbitrary()?,
                    writable: u.arbitrary()?,
                    executable: u.arbitrary()?,
                };
                if let Some(p) = rig.mem.pages.get_mut(&page) {
                    p.0 = rights;
                } else if is_canonical(page << 12) {
                    rig.mem.map(page << 12, 0x1000, rights);
                }
            }
            _ => {
                let page = address(u)? >> 12;
                rig.mem.pages.remove(&page);
            }
        }
    }
    Ok(())
}

/// Writes `bytes` at `at` wherever the model maps the byte (the rest is dropped).
fn poke_mapped(rig: &mut Rig, at: u64, bytes: &[u8]) {
    for (i, b) in bytes.iter().enumerate() {
        let a = at.wrapping_add(i as u64);
        if let Some(page) = rig.mem.pages.get_mut(&(a >> 12)) {
            page.1[(a & 0xFFF) as usize] = *b;
        }
    }
}

/// One call the host kernel makes on a trap.
#[derive(Clone, Copy, Debug)]
enum Call {
    /// `handle_instruction` for a #GP, #NP, #SS or #UD the instruction raised, or for a store
    /// to a write-protected page table; `prefetched`: with the first 8 bytes already read, as
    /// the fast lane hands them on.
    Instruction { cause: Cause, prefetched: bool },
    /// The fast lane on the bytes at RIP (`execute_prefetched`), a fault delivered.
    FastLane,
    /// A SYSCALL forwarded (RIP past it), then the SWAPGS at the handler coalesced.
    Syscall,
    /// A SYSENTER forwarded.
    Sysenter,
    /// A hardware exception reflected: the guest's own #PF, #DB, #DE, ...
    Reflect(Event),
    /// An external interrupt pending at the virtual PIC.
    Interrupt(u8),
}

fn call(u: &mut Unstructured) -> Result<Call> {
    Ok(match u.int_in_range(0..=9u8)? {
        0..=3 => {
            let code =
                u32::from(u.arbitrary::<u16>()?) & !0b11 | u32::from(u.int_in_range(0..=3u8)?);
            let code = if u.arbitrary()? { 0 } else { code };
            let cause = match u.int_in_range(0..=5u8)? {
                0 | 1 => Cause::Fault(Event::gp(code)),
                2 => Cause::Fault(Event::np(code)),
                3 => Cause::Fault(Event::ss(code)),
                4 => Cause::Fault(Event::ud()),
                _ => Cause::PageTableWrite,
            };
            Call::Instruction {
                cause,
                prefetched: u.arbitrary()?,
            }
        }
        4 => Call::FastLane,
        5 => Call::Syscall,
        6 => Call::Sysenter,
        7 | 8 => {
            let vector = u.int_in_range(0..=31u8)?;
            // Only what the host reflects: a defined exception, not NMI, #DF or #MC.
            if exception(vector).is_none() || matches!(vector, 2 | 8 | 18) {
                return Ok(Call::Interrupt(vector + 32));
            }
            let mut event = if Event::vector_has_error_code(vector) {
                Event::exception_with_code(vector, u32::from(u.arbitrary::<u16>()?))
            } else {
                Event::exception(vector)
            };
            if vector == 14 {
                event.cr2 = Some(address(u)?).filter(|&a| is_canonical(a));
                if event.cr2.is_none() {
                    event.cr2 = Some(DATA);
                }
                event.error_code = event.error_code.map(|c| c & 0x1F);
            }
            Call::Reflect(event)
        }
        _ => Call::Interrupt(u.arbitrary()?),
    })
}

/// Makes `call` as the host kernel does and returns the events it delivered, or the stop.
fn make(rig: &mut Rig, call: Call) -> core::result::Result<Vec<Event>, CpuStop> {
    let Rig { cpu, mem, ports } = rig;
    let mut mark = |_| {};
    match call {
        Call::Instruction { cause, prefetched } => {
            let handled = if prefetched {
                let Some(code) = fetch::<8>(cpu, mem, cpu.rip) else {
                    return Ok(Vec::new());
                };
                handle_instruction_from(cpu, mem, ports, &FakeCpu, cause, &mut mark, Some(&code))?
            } else {
                handle_instruction(cpu, mem, ports, &FakeCpu, cause, &mut mark)?
            };
            Ok(match handled.outcome {
                Outcome::Delivered(e) | Outcome::Reflected(e) => vec![e],
                Outcome::Halted | Outcome::Emulated => Vec::new(),
            })
        }
        Call::FastLane => {
            let Some(code) = fetch::<8>(cpu, mem, cpu.rip) else {
                return Ok(Vec::new());
            };
            match execute_prefetched(cpu, mem, ports, &code) {
                None | Some((_, Ok(()))) => Ok(Vec::new()),
                Some((_, Err(Fault::Raise(event)))) => Ok(vec![deliver(cpu, mem, event)?]),
                Some((_, Err(Fault::Stop(stop)))) => Err(stop),
            }
        }
        Call::Syscall | Call::Sysenter => {
            // The real instruction retired: RIP is past it (SYSCALL/SYSENTER are 2 bytes).
            let stepping = cpu.rflags & rflags::TF != 0;
            let result = if matches!(call, Call::Syscall) {
                // Past the last canonical byte this is not canonical: SYSCALL saves it in RCX
                // all the same (it fetches nothing there).
                cpu.rip = cpu.rip.wrapping_add(2);
                syscall::syscall(cpu)
            } else {
                syscall::sysenter(cpu)
            };
            match result {
                Ok(()) if stepping => Ok(vec![single_step_trap(cpu, mem)?]),
                Ok(()) => {
                    if cpu.fast_paths {
                        if let Some(handler) = fetch::<3>(cpu, mem, cpu.rip) {
                            coalesce::swapgs_at_handler(cpu, &handler);
                        }
                    }
                    Ok(Vec::new())
                }
                Err(Fault::Raise(event)) => Ok(vec![deliver(cpu, mem, event)?]),
                Err(Fault::Stop(stop)) => Err(stop),
            }
        }
        Call::Reflect(event) => Ok(vec![deliver(cpu, mem, event)?]),
        Call::Interrupt(vector) => {
            let mut pic = Pic {
                pending: Some(vector),
            };
            match inject(cpu, mem, &mut pic)? {
                vmm_core::cpu::Injection::Delivered(v) => Ok(vec![Event::external(v)]),
                _ => Ok(Vec::new()),
            }
        }
    }
}

/// The `N` bytes at `rip` fetched with the guest's rights, or `None` where the fetch faults.
fn fetch<const N: usize>(cpu: &VCpu, mem: &mut impl GuestMemory, rip: u64) -> Option<[u8; N]> {
    let mut bytes = [0u8; N];
    let gva = GuestVirtAddr::new(rip)?;
    let privilege = if cpu.cpl == 3 {
        Privilege::User
    } else {
        Privilege::Supervisor
    };
    mem.read_linear(gva, &mut bytes, AccessKind::Fetch, privilege)
        .ok()
        .map(|()| bytes)
}

/// The promises of the module doc, for the vCPU `after` a call that began as `before` and
/// delivered `events`.
fn check(before: &VCpu, after: &mut VCpu, events: &[Event]) {
    assert!(
        is_canonical(after.rip),
        "non-canonical RIP {:#x}",
        after.rip
    );
    let cs = after.segment(SegReg::Cs);
    let ss = after.segment(SegReg::Ss);
    assert_eq!(cs.rpl(), after.cpl, "CS.RPL is not the CPL: {cs:?}");
    assert_eq!(ss.rpl(), after.cpl, "SS.RPL is not the CPL: {ss:?}");
    assert!(
        cs.cache.code_or_data && cs.cache.typ & 0x8 != 0 && cs.cache.present && cs.cache.long,
        "CS is not present 64-bit code: {cs:?}"
    );
    assert_eq!(after.rflags & rflags::FIXED, rflags::FIXED, "RFLAGS bit 1");
    assert_eq!(after.rflags & !rflags::DEFINED, 0, "RFLAGS reserved bits");
    assert_eq!(after.rflags & rflags::VM, 0, "RFLAGS.VM in long mode");
    let long_mode = (cr0::PE | cr0::PG, cr4::PAE, efer::LME | efer::LMA);
    assert_eq!(
        (
            after.cr0 & long_mode.0,
            after.cr4 & long_mode.1,
            after.efer & long_mode.2
        ),
        long_mode,
        "left long mode"
    );
    let phys_mask = (1u64 << after.max_phys_bits) - 1;
    assert_eq!(after.cr3 & !(phys_mask & !0xFE7), 0, "CR3 reserved bits");
    assert!(after.cr8 <= 0xF, "CR8 {:#x}", after.cr8);
    for e in events {
        check_event(e, after);
    }
    let effects = after.take_effects();
    if after.cr3 != before.cr3 {
        assert_eq!(effects.cr3_load, Some(after.cr3), "CR3 changed unannounced");
    }
    if after.cpl != before.cpl {
        assert!(effects.privilege, "CPL changed unannounced");
    }
    let paging = |c: &VCpu| c.paging_mode(c.max_phys_bits);
    if paging(after) != paging(before) {
        assert!(effects.paging_mode, "paging mode changed unannounced");
    }
    if (after.fs_base(), after.gs_base()) != (before.fs_base(), before.gs_base()) {
        assert!(effects.segment_bases, "FS/GS base changed unannounced");
    }
    if after.gdtr != before.gdtr {
        assert!(effects.descriptor_table, "GDTR changed unannounced");
    }
    let real = |c: &VCpu| -> RealControls { c.real_controls() };
    if real(after) != real(before) {
        assert!(
            effects.controls || effects.privilege,
            "real controls changed unannounced: {:?} -> {:?}",
            real(before),
            real(after)
        );
    }
}

/// An event the architecture defines, as delivered.
fn check_event(e: &Event, cpu: &VCpu) {
    match e.kind {
        EventKind::Exception => {
            assert!(exception(e.vector).is_some(), "no exception {}", e.vector);
            assert_eq!(
                e.error_code.is_some(),
                Event::vector_has_error_code(e.vector),
                "error code of {e:?}"
            );
            assert_eq!(e.cr2.is_some(), e.vector == 14, "CR2 of {e:?}");
            if let Some(cr2) = e.cr2 {
                assert_eq!(cpu.cr2, cr2, "CR2 not loaded for {e:?}");
            }
        }
        EventKind::SoftwareInterrupt | EventKind::SoftwareException => {
            assert!((1..=15).contains(&e.instruction_len), "length of {e:?}");
            assert_eq!(e.error_code, None, "{e:?}");
        }
        EventKind::ExternalInterrupt => assert_eq!(e.error_code, None, "{e:?}"),
    }
}
