//! A hostile host's CPU register state around `VCPU_RUN`.
//!
//! - SME: the host enters streaming mode with ZA on (and, separately, turns
//!   on ZA alone), fills its Z, P and ZA registers with a pattern and calls
//!   `VCPU_RUN`. The core must refuse with `Denied` and leave every byte of
//!   that state, and SVCR, as they were; the VM then runs normally.
//! - PMU: the host counts EL1 instructions with an event counter while the
//!   guest spins a known number of them; the counter must not see them.
//! - Debug: the host puts a hardware breakpoint on a guest instruction and
//!   a watchpoint on a guest word, with MDSCR_EL1.MDE and KDE set; the guest
//!   runs through both with debug exceptions unmasked and must take none.
//!
//! Each case first shows that its weapon works on the host itself (the
//! counter counts the host's own loop, the breakpoint fires on a host
//! instruction), so a pass means the core stopped it, not that it was inert.

use super::super::{CONSOLE, EXCEPTIONS, EXPECT, Expect, LAST_ESR};
use super::{Checks, Code, ExitReason, Guest, Ram, abi, consistent, p, pmu_now, pmu_start};
use core::fmt::Write as _;
use core::sync::atomic::Ordering;
use moat_abi::Error;

/// The longest streaming vector length the architecture allows (2048 bits).
const MAX_SVL: usize = 256;

/// Z0..Z31, P0..P15 and ZA at up to [`MAX_SVL`] bytes, in the layout the
/// SVE/SME fill and spill instructions use at a vector length of `svl`
/// (only the first `32 * svl`, `2 * svl` and `svl * svl` bytes are used).
#[repr(C, align(16))]
struct SmeState {
    z: [u8; 32 * MAX_SVL],
    p: [u8; 2 * MAX_SVL],
    za: [u8; MAX_SVL * MAX_SVL],
}

static mut SME_PATTERN: SmeState = SmeState {
    z: [0; 32 * MAX_SVL],
    p: [0; 2 * MAX_SVL],
    za: [0; MAX_SVL * MAX_SVL],
};
static mut SME_AFTER: SmeState = SmeState {
    z: [0; 32 * MAX_SVL],
    p: [0; 2 * MAX_SVL],
    za: [0; MAX_SVL * MAX_SVL],
};

/// The byte at `i` of a region, for region `salt`: never the zero that
/// SMSTART leaves in every register.
fn pattern_byte(i: usize, salt: usize) -> u8 {
    ((i.wrapping_mul(131) ^ (i >> 8).wrapping_mul(7) ^ salt) % 255) as u8 + 1
}

/// What one streaming-mode `VCPU_RUN` left: its x0, SVCR after it, and how
/// many bytes of Z, P and ZA changed.
struct SmeOutcome {
    code: Code,
    svcr: u64,
    lost_z: usize,
    lost_p: usize,
    lost_za: usize,
}

