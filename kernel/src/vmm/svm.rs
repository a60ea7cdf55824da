//! The hardware-assisted backend's host side (host option `backend=svm`;
//! docs/hardware-assist.md): turn SVM on, give VMRUN its pages, and loop VMRUN → `#VMEXIT` →
//! vmm-core's exit handler (`vmm_core::svm`), with the same virtual devices, watchdog, trace and
//! exit report as trap-and-emulate. The rules are all in vmm-core; here are the pages, the
//! MSRs, and the waits.

use super::console::GuestConsole;
use super::exit::poll_devices;
use super::host::{DirectMap, HostClock, HostFrames, RealCpu};
use super::instrument::{report_unseen_marker, trace_event, BenchAttribution};
use super::report::{cost_unit, print_lines};
use super::watchdog::Watchdog;
use super::{guest_exit_code, GuestBus};
use crate::memory::{frames, phys_to_virt, KERNEL_VMA};
use crate::multiboot::Module;
use shadow_mmu::{GuestPhysAddr, GuestPhysMemory, GuestRam, MemoryError, P2m};
use vmm_core::accounting::{Accounting, TrapKind};
use vmm_core::config::HostConfig;
use vmm_core::cpu::HostCpu;
use vmm_core::devices::bus::PortBus;
use vmm_core::loader::{self, GuestPhysWrite};
use vmm_core::svm::intercept::{build_msrpm, intercept_all_ports, IOPM_SIZE, MSRPM_SIZE};
use vmm_core::svm::npt::NestedPageTables;
use vmm_core::svm::vmcb::{SavedRegister, Vmcb, VMCB_SIZE};
use vmm_core::svm::{ExitOutcome, GuestRegisters, SvmGuest, SvmMachine, SvmStop};
use vmm_core::trace::{TraceKind, Tracer};

extern "C" {
    /// One VMRUN (asm/svm_run.S).
    fn svm_run(regs: *mut GuestRegisters, guest_vmcb: u64, host_vmcb: u64);
}

/// VM_HSAVE_PA: where VMRUN saves the host's state (APM vol. 2 §15.30.4).
const MSR_VM_HSAVE_PA: u32 = 0xC001_0117;
/// IA32_EFER and its SVME bit.
const MSR_EFER: u32 = 0xC000_0080;
const EFER_SVME: u64 = 1 << 12;

/// Instructions of `svm_run` around VMRUN that are the host's, not the guest's: the call and
/// 29 before VMRUN (pushes, VMSAVE, VMLOAD, the registers, CLGI, STI, VMRUN itself), 29 after
/// (VMSAVE, the registers, VMLOAD, CLI, STGI, pops, ret); counted from the listing and booked
/// with each exit, as the trap table books its stubs'.
const STUB_INSTRUCTIONS: u64 = 30 + 29;

/// The I/O and MSR permission maps: physically contiguous and page-aligned, so they live in the
/// kernel image (one contiguous physical range).
#[repr(C, align(4096))]
struct PermissionMaps {
    iopm: [u8; IOPM_SIZE],
    msrpm: [u8; MSRPM_SIZE],
}

static MAPS: spin::Mutex<PermissionMaps> = spin::Mutex::new(PermissionMaps {
    iopm: [0; IOPM_SIZE],
    msrpm: [0; MSRPM_SIZE],
});

/// The physical address of a kernel-image object (the image is mapped at physical + KERNEL_VMA).
fn image_phys<T>(object: &T) -> u64 {
    object as *const T as u64 - KERNEL_VMA
}

/// The guest's memory behind the nested tables: the P2M (host frames on first touch) and the
/// nested page tables over it.
struct Machine {
    p2m: P2m,
    npt: NestedPageTables,
    mem: DirectMap,
    alloc: HostFrames,
}

impl Machine {
    fn ram(&mut self) -> GuestRam<'_, DirectMap, HostFrames> {
        GuestRam {
            p2m: &mut self.p2m,
            mem: &mut self.mem,
            alloc: &mut self.alloc,
        }
    }
}

fn memory_stop(e: MemoryError) -> SvmStop {
    match e {
        MemoryError::OutsideRam(gpa) => SvmStop::GpaOutsideRam(gpa.as_u64()),
        MemoryError::OutOfHostFrames => SvmStop::HostMemoryExhausted,
    }
}

impl GuestPhysMemory for Machine {
    fn read_u64(&mut self, gpa: GuestPhysAddr) -> Result<u64, MemoryError> {
        self.ram().read_u64(gpa)
    }

