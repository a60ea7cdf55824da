//! The VMM proper: loads the guest, enters it at Ring 3 on its shadow page tables, and handles
//! every trap it causes.
//!
//! Everything architectural is delegated: `vmm_core::loader` validates the ELF and builds the
//! entry state; `shadow_mmu::ShadowMmu` owns guest-physical memory (P2M) and the shadow page
//! tables and decides every guest page fault. This module only wires them to the hardware
//! (`host.rs`), moves state between the real [`TrapFrame`] and them, and reports.

pub mod console;
pub mod host;

use crate::gdt;
use crate::memory::{paging, phys_to_virt};
use crate::multiboot::Module;
use crate::trap::{self, vector, TrapFrame, REPORT_NEWLINE};
use console::GuestConsole;
use host::{DirectMap, HostFrames};
use shadow_mmu::shadow::{FaultOutcome, MmuConfig, Policy, ShadowMmu, StopReason, View};
use shadow_mmu::{GuestPhysAddr, GuestVirtAddr, PageFaultErrorCode, PagingMode};
use spin::Mutex;
use vmm_core::accounting::{Accounting, PageFaultOutcome, SyscallKind, TrapKind};
use vmm_core::config::{HostConfig, ShadowPolicy};
use vmm_core::devices::bus::PortBus;
use vmm_core::io::Clock;
use vmm_core::loader::{self, EntryState, GuestPhysWrite, LoadError};

/// Shadow page-table pages the VMM may keep alive at once (roots included): 4 MiB.
const SHADOW_QUOTA: usize = 1024;
/// RFLAGS the guest really runs with: IF = 1 (so the host keeps its timer), IOPL = 0 (so
/// CLI/STI/IN/OUT trap), bit 1 always set. Its virtual RFLAGS live in the vCPU.
const GUEST_REAL_RFLAGS: u64 = 0x202;

type Mmu = ShadowMmu<DirectMap, HostFrames>;

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
    mmu: Mmu,
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
}

/// Detects a guest that makes no progress (`cli; jmp $`, a spin on a flag nothing will set):
/// the host timer keeps interrupting it, and if it is found at the same RIP for `limit`
/// consecutive ticks with no other trap in between, it is stopped.
#[derive(Debug, Clone, Copy)]
struct Watchdog {
    limit: u64,
    last_rip: u64,
    same_ticks: u64,
}

impl Watchdog {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            last_rip: u64::MAX,
            same_ticks: 0,
        }
    }

    /// Any trap other than a host timer tick is progress.
    fn progress(&mut self) {
        self.same_ticks = 0;
    }

    /// A host timer tick found the guest at `rip`; true when the guest has stalled.
    fn tick(&mut self, rip: u64) -> bool {
        if rip == self.last_rip {
            self.same_ticks += 1;
        } else {
            self.last_rip = rip;
            self.same_ticks = 0;
        }
        self.limit != 0 && self.same_ticks >= self.limit
    }
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
    *VM.lock() = Some(Vm {
        mmu,
        view: View::Kernel,
        bus: PortBus::new(GuestConsole::new(), HostClock),
        accounting: Accounting::new(),
        trace_left: config.trace,
        watchdog: Watchdog::new(config.watchdog_ticks),
    });
    log::info!(
        "guest: entering at Ring 3 (rip={:#x} rsp={:#x} rdi={:#x}), shadow policy {policy:?}",
        entry.rip,
        entry.rsp,
        entry.rdi
    );
    let frame = TrapFrame {
        rip: entry.rip,
        cs: u64::from(gdt::GUEST_CODE),
        rflags: GUEST_REAL_RFLAGS,
        rsp: entry.rsp,
        ss: u64::from(gdt::GUEST_DATA),
        rdi: entry.rdi,
        ..TrapFrame::default()
    };
    // SAFETY: the shadow root maps the VMM's slot 511 exactly as the host root does (shadow-mmu
    // copies that entry), so the host keeps running after the switch; the frame is a valid
    // Ring-3 frame on the VMM's own guest selectors.
    unsafe {
        x86::controlregs::cr3_write(root.as_u64());
        trap::enter_ring3(&frame)
    }
}

