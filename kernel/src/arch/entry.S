/*
 * Moat EL2 entry points.
 *
 * The first 64 bytes are an arm64 Linux Image header, so firmware and QEMU
 * load the core as they would load a kernel (2 MiB aligned, x0 = device tree).
 * The primary CPU clears BSS, takes CPU 0's stack, turns on a temporary EL2
 * identity map (1 GiB blocks: normal memory where the core and the device tree
 * live, device memory everywhere else) and calls Rust. Secondary CPUs arrive
 * through PSCI CPU_ON with their logical index in x0 and reuse the final page
 * tables the primary published in `BOOT_MMU`.
 */

.equ CPU_STACK_SIZE, 0x8000
.equ SCTLR_EL2_RES1, 0x30c50830
/* M, C, SA, I. WXN (bit 19) joins with the final map, whose text is read-only;
 * the temporary map's one RW block must stay executable. */
.equ SCTLR_EL2_MMU_ON_EARLY, (SCTLR_EL2_RES1 | (1 << 0) | (1 << 2) | (1 << 3) | (1 << 12))
.equ CPTR_EL2_NVHE_DEFAULT, 0x33ff
/* MAIR_EL2: 0 = Normal WB RW-allocate, 1 = Device-nGnRE, 2 = Device-nGnRnE. */
.equ MAIR_EL2_VALUE, 0x0004ff
/* Block descriptors for the temporary map: AF | SH inner | AttrIndx. */
.equ EARLY_NORMAL_BLOCK, 0x701
.equ EARLY_DEVICE_BLOCK, ((1 << 54) | 0x405)

.section .text.head, "ax"
.global _start
_start:
    b       primary_entry                 /* code0 */
    .long   0                             /* code1 */
    .quad   0                             /* text_offset: load at a 2 MiB boundary */
    .quad   __image_size                  /* image_size: the image builder adds the package */
    .quad   0x2                           /* flags: little endian, 4 KiB pages, 2 MiB aligned */
    .quad   0                             /* res2 */
    .quad   0                             /* res3 */
    .quad   0                             /* res4 */
    .ascii  "ARM\x64"                     /* magic */
    .long   0                             /* res5 */

.section .text.entry, "ax"
primary_entry:
    mov     x19, x0                       /* the firmware's device tree */
    mrs     x1, CurrentEL
    cmp     x1, #(2 << 2)
    b.ne    not_at_el2

    bl      el2_common_setup

    /* Clear BSS (it holds the stacks, so nothing may touch the stack before). */
    adrp    x1, __bss_start
    add     x1, x1, :lo12:__bss_start
    adrp    x2, __bss_end
    add     x2, x2, :lo12:__bss_end
1:  cmp     x1, x2
    b.hs    2f
    stp     xzr, xzr, [x1], #16
    b       1b
2:
    adrp    x1, CPU_STACKS
    add     x1, x1, :lo12:CPU_STACKS
    add     sp, x1, #CPU_STACK_SIZE
    mov     x29, #0
    mov     x30, #0

    /* Temporary identity map: every 1 GiB block is device memory except the
     * blocks holding the core and the device tree, which are normal memory. */
    adrp    x0, EARLY_L1_TABLE
    add     x0, x0, :lo12:EARLY_L1_TABLE
    adrp    x4, __image_start
    lsr     x4, x4, #30                   /* core's 1 GiB index */
    lsr     x5, x19, #30                  /* device tree's 1 GiB index */
    mov     x1, #0                        /* index */
    ldr     x6, =EARLY_DEVICE_BLOCK
    ldr     x7, =EARLY_NORMAL_BLOCK
