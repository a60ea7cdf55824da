//! An LDT and a call gate that are present and used: the descriptor kinds a shadow-GDT VMM
//! handles least often (SDM Vol. 3 §3.5.1 the LDT, §5.8.3 call gates, §5.8.6 64-bit call gates).
//!
//! The GDT holds the ring-3 layout, an LDT descriptor (0x38, 16 bytes) and a 64-bit call gate
//! (0x48, DPL 3, to kernel code). The LDT holds: 0x0c a DPL-0 data segment with base
//! 0x12345000, 0x14 a DPL-3 data segment, 0x1c a not-present data segment, 0x24 64-bit DPL-3
//! code; its limit ends it at index 4. Probes at CPL 0, then at CPL 3:
//!
//! | probe | expected |
//! |---|---|
//! | `lldt 0x38` | loads; `sldt` reads 0x38 |
//! | `mov ds, 0x0c` | loads; DS reads 0x0c (under trap-and-emulate 0: a named hole) |
//! | `mov fs, 0x0c` | loads; IA32_FS_BASE = 0x12345000 (the descriptor's base, §3.4.4) |
//! | `mov es, 0x17` (DPL 3, RPL 3) | loads |
//! | `mov ds, 0x1c` | #NP(0x1c) |
//! | `mov ds, 0x3c` (index 7, past the LDT's limit) | #GP(0x3c) |
//! | CPL 3: `mov ds, 0x0f` (DPL 0 < CPL 3) | #GP(0x0c) |
//! | CPL 3: `mov ds, 0x17` | loads; DS reads 0x17 (under trap-and-emulate 0, as above) |
//!
//! Then the uses a trap-and-emulate VMM does not offer, each natively and, under the VMM, a
//! clean stop (the guest runs one of them when given `use=NAME`, all of them natively with
//! `use=all`):
//! - `ldt-ss`: `mov ss, 0x0c` at CPL 0 — natively loads; under the VMM "stack segment from the
//!   LDT" stop (the real LDTR stays null: the VMM cannot run on an LDT segment);
//! - `ldt-cs`: IRETQ to CS = 0x27 (LDT code) at CPL 3 — natively the user code runs with CS
//!   0x27; under the VMM a stop;
//! - `call-gate`: from CPL 3 a far CALL through the gate — natively arrives at CPL 0 with the
//!   caller's SS:RSP and CS:RIP pushed on TSS.RSP0 (§5.8.6); under the VMM a stop ("far transfer
//!   through a call gate").
//!
//! Expected outcome: every probe `-> ok`, `ldt-and-call-gates: N checks, 0 wrong`, exit
//! success (natively and under the VMM with no `use=`), and the `use=` lines below.
#![no_std]
#![no_main]

use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use test_guests::machine::{self, code64, data, Frame, Page};
use test_guests::{exit, println, probe, rdmsr, ring3};

const GP: u64 = 13;
const NP: u64 = 11;
const LDT_SELECTOR: u16 = 0x38;
const GATE_SELECTOR: u16 = 0x48;
/// The DPL-0 data segment in the LDT (index 1, TI = 1, RPL 0) and its base.
const LDT_KDATA: u16 = 0x0c;
const LDT_KDATA_BASE: u64 = 0x1234_5000;
/// The DPL-3 data segment in the LDT (index 2, RPL 3).
const LDT_UDATA: u16 = 0x17;
/// The not-present data segment (index 3).
const LDT_ABSENT: u16 = 0x1c;
/// The 64-bit DPL-3 code segment (index 4, RPL 3).
const LDT_UCODE: u16 = 0x27;
/// Index 7: past the LDT's limit.
const LDT_BEYOND: u16 = 0x3c;

/// A data descriptor with a 32-bit base (§3.4.5: base 15:0 in bits 31:16, 23:16 in 39:32,
/// 31:24 in 63:56).
const fn with_base(descriptor: u64, base: u64) -> u64 {
    descriptor
        | ((base & 0xFFFF) << 16)
        | (((base >> 16) & 0xFF) << 32)
        | (((base >> 24) & 0xFF) << 56)
}

#[repr(C, align(16))]
struct Ldt([u64; 5]);
static LDT: Ldt = Ldt([
    0,
    with_base(data(0), LDT_KDATA_BASE),
    data(3),
    data(0) & !(1 << 47),
    code64(3),
]);

