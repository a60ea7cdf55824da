//! SYSEXIT (64-bit, REX.W) at CPL 0 with a non-canonical return address in RDX, and then with a
//! non-canonical stack pointer in RCX: each is #GP(0) at the SYSEXIT, in the kernel, with
//! nothing loaded (SDM Vol. 2B, SYSEXIT: "If RCX or RDX contains a non-canonical address" ->
//! #GP(0)), the SYSEXIT side of the SYSRET bug (CVE-2012-0217). IA32_SYSENTER_CS is set (0x08)
//! so that the non-canonical address is the only reason for the fault. A VMM emulating SYSEXIT
//! for a guest kernel at Ring 3 must raise the #GP in the guest kernel, not return to user mode
//! at a non-canonical address. Expected outcome under the VMM: both probes `-> ok`,
//! `sysexit-noncanonical: 2 checks, 0 wrong`, exit success. Not a reference natively: QEMU's TCG
//! does not check RDX and returns to CPL 3 at RIP = 0x8000_0000_0000 (where the fetch is #GP at
//! CPL 3, which this guest reports as an unexpected trap).
#![no_std]
#![no_main]

use test_guests::{probe, ring3, wrmsr};

const IA32_SYSENTER_CS: u32 = 0x174;
/// The first non-canonical address above the lower half.
const NONCANONICAL: u64 = 0x0000_8000_0000_0000;
/// A canonical address (never reached: it is where a wrong SYSEXIT would go).
const CANONICAL: u64 = 0x1000;

#[no_mangle]
extern "C" fn _start() -> ! {
    ring3::setup(probe::handler);
    wrmsr(IA32_SYSENTER_CS, u64::from(ring3::KERNEL_CS));
    let rip = probe!("sysexitq"; in("rdx") NONCANONICAL, in("rcx") CANONICAL,);
    probe::check(
        "sysexit-noncanonical rdx=0x800000000000",
        rip,
        Some((13, 0)),
        true,
        format_args!(""),
    );
    let rsp = probe!("sysexitq"; in("rdx") CANONICAL, in("rcx") NONCANONICAL,);
    probe::check(
        "sysexit-noncanonical rcx=0x800000000000",
        rsp,
        Some((13, 0)),
        true,
        format_args!(""),
    );
    probe::finish("sysexit-noncanonical")
}
