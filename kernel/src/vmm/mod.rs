//! The VMM proper: loads the guest, enters it at Ring 3 on its shadow page tables, and handles
//! every trap it causes.
//!
//! Everything architectural is delegated: `vmm_core::loader` validates the ELF and builds the
//! entry state; `vmm_core::cpu` is the virtual CPU (emulation, delivery, injection);
//! `shadow_mmu::ShadowMmu` owns guest-physical memory (P2M) and the shadow page tables and
//! decides every guest page fault. This module is the one dispatcher (`handle_guest_trap`, whose
//! `route` is a single `match` on the trap); its helpers, in the order a trap meets them:
//! `registers.rs` (frame into the vCPU and back), `fast_path.rs` (the fast lane for the hottest
//! #GPs, and what coalescing needs fetched), `page_fault.rs`, `exit.rs` (effects,
//! injection, shadow descriptor table), `instrument.rs` (phase clock, trace, bench
//! attribution). The machine as the libraries see it is `host.rs`; `cli_sti_stub.rs` is the
//! CLI/STI stub's state, `data_segments.rs` the guest's DS/ES/FS/GS, `load.rs` the loading,
//! `watchdog.rs` stops hung guests, `report.rs` prints what happened, `console.rs` turns the
//! guest's UART into lines.

pub mod cli_sti_stub;
pub mod console;
mod data_segments;
mod exit;
mod fast_path;
pub mod host;
mod instrument;
mod load;
mod page_fault;
mod registers;
mod report;
mod svm;
mod watchdog;

use fast_path::Lane;
use instrument::{PhaseClock, TrapName};
use report::{report, stop_guest, stop_without_vm};
pub use svm::run as run_svm;
use watchdog::Watchdog;

use crate::gdt;
use crate::multiboot::Module;
use crate::trap::{self, vector, TrapFrame};
use console::GuestConsole;
use data_segments::DataSegments;
use host::{DirectMap, HostClock, HostFrames, RealCpu};
use shadow_mmu::shadow::{ShadowMmu, StopReason, View};
use spin::Mutex;
use vmm_core::accounting::{Accounting, KindRow, Phase, SyscallKind, TrapKind};
use vmm_core::config::HostConfig;
use vmm_core::cpu::shadow_gdt::ShadowGdt;
use vmm_core::cpu::state::rflags;
use vmm_core::cpu::{syscall, Cause, CpuStop, Event, EventKind, Outcome, TableRegister, VCpu};
use vmm_core::devices::bus::PortBus;
use vmm_core::trace::Tracer;

/// The guest's shadow MMU on this machine's memory.
pub type Mmu = ShadowMmu<DirectMap, HostFrames>;

/// Everything the VMM keeps about the one guest it runs.
struct Vm {
    /// The guest's virtual CPU.
    cpu: VCpu,
    mmu: Mmu,
    /// What the real GDT holds for the guest (its shadow descriptor table).
    gdt: ShadowGdt,
    /// What the real DS/ES/FS/GS held when the guest was last entered.
    data_segments: DataSegments,
    /// Which shadow view is loaded: the kernel view while the guest is at virtual CPL 0.
    view: View,
    /// The guest's port bus: virtual PIC pair, PIT, COM1 (into the console), debug exit.
    bus: GuestBus,
    /// Counts and costs of every trap, printed when the guest ends.
    accounting: Accounting,
    /// The trap-table row of each fast-lane instruction, by `LaneInstruction::index`.
    lane_rows: [KindRow; vmm_core::cpu::emulate::LaneInstruction::ALL.len()],
    /// Which traps get a `--trace` line, and how many are left (host options `trace=`,
    /// `trace_kinds=`, `trace_skip=`, `trace_from=`).
    tracer: Tracer,
    /// The no-progress watchdog: stops a guest that stays within a few bytes of code with
    /// unchanged registers, or with its interrupts off and nothing else happening, for
    /// `watchdog=` host ticks (`watchdog.rs`).
    watchdog: Watchdog,
    /// The current trap, for the trace line.
    last_trap: TrapName,
    /// The instruction being emulated, disassembled while `--trace` may print it.
    trace_text: Option<alloc::string::String>,
    /// The real TF is set to end an interrupt shadow (see `inject_and_apply`).
    single_step: bool,
    /// The current trap came while `single_step` was set.
    stepped: bool,
    /// The virtual interrupt injected on the way out of the current trap (for the trace).
    injected: Option<u8>,
    /// The store (guest RIP, page-table GPA) whose #PF last made the VMM unshadow everything:
    /// the same store faulting again right after is emulated instead (see `page_fault.rs`).
    unshadowed_for: Option<(u64, u64)>,
    /// What the real CPU holds for the guest (`VCpu::real_controls`); `None` before the first
    /// entry.
    real_controls: Option<vmm_core::cpu::state::RealControls>,
    /// Where the benchmark harness stands in the guest's console output (`note_guest_lines`).
    bench: instrument::BenchAttribution,
    /// The trap fast paths are on (host option `fastpath=`, `fast_path.rs`).
    fastpath: bool,
    /// QEMU runs with `-icount` (host option `icount=on`): the TSC counts instructions, and
    /// the report says so.
    icount: bool,
    /// The first 8 bytes at the trapping RIP, when the fast lane read them and left the trap to
    /// the dispatcher (`emulate` then does not fetch them again); reset at every trap.
    prefetched: Option<[u8; 8]>,
    /// The last trap and its clock, booked when the next one begins (`book_last_trap`).
    unbooked: Option<instrument::Unbooked>,
    /// The phases of the unbooked trap, with `profile=phases`.
    split_pending: instrument::SplitPending,
}

