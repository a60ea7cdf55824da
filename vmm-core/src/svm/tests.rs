//! The SVM exit handler against a fake machine: what each exit does to the VMCB, the registers,
//! the ports and guest memory.

use super::event::{int_ctl, EventInjection};
use super::exit::ExitCode;
use super::vmcb::{SavedRegister, Vmcb, VMCB_SIZE};
use super::*;
use crate::cpu::cpuid::HostCpu;
use crate::devices::pic::PicPair;
use crate::loader::EntryState;
use shadow_mmu::{GuestPhysAddr, GuestPhysMemory, MemoryError};
use std::boxed::Box;
use std::vec;
use std::vec::Vec;

/// 1 MiB of guest RAM, the pages the handler asked to map, and a CPU that answers zeros.
struct FakeMachine {
    ram: Vec<u8>,
    mapped: Vec<u64>,
}

impl FakeMachine {
    fn new() -> Self {
        Self {
            ram: vec![0; 1 << 20],
            mapped: Vec::new(),
        }
    }
}

struct NoCpu;

impl HostCpu for NoCpu {
    fn cpuid(&self, leaf: u32, _: u32) -> [u32; 4] {
        [leaf, 0x1111, 0x2222, 0x3333]
    }
    fn rdtsc(&self) -> u64 {
        0
    }
}

impl GuestPhysMemory for FakeMachine {
    fn read_u64(&mut self, gpa: GuestPhysAddr) -> Result<u64, MemoryError> {
        let a = gpa.as_u64() as usize;
        let bytes = self.ram.get(a..a + 8).ok_or(MemoryError::OutsideRam(gpa))?;
        Ok(u64::from_le_bytes(bytes.try_into().unwrap()))
    }
    fn write_u64(&mut self, gpa: GuestPhysAddr, value: u64) -> Result<(), MemoryError> {
        let a = gpa.as_u64() as usize;
        let bytes = self
            .ram
            .get_mut(a..a + 8)
            .ok_or(MemoryError::OutsideRam(gpa))?;
        bytes.copy_from_slice(&value.to_le_bytes());
        Ok(())
    }
}

impl SvmMachine for FakeMachine {
    fn map_guest_page(&mut self, gpa: u64) -> Result<(), SvmStop> {
        if gpa >= self.ram.len() as u64 {
            return Err(SvmStop::GpaOutsideRam(gpa));
        }
        self.mapped.push(gpa);
        Ok(())
    }
    fn guest_ram(&mut self) -> &mut dyn GuestPhysMemory {
        self
    }
    fn read_guest_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), SvmStop> {
        let a = gpa as usize;
        let src = self
            .ram
            .get(a..a + buf.len())
            .ok_or(SvmStop::GpaOutsideRam(gpa))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_guest_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), SvmStop> {
        let a = gpa as usize;
        let dst = self
            .ram
            .get_mut(a..a + data.len())
            .ok_or(SvmStop::GpaOutsideRam(gpa))?;
        dst.copy_from_slice(data);
        Ok(())
    }
    fn host_cpu(&self) -> &dyn HostCpu {
        &NoCpu
    }
}

/// Ports that remember writes and read as `0x1234_5678`.
#[derive(Default)]
struct Ports {
    writes: Vec<(u16, u8, u32)>,
    reads: usize,
}

impl PortIo for Ports {
    fn port_read(&mut self, _: u16, _: u8) -> u32 {
        self.reads += 1;
        0x1234_5678
    }
    fn port_write(&mut self, port: u16, size: u8, value: u32) {
        self.writes.push((port, size, value));
    }
}

fn entry() -> EntryState {
    EntryState {
        rip: 0x20_0000,
        rsp: 0x8_0000,
        rdi: 0x1_0000,
        cr3: 0x2_0000,
        gdtr_base: 0x1_1000,
        gdtr_limit: 0x17,
        boot_info: boot::BootInfo::default(),
    }
}

struct Rig {
    page: Box<[u8; VMCB_SIZE]>,
    guest: SvmGuest,
    machine: FakeMachine,
    ports: Ports,
}

