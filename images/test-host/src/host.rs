//! The test host's body (aarch64 only).

use core::fmt::Write;
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use moat_abi::services::Misbehaviour;
use moat_abi::trap::TrapClass;
use moat_abi::{Error, MOAT_UID, hypercall, smccc as ids};
use moat_platform::console::Pl011Console;
use moat_platform::dt::{self, Range};
use spin::Mutex;

core::arch::global_asm!(include_str!("entry.S"));

unsafe extern "C" {
    fn secondary_start();
    static L1_TABLE: u8;
    static VECTOR_ENTRY_COUNT: u64;
}

static CONSOLE: Mutex<Option<Pl011Console>> = Mutex::new(None);

macro_rules! say {
    ($($arg:tt)*) => {{
        if let Some(c) = CONSOLE.lock().as_mut() {
            let _ = c.write_str("test-host: ");
            let _ = c.write_fmt(format_args!($($arg)*));
            let _ = c.write_str("\n");
        }
    }};
}

/// The registers `entry.S` saves for a synchronous exception.
#[repr(C)]
pub struct Frame {
    x: [u64; 19],
    fp: u64,
    lr: u64,
    elr: u64,
}

/// What the exception handler does with the next synchronous exception.
#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
enum Expect {
    Nothing = 0,
    /// Skip the faulting instruction.
    SkipInstruction = 1,
    /// Return to the caller (the faulting access was a branch into the void).
    ReturnToCaller = 2,
}

static EXPECT: AtomicU64 = AtomicU64::new(Expect::Nothing as u64);
static LAST_ESR: AtomicU64 = AtomicU64::new(0);
static LAST_FAR: AtomicU64 = AtomicU64::new(0);
static LAST_ELR: AtomicU64 = AtomicU64::new(0);
static EXCEPTIONS: AtomicU64 = AtomicU64::new(0);

#[unsafe(no_mangle)]
extern "C" fn el1_sync_exception(frame: &mut Frame) {
    let (esr, far): (u64, u64);
    // SAFETY: reads the EL1 syndrome registers.
    unsafe { core::arch::asm!("mrs {}, esr_el1", "mrs {}, far_el1", out(reg) esr, out(reg) far) };
    // The random hostile host's CPUs each expect their own exceptions.
    if vm::fuzz_exception(esr, frame) {
        return;
    }
    LAST_ESR.store(esr, Ordering::SeqCst);
    LAST_FAR.store(far, Ordering::SeqCst);
    LAST_ELR.store(frame.elr, Ordering::SeqCst);
    EXCEPTIONS.fetch_add(1, Ordering::SeqCst);
    match EXPECT.swap(Expect::Nothing as u64, Ordering::SeqCst) {
        1 => frame.elr += 4,
        2 => frame.elr = frame.lr,
        _ => {
            say!(
                "FAIL (unexpected exception ESR_EL1 {esr:#x} FAR_EL1 {far:#x} ELR_EL1 {:#x})",
                frame.elr
            );
            system_off();
        }
    }
}

fn smc_call(conduit_hvc: bool, function: u32, args: [u64; 3]) -> [u64; 4] {
    let mut a = [0u64; 17];
    a[..3].copy_from_slice(&args);
    let r = if conduit_hvc {
        smccc::hvc64(function, a)
    } else {
        smccc::smc64(function, a)
    };
    [r[0], r[1], r[2], r[3]]
}

fn hvc(function: u32, args: [u64; 3]) -> [u64; 4] {
    smc_call(true, function, args)
}

/// x0..x17 after `hvc #IMM` (or `smc #0`) with x0 = `x0` and x1..x17 =
/// [`register_pattern`].
macro_rules! call_keeping {
    ($insn:literal, $x0:expr) => {{
        let mut r = [0u64; 18];
        // SAFETY: an SMCCC call the core answers; every register it may
        // change is an output.
        unsafe {
            core::arch::asm!(
                $insn,
                inout("x0") $x0 => r[0],
                inout("x1") register_pattern(1) => r[1],
                inout("x2") register_pattern(2) => r[2],
                inout("x3") register_pattern(3) => r[3],
                inout("x4") register_pattern(4) => r[4],
                inout("x5") register_pattern(5) => r[5],
                inout("x6") register_pattern(6) => r[6],
                inout("x7") register_pattern(7) => r[7],
                inout("x8") register_pattern(8) => r[8],
                inout("x9") register_pattern(9) => r[9],
                inout("x10") register_pattern(10) => r[10],
                inout("x11") register_pattern(11) => r[11],
                inout("x12") register_pattern(12) => r[12],
                inout("x13") register_pattern(13) => r[13],
                inout("x14") register_pattern(14) => r[14],
                inout("x15") register_pattern(15) => r[15],
                inout("x16") register_pattern(16) => r[16],
                inout("x17") register_pattern(17) => r[17],
                options(nostack),
            );
        }
        r
    }};
}

