//! The hardware-assisted backend (host option `backend=svm`): AMD SVM with nested paging, the
//! article's second half, run beside trap-and-emulate on the same guest (docs/hardware-assist.md).
//!
//! The guest runs at its own Ring 0 under VMRUN. Nothing it does traps by accident of privilege:
//! it exits only where the VMCB says so ([`intercept`]), and the host sees why in the VMCB's exit
//! code ([`exit`]). Its page tables are its own; the host maps guest-physical memory with nested
//! page tables ([`npt`]), filled on first touch like the shadow tables were. Interrupts go in
//! through `EVENTINJ` and the virtual interrupt window ([`event`]). The devices behind the ports
//! are the same virtual 8259/8254/16550 and debug exit as under trap-and-emulate, and so are the
//! CPUID and MSR models, so both backends show the guest the same machine.
//!
//! Everything here is plain data and rules, host-tested; the kernel keeps only VMRUN and the
//! registers around it (kernel/src/svm.rs, kernel/src/asm/svm_run.S).

pub mod event;
pub mod exit;
pub mod intercept;
pub mod npt;
pub mod vmcb;

use crate::cpu::cpuid::{virtual_cpuid, HostCpu};
use crate::cpu::msr::{index, read_msr, write_msr, PAT_RESET};
use crate::cpu::state::{cr0, cr4, efer, rflags, TableRegister, VCpu};
use crate::devices::pic::PicPair;
use crate::io::PortIo;
use crate::loader::EntryState;
use event::{int_ctl, interrupt_window, EventInjection, InterruptWindow};
use exit::{ExitCode, IoExit};
use iced_x86::{Code, Decoder, DecoderOptions, Register};
use intercept::{Intercept, VMM_INTERCEPTS};
use shadow_mmu::{walk, MemoryError, WalkError};
use shadow_mmu::{Access, AccessKind, GuestPhysMemory, GuestVirtAddr, PagingMode, Privilege};
use vmcb::{SavedRegister, SegmentRegister, Vmcb, VmcbSegment};

/// EFER.SVME: VMRUN requires it set in the guest's EFER too (APM vol. 2 §15.5.1); the guest
/// never sees it (its RDMSR and WRMSR of EFER exit).
pub const EFER_SVME: u64 = 1 << 12;

/// The ASID of the guest: any but 0, which is the host's.
pub const GUEST_ASID: u32 = 1;

/// At most this many iterations of a REP INS/OUTS per exit: the rest continue after the next
/// VMRUN (the instruction re-executes with RCX, RSI, RDI as they are), so a guest's
/// `rep outsb` with RCX = 2^63 cannot hold the host (a REP bomb).
pub const MAX_STRING_ITERATIONS_PER_EXIT: u64 = 4096;

/// The general registers the VMCB does not hold (RAX and RSP are in its save area). The kernel's
/// VMRUN stub loads them before VMRUN and stores them after `#VMEXIT`, at these offsets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[allow(missing_docs)] // the architectural names
pub struct GuestRegisters {
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

/// Why the guest cannot go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SvmStop {
    /// Shutdown: the guest triple-faulted.
    TripleFault,
    /// VMRUN refused the guest state (`VMEXIT_INVALID`).
    InvalidGuestState,
    /// The guest touched a guest-physical address beyond its RAM.
    GpaOutsideRam(u64),
    /// The host has no memory left for the guest's pages or the nested tables.
    HostMemoryExhausted,
    /// HLT with interrupts disabled: nothing can wake the guest.
    HaltedForever,
    /// An exit this VMM does not expect, by code.
    Unexpected(u64),
}

impl core::fmt::Display for SvmStop {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TripleFault => write!(f, "triple fault (SHUTDOWN exit)"),
            Self::InvalidGuestState => write!(f, "VMRUN refused the guest state (VMEXIT_INVALID)"),
            Self::GpaOutsideRam(gpa) => {
                write!(
                    f,
                    "guest-physical address {gpa:#x} is beyond the guest's RAM"
                )
            }
            Self::HostMemoryExhausted => write!(f, "the host is out of memory for the guest"),
            Self::HaltedForever => write!(f, "HLT with interrupts disabled: halted forever"),
            Self::Unexpected(code) => write!(f, "unexpected exit code {code:#x}"),
        }
    }
}