impl Rig {
    fn new() -> Self {
        let e = entry();
        let guest = SvmGuest::new(&e);
        let mut page = Box::new([0u8; VMCB_SIZE]);
        guest.setup_vmcb(&mut Vmcb::new(&mut page), &e, 0x5000, 0x8000, 0x9000);
        Self {
            page,
            guest,
            machine: FakeMachine::new(),
            ports: Ports::default(),
        }
    }

    fn vmcb(&mut self) -> Vmcb<'_> {
        Vmcb::new(&mut self.page)
    }

    /// Paging off, so linear = physical (the string tests' memory).
    fn without_paging(&mut self) {
        let cr0 = self.vmcb().get(SavedRegister::Cr0) & !crate::cpu::state::cr0::PG;
        self.vmcb().set(SavedRegister::Cr0, cr0);
    }

    fn exit(&mut self, code: u64, info_1: u64, info_2: u64) -> (ExitCode, ExitOutcome) {
        let mut vmcb = Vmcb::new(&mut self.page);
        vmcb.set_exit(code, info_1, info_2);
        self.guest
            .handle_exit(&mut vmcb, &mut self.ports, &mut self.machine)
    }

    fn prepare(&mut self, pic: &mut PicPair) -> Option<u8> {
        let mut vmcb = Vmcb::new(&mut self.page);
        self.guest.prepare_entry(&mut vmcb, pic)
    }

    fn injected(&mut self) -> Option<EventInjection> {
        EventInjection::decode(self.vmcb().event_injection())
    }
}

#[test]
fn the_entry_state_is_the_contracts_at_ring_0() {
    let mut rig = Rig::new();
    let vmcb = rig.vmcb();
    assert_eq!(vmcb.get(SavedRegister::Rip), 0x20_0000);
    assert_eq!(vmcb.get(SavedRegister::Efer), boot::ENTRY_EFER | EFER_SVME);
    assert_eq!(vmcb.get(SavedRegister::Cr0), boot::ENTRY_CR0);
    assert_eq!(vmcb.cpl(), 0);
    assert_eq!(vmcb.guest_asid(), GUEST_ASID);
    assert_eq!(vmcb.nested_cr3(), 0x9000);
    assert!(vmcb.intercepts(Intercept::Vmrun));
    assert!(vmcb.intercepts(Intercept::IoioProt));
    assert!(!vmcb.intercepts(Intercept::Vintr));
    assert_eq!(
        vmcb.segment(SegmentRegister::Cs).attributes,
        0xA9A,
        "64-bit code, DPL 0"
    );
    assert_eq!(rig.guest.regs.rdi, 0x1_0000);
}

#[test]
fn in_and_out_go_to_the_ports_and_rip_to_exitinfo2() {
    let mut rig = Rig::new();
    rig.vmcb().set(SavedRegister::Rax, 0xFFFF_FFFF_FFFF_FF41);
    // out dx, al to 0x3F8, next RIP 0x20_0001.
    assert_eq!(
        rig.exit(0x7B, 0x03F8_0000 | 1 << 4, 0x20_0001).1,
        ExitOutcome::Resume
    );
    assert_eq!(rig.ports.writes, [(0x3F8, 1, 0xFFFF_FF41)]);
    assert_eq!(rig.vmcb().get(SavedRegister::Rip), 0x20_0001);
    // in al, 0x21 keeps RAX's upper bytes; in eax zero-extends.
    rig.exit(0x7B, 0x0021_0000 | 1 << 4 | 1, 0x20_0003);
    assert_eq!(rig.vmcb().get(SavedRegister::Rax), 0xFFFF_FFFF_FFFF_FF78);
    rig.exit(0x7B, 0x0021_0000 | 4 << 4 | 1, 0x20_0004);
    assert_eq!(rig.vmcb().get(SavedRegister::Rax), 0x1234_5678);
}

