//! Service partitions: creation at boot, synchronous calls, containment.
//!
//! A service is an EL1 program in a partition of its own. Its stage-2 maps
//! exactly three things: its text (read-only, executable) and its data, BSS
//! and stack (read/write, never executable) at [`SERVICE_BASE_IPA`], and its
//! IPC page at [`IPC_PAGE_IPA`]. It has its own VMID and its own EL1 state.
//!
//! ```text
//!   host (EL1)            core (EL2)                          service (EL1)
//!   hvc 0xC600_1000 ──▶  route → Message::call → IPC page
//!                        save host EL1, load service EL1,
//!                        VTTBR/HCR for the service, watchdog ──▶ SVC_REPLY_WAIT returns
//!                                                               dispatch, write reply
//!                        ◀── hvc SVC_REPLY_WAIT ──────────────
//!                        copy reply out, check it,
//!   x0..x7 = reply ◀──── restore host EL1 and EL2 controls
//! ```
//!
//! To the core a call is a function call: [`enter_nested`] runs the service
//! until it traps and returns. A service that faults, answers with a reply
//! that does not match the call, or is still running after
//! [`OVERRUN_LIMIT`] budgets is marked failed; the caller gets
//! [`Error::ServiceFailed`], and so does every later caller (the system fails
//! closed). The budget is checked every budget (the watchdog), not enforced
//! at the first expiry: under emulation on a loaded machine the counter runs
//! on while the emulator is descheduled, and a call that takes two budgets
//! there is slow, not stuck.
//!
//! Two kinds of call ([`Preemption`]). A call the host made (a routed
//! hypercall, a trapped access) may be suspended by a host interrupt above
//! [`SERVICE_RUN_PMR`](moat_kernel::el2config::SERVICE_RUN_PMR): the service's registers stay saved, the caller is
//! told [`Error::Interrupted`] (or, with its interrupts unmasked, simply
//! re-executes the call), and the next call to that service finishes the
//! suspended one first. A call of the core's own (boot, a memory
//! transaction, VM creation) runs to its reply whatever the host's
//! interrupts: only priority 0 passes the mask, and a host interrupt the
//! host gave priority 0 is held back at the distributor until the call is
//! over ([`gic::hold_back`]). A transaction's commit therefore cannot be
//! lost to an interrupt.

use crate::arch::gic;
use crate::arch::sysreg::{self, El1Context};
use crate::base::cpu::{PerCpu, VCPU_SERVICE_BASE, Vcpu};
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, AtomicU32, Ordering};
use moat_abi::Error;
use moat_abi::hypercall;
use moat_abi::ipc::{MESSAGE_SIZE, MessageError, MessageHeader};
use moat_abi::services::{LedgerExtent, LedgerRequest, LedgerTransaction, ledger};
use moat_abi::trap::TrapDescriptor;
use moat_kernel::esr::Trap;
use moat_kernel::regs::GuestRegs;
use moat_kernel::routing::{RouteSpec, RoutingTable};
use moat_kernel::verdict::Answer;
use moat_package::{Package, ServiceRecord};
use moat_platform::dt::Range;
use spin::Once;
use zerocopy::IntoBytes;

/// Where every service's image starts (intermediate physical address).
pub const SERVICE_BASE_IPA: u64 = 0x10_0000;
/// Where every service finds its IPC page.
pub const IPC_PAGE_IPA: u64 = 0x8_0000;
/// Stack a service must have left after its image.
pub const MIN_STACK: u64 = 16 << 10;
/// Offset of the log buffer in the IPC page (see `moat-rt`).
const LOG_OFFSET: u64 = 2048;
const PAGE: u64 = 4096;

use crate::arch::{enter_nested, leave_nested};
use crate::base::cpu::{LOWER_FIQ, LOWER_IRQ, LOWER_SYNC};
use moat_kernel::el2config::RunMask;

/// Budgets a call may take before its service is failed as stuck.
pub const OVERRUN_LIMIT: u64 = 64;

/// Whether a host interrupt may suspend a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preemption {
    /// A host interrupt above [`SERVICE_RUN_PMR`](moat_kernel::el2config::SERVICE_RUN_PMR) suspends the call: calls
    /// the host makes (routed hypercalls, trapped accesses).
    Allowed,
    /// The call runs to its reply (or its service's failure): the core's
    /// own calls, whose callers cannot be handed back half done.
    Never,
}

impl Preemption {
    fn mask(self) -> RunMask {
        match self {
            Preemption::Allowed => RunMask::Service,
            Preemption::Never => RunMask::Transaction,
        }
    }
}
use moat_kernel::esr::HVC0 as ESR_HVC0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum State {
    Ready = 0,
    Busy = 1,
    Failed = 2,
}

/// A call that an interrupt suspended.
#[derive(Clone, Copy)]
struct Pending {
    header: MessageHeader,
    body: [u64; MAX_WORDS],
    cpu: usize,
}

impl Pending {
    /// Whether `header`/`body` from `cpu` is the suspended call issued again:
    /// same caller, same operation, same request. (A re-issued host call has
    /// a new sequence number.)
    fn is_reissue(&self, header: &MessageHeader, body: &[u64], cpu: usize) -> bool {
        let words = (header.payload_len as usize)
            .div_ceil(8)
            .min(body.len())
            .min(MAX_WORDS);
        self.cpu == cpu
            && self.header.service == header.service
            && self.header.operation == header.operation
            && self.header.payload_len == header.payload_len
            && self.body[..words] == body[..words]
    }

    fn new(header: &MessageHeader, body: &[u64], cpu: usize) -> Self {
        let mut copy = [0u64; MAX_WORDS];
        let n = body.len().min(MAX_WORDS);
        copy[..n].copy_from_slice(&body[..n]);
        Self {
            header: *header,
            body: copy,
            cpu,
        }
    }
}

/// One service partition.
pub struct Service {
    pub name: heapless::String<24>,
    pub interface_id: u16,
    pub vmid: u16,
    vttbr: u64,
    /// The service's stage-2, for the consistency checker.
    pub stage2: Option<&'static crate::memory::stage2::StageTwo>,
    memory: Range,
    ipc_page: u64,
    budget_ticks: u64,
    state: AtomicU8,
    sequence: AtomicU32,
    vcpu: UnsafeCell<Vcpu>,
    el1: UnsafeCell<El1Context>,
    pending: UnsafeCell<Option<Pending>>,
    /// A copy of the boot image, for a service the core restarts (the
    /// ledger; the package's pages become heap after boot).
    pristine: Option<&'static [u8]>,
}

// SAFETY: `vcpu`, `el1` and `pending` are only touched by the CPU that holds
// the service in the `Busy` state (an atomic compare-exchange hands it out);
// everything else is immutable after boot or atomic.
unsafe impl Sync for Service {}

struct Services {
    list: Vec<Service>,
    routes: RoutingTable,
}

static SERVICES: Once<Services> = Once::new();

/// The routing table (empty if the image has no services).
pub fn routes() -> Option<&'static RoutingTable> {
    SERVICES.get().map(|s| &s.routes)
}

/// Service `index`.
pub fn get(index: usize) -> Option<&'static Service> {
    SERVICES.get().and_then(|s| s.list.get(index))
}

/// How a service run ended.
enum Exit {
    /// The service issued SVC_REPLY_WAIT.
    Reply,
    /// An interrupt for the host arrived.
    Preempted,
    /// The service must be stopped, for this reason.
    Fault(&'static str, u64),
}

fn service_el2(vttbr: u64, started: bool) -> (u64, u64, u64, u64, u64) {
    use moat_kernel::el2config::{NESTED_CNTHCTL, SERVICE_CPTR, nested_mdcr, service_hcr};
    let mdcr = nested_mdcr(crate::base::state::machine().host_el2.mdcr);
    (
        service_hcr(started),
        SERVICE_CPTR,
        mdcr,
        NESTED_CNTHCTL,
        vttbr,
    )
}

impl Service {
    /// Takes the service for one call. A service has one vCPU, so callers on
    /// other CPUs wait their turn: a trapped instruction cannot be answered
    /// "busy". The wait is bounded by the longest a holder may run
    /// ([`OVERRUN_LIMIT`] budgets) and one more; past that the caller is
    /// told `Busy`.
    fn acquire(&self) -> Result<(), Error> {
        // The clock starts at the first refusal: a free service (the usual
        // case) costs one compare-exchange.
        let mut start = None;
        loop {
            match self.state.compare_exchange(
                State::Ready as u8,
                State::Busy as u8,
                Ordering::Acquire,
                Ordering::Acquire,
            ) {
                Ok(_) => return Ok(()),
                Err(v) if v == State::Failed as u8 => return Err(Error::ServiceFailed),
                Err(_) => {
                    let now = sysreg::now();
                    let patience = self.budget_ticks.saturating_mul(OVERRUN_LIMIT + 1);
                    if now.wrapping_sub(*start.get_or_insert(now)) > patience {
                        return Err(Error::Busy);
                    }
                    core::hint::spin_loop();
                }
            }
        }
    }

    /// Hands the service back after a call ([`acquire`](Self::acquire)'s
    /// other half): `Busy` becomes `Ready`, while a service the call
    /// failed stays failed.
    #[inline(always)]
    fn release(&self) {
        let _ = self.state.compare_exchange(
            State::Busy as u8,
            State::Ready as u8,
            Ordering::Release,
            Ordering::Relaxed,
        );
    }

    fn vcpu(&self) -> *mut Vcpu {
        self.vcpu.get()
    }

    fn fail(&self, why: &str, detail: u64) {
        self.state.store(State::Failed as u8, Ordering::Release);
        if self.pristine.is_some() {
            crate::log!(
                "service {} failed: {why} ({detail:#x}); it will be restarted",
                self.name
            );
            crate::memory::ledger_restart::ledger_failed();
        } else {
            crate::log!(
                "service {} failed: {why} ({detail:#x}); its requests are refused from now on",
                self.name
            );
        }
    }

