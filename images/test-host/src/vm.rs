//! Protected VMs, from the host's side.
//!
//! The demo gives a VM 16 pages of the host's RAM, loads the guest
//! (`images/guest`) into it and runs it, answering its exits: the guest says
//! hello, exchanges messages with the host through a page it shares, tries
//! to share a page that is not its own, unshares its page (after which the
//! host's read of it must abort), touches memory outside its stage-2 (MMIO
//! exits the host answers), reads the tag of a page the host tagged before
//! donating it (MTE VMs), waits for an interrupt and powers off. The host
//! then destroys the VM and takes its pages back, zeroed.
//!
//! The MTE probes run the guest in a VM without MTE and in one with it: the
//! first must see no MTE (ID registers, an Undefined Instruction exception
//! for every MTE system register, tags that read zero even when it maps its
//! memory Tagged), the second must keep its MTE registers across exits while
//! the host keeps its own. Another guest powers off with a page still shared
//! with the host, which must get every page back whole.
//!
//! The hostile cases are a host misbehaving: touching donated pages, giving
//! away what it does not own or twice, taking back what it never gave or
//! from a VM that is alive or running, racing another CPU for the same pages,
//! and driving VMs that are gone. Each must come back refused with an exact
//! error, and the ledger must agree with the host's stage-2 after every
//! scenario (`CHECK_CONSISTENCY`).
//!
//! With `moat.rogue_ledger` on its command line (the image
//! `images/rogue-ledger.toml`, whose ledger lies about chosen requests) the
//! host runs only the rogue-ledger scenario: every lie refused, nothing
//! changed, and honest answers still working.

use super::{
    CONSOLE, Checks, EXCEPTIONS, EXPECT, Expect, LAST_ESR, LAST_FAR, PMU_EL1_AND_EL2, hvc, hvc6,
    hypervisor_region, read_u64, secondary_start, write_u64,
};
use core::fmt::{self, Write as _};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use moat_abi::vm::{self as abi, Exit, ExitReason, MmioAccess, VmFlags};
use moat_abi::{Error, hypercall, smccc as ids};
use moat_platform::dt::{Platform, Range};

#[path = "cpu_attacks.rs"]
mod cpu_attacks;
#[path = "interrupt_attacks.rs"]
mod interrupt_attacks;
#[path = "its_attacks.rs"]
mod its_attacks;
#[path = "../../guest/src/protocol.rs"]
mod protocol;

mod attack;
mod dma;
mod fuzz;
use protocol as p;

pub(super) use fuzz::exception as fuzz_exception;

/// The guest's raw binary, linked at [`p::BASE_IPA`]; empty when the test
/// host was built without `MOAT_GUEST_BIN`.
static GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/guest.bin"));

const PAGE: u64 = p::PAGE_SIZE;
/// The host's reply, written into the guest's shared page.
const REPLY: &[u8] = b"hello guest, the host read your message";
/// What the host's MMIO "device" returns to the guest's read.
const MMIO_ANSWER: u64 = 0x1122_3344_5566_7788;
/// The tag the host stores on the page it donates to an MTE VM.
const HOST_TAG: u64 = 0xa;
/// Spin-loop iterations before a wait for another CPU gives up.
const PATIENCE: u64 = 400_000_000;

unsafe extern "C" {
    fn _start();
    static __image_end: u8;
}

/// A call's x0, shown as the error it names.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Code(u64);

impl Code {
    fn is(self, e: Error) -> bool {
        self.0 == e.to_x0()
    }
    fn ok(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for Code {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Error::from_x0(self.0) {
            Some(Ok(())) => write!(f, "0"),
            Some(Err(e)) => write!(f, "{e:?} ({})", e.code()),
            None => write!(f, "{:#x}", self.0),
        }
    }
}

/// Calls answered `Retry` (the ledger was being restarted) and issued again.
static RETRIED: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

/// A Moat call, issued again for as long as the core answers `Retry`: the
/// ledger is being rebuilt and nothing was done, as a VMM does.
fn call(function: u32, args: [u64; 6]) -> [u64; 8] {
    loop {
        let r = hvc6(function, args);
        if r[0] != Error::Retry.to_x0() {
            return r;
        }
        RETRIED.fetch_add(1, core::sync::atomic::Ordering::Relaxed);
        // A moment before the next try, as a VMM would yield: a storm of
        // calls would only slow the CPU rebuilding the ledger.
        for _ in 0..20_000 {
            core::hint::spin_loop();
        }
    }
}

/// `CHECK_CONSISTENCY`, issued again while the ledger is being rebuilt.
fn check_consistency() -> u64 {
    call(hypercall::CHECK_CONSISTENCY, [0; 6])[0]
}

fn vm_create(entry: u64, flags: u64) -> (Code, u64) {
    let r = call(abi::VM_CREATE, [entry, flags, 0, 0, 0, 0]);
    (Code(r[0]), r[1])
}

fn donate(handle: u64, pa: u64, pages: u64, ipa: u64) -> Code {
    Code(call(abi::VM_DONATE, [handle, pa, pages, ipa, 0, 0])[0])
}

fn reclaim(handle: u64, pa: u64, pages: u64) -> Code {
    Code(call(abi::VM_RECLAIM, [handle, pa, pages, 0, 0, 0])[0])
}

fn destroy(handle: u64) -> Code {
    Code(call(abi::VM_DESTROY, [handle, 0, 0, 0, 0, 0])[0])
}

fn share_hyp(pa: u64, pages: u64) -> Code {
    Code(call(abi::HOST_SHARE_HYP, [pa, pages, 0, 0, 0, 0])[0])
}

fn unshare_hyp(pa: u64, pages: u64) -> Code {
    Code(call(abi::HOST_UNSHARE_HYP, [pa, pages, 0, 0, 0, 0])[0])
}

fn load(handle: u64, ipa: u64, src: u64, bytes: u64) -> Code {
    Code(call(abi::VM_LOAD, [handle, ipa, src, bytes, 0, 0])[0])
}

/// `VCPU_RUN` with the answer to the previous exit: x0 and the exit. An
/// `Interrupt` exit is run through, as a VMM does: this host keeps its
/// interrupts masked, so such an exit is the core's backstop (a run lasts
/// 10 ms at most) or an interrupt a case does not look at. Cases that look
/// at `Interrupt` exits use [`vcpu_run_once`].
fn vcpu_run(handle: u64, answer: [u64; 4]) -> (Code, [u64; 7]) {
    let mut answer = answer;
    loop {
        let (r, regs) = vcpu_run_once(handle, answer);
        if !(r.ok() && regs[0] == ExitReason::Interrupt as u64) {
            return (r, regs);
        }
        // An Interrupt exit consumes no answer.
        answer = [0; 4];
    }
}

/// One `VCPU_RUN`, whatever exit ends it.
fn vcpu_run_once(handle: u64, answer: [u64; 4]) -> (Code, [u64; 7]) {
    let r = call(
        abi::VCPU_RUN,
        [handle, answer[0], answer[1], answer[2], answer[3], 0],
    );
    let mut regs = [0; 7];
    regs.copy_from_slice(&r[1..]);
    (Code(r[0]), regs)
}

fn consistent(c: &mut Checks, after: &str) {
    let v = hvc(hypercall::CHECK_CONSISTENCY, [0; 3])[0];
    c.check(
        v == 0,
        format_args!(
            "vm: the ledger and the host's stage-2 agree after {after} ({})",
            Code(v)
        ),
    );
}

/// Pages of the host's own RAM nobody else uses, taken from the top down:
/// never the test host's image, stacks and tables, its device tree, or any
/// reserved region (the hypervisor's carve-out among them).
struct Ram {
    banks: heapless::Vec<Range, 8>,
    avoid: heapless::Vec<Range, 24>,
    top: u64,
}

impl Ram {
    fn new(platform: &Platform<'_>, dtb: &[u8]) -> Self {
        let mut avoid = heapless::Vec::new();
        let image_start = _start as *const () as u64;
        let image_end = core::ptr::addr_of!(__image_end) as u64;
        let dtb_start = dtb.as_ptr() as u64;
        let own = [
            Range::new(image_start, image_end - image_start),
            Range::new(dtb_start & !(PAGE - 1), dtb.len() as u64 + PAGE),
            platform.chosen.initrd,
            hypervisor_region(dtb),
        ];
        for r in own
            .into_iter()
            .flatten()
            .chain(platform.reserved.iter().copied())
        {
            let _ = avoid.push(r);
        }
        let banks: heapless::Vec<Range, 8> = platform.memory.iter().copied().take(8).collect();
        let top = banks.last().map_or(0, Range::end);
        Self { banks, avoid, top }
    }

    /// `pages` pages aligned to `align` bytes, below everything taken so far.
    fn take(&mut self, pages: u64, align: u64) -> Option<u64> {
        let size = pages.checked_mul(PAGE)?;
        let mut top = self.top;
        loop {
            let bank = self.banks.iter().rev().find(|b| b.base < top)?;
            let base = top.min(bank.end()).checked_sub(size)? & !(align - 1);
            if base < bank.base {
                top = bank.base;
                continue;
            }
            let r = Range { base, size };
            match self
                .avoid
                .iter()
                .filter(|a| a.overlaps(&r))
                .map(|a| a.base)
                .min()
            {
                Some(b) => top = b,
                None => {
                    self.top = base;
                    return Some(base);
                }
            }
        }
    }

    /// The last page of RAM.
    fn last_page(&self) -> u64 {
        self.banks.last().map_or(0, |b| b.end() - PAGE)
    }
}

/// Runs `access` expecting one synchronous external abort (a data abort
/// from the current EL, EC 0x25, DFSC 0x10) at an address in
/// `[far_from, far_to)`; `write` also checks ESR.WnR.
fn expect_abort(
    c: &mut Checks,
    what: fmt::Arguments<'_>,
    far_from: u64,
    far_to: u64,
    write: Option<bool>,
    access: impl FnOnce(),
) {
    EXCEPTIONS.store(0, Ordering::SeqCst);
    EXPECT.store(Expect::SkipInstruction as u64, Ordering::SeqCst);
    access();
    let taken = EXCEPTIONS.load(Ordering::SeqCst);
    EXPECT.store(Expect::Nothing as u64, Ordering::SeqCst);
    let (esr, far) = if taken == 0 {
        (0, 0)
    } else {
        (
            LAST_ESR.load(Ordering::SeqCst),
            LAST_FAR.load(Ordering::SeqCst),
        )
    };
    let wnr = (esr >> 6) & 1 == 1;
    c.check(
        taken == 1
            && esr >> 26 == 0x25
            && esr & 0x3f == 0x10
            && (far_from..far_to).contains(&far)
            && write.is_none_or(|w| w == wnr),
        format_args!(
            "{what}: synchronous external abort ({taken} exception(s), ESR_EL1 {esr:#x}, FAR_EL1 {far:#x})"
        ),
    );
}

fn stg(addr: u64, tag: u64) {
    // SAFETY: a tag store to a granule: our own memory, or a donated page
    // where the abort is expected and the handler skips the instruction.
    unsafe {
        core::arch::asm!(".arch_extension memtag", "stg {t}, [{a}]",
            a = in(reg) addr, t = in(reg) addr | (tag << 56), options(nostack));
    }
}

fn ldg(addr: u64) -> u64 {
    let out: u64;
    // SAFETY: as for `stg`; LDG reads only the granule's tag.
    unsafe {
        core::arch::asm!(".arch_extension memtag", "ldg {o}, [{a}]",
            a = in(reg) addr, o = inout(reg) addr => out, options(nostack));
    }
    (out >> 56) & 0xf
}

fn dc_gva(addr: u64) {
    // SAFETY: sets the tags of one DC ZVA block of a donated page; the abort
    // is expected and the handler skips the instruction.
    unsafe {
        core::arch::asm!(".arch_extension memtag", "dc gva, {a}", a = in(reg) addr, options(nostack));
    }
}

fn dc_gzva(addr: u64) {
    // SAFETY: as for `dc_gva`, zeroing the block's data too.
    unsafe {
        core::arch::asm!(".arch_extension memtag", "dc gzva, {a}", a = in(reg) addr, options(nostack));
    }
}

/// Whether this CPU has MTE with tag storage (ID_AA64PFR1_EL1.MTE >= 2).
fn cpu_mte() -> u64 {
    (sysreg!("id_aa64pfr1_el1") >> 8) & 0xf
}

/// A VM with the guest loaded into `pages` pages at `pa`.
struct Guest {
    name: &'static str,
    handle: u64,
    pa: u64,
    pages: u64,
    answer: [u64; 4],
}

impl Guest {
    /// Creates the VM, donates its memory and loads the guest; `prepare`
    /// runs on the memory before donation.
    fn new(
        c: &mut Checks,
        ram: &mut Ram,
        name: &'static str,
        flags: u64,
        prepare: impl FnOnce(&mut Checks, u64),
    ) -> Option<Guest> {
        let (Some(pa), Some(staging)) = (
            ram.take(p::PAGES, PAGE),
            ram.take((GUEST.len() as u64).div_ceil(PAGE), PAGE),
        ) else {
            c.check(false, format_args!("{name}: free host RAM for a VM"));
            return None;
        };
        let (r, handle) = vm_create(p::BASE_IPA, flags);
        c.check(
            r.ok(),
            format_args!(
                "{name}: VM_CREATE(entry {:#x}, flags {flags:#x}) = {r}, handle {handle:#x}",
                p::BASE_IPA
            ),
        );
        if !r.ok() {
            return None;
        }
        prepare(c, pa);
        let r = donate(handle, pa, p::PAGES, p::BASE_IPA);
        c.check(
            r.ok(),
            format_args!(
                "{name}: VM_DONATE of {} pages at {pa:#x} to IPA {:#x} = {r}",
                p::PAGES,
                p::BASE_IPA
            ),
        );
        let g = Guest {
            name,
            handle,
            pa,
            pages: if r.ok() { p::PAGES } else { 0 },
            answer: [0; 4],
        };
        if !r.ok() {
            g.end(c, false);
            return None;
        }
        let staging_pages = (GUEST.len() as u64).div_ceil(PAGE);
        // SAFETY: `staging` is free host RAM of `staging_pages` pages.
        unsafe {
            core::ptr::copy_nonoverlapping(GUEST.as_ptr(), staging as *mut u8, GUEST.len());
        }
        let shared = share_hyp(staging, staging_pages);
        let loaded = load(handle, p::BASE_IPA, staging, GUEST.len() as u64);
        let unshared = unshare_hyp(staging, staging_pages);
        c.check(
            shared.ok() && loaded.ok() && unshared.ok(),
            format_args!(
                "{name}: guest image ({} bytes) loaded: HOST_SHARE_HYP {shared}, VM_LOAD {loaded}, HOST_UNSHARE_HYP {unshared}",
                GUEST.len()
            ),
        );
        if !loaded.ok() {
            g.end(c, false);
            return None;
        }
        Some(g)
    }