/// Enters streaming mode with ZA on (`streaming`), or turns on ZA alone,
/// loads the pattern, calls `VCPU_RUN` on `handle` with `answer` from that
/// state, stores the state back and leaves (SMSTOP); compares.
fn sme_run(handle: u64, answer: [u64; 4], svl: usize, streaming: bool) -> SmeOutcome {
    let pat = core::ptr::addr_of_mut!(SME_PATTERN);
    let out = core::ptr::addr_of_mut!(SME_AFTER);
    // SAFETY: both statics are only touched by this CPU, here.
    let (pat, out) = unsafe { (&mut *pat, &mut *out) };
    for (i, b) in pat.z.iter_mut().enumerate() {
        *b = pattern_byte(i, 1);
    }
    for (i, b) in pat.p.iter_mut().enumerate() {
        *b = pattern_byte(i, 2);
    }
    for (i, b) in pat.za.iter_mut().enumerate() {
        *b = pattern_byte(i, 3);
    }
    out.z.fill(0);
    out.p.fill(0);
    out.za.fill(0);
    let (r0, svcr): (u64, u64);
    // SAFETY: SME is enabled for EL1 by the caller (CPACR_EL1.SMEN) with
    // SMCR_EL1.LEN at its maximum, so the streaming vector length is `svl`
    // (at most MAX_SVL, checked by the caller). The block enters streaming
    // mode with ZA on (or ZA alone), loads ZA (`svl` rows of `svl` bytes)
    // and, in streaming mode, Z0..Z31 and P0..P15 from `pat`, makes the
    // VCPU_RUN hypercall, reads SVCR, stores the same registers into `out`
    // and leaves with SMSTOP, all within the asm: no compiler-generated
    // code runs in streaming mode. The pointers live in x20..x27, which the
    // hypercall preserves; every other register it may change is declared.
    unsafe {
        core::arch::asm!(
            ".arch_extension sme",
            ".arch_extension sve",
            "cbz x27, 10f",
            "smstart",
            "b 11f",
            "10:",
            "smstart za",
            "11:",
            "mov x9, x22",
            "mov x12, xzr",
            "12:",
            "ldr za[w12, 0], [x9]",
            "add x9, x9, x23",
            "add x12, x12, #1",
            "cmp x12, x23",
            "b.lo 12b",
            "cbz x27, 13f",
            "ldr z0, [x20, #0, mul vl]", "ldr z1, [x20, #1, mul vl]",
            "ldr z2, [x20, #2, mul vl]", "ldr z3, [x20, #3, mul vl]",
            "ldr z4, [x20, #4, mul vl]", "ldr z5, [x20, #5, mul vl]",
            "ldr z6, [x20, #6, mul vl]", "ldr z7, [x20, #7, mul vl]",
            "ldr z8, [x20, #8, mul vl]", "ldr z9, [x20, #9, mul vl]",
            "ldr z10, [x20, #10, mul vl]", "ldr z11, [x20, #11, mul vl]",
            "ldr z12, [x20, #12, mul vl]", "ldr z13, [x20, #13, mul vl]",
            "ldr z14, [x20, #14, mul vl]", "ldr z15, [x20, #15, mul vl]",
            "ldr z16, [x20, #16, mul vl]", "ldr z17, [x20, #17, mul vl]",
            "ldr z18, [x20, #18, mul vl]", "ldr z19, [x20, #19, mul vl]",
            "ldr z20, [x20, #20, mul vl]", "ldr z21, [x20, #21, mul vl]",
            "ldr z22, [x20, #22, mul vl]", "ldr z23, [x20, #23, mul vl]",
            "ldr z24, [x20, #24, mul vl]", "ldr z25, [x20, #25, mul vl]",
            "ldr z26, [x20, #26, mul vl]", "ldr z27, [x20, #27, mul vl]",
            "ldr z28, [x20, #28, mul vl]", "ldr z29, [x20, #29, mul vl]",
            "ldr z30, [x20, #30, mul vl]", "ldr z31, [x20, #31, mul vl]",
            "ldr p0, [x21, #0, mul vl]", "ldr p1, [x21, #1, mul vl]",
            "ldr p2, [x21, #2, mul vl]", "ldr p3, [x21, #3, mul vl]",
            "ldr p4, [x21, #4, mul vl]", "ldr p5, [x21, #5, mul vl]",
            "ldr p6, [x21, #6, mul vl]", "ldr p7, [x21, #7, mul vl]",
            "ldr p8, [x21, #8, mul vl]", "ldr p9, [x21, #9, mul vl]",
            "ldr p10, [x21, #10, mul vl]", "ldr p11, [x21, #11, mul vl]",
            "ldr p12, [x21, #12, mul vl]", "ldr p13, [x21, #13, mul vl]",
            "ldr p14, [x21, #14, mul vl]", "ldr p15, [x21, #15, mul vl]",
            "13:",
            "hvc #0",
            "mrs x28, svcr",
            "mov x9, x26",
            "mov x12, xzr",
            "14:",
            "str za[w12, 0], [x9]",
            "add x9, x9, x23",
            "add x12, x12, #1",
            "cmp x12, x23",
            "b.lo 14b",
            "cbz x27, 15f",
            "str z0, [x24, #0, mul vl]", "str z1, [x24, #1, mul vl]",
            "str z2, [x24, #2, mul vl]", "str z3, [x24, #3, mul vl]",
            "str z4, [x24, #4, mul vl]", "str z5, [x24, #5, mul vl]",
            "str z6, [x24, #6, mul vl]", "str z7, [x24, #7, mul vl]",
            "str z8, [x24, #8, mul vl]", "str z9, [x24, #9, mul vl]",
            "str z10, [x24, #10, mul vl]", "str z11, [x24, #11, mul vl]",
            "str z12, [x24, #12, mul vl]", "str z13, [x24, #13, mul vl]",
            "str z14, [x24, #14, mul vl]", "str z15, [x24, #15, mul vl]",
            "str z16, [x24, #16, mul vl]", "str z17, [x24, #17, mul vl]",
            "str z18, [x24, #18, mul vl]", "str z19, [x24, #19, mul vl]",
            "str z20, [x24, #20, mul vl]", "str z21, [x24, #21, mul vl]",
            "str z22, [x24, #22, mul vl]", "str z23, [x24, #23, mul vl]",
            "str z24, [x24, #24, mul vl]", "str z25, [x24, #25, mul vl]",
            "str z26, [x24, #26, mul vl]", "str z27, [x24, #27, mul vl]",
            "str z28, [x24, #28, mul vl]", "str z29, [x24, #29, mul vl]",
            "str z30, [x24, #30, mul vl]", "str z31, [x24, #31, mul vl]",
            "str p0, [x25, #0, mul vl]", "str p1, [x25, #1, mul vl]",
            "str p2, [x25, #2, mul vl]", "str p3, [x25, #3, mul vl]",
            "str p4, [x25, #4, mul vl]", "str p5, [x25, #5, mul vl]",
            "str p6, [x25, #6, mul vl]", "str p7, [x25, #7, mul vl]",
            "str p8, [x25, #8, mul vl]", "str p9, [x25, #9, mul vl]",
            "str p10, [x25, #10, mul vl]", "str p11, [x25, #11, mul vl]",
            "str p12, [x25, #12, mul vl]", "str p13, [x25, #13, mul vl]",
            "str p14, [x25, #14, mul vl]", "str p15, [x25, #15, mul vl]",
            "15:",
            "smstop",
            in("x20") pat.z.as_ptr(),
            in("x21") pat.p.as_ptr(),
            in("x22") pat.za.as_ptr(),
            in("x23") svl,
            in("x24") out.z.as_mut_ptr(),
            in("x25") out.p.as_mut_ptr(),
            in("x26") out.za.as_mut_ptr(),
            in("x27") u64::from(streaming),
            lateout("x28") svcr,
            inlateout("x0") u64::from(abi::VCPU_RUN) => r0,
            inlateout("x1") handle => _,
            inlateout("x2") answer[0] => _,
            inlateout("x3") answer[1] => _,
            inlateout("x4") answer[2] => _,
            inlateout("x5") answer[3] => _,
            lateout("x6") _, lateout("x7") _, lateout("x8") _, lateout("x9") _,
            lateout("x10") _, lateout("x11") _, lateout("x12") _, lateout("x13") _,
            lateout("x14") _, lateout("x15") _, lateout("x16") _, lateout("x17") _,
            out("v0") _, out("v1") _, out("v2") _, out("v3") _, out("v4") _, out("v5") _,
            out("v6") _, out("v7") _, out("v8") _, out("v9") _, out("v10") _, out("v11") _,
            out("v12") _, out("v13") _, out("v14") _, out("v15") _, out("v16") _, out("v17") _,
            out("v18") _, out("v19") _, out("v20") _, out("v21") _, out("v22") _, out("v23") _,
            out("v24") _, out("v25") _, out("v26") _, out("v27") _, out("v28") _, out("v29") _,
            out("v30") _, out("v31") _,
            options(nostack),
        );
    }
    let differ = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count();
    let (zb, pb) = if streaming {
        (32 * svl, 2 * svl)
    } else {
        (0, 0)
    };
    SmeOutcome {
        code: Code(r0),
        svcr,
        lost_z: differ(&pat.z[..zb], &out.z[..zb]),
        lost_p: differ(&pat.p[..pb], &out.p[..pb]),
        lost_za: differ(&pat.za[..svl * svl], &out.za[..svl * svl]),
    }
}