    /// Writes a call: its header and the `payload_len` bytes of its body
    /// (the service reads no further), or the whole body if it is a
    /// [`SmallBody`] (see [`call`]). Volatile word accesses, so the copies
    /// stay word loads and stores: on every call's path, a call to the
    /// generic (byte-aligned) `memcpy` would cost more than the rest of the
    /// message path. A small body's fixed length unrolls its copy.
    fn ipc_write(&self, header: &MessageHeader, body: &[u64]) {
        let header_words: [u64; HEADER_WORDS] = zerocopy::transmute!(*header);
        let dst = self.ipc_page as *mut u64;
        // SAFETY: the IPC page is a page-aligned page of the core's heap,
        // mapped read/write in the core's stage-1; the service is stopped
        // while the core writes; header and body lie inside the page
        // (HEADER_WORDS + MAX_WORDS words).
        unsafe {
            for (i, w) in header_words.iter().enumerate() {
                dst.add(i).write_volatile(*w);
            }
            let dst = dst.add(HEADER_WORDS);
            if let Ok(small) = <&SmallBody>::try_from(body) {
                for (i, w) in small.iter().enumerate() {
                    dst.add(i).write_volatile(*w);
                }
            } else {
                let words = (header.payload_len as usize)
                    .div_ceil(8)
                    .min(body.len())
                    .min(MAX_WORDS);
                for (i, w) in body[..words].iter().enumerate() {
                    dst.add(i).write_volatile(*w);
                }
            }
        }
    }

    /// Copies the reply's header, and as much of its body as `body` holds,
    /// out of the IPC page before anything checks them. Bytes past the
    /// reply's length are whatever the page held: callers that pass a body
    /// on must clear them.
    fn ipc_read(&self, body: &mut [u64]) -> MessageHeader {
        let src = self.ipc_page as *const u64;
        let mut header_words = [0u64; HEADER_WORDS];
        // SAFETY: as for `ipc_write`; plain words, valid for any bit pattern.
        unsafe {
            for (i, w) in header_words.iter_mut().enumerate() {
                *w = src.add(i).read_volatile();
            }
            let src = src.add(HEADER_WORDS);
            if let Ok(small) = <&mut SmallBody>::try_from(&mut *body) {
                for (i, w) in small.iter_mut().enumerate() {
                    *w = src.add(i).read_volatile();
                }
            } else {
                for (i, w) in body.iter_mut().take(MAX_WORDS).enumerate() {
                    *w = src.add(i).read_volatile();
                }
            }
        }
        zerocopy::transmute!(header_words)
    }

    /// Runs the service's vCPU on `cpu` until it replies, faults, runs for
    /// [`OVERRUN_LIMIT`] budgets or (if `preemption` allows) is interrupted.
    /// EL1 and EL2 state must already be the service's, and the CPU
    /// interface open as `with_partition` leaves it.
    #[inline(never)]
    fn run(&self, cpu: &PerCpu, preemption: Preemption) -> Exit {
        self.run_inline(cpu, preemption)
    }

    /// [`run`](Self::run), inlined (with `run_held`) into the call path:
    /// their frames cost every call more than their code.
    #[inline(always)]
    fn run_inline(&self, cpu: &PerCpu, preemption: Preemption) -> Exit {
        let gic = cpu.gic_access();
        let mut held = gic::HeldBack::default();
        let exit = self.run_held(cpu, preemption, gic.as_ref(), &mut held);
        if let Some(access) = gic.as_ref() {
            gic::release(access, &held);
        }
        exit
    }

    #[inline(always)]
    fn run_held(
        &self,
        cpu: &PerCpu,
        preemption: Preemption,
        gic: Option<&gic::GicAccess>,
        held: &mut gic::HeldBack,
    ) -> Exit {
        let mut deadline = sysreg::now().saturating_add(self.budget_ticks);
        let mut budgets = 1;
        // SAFETY: this CPU holds the service (Busy), so its vCPU is ours.
        let vcpu = unsafe { &mut *self.vcpu() };
        vcpu.cpu = cpu.index as u64;
        loop {
            sysreg::arm_watchdog(deadline);
            // SAFETY: the vCPU frame is complete, its EL1 and EL2 state are
            // loaded, and `nested` is this CPU's save area; the service's
            // next trap returns here through `leave_nested`.
            unsafe { enter_nested(self.vcpu(), cpu.nested.get()) };
            let fired = sysreg::disarm_watchdog();
            if fired {
                // Another budget gone: stuck only once it has taken
                // OVERRUN_LIMIT of them. The exit is handled below as usual.
                if budgets >= OVERRUN_LIMIT {
                    return Exit::Fault(
                        "ran past its budget (the budgets it took in detail)",
                        budgets,
                    );
                }
                budgets += 1;
                deadline = sysreg::now().saturating_add(self.budget_ticks);
            }
            match vcpu.exit_vector {
                LOWER_SYNC => {}
                // The watchdog's own interrupt: handled above.
                LOWER_IRQ if fired => continue,
                // A host interrupt.
                LOWER_IRQ | LOWER_FIQ => {
                    if preemption == Preemption::Allowed {
                        return Exit::Preempted;
                    }
                    match gic {
                        Some(access) if !gic::hold_back(access, held) => gic::mask_all(access),
                        _ => {}
                    }
                    continue;
                }
                v => return Exit::Fault("took an unexpected exception", v),
            }
            let esr = vcpu.exit_esr;
            // The reply is the common case; skip the general decode for it.
            if esr == ESR_HVC0 && vcpu.regs.x[0] as u32 == hypercall::SVC_REPLY_WAIT {
                return Exit::Reply;
            }
            match Trap::decode(esr) {
                Trap::Hvc { imm: 0 } => match vcpu.regs.x[0] as u32 {
                    hypercall::SVC_REPLY_WAIT => return Exit::Reply,
                    hypercall::SVC_LOG => {
                        self.print_log(vcpu.regs.x[1]);
                        vcpu.regs.x[0] = 0;
                    }
                    hypercall::SVC_FAULT => {
                        return Exit::Fault(
                            "reported an exception (ESR_EL1 in detail)",
                            vcpu.regs.x[1],
                        );
                    }
                    _ => vcpu.regs.x[0] = moat_abi::smccc::NOT_SUPPORTED,
                },
                Trap::StageTwo(_) => {
                    return Exit::Fault(
                        "touched memory outside its partition (IPA in detail)",
                        sysreg::fault_ipa(),
                    );
                }
                _ => return Exit::Fault("trapped to the core (ESR_EL2 in detail)", esr),
            }
        }
    }

    /// Out of line: rare, and its buffer would cost every call's frame.
    #[cold]
    #[inline(never)]
    fn print_log(&self, len: u64) {
        let len = len.min(PAGE - LOG_OFFSET) as usize;
        let mut bytes = [0u8; (PAGE - LOG_OFFSET) as usize];
        // SAFETY: the log half of the IPC page; copied before use.
        unsafe {
            core::ptr::copy_nonoverlapping(
                (self.ipc_page + LOG_OFFSET) as *const u8,
                bytes.as_mut_ptr(),
                len,
            );
        }
        let text = core::str::from_utf8(&bytes[..len]).unwrap_or("(log text is not UTF-8)");
        crate::log!("[{}] {}", self.name, text.trim_end());
    }

    /// Switches this CPU to the service, runs `f`, and switches back.
    ///
    /// The host's EL1 context is saved and restored whole: the service's
    /// is loaded over all of it, so the service sees none of the host's and
    /// the host finds its own as it left it.
    ///
    /// A service's context is set up by its own entry code during its first
    /// run (`started` false) and saved whole after it. From then on, a run
    /// that ends in a reply saves only SP_EL1: a started service runs with
    /// HCR_EL2.TVM, so its translation and fault-status controls cannot
    /// change (a write traps and fails it), and the other EL1 registers it
    /// could write (the thread IDs, VBAR, PAR, the virtual timer) are
    /// written only by `moat-rt`'s entry code, before its first reply, so at
    /// a reply they hold what they held then. (A change would be undone at
    /// its next run, never shown to anyone else.) A run an interrupt
    /// suspends, which stops the service anywhere, saves it whole.
    fn with_partition<R>(
        &self,
        cpu: &PerCpu,
        started: bool,
        mask: RunMask,
        f: impl FnOnce() -> R,
    ) -> R {
        let saved = self.switch_in(cpu, started, mask);
        let r = f();
        self.switch_out(cpu, started, saved);
        r
    }

    /// The first half of [`with_partition`](Self::with_partition): the
    /// host's EL1 state saved, the service's loaded, its EL2 controls and
    /// the watchdog's CPU interface set. Returns what `switch_out` restores.
    #[inline(always)]
    fn switch_in(
        &self,
        cpu: &PerCpu,
        started: bool,
        mask: RunMask,
    ) -> Option<(gic::GicAccess, gic::SavedCpuInterface)> {
        let m = crate::base::state::machine();
        // SAFETY: this CPU holds the service; the host's EL1 state is saved
        // before the service's is loaded and restored after (`switch_out`),
        // and both stage-2 tables live forever.
        unsafe {
            (*cpu.host_el1.get()).save();
            (*self.el1.get()).load();
            let (h, c, md, ct, v) = service_el2(self.vttbr, started);
            sysreg::switch_el2(h, c, md, ct, v);
            // Services are given none of the features HCRX_EL2 and the
            // fine-grained traps open.
            sysreg::switch_feature_controls(
                &m.cpu,
                0,
                &moat_kernel::el2config::FineGrainedTraps::default(),
            );
        }
        cpu.gic_access()
            .map(|access| (access, gic::open_watchdog(&access, mask)))
    }