    fn write_u64(&mut self, gpa: GuestPhysAddr, value: u64) -> Result<(), MemoryError> {
        self.ram().write_u64(gpa, value)
    }
}

impl SvmMachine for Machine {
    fn map_guest_page(&mut self, gpa: u64) -> Result<(), SvmStop> {
        let frame = self
            .p2m
            .host_frame(gpa / 4096, &mut self.mem, &mut self.alloc)
            .map_err(memory_stop)?;
        self.npt
            .map(gpa & !0xFFF, frame, &mut self.mem, &mut self.alloc)
            .map_err(|_| SvmStop::HostMemoryExhausted)
    }

    fn guest_ram(&mut self) -> &mut dyn GuestPhysMemory {
        self
    }

    fn read_guest_phys(&mut self, gpa: u64, buf: &mut [u8]) -> Result<(), SvmStop> {
        self.p2m
            .read(GuestPhysAddr::new(gpa), buf, &self.mem)
            .map_err(memory_stop)
    }

    fn write_guest_phys(&mut self, gpa: u64, data: &[u8]) -> Result<(), SvmStop> {
        self.p2m
            .write(
                GuestPhysAddr::new(gpa),
                data,
                &mut self.mem,
                &mut self.alloc,
            )
            .map_err(memory_stop)
    }

    fn host_cpu(&self) -> &dyn HostCpu {
        &RealCpu
    }
}

/// Guest RAM as the loader writes it: straight into the P2M.
struct LoadTarget<'a>(&'a mut Machine);

impl GuestPhysWrite for LoadTarget<'_> {
    fn write_phys(&mut self, gpa: u64, bytes: &[u8]) -> bool {
        self.0.write_guest_phys(gpa, bytes).is_ok()
    }
}

/// The VMCB at physical `pa` (a frame this module allocated and never frees).
fn vmcb_at(pa: u64) -> Vmcb<'static> {
    // SAFETY: `pa` is a whole frame from the frame allocator, used only as this VMCB and only
    // from this (single) thread between VMRUNs; the direct map covers it.
    Vmcb::new(unsafe { &mut *phys_to_virt(pa).cast::<[u8; VMCB_SIZE]>() })
}

/// Whether this CPU has SVM with nested paging (CPUID 8000_0001h ECX bit 2, 8000_000Ah EDX
/// bit 0); a clear configuration error when not.
fn require_svm() {
    let cpu = RealCpu;
    let max = cpu.cpuid(0x8000_0000, 0)[0];
    let svm = max >= 0x8000_000A && cpu.cpuid(0x8000_0001, 0)[2] & (1 << 2) != 0;
    let npt = svm && cpu.cpuid(0x8000_000A, 0)[3] & 1 != 0;
    if !(svm && npt) {
        crate::exit::config_error(format_args!(
            "backend=svm: this CPU has no SVM with nested paging (svm={svm}, npt={npt}); QEMU's -cpu max has both"
        ));
    }
}

fn frame() -> u64 {
    frames::allocate_zeroed().unwrap_or_else(|| {
        crate::exit::config_error(format_args!("backend=svm: no memory for the VMCB"))
    })
}