fn register_pattern(n: u64) -> u64 {
    0x9e37_79b9_0000_0000 ^ (n << 40) ^ n.wrapping_mul(0x0101_0101)
}

/// The host's NULL hypercall is answered in the core's vector without a
/// frame: it must answer exactly as the full path does, and only that call
/// may take it. The neighbours of the exact call (another immediate, SMC,
/// another function id) take the full path and get its answers.
fn null_hypercall_edges(c: &mut Checks) {
    let null = u64::from(hypercall::NULL);
    let kept = |r: &[u64; 18], from: usize| (from..18).all(|n| r[n] == register_pattern(n as u64));
    let r = call_keeping!("hvc #0", null);
    c.check(
        r[0] == 0 && kept(&r, 1),
        format_args!("null hypercall: x0 = 0, x1..x17 as they were ({:#x})", r[0]),
    );
    // The function id is the low 32 bits (SMCCC): the core ignores the rest.
    let r = call_keeping!("hvc #0", 0xffff_ffff_0000_0000 | null);
    c.check(
        r[0] == 0 && kept(&r, 1),
        format_args!(
            "null hypercall with x0's upper half set: x0 = 0, x1..x17 kept ({:#x})",
            r[0]
        ),
    );
    let r = call_keeping!("hvc #1", null);
    c.check(
        r[0] == ids::NOT_SUPPORTED && kept(&r, 1),
        format_args!(
            "null hypercall with immediate 1 is NOT_SUPPORTED ({:#x})",
            r[0]
        ),
    );
    let r = call_keeping!("hvc #0xffff", null);
    c.check(
        r[0] == ids::NOT_SUPPORTED && kept(&r, 1),
        format_args!(
            "null hypercall with immediate 0xffff is NOT_SUPPORTED ({:#x})",
            r[0]
        ),
    );
    let r = call_keeping!("smc #0", null);
    c.check(
        r[0] == 0 && kept(&r, 1),
        format_args!("null call through SMC: x0 = 0, x1..x17 kept ({:#x})", r[0]),
    );
    let r = call_keeping!("hvc #0", u64::from(hypercall::ABI_VERSION));
    c.check(
        r[0] == 0 && r[1] == u64::from(moat_abi::ABI_VERSION),
        format_args!(
            "the call after NULL (ABI_VERSION) is answered as ABI_VERSION ({:#x})",
            r[0]
        ),
    );
    // NULL's number in the 32-bit calling convention is another function.
    let r = call_keeping!("hvc #0", null ^ (1 << 30));
    c.check(
        r[0] == ids::NOT_SUPPORTED,
        format_args!(
            "function id {:#x} is not NULL: NOT_SUPPORTED ({:#x})",
            null ^ (1 << 30),
            r[0]
        ),
    );
}

fn system_off() -> ! {
    hvc(smccc::psci::PSCI_SYSTEM_OFF, [0; 3]);
    say!("FAIL (SYSTEM_OFF returned)");
    loop {
        core::hint::spin_loop();
    }
}

fn current_el() -> u64 {
    let v: u64;
    // SAFETY: reads CurrentEL.
    unsafe { core::arch::asm!("mrs {}, CurrentEL", out(reg) v) };
    (v >> 2) & 3
}

macro_rules! sysreg {
    ($name:literal) => {{
        let v: u64;
        // SAFETY: reads an ID register, which has no side effects.
        unsafe { core::arch::asm!(concat!("mrs {}, ", $name), out(reg) v) };
        v
    }};
}

struct Checks {
    passed: u32,
    failed: u32,
}

impl Checks {
    fn check(&mut self, ok: bool, what: core::fmt::Arguments<'_>) {
        if ok {
            self.passed += 1;
            say!("ok   {what}");
        } else {
            self.failed += 1;
            say!("FAIL {what}");
        }
    }
}

