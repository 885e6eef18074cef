/*
 * EL2 exception vectors.
 *
 * Exceptions from a partition (lower EL, AArch64) save the partition's
 * general-purpose registers, PC and PSTATE into the register frame TPIDR_EL2
 * points at, then call `handle_lower_exception(frame, kind)`. Rust returns
 * the frame to resume, which may belong to another partition, and the exit path
 * restores it and erets. The EL2 stack is empty at every entry from a lower
 * EL, so x0/x1 are parked there while TPIDR_EL2 is read.
 *
 * Exceptions taken at EL2 itself are bugs in the core: they save a frame on
 * the stack and call `handle_el2_exception`, which prints it and parks.
 *
 * Frame layout (GuestRegs in Rust): x0..x30 at 8*n, pc at 248, pstate at 256.
 *
 * One call is answered in the vector itself: the host's NULL hypercall
 * (`host_null_fast_path` below). The values in braces are constants from
 * Rust (`arch/mod.rs` passes them), so each is declared once.
 */

.macro save_partition_frame kind
    stp     x0, x1, [sp, #-16]!
    save_pushed_partition_frame \kind
.endm

/* As `save_partition_frame`, with x0/x1 already pushed. */
.macro save_pushed_partition_frame kind
    mrs     x0, tpidr_el2
    stp     x2, x3, [x0, #16]
    stp     x4, x5, [x0, #32]
    stp     x6, x7, [x0, #48]
    stp     x8, x9, [x0, #64]
    stp     x10, x11, [x0, #80]
    stp     x12, x13, [x0, #96]
    stp     x14, x15, [x0, #112]
    stp     x16, x17, [x0, #128]
    stp     x18, x19, [x0, #144]
    stp     x20, x21, [x0, #160]
    stp     x22, x23, [x0, #176]
    stp     x24, x25, [x0, #192]
    stp     x26, x27, [x0, #208]
    stp     x28, x29, [x0, #224]
    ldp     x2, x3, [sp], #16
    stp     x2, x3, [x0, #0]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x30, x2, [x0, #240]
    str     x3, [x0, #256]
    mov     x1, #\kind
    bl      handle_lower_exception
    b       resume_partition
.endm

.macro save_el2_frame kind
    sub     sp, sp, #272
    stp     x0, x1, [sp, #0]
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x30, x2, [sp, #240]
    str     x3, [sp, #256]
    mov     x0, sp
    mov     x1, #\kind
    bl      handle_el2_exception
1:  wfe
    b       1b
.endm

/*
 * The host's NULL hypercall, answered without saving a frame: the floor of
 * every call's cost. Only the exact call takes it: function id NULL in w0
 * (the id is 32 bits, as the full path compares it), ESR_EL2 exactly an
 * HVC #0 from AArch64 (any other class or immediate differs), the running
 * vCPU the host's (its `Vcpu::kind` through TPIDR_EL2; a VM's or a
 * service's NULL goes the full path), and the machine not stopping (a CPU
 * entering the core then parks, which the full path does). Anything else
 * continues into the full path with x0/x1 still pushed. The answer is the
 * full path's: x0 = 0, every other register and PC/PSTATE as they were.
 * Uses x0/x1 only, which the EL2 stack holds meanwhile.
 */
.macro host_null_fast_path
    stp     x0, x1, [sp, #-16]!
    mov     w1, #{NULL}
    cmp     w0, w1
    b.ne    lower_sync_full_path
    mrs     x0, esr_el2
    mov     x1, #{ESR_HVC0}
    cmp     x0, x1
    b.ne    lower_sync_full_path
    mrs     x0, tpidr_el2
    ldr     x0, [x0, #{VCPU_KIND}]
    cbnz    x0, lower_sync_full_path
    adrp    x0, {STOPPING}
    ldrb    w0, [x0, :lo12:{STOPPING}]
    cbnz    w0, lower_sync_full_path
    ldp     xzr, x1, [sp], #16
    mov     x0, xzr
    eret
.endm

.section .text.vectors, "ax"
.balign 2048
.global el2_vectors
el2_vectors:
/* Current EL with SP_EL0: never used by the core. */
.balign 0x80
    save_el2_frame 0
.balign 0x80
    save_el2_frame 1
.balign 0x80
    save_el2_frame 2
.balign 0x80
    save_el2_frame 3
/* Current EL with SP_EL2. */
.balign 0x80
    save_el2_frame 4
.balign 0x80
    save_el2_frame 5
.balign 0x80
    save_el2_frame 6
.balign 0x80
    save_el2_frame 7
/* Lower EL, AArch64. */
.balign 0x80
    host_null_fast_path
.balign 0x80
    save_partition_frame 9
.balign 0x80
    save_partition_frame 10
.balign 0x80
    save_partition_frame 11
/* Lower EL, AArch32: partitions are AArch64-only (HCR_EL2.RW = 1). */
.balign 0x80
    save_partition_frame 12
.balign 0x80
    save_partition_frame 13
.balign 0x80
    save_partition_frame 14
.balign 0x80
    save_partition_frame 15

/* Every synchronous exception from AArch64 EL1/EL0 but the host's NULL. */
lower_sync_full_path:
    save_pushed_partition_frame 8

/* x0 = frame to resume. */
.global resume_partition
resume_partition:
    msr     tpidr_el2, x0
    ldp     x2, x3, [x0, #248]
    msr     elr_el2, x2
    msr     spsr_el2, x3
    ldp     x2, x3, [x0, #16]
    ldp     x4, x5, [x0, #32]
    ldp     x6, x7, [x0, #48]
    ldp     x8, x9, [x0, #64]
    ldp     x10, x11, [x0, #80]
    ldp     x12, x13, [x0, #96]
    ldp     x14, x15, [x0, #112]
    ldp     x16, x17, [x0, #128]
    ldp     x18, x19, [x0, #144]
    ldp     x20, x21, [x0, #160]
    ldp     x22, x23, [x0, #176]
    ldp     x24, x25, [x0, #192]
    ldp     x26, x27, [x0, #208]
    ldp     x28, x29, [x0, #224]
    ldr     x30, [x0, #240]
    ldp     x0, x1, [x0, #0]
    eret

/*
 * Nested partition runs. `enter_nested(frame, save)` saves the core's
 * callee-saved registers and stack pointer in `save` (NestedSave) and enters
 * the vCPU `frame`. When that vCPU traps, the handler calls
 * `leave_nested(save)`, which restores them and returns from `enter_nested`
 * as if it were an ordinary function call: to the core, running a service
 * until it stops is a function call.
 */
.global enter_nested
enter_nested:
    stp     x19, x20, [x1, #0]
    stp     x21, x22, [x1, #16]
    stp     x23, x24, [x1, #32]
    stp     x25, x26, [x1, #48]
    stp     x27, x28, [x1, #64]
    stp     x29, x30, [x1, #80]
    mov     x2, sp
    str     x2, [x1, #96]
    b       resume_partition

.global leave_nested
leave_nested:
    ldp     x19, x20, [x0, #0]
    ldp     x21, x22, [x0, #16]
    ldp     x23, x24, [x0, #32]
    ldp     x25, x26, [x0, #48]
    ldp     x27, x28, [x0, #64]
    ldp     x29, x30, [x0, #80]
    ldr     x2, [x0, #96]
    mov     sp, x2
    ret