/// The SME attack: `VCPU_RUN` from streaming mode, and with ZA alone on.
pub(super) fn sme_streaming(c: &mut Checks, ram: &mut Ram) {
    let name = "attack sme streaming";
    let pfr1 = sysreg!("id_aa64pfr1_el1");
    if (pfr1 >> 24) & 0xf == 0 {
        say!("{name}: the CPU has no SME: skipping");
        return;
    }
    let svl: u64;
    // SAFETY: enables SME and SVE for EL1 (CPACR_EL1.SMEN, ZEN, FPEN) and
    // asks for the longest vector lengths (SMCR_EL1.LEN, ZCR_EL1.LEN all
    // ones, capped by the hardware and the core), then reads the streaming
    // vector length, which RDSVL gives outside streaming mode too.
    unsafe {
        core::arch::asm!(
            ".arch_extension sme",
            "mrs {t}, cpacr_el1",
            "orr {t}, {t}, #(3 << 16)",
            "orr {t}, {t}, #(3 << 20)",
            "orr {t}, {t}, #(3 << 24)",
            "msr cpacr_el1, {t}", "isb",
            "mov {t}, #0xf", "msr s3_0_c1_c2_6, {t}", "msr s3_0_c1_c2_0, {t}", "isb",
            "rdsvl {svl}, #1",
            t = out(reg) _, svl = out(reg) svl,
        );
    }
    let svl = svl as usize;
    let sve = (sysreg!("id_aa64pfr0_el1") >> 32) & 0xf != 0;
    let vl = if sve {
        let v: u64;
        // SAFETY: SVE is enabled for EL1 above; RDVL outside streaming mode.
        unsafe { core::arch::asm!(".arch_extension sve", "rdvl {}, #1", out(reg) v) };
        v
    } else {
        0
    };
    if svl == 0 || svl > MAX_SVL || !svl.is_power_of_two() {
        c.check(
            false,
            format_args!("{name}: a streaming vector length the architecture allows ({svl})"),
        );
        return;
    }
    let Some(mut g) = Guest::new(c, ram, name, 0, |_, _| {}) else {
        return;
    };
    if g.start(c, p::MODE_VECTORS, 0).is_none() {
        g.end(c, false);
        return;
    }
    for (streaming, what) in [
        (true, "streaming mode with ZA on (SMSTART)"),
        (false, "ZA on outside streaming mode (SMSTART ZA)"),
    ] {
        let o = sme_run(g.handle, g.answer, svl, streaming);
        c.check(
            o.code.is(Error::Denied),
            format_args!(
                "{name}: VCPU_RUN from {what}, streaming vector length {svl} bytes, SVE vector length {vl} bytes: {}",
                o.code
            ),
        );
        c.check(
            o.svcr & 3 == if streaming { 3 } else { 2 } && o.lost_z + o.lost_p + o.lost_za == 0,
            format_args!(
                "{name}: after VCPU_RUN from {what} the host's state is intact: SVCR {:#x}, {} Z bytes, {} P bytes and {} ZA bytes changed",
                o.svcr, o.lost_z, o.lost_p, o.lost_za
            ),
        );
    }
    // The VM never ran: it is where it was, and runs now.
    let set = g.expect_hvc(c, p::VECTORS_SET, "VECTORS_SET").is_some();
    let checked = set
        .then(|| g.expect_hvc(c, p::VECTORS_CHECKED, "VECTORS_CHECKED"))
        .flatten();
    let off = checked.is_some() && g.expect_exit(c, ExitReason::Shutdown).is_some();
    c.check(
        checked.is_some_and(|a| a[0] == 0) && off,
        format_args!(
            "{name}: out of streaming mode the host runs the VM, which finds its vector registers intact and powers off"
        ),
    );
    g.end(c, true);
    consistent(c, "the SME streaming-mode VCPU_RUN attempts");
}

