// The null hypervisor: an arm64 Image that programs EL2 to trap nothing and
// translate nothing, then enters the kernel loaded at KERNEL_AT at EL1.
//
// Entry (arm64 boot protocol): EL2, MMU off, x0 = device tree.

    .section .text.image, "ax"
    .global stub_image
stub_image:
    b       stub_start              // code0
    .word   0                       // code1
    .quad   0                       // text_offset
    .quad   0x10000                 // image_size
    .quad   0xa                     // flags: little-endian, 4 KiB pages, anywhere
    .quad   0, 0, 0                 // res2..res4
    .word   0x644d5241              // magic "ARM\x64"
    .word   0                       // res5
// Offset 0x40: where the kernel's Image must be loaded (2 MiB aligned). The
// benchmark reads this word to place the kernel.
kernel_at:
    .quad   0x50000000

stub_start:
    mov     x19, x0                 // the device tree, for the kernel

    adr     x1, stub_vectors
    msr     vbar_el2, x1

    mrs     x20, id_aa64pfr0_el1
    mrs     x21, id_aa64pfr1_el1

    // HCR_EL2: EL1 is AArch64 (RW); pointer-authentication keys and
    // instructions are the host's own (APK, API); allocation tags too (ATA)
    // when the CPU has MTE with tag storage (ID_AA64PFR1_EL1.MTE >= 2). VM
    // stays clear: no stage-2. Nothing is trapped.
    mov     x1, #(1 << 31)
    orr     x1, x1, #(3 << 40)
    ubfx    x2, x21, #8, #4
    cmp     x2, #2
    b.lo    1f
    orr     x1, x1, #(1 << 56)
1:  msr     hcr_el2, x1

    // CPTR_EL2: no FP, SVE or SME traps. TZ (bit 8) and TSM (bit 12) are
    // RES1 when SVE or SME is absent.
    mov     x1, #0x22ff
    ubfx    x2, x20, #32, #4        // SVE
    cbnz    x2, 2f
    orr     x1, x1, #(1 << 8)
2:  ubfx    x3, x21, #24, #4        // SME
    cbnz    x3, 3f
    orr     x1, x1, #(1 << 12)
3:  msr     cptr_el2, x1
    isb
    cbz     x2, 4f
    mov     x1, #0xf                // ZCR_EL2.LEN: every vector length
    msr     s3_4_c1_c2_0, x1
4:  cbz     x3, 5f
    mrs     x4, s3_0_c0_c4_5        // ID_AA64SMFR0_EL1
    mov     x1, #0xf                // SMCR_EL2.LEN: every vector length
    tbz     x4, #63, 6f
    orr     x1, x1, #(1 << 31)      // FA64
6:  ubfx    x5, x4, #56, #4         // SMEver: SME2 has ZT0
    cbz     x5, 7f
    orr     x1, x1, #(1 << 30)      // EZT0
7:  msr     s3_4_c1_c2_6, x1
5:
    // Timers: EL1 may use the physical counter and timer; no offset.
    mov     x1, #3
    msr     cnthctl_el2, x1
    msr     cntvoff_el2, xzr

    // GICv3 system registers usable from EL1.
    ubfx    x2, x20, #24, #4
    cbz     x2, 8f
    mov     x1, #0xf
    msr     s3_4_c12_c9_5, x1       // ICC_SRE_EL2: Enable, DIB, DFB, SRE
    isb
8:
    // PMU: every event counter belongs to EL1 (MDCR_EL2.HPMN = PMCR_EL0.N).
    mrs     x2, id_aa64dfr0_el1
    ubfx    x2, x2, #8, #4
    cbz     x2, 9f
    cmp     x2, #0xf
    b.eq    9f
    mrs     x1, pmcr_el0
    ubfx    x1, x1, #11, #5
    msr     mdcr_el2, x1
9:
    msr     vttbr_el2, xzr
    isb

    // Enter the kernel at EL1h with every exception masked.
    mov     x1, #0x3c5
    msr     spsr_el2, x1
    ldr     x1, kernel_at
    msr     elr_el2, x1
    mov     x0, x19
    mov     x1, xzr
    mov     x2, xzr
    mov     x3, xzr
    eret

// Nothing traps to EL2 and the kernel has no hypervisor calls to make (its
// device tree names no hypervisor conduit): an exception taken here is a
// fault in the stub's configuration. Stop where a debugger can see it.
    .balign 2048
stub_vectors:
    .rept   16
    .balign 128
    b       .
    .endr