    /// The second half of [`with_partition`](Self::with_partition): the
    /// service's EL1 state saved (whole, or SP_EL1 alone after a reply of a
    /// started service), the host's EL1 and EL2 state back.
    #[inline(always)]
    fn switch_out(
        &self,
        cpu: &PerCpu,
        started: bool,
        saved: Option<(gic::GicAccess, gic::SavedCpuInterface)>,
    ) {
        let m = crate::base::state::machine();
        if let Some((access, saved)) = saved {
            gic::close_watchdog(&access, saved);
        }
        // SAFETY: as in `switch_in`, in reverse. (`pending` is this CPU's
        // while it holds the service; it is set exactly when this run was
        // suspended.)
        unsafe {
            let el1 = &mut *self.el1.get();
            if started && (*self.pending.get()).is_none() {
                el1.save_sp_el1();
            } else {
                el1.save();
            }
            (*cpu.host_el1.get()).load();
            let h = &m.host_el2;
            sysreg::switch_el2(
                h.hcr.load(Ordering::Relaxed),
                h.cptr,
                h.mdcr,
                h.cnthctl,
                h.vttbr,
            );
            sysreg::switch_feature_controls(&m.cpu, h.hcrx, &h.fgt);
        }
    }
}

/// Words of a request or reply body the core moves: every message the core
/// sends or reads today (a host call's 48/56 bytes, a trap descriptor, a
/// verdict) fits, so only this much is copied in and out of the IPC page.
pub const SMALL_WORDS: usize = 8;
/// [`SMALL_WORDS`] in bytes.
pub const SMALL_BODY: usize = SMALL_WORDS * 8;
/// A body on the core's path, as little-endian words.
pub type SmallBody = [u64; SMALL_WORDS];
/// Words of the largest body a message carries.
pub const MAX_WORDS: usize = moat_abi::ipc::PAYLOAD_SIZE / 8;
const HEADER_SIZE: usize = size_of::<MessageHeader>();
const HEADER_WORDS: usize = HEADER_SIZE / 8;
const _: () = assert!(HEADER_SIZE.is_multiple_of(8) && HEADER_SIZE + SMALL_BODY <= MESSAGE_SIZE);

/// Calls service `index` from `cpu` with `header` (a call header whose
/// `payload_len` bytes of `body` are the request). A [`SmallBody`] goes to
/// the service whole, so its words past the request must be zero (they
/// are in every caller: the core never sends what it did not mean to).
/// On return `body` holds the reply's body; bytes past its length are
/// unspecified.
/// Returns the service's checked answer: its length, or the error it chose.
pub fn call(
    cpu: &PerCpu,
    index: usize,
    header: &MessageHeader,
    body: &mut [u64],
    preemption: Preemption,
) -> Result<Result<u32, Error>, Error> {
    match get(index) {
        Some(s) => s.call(cpu, header, body, preemption),
        None => Err(Error::NotSupported),
    }
}

impl Service {
    /// [`call`], for a caller that has the service already.
    pub fn call(
        &self,
        cpu: &PerCpu,
        header: &MessageHeader,
        body: &mut [u64],
        preemption: Preemption,
    ) -> Result<Result<u32, Error>, Error> {
        if header.payload_len as usize > (body.len() * 8).min(moat_abi::ipc::PAYLOAD_SIZE) {
            return Err(Error::InvalidParameters);
        }
        debug_assert!(
            body.len() != SMALL_WORDS
                || body[(header.payload_len as usize).div_ceil(8)..]
                    .iter()
                    .all(|w| *w == 0)
        );
        let _order = crate::base::lockcheck::hold(moat_kernel::lockorder::Rank::Service);
        self.acquire()?;
        // `with_partition` written out, so that the exchange is inlined
        // into one frame with the switch (a closure's call and frames cost
        // every call more than its checks).
        let saved = self.switch_in(cpu, true, preemption.mask());
        let outcome = self.exchange(cpu, header, body, preemption);
        self.switch_out(cpu, true, saved);
        self.release();
        outcome
    }

    /// One message's way through the service, its partition switched in:
    /// the request written, the service run to its reply, the reply copied
    /// out and checked.
    #[inline(always)]
    fn exchange(
        &self,
        cpu: &PerCpu,
        header: &MessageHeader,
        body: &mut [u64],
        preemption: Preemption,
    ) -> Result<Result<u32, Error>, Error> {
        // SAFETY: Busy is ours, so the pending slot is too.
        let pending = unsafe { &mut *self.pending.get() };
        if pending.is_some()
            && let Some(verdict) = self.finish_pending(cpu, pending, header, body, preemption)
        {
            return verdict;
        }
        self.ipc_write(header, body);
        // SAFETY: Busy is ours, so the vCPU is too; SVC_REPLY_WAIT returns 0.
        unsafe { (*self.vcpu()).regs.x[0] = 0 };
        match self.run_inline(cpu, preemption) {
            Exit::Reply => {
                let reply = self.ipc_read(body);
                finish(self, &reply, header, body.len() * 8)
            }
            Exit::Preempted => {
                *pending = Some(Pending::new(header, body, cpu.index));
                Err(Error::Interrupted)
            }
            Exit::Fault(why, detail) => Err(fail(self, why, detail)),
        }
    }

    /// Finishes the call an interrupt suspended, before `header`/`body`.
    /// Returns the verdict for this caller if that call was its own (issued
    /// again) or cannot be finished; `None` when the new call may go ahead.
    /// Out of line: rare, and its buffers would cost every call a larger
    /// stack frame.
    #[cold]
    #[inline(never)]
    fn finish_pending(
        &self,
        cpu: &PerCpu,
        pending: &mut Option<Pending>,
        header: &MessageHeader,
        body: &mut [u64],
        preemption: Preemption,
    ) -> Option<Result<Result<u32, Error>, Error>> {
        let p = pending.take()?;
        match self.run(cpu, preemption) {
            Exit::Reply => {
                let reissue = p.is_reissue(header, body, cpu.index);
                let mut reply_body = [0u64; MAX_WORDS];
                let reply = self.ipc_read(&mut reply_body[..body.len().min(MAX_WORDS)]);
                // The reply is checked against the call it answers either way.
                let verdict = finish(self, &reply, &p.header, body.len() * 8);
                if reissue || verdict.is_err() {
                    let n = body.len().min(MAX_WORDS);
                    body[..n].copy_from_slice(&reply_body[..n]);
                    return Some(verdict);
                }
                // Its caller moved on; the result is dropped.
                None
            }
            Exit::Preempted => {
                *pending = Some(p);
                Some(Err(Error::Interrupted))
            }
            Exit::Fault(why, detail) => Some(Err(fail(self, why, detail))),
        }
    }

    /// The next sequence number for a call to this service.
    pub fn next_sequence(&self) -> u32 {
        self.sequence.fetch_add(1, Ordering::Relaxed)
    }
}

fn fail(s: &Service, why: &'static str, detail: u64) -> Error {
    s.fail(why, detail);
    Error::ServiceFailed
}

/// Checks a reply (already copied out of the IPC page) against its call.
/// A reply too long for the core's buffer is the caller's problem (the
/// interface's reply does not fit this path), not the service's.
#[inline(always)]
fn finish(
    s: &Service,
    reply: &MessageHeader,
    call: &MessageHeader,
    capacity: usize,
) -> Result<Result<u32, Error>, Error> {
    match reply.check_reply_to(call) {
        Ok(_) if reply.payload_len as usize > capacity => Err(Error::InvalidParameters),
        Ok(Ok(())) => Ok(Ok(reply.payload_len)),
        Ok(Err(e)) => Ok(Err(e)),
        // A service built for another major ABI version answers in its own
        // version: the caller learns so, and the service is not blamed.
        Err(MessageError::Version(_)) => Err(Error::VersionMismatch),
        Err(e) => {
            s.fail(
                "answered with a malformed reply",
                u64::from(e.to_error().code() as u32),
            );
            Err(Error::ServiceFailed)
        }
    }
}

/// The next sequence number for a call to `s`.
pub fn next_sequence(index: usize) -> u32 {
    get(index).map_or(0, Service::next_sequence)
}

/// Calls `operation` of service `index` with `request` and decodes its
/// reply, which must be exactly an `R`. For the core's calls off the hot
/// paths (boot, memory transactions, VM creation); a routed host call and a
/// trapped access build their bodies word by word instead. An error the
/// service answered and an error of the call itself both come back as the
/// error; a reply of another size is `InvalidParameters`.
pub fn call_typed<Q, R>(cpu: &PerCpu, index: usize, operation: u16, request: &Q) -> Result<R, Error>
where
    Q: IntoBytes + zerocopy::Immutable,
    R: zerocopy::FromBytes,
{
    const { assert!(size_of::<Q>() <= moat_abi::ipc::PAYLOAD_SIZE) };
    let s = get(index).ok_or(Error::NotSupported)?;
    let header = MessageHeader::call(
        s.interface_id,
        operation,
        s.next_sequence(),
        size_of::<Q>() as u32,
    );
    // Small messages (most) take the call path's unrolled copies.
    if size_of::<Q>().max(size_of::<R>()) <= SMALL_BODY {
        let mut body: SmallBody = [0; SMALL_WORDS];
        body.as_mut_bytes()[..size_of::<Q>()].copy_from_slice(request.as_bytes());
        typed_reply(s.call(cpu, &header, &mut body, Preemption::Never)?, &body)
    } else {
        let mut body = [0u64; MAX_WORDS];
        body.as_mut_bytes()[..size_of::<Q>()].copy_from_slice(request.as_bytes());
        typed_reply(s.call(cpu, &header, &mut body, Preemption::Never)?, &body)
    }
}

/// Decodes the reply of [`call_typed`]: exactly an `R`, or the error.
fn typed_reply<R: zerocopy::FromBytes>(
    answer: Result<u32, Error>,
    body: &[u64],
) -> Result<R, Error> {
    match answer {
        Ok(len) if len as usize == size_of::<R>() => {
            R::read_from_bytes(&body.as_bytes()[..size_of::<R>()])
                .map_err(|_| Error::InvalidParameters)
        }
        Ok(_) => Err(Error::InvalidParameters),
        Err(e) => Err(e),
    }
}

/// A trap descriptor as a message body: word by word, the rest zero (a
/// byte copy here would be a call to the generic `memcpy`).
pub fn trap_body(trap: &TrapDescriptor) -> SmallBody {
    const WORDS: usize = size_of::<TrapDescriptor>() / 8;
    const _: () = assert!(size_of::<TrapDescriptor>() == WORDS * 8 && WORDS <= SMALL_WORDS);
    let words: [u64; WORDS] = zerocopy::transmute!(*trap);
    let mut body: SmallBody = [0; SMALL_WORDS];
    for (b, w) in body.iter_mut().zip(words) {
        *b = w;
    }
    body
}

/// Tells every service that observes `trap`'s class about it.
pub fn notify_observers(cpu: &PerCpu, trap: &TrapDescriptor) {
    let Some(all) = SERVICES.get() else { return };
    let Some(class) = moat_abi::trap::TrapClass::from_u32(trap.class) else {
        return;
    };
    if !all.routes.is_observed(class) {
        return;
    }
    for index in all.routes.observers(class) {
        let Some(s) = all.list.get(index) else {
            continue;
        };
        let mut body = trap_body(trap);
        let header = MessageHeader::call(
            s.interface_id,
            moat_abi::trap::OBSERVE_OPERATION,
            next_sequence(index),
            size_of::<TrapDescriptor>() as u32,
        );
        // A notice is one-way: the reply's content does not matter, and a
        // suspended notice is finished by the service's next call.
        let _ = call(cpu, index, &header, &mut body, Preemption::Allowed);
    }
}

/// Handles an exception from a running service vCPU: records why it stopped
/// and returns to the core code that entered it.
pub fn exit_from_service(vcpu: *mut Vcpu, vector: u64) -> ! {
    // SAFETY: the vector passed the frame TPIDR_EL2 named, which is this
    // running service's vCPU; the CPU running it is recorded in it.
    let v = unsafe { &mut *vcpu };
    v.exit_vector = vector;
    v.exit_esr = sysreg::esr_el2();
    let cpu = crate::base::cpu::get(v.cpu as usize).unwrap_or_else(|| crate::base::panic::park());
    // SAFETY: `nested` holds the state `enter_nested` saved on this CPU.
    unsafe { leave_nested(cpu.nested.get()) }
}

/// Why a service could not be created.
#[derive(Debug)]
pub enum SetupError {
    NoImage,
    BadHeader,
    TooLarge { footprint: u64, memory: u64 },
    NoMemory,
    StageTwo(crate::memory::stage2::MapError),
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoImage => write!(f, "the package has no image for it"),
            Self::BadHeader => write!(f, "its image has no valid service header"),
            Self::TooLarge { footprint, memory } => write!(
                f,
                "its image needs {footprint} bytes plus {MIN_STACK} of stack but its budget is {memory}"
            ),
            Self::NoMemory => write!(f, "the hypervisor heap is exhausted"),
            Self::StageTwo(e) => write!(f, "{e}"),
        }
    }
}

