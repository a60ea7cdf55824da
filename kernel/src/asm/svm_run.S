/*
 * svm_run(regs: &mut GuestRegisters, guest_vmcb: u64, host_vmcb: u64): one VMRUN of the
 * hardware-assisted backend (host option backend=svm; kernel/src/vmm/svm.rs).
 *
 * VMRUN itself switches what the VMCB's save area holds (RIP, RSP, RAX, RFLAGS, CR0/3/4, EFER,
 * CS/SS/DS/ES, GDTR/IDTR, ...), saving the host's copy to the page in MSR VM_HSAVE_PA and
 * restoring it at #VMEXIT (AMD APM vol. 2 §15.5). The rest is ours to switch:
 *   - the other general registers, from and back to `regs` (vmm_core::svm::GuestRegisters:
 *     rbx rcx rdx rsi rdi rbp r8..r15 at offsets 0x00..0x68);
 *   - FS, GS, TR, LDTR with their hidden state, KernelGSbase, STAR/LSTAR/CSTAR/SFMASK and the
 *     SYSENTER MSRs: VMSAVE the host's into `host_vmcb`, VMLOAD the guest's from its VMCB, and
 *     the reverse after the exit (§15.5.2).
 * Interrupts: CLGI holds them off until VMRUN sets GIF for the guest; STI first so that with
 * V_INTR_MASKING the host's IF = 1 lets a physical interrupt exit the guest (INTR intercept).
 * After #VMEXIT GIF = 0: CLI, then STGI, and the host goes on with IF = 0 as everywhere else.
 * VMRUN, VMLOAD and VMSAVE take the VMCB's physical address in RAX.
 */
.section .text
.global svm_run
svm_run:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    pushq %rdi                      /* regs */
    pushq %rdx                      /* host_vmcb */
    mov %rdx, %rax
    vmsave
    mov %rsi, %rax                  /* guest_vmcb, in RAX until the exit */
    vmload
    mov 0x00(%rdi), %rbx
    mov 0x08(%rdi), %rcx
    mov 0x10(%rdi), %rdx
    mov 0x18(%rdi), %rsi
    mov 0x28(%rdi), %rbp
    mov 0x30(%rdi), %r8
    mov 0x38(%rdi), %r9
    mov 0x40(%rdi), %r10
    mov 0x48(%rdi), %r11
    mov 0x50(%rdi), %r12
    mov 0x58(%rdi), %r13
    mov 0x60(%rdi), %r14
    mov 0x68(%rdi), %r15
    mov 0x20(%rdi), %rdi
    clgi
    sti
    vmrun
.global svm_run_exited
svm_run_exited:
    /* RAX and RSP are the host's again (guest_vmcb, this stack); the rest are the guest's. */
    vmsave
    pushq %rdi                      /* the guest's RDI */
    mov 16(%rsp), %rdi              /* regs: above host_vmcb */
    mov %rbx, 0x00(%rdi)
    mov %rcx, 0x08(%rdi)
    mov %rdx, 0x10(%rdi)
    mov %rsi, 0x18(%rdi)
    mov %rbp, 0x28(%rdi)
    mov %r8, 0x30(%rdi)
    mov %r9, 0x38(%rdi)
    mov %r10, 0x40(%rdi)
    mov %r11, 0x48(%rdi)
    mov %r12, 0x50(%rdi)
    mov %r13, 0x58(%rdi)
    mov %r14, 0x60(%rdi)
    mov %r15, 0x68(%rdi)
    popq 0x20(%rdi)
    popq %rax                       /* host_vmcb */
    vmload
    popq %rdi
    cli
    stgi
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