/// Loads the guest and runs it under VMRUN until it exits or must stop. Never returns.
pub fn run(config: &HostConfig<'_>, module: &Module) -> ! {
    require_svm();
    let ram_bytes = u64::from(config.guest_mem_mib) << 20;
    let len = (module.range.end.saturating_sub(module.range.start)) as usize;
    // SAFETY: the module's physical range was reserved from the frame allocator at boot, so
    // nothing else writes it, and the direct map covers all RAM.
    let image = unsafe { core::slice::from_raw_parts(phys_to_virt(module.range.start), len) };
    let fail = |why: loader::LoadError| -> ! {
        crate::exit::config_error(format_args!("guest image '{}': {why}", module.name()))
    };
    let parsed = loader::parse_guest(image, ram_bytes).unwrap_or_else(|e| fail(e));
    let (mut mem, mut alloc) = (DirectMap, HostFrames);
    let npt = NestedPageTables::new(&mut mem, &mut alloc).unwrap_or_else(|_| {
        crate::exit::config_error(format_args!("backend=svm: no memory for the nested tables"))
    });
    let mut machine = Machine {
        p2m: P2m::new(ram_bytes),
        npt,
        mem,
        alloc,
    };
    let entry = loader::load_guest(
        &mut LoadTarget(&mut machine),
        image,
        &parsed,
        ram_bytes,
        config.guest_cmdline,
    )
    .unwrap_or_else(|e| fail(e));

    let (guest_vmcb, host_vmcb, host_save) = (frame(), frame(), frame());
    let (iopm, msrpm) = {
        let mut maps = MAPS.lock();
        intercept_all_ports(&mut maps.iopm);
        build_msrpm(&mut maps.msrpm);
        (image_phys(&maps.iopm), image_phys(&maps.msrpm))
    };
    // SAFETY: reading EFER has no side effects.
    let host_efer = unsafe { x86::msr::rdmsr(MSR_EFER) };
    // SAFETY: EFER.SVME only enables the SVM instructions; the other bits are written back.
    unsafe { x86::msr::wrmsr(MSR_EFER, host_efer | EFER_SVME) };
    // SAFETY: VM_HSAVE_PA names a frame of ours that nothing else uses.
    unsafe { x86::msr::wrmsr(MSR_VM_HSAVE_PA, host_save) };
    // The decoder builds its tables at its first use (~2.8 M instructions under icount): once
    // here, not in the guest's first CR8 exit.
    vmm_core::cpu::emulate::warm_up_decoder();
    let mut guest = SvmGuest::new(&entry);
    guest.setup_vmcb(
        &mut vmcb_at(guest_vmcb),
        &entry,
        iopm,
        msrpm,
        machine.npt.root().as_u64(),
    );
    log::info!(
        "guest: '{}' loaded: entry {:#x}, {} MiB RAM, under SVM with nested paging (ASID {})",
        module.name(),
        entry.rip,
        config.guest_mem_mib,
        vmm_core::svm::GUEST_ASID
    );

    let mut host = SvmHost {
        bus: PortBus::new(GuestConsole::watching_for(config.trace.from), HostClock),
        accounting: Accounting::new(),
        watchdog: Watchdog::new(config.watchdog_ticks),
        tracer: Tracer::new(&config.trace),
        icount: config.icount,
        unbooked: None,
        bench: BenchAttribution::default(),
    };
    loop {
        let mut vmcb = vmcb_at(guest_vmcb);
        let injected = guest.prepare_entry(&mut vmcb, host.bus.pic_mut());
        host.book_last_exit();
        // SAFETY: the VMCB, the host's VMSAVE page and VM_HSAVE_PA are frames of ours; the
        // VMCB's guest state was set up by vmm-core and the nested tables map only the guest's
        // own frames (its P2M), so the guest can reach no host memory.
        unsafe { svm_run(&mut guest.regs, guest_vmcb, host_vmcb) };
        let came = super::instrument::rdtsc();
        let rip = vmcb.get(SavedRegister::Rip);
        let (info_1, info_2) = (vmcb.exit_info_1(), vmcb.exit_info_2());
        let (code, outcome) = guest.handle_exit(&mut vmcb, &mut host.bus, &mut machine);
        host.unbooked = Some((TrapKind::VmExit(code.name()), came, 0));
        host.trace(rip, code.name(), (info_1, info_2), outcome, injected);
        if let Some(code) = host.bus.exit_requested() {
            host.book_last_exit();
            host.report(&machine);
            crate::exit::exit(guest_exit_code(code))
        }
        let stop = match outcome {
            ExitOutcome::Resume => None,
            ExitOutcome::HostInterrupt => host.host_interrupt(&vmcb, &guest.regs),
            ExitOutcome::Halted => host.halt(&vmcb),
            ExitOutcome::Stop(why) => Some(alloc::format!("{why}")),
        };
        if let Some(why) = stop {
            host.book_last_exit();
            crate::serial::write_line(format_args!(
                "[vmm] guest stopped: {why} at rip={rip:#x} (backend=svm, exit {} info1={info_1:#x} info2={info_2:#x})",
                code.name()
            ));
            host.report(&machine);
            crate::exit::exit(boot::exit_code::GUEST_STOPPED)
        }
    }
}

/// The host's side of the run: devices, accounting, watchdog, trace.
struct SvmHost {
    bus: GuestBus,
    accounting: Accounting,
    watchdog: Watchdog,
    tracer: Tracer,
    icount: bool,
    /// The last exit, when it came, and the idle time inside it: booked just before the next
    /// VMRUN, when its whole cost is known.
    unbooked: Option<(TrapKind, u64, u64)>,
    /// Exits and their cost charged to the guest's benchmark ops.
    bench: BenchAttribution,
}

impl SvmHost {
    /// Books the last exit: from its `#VMEXIT` to now, idle time out, the stub's instructions in.
    fn book_last_exit(&mut self) {
        if let Some((kind, came, idle)) = self.unbooked.take() {
            let now = super::instrument::rdtsc();
            let cost = now.wrapping_sub(came).saturating_sub(idle) + STUB_INSTRUCTIONS;
            self.accounting.record(kind, cost);
            let accounting = &self.accounting;
            self.bench.note(self.bus.com1_mut().sink_mut(), || {
                let totals = accounting.totals();
                (totals.count(), totals.total())
            });
        }
    }