/// Pseudo-vector of a SYSCALL from the guest (asm/trap_entry.S).
const SYSCALL_VECTOR: u64 = 256;
/// Pseudo-vector of a SYSENTER from the guest.
const SYSENTER_VECTOR: u64 = 257;

fn rdtsc() -> u64 {
    // SAFETY: RDTSC has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Handles a trap taken while the guest ran (or a SYSCALL/SYSENTER from it).
pub fn handle_guest_trap(frame: &mut TrapFrame) {
    let start = rdtsc();
    let mut guard = VM.lock();
    let Some(vm) = guard.as_mut() else {
        drop(guard);
        stop_without_vm(frame)
    };
    let (action, kind) = match frame.vector {
        vector::PAGE_FAULT => vm.page_fault(frame),
        v if (vector::IRQ_BASE..vector::IRQ_BASE + 16).contains(&v) => {
            let irq = (v - vector::IRQ_BASE) as u8;
            crate::timer::handle_irq(irq);
            let mut action = Action::Resume("host IRQ");
            while let Some(byte) = crate::serial::take_rx() {
                vm.bus.enqueue_rx(byte);
            }
            if irq == 0 {
                vm.bus.poll_timer();
                if vm.watchdog.tick(frame.rip) {
                    action = Action::Stop(StopWhy::NoProgress(vm.watchdog.same_ticks));
                }
            }
            (action, TrapKind::Irq(irq))
        }
        SYSCALL_VECTOR => (
            Action::Stop(StopWhy::NotEmulated),
            TrapKind::SystemCall(SyscallKind::Syscall),
        ),
        SYSENTER_VECTOR => (
            Action::Stop(StopWhy::NotEmulated),
            TrapKind::SystemCall(SyscallKind::Sysenter),
        ),
        v => (
            Action::Stop(StopWhy::NotEmulated),
            TrapKind::Exception(v as u8),
        ),
    };
    if !matches!(kind, TrapKind::Irq(_)) {
        vm.watchdog.progress();
    }
    vm.accounting.record(kind, rdtsc().wrapping_sub(start));
    if vm.trace_left > 0 && !matches!(action, Action::Resume("host IRQ")) {
        vm.trace_left -= 1;
        crate::serial::write_line(format_args!(
            "[vmm] trace: rip={:#x} {} error={:#x} -> {}",
            frame.rip,
            trap::vector_name(frame.vector),
            frame.error_code,
            action
        ));
    }
    match action {
        Action::Resume(_) => {}
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
    /// The guest cannot continue.
    Stop(StopWhy),
}

/// Why the VMM stopped the guest.
enum StopWhy {
    /// shadow-mmu refused (VMM range, GPA outside RAM, no memory).
    Mmu(StopReason),
    /// A trap the VMM cannot handle yet (instruction emulation is the vmm-core integration's).
    NotEmulated,
    /// The watchdog found the guest at the same RIP for this many host ticks, no other trap.
    NoProgress(u64),
}

impl core::fmt::Display for Action {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Action::Resume(what) => write!(f, "{what}"),
            Action::Stop(_) => write!(f, "stop"),
        }
    }
}

impl Vm {
    /// #PF from the guest: shadow-mmu decides between filling the shadow, reflecting the fault
    /// to the guest, and stopping it.
    fn page_fault(&mut self, frame: &mut TrapFrame) -> (Action, TrapKind) {
        let (action, outcome) = self.page_fault_action(frame);
        (action, TrapKind::PageFault(outcome))
    }

