/*
 * The shared Multiboot 1 entry and 32->64-bit trampoline (AT&T syntax).
 *
 * Included with `global_asm!(include_str!(...), options(att_syntax))` by both kernels:
 *  - the host kernel first defines `BOOT_HOST` (`.set BOOT_HOST, 1`): the identity map then covers
 *    all of [0, 4 GiB) and the same first 2 GiB are also mapped at 0xFFFF_FFFF_8000_0000, where the
 *    host kernel is linked (PML4 slot 511, PDPT entries 510 and 511);
 *  - the guest kernel includes it as is: the identity map covers [0, min(RAM, 4 GiB)), RAM as the
 *    loader reports it (mem_upper), exactly the guest entry contract.
 *
 * What the including image provides:
 *  - linker-script symbols (physical addresses): __mb_load_start, __mb_load_end, __mb_bss_end;
 *  - `boot64_continue` (the guest kernel and the test guests include boot64_continue.S for it):
 *    64-bit code in the identity-mapped .boot.text, entered with
 *    RDI = physical address of the Multiboot information, RSP = top of the 16 KiB boot stack
 *    (`boot_stack_top`, 16-byte aligned), interrupts off, CS = 0x08, DS = ES = SS = 0x10, FS = GS = 0.
 *
 * State on leaving: CR0 = PE|MP|ET|NE|WP|PG, CR4 = PAE, EFER = LME|LMA|NXE, CR3 = boot_pml4,
 * GDTR = boot_gdt (0x08 64-bit code DPL 0, 0x10 data DPL 0). All of the boot data (tables, GDT,
 * stack, and `boot_info_page`, 4 KiB for the guest's BootInfo and command line) lies between
 * `boot_area_start` and `boot_area_end`.
 */

.set MB_MAGIC,        0x1BADB002
.set MB_PAGE_ALIGN,   1 << 0
.set MB_MEMORY_INFO,  1 << 1
.set MB_AOUT_KLUDGE,  1 << 16
.set MB_FLAGS,        MB_PAGE_ALIGN | MB_MEMORY_INFO | MB_AOUT_KLUDGE
.set MB_LOADER_MAGIC, 0x2BADB002

.set BOOT_TABLE_PAGES, 7            /* PML4, PDPT low, PDPT high, 4 page directories */
.set PTE_PRESENT,     1 << 0
.set PTE_WRITABLE,    1 << 1
.set PTE_HUGE,        1 << 7

.set CR0_BOOT,        0x80010033        /* PG | WP | NE | ET | MP | PE */
.set CR4_PAE,         1 << 5
.set MSR_EFER,        0xC0000080
.set EFER_LME,        1 << 8
.set EFER_NXE,        1 << 11

.set COM1,            0x3F8
.set EXIT_PORT,       0xF4
.set EXIT_CONFIG_ERROR, 0x14

/* The Multiboot header: within the first 8 KiB of the file, 4-byte aligned. The a.out-kludge
 * address fields tell the loader where to put the file, so the loader never parses the ELF
 * (QEMU's -kernel refuses 64-bit ELFs otherwise). */
.section .multiboot, "a"
.balign 4
multiboot_header:
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)
    .long multiboot_header      /* header_addr */
    .long __mb_load_start       /* load_addr */
    .long __mb_load_end         /* load_end_addr */
    .long __mb_bss_end          /* bss_end_addr */
    .long _start32              /* entry_addr */

.section .boot.text, "ax"
.code32
.global _start32
_start32:
    cli
    cld
    cmp $MB_LOADER_MAGIC, %eax
    jne no_multiboot
    mov %ebx, %esi                      /* keep the Multiboot info pointer */
    mov $boot_stack_top, %esp

    /* Long mode (CPUID.80000001H:EDX.LM[29]) and NX (EDX.NX[20]) are required. */
    mov $0x80000000, %eax
    cpuid
    cmp $0x80000001, %eax
    jb no_long_mode
    mov $0x80000001, %eax
    cpuid
    test $(1 << 29), %edx
    jz no_long_mode
    test $(1 << 20), %edx
    jz no_long_mode

    /* Zero the boot page tables (they are in a loaded section, but a loader may reuse us). */
    mov $boot_pml4, %edi
    mov $(BOOT_TABLE_PAGES * 1024), %ecx
    xor %eax, %eax
    rep stosl

    /* PML4[0] -> PDPT (low); PDPT[0..4] -> the four page directories. */
    mov $boot_pdpt_low, %eax
    or $(PTE_PRESENT | PTE_WRITABLE), %eax
    mov %eax, boot_pml4
    mov $boot_pd, %eax
    or $(PTE_PRESENT | PTE_WRITABLE), %eax
    mov $boot_pdpt_low, %edi
    mov $4, %ecx