/// Makes every 1 GiB block that holds RAM normal memory in our map: Tagged
/// Normal (MAIR index 2) when the CPU reports MTE with tag storage, so tag
/// instructions act on it; plain Normal otherwise.
///
/// The block holding this code changes attributes while live, from Normal to
/// Tagged Normal (both write-back cacheable): acceptable for a test payload
/// under QEMU, where no break-before-make is possible for the running code.
fn map_ram(memory: &[Range]) {
    let tagged = (sysreg!("id_aa64pfr1_el1") >> 8) & 0xf >= 2;
    let attrs: u64 = if tagged { 0x709 } else { 0x701 };
    let table = core::ptr::addr_of!(L1_TABLE) as *mut u64;
    for bank in memory {
        let first = bank.base >> 30;
        let last = (bank.end() - 1) >> 30;
        for gib in first..=last.min(511) {
            // SAFETY: L1_TABLE is our own 512-entry table. The block was
            // mapped as device memory and nothing in it has been touched, so
            // the change needs no break-before-make beyond the TLB flush.
            unsafe {
                table.add(gib as usize).write_volatile((gib << 30) | attrs);
                core::arch::asm!("dsb ishst", "tlbi vmalle1", "dsb ish", "isb");
            }
        }
    }
}

/// Finds `/reserved-memory/moat@...`: the hypervisor's carve-out.
fn hypervisor_region(dtb: &[u8]) -> Option<Range> {
    let fdt = fdt::Fdt::new(dtb).ok()?;
    let reserved = fdt.find_node("/reserved-memory")?;
    let node = reserved.children().find(|n| n.name.starts_with("moat@"))?;
    let r = node.reg()?.next()?;
    Range::new(r.starting_address as u64, r.size? as u64)
}

static ONLINE: AtomicU32 = AtomicU32::new(0);

#[unsafe(no_mangle)]
extern "C" fn host_secondary_main(index: u64) -> ! {
    if !vm::secondary(index) {
        let mpidr = sysreg!("mpidr_el1");
        say!(
            "CPU {index} online at EL{} (MPIDR {mpidr:#x})",
            current_el()
        );
        ONLINE.fetch_add(1, Ordering::SeqCst);
    }
    hvc(smccc::psci::PSCI_CPU_OFF, [0; 3]);
    say!("FAIL (CPU_OFF returned on CPU {index})");
    loop {
        core::hint::spin_loop();
    }
}

fn read_u64(addr: u64) -> u64 {
    // SAFETY: deliberately touches an address that may fault; the exception
    // handler resumes after the instruction when EXPECT says so.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn write_u64(addr: u64, v: u64) {
    // SAFETY: as for `read_u64`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// Runs hypercall `function` (no arguments) `n` times and returns the
/// instructions retired (EL1 and EL2, every partition) per iteration, minus
/// the same loop without the call.
fn bench_hvc(n: u64, function: u32) -> (u64, u64) {
    bench_hvc_filtered(n, function, PMU_EL1_AND_EL2)
}

/// PMEVTYPER filters for INST_RETIRED (0x08): U (bit 30) excludes EL0,
/// P (bit 31) excludes EL1, NSH (bit 27) includes EL2.
const PMU_EL1_AND_EL2: u64 = 0x08 | (1 << 27) | (1 << 30);
const PMU_EL2_ONLY: u64 = 0x08 | (1 << 27) | (1 << 30) | (1 << 31);

fn bench_hvc_filtered(n: u64, function: u32, filter: u64) -> (u64, u64) {
    fn count(n: u64, with_call: bool, function: u32) -> u64 {
        let start: u64;
        let end: u64;
        // SAFETY: PMU counter 0 is ours (MDCR_EL2.HPMN gives EL1 every
        // counter); the loop clobbers only the registers it names.
        unsafe {
            core::arch::asm!(
                "mov x1, xzr",
                "mov x2, xzr",
                "mov x3, xzr",
                "mov x4, xzr",
                "mov x5, xzr",
                "mov x6, xzr",
                "isb",
                "mrs {start}, pmevcntr0_el0",
                "1:",
                "cbz {with}, 2f",
                "mov x0, {id}",
                "hvc #0",
                "2:",
                "subs {n}, {n}, #1",
                "b.ne 1b",
                "isb",
                "mrs {end}, pmevcntr0_el0",
                start = out(reg) start,
                end = out(reg) end,
                n = inout(reg) n => _,
                with = in(reg) with_call as u64,
                id = in(reg) u64::from(function),
                out("x0") _, out("x1") _, out("x2") _, out("x3") _,
                out("x4") _, out("x5") _, out("x6") _, out("x7") _,
            );
        }
        end - start
    }
    // SAFETY: programs PMU counter 0 to count INST_RETIRED (0x08) at EL1 and,
    // with NSH (bit 27), at EL2; EL0 is excluded (U, bit 30).
    unsafe {
        core::arch::asm!(
            "msr pmevtyper0_el0, {ty}",
            "msr pmcntenset_el0, {en}",
            "mrs {t}, pmcr_el0",
            "orr {t}, {t}, #1",
            "msr pmcr_el0, {t}",
            "isb",
            ty = in(reg) filter,
            en = in(reg) 1u64,
            t = out(reg) _,
        );
    }
    let with = count(n, true, function);
    let without = count(n, false, function);
    (with.saturating_sub(without) / n, without / n)
}

/// The demo manifest's hypercall ranges (images/demo.toml).
const TRACE_COUNTS: u32 = hypercall::id(0x1001);
const TRACE_RESET: u32 = hypercall::id(0x1002);
const TRACE_PING: u32 = hypercall::id(0x1003);
const FAULTY: [(&str, u16, Misbehaviour); 5] = [
    ("faulty-exception", 0x1100, Misbehaviour::Exception),
    ("faulty-malformed", 0x1110, Misbehaviour::MalformedReply),
    ("faulty-spin", 0x1120, Misbehaviour::Spin),
    ("faulty-snoop", 0x1130, Misbehaviour::ReadForeignMemory),
    ("faulty-remap", 0x1140, Misbehaviour::RewriteTranslation),
];

/// An SMCCC call with x1..x6.
fn hvc6(function: u32, args: [u64; 6]) -> [u64; 8] {
    let mut a = [0u64; 17];
    a[..6].copy_from_slice(&args);
    let r = smccc::hvc64(function, a);
    [r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7]]
}