    fn page_fault_action(&mut self, frame: &mut TrapFrame) -> (Action, PageFaultOutcome) {
        // SAFETY: reading CR2 has no side effects; this is the #PF handler.
        let cr2 = unsafe { x86::controlregs::cr2() } as u64;
        let Some(gva) = GuestVirtAddr::new(cr2) else {
            return (Action::Stop(StopWhy::NotEmulated), PageFaultOutcome::Stop);
        };
        let hw = PageFaultErrorCode::from_bits_truncate(frame.error_code as u32);
        match self.mmu.handle_page_fault(self.view, gva, hw) {
            FaultOutcome::Filled => {
                if self.mmu.take_tlb_flush() {
                    self.load_shadow_root();
                } else {
                    // SAFETY: INVLPG only drops a translation; the next access refills it from
                    // the shadow entry just written (needed when a read-only entry was upgraded).
                    unsafe { x86::tlb::flush(cr2 as usize) };
                }
                (Action::Resume("shadow fill"), PageFaultOutcome::Fill)
            }
            FaultOutcome::Stop(reason) => {
                (Action::Stop(StopWhy::Mmu(reason)), PageFaultOutcome::Stop)
            }
            FaultOutcome::Reflect(_) => (
                Action::Stop(StopWhy::NotEmulated),
                PageFaultOutcome::Reflect,
            ),
            FaultOutcome::EmulatePageTableWrite { .. } => {
                (Action::Stop(StopWhy::NotEmulated), PageFaultOutcome::Stop)
            }
        }
    }

    /// Loads the real CR3 with the shadow root of the current view (flushing the real TLB).
    fn load_shadow_root(&self) {
        // SAFETY: every shadow root maps the VMM's slot like the host root (see `run`).
        unsafe { x86::controlregs::cr3_write(self.mmu.current_root(self.view).as_u64()) };
    }
}

/// A trap from Ring 3 before any guest exists: a host bug.
fn stop_without_vm(frame: &TrapFrame) -> ! {
    panic!(
        "trap from Ring 3 with no guest: {} at rip={:#x}",
        trap::vector_name(frame.vector),
        frame.rip
    )
}

/// Prints a multi-line text (a table) as `[vmm] ` lines.
fn print_lines(text: &str) {
    for line in text.lines() {
        crate::serial::write_line(format_args!("[vmm] {line}"));
    }
}

/// The end-of-run report: trap table, shadow-mmu statistics, unknown ports.
fn report(vm: &mut Vm) {
    vm.bus.com1_mut().sink_mut().flush();
    let mut table = alloc::string::String::new();
    let _ = vm.accounting.write_table(&mut table);
    crate::serial::write_line(format_args!(
        "[vmm] traps (cost in TSC cycles; under --icount, instructions):"
    ));
    print_lines(&table);
    let stats = vm.mmu.stats();
    crate::serial::write_line(format_args!(
        "[vmm] shadow-mmu: fills={} reflections={} dirty-upgrades={} zaps={} cr3-loads={} roots={} shadow-pages={}/{} p2m-frames={}",
        stats.fills,
        stats.reflections,
        stats.dirty_upgrades,
        stats.zaps,
        stats.cr3_loads,
        stats.roots_live,
        stats.shadow_pages,
        stats.shadow_quota,
        stats.p2m_frames
    ));
    let unknown = alloc::format!("{}", vm.bus.unknown_ports());
    if !unknown.is_empty() {
        crate::serial::write_line(format_args!("[vmm] unknown ports:"));
        print_lines(&unknown);
    }
}

/// Prints why the guest stopped, its registers and the report, and exits with 0x13.
fn stop_guest(frame: &TrapFrame, why: StopWhy, mut vm: Vm) -> ! {
    vm.bus.com1_mut().sink_mut().flush();
    let reason = match why {
        StopWhy::Mmu(reason) => alloc::format!("{reason}"),
        StopWhy::NoProgress(ticks) => alloc::format!(
            "no progress: at the same instruction for {ticks} host timer ticks with no other trap (watchdog=)"
        ),
        StopWhy::NotEmulated => alloc::format!(
            "{} (error {:#x}) is not emulated yet",
            trap::vector_name(frame.vector),
            frame.error_code
        ),
    };
    crate::serial::write_line(format_args!(
        "[vmm] guest stopped: {reason} at rip={:#x}{REPORT_NEWLINE}{frame}",
        frame.rip
    ));
    report(&mut vm);
    crate::exit::exit(boot::exit_code::GUEST_STOPPED)
}