/// PMU event filter: INST_RETIRED (0x08) counted at EL1 only (U, bit 30,
/// excludes EL0; NSH, bit 27, clear excludes EL2).
const PMU_EL1_ONLY: u64 = 0x08 | (1 << 30);

/// The host's own `n`-iteration loop, counted.
fn count_host_loop(n: u64) -> u64 {
    let start = pmu_now();
    // SAFETY: a register-only loop.
    unsafe {
        core::arch::asm!("1:", "subs {n}, {n}, #1", "b.ne 1b", n = inout(reg) n => _,
            options(nomem, nostack));
    }
    pmu_now() - start
}

/// The PMU attack: does the host's EL1 instruction counter count the guest?
pub(super) fn pmu_counts_guest(c: &mut Checks, ram: &mut Ram) {
    let name = "attack pmu";
    let pmuver = (sysreg!("id_aa64dfr0_el1") >> 8) & 0xf;
    if pmuver == 0 || pmuver == 0xf {
        say!("{name}: the CPU has no PMUv3: skipping");
        return;
    }
    const SPINS: u64 = 1_000_000;
    pmu_start(PMU_EL1_ONLY);
    let own = count_host_loop(SPINS);
    if own == 0 {
        // QEMU counts retired instructions only with -icount.
        say!("{name}: the PMU counts no retired instructions on this machine: skipping");
        return;
    }
    c.check(
        own >= 2 * SPINS,
        format_args!(
            "{name}: the host's EL1 instruction counter counts its own {SPINS}-iteration loop ({own} instructions)"
        ),
    );
    let Some(mut g) = Guest::new(c, ram, name, 0, |_, _| {}) else {
        return;
    };
    let ready = g.start(c, p::MODE_SPIN_COUNT, 0).is_some()
        && g.expect_hvc(c, p::SPIN_READY, "SPIN_READY").is_some();
    if ready {
        g.answer = [SPINS, 0, 0, 0];
        let start = pmu_now();
        let spun = g.expect_hvc(c, p::SPUN, "SPUN");
        let seen = pmu_now() - start;
        c.check(
            spun.is_some_and(|a| a[0] == SPINS) && seen < SPINS / 2,
            format_args!(
                "{name}: the guest spun {SPINS} iterations ({} instructions) while the host's EL1 counter ran: it counted {seen}",
                2 * SPINS
            ),
        );
        let after = count_host_loop(SPINS);
        c.check(
            after >= 2 * SPINS,
            format_args!(
                "{name}: after the run the host's counter counts its own loop again ({after})"
            ),
        );
        let off = g.expect_exit(c, ExitReason::Shutdown).is_some();
        c.check(off, format_args!("{name}: the guest powered off"));
    }
    // SAFETY: disables counter 0 again (PMCNTENCLR_EL0).
    unsafe { core::arch::asm!("msr pmcntenclr_el0, {}", in(reg) 1u64) };
    g.end(c, true);
    consistent(c, "the host's PMU counted across a VM run");
}

