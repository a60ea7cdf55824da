//! The VMM proper: loads the guest, enters it at Ring 3 on its shadow page tables, and handles
//! every trap it causes.
//!
//! Everything architectural is delegated: `vmm_core::loader` validates the ELF and builds the
//! entry state; `vmm_core::cpu` is the virtual CPU (emulation, delivery, injection);
//! `shadow_mmu::ShadowMmu` owns guest-physical memory (P2M) and the shadow page tables and
//! decides every guest page fault. This module wires them to the hardware (`host.rs`: memory
//! and frames; `fast.rs`: the CLI/STI fast path's state) and moves state between the real
//! [`TrapFrame`] and them (`handle_guest_trap`, the one dispatcher); `watchdog.rs` stops hung
//! guests, `report.rs` prints what happened, `console.rs` turns the guest's UART into lines.

pub mod console;
mod data_segments;
pub mod fast;
pub mod host;
mod report;
mod watchdog;

use report::{report, stop_guest, stop_without_vm};
use watchdog::Watchdog;

use crate::gdt;
use crate::memory::{paging, phys_to_virt};
use crate::multiboot::Module;
use crate::trap::{self, vector, TrapFrame};
use console::GuestConsole;
use data_segments::DataSegments;
use host::{DirectMap, HostFrames};
use shadow_mmu::shadow::{FaultOutcome, MmuConfig, Policy, ShadowMmu, StopReason, View};
use shadow_mmu::{GuestPhysAddr, GuestVirtAddr, PageFaultErrorCode, PagingMode};
use spin::Mutex;
use vmm_core::accounting::{Accounting, PageFaultOutcome, Phase, SyscallKind, TrapKind};
use vmm_core::config::{HostConfig, ShadowPolicy};
use vmm_core::cpu::shadow_gdt::{RealSelectors, ShadowGdt};
use vmm_core::cpu::state::rflags;
use vmm_core::cpu::{
    handle_instruction, inject, syscall, Cause, CpuStop, Event, EventKind, HostCpu, Injection,
    Outcome, TableRegister, VCpu,
};
use vmm_core::devices::bus::PortBus;
use vmm_core::io::Clock;
use vmm_core::loader::{self, EntryState, GuestPhysWrite, LoadError};

/// Shadow page-table pages the VMM may keep alive at once (roots included): 4 MiB.
const SHADOW_QUOTA: usize = 1024;

/// The guest's shadow MMU on this machine's memory.
pub type Mmu = ShadowMmu<DirectMap, HostFrames>;

/// Guest RAM as the loader writes it: through the shadow MMU's P2M, frames allocated on first
/// touch.
struct LoadTarget<'a> {
    mmu: &'a mut Mmu,
}

impl GuestPhysWrite for LoadTarget<'_> {
    fn write_phys(&mut self, gpa: u64, bytes: &[u8]) -> bool {
        self.mmu
            .write_guest_phys(GuestPhysAddr::new(gpa), bytes)
            .is_ok()
    }
}

/// The host timer as the virtual devices' clock.
#[derive(Debug, Clone, Copy)]
struct HostClock;

impl Clock for HostClock {
    fn now_ticks(&self) -> u64 {
        crate::timer::ticks()
    }

    fn ticks_per_second(&self) -> u64 {
        u64::from(crate::timer::tick_hz())
    }
}

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
    bus: PortBus<GuestConsole, HostClock>,
    /// Counts and costs of every trap, printed when the guest ends.
    accounting: Accounting,
    /// Traps still to print one line each for (host option `trace=N`).
    trace_left: u64,
    /// The no-progress watchdog: the guest RIP seen at the last host timer tick, and for how
    /// many consecutive ticks it has been the same with no other trap in between.
    watchdog: Watchdog,
    /// The current trap, for the trace line.
    last_trap: TrapName,
    /// The instruction being emulated, disassembled while `--trace` lines remain.
    trace_text: Option<alloc::string::String>,
    /// The real TF is set to end an interrupt shadow (see `inject_and_apply`).
    single_step: bool,
    /// The current trap came while `single_step` was set.
    stepped: bool,
    /// The virtual interrupt injected on the way out of the current trap (for the trace).
    injected: Option<u8>,
    /// Whether the real SYSENTER currently enters the VMM (see `apply_effects`).
    real_sysenter_on: bool,
    /// The RIP the guest was last resumed at: a trap elsewhere means an instruction retired
    /// natively since, which ends an RF = 1 that an IRET restored (SDM Vol. 3 §17.3.1.1).
    resumed_at: u64,
    /// Whether the real SYSCALL currently enters the VMM (real EFER.SCE, see `apply_effects`).
    real_syscall_on: bool,
    /// The guest's bits in the real CR0 and CR4 (`cpu::set_guest_controls`); `None` before
    /// the first entry.
    real_controls: Option<(u64, u64)>,
    /// Trap count and cost at the guest's last console line, and per benchmark op the traps
    /// and VMM cost since the line before its `bench,` line (see `note_guest_lines`).
    bench_mark: (u64, u64, u64),
    bench_traps: alloc::vec::Vec<(alloc::string::String, u64, u64)>,
}