/// What the host does after an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitOutcome {
    /// Run the guest again.
    Resume,
    /// The guest executed HLT: wait for a virtual interrupt, then run it.
    Halted,
    /// A physical interrupt is waiting: let the host take it, then run the guest.
    HostInterrupt,
    /// Stop the guest.
    Stop(SvmStop),
}

/// What the exit handler needs from the host: guest memory and the host CPU.
pub trait SvmMachine {
    /// A nested page fault at `gpa`: back its page and map it in the nested tables.
    fn map_guest_page(&mut self, gpa: u64) -> Result<(), SvmStop>;
    /// The guest's RAM, for walks of its page tables.
    fn guest_ram(&mut self) -> &mut dyn GuestPhysMemory;
    /// Reads guest-physical bytes (within one page).
    fn read_guest_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), SvmStop>;
    /// Writes guest-physical bytes (within one page).
    fn write_guest_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), SvmStop>;
    /// The real CPU, for the CPUID model.
    fn host_cpu(&self) -> &dyn HostCpu;
}

/// The VMM's side of one SVM guest: the registers VMRUN does not switch, and the model of the
/// MSRs that exit (the same `cpu::msr` model as under trap-and-emulate, kept in a `VCpu` whose
/// EFER and CR0 are refreshed from the VMCB before each use).
#[derive(Debug)]
pub struct SvmGuest {
    /// The general registers outside the VMCB.
    pub regs: GuestRegisters,
    msrs: VCpu,
}

impl SvmGuest {
    /// A guest about to enter at `entry` (docs/writing-a-guest.md).
    pub fn new(entry: &EntryState) -> Self {
        let gdtr = TableRegister {
            base: entry.gdtr_base,
            limit: entry.gdtr_limit,
        };
        Self {
            regs: GuestRegisters {
                rdi: entry.rdi,
                ..GuestRegisters::default()
            },
            msrs: VCpu::at_entry(entry.rip, entry.rsp, entry.rdi, entry.cr3, gdtr),
        }
    }

    /// Writes a fresh VMCB: the guest's entry state (the same as under trap-and-emulate, at its
    /// own Ring 0), its ASID, the VMM's intercepts, the permission maps and the nested root.
    pub fn setup_vmcb(
        &self,
        vmcb: &mut Vmcb<'_>,
        entry: &EntryState,
        iopm: u64,
        msrpm: u64,
        nested_root: u64,
    ) {
        vmcb.clear();
        for intercept in VMM_INTERCEPTS {
            vmcb.set_intercept(intercept);
        }
        vmcb.set_permission_maps(iopm, msrpm);
        vmcb.set_guest_asid(GUEST_ASID);
        vmcb.set_tlb_control(0);
        vmcb.set_int_ctl(int_ctl::V_INTR_MASKING);
        // CR8 writes exit (`mov_to_cr8`: a QEMU 7.2 workaround); reads use V_TPR.
        vmcb.set_cr_intercepts(0, 1 << 8);
        vmcb.enable_nested_paging(nested_root);

        let code = VmcbSegment::from_descriptor(boot::BOOT_CODE_SELECTOR, boot::BOOT_GDT[1]);
        let data = VmcbSegment::from_descriptor(boot::BOOT_DATA_SELECTOR, boot::BOOT_GDT[2]);
        vmcb.set_segment(SegmentRegister::Cs, code);
        for register in [
            SegmentRegister::Ss,
            SegmentRegister::Ds,
            SegmentRegister::Es,
        ] {
            vmcb.set_segment(register, data);
        }
        for register in [
            SegmentRegister::Fs,
            SegmentRegister::Gs,
            SegmentRegister::Ldtr,
        ] {
            vmcb.set_segment(register, VmcbSegment::default());
        }
        // No TSS until the guest's LTR; a present, busy 64-bit TSS type keeps VMRUN's checks
        // happy (any interrupt needing a stack switch before LTR would fault, as on hardware
        // with TR = 0).
        vmcb.set_segment(
            SegmentRegister::Tr,
            VmcbSegment {
                attributes: 0x8B,
                limit: 0x67,
                ..VmcbSegment::default()
            },
        );
        vmcb.set_segment(
            SegmentRegister::Gdtr,
            VmcbSegment {
                limit: u32::from(entry.gdtr_limit),
                base: entry.gdtr_base,
                ..VmcbSegment::default()
            },
        );
        vmcb.set_segment(SegmentRegister::Idtr, VmcbSegment::default());
        vmcb.set_cpl(0);
        vmcb.set(SavedRegister::Efer, boot::ENTRY_EFER | EFER_SVME);
        vmcb.set(SavedRegister::Cr0, boot::ENTRY_CR0);
        vmcb.set(SavedRegister::Cr3, entry.cr3);
        vmcb.set(SavedRegister::Cr4, boot::ENTRY_CR4);
        vmcb.set(SavedRegister::Cr2, 0);
        vmcb.set(SavedRegister::Dr6, 0xFFFF_0FF0);
        vmcb.set(SavedRegister::Dr7, 0x400);
        vmcb.set(SavedRegister::Rflags, boot::ENTRY_RFLAGS);
        vmcb.set(SavedRegister::Rip, entry.rip);
        vmcb.set(SavedRegister::Rsp, entry.rsp);
        vmcb.set(SavedRegister::Rax, 0);
        vmcb.set(SavedRegister::GPat, PAT_RESET);
    }

