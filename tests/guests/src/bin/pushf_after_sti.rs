//! `sti; pushfq` must push RFLAGS with IF = 1 and TF = 0 (SDM Vol. 2B, PUSHF: the flags as they
//! are; nobody set TF), and putting those flags back with `popfq` must not start single-stepping
//! (no #DB). A VMM that opens an "interrupt window" after an emulated STI by setting the real TF
//! for one instruction leaks that TF into the guest's `pushfq`.
//!
//! Two phases: with the 8259s masked (no interrupt waiting), and with the PIT's IRQ 0 already
//! pending when STI executes: the interrupt is then taken right after the instruction in STI's
//! shadow (SDM Vol. 2B, STI; Vol. 3 §6.8.3), i.e. with the saved RIP = the instruction after
//! `pushfq`. The guest exits success when both phases see TF = 0, IF = 1, no #DB, and the
//! interrupt (phase 2) arrives at that RIP.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use test_guests::machine::{self, Frame, RFLAGS_IF, RFLAGS_TF};
use test_guests::{exit, inb, outb, println};

static DEBUG_TRAPS: AtomicU64 = AtomicU64::new(0);
static IRQS: AtomicU64 = AtomicU64::new(0);
static IRQ_RIP: AtomicU64 = AtomicU64::new(0);

core::arch::global_asm!(
    r#"
.section .text
.global sti_pushf
sti_pushf:
    cli
    sti
    pushfq
.global after_pushf
after_pushf:
    pop rax
    cli
    push rax
    and qword ptr [rsp], -0x201
    popfq
    nop
    ret
"#
);

extern "C" {
    fn sti_pushf() -> u64;
    static after_pushf: u8;
}

fn handler(frame: &mut Frame) {
    match frame.vector {
        1 => {
            DEBUG_TRAPS.fetch_add(1, Ordering::SeqCst);
            frame.rflags &= !RFLAGS_TF;
        }
        0x20 => {
            if IRQS.fetch_add(1, Ordering::SeqCst) == 0 {
                IRQ_RIP.store(frame.rip, Ordering::SeqCst);
            }
            outb(0x20, 0x20);
        }
        _ => machine::unexpected(frame),
    }
}

/// Runs the sequence; returns whether the phase is as on the CPU.
fn phase(name: &str, irq_pending: bool) -> bool {
    // SAFETY: cli; sti; pushfq; pop; cli; popfq of the pushed flags with IF cleared (TF as
    // pushed); only the stack is touched.
    let flags = unsafe { sti_pushf() };
    let irqs = IRQS.load(Ordering::SeqCst);
    let irq_rip = IRQ_RIP.load(Ordering::SeqCst);
    let after = core::ptr::addr_of!(after_pushf) as u64;
    let dbs = DEBUG_TRAPS.load(Ordering::SeqCst);
    let ok = flags & RFLAGS_TF == 0
        && flags & RFLAGS_IF != 0
        && dbs == 0
        && (!irq_pending || (irqs >= 1 && irq_rip == after));
    println(format_args!(
        "pushf-after-sti {name}: pushed rflags={flags:#x} TF={} IF={} #DB={dbs} irqs={irqs}{} -> {}",
        u8::from(flags & RFLAGS_TF != 0),
        u8::from(flags & RFLAGS_IF != 0),
        if !irq_pending {
            ""
        } else if irq_rip == after {
            " first irq after pushfq"
        } else {
            " first irq elsewhere"
        },
        if ok { "ok" } else { "WRONG" }
    ));
    ok
}

#[no_mangle]
extern "C" fn _start() -> ! {
    machine::mask_pics();
    machine::install_idt(0x08);
    machine::set_handler(handler);
    let quiet = phase("no-irq", false);

    // PIT at 1 kHz on IRQ 0 (vector 0x20); wait with IF = 0 until the 8259 holds the request.
    machine::remap_pics(0xFE);
    machine::start_pit(1000);
    let mut pending = false;
    for _ in 0..10_000_000 {
        outb(0x20, 0x0A); // OCW3: read IRR
        if inb(0x20) & 1 != 0 {
            pending = true;
            break;
        }
    }
    if !pending {
        println(format_args!("pushf-after-sti: IRQ 0 never became pending"));
        exit(boot::exit_code::FAILURE);
    }
    let with_irq = phase("irq-pending", true);
    machine::mask_pics();
    exit(if quiet && with_irq {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