#[test]
fn rep_outsb_moves_the_bytes_and_the_registers() {
    let mut rig = Rig::new();
    rig.without_paging();
    rig.machine.ram[0x3000..0x3005].copy_from_slice(b"hello");
    rig.guest.regs.rsi = 0x3000;
    rig.guest.regs.rcx = 5;
    let rep_outsb = 0x03F8_0000 | 1 << 4 | 4 << 7 | 1 << 3 | 1 << 2;
    assert_eq!(rig.exit(0x7B, rep_outsb, 0x20_0002).1, ExitOutcome::Resume);
    let bytes: Vec<u8> = rig.ports.writes.iter().map(|w| w.2 as u8).collect();
    assert_eq!(bytes, b"hello");
    assert_eq!((rig.guest.regs.rsi, rig.guest.regs.rcx), (0x3005, 0));
    assert_eq!(rig.vmcb().get(SavedRegister::Rip), 0x20_0002);
}

#[test]
fn rep_insw_backwards_with_df() {
    let mut rig = Rig::new();
    rig.without_paging();
    let rflags = rig.vmcb().get(SavedRegister::Rflags) | rflags::DF;
    rig.vmcb().set(SavedRegister::Rflags, rflags);
    rig.guest.regs.rdi = 0x4002;
    rig.guest.regs.rcx = 2;
    let rep_insw = 0x0060_0000 | 2 << 4 | 4 << 7 | 1 << 3 | 1 << 2 | 1;
    rig.exit(0x7B, rep_insw, 0x20_0002);
    assert_eq!(&rig.machine.ram[0x4000..0x4004], &[0x78, 0x56, 0x78, 0x56]);
    assert_eq!((rig.guest.regs.rdi, rig.guest.regs.rcx), (0x3FFE, 0));
}

/// A REP bomb: RCX = 2^63 does not hold the host; the instruction goes on after VMRUN.
#[test]
fn a_rep_bomb_is_cut_into_exits() {
    let mut rig = Rig::new();
    rig.without_paging();
    rig.guest.regs.rcx = 1 << 63;
    rig.guest.regs.rsi = 0x1000;
    let rep_outsb = 0x00E9_0000 | 1 << 4 | 4 << 7 | 1 << 3 | 1 << 2;
    assert_eq!(rig.exit(0x7B, rep_outsb, 0x20_0002).1, ExitOutcome::Resume);
    assert_eq!(
        rig.ports.writes.len() as u64,
        MAX_STRING_ITERATIONS_PER_EXIT
    );
    assert_eq!(
        rig.guest.regs.rcx,
        (1 << 63) - MAX_STRING_ITERATIONS_PER_EXIT
    );
    assert_eq!(
        rig.vmcb().get(SavedRegister::Rip),
        0x20_0000,
        "still on the instruction"
    );
}

/// OUTS from an unmapped page: the guest gets #PF with its CR2, RIP stays on the instruction.
#[test]
fn outs_from_an_unmapped_page_is_the_guests_page_fault() {
    let mut rig = Rig::new();
    // Paging on, CR3 at a zeroed PML4: nothing is mapped.
    rig.guest.regs.rsi = 0x40_1234;
    rig.exit(0x7B, 0x03F8_0000 | 1 << 4 | 4 << 7 | 1 << 2, 0x20_0001);
    assert!(rig.ports.writes.is_empty());
    assert_eq!(rig.injected(), Some(EventInjection::exception(14, Some(0))));
    assert_eq!(rig.vmcb().get(SavedRegister::Cr2), 0x40_1234);
    assert_eq!(rig.vmcb().get(SavedRegister::Rip), 0x20_0000);
}