/// The header `moat-rt` puts at the start of every service image.
struct ServiceHeader {
    text_size: u64,
    footprint: u64,
}

fn parse_header(image: &[u8]) -> Option<ServiceHeader> {
    let word = |at: usize| {
        image
            .get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if image.get(8..16) != Some(b"MOATSVC1".as_slice()) {
        return None;
    }
    let (text_size, footprint) = (word(16)?, word(24)?);
    if text_size % PAGE != 0
        || footprint % PAGE != 0
        || text_size > footprint
        || (image.len() as u64) > footprint
    {
        return None;
    }
    Some(ServiceHeader {
        text_size,
        footprint,
    })
}

fn alloc_pages(bytes: u64) -> Option<u64> {
    let layout = core::alloc::Layout::from_size_align(bytes as usize, PAGE as usize).ok()?;
    // SAFETY: a non-zero-sized layout; the pages are never freed (services live forever).
    let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
    if p.is_null() { None } else { Some(p as u64) }
}

fn create(
    index: usize,
    record: &ServiceRecord,
    image: Option<&[u8]>,
    start_level: usize,
) -> Result<Service, SetupError> {
    let image = image.ok_or(SetupError::NoImage)?;
    let header = parse_header(image).ok_or(SetupError::BadHeader)?;
    let memory = u64::from(record.memory_bytes.get()).next_multiple_of(PAGE);
    if header.footprint + MIN_STACK > memory {
        return Err(SetupError::TooLarge {
            footprint: header.footprint,
            memory,
        });
    }
    let base = alloc_pages(memory).ok_or(SetupError::NoMemory)?;
    let ipc_page = alloc_pages(PAGE).ok_or(SetupError::NoMemory)?;
    // SAFETY: `base` is a fresh allocation of `memory >= image.len()` bytes.
    unsafe { core::ptr::copy_nonoverlapping(image.as_ptr(), base as *mut u8, image.len()) };
    crate::arch::cache::clean_dcache_to_poc(base, memory);

    let vmid = 1 + index as u16;
    let mut s2 =
        crate::memory::stage2::StageTwo::new(start_level, vmid).map_err(SetupError::StageTwo)?;
    s2.map(
        SERVICE_BASE_IPA,
        base,
        header.text_size,
        crate::memory::stage2::Access::ReadExecute,
    )
    .map_err(SetupError::StageTwo)?;
    s2.map(
        SERVICE_BASE_IPA + header.text_size,
        base + header.text_size,
        memory - header.text_size,
        crate::memory::stage2::Access::ReadWrite,
    )
    .map_err(SetupError::StageTwo)?;
    s2.map(
        IPC_PAGE_IPA,
        ipc_page,
        PAGE,
        crate::memory::stage2::Access::ReadWrite,
    )
    .map_err(SetupError::StageTwo)?;
    let stage2 = s2.activate();
    let vttbr = stage2.vttbr();

    let mut name = heapless::String::new();
    let _ = name.push_str(record.name());
    let mut vcpu = Vcpu::new(VCPU_SERVICE_BASE + index as u64, 0);
    vcpu.regs = GuestRegs::el1h_entry(SERVICE_BASE_IPA, SERVICE_BASE_IPA + memory);
    vcpu.regs.x[1] = IPC_PAGE_IPA;
    let (now, freq) = sysreg::counter();
    let _ = now;
    let budget_ticks = u64::from(record.budget_us.get())
        .max(1)
        .saturating_mul(freq)
        / 1_000_000;
    Ok(Service {
        name,
        interface_id: record.interface_id.get(),
        vmid,
        vttbr,
        stage2: Some(stage2),
        memory: Range::new(base, memory).unwrap_or_default(),
        ipc_page,
        budget_ticks: budget_ticks.max(1),
        state: AtomicU8::new(State::Busy as u8),
        sequence: AtomicU32::new(1),
        vcpu: UnsafeCell::new(vcpu),
        el1: UnsafeCell::new(El1Context::reset()),
        pending: UnsafeCell::new(None),
        pristine: keep_image(record.interface_id.get(), image),
    })
}

/// Creates every service the package declares (copying its image out of the
/// package) and checks the routing table. A service that cannot be created
/// is logged and left failed; the rest of the system boots. Returns how many
/// services there are.
pub fn create_all(
    package_services: &[(ServiceRecord, Option<&[u8]>)],
    start_level: usize,
) -> Result<usize, moat_kernel::routing::RoutingError> {
    let specs: heapless::Vec<RouteSpec, { moat_package::MAX_SERVICES }> = package_services
        .iter()
        .map(|(r, _)| RouteSpec {
            first: r.hypercall_first.get(),
            count: r.hypercall_count.get(),
            observes: r.observes.get(),
            handles: r.handles.get(),
        })
        .collect();
    let routes = RoutingTable::build(&specs)?;
    let mut list = Vec::new();
    for (i, (record, image)) in package_services.iter().enumerate() {
        match create(i, record, *image, start_level) {
            Ok(s) => list.push(s),
            Err(e) => {
                crate::log!("service {} not created: {e}", record.name());
                // A placeholder that refuses every call keeps indices stable.
                let mut name = heapless::String::new();
                let _ = name.push_str(record.name());
                list.push(Service {
                    name,
                    interface_id: record.interface_id.get(),
                    vmid: 0,
                    vttbr: 0,
                    stage2: None,
                    memory: Range::default(),
                    ipc_page: 0,
                    budget_ticks: 1,
                    state: AtomicU8::new(State::Failed as u8),
                    sequence: AtomicU32::new(0),
                    vcpu: UnsafeCell::new(Vcpu::new(0, 0)),
                    el1: UnsafeCell::new(El1Context::ZERO),
                    pending: UnsafeCell::new(None),
                    pristine: None,
                });
            }
        }
    }
    let n = list.len();
    SERVICES.call_once(|| Services { list, routes });
    Ok(n)
}

/// Runs every created service to its first `SVC_REPLY_WAIT` on `cpu`.
pub fn start_all(cpu: &PerCpu) {
    let Some(all) = SERVICES.get() else { return };
    for s in &all.list {
        if s.state.load(Ordering::Relaxed) == State::Failed as u8 {
            continue;
        }
        let started = s.with_partition(cpu, false, RunMask::Transaction, || {
            s.run(cpu, Preemption::Never)
        });
        match started {
            Exit::Reply => {
                s.state.store(State::Ready as u8, Ordering::Release);
                crate::log!(
                    "service {} ready: {} KiB at {:#x}, VMID {}, interface {}",
                    s.name,
                    s.memory.size >> 10,
                    s.memory.base,
                    s.vmid,
                    s.interface_id
                );
            }
            Exit::Preempted => s.fail("was interrupted while starting", 0),
            Exit::Fault(why, detail) => s.fail(why, detail),
        }
    }
}

/// The records and images of the package, paired.
pub fn package_services<'a>(
    package: &Package<'a>,
) -> heapless::Vec<(ServiceRecord, Option<&'a [u8]>), { moat_package::MAX_SERVICES }> {
    package
        .services()
        .map(|r| (r, package.service_image(&r)))
        .take(moat_package::MAX_SERVICES)
        .collect()
}

/// Asks the MTE policy service (the service serving the `mte` interface,
/// if the image has one) whether the host may use MTE.
///
/// `None`: the image has no MTE policy, and the host gets MTE as the hardware
/// offers it. An MTE policy that cannot answer is an error: the core will
/// not guess a security policy.
pub fn host_mte_policy(
    cpu: &PerCpu,
    hardware_level: u32,
    command_line: &str,
    command_line_total: usize,
) -> Option<Result<bool, Error>> {
    use moat_abi::services::{MteBootInfo, MtePolicy, mte};
    let index = index_of(mte::SERVICE_ID)?;
    let mut info = MteBootInfo {
        hardware_level,
        ..Default::default()
    };
    let n = command_line.len().min(info.command_line.len());
    info.command_line[..n].copy_from_slice(&command_line.as_bytes()[..n]);
    info.command_line_len = n as u32;
    info.command_line_total = command_line_total.min(u32::MAX as usize) as u32;
    let policy: Result<MtePolicy, Error> =
        call_typed(cpu, index, mte::Operation::configure as u16, &info);
    Some(policy.map(|p| p.host_mte == 1))
}

