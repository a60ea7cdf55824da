/*
 * The native Multiboot continuation shared by the guest kernel and the test guests (AT&T syntax).
 *
 * Included with `global_asm!(include_str!(...), options(att_syntax))` after multiboot32.S: the
 * shared trampoline arrives here in long mode with RDI = Multiboot information. Build the
 * BootInfo in boot_info_page from it and enter the image's entry point in exactly the contract's
 * state (boot/src/lib.rs): the trampoline already left CR0/CR4/EFER/CR3, the boot GDT and the
 * segment registers as the contract says; what is left is the IDTR (limit 0), RFLAGS (0x2), RSP
 * and RDI.
 *
 * What the including image provides: `BOOT_ENTRY`, the symbol entered with RDI = the BootInfo
 * (the guest kernel's e_entry, `guest_entry`; a test guest's `_start`), as
 * `.set BOOT_ENTRY, symbol` in the same global_asm!.
 */

.set BOOT_INFO_MAGIC,      0x3130544F4F425447   /* "GTBOOT01" */
.set VMM_RESERVED_VA_START, 0xFFFFFF8000000000  /* boot::VMM_RESERVED_VA_START */
.set MB_INFO_MEMORY,       1 << 0
.set MB_INFO_CMDLINE,      1 << 2
.set BOOT_INFO_SIZE,       56
.set CMDLINE_MAX,          4096 - 64 - 1

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
    xor %eax, %eax                  /* LDTR null, as under the VMM: an LDT selector is #GP */
    lldt %ax
    pushq $0x2
    popfq
    lea boot_stack_top(%rip), %rsp
    mov %rbx, %rdi
    xor %ebp, %ebp
    jmp BOOT_ENTRY

.balign 8
boot_null_idtr:
    .word 0
    .quad 0

.section .text