    /// Handles one `#VMEXIT`: what it was, and what the host does next.
    pub fn handle_exit<P, M>(
        &mut self,
        vmcb: &mut Vmcb<'_>,
        ports: &mut P,
        machine: &mut M,
    ) -> (ExitCode, ExitOutcome)
    where
        P: PortIo + ?Sized,
        M: SvmMachine + ?Sized,
    {
        let code = ExitCode::decode(vmcb.exit_code());
        // An event whose delivery the exit interrupted (a nested page fault on the IDT or the
        // stack, say) goes in again at the next VMRUN (APM vol. 2 §15.7.2).
        vmcb.set_event_injection(0);
        if EventInjection::decode(vmcb.exit_int_info()).is_some() {
            vmcb.set_event_injection(vmcb.exit_int_info());
        }
        let outcome = match code {
            ExitCode::Ioio => self.io(vmcb, ports, machine),
            ExitCode::Msr => self.msr(vmcb),
            ExitCode::Cpuid => {
                let rax = vmcb.get(SavedRegister::Rax);
                let [a, b, c, d] =
                    virtual_cpuid(machine.host_cpu(), rax as u32, self.regs.rcx as u32);
                vmcb.set(SavedRegister::Rax, u64::from(a));
                self.regs.rbx = u64::from(b);
                self.regs.rcx = u64::from(c);
                self.regs.rdx = u64::from(d);
                skip(vmcb, 2)
            }
            ExitCode::Hlt => {
                skip(vmcb, 1);
                if vmcb.get(SavedRegister::Rflags) & rflags::IF == 0 {
                    ExitOutcome::Stop(SvmStop::HaltedForever)
                } else {
                    ExitOutcome::Halted
                }
            }
            ExitCode::CrWrite(8) => self.mov_to_cr8(vmcb, machine),
            ExitCode::Intr => ExitOutcome::HostInterrupt,
            ExitCode::Vintr => {
                // The window is open: `prepare_entry` injects the PIC's interrupt now.
                vmcb.set_int_ctl(vmcb.int_ctl() & !int_ctl::V_IRQ);
                vmcb.clear_intercept(Intercept::Vintr);
                ExitOutcome::Resume
            }
            ExitCode::NestedPageFault => match machine.map_guest_page(vmcb.exit_info_2()) {
                Ok(()) => ExitOutcome::Resume,
                Err(stop) => ExitOutcome::Stop(stop),
            },
            ExitCode::Refused(_) => {
                // SVM instructions, INVD, WBINVD...: the guest sees no SVM (CPUID says so,
                // EFER.SVME reads as 0), so they are #UD as on a CPU without it; INVD and
                // WBINVD would touch the host's caches.
                inject(vmcb, EventInjection::exception(6, None));
                ExitOutcome::Resume
            }
            ExitCode::Shutdown => ExitOutcome::Stop(SvmStop::TripleFault),
            ExitCode::Invalid => ExitOutcome::Stop(SvmStop::InvalidGuestState),
            _ => ExitOutcome::Stop(SvmStop::Unexpected(vmcb.exit_code())),
        };
        (code, outcome)
    }

