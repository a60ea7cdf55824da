/*
 * Entry points (AT&T syntax): the native Multiboot continuation, the 64-bit e_entry, and the
 * one routine that loads the kernel's own GDT and reloads every segment register.
 */

.set BOOT_INFO_MAGIC,      0x3130544F4F425447   /* "GTBOOT01" */
.set VMM_RESERVED_VA_START, 0xFFFFFF8000000000  /* boot::VMM_RESERVED_VA_START */
.set MB_INFO_MEMORY,       1 << 0
.set MB_INFO_CMDLINE,      1 << 2
.set BOOT_INFO_SIZE,       56
.set CMDLINE_MAX,          4096 - 64 - 1

/*
 * Native boot only: the shared trampoline (boot/src/multiboot32.S) arrives here in long mode with
 * RDI = Multiboot information. Build the BootInfo in boot_info_page from it and enter e_entry in
 * exactly the contract's state (boot/src/lib.rs): the trampoline already left CR0/CR4/EFER/CR3,
 * the boot GDT and the segment registers as the contract says; what is left is the IDTR (limit 0),
 * RFLAGS (0x2), RSP and RDI.
 */
.section .boot.text, "ax"
.code64
.global boot64_continue
boot64_continue:
    lea boot_info_page(%rip), %rbx
    movabs $BOOT_INFO_MAGIC, %rax
    mov %rax, 0(%rbx)

    /* ram_bytes = 1 MiB + mem_upper KiB (0 when the loader gave no memory size: the kernel
     * then refuses to run, saying why). */
    xor %eax, %eax
    testl $MB_INFO_MEMORY, (%rdi)
    jz 1f
    mov 8(%rdi), %eax
    add $1024, %rax
    shl $10, %rax
1:  mov %rax, 8(%rbx)

    /* The command line goes after the BootInfo. A Multiboot command line starts with the image's
     * own path (QEMU and GRUB both put it first); the guest's command line is what follows. */
    lea 64(%rbx), %r8
    xor %ecx, %ecx
    testl $MB_INFO_CMDLINE, (%rdi)
    jz 6f
    mov 16(%rdi), %esi
2:  movzbl (%rsi), %eax             /* skip blanks before the path */
    cmp $' ', %al
    jne 3f
    inc %rsi
    jmp 2b
3:  test %al, %al                   /* skip the path */
    jz 6f
    cmp $' ', %al
    je 4f
    inc %rsi
    movzbl (%rsi), %eax
    jmp 3b
4:  movzbl (%rsi), %eax             /* skip blanks after it */
    cmp $' ', %al
    jne 5f
    inc %rsi
    jmp 4b
5:  movzbl (%rsi), %eax             /* copy the rest, bounded */
    test %al, %al
    jz 6f
    cmp $CMDLINE_MAX, %rcx
    jae 6f
    mov %al, (%r8, %rcx)
    inc %rcx
    inc %rsi
    jmp 5b
6:  mov %r8, 16(%rbx)
    mov %rcx, 24(%rbx)
    lea boot_area_start(%rip), %rax
    mov %rax, 32(%rbx)
    lea boot_area_end(%rip), %rax
    mov %rax, 40(%rbx)
    movabs $VMM_RESERVED_VA_START, %rax
    mov %rax, 48(%rbx)

    lidt boot_null_idtr(%rip)       /* IDTR limit 0: a fault before lidt is a triple fault */
    pushq $0x2
    popfq
    lea boot_stack_top(%rip), %rsp
    mov %rbx, %rdi
    xor %ebp, %ebp
    jmp guest_entry

.balign 8
boot_null_idtr:
    .word 0
    .quad 0

/*
 * e_entry: the one entry both the native path and the VMM's loader use. It relies on the
 * contract only: RDI = BootInfo, interrupts off, long mode. It moves to the kernel's own stack (so
 * that the boot area may be anywhere) and calls kernel_main(boot_info).
 */
.section .text.guest_entry, "ax"
.global guest_entry
guest_entry:
    lea kinit_stack_top(%rip), %rsp
    xor %ebp, %ebp
    call kernel_main
    ud2

/*
 * load_gdt(gdtr: *const DescriptorTablePointer, code: u16, data: u16)
 * lgdt, then reload CS with a far return (lretq: the only way to load CS besides iretq and far
 * calls/jumps) and SS/DS/ES with the data selector; FS and GS get the null selector (their bases
 * come from the MSRs afterwards).
 */
.section .text
.global load_gdt
load_gdt:
    lgdt (%rdi)
    pushq %rsi
    lea 1f(%rip), %rax
    pushq %rax
    lretq
1:  mov %edx, %ss
    mov %edx, %ds
    mov %edx, %es
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    ret

/* The first kernel thread's stack (kinit: the self-test, bench or probe driver). */
.section .bss
.balign 16
kinit_stack:
    .zero 64 * 1024
.global kinit_stack_top
kinit_stack_top:
