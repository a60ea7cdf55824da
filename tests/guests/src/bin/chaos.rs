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
    let state = core::ptr::addr_of_mut!(STATE);
    // SAFETY: single-threaded guest: nothing else accesses STATE while we update it.
    let mut x = unsafe { state.read() };
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    // SAFETY: as above.
    unsafe { state.write(x) };
    x
}

#[no_mangle]
extern "C" fn next_round() -> ! {
    // Single-threaded guest; the handler runs with interrupts off.
    // The IDT and the code buffer may have been trashed by the last round's bytes (they
    // live in writable memory): rebuild both.
    install_idt();
    // SAFETY: single-threaded guest: nothing else accesses ROUND.
    unsafe { ROUND += 1 };
    // SAFETY: as above.
    let round = unsafe { ROUND };
    // SAFETY: written once by `_start` before the first round.
    if round > unsafe { ROUNDS } {
        println(format_args!("chaos: {} rounds survived", round - 1));
        exit(boot::exit_code::SUCCESS);
    }
    let code = core::ptr::addr_of_mut!(CHAOS_CODE);
    // SAFETY: the buffer is not running (we got here from an exception or `_start`) and no
    // other reference to it exists.
    let code = unsafe { &mut *code };
    for chunk in code[..BLOB].chunks_mut(8) {
        let r = next_random().to_le_bytes();
        chunk.copy_from_slice(&r[..chunk.len()]);
    }
    code[BLOB] = 0x0F;
    code[BLOB + 1] = 0x0B;
    // SAFETY: written once by `_start` before the first round.
    if unsafe { USER } {
        user_mode::enter()
    }
    // SAFETY: `chaos_enter` switches to a fresh CHAOS_STACK and jumps into the code buffer just
    // filled; every way out of it is an exception, which comes back here through the IDT just
    // rebuilt.
    unsafe { chaos_enter() }
}

/// 256 interrupt gates, DPL 0, all to `chaos_resume`.
fn install_idt() {
    let h = chaos_resume as *const () as u64;
    let idt = core::ptr::addr_of_mut!(IDT);
    // SAFETY: single-threaded guest; nothing else holds a reference to the IDT.
    let idt = unsafe { &mut *idt };
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
    // SAFETY: single-threaded guest, before any round runs (the only readers).
    unsafe { STATE = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1 };
    // SAFETY: as above.
    unsafe { ROUNDS = rounds };
    // SAFETY: as above.
    unsafe { USER = user };
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
        // Single-threaded guest, before any user round: nothing else refers to these statics.
        let (pml4, pdpt, pd) = (
            core::ptr::addr_of_mut!(PML4),
            core::ptr::addr_of_mut!(PDPT),
            core::ptr::addr_of_mut!(PD),
        );
        // SAFETY: the only reference to PML4 (see above).
        let pml4 = unsafe { &mut *pml4 };
        // SAFETY: the only reference to PDPT.
        let pdpt = unsafe { &mut *pdpt };
        // SAFETY: the only reference to PD.
        let pd = unsafe { &mut *pd };
        let pages = (ram_bytes >> 21).clamp(1, 512) as usize;
        for (i, e) in pd.0.iter_mut().take(pages).enumerate() {
            // 2 MiB pages, present, writable, user, PS.
            *e = ((i as u64) << 21) | 0x87;
        }
        pdpt.0[0] = core::ptr::addr_of!(PD) as u64 | 0x7;
        pml4.0[0] = core::ptr::addr_of!(PDPT) as u64 | 0x7;
        let tss = core::ptr::addr_of!(TSS) as u64;
        let rsp0 = core::ptr::addr_of!(KSTACK) as u64 + 8 * 1024;
        let t = core::ptr::addr_of_mut!(TSS);
        // SAFETY: the only reference to TSS.
        let t = unsafe { &mut *t };
        t.0[1] = rsp0 as u32;
        t.0[2] = (rsp0 >> 32) as u32;
        t.0[25] = 104 << 16; // I/O map base beyond the limit: no bitmap
        let gdt = core::ptr::addr_of_mut!(GDT);
        // SAFETY: the only reference to GDT.
        let gdt = unsafe { &mut *gdt };
        gdt[1] = 0x00AF_9A00_0000_FFFF; // 0x08 kernel code
        gdt[2] = 0x00CF_9200_0000_FFFF; // 0x10 kernel data
        gdt[3] = 0x00CF_F200_0000_FFFF; // 0x18 user data
        gdt[4] = 0x00AF_FA00_0000_FFFF; // 0x20 user code
        gdt[5] = 103 | ((tss & 0xFF_FFFF) << 16) | (0x89 << 40) | (((tss >> 24) & 0xFF) << 56);
        gdt[6] = tss >> 32;
        let mut pointer = [0u8; 10];
        pointer[..2].copy_from_slice(&(7u16 * 8 - 1).to_le_bytes());
        pointer[2..].copy_from_slice(&(gdt.as_ptr() as u64).to_le_bytes());
        let root = core::ptr::addr_of!(PML4) as u64;
        // SAFETY: the new GDT keeps 0x08/0x10 as the boot GDT had them, so CS and SS stay
        // valid; 0x28 is the available TSS just described; the new PML4 identity-maps RAM
        // (this code, its stack and data included) as the boot tables did.
        unsafe {
            core::arch::asm!(
                "lgdt [{p}]",
                "mov ax, 0x28",
                "ltr ax",
                "mov cr3, {root}",
                p = in(reg) pointer.as_ptr(),
                root = in(reg) root,
                out("ax") _,
                options(nostack)
            )
        };
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