#[test]
fn efer_hides_svme_and_keeps_it() {
    let mut rig = Rig::new();
    rig.guest.regs.rcx = 0xC000_0080;
    rig.exit(0x7C, 0, 0);
    assert_eq!(rig.vmcb().get(SavedRegister::Rax), boot::ENTRY_EFER);
    assert_eq!(rig.vmcb().get(SavedRegister::Rip), 0x20_0002);
    // The guest sets SCE: VMRUN still sees SVME.
    rig.vmcb().set(SavedRegister::Rax, boot::ENTRY_EFER | 1);
    rig.guest.regs.rdx = 0;
    rig.exit(0x7C, 1, 0);
    assert_eq!(
        rig.vmcb().get(SavedRegister::Efer),
        boot::ENTRY_EFER | 1 | EFER_SVME
    );
    // Setting SVME itself is a reserved bit to the guest: #GP, EFER unchanged.
    rig.vmcb()
        .set(SavedRegister::Rax, boot::ENTRY_EFER | EFER_SVME);
    rig.exit(0x7C, 1, 0);
    assert_eq!(rig.injected(), Some(EventInjection::exception(13, Some(0))));
    assert_eq!(
        rig.vmcb().get(SavedRegister::Efer),
        boot::ENTRY_EFER | 1 | EFER_SVME
    );
}

#[test]
fn unknown_msrs_are_the_guests_gp() {
    let mut rig = Rig::new();
    rig.guest.regs.rcx = 0x10; // the TSC: the host's
    rig.vmcb().set(SavedRegister::Rax, 5);
    rig.exit(0x7C, 1, 0);
    assert_eq!(rig.injected(), Some(EventInjection::exception(13, Some(0))));
    assert_eq!(rig.vmcb().get(SavedRegister::Rip), 0x20_0000);
}

#[test]
fn cpuid_answers_from_the_model() {
    let mut rig = Rig::new();
    rig.vmcb().set(SavedRegister::Rax, 0x4000_0000);
    rig.exit(0x72, 0, 0);
    let leaf = crate::cpu::cpuid::virtual_cpuid(&NoCpu, 0x4000_0000, 0);
    assert_eq!(rig.vmcb().get(SavedRegister::Rax), u64::from(leaf[0]));
    assert_eq!(rig.guest.regs.rbx, u64::from(leaf[1]));
    assert_eq!(rig.vmcb().get(SavedRegister::Rip), 0x20_0002);
}

#[test]
fn hlt_halts_or_stops() {
    let mut rig = Rig::new();
    assert_eq!(
        rig.exit(0x78, 0, 0).1,
        ExitOutcome::Stop(SvmStop::HaltedForever)
    );
    let rflags = rig.vmcb().get(SavedRegister::Rflags) | rflags::IF;
    rig.vmcb().set(SavedRegister::Rflags, rflags);
    assert_eq!(rig.exit(0x78, 0, 0).1, ExitOutcome::Halted);
}

#[test]
fn nested_page_faults_map_or_stop() {
    let mut rig = Rig::new();
    assert_eq!(rig.exit(0x400, 0x4, 0x8_1234).1, ExitOutcome::Resume);
    assert_eq!(rig.machine.mapped, [0x8_1234]);
    assert_eq!(
        rig.exit(0x400, 0x4, 0x4000_0000).1,
        ExitOutcome::Stop(SvmStop::GpaOutsideRam(0x4000_0000))
    );
}

/// An interrupted delivery goes in again (APM §15.7.2).
#[test]
fn an_interrupted_delivery_is_reinjected() {
    let mut rig = Rig::new();
    let timer = EventInjection::external_interrupt(0x20).encode();
    rig.page[0x88..0x90].copy_from_slice(&timer.to_le_bytes());
    rig.exit(0x400, 0x4, 0x8_0000);
    assert_eq!(
        rig.injected(),
        Some(EventInjection::external_interrupt(0x20))
    );
}

#[test]
fn shutdown_and_svm_instructions() {
    let mut rig = Rig::new();
    assert_eq!(
        rig.exit(0x7F, 0, 0).1,
        ExitOutcome::Stop(SvmStop::TripleFault)
    );
    assert_eq!(rig.exit(0x80, 0, 0).1, ExitOutcome::Resume);
    assert_eq!(rig.injected(), Some(EventInjection::exception(6, None)));
    assert_eq!(rig.exit(0x60, 0, 0).1, ExitOutcome::HostInterrupt);
    assert!(matches!(
        rig.exit(u64::MAX, 0, 0).1,
        ExitOutcome::Stop(SvmStop::InvalidGuestState)
    ));
}

