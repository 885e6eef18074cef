//! The guest's body (aarch64 only).

use crate::protocol::*;
use core::ptr::{addr_of, addr_of_mut};
use moat_abi::vm::{GUEST_SHARE_HOST, GUEST_UNSHARE_HOST};

core::arch::global_asm!(include_str!("entry.S"));

unsafe extern "C" {
    fn guest_off() -> !;
    /// `entry.S`'s entry point for a vCPU started by PSCI CPU_ON.
    fn secondary_start();
    /// `entry.S`'s record of expected exceptions: armed, count, last
    /// ESR_EL1, last ELR_EL1.
    static mut TRAP_STATE: [u64; 5];
}

/// One page of the guest's memory.
#[repr(C, align(4096))]
struct Page([u64; 512]);

/// The page the guest shares with the host.
static mut SHARED_PAGE: Page = Page([0; 512]);
/// Where the guest computes its hello value.
static mut WORK: [u64; HELLO_WORDS] = [0; HELLO_WORDS];
/// A granule the guest tags itself (MTE VMs).
static mut OWN_GRANULE: Page = Page([0; 512]);

/// An SMCCC call: x0 = `function`, x1..x5 = `args`; returns x0..x3.
fn hvc(function: u32, args: [u64; 5]) -> [u64; 4] {
    let r: [u64; 4];
    // SAFETY: a hypercall; the core or the host answers in x0..x3 and, as
    // SMCCC 1.2 allows, may change x4..x17, which are declared clobbered.
    unsafe {
        let (r0, r1, r2, r3);
        core::arch::asm!(
            "hvc #0",
            inlateout("x0") u64::from(function) => r0,
            inlateout("x1") args[0] => r1,
            inlateout("x2") args[1] => r2,
            inlateout("x3") args[2] => r3,
            inlateout("x4") args[3] => _,
            inlateout("x5") args[4] => _,
            lateout("x6") _, lateout("x7") _, lateout("x8") _, lateout("x9") _,
            lateout("x10") _, lateout("x11") _, lateout("x12") _, lateout("x13") _,
            lateout("x14") _, lateout("x15") _, lateout("x16") _, lateout("x17") _,
            options(nostack),
        );
        r = [r0, r1, r2, r3];
    }
    r
}

fn shared_ipa() -> u64 {
    addr_of!(SHARED_PAGE) as u64
}

fn shared_word(i: usize) -> *mut u64 {
    // SAFETY: `i` is below 512, within the page.
    unsafe { (addr_of_mut!(SHARED_PAGE) as *mut u64).add(i % 512) }
}

fn shared_bytes() -> *mut u8 {
    addr_of_mut!(SHARED_PAGE) as *mut u8
}

#[unsafe(no_mangle)]
extern "C" fn guest_main(mode: u64, flags: u64) {
    match mode {
        MODE_DEMO => demo(flags),
        MODE_SPIN => spin(),
        MODE_PING => ping(),
        MODE_MTE_PROBE => mte_probe(flags),
        MODE_SHARED_AT_EXIT => shared_at_exit(),
        MODE_VECTORS => vectors(),
        MODE_SPIN_COUNT => spin_count(),
        MODE_DEBUG_PROBE => debug_probe(),
        MODE_CONSOLE => console(),
        MODE_VGIC_PROBE => vgic_probe(flags),
        MODE_PKVM_PROBE => pkvm_probe(),
        MODE_PEEK => peek(),
        MODE_CHAOS => chaos(),
        MODE_PARALLEL => parallel_probe(),
        _ => {}
    }
}

