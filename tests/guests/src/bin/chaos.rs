//! A guest kernel that executes random bytes: round after round it fills a buffer with bytes
//! from a seeded generator and jumps into it at (virtual) CPL 0; every exception lands in a
//! handler that abandons the round and starts the next. Whatever the bytes do — privileged
//! instructions with garbage operands, wild jumps, `hlt`, loads of garbage into CR3 or the
//! IDTR — the VMM must answer as the CPU would or stop the guest cleanly; it must never panic.
//! Command line: `seed=N rounds=N user=0|1` (`user=1`: the rounds run at CPL 3, so every
//! fault is delivered from user mode through the TSS's RSP0, as in a real kernel).
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
static mut USER: bool = false;

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
        if USER {
            user_mode::enter()
        }
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
    let user = arg(cmdline, "user=", 0) != 0;
    let cpl = if user { 3 } else { 0 };
    println(format_args!(
        "chaos: seed {seed}, {rounds} rounds of random code at CPL {cpl}"
    ));
    if user {
        user_mode::setup(info.ram_bytes);
    }
    // SAFETY: single-threaded guest, before any round runs.
    unsafe {
        STATE = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        ROUNDS = rounds;
        USER = user;
    }
    next_round()
}

/// `user=1`: the rounds run at CPL 3 instead, under a GDT with user segments, a TSS whose RSP0
/// the faults switch to, and page tables that let user code reach all of RAM (the kernel's
/// tables included: the rounds may trash them, which is part of the chaos).
mod user_mode {
    use super::*;

    #[repr(C, align(4096))]
    pub struct Table(pub [u64; 512]);
    pub static mut PML4: Table = Table([0; 512]);
    pub static mut PDPT: Table = Table([0; 512]);
    pub static mut PD: Table = Table([0; 512]);
    #[repr(C, align(16))]
    pub struct Tss(pub [u32; 26]);
    pub static mut TSS: Tss = Tss([0; 26]);
    pub static mut GDT: [u64; 7] = [0; 7];
    pub static mut KSTACK: [u64; 1024] = [0; 1024];
    pub static mut USTACK: [u64; 1024] = [0; 1024];

    /// Builds the tables and loads them (once); `ram_bytes` of identity map, user-accessible.
    pub fn setup(ram_bytes: u64) {
        // SAFETY: single-threaded guest, before any user round.
        unsafe {
            let pml4 = &mut *core::ptr::addr_of_mut!(PML4);
            let pdpt = &mut *core::ptr::addr_of_mut!(PDPT);
            let pd = &mut *core::ptr::addr_of_mut!(PD);
            let pages = (ram_bytes >> 21).clamp(1, 512) as usize;
            for (i, e) in pd.0.iter_mut().take(pages).enumerate() {
                // 2 MiB pages, present, writable, user, PS.
                *e = ((i as u64) << 21) | 0x87;
            }
            pdpt.0[0] = core::ptr::addr_of!(PD) as u64 | 0x7;
            pml4.0[0] = core::ptr::addr_of!(PDPT) as u64 | 0x7;
            let tss = core::ptr::addr_of!(TSS) as u64;
            let rsp0 = core::ptr::addr_of!(KSTACK) as u64 + 8 * 1024;
            let t = &mut *core::ptr::addr_of_mut!(TSS);
            t.0[1] = rsp0 as u32;
            t.0[2] = (rsp0 >> 32) as u32;
            t.0[25] = 104 << 16; // I/O map base beyond the limit: no bitmap
            let gdt = &mut *core::ptr::addr_of_mut!(GDT);
            gdt[1] = 0x00AF_9A00_0000_FFFF; // 0x08 kernel code
            gdt[2] = 0x00CF_9200_0000_FFFF; // 0x10 kernel data
            gdt[3] = 0x00CF_F200_0000_FFFF; // 0x18 user data
            gdt[4] = 0x00AF_FA00_0000_FFFF; // 0x20 user code
            gdt[5] = 103 | ((tss & 0xFF_FFFF) << 16) | (0x89 << 40) | (((tss >> 24) & 0xFF) << 56);
            gdt[6] = tss >> 32;
            let mut pointer = [0u8; 10];
            pointer[..2].copy_from_slice(&(7u16 * 8 - 1).to_le_bytes());
            pointer[2..].copy_from_slice(&(gdt.as_ptr() as u64).to_le_bytes());
            core::arch::asm!(
                "lgdt [{p}]",
                "mov ax, 0x28",
                "ltr ax",
                "mov cr3, {root}",
                p = in(reg) pointer.as_ptr(),
                root = in(reg) core::ptr::addr_of!(PML4) as u64,
                out("ax") _,
                options(nostack)
            );
        }
    }

    /// Enters the round's code at CPL 3 (interrupts off, a fresh user stack).
    pub fn enter() -> ! {
        let rsp = core::ptr::addr_of!(USTACK) as u64 + 8 * 1024;
        let rip = core::ptr::addr_of!(CHAOS_CODE) as u64;
        // SAFETY: an iretq to the round's code on the user selectors; every way out of it is an
        // exception, which comes back to `chaos_resume` on RSP0.
        unsafe {
            core::arch::asm!(
                "push 0x1b",
                "push {rsp}",
                "push 0x2",
                "push 0x23",
                "push {rip}",
                "iretq",
                rsp = in(reg) rsp,
                rip = in(reg) rip,
                options(noreturn)
            )
        }
    }
}
