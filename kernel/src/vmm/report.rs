//! What the VMM prints when the guest ends: the trap table, the same by phase, the CLI/STI fast
//! path, shadow-mmu statistics, benchmark attribution, host serial input, unknown ports and
//! MSRs; and the stop report (why, where, the registers, the virtual CPU) with exit 0x13.

use super::{cli_sti_stub, StopWhy, Vm};
use crate::trap::{self, TrapFrame, REPORT_NEWLINE};

/// A trap from Ring 3 before any guest exists: a host bug.
pub(super) fn stop_without_vm(frame: &TrapFrame) -> ! {
    panic!(
        "trap from Ring 3 with no guest: {} at rip={:#x}",
        trap::vector_name(frame.vector),
        frame.rip
    )
}

/// Prints a multi-line text (a table) as `[vmm] ` lines.
pub(super) fn print_lines(text: &str) {
    for line in text.lines() {
        crate::serial::write_line(format_args!("[vmm] {line}"));
    }
}

/// What the tables' costs are: (unit, what it means). Every cost is a TSC difference. Without
/// -icount, QEMU's TSC follows the host's clock, so the same run costs up to 25x more or less
/// from one run to the next; with it, the TSC counts retired instructions. The host cannot tell
/// which: run-qemu.sh --icount says so (host option `icount=on`).
pub(super) fn cost_unit(icount: bool) -> (&'static str, &'static str) {
    if icount {
        (
            "instructions",
            "retired instructions: QEMU's -icount makes the TSC count them, the same in every run",
        )
    } else {
        (
            "cycles",
            "TSC cycles; under QEMU without --icount they follow the host's clock and differ by up to 25x between runs, so compare the counts",
        )
    }
}

/// The end-of-run report: trap table, shadow-mmu statistics, unknown ports.
pub(super) fn report(vm: &mut Vm) {
    vm.bus.com1_mut().sink_mut().flush();
    super::instrument::report_unseen_marker(&vm.tracer, vm.bus.com1().sink());
    let mut table = alloc::string::String::new();
    let _ = vm.accounting.write_table(&mut table);
    let (unit, meaning) = cost_unit(vm.icount);
    crate::serial::write_line(format_args!("[vmm] traps (cost in {meaning}):"));
    print_lines(&table);
    let (cli, sti, fast_cost) = cli_sti_stub::counts();
    if let Some(mean) = fast_cost.checked_div(cli + sti) {
        crate::serial::write_line(format_args!(
            "[vmm] CLI/STI stub (not in the tables): CLI {cli}, STI {sti}, {fast_cost} {unit} in all, mean {mean}"
        ));
    }
    let mut phases = alloc::string::String::new();
    let _ = vm.accounting.write_phase_table(&mut phases);
    if !phases.is_empty() {
        crate::serial::write_line(format_args!(
            "[vmm] the same traps by phase (entry stub, decode, emulate, shadow-mmu, injection, exit; {unit}):"
        ));
        print_lines(&phases);
    }
    let stats = vm.mmu.stats();
    crate::serial::write_line(format_args!(
        "[vmm] shadow-mmu: fills={} reflections={} dirty-upgrades={} zaps={} cr3-loads={} roots={} shadow-pages={}/{} p2m-frames={} emulator-hits={} emulator-fills={}",
        stats.fills,
        stats.reflections,
        stats.dirty_upgrades,
        stats.zaps,
        stats.cr3_loads,
        stats.roots_live,
        stats.shadow_pages,
        stats.shadow_quota,
        stats.p2m_frames,
        stats.shadow_hits,
        stats.emulator_fills
    ));
    if stats.page_table_writes > 0
        || stats.flushes > 0
        || stats.unsyncs > 0
        || stats.shared_links > 0
    {
        crate::serial::write_line(format_args!(
            "[vmm] shadow-mmu: page-table writes emulated={} tables unshadowed={} address spaces released={} full flushes={} tables unsynced={} resynced={} shared links={} prefetched={}",
            stats.page_table_writes, stats.unshadowed_tables, stats.released_address_spaces, stats.flushes, stats.unsyncs, stats.resyncs, stats.shared_links, stats.prefetched
        ));
    }
    let unknown = alloc::format!("{}", vm.bus.unknown_ports());
    if !unknown.is_empty() {
        crate::serial::write_line(format_args!("[vmm] unknown ports:"));
        print_lines(&unknown);
    }
    vm.bench.report();
    let (received, dropped) = crate::serial::rx_counts();
    if received > 0 {
        crate::serial::write_line(format_args!(
            "[vmm] host serial input: {received} bytes received, {dropped} dropped (ring full)"
        ));
    }
    let msrs = vm.cpu.msr.unknown();
    if !msrs.is_empty() {
        crate::serial::write_line(format_args!("[vmm] unknown MSRs (each access was a #GP):"));
        for m in msrs {
            crate::serial::write_line(format_args!(
                "[vmm] unknown MSR {:#x}: {} reads, {} writes",
                m.index, m.reads, m.writes
            ));
        }
        if vm.cpu.msr.unknown_overflow() > 0 {
            crate::serial::write_line(format_args!(
                "[vmm] ... and {} more accesses to other unknown MSRs",
                vm.cpu.msr.unknown_overflow()
            ));
        }
    }
}

/// Prints why the guest stopped, its registers and the report, and exits with 0x13.
pub(super) fn stop_guest(frame: &TrapFrame, why: StopWhy, mut vm: Vm) -> ! {
    vm.bus.com1_mut().sink_mut().flush();
    let reason = match why {
        StopWhy::Mmu(reason) => alloc::format!("{reason}"),
        StopWhy::NoProgress(ticks) => alloc::format!(
            "no progress: {ticks} host timer ticks stuck in a few bytes of code, or with interrupts disabled and nothing else happening (watchdog=)"
        ),
        StopWhy::Cpu(stop) => alloc::format!("{stop}"),
        StopWhy::Unexpected => alloc::format!(
            "unexpected {} (error {:#x}) from the guest",
            trap::vector_name(frame.vector),
            frame.error_code
        ),
        StopWhy::Vm86 => alloc::string::String::from(
            "the guest entered virtual-8086 mode (a CPL-3 IRET with RFLAGS.VM set: QEMU allows it in long mode, real CPUs do not)",
        ),
        StopWhy::IdleTooLong(ticks) => alloc::format!(
            "halted with interrupts enabled but no virtual interrupt for {ticks} host ticks (watchdog=)"
        ),
    };
    let c = &vm.cpu;
    crate::serial::write_line(format_args!(
        "[vmm] guest stopped: {reason} at rip={:#x}{REPORT_NEWLINE}{frame}{REPORT_NEWLINE}virtual: cpl={} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}",
        frame.rip, c.cpl, c.rflags, c.cr0, c.cr2, c.cr3, c.cr4, c.efer
    ));
    report(&mut vm);
    crate::exit::exit(boot::exit_code::GUEST_STOPPED)
}
