//! A stranger's kernel toolkit for the hostile guests that need more than the fault-reporting
//! IDT: their own GDT (any selector layout), a TSS, a 256-vector IDT whose handlers save every
//! register and call one Rust function that may change the frame before the `iretq`, and page
//! tables with 4 KiB pages (so single pages can be user-accessible, aliased or absent).
//!
//! Nothing here knows about the VMM: it is what a small kernel written for the bare CPU does.

use core::sync::atomic::{AtomicUsize, Ordering};

use crate::{exit, load_idt, println};

/// Page-table entry bits (SDM Vol. 3 §4.5).
pub const PTE_P: u64 = 1 << 0;
/// Writable.
pub const PTE_W: u64 = 1 << 1;
/// User-accessible.
pub const PTE_U: u64 = 1 << 2;
/// Accessed: set by the CPU in each entry a translation uses (§4.8).
pub const PTE_A: u64 = 1 << 5;
/// Dirty: set by the CPU in the entry that maps a page written to (§4.8).
pub const PTE_D: u64 = 1 << 6;
/// Large page (in a PDE: 2 MiB).
pub const PTE_PS: u64 = 1 << 7;
/// Execute-disable (honoured with IA32_EFER.NXE = 1, reserved otherwise).
pub const PTE_XD: u64 = 1 << 63;

/// #PF error code bits (SDM Vol. 3 §4.7): P (0 = a not-present entry), W/R (a write), U/S (at
/// CPL 3), RSVD (a reserved bit), I/D (an instruction fetch).
pub const PF_P: u64 = 1 << 0;
/// W/R.
pub const PF_W: u64 = 1 << 1;
/// U/S.
pub const PF_US: u64 = 1 << 2;
/// RSVD.
pub const PF_RSVD: u64 = 1 << 3;
/// I/D.
pub const PF_ID: u64 = 1 << 4;

/// RFLAGS.CF (carry).
pub const RFLAGS_CF: u64 = 1 << 0;
/// RFLAGS.TF (single-step).
pub const RFLAGS_TF: u64 = 1 << 8;
/// RFLAGS.IF.
pub const RFLAGS_IF: u64 = 1 << 9;
/// RFLAGS.DF (direction).
pub const RFLAGS_DF: u64 = 1 << 10;
/// RFLAGS.NT (nested task).
pub const RFLAGS_NT: u64 = 1 << 14;

/// A 64-bit code descriptor (L = 1) with this DPL (SDM Vol. 3 §3.4.5).
pub const fn code64(dpl: u64) -> u64 {
    0x00AF_9A00_0000_FFFF | (dpl << 45)
}

/// A 32-bit code descriptor (D = 1, 4 GiB) with this DPL.
pub const fn code32(dpl: u64) -> u64 {
    0x00CF_9A00_0000_FFFF | (dpl << 45)
}

/// A writable data descriptor (4 GiB) with this DPL.
pub const fn data(dpl: u64) -> u64 {
    0x00CF_9200_0000_FFFF | (dpl << 45)
}

/// The low selector layout's descriptors: kernel code 0x08, kernel data 0x10, user data 0x1b,
/// user code 0x23 (indices 3 and 4, the order SYSRET needs); the TSS goes at 0x28.
pub const LOW_GDT: [u64; 5] = [0, code64(0), data(0), data(3), code64(3)];

/// Linux's x86_64 GDT layout (arch/x86/include/asm/segment.h): 32-bit kernel code 0x08, kernel
/// code 0x10, kernel data 0x18, 32-bit user code 0x23, user data 0x2b, user code 0x33, an unused
/// slot; the TSS goes at 0x40.
pub const LINUX_GDT: [u64; 8] = [
    0,
    code32(0),
    code64(0),
    data(0),
    code32(3),
    data(3),
    code64(3),
    0,
];

/// A GDT layout: the descriptors (without the TSS) and the selectors the kernel uses.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// Named in the output.
    pub name: &'static str,
    /// GDT entries from index 0; the TSS descriptor is put at `tss / 8`.
    pub gdt: &'static [u64],
    /// Kernel code selector (64-bit, DPL 0).
    pub kernel_cs: u16,
    /// Kernel data selector.
    pub kernel_ds: u16,
    /// User code selector (64-bit, DPL 3, RPL 3).
    pub user_cs: u16,
    /// User data selector (DPL 3, RPL 3).
    pub user_ds: u16,
    /// TSS selector.
    pub tss: u16,
}