/// Executes `$insn` (one MRS or MSR) expecting an Undefined Instruction
/// exception for exactly that instruction; evaluates to (taken, ESR, ELR == it).
macro_rules! expect_undef {
    ($insn:literal) => {{
        EXCEPTIONS.store(0, Ordering::SeqCst);
        EXPECT.store(Expect::SkipInstruction as u64, Ordering::SeqCst);
        let at: u64;
        // SAFETY: executes one system-register access that the policy
        // turns into UNDEF; the handler skips it. x0 is scratch.
        unsafe {
            core::arch::asm!("adr {at}, 1f", "1:", $insn, at = out(reg) at, out("x0") _);
        }
        let taken = EXCEPTIONS.load(Ordering::SeqCst) == 1;
        EXPECT.store(Expect::Nothing as u64, Ordering::SeqCst);
        (taken, LAST_ESR.load(Ordering::SeqCst), LAST_ELR.load(Ordering::SeqCst) == at)
    }};
}

/// Stores allocation tag 5 for the granule at `addr` with STG, then reads
/// it back with LDG.
fn stg_ldg(addr: u64) -> u64 {
    let out: u64;
    // SAFETY: `addr` is 16-byte aligned memory of our own; STG/LDG touch
    // only its allocation tag.
    unsafe {
        core::arch::asm!(
            ".arch_extension memtag",
            "mov {t}, #0x0500000000000000",
            "orr {t}, {t}, {a}",
            "stg {t}, [{a}]",
            "mov {o}, {a}",
            "ldg {o}, [{a}]",
            a = in(reg) addr, t = out(reg) _, o = out(reg) out,
        );
    }
    (out >> 56) & 0xf
}

#[path = "vm.rs"]
mod vm;

