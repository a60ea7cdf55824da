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
 * #PF, #AC, #CP, #VC, #SX — the `error_code` column of vmm-core's exception table
 * (vmm-core/src/cpu/exception.rs), which the boot self-check `error-code-vectors` compares with
 * these stubs. Every stub is at most 16 bytes long. */
.set trap_vector, 0
.rept 256
    .balign 16
    .if (trap_vector == 8) | ((trap_vector >= 10) & (trap_vector <= 14)) | (trap_vector == 17) | (trap_vector == 21) | (trap_vector == 29) | (trap_vector == 30)
    .else
    pushq $0
    .endif
    pushq $trap_vector
    .if trap_vector == 13
    jmp cli_sti_stub
    .else
    jmp trap_common
    .endif
    .set trap_vector, trap_vector + 1
.endr

/* Global, as cli_sti_stub is, so that a debugger can break here and names the address so. */
.global trap_common
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
    /* The benchmark's "entry" phase starts here (RAX/RDX are saved already). */
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, trap_entry_tsc(%rip)
    mov %rsp, %rdi
    cld
    call trap_dispatch
.global trap_exit
trap_exit:
    /* The trap's cost ends here (RAX/RDX are restored below); the instructions after this
     * stamp and before trap_entry_tsc's are a fixed count (kernel/src/vmm/instrument.rs). */
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov %rax, trap_exit_tsc(%rip)
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
 * trap_return(frame): leaves through the common exit path with `frame`, which the caller has
 * placed at the top of the trap stack (TSS.RSP0), exactly where a trap from Ring 3 would have
 * built it. This is how the host first enters the guest: it makes up the frame of a trap that
 * "interrupted" the guest at its entry point, and returns from it.
 */
.global trap_return
trap_return:
    mov %rdi, %rsp
    jmp trap_exit

/*
 * SYSCALL and SYSENTER from Ring 3 (the guest) enter here: IA32_LSTAR and IA32_SYSENTER_EIP point
 * at these stubs. Neither instruction switches stacks the way an interrupt does, so each stub
 * moves to the trap stack itself and builds the same TrapFrame a trap would, with a pseudo-vector
 * (256 = SYSCALL, 257 = SYSENTER) for the dispatcher. The VMM always returns with IRETQ, never
 * with a real SYSRET or SYSEXIT, so a guest can never make the host execute SYSRET to a
 * non-canonical address (CVE-2012-0217).
 *
 * SYSCALL (SDM vol. 2B): RCX = return RIP, R11 = RFLAGS, RSP is still the guest's; IA32_FMASK has
 * cleared IF, so nothing can interrupt us before the stack switch.
 */
/* Any RPL-3 selector marks the frame as the guest's (`TrapFrame::interrupted_ring3`); the VMM
 * replaces CS and SS with the guest's real selectors before it returns. */
.set GUEST_CODE_SELECTOR, 3
.set GUEST_DATA_SELECTOR, 3
.global syscall_entry
syscall_entry:
    mov %rsp, syscall_saved_rsp(%rip)
    lea trap_stack_top(%rip), %rsp
    pushq $GUEST_DATA_SELECTOR
    pushq syscall_saved_rsp(%rip)
    pushq %r11
    pushq $GUEST_CODE_SELECTOR
    pushq %rcx
    pushq $0
    pushq $256
    jmp trap_common

/*
 * SYSENTER (SDM vol. 2B): RSP = IA32_SYSENTER_ESP (the trap stack top), IF cleared; the caller's
 * RIP and RSP are not saved anywhere (by convention the guest passes them in registers), so the
 * frame carries zeros there and the VMM takes the new ones from the guest's virtual MSRs. Its
 * RFLAGS are the guest's as SYSENTER left them (VM, IF and RF clear; TF too when it single-stepped
 * into the stub, which the #DB handler reports apart).
 */
.global sysenter_entry
sysenter_entry:
    /* The guest's RFLAGS as SYSENTER left them, first (with TF the single step traps before
     * this instruction, and the #DB handler resumes here without TF, NT as the guest had it). */
    pushfq                               /* for now at the SS slot */
    pushq $0                             /* RSP */
    pushq 8(%rsp)                        /* RFLAGS: the guest's, NT, DF and the arithmetic flags included */
    movq $GUEST_DATA_SELECTOR, 16(%rsp)  /* SS */
    /* SYSENTER clears only VM, IF and RF: NT is still the guest's (POPF may set it at any CPL),
     * and an IRET with NT set is #GP(0) in IA-32e mode (SDM vol. 2A, IRET), so the host's own
     * IRETQ would fault: clear it before going on (SYSCALL's FMASK clears it). */
    pushfq
    andq $~0x4000, (%rsp)
    popfq
    pushq $GUEST_CODE_SELECTOR
    pushq $0
    pushq $0
    pushq $257
    jmp trap_common
/* The stub's length, for `in_sysenter_entry` (kernel/src/trap.rs); a length, not an end label,
 * so that no symbol shares its address with the code after it (a debugger would show that one). */
.Lsysenter_entry_end:
.section .rodata
.balign 8
.global sysenter_entry_len
sysenter_entry_len:
    .quad .Lsysenter_entry_end - sysenter_entry
.section .text

.section .bss
.balign 16
syscall_saved_rsp:
    .quad 0
/* TSC when trap_common had saved the registers of the last trap. */
.global trap_entry_tsc
trap_entry_tsc:
    .quad 0
/* TSC when the last trap began to restore the registers on its way out. */
.global trap_exit_tsc
trap_exit_tsc:
    .quad 0
/* The trap stack: TSS.RSP0 and IA32_SYSENTER_ESP point at its top. */
.balign 4096
.global trap_stack_bottom
trap_stack_bottom:
    .zero 64 * 1024
.global trap_stack_top
trap_stack_top:
.section .text
