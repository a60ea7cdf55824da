//! Port and MSR sweeps: `in al, dx` from every port below 0x1000 (the legacy ISA and chipset
//! range) and from every 256th port above it, then RDMSR of every MSR in the ranges where CPUs
//! and hypervisors put theirs (0..0x1000, 0x4000_0000..0x4000_0100, 0xC000_0000..0xC000_0200,
//! 0xC001_0000..0xC001_0200), then every 65 537th MSR of the whole 32-bit space (65 536 of
//! them, every value of each 16-bit half). These are reads; with `writes` (under the VMM only:
//! on the bare machine writes to some ports reset or stop it) the guest also writes 0xFF to
//! every port but the exit port (0xF4..0xF7) and COM1 (0x3F8..0x3FF, its own output), writes
//! back to every MSR of the ranges the value it read (no fault, or #GP(0) for a read-only one)
//! and 0 to every one whose read was #GP (#GP(0) again), and checks it still runs.
//!
//! At CPL 0 a port read never faults (SDM Vol. 1 §19.5: the I/O permission checks apply only
//! when CPL > IOPL) — a port nobody answers reads as all ones; RDMSR of an MSR the CPU does not
//! have is #GP(0) at the instruction (SDM Vol. 2B, RDMSR), and of one it has gives a value. A
//! VMM that emulates both for a guest kernel running at Ring 3 must give one of those answers
//! for every one of them, and neither crash nor leak a host MSR's side effects. Which MSRs exist
//! differs between the CPU and the VMM (named holes), and QEMU's TCG answers RDMSR of an MSR it
//! does not know with 0 instead of #GP (natively, every RDMSR here reads), so the guest checks
//! the kind of answer, not the values. Expected outcome, natively and under the VMM: every sweep
//! `-> ok`, exit success.
#![no_std]
#![no_main]

use test_guests::machine::{self};
use test_guests::{exit, println, probe, ring3};

/// The ports read: every one below 0x1000, then every 256th up to 0xFF00, and 0xFFFF.
fn ports() -> impl Iterator<Item = u16> {
    (0..0x1000u16)
        .chain((0x1000..=0xFF00u16).step_by(0x100))
        .chain(core::iter::once(0xFFFF))
}

/// The MSR ranges read.
const MSR_RANGES: [(u32, u32); 4] = [
    (0, 0x1000),
    (0x4000_0000, 0x4000_0100),
    (0xC000_0000, 0xC000_0200),
    (0xC001_0000, 0xC001_0200),
];

/// The sample of the whole 32-bit MSR space: every multiple of 0x10001.
fn msr_space() -> impl Iterator<Item = u32> {
    (0..=0xFFFFu32).map(|k| k * 0x1_0001)
}

/// Ports the write sweep leaves alone: the exit port (a write ends the run) and COM1 (the
/// guest's own output).
fn written(port: u16) -> bool {
    !(0xF4..=0xF7).contains(&port) && !(0x3F8..=0x3FF).contains(&port)
}

/// Writes 0xFF to every port but those `written` excludes; none may fault at CPL 0.
fn port_writes() -> bool {
    let (mut writes, mut faults) = (0u32, 0u32);
    for port in (0..=0xFFFFu16).filter(|&p| written(p)) {
        let o = probe!("mov al, 0xff", "out dx, al"; in("dx") port,);
        writes += 1;
        if !o.is(None) {
            faults += 1;
        }
    }
    let ok = faults == 0;
    println(format_args!(
        "port-msr-sweep port writes: {writes} writes, {faults} faults -> {}",
        if ok { "ok" } else { "WRONG" }
    ));
    ok
}