/// The MTE policy, seen from the host: with it off, hardware without MTE;
/// with it on, MTE as the hardware has it. `cpu_without_mte`: the run is on
/// a CPU without MTE (a Cortex-A72, say), where the host must see exactly
/// what the policy's off state shows.
fn mte(c: &mut Checks, off: bool, cpu_without_mte: bool, dtb: &[u8]) {
    let _ = dtb;
    let pfr1 = sysreg!("id_aa64pfr1_el1");
    let field = (pfr1 >> 8) & 0xf;
    static mut GRANULES: [u64; 8] = [0; 8];
    let granule = (core::ptr::addr_of_mut!(GRANULES) as u64 + 15) & !15;
    if off || cpu_without_mte {
        if cpu_without_mte {
            say!("MTE expected absent (a CPU without MTE, test-host.cpu_without_mte)");
        } else {
            say!("MTE policy expected off (command line)");
        }
        c.check(
            field == 0 && (pfr1 >> 40) & 0xf == 0 && (pfr1 >> 52) & 0xf == 0,
            format_args!("ID_AA64PFR1_EL1 reports no MTE ({pfr1:#018x})"),
        );
        let pfr2 = sysreg!("s3_0_c0_c4_2");
        c.check(
            pfr2 & 0xfff == 0,
            format_args!("ID_AA64PFR2_EL1 reports no MTE extensions ({pfr2:#x})"),
        );
        for (name, (taken, esr, at_insn)) in [
            ("mrs gcr_el1", expect_undef!("mrs x0, s3_0_c1_c0_6")),
            ("msr gcr_el1", expect_undef!("msr s3_0_c1_c0_6, x0")),
            ("mrs rgsr_el1", expect_undef!("mrs x0, s3_0_c1_c0_5")),
            ("msr rgsr_el1", expect_undef!("msr s3_0_c1_c0_5, x0")),
            ("mrs tfsr_el1", expect_undef!("mrs x0, s3_0_c5_c6_0")),
            ("msr tfsr_el1", expect_undef!("msr s3_0_c5_c6_0, x0")),
            ("mrs tfsre0_el1", expect_undef!("mrs x0, s3_0_c5_c6_1")),
            ("msr tfsre0_el1", expect_undef!("msr s3_0_c5_c6_1, x0")),
            ("mrs gmid_el1", expect_undef!("mrs x0, s3_1_c0_c0_4")),
        ] {
            c.check(taken && esr == 0x0200_0000 && at_insn,
                format_args!("{name}: Undefined Instruction at the instruction (ESR_EL1 {esr:#x}), handler skipped it"));
        }
        if cpu_without_mte {
            // No FEAT_MTE at all: the tag instructions themselves are UNDEFINED.
            let (taken, esr, at_insn) = expect_undef!(".arch_extension memtag\nstg x0, [sp]");
            c.check(
                taken && esr == 0x0200_0000 && at_insn,
                format_args!("STG on a CPU without MTE: Undefined Instruction (ESR_EL1 {esr:#x})"),
            );
        } else {
            let tag = stg_ldg(granule);
            c.check(
                tag == 0,
                format_args!(
                    "STG then LDG on our own memory: tag reads {tag} (tag access is disabled)"
                ),
            );
        }
    } else {
        say!("MTE policy expected on");
        c.check(
            field >= 2,
            format_args!("ID_AA64PFR1_EL1.MTE = {field}: MTE with tag storage"),
        );
        let v: u64;
        // SAFETY: with the policy on, GCR_EL1 is ours to use; the old value
        // is restored.
        unsafe {
            core::arch::asm!("mrs {old}, s3_0_c1_c0_6", "msr s3_0_c1_c0_6, {new}", "isb", "mrs {v}, s3_0_c1_c0_6",
                "msr s3_0_c1_c0_6, {old}", old = out(reg) _, new = in(reg) 0x1_0005u64, v = out(reg) v);
        }
        c.check(
            v == 0x1_0005,
            format_args!("GCR_EL1 written and read back without a trap ({v:#x})"),
        );
        let tag = stg_ldg(granule);
        c.check(
            tag == 5,
            format_args!("STG then LDG on our own memory: tag 5 reads back {tag}"),
        );
    }
}

/// Instructions from the host's `mrs gcr_el1` to the first instruction of its
/// UNDEF handler (the vector entry), counted at EL1 and EL2.
fn bench_mte_undef() -> u64 {
    // SAFETY: programs PMU counter 0 as `bench_hvc` does.
    unsafe {
        core::arch::asm!(
            "msr pmevtyper0_el0, {ty}", "msr pmcntenset_el0, {en}",
            "mrs {t}, pmcr_el0", "orr {t}, {t}, #1", "msr pmcr_el0, {t}", "isb",
            ty = in(reg) PMU_EL1_AND_EL2, en = in(reg) 1u64, t = out(reg) _,
        );
    }
    EXPECT.store(Expect::SkipInstruction as u64, Ordering::SeqCst);
    let before: u64;
    // SAFETY: reads the counter, then the trapped register (the handler
    // skips it); x0 is scratch.
    unsafe {
        core::arch::asm!("isb", "mrs {b}, pmevcntr0_el0", "mrs x0, s3_0_c1_c0_6", b = out(reg) before, out("x0") _);
    }
    // SAFETY: written by the vector with the counter value it read.
    let at_vector = unsafe { core::ptr::read_volatile(core::ptr::addr_of!(VECTOR_ENTRY_COUNT)) };
    // The counter read happens after the vector's first two instructions
    // (sub, stp); the count starts at the instruction after the `before` read.
    at_vector.saturating_sub(before).saturating_sub(2)
}

