/*
 * Guest entry. The VM starts here at EL1h with the MMU off, so every data
 * access would be Device memory: before touching memory, ask the host what to
 * do (CONFIG), then turn on an identity map (L1_TABLE below, already in the
 * image), zero the BSS and enter Rust.
 */
.equ STACK_SIZE, 0x2000
/* M, C, I; SA/SA0, the RES1 bits; ATA (bit 43) is added for an MTE VM (and
 * for an MTE-off VM whose guest tries tags anyway, FLAG_TRY_TAGS). */
.equ SCTLR_EL1_MMU_ON, (0x30d00800 | (1 << 0) | (1 << 2) | (1 << 12))
/* MAIR_EL1: 0 Normal WB (Tagged as ATA above), 1 Device-nGnRE. */
.equ MAIR_PLAIN, 0x04ff
.equ MAIR_TAGGED, 0x04f0
.equ NORMAL_BLOCK, 0x701
.equ DEVICE_BLOCK, ((1 << 54) | (1 << 53) | 0x405)
.equ CONFIG, 0xc6000800
.equ FAULT, 0xc600080f
.equ PSCI_SYSTEM_OFF, 0x84000008

.section .text.entry, "ax"
.global _start
_start:
    adr     x0, guest_vectors
    msr     vbar_el1, x0
    mov     x0, #(3 << 20)              /* CPACR_EL1.FPEN: no FP/SIMD traps */
    msr     cpacr_el1, x0
    isb
    movz    x0, #(CONFIG & 0xffff)
    movk    x0, #(CONFIG >> 16), lsl #16
    mov     x1, xzr
    mov     x2, xzr
    mov     x3, xzr
    hvc     #0
    mov     x19, x0                     /* mode */
    mov     x20, x1                     /* flags */

    bl      mmu_on

    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
2:  cmp     x1, x2
    b.hs    3f
    stp     xzr, xzr, [x1], #16
    b       2b
3:  adrp    x1, STACK
    add     x1, x1, :lo12:STACK
    add     sp, x1, #STACK_SIZE
    mov     x29, xzr
    mov     x30, xzr
    mov     x0, x19
    mov     x1, x20
    bl      guest_main
    b       guest_off

/* The identity map on, caches on (x20 = the CONFIG flags); clobbers x0..x2. */
mmu_on:
    mov     x0, #MAIR_PLAIN
    mov     x1, #MAIR_TAGGED
    tst     x20, #3                     /* FLAG_MTE | FLAG_TRY_TAGS */
    csel    x0, x1, x0, ne
    msr     mair_el1, x0
    mrs     x1, id_aa64mmfr0_el1
    and     x1, x1, #7
    lsl     x1, x1, #32                 /* IPS */
    mov     x2, #25                     /* T0SZ: 39 bits, walks start at L1 */
    orr     x1, x1, x2
    orr     x1, x1, #(1 << 8)           /* IRGN0 WB */
    orr     x1, x1, #(1 << 10)          /* ORGN0 WB */
    orr     x1, x1, #(3 << 12)          /* SH0 inner */
    orr     x1, x1, #(1 << 23)          /* EPD1: no TTBR1 walks */
    msr     tcr_el1, x1
    adrp    x1, L1_TABLE
    msr     ttbr0_el1, x1
    isb
    tlbi    vmalle1
    dsb     nsh
    isb
    movz    x1, #(SCTLR_EL1_MMU_ON & 0xffff)
    movk    x1, #((SCTLR_EL1_MMU_ON >> 16) & 0xffff), lsl #16
    tst     x20, #3                     /* FLAG_MTE | FLAG_TRY_TAGS */
    b.eq    1f
    orr     x1, x1, #(1 << 43)          /* ATA: EL1 may access allocation tags */
1:  msr     sctlr_el1, x1
    isb
    ret

/* A vCPU started by PSCI CPU_ON (x0 = its context, unused): the same
 * identity map, a stack of its own, then Rust. Only the parallel probe
 * starts one, once vCPU 0 has zeroed the BSS. */