    /// Host PA of guest IPA `ipa`.
    fn pa_of(&self, ipa: u64) -> u64 {
        self.pa + (ipa - p::BASE_IPA)
    }

    /// Runs the vCPU with the pending answer (through `Interrupt` exits);
    /// prints the exit.
    fn run(&mut self, c: &mut Checks) -> Option<Exit> {
        self.run_with(c, vcpu_run)
    }

    /// [`Guest::run`], but an `Interrupt` exit is returned too.
    fn run_once(&mut self, c: &mut Checks) -> Option<Exit> {
        self.run_with(c, vcpu_run_once)
    }

    fn run_with(
        &mut self,
        c: &mut Checks,
        run: fn(u64, [u64; 4]) -> (Code, [u64; 7]),
    ) -> Option<Exit> {
        let (r, regs) = run(self.handle, core::mem::take(&mut self.answer));
        let exit = Exit::from_regs(regs);
        match exit {
            Some(e) if r.ok() => {
                let d = e.detail;
                say!(
                    "vm: {} exit {:?}: {:#x} {:#x} {:#x} {:#x} {:#x} {:#x}",
                    self.name,
                    e.reason,
                    d[0],
                    d[1],
                    d[2],
                    d[3],
                    d[4],
                    d[5]
                );
                if e.reason == ExitReason::Hvc && d[0] == u64::from(p::FAULT) {
                    c.check(
                        false,
                        format_args!(
                            "{}: the guest faulted (ESR_EL1 {:#x}, ELR_EL1 {:#x}, FAR_EL1 {:#x}, at VBAR_EL1 + {:#x})",
                            self.name, d[1], d[2], d[3], d[4]
                        ),
                    );
                    return None;
                }
                Some(e)
            }
            _ => {
                c.check(
                    false,
                    format_args!(
                        "{}: VCPU_RUN = {r}, exit {:#x} {:#x} {:#x}",
                        self.name, regs[0], regs[1], regs[2]
                    ),
                );
                None
            }
        }
    }

    /// Runs until the next exit, which must be a guest hypercall `function`;
    /// returns the guest's x1..x5.
    fn expect_hvc(&mut self, c: &mut Checks, function: u32, what: &str) -> Option<[u64; 5]> {
        let e = self.run(c)?;
        let ok = e.reason == ExitReason::Hvc && e.detail[0] == u64::from(function);
        if !ok {
            c.check(
                false,
                format_args!(
                    "{}: expected the guest's {what} (HVC {function:#x}), got {:?} {:#x}",
                    self.name, e.reason, e.detail[0]
                ),
            );
            return None;
        }
        let mut args = [0; 5];
        args.copy_from_slice(&e.detail[1..]);
        Some(args)
    }

    /// Runs until the next exit, which must be `reason`.
    fn expect_exit(&mut self, c: &mut Checks, reason: ExitReason) -> Option<Exit> {
        let e = self.run(c)?;
        if e.reason != reason {
            c.check(
                false,
                format_args!(
                    "{}: expected a {reason:?} exit, got {:?} {:#x}",
                    self.name, e.reason, e.detail[0]
                ),
            );
            return None;
        }
        Some(e)
    }

    /// The first exit: the guest asks for its mode.
    fn start(&mut self, c: &mut Checks, mode: u64, flags: u64) -> Option<()> {
        self.expect_hvc(c, p::CONFIG, "CONFIG")?;
        self.answer = [mode, flags, 0, 0];
        Some(())
    }

    /// Destroys the VM and takes its pages back; with `check_zero`, checks
    /// they come back zeroed (and, with `tags`, tag-cleared).
    fn end(self, c: &mut Checks, check_zero: bool) -> bool {
        self.end_tags(c, check_zero, false)
    }

