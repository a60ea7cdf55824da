//! MOV to and from the debug registers (SDM Vol. 2B "MOV—Move to/from Debug Registers", Vol. 3
//! §17.2): DR0–DR3 hold any 64-bit value; DR6 reads 0xFFFF0FF0 with no condition recorded (its
//! reserved bits fixed); DR7 reads 0x400 after `mov dr7, 0`; writing a 1 to bits 63:32 of DR6
//! or DR7 is #GP(0) and changes nothing; DR4/DR5 are DR6/DR7 while CR4.DE = 0 and #UD while
//! CR4.DE = 1; at CPL 3 every MOV DR is #GP(0). No breakpoint is enabled.
//!
//! Command line `bp`: instead, DR0 = a function and DR7.L0 = 1 (execute breakpoint); calling it
//! raises #DB (vector 1, a fault: RIP = the function) with DR6.B0 = 1 natively. The VMM does not
//! arm hardware breakpoints and stops such a guest with a clear message instead.
//! Command line `gd`: DR7.GD = 1 (general detect), then `mov rax, dr0`: #DB at that MOV with
//! DR6.BD = 1 and DR7.GD cleared in the handler (§17.2.4; what KVM on a real CPU gives). QEMU's
//! TCG raises nothing, natively and under the VMM (which emulates MOV DR but not GD): named as
//! a quirk.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use test_guests::machine::{self, Frame};
use test_guests::probe::{check, check_quirk, Outcome};
use test_guests::{println, probe, ring3};

const CR4_DE: u64 = 1 << 3;
const GP: Option<(u64, u64)> = Some((13, 0));
const UD: Option<(u64, u64)> = Some((6, 0));
const DB: Option<(u64, u64)> = Some((1, 0));

/// DR6 and DR7 as the #DB handler read them.
static DB_DR6: AtomicU64 = AtomicU64::new(0);
static DB_DR7: AtomicU64 = AtomicU64::new(0);
static DB_RIP: AtomicU64 = AtomicU64::new(0);

fn handler(frame: &mut Frame) {
    if ring3::catch(frame) {
        return;
    }
    if !probe::record(frame) {
        machine::unexpected(frame)
    }
    if frame.vector == 1 {
        DB_DR6.store(machine::read_dr6(), Ordering::SeqCst);
        DB_DR7.store(read_dr7(), Ordering::SeqCst);
        DB_RIP.store(frame.rip, Ordering::SeqCst);
        // SAFETY: disables every breakpoint (and GD), so the instruction can be retried.
        unsafe { core::arch::asm!("mov dr7, {}", in(reg) 0u64, options(nomem, nostack)) };
        machine::write_dr6(0);
        return;
    }
    probe::skip(frame);
}

fn read_dr7() -> u64 {
    let v: u64;
    // SAFETY: reads DR7; no memory effects.
    unsafe { core::arch::asm!("mov {}, dr7", out(reg) v, options(nomem, nostack)) };
    v
}

/// `mov drN, value` as a probe.
fn write(n: u8, value: u64) -> Outcome {
    macro_rules! w {
        ($insn:literal) => {
            probe!($insn; v = in(reg) value,)
        };
    }
    match n {
        0 => w!("mov dr0, {v}"),
        1 => w!("mov dr1, {v}"),
        2 => w!("mov dr2, {v}"),
        3 => w!("mov dr3, {v}"),
        4 => w!("mov dr4, {v}"),
        5 => w!("mov dr5, {v}"),
        6 => w!("mov dr6, {v}"),
        _ => w!("mov dr7, {v}"),
    }
}

/// `mov reg, drN` as a probe, and the value read (0 when it faulted).
fn read(n: u8) -> (Outcome, u64) {
    let mut value = 0u64;
    macro_rules! r {
        ($insn:literal) => {
            probe!($insn; v = inout(reg) value,)
        };
    }
    let o = match n {
        0 => r!("mov {v}, dr0"),
        1 => r!("mov {v}, dr1"),
        2 => r!("mov {v}, dr2"),
        3 => r!("mov {v}, dr3"),
        4 => r!("mov {v}, dr4"),
        5 => r!("mov {v}, dr5"),
        6 => r!("mov {v}, dr6"),
        _ => r!("mov {v}, dr7"),
    };
    (o, value)
}

/// Writes DRn (expecting `expected`), reads DR`back` and checks it holds `reads`.
fn write_read(name: &str, n: u8, value: u64, expected: Option<(u64, u64)>, back: u8, reads: u64) {
    let o = write(n, value);
    let (r, got) = read(back);
    check(
        name,
        o,
        expected,
        r.traps == 0 && got == reads,
        format_args!("dr{back}={got:#x} (expected {reads:#x})"),
    );
}

core::arch::global_asm!(
    r#"
.section .utext, "ax"
.global dr_user_read
dr_user_read:
    mov rax, dr7
    ud2
.global dr_user_write
dr_user_write:
    xor eax, eax
.global dr_user_write_insn
dr_user_write_insn:
    mov dr7, rax
    ud2
.section .text
.global dr_bp_target
dr_bp_target:
    nop
    ret
"#
);