/// A 16-byte system descriptor (LDT: type 2) for `base` and `limit` (§7.2.3, §3.5).
fn system_descriptor(base: u64, limit: u64, typ: u64, dpl: u64) -> [u64; 2] {
    [
        (limit & 0xFFFF)
            | ((base & 0xFF_FFFF) << 16)
            | (typ << 40)
            | (dpl << 45)
            | (1 << 47)
            | (((limit >> 16) & 0xF) << 48)
            | (((base >> 24) & 0xFF) << 56),
        base >> 32,
    ]
}

/// A 64-bit call gate (type 0xC) to `selector:offset` with this DPL (§5.8.3.1).
fn call_gate(selector: u16, offset: u64, dpl: u64) -> [u64; 2] {
    [
        (offset & 0xFFFF)
            | (u64::from(selector) << 16)
            | (0xC << 40)
            | (dpl << 45)
            | (1 << 47)
            | (((offset >> 16) & 0xFFFF) << 48),
        offset >> 32,
    ]
}

// User code (CPL 3) and the gate's kernel target.
core::arch::global_asm!(
    r#"
.section .utext, "ax"
.global user_load_kdata
user_load_kdata:
    mov eax, 0x0f
    mov ds, eax
    ud2
.global user_load_udata
user_load_udata:
    mov eax, 0x17
    mov ds, eax
    mov eax, ds
    ud2
.global user_call_gate
user_call_gate:
    // REX.W FF /3: CALL m16:64, RIP-relative (7 bytes; written out, the assemblers disagree on
    // the mnemonic).
    .byte 0x48, 0xff, 0x1d
    .long gate_pointer - 1f
1:
    ud2
gate_pointer:
    .quad 0
    .word {gate}
.global user_on_ldt_code
user_on_ldt_code:
    mov eax, cs
    ud2
.section .text
.global gate_target
gate_target:
    ud2
"#,
    gate = const GATE_SELECTOR | 3,
);

extern "C" {
    fn user_load_kdata();
    fn user_load_udata();
    fn user_call_gate();
    fn user_on_ldt_code();
    fn gate_target();
}

/// What the stop-phase's handler saw: CS, then four more words (see each phase).
static SEEN: [AtomicU64; 5] = [const { AtomicU64::new(0) }; 5];
/// The `use=` phase running (index into USES + 1; 0: none).
static RUNNING: AtomicUsize = AtomicUsize::new(0);
static mut KERNEL_STACK: [Page; 2] = [const { Page::zeroed() }; 2];

fn handler(frame: &mut Frame) {
    if probe::record(frame) {
        probe::skip(frame);
        return;
    }
    if ring3::catch(frame) {
        return;
    }
    // A `use=` phase's arrival: at the gate's target (CPL 0, the gate's frame on the stack) or
    // the `ud2` of the user code running on the LDT code segment.
    if frame.vector == 6 && RUNNING.load(Ordering::SeqCst) != 0 {
        SEEN[0].store(frame.cs, Ordering::SeqCst);
        if frame.rip == gate_target as *const () as u64 {
            // The call gate pushed SS, RSP, CS, RIP on TSS.RSP0; RIP is lowest.
            let pushed = frame.rsp as *const [u64; 4];
            // SAFETY: frame.rsp is the kernel stack the gate switched to, holding those 4 words.
            let words = unsafe { pushed.read() };
            for (seen, word) in SEEN[1..].iter().zip(words) {
                seen.store(word, Ordering::SeqCst);
            }
        } else {
            SEEN[1].store(frame.rax & 0xFFFF, Ordering::SeqCst);
        }
        let top = core::ptr::addr_of!(KERNEL_STACK) as u64 + 8192;
        frame.resume_kernel(after_use, ring3::KERNEL_CS, ring3::KERNEL_DS, top);
        return;
    }
    machine::unexpected(frame)
}

fn reset_data_segments() {
    // SAFETY: the kernel data selector of the loaded GDT; FS null.
    unsafe {
        core::arch::asm!(
            "mov ds, {0:e}", "mov es, {0:e}", "mov fs, {1:e}",
            in(reg) u32::from(ring3::KERNEL_DS), in(reg) 0u32, options(nostack)
        )
    };
}

