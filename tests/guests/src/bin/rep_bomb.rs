//! `rep outsb` and `rep insb` with RCX = 2^64 - 1 to port 0x80 (POST diagnostics, harmless),
//! their memory operand 256 bytes before an unmapped page: on the CPU each runs 256 iterations
//! and then raises #PF on the first byte of the unmapped page, with RIP = the REP instruction
//! and RCX/RSI/RDI updated for the iterations done, so that the instruction restarts where it
//! stopped (SDM Vol. 2B, REP: "the instruction is restartable"; Vol. 3 §6.15 "Interrupt 14": the
//! error code: not present, read (OUTS) or write (INS), supervisor). A VMM that emulates the
//! string instruction must not loop 2^64 times in the host: the guest must get its #PF.
//!
//! The #PF handler records the frame and skips the 2-byte instruction; the guest checks vector,
//! error code, CR2, RIP, RCX and RSI/RDI for both and exits success when all are as on the CPU.
#![no_std]
#![no_main]

use test_guests::machine::{self, Frame, Page, PageTables, PTE_P, PTE_W};
use test_guests::{exit, println};

/// A page mapped at `WINDOW`; the page after it is not mapped.
static mut BUFFER: Page = Page::zeroed();
const WINDOW: u64 = 0x0000_0040_0000_0000;
const EDGE: u64 = WINDOW + 4096;
const LEFT: u64 = 256;

static mut SEEN: Option<(Frame, u64)> = None;

fn handler(frame: &mut Frame) {
    if frame.vector != 14 {
        machine::unexpected(frame);
    }
    // SAFETY: single-threaded guest; interrupts are off in the handler.
    unsafe { SEEN = Some((*frame, machine::read_cr2())) };
    frame.rip += 2; // skip the REP string instruction: done with it
}

fn run(name: &str, error: u64, rip: u64, after: fn() -> u64) -> bool {
    let _ = after();
    let seen = core::ptr::addr_of!(SEEN);
    // SAFETY: written by the handler, which is done.
    let Some((f, cr2)) = (unsafe { seen.read() }) else {
        println(format_args!("rep-bomb {name}: no #PF (wrong)"));
        return false;
    };
    // SAFETY: as above.
    unsafe { SEEN = None };
    let index = if name == "outsb" { f.rsi } else { f.rdi };
    let ok = f.vector == 14
        && f.error == error
        && cr2 == EDGE
        && f.rip == rip
        && f.rcx == u64::MAX - LEFT
        && index == EDGE;
    println(format_args!(
        "rep-bomb {name}: #PF error={:#x} cr2={cr2:#x} rip=insn{:+} rcx=2^64-1-{} index={:#x} -> {}",
        f.error,
        f.rip.wrapping_sub(rip) as i64,
        u64::MAX - f.rcx,
        index,
        if ok { "ok" } else { "WRONG" }
    ));
    ok
}

core::arch::global_asm!(
    r#"
.section .text
.global rep_outsb
rep_outsb:
    mov dx, 0x80
    mov rcx, -1
.global rep_outsb_insn
rep_outsb_insn:
    rep outsb
    mov rax, rcx
    ret
.global rep_insb
rep_insb:
    mov dx, 0x80
    mov rcx, -1
.global rep_insb_insn
rep_insb_insn:
    rep insb
    mov rax, rcx
    ret
"#
);

extern "C" {
    fn rep_outsb(rsi: u64) -> u64;
    fn rep_insb(rdi: u64) -> u64;
    static rep_outsb_insn: u8;
    static rep_insb_insn: u8;
}

fn outs() -> u64 {
    let r: u64;
    // SAFETY: reads the mapped window up to the unmapped page, where the #PF handler skips it.
    unsafe {
        core::arch::asm!("call {f}", f = in(reg) rep_outsb as *const () as u64,
            in("rsi") EDGE - LEFT, out("rax") r, out("rcx") _, out("rdx") _)
    };
    r
}

fn ins() -> u64 {
    let r: u64;
    // SAFETY: writes the mapped window (our buffer) up to the unmapped page, as above.
    unsafe {
        core::arch::asm!("call {f}", f = in(reg) rep_insb as *const () as u64,
            inout("rdi") EDGE - LEFT => _, out("rax") r, out("rcx") _, out("rdx") _)
    };
    r
}

#[no_mangle]
extern "C" fn _start() -> ! {
    machine::mask_pics();
    machine::install_idt(0x08);
    machine::set_handler(handler);
    let pt = PageTables::identity();
    pt.map(WINDOW, core::ptr::addr_of!(BUFFER) as u64, PTE_P | PTE_W);
    pt.load();
    println(format_args!(
        "rep-bomb: rep outsb / rep insb, rcx=2^64-1, port 0x80, {LEFT} bytes before the unmapped {EDGE:#x}"
    ));
    let a = run("outsb", 0, core::ptr::addr_of!(rep_outsb_insn) as u64, outs);
    let b = run("insb", 2, core::ptr::addr_of!(rep_insb_insn) as u64, ins);
    exit(if a && b {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