    /// MOV CR8, r64 — intercepted only to keep QEMU 7.2 alive: its MOV CR8 under
    /// `V_INTR_MASKING` raises the virtual-interrupt request from the vCPU thread without
    /// the lock its interrupt path asserts, so a CR8 write while a V_IRQ is posted aborts
    /// QEMU (`tcg_handle_interrupt: assertion failed`). The write goes to V_TPR as the CPU's
    /// would (APM vol. 2 §15.21.4); bits 63:4 set are #GP(0) (SDM vol. 3 §10.8.6.1).
    fn mov_to_cr8<M: SvmMachine + ?Sized>(
        &mut self,
        vmcb: &mut Vmcb<'_>,
        machine: &mut M,
    ) -> ExitOutcome {
        let rip = vmcb.get(SavedRegister::Rip);
        let mut bytes = [0u8; 15];
        // The instruction's bytes, a page at a time (one walk each): the rest of RIP's page,
        // then the next page only if the instruction may run into it.
        let mut fetched = 0;
        let mut fault = None;
        while fetched < bytes.len() {
            let at = rip.wrapping_add(fetched as u64);
            let in_page = (4096 - (at & 0xFFF) as usize).min(bytes.len() - fetched);
            match read_code(vmcb, machine, at, &mut bytes[fetched..fetched + in_page]) {
                Ok(()) => fetched += in_page,
                Err(f) => {
                    fault = Some(f);
                    break;
                }
            }
        }
        let mut decoder = Decoder::with_ip(64, &bytes[..fetched], rip, DecoderOptions::NONE);
        let ins = decoder.decode();
        if ins.is_invalid() || ins.code() != Code::Mov_cr_r64 || ins.op0_register() != Register::CR8
        {
            return match fault {
                Some(Fail::Fault(event)) => {
                    inject(vmcb, event);
                    ExitOutcome::Resume
                }
                Some(Fail::Stop(stop)) => ExitOutcome::Stop(stop),
                None => ExitOutcome::Stop(SvmStop::Unexpected(vmcb.exit_code())),
            };
        }
        let value = self.gpr(vmcb, ins.op1_register());
        if value >> 4 != 0 {
            inject(vmcb, EventInjection::exception(13, Some(0)));
            return ExitOutcome::Resume;
        }
        let ctl = (vmcb.int_ctl() & !int_ctl::V_TPR_MASK) | value as u32;
        vmcb.set_int_ctl(ctl);
        skip(vmcb, ins.len() as u64)
    }

    /// A 64-bit general register of the guest, wherever it lives (RAX and RSP in the VMCB).
    fn gpr(&self, vmcb: &Vmcb<'_>, register: Register) -> u64 {
        let r = &self.regs;
        match register.full_register() {
            Register::RAX => vmcb.get(SavedRegister::Rax),
            Register::RSP => vmcb.get(SavedRegister::Rsp),
            Register::RBX => r.rbx,
            Register::RCX => r.rcx,
            Register::RDX => r.rdx,
            Register::RSI => r.rsi,
            Register::RDI => r.rdi,
            Register::RBP => r.rbp,
            Register::R8 => r.r8,
            Register::R9 => r.r9,
            Register::R10 => r.r10,
            Register::R11 => r.r11,
            Register::R12 => r.r12,
            Register::R13 => r.r13,
            Register::R14 => r.r14,
            _ => r.r15,
        }
    }

