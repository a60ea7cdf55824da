//! Names for the trace and the trap table: the trap-table name of each instruction the emulator
//! handles ("MOV CR3", "OUT", "IRETQ", ...) and its Intel-syntax disassembly for `--trace`.
//!
//! Article challenge "频繁访问特权资源" (cost of privileged access): the exit table counts traps
//! by these names, so the reader sees which sensitive instructions a guest kernel runs how often.

use iced_x86::{Code, Instruction, Mnemonic, Register};

/// The trap-table name of an instruction the emulator handles.
pub fn trap_name(ins: &Instruction) -> &'static str {
    match ins.code() {
        Code::Mov_cr_r64 | Code::Mov_cr_r32 => mov_cr_name(true, ins.op0_register()),
        Code::Mov_r64_cr | Code::Mov_r32_cr => mov_cr_name(false, ins.op1_register()),
        Code::Mov_dr_r64 | Code::Mov_dr_r32 => "MOV DRn",
        Code::Mov_r64_dr | Code::Mov_r32_dr => "MOV from DRn",
        Code::Mov_Sreg_rm16 | Code::Mov_Sreg_r32m16 | Code::Mov_Sreg_r64m16 => "MOV Sreg",
        _ => mnemonic_name(ins.mnemonic()),
    }
}

/// The trap-table name of MOV to (`to_cr`) or from control register `cr`.
pub(super) fn mov_cr_name(to_cr: bool, cr: Register) -> &'static str {
    match (to_cr, cr) {
        (false, _) => "MOV from CRn",
        (true, Register::CR0) => "MOV CR0",
        (true, Register::CR3) => "MOV CR3",
        (true, Register::CR4) => "MOV CR4",
        (true, Register::CR8) => "MOV CR8",
        (true, _) => "MOV CRn",
    }
}

/// The trap-table name of a mnemonic the emulator handles.
pub(super) fn mnemonic_name(mnemonic: Mnemonic) -> &'static str {
    match mnemonic {
        Mnemonic::Cli => "CLI",
        Mnemonic::Sti => "STI",
        Mnemonic::Hlt => "HLT",
        Mnemonic::In => "IN",
        Mnemonic::Out => "OUT",
        Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd => "INS",
        Mnemonic::Outsb | Mnemonic::Outsw | Mnemonic::Outsd => "OUTS",
        Mnemonic::Rdmsr => "RDMSR",
        Mnemonic::Wrmsr => "WRMSR",
        Mnemonic::Invlpg => "INVLPG",
        Mnemonic::Iretq | Mnemonic::Iretd | Mnemonic::Iret => "IRETQ",
        Mnemonic::Sysretq | Mnemonic::Sysret => "SYSRETQ",
        Mnemonic::Sysexitq | Mnemonic::Sysexit => "SYSEXITQ",
        Mnemonic::Syscall => "SYSCALL",
        Mnemonic::Sysenter => "SYSENTER",
        Mnemonic::Swapgs => "SWAPGS",
        Mnemonic::Lgdt => "LGDT",
        Mnemonic::Lidt => "LIDT",
        Mnemonic::Sgdt => "SGDT",
        Mnemonic::Sidt => "SIDT",
        Mnemonic::Lldt => "LLDT",
        Mnemonic::Sldt => "SLDT",
        Mnemonic::Ltr => "LTR",
        Mnemonic::Str => "STR",
        Mnemonic::Smsw => "SMSW",
        Mnemonic::Lmsw => "LMSW",
        Mnemonic::Clts => "CLTS",
        Mnemonic::Wbinvd | Mnemonic::Invd => "WBINVD",
        Mnemonic::Cpuid => "CPUID",
        Mnemonic::Int => "INT n",
        Mnemonic::Int3 => "INT3",
        Mnemonic::Pop => "POP Sreg",
        Mnemonic::Retf => "RETF",
        Mnemonic::Rdtsc => "RDTSC",
        Mnemonic::Lss => "LSS",
        Mnemonic::Lfs => "LFS",
        Mnemonic::Lgs => "LGS",
        Mnemonic::Jmp => "JMP far",
        Mnemonic::Call => "CALL far",
        Mnemonic::Mov => "MOV",
        Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => "STOS",
        Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => "MOVS",
        _ => "other",
    }
}

/// The instruction in Intel syntax, for `--trace` (`out dx, al`, `mov cr3, rax`).
pub fn disassemble(ins: &Instruction) -> alloc::string::String {
    use iced_x86::Formatter;
    let mut text = alloc::string::String::new();
    iced_x86::IntelFormatter::new().format(ins, &mut text);
    text
}