impl Layout {
    /// Loads the GDT (this layout's descriptors and the TSS descriptor at `tss`; CS and DS the
    /// kernel's), the TSS with RSP0 = `rsp0`, and the 256-vector IDT whose every vector calls
    /// `handler`.
    pub fn load(&self, rsp0: u64, handler: fn(&mut Frame)) {
        let mut gdt = [0u64; 16];
        gdt[..self.gdt.len()].copy_from_slice(self.gdt);
        let t = usize::from(self.tss / 8);
        gdt[t..t + 2].copy_from_slice(&tss_descriptor(tss_base()));
        load_gdt(&gdt[..t + 2], self.kernel_cs, self.kernel_ds);
        load_tss(self.tss, rsp0);
        install_idt(self.kernel_cs);
        set_handler(handler);
    }
}

/// Enters `rip` at CPL 3 by `iretq` (CS = `cs`, SS:RSP = `ss`:`rsp`, RFLAGS = 0x2) with
/// RDI = `rdi`; the only way back is an exception (or SYSCALL/SYSENTER) into the kernel.
pub fn iretq_to_user(cs: u16, rip: u64, ss: u16, rsp: u64, rdi: u64) -> ! {
    // SAFETY: the caller's user code and stack are mapped user-accessible and its IDT (and
    // system-call MSRs) lead back into the kernel; nothing after the `iretq` runs here.
    unsafe {
        core::arch::asm!(
            "push {ss}",
            "push {rsp}",
            "push 0x2",
            "push {cs}",
            "push {rip}",
            "iretq",
            ss = in(reg) u64::from(ss),
            rsp = in(reg) rsp,
            cs = in(reg) u64::from(cs),
            rip = in(reg) rip,
            in("rdi") rdi,
            options(noreturn)
        )
    }
}

/// The two GDT slots of an available 64-bit TSS at `base` (limit 103).
pub const fn tss_descriptor(base: u64) -> [u64; 2] {
    [
        103 | ((base & 0xFF_FFFF) << 16) | (0x89 << 40) | (((base >> 24) & 0xFF) << 56),
        base >> 32,
    ]
}

/// One page, page-aligned (user code/stack pages, aliases, stacks).
#[repr(C, align(4096))]
#[derive(Debug)]
pub struct Page(pub [u8; 4096]);

impl Page {
    /// A zeroed page.
    pub const fn zeroed() -> Self {
        Page([0; 4096])
    }
}

/// The registers a trap saved, as `guest_trap_common` pushed them, then the vector, the error code (0
/// when the CPU pushes none) and the CPU's own frame. Writing to it changes where and how the
/// `iretq` resumes.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
#[allow(missing_docs)]
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

impl Frame {
    /// The address of the CPU-pushed SS slot: RSP0 - 8 when the trap switched to a 16-aligned
    /// TSS.RSP0 (SDM Vol. 3 §6.14.2).
    pub fn ss_slot(&self) -> u64 {
        core::ptr::addr_of!(self.ss) as u64
    }

    /// Makes the `iretq` resume `f` (an `extern "C" fn() -> !`) at CPL 0 on the stack ending at
    /// `stack_top` (16-aligned), interrupts off.
    pub fn resume_kernel(&mut self, f: extern "C" fn() -> !, cs: u16, ss: u16, stack_top: u64) {
        self.rip = f as usize as u64;
        self.cs = u64::from(cs);
        self.ss = u64::from(ss);
        self.rsp = stack_top - 8; // as after a call
        self.rflags = 0x2;
    }
}

// 256 stubs, 16 bytes apart: push a zero error code where the CPU pushes none, push the vector,
// save every register and call `machine_trap(&mut Frame)`; then restore and `iretq`.
core::arch::global_asm!(
    r#"
.section .text
.balign 16
.global guest_trap_stubs
guest_trap_stubs:
.set trap_vector, 0
.rept 256
    .balign 16
    .if (trap_vector == 8) | ((trap_vector >= 10) & (trap_vector <= 14)) | (trap_vector == 17) | (trap_vector == 21) | (trap_vector == 29) | (trap_vector == 30)
    .else
    pushq $0
    .endif
    pushq $trap_vector
    jmp guest_trap_common
    .set trap_vector, trap_vector + 1
.endr
guest_trap_common:
    push %rax
    push %rbx
    push %rcx
    push %rdx
    push %rsi
    push %rdi
    push %rbp
    push %r8
    push %r9
    push %r10
    push %r11
    push %r12
    push %r13
    push %r14
    push %r15
    mov %rsp, %rdi
    cld
    call machine_trap
    pop %r15
    pop %r14
    pop %r13
    pop %r12
    pop %r11
    pop %r10
    pop %r9
    pop %r8
    pop %rbp
    pop %rdi
    pop %rsi
    pop %rdx
    pop %rcx
    pop %rbx
    pop %rax
    add $16, %rsp
    iretq
"#,
    options(att_syntax)
);

static HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Sets the function every trap calls (vector, error code and frame in `Frame`).
pub fn set_handler(handler: fn(&mut Frame)) {
    HANDLER.store(handler as usize, Ordering::SeqCst);
}

#[no_mangle]
extern "C" fn machine_trap(frame: &mut Frame) {
    let h = HANDLER.load(Ordering::SeqCst);
    if h == 0 {
        unexpected(frame);
    }
    // SAFETY: HANDLER only ever holds 0 or a `fn(&mut Frame)` stored by `set_handler`.
    let handler = unsafe { core::mem::transmute::<usize, fn(&mut Frame)>(h) };
    handler(frame);
}

/// Prints the trap (vector, error code, CR2, RIP, CS, RSP, SS, RFLAGS) as one line.
pub fn report(what: &str, frame: &Frame) {
    println(format_args!(
        "{what}: vector={} error={:#x} cr2={:#x} rip={:#x} cs={:#x} rflags={:#x} rsp={:#x} ss={:#x}",
        frame.vector,
        frame.error,
        read_cr2(),
        frame.rip,
        frame.cs,
        frame.rflags,
        frame.rsp,
        frame.ss
    ));
}

/// Reports a trap nobody expected and exits with failure.
pub fn unexpected(frame: &Frame) -> ! {
    report("unexpected trap", frame);
    exit(boot::exit_code::FAILURE)
}

#[repr(C, align(16))]
struct Idt([u64; 512]);
static mut IDT: Idt = Idt([0; 512]);

/// Points gate `vector` at its stub: a 64-bit interrupt gate (IF cleared on entry) with this
/// code selector, DPL and IST index.
pub fn set_gate(vector: u8, selector: u16, dpl: u64, ist: u64) {
    extern "C" {
        static guest_trap_stubs: u8;
    }
    let h = core::ptr::addr_of!(guest_trap_stubs) as u64 + 16 * u64::from(vector);
    let v = usize::from(vector);
    let idt = core::ptr::addr_of_mut!(IDT);
    // SAFETY: single-threaded guest; the table is only read by the CPU.
    let idt = unsafe { &mut *idt };
    idt.0[2 * v] = (h & 0xFFFF)
        | (u64::from(selector) << 16)
        | (ist << 32)
        | ((0x8E | (dpl << 5)) << 40)
        | ((h >> 16) & 0xFFFF) << 48;
    idt.0[2 * v + 1] = h >> 32;
}

/// Fills all 256 gates (DPL 0, no IST, `selector`) and loads IDTR.
pub fn install_idt(selector: u16) {
    for v in 0..=255u8 {
        set_gate(v, selector, 0, 0);
    }
    load_idt(core::ptr::addr_of!(IDT) as u64, 256 * 16 - 1);
}

static mut GDT: [u64; 16] = [0; 16];

/// Copies `entries` into the GDT, loads GDTR, reloads CS with a far return to `cs` and SS, DS,
/// ES with `ds` (FS and GS null).
pub fn load_gdt(entries: &[u64], cs: u16, ds: u16) {
    let gdt = core::ptr::addr_of_mut!(GDT);
    // SAFETY: single-threaded guest; the table is static.
    let gdt = unsafe { &mut *gdt };
    gdt[..entries.len()].copy_from_slice(entries);
    let mut pointer = [0u8; 10];
    pointer[..2].copy_from_slice(&((entries.len() * 8 - 1) as u16).to_le_bytes());
    pointer[2..].copy_from_slice(&(gdt.as_ptr() as u64).to_le_bytes());
    // SAFETY: the new GDT holds `cs` (64-bit code) and `ds` (data) at the privilege we run at;
    // the far return lands on the next instruction.
    unsafe {
        core::arch::asm!(
            "lgdt [{p}]",
            "push {cs}",
            "lea {tmp}, [rip + 2f]",
            "push {tmp}",
            "retfq",
            "2:",
            "mov ss, {ds:e}",
            "mov ds, {ds:e}",
            "mov es, {ds:e}",
            "xor {tmp:e}, {tmp:e}",
            "mov fs, {tmp:e}",
            "mov gs, {tmp:e}",
            p = in(reg) pointer.as_ptr(),
            cs = in(reg) u64::from(cs),
            ds = in(reg) u64::from(ds),
            tmp = out(reg) _,
        )
    };
}