    fn end_tags(self, c: &mut Checks, check_zero: bool, tags: bool) -> bool {
        let name = self.name;
        let d = destroy(self.handle);
        c.check(d.ok(), format_args!("{name}: VM_DESTROY = {d}"));
        if self.pages == 0 {
            return d.ok();
        }
        let r = reclaim(self.handle, self.pa, self.pages);
        c.check(
            r.ok(),
            format_args!(
                "{name}: VM_RECLAIM of {} pages at {:#x} = {r}",
                self.pages, self.pa
            ),
        );
        if !r.ok() || !check_zero {
            return d.ok() && r.ok();
        }
        let mut nonzero = 0;
        for i in 0..self.pages * PAGE / 8 {
            nonzero += u64::from(read_u64(self.pa + i * 8) != 0);
        }
        c.check(
            nonzero == 0,
            format_args!("{name}: the reclaimed pages read as zero ({nonzero} non-zero words)"),
        );
        if tags {
            let mut tagged = 0;
            for g in 0..self.pages * PAGE / 16 {
                tagged += u64::from(ldg(self.pa + g * 16) != 0);
            }
            c.check(
                tagged == 0,
                format_args!(
                    "{name}: the reclaimed pages' tags read as 0 ({tagged} tagged granules)"
                ),
            );
        }
        true
    }
}

/// The protected-VM scenarios; `host_mte`: the host's MTE policy is on.
pub(super) fn scenarios(
    c: &mut Checks,
    platform: &Platform<'_>,
    dtb: &[u8],
    host_mte: bool,
    bench: bool,
) {
    if GUEST.is_empty() {
        c.check(
            false,
            format_args!(
                "vm: the test host carries the guest image (it was built without MOAT_GUEST_BIN; build it with cargo xtask)"
            ),
        );
        return;
    }
    let (r, handle) = vm_create(p::BASE_IPA, 0);
    if r.0 == ids::NOT_SUPPORTED {
        say!(
            "vm: the core does not support protected VMs (VM_CREATE = NOT_SUPPORTED): skipping the VM scenarios"
        );
        return;
    }
    let d = destroy(handle);
    c.check(
        r.ok() && d.ok(),
        format_args!("vm: a VM with no memory is created ({r}) and destroyed ({d})"),
    );
    let mut ram = Ram::new(platform, dtb);
    let mte_field = cpu_mte();
    let mte = if !host_mte {
        Err("the host's MTE policy is off")
    } else if mte_field < 2 {
        Err("the CPU has no MTE with tag storage")
    } else {
        Ok(())
    };

    demo(c, &mut ram, false);
    consistent(c, "the demo");
    match mte {
        Ok(()) => {
            demo(c, &mut ram, true);
            consistent(c, "the MTE demo");
        }
        Err(why) => say!("vm mte: skipping the MTE VM: {why} (ID_AA64PFR1_EL1.MTE = {mte_field})"),
    }
    let tags = hardware_tags();
    mte_probe(c, &mut ram, false, tags);
    consistent(c, "the MTE-off VM's probes");
    match mte {
        Ok(()) => {
            mte_probe(c, &mut ram, true, tags);
            consistent(c, "the MTE-on VM's probes");
        }
        Err(why) => say!("vm mte on: skipping the MTE-on VM's probes: {why}"),
    }
    shared_at_exit(c, &mut ram);
    consistent(c, "a destroyed VM's pages were reclaimed, one still shared");
    vectors(c, &mut ram);
    consistent(c, "the vector-register probe");
    cpu_attacks::sme_streaming(c, &mut ram);
    if bench {
        // A benchmark image leaves the PMU counting across runs on purpose
        // (the VM figures include the guest's instructions).
        say!("attack pmu: benchmark image, whose counters see every partition: skipping");
    } else {
        cpu_attacks::pmu_counts_guest(c, &mut ram);
    }
    cpu_attacks::breakpoint_in_guest(c, &mut ram);
    hostile_access(c, &mut ram, mte);
    consistent(c, "the host touched donated memory");
    hostile_donations(c, &mut ram, dtb);
    consistent(c, "the refused donations, reclaims and shares");
    hostile_runs(c, &mut ram);
    consistent(c, "running VMs that are gone");
    interrupt_attacks::hostile_interrupts(c, &mut ram, platform);
    match Remote::start(c, platform) {
        Some(mut remote) => {
            running_elsewhere(c, &mut ram, &mut remote);
            consistent(c, "a VM running on another CPU");
            race(c, &mut ram, &mut remote);
            consistent(c, "two CPUs racing for the same pages");
            stale_translations(c, &mut ram, &mut remote);
            consistent(c, "donations the other CPU had just read");
            remote.stop(c);
        }
        None => say!(
            "vm: one CPU: skipping the cases that need a second CPU (a VM running on another CPU, racing donations)"
        ),
    }
    if bench {
        benchmarks(c, platform, dtb);
        consistent(c, "the VM benchmarks");
    }
}

/// The demo: the guest's whole program, with its exits answered.
fn demo(c: &mut Checks, ram: &mut Ram, mte: bool) {
    let name = if mte { "vm mte demo" } else { "vm demo" };
    let flags = if mte { VmFlags::MTE } else { 0 };
    let tag_page = p::TAG_PAGE_IPA - p::BASE_IPA;
    let Some(mut g) = Guest::new(c, ram, name, flags, |c, pa| {
        if mte {
            let page = pa + tag_page;
            for granule in 0..PAGE / 16 {
                stg(page + granule * 16, HOST_TAG);
            }
            let t = ldg(page);
            c.check(
                t == HOST_TAG,
                format_args!("{name}: the host tagged the page it is about to donate (tag {HOST_TAG} reads back {t})"),
            );
        }
    }) else {
        return;
    };
    let _ = demo_exits(c, &mut g, mte);
    g.end_tags(c, true, mte);
}

fn demo_exits(c: &mut Checks, g: &mut Guest, mte: bool) -> Option<()> {
    let name = g.name;
    g.start(c, p::MODE_DEMO, if mte { p::FLAG_MTE } else { 0 })?;

    let hello = g.expect_hvc(c, p::HELLO, "hello")?;
    let expected = p::hello_value();
    if hello[0] == expected {
        say!("vm: guest said hello");
    }
    c.check(
        hello[0] == expected,
        format_args!(
            "{name}: guest said hello with the value it computed in its memory ({:#x}, expected {expected:#x})",
            hello[0]
        ),
    );
    c.check(
        hello[1] == 0,
        format_args!(
            "{name}: the core answered the guest's NULL hypercall with 0 ({:#x})",
            hello[1]
        ),
    );

    let shared = g.expect_hvc(c, p::SHARED, "shared page")?;
    let (ipa, result, len) = (shared[0], Code(shared[1]), shared[2]);
    let in_memory = (p::BASE_IPA..p::BASE_IPA + p::PAGES * PAGE).contains(&ipa) && ipa % PAGE == 0;
    c.check(
        result.ok() && in_memory,
        format_args!("{name}: guest shared its page at IPA {ipa:#x} with the host (GUEST_SHARE_HOST = {result})"),
    );
    if !result.ok() || !in_memory || len >= p::REPLY_OFFSET as u64 {
        return None;
    }
    let page = g.pa_of(ipa);
    let mut message = [0u8; p::REPLY_OFFSET];
    for (i, b) in message.iter_mut().enumerate().take(len as usize) {
        // SAFETY: the guest's shared page, mapped in our stage-2 while shared.
        *b = unsafe { core::ptr::read_volatile((page + i as u64) as *const u8) };
    }
    let message = &message[..len as usize];
    let text = core::str::from_utf8(message).unwrap_or("(not UTF-8)");
    say!("vm: message through shared page: \"{text}\"");
    let number = message
        .strip_prefix(p::MESSAGE_PREFIX)
        .and_then(|n| core::str::from_utf8(n).ok())
        .and_then(|n| n.parse::<u64>().ok());
    c.check(
        number == Some(p::message_number()),
        format_args!(
            "{name}: host read the guest's message at PA {page:#x} (number {number:?}, expected {})",
            p::message_number()
        ),
    );
    for (i, b) in REPLY.iter().enumerate() {
        // SAFETY: the second half of the guest's shared page.
        unsafe { core::ptr::write_volatile((page + (p::REPLY_OFFSET + i) as u64) as *mut u8, *b) };
    }
    g.answer = [0, REPLY.len() as u64, 0, 0];
    consistent(c, "the guest shared a page with the host");

    let seen = g.expect_hvc(c, p::REPLY_SEEN, "reply seen")?;
    c.check(
        seen[0] == p::fnv1a(REPLY) && seen[1] == REPLY.len() as u64,
        format_args!(
            "{name}: guest read the host's reply in the shared page ({} bytes, hash {:#x}, expected {:#x})",
            seen[1],
            seen[0],
            p::fnv1a(REPLY)
        ),
    );

    let foreign = g.expect_hvc(c, p::SHARE_FOREIGN, "foreign share")?;
    let r = Code(foreign[0]);
    c.check(
        r.is(Error::InvalidParameters) || r.is(Error::Denied),
        format_args!(
            "{name}: guest sharing IPA {:#x}, outside its memory, is refused ({r})",
            foreign[1]
        ),
    );
    say!("vm: the guest's share of a page it does not own returned {r}");

    let unshared = g.expect_hvc(c, p::UNSHARED, "unshare")?;
    let r = Code(unshared[0]);
    c.check(
        r.ok(),
        format_args!("{name}: guest ended its share (GUEST_UNSHARE_HOST = {r})"),
    );
    expect_abort(
        c,
        format_args!("{name}: host read of the guest's page at {page:#x} after it unshared it"),
        page,
        page + 1,
        Some(false),
        || {
            let _ = read_u64(page);
        },
    );

    let e = g.expect_exit(c, ExitReason::Mmio)?;
    let access = MmioAccess(e.detail[1]);
    c.check(
        e.detail[0] == p::MMIO_READ_IPA && !access.is_write() && access.size() == 8,
        format_args!(
            "{name}: guest read of IPA {:#x} outside its memory: MMIO exit (IPA {:#x}, {} bytes, write {})",
            p::MMIO_READ_IPA,
            e.detail[0],
            access.size(),
            access.is_write()
        ),
    );
    g.answer = [MMIO_ANSWER, 0, 0, 0];
    let e = g.expect_exit(c, ExitReason::Mmio)?;
    let access = MmioAccess(e.detail[1]);
    c.check(
        e.detail[0] == p::MMIO_WRITE_IPA
            && access.is_write()
            && access.size() == 4
            && e.detail[2] == p::MMIO_WRITE_VALUE,
        format_args!(
            "{name}: guest 4-byte write of {:#x} to IPA {:#x}: MMIO exit (IPA {:#x}, {} bytes, write {}, value {:#x})",
            p::MMIO_WRITE_VALUE,
            p::MMIO_WRITE_IPA,
            e.detail[0],
            access.size(),
            access.is_write(),
            e.detail[2]
        ),
    );
    let value = g.expect_hvc(c, p::MMIO_VALUE, "MMIO value")?;
    c.check(
        value[0] == MMIO_ANSWER,
        format_args!(
            "{name}: the value the host answered the MMIO read with reached the guest ({:#x})",
            value[0]
        ),
    );

    // No device at the next address: an answer with an unknown bit is
    // refused with nothing changed, then the abort answer delivers a
    // synchronous external abort to the guest's own handler.
    let e = g.expect_exit(c, ExitReason::Mmio)?;
    c.check(
        e.detail[0] == p::MMIO_ABORT_IPA && !MmioAccess(e.detail[1]).is_write(),
        format_args!(
            "{name}: guest read of IPA {:#x} with no device: MMIO exit (IPA {:#x})",
            p::MMIO_ABORT_IPA,
            e.detail[0]
        ),
    );
    let (r, _) = vcpu_run_once(g.handle, [0, 1 << 1, 0, 0]);
    c.check(
        r.is(Error::InvalidParameters),
        format_args!("{name}: an MMIO answer with an unknown bit is refused ({r})"),
    );
    g.answer = [MMIO_ANSWER, abi::MmioAnswer::ABORT, 0, 0];
    let aborted = g.expect_hvc(c, p::MMIO_ABORTED, "MMIO abort")?;
    // A data abort from EL1 (EC 0x25), IL, a read (no WnR), DFSC 0x10.
    let esr = (0x25 << 26) | (1 << 25) | 0x10;
    c.check(
        aborted == [1, esr, p::MMIO_ABORT_IPA, 0, p::MMIO_KEPT],
        format_args!(
            "{name}: the host's abort answer reached the guest's handler as a synchronous external abort on the load (exceptions {}, ESR_EL1 {:#x}, FAR_EL1 {:#x}, ELR_EL1 {:#x} past the load, register {:#x}; expected 1, {esr:#x}, {:#x}, 0, {:#x})",
            aborted[0],
            aborted[1],
            aborted[2],
            aborted[3],
            aborted[4],
            p::MMIO_ABORT_IPA,
            p::MMIO_KEPT
        ),
    );

    if mte {
        let tags = g.expect_hvc(c, p::TAGS, "tags")?;
        c.check(
            tags[0] == 0,
            format_args!(
                "{name}: the page the host tagged {HOST_TAG} before donation reads tag {} in the guest (scrubbed on donation)",
                tags[0]
            ),
        );
        c.check(
            tags[1] == 3,
            format_args!(
                "{name}: the guest's own tags work (tag 3 stored, {} read back)",
                tags[1]
            ),
        );
    }

    g.expect_exit(c, ExitReason::Wfi)?;
    c.check(
        true,
        format_args!("{name}: guest WFI: Wfi exit, running it again"),
    );
    let e = g.expect_exit(c, ExitReason::Shutdown)?;
    c.check(
        e.detail[0] == 0,
        format_args!(
            "{name}: guest powered off with PSCI SYSTEM_OFF: Shutdown exit (x2 = {})",
            e.detail[0]
        ),
    );
    Some(())
}

/// Whether the hardware has MTE with tag storage. With the host's MTE
/// policy off the host's ID registers do not say, but a VM may still be
/// given MTE: a VM created with it tells.
fn hardware_tags() -> bool {
    if cpu_mte() >= 2 {
        return true;
    }
    let (r, h) = vm_create(p::BASE_IPA, VmFlags::MTE);
    if r.ok() {
        destroy(h);
    }
    say!(
        "vm: VM_CREATE with MTE = {r}: the hardware has tag storage: {}",
        r.ok()
    );
    r.ok()
}

/// The host's GCR_EL1, RGSR_EL1, TFSR_EL1 and TFSRE0_EL1 (by encoding).
fn host_mte_regs() -> [u64; 4] {
    [
        sysreg!("s3_0_c1_c0_6"),
        sysreg!("s3_0_c1_c0_5"),
        sysreg!("s3_0_c5_c6_0"),
        sysreg!("s3_0_c5_c6_1"),
    ]
}

fn set_host_mte_regs(v: [u64; 4]) {
    // SAFETY: with the host's MTE policy on these registers are the host's:
    // tag generation (nothing here generates random tags) and tag-check
    // fault status (nothing here checks tags).
    unsafe {
        core::arch::asm!(
            "msr s3_0_c1_c0_6, {g}", "msr s3_0_c1_c0_5, {r}",
            "msr s3_0_c5_c6_0, {t}", "msr s3_0_c5_c6_1, {e}", "isb",
            g = in(reg) v[0], r = in(reg) v[1], t = in(reg) v[2], e = in(reg) v[3],
            options(nostack),
        );
    }
}

/// What the host writes to its own MTE registers while an MTE-on VM is
/// between runs: GCR_EL1 (Exclude 0xff), RGSR_EL1 (SEED 0x1234, TAG 5),
/// TFSR_EL1 (TF1), TFSRE0_EL1 (clear); each differs from
/// [`p::GUEST_MTE_REGS`].
const HOST_MTE_REGS: [u64; 4] = [0xff, 0x12_3405, 0b10, 0];

/// Register values, shown as `[0x.., 0x.., ..]`.
struct Hex<'a>(&'a [u64]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, v) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{v:#x}")?;
        }
        write!(f, "]")
    }
}

/// Reads `addr` with the exception handler armed: `None` if it aborted.
fn try_read(addr: u64) -> Option<u64> {
    EXCEPTIONS.store(0, Ordering::SeqCst);
    EXPECT.store(Expect::SkipInstruction as u64, Ordering::SeqCst);
    let v = read_u64(addr);
    let taken = EXCEPTIONS.load(Ordering::SeqCst);
    EXPECT.store(Expect::Nothing as u64, Ordering::SeqCst);
    (taken == 0).then_some(v)
}

/// Writes `addr` with the exception handler armed: whether it did not abort.
fn try_write(addr: u64, v: u64) -> bool {
    EXCEPTIONS.store(0, Ordering::SeqCst);
    EXPECT.store(Expect::SkipInstruction as u64, Ordering::SeqCst);
    write_u64(addr, v);
    let taken = EXCEPTIONS.load(Ordering::SeqCst);
    EXPECT.store(Expect::Nothing as u64, Ordering::SeqCst);
    taken == 0
}

/// A page read with the handler armed: (words unlike `want(i)`, aborts).
fn page_differs(page: u64, want: impl Fn(u64) -> u64) -> (u64, u64) {
    let (mut differ, mut aborts) = (0, 0);
    for i in 0..PAGE / 8 {
        match try_read(page + i * 8) {
            Some(v) => differ += u64::from(v != want(i)),
            None => aborts += 1,
        }
    }
    (differ, aborts)
}

/// A VM's view of MTE and of the features it lacks, from inside: its ID
/// registers, the MTE system registers, and tags on its own memory. An
/// MTE-off VM must see no MTE at all, even when its guest maps its memory
/// Tagged and sets SCTLR_EL1.ATA; an MTE-on VM must own its MTE registers,
/// switched with the vCPU both ways.
fn mte_probe(c: &mut Checks, ram: &mut Ram, vm_mte: bool, hardware_tags: bool) {
    let name = if vm_mte { "vm mte on" } else { "vm mte off" };
    let flags = if vm_mte { VmFlags::MTE } else { 0 };
    let Some(mut g) = Guest::new(c, ram, name, flags, |_, _| {}) else {
        return;
    };
    let _ = mte_probe_exits(c, &mut g, vm_mte, hardware_tags);
    g.end(c, true);
}

