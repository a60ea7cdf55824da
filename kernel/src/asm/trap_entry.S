/*
 * Trap entry: the only way into the host kernel once it runs.
 *
 * Every one of the 256 IDT vectors has a 16-byte stub at `trap_stubs + 16 * vector`. A stub pushes
 * a zero error code where the CPU pushes none (so every frame has the same shape), pushes the
 * vector, and jumps to `trap_common`, which saves all fifteen general registers and calls
 * `trap_dispatch(&mut TrapFrame)` (kernel/src/trap.rs). On return it restores the (possibly
 * changed) registers and leaves with `iretq`, to wherever the frame now says.
 *
 * TrapFrame layout, from the lowest address (= RSP when the dispatcher is called):
 *   r15 r14 r13 r12 r11 r10 r9 r8 rbp rdi rsi rdx rcx rbx rax | vector error_code | rip cs rflags rsp ss
 * The last five are the CPU's own interrupt frame (SDM vol. 3 §6.14.1: in 64-bit mode SS:RSP are
 * always pushed, and RSP is first aligned to 16 bytes), so the frame is 22 quadwords and the
 * stack stays 16-byte aligned at the call.
 */

.section .text
.balign 16
.global trap_stubs
trap_stubs:
/* Vectors for which the CPU pushes an error code (SDM vol. 3 §6.15): #DF, #TS, #NP, #SS, #GP,
 * #PF, #AC, #CP, #VC, #SX. Every stub is at most 16 bytes long. */
.set trap_vector, 0
.rept 256
    .balign 16
    .if (trap_vector == 8) | ((trap_vector >= 10) & (trap_vector <= 14)) | (trap_vector == 17) | (trap_vector == 21) | (trap_vector == 29) | (trap_vector == 30)
    .else
    pushq $0
    .endif
    pushq $trap_vector
    jmp trap_common
    .set trap_vector, trap_vector + 1
.endr
.global trap_stubs_end
trap_stubs_end:

trap_common:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %rbp
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    mov %rsp, %rdi
    cld
    call trap_dispatch
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rbp
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    add $16, %rsp                       /* vector and error code */
    iretq

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
