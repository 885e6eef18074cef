//! The random hostile host: seeded sequences of every host hypercall, with
//! arguments drawn to hit boundaries, from every CPU at once.
//!
//! With `moat.fuzz=SEED,STEPS,CHECK_EVERY` on its command line the test
//! host runs only this. Each CPU owns a region of RAM (4 MiB, straddling a
//! 2 MiB block boundary) with a guard page on either side that a sentinel
//! VM holds for the whole run, and keeps a model of every page of its
//! region (the host's, shared with the hypervisor, or donated to which of
//! its VMs at which IPA) and of its VMs. Step by step it draws a call:
//! share, unshare, create (flags and entry points good and bad), donate,
//! load, run, destroy, reclaim, an MTE system register, PSCI CPU_ON and
//! AFFINITY_INFO, a touch of its own or a donated page, the null and an
//! unknown hypercall. Ranges are drawn inside the region, straddling its
//! guard pages, unaligned, empty, past the end of RAM, in the hypervisor's
//! carve-out, on other CPUs' guard pages, and at the edges of u64.
//!
//! Where the model knows the answer it requires it exactly (success, or the
//! typed error); where another CPU can change the answer (a free VM slot)
//! it requires one of the answers that leave the model right. After every
//! step the CPU reads back a sample of the pages it owns (each stamp must
//! be intact) and touches one page it gave away (which must abort); every
//! `CHECK_EVERY` steps it reads back every page it owns and runs the core's
//! consistency checker. With `,stress` after the numbers it runs only the
//! calls that move pages and run VMs (see `Model::step`).
//!
//! The VMs run the guest in its chaos mode (`MODE_CHAOS`): it shares,
//! unshares, reads and writes the pages of a window the host may or may
//! not have donated (a page it did not is an MMIO exit), spins and waits,
//! and reports each action with the result it got; the host checks each
//! result against its model of the window. Once a VM reports its first
//! action, its handle is published, and other CPUs run it too.
//!
//! The generator of a CPU is a xorshift64* seeded from the seed and the
//! CPU's index: one CPU's sequence is the same on every run. A violation
//! prints the seed, CPU and step; `cargo xtask fuzz-host` re-runs shorter
//! prefixes to find the shortest that still fails.

use super::super::{CONSOLE, Checks, Frame, hvc, hypervisor_region};
use super::{
    Code, GUEST, PAGE, RETRIED, Ram, check_consistency, destroy, donate, load, p, reclaim,
    secondary_start, share_hyp, unshare_hyp, vcpu_run_once, vm_create,
};
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use moat_abi::vm::{self as abi, ExitReason, VmFlags};
use moat_abi::{Error, hypercall, smccc as ids};
use moat_platform::dt::{Platform, Range};
use spin::Mutex;

/// Most CPUs the fuzzer drives.
const MAX_CPUS: usize = 8;
/// Pages of a CPU's region.
const REGION_PAGES: u64 = 1024;
/// VMs one CPU keeps at once.
const VMS_PER_CPU: usize = 3;
/// Where random donations go in a VM's IPA space (beside the guest's own
/// pages and its chaos window).
const RANDOM_IPA_BASE: u64 = 0x8000_0000;
/// Where the sentinel VM maps the guard pages.
const SENTINEL_IPA: u64 = 0x1000_0000;

/// A xorshift64* generator, seeded through splitmix64.
#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub const fn new(seed: u64, stream: u64) -> Self {
        let mut z = seed
            .wrapping_add(stream.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Self((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        (self.next() >> 16) % n
    }

    /// True once in `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}

/// The run's parameters, from the command line.
#[derive(Clone, Copy)]
struct Params {
    seed: u64,
    steps_per_cpu: u64,
    check_every: u64,
    /// SMP stress: only the calls that move pages and run VMs, with
    /// ranges inside the regions, two VMs per CPU (eight on four CPUs)
    /// and no sentinel.
    stress: bool,
    /// Restart the ledger every this many of CPU 0's steps
    /// (`moat.fuzz_restart=N`).
    restart_every: Option<u64>,
}

fn parse(bootargs: &str) -> Option<Params> {
    let restart_every = bootargs
        .split(' ')
        .find_map(|a| a.strip_prefix("moat.fuzz_restart="))
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0);
    let arg = bootargs
        .split(' ')
        .find_map(|a| a.strip_prefix("moat.fuzz="))?;
    let stress = arg.split(',').any(|v| v == "stress");
    let mut it = arg.split(',').filter(|v| *v != "stress").map(|v| {
        v.strip_prefix("0x")
            .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok())
    });
    let seed = it.next()??;
    let steps = it.next().flatten().unwrap_or(1000);
    let check_every = it.next().flatten().unwrap_or(64).max(1);
    Some(Params {
        seed,
        steps_per_cpu: steps,
        check_every,
        stress,
        restart_every,
    })
}

/// What one page of a CPU's region is, in its model.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PageState {
    /// The host's; `shared`: with the hypervisor too.
    Host { shared: bool },
    /// Donated to VM `vm` (an index into the CPU's VMs) at `ipa`.
    Vm { vm: u8, ipa: u64 },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Status {
    Alive,
    /// Powered off or crashed: no more runs or donations.
    Off,
    /// Destroyed: pages await reclaim.
    Dying,
}

/// Consecutive pages read back after each step between full sweeps.
const VERIFY_SAMPLE: usize = 32;

/// Where a chaos guest is in its protocol.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// A VM that carries no guest (random donations and loads only).
    Bare,
    /// Loaded; its first exit asks for its mode.
    Config,
    /// Asked its mode; next it asks for its seed.
    Seed,
    /// Reporting actions.
    Chaos,
}

#[derive(Clone)]
struct VmModel {
    handle: u64,
    status: Status,
    phase: Phase,
    has_run: bool,
    /// The answer owed to its last exit.
    answer: [u64; 4],
    /// Window pages (bit k: page k) given to it since its guest's last
    /// report reached us. A report may describe an action taken before such
    /// a donation: the run that made the action can end (a host interrupt
    /// that arrived meanwhile) before the guest reports it, and the report
    /// then comes in a later run. Every action after a report postdates
    /// every donation before it, so the bits clear at each report.
    donated_since_report: u64,
    /// Pages it holds, by the model.
    pages: u64,
}

/// One CPU's world.
struct Model {
    cpu: usize,
    base: u64,
    pages: [PageState; REGION_PAGES as usize],
    /// The stamp written into the first word of each host page.
    stamp: [u64; REGION_PAGES as usize],
    vms: heapless::Vec<VmModel, VMS_PER_CPU>,
    rng: Rng,
    stress: bool,
    step: u64,
    /// Calls that succeeded.
    succeeded: u64,
    counts: [u64; OPS],
    refused: u64,
    /// Calls answered NoMemory or Busy: allowed, nothing changed.
    contended: u64,
    guest_reports: u64,
}

/// Everything the CPUs share.
struct World {
    params: Params,
    cpus: usize,
    regions: [u64; MAX_CPUS],
    mpidrs: [u64; MAX_CPUS],
    ram_end: u64,
    carve_out: Option<Range>,
    mte_regs_work: bool,
}

static WORLD: Mutex<Option<World>> = Mutex::new(None);
static ACTIVE: AtomicBool = AtomicBool::new(false);
static FAILED: AtomicBool = AtomicBool::new(false);
static FINISHED: AtomicU64 = AtomicU64::new(0);
static TOTAL_STEPS: AtomicU64 = AtomicU64::new(0);
/// Calls that succeeded, on every CPU.
static SUCCEEDED: AtomicU64 = AtomicU64::new(0);
/// Fuzzing CPUs that have started: none steps before all are on (a CPU_ON
/// of a CPU not yet started would start it twice).
static STARTED: AtomicU64 = AtomicU64::new(0);
/// Handles of VMs other CPUs may run, by slot (0: none), and how many
/// CPUs are about to run each (its owner waits for none before it
/// destroys the VM, so the handle is never another VM's when they run it).
static PUBLISHED: [AtomicU64; abi::MAX_VMS] = [const { AtomicU64::new(0) }; abi::MAX_VMS];
static USERS: [AtomicU64; abi::MAX_VMS] = [const { AtomicU64::new(0) }; abi::MAX_VMS];
/// Per-CPU expected-exception records: armed, taken, ESR, FAR.
static ARMED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
static TAKEN: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static TAKEN_ESR: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(0) }; MAX_CPUS];
static MPIDRS: [AtomicU64; MAX_CPUS] = [const { AtomicU64::new(u64::MAX) }; MAX_CPUS];