fn mte_probe_exits(c: &mut Checks, g: &mut Guest, vm_mte: bool, hardware_tags: bool) -> Option<()> {
    use moat_abi::services::{PFR1_MTE_FIELDS, PFR2_MTE_FIELDS};
    let name = g.name;
    let flags = if vm_mte {
        p::FLAG_MTE
    } else {
        p::FLAG_TRY_TAGS
    };
    g.start(c, p::MODE_MTE_PROBE, flags)?;

    let [pfr0, pfr1, pfr2, isar1, isar2] = g.expect_hvc(c, p::ID_REGS, "ID registers")?;
    let [zfr0, smfr0, dfr0, _, _] = g.expect_hvc(c, p::ID_REGS_MORE, "more ID registers")?;
    let host = [
        sysreg!("id_aa64pfr0_el1"),
        sysreg!("id_aa64pfr1_el1"),
        sysreg!("s3_0_c0_c4_2"),
        sysreg!("id_aa64isar1_el1"),
        sysreg!("s3_0_c0_c6_2"),
    ];
    say!(
        "{name}: the guest reads ID_AA64PFR0_EL1 {pfr0:#018x} PFR1 {pfr1:#018x} PFR2 {pfr2:#x} ISAR1 {isar1:#018x} ISAR2 {isar2:#018x} ZFR0 {zfr0:#x} SMFR0 {smfr0:#x} DFR0 {dfr0:#018x}"
    );
    say!(
        "{name}: the host reads ID_AA64PFR0_EL1 {:#018x} PFR1 {:#018x} PFR2 {:#x} ISAR1 {:#018x} ISAR2 {:#018x}",
        host[0],
        host[1],
        host[2],
        host[3],
        host[4]
    );
    let field = |v: u64, shift: u32| (v >> shift) & 0xf;
    if vm_mte {
        c.check(
            field(pfr1, 8) >= 2 && field(pfr1, 8) == field(host[1], 8),
            format_args!(
                "{name}: ID_AA64PFR1_EL1.MTE = {} in the guest (the host's: {}): MTE with tag storage",
                field(pfr1, 8),
                field(host[1], 8)
            ),
        );
    } else {
        c.check(
            pfr1 & PFR1_MTE_FIELDS == 0 && pfr2 & PFR2_MTE_FIELDS == 0,
            format_args!(
                "{name}: the guest's ID registers report no MTE: ID_AA64PFR1_EL1.MTE = {}, MTE_frac = {}, MTEX = {}; ID_AA64PFR2_EL1 MTE fields {:#x}",
                field(pfr1, 8),
                field(pfr1, 40),
                field(pfr1, 52),
                pfr2 & PFR2_MTE_FIELDS
            ),
        );
    }
    c.check(
        field(pfr1, 24) == 0 && smfr0 == 0,
        format_args!(
            "{name}: no SME in the guest: ID_AA64PFR1_EL1.SME = {}, ID_AA64SMFR0_EL1 = {smfr0:#x}",
            field(pfr1, 24)
        ),
    );
    c.check(
        field(pfr0, 32) == 0 && zfr0 == 0,
        format_args!(
            "{name}: no SVE in the guest: ID_AA64PFR0_EL1.SVE = {} (the host's: {}), ID_AA64ZFR0_EL1 = {zfr0:#x}",
            field(pfr0, 32),
            field(host[0], 32)
        ),
    );
    c.check(
        field(pfr0, 40) == 0 && field(pfr0, 44) == 0,
        format_args!(
            "{name}: no MPAM or AMU in the guest: ID_AA64PFR0_EL1.MPAM = {}, AMU = {}",
            field(pfr0, 40),
            field(pfr0, 44)
        ),
    );
    c.check(
        [4, 8, 24, 28].iter().all(|s| field(isar1, *s) == 0)
            && field(isar2, 8) == 0
            && field(isar2, 12) == 0,
        format_args!(
            "{name}: no pointer authentication in the guest: ID_AA64ISAR1_EL1 APA {} API {} GPA {} GPI {} (the host's: {} {} {} {}), ID_AA64ISAR2_EL1 GPA3 {} APA3 {}",
            field(isar1, 4),
            field(isar1, 8),
            field(isar1, 24),
            field(isar1, 28),
            field(host[3], 4),
            field(host[3], 8),
            field(host[3], 24),
            field(host[3], 28),
            field(isar2, 8),
            field(isar2, 12)
        ),
    );
    c.check(
        field(dfr0, 8) == 0 && field(dfr0, 32) == 0,
        format_args!(
            "{name}: no PMU or SPE in the guest: ID_AA64DFR0_EL1.PMUVer = {}, PMSVer = {}",
            field(dfr0, 8),
            field(dfr0, 32)
        ),
    );
    // Pointer authentication, and LS64 (not given to VMs either).
    const ISAR1_PAUTH: u64 = (0xff << 4) | (0xff << 24) | (0xf << 60);
    c.check(
        pfr0 & 0xffff_ffff == host[0] & 0xffff_ffff
            && pfr1 & 0xff == host[1] & 0xff
            && isar1 & !ISAR1_PAUTH == host[3] & !ISAR1_PAUTH,
        format_args!(
            "{name}: the guest's other features are the host's: ID_AA64PFR0_EL1[31:0] {:#x} (host {:#x}), ID_AA64PFR1_EL1[7:0] {:#x} (host {:#x}), ID_AA64ISAR1_EL1 less pointer authentication {:#x} (host {:#x})",
            pfr0 & 0xffff_ffff,
            host[0] & 0xffff_ffff,
            pfr1 & 0xff,
            host[1] & 0xff,
            isar1 & !ISAR1_PAUTH,
            host[3] & !ISAR1_PAUTH
        ),
    );

    for (i, what) in p::MTE_ACCESSES.iter().enumerate() {
        let [index, taken, esr, elr, at] = g.expect_hvc(c, p::MTE_ACCESS, "MTE register access")?;
        if vm_mte {
            c.check(
                index == i as u64 && taken == 0,
                format_args!(
                    "{name}: {what} in the guest: no exception ({taken} taken; access {index})"
                ),
            );
        } else {
            c.check(
                index == i as u64 && taken == 1 && esr == 0x0200_0000 && elr == at,
                format_args!(
                    "{name}: {what} in the guest: Undefined Instruction at VBAR_EL1 + 0x200 ({taken} exception(s), ESR_EL1 {esr:#x}, ELR_EL1 {elr:#x}, instruction at {at:#x}; access {index}), the guest skipped it"
                ),
            );
        }
    }
    let [total, ..] = g.expect_hvc(c, p::MTE_ACCESSES_DONE, "MTE register accesses done")?;
    let want = if vm_mte {
        0
    } else {
        p::MTE_ACCESSES.len() as u64
    };
    c.check(
        total == want,
        format_args!(
            "{name}: the guest counted {total} exception(s) over its {} MTE register accesses (expected {want})",
            p::MTE_ACCESSES.len()
        ),
    );

    for (i, what) in p::HOST_STATE_ACCESSES.iter().enumerate() {
        let [index, taken, esr, elr, at] =
            g.expect_hvc(c, p::HOST_STATE_ACCESS, "host state access")?;
        c.check(
            index == i as u64 && taken == 1 && esr == 0x0200_0000 && elr == at,
            format_args!(
                "{name}: {what} in the guest: Undefined Instruction, the host's register is out of reach ({taken} exception(s), ESR_EL1 {esr:#x}, ELR_EL1 {elr:#x}, instruction at {at:#x})"
            ),
        );
    }

    let [tag, taken, ..] = g.expect_hvc(c, p::TAG_PROBE, "tag probe")?;
    let tag_stored = p::PROBE_TAG;
    if vm_mte {
        c.check(
            tag == tag_stored && taken == 0,
            format_args!(
                "{name}: STG of tag {tag_stored} then LDG on the guest's own memory: tag reads {tag} ({taken} exceptions)"
            ),
        );
    } else if hardware_tags {
        c.check(
            tag == 0 && taken == 0,
            format_args!(
                "{name}: STG of tag {tag_stored} then LDG on the guest's own memory, mapped Tagged with SCTLR_EL1.ATA set: tag reads {tag} ({taken} exceptions; tag access is disabled for the VM)"
            ),
        );
    } else {
        // Without tag storage the instructions are NOPs (FEAT_MTE) or
        // undefined (no MTE at all).
        c.check(
            tag == 0 && (taken == 0 || taken == 2),
            format_args!(
                "{name}: STG of tag {tag_stored} then LDG on the guest's own memory: tag reads {tag} ({taken} exceptions; no tag storage)"
            ),
        );
    }

    if vm_mte {
        let host_before = host_mte_regs();
        let set = g.expect_hvc(c, p::MTE_REGS_SET, "MTE registers set")?;
        c.check(
            set[..4] == p::GUEST_MTE_REGS,
            format_args!(
                "{name}: the guest wrote GCR_EL1, RGSR_EL1, TFSR_EL1, TFSRE0_EL1 = {} and read back {}",
                Hex(&p::GUEST_MTE_REGS),
                Hex(&set[..4])
            ),
        );
        let host_between = host_mte_regs();
        c.check(
            host_between == host_before,
            format_args!(
                "{name}: after the guest's exit the host's GCR_EL1, RGSR_EL1, TFSR_EL1, TFSRE0_EL1 are its own again ({}; before the run {})",
                Hex(&host_between),
                Hex(&host_before)
            ),
        );
        set_host_mte_regs(HOST_MTE_REGS);
        let mine = host_mte_regs();
        let again = g.expect_hvc(c, p::MTE_REGS_AGAIN, "MTE registers again");
        let host_after = host_mte_regs();
        set_host_mte_regs(host_before);
        let again = again?;
        c.check(
            again[..4] == p::GUEST_MTE_REGS,
            format_args!(
                "{name}: the host set its own values ({}) and ran the VM again: the guest reads its own GCR_EL1, RGSR_EL1, TFSR_EL1, TFSRE0_EL1 back ({}, expected {})",
                Hex(&mine),
                Hex(&again[..4]),
                Hex(&p::GUEST_MTE_REGS)
            ),
        );
        c.check(
            mine == HOST_MTE_REGS && host_after == HOST_MTE_REGS,
            format_args!(
                "{name}: back in the host, its GCR_EL1, RGSR_EL1, TFSR_EL1, TFSRE0_EL1 are still its own ({}, expected {})",
                Hex(&host_after),
                Hex(&HOST_MTE_REGS)
            ),
        );
    }

    let e = g.expect_exit(c, ExitReason::Shutdown)?;
    c.check(
        e.detail[0] == 0,
        format_args!(
            "{name}: the guest powered off (Shutdown exit, x2 = {})",
            e.detail[0]
        ),
    );
    Some(())
}

/// The host's vector registers while a VM runs: V1, V8, V15 and V30 keep a
/// pattern across a `VCPU_RUN` in which the guest fills all 32 of its own,
/// and with SVE so do the whole Z0 and Z31 at the host's full vector length
/// (the guest's writes of V0 and V31 would zero their upper bits). Returns
/// the run's result, the exit, the V registers that changed and the Z bytes
/// that changed (`None` without SVE).
fn run_keeping_vectors(handle: u64, answer: [u64; 4]) -> (Code, [u64; 7], u64, Option<u64>) {
    let sve = (sysreg!("id_aa64pfr0_el1") >> 32) & 0xf != 0;
    let mut v = [0u128; 4];
    let mut z = [0u8; 512];
    let mut vl = 0u64;
    let (r0, r1, r2, r3, r4, r5, r6, r7): (u64, u64, u64, u64, u64, u64, u64, u64);
    if sve {
        // SAFETY: enables SVE at EL1 (CPACR_EL1.ZEN) at the longest vector
        // length (ZCR_EL1.LEN, capped by the hardware and the core), which
        // the core leaves to the host; fills Z0 and Z31 (and V1, V8, V15,
        // V30), runs the VM with VCPU_RUN and stores them into `z` (two
        // vector lengths: at most 2 x 256 bytes) and `v`. Every register
        // written is declared.
        unsafe {
            core::arch::asm!(
                ".arch_extension sve",
                "mrs {t}, cpacr_el1", "orr {t}, {t}, #(3 << 16)", "msr cpacr_el1, {t}", "isb",
                "mov {t}, #0x1ff", "msr s3_0_c1_c2_0, {t}", "isb",
                "rdvl {vl}, #1",
                "index z0.b, #1, #1",
                "index z31.b, #-1, #-1",
                "movi v1.16b, #0x11", "movi v8.16b, #0x88",
                "movi v15.16b, #0xf5", "movi v30.16b, #0x3c",
                "hvc #0",
                "str z0, [{z}]",
                "str z31, [{z}, #1, mul vl]",
                "stp q1, q8, [{v}]", "stp q15, q30, [{v}, #32]",
                t = out(reg) _, vl = out(reg) vl,
                z = in(reg) z.as_mut_ptr(), v = in(reg) v.as_mut_ptr(),
                inlateout("x0") u64::from(abi::VCPU_RUN) => r0,
                inlateout("x1") handle => r1,
                inlateout("x2") answer[0] => r2,
                inlateout("x3") answer[1] => r3,
                inlateout("x4") answer[2] => r4,
                inlateout("x5") answer[3] => r5,
                lateout("x6") r6, lateout("x7") r7,
                lateout("x8") _, lateout("x9") _, lateout("x10") _, lateout("x11") _,
                lateout("x12") _, lateout("x13") _, lateout("x14") _, lateout("x15") _,
                lateout("x16") _, lateout("x17") _,
                out("v0") _, out("v1") _, out("v8") _, out("v15") _, out("v30") _, out("v31") _,
                options(nostack),
            );
        }
    } else {
        // SAFETY: as above without SVE: V1, V8, V15 and V30 only.
        unsafe {
            core::arch::asm!(
                "movi v1.16b, #0x11", "movi v8.16b, #0x88",
                "movi v15.16b, #0xf5", "movi v30.16b, #0x3c",
                "hvc #0",
                "stp q1, q8, [{v}]", "stp q15, q30, [{v}, #32]",
                v = in(reg) v.as_mut_ptr(),
                inlateout("x0") u64::from(abi::VCPU_RUN) => r0,
                inlateout("x1") handle => r1,
                inlateout("x2") answer[0] => r2,
                inlateout("x3") answer[1] => r3,
                inlateout("x4") answer[2] => r4,
                inlateout("x5") answer[3] => r5,
                lateout("x6") r6, lateout("x7") r7,
                lateout("x8") _, lateout("x9") _, lateout("x10") _, lateout("x11") _,
                lateout("x12") _, lateout("x13") _, lateout("x14") _, lateout("x15") _,
                lateout("x16") _, lateout("x17") _,
                out("v1") _, out("v8") _, out("v15") _, out("v30") _,
                options(nostack),
            );
        }
    }
    let lost_v = [0x11u8, 0x88, 0xf5, 0x3c]
        .iter()
        .zip(v)
        .filter(|(b, got)| *got != u128::from_ne_bytes([**b; 16]))
        .count() as u64;
    let lost_z = sve.then(|| {
        let vl = (vl as usize).min(256);
        (0..vl)
            .filter(|&i| {
                z[i] != (i as u8).wrapping_add(1) || z[vl + i] != 255u8.wrapping_sub(i as u8)
            })
            .count() as u64
    });
    (Code(r0), [r1, r2, r3, r4, r5, r6, r7], lost_v, lost_z)
}