/// The PIC's interrupt goes in when IF = 1 and there is no shadow; otherwise the window opens,
/// and VINTR closes it.
#[test]
fn interrupts_are_injected_or_wait_for_the_window() {
    let mut rig = Rig::new();
    let mut pic = PicPair::new();
    // ICW1..ICW4 for the master at 0x20 (vectors 0x20..), unmask IRQ 0.
    for (port, value) in [
        (0x20, 0x11),
        (0x21, 0x20),
        (0x21, 0x04),
        (0x21, 0x01),
        (0x21, 0xFE),
    ] {
        pic.write_port(port, value);
    }
    assert_eq!(rig.prepare(&mut pic), None);
    pic.raise_irq(0);
    // IF = 0: the window opens.
    assert_eq!(rig.prepare(&mut pic), None);
    assert!(rig.vmcb().intercepts(Intercept::Vintr));
    assert_ne!(rig.vmcb().int_ctl() & int_ctl::V_IRQ, 0);
    // The guest sets IF and the window exit comes.
    let rflags = rig.vmcb().get(SavedRegister::Rflags) | rflags::IF;
    rig.vmcb().set(SavedRegister::Rflags, rflags);
    assert_eq!(rig.exit(0x64, 0, 0).1, ExitOutcome::Resume);
    assert!(!rig.vmcb().intercepts(Intercept::Vintr));
    assert_eq!(rig.prepare(&mut pic), Some(0x20));
    assert_eq!(
        rig.injected(),
        Some(EventInjection::external_interrupt(0x20))
    );
    assert_eq!(rig.vmcb().int_ctl() & int_ctl::V_IRQ, 0);
}

/// QEMU's SYSEXITQ leaves CS with L and D set, which VMRUN refuses: D goes before VMRUN.
#[test]
fn cs_d_is_cleared_in_64_bit_code() {
    let mut rig = Rig::new();
    let mut pic = PicPair::new();
    let mut cs = rig.vmcb().segment(SegmentRegister::Cs);
    cs.attributes = 0xEFB; // G, D, L, P, DPL 3, code: as QEMU's SYSEXITQ loads it
    rig.vmcb().set_segment(SegmentRegister::Cs, cs);
    rig.prepare(&mut pic);
    assert_eq!(rig.vmcb().segment(SegmentRegister::Cs).attributes, 0xAFB);
    // 32-bit code keeps its D.
    cs.attributes = 0xCFB;
    rig.vmcb().set_segment(SegmentRegister::Cs, cs);
    rig.prepare(&mut pic);
    assert_eq!(rig.vmcb().segment(SegmentRegister::Cs).attributes, 0xCFB);
}

/// MOV CR8 exits (a QEMU workaround) and lands in V_TPR; bits above 3 are #GP.
#[test]
fn mov_to_cr8_goes_to_v_tpr() {
    let mut rig = Rig::new();
    rig.without_paging();
    // mov cr8, rbx (44 0F 22 C3) at RIP 0x8000, then mov cr8, rax (44 0F 22 C0).
    rig.vmcb().set(SavedRegister::Rip, 0x8000);
    rig.machine.ram[0x8000..0x8008]
        .copy_from_slice(&[0x44, 0x0F, 0x22, 0xC3, 0x44, 0x0F, 0x22, 0xC0]);
    rig.guest.regs.rbx = 9;
    assert_eq!(rig.exit(0x18, 0, 0).1, ExitOutcome::Resume);
    assert_eq!(rig.vmcb().int_ctl() & int_ctl::V_TPR_MASK, 9);
    assert_eq!(rig.vmcb().get(SavedRegister::Rip), 0x8004);
    rig.vmcb().set(SavedRegister::Rax, 0x10);
    rig.exit(0x18, 0, 0);
    assert_eq!(rig.injected(), Some(EventInjection::exception(13, Some(0))));
    assert_eq!(rig.vmcb().get(SavedRegister::Rip), 0x8004);
    assert_eq!(rig.vmcb().int_ctl() & int_ctl::V_TPR_MASK, 9);
}