/// The guest's port bus: virtual PIC pair, PIT, COM1 (into the console), debug exit; the same
/// under both backends.
type GuestBus = PortBus<GuestConsole, HostClock>;

/// The VM, reached from the trap dispatcher. Only ever locked with interrupts disabled (in trap
/// context, or before the guest is first entered), so the lock is never contended.
static VM: Mutex<Option<Vm>> = Mutex::new(None);

/// Loads the guest and enters it at Ring 3, on the kernel view of its shadow page tables, with
/// real IF = 1 and IOPL = 0. Never returns: from here on the host runs only in trap context.
pub fn run(config: &HostConfig<'_>, module: &Module) -> ! {
    let (mmu, entry) = load::load(config, module);
    let root = mmu.current_root(View::Kernel);
    let policy = mmu.policy();
    let cpu = VCpu::at_entry(
        entry.rip,
        entry.rsp,
        entry.rdi,
        entry.cr3,
        TableRegister {
            base: entry.gdtr_base,
            limit: entry.gdtr_limit,
        },
    );
    let mut cpu = cpu;
    cpu.fast_paths = config.fastpath;
    crate::cpu::enable_fast_syscall_entries();
    if crate::cpu::enable_cpuid_faulting() {
        log::info!("cpu: CPUID faulting on: the guest's CPUID traps and is emulated");
    } else {
        log::info!(
            "cpu: no CPUID faulting: the guest sees the host's CPUID (a virtualization hole)"
        );
    }
    vmm_core::cpu::emulate::warm_up_decoder();
    instrument::split_by_phase(config.profile_phases);
    let mut vm = Vm {
        cpu,
        mmu,
        gdt: ShadowGdt::new(),
        data_segments: DataSegments::new(),
        view: View::Kernel,
        bus: PortBus::new(GuestConsole::watching_for(config.trace.from), HostClock),
        accounting: Accounting::new(),
        tracer: Tracer::new(&config.trace),
        watchdog: Watchdog::new(config.watchdog_ticks),
        last_trap: TrapName::Instruction("entry"),
        trace_text: None,
        single_step: false,
        stepped: false,
        injected: None,
        unshadowed_for: None,
        real_controls: None,
        bench: instrument::BenchAttribution::default(),
        lane_rows: vmm_core::cpu::emulate::LaneInstruction::ALL
            .map(|lane| KindRow::new(TrapKind::Instruction(lane.name()))),
        fastpath: config.fastpath,
        icount: config.icount,
        prefetched: None,
        unbooked: None,
        split_pending: instrument::SplitPending::default(),
    };
    // The first entry is a made-up return from a trap, built like every other return.
    let mut frame = TrapFrame::default();
    match vm.apply_effects().and_then(|()| vm.sync_descriptor_table()) {
        Ok(selectors) => registers::vcpu_to_frame(&vm.cpu, &mut frame, selectors, false),
        Err(why) => stop_guest(&frame, why, vm),
    }
    *VM.lock() = Some(vm);
    log::info!(
        "guest: entering at Ring 3 (rip={:#x} rsp={:#x} rdi={:#x}), shadow policy {policy:?}",
        entry.rip,
        entry.rsp,
        entry.rdi
    );
    // SAFETY: the shadow root maps the VMM's slot 511 exactly as the host root does (shadow-mmu
    // copies that entry), so the host keeps running after the switch.
    unsafe { x86::controlregs::cr3_write(root.as_u64()) };
    // SAFETY: the frame is a valid Ring-3 frame on the guest's shadow descriptors
    // (`sync_descriptor_table` made them present), and the CR3 just loaded maps both the host
    // and the guest's code and stack.
    unsafe { trap::enter_ring3(&frame) }
}