.global secondary_start
secondary_start:
    adr     x0, guest_vectors
    msr     vbar_el1, x0
    mov     x0, #(3 << 20)              /* CPACR_EL1.FPEN: no FP/SIMD traps */
    msr     cpacr_el1, x0
    isb
    mov     x20, xzr                    /* flags: no MTE */
    bl      mmu_on
    adrp    x1, SECONDARY_STACK
    add     x1, x1, :lo12:SECONDARY_STACK
    add     sp, x1, #STACK_SIZE
    mov     x29, xzr
    mov     x30, xzr
    bl      secondary_main
5:  wfi
    b       5b

.global guest_off
guest_off:
    movz    x0, #(PSCI_SYSTEM_OFF & 0xffff)
    movk    x0, #(PSCI_SYSTEM_OFF >> 16), lsl #16
    hvc     #0
4:  wfi
    b       4b

/* An exception the guest does not expect: report it to the host (x4 = the
 * vector's offset), then power off. */
.macro fatal_vector offset
    .balign 0x80
    mov     x4, #\offset
    b       fatal
.endm

.balign 2048
guest_vectors:
    .irp    offset, 0x000, 0x080, 0x100, 0x180
    fatal_vector \offset
    .endr
    /* 0x200: current EL with SP_ELx, synchronous. */
    .balign 0x80
    b       current_sync
    .irp    offset, 0x280, 0x300, 0x380, 0x400, 0x480, 0x500, 0x580, 0x600, 0x680, 0x700, 0x780
    fatal_vector \offset
    .endr

fatal:
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    mrs     x3, far_el1
    movz    x0, #(FAULT & 0xffff)
    movk    x0, #(FAULT >> 16), lsl #16
    hvc     #0
    b       guest_off

/*
 * A synchronous exception from the guest itself. While TRAP_STATE's first
 * word is non-zero the guest expects one: count it, keep ESR_EL1 and
 * ELR_EL1, skip the instruction and return. Otherwise it is fatal. Until
 * the check passes only x0 is used, saved in TPIDR_EL1, so this works before
 * the stack is set up.
 */
current_sync:
    msr     tpidr_el1, x0
    adrp    x0, TRAP_STATE
    ldr     x0, [x0, :lo12:TRAP_STATE]
    cbz     x0, 1f
    mrs     x0, tpidr_el1
    stp     x0, x1, [sp, #-32]!
    stp     x2, x3, [sp, #16]
    adrp    x0, TRAP_STATE
    add     x0, x0, :lo12:TRAP_STATE
    ldr     x3, [x0, #8]
    add     x3, x3, #1
    mrs     x1, esr_el1
    mrs     x2, elr_el1
    str     x3, [x0, #8]
    stp     x1, x2, [x0, #16]
    mrs     x3, far_el1
    str     x3, [x0, #32]
    add     x2, x2, #4
    msr     elr_el1, x2
    ldp     x2, x3, [sp, #16]
    ldp     x0, x1, [sp], #32
    eret
1:  mrs     x0, tpidr_el1
    mov     x4, #0x200
    b       fatal

/* The identity map: 1 GiB blocks, Normal for the guest's gigabyte, Device
 * for the rest of the low 4 GiB (so a stray access is an MMIO exit). */
.section .data.table, "aw"
.balign 4096
L1_TABLE:
    .quad   0x00000000 | DEVICE_BLOCK
    .quad   0x40000000 | NORMAL_BLOCK
    .quad   0x80000000 | DEVICE_BLOCK
    .quad   0xc0000000 | DEVICE_BLOCK
    .space  4096 - 32

.section .bss.stack, "aw", %nobits
.balign 16
STACK:
    .space  STACK_SIZE
SECONDARY_STACK:
    .space  STACK_SIZE

/* Armed (non-zero: expect exceptions), count, last ESR_EL1, last ELR_EL1,
 * last FAR_EL1. */
.section .bss.trap, "aw", %nobits
.balign 8
.global TRAP_STATE
TRAP_STATE:
    .space  40