    /// RDMSR (`EXITINFO1` = 0) or WRMSR (1) of an MSR the guest does not own: against the same
    /// model as under trap-and-emulate; #GP where it refuses.
    fn msr(&mut self, vmcb: &mut Vmcb<'_>) -> ExitOutcome {
        let msr = self.regs.rcx as u32;
        self.msrs.efer = vmcb.get(SavedRegister::Efer) & !EFER_SVME;
        self.msrs.cr0 = vmcb.get(SavedRegister::Cr0);
        let result = if vmcb.exit_info_1() == 0 {
            read_msr(&mut self.msrs, msr).map(|value| {
                vmcb.set(SavedRegister::Rax, value & 0xFFFF_FFFF);
                self.regs.rdx = value >> 32;
            })
        } else {
            let value = self.regs.rdx << 32 | (vmcb.get(SavedRegister::Rax) & 0xFFFF_FFFF);
            write_msr(&mut self.msrs, msr, value).map(|()| {
                vmcb.set(SavedRegister::Efer, self.msrs.efer | EFER_SVME);
                if msr == index::PAT {
                    vmcb.set(SavedRegister::GPat, value);
                }
            })
        };
        self.msrs.take_effects();
        match result {
            Ok(()) => skip(vmcb, 2),
            Err(event) => {
                inject(
                    vmcb,
                    EventInjection::exception(event.vector, event.error_code),
                );
                ExitOutcome::Resume
            }
        }
    }