/// The VM's vector registers and the host's are each the partition's own:
/// the guest fills V0..V31 and exits; the host's own V registers (and with
/// SVE, its whole Z registers) survived the run; the host runs the guest
/// again, and the guest finds its 32 registers as it left them.
fn vectors(c: &mut Checks, ram: &mut Ram) {
    let name = "vm vectors";
    let Some(mut g) = Guest::new(c, ram, name, 0, |_, _| {}) else {
        return;
    };
    if g.start(c, p::MODE_VECTORS, 0).is_none() {
        g.end(c, false);
        return;
    }
    let (mut r, mut regs, mut lost_v, mut lost_z) =
        run_keeping_vectors(g.handle, core::mem::take(&mut g.answer));
    // The core's backstop may end a run before the guest's exit: the host's
    // registers are checked across every run until then.
    while r.ok() && regs[0] == ExitReason::Interrupt as u64 {
        let again = run_keeping_vectors(g.handle, [0; 4]);
        (r, regs) = (again.0, again.1);
        lost_v += again.2;
        lost_z = match (lost_z, again.3) {
            (Some(a), Some(b)) => Some(a + b),
            (a, b) => a.or(b),
        };
    }
    let exit = Exit::from_regs(regs);
    let set = r.ok()
        && exit.is_some_and(|e| {
            e.reason == ExitReason::Hvc && e.detail[0] == u64::from(p::VECTORS_SET)
        });
    c.check(
        set,
        format_args!("{name}: the guest filled its 32 vector registers and exited ({r}, {exit:?})"),
    );
    c.check(
        lost_v == 0,
        format_args!(
            "{name}: the host's V1, V8, V15 and V30 survived the guest's run ({lost_v} changed)"
        ),
    );
    match lost_z {
        Some(n) => c.check(
            n == 0,
            format_args!(
                "{name}: the host's Z0 and Z31 survived the guest's run at its full vector length ({n} bytes changed)"
            ),
        ),
        None => say!("{name}: no SVE: only the V registers are checked"),
    }
    if let Some(args) = g.expect_hvc(c, p::VECTORS_CHECKED, "VECTORS_CHECKED") {
        c.check(
            args[0] == 0,
            format_args!(
                "{name}: the guest's 32 vector registers survived the host's run ({} changed)",
                args[0]
            ),
        );
    }
    let off = g.expect_exit(c, ExitReason::Shutdown).is_some();
    c.check(off, format_args!("{name}: the guest powered off"));
    g.end(c, false);
}

/// A VM that powers off with a page still shared with the host: the host
/// destroys it and takes every page back, the shared one included, which
/// must then be the host's again, zeroed.
fn shared_at_exit(c: &mut Checks, ram: &mut Ram) {
    let name = "vm shared at exit";
    let Some(mut g) = Guest::new(c, ram, name, 0, |_, _| {}) else {
        return;
    };
    let left = g
        .start(c, p::MODE_SHARED_AT_EXIT, 0)
        .and_then(|()| g.expect_hvc(c, p::LEFT_SHARED, "page left shared"));
    let Some([ipa, r, ..]) = left else {
        g.end(c, false);
        return;
    };
    let r = Code(r);
    let in_memory = (p::BASE_IPA..p::BASE_IPA + p::PAGES * PAGE).contains(&ipa) && ipa % PAGE == 0;
    c.check(
        r.ok() && in_memory,
        format_args!("{name}: the guest shared its page at IPA {ipa:#x} (GUEST_SHARE_HOST = {r})"),
    );
    if !r.ok() || !in_memory {
        g.end(c, false);
        return;
    }
    let page = g.pa_of(ipa);
    let (differ, aborts) = page_differs(page, p::pattern);
    c.check(
        differ == 0 && aborts == 0,
        format_args!(
            "{name}: the host reads the guest's words in the shared page at PA {page:#x} ({differ} differ, {aborts} aborts)"
        ),
    );
    let off = g.expect_exit(c, ExitReason::Shutdown);
    c.check(
        off.is_some(),
        format_args!("{name}: the guest powered off without ending its share"),
    );
    consistent(c, "a VM powered off with a page still shared with the host");
    let (differ, aborts) = page_differs(page, p::pattern);
    say!(
        "{name}: with the VM off, the host's read of the shared page: {differ} words differ, {aborts} aborts"
    );
    let d = destroy(g.handle);
    c.check(d.ok(), format_args!("{name}: VM_DESTROY = {d}"));
    consistent(c, "destroying a VM with a page still shared with the host");
    let (differ, aborts) = page_differs(page, p::pattern);
    say!(
        "{name}: with the VM destroyed, the host's read of the shared page: {differ} words differ, {aborts} aborts"
    );
    let r = reclaim(g.handle, g.pa, g.pages);
    c.check(
        r.ok(),
        format_args!(
            "{name}: VM_RECLAIM of all {} pages at {:#x}, one still shared with the host = {r}",
            g.pages, g.pa
        ),
    );
    if !r.ok() {
        return;
    }
    let (nonzero, aborts) = page_differs(page, |_| 0);
    c.check(
        nonzero == 0 && aborts == 0,
        format_args!(
            "{name}: the formerly shared page at PA {page:#x} reads as zero ({nonzero} non-zero words, {aborts} aborts)"
        ),
    );
    let mut write_aborts = 0;
    for i in 0..PAGE / 8 {
        write_aborts += u64::from(!try_write(page + i * 8, !p::pattern(i)));
    }
    let (differ, aborts) = page_differs(page, |i| !p::pattern(i));
    c.check(
        write_aborts == 0 && differ == 0 && aborts == 0,
        format_args!(
            "{name}: the host writes and reads back the formerly shared page: it is the host's again ({write_aborts} write aborts, {differ} words differ, {aborts} read aborts)"
        ),
    );
    for i in 0..PAGE / 8 {
        try_write(page + i * 8, 0);
    }
    let (mut nonzero, mut aborts) = (0, 0);
    for n in 0..g.pages {
        let (z, a) = page_differs(g.pa + n * PAGE, |_| 0);
        nonzero += z;
        aborts += a;
    }
    c.check(
        nonzero == 0 && aborts == 0,
        format_args!(
            "{name}: all {} reclaimed pages are the host's and read as zero ({nonzero} non-zero words, {aborts} aborts)",
            g.pages
        ),
    );
    let (r, _) = vcpu_run(g.handle, [0; 4]);
    c.check(
        r.is(Error::InvalidParameters),
        format_args!(
            "{name}: with its last page reclaimed the VM is gone: VCPU_RUN on its handle = {r} (expected InvalidParameters)"
        ),
    );
}

/// The host touching pages it gave a VM.
fn hostile_access(c: &mut Checks, ram: &mut Ram, mte: Result<(), &str>) {
    let Some(g) = Guest::new(c, ram, "vm hostile access", 0, |_, _| {}) else {
        return;
    };
    let target = g.pa + 3 * PAGE + 0x40;
    expect_abort(
        c,
        format_args!("vm hostile: host read of donated page {target:#x}"),
        target,
        target + 1,
        Some(false),
        || {
            let _ = read_u64(target);
        },
    );
    expect_abort(
        c,
        format_args!("vm hostile: host write of donated page {target:#x}"),
        target,
        target + 1,
        Some(true),
        || write_u64(target, 0xbad),
    );
    match mte {
        Ok(()) => {
            expect_abort(
                c,
                format_args!("vm hostile: host STG on donated page {target:#x}"),
                target,
                target + 1,
                None,
                || stg(target, 5),
            );
            expect_abort(
                c,
                format_args!("vm hostile: host LDG on donated page {target:#x}"),
                target,
                target + 1,
                None,
                || {
                    let _ = ldg(target);
                },
            );
            let block = g.pa + 5 * PAGE;
            expect_abort(
                c,
                format_args!("vm hostile: host DC GVA on donated page {block:#x}"),
                block,
                block + PAGE,
                None,
                || dc_gva(block),
            );
            expect_abort(
                c,
                format_args!("vm hostile: host DC GZVA on donated page {block:#x}"),
                block,
                block + PAGE,
                None,
                || dc_gzva(block),
            );
        }
        Err(why) => {
            say!("vm hostile: skipping STG, LDG, DC GVA and DC GZVA on a donated page: {why}")
        }
    }
    consistent(c, "the host's accesses to the VM's pages were refused");
    g.end(c, true);
}

/// Donations, reclaims and shares the core must refuse.
fn hostile_donations(c: &mut Checks, ram: &mut Ram, dtb: &[u8]) {
    let (Some(pa), Some(other)) = (ram.take(4, PAGE), ram.take(2, PAGE)) else {
        c.check(false, format_args!("vm refusals: free host RAM"));
        return;
    };
    let (ra, a) = vm_create(p::BASE_IPA, 0);
    let (rb, b) = vm_create(p::BASE_IPA, 0);
    c.check(
        ra.ok() && rb.ok() && a != b,
        format_args!("vm refusals: two VMs created ({ra}, {rb}; handles {a:#x}, {b:#x})"),
    );
    let r = vm_create(p::BASE_IPA, 1 << 40);
    c.check(
        r.0.is(Error::InvalidParameters),
        format_args!(
            "vm refusals: VM_CREATE with an unknown flag: {} (expected InvalidParameters)",
            r.0
        ),
    );
    if r.0.ok() {
        destroy(r.1);
    }
    let first = donate(a, pa, 4, p::BASE_IPA);
    c.check(
        first.ok(),
        format_args!("vm refusals: donate 4 pages at {pa:#x} = {first}"),
    );
    let again = donate(a, pa, 4, p::BASE_IPA + 16 * PAGE);
    c.check(
        again.is(Error::Denied),
        format_args!(
            "vm refusals: donate the same pages again to the same VM: {again} (expected Denied)"
        ),
    );
    let again = donate(b, pa + PAGE, 1, p::BASE_IPA);
    c.check(
        again.is(Error::Denied),
        format_args!("vm refusals: donate one of them to another VM: {again} (expected Denied)"),
    );
    match hypervisor_region(dtb) {
        Some(hyp) => {
            let r = donate(b, hyp.base, 1, p::BASE_IPA);
            c.check(
                r.is(Error::Denied),
                format_args!(
                    "vm refusals: donate hypervisor memory at {:#x}: {r} (expected Denied)",
                    hyp.base
                ),
            );
        }
        None => c.check(
            false,
            format_args!("vm refusals: the device tree names the hypervisor's memory"),
        ),
    }
    let r = donate(b, 0xffff_ffff_ffff_f000, 2, p::BASE_IPA);
    c.check(
        r.is(Error::InvalidParameters),
        format_args!("vm refusals: donate a range that overflows (0xfffffffffffff000, 2 pages): {r} (expected InvalidParameters)"),
    );
    let last = ram.last_page();
    let r = donate(b, last, 2, p::BASE_IPA);
    c.check(
        r.is(Error::InvalidParameters),
        format_args!("vm refusals: donate a range running past the end of RAM ({last:#x}, 2 pages): {r} (expected InvalidParameters)"),
    );
    let r = donate(b, other + 0x800, 1, p::BASE_IPA);
    c.check(
        r.is(Error::InvalidParameters),
        format_args!(
            "vm refusals: donate an unaligned PA ({:#x}): {r} (expected InvalidParameters)",
            other + 0x800
        ),
    );
    let r = donate(b, other, 0, p::BASE_IPA);
    c.check(
        r.is(Error::InvalidParameters),
        format_args!("vm refusals: donate zero pages: {r} (expected InvalidParameters)"),
    );
    let r = reclaim(a, pa, 4);
    c.check(
        r.is(Error::Denied),
        format_args!("vm refusals: reclaim from a VM that is alive: {r} (expected Denied)"),
    );
    let r = unshare_hyp(other, 1);
    c.check(
        r.is(Error::Denied),
        format_args!(
            "vm refusals: unshare a page never shared with the hypervisor: {r} (expected Denied)"
        ),
    );
    let s = share_hyp(other, 1);
    let r = donate(b, other, 1, p::BASE_IPA);
    let u = unshare_hyp(other, 1);
    c.check(
        s.ok() && r.is(Error::Denied) && u.ok(),
        format_args!("vm refusals: donate a page shared with the hypervisor: {r} (expected Denied; share {s}, unshare {u})"),
    );
    consistent(c, "the refusals, with a VM holding pages");
    let d = destroy(a);
    let r = reclaim(a, other, 1);
    c.check(
        d.ok() && r.is(Error::Denied),
        format_args!("vm refusals: reclaim a page never donated, from a destroyed VM: {r} (expected Denied; destroy {d})"),
    );
    let r = reclaim(a, pa, 4);
    c.check(
        r.ok(),
        format_args!("vm refusals: reclaim the pages actually donated: {r}"),
    );
    let d = destroy(b);
    c.check(
        d.ok(),
        format_args!("vm refusals: VM_DESTROY of the second VM = {d}"),
    );
}