fn read_selector_ds() -> u16 {
    let v: u32;
    // SAFETY: reads DS.
    unsafe { core::arch::asm!("mov {0:e}, ds", out(reg) v, options(nomem, nostack)) };
    v as u16
}

/// A data-segment selector loaded from the LDT reads back as loaded on the CPU; under
/// trap-and-emulate it reads back as null, a named hole: the VMM emulates the load against the
/// guest's LDT, but the real LDTR is null, so the real register holds the null selector
/// (docs/virtualization-holes.md).
fn read_back(selector: u16) -> &'static str {
    if selector == 0 {
        " (the named hole: an LDT selector reads back as null under trap-and-emulate)"
    } else {
        ""
    }
}

fn probes() {
    let outcome = probe!("lldt {s:x}"; s = in(reg) LDT_SELECTOR,);
    let ldtr: u16;
    // SAFETY: reads LDTR.
    unsafe { core::arch::asm!("sldt {0:x}", out(reg) ldtr, options(nomem, nostack)) };
    probe::check(
        "ldt-and-call-gates lldt 0x38",
        outcome,
        None,
        ldtr == LDT_SELECTOR,
        format_args!("sldt={ldtr:#x}"),
    );
    let outcome = probe!("mov ds, {s:e}"; s = in(reg) u32::from(LDT_KDATA),);
    let ds = read_selector_ds();
    reset_data_segments();
    probe::check(
        "ldt-and-call-gates mov ds, 0x0c",
        outcome,
        None,
        ds == LDT_KDATA || ds == 0,
        format_args!("ds={ds:#x}{}", read_back(ds)),
    );
    let outcome = probe!("mov fs, {s:e}"; s = in(reg) u32::from(LDT_KDATA),);
    let fs_base = rdmsr(0xC000_0100);
    reset_data_segments();
    probe::check(
        "ldt-and-call-gates mov fs, 0x0c",
        outcome,
        None,
        fs_base == LDT_KDATA_BASE,
        format_args!("fs.base={fs_base:#x}"),
    );
    let outcome = probe!("mov es, {s:e}"; s = in(reg) u32::from(LDT_UDATA),);
    reset_data_segments();
    probe::check(
        "ldt-and-call-gates mov es, 0x17",
        outcome,
        None,
        true,
        format_args!(""),
    );
    for (name, sel, vector) in [
        ("ldt-and-call-gates mov ds, 0x1c (absent)", LDT_ABSENT, NP),
        (
            "ldt-and-call-gates mov ds, 0x3c (past the limit)",
            LDT_BEYOND,
            GP,
        ),
    ] {
        let outcome = probe!("mov ds, {s:e}"; s = in(reg) u32::from(sel),);
        reset_data_segments();
        probe::check(
            name,
            outcome,
            Some((vector, u64::from(sel))),
            true,
            format_args!(""),
        );
    }
    let user = ring3::enter(user_load_kdata, 0x2);
    probe::check(
        "ldt-and-call-gates user mov ds, 0x0f",
        probe::Outcome::from_frame(&user, user_load_kdata as *const () as u64 + 5),
        Some((GP, u64::from(LDT_KDATA))),
        true,
        format_args!(""),
    );
    let user = ring3::enter(user_load_udata, 0x2);
    // Expected: the loads retire and the `ud2` after them is the first exception.
    let outcome = if user.vector == 6 {
        probe::Outcome::NO_FAULT
    } else {
        probe::Outcome::from_frame(&user, user_load_udata as *const () as u64 + 5)
    };
    probe::check(
        "ldt-and-call-gates user mov ds, 0x17",
        outcome,
        None,
        matches!(user.rax & 0xFFFF, 0 | 0x17),
        format_args!(
            "ds={:#x}{}",
            user.rax & 0xFFFF,
            read_back((user.rax & 0xFFFF) as u16)
        ),
    );
}

const USES: [&str; 3] = ["ldt-ss", "ldt-cs", "call-gate"];