/// The services of the demo image, seen from the host.
fn services(c: &mut Checks) {
    let r = hvc(TRACE_PING, [0; 3]);
    if r[0] == ids::NOT_SUPPORTED {
        say!("no services in this image; skipping the service checks");
        return;
    }
    c.check(
        r[0] == 0,
        format_args!("trace service answers ping ({})", r[0] as i64),
    );
    let counts = hvc6(TRACE_COUNTS, [0; 6]);
    let (smc, data, fetch) = (
        counts[1 + TrapClass::Smc as usize],
        counts[1 + TrapClass::DataAbort as usize],
        counts[1 + TrapClass::InstructionAbort as usize],
    );
    c.check(
        counts[0] == 0 && smc >= 1 && data >= 2 && fetch >= 1,
        format_args!("trace counted the traps it observes: {smc} SMC, {data} data aborts, {fetch} instruction aborts, {} in all", counts[7]),
    );
    let _ = smc_call(false, smccc::psci::PSCI_VERSION, [0; 3]);
    let after = hvc6(TRACE_COUNTS, [0; 6]);
    c.check(
        after[1 + TrapClass::Smc as usize] == smc + 1,
        format_args!(
            "one more SMC, one more count ({})",
            after[1 + TrapClass::Smc as usize]
        ),
    );
    let r = hvc6(TRACE_COUNTS, [1, 0, 0, 0, 0, 0])[0] as i64;
    c.check(
        r == Error::InvalidParameters.code(),
        format_args!("a non-zero unused argument is refused ({r})"),
    );
    let r = hvc(TRACE_RESET, [0; 3])[0];
    let zero = hvc6(TRACE_COUNTS, [0; 6]);
    c.check(
        r == 0 && zero[1..8].iter().all(|v| *v == 0),
        format_args!("trace reset zeroes the counts"),
    );
    let r = hvc(hypercall::id(0x1004), [0; 3])[0];
    c.check(
        r == ids::NOT_SUPPORTED,
        format_args!("a function past the service's range is NOT_SUPPORTED"),
    );

    for (name, first, how) in FAULTY {
        let echo = hvc6(hypercall::id(first), [41, 0, 0, 0, 0, 0]);
        c.check(
            echo[0] == 0 && echo[1] == 42,
            format_args!(
                "{name} behaves before it is broken (echo 41 -> {})",
                echo[1]
            ),
        );
        let r = hvc6(hypercall::id(first + 1), [how as u64, 0, 0, 0, 0, 0])[0] as i64;
        c.check(
            r == Error::ServiceFailed.code(),
            format_args!("{name} misbehaving ({how:?}): the call fails with ServiceFailed ({r})"),
        );
        let r = hvc6(hypercall::id(first), [41, 0, 0, 0, 0, 0])[0] as i64;
        c.check(
            r == Error::ServiceFailed.code(),
            format_args!("{name} stays failed: later calls are refused ({r})"),
        );
    }
    let r = hvc(TRACE_PING, [0; 3])[0];
    c.check(
        r == 0,
        format_args!("the trace service still answers after the others failed"),
    );
}

