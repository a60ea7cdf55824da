//! Alignment checking: with CR0.AM = 1 and RFLAGS.AC = 1, an unaligned data access at CPL 3
//! raises #AC (vector 17, error code 0) at the instruction; at CPL 0–2 it never does, and with
//! AM = 0 or AC = 0 neither (SDM Vol. 3 §2.5, §6.15 "Interrupt 17").
//!
//! Checks: the kernel (CPL 0) with AM = AC = 1 loads 8 bytes from an address 3 mod 8 (no
//! fault); user code sets AC with pushfq/or/popfq and does the same load (#AC through the IDT
//! from CPL 3), or is entered by `iretq` with AC already set in the frame (#AC), or does the load
//! aligned (no fault); with AM = 0, or AC = 0, the unaligned user load runs; and the kernel
//! check again after user mode. A user load that runs reaches `ud2` (#UD): "no fault" there.
//!
//! A VMM runs the guest kernel at CPL 3 too, so the real CR0.AM may follow the guest's only
//! while the guest is in user mode. Expected outcome, natively and under the VMM: every check
//! "ok", exit success.
#![no_std]
#![no_main]

use test_guests::machine::{self, Frame};
use test_guests::probe::{check, check_quirk, Outcome};
use test_guests::{println, probe, ring3};

const CR0_AM: u64 = 1 << 18;
const RFLAGS_AC: u64 = 1 << 18;
const AC: Option<(u64, u64)> = Some((17, 0));

#[repr(C, align(16))]
struct Buffer([u8; 32]);
static BUFFER: Buffer = Buffer([0x5A; 32]);

fn handler(frame: &mut Frame) {
    if ring3::catch(frame) {
        return;
    }
    if !probe::record(frame) {
        machine::unexpected(frame)
    }
    probe::skip(frame);
}

core::arch::global_asm!(
    r#"
.section .utext, "ax"
.global ac_user_set_ac
ac_user_set_ac:
    pushfq
    or qword ptr [rsp], 0x40000
    popfq
.global ac_user_set_ac_load
ac_user_set_ac_load:
    mov rax, qword ptr [rsp - 13]
.global ac_user_set_ac_end
ac_user_set_ac_end:
    ud2
.global ac_user_load
ac_user_load:
    mov rax, qword ptr [rsp - 13]
.global ac_user_load_end
ac_user_load_end:
    ud2
.global ac_user_aligned
ac_user_aligned:
    pushfq
    or qword ptr [rsp], 0x40000
    popfq
.global ac_user_aligned_load
ac_user_aligned_load:
    mov rax, qword ptr [rsp - 16]
.global ac_user_aligned_end
ac_user_aligned_end:
    ud2
.section .text
"#
);

extern "C" {
    fn ac_user_set_ac();
    fn ac_user_load();
    fn ac_user_aligned();
    static ac_user_set_ac_load: u8;
    static ac_user_set_ac_end: u8;
    static ac_user_load_end: u8;
    static ac_user_aligned_load: u8;
    static ac_user_aligned_end: u8;
}

/// QEMU's TCG (7.2) never checks alignment: natively, the #AC phases run the load.
const QEMU_NO_AC: &str =
    "QEMU TCG does not implement alignment checking; the CPU gives #AC(0) (SDM Vol. 3 §6.15)";

/// Runs user code and checks its trap: #AC at `load` when `fault` (with RFLAGS.AC = 1 in the
/// saved frame), else #UD at `end` (the load ran).
fn user(name: &str, code: unsafe extern "C" fn(), rflags: u64, load: u64, end: u64, fault: bool) {
    let frame = ring3::enter(code, rflags);
    let ac = frame.rflags & RFLAGS_AC != 0;
    let am = machine::read_cr0() & CR0_AM != 0;
    let user_cs = frame.cs == u64::from(ring3::USER_CS);
    let ran = frame.vector == 6 && frame.rip == end;
    let o = if ran {
        Outcome {
            traps: 0,
            vector: 0,
            error: 0,
            at_insn: false,
        }
    } else {
        Outcome::from_frame(&frame, load)
    };
    if fault && ran && ac && user_cs {
        check_quirk(name, o, AC, None, QEMU_NO_AC);
        return;
    }
    check(
        name,
        o,
        if fault { AC } else { None },
        user_cs && (!fault || ac),
        format_args!("cs={:#x} AC={} AM={}", frame.cs, u8::from(ac), u8::from(am)),
    );
}

/// The kernel's unaligned load with AC = 1 (CR0.AM as it is): no fault at CPL 0.
fn kernel(name: &str) {
    let unaligned = core::ptr::addr_of!(BUFFER) as u64 + 3;
    let flags: u64;
    let o = probe!(
        "pushfq",
        "or qword ptr [rsp], 0x40000",
        "popfq",
        "pushfq",
        "pop {flags}",
        "mov {v}, qword ptr [{p}]",
        "pushfq",
        "and qword ptr [rsp], -0x40001",
        "popfq";
        p = in(reg) unaligned,
        v = out(reg) _,
        flags = out(reg) flags,
    );
    let am = machine::read_cr0() & CR0_AM != 0;
    check(
        name,
        o,
        None,
        flags & RFLAGS_AC != 0 && am,
        format_args!(
            "AC={} AM={}",
            u8::from(flags & RFLAGS_AC != 0),
            u8::from(am)
        ),
    );
}

#[no_mangle]
extern "C" fn _start() -> ! {
    ring3::setup(handler);
    let addr = |s: &u8| s as *const u8 as u64;
    // SAFETY: labels in .utext; only their addresses are taken.
    let (set_load, set_end, load_end, al_load, al_end) = unsafe {
        (
            addr(&ac_user_set_ac_load),
            addr(&ac_user_set_ac_end),
            addr(&ac_user_load_end),
            addr(&ac_user_aligned_load),
            addr(&ac_user_aligned_end),
        )
    };
    let load = ac_user_load as *const () as u64;
    machine::write_cr0(machine::read_cr0() | CR0_AM);
    println(format_args!(
        "alignment-check: cr0={:#x}, user stack top {:#x} (loads at top-13)",
        machine::read_cr0(),
        ring3::user_stack_top()
    ));
    kernel("alignment-check kernel-am-ac-unaligned");
    user(
        "alignment-check user-am-ac-unaligned (popfq)",
        ac_user_set_ac,
        0x2,
        set_load,
        set_end,
        true,
    );
    user(
        "alignment-check user-am-ac-unaligned (iretq)",
        ac_user_load,
        0x2 | RFLAGS_AC,
        load,
        load_end,
        true,
    );
    user(
        "alignment-check user-am-ac-aligned",
        ac_user_aligned,
        0x2,
        al_load,
        al_end,
        false,
    );
    user(
        "alignment-check user-am-unaligned-without-ac",
        ac_user_load,
        0x2,
        load,
        load_end,
        false,
    );
    kernel("alignment-check kernel-am-ac-unaligned-after-user");
    machine::write_cr0(machine::read_cr0() & !CR0_AM);
    user(
        "alignment-check user-ac-unaligned-without-am",
        ac_user_set_ac,
        0x2,
        set_load,
        set_end,
        false,
    );
    machine::write_cr0(machine::read_cr0() | CR0_AM);
    user(
        "alignment-check user-am-ac-unaligned-again",
        ac_user_set_ac,
        0x2,
        set_load,
        set_end,
        true,
    );
    probe::finish("alignment-check")
}