/// The VM, reached from the trap dispatcher. Only ever locked with interrupts disabled (in trap
/// context, or before the guest is first entered), so the lock is never contended.
static VM: Mutex<Option<Vm>> = Mutex::new(None);

/// Validates the guest module, loads it with the guest command line, and builds its shadow MMU.
/// Any problem with the image is a configuration error naming it (exit 0x14).
fn load(config: &HostConfig<'_>, module: &Module) -> (Mmu, EntryState) {
    let len = (module.range.end.saturating_sub(module.range.start)) as usize;
    // SAFETY: the module's physical range was reserved from the frame allocator at boot, so
    // nothing else writes it, and the direct map covers all RAM.
    let image = unsafe { core::slice::from_raw_parts(phys_to_virt(module.range.start), len) };
    let ram_bytes = u64::from(config.guest_mem_mib) << 20;
    let fail = |why: LoadError| -> ! {
        crate::exit::config_error(format_args!("guest image '{}': {why}", module.name()))
    };
    let parsed = loader::parse_guest(image, ram_bytes).unwrap_or_else(|e| fail(e));
    let policy = match config.shadow {
        ShadowPolicy::Flush => Policy::Flush,
        ShadowPolicy::Cached => Policy::Cached,
    };
    let mmu_config = MmuConfig {
        ram_bytes,
        shadow_quota: SHADOW_QUOTA,
        policy,
        vmm_root: shadow_mmu::HostPhysAddr::new(paging::host_root()),
        mode: PagingMode::ENTRY,
        guest_cr3: 0,
    };
    let mut mmu = Mmu::new(DirectMap, HostFrames, mmu_config).unwrap_or_else(|e| {
        crate::exit::config_error(format_args!("cannot create the shadow MMU: {e:?}"))
    });
    let entry = loader::load_guest(
        &mut LoadTarget { mmu: &mut mmu },
        image,
        &parsed,
        ram_bytes,
        config.guest_cmdline,
    )
    .unwrap_or_else(|e| fail(e));
    if let Err(why) = mmu.load_cr3(entry.cr3) {
        crate::exit::config_error(format_args!("the guest's boot page tables: {why:?}"));
    }
    log::info!(
        "guest: '{}' loaded: {} PT_LOAD segment(s), entry {:#x}, {} MiB RAM, boot area {:#x}..{:#x}, command line '{}'",
        module.name(),
        parsed.segments.len(),
        entry.rip,
        config.guest_mem_mib,
        entry.boot_info.boot_area_start,
        entry.boot_info.boot_area_end,
        config.guest_cmdline
    );
    (mmu, entry)
}

