/*
 * The host-specific end of the boot trampoline (boot/src/multiboot32.S jumps here in long mode,
 * still on the identity-mapped boot stack): switch to the higher-half kernel stack and call
 * `host_main(multiboot_info_phys)`, which never returns.
 */
.section .boot.text, "ax"
.code64
.global boot64_continue
boot64_continue:
    movabs $kernel_stack_top, %rsp
    movabs $host_main, %rax
    call *%rax
1:  hlt
    jmp 1b

.section .bss
.balign 4096
.global kernel_stack_bottom
kernel_stack_bottom:
    .zero 64 * 1024
.global kernel_stack_top
kernel_stack_top:
.section .text
