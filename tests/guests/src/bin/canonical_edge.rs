//! An instruction the VMM emulates, placed as the last bytes of the last page below the
//! non-canonical hole (0x0000_7FFF_FFFF_F000, mapped supervisor, executable), so that after it
//! RIP = 0x0000_8000_0000_0000. On the CPU the instruction completes (its effect is visible) and
//! the next fetch raises #GP(0) (SDM Vol. 3 §6.15 "Interrupt 13", Vol. 1 §3.3.7.1: a non-canonical
//! linear address for an instruction fetch is #GP); the saved RIP is the non-canonical
//! 0x0000_8000_0000_0000 (what QEMU reports natively; see the test). A VMM that steps RIP past the
//! emulated instruction and returns there with its own IRETQ must not fault in its own ring 0.
//!
//! Command line: `insn=cli|sti|out|movcr3` (1, 1, 2 and 3 bytes: `fa`, `fb`, `e6 80`, `0f 22 d8`).
//! The #GP handler checks vector, error code, RIP and the instruction's effect, prints them and
//! exits success when all are as on the CPU.
#![no_std]
#![no_main]

use test_guests::machine::{self, Frame, Page, PageTables, PTE_P, PTE_W, RFLAGS_IF};
use test_guests::{exit, println};

const EDGE: u64 = 0x0000_7FFF_FFFF_F000;
const HOLE: u64 = 0x0000_8000_0000_0000;

static mut CODE: Page = Page::zeroed();
static mut NAME: &str = "";

fn handler(frame: &mut Frame) {
    // SAFETY: written once before the jump.
    let name = unsafe { NAME };
    let if_set = frame.rflags & RFLAGS_IF != 0;
    let effect_ok = match name {
        "cli" => !if_set,
        "sti" => if_set,
        _ => true,
    };
    let ok = frame.vector == 13 && frame.error == 0 && frame.rip == HOLE && effect_ok;
    machine::report(name, frame);
    println(format_args!(
        "canonical-edge {name}: #GP={} error={:#x} rip={:#x} (hole {:#x}) IF={} -> {}",
        frame.vector == 13,
        frame.error,
        frame.rip,
        HOLE,
        u8::from(if_set),
        if ok { "ok" } else { "WRONG" }
    ));
    exit(if ok {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let cmdline = unsafe { machine::cmdline(info) };
    let name = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("insn="))
        .unwrap_or("cli");
    let bytes: &[u8] = match name {
        "cli" => &[0xFA],
        "sti" => &[0xFB],
        "out" => &[0xE6, 0x80],
        "movcr3" => &[0x0F, 0x22, 0xD8],
        _ => {
            println(format_args!("canonical-edge: unknown insn={name}"));
            exit(boot::exit_code::FAILURE)
        }
    };
    machine::mask_pics();
    machine::install_idt(0x08);
    machine::set_handler(handler);
    let pt = PageTables::identity();
    pt.map(EDGE, core::ptr::addr_of!(CODE) as u64, PTE_P | PTE_W);
    pt.load();
    // SAFETY: single-threaded guest; the handler that reads NAME runs only after the jump below.
    unsafe { NAME = name };
    let code = core::ptr::addr_of_mut!(CODE);
    // SAFETY: single-threaded guest; the page is ours and not yet executed, and nothing else
    // holds a reference to it.
    let code = unsafe { &mut *code };
    code.0[4096 - bytes.len()..].copy_from_slice(bytes);
    let at = HOLE - bytes.len() as u64;
    println(format_args!(
        "canonical-edge {name}: {} byte(s) at {at:#x}, IF={}",
        bytes.len(),
        u8::from(machine::rflags() & RFLAGS_IF != 0)
    ));
    let rflags: u64 = if name == "cli" { 0x202 } else { 0x2 };
    // SAFETY: jumps to the instruction at the edge with the flags set (cli starts with IF = 1 so
    // that its effect shows); the only way on is the #GP into `handler`, which exits.
    unsafe {
        core::arch::asm!(
            "push {f}",
            "popfq",
            "jmp {target}",
            f = in(reg) rflags,
            target = in(reg) at,
            in("rax") machine::read_cr3(),
            options(noreturn)
        )
    }
}