fn run_use(i: usize) -> ! {
    let Some(&name) = USES.get(i) else {
        probe::finish("ldt-and-call-gates")
    };
    RUNNING.store(i + 1, Ordering::SeqCst);
    println(format_args!("ldt-and-call-gates use {name}: starting"));
    match name {
        "ldt-ss" => {
            let outcome = probe!("mov ss, {s:e}"; s = in(reg) u32::from(LDT_KDATA),);
            let ss: u32;
            // SAFETY: reads SS, then puts the kernel's back (a writable DPL-0 data segment).
            unsafe {
                core::arch::asm!(
                    "mov {0:e}, ss",
                    "mov ss, {1:e}",
                    out(reg) ss,
                    in(reg) u32::from(ring3::KERNEL_DS),
                    options(nostack)
                )
            };

            probe::check(
                "ldt-and-call-gates use ldt-ss",
                outcome,
                None,
                ss == u32::from(LDT_KDATA),
                format_args!("ss={ss:#x}"),
            );
            next_use()
        }
        "ldt-cs" => {
            let rsp = ring3::user_stack_top();
            machine::iretq_to_user(
                LDT_UCODE,
                user_on_ldt_code as *const () as u64,
                ring3::USER_DS,
                rsp,
                0,
            )
        }
        _ => {
            let _ = ring3::enter(user_call_gate, 0x2);
            println(format_args!(
                "ldt-and-call-gates use call-gate: came back without the gate"
            ));
            exit(boot::exit_code::FAILURE)
        }
    }
}

/// Only one `use=` phase, or all of them.
static ONLY: AtomicUsize = AtomicUsize::new(usize::MAX);

fn next_use() -> ! {
    let i = RUNNING.load(Ordering::SeqCst);
    if ONLY.load(Ordering::SeqCst) != usize::MAX {
        probe::finish("ldt-and-call-gates")
    }
    run_use(i)
}

#[no_mangle]
extern "C" fn after_use() -> ! {
    let i = RUNNING.load(Ordering::SeqCst) - 1;
    let cs = SEEN[0].load(Ordering::SeqCst);
    if USES[i] == "ldt-cs" {
        let read = SEEN[1].load(Ordering::SeqCst);
        probe::check(
            "ldt-and-call-gates use ldt-cs",
            probe::Outcome::NO_FAULT,
            None,
            cs == u64::from(LDT_UCODE) && read == u64::from(LDT_UCODE),
            format_args!("cs={cs:#x}, read {read:#x}"),
        );
    } else {
        let [rip, ret_cs, rsp, ss] = [1, 2, 3, 4].map(|i| SEEN[i].load(Ordering::SeqCst));
        let return_rip = user_call_gate as *const () as u64 + 7;
        probe::check(
            "ldt-and-call-gates use call-gate",
            probe::Outcome::NO_FAULT,
            None,
            cs == u64::from(ring3::KERNEL_CS)
                && rip == return_rip
                && ret_cs == u64::from(ring3::USER_CS)
                && rsp == ring3::user_stack_top()
                && ss == u64::from(ring3::USER_DS),
            format_args!(
                "at CPL 0 cs={cs:#x}; pushed rip=caller+{} cs={ret_cs:#x} rsp={} ss={ss:#x}",
                rip.wrapping_sub(user_call_gate as *const () as u64),
                if rsp == ring3::user_stack_top() {
                    "the user stack"
                } else {
                    "ELSEWHERE"
                },
            ),
        );
    }
    next_use()
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let cmdline = unsafe { machine::cmdline(info) };
    let chosen = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("use="));
    ring3::setup(handler);
    let tss = machine::tss_descriptor(machine::tss_base());
    let ldt = system_descriptor(core::ptr::addr_of!(LDT) as u64, 5 * 8 - 1, 0x2, 0);
    let gate = call_gate(ring3::KERNEL_CS, gate_target as *const () as u64, 3);
    let gdt = [
        0,
        code64(0),
        data(0),
        data(3),
        code64(3),
        tss[0],
        tss[1],
        ldt[0],
        ldt[1],
        gate[0],
        gate[1],
    ];
    machine::load_gdt(&gdt, ring3::KERNEL_CS, ring3::KERNEL_DS);
    probes();
    match chosen {
        None => probe::finish("ldt-and-call-gates"),
        Some("all") => run_use(0),
        Some(name) => {
            let Some(i) = USES.iter().position(|&u| u == name) else {
                println(format_args!(
                    "ldt-and-call-gates: unknown use={name} (valid: all, {})",
                    "ldt-ss, ldt-cs, call-gate"
                ));
                exit(boot::exit_code::FAILURE)
            };
            ONLY.store(i, Ordering::SeqCst);
            run_use(i)
        }
    }
}
