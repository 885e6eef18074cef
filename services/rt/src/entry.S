/*
 * Service entry. The core starts a service at its first byte with
 * x0 = one past the top of its memory (the stack grows down from there) and
 * x1 = its IPC page. The header after the first branch tells the core how
 * much of the image is text (mapped read-only and executable) and how much
 * memory the image needs before the stack.
 */
.equ MAIR_VALUE, 0xff                  /* attr 0: normal write-back */
.equ SCTLR_EL1_MMU_ON, (0x30d00800 | (1 << 0) | (1 << 2) | (1 << 12))
.equ SVC_FAULT, 0xc6000102

.section .text.head, "ax"
.global _start
_start:
    b       service_entry
    .long   0
    .ascii  "MOATSVC1"
    .quad   __text_size
    .quad   __footprint

service_entry:
    mov     sp, x0
    adrp    x2, __bss_start
    add     x2, x2, :lo12:__bss_start
    adrp    x3, __bss_end
    add     x3, x3, :lo12:__bss_end
1:  cmp     x2, x3
    b.hs    2f
    stp     xzr, xzr, [x2], #16
    b       1b
2:  adr     x2, service_vectors
    msr     vbar_el1, x2
    ldr     x2, =MAIR_VALUE
    msr     mair_el1, x2
    /* T0SZ 25 (39-bit VA), 4 KiB granule, WB inner shareable walks, no TTBR1. */
    ldr     x2, =((1 << 23) | (3 << 12) | (1 << 10) | (1 << 8) | 25)
    msr     tcr_el1, x2
    adrp    x2, service_l1_table
    add     x2, x2, :lo12:service_l1_table
    msr     ttbr0_el1, x2
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    ldr     x2, =SCTLR_EL1_MMU_ON
    msr     sctlr_el1, x2
    isb
    mov     x29, #0
    bl      moat_rt_main
3:  wfe
    b       3b

/* Any exception a service takes is reported to the core, which marks the
 * service failed: a service has no business faulting. */
.macro report_fault
    .balign 0x80
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    mrs     x3, far_el1
    ldr     x0, =SVC_FAULT
    hvc     #0
    b       .
.endm

.section .text.vectors, "ax"
.balign 2048
service_vectors:
    .rept 16
    report_fault
    .endr

/* The whole 512 GiB input range as normal memory in 1 GiB blocks: the
 * service's stage-2, not its stage-1, decides what exists, so a stray access
 * reaches the core as a stage-2 fault. */
.section .data.page_table, "aw"
.balign 4096
service_l1_table:
    .set    block, 0
    .rept   512
    .quad   (block << 30) | 0x701
    .set    block, block + 1
    .endr
