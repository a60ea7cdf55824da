//! An interrupt storm from another source than the timer: COM1's transmitter-empty interrupt on
//! IRQ 4, re-armed by the handler itself so that every EOI is followed at once by the next
//! interrupt.
//!
//! The 16550's THR-empty interrupt is pending while IER.ETBEI is set and THR is empty; reading
//! IIR while it is the source clears it, and enabling it again while THR is empty raises it
//! again. The PC's 8259 is edge-triggered, so the handler makes an edge each time: it reads IIR
//! (the line drops), writes IER = 0 and then IER = ETBEI (the line rises), and sends the EOI.
//! On the CPU the next interrupt is taken right after the handler's IRETQ (no shadow after
//! IRET, SDM Vol. 3 §6.8.3); the main loop `sti; hlt`s until the storm has run `STORM`
//! interrupts, when the handler stops re-arming. Then, with interrupts on and IER = 0, the guest
//! checks that no further IRQ 4 comes during a loop of plain work.
//!
//! A VMM that emulates the UART and the 8259 must deliver exactly one interrupt per edge —
//! none lost, none doubled — and neither hang nor starve the guest. Expected outcome, natively
//! and under the VMM: `uart-irq-storm: 5000 interrupts, IIR 0x2 in each; 0 after the source was
//! disabled -> ok`, exit success.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use test_guests::machine::{self, Frame};
use test_guests::{exit, inb, outb, println, ring3};

/// IRQ 4 after `remap_pics` (master base 0x20).
const COM1_VECTOR: u64 = 0x24;
const COM1: u16 = 0x3F8;
const IER: u16 = COM1 + 1;
const IIR: u16 = COM1 + 2;
const MCR: u16 = COM1 + 4;
/// IER.ETBEI: interrupt when THR is empty.
const IER_THR_EMPTY: u8 = 0x02;
/// MCR.OUT2: the PC routes the UART's interrupt to the 8259 only with it set.
const MCR_OUT2: u8 = 0x08;
/// IIR with the THR-empty interrupt pending (bit 0 = 0: pending; bits 3:1 = 001).
const IIR_THR_EMPTY: u8 = 0x02;
/// Interrupts in the storm.
const STORM: u64 = 5000;

static COUNT: AtomicU64 = AtomicU64::new(0);
static WRONG_IIR: AtomicU64 = AtomicU64::new(0);

fn handler(frame: &mut Frame) {
    if frame.vector != COM1_VECTOR {
        machine::unexpected(frame)
    }
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    // Reading IIR names the source and clears the THR-empty condition: the line drops.
    if inb(IIR) & 0x0F != IIR_THR_EMPTY {
        WRONG_IIR.fetch_add(1, Ordering::SeqCst);
    }
    outb(IER, 0);
    if n < STORM {
        outb(IER, IER_THR_EMPTY); // enabled with THR empty: pending again, the line rises
    }
    outb(0x20, 0x20); // EOI to the master 8259
}

#[no_mangle]
extern "C" fn _start() -> ! {
    ring3::setup(handler);
    // Nothing printed during the storm: a write to THR would itself re-raise the interrupt.
    println(format_args!(
        "uart-irq-storm: COM1 THR-empty interrupt on IRQ 4, re-armed by the handler {STORM} times"
    ));
    machine::remap_pics(!(1 << 4));
    let mcr = inb(MCR);
    outb(MCR, mcr | MCR_OUT2);
    outb(IER, IER_THR_EMPTY);
    while COUNT.load(Ordering::SeqCst) < STORM {
        // SAFETY: the IDT handles the COM1 vector; `sti; hlt` waits for the next interrupt
        // (STI's shadow covers the HLT, so none slips in between).
        unsafe { core::arch::asm!("sti", "hlt", "cli", options(nomem, nostack)) };
    }
    let stormed = COUNT.load(Ordering::SeqCst);
    let mut sum = 0u64;
    // SAFETY: interrupts on for the loop; with IER = 0 no IRQ 4 may come.
    unsafe { core::arch::asm!("sti", options(nomem, nostack)) };
    for i in 0..100_000u64 {
        sum = core::hint::black_box(sum.wrapping_add(i));
    }
    // SAFETY: interrupts off again.
    unsafe { core::arch::asm!("cli", options(nomem, nostack)) };
    let after = COUNT.load(Ordering::SeqCst) - stormed;
    machine::mask_pics();
    outb(MCR, mcr);
    let wrong_iir = WRONG_IIR.load(Ordering::SeqCst);
    let ok = stormed == STORM && wrong_iir == 0 && after == 0 && sum == 100_000 * 99_999 / 2;
    println(format_args!(
        "uart-irq-storm: {stormed} interrupts, IIR {IIR_THR_EMPTY:#x} in {}; {after} after the \
         source was disabled -> {}",
        if wrong_iir == 0 { "each" } else { "NOT each" },
        if ok { "ok" } else { "WRONG" }
    ));
    exit(if ok {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