/// Builds the ledger (the service serving the `ledger` interface, if the
/// image has one) from the machine's RAM and the hypervisor's memory, and
/// returns its size: extents and bytes of state.
pub fn ledger_boot(
    cpu: &PerCpu,
    ram: &[Range],
    hypervisor: &[Range],
) -> Option<Result<(u64, u64), Error>> {
    use moat_abi::services::{FrameRange, LEDGER_BOOT_RANGES, LedgerBoot, LedgerSummary, ledger};
    let index = index_of(ledger::SERVICE_ID)?;
    let frames = |r: &Range| FrameRange {
        start: r.base / PAGE,
        count: r.size / PAGE,
    };
    let mut boot = LedgerBoot::default();
    for (slot, r) in boot.ram.iter_mut().zip(ram.iter().take(LEDGER_BOOT_RANGES)) {
        *slot = frames(r);
    }
    for (slot, r) in boot
        .hypervisor
        .iter_mut()
        .zip(hypervisor.iter().take(LEDGER_BOOT_RANGES))
    {
        *slot = frames(r);
    }
    boot.ram_count = ram.len().min(LEDGER_BOOT_RANGES) as u32;
    boot.hypervisor_count = hypervisor.len().min(LEDGER_BOOT_RANGES) as u32;
    let summary: Result<LedgerSummary, Error> =
        call_typed(cpu, index, ledger::Operation::boot as u16, &boot);
    Some(summary.map(|s| (s.extents, s.state_bytes)))
}

/// The service serving interface `interface_id`, if the image has one.
pub fn index_of(interface_id: u16) -> Option<usize> {
    SERVICES
        .get()?
        .list
        .iter()
        .position(|s| s.interface_id == interface_id)
}

/// A heap copy of `image` when the service is one the core restarts (the
/// ledger, [`crate::partition::ledger_restart`]); `None` for the others, and when the
/// heap has no room (the ledger then cannot be restarted, and says so).
fn keep_image(interface_id: u16, image: &[u8]) -> Option<&'static [u8]> {
    if interface_id != moat_abi::services::ledger::SERVICE_ID {
        return None;
    }
    let mut copy = Vec::new();
    if copy.try_reserve_exact(image.len()).is_err() {
        crate::log!("no room to keep the ledger's image: it cannot be restarted");
        return None;
    }
    copy.extend_from_slice(image);
    Some(copy.leak())
}

impl Service {
    /// Stops the service as a fault would: its calls are refused until it
    /// is restarted.
    pub fn stop(&self, why: &'static str) {
        self.state.store(State::Failed as u8, Ordering::Release);
        crate::log!("service {} stopped: {why}", self.name);
    }

    /// Restarts the service from its boot image: its memory is zeroed and
    /// the image copied in again, its IPC page zeroed, its vCPU and EL1
    /// state reset, its VMID's TLB entries dropped, and it runs to its
    /// first `SVC_REPLY_WAIT` as at boot. Nothing of the stopped service
    /// survives. The service must not be in a call (the caller holds the
    /// lock every call to it is made under). `NotSupported` for a service
    /// the core keeps no image of.
    pub fn restart(&self, cpu: &PerCpu) -> Result<(), Error> {
        let image = self.pristine.ok_or(Error::NotSupported)?;
        let taken = [State::Failed, State::Ready].iter().any(|from| {
            self.state
                .compare_exchange(
                    *from as u8,
                    State::Busy as u8,
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_ok()
        });
        if !taken {
            return Err(Error::Busy);
        }
        let (base, size) = (self.memory.base, self.memory.size);
        // SAFETY: the service's memory and IPC page are heap pages the core
        // gave it at boot (image.len() <= size, checked then), mapped
        // read/write at EL2; the service is not running (Busy is ours).
        unsafe {
            core::ptr::write_bytes(base as *mut u8, 0, size as usize);
            core::ptr::copy_nonoverlapping(image.as_ptr(), base as *mut u8, image.len());
            core::ptr::write_bytes(self.ipc_page as *mut u8, 0, PAGE as usize);
        }
        crate::arch::cache::clean_dcache_to_poc(base, size);
        crate::arch::cache::clean_dcache_to_poc(self.ipc_page, PAGE);
        crate::memory::stage2::flush_vmid(self.vttbr);
        // SAFETY: Busy is ours, so the vCPU, EL1 state and pending slot are.
        unsafe {
            let vcpu = &mut *self.vcpu();
            vcpu.regs = GuestRegs::el1h_entry(SERVICE_BASE_IPA, SERVICE_BASE_IPA + size);
            vcpu.regs.x[1] = IPC_PAGE_IPA;
            *self.el1.get() = El1Context::reset();
            *self.pending.get() = None;
        }
        let exit = self.with_partition(cpu, false, RunMask::Transaction, || {
            self.run(cpu, Preemption::Never)
        });
        match exit {
            // A stop that came meanwhile (from another CPU) stands: only
            // the Busy this restart took becomes Ready.
            Exit::Reply => {
                self.release();
                Ok(())
            }
            Exit::Preempted => Err(fail(self, "was interrupted while restarting", 0)),
            Exit::Fault(why, detail) => Err(fail(self, why, detail)),
        }
    }
}

/// The ledger's calls, for the transaction engine below (`memory::Ledger`):
/// each goes to the service serving the ledger interface, if the image has
/// one.
pub struct LedgerService;

/// What boot hands to `memory::set_ledger`.
pub static LEDGER: LedgerService = LedgerService;

impl LedgerService {
    fn call<Q, R>(cpu: &PerCpu, operation: ledger::Operation, request: &Q) -> Result<R, Error>
    where
        Q: IntoBytes + zerocopy::Immutable,
        R: zerocopy::FromBytes,
    {
        let index = index_of(ledger::SERVICE_ID).ok_or(Error::NotSupported)?;
        call_typed(cpu, index, operation as u16, request)
    }
}

impl crate::memory::Ledger for LedgerService {
    fn lookup(&self, cpu: &PerCpu, pfn: u64) -> Result<LedgerExtent, Error> {
        Self::call(cpu, ledger::Operation::lookup, &pfn)
    }

    fn extent(&self, cpu: &PerCpu, n: u64) -> Result<LedgerExtent, Error> {
        Self::call(cpu, ledger::Operation::extent, &n)
    }

    fn prepare(&self, cpu: &PerCpu, request: &LedgerRequest) -> Result<LedgerTransaction, Error> {
        Self::call(cpu, ledger::Operation::prepare, request)
    }

    fn commit(&self, cpu: &PerCpu, generation: u64) -> Result<u64, Error> {
        Self::call(cpu, ledger::Operation::commit, &generation)
    }
}

/// Sends `trap` to handler service `index` for a verdict (applied by
/// `moat_kernel::verdict::apply_verdict`).
pub fn ask(cpu: &PerCpu, index: usize, trap: &TrapDescriptor) -> Answer {
    use moat_abi::Error;
    use moat_abi::ipc::MessageHeader;
    use moat_abi::trap::{DECIDE_OPERATION, Verdict};
    use zerocopy::{FromBytes, IntoBytes};
    let Some(s) = get(index) else {
        return Answer::Refused;
    };
    let mut body = trap_body(trap);
    let header = MessageHeader::call(
        s.interface_id,
        DECIDE_OPERATION,
        s.next_sequence(),
        size_of::<TrapDescriptor>() as u32,
    );
    match s.call(cpu, &header, &mut body, Preemption::Allowed) {
        Ok(Ok(len)) if len as usize == size_of::<Verdict>() => {
            match Verdict::read_from_bytes(&body.as_bytes()[..size_of::<Verdict>()]) {
                Ok(v) => Answer::Verdict(v),
                Err(_) => Answer::Refused,
            }
        }
        // The instruction runs again after the interrupt, and the
        // suspended decision is finished then.
        Err(Error::Interrupted) => Answer::Interrupted,
        _ => Answer::Refused,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Services over the host stand-in for `arch`: the world switch into
    //! EL1 is scripted (`arch::on_entry`: what the service does when the
    //! core enters it, and how it traps back), the IPC page and the
    //! service's memory are the test process's heap. The machine is the
    //! memory tests' (`memory::tests::world`); the services are made once
    //! per process, one for each way a test leaves one failed for good.

    use super::*;
    use crate::arch::sysreg::{
        El1Context, HOST_CPTR, HOST_HCR, SP_EL1_WORD, el1_registers, el2_controls, fire_watchdog,
        set_el1_register, set_mpidr, with_regs,
    };
    use crate::arch::{
        PartitionOp, clear_entries, entries_left, on_entry, take_lines, take_partition_log,
    };
    use crate::memory::tests::{serial, world};
    use moat_abi::trap::Verdict;
    use std::sync::{MutexGuard, OnceLock};
    use zerocopy::little_endian::{U16, U32};

    /// The services, by index.
    pub(crate) const ECHO: usize = 0;
    pub(crate) const HOSTILE: usize = 1;
    pub(crate) const FAULTY: usize = 2;
    pub(crate) const SLOW: usize = 3;
    pub(crate) const MISSING: usize = 4;
    pub(crate) const LEDGER: usize = 5;
    pub(crate) const WRONG: usize = 6;
    /// Host functions routed to ECHO, from the routed range's first.
    pub(crate) const ECHO_FUNCTIONS: u16 = 4;
    /// The interface of service `i` (the ledger's is the ledger's).
    pub(crate) fn interface(i: usize) -> u16 {
        if i == LEDGER {
            ledger::SERVICE_ID
        } else {
            0x70 + i as u16
        }
    }

    /// A service image: the `moat-rt` header, one page of text, one of
    /// data, the text's first word a mark.
    fn image() -> Vec<u8> {
        let mut image = vec![0u8; 2 * PAGE as usize];
        image[..8].copy_from_slice(&0x5eed_u64.to_le_bytes());
        image[8..16].copy_from_slice(b"MOATSVC1");
        image[16..24].copy_from_slice(&PAGE.to_le_bytes());
        image[24..32].copy_from_slice(&(2 * PAGE).to_le_bytes());
        image
    }

    fn record(i: usize) -> ServiceRecord {
        let mut r = ServiceRecord::default();
        let name = format!("svc{i}");
        r.name[..name.len()].copy_from_slice(name.as_bytes());
        r.interface_id = U16::new(interface(i));
        r.memory_bytes = U32::new(64 << 10);
        r.budget_us = U32::new(1000);
        if i == ECHO {
            // It observes SMCs, decides system-register traps and serves
            // the first functions of the routed range (the dispatch tests').
            r.observes = U32::new(moat_abi::trap::TrapClass::Smc.bit());
            r.handles = U32::new(moat_abi::trap::TrapClass::SysReg.bit());
            r.hypercall_first = U16::new(hypercall::SERVICE_RANGE_START);
            r.hypercall_count = U16::new(ECHO_FUNCTIONS);
        }
        r
    }

    /// The service at the entry answers `SVC_REPLY_WAIT`.
    pub(crate) fn reply_wait(v: &mut Vcpu) {
        v.exit_vector = LOWER_SYNC;
        v.exit_esr = ESR_HVC0;
        v.regs.x[0] = u64::from(hypercall::SVC_REPLY_WAIT);
    }

    /// The machine and the services, made and started once; then one test
    /// at a time, playing CPU 0.
    pub(crate) fn services() -> MutexGuard<'static, ()> {
        let turn = serial();
        static MADE: OnceLock<()> = OnceLock::new();
        MADE.get_or_init(|| {
            world();
            let image = image();
            let image: &'static [u8] = image.leak();
            let mut package = Vec::new();
            for i in 0..=WRONG {
                let mut r = record(i);
                let img = match i {
                    MISSING => None,
                    WRONG => {
                        // A service too large for its memory.
                        r.memory_bytes = U32::new(PAGE as u32);
                        Some(image)
                    }
                    _ => Some(image),
                };
                package.push((r, img));
            }
            assert_eq!(create_all(&package, 0), Ok(WRONG + 1));
            // Every service created runs to its first reply; a start that
            // faults leaves the service failed (none here).
            for _ in 0..WRONG - 1 {
                on_entry(reply_wait);
            }
            start_all(cpu(0));
            assert_eq!(entries_left(), 0);
            take_lines();
        });
        set_mpidr(0);
        clear_entries();
        turn
    }

    pub(crate) fn cpu(i: usize) -> &'static PerCpu {
        crate::base::cpu::get(i).unwrap()
    }