3:  lsl     x2, x1, #30
    cmp     x1, x4
    ccmp    x1, x5, #4, ne                /* Z set if x1 == x4 or x1 == x5 */
    csel    x3, x7, x6, eq
    orr     x2, x2, x3
    str     x2, [x0, x1, lsl #3]
    add     x1, x1, #1
    cmp     x1, #512
    b.lo    3b

    mrs     x1, id_aa64mmfr0_el1
    and     x1, x1, #0xf                  /* PARange */
    cmp     x1, #5
    mov     x2, #5
    csel    x1, x1, x2, ls                /* at most 48 bits: no LPA2 */
    bl      compute_tcr_el2               /* x1 = PS -> x1 = TCR_EL2 */
    ldr     x2, =MAIR_EL2_VALUE
    ldr     x3, =SCTLR_EL2_MMU_ON_EARLY
    bl      enable_mmu_el2                /* x0 = TTBR0, x1 = TCR, x2 = MAIR, x3 = SCTLR */

    mov     x0, x19
    bl      primary_main
    b       park

/*
 * Secondary CPUs (PSCI CPU_ON and resume from a powerdown suspend) enter
 * here with x0 = the logical CPU index the core passed as context id.
 */
.global secondary_entry
secondary_entry:
    mov     x19, x0
    mrs     x1, CurrentEL
    cmp     x1, #(2 << 2)
    b.ne    not_at_el2
    bl      el2_common_setup

    /* sp = CPU_STACKS + (index + 1) * CPU_STACK_SIZE */
    adrp    x1, CPU_STACKS
    add     x1, x1, :lo12:CPU_STACKS
    add     x2, x19, #1
    mov     x3, #CPU_STACK_SIZE
    madd    x1, x2, x3, x1
    mov     sp, x1
    mov     x29, #0
    mov     x30, #0

    adrp    x3, BOOT_MMU
    add     x3, x3, :lo12:BOOT_MMU
    ldp     x0, x1, [x3]                  /* TTBR0_EL2, TCR_EL2 */
    ldp     x2, x3, [x3, #16]             /* MAIR_EL2, SCTLR_EL2 */
    bl      enable_mmu_el2

    mov     x0, x19
    bl      secondary_main
    b       park

/*
 * Spin-table entry points, one per logical CPU: the boot CPU writes
 * spin_table_entries + 8 * index to that CPU's cpu-release-addr, so a CPU
 * the firmware parked arrives knowing its index (the firmware's loop passes
 * x0 = 0). Each entry is two instructions, 8 bytes.
 */
.balign 8
.global spin_table_entries
spin_table_entries:
.irp index, 0, 1, 2, 3, 4, 5, 6, 7
    mov     x0, #\index
    b       secondary_entry
.endr

/*
 * A CPU the host turned off (PSCI CPU_OFF on a board without firmware
 * PSCI) starts over on a fresh stack, x0 = its logical index, and waits in
 * the core for the next CPU_ON. Its MMU and EL2 state are already set up.
 */
.global restart_in_core
restart_in_core:
    mov     x19, x0
    adrp    x1, CPU_STACKS
    add     x1, x1, :lo12:CPU_STACKS
    add     x2, x19, #1
    mov     x3, #CPU_STACK_SIZE
    madd    x1, x2, x3, x1
    mov     sp, x1
    mov     x29, #0
    mov     x30, #0
    mov     x0, x19
    bl      secondary_main
    b       park

/* Exception vectors, SCTLR_EL2 with the MMU off, FP/SIMD untrapped. */
el2_common_setup:
    ldr     x1, =SCTLR_EL2_RES1
    msr     sctlr_el2, x1
    isb
    ldr     x1, =CPTR_EL2_NVHE_DEFAULT
    msr     cptr_el2, x1
    adrp    x1, el2_vectors
    add     x1, x1, :lo12:el2_vectors
    msr     vbar_el2, x1
    msr     tpidr_el2, xzr
    isb
    ret

/* x1 = PS field -> x1 = TCR_EL2 for a 39-bit, 4 KiB-granule identity map. */
compute_tcr_el2:
    lsl     x1, x1, #16
    mov     x2, #25                       /* T0SZ: 39-bit VA, walk starts at level 1 */
    orr     x1, x1, x2
    orr     x1, x1, #(1 << 8)             /* IRGN0 WB RA WA */
    orr     x1, x1, #(1 << 10)            /* ORGN0 WB RA WA */
    orr     x1, x1, #(3 << 12)            /* SH0 inner shareable */
    orr     x1, x1, #(1 << 23)            /* RES1 */
    orr     x1, x1, #(1 << 31)            /* RES1 */
    ret

/* x0 = TTBR0_EL2, x1 = TCR_EL2, x2 = MAIR_EL2, x3 = SCTLR_EL2. Safe to call
 * with the MMU already on, as long as both maps agree on the running code. */
.global enable_mmu_el2
enable_mmu_el2:
    msr     mair_el2, x2
    msr     tcr_el2, x1
    msr     ttbr0_el2, x0
    isb
    tlbi    alle2
    dsb     nsh
    isb
    msr     sctlr_el2, x3
    isb
    ic      iallu
    dsb     nsh
    isb
    ret

not_at_el2:
park:
    wfe
    b       park

/* Per-CPU stacks and the temporary page table live in BSS (zeroed above
 * before first use). CPU_STACK_COUNT matches cpu::MAX_CPUS. */
.equ CPU_STACK_COUNT, 8
.section .bss.stacks, "aw", %nobits
.balign 4096
.global CPU_STACKS
CPU_STACKS:
    .space  CPU_STACK_SIZE * CPU_STACK_COUNT
.global CPU_STACKS_END
CPU_STACKS_END:

.section .bss.early_pt, "aw", %nobits
.balign 4096
EARLY_L1_TABLE:
    .space  4096