/// With `moat.rogue_ledger` on the command line: runs only
/// [`rogue_ledger`]; with `moat.attack=NAME`, only that attack
/// ([`attack`]); then says the verdict and powers off. Otherwise returns.
pub(super) fn alone_if_asked(c: &mut Checks, platform: &Platform<'_>, dtb: &[u8], bootargs: &str) {
    let mut args = bootargs.split(' ');
    if fuzz::run_if_asked(c, platform, dtb, bootargs) {
    } else if args.clone().any(|a| a == "moat.rogue_ledger") {
        rogue_ledger(c, platform, dtb);
    } else if let Some(name) = args.find_map(|a| a.strip_prefix("moat.attack=")) {
        if !attack::run(c, platform, dtb, name) {
            c.check(false, format_args!("attack: no attack named {name}"));
        }
    } else {
        return;
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
    super::system_off()
}

/// The requests the rogue ledger (`services/rogue-ledger`) lies about: a
/// donation of this many pages, and what its transaction does wrong.
const LIES: [(u64, &str); 10] = [
    (1, "the host keeps its mapping"),
    (2, "no scrub"),
    (3, "one page past the request"),
    (4, "the hypervisor's pages instead"),
    (5, "the answer to a donation to another VM"),
    (6, "mapped for the host instead"),
    (7, "mapped for another VM"),
    (9, "a write-only mapping"),
    (10, "the map before the unmap"),
    (11, "the host's mapping removed from one page only"),
];

/// Under the rogue ledger (`images/rogue-ledger.toml`): every transaction
/// it lies in is refused whole, the host's pages stay the host's, with
/// their contents, and the ledger still agrees with the stage-2 tables;
/// honest answers still work, to a whole guest run.
fn rogue_ledger(c: &mut Checks, platform: &Platform<'_>, dtb: &[u8]) {
    const PAGES: u64 = 12;
    let mut ram = Ram::new(platform, dtb);
    let (Some(pa), Some(hyp)) = (ram.take(PAGES, PAGE), hypervisor_region(dtb)) else {
        c.check(
            false,
            format_args!("rogue ledger: free host RAM and the hypervisor's region"),
        );
        return;
    };
    let (r, handle) = vm_create(p::BASE_IPA, 0);
    c.check(
        r.ok(),
        format_args!("rogue ledger: VM_CREATE = {r}, handle {handle:#x}"),
    );
    if !r.ok() {
        return;
    }
    let words = PAGES * PAGE / 8;
    let pattern = |i: u64| (pa + i * 8) ^ 0xa5a5_5a5a_0f0f_f0f0;
    for i in 0..words {
        write_u64(pa + i * 8, pattern(i));
    }
    // Every word read back unchanged and written again, none aborting.
    let intact = |c: &mut Checks, after: fmt::Arguments<'_>| {
        let (mut differ, mut aborts) = (0, 0);
        for i in 0..words {
            match try_read(pa + i * 8) {
                Some(v) => differ += u64::from(v != pattern(i)),
                None => aborts += 1,
            }
            aborts += u64::from(!try_write(pa + i * 8, pattern(i)));
        }
        c.check(
            differ == 0 && aborts == 0,
            format_args!(
                "rogue ledger: the host's {PAGES} pages at {pa:#x} are still its own after {after} ({differ} words changed, {aborts} aborts)"
            ),
        );
    };
    for (pages, lie) in LIES {
        let r = donate(handle, pa, pages, p::BASE_IPA);
        c.check(
            r.is(Error::Denied),
            format_args!(
                "rogue ledger: donating {pages} page(s), answered with {lie}: {r} (expected Denied)"
            ),
        );
        intact(c, format_args!("the lie about {pages} page(s)"));
        consistent(c, "a lying ledger's donation was refused");
    }
    // A share with an executable mapping; then an honest share whose
    // commit the ledger refuses: nothing may change either time, and the
    // core must not stop serving memory requests.
    for (pages, lie, after, checked) in [
        (
            1,
            "page with the hypervisor, answered with an executable mapping",
            "the executable share",
            "a lying ledger's share was refused",
        ),
        (
            2,
            "pages with the hypervisor, the ledger's commit refused",
            "the refused commit",
            "a lying ledger refused its own commit",
        ),
    ] {
        let s = share_hyp(pa, pages);
        let u = unshare_hyp(pa, pages);
        c.check(
            s.is(Error::Denied) && u.is(Error::Denied),
            format_args!(
                "rogue ledger: sharing {pages} {lie}: {s} (expected Denied); nothing was shared: unsharing is {u} (expected Denied)"
            ),
        );
        intact(c, format_args!("{after}"));
        consistent(c, checked);
    }
    let at_hyp = donate(handle, hyp.base, 1, p::BASE_IPA);
    let last = ram.last_page();
    let past_ram = donate(handle, last, 2, p::BASE_IPA);
    c.check(
        at_hyp.is(Error::Denied) && past_ram.is(Error::Denied),
        format_args!(
            "rogue ledger: donations the ledger accepts though they are not the host's RAM to give: hypervisor memory at {:#x}: {at_hyp}, past the end of RAM at {last:#x}: {past_ram} (expected Denied)",
            hyp.base
        ),
    );
    consistent(c, "a lying ledger's forged donations were refused");

    // Honest answers.
    const HONEST: u64 = 8;
    let r = donate(handle, pa, HONEST, p::BASE_IPA);
    c.check(
        r.ok(),
        format_args!("rogue ledger: an honest donation of {HONEST} pages at {pa:#x} = {r}"),
    );
    if r.ok() {
        expect_abort(
            c,
            format_args!("rogue ledger: host read of a page it donated"),
            pa,
            pa + PAGE,
            Some(false),
            || {
                let _ = read_u64(pa);
            },
        );
    }
    consistent(c, "an honest donation");
    load_from_another_vm(c, &mut ram, pa);
    // 12 pages from `pa`: the VM owns the first 8 now. The rogue ledger
    // approves the donation anyway; the core sees in the host's stage-2
    // that they are not the host's.
    let r = donate(handle, pa, 12, p::BASE_IPA + (1 << 20));
    c.check(
        r.is(Error::Denied),
        format_args!(
            "rogue ledger: donating 12 pages of which the VM owns 8, approved by the ledger: {r} (expected Denied)"
        ),
    );
    consistent(
        c,
        "a lying ledger's donation of pages the host does not own was refused",
    );
    let d = destroy(handle);
    let r = reclaim(handle, pa, HONEST);
    c.check(
        d.ok() && r.ok(),
        format_args!("rogue ledger: VM_DESTROY = {d}, VM_RECLAIM of the {HONEST} pages = {r}"),
    );
    let (mut nonzero, mut aborts) = (0, 0);
    for i in 0..HONEST * PAGE / 8 {
        match try_read(pa + i * 8) {
            Some(v) => nonzero += u64::from(v != 0),
            None => aborts += 1,
        }
    }
    c.check(
        nonzero == 0 && aborts == 0,
        format_args!(
            "rogue ledger: the reclaimed pages read as zero ({nonzero} non-zero words, {aborts} aborts)"
        ),
    );
    consistent(c, "a reclaim through a lying ledger");
    demo(c, &mut ram, false);
    consistent(c, "the demo, with a lying ledger");
}

/// Under the rogue ledger, whose lookups answer a VM's frames as the
/// host's shared with the hypervisor: a `VM_LOAD` into a second VM from
/// `victim` (a frame the first VM owns) must be refused, nothing copied.
fn load_from_another_vm(c: &mut Checks, ram: &mut Ram, victim: u64) {
    const PAGES: u64 = 8;
    let Some(pa) = ram.take(PAGES, PAGE) else {
        c.check(
            false,
            format_args!("rogue ledger: free host RAM for a second VM"),
        );
        return;
    };
    let (r, handle) = vm_create(p::BASE_IPA, 0);
    let d = if r.ok() {
        donate(handle, pa, PAGES, p::BASE_IPA)
    } else {
        r
    };
    let l = load(handle, p::BASE_IPA, victim, PAGE);
    c.check(
        r.ok() && d.ok() && l.is(Error::Denied),
        format_args!(
            "rogue ledger: VM_LOAD into a second VM from a frame the first VM owns, which the ledger calls the host's: {l} (expected Denied; create {r}, donate {d})"
        ),
    );
    consistent(c, "a lying ledger's VM_LOAD source was refused");
    let x = destroy(handle);
    let back = reclaim(handle, pa, PAGES);
    let (nonzero, aborts) = (0..PAGES)
        .map(|i| page_differs(pa + i * PAGE, |_| 0))
        .fold((0, 0), |(n, a), (dn, da)| (n + dn, a + da));
    c.check(
        x.ok() && back.ok() && nonzero == 0 && aborts == 0,
        format_args!(
            "rogue ledger: the second VM destroyed ({x}) and its pages reclaimed ({back}), zeroed ({nonzero} non-zero words, {aborts} aborts)"
        ),
    );
}

/// Driving VMs that ran, are gone, or never were.
fn hostile_runs(c: &mut Checks, ram: &mut Ram) {
    let Some(g) = Guest::new(c, ram, "vm lifecycle", 0, |_, _| {}) else {
        return;
    };
    let mut g = g;
    let ran =
        g.start(c, p::MODE_OFF, 0).is_some() && g.expect_exit(c, ExitReason::Shutdown).is_some();
    c.check(
        ran,
        format_args!("vm lifecycle: the guest ran and powered off"),
    );
    let scratch = ram.take(1, PAGE).unwrap_or(0);
    let s = share_hyp(scratch, 1);
    let r = load(g.handle, p::BASE_IPA, scratch, 64);
    let u = unshare_hyp(scratch, 1);
    c.check(
        s.ok() && r.is(Error::Denied) && u.ok(),
        format_args!("vm lifecycle: VM_LOAD after the VM has run: {r} (expected Denied; share {s}, unshare {u})"),
    );
    let r = reclaim(g.handle, g.pa, g.pages);
    c.check(
        r.is(Error::Denied),
        format_args!(
            "vm lifecycle: reclaim from a VM that is off but not destroyed: {r} (expected Denied)"
        ),
    );
    let d = destroy(g.handle);
    let (r, _) = vcpu_run(g.handle, [0; 4]);
    c.check(
        d.ok() && (r.is(Error::InvalidParameters) || r.is(Error::Denied)),
        format_args!("vm lifecycle: VCPU_RUN on a destroyed VM: {r} (expected InvalidParameters or Denied; destroy {d})"),
    );
    let r = reclaim(g.handle, g.pa, g.pages);
    c.check(
        r.ok(),
        format_args!("vm lifecycle: reclaim after destroy = {r}"),
    );
    let unknown = g.handle ^ 0x5a5a_0000;
    let (r, _) = vcpu_run(unknown, [0; 4]);
    c.check(
        r.is(Error::InvalidParameters) || r.is(Error::Denied),
        format_args!("vm lifecycle: VCPU_RUN on an unknown handle {unknown:#x}: {r} (expected InvalidParameters or Denied)"),
    );
}

/// Calls the boot CPU hands a secondary CPU: `seq` numbers them.
static SERVE: AtomicBool = AtomicBool::new(false);
static REQ_SEQ: AtomicU64 = AtomicU64::new(0);
static REQ_FN: AtomicU64 = AtomicU64::new(0);
static REQ_ARGS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
static READY: AtomicU64 = AtomicU64::new(0);
static GO: AtomicU64 = AtomicU64::new(0);
static DONE: AtomicU64 = AtomicU64::new(0);
/// Set once the secondary CPU is serving.
static STARTED: AtomicBool = AtomicBool::new(false);
/// The call the secondary CPU is about to make (set just before its HVC).
static FIRING: AtomicU64 = AtomicU64::new(0);
static RESULT: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

/// Work the serving CPU does itself instead of a hypercall: let the SGI
/// below reach this CPU's interface (x0 = 0 if it can: GICv3), or take the
/// pending interrupt (x0 = its INTID) and close it again.
const OP_GIC_SETUP: u32 = 1;
const OP_GIC_ACK: u32 = 2;
/// Reads a word with the exception handler armed: x0 = 1 and x1 = the
/// value, or x0 = 0 if the read aborted.
const OP_READ: u32 = 3;
/// The SGI the boot CPU sends to stop a running vCPU.
const STOP_SGI: u64 = 8;
/// The GICv3 redistributor region (base, end); 0 for a GICv2.
static REDISTRIBUTORS: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
/// This CPU's interface state before `gic_setup`: PMR, IGRPEN1.
static SAVED_ICC: [AtomicU64; 2] = [const { AtomicU64::new(0) }; 2];
/// Set while `gic_setup` has the serving CPU's interface open.
static GIC_OPEN: AtomicBool = AtomicBool::new(false);

/// This CPU's SGI/PPI frame (GICv3), found by affinity as the core does.
fn sgi_frame() -> Option<u64> {
    let (base, end) = (
        REDISTRIBUTORS[0].load(Ordering::SeqCst),
        REDISTRIBUTORS[1].load(Ordering::SeqCst),
    );
    let mpidr = sysreg!("mpidr_el1");
    let want = ((mpidr >> 8) & 0xff00_0000) | (mpidr & 0xff_ffff);
    let mut frame = base;
    while base != 0 && frame + 0x2_0000 <= end {
        let typer = read_u64(frame + 0x8);
        if typer >> 32 == want {
            return Some(frame + 0x1_0000);
        }
        if typer & (1 << 4) != 0 {
            break;
        }
        frame += if typer & (1 << 1) != 0 {
            0x4_0000
        } else {
            0x2_0000
        };
    }
    None
}