#[repr(C, align(16))]
struct Tss([u32; 26]);
static mut TSS: Tss = Tss([0; 26]);

/// The TSS's base address (for [`tss_descriptor`]).
pub fn tss_base() -> u64 {
    core::ptr::addr_of!(TSS) as u64
}

/// Sets TSS.RSP0 (and no I/O bitmap) and loads TR with `selector`.
pub fn load_tss(selector: u16, rsp0: u64) {
    let t = core::ptr::addr_of_mut!(TSS);
    // SAFETY: single-threaded guest.
    let t = unsafe { &mut *t };
    t.0[1] = rsp0 as u32;
    t.0[2] = (rsp0 >> 32) as u32;
    // I/O map base beyond the limit: no bitmap.
    t.0[25] = 104 << 16;
    // SAFETY: `selector` names the TSS descriptor just written into the GDT.
    unsafe { core::arch::asm!("ltr {0:x}", in(reg) selector, options(nostack)) };
}

#[repr(C, align(4096))]
struct Table([u64; 512]);
const POOL: usize = 16;
static mut TABLES: [Table; POOL] = [const { Table([0; 512]) }; POOL];
static mut USED: usize = 0;

fn new_table() -> u64 {
    let used = core::ptr::addr_of_mut!(USED);
    // SAFETY: single-threaded guest: nothing else accesses USED while this reference lives.
    let used = unsafe { &mut *used };
    if *used == POOL {
        println(format_args!("page-table pool exhausted"));
        exit(boot::exit_code::FAILURE);
    }
    *used += 1;
    let index = *used - 1;
    // SAFETY: only takes the address of pool entry `index` (< POOL, checked above); no
    // reference to the static is made.
    unsafe { core::ptr::addr_of_mut!(TABLES[index]) as u64 }
}

fn entry(table: u64, index: u64) -> *mut u64 {
    (table + 8 * index) as *mut u64
}

/// The next level under `table[index]`, created (present, writable, user: the leaves decide).
fn next(table: u64, index: u64) -> u64 {
    let e = entry(table, index);
    // SAFETY: `table` is one of the pool's tables (identity-mapped, ours) and index < 512.
    if unsafe { *e } & PTE_P == 0 {
        let next = new_table() | PTE_P | PTE_W | PTE_U;
        // SAFETY: as above.
        unsafe { *e = next };
    }
    // SAFETY: as above.
    let entry = unsafe { *e };
    entry & 0x000F_FFFF_FFFF_F000
}

/// The guest's own page tables: a PML4 from the pool.
#[derive(Debug)]
pub struct PageTables {
    /// Physical (= identity) address of the PML4.
    pub root: u64,
}

impl PageTables {
    /// Identity-maps `[0, 4 MiB)` with 4 KiB pages and `[4 MiB, 16 MiB)` with 2 MiB pages, all
    /// supervisor-only and writable.
    pub fn identity() -> Self {
        let pt = PageTables { root: new_table() };
        for va in (0..(4u64 << 20)).step_by(4096) {
            pt.map(va, va, PTE_P | PTE_W);
        }
        let pd = next(next(pt.root, 0), 0);
        for i in 2..8 {
            // SAFETY: `pd` is a pool table.
            unsafe { *entry(pd, i) = (i << 21) | PTE_P | PTE_W | PTE_PS };
        }
        pt
    }

    /// Maps the 4 KiB page at `va` to `pa` with `flags` (0 unmaps it).
    pub fn map(&self, va: u64, pa: u64, flags: u64) {
        // SAFETY: `pte` points into a pool table.
        unsafe { *self.pte(va) = if flags == 0 { 0 } else { pa | flags } };
    }

    /// The address of the PTE that maps the 4 KiB page at `va` (its tables created if missing;
    /// not for the 2 MiB pages of `identity`).
    pub fn pte(&self, va: u64) -> *mut u64 {
        let pdpt = next(self.root, (va >> 39) & 511);
        let pd = next(pdpt, (va >> 30) & 511);
        let pt = next(pd, (va >> 21) & 511);
        entry(pt, (va >> 12) & 511)
    }

    /// Sets the flags of the identity-mapped pages covering `[start, start + len)`.
    pub fn set_flags(&self, start: u64, len: u64, flags: u64) {
        let mut va = start & !0xFFF;
        while va < start + len {
            self.map(va, va, flags);
            va += 4096;
        }
    }

