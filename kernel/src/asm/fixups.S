/*
 * Fixups: host routines that touch memory or MSRs that may fault, with the faulting
 * instruction and its recovery label exported, so the trap dispatcher (kernel/src/trap.rs)
 * resumes at the label instead of treating the fault as fatal (Linux calls this an exception
 * table).
 */
.section .text
/*
 * u64 fixup_read_u64(const u64 *addr, u64 *out): reads *addr into *out and returns 0, or returns
 * 1 if the read faulted. The trap dispatcher knows `fixup_read_u64_insn`: a fault there resumes
 * at `fixup_read_u64_recover` instead of being fatal (Linux calls this an exception table).
 */
.global fixup_read_u64
fixup_read_u64:
    xor %eax, %eax
.global fixup_read_u64_insn
fixup_read_u64_insn:
    mov (%rdi), %rcx
    mov %rcx, (%rsi)
    ret
.global fixup_read_u64_recover
fixup_read_u64_recover:
    mov $1, %eax
    ret

/*
 * usize fixup_copy(void *dst, const void *src, usize len): copies len bytes and returns 0, or,
 * when a page fault interrupts the copy (`rep movsb` is restartable: RCX counts down), returns
 * the bytes left. The VMM reads and writes guest memory through the loaded shadow tables with
 * it, falling back to a guest page walk on a fault.
 */
.global fixup_copy
fixup_copy:
    mov %rdx, %rcx
.global fixup_copy_insn
fixup_copy_insn:
    rep movsb
.global fixup_copy_recover
fixup_copy_recover:
    mov %rcx, %rax
    ret

/*
 * u64 fixup_rdmsr(u32 msr, u64 *out): RDMSR into *out and returns 0, or returns 1 if the MSR
 * does not exist (#GP at `fixup_rdmsr_insn` resumes at `fixup_rdmsr_recover`).
 */
.global fixup_rdmsr
fixup_rdmsr:
    mov %edi, %ecx
.global fixup_rdmsr_insn
fixup_rdmsr_insn:
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, (%rsi)
    xor %eax, %eax
    ret
.global fixup_rdmsr_recover
fixup_rdmsr_recover:
    mov $1, %eax
    ret

