//! Port and MSR sweeps: `in al, dx` from every port below 0x1000 (the legacy ISA and chipset
//! range) and from every 256th port above it, then RDMSR of every MSR in the ranges where CPUs
//! and hypervisors put theirs (0..0x1000, 0x4000_0000..0x4000_0100, 0xC000_0000..0xC000_0200,
//! 0xC001_0000..0xC001_0200). Only reads: writes to some ports reset or stop the machine.
//!
//! At CPL 0 a port read never faults (SDM Vol. 1 §19.5: the I/O permission checks apply only
//! when CPL > IOPL) — a port nobody answers reads as all ones; RDMSR of an MSR the CPU does not
//! have is #GP(0) at the instruction (SDM Vol. 2B, RDMSR), and of one it has gives a value. A
//! VMM that emulates both for a guest kernel running at Ring 3 must give one of those answers
//! for every one of them, and neither crash nor leak a host MSR's side effects. Which MSRs exist
//! differs between the CPU and the VMM (named holes), and QEMU's TCG answers RDMSR of an MSR it
//! does not know with 0 instead of #GP (natively, every RDMSR here reads), so the guest checks
//! the kind of answer, not the values. Expected outcome, natively and under the VMM: both sweeps `-> ok`, exit
//! success.
#![no_std]
#![no_main]

use test_guests::machine::{self, Frame};
use test_guests::{exit, println, probe, ring3};

fn handler(frame: &mut Frame) {
    if !probe::record(frame) {
        machine::unexpected(frame)
    }
    probe::skip(frame);
}

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

#[no_mangle]
extern "C" fn _start() -> ! {
    ring3::setup(handler);
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
    exit(if ports_ok && msrs_ok {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