/// Handles a trap taken while the guest ran (or a SYSCALL/SYSENTER from it): the one
/// dispatcher of docs/ARCHITECTURE.md, "The life of a trap". In order: the registers into the
/// vCPU (`registers.rs`), one `route`, the way back (`exit.rs`), one line of instrumentation
/// (`instrument.rs`), and the end of the run if the guest exited or must stop.
pub fn handle_guest_trap(frame: &mut TrapFrame) {
    let mut clock = PhaseClock::start(frame.vector, frame.error_code);
    let mut guard = VM.lock();
    let Some(vm) = guard.as_mut() else {
        drop(guard);
        stop_without_vm(frame)
    };
    vm.book_trap_before();
    if frame.interrupted_vm86() {
        let vm = guard.take();
        drop(guard);
        if let Some(vm) = vm {
            stop_guest(frame, StopWhy::Vm86, vm)
        }
        stop_without_vm(frame)
    }
    let trap_rip = frame.rip;
    let sysenter_stepping = vm.enter(frame);
    clock.mark(Phase::EntryStub);
    // Only a #GP(0) can be the fast lane's (checked here so other traps skip the call).
    let lane = if frame.vector == vector::GENERAL_PROTECTION && frame.error_code == 0 {
        vm.fast_lane(frame)
    } else {
        vm.prefetched = None;
        None
    };
    let (action, kind) = match lane {
        Some(Lane::Done(lane)) => {
            vm.watchdog.trap(trap_rip);
            vm.account_fast_lane(lane, clock);
            return;
        }
        Some(Lane::Rest(action, kind)) => (action, kind),
        None => {
            vm.last_trap = TrapName::Vector(frame.vector, frame.error_code);
            vm.route(frame, sysenter_stepping, &mut clock)
        }
    };
    clock.mark(Phase::Emulate);
    if !matches!(kind, TrapKind::Irq(_)) {
        vm.watchdog.trap(trap_rip);
    }
    let action = vm.leave(frame, action, &mut clock);
    clock.mark(Phase::Exit);
    vm.account(kind, trap_rip, &action, clock);
    match action {
        Action::Resume(_) => {}
        Action::Exit(code) => {
            report(vm);
            crate::exit::exit(guest_exit_code(code))
        }
        Action::Stop(why) => {
            let vm = guard.take();
            drop(guard);
            if let Some(vm) = vm {
                stop_guest(frame, why, vm)
            }
            stop_without_vm(frame)
        }
    }
}

/// The exit code the run ends with when the guest wrote `code` to the isa-debug-exit port: its
/// own, except the codes that mean the host (a host panic, a stop by the VMM, a configuration
/// error), which a guest must not be able to fake: those become a guest failure, said so.
fn guest_exit_code(code: u32) -> u32 {
    use boot::exit_code::{CONFIG_ERROR, FAILURE, GUEST_STOPPED, HOST_PANIC};
    if matches!(code, HOST_PANIC | GUEST_STOPPED | CONFIG_ERROR) {
        crate::serial::write_line(format_args!(
            "[vmm] the guest wrote exit code {code:#x}, one of the host's own: reported as a guest failure ({FAILURE:#x})"
        ));
        FAILURE
    } else {
        code
    }
}

/// The error code the CPU pushed (0 for vectors without one).
fn code(frame: &TrapFrame) -> u32 {
    frame.error_code as u32
}

/// What the VMM did with one trap.
enum Action {
    /// The guest continues (the reason is for the trace).
    Resume(&'static str),
    /// The guest wrote its exit code to the isa-debug-exit port.
    Exit(u32),
    /// The guest cannot continue.
    Stop(StopWhy),
}

/// Why the VMM stopped the guest.
enum StopWhy {
    /// shadow-mmu refused (VMM range, GPA outside RAM, no memory).
    Mmu(StopReason),
    /// The virtual CPU cannot go on (triple fault, halted forever, not emulated).
    Cpu(CpuStop),
    /// A trap the VMM has no handler for (NMI or #MC from the guest).
    Unexpected,
    /// The watchdog found the guest at the same RIP for this many host ticks, no other trap.
    NoProgress(u64),
    /// HLT with interrupts on, and no virtual interrupt for this many host ticks.
    IdleTooLong(u64),
    /// The guest put the real CPU in virtual-8086 mode (see `TrapFrame::interrupted_vm86`).
    Vm86,
}

impl core::fmt::Display for Action {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Action::Resume(what) => write!(f, "{what}"),
            Action::Exit(code) => write!(f, "guest exit {code:#x}"),
            Action::Stop(_) => write!(f, "stop"),
        }
    }
}