fn gic_write32(addr: u64, v: u32) {
    // SAFETY: a GIC register, mapped as device memory by our early map.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn gic_read32(addr: u64) -> u32 {
    // SAFETY: as for `gic_write32`.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Enables `intid` (an SGI or PPI of this CPU) in group 1 at `priority`
/// and opens the CPU interface to it (PMR 0xf0, group 1 on). Returns the
/// interface's old PMR and group-1 enable; `None` without a GICv3
/// redistributor for this CPU.
fn gic_open(intid: u64, priority: u8) -> Option<(u64, u64)> {
    let sgi = sgi_frame()?;
    let bit = 1u32 << intid;
    gic_write32(sgi + 0x80, gic_read32(sgi + 0x80) | bit); // IGROUPR0
    // SAFETY: IPRIORITYR is byte-accessible; this is `intid`'s byte.
    unsafe { core::ptr::write_volatile((sgi + 0x400 + intid) as *mut u8, priority) };
    gic_write32(sgi + 0x100, bit); // ISENABLER0
    let (pmr, grpen): (u64, u64);
    // SAFETY: system-register access to this CPU's GIC interface (SRE), its
    // priority mask and group-1 enable; the old values are returned for the
    // caller to restore.
    unsafe {
        core::arch::asm!(
            "mrs {t}, icc_sre_el1", "orr {t}, {t}, #1", "msr icc_sre_el1, {t}", "isb",
            "mrs {p}, icc_pmr_el1", "mrs {g}, icc_igrpen1_el1",
            "msr icc_pmr_el1, {ff}", "msr icc_igrpen1_el1, {one}", "isb",
            t = out(reg) _, p = out(reg) pmr, g = out(reg) grpen,
            ff = in(reg) 0xf0u64, one = in(reg) 1u64, options(nostack),
        );
    }
    Some((pmr, grpen))
}

/// Enables [`STOP_SGI`] (group 1, priority 0x80) at this CPU's
/// redistributor and opens the CPU interface to it. Interrupts stay masked
/// in PSTATE: while the host runs the SGI only pends; while a vCPU runs on
/// this CPU it goes to the core, which ends `VCPU_RUN`.
fn gic_setup() -> u64 {
    let Some((pmr, grpen)) = gic_open(STOP_SGI, 0x80) else {
        return ids::NOT_SUPPORTED;
    };
    SAVED_ICC[0].store(pmr, Ordering::SeqCst);
    SAVED_ICC[1].store(grpen, Ordering::SeqCst);
    GIC_OPEN.store(true, Ordering::SeqCst);
    0
}

/// Acknowledges and ends the pending interrupt, if any (its INTID; 1023:
/// none), then disables [`STOP_SGI`] and restores the CPU interface.
fn gic_ack() -> u64 {
    let intid: u64;
    // SAFETY: acknowledges the highest-priority pending group-1 interrupt
    // and, if there was one, signals its end.
    unsafe {
        core::arch::asm!(
            "mrs {i}, icc_iar1_el1",
            "cmp {i}, #1020",
            "b.hs 1f",
            "msr icc_eoir1_el1, {i}",
            "1:",
            "isb",
            i = out(reg) intid, options(nostack),
        );
    }
    GIC_OPEN.store(false, Ordering::SeqCst);
    if let Some(sgi) = sgi_frame() {
        gic_write32(sgi + 0x180, 1 << STOP_SGI); // ICENABLER0
    }
    // SAFETY: restores what `gic_setup` saved.
    unsafe {
        core::arch::asm!(
            "msr icc_pmr_el1, {p}", "msr icc_igrpen1_el1, {g}", "isb",
            p = in(reg) SAVED_ICC[0].load(Ordering::SeqCst),
            g = in(reg) SAVED_ICC[1].load(Ordering::SeqCst), options(nostack),
        );
    }
    intid & 0xff_ffff
}

/// Sends [`STOP_SGI`] to the CPU with affinity `mpidr` (GICv3).
fn send_stop_sgi(mpidr: u64) {
    let aff = |n: u32| (mpidr >> (8 * n)) & 0xff;
    let value = (STOP_SGI << 24)
        | (aff(1) << 16)
        | (aff(2) << 32)
        | ((mpidr >> 32) & 0xff) << 48
        | (1 << (aff(0) & 15));
    // SAFETY: this CPU's GIC interface through system registers (SRE), then
    // one SGI to one CPU.
    unsafe {
        core::arch::asm!(
            "mrs {t}, icc_sre_el1", "orr {t}, {t}, #1", "msr icc_sre_el1, {t}", "isb",
            "msr icc_sgi1r_el1, {v}", "isb",
            t = out(reg) _, v = in(reg) value, options(nostack),
        );
    }
}

/// A secondary CPU's work, if the boot CPU started it for the VM cases:
/// serve calls until told to stop. Returns whether it did.
pub(super) fn secondary(index: u64) -> bool {
    if fuzz::secondary(index) {
        return true;
    }
    if !SERVE.load(Ordering::SeqCst) {
        return false;
    }
    say!("vm: CPU {index} serving calls for the boot CPU");
    STARTED.store(true, Ordering::SeqCst);
    let mut seen = 0;
    loop {
        let seq = loop {
            let s = REQ_SEQ.load(Ordering::SeqCst);
            if s != seen {
                break s;
            }
            core::hint::spin_loop();
        };
        seen = seq;
        let function = REQ_FN.load(Ordering::SeqCst) as u32;
        if function == 0 {
            DONE.store(seq, Ordering::SeqCst);
            return true;
        }
        let mut args = [0; 6];
        for (a, r) in args.iter_mut().zip(&REQ_ARGS) {
            *a = r.load(Ordering::SeqCst);
        }
        READY.store(seq, Ordering::SeqCst);
        while GO.load(Ordering::SeqCst) != seq {
            core::hint::spin_loop();
        }
        FIRING.store(seq, Ordering::SeqCst);
        let r = match function {
            OP_GIC_SETUP => [gic_setup(), 0, 0, 0, 0, 0, 0, 0],
            OP_GIC_ACK => [gic_ack(), 0, 0, 0, 0, 0, 0, 0],
            OP_READ => match try_read(args[0]) {
                Some(v) => [1, v, 0, 0, 0, 0, 0, 0],
                None => [0; 8],
            },
            abi::VCPU_RUN => remote_vcpu_run(args),
            _ => hvc6(function, args),
        };
        for (slot, v) in RESULT.iter().zip(r) {
            slot.store(v, Ordering::SeqCst);
        }
        DONE.store(seq, Ordering::SeqCst);
    }
}

/// `VCPU_RUN` on a serving CPU: an `Interrupt` exit is run through unless
/// this CPU's GIC interface (opened by `gic_setup`) has an interrupt
/// pending for the host, which is what the cases there wait for.
fn remote_vcpu_run(args: [u64; 6]) -> [u64; 8] {
    let mut args = args;
    loop {
        let r = hvc6(abi::VCPU_RUN, args);
        if !(r[0] == 0 && r[1] == ExitReason::Interrupt as u64) || host_interrupt_pending() {
            return r;
        }
        args[1..5].fill(0);
    }
}

/// Whether this CPU's GIC interface, if `gic_setup` opened it, has a
/// group-1 interrupt pending.
fn host_interrupt_pending() -> bool {
    if !GIC_OPEN.load(Ordering::SeqCst) {
        return false;
    }
    let intid: u64;
    // SAFETY: reads the highest-priority pending interrupt without
    // acknowledging it (the system-register interface is on: `gic_setup`).
    unsafe { core::arch::asm!("mrs {}, icc_hppir1_el1", out(reg) intid, options(nomem, nostack)) };
    intid & 0xff_ffff < 1020
}

fn wait_for(flag: &AtomicU64, value: u64) -> bool {
    for _ in 0..PATIENCE {
        if flag.load(Ordering::SeqCst) == value {
            return true;
        }
        core::hint::spin_loop();
    }
    false
}

/// A secondary CPU serving our calls.
struct Remote {
    index: usize,
    mpidr: u64,
    seq: u64,
}

impl Remote {
    fn start(c: &mut Checks, platform: &Platform<'_>) -> Option<Remote> {
        let me = sysreg!("mpidr_el1") & 0xff_00ff_ffff;
        let (index, cpu) = platform
            .cpus
            .iter()
            .enumerate()
            .find(|(_, cpu)| cpu.mpidr != me)?;
        if let moat_platform::dt::Gic::V3 { redistributors, .. } = &platform.gic
            && let Some(r) = redistributors.first()
        {
            REDISTRIBUTORS[0].store(r.base, Ordering::SeqCst);
            REDISTRIBUTORS[1].store(r.end(), Ordering::SeqCst);
        }
        SERVE.store(true, Ordering::SeqCst);
        STARTED.store(false, Ordering::SeqCst);
        let entry = secondary_start as *const () as u64;
        let v = hvc(
            smccc::psci::PSCI_CPU_ON_64,
            [cpu.mpidr, entry, index as u64],
        )[0] as i64;
        c.check(
            v == 0,
            format_args!("vm: CPU_ON of CPU {index} to serve the two-CPU cases = {v}"),
        );
        // Its first line is out before anything else is printed.
        let started = v == 0 && {
            let mut spins = 0;
            while !STARTED.load(Ordering::SeqCst) && spins < PATIENCE {
                spins += 1;
                core::hint::spin_loop();
            }
            STARTED.load(Ordering::SeqCst)
        };
        c.check(started, format_args!("vm: CPU {index} is serving"));
        if !started {
            SERVE.store(false, Ordering::SeqCst);
        }
        started.then_some(Remote {
            index,
            mpidr: cpu.mpidr,
            seq: REQ_SEQ.load(Ordering::SeqCst),
        })
    }

    /// Hands over a call and waits until the other CPU is about to make it;
    /// it makes it on [`Remote::go`].
    fn post(&mut self, function: u32, args: [u64; 6]) -> bool {
        self.seq += 1;
        for (slot, a) in REQ_ARGS.iter().zip(args) {
            slot.store(a, Ordering::SeqCst);
        }
        REQ_FN.store(u64::from(function), Ordering::SeqCst);
        REQ_SEQ.store(self.seq, Ordering::SeqCst);
        function == 0 || wait_for(&READY, self.seq)
    }

    fn go(&self) {
        GO.store(self.seq, Ordering::SeqCst);
    }

    /// Waits until the other CPU is making the posted call.
    fn firing(&self) -> bool {
        wait_for(&FIRING, self.seq)
    }

    /// The posted call's x0..x7, once it has returned.
    fn result(&self) -> Option<[u64; 8]> {
        wait_for(&DONE, self.seq).then(|| RESULT.each_ref().map(|r| r.load(Ordering::SeqCst)))
    }

    /// Makes a call on the other CPU and waits for it.
    fn call(&mut self, function: u32, args: [u64; 6]) -> Option<[u64; 8]> {
        if !self.post(function, args) {
            return None;
        }
        self.go();
        self.result()
    }

    fn stop(mut self, c: &mut Checks) {
        self.post(0, [0; 6]);
        let done = wait_for(&DONE, self.seq);
        SERVE.store(false, Ordering::SeqCst);
        let mut state = 0;
        for _ in 0..10_000 {
            state = hvc(smccc::psci::PSCI_AFFINITY_INFO_64, [self.mpidr, 0, 0])[0] as i64;
            if state == 1 {
                break;
            }
        }
        c.check(
            done && state == 1,
            format_args!(
                "vm: CPU {} stopped serving and is off (AFFINITY_INFO = {state})",
                self.index
            ),
        );
    }
}

/// An exit a call on the other CPU returned.
fn remote_exit(c: &mut Checks, what: &str, r: Option<[u64; 8]>) -> Option<Exit> {
    let Some(r) = r else {
        c.check(
            false,
            format_args!("{what}: the other CPU did not come back"),
        );
        return None;
    };
    let mut regs = [0; 7];
    regs.copy_from_slice(&r[1..]);
    let e = Exit::from_regs(regs).filter(|_| r[0] == 0);
    if let Some(e) = e {
        say!(
            "vm: {what}: exit {:?}: {:#x} {:#x} {:#x}",
            e.reason,
            e.detail[0],
            e.detail[1],
            e.detail[2]
        );
    } else {
        c.check(
            false,
            format_args!("{what}: VCPU_RUN = {}, exit {:#x}", Code(r[0]), r[1]),
        );
    }
    e
}

/// Pages the other CPU has just read, so that its TLB holds their
/// translations, are donated by this CPU: the other CPU's next read must
/// abort. Nothing but the core's broadcast invalidation removes the
/// other CPU's entries (it makes no call in between), so a donation whose
/// invalidation stays on the donating CPU leaves the pages readable there.
/// One page (invalidated page by page) and 64 pages (past the point where
/// the core invalidates the whole VMID instead); the reclaimed pages are
/// readable again from the other CPU, and zero.
fn stale_translations(c: &mut Checks, ram: &mut Ram, remote: &mut Remote) {
    const MARK: u64 = 0x5afe_7ab1e;
    for pages in [1u64, 64] {
        let name = "vm stale translations";
        let Some(pa) = ram.take(pages, PAGE) else {
            c.check(
                false,
                format_args!("{name}: {pages} page(s): free host RAM"),
            );
            return;
        };
        let last = pa + (pages - 1) * PAGE;
        write_u64(pa, MARK);
        write_u64(last, MARK);
        let before = [pa, last].map(|a| remote.call(OP_READ, [a, 0, 0, 0, 0, 0]));
        c.check(
            before
                .iter()
                .all(|r| r.is_some_and(|r| r[0] == 1 && r[1] == MARK)),
            format_args!("{name}: {pages} page(s): the other CPU reads them before the donation"),
        );
        let (r, h) = vm_create(p::BASE_IPA, 0);
        let d = donate(h, pa, pages, p::BASE_IPA);
        c.check(
            r.ok() && d.ok(),
            format_args!("{name}: {pages} page(s): VM_CREATE {r}, VM_DONATE {d}"),
        );
        let after = [pa, last].map(|a| remote.call(OP_READ, [a, 0, 0, 0, 0, 0]));
        c.check(
            after.iter().all(|r| r.is_some_and(|r| r[0] == 0)),
            format_args!(
                "{name}: {pages} page(s): the other CPU's reads of the donated pages abort (x0, x1 of each: {:x?})",
                after.map(|r| r.map(|r| (r[0], r[1])))
            ),
        );
        let x = destroy(h);
        let t = reclaim(h, pa, pages);
        let back = [pa, last].map(|a| remote.call(OP_READ, [a, 0, 0, 0, 0, 0]));
        c.check(
            x.ok() && t.ok() && back.iter().all(|r| r.is_some_and(|r| r[0] == 1 && r[1] == 0)),
            format_args!(
                "{name}: {pages} page(s): destroyed {x}, reclaimed {t}; the other CPU reads them again, zeroed (x0, x1 of each: {:x?})",
                back.map(|r| r.map(|r| (r[0], r[1])))
            ),
        );
    }
}

/// A VM running on the other CPU: the host may not take its memory or end it.
fn running_elsewhere(c: &mut Checks, ram: &mut Ram, remote: &mut Remote) {
    let name = "vm running";
    let Some(g) = Guest::new(c, ram, name, 0, |_, _| {}) else {
        return;
    };
    let h = g.handle;
    let cpu = remote.index;
    let gic = remote.call(OP_GIC_SETUP, [0; 6]).is_some_and(|r| r[0] == 0);
    let config = remote_exit(c, name, remote.call(abi::VCPU_RUN, [h, 0, 0, 0, 0, 0]));
    if !config.is_some_and(|e| e.reason == ExitReason::Hvc && e.detail[0] == u64::from(p::CONFIG)) {
        c.check(
            false,
            format_args!("{name}: the guest asked for its mode on CPU {cpu}"),
        );
        g.end(c, false);
        return;
    }
    let spinning = remote_exit(
        c,
        name,
        remote.call(abi::VCPU_RUN, [h, p::MODE_SPIN, 0, 0, 0, 0]),
    );
    let Some(e) = spinning.filter(|e| {
        e.reason == ExitReason::Hvc && e.detail[0] == u64::from(p::SPINNING) && e.detail[2] == 0
    }) else {
        c.check(
            false,
            format_args!("{name}: the guest shared a page to count in"),
        );
        g.end(c, false);
        return;
    };
    let counter = g.pa_of(e.detail[1]);
    if !remote.post(abi::VCPU_RUN, [h, 0, 0, 0, 0, 0]) {
        c.check(false, format_args!("{name}: CPU {cpu} took the VCPU_RUN"));
        g.end(c, false);
        return;
    }
    remote.go();
    // The count moving proves the guest is running on the other CPU now.
    let (start, moved) = counting(counter);
    c.check(
        moved != 0,
        format_args!("{name}: the guest is counting on CPU {cpu} (shared page at {counter:#x}: {start} -> {moved})"),
    );
    if moved != 0 {
        let r = reclaim(h, g.pa, g.pages);
        c.check(
            r.is(Error::Denied),
            format_args!("{name}: reclaim from a VM running on CPU {cpu}: {r} (expected Denied)"),
        );
        let r = destroy(h);
        c.check(
            r.is(Error::Busy),
            format_args!("{name}: destroy a VM running on CPU {cpu}: {r} (expected Busy)"),
        );
        let (r, _) = vcpu_run(h, [0; 4]);
        c.check(
            !r.ok(),
            format_args!("{name}: VCPU_RUN of a vCPU running on CPU {cpu} is refused: {r}"),
        );
        consistent(c, "the refusals, with the VM running on another CPU");
        let after = read_u64(counter);
        c.check(
            after > moved,
            format_args!("{name}: the guest kept running through all that ({moved} -> {after})"),
        );
    }
    if !gic {
        say!("{name}: no GICv3 interface on CPU {cpu}: not stopping the vCPU with an interrupt");
    } else if moved != 0 {
        interrupt_exit(c, remote, h, counter);
    }
    write_u64(counter + 8, p::STOP);
    let off = remote_exit(c, name, remote.result());
    c.check(
        off.is_some_and(|e| e.reason == ExitReason::Shutdown),
        format_args!(
            "{name}: told to stop, the guest unshared its page and powered off on CPU {cpu}"
        ),
    );
    g.end(c, true);
}

/// Waits for the count at `counter` to move on: (before, after), after = 0
/// if it never did.
fn counting(counter: u64) -> (u64, u64) {
    let start = read_u64(counter);
    for _ in 0..PATIENCE {
        let now = read_u64(counter);
        if now > start + 1000 {
            return (start, now);
        }
        core::hint::spin_loop();
    }
    (start, 0)
}

/// An interrupt for the host ends the run of a spinning vCPU on the other
/// CPU; the host there takes it, and the vCPU runs on where it was.
fn interrupt_exit(c: &mut Checks, remote: &mut Remote, h: u64, counter: u64) {
    let name = "vm running";
    let cpu = remote.index;
    send_stop_sgi(remote.mpidr);
    let e = remote_exit(c, name, remote.result());
    c.check(
        e.is_some_and(|e| e.reason == ExitReason::Interrupt),
        format_args!(
            "{name}: an interrupt for the host (SGI {STOP_SGI} to CPU {cpu}) ended VCPU_RUN with an Interrupt exit"
        ),
    );
    if e.is_none() {
        return;
    }
    let intid = remote.call(OP_GIC_ACK, [0; 6]).map(|r| r[0]);
    c.check(
        intid == Some(STOP_SGI),
        format_args!("{name}: the host on CPU {cpu} then took the interrupt (INTID {intid:?})"),
    );
    let resumed = remote.post(abi::VCPU_RUN, [h, 0, 0, 0, 0, 0]);
    remote.go();
    let (before, after) = counting(counter);
    c.check(
        resumed && after != 0,
        format_args!(
            "{name}: VCPU_RUN again on CPU {cpu}: the guest counts on where it was ({before} -> {after})"
        ),
    );
}

/// Two CPUs donating overlapping ranges at the same moment.
fn race(c: &mut Checks, ram: &mut Ram, remote: &mut Remote) {
    const ROUNDS: u32 = 16;
    let Some(pa) = ram.take(6, PAGE) else {
        c.check(false, format_args!("vm race: free host RAM"));
        return;
    };
    let (mut won, mut clean) = ([0u32; 2], 0);
    for round in 0..ROUNDS {
        let (ra, a) = vm_create(p::BASE_IPA, 0);
        let (rb, b) = vm_create(p::BASE_IPA, 0);
        if !ra.ok() || !rb.ok() {
            say!("vm race: round {round}: VM_CREATE = {ra}, {rb}");
            break;
        }
        // This CPU gives pages 0..4 to A, the other pages 2..6 to B: in even
        // rounds as soon as it lets the other CPU go, in odd rounds once the
        // other CPU is making its call, so each side gets to be first.
        let posted = remote.post(abi::VM_DONATE, [b, pa + 2 * PAGE, 4, p::BASE_IPA, 0, 0]);
        remote.go();
        let posted = posted && (round % 2 == 0 || remote.firing());
        let here = donate(a, pa, 4, p::BASE_IPA);
        let there = remote.result().map(|r| Code(r[0]));
        let Some(there) = there.filter(|_| posted) else {
            c.check(
                false,
                format_args!("vm race: round {round}: the other CPU did not come back"),
            );
            return;
        };
        let one_won =
            (here.ok() && there.is(Error::Denied)) || (there.ok() && here.is(Error::Denied));
        if one_won {
            clean += 1;
            won[usize::from(there.ok())] += 1;
        } else {
            say!(
                "vm race: round {round}: CPU 0 got {here}, CPU {} got {there}",
                remote.index
            );
        }
        let (da, db) = (destroy(a), destroy(b));
        let ra = if here.ok() {
            reclaim(a, pa, 4)
        } else {
            Code(0)
        };
        let rb = if there.ok() {
            reclaim(b, pa + 2 * PAGE, 4)
        } else {
            Code(0)
        };
        if !(da.ok() && db.ok() && ra.ok() && rb.ok()) {
            c.check(
                false,
                format_args!(
                    "vm race: round {round}: cleaning up: destroy {da}, {db}, reclaim {ra}, {rb}"
                ),
            );
            return;
        }
    }
    c.check(
        clean == ROUNDS,
        format_args!(
            "vm race: two CPUs donating overlapping ranges at once: one succeeded and the other was Denied in {clean} of {ROUNDS} rounds (boot CPU won {}, CPU {} won {})",
            won[0], remote.index, won[1]
        ),
    );
}

/// Programs PMU counter 0 to count the event and levels of `filter`
/// (a PMEVTYPER value) and enables it.
fn pmu_start(filter: u64) {
    // SAFETY: PMU counter 0 is ours, as in the other benchmarks.
    unsafe {
        core::arch::asm!(
            "msr pmevtyper0_el0, {ty}", "msr pmcntenset_el0, {en}",
            "mrs {t}, pmcr_el0", "orr {t}, {t}, #1", "msr pmcr_el0, {t}", "isb",
            ty = in(reg) filter, en = in(reg) 1u64, t = out(reg) _,
        );
    }
}

fn pmu_now() -> u64 {
    let v: u64;
    // SAFETY: reads PMU counter 0.
    unsafe { core::arch::asm!("isb", "mrs {v}, pmevcntr0_el0", "isb", v = out(reg) v) };
    v
}

/// Instructions `f` retires, at EL1 and EL2.
fn count<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let start = pmu_now();
    let r = f();
    (r, pmu_now() - start)
}

