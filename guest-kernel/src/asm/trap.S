/*
 * Trap, system-call and context-switch entry points (AT&T syntax).
 *
 * Every way into the kernel builds the same TrapFrame (trap.rs) on the current process's kernel
 * stack: 15 general registers (r15 lowest), vector, error code, then RIP, CS, RFLAGS, RSP, SS as
 * an interrupt pushes them. Entries from Ring 3 do `swapgs` so that GS.base is the per-CPU block
 * (PerCpu in syscall.rs: 0 self, 8 user RSP scratch, 16 kernel RSP) while in the kernel.
 *
 * The user selectors in the frames built here depend on the GDT layout chosen at boot
 * (gdt.rs), so they are pushed from the gdt_sel_* words gdt::init fills in, never immediates.
 */

.set VECTOR_SYSCALL, 0x100  /* TrapFrame.vector for a SYSCALL entry */
.set VECTOR_SYSENTER, 0x101 /* ... and for a SYSENTER entry */

.macro PUSH_GPRS
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
.endm

.macro POP_GPRS
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
.endm

/* 256 interrupt-gate targets, 16 bytes apart: trap_vectors + 16 * vector. Vectors for which the
 * CPU pushes an error code (SDM vol. 3 §6.3.1 table 6-1: 8, 10-14, 17, 21, 29, 30) do not push a
 * dummy one. */
.section .text
.balign 16
.global trap_vectors
trap_vectors:
.set vec, 0
.rept 256
    .balign 16
    .if (vec == 8) || ((vec >= 10) && (vec <= 14)) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp guest_trap_common
    .set vec, vec + 1
.endr

guest_trap_common:
    testb $3, 24(%rsp)          /* CS of the interrupted code: from Ring 3? */
    jz 1f
    swapgs
1:  PUSH_GPRS
    cld
    mov %rsp, %rdi
    call guest_trap_dispatch
.global guest_trap_return
guest_trap_return:
    POP_GPRS
    add $16, %rsp               /* vector and error code */
    testb $3, 8(%rsp)           /* CS of the code returned to: Ring 3? */
    jz 2f
    swapgs                      /* right before iretq, as Linux does (a VMM can pair them) */
2:  iretq

/* SYSCALL (SDM vol. 2B "SYSCALL"): RCX = return RIP, R11 = RFLAGS, RSP still the user's, IF
 * cleared by IA32_FMASK. Build a TrapFrame on the kernel stack named in the per-CPU block and
 * leave with SYSRETQ. */
.global guest_syscall_entry
guest_syscall_entry:
    swapgs
    mov %rsp, %gs:8
    mov %gs:16, %rsp
    pushq gdt_sel_user_data(%rip)   /* what SYSRETQ will load: (STAR[63:48] + 8) | 3 */
    pushq %gs:8
    pushq %r11
    pushq gdt_sel_user_code(%rip)   /* (STAR[63:48] + 16) | 3 */
    pushq %rcx
    pushq $0
    pushq $VECTOR_SYSCALL
    PUSH_GPRS
    cld
    mov %rsp, %rdi
    call syscall_dispatch
    POP_GPRS
    mov 16(%rsp), %rcx          /* RIP (canonical: the instruction after SYSCALL) */
    mov 32(%rsp), %r11          /* RFLAGS */
    mov 40(%rsp), %rsp          /* the user's RSP */
    swapgs
    sysretq

/* SYSENTER (SDM vol. 2B "SYSENTER"): RSP = IA32_SYSENTER_ESP (this process's kernel stack top),
 * IF cleared. Our ABI: the user passes its return RIP in RDX and its RSP in RCX, which is what
 * SYSEXIT takes back. SYSEXIT does not restore RFLAGS: `sti` right before it (its one-instruction
 * shadow covers SYSEXIT) gives user mode IF = 1.
 * In a layout where SYSEXIT cannot produce the user code selector (gdt=low: it would need
 * SYSENTER_CS = 0), gdt_sysenter_ret_iretq is set and the same frame is left with iretq: the
 * registers are then exactly what SYSEXIT would leave (RCX = RSP, RDX = RIP, RFLAGS 0x202). */
.global guest_sysenter_entry
guest_sysenter_entry:
    swapgs
    pushq gdt_sel_sysenter_ret_ss(%rip) /* (SYSENTER_CS + 40) | 3, or user data for iretq */
    pushq %rcx
    pushq $0x202
    pushq gdt_sel_sysenter_ret_cs(%rip) /* (SYSENTER_CS + 32) | 3, or user code for iretq */
    pushq %rdx
    pushq $0
    pushq $VECTOR_SYSENTER
    PUSH_GPRS
    cld
    mov %rsp, %rdi
    call syscall_dispatch
    POP_GPRS
    cmpq $0, gdt_sysenter_ret_iretq(%rip)
    jne 3f
    mov 16(%rsp), %rdx          /* RIP */
    mov 40(%rsp), %rcx          /* RSP */
    swapgs
    sti
    sysexitq
3:  add $16, %rsp               /* vector and error code */
    swapgs
    iretq

/* switch_context(save: *mut u64, next_rsp: u64): save the callee-saved registers on this kernel
 * stack, store RSP in *save, and continue on the other stack where it last called this (or, for a
 * new process, at guest_trap_return with its first TrapFrame above). */
.global switch_context
switch_context:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    mov %rsp, (%rdi)
    mov %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret

/* Kernel accesses that may fault by design, each with a fixup (trap.rs, FIXUPS): a fault at the
 * *_fault_ip instruction resumes at the matching *_fixup, which returns -EFAULT (-14). */

/* copy_user(dst, src, len) -> 0 | -14: copy to or from user memory. Demand-zero faults inside
 * are filled and the copy resumes; any other fault ends it with -14. */
.global copy_user
copy_user:
    mov %rdx, %rcx
.global copy_user_fault_ip
copy_user_fault_ip:
    rep movsb
    xor %eax, %eax
    ret
.global copy_user_fixup
copy_user_fixup:
    mov $-14, %rax
    ret

/* probe_write(addr, byte) -> 0 | -14: one byte written, or the fault it raised. */
.global probe_write
probe_write:
.global probe_write_fault_ip
probe_write_fault_ip:
    movb %sil, (%rdi)
    xor %eax, %eax
    ret
.global probe_write_fixup
probe_write_fixup:
    mov $-14, %rax
    ret

/* probe_read(addr) -> byte | -14 */
.global probe_read
probe_read:
.global probe_read_fault_ip
probe_read_fault_ip:
    movzbq (%rdi), %rax
    ret
.global probe_read_fixup
probe_read_fixup:
    mov $-14, %rax
    ret
