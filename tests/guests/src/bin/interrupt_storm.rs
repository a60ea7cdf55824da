//! An interrupt storm: the PIT at its fastest periodic rate (mode 2, divisor 2: about 600 000
//! interrupts a second) on IRQ 0, unmasked, with interrupts enabled; the IRQ handler counts and
//! sends the EOI. The guest waits with `sti; hlt` until 500 interrupts have arrived, then runs a
//! loop of plain work with interrupts on and checks it finishes while the storm goes on (the
//! storm must not starve the guest), then masks IRQ 0 and exits.
//!
//! On the CPU each interrupt is taken at an instruction boundary with IF = 1 and the 8259
//! raises the next once the EOI has been sent (SDM Vol. 3 §6.6, §6.8.1). A VMM that emulates
//! the PIT and the 8259 must neither spend all its time injecting (the guest makes progress) nor
//! queue up work per missed tick without bound (the host stays responsive). Expected outcome
//! under the VMM: `interrupt-storm: 500 interrupts while halted; 1000000 loop iterations with the
//! storm on -> ok`, exit success. Not natively: QEMU's TCG delivers the PIT by the host's clock,
//! and on a loaded host the storm can starve the guest for good (its loop never ends), so the
//! native run is no reference here.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use test_guests::machine::{self, Frame};
use test_guests::{exit, outb, println, ring3};

/// IRQ 0 after `remap_pics`.
const TIMER_VECTOR: u64 = 0x20;
/// How many interrupts to wait for with `hlt`.
const WAIT_FOR: u64 = 500;
/// How many iterations of plain work with the storm on.
const WORK: u64 = 1_000_000;

static TICKS: AtomicU64 = AtomicU64::new(0);

fn handler(frame: &mut Frame) {
    if frame.vector != TIMER_VECTOR {
        machine::unexpected(frame)
    }
    TICKS.fetch_add(1, Ordering::SeqCst);
    outb(0x20, 0x20); // EOI to the master 8259
}

fn sti_hlt() {
    // SAFETY: the IDT handles the timer vector; `sti; hlt` waits for the next interrupt (STI's
    // shadow covers the HLT, so none slips in between).
    unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
}

#[no_mangle]
extern "C" fn _start() -> ! {
    ring3::setup(handler);
    machine::remap_pics(0xFE);
    // Mode 2 (rate generator), divisor 2: the fastest periodic rate (divisor 1 is not allowed).
    outb(0x43, 0x34);
    outb(0x40, 2);
    outb(0x40, 0);
    while TICKS.load(Ordering::SeqCst) < WAIT_FOR {
        sti_hlt();
    }
    let halted = TICKS.load(Ordering::SeqCst);
    let mut sum = 0u64;
    // SAFETY: interrupts on for the loop; the handler only counts and EOIs.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    for i in 0..WORK {
        sum = core::hint::black_box(sum.wrapping_add(i));
    }
    // SAFETY: interrupts off again.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    machine::mask_pics();
    let ok = halted >= WAIT_FOR && sum == WORK * (WORK - 1) / 2;
    println(format_args!(
        "interrupt-storm: {WAIT_FOR} interrupts while halted; {WORK} loop iterations with the storm on -> {}",
        if ok { "ok" } else { "WRONG" }
    ));
    exit(if ok {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