/// `bench:` lines for donating and reclaiming ranges, and an exit's round trip.
fn benchmarks(c: &mut Checks, platform: &Platform<'_>, dtb: &[u8]) {
    pmu_start(PMU_EL1_AND_EL2);
    for pages in [1u64, 512, 262_144] {
        // Every range from a fresh search: the scenarios gave back what they took.
        let mut ram = Ram::new(platform, dtb);
        let Some(pa) = ram.take(pages, (pages * PAGE).min(2 << 20)) else {
            say!("bench: donate/reclaim of {pages} pages skipped: not enough free RAM");
            continue;
        };
        let (r, h) = vm_create(p::BASE_IPA, 0);
        let (d, given) = count(|| donate(h, pa, pages, p::BASE_IPA));
        let x = destroy(h);
        let (t, taken) = count(|| reclaim(h, pa, pages));
        c.check(
            r.ok() && d.ok() && x.ok() && t.ok(),
            format_args!("vm bench: {pages} pages at {pa:#x}: create {r}, donate {d}, destroy {x}, reclaim {t}"),
        );
        say!(
            "bench: donate_page_{pages}={} reclaim_page_{pages}={} (instructions per page, EL1 and EL2, for a {pages}-page range)",
            given / pages,
            taken / pages
        );
        say!(
            "bench: donate_total_{pages}={given} (instructions for the whole {pages}-page donation)"
        );
    }

    let mut ram = Ram::new(platform, dtb);
    let Some(mut g) = Guest::new(c, &mut ram, "vm bench", 0, |_, _| {}) else {
        return;
    };
    const N: u64 = 1000;
    let ok = g.start(c, p::MODE_PING, 0).is_some() && g.expect_hvc(c, p::PING, "ping").is_some();
    if ok {
        let h = g.handle;
        for _ in 0..10 {
            vcpu_run(h, [0; 4]);
        }
        let (bad, n) = count(|| {
            let mut bad = 0;
            for _ in 0..N {
                let (r, regs) = vcpu_run(h, [0; 4]);
                bad += u64::from(
                    !r.ok() || regs[0] != ExitReason::Hvc as u64 || regs[1] != u64::from(p::PING),
                );
            }
            bad
        });
        g.answer = [p::STOP, 0, 0, 0];
        let off = g.expect_exit(c, ExitReason::Shutdown).is_some();
        c.check(
            bad == 0 && off,
            format_args!("vm bench: {N} guest exits, each a PING ({bad} were not); the guest then powered off"),
        );
        say!(
            "bench: vm_exit_roundtrip={} (guest hvc -> core -> host's VCPU_RUN returns -> VCPU_RUN -> guest, EL1 and EL2, host loop included)",
            n / N
        );
    }
    g.end(c, false);
}