/// Loads the guest and enters it at Ring 3, on the kernel view of its shadow page tables, with
/// real IF = 1 and IOPL = 0. Never returns: from here on the host runs only in trap context.
pub fn run(config: &HostConfig<'_>, module: &Module) -> ! {
    let (mmu, entry) = load(config, module);
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
    crate::cpu::enable_fast_syscall_entries();
    if crate::cpu::enable_cpuid_faulting() {
        log::info!("cpu: CPUID faulting on: the guest's CPUID traps and is emulated");
    } else {
        log::info!(
            "cpu: no CPUID faulting: the guest sees the host's CPUID (a virtualization hole)"
        );
    }
    vmm_core::cpu::emulate::warm_up_decoder();
    let mut vm = Vm {
        cpu,
        mmu,
        gdt: ShadowGdt::new(),
        data_segments: DataSegments::new(),
        view: View::Kernel,
        bus: PortBus::new(GuestConsole::new(), HostClock),
        accounting: Accounting::new(),
        trace_left: config.trace,
        watchdog: Watchdog::new(config.watchdog_ticks),
        last_trap: TrapName::Instruction("entry"),
        trace_text: None,
        single_step: false,
        stepped: false,
        injected: None,
        real_sysenter_on: false,
        real_syscall_on: false,
        resumed_at: 0,
        real_controls: None,
        bench_mark: (0, 0, 0),
        bench_traps: alloc::vec::Vec::new(),
    };
    // The first entry is a made-up return from a trap, built like every other return.
    let mut frame = TrapFrame::default();
    match vm.apply_effects().and_then(|()| vm.sync_descriptor_table()) {
        Ok(selectors) => vcpu_to_frame(&vm.cpu, &mut frame, selectors, false),
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
    // copies that entry), so the host keeps running after the switch; the frame is a valid
    // Ring-3 frame on the guest's shadow descriptors (`sync_descriptor_table` made them present).
    unsafe {
        x86::controlregs::cr3_write(root.as_u64());
        trap::enter_ring3(&frame)
    }
}

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

extern "C" {
    /// Written by `trap_common` (asm/trap_entry.S) once it has saved the guest's registers.
    static trap_entry_tsc: u64;
}

/// Splits one trap's cost into the phases of the benchmark breakdown (`Phase`): each `mark`
/// charges the cycles since the previous one to the phase that just ended.
struct PhaseClock {
    last: u64,
    phases: [u64; Phase::COUNT],
}

impl PhaseClock {
    /// Starts at the dispatcher; what the entry stub spent since `trap_entry_tsc` is "entry".
    fn start() -> Self {
        let now = rdtsc();
        // SAFETY: a plain read of a quadword only trap_common writes, with interrupts off.
        let entered = unsafe { core::ptr::addr_of!(trap_entry_tsc).read_volatile() };
        let mut phases = [0; Phase::COUNT];
        phases[Phase::EntryStub as usize] = now.saturating_sub(entered);
        Self { last: now, phases }
    }

    fn mark(&mut self, phase: Phase) {
        let now = rdtsc();
        if let Some(slot) = self.phases.get_mut(phase as usize) {
            *slot += now.wrapping_sub(self.last);
        }
        self.last = now;
    }

    /// Time spent idle (guest HLT) is not a cost of the trap.
    fn skip(&mut self, cycles: u64) {
        self.last = self.last.wrapping_add(cycles);
    }
}

/// The host CPU's own CPUID and TSC, which vmm-core passes on to the guest.
#[derive(Debug, Clone, Copy)]
struct RealCpu;

impl HostCpu for RealCpu {
    fn cpuid(&self, leaf: u32, subleaf: u32) -> [u32; 4] {
        let r = x86::cpuid::cpuid!(leaf, subleaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    }

    fn rdtsc(&self) -> u64 {
        rdtsc()
    }
}

/// Copies the interrupted guest's registers into the vCPU. The real RFLAGS only contributes
/// its arithmetic half; IF/IOPL are the vCPU's own.
fn frame_to_vcpu(frame: &TrapFrame, cpu: &mut VCpu) {
    let regs = [
        frame.rax, frame.rcx, frame.rdx, frame.rbx, frame.rsp, frame.rbp, frame.rsi, frame.rdi,
        frame.r8, frame.r9, frame.r10, frame.r11, frame.r12, frame.r13, frame.r14, frame.r15,
    ];
    cpu.gpr = regs;
    cpu.rip = frame.rip;
    cpu.merge_hardware_rflags(frame.rflags);
}

/// Copies the vCPU back into the frame the stub will `iretq` with: always Ring 3, on the real
/// selectors of the guest's shadow descriptor table, real IF = 1, IOPL = 0.
fn vcpu_to_frame(cpu: &VCpu, frame: &mut TrapFrame, selectors: RealSelectors, single_step: bool) {
    let [rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15] = cpu.gpr;
    (frame.rax, frame.rcx, frame.rdx, frame.rbx) = (rax, rcx, rdx, rbx);
    (frame.rsp, frame.rbp, frame.rsi, frame.rdi) = (rsp, rbp, rsi, rdi);
    (frame.r8, frame.r9, frame.r10, frame.r11) = (r8, r9, r10, r11);
    (frame.r12, frame.r13, frame.r14, frame.r15) = (r12, r13, r14, r15);
    frame.rip = cpu.rip;
    frame.rflags = cpu.real_rflags() | if single_step { rflags::TF } else { 0 };
    frame.cs = u64::from(selectors.cs);
    frame.ss = u64::from(selectors.ss);
}

/// Handles a trap taken while the guest ran (or a SYSCALL/SYSENTER from it): the one
/// dispatcher of docs/ARCHITECTURE.md, "The life of a trap".
pub fn handle_guest_trap(frame: &mut TrapFrame) {
    let mut clock = PhaseClock::start();
    let mut guard = VM.lock();
    let Some(vm) = guard.as_mut() else {
        drop(guard);
        stop_without_vm(frame)
    };
    if frame.interrupted_vm86() {
        let vm = guard.take();
        drop(guard);
        if let Some(vm) = vm {
            stop_guest(frame, StopWhy::Vm86, vm)
        }
        stop_without_vm(frame)
    }
    let trap_rip = frame.rip;
    // Our single step for an interrupt window ends with whatever trap comes next: the TF in the
    // frame is ours, not the guest's (we only set it when the guest's TF was clear).
    vm.stepped = core::mem::take(&mut vm.single_step);
    if vm.stepped {
        frame.rflags &= !rflags::TF;
        if frame.vector == vector::SYSCALL {
            // SYSCALL saved the flags, our TF included, in R11.
            frame.r11 &= !rflags::TF;
        }
    }
    // The guest's own TF when a SYSENTER began (SYSENTER keeps TF, so it trapped once in
    // our entry stub, which took it out of the frame).
    let sysenter_stepping =
        trap::take_sysenter_single_step() && frame.vector == vector::SYSENTER && !vm.stepped;
    frame_to_vcpu(frame, &mut vm.cpu);
    if frame.rip != vm.resumed_at {
        vm.cpu.rflags &= !rflags::RF;
    }
    vm.data_segments.absorb(&mut vm.cpu);
    fast::absorb(&mut vm.cpu);
    clock.mark(Phase::EntryStub);
    let (mut action, kind) = vm.dispatch(frame, sysenter_stepping, &mut clock);
    if !matches!(kind, TrapKind::Irq(_)) {
        vm.watchdog.trap(trap_rip);
    }
    let mut selectors = None;
    if let Action::Resume(_) = action {
        if let Some(code) = vm.bus.exit_requested() {
            action = Action::Exit(code);
        } else {
            match vm
                .inject_and_apply(&mut clock)
                .and_then(|()| vm.sync_descriptor_table())
            {
                Ok(real) => selectors = Some(real),
                Err(why) => action = Action::Stop(why),
            }
        }
    }
    if let (Action::Resume(_), false) = (&action, shadow_mmu::addr::is_canonical(vm.cpu.rip)) {
        // The host's IRETQ would fault at CPL 0 on a non-canonical RIP: whatever put it there
        // (a bug in the emulation), the guest stops, the host does not.
        action = Action::Stop(StopWhy::Cpu(CpuStop::Unsupported(
            "the guest's next RIP is not canonical",
        )));
    }
    if let (Action::Resume(_), Some(selectors)) = (&action, selectors) {
        vcpu_to_frame(&vm.cpu, frame, selectors, vm.single_step);
        vm.resumed_at = vm.cpu.rip;
        let pending = vmm_core::devices::InterruptSource::has_pending(&vm.bus);
        fast::publish(&vm.cpu, pending, vm.single_step);
    } else {
        fast::disable();
    }
    clock.mark(Phase::Exit);
    vm.accounting.record_phases(kind, &clock.phases);
    vm.note_guest_lines();
    let injected = vm.injected.take();
    if vm.trace_left > 0 && (!matches!(action, Action::Resume("host IRQ")) || injected.is_some()) {
        vm.trace_left -= 1;
        match injected {
            Some(vector) => crate::serial::write_line(format_args!(
                "[vmm] trace: rip={trap_rip:#x} {} -> {action}, then interrupt {vector:#x} injected",
                vm.last_trap
            )),
            None => crate::serial::write_line(format_args!(
                "[vmm] trace: rip={trap_rip:#x} {} -> {action}",
                vm.last_trap
            )),
        }
    }
    match action {
        Action::Resume(_) => {}
        Action::Exit(code) => {
            report(vm);
            crate::exit::exit(code)
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

/// What the trace and the trap table call a trap.
enum TrapName {
    /// A vector and its error code.
    Vector(u64, u64),
    Instruction(&'static str),
    /// An instruction as `--trace` shows it.
    Disassembled(alloc::string::String),
}

impl core::fmt::Display for TrapName {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TrapName::Vector(vector::SYSCALL, _) => write!(f, "SYSCALL"),
            TrapName::Vector(vector::SYSENTER, _) => write!(f, "SYSENTER"),
            TrapName::Vector(v, e) => write!(f, "{} error={e:#x}", trap::vector_name(*v)),
            TrapName::Instruction(name) => write!(f, "{name}"),
            TrapName::Disassembled(text) => write!(f, "{text}"),
        }
    }
}

impl Vm {
    /// The benchmark harness: the guest prints `bench,<op>,...` right after each op, so the
    /// traps (and their cost) between its previous console line and that one belong to the op,
    /// plus the few traps of printing one line. Reported as `bench-traps` lines at exit.
    fn note_guest_lines(&mut self) {
        let lines = self.bus.com1().sink().lines;
        if lines == self.bench_mark.0 {
            return;
        }
        let totals = self.accounting.totals();
        let (cli, sti, fast_cost) = fast::counts();
        let (count, cost) = (totals.count() + cli + sti, totals.total() + fast_cost);
        for op in self.bus.com1_mut().sink_mut().take_bench_ops() {
            self.bench_traps
                .push((op, count - self.bench_mark.1, cost - self.bench_mark.2));
        }
        self.bench_mark = (lines, count, cost);
    }

    /// Routes one trap: instruction faults to the emulator, page faults to shadow-mmu, host
    /// IRQs to the virtual devices, fast system calls to their forwarding.
    fn dispatch(
        &mut self,
        frame: &TrapFrame,
        sysenter_stepping: bool,
        clock: &mut PhaseClock,
    ) -> (Action, TrapKind) {
        self.last_trap = TrapName::Vector(frame.vector, frame.error_code);
        let routed = self.route(frame, sysenter_stepping, clock);
        clock.mark(Phase::Emulate);
        routed
    }

    fn route(
        &mut self,
        frame: &TrapFrame,
        sysenter_stepping: bool,
        clock: &mut PhaseClock,
    ) -> (Action, TrapKind) {
        match frame.vector {
            vector::PAGE_FAULT => self.page_fault(frame, clock),
            v if (vector::IRQ_BASE..vector::IRQ_BASE + 16).contains(&v) => {
                let irq = (v - vector::IRQ_BASE) as u8;
                crate::timer::handle_irq(irq);
                let mut action = Action::Resume("host IRQ");
                self.poll_devices();
                let registers = self.cpu.gpr.iter().fold(0u64, |h, r| h.rotate_left(7) ^ r);
                let interrupts_off = !self.cpu.interrupts_enabled();
                if irq == 0 && self.watchdog.tick(frame.rip, registers, interrupts_off) {
                    action = Action::Stop(StopWhy::NoProgress(self.watchdog.stalled_ticks()));
                }
                (action, TrapKind::Irq(irq))
            }
            vector::GENERAL_PROTECTION
            | vector::INVALID_OPCODE
            | vector::SEGMENT_NOT_PRESENT
            | vector::STACK_FAULT => {
                // #NP and #SS(selector) are how a segment load the shadow descriptor table
                // keeps absent comes here (IRETQ/RETF to another CS, MOV SS, MOV DS, ...): it is
                // redone against the guest's own table; any other instruction's fault is the
                // guest's own and is reflected unchanged.
                let code = frame.error_code as u32;
                let hw = match frame.vector {
                    vector::GENERAL_PROTECTION => Event::gp(code),
                    vector::SEGMENT_NOT_PRESENT => Event::np(code),
                    vector::STACK_FAULT => Event::ss(code),
                    _ => Event::ud(),
                };
                self.emulate(Cause::Fault(hw), clock)
            }
            vector::SYSCALL => {
                let stepping = self.cpu.rflags & rflags::TF != 0;
                let r = syscall::syscall(&mut self.cpu);
                (
                    self.after_forward(r, stepping),
                    TrapKind::SystemCall(SyscallKind::Syscall),
                )
            }
            vector::SYSENTER => {
                if sysenter_stepping {
                    self.cpu.rflags |= rflags::TF;
                }
                let r = syscall::sysenter(&mut self.cpu);
                (
                    self.after_forward(r, sysenter_stepping),
                    TrapKind::SystemCall(SyscallKind::Sysenter),
                )
            }
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
                // The guest's own exception (#DE, #DB, #NM, #SS, #AC, ...): deliver it as is.
                if v == vector::DEBUG {
                    // What the CPU recorded (BS for a single step) goes into the virtual DR6.
                    self.cpu.dr6 |=
                        crate::cpu::take_debug_status() & vmm_core::cpu::state::dr::DR6_STATUS;
                }
                let code = Event::vector_has_error_code(v as u8).then_some(frame.error_code as u32);
                let event = match code {
                    Some(code) => Event::exception_with_code(v as u8, code),
                    None => Event::exception(v as u8),
                };
                let action = match vmm_core::cpu::deliver(
                    &mut self.cpu,
                    &mut host::GuestAccess {
                        mmu: &mut self.mmu,
                        view: self.view,
                    },
                    event,
                ) {
                    Ok(_) => Action::Resume("reflected"),
                    Err(stop) => Action::Stop(StopWhy::Cpu(stop)),
                };
                (action, TrapKind::Exception(v as u8))
            }
            v => (
                Action::Stop(StopWhy::Unexpected),
                TrapKind::Exception(v as u8),
            ),
        }
    }

    /// Emulates the instruction at the guest's RIP.
    fn emulate(&mut self, cause: Cause, clock: &mut PhaseClock) -> (Action, TrapKind) {
        if self.trace_left > 0 {
            let mut mem = host::GuestAccess {
                mmu: &mut self.mmu,
                view: self.view,
            };
            self.trace_text = vmm_core::cpu::emulate::fetch(&self.cpu, &mut mem)
                .map(|ins| vmm_core::cpu::emulate::disassemble(&ins))
                .ok();
        }
        let result = handle_instruction(
            &mut self.cpu,
            &mut host::GuestAccess {
                mmu: &mut self.mmu,
                view: self.view,
            },
            &mut self.bus,
            &RealCpu,
            cause,
            &mut |phase| clock.mark(phase),
        );
        match result {
            Ok(handled) => {
                self.last_trap = match self.trace_text.take() {
                    Some(text) => TrapName::Disassembled(text),
                    None => TrapName::Instruction(handled.name),
                };
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

    /// After SYSCALL/SYSENTER forwarding: a fault it raised (#UD without EFER.SCE) is
    /// delivered like any other; with the guest's TF set when it began, the single-step trap
    /// follows, at the first instruction of the guest's handler (SDM Vol. 3 §17.3.1.4).
    fn after_forward(
        &mut self,
        result: Result<(), vmm_core::cpu::Fault>,
        stepping: bool,
    ) -> Action {
        match result {
            Ok(()) if stepping => {
                let mut mem = host::GuestAccess {
                    mmu: &mut self.mmu,
                    view: self.view,
                };
                match vmm_core::cpu::emulate::single_step_trap(&mut self.cpu, &mut mem) {
                    Ok(_) => Action::Resume("forwarded, then single-step #DB"),
                    Err(stop) => Action::Stop(StopWhy::Cpu(stop)),
                }
            }
            Ok(()) => Action::Resume("forwarded"),
            Err(vmm_core::cpu::Fault::Raise(event)) => {
                match vmm_core::cpu::deliver(
                    &mut self.cpu,
                    &mut host::GuestAccess {
                        mmu: &mut self.mmu,
                        view: self.view,
                    },
                    event,
                ) {
                    Ok(_) => Action::Resume("fault injected"),
                    Err(stop) => Action::Stop(StopWhy::Cpu(stop)),
                }
            }
            Err(vmm_core::cpu::Fault::Stop(stop)) => Action::Stop(StopWhy::Cpu(stop)),
        }
    }

    /// Feeds host serial input and the host clock to the virtual devices.
    fn poll_devices(&mut self) {
        // Also poll the UART: an edge-triggered IRQ 4 is lost for good if input was already
        // pending when the PIC was initialised (the line never drops, so it never rises again).
        crate::serial::handle_rx_irq();
        // Only as fast as the virtual UART can receive (as QEMU paces its own serial input),
        // and a new burst only once the guest has drained the last one: bytes wait in the
        // host's ring until the guest has set up its UART, and every burst raises a fresh edge
        // on the (edge-triggered) IRQ 4 line, even for a driver that reads a bounded number of
        // bytes per interrupt.
        let drained = self.bus.com1().rx_len() == 0;
        while drained && self.bus.com1().can_receive() {
            let Some(byte) = crate::serial::take_rx() else {
                break;
            };
            self.bus.enqueue_rx(byte);
        }
        self.bus.poll_timer();
    }

    /// On the way back: apply what the trapping instruction changed (a new CR3, a new view)
    /// *before* an interrupt is delivered — the interrupt comes after the instruction retired,
    /// so its frame goes through the new address space — then inject a due virtual interrupt
    /// (idling on HLT until one is) and apply what the delivery changed.
    fn inject_and_apply(&mut self, clock: &mut PhaseClock) -> Result<(), StopWhy> {
        if self.cpu.halted || vmm_core::devices::InterruptSource::has_pending(&self.bus) {
            self.apply_effects()?;
        }
        let mut idle_since = None;
        loop {
            match inject(
                &mut self.cpu,
                &mut host::GuestAccess {
                    mmu: &mut self.mmu,
                    view: self.view,
                },
                &mut self.bus,
            ) {
                Ok(Injection::Idle) => {
                    let since = *idle_since.get_or_insert(crate::timer::ticks());
                    let idle = crate::timer::ticks() - since;
                    if self.watchdog.idle_too_long(idle) {
                        return Err(StopWhy::IdleTooLong(idle));
                    }
                    // Sleep until the next host interrupt (the PIT at the latest), then look
                    // at the virtual devices again.
                    let before = rdtsc();
                    crate::cpu::wait_for_interrupt();
                    let idle = rdtsc().wrapping_sub(before);
                    clock.skip(idle);
                    self.accounting.record(TrapKind::Other("HLT idle"), idle);
                    self.poll_devices();
                }
                Ok(Injection::WindowNeeded) => {
                    let guest_stepping = self.cpu.rflags & rflags::TF != 0;
                    let mut mem = host::GuestAccess {
                        mmu: &mut self.mmu,
                        view: self.view,
                    };
                    if !guest_stepping
                        && vmm_core::cpu::emulate::pushf_in_interrupt_shadow(
                            &mut self.cpu,
                            &mut mem,
                        )
                    {
                        // The shadow is over without our TF for PUSHF to see: inject now.
                        continue;
                    }
                    // With the guest's own TF set, its #DB comes after the instruction anyway.
                    self.single_step = !guest_stepping;
                    break;
                }
                Ok(Injection::Delivered(vector)) => {
                    self.injected = Some(vector);
                    break;
                }
                Ok(_) => break,
                Err(stop) => return Err(StopWhy::Cpu(stop)),
            }
        }
        clock.mark(Phase::Injection);
        let applied = self.apply_effects();
        clock.mark(Phase::ShadowMmu);
        applied
    }

    /// Brings the real GDT in line with the vCPU (vmm-core `shadow_gdt`): only the guest's
    /// virtual CS and SS are loadable, so every other segment load traps, whatever selectors the
    /// guest uses. Returns the real selectors to run it on.
    fn sync_descriptor_table(&mut self) -> Result<RealSelectors, StopWhy> {
        // SAFETY: trap context (or before the first entry) with interrupts off: nothing else
        // uses the guest part of the real GDT now.
        let real = unsafe { gdt::guest_entries() };
        if let Some(selectors) = self.gdt.unchanged(&self.cpu) {
            if self.data_segments.publish(&self.cpu, real) {
                self.write_segment_bases();
            }
            return Ok(selectors);
        }
        let selectors = self
            .gdt
            .sync(
                &self.cpu,
                &mut host::GuestAccess {
                    mmu: &mut self.mmu,
                    view: self.view,
                },
                real,
            )
            .map_err(StopWhy::Cpu)?;
        if self.data_segments.publish(&self.cpu, real) {
            self.write_segment_bases();
        }
        Ok(selectors)
    }

    /// The real FS and GS bases follow the virtual ones.
    fn write_segment_bases(&self) {
        // SAFETY: the host never uses FS or GS; these bases only matter in Ring 3.
        unsafe {
            x86::msr::wrmsr(x86::msr::IA32_FS_BASE, self.cpu.fs_base());
            x86::msr::wrmsr(x86::msr::IA32_GS_BASE, self.cpu.gs_base());
        }
    }

    /// Applies the vCPU's effects: CR3 loads, INVLPG, paging-mode changes, view switches,
    /// FS/GS bases, and whether real SYSENTER may enter the VMM.
    fn apply_effects(&mut self) -> Result<(), StopWhy> {
        let effects = self.cpu.take_effects();
        if effects.descriptor_table {
            self.gdt.invalidate();
        }
        let mut reload = false;
        if effects.paging_mode {
            self.mmu
                .set_paging_mode(self.cpu.paging_mode(PagingMode::ENTRY.max_phys_bits));
            reload = true;
        }
        if effects.flush_all {
            self.mmu.flush_all();
            reload = true;
        }
        if let Some(cr3) = effects.cr3_load {
            self.mmu.load_cr3(cr3).map_err(StopWhy::Mmu)?;
            reload = true;
        }
        if let Some(gva) = effects.invlpg.and_then(GuestVirtAddr::new) {
            self.mmu.invlpg(gva);
            // SAFETY: INVLPG only drops a translation.
            unsafe { x86::tlb::flush(gva.as_u64() as usize) };
        }
        let view = if self.cpu.cpl == 3 {
            View::User
        } else {
            View::Kernel
        };
        if view != self.view {
            self.view = view;
            reload = true;
        }
        if self.mmu.take_tlb_flush() {
            reload = true;
        }
        if reload {
            self.load_shadow_root();
        }
        if effects.segment_bases {
            self.write_segment_bases();
        }
        // The real bits that follow the guest's: only after a CR0/CR4/MSR write, a change of
        // view (CR0.AM depends on the virtual CPL) or before the first entry.
        if effects.controls || reload || self.real_controls.is_none() {
            self.follow_guest_controls();
        }
        Ok(())
    }

    /// The real registers that follow the guest's where the CPU acts on them natively.
    fn follow_guest_controls(&mut self) {
        // A guest that has not set SYSENTER_CS must see SYSENTER fault with #GP at the
        // instruction: the real SYSENTER would lose its RIP, so it is disabled until then.
        let sysenter_on = self.cpu.msr.sysenter_cs & 0xFFFC != 0;
        if sysenter_on != self.real_sysenter_on {
            self.real_sysenter_on = sysenter_on;
            crate::cpu::set_sysenter_enabled(sysenter_on);
        }
        // CR0.TS/EM/MP and CR4.OSFXSR/OSXMMEXCPT govern x87/SSE instructions the guest runs
        // natively (#NM for lazy FPU switching, #UD without OSFXSR): the real bits follow the
        // virtual ones. CR0.AM only in virtual user mode: the guest kernel really runs at
        // CPL 3 too, where alignment checks would apply to it and never do natively.
        let am = if self.cpu.cpl == 3 {
            vmm_core::cpu::state::cr0::AM
        } else {
            0
        };
        let controls = (
            self.cpu.cr0 & (crate::cpu::GUEST_CR0_BITS & !vmm_core::cpu::state::cr0::AM)
                | (self.cpu.cr0 & am),
            self.cpu.cr4 & crate::cpu::GUEST_CR4_BITS,
        );
        if self.real_controls != Some(controls) {
            self.real_controls = Some(controls);
            crate::cpu::set_guest_controls(controls.0, controls.1);
        }
        // Likewise SYSCALL without the guest's EFER.SCE: #UD at the instruction, by the CPU.
        let syscall_on = self.cpu.efer & vmm_core::cpu::state::efer::SCE != 0;
        if syscall_on != self.real_syscall_on {
            self.real_syscall_on = syscall_on;
            crate::cpu::set_syscall_enabled(syscall_on);
        }
    }

    /// #PF from the guest: shadow-mmu decides between filling the shadow, reflecting the fault
    /// to the guest, emulating a page-table write, and stopping it.
    fn page_fault(&mut self, frame: &TrapFrame, clock: &mut PhaseClock) -> (Action, TrapKind) {
        // SAFETY: reading CR2 has no side effects; this is the #PF handler.
        let cr2 = unsafe { x86::controlregs::cr2() } as u64;
        let Some(gva) = GuestVirtAddr::new(cr2) else {
            return (
                Action::Stop(StopWhy::Unexpected),
                TrapKind::PageFault(PageFaultOutcome::Stop),
            );
        };
        let hw = PageFaultErrorCode::from_bits_truncate(frame.error_code as u32);
        let outcome = self.mmu.handle_page_fault(self.view, gva, hw);
        clock.mark(Phase::ShadowMmu);
        match outcome {
            FaultOutcome::Filled => {
                if self.mmu.take_tlb_flush() {
                    self.load_shadow_root();
                } else {
                    // SAFETY: INVLPG only drops a translation; the next access refills it from
                    // the shadow entry just written (needed when a read-only entry was upgraded).
                    unsafe { x86::tlb::flush(cr2 as usize) };
                }
                (
                    Action::Resume("shadow fill"),
                    TrapKind::PageFault(PageFaultOutcome::Fill),
                )
            }
            FaultOutcome::Stop(reason) => (
                Action::Stop(StopWhy::Mmu(reason)),
                TrapKind::PageFault(PageFaultOutcome::Stop),
            ),
            FaultOutcome::Reflect(pf) => {
                let action = match vmm_core::cpu::deliver(
                    &mut self.cpu,
                    &mut self.mmu,
                    Event::page_fault(pf),
                ) {
                    Ok(_) => Action::Resume("#PF reflected"),
                    Err(stop) => Action::Stop(StopWhy::Cpu(stop)),
                };
                (action, TrapKind::PageFault(PageFaultOutcome::Reflect))
            }
            FaultOutcome::EmulatePageTableWrite { gpa } => {
                // A table of an address space that is not running: the guest is recycling its
                // frame; drop those shadows and let the store run natively. A guest user program
                // never writes page tables, and a kernel store that is not PTE-style (PUSH,
                // CALL, ...) means the frame was freed and reused as data: stop shadowing
                // everything (real VMMs call this unshadowing) and retry natively too.
                let action = if self.mmu.release_inactive_shadows(gpa) {
                    Action::Resume("released an inactive address space")
                } else if self.cpu.cpl == 3 {
                    self.unshadow()
                } else {
                    match self.emulate(Cause::PageTableWrite, clock) {
                        (Action::Stop(StopWhy::Cpu(CpuStop::NotEmulated { .. })), _) => {
                            self.unshadow()
                        }
                        (action, _) => action,
                    }
                };
                (action, TrapKind::PageFault(PageFaultOutcome::EmulatedWrite))
            }
        }
    }

    /// Drops every shadow (and with them the write protection of every guest page table); the
    /// current address space refills on demand.
    fn unshadow(&mut self) -> Action {
        self.mmu.flush_all();
        self.load_shadow_root();
        Action::Resume("unshadowed")
    }

    /// Loads the real CR3 with the shadow root of the current view (flushing the real TLB).
    fn load_shadow_root(&self) {
        // SAFETY: every shadow root maps the VMM's slot like the host root (see `run`).
        unsafe { x86::controlregs::cr3_write(self.mmu.current_root(self.view).as_u64()) };
    }
}