impl Vm {
    fn route(
        &mut self,
        frame: &TrapFrame,
        sysenter_stepping: bool,
        clock: &mut PhaseClock,
    ) -> (Action, TrapKind) {
        match frame.vector {
            vector::PAGE_FAULT => self.page_fault(frame, clock),
            v if (vector::IRQ_BASE..vector::IRQ_BASE + 16).contains(&v) => {
                self.host_irq((v - vector::IRQ_BASE) as u8, frame.rip)
            }
            // #NP and #SS(selector) are how a segment load the shadow descriptor table keeps
            // absent comes here (IRETQ/RETF to another CS, MOV SS, MOV DS, ...): it is redone
            // against the guest's own table; any other instruction's fault is the guest's own
            // and is reflected unchanged.
            vector::GENERAL_PROTECTION => self.emulate(Cause::Fault(Event::gp(code(frame))), clock),
            vector::SEGMENT_NOT_PRESENT => {
                self.emulate(Cause::Fault(Event::np(code(frame))), clock)
            }
            vector::STACK_FAULT => self.emulate(Cause::Fault(Event::ss(code(frame))), clock),
            vector::INVALID_OPCODE => self.emulate(Cause::Fault(Event::ud()), clock),
            vector::SYSCALL => self.forward_syscall(),
            vector::SYSENTER => self.forward_sysenter(sysenter_stepping),
            vector::DEBUG if self.stepped => {
                // Our own single step: the instruction in the interrupt shadow has retired.
                self.cpu.interrupt_shadow = None;
                (
                    Action::Resume("interrupt window"),
                    TrapKind::Other("interrupt window"),
                )
            }
            v if v < 32
                && !matches!(
                    v,
                    vector::NMI | vector::DOUBLE_FAULT | vector::MACHINE_CHECK
                ) =>
            {
                self.reflect(v as u8, code(frame))
            }
            v => (
                Action::Stop(StopWhy::Unexpected),
                TrapKind::Exception(v as u8),
            ),
        }
    }

    /// A host interrupt while the guest ran: the host's own handling, then the virtual devices
    /// catch up (a timer tick may make a guest IRQ due) and the watchdog looks at the guest.
    fn host_irq(&mut self, irq: u8, rip: u64) -> (Action, TrapKind) {
        crate::timer::handle_irq(irq);
        self.poll_devices();
        let registers = self.cpu.gpr.iter().fold(0u64, |h, r| h.rotate_left(7) ^ r);
        let interrupts_off = !self.cpu.interrupts_enabled();
        let action = if irq == 0 && self.watchdog.tick(rip, registers, interrupts_off) {
            Action::Stop(StopWhy::NoProgress(self.watchdog.stalled_ticks()))
        } else {
            Action::Resume("host IRQ")
        };
        (action, TrapKind::Irq(irq))
    }

    /// The guest's own exception (#DE, #DB, #NM, #SS, #AC, ...): delivered as it is.
    fn reflect(&mut self, vector: u8, error_code: u32) -> (Action, TrapKind) {
        if vector == vmm_core::cpu::event::vector::DB {
            // What the CPU recorded (BS for a single step) goes into the virtual DR6.
            self.cpu.dr6 |= crate::cpu::take_debug_status() & vmm_core::cpu::state::dr::DR6_STATUS;
        }
        let event = if Event::vector_has_error_code(vector) {
            Event::exception_with_code(vector, error_code)
        } else {
            Event::exception(vector)
        };
        (
            self.deliver(event, "reflected"),
            TrapKind::Exception(vector),
        )
    }

    /// Delivers `event` through the guest's IDT; `resumed` says why the guest goes on (trace).
    fn deliver(&mut self, event: Event, resumed: &'static str) -> Action {
        let mut mem = host::GuestAccess::new(&mut self.mmu, self.view);
        match vmm_core::cpu::deliver(&mut self.cpu, &mut mem, event) {
            Ok(_) => Action::Resume(resumed),
            Err(stop) => Action::Stop(StopWhy::Cpu(stop)),
        }
    }

