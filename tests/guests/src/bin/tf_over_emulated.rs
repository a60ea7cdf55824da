//! Single-stepping over the instructions a VMM emulates. With RFLAGS.TF = 1 the CPU raises a
//! single-step #DB (a trap, DR6.BS = 1) after every instruction, with the saved RIP = the next
//! instruction (SDM Vol. 3 §17.3.1.4, Table 17-2); a VMM that emulates `cli`, `sti`, `out`,
//! `in`, `mov cr3`, `wrmsr`, `pushfq`/`popfq` must deliver that #DB after each, as the CPU does.
//! The instruction that sets TF (`popfq`) is not followed by a trap (TF was 0 when it began); the
//! `popfq` that clears it is (TF was 1 when it began).
//!
//! `sti` with IF = 0 opens an interrupt shadow, and the single-step trap after it is held
//! pending with the shadow (as QEMU does natively; the SDM's VM-entry checks, Vol. 3 §27.3.1.5,
//! require a pending BS when STI blocking and TF are both set): one #DB arrives after the *next*
//! instruction.
//!
//! Command line: `dr6=0` skips reading and clearing DR6 (for a VMM that does not emulate MOV DR).
//!
//! The guest's #DB handler records each RIP and DR6.BS, clears DR6 and returns; the guest then
//! compares the list with the block's labels and exits success when they match exactly.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicUsize, Ordering};

use test_guests::machine::{self, Frame};
use test_guests::{exit, println};

const MAX: usize = 32;
static COUNT: AtomicUsize = AtomicUsize::new(0);
static mut RIPS: [u64; MAX] = [0; MAX];
static mut BS: [bool; MAX] = [false; MAX];
static mut USE_DR6: bool = true;

// The stepped block: TF on, one instruction of each kind, TF off. `tf_expected` lists the RIP
// each single-step trap must report, in order.
core::arch::global_asm!(
    r#"
.section .text
.global tf_block
tf_block:
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    nop
1:  cli
2:  sti
3:  out 0x80, al
4:  in al, 0x80
5:  mov cr3, rsi
6:  wrmsr
7:  pushfq
8:  popfq
9:  pushfq
10: and qword ptr [rsp], -0x101
11: popfq
12: ret
.section .rodata
.balign 8
.global tf_expected
tf_expected:
    .quad 1b, 2b, 4b, 5b, 6b, 7b, 8b, 9b, 10b, 11b, 12b
.section .text
"#
);

/// The instruction each trap follows (`sti` shares its trap with the `out` in its shadow).
const NAMES: [&str; 11] = [
    "nop",
    "cli",
    "sti; out",
    "in",
    "mov cr3",
    "wrmsr",
    "pushfq",
    "popfq (TF kept)",
    "pushfq",
    "and",
    "popfq (TF cleared)",
];

extern "C" {
    fn tf_block();
    static tf_expected: [u64; 11];
}

fn handler(frame: &mut Frame) {
    if frame.vector != 1 {
        machine::unexpected(frame);
    }
    let n = COUNT.fetch_add(1, Ordering::SeqCst);
    if n < MAX {
        // SAFETY: single-threaded guest; the handler runs with interrupts off and `_start`
        // reads RIPS only once TF is off.
        unsafe { RIPS[n] = frame.rip };
        // SAFETY: written once before TF is set.
        let bs = !unsafe { USE_DR6 } || machine::read_dr6() & (1 << 14) != 0;
        // SAFETY: as for RIPS.
        unsafe { BS[n] = bs };
    }
    // SAFETY: written once before TF is set.
    if unsafe { USE_DR6 } {
        machine::write_dr6(0);
    }
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let use_dr6 = !unsafe { machine::cmdline(info) }.contains("dr6=0");
    // SAFETY: single-threaded guest, before TF is set.
    unsafe { USE_DR6 = use_dr6 };
    machine::mask_pics();
    machine::install_idt(0x08);
    machine::set_handler(handler);
    if use_dr6 {
        machine::write_dr6(0);
    }
    let base = tf_block as *const () as u64;
    // SAFETY: the block only touches the stack, port 0x80 (POST diagnostics, harmless), CR3 (the
    // current value) and IA32_KERNEL_GS_BASE (zero, unused here); it restores RFLAGS.
    unsafe {
        core::arch::asm!(
            "call {f}",
            f = in(reg) tf_block as *const () as u64,
            in("rsi") machine::read_cr3(),
            in("ecx") 0xC000_0102u32,
            inout("eax") 0u32 => _,
            in("edx") 0u32,
        )
    };
    // SAFETY: a static table in .rodata.
    let expected = unsafe { &*core::ptr::addr_of!(tf_expected) };
    let n = COUNT.load(Ordering::SeqCst);
    let mut wrong = 0;
    for (i, name) in NAMES.iter().enumerate() {
        // SAFETY: the handler is done (TF is off).
        let rip = unsafe { RIPS[i] };
        // SAFETY: as above.
        let bs = unsafe { BS[i] };
        let ok = i < n && rip == expected[i] && bs;
        if !ok {
            wrong += 1;
        }
        println(format_args!(
            "tf-over-emulated: step after {name}: {} -> {}",
            if i < n {
                format_rip(rip - base, bs)
            } else {
                Rip::None
            },
            if ok { "ok" } else { "WRONG" }
        ));
    }
    let ok = wrong == 0 && n == NAMES.len();
    println(format_args!(
        "tf-over-emulated: {n} single-step traps, {} expected, {wrong} wrong -> {}",
        NAMES.len(),
        if ok { "ok" } else { "WRONG" }
    ));
    if !ok {
        let rips = core::ptr::addr_of!(RIPS);
        // SAFETY: the handler is done (TF is off).
        let rips = unsafe { *rips };
        for rip in &rips[NAMES.len().min(n)..n.min(MAX)] {
            println(format_args!(
                "tf-over-emulated: extra trap at block+{:#x}",
                rip - base
            ));
        }
    }
    exit(if ok {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}

#[derive(Debug)]
enum Rip {
    At(u64, bool),
    None,
}

fn format_rip(offset: u64, bs: bool) -> Rip {
    Rip::At(offset, bs)
}

impl core::fmt::Display for Rip {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Rip::At(o, bs) => write!(f, "#DB rip=block+{o:#x} DR6.BS={}", u8::from(*bs)),
            Rip::None => write!(f, "no #DB"),
        }
    }
}