core::arch::global_asm!(
    ".text",
    ".balign 4",
    ".global host_debug_target",
    "host_debug_target:",
    "    nop",
    "    ret",
);

unsafe extern "C" {
    /// A host instruction for the breakpoint self-check (the NOP; the
    /// exception handler skips it).
    fn host_debug_target();
}

/// DBGBCR: E, PMC = 0b11 (EL1 and EL0), BAS = 0b1111 (an A64 instruction).
const DBGBCR_EL1_EL0: u64 = 1 | (0b11 << 1) | (0b1111 << 5);
/// DBGWCR: E, PAC = 0b11 (EL1 and EL0), LSC = 0b11 (loads and stores),
/// BAS = 0xff (all eight bytes of the doubleword).
const DBGWCR_EL1_EL0: u64 = 1 | (0b11 << 1) | (0b11 << 3) | (0xff << 5);
/// MDSCR_EL1: MDE (bit 15, breakpoints and watchpoints) and KDE (bit 13,
/// debug exceptions at EL1).
const MDSCR_MDE_KDE: u64 = (1 << 15) | (1 << 13);

/// Programs breakpoint 0 at `insn` and watchpoint 0 on the doubleword at
/// `word` (0: off), with MDSCR_EL1.MDE and KDE set and the OS lock open.
fn program_debug(insn: u64, word: u64) {
    let (bcr, wcr) = (
        if insn != 0 { DBGBCR_EL1_EL0 } else { 0 },
        if word != 0 { DBGWCR_EL1_EL0 } else { 0 },
    );
    let mdscr = if insn | word != 0 { MDSCR_MDE_KDE } else { 0 };
    // SAFETY: the host's own self-hosted debug registers (MDCR_EL2 traps
    // none of them for the host); PSTATE.D stays masked here.
    unsafe {
        core::arch::asm!(
            "msr oslar_el1, xzr",
            "msr dbgbvr0_el1, {bvr}", "msr dbgbcr0_el1, {bcr}",
            "msr dbgwvr0_el1, {wvr}", "msr dbgwcr0_el1, {wcr}",
            "msr mdscr_el1, {mdscr}", "isb",
            bvr = in(reg) insn, bcr = in(reg) bcr, wvr = in(reg) word & !7, wcr = in(reg) wcr,
            mdscr = in(reg) mdscr,
        );
    }
}