/// Chaos mode: actions on the chaos window drawn from the host's seed,
/// each reported with its result. The guest keeps its own record of which
/// window pages it shared (from the results it got), so whichever CPU runs
/// it, each report says what the call should have returned.
fn chaos() {
    let mut state = hvc(CHAOS_SEED, [0; 5])[0] | 1;
    let mut next = move || {
        // xorshift64*: small, and enough to vary the order of actions.
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let mut shared: u64 = 0;
    loop {
        let r = next();
        let action = (r >> 32) % CHAOS_ACTIONS;
        let k = (r >> 8) % CHAOS_WINDOW_PAGES;
        let ipa = CHAOS_WINDOW_IPA + k * PAGE_SIZE;
        let before = shared;
        let (at, result) = match action {
            CHAOS_SHARE => {
                let x = hvc(GUEST_SHARE_HOST, [ipa, 1, 0, 0, 0])[0];
                if x == 0 {
                    shared |= 1 << k;
                    // SAFETY: the page is ours (the share succeeded, so it
                    // is mapped) and the host may read this word.
                    unsafe { (ipa as *mut u64).write_volatile(chaos_mark(ipa)) };
                }
                (ipa, x)
            }
            CHAOS_UNSHARE => {
                let x = hvc(GUEST_UNSHARE_HOST, [ipa, 1, 0, 0, 0])[0];
                if x == 0 {
                    shared &= !(1 << k);
                }
                (ipa, x)
            }
            CHAOS_SHARE_STRADDLE => {
                let last = CHAOS_WINDOW_IPA + (CHAOS_WINDOW_PAGES - 1) * PAGE_SIZE;
                (last, hvc(GUEST_SHARE_HOST, [last, 2, 0, 0, 0])[0])
            }
            // SAFETY: a window page: ours if the host donated it, an MMIO
            // exit the host answers if not.
            CHAOS_READ => (ipa, unsafe { ((ipa + 8) as *const u64).read_volatile() }),
            CHAOS_WRITE => {
                // SAFETY: as for the read; the second word, never the mark.
                unsafe { ((ipa + 8) as *mut u64).write_volatile(r) };
                (ipa, 0)
            }
            CHAOS_SPIN => {
                let mut n = r % 4096;
                while n > 0 {
                    n = core::hint::black_box(n) - 1;
                }
                (0, 0)
            }
            CHAOS_WFI => {
                // SAFETY: waits for an event: an exit to the host.
                unsafe { core::arch::asm!("wfi", options(nomem, nostack)) };
                (0, 0)
            }
            _ => (
                CHAOS_FOREIGN_IPA,
                hvc(GUEST_SHARE_HOST, [CHAOS_FOREIGN_IPA, 1, 0, 0, 0])[0],
            ),
        };
        if hvc(CHAOS_DID, [action, at, result, before, 0])[0] == STOP {
            return;
        }
    }
}

fn uart_register(offset: u64) -> *mut u32 {
    (CONSOLE_IPA + offset) as *mut u32
}

fn console_write(bytes: &[u8]) {
    for &b in bytes {
        // SAFETY: a single 32-bit store to the emulated UART's data
        // register: outside the VM's memory, an MMIO exit the VMM answers.
        unsafe { uart_register(PL011_DR).write_volatile(u32::from(b)) };
    }
}

/// The next byte from the UART, `None` at a break (end of input). Waits
/// with WFI while the receive FIFO is empty: the VMM then waits for input.
fn console_read() -> Option<u8> {
    loop {
        // SAFETY: a 32-bit load from the emulated UART's flag register.
        let flags = unsafe { uart_register(PL011_FR).read_volatile() };
        if flags & PL011_FR_RXFE == 0 {
            // SAFETY: a 32-bit load from the emulated UART's data register.
            let data = unsafe { uart_register(PL011_DR).read_volatile() };
            return (data & PL011_DR_BE == 0).then_some(data as u8);
        }
        // SAFETY: waits for an event; the VMM's answer is running us again.
        unsafe { core::arch::asm!("wfi", options(nomem, nostack)) };
    }
}

/// Console mode: a greeting, one line read and echoed, then power off (or,
/// for the line [`CONSOLE_CRASH`], an undefined instruction).
fn console() {
    console_write(CONSOLE_GREETING.as_bytes());
    console_write(b"\ntype a line: ");
    let mut line = [0u8; 128];
    let mut len = 0;
    while let Some(b) = console_read() {
        if b == b'\n' || b == b'\r' {
            break;
        }
        if len < line.len() {
            line[len] = b;
            len += 1;
        }
    }
    console_write(b"\nguest heard: ");
    console_write(&line[..len]);
    console_write(b"\n");
    if &line[..len] == CONSOLE_CRASH {
        console_write(b"crashing on purpose\n");
        // SAFETY: a permanently undefined instruction: the guest's own
        // vector reports it to the VMM (FAULT) and powers off.
        unsafe { core::arch::asm!("udf #0", options(nomem, nostack)) };
    }
}

/// Writes the hello pattern into memory, reads it back and hashes it.
fn compute_hello() -> u64 {
    let work = addr_of_mut!(WORK) as *mut u64;
    for i in 0..HELLO_WORDS {
        // SAFETY: within `WORK`, which only this CPU touches.
        unsafe { work.add(i).write_volatile(pattern(i as u64)) };
    }
    let mut hash = fnv1a(&[]);
    for i in 0..HELLO_WORDS {
        // SAFETY: as above.
        let w = unsafe { work.add(i).read_volatile() };
        hash = fnv1a_from(hash, &w.to_le_bytes());
    }
    hash
}

/// Writes `n` in decimal at `at`; returns the digits written.
fn write_decimal(at: *mut u8, mut n: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        len += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for i in 0..len {
        // SAFETY: the caller leaves 20 bytes at `at`.
        unsafe { at.add(i).write_volatile(digits[len - 1 - i]) };
    }
    len
}

fn demo(flags: u64) {
    // (a) Hello, with a value computed in our own memory, and what the core
    // answered our NULL hypercall (a VM's takes the core's full path).
    let null = hvc(moat_abi::hypercall::NULL, [0; 5])[0];
    hvc(HELLO, [compute_hello(), null, 0, 0, 0]);

    // (b) A message through a shared page, and the host's reply.
    let ipa = shared_ipa();
    let shared = hvc(GUEST_SHARE_HOST, [ipa, 1, 0, 0, 0])[0];
    let page = shared_bytes();
    for (i, b) in MESSAGE_PREFIX.iter().enumerate() {
        // SAFETY: within our shared page (the prefix is far shorter).
        unsafe { page.add(i).write_volatile(*b) };
    }
    // SAFETY: the prefix and 20 digits fit well before REPLY_OFFSET.
    let digits = write_decimal(unsafe { page.add(MESSAGE_PREFIX.len()) }, message_number());
    let len = MESSAGE_PREFIX.len() + digits;
    let answer = hvc(SHARED, [ipa, shared, len as u64, 0, 0]);
    let reply_len = (answer[1] as usize).min(4096 - REPLY_OFFSET);
    let mut hash = fnv1a(&[]);
    for i in 0..reply_len {
        // SAFETY: within the page's second half.
        let b = unsafe { page.add(REPLY_OFFSET + i).read_volatile() };
        hash = fnv1a_from(hash, &[b]);
    }
    hvc(REPLY_SEEN, [hash, reply_len as u64, answer[0], 0, 0]);

    // (c) A page that is not ours.
    let r = hvc(GUEST_SHARE_HOST, [FOREIGN_IPA, 1, 0, 0, 0])[0];
    hvc(SHARE_FOREIGN, [r, FOREIGN_IPA, 0, 0, 0]);

    // (d) End the share.
    let r = hvc(GUEST_UNSHARE_HOST, [ipa, 1, 0, 0, 0])[0];
    hvc(UNSHARED, [r, ipa, 0, 0, 0]);

    // (e) Outside our memory: an MMIO read the host answers, then a write.
    let v: u64;
    // SAFETY: a single load from an IPA our stage-2 does not map; the core
    // turns it into an exit and the host supplies the value.
    unsafe {
        core::arch::asm!("ldr {v}, [{a}]", v = out(reg) v, a = in(reg) MMIO_READ_IPA, options(nostack));
    }
    // SAFETY: a single 4-byte store outside our memory, as above.
    unsafe {
        core::arch::asm!("str {v:w}, [{a}]", v = in(reg) MMIO_WRITE_VALUE, a = in(reg) MMIO_WRITE_IPA, options(nostack));
    }
    hvc(MMIO_VALUE, [v, 0, 0, 0, 0]);

    // (e') An address with no device: the host answers with an abort, which
    // our handler takes (and skips) like a bus error; the load's target
    // register keeps what it held.
    arm_traps();
    let at: u64;
    let mut kept: u64 = MMIO_KEPT;
    // SAFETY: a single load outside our memory; the abort it takes is
    // counted by the armed handler, which skips the load.
    unsafe {
        core::arch::asm!("adr {at}, 1f", "1:", "ldr {v}, [{a}]", at = out(reg) at, v = inout(reg) kept, a = in(reg) MMIO_ABORT_IPA, options(nostack));
    }
    let (count, esr, elr) = disarm_traps();
    // SAFETY: word 4 of `TRAP_STATE`, written by the handler.
    let far = unsafe { trap_word(4).read_volatile() };
    hvc(MMIO_ABORTED, [count, esr, far, elr.wrapping_sub(at), kept]);

    // (f) Tags of a page the host tagged before donating it.
    if flags & FLAG_MTE != 0 {
        let host_tagged = ldg(TAG_PAGE_IPA);
        let own = addr_of!(OWN_GRANULE) as u64;
        stg(own, 3);
        hvc(TAGS, [host_tagged, ldg(own), 0, 0, 0]);
    }

    // (g) Wait for an interrupt once.
    // SAFETY: WFI has no effect on memory; the core turns it into an exit.
    unsafe { core::arch::asm!("wfi", options(nostack)) };
}

/// The allocation tag of the granule at `addr`.
fn ldg(addr: u64) -> u64 {
    let out: u64;
    // SAFETY: `addr` is 16-byte aligned memory of ours, mapped Tagged Normal
    // in an MTE VM; LDG reads only its tag.
    unsafe {
        core::arch::asm!(".arch_extension memtag", "ldg {o}, [{a}]", a = in(reg) addr, o = inout(reg) addr => out, options(nostack));
    }
    (out >> 56) & 0xf
}

/// Sets the allocation tag of the granule at `addr`.
fn stg(addr: u64, tag: u64) {
    // SAFETY: as for `ldg`; STG changes only the granule's tag.
    unsafe {
        core::arch::asm!(".arch_extension memtag", "stg {t}, [{a}]", a = in(reg) addr, t = in(reg) addr | (tag << 56), options(nostack));
    }
}

/// Shares a page, then counts in it until the host writes [`STOP`].
fn spin() {
    let ipa = shared_ipa();
    let r = hvc(GUEST_SHARE_HOST, [ipa, 1, 0, 0, 0])[0];
    hvc(SPINNING, [ipa, r, 0, 0, 0]);
    let mut n = 0u64;
    loop {
        n += 1;
        // SAFETY: words of our shared page; the host writes word 1.
        unsafe {
            shared_word(0).write_volatile(n);
            if shared_word(1).read_volatile() == STOP {
                break;
            }
        }
    }
    hvc(GUEST_UNSHARE_HOST, [ipa, 1, 0, 0, 0]);
}

/// Spins as many iterations as the host asks, between two exits: what a
/// host counter must not see.
fn spin_count() {
    let n = hvc(SPIN_READY, [0; 5])[0].max(1);
    // SAFETY: a register-only loop of SUBS and B.NE, `n` times.
    unsafe {
        core::arch::asm!("1:", "subs {n}, {n}, #1", "b.ne 1b", n = inout(reg) n => _,
            options(nomem, nostack));
    }
    hvc(SPUN, [n, 0, 0, 0, 0]);
}

core::arch::global_asm!(
    ".text",
    ".balign 4",
    ".global debug_probe_target",
    "debug_probe_target:",
    "    nop",
    "    ret",
);

unsafe extern "C" {
    /// An instruction the host may put a breakpoint on (the NOP; the
    /// handler skips it if a breakpoint fires).
    fn debug_probe_target();
}

/// The word the debug probe writes and reads.
static mut DEBUG_WORD: u64 = 0;

/// Reports [`debug_probe_target`] and [`DEBUG_WORD`], then, with debug
/// exceptions unmasked, runs the one and writes and reads the other,
/// counting every exception that reaches the vector.
fn debug_probe() {
    let target = debug_probe_target as *const () as u64;
    let word = addr_of_mut!(DEBUG_WORD);
    hvc(DEBUG_TARGETS, [target, word as u64, 0, 0, 0]);
    arm_traps();
    let read: u64;
    // SAFETY: unmasks debug exceptions (PSTATE.D) for the call and the
    // store and load of our own word, then masks them again; an exception
    // in between is counted and skipped by the armed handler.
    unsafe {
        core::arch::asm!("msr daifclr, #8", "isb", options(nostack));
        debug_probe_target();
        word.write_volatile(DEBUG_WORD_VALUE);
        read = word.read_volatile();
        core::arch::asm!("msr daifset, #8", "isb", options(nostack));
    }
    let (count, esr, elr) = disarm_traps();
    hvc(DEBUG_DONE, [count, esr, elr, read, 0]);
}

/// Exits to the host until it answers [`STOP`].
fn ping() {
    let mut n = 0;
    while hvc(PING, [n, 0, 0, 0, 0])[0] != STOP {
        n += 1;
    }
}

/// The vector probe: V0..V31 filled, an exit to the host (which runs with
/// its own vector registers meanwhile), then every register read back.
fn vectors() {
    let mut seen = [0u128; 32];
    let p = seen.as_mut_ptr();
    // SAFETY: writes the vector registers (all declared clobbered), makes
    // the VECTORS_SET hypercall and stores the 32 registers into `seen`
    // (512 bytes, 16-byte aligned).
    unsafe {
        core::arch::asm!(
            "movi v0.16b, #0x40", "movi v1.16b, #0x41", "movi v2.16b, #0x42", "movi v3.16b, #0x43",
            "movi v4.16b, #0x44", "movi v5.16b, #0x45", "movi v6.16b, #0x46", "movi v7.16b, #0x47",
            "movi v8.16b, #0x48", "movi v9.16b, #0x49", "movi v10.16b, #0x4a", "movi v11.16b, #0x4b",
            "movi v12.16b, #0x4c", "movi v13.16b, #0x4d", "movi v14.16b, #0x4e", "movi v15.16b, #0x4f",
            "movi v16.16b, #0x50", "movi v17.16b, #0x51", "movi v18.16b, #0x52", "movi v19.16b, #0x53",
            "movi v20.16b, #0x54", "movi v21.16b, #0x55", "movi v22.16b, #0x56", "movi v23.16b, #0x57",
            "movi v24.16b, #0x58", "movi v25.16b, #0x59", "movi v26.16b, #0x5a", "movi v27.16b, #0x5b",
            "movi v28.16b, #0x5c", "movi v29.16b, #0x5d", "movi v30.16b, #0x5e", "movi v31.16b, #0x5f",
            "hvc #0",
            "stp q0, q1, [{p}, #0]", "stp q2, q3, [{p}, #32]",
            "stp q4, q5, [{p}, #64]", "stp q6, q7, [{p}, #96]",
            "stp q8, q9, [{p}, #128]", "stp q10, q11, [{p}, #160]",
            "stp q12, q13, [{p}, #192]", "stp q14, q15, [{p}, #224]",
            "stp q16, q17, [{p}, #256]", "stp q18, q19, [{p}, #288]",
            "stp q20, q21, [{p}, #320]", "stp q22, q23, [{p}, #352]",
            "stp q24, q25, [{p}, #384]", "stp q26, q27, [{p}, #416]",
            "stp q28, q29, [{p}, #448]", "stp q30, q31, [{p}, #480]",
            p = in(reg) p,
            inlateout("x0") u64::from(VECTORS_SET) => _,
            lateout("x1") _, lateout("x2") _, lateout("x3") _, lateout("x4") _,
            lateout("x5") _, lateout("x6") _, lateout("x7") _, lateout("x8") _,
            lateout("x9") _, lateout("x10") _, lateout("x11") _, lateout("x12") _,
            lateout("x13") _, lateout("x14") _, lateout("x15") _, lateout("x16") _,
            lateout("x17") _,
            out("v0") _, out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _,
            out("v6") _, out("v7") _, out("v8") _, out("v9") _, out("v10") _, out("v11") _,
            out("v12") _, out("v13") _, out("v14") _, out("v15") _, out("v16") _, out("v17") _,
            out("v18") _, out("v19") _, out("v20") _, out("v21") _, out("v22") _, out("v23") _,
            out("v24") _, out("v25") _, out("v26") _, out("v27") _, out("v28") _, out("v29") _,
            out("v30") _, out("v31") _,
            options(nostack),
        );
    }
    let lost = seen
        .iter()
        .enumerate()
        .filter(|(i, v)| **v != u128::from_ne_bytes([vector_byte(*i); 16]))
        .count() as u64;
    hvc(VECTORS_CHECKED, [lost, 0, 0, 0, 0]);
}

fn trap_word(i: usize) -> *mut u64 {
    // SAFETY: `i` is below 5, within `TRAP_STATE`.
    unsafe { (addr_of_mut!(TRAP_STATE) as *mut u64).add(i % 5) }
}

/// Expect exceptions from here on: the handler at VBAR_EL1 + 0x200 counts
/// them and skips each faulting instruction.
fn arm_traps() {
    // SAFETY: words of `TRAP_STATE`; the handler only runs on this CPU,
    // within the asm blocks that follow.
    unsafe {
        trap_word(1).write_volatile(0);
        trap_word(2).write_volatile(0);
        trap_word(3).write_volatile(0);
        trap_word(4).write_volatile(0);
        trap_word(0).write_volatile(1);
    }
}

/// Stop expecting exceptions; returns (count, last ESR_EL1, last ELR_EL1).
fn disarm_traps() -> (u64, u64, u64) {
    // SAFETY: as for `arm_traps`.
    unsafe {
        trap_word(0).write_volatile(0);
        (
            trap_word(1).read_volatile(),
            trap_word(2).read_volatile(),
            trap_word(3).read_volatile(),
        )
    }
}

/// Reads a system register by name or encoding.
macro_rules! mrs {
    ($reg:literal) => {{
        let v: u64;
        // SAFETY: reads a register without side effects (an ID register,
        // or an MTE register of an MTE-on VM).
        unsafe { core::arch::asm!(concat!("mrs {}, ", $reg), out(reg) v, options(nostack)) };
        v
    }};
}

/// Writes a system register by encoding.
macro_rules! msr {
    ($reg:literal, $v:expr) => {{
        // SAFETY: writes an MTE register of an MTE-on VM: tag generation
        // and tag-check status of this VM only.
        unsafe { core::arch::asm!(concat!("msr ", $reg, ", {}"), "isb", in(reg) $v, options(nostack)) };
    }};
}

/// Executes `$insn` (one MRS into x0, or one MSR of xzr) with the
/// exception handler armed; evaluates to the instruction's address.
macro_rules! probe {
    ($insn:literal) => {{
        let at: u64;
        // SAFETY: one system-register access; if it raises an exception, the
        // armed handler skips it. An MSR writes zero to an MTE register of
        // this VM. x0 is scratch.
        unsafe {
            core::arch::asm!("adr {at}, 1f", "1:", $insn, "isb", at = out(reg) at, out("x0") _, options(nostack));
        }
        at
    }};
}

/// GCR_EL1, RGSR_EL1, TFSR_EL1, TFSRE0_EL1 (by encoding).
fn mte_regs() -> [u64; 4] {
    [
        mrs!("s3_0_c1_c0_6"),
        mrs!("s3_0_c1_c0_5"),
        mrs!("s3_0_c5_c6_0"),
        mrs!("s3_0_c5_c6_1"),
    ]
}

/// What the VM sees of MTE and of the features it lacks.
fn mte_probe(flags: u64) {
    hvc(
        ID_REGS,
        [
            mrs!("s3_0_c0_c4_0"),
            mrs!("s3_0_c0_c4_1"),
            mrs!("s3_0_c0_c4_2"),
            mrs!("s3_0_c0_c6_1"),
            mrs!("s3_0_c0_c6_2"),
        ],
    );
    hvc(
        ID_REGS_MORE,
        [
            mrs!("s3_0_c0_c4_4"),
            mrs!("s3_0_c0_c4_5"),
            mrs!("s3_0_c0_c5_0"),
            0,
            0,
        ],
    );

    // The MTE registers: each access in its own armed window, in the order
    // of MTE_ACCESSES.
    let mut total = 0;
    for i in 0..MTE_ACCESSES.len() {
        arm_traps();
        let at = match i {
            0 => probe!("mrs x0, s3_0_c1_c0_6"),
            1 => probe!("msr s3_0_c1_c0_6, xzr"),
            2 => probe!("mrs x0, s3_0_c1_c0_5"),
            3 => probe!("msr s3_0_c1_c0_5, xzr"),
            4 => probe!("mrs x0, s3_0_c5_c6_0"),
            5 => probe!("msr s3_0_c5_c6_0, xzr"),
            6 => probe!("mrs x0, s3_0_c5_c6_1"),
            7 => probe!("msr s3_0_c5_c6_1, xzr"),
            _ => probe!("mrs x0, s3_1_c0_c0_4"),
        };
        let (n, esr, elr) = disarm_traps();
        total += n;
        hvc(MTE_ACCESS, [i as u64, n, esr, elr, at]);
    }
    hvc(MTE_ACCESSES_DONE, [total, 0, 0, 0, 0]);

    // The host's own EL0/EL1 state the VM must not reach.
    for i in 0..HOST_STATE_ACCESSES.len() {
        arm_traps();
        let at = probe!("mrs x0, s3_3_c13_c0_5");
        let (n, esr, elr) = disarm_traps();
        hvc(HOST_STATE_ACCESS, [i as u64, n, esr, elr, at]);
    }

    // Tags on a granule of our own.
    let own = addr_of!(OWN_GRANULE) as u64 + 16;
    arm_traps();
    stg(own, PROBE_TAG);
    let tag = ldg(own);
    let (n, _, _) = disarm_traps();
    hvc(TAG_PROBE, [tag, n, 0, 0, 0]);

    // The MTE registers keep the guest's values across an exit.
    if flags & FLAG_MTE != 0 {
        let [g, r, t, e] = GUEST_MTE_REGS;
        msr!("s3_0_c1_c0_6", g);
        msr!("s3_0_c1_c0_5", r);
        msr!("s3_0_c5_c6_0", t);
        msr!("s3_0_c5_c6_1", e);
        let [g, r, t, e] = mte_regs();
        hvc(MTE_REGS_SET, [g, r, t, e, 0]);
        let [g, r, t, e] = mte_regs();
        hvc(MTE_REGS_AGAIN, [g, r, t, e, 0]);
    }
}

/// Shares a page, fills it with the hello pattern and powers off with the
/// share still in place.
fn shared_at_exit() {
    let ipa = shared_ipa();
    let r = hvc(GUEST_SHARE_HOST, [ipa, 1, 0, 0, 0])[0];
    for i in 0..512 {
        // SAFETY: words of our shared page.
        unsafe { shared_word(i).write_volatile(pattern(i as u64)) };
    }
    hvc(LEFT_SHARED, [ipa, r, 0, 0, 0]);
}

/// Counts the non-zero words of the page the image leaves free and
/// reports them.
fn peek() {
    let mut nonzero = 0;
    for i in 0..PAGE_SIZE / 8 {
        // SAFETY: a word of the guest's own memory (the free page).
        let w = unsafe { ((TAG_PAGE_IPA + i * 8) as *const u64).read_volatile() };
        nonzero += u64::from(w != 0);
    }
    hvc(PEEKED, [nonzero, 0, 0, 0, 0]);
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    hvc(FAULT, [0, 0, 0, 0, 0]);
    // SAFETY: powers the VM off; never returns.
    unsafe { guest_off() }
}

/// The virtual counter now.
fn counter() -> u64 {
    let v: u64;
    // SAFETY: reads the virtual counter.
    unsafe { core::arch::asm!("isb", "mrs {}, cntvct_el0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Programs the virtual timer: CNTV_CVAL_EL0 = `cval`, CNTV_CTL_EL0 = `ctl`.
fn set_timer(ctl: u64, cval: u64) {
    // SAFETY: the guest's own virtual timer.
    unsafe {
        core::arch::asm!("msr cntv_cval_el0, {v}", "msr cntv_ctl_el0, {c}", "isb",
            v = in(reg) cval, c = in(reg) ctl, options(nomem, nostack));
    }
}

/// Acknowledges the highest-priority pending group-1 interrupt
/// (ICC_IAR1_EL1, the virtual interface's with a virtual GIC).
fn acknowledge() -> u64 {
    let v: u64;
    // SAFETY: reads ICC_IAR1_EL1; with interrupts masked at PSTATE, the
    // interrupt is only acknowledged, never taken.
    unsafe { core::arch::asm!("mrs {}, s3_0_c12_c12_0", out(reg) v, options(nomem, nostack)) };
    v & 0xff_ffff
}

/// Ends the interrupt (ICC_EOIR1_EL1; with EOImode 0 also deactivates it).
fn end_of_interrupt(intid: u64) {
    // SAFETY: writes ICC_EOIR1_EL1 for an interrupt this CPU acknowledged.
    unsafe {
        core::arch::asm!("msr s3_0_c12_c12_1, {}", "isb", in(reg) intid, options(nomem, nostack))
    };
}

/// Waits (WFI, interrupts masked at PSTATE: the wait still ends when one
/// is pending) until an interrupt can be acknowledged; 0 after `tries`.
fn wait_for_interrupt(tries: u64) -> (u64, u64) {
    for waited in 0..tries {
        let intid = acknowledge();
        if intid < 1020 {
            return (intid, waited);
        }
        // SAFETY: waits for an interrupt or an event.
        unsafe { core::arch::asm!("wfi", options(nomem, nostack)) };
    }
    (0, tries)
}

/// The interrupt probe (see `MODE_VGIC_PROBE`).
fn vgic_probe(flags: u64) {
    let vgic = flags & FLAG_VGIC != 0;
    if vgic {
        // SAFETY: the guest's own CPU interface: priority mask fully open,
        // group 1 on (the virtual interface's registers, with a virtual GIC).
        unsafe {
            core::arch::asm!(
                "msr s3_0_c4_c6_0, {ff}", "msr s3_0_c12_c12_7, {one}", "isb",
                ff = in(reg) 0xffu64, one = in(reg) 1u64, options(nomem, nostack),
            );
        }
        // The timer, a little ahead.
        set_timer(1, counter() + 2000);
        let (intid, waited) = wait_for_interrupt(100_000);
        set_timer(0, 0);
        if intid != 0 {
            end_of_interrupt(intid);
        }
        hvc(VGIC_TIMER, [intid, waited, 0, 0, 0]);
    }
    // A timer that has fired, unmasked, and is not taken while we spin.
    set_timer(1, counter());
    hvc(VGIC_SPINNING, [PROBE_SPIN, 0, 0, 0, 0]);
    // SAFETY: a register-only loop of SUBS and B.NE.
    unsafe {
        core::arch::asm!("1:", "subs {n}, {n}, #1", "b.ne 1b", n = inout(reg) PROBE_SPIN => _,
            options(nomem, nostack));
    }
    let after = if vgic { wait_for_interrupt(1000).0 } else { 0 };
    set_timer(0, 0);
    if after != 0 {
        end_of_interrupt(after);
    }
    hvc(VGIC_SPUN, [after, 0, 0, 0, 0]);
    if !vgic {
        return;
    }
    hvc(VGIC_RAISE, [PROBE_SPI, 0, 0, 0, 0]);
    let (spi, _) = wait_for_interrupt(1000);
    if spi != 0 {
        end_of_interrupt(spi);
    }
    // An SGI to this CPU alone: INTID in bits 27:24, target list bit 0
    // (Aff0 0), affinity 0.
    // SAFETY: writes ICC_SGI1R_EL1, which traps to the core.
    unsafe {
        core::arch::asm!("msr s3_0_c12_c11_5, {}", "isb", in(reg) (PROBE_SGI << 24) | 1,
            options(nomem, nostack));
    }
    let (sgi, _) = wait_for_interrupt(1000);
    if sgi != 0 {
        end_of_interrupt(sgi);
    }
    hvc(VGIC_DONE, [spi, sgi, 0, 0, 0]);
}

/// The pKVM probe (see `MODE_PKVM_PROBE`): what a Linux kernel's pKVM
/// guest driver asks, and a share and unshare of one page its way.
fn pkvm_probe() {
    use moat_abi::vm::pkvm;
    let uid = hvc(pkvm::CALL_UID, [0; 5]);
    let uid_is_kvm = u64::from(uid == pkvm::UID);
    let features = hvc(pkvm::FEATURES, [0; 5])[0];
    let granule = hvc(pkvm::HYP_MEMINFO, [0; 5])[0];
    hvc(PKVM_IDS, [uid_is_kvm, features, granule, 0, 0]);
    let ipa = shared_ipa();
    let share = hvc(pkvm::MEM_SHARE, [ipa, 0, 0, 0, 0])[0];
    let share_again = hvc(pkvm::MEM_SHARE, [ipa, 0, 0, 0, 0])[0];
    let unshare = hvc(pkvm::MEM_UNSHARE, [ipa, 0, 0, 0, 0])[0];
    let unshare_again = hvc(pkvm::MEM_UNSHARE, [ipa, 0, 0, 0, 0])[0];
    let foreign = hvc(pkvm::MEM_SHARE, [UNBACKED_IPA, 0, 0, 0, 0])[0];
    hvc(
        PKVM_SHARES,
        [share, share_again, unshare, unshare_again, foreign],
    );
}

/// Each vCPU's flag in the parallel probe: the attempt it is in.
static PARALLEL_FLAGS: [core::sync::atomic::AtomicU64; 2] =
    [const { core::sync::atomic::AtomicU64::new(0) }; 2];

/// PSCI calls of the parallel probe.
const PSCI_CPU_ON_64: u32 = 0xc400_0003;
const PSCI_CPU_OFF: u32 = 0x8400_0002;
const PSCI_AFFINITY_INFO_64: u32 = 0xc400_0004;

/// The parallel probe on vCPU 0 (see `MODE_PARALLEL`).
fn parallel_probe() {
    let on = hvc(
        PSCI_CPU_ON_64,
        [1, secondary_start as *const () as u64, 0, 0, 0],
    )[0];
    if on == 0 {
        parallel_attempts(0);
    }
    // vCPU 1 powers itself off when the host stops it; wait for that
    // (bounded) before the VM goes off.
    let mut off = false;
    for _ in 0..1_000_000 {
        if hvc(PSCI_AFFINITY_INFO_64, [1, 0, 0, 0, 0])[0] == 1 {
            off = true;
            break;
        }
    }
    hvc(PARALLEL_END, [on, u64::from(off), 0, 0, 0]);
}

/// vCPU 1 of the parallel probe, from `entry.S` with the MMU on.
#[unsafe(no_mangle)]
extern "C" fn secondary_main() {
    parallel_attempts(1);
    hvc(PSCI_CPU_OFF, [0; 5]);
}

/// The attempts of the parallel probe on vCPU `me`, until the host says
/// stop.
fn parallel_attempts(me: usize) {
    use core::sync::atomic::Ordering;
    let other = &PARALLEL_FLAGS[1 - me];
    let mut attempt = 1u64;
    loop {
        if hvc(PARALLEL_READY, [me as u64, attempt, 0, 0, 0])[0] == STOP {
            return;
        }
        PARALLEL_FLAGS[me].store(attempt, Ordering::Release);
        let initial = other.load(Ordering::Acquire);
        let mut seen = initial;
        let mut spins = 0;
        while seen < attempt && spins < PARALLEL_SPIN {
            spins += 1;
            core::hint::spin_loop();
            seen = other.load(Ordering::Acquire);
        }
        let answer = hvc(PARALLEL_DONE, [me as u64, attempt, seen, spins, initial]);
        if answer[0] == STOP {
            return;
        }
        attempt += 1;
    }
}
