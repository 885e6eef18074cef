/*
 * Test host entry. The core enters at EL1h with x0 = device tree, MMU off,
 * at a 2 MiB boundary it chose, so the first job is to apply our own
 * R_AARCH64_RELATIVE relocations for that address.
 */
.equ STACK_SIZE, 0x4000
.equ MAX_CPUS, 8
/* M, C, I, and ATA (EL1 may access allocation tags, if EL2 allows it). */
.equ SCTLR_EL1_MMU_ON, (0x30d00800 | (1 << 0) | (1 << 2) | (1 << 12) | (1 << 43))
/* MAIR_EL1: 0 normal WB, 1 Device-nGnRE, 2 normal WB tagged. */
.equ MAIR_EL1_VALUE, 0xf004ff
.equ NORMAL_BLOCK, 0x701
.equ DEVICE_BLOCK, ((1 << 54) | (1 << 53) | 0x405)

.section .text.head, "ax"
.global _start
_start:
    b       primary_start
    .long   0
    .quad   0                       /* text_offset */
    .quad   __image_size            /* image_size */
    .quad   0x2                     /* LE, 4 KiB, 2 MiB aligned */
    .quad   0, 0, 0
    .ascii  "ARM\x64"
    .long   0

primary_start:
    mov     x19, x0
    adr     x20, _start                 /* load address == relocation delta (linked at 0) */
    adrp    x1, __rela_start
    add     x1, x1, :lo12:__rela_start
    adrp    x2, __rela_end
    add     x2, x2, :lo12:__rela_end
1:  cmp     x1, x2
    b.hs    2f
    ldp     x3, x4, [x1], #16           /* r_offset, r_info */
    ldr     x5, [x1], #8                /* r_addend */
    cmp     w4, #1027                   /* R_AARCH64_RELATIVE */
    b.ne    1b
    add     x3, x3, x20
    add     x5, x5, x20
    str     x5, [x3]
    b       1b
2:  adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
3:  cmp     x1, x2
    b.hs    4f
    stp     xzr, xzr, [x1], #16
    b       3b
4:  /* Early identity map: 1 GiB blocks, normal where we and the tree live. */
    adrp    x0, L1_TABLE
    add     x0, x0, :lo12:L1_TABLE
    lsr     x4, x20, #30
    lsr     x5, x19, #30
    mov     x1, #0
    ldr     x6, =DEVICE_BLOCK
    ldr     x7, =NORMAL_BLOCK
5:  lsl     x2, x1, #30
    cmp     x1, x4
    ccmp    x1, x5, #4, ne
    csel    x3, x7, x6, eq
    orr     x2, x2, x3
    str     x2, [x0, x1, lsl #3]
    add     x1, x1, #1
    cmp     x1, #512
    b.lo    5b
    mov     x0, #0
    bl      cpu_setup
    mov     x0, x19
    bl      host_main
6:  wfe
    b       6b

/* Secondary CPUs: x0 = logical index (our CPU_ON context). */
.global secondary_start
secondary_start:
    mov     x19, x0
    bl      cpu_setup
    mov     x0, x19
    bl      host_secondary_main
7:  wfe
    b       7b

/* x0 = CPU index: stack, FP/SIMD, vectors, MMU. */
cpu_setup:
    mov     x9, x30
    adrp    x1, STACKS
    add     x1, x1, :lo12:STACKS
    add     x2, x0, #1
    mov     x3, #STACK_SIZE
    madd    x1, x2, x3, x1
    mov     sp, x1
    mov     x1, #(3 << 20)              /* CPACR_EL1.FPEN: no FP/SIMD traps */
    msr     cpacr_el1, x1
    adr     x1, el1_vectors
    msr     vbar_el1, x1
    ldr     x1, =MAIR_EL1_VALUE
    msr     mair_el1, x1
    mrs     x1, id_aa64mmfr0_el1
    and     x1, x1, #7
    lsl     x1, x1, #32                 /* IPS */
    mov     x2, #25                     /* T0SZ: 39 bits */
    orr     x1, x1, x2
    orr     x1, x1, #(1 << 8)           /* IRGN0 WB */
    orr     x1, x1, #(1 << 10)          /* ORGN0 WB */
    orr     x1, x1, #(3 << 12)          /* SH0 inner */
    orr     x1, x1, #(1 << 23)          /* EPD1: no TTBR1 walks */
    msr     tcr_el1, x1
    adrp    x1, L1_TABLE
    add     x1, x1, :lo12:L1_TABLE
    msr     ttbr0_el1, x1
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    ldr     x1, =SCTLR_EL1_MMU_ON
    msr     sctlr_el1, x1
    isb
    mov     x29, #0
    mov     x30, x9
    ret

/* Synchronous exceptions from EL1h go to Rust with a frame; everything else parks. */
.macro park_vector
    .balign 0x80
    b       .
.endm

.section .text.vectors, "ax"
.balign 2048
el1_vectors:
    park_vector
    park_vector
    park_vector
    park_vector
    .balign 0x80
    sub     sp, sp, #272
    stp     x0, x1, [sp, #0]
    mrs     x0, pmevcntr0_el0           /* for the UNDEF-delivery benchmark */
    adrp    x1, VECTOR_ENTRY_COUNT
    str     x0, [x1, :lo12:VECTOR_ENTRY_COUNT]
    b       el1_sync_rest
    park_vector
    park_vector
    park_vector
    park_vector
    park_vector
    park_vector
    park_vector
    park_vector
    park_vector
    park_vector
    park_vector

/* The rest of the synchronous-exception path (the vector slot is 32
 * instructions long). */
.section .text.vectors, "ax"
el1_sync_rest:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x29, [sp, #144]
    mrs     x0, elr_el1
    stp     x30, x0, [sp, #160]
    mov     x0, sp
    bl      el1_sync_exception
    ldr     x0, [sp, #168]
    msr     elr_el1, x0
    ldp     x0, x1, [sp, #0]
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x29, [sp, #144]
    ldr     x30, [sp, #160]
    add     sp, sp, #272
    eret

.section .bss.stacks, "aw", %nobits
.balign 4096
STACKS:
    .space  STACK_SIZE * (MAX_CPUS + 1)
.global L1_TABLE
L1_TABLE:
    .space  4096
.balign 8
.global VECTOR_ENTRY_COUNT
VECTOR_ENTRY_COUNT:
    .space  8