    pub(crate) fn service(i: usize) -> &'static Service {
        get(i).unwrap()
    }

    pub(crate) fn state(i: usize) -> u8 {
        service(i).state.load(Ordering::Relaxed)
    }

    /// Writes a reply (header and body words) into service `i`'s IPC page,
    /// as the service would.
    pub(crate) fn write_reply(i: usize, header: &MessageHeader, body: &[u64]) {
        let page = service(i).ipc_page as *mut u64;
        let words: [u64; HEADER_WORDS] = zerocopy::transmute!(*header);
        for (n, w) in words.iter().chain(body).enumerate() {
            // SAFETY: the service's IPC page, a heap page the test reads and
            // writes only while the service "runs".
            unsafe { page.add(n).write_volatile(*w) };
        }
    }

    /// The call header and the first body words service `i`'s IPC page
    /// holds.
    pub(crate) fn read_call(i: usize) -> (MessageHeader, [u64; 4]) {
        let page = service(i).ipc_page as *const u64;
        let mut words = [0u64; HEADER_WORDS + 4];
        for (n, w) in words.iter_mut().enumerate() {
            // SAFETY: as in `write_reply`.
            *w = unsafe { page.add(n).read_volatile() };
        }
        let header: [u64; HEADER_WORDS] = words[..HEADER_WORDS].try_into().unwrap();
        (
            zerocopy::transmute!(header),
            words[HEADER_WORDS..].try_into().unwrap(),
        )
    }

    /// The call header and the whole request service `i`'s IPC page holds.
    pub(crate) fn read_payload(i: usize) -> (MessageHeader, Vec<u8>) {
        let (call, _) = read_call(i);
        let page = (service(i).ipc_page as *const u8).wrapping_add(HEADER_WORDS * 8);
        let len = (call.payload_len as usize).min(MAX_WORDS * 8);
        // SAFETY: as in `write_reply`; the payload lies in the page.
        let payload = unsafe { core::slice::from_raw_parts(page, len) }.to_vec();
        (call, payload)
    }

    /// The service answers the call in its IPC page with `body`, or with
    /// the header `tamper` makes of the right one.
    pub(crate) fn answer(i: usize, body: Vec<u64>, tamper: fn(&mut MessageHeader)) {
        on_entry(move |v| {
            let (call, _) = read_call(i);
            let mut reply = MessageHeader::reply_to(&call, Ok(()), 8 * body.len() as u32);
            tamper(&mut reply);
            write_reply(i, &reply, &body);
            reply_wait(v);
        });
    }

    pub(crate) fn small(words: &[u64]) -> SmallBody {
        let mut b = [0; SMALL_WORDS];
        b[..words.len()].copy_from_slice(words);
        b
    }

    pub(crate) fn call_header(i: usize, operation: u16, len: u32) -> MessageHeader {
        MessageHeader::call(interface(i), operation, next_sequence(i), len)
    }

    #[test]
    fn a_call_runs_the_service_in_its_partition_and_gives_the_host_its_state_back() {
        let _turn = services();
        let s = service(ECHO);
        // The host's EL1 state as it made the call.
        for w in 0..24 {
            set_el1_register(w, 0x1000 + w as u64);
        }
        let host_el1 = el1_registers();
        let host_vttbr = crate::base::state::machine().host_el2.vttbr;
        let service_vttbr = s.vttbr;
        take_partition_log();
        on_entry(move |v| {
            // Inside: the service's stage-2 and EL2 controls, its EL1 state
            // (none of the host's), and the request in the IPC page.
            let [hcr, _, _, _, vttbr] = el2_controls();
            assert_eq!(vttbr, service_vttbr);
            assert_ne!(hcr, HOST_HCR);
            let inside = el1_registers();
            assert!((0..24).all(|w| inside[w] != 0x1000 + w as u64));
            assert_eq!(v.regs.x[0], 0, "SVC_REPLY_WAIT returns 0");
            let (call, body) = read_call(ECHO);
            assert_eq!((call.operation, call.payload_len), (7, 16));
            assert_eq!(body[..3], [11, 22, 0]);
            // The service moves its stack and answers with the sum.
            set_el1_register(SP_EL1_WORD, 0x5_0000);
            let reply = MessageHeader::reply_to(&call, Ok(()), 8);
            write_reply(ECHO, &reply, &[body[0] + body[1]]);
            reply_wait(v);
        });
        let header = call_header(ECHO, 7, 16);
        let mut body = small(&[11, 22]);
        assert_eq!(
            call(cpu(0), ECHO, &header, &mut body, Preemption::Never),
            Ok(Ok(8))
        );
        assert_eq!(body[0], 33);
        assert_eq!(entries_left(), 0);
        // The host finds its EL1 state and EL2 controls as it left them.
        assert_eq!(el1_registers(), host_el1);
        assert_eq!(el2_controls(), [HOST_HCR, HOST_CPTR, 0x6, 0x3, host_vttbr]);
        // The service keeps what it changed (SP_EL1 alone, after a reply).
        // SAFETY: the test holds the turn; the service is Ready, not running.
        let el1: El1Context = unsafe { *s.el1.get() };
        assert_eq!(el1.word(SP_EL1_WORD), 0x5_0000);
        assert_eq!(state(ECHO), State::Ready as u8);
        // One switch in, with the watchdog armed for the run, one back.
        let log = take_partition_log();
        let switches: Vec<_> = log
            .iter()
            .filter_map(|op| match op {
                PartitionOp::SwitchEl2 { vttbr, .. } => Some(*vttbr),
                _ => None,
            })
            .collect();
        assert_eq!(switches, [service_vttbr, host_vttbr]);
        assert_eq!(
            log.iter()
                .filter(|op| matches!(op, PartitionOp::ArmWatchdog(_)))
                .count(),
            1
        );
    }

    #[test]
    fn a_service_held_on_one_cpu_is_waited_for_then_busy_and_ready_after() {
        let _turn = services();
        let header = call_header(ECHO, 1, 0);
        on_entry(move |v| {
            // CPU 1 calls while CPU 0 holds the service: it waits out the
            // longest a holder may run, then hears Busy.
            set_mpidr(1);
            let h = call_header(ECHO, 2, 0);
            let mut body = small(&[]);
            assert_eq!(
                call(cpu(1), ECHO, &h, &mut body, Preemption::Allowed),
                Err(Error::Busy)
            );
            set_mpidr(0);
            let (call, _) = read_call(ECHO);
            write_reply(ECHO, &MessageHeader::reply_to(&call, Ok(()), 0), &[]);
            reply_wait(v);
        });
        let mut body = small(&[]);
        assert_eq!(
            call(cpu(0), ECHO, &header, &mut body, Preemption::Never),
            Ok(Ok(0))
        );
        // Handed back: CPU 1 gets it now.
        set_mpidr(1);
        answer(ECHO, vec![], |_| {});
        let h = call_header(ECHO, 3, 0);
        assert_eq!(
            call(cpu(1), ECHO, &h, &mut body, Preemption::Allowed),
            Ok(Ok(0))
        );
        set_mpidr(0);
        assert_eq!(state(ECHO), State::Ready as u8);
        assert_eq!(entries_left(), 0);
    }

    #[test]
    fn replies_the_caller_cannot_use_are_refused_and_the_service_is_not_blamed() {
        let _turn = services();
        // An error the service chose comes back as its answer.
        on_entry(|v| {
            let (call, _) = read_call(ECHO);
            let reply = MessageHeader::reply_to(&call, Err(Error::Denied), 0);
            write_reply(ECHO, &reply, &[]);
            reply_wait(v);
        });
        let h = call_header(ECHO, 1, 8);
        assert_eq!(
            call(cpu(0), ECHO, &h, &mut small(&[1]), Preemption::Never),
            Ok(Err(Error::Denied))
        );
        // Longer than the caller's buffer: the caller's problem.
        answer(ECHO, vec![0; 4], |r| r.payload_len = 64 + 8);
        let h = call_header(ECHO, 1, 8);
        assert_eq!(
            call(cpu(0), ECHO, &h, &mut small(&[1]), Preemption::Never),
            Err(Error::InvalidParameters)
        );
        // Another major ABI version: the caller learns so.
        answer(ECHO, vec![], |r| r.abi_version ^= 1 << 16);
        let h = call_header(ECHO, 1, 0);
        assert_eq!(
            call(cpu(0), ECHO, &h, &mut small(&[]), Preemption::Never),
            Err(Error::VersionMismatch)
        );
        // A typed call whose reply is not exactly the type asked for.
        answer(ECHO, vec![1, 2], |_| {});
        let r: Result<u64, Error> = call_typed(cpu(0), ECHO, 5, &7u64);
        assert_eq!(r, Err(Error::InvalidParameters));
        answer(ECHO, vec![0x2a], |_| {});
        let r: Result<u64, Error> = call_typed(cpu(0), ECHO, 5, &7u64);
        assert_eq!(r, Ok(0x2a));
        // A request longer than its buffer is refused before the service
        // is entered.
        let h = call_header(ECHO, 1, 65);
        assert_eq!(
            call(cpu(0), ECHO, &h, &mut small(&[]), Preemption::Never),
            Err(Error::InvalidParameters)
        );
        assert_eq!(entries_left(), 0);
        assert_eq!(state(ECHO), State::Ready as u8);
        // No such service.
        assert_eq!(
            call(cpu(0), 99, &h, &mut small(&[]), Preemption::Never),
            Err(Error::NotSupported)
        );
    }

    #[test]
    fn a_malformed_reply_fails_the_service_for_good() {
        let _turn = services();
        // The reply answers another call (its sequence): the service is
        // failed, and the caller's body is not decoded as an answer.
        answer(HOSTILE, vec![0xbad], |r| {
            r.sequence = r.sequence.wrapping_add(1)
        });
        let r: Result<u64, Error> = call_typed(cpu(0), HOSTILE, 1, &7u64);
        assert_eq!(r, Err(Error::ServiceFailed));
        assert_eq!(state(HOSTILE), State::Failed as u8);
        assert!(take_lines().iter().any(|l| l.contains("malformed reply")));
        // Every later call is refused without entering it (nothing is
        // queued: an entry would panic).
        let r: Result<u64, Error> = call_typed(cpu(0), HOSTILE, 1, &7u64);
        assert_eq!(r, Err(Error::ServiceFailed));
        // A service that could not be created refuses every call too.
        let r: Result<u64, Error> = call_typed(cpu(0), MISSING, 1, &7u64);
        assert_eq!(r, Err(Error::ServiceFailed));
        let r: Result<u64, Error> = call_typed(cpu(0), WRONG, 1, &7u64);
        assert_eq!(r, Err(Error::ServiceFailed));
        // A failed service answers no trap.
        let trap = TrapDescriptor::default();
        assert!(matches!(ask(cpu(0), HOSTILE, &trap), Answer::Refused));
        assert!(matches!(ask(cpu(0), 99, &trap), Answer::Refused));
    }

    #[test]
    fn a_service_that_logs_is_resumed_and_one_that_faults_is_failed() {
        let _turn = services();
        on_entry(|v| {
            let text = b"hello from EL1\n";
            let at = (service(FAULTY).ipc_page + LOG_OFFSET) as *mut u8;
            // SAFETY: the log half of the IPC page.
            unsafe { core::ptr::copy_nonoverlapping(text.as_ptr(), at, text.len()) };
            v.exit_vector = LOWER_SYNC;
            v.exit_esr = ESR_HVC0;
            v.regs.x[0] = u64::from(hypercall::SVC_LOG);
            v.regs.x[1] = text.len() as u64;
        });
        on_entry(|v| {
            assert_eq!(v.regs.x[0], 0, "SVC_LOG returns 0");
            // A hypercall the core does not serve: NOT_SUPPORTED.
            v.regs.x[0] = 0xdead;
        });
        on_entry(|v| {
            assert_eq!(v.regs.x[0], moat_abi::smccc::NOT_SUPPORTED);
            // Then it touches memory outside its partition.
            with_regs(|r| r.fault_ipa = 0x1234_5000);
            v.exit_vector = LOWER_SYNC;
            v.exit_esr = (u64::from(moat_kernel::esr::ec::DABT_LOW) << 26) | (1 << 25);
        });
        let h = call_header(FAULTY, 1, 0);
        assert_eq!(
            call(cpu(0), FAULTY, &h, &mut small(&[]), Preemption::Never),
            Err(Error::ServiceFailed)
        );
        let lines = take_lines();
        assert!(lines.iter().any(|l| l.contains("[svc2] hello from EL1")));
        assert!(
            lines
                .iter()
                .any(|l| l.contains("outside its partition") && l.contains("0x12345000"))
        );
        assert_eq!(state(FAULTY), State::Failed as u8);
        assert_eq!(entries_left(), 0);
    }

    #[test]
    fn a_service_is_failed_only_after_its_last_budget() {
        let _turn = services();
        // Each entry ends in the watchdog's own interrupt: a budget gone.
        for _ in 0..OVERRUN_LIMIT - 1 {
            on_entry(|v| {
                fire_watchdog();
                v.exit_vector = LOWER_IRQ;
            });
        }
        // After the next-to-last budget, the service replies after all.
        answer(SLOW, vec![], |_| {});
        let h = call_header(SLOW, 1, 0);
        assert_eq!(
            call(cpu(0), SLOW, &h, &mut small(&[]), Preemption::Never),
            Ok(Ok(0))
        );
        assert_eq!(state(SLOW), State::Ready as u8);
        for _ in 0..OVERRUN_LIMIT {
            on_entry(|v| {
                fire_watchdog();
                v.exit_vector = LOWER_IRQ;
            });
        }
        assert_eq!(
            call(cpu(0), SLOW, &h, &mut small(&[]), Preemption::Never),
            Err(Error::ServiceFailed)
        );
        assert_eq!(state(SLOW), State::Failed as u8);
        assert_eq!(entries_left(), 0);
        assert!(
            take_lines()
                .iter()
                .any(|l| l.contains("ran past its budget"))
        );
    }

    #[test]
    fn an_interrupted_call_is_finished_first_and_its_reissue_gets_the_reply() {
        let _turn = services();
        // A host interrupt stops the service mid-call.
        on_entry(|v| {
            set_el1_register(SP_EL1_WORD, 0x7_7000);
            v.exit_vector = LOWER_IRQ;
        });
        let first = call_header(ECHO, 4, 8);
        let mut body = small(&[5]);
        assert_eq!(
            call(cpu(0), ECHO, &first, &mut body, Preemption::Allowed),
            Err(Error::Interrupted)
        );
        assert_eq!(state(ECHO), State::Ready as u8);
        // The host issues it again (a new sequence number): the suspended
        // run is finished and its reply, to the first call, is the answer;
        // the request is not sent twice.
        on_entry(move |v| {
            let (call, body) = read_call(ECHO);
            assert_eq!((call.sequence, body[0]), (first.sequence, 5));
            write_reply(ECHO, &MessageHeader::reply_to(&call, Ok(()), 8), &[50]);
            reply_wait(v);
        });
        let again = call_header(ECHO, 4, 8);
        let mut body = small(&[5]);
        assert_eq!(
            call(cpu(0), ECHO, &again, &mut body, Preemption::Allowed),
            Ok(Ok(8))
        );
        assert_eq!(body[0], 50);
        assert_eq!(entries_left(), 0);
        // Suspended again; then another call comes: the suspended one is
        // finished (its result dropped), then the new one runs.
        on_entry(|v| v.exit_vector = LOWER_IRQ);
        let h = call_header(ECHO, 4, 8);
        assert_eq!(
            call(cpu(0), ECHO, &h, &mut small(&[6]), Preemption::Allowed),
            Err(Error::Interrupted)
        );
        answer(ECHO, vec![60], |_| {});
        answer(ECHO, vec![70], |_| {});
        let other = call_header(ECHO, 9, 0);
        let mut body = small(&[]);
        assert_eq!(
            call(cpu(0), ECHO, &other, &mut body, Preemption::Allowed),
            Ok(Ok(8))
        );
        assert_eq!(body[0], 70);
        assert_eq!(entries_left(), 0);
        // A call the core makes is never suspended: the interrupt is left
        // for later and the service runs on to its reply.
        on_entry(|v| v.exit_vector = LOWER_IRQ);
        answer(ECHO, vec![80], |_| {});
        let r: Result<u64, Error> = call_typed(cpu(0), ECHO, 5, &7u64);
        assert_eq!(r, Ok(80));
    }

    #[test]
    fn a_trap_is_asked_of_its_handler_and_the_verdict_checked() {
        let _turn = services();
        let trap = TrapDescriptor {
            class: 1,
            esr: 0x6200_0000,
            ..Default::default()
        };
        let verdict = Verdict {
            action: 2,
            reserved: 0,
            value: 0x77,
        };
        let words: [u64; 2] = zerocopy::transmute!(verdict);
        on_entry(move |v| {
            let (call, body) = read_call(ECHO);
            assert_eq!(call.operation, moat_abi::trap::DECIDE_OPERATION);
            assert_eq!(body[1], 0x6200_0000);
            write_reply(ECHO, &MessageHeader::reply_to(&call, Ok(()), 16), &words);
            reply_wait(v);
        });
        match ask(cpu(0), ECHO, &trap) {
            Answer::Verdict(v) => assert_eq!(v, verdict),
            _ => panic!("no verdict"),
        }
        // A verdict of the wrong size is no verdict.
        answer(ECHO, vec![2], |_| {});
        assert!(matches!(ask(cpu(0), ECHO, &trap), Answer::Refused));
        // Interrupted: the instruction runs again later.
        on_entry(|v| v.exit_vector = LOWER_IRQ);
        assert!(matches!(ask(cpu(0), ECHO, &trap), Answer::Interrupted));
        answer(ECHO, vec![], |_| {});
        answer(ECHO, vec![], |_| {});
        let h = call_header(ECHO, 1, 0);
        assert_eq!(
            call(cpu(0), ECHO, &h, &mut small(&[]), Preemption::Allowed),
            Ok(Ok(0))
        );
        assert_eq!(entries_left(), 0);
    }

    #[test]
    fn a_stopped_service_is_restarted_from_its_image_with_nothing_kept() {
        let _turn = services();
        let s = service(LEDGER);
        // Only a service whose image the core keeps can be restarted.
        assert_eq!(service(ECHO).restart(cpu(0)), Err(Error::NotSupported));
        // The running service scribbles over its memory and IPC page.
        on_entry(|v| {
            let s = service(LEDGER);
            // SAFETY: the service's memory and IPC page (heap pages of the
            // test process), which the service owns while it runs.
            unsafe {
                (s.memory.base as *mut u8).write_bytes(0xee, s.memory.size as usize);
                (s.ipc_page as *mut u8).add(2048).write_bytes(0xee, 2048);
            }
            set_el1_register(3, 0xeeee);
            v.regs.x[5] = 0xeeee;
            // Another CPU cannot restart it while it is in a call.
            set_mpidr(1);
            assert_eq!(service(LEDGER).restart(cpu(1)), Err(Error::Busy));
            set_mpidr(0);
            let (call, _) = read_call(LEDGER);
            write_reply(LEDGER, &MessageHeader::reply_to(&call, Ok(()), 0), &[]);
            reply_wait(v);
        });
        let h = call_header(LEDGER, 1, 0);
        assert_eq!(
            call(cpu(0), LEDGER, &h, &mut small(&[]), Preemption::Never),
            Ok(Ok(0))
        );
        s.stop("a test stops it");
        assert_eq!(
            call(cpu(0), LEDGER, &h, &mut small(&[]), Preemption::Never),
            Err(Error::ServiceFailed)
        );
        let memory = s.memory;
        let ipc = s.ipc_page;
        on_entry(move |v| {
            // It starts again as at boot: its image in memory, the rest
            // zero, its IPC page zero, its registers and EL1 state reset.
            // SAFETY: as above.
            let mem = unsafe {
                core::slice::from_raw_parts(memory.base as *const u8, memory.size as usize)
            };
            assert_eq!(mem[..8], 0x5eed_u64.to_le_bytes());
            assert_eq!(&mem[8..16], b"MOATSVC1");
            assert!(mem[2 * PAGE as usize..].iter().all(|b| *b == 0));
            // SAFETY: as above.
            let page = unsafe { core::slice::from_raw_parts(ipc as *const u8, PAGE as usize) };
            assert!(page.iter().all(|b| *b == 0));
            assert_eq!(v.regs.pc, SERVICE_BASE_IPA);
            assert_eq!((v.regs.x[1], v.regs.x[5]), (IPC_PAGE_IPA, 0));
            assert_eq!(el1_registers()[3], 0);
            reply_wait(v);
        });
        assert_eq!(s.restart(cpu(0)), Ok(()));
        assert_eq!(state(LEDGER), State::Ready as u8);
        answer(LEDGER, vec![], |_| {});
        assert_eq!(
            call(cpu(0), LEDGER, &h, &mut small(&[]), Preemption::Never),
            Ok(Ok(0))
        );
        // Stopped while its restart runs: the stop stands, and a later
        // restart brings it back.
        on_entry(|v| {
            service(LEDGER).stop("stopped during its restart");
            reply_wait(v);
        });
        assert_eq!(s.restart(cpu(0)), Ok(()));
        assert_eq!(state(LEDGER), State::Failed as u8);
        on_entry(reply_wait);
        assert_eq!(s.restart(cpu(0)), Ok(()));
        assert_eq!(state(LEDGER), State::Ready as u8);
        assert_eq!(entries_left(), 0);
    }

    #[test]
    fn service_headers_are_checked_before_a_service_is_made() {
        let image = image();
        let header = parse_header(&image).unwrap();
        assert_eq!((header.text_size, header.footprint), (PAGE, 2 * PAGE));
        let mut bad = image.clone();
        bad[8] = b'X';
        assert!(parse_header(&bad).is_none());
        let mut bad = image.clone();
        bad[16..24].copy_from_slice(&(PAGE + 1).to_le_bytes());
        assert!(parse_header(&bad).is_none());
        let mut bad = image.clone();
        bad[16..24].copy_from_slice(&(4 * PAGE).to_le_bytes());
        assert!(parse_header(&bad).is_none(), "text past the footprint");
        let mut long = image.clone();
        long.resize(3 * PAGE as usize, 0);
        assert!(parse_header(&long).is_none(), "image past the footprint");
        assert!(parse_header(&image[..20]).is_none());
    }

    #[test]
    fn observers_hear_of_their_traps_and_large_bodies_go_whole() {
        let _turn = services();
        assert!(
            routes()
                .unwrap()
                .is_observed(moat_abi::trap::TrapClass::Smc)
        );
        // A trap of a class nobody observes goes nowhere (nothing queued).
        let mut trap = TrapDescriptor {
            class: moat_abi::trap::TrapClass::Hvc as u32,
            esr: 0x5e00_0000,
            ..Default::default()
        };
        notify_observers(cpu(0), &trap);
        // One of a class the echo service observes is sent to it; its
        // answer does not matter.
        trap.class = moat_abi::trap::TrapClass::Smc as u32;
        on_entry(|v| {
            let (call, body) = read_call(ECHO);
            assert_eq!(call.operation, moat_abi::trap::OBSERVE_OPERATION);
            assert_eq!(body[1], 0x5e00_0000);
            let reply = MessageHeader::reply_to(&call, Err(Error::Denied), 0);
            write_reply(ECHO, &reply, &[]);
            reply_wait(v);
        });
        notify_observers(cpu(0), &trap);
        assert_eq!(entries_left(), 0);
        // A request and a reply past the small body's words go whole.
        let request: [u64; 12] = core::array::from_fn(|i| i as u64 + 1);
        on_entry(|v| {
            let page = service(ECHO).ipc_page as *const u64;
            let (call, _) = read_call(ECHO);
            assert_eq!(call.payload_len, 96);
            // SAFETY: as in `read_call`.
            let last = unsafe { page.add(HEADER_WORDS + 11).read_volatile() };
            assert_eq!(last, 12);
            let body: Vec<u64> = (0..12).map(|i| 100 + i).collect();
            write_reply(ECHO, &MessageHeader::reply_to(&call, Ok(()), 96), &body);
            reply_wait(v);
        });
        let reply: Result<[u64; 12], Error> = call_typed(cpu(0), ECHO, 6, &request);
        assert_eq!(reply.map(|r| r[11]), Ok(111));
        assert_eq!(index_of(interface(ECHO)), Some(ECHO));
        assert_eq!(index_of(0x6f), None);
    }

    #[test]
    fn the_ledgers_calls_go_to_the_service_serving_its_interface() {
        use crate::memory::Ledger;
        use moat_abi::services::{FrameRange, Party};
        let _turn = services();
        // The service answers each call with the words `reply` gives for
        // its operation and request.
        fn serve(reply: fn(u16, &[u64; 4]) -> Vec<u64>) {
            on_entry(move |v| {
                let (call, body) = read_call(LEDGER);
                let words = reply(call.operation, &body);
                let header = MessageHeader::reply_to(&call, Ok(()), 8 * words.len() as u32);
                write_reply(LEDGER, &header, &words);
                reply_wait(v);
            });
        }
        let extent = LedgerExtent {
            frames: FrameRange {
                start: 0x40,
                count: 2,
            },
            owner: Party { kind: 1, id: 0 },
            borrower: Party { kind: 2, id: 0 },
        };
        let words: [u64; 4] = zerocopy::transmute!(extent);
        serve(|op, body| {
            assert_eq!((op, body[0]), (ledger::Operation::lookup as u16, 0x41));
            vec![0x40, 2, 1, 2]
        });
        assert_eq!(super::LEDGER.lookup(cpu(0), 0x41), Ok(extent));
        assert_eq!(words, [0x40, 2, 1, 2]);
        serve(|op, body| {
            assert_eq!((op, body[0]), (ledger::Operation::extent as u16, 3));
            vec![0x40, 2, 1, 2]
        });
        assert_eq!(super::LEDGER.extent(cpu(0), 3), Ok(extent));
        serve(|op, body| {
            assert_eq!((op, body[0]), (ledger::Operation::commit as u16, 9));
            vec![10]
        });
        assert_eq!(super::LEDGER.commit(cpu(0), 9), Ok(10));
        // A transaction is larger than a small body: it comes back whole.
        serve(|op, _| {
            assert_eq!(op, ledger::Operation::prepare as u16);
            let tx = LedgerTransaction {
                generation: 77,
                change_count: 1,
                ..Default::default()
            };
            let words: [u64; size_of::<LedgerTransaction>() / 8] = zerocopy::transmute!(tx);
            words.to_vec()
        });
        let tx = super::LEDGER
            .prepare(cpu(0), &LedgerRequest::default())
            .unwrap();
        assert_eq!((tx.generation, tx.change_count), (77, 1));
        // Booting it: the RAM and the hypervisor's memory in frames.
        serve(|op, body| {
            assert_eq!(op, ledger::Operation::boot as u16);
            // The counts, then the first RAM range.
            assert_eq!(body[..3], [1 | (1 << 32), 0x4_0000, 0x100]);
            vec![5, 4096]
        });
        let ram = [Range::new(0x4000_0000, 0x10_0000).unwrap()];
        let hyp = [Range::new(0x4010_0000, 0x1000).unwrap()];
        assert_eq!(ledger_boot(cpu(0), &ram, &hyp), Some(Ok((5, 4096))));
        // No MTE policy service here: the host gets MTE as the hardware has it.
        assert!(host_mte_policy(cpu(0), 2, "", 0).is_none());
        assert_eq!(entries_left(), 0);
    }
}