1:  mov %eax, (%edi)
    add $4096, %eax
    add $8, %edi
    loop 1b

    /* How many 2 MiB pages to identity-map: all 2048 (4 GiB) for the host; for the guest,
     * ceil(RAM / 2 MiB) with RAM = 1 MiB + mem_upper KiB, capped at 4 GiB. */
    mov $2048, %ecx
.ifndef BOOT_HOST
    testl $MB_MEMORY_INFO, (%esi)       /* flags bit 0: mem_lower/mem_upper valid */
    jz 2f
    mov 8(%esi), %eax                   /* mem_upper, KiB above 1 MiB */
    add $(1024 + 2047), %eax
    jc 2f
    shr $11, %eax                       /* KiB -> 2 MiB pages, rounded up */
    cmp %ecx, %eax
    jae 2f
    mov %eax, %ecx
2:
.endif
    mov $boot_pd, %edi
    mov $(PTE_PRESENT | PTE_WRITABLE | PTE_HUGE), %eax
    xor %edx, %edx                      /* high half of each entry: physical bits 32.. */
3:  mov %eax, (%edi)
    mov %edx, 4(%edi)
    add $0x200000, %eax
    adc $0, %edx
    add $8, %edi
    loop 3b

.ifdef BOOT_HOST
    /* PML4[511] -> PDPT (high); its entries 510 and 511 reuse the first two page directories, so
     * 0xFFFF_FFFF_8000_0000 + x maps physical x for x < 2 GiB (where the host kernel is linked). */
    mov $boot_pdpt_high, %eax
    or $(PTE_PRESENT | PTE_WRITABLE), %eax
    mov %eax, boot_pml4 + 511 * 8
    mov $boot_pd, %eax
    or $(PTE_PRESENT | PTE_WRITABLE), %eax
    mov %eax, boot_pdpt_high + 510 * 8
    add $4096, %eax
    mov %eax, boot_pdpt_high + 511 * 8
.endif

    /* Enter long mode (SDM vol. 3 §10.8.5): PAE, CR3, EFER.LME (+NXE), then CR0.PG. */
    mov $CR4_PAE, %eax
    mov %eax, %cr4
    mov $boot_pml4, %eax
    mov %eax, %cr3
    mov $MSR_EFER, %ecx
    rdmsr
    or $(EFER_LME | EFER_NXE), %eax
    wrmsr
    mov $CR0_BOOT, %eax
    mov %eax, %cr0
    lgdt boot_gdt_pointer
    ljmp $0x08, $boot_start64

/* Failures before long mode: say why on COM1 (polled) and leave through isa-debug-exit. */
no_multiboot:
    mov $msg_no_multiboot, %esi
    jmp boot_fail
no_long_mode:
    mov $msg_no_long_mode, %esi
boot_fail:
    mov $(COM1 + 5), %dx                /* line status register */
4:  in %dx, %al
    test $0x20, %al                     /* transmitter holding register empty */
    jz 4b
    mov $COM1, %dx
    lodsb
    test %al, %al
    jz 5f
    out %al, %dx
    jmp boot_fail
5:  mov $EXIT_CONFIG_ERROR, %eax
    mov $EXIT_PORT, %dx
    out %eax, %dx
6:  hlt
    jmp 6b

.code64
boot_start64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs
    mov %esi, %edi                      /* Multiboot info (zero-extended) */
    mov $boot_stack_top, %esp           /* writing ESP zero-extends into RSP */
    xor %ebp, %ebp
    jmp boot64_continue

msg_no_multiboot:
    .asciz "boot: not started by a Multiboot loader (EAX != 0x2BADB002)\r\n"
msg_no_long_mode:
    .asciz "boot: this CPU lacks long mode or NX (CPUID 80000001H:EDX bits 29, 20)\r\n"

/* The boot area: page tables and stack. In a loaded (PROGBITS) section so that the image's file
 * layout stays the physical layout the a.out kludge describes. */
.section .boot.data, "aw", @progbits
.balign 4096
.global boot_area_start
boot_area_start:
/* The boot GDT is written by the CPU (accessed bits), so it lives in a writable section. */
.balign 8
boot_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF            /* 0x08: 64-bit code, DPL 0 (L=1, D=0) */
    .quad 0x00CF92000000FFFF            /* 0x10: data, DPL 0, writable */
boot_gdt_end:
.global boot_gdt_pointer
boot_gdt_pointer:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

.balign 4096
.global boot_pml4
boot_pml4:      .zero 4096
boot_pdpt_low:  .zero 4096
boot_pdpt_high: .zero 4096
boot_pd:        .zero 4 * 4096
.global boot_stack_bottom
boot_stack_bottom:
    .zero 16 * 1024
.global boot_stack_top
boot_stack_top:
/* Room for the guest's BootInfo and command line (native guest boot fills it). */
.global boot_info_page
boot_info_page:
    .zero 4096
.global boot_area_end
boot_area_end:

.section .text