extern "C" {
    fn dr_user_read();
    fn dr_user_write();
    static dr_user_write_insn: u8;
    fn dr_bp_target();
}

fn user(name: &str, code: unsafe extern "C" fn(), insn: u64) {
    let frame = ring3::enter(code, 0x2);
    check(
        name,
        Outcome::from_frame(&frame, insn),
        GP,
        frame.cs == u64::from(ring3::USER_CS),
        format_args!("from cs={:#x}", frame.cs),
    );
}

/// `bp`: an execute breakpoint on `dr_bp_target` through DR0/DR7.L0.
fn breakpoint() -> ! {
    let target = dr_bp_target as *const () as u64;
    write(0, target);
    println(format_args!(
        "debug-registers bp: DR0={target:#x}, enabling L0 in DR7"
    ));
    let o = write(7, 1);
    println(format_args!(
        "debug-registers bp: mov dr7, 1: {o}, DR7={:#x}",
        read_dr7()
    ));
    let o = probe!("call {t}"; t = in(reg) target,);
    // The #DB is a fault at the breakpoint's instruction, not at the call.
    let rip = DB_RIP.load(Ordering::SeqCst);
    let o = Outcome {
        at_insn: o.traps > 0 && rip == target,
        ..o
    };
    let dr6 = DB_DR6.load(Ordering::SeqCst);
    check(
        "debug-registers bp call",
        o,
        DB,
        dr6 & 1 != 0,
        format_args!("DR6 in the handler={dr6:#x} (B0=1)"),
    );
    probe::finish("debug-registers")
}

/// `gd`: general detect on the next MOV DR.
fn general_detect() -> ! {
    write(7, 1 << 13);
    let (o, _) = read(0);
    let (dr6, dr7) = (DB_DR6.load(Ordering::SeqCst), DB_DR7.load(Ordering::SeqCst));
    if o.traps == 0 {
        check_quirk(
            "debug-registers gd mov-from-dr0",
            o,
            DB,
            None,
            "QEMU TCG does not implement DR7.GD; the CPU gives #DB with DR6.BD (SDM Vol. 3 §17.2.4)",
        );
        probe::finish("debug-registers")
    }
    check(
        "debug-registers gd mov-from-dr0",
        o,
        DB,
        dr6 & (1 << 13) != 0 && dr7 & (1 << 13) == 0,
        format_args!("DR6 in the handler={dr6:#x} (BD=1), DR7={dr7:#x} (GD=0)"),
    );
    probe::finish("debug-registers")
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let cmdline = unsafe { machine::cmdline(info) };
    ring3::setup(handler);
    let mode = cmdline.split_whitespace().next().unwrap_or("");
    println(format_args!(
        "debug-registers: mode '{mode}', cr4={:#x}",
        machine::read_cr4()
    ));
    match mode {
        "bp" => breakpoint(),
        "gd" => general_detect(),
        _ => {}
    }

    for (n, v) in [
        (0u8, 0x1111_0000u64),
        (1, 0xFFFF_8000_0000_2222),
        (2, 0x0000_8000_0000_3333),
        (3, u64::MAX),
    ] {
        let name = match n {
            0 => "debug-registers dr0",
            1 => "debug-registers dr1",
            2 => "debug-registers dr2 non-canonical",
            _ => "debug-registers dr3 all-ones",
        };
        write_read(name, n, v, None, n, v);
    }
    write_read("debug-registers dr6 0", 6, 0, None, 6, 0xFFFF_0FF0);
    write_read(
        "debug-registers dr6 b0-b3+bs",
        6,
        0x400F,
        None,
        6,
        0xFFFF_4FFF,
    );
    write_read("debug-registers dr6 bit-32", 6, 1 << 32, GP, 6, 0xFFFF_4FFF);
    write_read("debug-registers dr7 0", 7, 0, None, 7, 0x400);
    write_read("debug-registers dr7 le+ge", 7, 0x300, None, 7, 0x700);
    write_read("debug-registers dr7 bit-32", 7, 1 << 32, GP, 7, 0x700);
    write_read("debug-registers dr4-is-dr6", 4, 0, None, 6, 0xFFFF_0FF0);
    write_read("debug-registers dr6-is-dr4", 6, 1, None, 4, 0xFFFF_0FF1);
    write_read("debug-registers dr5-is-dr7", 5, 0, None, 7, 0x400);
    write_read("debug-registers dr7-is-dr5", 7, 0x100, None, 5, 0x500);
    machine::write_cr4(machine::read_cr4() | CR4_DE);
    let (o, _) = read(4);
    check(
        "debug-registers de mov-from-dr4",
        o,
        UD,
        true,
        format_args!(""),
    );
    let o = write(5, 0);
    check(
        "debug-registers de mov-to-dr5",
        o,
        UD,
        true,
        format_args!(""),
    );
    machine::write_cr4(machine::read_cr4() & !CR4_DE);
    write(7, 0);
    write(6, 0);

    user("debug-registers user mov-from-dr7", dr_user_read, {
        dr_user_read as *const () as u64
    });
    let insn = core::ptr::addr_of!(dr_user_write_insn) as u64;
    user("debug-registers user mov-to-dr7", dr_user_write, insn);
    probe::finish("debug-registers")
}