#[unsafe(no_mangle)]
extern "C" fn host_main(dtb_addr: u64) -> ! {
    // SAFETY: the core passed a device tree it wrote; the header bounds it.
    let head = unsafe { core::slice::from_raw_parts(dtb_addr as *const u8, 8) };
    let size = u32::from_be_bytes([head[4], head[5], head[6], head[7]]).min(2 << 20) as usize;
    // SAFETY: as above, `size` bytes from the header.
    let dtb = unsafe { core::slice::from_raw_parts(dtb_addr as *const u8, size) };
    let Ok(platform) = dt::discover(dtb) else {
        loop {
            core::hint::spin_loop();
        }
    };
    map_ram(&platform.memory);
    // SAFETY: the UART the device tree names, mapped as device memory by our
    // early map; only this console drives it.
    *CONSOLE.lock() = Some(unsafe { Pl011Console::new(platform.uart.regs.base as usize) });
    let bootargs = platform.chosen.bootargs.unwrap_or("");
    say!("booted with x0 = {dtb_addr:#x}, command line \"{bootargs}\"");

    let mut c = Checks {
        passed: 0,
        failed: 0,
    };
    let el = current_el();
    c.check(
        el == 1,
        format_args!("running at EL{el} (expected EL1 under Moat)"),
    );

    let pfr0 = sysreg!("id_aa64pfr0_el1");
    let pfr1 = sysreg!("id_aa64pfr1_el1");
    let mmfr0 = sysreg!("id_aa64mmfr0_el1");
    say!(
        "ID_AA64PFR0_EL1 {pfr0:#018x} ID_AA64PFR1_EL1 {pfr1:#018x} (MTE field {}) ID_AA64MMFR0_EL1 {mmfr0:#018x}",
        (pfr1 >> 8) & 0xf
    );

    let psci_hvc = platform.psci.map(|p| p.conduit) == Some(dt::Conduit::Hvc);
    c.check(
        psci_hvc,
        format_args!("device tree's PSCI method is hvc (pointing at the core)"),
    );
    let v = hvc(ids::SMCCC_VERSION, [0; 3])[0];
    c.check(
        v == ids::IMPLEMENTED_VERSION,
        format_args!("SMCCC_VERSION = {v:#x}"),
    );
    let v = hvc(smccc::psci::PSCI_VERSION, [0; 3])[0];
    c.check(
        (0x1_0000..0x2_0000).contains(&v),
        format_args!("PSCI_VERSION = {}.{}", v >> 16, v & 0xffff),
    );
    let v = smc_call(false, smccc::psci::PSCI_VERSION, [0; 3])[0];
    c.check(
        (0x1_0000..0x2_0000).contains(&v),
        format_args!(
            "PSCI_VERSION through a trapped SMC = {}.{}",
            v >> 16,
            v & 0xffff
        ),
    );
    let uid = hvc(ids::VENDOR_HYP_CALL_UID, [0; 3]);
    c.check(
        uid.map(|w| w as u32) == MOAT_UID,
        format_args!("vendor hypervisor UID is Moat's"),
    );
    let v = hvc(hypercall::ABI_VERSION, [0; 3]);
    c.check(
        v[0] == 0 && v[1] == u64::from(moat_abi::ABI_VERSION),
        format_args!("Moat ABI version {}.{}", v[1] >> 16, v[1] & 0xffff),
    );
    let v = hvc(hypercall::id(0x1234), [0; 3])[0];
    c.check(
        v == ids::NOT_SUPPORTED,
        format_args!("unknown hypercall returns NOT_SUPPORTED ({})", v as i64),
    );
    let v = hvc(0x8400_0013, [0; 3])[0]; // PSCI MEM_PROTECT: refused by the relay
    c.check(
        v == ids::NOT_SUPPORTED,
        format_args!("unrelayed PSCI call returns NOT_SUPPORTED"),
    );
    let v = hvc(hypercall::NULL, [0; 3])[0];
    c.check(v == 0, format_args!("null hypercall returns 0"));
    null_hypercall_edges(&mut c);

    // Our own memory.
    static mut BUFFER: [u64; 8192] = [0; 8192];
    let buf = core::ptr::addr_of_mut!(BUFFER) as *mut u64;
    let mut ok = true;
    for i in 0..8192u64 {
        // SAFETY: within our own static buffer.
        unsafe {
            buf.add(i as usize)
                .write_volatile(i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        };
    }
    for i in 0..8192u64 {
        // SAFETY: as above.
        ok &=
            unsafe { buf.add(i as usize).read_volatile() } == i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    c.check(
        ok,
        format_args!("wrote and read back 64 KiB of host memory at {buf:p}"),
    );

    // The hypervisor's memory.
    match hypervisor_region(dtb) {
        None => c.check(
            false,
            format_args!(
                "device tree reserves the hypervisor's memory (/reserved-memory/moat@...)"
            ),
        ),
        Some(hyp) => {
            c.check(
                true,
                format_args!(
                    "hypervisor memory {:#x}..{:#x} is reserved in the device tree",
                    hyp.base,
                    hyp.end()
                ),
            );
            for (what, write) in [("read", false), ("write", true)] {
                let target = hyp.base + 0x1000;
                EXCEPTIONS.store(0, Ordering::SeqCst);
                EXPECT.store(Expect::SkipInstruction as u64, Ordering::SeqCst);
                if write {
                    write_u64(target, 0xdead_beef)
                } else {
                    let _ = read_u64(target);
                }
                let esr = LAST_ESR.load(Ordering::SeqCst);
                let far = LAST_FAR.load(Ordering::SeqCst);
                let wnr = (esr >> 6) & 1 == 1;
                c.check(
                    EXCEPTIONS.load(Ordering::SeqCst) == 1 && esr >> 26 == 0x25 && esr & 0x3f == 0x10 && far == target && wnr == write,
                    format_args!("{what} of hypervisor memory at {target:#x}: synchronous external abort (ESR_EL1 {esr:#x}, FAR_EL1 {far:#x})"),
                );
            }
            // Executing from it: an instruction abort, and we come back.
            EXCEPTIONS.store(0, Ordering::SeqCst);
            EXPECT.store(Expect::ReturnToCaller as u64, Ordering::SeqCst);
            let target = hyp.base + 0x2000;
            // SAFETY: deliberately branches into memory the core withholds;
            // the handler returns to the link register, so control comes back
            // here with every caller-saved register clobbered as declared.
            unsafe {
                core::arch::asm!("blr {t}", t = in(reg) target, clobber_abi("C"));
            }
            let esr = LAST_ESR.load(Ordering::SeqCst);
            c.check(
                EXCEPTIONS.load(Ordering::SeqCst) == 1
                    && esr >> 26 == 0x21
                    && esr & 0x3f == 0x10
                    && LAST_ELR.load(Ordering::SeqCst) == target,
                format_args!(
                    "instruction fetch from hypervisor memory: instruction abort (ESR_EL1 {esr:#x})"
                ),
            );
        }
    }

    // Secondary CPUs through the PSCI relay.
    let me = sysreg!("mpidr_el1") & 0xff_00ff_ffff;
    let entry = secondary_start as *const () as u64;
    let v = hvc(smccc::psci::PSCI_CPU_ON_64, [0xff_ff00, entry, 0])[0] as i64;
    c.check(
        v == -2,
        format_args!("CPU_ON of a CPU that does not exist: INVALID_PARAMETERS ({v})"),
    );
    let v = hvc(smccc::psci::PSCI_CPU_ON_64, [me, entry, 0])[0] as i64;
    c.check(
        v == -4,
        format_args!("CPU_ON of the running CPU: ALREADY_ON ({v})"),
    );
    let others: heapless::Vec<(usize, u64), 16> = platform
        .cpus
        .iter()
        .enumerate()
        .filter(|(_, cpu)| cpu.mpidr != me)
        .map(|(i, cpu)| (i, cpu.mpidr))
        .collect();
    for &(index, mpidr) in &others {
        let v = hvc(smccc::psci::PSCI_CPU_ON_64, [mpidr, entry, index as u64])[0] as i64;
        c.check(
            v == 0,
            format_args!("CPU_ON of CPU {index} (MPIDR {mpidr:#x}) = {v}"),
        );
        let mut spins = 0u64;
        while ONLINE.load(Ordering::SeqCst) < index as u32 && spins < 50_000_000 {
            spins += 1;
            core::hint::spin_loop();
        }
    }
    for &(index, mpidr) in &others {
        let mut state = 0;
        for _ in 0..10_000 {
            state = hvc(smccc::psci::PSCI_AFFINITY_INFO_64, [mpidr, 0, 0])[0] as i64;
            if state == 1 {
                break;
            }
        }
        c.check(
            state == 1,
            format_args!("CPU {index} is OFF again after CPU_OFF (AFFINITY_INFO = {state})"),
        );
    }
    let online = ONLINE.load(Ordering::SeqCst);
    c.check(
        online as usize == others.len(),
        format_args!("{online} secondary CPU(s) ran at EL1"),
    );

    vm::alone_if_asked(&mut c, &platform, dtb, bootargs);
    services(&mut c);
    let mte_off = bootargs
        .split(' ')
        .any(|a| a == "arm64.nomte" || a == "moat.host_mte=off")
        && !bootargs.split(' ').any(|a| a == "moat.host_mte=on");
    let cpu_without_mte = bootargs
        .split(' ')
        .any(|a| a == "test-host.cpu_without_mte");
    mte(&mut c, mte_off, cpu_without_mte, dtb);
    let bench = bootargs.split(' ').any(|a| a == "moat.bench");
    vm::scenarios(&mut c, &platform, dtb, !mte_off, bench);

    if bench {
        let (null, loop_cost) = bench_hvc(1000, hypercall::NULL);
        say!("bench: null_hvc={null} (loop overhead {loop_cost} per iteration subtracted)");
        if hvc(TRACE_PING, [0; 3])[0] == 0 {
            let (call, _) = bench_hvc(1000, TRACE_PING);
            let (at_el2, _) = bench_hvc_filtered(1000, TRACE_PING, PMU_EL2_ONLY);
            say!(
                "bench: service_call={call} (host hypercall -> trace service -> reply -> host, empty message)"
            );
            say!(
                "bench: service_call_el2={at_el2} service_call_el1={} (where the instructions run)",
                call - at_el2.min(call)
            );
        }
        if mte_off {
            let undef = bench_mte_undef();
            say!(
                "bench: mte_sysreg_undef={undef} (host mrs gcr_el1 -> core -> mte service -> UNDEF at the host's vector)"
            );
        }
    }

    // The consistency checker, after everything above.
    let v = hvc(hypercall::CHECK_CONSISTENCY, [0; 3])[0] as i64;
    if v != Error::NotSupported.code() {
        c.check(
            v == 0,
            format_args!("the ledger and the host's stage-2 agree after every check ({v})"),
        );
    }

    if c.failed == 0 {
        say!("PASS ({} checks)", c.passed);
    } else {
        say!(
            "FAIL ({} of {} checks failed)",
            c.failed,
            c.passed + c.failed
        );
    }
    say!("powering off through PSCI SYSTEM_OFF");
    system_off()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: the panicking CPU may hold the console lock; nothing else matters now.
    unsafe { CONSOLE.force_unlock() };
    say!("FAIL (panic: {info})");
    system_off()
}