    /// IN, OUT, INS, OUTS: every port is a virtual device's (or none's).
    fn io<P, M>(&mut self, vmcb: &mut Vmcb<'_>, ports: &mut P, machine: &mut M) -> ExitOutcome
    where
        P: PortIo + ?Sized,
        M: SvmMachine + ?Sized,
    {
        let Some(io) = IoExit::decode(vmcb.exit_info_1()) else {
            return ExitOutcome::Stop(SvmStop::Unexpected(vmcb.exit_code()));
        };
        let next_rip = vmcb.exit_info_2();
        if !io.string {
            let rax = vmcb.get(SavedRegister::Rax);
            if io.is_in {
                let value = u64::from(ports.port_read(io.port, io.size));
                vmcb.set(SavedRegister::Rax, merge_register(rax, value, io.size));
            } else {
                ports.port_write(io.port, io.size, rax as u32);
            }
            vmcb.set(SavedRegister::Rip, next_rip);
            return ExitOutcome::Resume;
        }
        self.string_io(vmcb, ports, machine, io, next_rip)
    }

    /// INS/OUTS, with or without REP: element by element through the guest's own page tables,
    /// a #PF delivered to the guest where one faults (registers as the CPU leaves them).
    fn string_io<P, M>(
        &mut self,
        vmcb: &mut Vmcb<'_>,
        ports: &mut P,
        machine: &mut M,
        io: IoExit,
        next_rip: u64,
    ) -> ExitOutcome
    where
        P: PortIo + ?Sized,
        M: SvmMachine + ?Sized,
    {
        let mask = match io.address_size {
            2 => 0xFFFF,
            4 => 0xFFFF_FFFF,
            _ => u64::MAX,
        };
        let step = if vmcb.get(SavedRegister::Rflags) & rflags::DF != 0 {
            (io.size as u64).wrapping_neg()
        } else {
            io.size as u64
        };
        let mut left = if io.rep { self.regs.rcx & mask } else { 1 };
        let mut done = 0;
        while left > 0 {
            if done == MAX_STRING_ITERATIONS_PER_EXIT {
                // Not finished: RIP stays on the instruction, which goes on after VMRUN.
                return ExitOutcome::Resume;
            }
            let pointer = if io.is_in {
                self.regs.rdi
            } else {
                self.regs.rsi
            } & mask;
            let mut bytes = [0u8; 4];
            let element = &mut bytes[..usize::from(io.size)];
            let moved = if io.is_in {
                let value = ports.port_read(io.port, io.size);
                element.copy_from_slice(&value.to_le_bytes()[..usize::from(io.size)]);
                write_linear(vmcb, machine, pointer, element)
            } else {
                read_linear(vmcb, machine, pointer, element).map(|()| {
                    let mut value = [0u8; 4];
                    value[..element.len()].copy_from_slice(element);
                    ports.port_write(io.port, io.size, u32::from_le_bytes(value));
                })
            };
            match moved {
                Ok(()) => {}
                Err(Fail::Fault(event)) => {
                    inject(vmcb, event);
                    return ExitOutcome::Resume;
                }
                Err(Fail::Stop(stop)) => return ExitOutcome::Stop(stop),
            }
            let register = if io.is_in {
                &mut self.regs.rdi
            } else {
                &mut self.regs.rsi
            };
            *register = (*register & !mask) | (pointer.wrapping_add(step) & mask);
            left -= 1;
            done += 1;
            if io.rep {
                self.regs.rcx = (self.regs.rcx & !mask) | left;
            }
        }
        vmcb.set(SavedRegister::Rip, next_rip);
        ExitOutcome::Resume
    }

    /// Before VMRUN: the virtual PIC's interrupt goes in now if the guest can take it, or the
    /// interrupt window is opened for it. Returns the vector injected, if any.
    pub fn prepare_entry(&mut self, vmcb: &mut Vmcb<'_>, pic: &mut PicPair) -> Option<u8> {
        clear_cs_d_in_64_bit_code(vmcb);
        let already = vmcb.event_injection() & 1 << 31 != 0;
        let guest_if = vmcb.get(SavedRegister::Rflags) & rflags::IF != 0;
        match interrupt_window(
            pic.has_pending_interrupt(),
            guest_if,
            vmcb.interrupt_shadow(),
            already,
        ) {
            InterruptWindow::InjectNow => {
                let vector = pic.acknowledge()?;
                inject(vmcb, EventInjection::external_interrupt(vector));
                close_window(vmcb);
                Some(vector)
            }
            InterruptWindow::OpenWindow => {
                let ctl =
                    vmcb.int_ctl() | int_ctl::V_IRQ | int_ctl::V_INTR_PRIO_MAX | int_ctl::V_IGN_TPR;
                vmcb.set_int_ctl(ctl);
                vmcb.set_intercept(Intercept::Vintr);
                None
            }
            InterruptWindow::Nothing => {
                close_window(vmcb);
                None
            }
        }
    }
}

/// CS.D is ignored in 64-bit code (CS.L = 1; SDM vol. 3 §5.2.1), but VMRUN refuses a guest
/// state with both set (APM vol. 2 §15.5.1, "CS.L and CS.D both set" in long mode). QEMU's
/// SYSEXIT to 64-bit code loads CS with both, so a guest that just returned to user mode with
/// SYSEXITQ would be refused at its next VMRUN: the D bit goes, which the guest cannot see (its
/// descriptor in memory is unchanged; only the hidden part of CS is).
fn clear_cs_d_in_64_bit_code(vmcb: &mut Vmcb<'_>) {
    const L: u16 = 1 << 9;
    const D: u16 = 1 << 10;
    let mut cs = vmcb.segment(SegmentRegister::Cs);
    let long_mode = vmcb.get(SavedRegister::Efer) & efer::LMA != 0;
    if long_mode && cs.attributes & (L | D) == L | D {
        cs.attributes &= !D;
        vmcb.set_segment(SegmentRegister::Cs, cs);
    }
}

fn close_window(vmcb: &mut Vmcb<'_>) {
    vmcb.set_int_ctl(vmcb.int_ctl() & !int_ctl::V_IRQ);
    vmcb.clear_intercept(Intercept::Vintr);
}

/// Injects `event` at the next VMRUN; a #PF also sets CR2 (APM: the host must, EVENTINJ does
/// not).
fn inject(vmcb: &mut Vmcb<'_>, event: EventInjection) {
    vmcb.set_event_injection(event.encode());
}

/// Moves RIP past an instruction of `length` bytes (this CPU model has no next-RIP save).
fn skip(vmcb: &mut Vmcb<'_>, length: u64) -> ExitOutcome {
    let rip = vmcb.get(SavedRegister::Rip).wrapping_add(length);
    vmcb.set(SavedRegister::Rip, rip);
    vmcb.set_interrupt_shadow(false);
    ExitOutcome::Resume
}

/// RAX after an IN of `size` bytes: AL and AX keep the rest, EAX zero-extends (SDM vol. 1
/// §3.4.1.1).
fn merge_register(rax: u64, value: u64, size: u8) -> u64 {
    match size {
        1 => (rax & !0xFF) | (value & 0xFF),
        2 => (rax & !0xFFFF) | (value & 0xFFFF),
        _ => value & 0xFFFF_FFFF,
    }
}

/// Why a guest-linear access failed.
enum Fail {
    /// The guest's own fault, to deliver.
    Fault(EventInjection),
    /// The guest cannot go on.
    Stop(SvmStop),
}

/// The paging rules of the guest as the VMCB holds them.
fn paging_mode(vmcb: &Vmcb<'_>) -> PagingMode {
    PagingMode {
        cr0_wp: vmcb.get(SavedRegister::Cr0) & cr0::WP != 0,
        efer_nxe: vmcb.get(SavedRegister::Efer) & efer::NXE != 0,
        cr4_pge: vmcb.get(SavedRegister::Cr4) & cr4::PGE != 0,
        ..PagingMode::ENTRY
    }
}

/// The guest-physical address of one byte of a guest-linear access, by a walk of the guest's
/// own tables (which sets their A/D bits, as the CPU's access would).
fn translate<M: SvmMachine + ?Sized>(
    vmcb: &mut Vmcb<'_>,
    machine: &mut M,
    linear: u64,
    kind: AccessKind,
) -> Result<u64, Fail> {
    if vmcb.get(SavedRegister::Cr0) & cr0::PG == 0 {
        return Ok(linear);
    }
    let privilege = if vmcb.cpl() == 3 {
        Privilege::User
    } else {
        Privilege::Supervisor
    };
    let gp = Fail::Fault(EventInjection::exception(13, Some(0)));
    let gva = GuestVirtAddr::new(linear).ok_or(gp)?;
    let cr3 = vmcb.get(SavedRegister::Cr3);
    let mode = paging_mode(vmcb);
    match walk(
        machine.guest_ram(),
        cr3,
        gva,
        Access::new(kind, privilege),
        mode,
    ) {
        Ok(t) => Ok(t.gpa.as_u64()),
        Err(WalkError::PageFault(fault)) => {
            vmcb.set(SavedRegister::Cr2, fault.cr2.as_u64());
            Err(Fail::Fault(EventInjection::exception(
                14,
                Some(fault.error_code.bits()),
            )))
        }
        Err(WalkError::Memory(MemoryError::OutsideRam(gpa))) => {
            Err(Fail::Stop(SvmStop::GpaOutsideRam(gpa.as_u64())))
        }
        Err(WalkError::Memory(MemoryError::OutOfHostFrames)) => {
            Err(Fail::Stop(SvmStop::HostMemoryExhausted))
        }
    }
}

fn read_linear<M: SvmMachine + ?Sized>(
    vmcb: &mut Vmcb<'_>,
    machine: &mut M,
    linear: u64,
    out: &mut [u8],
) -> Result<(), Fail> {
    for (i, byte) in out.iter_mut().enumerate() {
        let gpa = translate(
            vmcb,
            machine,
            linear.wrapping_add(i as u64),
            AccessKind::Read,
        )?;
        let mut one = [0u8];
        machine.read_guest_phys(gpa, &mut one).map_err(Fail::Stop)?;
        *byte = one[0];
    }
    Ok(())
}

/// Instruction bytes at guest-linear `linear`, all on its page, fetched as the CPU would (with
/// its execute rights).
fn read_code<M: SvmMachine + ?Sized>(
    vmcb: &mut Vmcb<'_>,
    machine: &mut M,
    linear: u64,
    out: &mut [u8],
) -> Result<(), Fail> {
    let gpa = translate(vmcb, machine, linear, AccessKind::Fetch)?;
    machine.read_guest_phys(gpa, out).map_err(Fail::Stop)
}

fn write_linear<M: SvmMachine + ?Sized>(
    vmcb: &mut Vmcb<'_>,
    machine: &mut M,
    linear: u64,
    data: &[u8],
) -> Result<(), Fail> {
    for (i, byte) in data.iter().enumerate() {
        let gpa = translate(
            vmcb,
            machine,
            linear.wrapping_add(i as u64),
            AccessKind::Write,
        )?;
        machine
            .write_guest_phys(gpa, &[*byte])
            .map_err(Fail::Stop)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