    /// Emulates the instruction at the guest's RIP.
    fn emulate(&mut self, cause: Cause, clock: &mut PhaseClock) -> (Action, TrapKind) {
        if self.tracer.printing() {
            let mut mem = host::GuestAccess::new(&mut self.mmu, self.view);
            self.trace_text = vmm_core::cpu::emulate::fetch(&self.cpu, &mut mem)
                .map(|ins| vmm_core::cpu::emulate::disassemble(&ins))
                .ok();
        }
        let mut mem = host::GuestAccess::new(&mut self.mmu, self.view);
        let mut mark = |phase| clock.mark(phase);
        let code = self.prefetched.take();
        let page_table_write = cause == Cause::PageTableWrite;
        let result = vmm_core::cpu::emulate::handle_instruction_from(
            &mut self.cpu,
            &mut mem,
            &mut self.bus,
            &RealCpu,
            cause,
            &mut mark,
            code.as_ref(),
        );
        match result {
            Ok(handled) => {
                let name = match self.trace_text.take() {
                    // A coalesced pair ran more than the instruction disassembled: say so.
                    Some(text) if handled.name.contains('+') => TrapName::Disassembled(
                        alloc::format!("{text} (coalesced: {})", handled.name),
                    ),
                    Some(text) => TrapName::Disassembled(text),
                    None => TrapName::Instruction(handled.name),
                };
                // A page-table write is still the #PF it came as, with the store it emulated.
                match &mut self.last_trap {
                    TrapName::PageFault { store, .. } if page_table_write => {
                        *store = Some(alloc::boxed::Box::new(name))
                    }
                    _ => self.last_trap = name,
                }
                match handled.outcome {
                    // The guest's own fault (a user program's CLI, a bad pointer): counted as the
                    // exception it is, not as an emulated instruction.
                    Outcome::Reflected(e) => {
                        (Action::Resume("reflected"), TrapKind::Exception(e.vector))
                    }
                    outcome => {
                        let action = match outcome {
                            Outcome::Halted => Action::Resume("halted"),
                            Outcome::Delivered(e)
                                if matches!(
                                    e.kind,
                                    EventKind::SoftwareInterrupt | EventKind::SoftwareException
                                ) =>
                            {
                                Action::Resume("delivered through the guest IDT")
                            }
                            Outcome::Delivered(_) => Action::Resume("fault injected"),
                            _ => Action::Resume("emulated"),
                        };
                        (action, TrapKind::Instruction(handled.name))
                    }
                }
            }
            Err(stop) => (Action::Stop(StopWhy::Cpu(stop)), TrapKind::Other("stop")),
        }
    }
    /// A SYSCALL from the guest, forwarded through its virtual MSRs.
    fn forward_syscall(&mut self) -> (Action, TrapKind) {
        let result = syscall::syscall(&mut self.cpu);
        // The TF SYSCALL leaves decides, after IA32_FMASK (XSA-204; vmm_core's
        // `Flow::JumpedWithNewFlags` says why).
        let stepping = self.cpu.rflags & rflags::TF != 0;
        if result.is_ok() && !stepping {
            self.coalesce_swapgs_at_handler();
        }
        (
            self.after_forward(result, stepping),
            TrapKind::SystemCall(SyscallKind::Syscall),
        )
    }

    /// A SYSENTER from the guest, forwarded through its virtual MSRs (SYSENTER keeps TF).
    fn forward_sysenter(&mut self, stepping: bool) -> (Action, TrapKind) {
        if stepping {
            self.cpu.rflags |= rflags::TF;
        }
        let result = syscall::sysenter(&mut self.cpu);
        if result.is_ok() && !stepping {
            self.coalesce_swapgs_at_handler();
        }
        (
            self.after_forward(result, stepping),
            TrapKind::SystemCall(SyscallKind::Sysenter),
        )
    }

    /// After SYSCALL/SYSENTER forwarding: a fault it raised (#UD without EFER.SCE) is
    /// delivered like any other; when `stepping` (SYSENTER: TF set when it began, which it
    /// keeps; SYSCALL: TF left set by IA32_FMASK), the single-step trap follows, at the first
    /// instruction of the guest's handler (SDM Vol. 3 §17.3.1.4).
    fn after_forward(
        &mut self,
        result: Result<(), vmm_core::cpu::Fault>,
        stepping: bool,
    ) -> Action {
        match result {
            Ok(()) if stepping => {
                let mut mem = host::GuestAccess::new(&mut self.mmu, self.view);
                match vmm_core::cpu::emulate::single_step_trap(&mut self.cpu, &mut mem) {
                    Ok(_) => Action::Resume("forwarded, then single-step #DB"),
                    Err(stop) => Action::Stop(StopWhy::Cpu(stop)),
                }
            }
            Ok(()) => Action::Resume("forwarded"),
            Err(vmm_core::cpu::Fault::Raise(event)) => self.deliver(event, "fault injected"),
            Err(vmm_core::cpu::Fault::Stop(stop)) => Action::Stop(StopWhy::Cpu(stop)),
        }
    }
}
