//! A small kernel that can run a piece of code at CPL 3 and get back: a GDT (kernel code 0x08,
//! data 0x10, user data 0x1b, user code 0x23, TSS 0x28), a TSS whose RSP0 is a kernel stack,
//! the 256-vector IDT of `machine`, and page tables in which only the `.utext` pages and one
//! user stack page are user-accessible.
//!
//! [`enter`] saves the kernel's callee-saved registers and stack pointer, `iretq`s to the user
//! code, and returns the frame of the first exception the user code raises: the guest's trap
//! handler calls [`catch`], which records a trap from CPL 3 and makes its `iretq` resume the
//! kernel at the end of `enter` (as setjmp/longjmp would).

use core::sync::atomic::{AtomicBool, Ordering};

use crate::machine::{self, Frame, Layout, Page, PageTables};

/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User data selector (RPL 3).
pub const USER_DS: u16 = 0x1b;
/// User code selector (RPL 3).
pub const USER_CS: u16 = 0x23;
/// TSS selector.
pub const TSS: u16 = 0x28;

const LAYOUT: Layout = Layout {
    name: "ring3",
    gdt: &machine::LOW_GDT,
    kernel_cs: KERNEL_CS,
    kernel_ds: KERNEL_DS,
    user_cs: USER_CS,
    user_ds: USER_DS,
    tss: TSS,
};

static mut USER_STACK: Page = Page::zeroed();
static mut RSP0_STACK: [Page; 4] = [const { Page::zeroed() }; 4];
static mut FRAME: Option<Frame> = None;
static IN_USER: AtomicBool = AtomicBool::new(false);

/// The kernel stack pointer `ring3_enter` saved (read by `ring3_back`).
#[no_mangle]
static mut RING3_KERNEL_RSP: u64 = 0;

core::arch::global_asm!(
    r#"
.section .text
.global ring3_enter
ring3_enter:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov qword ptr [rip + RING3_KERNEL_RSP], rsp
    push 0x1b
    push rsi
    push rdx
    push 0x23
    push rdi
    iretq
.global ring3_back
ring3_back:
    mov rsp, qword ptr [rip + RING3_KERNEL_RSP]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret
"#
);

extern "C" {
    fn ring3_enter(rip: u64, rsp: u64, rflags: u64);
    fn ring3_back();
}

/// The top of the (user-accessible) user stack page.
pub fn user_stack_top() -> u64 {
    core::ptr::addr_of!(USER_STACK) as u64 + 4096
}

fn rsp0() -> u64 {
    core::ptr::addr_of!(RSP0_STACK) as u64 + 4 * 4096
}

/// Loads the GDT, TSS, IDT (every vector calls `handler`) and page tables; returns the page
/// tables (loaded) so the caller may change them.
pub fn setup(handler: fn(&mut Frame)) -> PageTables {
    machine::mask_pics();
    let pt = PageTables::identity();
    pt.open_to_user(user_stack_top());
    pt.load();
    LAYOUT.load(rsp0(), handler);
    pt
}

/// Runs `code` at CPL 3 on the user stack with `rflags` (IF must be 0) until its first
/// exception, and returns that exception's frame.
pub fn enter(code: unsafe extern "C" fn(), rflags: u64) -> Frame {
    let saved = core::ptr::addr_of_mut!(FRAME);
    // SAFETY: single-threaded guest; no trap from CPL 3 is outstanding.
    unsafe { saved.write(None) };
    IN_USER.store(true, Ordering::SeqCst);
    // SAFETY: `ring3_enter` saves the callee-saved registers and RSP, then enters `code` at
    // CPL 3; the only way back is an exception, which `catch` turns into a jump to `ring3_back`,
    // which restores them and returns here (the C ABI's caller-saved registers are clobbered,
    // as the call says).
    unsafe { ring3_enter(code as usize as u64, user_stack_top(), rflags) };
    IN_USER.store(false, Ordering::SeqCst);
    // SAFETY: written by `catch` before the return above.
    unsafe { saved.read() }.unwrap_or_else(|| {
        crate::println(format_args!("ring3: back without a trap"));
        crate::exit(boot::exit_code::FAILURE)
    })
}

/// For the trap handler: a trap from CPL 3 while [`enter`] runs is recorded and resumes the
/// kernel at the end of `enter` (returns true); anything else is the caller's (false).
pub fn catch(frame: &mut Frame) -> bool {
    if frame.cs & 3 != 3 || !IN_USER.load(Ordering::SeqCst) {
        return false;
    }
    let saved = core::ptr::addr_of_mut!(FRAME);
    // SAFETY: single-threaded guest; `enter` reads it after this trap returns.
    unsafe { saved.write(Some(*frame)) };
    frame.rip = ring3_back as *const () as u64;
    frame.cs = u64::from(KERNEL_CS);
    frame.ss = u64::from(KERNEL_DS);
    let kernel_rsp = core::ptr::addr_of!(RING3_KERNEL_RSP);
    // SAFETY: written by `ring3_enter` before it entered CPL 3.
    frame.rsp = unsafe { kernel_rsp.read() };
    frame.rflags = 0x2;
    true
}