fn world<R>(f: impl FnOnce(&World) -> R) -> R {
    f(WORLD.lock().as_ref().expect("the fuzzer's world is set up"))
}

fn this_cpu() -> usize {
    let me = sysreg!("mpidr_el1") & 0xff_00ff_ffff;
    MPIDRS
        .iter()
        .position(|m| m.load(Ordering::Relaxed) == me)
        .unwrap_or(0)
}

/// Called first by the test host's exception handler: an exception a
/// fuzzing CPU armed for is counted and the instruction skipped.
pub fn exception(esr: u64, frame: &mut Frame) -> bool {
    if !ACTIVE.load(Ordering::Relaxed) {
        return false;
    }
    let cpu = this_cpu();
    if !ARMED[cpu].swap(false, Ordering::SeqCst) {
        return false;
    }
    TAKEN[cpu].fetch_add(1, Ordering::SeqCst);
    TAKEN_ESR[cpu].store(esr, Ordering::SeqCst);
    frame.elr += 4;
    true
}

/// Runs `access` with an exception expected: `Some(ESR)` if one was taken.
fn guarded<T>(cpu: usize, access: impl FnOnce() -> T) -> (T, Option<u64>) {
    TAKEN[cpu].store(0, Ordering::SeqCst);
    ARMED[cpu].store(true, Ordering::SeqCst);
    let v = access();
    ARMED[cpu].store(false, Ordering::SeqCst);
    let taken = TAKEN[cpu].load(Ordering::SeqCst) > 0;
    (v, taken.then(|| TAKEN_ESR[cpu].load(Ordering::SeqCst)))
}

