/*
 * Entry points (AT&T syntax): the 64-bit e_entry, which the native Multiboot continuation
 * (boot/src/boot64_continue.S) enters too, and the one routine that loads the kernel's own GDT
 * and reloads every segment register.
 */

/*
 * e_entry: the one entry both the native path and the VMM's loader use. It relies on the
 * contract only: RDI = BootInfo, interrupts off, long mode. It moves to the kernel's own stack (so
 * that the boot area may be anywhere) and calls guest_main(boot_info).
 */
.section .text.guest_entry, "ax"
.global guest_entry
guest_entry:
    lea kinit_stack_top(%rip), %rsp
    xor %ebp, %ebp
    call guest_main
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
