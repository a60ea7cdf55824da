//! An interrupt that becomes deliverable at the instruction boundary right after `mov cr3` is
//! delivered through the *new* address space: the instruction retires (CR3 loaded) before the
//! CPU looks for interrupts (SDM Vol. 3 §6.6: interrupts are taken at instruction boundaries),
//! so its frame is pushed on the kernel stack as the new tables map it.
//!
//! Two hierarchies A and B map everything identically (identity, as `PageTables::identity`)
//! except the kernel stack page at [`STACK_VA`], which A maps to frame `FRAME_A` and B to
//! `FRAME_B`; both frames stay visible at their identity addresses in both hierarchies, so the
//! guest can inspect where the frame went. With the PIT's IRQ 0 pending at the 8259 and IF = 0,
//! on the stack at `STACK_VA`: `sti; mov cr3, <other>`. STI's shadow (SDM Vol. 2B, STI) holds the
//! interrupt until after `mov cr3` retires; it is taken right then, with the saved RIP = the
//! instruction after `mov cr3` and its frame in the new hierarchy's stack frame, none in the old
//! one. Two phases: A -> B (frame in `FRAME_B`) and B -> A (frame in `FRAME_A`).
//!
//! A VMM that emulates `mov cr3` and injects the interrupt before switching its shadow tables
//! writes the frame into the old address space's stack page. Expected outcome, natively and
//! under the VMM: both phases "ok", exit success.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, Ordering};

use test_guests::machine::{self, Frame, Page, PageTables, PTE_P, PTE_W, RFLAGS_IF};
use test_guests::{exit, inb, outb, println};

/// The kernel stack's linear page (own PDPT entry: 1 GiB, outside the identity map).
const STACK_VA: u64 = 0x4000_0000;
/// The stack's top: a 64-bit interrupt at CPL 0 pushes SS, RSP, RFLAGS, CS, RIP below it.
const STACK_TOP: u64 = STACK_VA + 4096;

static mut FRAME_A: Page = Page::zeroed();
static mut FRAME_B: Page = Page::zeroed();

static IRQS: AtomicU64 = AtomicU64::new(0);
static IRQ_RIP: AtomicU64 = AtomicU64::new(0);
static IRQ_RSP: AtomicU64 = AtomicU64::new(0);
/// Linear address of the saved RIP in the handler's frame (where the CPU pushed it).
static IRQ_FRAME: AtomicU64 = AtomicU64::new(0);

// rdi = the CR3 to load, rsi = the stack top to run on. RAX keeps the caller's RSP (the trap
// stubs save and restore every register). The interrupt must arrive at `after_mov_cr3`.
core::arch::global_asm!(
    r#"
.section .text
.global cr3_switch_with_irq
cr3_switch_with_irq:
    mov rax, rsp
    mov rsp, rsi
    sti
    mov cr3, rdi
.global after_mov_cr3
after_mov_cr3:
    cli
    mov rsp, rax
    ret
"#
);

extern "C" {
    fn cr3_switch_with_irq(cr3: u64, stack_top: u64);
    static after_mov_cr3: u8;
}

fn handler(frame: &mut Frame) {
    match frame.vector {
        0x20 => {
            if IRQS.fetch_add(1, Ordering::SeqCst) == 0 {
                IRQ_RIP.store(frame.rip, Ordering::SeqCst);
                IRQ_RSP.store(frame.rsp, Ordering::SeqCst);
                IRQ_FRAME.store(core::ptr::addr_of!(frame.rip) as u64, Ordering::SeqCst);
            }
            outb(0x20, 0x20);
        }
        _ => machine::unexpected(frame),
    }
}

fn page(p: *mut Page) -> &'static mut [u64; 512] {
    // SAFETY: the two static frames, identity-mapped in both hierarchies; single-threaded guest,
    // never touched while the stack at STACK_VA runs on them.
    unsafe { &mut *p.cast::<[u64; 512]>() }
}

/// Waits with IF = 0 until the 8259 holds IRQ 0's request.
fn wait_irq0_pending() -> bool {
    for _ in 0..10_000_000 {
        outb(0x20, 0x0A); // OCW3: read IRR
        if inb(0x20) & 1 != 0 {
            return true;
        }
    }
    false
}

