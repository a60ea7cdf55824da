//! A guest kernel that executes random bytes: round after round it fills a buffer with bytes
//! from a seeded generator and jumps into it at (virtual) CPL 0; every exception lands in a
//! handler that abandons the round and starts the next. Whatever the bytes do — privileged
//! instructions with garbage operands, wild jumps, `hlt`, loads of garbage into CR3 or the
//! IDTR — the VMM must answer as the CPU would or stop the guest cleanly; it must never panic.
//! Command line: `seed=N rounds=N`.
#![no_std]
#![no_main]

use test_guests::{boot_info, exit, load_idt, println};

/// Each round's bytes, then a `ud2` so a round that runs off the end faults too.
const BLOB: usize = 24;
#[no_mangle]
static mut CHAOS_CODE: [u8; BLOB + 2] = [0; BLOB + 2];
#[no_mangle]
static mut CHAOS_STACK: [u64; 2048] = [0; 2048];
static mut ROUND: u64 = 0;
static mut ROUNDS: u64 = 0;
static mut STATE: u64 = 0;

#[repr(C, align(16))]
struct Idt([u64; 512]);
static mut IDT: Idt = Idt([0; 512]);

// Every one of the 256 vectors: back onto a fresh stack and into `next_round`.
core::arch::global_asm!(
    r#"
.section .text
.global chaos_resume
chaos_resume:
    lea CHAOS_STACK+16384(%rip), %rsp
    and $-16, %rsp
    call next_round
    ud2
.global chaos_enter
chaos_enter:
    lea CHAOS_STACK+16384(%rip), %rsp
    and $-16, %rsp
    lea CHAOS_CODE(%rip), %rax
    jmp *%rax
"#,
    options(att_syntax)
);

extern "C" {
    fn chaos_resume();
    fn chaos_enter() -> !;
}

fn next_random() -> u64 {
    // SAFETY: single-threaded guest.
    unsafe {
        STATE ^= STATE << 13;
        STATE ^= STATE >> 7;
        STATE ^= STATE << 17;
        STATE
    }
}

#[no_mangle]
extern "C" fn next_round() -> ! {
    // SAFETY: single-threaded guest; the handler runs with interrupts off.
    unsafe {
        // The IDT and the code buffer may have been trashed by the last round's bytes (they
        // live in writable memory): rebuild both.
        install_idt();
        ROUND += 1;
        if ROUND > ROUNDS {
            println(format_args!("chaos: {} rounds survived", ROUND - 1));
            exit(boot::exit_code::SUCCESS);
        }
        let code = &mut *core::ptr::addr_of_mut!(CHAOS_CODE);
        for chunk in code[..BLOB].chunks_mut(8) {
            let r = next_random().to_le_bytes();
            chunk.copy_from_slice(&r[..chunk.len()]);
        }
        code[BLOB] = 0x0F;
        code[BLOB + 1] = 0x0B;
        chaos_enter()
    }
}

/// 256 interrupt gates, DPL 0, all to `chaos_resume`.
fn install_idt() {
    let h = chaos_resume as *const () as u64;
    // SAFETY: single-threaded guest.
    let idt = unsafe { &mut *core::ptr::addr_of_mut!(IDT) };
    for v in 0..256 {
        idt.0[2 * v] = (h & 0xFFFF) | (0x08 << 16) | (0x8E00 << 32) | ((h >> 16) & 0xFFFF) << 48;
        idt.0[2 * v + 1] = h >> 32;
    }
    load_idt(core::ptr::addr_of!(IDT) as u64, (256 * 16 - 1) as u16);
}

fn arg(cmdline: &str, key: &str, default: u64) -> u64 {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[no_mangle]
extern "C" fn _start(info: *const boot::BootInfo) -> ! {
    // SAFETY: RDI at entry, per the contract.
    let info = unsafe { boot_info(info) };
    // SAFETY: the contract says the command line is identity-mapped at cmdline_addr.
    let cmdline = unsafe {
        core::slice::from_raw_parts(info.cmdline_addr as *const u8, info.cmdline_len as usize)
    };
    let cmdline = core::str::from_utf8(cmdline).unwrap_or("");
    let seed = arg(cmdline, "seed=", 1).max(1);
    let rounds = arg(cmdline, "rounds=", 2000);
    println(format_args!(
        "chaos: seed {seed}, {rounds} rounds of random code at CPL 0"
    ));
    // SAFETY: single-threaded guest, before any round runs.
    unsafe {
        STATE = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        ROUNDS = rounds;
    }
    next_round()
}