/// Writes back to every MSR of the ranges: the value read where RDMSR reads (no fault, or
/// #GP(0) for a read-only MSR), 0 where it is #GP(0) (#GP(0) again: an MSR the CPU does not
/// have cannot be written either).
fn msr_writes() -> bool {
    let (mut writes, mut back, mut gp, mut wrong) = (0u32, 0u32, 0u32, 0u32);
    for (start, end) in MSR_RANGES {
        for msr in start..end {
            let read = probe!("rdmsr"; in("ecx") msr, out("edx") _,);
            writes += 1;
            if read.is(None) {
                // The RDMSR reads again here (it did just now); any fault is the WRMSR's.
                let o = probe!("rdmsr", "wrmsr"; in("ecx") msr, out("edx") _,);
                let write_gp = o.traps >= 1 && o.vector == 13 && o.error == 0;
                if o.traps == 0 {
                    back += 1;
                } else if write_gp {
                    gp += 1;
                } else {
                    wrong += 1;
                }
            } else {
                let o = probe!("xor eax, eax", "wrmsr"; in("ecx") msr, in("edx") 0u32,);
                if o.traps >= 1 && o.vector == 13 && o.error == 0 {
                    gp += 1;
                } else {
                    wrong += 1;
                }
            }
        }
    }
    let ok = wrong == 0 && back > 0;
    println(format_args!(
        "port-msr-sweep msr writes: {writes} writes, {back} written back, {gp} #GP(0), {wrong} wrong -> {}",
        if ok { "ok" } else { "WRONG" }
    ));
    ok
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let cmdline = unsafe { machine::cmdline(info) };
    let writes = cmdline.split_whitespace().any(|w| w == "writes");
    ring3::setup(probe::handler);
    let (mut reads, mut faults, mut first_fault) = (0u32, 0u32, None);
    for port in ports() {
        let o = probe!("in al, dx"; in("dx") port,);
        reads += 1;
        if !o.is(None) {
            faults += 1;
            first_fault.get_or_insert((port, o));
        }
    }
    let ports_ok = faults == 0;
    println(format_args!(
        "port-msr-sweep ports: {reads} reads, {faults} faults -> {}",
        if ports_ok { "ok" } else { "WRONG" }
    ));
    if let Some((port, o)) = first_fault {
        println(format_args!(
            "port-msr-sweep ports: first fault at port {port:#x}: {o}"
        ));
    }
    let (mut reads, mut gp, mut other, mut first_other) = (0u32, 0u32, 0u32, None);
    for (start, end) in MSR_RANGES {
        for msr in start..end {
            let o = probe!("rdmsr"; in("ecx") msr, out("edx") _,);
            reads += 1;
            if o.is(Some((13, 0))) {
                gp += 1;
            } else if !o.is(None) {
                other += 1;
                first_other.get_or_insert((msr, o));
            }
        }
    }
    let msrs_ok = other == 0 && gp < reads;
    println(format_args!(
        "port-msr-sweep msrs: {reads} reads, {gp} #GP(0) at the instruction, {other} other faults -> {}",
        if msrs_ok { "ok" } else { "WRONG" }
    ));
    if let Some((msr, o)) = first_other {
        println(format_args!(
            "port-msr-sweep msrs: first other fault at MSR {msr:#x}: {o}"
        ));
    }
    let (mut space_reads, mut space_gp, mut space_other) = (0u32, 0u32, 0u32);
    for msr in msr_space() {
        let o = probe!("rdmsr"; in("ecx") msr, out("edx") _,);
        space_reads += 1;
        if o.is(Some((13, 0))) {
            space_gp += 1;
        } else if !o.is(None) {
            space_other += 1;
        }
    }
    let space_ok = space_other == 0;
    println(format_args!(
        "port-msr-sweep msr space: {space_reads} reads (every 0x10001st), {space_gp} #GP(0) at the instruction, {space_other} other faults -> {}",
        if space_ok { "ok" } else { "WRONG" }
    ));
    let writes_ok = !writes || (port_writes() & msr_writes());
    println(format_args!("port-msr-sweep: still running"));
    exit(if ports_ok && msrs_ok && space_ok && writes_ok {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