    /// Makes the user code (the `.utext` section, read-only) and the stack page below
    /// `user_stack_top` (writable) user-accessible; returns the `.utext` bounds.
    pub fn open_to_user(&self, user_stack_top: u64) -> (u64, u64) {
        extern "C" {
            static __utext_start: u8;
            static __utext_end: u8;
        }
        let (start, end) = (
            core::ptr::addr_of!(__utext_start) as u64,
            core::ptr::addr_of!(__utext_end) as u64,
        );
        self.set_flags(start, end - start, PTE_P | PTE_U);
        self.set_flags(user_stack_top - 4096, 4096, PTE_P | PTE_W | PTE_U);
        (start, end)
    }

    /// Loads CR3 with these tables.
    pub fn load(&self) {
        write_cr3(self.root);
    }
}

/// Reads CR2.
pub fn read_cr2() -> u64 {
    let v: u64;
    // SAFETY: reads a control register; no memory effects.
    unsafe { core::arch::asm!("mov {}, cr2", out(reg) v, options(nomem, nostack)) };
    v
}

/// Reads CR3.
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reads a control register; no memory effects.
    unsafe { core::arch::asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes CR3 (the tables must map the running code, stack and data).
pub fn write_cr3(v: u64) {
    // SAFETY: callers pass tables that map everything the guest runs on.
    unsafe { core::arch::asm!("mov cr3, {}", in(reg) v, options(nostack)) };
}

/// Reads CR0.
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reads a control register; no memory effects.
    unsafe { core::arch::asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes CR0 (callers keep PE, PG and WP as they are).
pub fn write_cr0(v: u64) {
    // SAFETY: callers change only the FPU/alignment bits (TS, EM, MP, AM).
    unsafe { core::arch::asm!("mov cr0, {}", in(reg) v, options(nostack)) };
}

/// Reads CR4.
pub fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reads a control register; no memory effects.
    unsafe { core::arch::asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes CR4 (callers keep PAE as it is).
pub fn write_cr4(v: u64) {
    // SAFETY: callers change only OSFXSR, OSXMMEXCPT and DE, none of which affects memory.
    unsafe { core::arch::asm!("mov cr4, {}", in(reg) v, options(nostack)) };
}

/// Reads DR6.
pub fn read_dr6() -> u64 {
    let v: u64;
    // SAFETY: reads a debug register; no memory effects.
    unsafe { core::arch::asm!("mov {}, dr6", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes DR6.
pub fn write_dr6(v: u64) {
    // SAFETY: writes a debug status register; no memory effects.
    unsafe { core::arch::asm!("mov dr6, {}", in(reg) v, options(nomem, nostack)) };
}

/// Reads RFLAGS.
pub fn rflags() -> u64 {
    let v: u64;
    // SAFETY: pushfq/pop only touch the stack below RSP.
    unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) v, options(nomem)) };
    v
}

/// Masks both 8259s (the firmware may have left the timer unmasked at vector 8 natively).
pub fn mask_pics() {
    crate::outb(0x21, 0xFF);
    crate::outb(0xA1, 0xFF);
}

/// Reprograms the 8259s to vectors 0x20..0x2F, all masked but `master_unmask` (bits clear).
pub fn remap_pics(master_mask: u8) {
    use crate::outb;
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 0x20);
    outb(0xA1, 0x28);
    outb(0x21, 4);
    outb(0xA1, 2);
    outb(0x21, 1);
    outb(0xA1, 1);
    outb(0x21, master_mask);
    outb(0xA1, 0xFF);
}

/// PIT channel 0, mode 2, at about `hz` interrupts a second.
pub fn start_pit(hz: u32) {
    let divisor = (1_193_182 / hz).clamp(1, 0xFFFF) as u16;
    crate::outb(0x43, 0x34);
    crate::outb(0x40, divisor as u8);
    crate::outb(0x40, (divisor >> 8) as u8);
}

/// The guest's command line (from the BootInfo).
///
/// # Safety
/// `info` must be the RDI value `_start` received.
pub unsafe fn cmdline(info: *const boot::BootInfo) -> &'static str {
    // SAFETY: the caller passes the contract's BootInfo.
    let info = unsafe { info.read() };
    // SAFETY: the contract says the command line is identity-mapped at cmdline_addr.
    let bytes = unsafe {
        core::slice::from_raw_parts(info.cmdline_addr as *const u8, info.cmdline_len as usize)
    };
    core::str::from_utf8(bytes).unwrap_or("")
}