/// Calls `host_debug_target` with debug exceptions unmasked; returns the
/// synchronous exceptions taken and the last ESR_EL1.
fn run_host_target() -> (u64, u64) {
    EXCEPTIONS.store(0, Ordering::SeqCst);
    EXPECT.store(Expect::SkipInstruction as u64, Ordering::SeqCst);
    // SAFETY: unmasks debug exceptions around a call to a NOP-and-return
    // function; a breakpoint on the NOP is taken by the handler, which
    // skips it.
    unsafe {
        core::arch::asm!("msr daifclr, #8", "isb");
        host_debug_target();
        core::arch::asm!("msr daifset, #8", "isb");
    }
    EXPECT.store(Expect::Nothing as u64, Ordering::SeqCst);
    (
        EXCEPTIONS.load(Ordering::SeqCst),
        LAST_ESR.load(Ordering::SeqCst),
    )
}

/// The debug attack: the host's breakpoint and watchpoint on guest
/// addresses, with debug enabled, while the guest runs through them.
pub(super) fn breakpoint_in_guest(c: &mut Checks, ram: &mut Ram) {
    let name = "attack breakpoint";
    let target = host_debug_target as *const () as u64;
    program_debug(target, 0);
    let (taken, esr) = run_host_target();
    program_debug(0, 0);
    c.check(
        taken == 1 && esr >> 26 == 0x31,
        format_args!(
            "{name}: the host's hardware breakpoint fires on its own instruction ({taken} exception, ESR_EL1 {esr:#x})"
        ),
    );
    let Some(mut g) = Guest::new(c, ram, name, 0, |_, _| {}) else {
        return;
    };
    let targets = if g.start(c, p::MODE_DEBUG_PROBE, 0).is_some() {
        g.expect_hvc(c, p::DEBUG_TARGETS, "DEBUG_TARGETS")
    } else {
        None
    };
    if let Some([insn, word, ..]) = targets {
        program_debug(insn, word);
        let host_exceptions = EXCEPTIONS.load(Ordering::SeqCst);
        let done = g.expect_hvc(c, p::DEBUG_DONE, "DEBUG_DONE");
        let mdscr = sysreg!("mdscr_el1");
        program_debug(target, 0);
        let (again, esr) = run_host_target();
        program_debug(0, 0);
        match done {
            Some([count, esr_guest, elr, read, _]) => c.check(
                count == 0 && read == p::DEBUG_WORD_VALUE,
                format_args!(
                    "{name}: with the host's breakpoint on guest instruction {insn:#x} and watchpoint on guest word {word:#x}, the guest ran through both undisturbed: {count} exceptions (ESR_EL1 {esr_guest:#x}, ELR_EL1 {elr:#x}), word read back {read:#x}"
                ),
            ),
            None => c.check(false, format_args!("{name}: the guest reports its probe")),
        }
        c.check(
            EXCEPTIONS.load(Ordering::SeqCst) == host_exceptions,
            format_args!("{name}: the host took no debug exception from inside the VM"),
        );
        c.check(
            mdscr & MDSCR_MDE_KDE == MDSCR_MDE_KDE,
            format_args!("{name}: after the run the host's MDSCR_EL1 is its own ({mdscr:#x})"),
        );
        c.check(
            again == 1 && esr >> 26 == 0x31,
            format_args!(
                "{name}: ... and its breakpoint still fires on its own instruction ({again} exception, ESR_EL1 {esr:#x})"
            ),
        );
        let off = g.expect_exit(c, ExitReason::Shutdown).is_some();
        c.check(off, format_args!("{name}: the guest powered off"));
    }
    g.end(c, true);
    consistent(c, "the host's breakpoint and watchpoint on guest addresses");
}