/// One switch `from` -> `to` with IRQ 0 pending; returns whether the frame is where the CPU puts
/// it (in `new`'s frame, none in `old`'s).
fn phase(name: &str, from: &PageTables, to: &PageTables, old: *mut Page, new: *mut Page) -> bool {
    page(old).fill(0);
    page(new).fill(0);
    IRQS.store(0, Ordering::SeqCst);
    IRQ_RIP.store(0, Ordering::SeqCst);
    from.load();
    if !wait_irq0_pending() {
        println(format_args!(
            "interrupt-after-mov-cr3 {name}: IRQ 0 never became pending -> WRONG"
        ));
        return false;
    }
    // SAFETY: IF = 0 and IRQ 0 pending; both hierarchies map the code, data and the stack page
    // (to different frames); the handler only records and EOIs, then returns to after_mov_cr3,
    // which goes back to the caller's stack.
    unsafe { cr3_switch_with_irq(to.root, STACK_TOP) };
    let after = core::ptr::addr_of!(after_mov_cr3) as u64;
    let irqs = IRQS.load(Ordering::SeqCst);
    let rip = IRQ_RIP.load(Ordering::SeqCst);
    let rsp = IRQ_RSP.load(Ordering::SeqCst);
    let at = IRQ_FRAME.load(Ordering::SeqCst);
    let (new_p, old_p) = (page(new), page(old));
    // The CPU's frame: RIP, CS, RFLAGS, RSP, SS ending at STACK_TOP.
    let slot = |p: &[u64; 512], i: usize| p[512 - 5 + i];
    let new_frame = [0, 1, 2, 3, 4].map(|i| slot(new_p, i));
    let new_ok = new_frame[0] == after
        && new_frame[1] == 0x08
        && new_frame[2] & RFLAGS_IF != 0
        && new_frame[3] == STACK_TOP
        && new_frame[4] == 0x10;
    let old_hits = old_p.iter().filter(|&&w| w == after).count();
    let ok = irqs >= 1
        && rip == after
        && rsp == STACK_TOP
        && at == STACK_TOP - 40
        && new_ok
        && old_hits == 0;
    println(format_args!(
        "interrupt-after-mov-cr3 {name}: irqs={irqs} first at rip=after_mov_cr3{:+} rsp={rsp:#x} frame at {at:#x}; new frame holds [rip cs rflags rsp ss]=[after{:+} {:#x} {:#x} {:#x} {:#x}] ({}), old frame holds that rip {old_hits} times -> {}",
        rip.wrapping_sub(after) as i64,
        new_frame[0].wrapping_sub(after) as i64,
        new_frame[1],
        new_frame[2],
        new_frame[3],
        new_frame[4],
        if new_ok { "the CPU's frame" } else { "not the CPU's frame" },
        if ok { "ok" } else { "WRONG" }
    ));
    ok
}

#[no_mangle]
extern "C" fn _start() -> ! {
    machine::mask_pics();
    machine::install_idt(0x08);
    machine::set_handler(handler);
    let (fa, fb) = (
        core::ptr::addr_of_mut!(FRAME_A),
        core::ptr::addr_of_mut!(FRAME_B),
    );
    let a = PageTables::identity();
    a.map(STACK_VA, fa as u64, PTE_P | PTE_W);
    let b = PageTables::identity();
    b.map(STACK_VA, fb as u64, PTE_P | PTE_W);
    println(format_args!(
        "interrupt-after-mov-cr3: A={:#x} maps {STACK_VA:#x} to {:#x}, B={:#x} to {:#x}; after_mov_cr3={:#x}",
        a.root,
        fa as u64,
        b.root,
        fb as u64,
        core::ptr::addr_of!(after_mov_cr3) as u64
    ));

    // PIT at 1 kHz on IRQ 0 (vector 0x20); each phase waits with IF = 0 until it is pending.
    machine::remap_pics(0xFE);
    machine::start_pit(1000);
    let ab = phase("A->B", &a, &b, fa, fb);
    let ba = phase("B->A", &b, &a, fb, fa);
    machine::mask_pics();
    let ok = ab && ba;
    println(format_args!(
        "interrupt-after-mov-cr3: the interrupt after mov cr3 went through the new address space: {}",
        if ok { "ok" } else { "WRONG" }
    ));
    exit(if ok {
        boot::exit_code::SUCCESS
    } else {
        boot::exit_code::FAILURE
    })
}