fn read_word(addr: u64) -> u64 {
    // SAFETY: RAM of the identity map; a page the host gave away aborts and
    // the armed handler skips the load.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn write_word(addr: u64, v: u64) {
    // SAFETY: as for `read_word`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// Whether `ipa` lies in a chaos guest's window.
fn in_window(ipa: u64) -> bool {
    (p::CHAOS_WINDOW_IPA..p::CHAOS_WINDOW_IPA + p::CHAOS_WINDOW_PAGES * PAGE).contains(&ipa)
}

/// A synchronous external abort on a data access (EC 0x25, DFSC 0x10).
fn is_sea(esr: u64) -> bool {
    esr >> 26 == 0x25 && esr & 0x3f == 0x10
}

const OPS: usize = 16;
const OP_NAMES: [&str; OPS] = [
    "share", "unshare", "create", "donate", "load", "run", "destroy", "reclaim", "touch", "mte",
    "psci", "null", "foreign", "window", "check", "guest",
];

/// A failed expectation: reported once, and every CPU stops.
macro_rules! violation {
    ($m:expr, $($arg:tt)*) => {{
        if !FAILED.swap(true, Ordering::SeqCst) {
            let seed = world(|w| w.params.seed);
            // The details first: the harness stops the machine as soon as
            // it sees the marker line after them.
            say!(
                "fuzz: FAILED seed {:#x} cpu {} step {}: {}",
                seed, $m.cpu, $m.step, format_args!($($arg)*)
            );
            say!("fuzz: VIOLATION (details above)");
        }
        return;
    }};
}

/// A call's result must be one of `allowed`.
fn one_of(code: Code, allowed: &[Result<(), Error>]) -> bool {
    allowed.iter().any(|a| match a {
        Ok(()) => code.ok(),
        Err(e) => code.is(*e),
    })
}

const OK: Result<(), Error> = Ok(());
const INVALID: Result<(), Error> = Err(Error::InvalidParameters);
const DENIED: Result<(), Error> = Err(Error::Denied);
const NO_MEMORY: Result<(), Error> = Err(Error::NoMemory);
const BUSY: Result<(), Error> = Err(Error::Busy);
/// A guest's share while the ledger is being rebuilt (the host's own calls
/// are issued again until they are not `Retry`).
const RETRY: Result<(), Error> = Err(Error::Retry);

/// A drawn range of pages and what the model knows of it.
#[derive(Clone, Copy)]
struct Drawn {
    pa: u64,
    pages: u64,
    /// Indices into the CPU's region when the whole range lies inside it.
    inside: Option<(usize, usize)>,
    /// The arguments are malformed: `InvalidParameters` whoever owns what.
    malformed: bool,
}

impl Model {
    const EMPTY: Model = Model {
        cpu: 0,
        base: 0,
        pages: [PageState::Host { shared: false }; REGION_PAGES as usize],
        stamp: [0; REGION_PAGES as usize],
        vms: heapless::Vec::new(),
        rng: Rng(1),
        stress: false,
        step: 0,
        succeeded: 0,
        counts: [0; OPS],
        refused: 0,
        contended: 0,
        guest_reports: 0,
    };

    fn stamp_for(&self, i: usize) -> u64 {
        (self.base + i as u64 * PAGE) ^ self.step.rotate_left(40) ^ 0x5a5a_0000_0000_0001
    }

    fn restamp(&mut self, i: usize) {
        let s = self.stamp_for(i);
        write_word(self.base + i as u64 * PAGE, s);
        self.stamp[i] = s;
    }

    fn pa(&self, i: usize) -> u64 {
        self.base + i as u64 * PAGE
    }

    /// A range drawn to hit boundaries.
    fn draw_range(&mut self) -> Drawn {
        let (ram_end, carve, cpus, regions) =
            world(|w| (w.ram_end, w.carve_out, w.cpus, w.regions));
        let n = REGION_PAGES;
        let short = |rng: &mut Rng| match rng.below(10) {
            0..=5 => 1,
            6..=7 => 1 + rng.below(8),
            8 => 1 + rng.below(64),
            _ => 256 + rng.below(400),
        };
        let inside = |m: &mut Self, start: u64, pages: u64| {
            let pages = pages.min(n - start).max(1);
            Drawn {
                pa: m.base + start * PAGE,
                pages,
                inside: Some((start as usize, (start + pages) as usize)),
                malformed: false,
            }
        };
        let outside = |pa: u64, pages: u64, malformed: bool| Drawn {
            pa,
            pages,
            inside: None,
            malformed,
        };
        // A stress run stays inside the region: every call can succeed.
        match self.rng.below(if self.stress { 16 } else { 24 }) {
            0..=13 => {
                let start = self.rng.below(n);
                let pages = short(&mut self.rng);
                inside(self, start, pages)
            }
            // Around the 2 MiB block boundary in the middle of the region.
            14 | 15 => {
                let start = n / 2 - 1 - self.rng.below(4);
                let pages = 1 + self.rng.below(6);
                inside(self, start, pages)
            }
            // Straddling the guard page below or above.
            16 => {
                let k = 1 + self.rng.below(3);
                outside(self.base - k * PAGE, k + 1 + self.rng.below(3), false)
            }
            17 => {
                let k = 1 + self.rng.below(3);
                outside(self.base + (n - k) * PAGE, k + 1 + self.rng.below(3), false)
            }
            18 => {
                let start = self.rng.below(n);
                let d = inside(self, start, 1);
                outside(d.pa + 1 + self.rng.below(PAGE - 1), d.pages, true)
            }
            19 => outside(self.base + self.rng.below(n) * PAGE, 0, true),
            20 => match self.rng.below(5) {
                0 => outside(!(PAGE - 1), 1 + self.rng.below(3), true),
                1 => outside(self.base, u64::MAX, true),
                2 => outside(self.base, 1 << 52, true),
                3 => outside(u64::MAX - PAGE * 2 + 1, 2, true),
                _ => outside(self.base, (u64::MAX / PAGE) + 1, true),
            },
            21 => outside(
                ram_end + self.rng.below(4) * PAGE,
                1 + self.rng.below(4),
                false,
            ),
            22 => match carve {
                Some(c) => outside(
                    c.base + self.rng.below(c.size / PAGE) * PAGE,
                    1 + self.rng.below(4),
                    false,
                ),
                None => outside(ram_end, 1, false),
            },
            // Another CPU's guard page: the sentinel VM's.
            _ => {
                let other = self.rng.below(cpus as u64) as usize;
                let guard = if self.rng.one_in(2) {
                    regions[other] - PAGE
                } else {
                    regions[other] + n * PAGE
                };
                outside(guard, 1, false)
            }
        }
    }

    /// The model's view of the first page of `d` that is not the host's
    /// alone, for a violation's message.
    fn describe(&self, d: &Drawn) -> heapless::String<160> {
        let mut out = heapless::String::new();
        if let Some((a, b)) = d.inside
            && let Some(k) = (a..b).find(|&k| self.pages[k] != PageState::Host { shared: false })
        {
            let _ = match self.pages[k] {
                PageState::Host { .. } => {
                    write!(out, "; page {:#x} shared with the hypervisor", self.pa(k))
                }
                PageState::Vm { vm, ipa } => write!(
                    out,
                    "; page {:#x} donated to VM {} at IPA {ipa:#x}",
                    self.pa(k),
                    self.vms.get(usize::from(vm)).map_or(0, |v| v.handle)
                ),
            };
        }
        out
    }

    fn all(&self, d: &Drawn, f: impl Fn(PageState) -> bool) -> bool {
        d.inside
            .is_some_and(|(a, b)| self.pages[a..b].iter().all(|s| f(*s)))
    }

    /// VMs this CPU keeps at once: two in a stress run (eight on four CPUs,
    /// every slot the core has), three otherwise.
    fn vm_limit(&self) -> usize {
        if self.stress { 2 } else { VMS_PER_CPU }
    }

    fn step(&mut self) {
        let op = if self.stress {
            // Moving pages and running VMs, from every CPU at once.
            match self.rng.below(100) {
                0..=14 => 0,
                15..=24 => 1,
                25..=29 => 2,
                30..=49 => 3,
                50..=69 => 5,
                70..=73 => 6,
                74..=89 => 7,
                90..=94 => 12,
                _ => 13,
            }
        } else {
            match self.rng.below(100) {
                0..=9 => 0,
                10..=17 => 1,
                18..=23 => 2,
                24..=37 => 3,
                38..=42 => 4,
                43..=62 => 5,
                63..=67 => 6,
                68..=77 => 7,
                78..=83 => 8,
                84..=85 => 9,
                86..=87 => 10,
                88 => 11,
                89..=93 => 12,
                _ => 13,
            }
        };
        self.counts[op] += 1;
        match op {
            0 => self.op_share(true),
            1 => self.op_share(false),
            2 => self.op_create(),
            3 => self.op_donate(),
            4 => self.op_load(),
            5 => self.op_run(),
            6 => self.op_destroy(),
            7 => self.op_reclaim(),
            8 => self.op_touch(),
            9 => self.op_mte(),
            10 => self.op_psci(),
            11 => self.op_null(),
            12 => self.op_foreign(),
            _ => self.op_window(),
        }
    }

    fn op_share(&mut self, share: bool) {
        let d = self.draw_range();
        let r = if share {
            share_hyp(d.pa, d.pages)
        } else {
            unshare_hyp(d.pa, d.pages)
        };
        let ok_now = self.all(&d, |s| s == PageState::Host { shared: !share });
        let expect: &[_] = if d.malformed {
            &[INVALID]
        } else if ok_now {
            &[OK, NO_MEMORY]
        } else if d.inside.is_some() {
            &[DENIED]
        } else {
            &[DENIED, INVALID]
        };
        let what = if share {
            "HOST_SHARE_HYP"
        } else {
            "HOST_UNSHARE_HYP"
        };
        if !one_of(r, expect) {
            violation!(
                self,
                "{what}({:#x}, {}) = {r}, the model expected {}",
                d.pa,
                d.pages,
                if ok_now { "success" } else { "a refusal" }
            );
        }
        self.tally(r);
        if r.ok()
            && let Some((a, b)) = d.inside
        {
            for s in &mut self.pages[a..b] {
                *s = PageState::Host { shared: share };
            }
        }
    }

    fn tally(&mut self, r: Code) {
        if r.ok() {
            self.succeeded += 1;
        } else if r.is(Error::NoMemory) || r.is(Error::Busy) {
            self.contended += 1;
        } else if !r.ok() {
            self.refused += 1;
        }
    }

    /// A handle drawn from this CPU's VMs, the sentinel, or bad values;
    /// the index of the VM when it is one of ours.
    fn draw_handle(&mut self) -> (u64, Option<usize>) {
        if !self.vms.is_empty() && (self.stress || self.rng.below(10) < 7) {
            let i = self.rng.below(self.vms.len() as u64) as usize;
            return (self.vms[i].handle, Some(i));
        }
        // 0x9_0001: VM 1's vCPU 9, which no VM can have (bits 31:16 of
        // VCPU_RUN's x1 choose the vCPU, so VM 1's vCPU 1 may be real).
        let bad = [0, abi::MAX_VMS as u64 + 1, 0x9_0001, u64::MAX, 1 << 63 | 1];
        (bad[self.rng.below(bad.len() as u64) as usize], None)
    }

    fn op_create(&mut self) {
        let flags = match self.rng.below(8) {
            0 => 1 << (1 + self.rng.below(63)),
            1 => VmFlags::MTE,
            _ => 0,
        };
        let entry = if self.rng.one_in(8) {
            p::BASE_IPA + 1 + self.rng.below(3)
        } else {
            p::BASE_IPA
        };
        let malformed = flags & !VmFlags::KNOWN != 0 || entry % 4 != 0;
        let (r, handle) = vm_create(entry, flags);
        if malformed {
            if !r.is(Error::InvalidParameters) {
                violation!(
                    self,
                    "VM_CREATE(entry {entry:#x}, flags {flags:#x}) = {r}, expected InvalidParameters"
                );
            }
            self.refused += 1;
            return;
        }
        let allowed: &[_] = if flags == VmFlags::MTE {
            &[OK, NO_MEMORY, Err(Error::NotSupported), DENIED]
        } else {
            &[OK, NO_MEMORY]
        };
        if !one_of(r, allowed) {
            violation!(self, "VM_CREATE(flags {flags:#x}) = {r}");
        }
        self.tally(r);
        if !r.ok() {
            return;
        }
        if self.vms.len() >= self.vm_limit() || self.vms.iter().any(|v| v.handle == handle) {
            if self.vms.iter().any(|v| v.handle == handle) {
                violation!(
                    self,
                    "VM_CREATE returned handle {handle}, which is still ours"
                );
            }
            // No room in the model: give it straight back.
            if !destroy(handle).ok() {
                violation!(
                    self,
                    "VM_DESTROY of a fresh VM {handle} with no pages failed"
                );
            }
            return;
        }
        let mut vm = VmModel {
            handle,
            status: Status::Alive,
            phase: Phase::Bare,
            has_run: false,
            answer: [0; 4],
            donated_since_report: 0,
            pages: 0,
        };
        // Most VMs carry the guest.
        if self.rng.below(4) != 0 {
            self.install_guest(&mut vm);
        }
        let _ = self.vms.push(vm);
    }

    /// Pages `[i, i + n)` the host owns, unshared, found from a random start.
    fn free_run(&mut self, n: usize) -> Option<usize> {
        let start = self.rng.below(REGION_PAGES) as usize;
        (0..REGION_PAGES as usize)
            .map(|k| (start + k) % REGION_PAGES as usize)
            .find(|&i| {
                i + n <= REGION_PAGES as usize
                    && self.pages[i..i + n]
                        .iter()
                        .all(|s| *s == PageState::Host { shared: false })
            })
    }

    /// Donates 16 pages at the guest's IPA and loads the guest into them.
    fn install_guest(&mut self, vm: &mut VmModel) {
        let staging_pages = (GUEST.len() as u64).div_ceil(PAGE) as usize;
        let Some(at) = self.free_run(p::PAGES as usize) else {
            return;
        };
        let r = donate(vm.handle, self.pa(at), p::PAGES, p::BASE_IPA);
        if !one_of(r, &[OK, NO_MEMORY]) {
            violation!(
                self,
                "VM_DONATE of the guest's 16 pages at {:#x} = {r}",
                self.pa(at)
            );
        }
        if !r.ok() {
            self.contended += 1;
            return;
        }
        self.record_donation(vm, at, p::PAGES as usize, p::BASE_IPA);
        let Some(s) = self.free_run(staging_pages) else {
            return;
        };
        let staging = self.pa(s);
        // SAFETY: `staging_pages` pages of the host's own region, not shared.
        unsafe {
            core::ptr::copy_nonoverlapping(GUEST.as_ptr(), staging as *mut u8, GUEST.len());
        }
        let shared = share_hyp(staging, staging_pages as u64);
        let loaded = load(vm.handle, p::BASE_IPA, staging, GUEST.len() as u64);
        let unshared = unshare_hyp(staging, staging_pages as u64);
        for i in s..s + staging_pages {
            self.restamp(i);
        }
        if !(shared.ok() || shared.is(Error::NoMemory)) || !loaded.ok() && shared.ok() {
            violation!(
                self,
                "loading the guest into VM {}: HOST_SHARE_HYP {shared}, VM_LOAD {loaded}",
                vm.handle
            );
        }
        if shared.ok() && !unshared.ok() {
            violation!(
                self,
                "HOST_UNSHARE_HYP of the guest's staging pages = {unshared}"
            );
        }
        if loaded.ok() {
            vm.phase = Phase::Config;
        }
    }

    fn record_donation(&mut self, vm: &mut VmModel, at: usize, n: usize, ipa: u64) {
        let index = self.vms.iter().position(|v| v.handle == vm.handle);
        let tag = index.unwrap_or(self.vms.len()) as u8;
        for k in 0..n {
            self.pages[at + k] = PageState::Vm {
                vm: tag,
                ipa: ipa + k as u64 * PAGE,
            };
        }
        vm.pages += n as u64;
        for k in 0..n as u64 {
            let page = ipa + k * PAGE;
            if in_window(page) {
                vm.donated_since_report |= 1 << ((page - p::CHAOS_WINDOW_IPA) / PAGE);
            }
        }
    }

    /// The IPAs of VM `i`'s pages (every donation comes from the region).
    fn vm_ipas(&self, i: usize) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.pages
            .iter()
            .enumerate()
            .filter_map(move |(k, s)| match s {
                PageState::Vm { vm, ipa } if usize::from(*vm) == i => Some((k, *ipa)),
                _ => None,
            })
    }

    /// The PA VM `i` has at `ipa`, by the model.
    fn mapped(&self, i: usize, ipa: u64) -> Option<u64> {
        let page = ipa & !(PAGE - 1);
        self.vm_ipas(i)
            .find(|(_, at)| *at == page)
            .map(|(k, _)| self.pa(k))
    }

    /// Whether no page of VM `i` sits in `[ipa, ipa + pages)`.
    fn ipa_free(&self, i: usize, ipa: u64, pages: u64) -> bool {
        let end = ipa.saturating_add(pages.saturating_mul(PAGE));
        self.vm_ipas(i).all(|(_, at)| at < ipa || at >= end)
    }

    fn draw_ipa(&mut self, vm: Option<usize>, pages: u64) -> (u64, bool) {
        match self.rng.below(10) {
            0..=4 => (RANDOM_IPA_BASE + self.rng.below(4096) * PAGE, false),
            5 | 6 => (
                p::CHAOS_WINDOW_IPA + self.rng.below(p::CHAOS_WINDOW_PAGES) * PAGE,
                false,
            ),
            // Over the guest's own pages, or over an earlier donation.
            7 => match vm.and_then(|i| self.vm_ipas(i).next()) {
                Some((_, ipa)) => (ipa, false),
                None => (p::BASE_IPA, false),
            },
            8 => (RANDOM_IPA_BASE + 1 + self.rng.below(PAGE - 1), true),
            // Past any IPA space the core gives a VM, or past u64.
            _ => {
                let _ = pages;
                let edge = [1u64 << 52, !(PAGE - 1), 1 << 60];
                (edge[self.rng.below(3) as usize], true)
            }
        }
    }

    fn op_donate(&mut self) {
        let (handle, index) = self.draw_handle();
        let mut d = self.draw_range();
        if d.inside.is_some() && self.rng.below(3) != 0 {
            // Mostly small donations: room stays for everything else.
            d.pages = d.pages.min(4);
            d.inside = d.inside.map(|(a, _)| (a, a + d.pages as usize));
        }
        let vm = index.map(|i| self.vms[i].clone());
        let (ipa, bad_ipa) = self.draw_ipa(index, d.pages);
        if in_window(ipa) && d.inside.is_some() {
            // One window page at a time: the guest's record of its shares
            // covers the window, and nothing past it may be mapped.
            d.pages = 1;
            d.inside = d.inside.map(|(a, _)| (a, a + 1));
        }
        let ipa_free = index.is_none_or(|i| self.ipa_free(i, ipa, d.pages));
        let r = donate(handle, d.pa, d.pages, ipa);
        let all_free = self.all(&d, |s| s == PageState::Host { shared: false });
        let shape_bad = d.malformed || bad_ipa;
        let expect: &[_] = match &vm {
            _ if shape_bad => &[INVALID],
            None => &[INVALID],
            // Another CPU may be running it right now.
            Some(v) if r.is(Error::Busy) && v.phase == Phase::Chaos => &[BUSY],
            Some(v) if v.status == Status::Off => &[DENIED],
            Some(_) if !ipa_free => &[INVALID],
            Some(v) if v.status == Status::Dying => &[DENIED, INVALID],
            Some(_) if all_free => &[OK, NO_MEMORY],
            Some(_) if d.inside.is_some() => &[DENIED],
            Some(_) => &[DENIED, INVALID],
        };
        if !one_of(r, expect) {
            violation!(
                self,
                "VM_DONATE(handle {handle:#x}, {:#x}, {}, IPA {ipa:#x}) = {r}; model: {}, pages {}, IPA {}{}",
                d.pa,
                d.pages,
                match vm.as_ref().map(|v| v.status) {
                    None => "not our VM",
                    Some(Status::Alive) => "VM alive",
                    Some(Status::Off) => "VM off",
                    Some(Status::Dying) => "VM destroyed",
                },
                if all_free {
                    "the host's"
                } else {
                    "not all the host's"
                },
                if ipa_free { "free" } else { "taken" },
                self.describe(&d),
            );
        }
        self.tally(r);
        if r.ok()
            && let (Some(i), Some((a, b))) = (index, d.inside)
        {
            let mut v = self.vms[i].clone();
            self.record_donation(&mut v, a, b - a, ipa);
            self.vms[i] = v;
        }
    }

    fn op_load(&mut self) {
        let (handle, index) = self.draw_handle();
        let d = self.draw_range();
        let vm = index.map(|i| self.vms[i].clone());
        // Into the window or a random donation, never over the guest's code.
        let beyond_guest = index.and_then(|i| {
            self.vm_ipas(i)
                .map(|(_, ipa)| ipa)
                .find(|ipa| *ipa >= p::CHAOS_WINDOW_IPA)
        });
        let (ipa, bytes) = match (beyond_guest, self.rng.below(4)) {
            (Some(ipa), 0..=2) => (ipa, 1 + self.rng.below(2 * PAGE)),
            _ => (
                p::CHAOS_WINDOW_IPA + self.rng.below(PAGE),
                [0, 1, 64 << 20, (64 << 20) + 1, u64::MAX][self.rng.below(5) as usize],
            ),
        };
        let bytes = bytes.min(d.pages.saturating_mul(PAGE).max(1));
        let src = d.pa;
        let r = load(handle, ipa, src, bytes);
        let region_end = self.base + REGION_PAGES * PAGE;
        let src_pages =
            (src >= self.base && src < region_end && bytes <= region_end - src).then(|| {
                let a = ((src - self.base) / PAGE) as usize;
                (a, ((src - self.base) + bytes).div_ceil(PAGE) as usize)
            });
        let src_ok = src_pages.is_some_and(|(a, b)| {
            b <= REGION_PAGES as usize
                && self.pages[a..b]
                    .iter()
                    .all(|s| *s == PageState::Host { shared: true })
        });
        let dest_ok = index.is_some_and(|i| {
            let first = ipa & !(PAGE - 1);
            let pages = (ipa + bytes).div_ceil(PAGE) - first / PAGE;
            (0..pages).all(|k| self.mapped(i, first + k * PAGE).is_some())
        });
        let can = vm
            .as_ref()
            .is_some_and(|v| v.status == Status::Alive && !v.has_run);
        let published = vm.as_ref().is_some_and(|v| v.phase == Phase::Chaos);
        let expect: &[_] = if bytes == 0 || bytes > 64 << 20 {
            &[INVALID]
        } else if published {
            // Run (so refused) and possibly running on another CPU.
            &[DENIED, INVALID, BUSY]
        } else if can && src_ok && dest_ok {
            &[OK]
        } else {
            &[DENIED, INVALID]
        };
        if !one_of(r, expect) {
            violation!(
                self,
                "VM_LOAD(handle {handle:#x}, IPA {ipa:#x}, source {src:#x}, {bytes} bytes) = {r}"
            );
        }
        self.tally(r);
    }

    /// The VM at `i` stops being runnable by other CPUs; waits until none is
    /// about to run it.
    fn unpublish(&self, handle: u64) {
        if let Some(slot) = (handle as usize)
            .checked_sub(1)
            .filter(|s| *s < abi::MAX_VMS)
        {
            if PUBLISHED[slot].load(Ordering::SeqCst) == handle {
                PUBLISHED[slot].store(0, Ordering::SeqCst);
            }
            while USERS[slot].load(Ordering::SeqCst) != 0 {
                core::hint::spin_loop();
            }
        }
    }

    fn op_run(&mut self) {
        let (handle, index) = self.draw_handle();
        let Some(i) = index else {
            let (r, _) = vcpu_run_once(handle, [0; 4]);
            if !r.is(Error::InvalidParameters) {
                violation!(self, "VCPU_RUN of bad handle {handle:#x} = {r}");
            }
            self.refused += 1;
            return;
        };
        let answer = core::mem::take(&mut self.vms[i].answer);
        let (r, regs) = vcpu_run_once(handle, answer);
        let v = self.vms[i].clone();
        if v.status != Status::Alive {
            if !r.is(Error::Denied) {
                violation!(
                    self,
                    "VCPU_RUN of VM {handle} that is off or destroyed = {r}"
                );
            }
            self.refused += 1;
            return;
        }
        if r.is(Error::Busy) {
            // Another CPU runs it (published VMs only).
            if v.phase != Phase::Chaos {
                violation!(self, "VCPU_RUN of VM {handle}, which only we run, = Busy");
            }
            self.vms[i].answer = answer;
            self.contended += 1;
            return;
        }
        if !r.ok() {
            violation!(self, "VCPU_RUN of live VM {handle} = {r}");
        }
        self.succeeded += 1;
        self.vms[i].has_run = true;
        let reason = ExitReason::from_u64(regs[0]);
        let d = &regs[1..];
        if v.phase == Phase::Bare {
            // No guest: whatever it runs into. A VM that ends is off.
            match reason {
                Some(ExitReason::Shutdown | ExitReason::Crashed) => {
                    self.vms[i].status = Status::Off
                }
                Some(_) => {}
                None => violation!(self, "VCPU_RUN of VM {handle}: unknown exit {:#x}", regs[0]),
            }
            return;
        }
        match reason {
            Some(ExitReason::Hvc) => {
                let f = d[0] as u32;
                match (v.phase, f) {
                    (Phase::Config, p::CONFIG) => {
                        self.vms[i].answer = [p::MODE_CHAOS, 0, 0, 0];
                        self.vms[i].phase = Phase::Seed;
                    }
                    (Phase::Seed, p::CHAOS_SEED) => {
                        let seed = self.rng.next();
                        self.vms[i].answer = [seed, 0, 0, 0];
                        self.vms[i].phase = Phase::Chaos;
                        let slot = handle as usize - 1;
                        PUBLISHED[slot].store(handle, Ordering::SeqCst);
                    }
                    (Phase::Chaos, p::CHAOS_DID) => self.guest_report(i, [d[1], d[2], d[3], d[4]]),
                    (_, p::FAULT) => violation!(
                        self,
                        "VM {handle}'s guest faulted: ESR_EL1 {:#x} ELR_EL1 {:#x} FAR_EL1 {:#x}",
                        d[1],
                        d[2],
                        d[3]
                    ),
                    _ => violation!(self, "VM {handle}: unexpected guest call {f:#x}"),
                }
            }
            Some(ExitReason::Mmio) => {
                if !in_window(d[0]) {
                    violation!(
                        self,
                        "VM {handle}: MMIO exit at {:#x}, outside its window",
                        d[0]
                    );
                }
                self.vms[i].answer = [self.rng.next(), 0, 0, 0];
            }
            Some(ExitReason::Wfi | ExitReason::Interrupt) => {}
            Some(other) => violation!(
                self,
                "VM {handle}'s chaos guest ended: {other:?} {:#x}",
                d[0]
            ),
            None => violation!(self, "VCPU_RUN of VM {handle}: unknown exit {:#x}", regs[0]),
        }
    }

    /// Checks one action the guest reported against the model of its window.
    fn guest_report(&mut self, i: usize, [action, ipa, result, before]: [u64; 4]) {
        self.counts[15] += 1;
        self.guest_reports += 1;
        let v = &self.vms[i];
        let handle = v.handle;
        let k = ipa.wrapping_sub(p::CHAOS_WINDOW_IPA) / PAGE;
        let in_window = ipa >= p::CHAOS_WINDOW_IPA && k < p::CHAOS_WINDOW_PAGES;
        let window_pa = if in_window { self.mapped(i, ipa) } else { None };
        let mapped = window_pa.is_some();
        let was_shared = in_window && before & (1 << k) != 0;
        let code = Code(result);
        let expect = |mapped: bool| -> Option<&[_]> {
            match action {
                p::CHAOS_SHARE if !mapped => Some(&[INVALID]),
                p::CHAOS_SHARE if was_shared => Some(&[DENIED, RETRY]),
                p::CHAOS_SHARE => Some(&[OK, NO_MEMORY, RETRY]),
                p::CHAOS_UNSHARE if !mapped => Some(&[INVALID]),
                p::CHAOS_UNSHARE if !was_shared => Some(&[DENIED, RETRY]),
                p::CHAOS_UNSHARE => Some(&[OK, NO_MEMORY, RETRY]),
                p::CHAOS_SHARE_STRADDLE => Some(&[INVALID, DENIED, RETRY]),
                p::CHAOS_SHARE_FOREIGN => Some(&[INVALID]),
                _ => None,
            }
        };
        // A page given since the last report may have been unmapped when
        // the guest acted: either answer is right, this once.
        let donated_since = in_window && v.donated_since_report & (1 << k) != 0;
        self.vms[i].donated_since_report = 0;
        let allowed = |c: Code| match (expect(mapped), donated_since.then(|| expect(!mapped))) {
            (None, _) => true,
            (Some(e), None) => one_of(c, e),
            (Some(e), Some(other)) => one_of(c, e) || other.is_some_and(|o| one_of(c, o)),
        };
        if !allowed(code) {
            violation!(
                self,
                "VM {handle}'s guest: action {action} on IPA {ipa:#x} returned {code} (window page mapped: {mapped}, shared before: {was_shared})"
            );
        }
        if action == p::CHAOS_SHARE && code.ok() {
            // Shared with us: readable, and holding the guest's mark unless
            // another CPU has run the guest since and it unshared the page.
            let pa = window_pa.unwrap_or(0);
            let cpu = self.cpu;
            let (w, fault) = guarded(cpu, || read_word(pa));
            if fault.is_none() && w != p::chaos_mark(ipa) {
                violation!(
                    self,
                    "VM {handle} shared window page {ipa:#x} (PA {pa:#x}): the host reads {w:#x}, not the guest's mark"
                );
            }
        }
        self.vms[i].answer = [0, 0, 0, 0];
    }

    fn op_destroy(&mut self) {
        let (handle, index) = self.draw_handle();
        let Some(i) = index else {
            let r = destroy(handle);
            if !r.is(Error::InvalidParameters) {
                violation!(self, "VM_DESTROY of bad handle {handle:#x} = {r}");
            }
            self.refused += 1;
            return;
        };
        // Destroy seldom: VMs should live long enough to do things.
        if self.vms[i].status != Status::Dying
            && self.vms.len() < self.vm_limit()
            && !self.rng.one_in(3)
        {
            return;
        }
        self.unpublish(handle);
        let r = destroy(handle);
        let v = self.vms[i].clone();
        let expect: &[_] = if v.status == Status::Dying {
            &[DENIED]
        } else {
            &[OK]
        };
        if !one_of(r, expect) {
            violation!(self, "VM_DESTROY of VM {handle} = {r}");
        }
        self.tally(r);
        if r.ok() {
            if v.pages == 0 {
                self.forget_vm(i);
            } else {
                self.vms[i].status = Status::Dying;
            }
        }
    }

    /// Drops VM `i` from the model (its slot is free in the core), and
    /// renumbers the pages of the VMs after it.
    fn forget_vm(&mut self, i: usize) {
        self.vms.remove(i);
        for s in self.pages.iter_mut() {
            if let PageState::Vm { vm, .. } = s
                && usize::from(*vm) > i
            {
                *vm -= 1;
            }
        }
    }

    fn op_reclaim(&mut self) {
        let (handle, index) = self.draw_handle();
        let mut d = self.draw_range();
        // Often exactly a donation of a dying VM: reclaims must succeed too.
        if let Some(i) = index
            && self.vms[i].status == Status::Dying
            && self.rng.below(3) != 0
            && let Some(start) = self
                .pages
                .iter()
                .position(|s| matches!(s, PageState::Vm { vm, .. } if usize::from(*vm) == i))
        {
            let mut end = start;
            while end < REGION_PAGES as usize
                && end - start < 64
                && matches!(self.pages[end], PageState::Vm { vm, .. } if usize::from(vm) == i)
            {
                end += 1;
            }
            d = Drawn {
                pa: self.pa(start),
                pages: (end - start) as u64,
                inside: Some((start, end)),
                malformed: false,
            };
        }
        let r = reclaim(handle, d.pa, d.pages);
        let expect: &[_] = match index {
            _ if d.malformed => &[INVALID],
            None => &[INVALID],
            Some(i) if self.vms[i].status != Status::Dying => &[DENIED],
            Some(i)
                if self.all(
                    &d,
                    |s| matches!(s, PageState::Vm { vm, .. } if usize::from(vm) == i),
                ) =>
            {
                &[OK]
            }
            Some(_) if d.inside.is_some() => &[DENIED],
            Some(_) => &[DENIED, INVALID],
        };
        if !one_of(r, expect) {
            violation!(
                self,
                "VM_RECLAIM(handle {handle:#x}, {:#x}, {}) = {r}",
                d.pa,
                d.pages
            );
        }
        self.tally(r);
        if r.ok()
            && let (Some(i), Some((a, b))) = (index, d.inside)
        {
            self.took_back(i, a, b);
        }
    }

    /// Pages `[a, b)` came back from VM `i`: they must read as zero.
    fn took_back(&mut self, i: usize, a: usize, b: usize) {
        for k in a..b {
            let pa = self.pa(k);
            let words: &[u64] = if b - a <= 8 {
                &[0, 1, 255, 511]
            } else {
                &[0, 511]
            };
            for &w in words {
                let v = read_word(pa + w * 8);
                if v != 0 {
                    violation!(
                        self,
                        "reclaimed page {pa:#x} word {w} reads {v:#x}, not zero"
                    );
                }
            }
            self.pages[k] = PageState::Host { shared: false };
            self.restamp(k);
        }
        let v = &mut self.vms[i];
        v.pages -= (b - a) as u64;
        if v.pages == 0 {
            self.forget_vm(i);
        }
    }

    fn op_touch(&mut self) {
        let k = self.rng.below(REGION_PAGES) as usize;
        let pa = self.pa(k) + 8 * (1 + self.rng.below(511));
        let cpu = self.cpu;
        match self.pages[k] {
            PageState::Host { .. } => {
                let v = self.rng.next();
                let (back, fault) = guarded(cpu, || {
                    write_word(pa, v);
                    read_word(pa)
                });
                if fault.is_some() || back != v {
                    violation!(
                        self,
                        "the host's own page {pa:#x}: wrote {v:#x}, read {back:#x} (fault {fault:?})"
                    );
                }
            }
            PageState::Vm { vm, ipa } => {
                let window = in_window(ipa);
                let write = self.rng.one_in(2);
                let (_, fault) = guarded(cpu, || {
                    if write {
                        write_word(pa, 0xbad)
                    } else {
                        let _ = read_word(pa);
                    }
                });
                let _ = vm;
                // A window page may be shared with us by its guest.
                if !window && !fault.is_some_and(is_sea) {
                    violation!(
                        self,
                        "{} of page {pa:#x}, donated to a VM at IPA {ipa:#x}: no synchronous external abort ({fault:?})",
                        if write { "write" } else { "read" }
                    );
                }
            }
        }
    }

    fn op_mte(&mut self) {
        let cpu = self.cpu;
        let (_, fault) = guarded(cpu, || {
            let v: u64;
            // SAFETY: reads GCR_EL1; with the host's MTE policy off it is an
            // Undefined Instruction the armed handler skips.
            unsafe { core::arch::asm!("mov {v}, xzr", "mrs {v}, s3_0_c1_c0_6", v = out(reg) v) };
            v
        });
        let works = world(|w| w.mte_regs_work);
        if works != fault.is_none() || fault.is_some_and(|e| e != 0x0200_0000) {
            violation!(
                self,
                "mrs gcr_el1: {fault:?}, but the policy's answer at the start was {}",
                if works { "allowed" } else { "UNDEFINED" }
            );
        }
    }

    fn op_psci(&mut self) {
        let (mpidrs, cpus) = world(|w| (w.mpidrs, w.cpus));
        let me = mpidrs[self.cpu];
        let entry = secondary_start as *const () as u64;
        let (what, r, want) = match self.rng.below(4) {
            0 => (
                "CPU_ON of this CPU",
                hvc(smccc::psci::PSCI_CPU_ON_64, [me, entry, 0])[0] as i64,
                -4,
            ),
            1 => (
                "CPU_ON of no CPU",
                hvc(smccc::psci::PSCI_CPU_ON_64, [0xff_ff00, entry, 0])[0] as i64,
                -2,
            ),
            2 => {
                let other = mpidrs[self.rng.below(cpus as u64) as usize];
                // Running CPUs: every fuzzing CPU is on until all are done.
                if FINISHED.load(Ordering::SeqCst) != 0 {
                    return;
                }
                (
                    "CPU_ON of a running CPU",
                    hvc(smccc::psci::PSCI_CPU_ON_64, [other, entry, 0])[0] as i64,
                    -4,
                )
            }
            _ => (
                "AFFINITY_INFO of this CPU",
                hvc(smccc::psci::PSCI_AFFINITY_INFO_64, [me, 0, 0])[0] as i64,
                0,
            ),
        };
        if r != want {
            violation!(self, "PSCI {what} = {r}, expected {want}");
        }
    }

    fn op_null(&mut self) {
        let r = hvc(hypercall::NULL, [0; 3])[0];
        let u = hvc(hypercall::id(0x0ff0), [self.rng.next(), 0, 0])[0];
        if r != 0 || u != ids::NOT_SUPPORTED {
            violation!(self, "NULL = {r:#x}, unknown call = {u:#x}");
        }
    }

    /// Calls on other CPUs' VMs: runs of published VMs (any exit, or Busy
    /// while their owner runs them), and calls that must fail whoever runs
    /// what: reclaiming our pages through their handles, donating pages we
    /// gave away or shared.
    fn op_foreign(&mut self) {
        let slot = self.rng.below(abi::MAX_VMS as u64) as usize;
        let ours = |h: u64| self.vms.iter().any(|v| v.handle == h);
        USERS[slot].fetch_add(1, Ordering::SeqCst);
        let handle = PUBLISHED[slot].load(Ordering::SeqCst);
        if handle == 0 || ours(handle) {
            USERS[slot].fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let k = self.rng.below(REGION_PAGES) as usize;
        let pa = self.pa(k);
        let r = match self.rng.below(3) {
            0 => {
                let (r, regs) = vcpu_run_once(handle, [0; 4]);
                let reason = ExitReason::from_u64(regs[0]);
                if r.ok()
                    && matches!(
                        reason,
                        None | Some(ExitReason::Shutdown | ExitReason::Crashed)
                    )
                {
                    USERS[slot].fetch_sub(1, Ordering::SeqCst);
                    violation!(
                        self,
                        "a run of another CPU's VM {handle} ended it: {reason:?} {:#x}",
                        regs[1]
                    );
                }
                if r.ok() && reason == Some(ExitReason::Hvc) && regs[1] == u64::from(p::FAULT) {
                    USERS[slot].fetch_sub(1, Ordering::SeqCst);
                    violation!(
                        self,
                        "another CPU's VM {handle}'s guest faulted (ESR_EL1 {:#x})",
                        regs[2]
                    );
                }
                if !one_of(r, &[OK, BUSY]) {
                    USERS[slot].fetch_sub(1, Ordering::SeqCst);
                    violation!(self, "VCPU_RUN of another CPU's live VM {handle} = {r}");
                }
                r
            }
            1 => {
                let r = reclaim(handle, pa, 1);
                if !one_of(r, &[DENIED]) {
                    USERS[slot].fetch_sub(1, Ordering::SeqCst);
                    violation!(
                        self,
                        "VM_RECLAIM of our page {pa:#x} through another CPU's VM {handle} = {r}"
                    );
                }
                r
            }
            _ => {
                if self.pages[k] == (PageState::Host { shared: false }) {
                    USERS[slot].fetch_sub(1, Ordering::SeqCst);
                    return;
                }
                let ipa = RANDOM_IPA_BASE + 0x1000_0000 + self.rng.below(1024) * PAGE;
                let r = donate(handle, pa, 1, ipa);
                if !one_of(r, &[DENIED, BUSY, INVALID]) {
                    USERS[slot].fetch_sub(1, Ordering::SeqCst);
                    violation!(
                        self,
                        "VM_DONATE of our given-away page {pa:#x} to another CPU's VM {handle} = {r}"
                    );
                }
                r
            }
        };
        USERS[slot].fetch_sub(1, Ordering::SeqCst);
        self.tally(r);
    }

    /// Gives a chaos guest one of its window pages, so its actions there
    /// start to succeed.
    fn op_window(&mut self) {
        let Some(i) =
            (!self.vms.is_empty()).then(|| self.rng.below(self.vms.len() as u64) as usize)
        else {
            return;
        };
        let v = self.vms[i].clone();
        let Some(w) = (0..p::CHAOS_WINDOW_PAGES)
            .find(|w| self.mapped(i, p::CHAOS_WINDOW_IPA + w * PAGE).is_none())
        else {
            return;
        };
        if v.status != Status::Alive || v.phase == Phase::Bare {
            return;
        }
        let Some(at) = self.free_run(1) else { return };
        let ipa = p::CHAOS_WINDOW_IPA + w * PAGE;
        let r = donate(v.handle, self.pa(at), 1, ipa);
        if !one_of(r, &[OK, NO_MEMORY, BUSY]) {
            violation!(
                self,
                "VM_DONATE of window page {ipa:#x} to VM {} = {r}",
                v.handle
            );
        }
        self.tally(r);
        if r.ok() {
            let mut v = v;
            self.record_donation(&mut v, at, 1, ipa);
            self.vms[i] = v;
        }
    }

    /// After every step: every page we own holds its stamp, and one page we
    /// gave away (outside a chaos window) aborts.
    fn verify(&mut self, sweep: bool) {
        // Every page on a sweep; between sweeps a sample (a full pass over
        // 1024 pages on every step would cost more than the step itself).
        let sample = self.rng.below(REGION_PAGES) as usize;
        let pages = if sweep {
            0..REGION_PAGES as usize
        } else {
            sample..(sample + VERIFY_SAMPLE).min(REGION_PAGES as usize)
        };
        for k in pages {
            if let PageState::Host { .. } = self.pages[k] {
                let pa = self.pa(k);
                let v = read_word(pa);
                if v != self.stamp[k] {
                    violation!(
                        self,
                        "the host's page {pa:#x} changed: its first word reads {v:#x}, not {:#x}",
                        self.stamp[k]
                    );
                }
            }
        }
        let k = self.rng.below(REGION_PAGES) as usize;
        if let PageState::Vm { ipa, .. } = self.pages[k]
            && !in_window(ipa)
        {
            let pa = self.pa(k);
            let cpu = self.cpu;
            let (_, fault) = guarded(cpu, || read_word(pa));
            if !fault.is_some_and(is_sea) {
                violation!(
                    self,
                    "read of donated page {pa:#x} did not abort ({fault:?})"
                );
            }
        }
    }

    /// Ends every VM and takes every page back; unshares what is shared.
    fn teardown(&mut self) {
        while let Some(v) = self.vms.first().cloned() {
            self.unpublish(v.handle);
            if v.status != Status::Dying {
                // An Interrupt-free stop: the guest is not running (only
                // this CPU runs it now).
                let r = destroy(v.handle);
                if !r.ok() {
                    violation!(self, "teardown: VM_DESTROY of VM {} = {r}", v.handle);
                }
                if v.pages == 0 {
                    self.forget_vm(0);
                    continue;
                }
                self.vms[0].status = Status::Dying;
            }
            let mut k = 0;
            while k < REGION_PAGES as usize {
                if matches!(self.pages[k], PageState::Vm { vm: 0, .. }) {
                    let r = reclaim(v.handle, self.pa(k), 1);
                    if !r.ok() {
                        violation!(
                            self,
                            "teardown: VM_RECLAIM of {:#x} from VM {} = {r}",
                            self.pa(k),
                            v.handle
                        );
                    }
                    self.took_back(0, k, k + 1);
                    if self.vms.first().is_none_or(|f| f.handle != v.handle) {
                        break;
                    }
                }
                k += 1;
            }
            if self.vms.first().is_some_and(|f| f.handle == v.handle) {
                violation!(
                    self,
                    "teardown: VM {} holds pages the model cannot find",
                    v.handle
                );
            }
        }
        for k in 0..REGION_PAGES as usize {
            if self.pages[k] == (PageState::Host { shared: true }) {
                let r = unshare_hyp(self.pa(k), 1);
                if !r.ok() {
                    violation!(
                        self,
                        "teardown: HOST_UNSHARE_HYP of {:#x} = {r}",
                        self.pa(k)
                    );
                }
                self.pages[k] = PageState::Host { shared: false };
            }
        }
        self.verify(true);
    }
}

fn checker(m: &mut Model) {
    m.counts[14] += 1;
    let v = check_consistency();
    if v != 0 {
        violation!(m, "the core's consistency checker = {}", Code(v));
    }
}

/// Times the ledger was restarted.
static LEDGER_RESTARTS: AtomicU64 = AtomicU64::new(0);

/// Kills the ledger mid-run: the core restarts it and rebuilds its state;
/// every CPU's calls meanwhile are answered `Retry` and issued again. The
/// call itself answers 0 (back already) or `Retry` (the rebuild waits for
/// a VM another CPU is running).
fn restart_ledger(m: &mut Model) {
    let r = Code(hvc(hypercall::LEDGER_RESTART, [0; 3])[0]);
    if !(r.ok() || r.is(Error::Retry)) {
        violation!(m, "LEDGER_RESTART = {r}");
    }
    LEDGER_RESTARTS.fetch_add(1, Ordering::SeqCst);
}

/// The CPUs' models: statics, as they are larger than a CPU's stack.
static MODELS: [Mutex<Model>; MAX_CPUS] = [const { Mutex::new(Model::EMPTY) }; MAX_CPUS];

/// One CPU's whole run.
fn worker(cpu: usize) {
    let (params, base, cpus) = world(|w| (w.params, w.regions[cpu], w.cpus));
    let mut guard = MODELS[cpu].lock();
    let m = &mut *guard;
    m.cpu = cpu;
    m.base = base;
    m.rng = Rng::new(params.seed, cpu as u64);
    m.stress = params.stress;
    for k in 0..REGION_PAGES as usize {
        m.restamp(k);
    }
    STARTED.fetch_add(1, Ordering::SeqCst);
    while STARTED.load(Ordering::SeqCst) < cpus as u64 && !FAILED.load(Ordering::SeqCst) {
        core::hint::spin_loop();
    }
    for step in 1..=params.steps_per_cpu {
        if FAILED.load(Ordering::Relaxed) {
            break;
        }
        m.step = step;
        m.step();
        if FAILED.load(Ordering::Relaxed) {
            break;
        }
        if cpu == 0
            && let Some(every) = params.restart_every
            && step % every == 0
        {
            restart_ledger(m);
            if FAILED.load(Ordering::Relaxed) {
                break;
            }
        }
        let sweep = step % params.check_every == 0;
        m.verify(sweep);
        if sweep {
            checker(m);
        }
        TOTAL_STEPS.fetch_add(1, Ordering::Relaxed);
    }
    FINISHED.fetch_add(1, Ordering::SeqCst);
    // Nobody tears down while others may still run its VMs.
    while FINISHED.load(Ordering::SeqCst) < cpus as u64 {
        core::hint::spin_loop();
    }
    if !FAILED.load(Ordering::SeqCst) {
        m.step = params.steps_per_cpu + 1;
        m.teardown();
    }
    let mut counts = heapless::String::<256>::new();
    for (name, n) in OP_NAMES.iter().zip(m.counts) {
        let _ = write!(counts, " {name} {n}");
    }
    say!(
        "fuzz: cpu {cpu} did {} step(s), {} refused as predicted, {} contended, {} guest report(s) checked:{counts}",
        m.step.min(params.steps_per_cpu),
        m.refused,
        m.contended,
        m.guest_reports
    );
    SUCCEEDED.fetch_add(m.succeeded, Ordering::SeqCst);
    FINISHED.fetch_add(1, Ordering::SeqCst);
}

/// A secondary CPU started for the fuzzer: runs its part. Returns whether it did.
pub fn secondary(index: u64) -> bool {
    if !ACTIVE.load(Ordering::SeqCst) {
        return false;
    }
    let me = sysreg!("mpidr_el1") & 0xff_00ff_ffff;
    let cpu = MPIDRS.iter().position(|m| m.load(Ordering::SeqCst) == me);
    match cpu {
        Some(cpu) if cpu as u64 == index => worker(cpu),
        _ => say!("fuzz: CPU {index} is not one of the fuzzing CPUs"),
    }
    true
}

/// Runs the random hostile host if the command line asks for it; returns
/// whether it did.
pub(super) fn run_if_asked(
    c: &mut Checks,
    platform: &Platform<'_>,
    dtb: &[u8],
    bootargs: &str,
) -> bool {
    let Some(params) = parse(bootargs) else {
        return false;
    };
    let cpus = platform.cpus.len().min(MAX_CPUS);
    let me = sysreg!("mpidr_el1") & 0xff_00ff_ffff;
    // The boot CPU is fuzzer 0.
    let mut mpidrs = [u64::MAX; MAX_CPUS];
    mpidrs[0] = me;
    let mut n = 1;
    let mut logical = [0usize; MAX_CPUS];
    for (i, cpu) in platform.cpus.iter().enumerate() {
        if cpu.mpidr != me && n < cpus {
            mpidrs[n] = cpu.mpidr;
            logical[n] = i;
            n += 1;
        }
    }
    for (slot, m) in MPIDRS.iter().zip(mpidrs) {
        slot.store(m, Ordering::SeqCst);
    }
    let steps_total = params.steps_per_cpu;
    let params = Params {
        steps_per_cpu: steps_total.div_ceil(cpus as u64),
        ..params
    };
    say!(
        "fuzz: seed {:#x}, {steps_total} step(s) over {cpus} CPU(s), checker every {} step(s){}",
        params.seed,
        params.check_every,
        if params.stress { ", SMP stress" } else { "" }
    );

    // Regions: 8 MiB blocks, the middle 4 MiB used, a guard page either side.
    let mut ram = Ram::new(platform, dtb);
    let mut regions = [0; MAX_CPUS];
    for r in regions.iter_mut().take(cpus) {
        let Some(block) = ram.take(2048, 2 << 20) else {
            c.check(false, format_args!("fuzz: 8 MiB of free RAM per CPU"));
            return true;
        };
        *r = block + (2 << 20);
    }
    let ram_end = platform.memory.iter().map(Range::end).max().unwrap_or(0);
    // The policy's answer for the host's MTE registers, once.
    TAKEN[0].store(0, Ordering::SeqCst);
    ACTIVE.store(true, Ordering::SeqCst);
    let (_, fault) = guarded(0, || {
        let v: u64;
        // SAFETY: reads GCR_EL1 (see `op_mte`).
        unsafe { core::arch::asm!("mov {v}, xzr", "mrs {v}, s3_0_c1_c0_6", v = out(reg) v) };
        v
    });
    // The sentinel: a VM that holds every guard page and never runs (a
    // stress run draws no range that reaches a guard page, and leaves the
    // sentinel's slot to the CPUs' VMs).
    let sentinel = if params.stress {
        0
    } else {
        let (r, sentinel) = vm_create(p::BASE_IPA, 0);
        c.check(r.ok(), format_args!("fuzz: sentinel VM created ({r})"));
        if !r.ok() {
            return true;
        }
        sentinel
    };
    for (i, base) in regions
        .iter()
        .take(if sentinel == 0 { 0 } else { cpus })
        .enumerate()
    {
        for (j, guard) in [base - PAGE, base + REGION_PAGES * PAGE]
            .into_iter()
            .enumerate()
        {
            let r = donate(sentinel, guard, 1, SENTINEL_IPA + (2 * i + j) as u64 * PAGE);
            c.check(
                r.ok(),
                format_args!(
                    "fuzz: guard page {guard:#x} of CPU {i}'s region given to the sentinel ({r})"
                ),
            );
        }
    }
    *WORLD.lock() = Some(World {
        params,
        cpus,
        regions,
        mpidrs,
        ram_end,
        carve_out: hypervisor_region(dtb),
        mte_regs_work: fault.is_none(),
    });
    let entry = secondary_start as *const () as u64;
    for cpu in 1..cpus {
        let v = hvc(
            smccc::psci::PSCI_CPU_ON_64,
            [mpidrs[cpu], entry, cpu as u64],
        )[0] as i64;
        c.check(
            v == 0,
            format_args!(
                "fuzz: CPU_ON of fuzzing CPU {cpu} (logical {}) = {v}",
                logical[cpu]
            ),
        );
    }
    let start = sysreg!("cntvct_el0");
    worker(0);
    // Each worker counts itself twice: done stepping, done reporting.
    while FINISHED.load(Ordering::SeqCst) < 2 * cpus as u64 {
        core::hint::spin_loop();
    }
    let ticks = sysreg!("cntvct_el0") - start;
    let failed = FAILED.load(Ordering::SeqCst);
    let (ops, succeeded) = (
        TOTAL_STEPS.load(Ordering::SeqCst),
        SUCCEEDED.load(Ordering::SeqCst),
    );
    let ms = ticks * 1000 / sysreg!("cntfrq_el0").max(1);
    say!(
        "fuzz: {ops} operation(s) ({succeeded} succeeded) over {cpus} CPU(s) in {ms} ms of the generic timer: {} per second (information only)",
        ops * 1000 / ms.max(1)
    );
    if !failed && sentinel != 0 {
        let d = destroy(sentinel);
        let mut back = d.ok();
        for (i, base) in regions.iter().take(cpus).enumerate() {
            for guard in [base - PAGE, base + REGION_PAGES * PAGE] {
                let r = reclaim(sentinel, guard, 1);
                back &= r.ok();
                if !r.ok() {
                    say!("fuzz: reclaiming guard page {guard:#x} of CPU {i} = {r}");
                }
            }
        }
        c.check(
            back,
            format_args!("fuzz: the sentinel destroyed and its guard pages reclaimed ({d})"),
        );
    }
    if let Some(every) = params.restart_every {
        let restarts = LEDGER_RESTARTS.load(Ordering::SeqCst);
        say!(
            "fuzz: the ledger was restarted {restarts} time(s) mid-run (every {every} step(s) of CPU 0); {} call(s) were answered Retry and issued again",
            RETRIED.load(Ordering::SeqCst)
        );
        c.check(
            restarts > 0,
            format_args!("fuzz: the ledger was killed and came back during the run"),
        );
    }
    if !failed {
        let v = check_consistency();
        c.check(
            v == 0,
            format_args!(
                "fuzz: the consistency checker agrees at the end ({})",
                Code(v)
            ),
        );
    }
    let total = TOTAL_STEPS.load(Ordering::SeqCst);
    c.check(
        !failed,
        format_args!(
            "fuzz: seed {:#x}: {total} step(s) over {cpus} CPU(s), {}",
            params.seed,
            if failed {
                "a violation (above)"
            } else {
                "no violation"
            }
        ),
    );
    ACTIVE.store(false, Ordering::SeqCst);
    true
}