    /// A physical interrupt made the guest exit: take it (the host's timer or serial), then
    /// look at the virtual devices; the watchdog samples the guest on each host timer tick.
    fn host_interrupt(
        &mut self,
        vmcb: &Vmcb<'_>,
        regs: &GuestRegisters,
    ) -> Option<alloc::string::String> {
        let ticks = crate::timer::ticks();
        crate::cpu::take_pending_interrupts();
        poll_devices(&mut self.bus);
        if crate::timer::ticks() != ticks {
            let digest = [
                regs.rbx,
                regs.rcx,
                regs.rdx,
                regs.rsi,
                regs.rdi,
                regs.rbp,
                vmcb.get(SavedRegister::Rax),
                vmcb.get(SavedRegister::Rsp),
            ]
            .iter()
            .fold(0u64, |h, r| h.rotate_left(7) ^ r);
            let interrupts_off =
                vmcb.get(SavedRegister::Rflags) & vmm_core::cpu::state::rflags::IF == 0;
            if self
                .watchdog
                .tick(vmcb.get(SavedRegister::Rip), digest, interrupts_off)
            {
                return Some(alloc::format!(
                    "no progress: {} host timer ticks stuck in a few bytes of code, or with interrupts disabled and nothing else happening (watchdog=)",
                    self.watchdog.stalled_ticks()
                ));
            }
        }
        None
    }

    /// HLT with IF = 1: sleep until the virtual PIC has an interrupt for the guest.
    fn halt(&mut self, vmcb: &Vmcb<'_>) -> Option<alloc::string::String> {
        self.watchdog.trap(vmcb.get(SavedRegister::Rip));
        let since = crate::timer::ticks();
        loop {
            poll_devices(&mut self.bus);
            if self.bus.pic().has_pending_interrupt() {
                return None;
            }
            let idle = crate::timer::ticks() - since;
            if self.watchdog.idle_too_long(idle) {
                return Some(alloc::format!(
                    "halted with interrupts enabled but no virtual interrupt for {idle} host ticks (watchdog=)"
                ));
            }
            let before = super::instrument::rdtsc();
            crate::cpu::wait_for_interrupt();
            let slept = super::instrument::rdtsc().wrapping_sub(before);
            if let Some((_, _, idle)) = &mut self.unbooked {
                *idle += slept;
            }
            self.accounting.record(TrapKind::Other("HLT idle"), slept);
        }
    }

    /// One `--trace` line per exit, through the same tracer as trap-and-emulate (`trace=`,
    /// `trace_kinds=`, `trace_skip=`, `trace_from=`; an exit's kind by `TraceKind::of`).
    fn trace(
        &mut self,
        rip: u64,
        name: &'static str,
        info: (u64, u64),
        outcome: ExitOutcome,
        injected: Option<u8>,
    ) {
        if !self.tracer.on() {
            return;
        }
        let event = Some((TraceKind::of(&TrapKind::VmExit(name)), injected.is_some()));
        trace_event(
            &mut self.tracer,
            self.bus.com1().sink(),
            event,
            "exits",
            || {
                let injected = match injected {
                    Some(vector) => alloc::format!(", interrupt {vector:#x} injected at entry"),
                    None => alloc::string::String::new(),
                };
                crate::serial::write_line(format_args!(
                "[vmm] trace: rip={rip:#x} exit {name} info1={:#x} info2={:#x} -> {outcome:?}{injected}",
                info.0, info.1
            ));
            },
        );
    }

    /// The end-of-run report: the exit table in the trap table's format, and the nested tables.
    fn report(&mut self, machine: &Machine) {
        self.bus.com1_mut().sink_mut().flush();
        report_unseen_marker(&self.tracer, self.bus.com1().sink());
        let (_, meaning) = cost_unit(self.icount);
        let mut table = alloc::string::String::new();
        let _ = self.accounting.write_table(&mut table);
        crate::serial::write_line(format_args!(
            "[vmm] exits (backend=svm; cost in {meaning}):"
        ));
        print_lines(&table);
        crate::serial::write_line(format_args!(
            "[vmm] svm: nested page tables={} pages mapped={} guest frames={}",
            machine.npt.tables(),
            machine.npt.mapped(),
            machine.p2m.frames_used()
        ));
        self.bench.report();
    }
}
