/*
 * A position-independent raw payload for QEMU virt: walk the flattened
 * device tree in x0, print /chosen's "bootargs" on the PL011 at 0x09000000,
 * then PSCI SYSTEM_OFF through HVC. Only PC-relative addressing is used, so
 * it runs wherever it is loaded.
 */
.equ UART, 0x09000000
.equ PSCI_SYSTEM_OFF, 0x84000008

.section .text.entry, "ax"
.global entry
entry:
    mov     x19, x0
    ldr     x20, =UART
    adr     x1, msg_prefix
    bl      puts
    ldr     w2, [x19, #8]
    rev     w2, w2                      /* off_dt_struct */
    ldr     w3, [x19, #12]
    rev     w3, w3                      /* off_dt_strings */
    add     x21, x19, x2
    add     x22, x19, x3
next_token:
    ldr     w4, [x21], #4
    rev     w4, w4
    cmp     w4, #1
    b.eq    begin_node
    cmp     w4, #3
    b.eq    property
    cmp     w4, #9
    b.eq    not_found
    b       next_token                  /* END_NODE, NOP */
begin_node:
1:  ldrb    w5, [x21], #1
    cbnz    w5, 1b
    add     x21, x21, #3
    and     x21, x21, #~3
    b       next_token
property:
    ldr     w5, [x21], #4
    rev     w5, w5                      /* value length */
    ldr     w6, [x21], #4
    rev     w6, w6                      /* name offset */
    add     x7, x22, x6
    adr     x8, name_bootargs
2:  ldrb    w9, [x7], #1
    ldrb    w10, [x8], #1
    cmp     w9, w10
    b.ne    skip_value
    cbnz    w9, 2b
    mov     x1, x21
    bl      puts
    b       done
skip_value:
    add     x21, x21, x5
    add     x21, x21, #3
    and     x21, x21, #~3
    b       next_token
not_found:
    adr     x1, msg_none
    bl      puts
done:
    adr     x1, msg_newline
    bl      puts
    ldr     x0, =PSCI_SYSTEM_OFF
    hvc     #0
3:  wfe
    b       3b

/* x1 = NUL-terminated string; x20 = PL011 base. */
puts:
4:  ldrb    w2, [x1], #1
    cbz     w2, 6f
5:  ldr     w3, [x20, #0x18]
    tbnz    w3, #5, 5b                  /* FR.TXFF */
    str     w2, [x20]
    b       4b
6:  ret

msg_prefix:    .asciz "external payload: bootargs="
msg_none:      .asciz "(none)"
msg_newline:   .asciz "\r\n"
name_bootargs: .asciz "bootargs"
.balign 8
.ltorg
