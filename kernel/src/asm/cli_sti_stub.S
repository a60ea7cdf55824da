/*
 * The CLI/STI stub: a guest kernel's CLI or STI handled in the #GP entry stub, without the Rust
 * dispatcher (docs/ARCHITECTURE.md, "Decisions"). trap_entry.S's stub for vector 13 jumps here;
 * anything that is not a CLI/STI it may handle goes on to trap_common.
 */
.section .text
/*
 * The CLI/STI fast path (#GP stub only). A guest kernel toggles interrupts constantly, and each
 * toggle is a full trap: the Rust dispatcher copies the vCPU in and out, accounts by phase and
 * decides on injection, ~600 instructions. Here, before any of that: if the #GP came from
 * Ring 3 with error code 0, the VMM allowed the fast path at its last exit (the guest's virtual
 * CPL <= IOPL, no single-step of ours or the guest's), and the byte at the guest's RIP is CLI
 * (0xFA) or STI (0xFB), flip the virtual IF in `cli_sti_vif` and return past the instruction. STI
 * that sets IF records the one-instruction interrupt shadow; STI with a virtual interrupt
 * pending (`cli_sti_pending`) takes the slow path, where it is injected. The Rust side
 * (`kernel/src/vmm/cli_sti_stub.rs`) reads these back into the vCPU at every trap and writes them at
 * every exit, and counts what happened here.
 */
/* Global, as trap_common is, so that a debugger can break here and names the address so. */
.global cli_sti_stub
cli_sti_stub:
    /* [rsp] vector, 8 error code, 16 RIP, 24 CS, 32 RFLAGS, 40 RSP, 48 SS */
    testb $3, 24(%rsp)
    jz trap_common
    cmpq $0, 8(%rsp)
    jne trap_common
    cmpb $0, cli_sti_enabled(%rip)
    je trap_common
    pushq %rax
    pushq %rcx
    pushq %rdx
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    mov 40(%rsp), %rax              /* the guest RIP (three pushes later) */
    mov $0x7fffffffffff, %rcx       /* the last canonical byte: RIP + 1 would not be, */
    cmp %rcx, %rax                  /* so the emulator must raise the guest's #GP */
    je cli_sti_stub_bail
.global cli_sti_stub_fetch
cli_sti_stub_fetch:
    movzbl (%rax), %ecx             /* a #PF here resumes at cli_sti_stub_bail (trap.rs) */
    cmp $0xFA, %ecx
    je 1f
    cmp $0xFB, %ecx
    jne cli_sti_stub_bail
    cmpb $0, cli_sti_pending(%rip)
    jne cli_sti_stub_bail
    cmpb $0, cli_sti_vif(%rip)
    jne 2f
    lea 1(%rax), %rcx
    mov %rcx, cli_sti_shadow(%rip)
2:  movb $1, cli_sti_vif(%rip)
    incq cli_sti_sti_count(%rip)
    jmp 3f
1:  movb $0, cli_sti_vif(%rip)
    incq cli_sti_cli_count(%rip)
3:  incq 40(%rsp)                   /* past the one-byte instruction */
    mov %rdx, %rcx
    rdtsc
    shl $32, %rdx
    or %rax, %rdx
    sub %rcx, %rdx
    add %rdx, cli_sti_cycles(%rip)
    popq %rdx
    popq %rcx
    popq %rax
    add $16, %rsp                   /* vector and error code */
    iretq
.global cli_sti_stub_bail
cli_sti_stub_bail:
    popq %rdx
    popq %rcx
    popq %rax
    jmp trap_common

.section .bss
/* The CLI/STI fast path's state, shared with kernel/src/vmm/cli_sti_stub.rs. */
.global cli_sti_enabled
cli_sti_enabled:
    .byte 0
.global cli_sti_vif
cli_sti_vif:
    .byte 0
.global cli_sti_pending
cli_sti_pending:
    .byte 0
.balign 8
.global cli_sti_shadow
cli_sti_shadow:
    .quad 0
.global cli_sti_cli_count
cli_sti_cli_count:
    .quad 0
.global cli_sti_sti_count
cli_sti_sti_count:
    .quad 0
.global cli_sti_cycles
cli_sti_cycles:
    .quad 0
.section .text
