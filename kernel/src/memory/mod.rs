//! Memory transactions: the ledger decides, the core checks and applies.
//!
//! Every change of page ownership follows one path:
//!
//! ```text
//!   request ──▶ ledger.prepare ──▶ transaction ──▶ core checks it,
//!                                                   reserves table memory
//!                                                     │ refused: nothing changed
//!                                                     ▼
//!                                                ledger.commit
//!                                                     │ refused or failed:
//!                                                     │ nothing changed
//!                                                     ▼
//!                       maps ◀── zero + tag-scrub ◀── unmaps (BBM, TLBI)
//! ```
//!
//! The ledger service holds the policy (who may give what to whom); the core
//! holds the mechanism and its own invariants, which it checks on every
//! transaction whatever the ledger says: the core's memory never moves,
//! every change stays inside the requested frames, the host only ever gets
//! identity mappings of RAM, a page that leaves one party for another is
//! scrubbed, and a VM's pages are mapped only at the IPA its donation named.
//! Everything that can fail (table memory, the check, the ledger's commit)
//! happens before the first visible change, so a transaction is applied
//! whole or not at all, and a ledger that refuses or fails to commit leaves
//! the core's tables and its own records as they were.
//!
//! One transaction at a time, machine-wide ([`MEMORY`]): the ledger's
//! generation check needs prepare → commit → apply to be one step, and two
//! CPUs donating overlapping ranges must see one succeed and the other find
//! the pages gone.

pub mod ledger_restart;
pub mod smmu;
pub mod stage2;

use crate::base::cpu::PerCpu;
use crate::base::state::machine;
use alloc::vec::Vec;
use moat_abi::Error;
use moat_abi::services::{
    LEDGER_MAX_CHANGES, LedgerExtent, LedgerRequest, LedgerTransaction, Party,
};
use moat_kernel::lockorder::Rank;
use moat_kernel::mapcheck::{self, Mapper};
use moat_kernel::txcheck::{self, Perm, Step, Who};
use stage2::{Access, StageTwo};

/// Bytes in a page.
pub const PAGE: u64 = 4096;

/// Serialises memory transactions (and the checker) across CPUs. Lock
/// order (`moat_kernel::lockorder`): a VM's slot first, then this, then
/// the ledger's call slot, then the host's stage-2.
pub static MEMORY: spin::Mutex<()> = spin::Mutex::new(());

/// Set when a transaction was applied but the ledger did not record it: the
/// two no longer agree, and every later memory request is refused.
static OUT_OF_SYNC: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// A VM's part in a transaction: its stage-2 and the record of where its
/// frames sit in its IPA space.
pub struct VmMemory<'a> {
    pub handle: u16,
    pub stage2: &'a mut StageTwo,
    pub regions: &'a mut Vec<Region>,
    /// For a donation: the IPA of the first donated frame.
    pub donate_ipa: Option<u64>,
}

pub use moat_kernel::txcheck::Region;

/// Most regions (separate donations) a VM may hold.
pub const MAX_REGIONS: usize = 256;

/// The ledger's operations, as the transaction engine and the checker call
/// them. The ledger is a service, and services lie in the partition layer
/// above: that layer implements this trait (`partition::service::LEDGER`)
/// and boot hands it over with [`set_ledger`]. Each call fails with
/// `NotSupported` when the image carries no ledger.
pub trait Ledger: Sync {
    /// `Operation::lookup`: the extent holding `pfn`.
    fn lookup(&self, cpu: &PerCpu, pfn: u64) -> Result<LedgerExtent, Error>;
    /// `Operation::extent`: the `n`th extent, in address order.
    fn extent(&self, cpu: &PerCpu, n: u64) -> Result<LedgerExtent, Error>;
    /// `Operation::prepare`: the transaction that would serve `request`.
    fn prepare(&self, cpu: &PerCpu, request: &LedgerRequest) -> Result<LedgerTransaction, Error>;
    /// `Operation::commit`: commits the prepared transaction `generation`.
    fn commit(&self, cpu: &PerCpu, generation: u64) -> Result<u64, Error>;
}

static LEDGER: spin::Once<&'static dyn Ledger> = spin::Once::new();

/// Gives the transaction engine the ledger's calls; once, at boot, before
/// any partition runs.
pub fn set_ledger(ledger: &'static dyn Ledger) {
    LEDGER.call_once(|| ledger);
}

/// The ledger, once boot handed it over.
fn ledger() -> Option<&'static dyn Ledger> {
    LEDGER.get().copied()
}

/// Asks the ledger for the extent holding `pfn`.
pub fn lookup(cpu: &PerCpu, pfn: u64) -> Result<LedgerExtent, Error> {
    let ledger = ledger().ok_or(Error::NotSupported)?;
    if ledger_restart::is_down() {
        return Err(ledger_restart::unavailable());
    }
    ledger.lookup(cpu, pfn).map_err(while_down)
}

/// A ledger that failed in this call is being restarted: `Retry`.
fn while_down(e: Error) -> Error {
    if e == Error::ServiceFailed && ledger_restart::is_down() {
        ledger_restart::unavailable()
    } else {
        e
    }
}

/// Every extent of the ledger, in address order.
pub fn all_extents(cpu: &PerCpu) -> Result<Vec<LedgerExtent>, Error> {
    let ledger = ledger().ok_or(Error::NotSupported)?;
    let mut out = Vec::new();
    loop {
        let n = out.len() as u64;
        match ledger.extent(cpu, n) {
            Ok(e) => {
                out.try_reserve(1).map_err(|_| Error::NoMemory)?;
                out.push(e);
            }
            // Past the last extent.
            Err(Error::NotSupported) => return Ok(out),
            Err(e) => return Err(e),
        }
    }
}

/// Drops frames `[pa, pa + size)` from a VM's record in place: a reclaim
/// must work when the heap is out, so nothing is allocated (the room for a
/// region that splits in two was reserved before the change began).
fn forget_in_place(regions: &mut Vec<Region>, pa: u64, size: u64) {
    let mut i = 0;
    while i < regions.len() {
        match txcheck::cut(&regions[i], pa, size) {
            [None, None] => {
                regions.swap_remove(i);
                continue;
            }
            [Some(one), None] | [None, Some(one)] => regions[i] = one,
            [Some(head), Some(tail)] => {
                regions[i] = head;
                regions.push(tail);
            }
        }
        i += 1;
    }
}

/// Commits the prepared transaction, before any of its changes is applied.
/// The call runs to its reply whatever the host's interrupts (the core's
/// calls are never suspended, see `service::Preemption`).
fn commit(cpu: &PerCpu, ledger: &dyn Ledger, generation: u64) -> Result<(), Error> {
    ledger.commit(cpu, generation).map(|_| ())
}

/// Runs one memory request through the ledger and applies it. `vm` is the
/// VM the request concerns, locked by the caller.
pub fn transact(
    cpu: &PerCpu,
    request: LedgerRequest,
    mut vm: Option<VmMemory<'_>>,
) -> Result<(), Error> {
    // While the ledger is rebuilt, nothing waits for it.
    if ledger_restart::is_down() {
        return Err(ledger_restart::unavailable());
    }
    let _order = crate::base::lockcheck::hold(Rank::Memory);
    let _serial = MEMORY.lock();
    crate::memory::smmu::drain_events();
    let result = transact_serialised(cpu, request, &mut vm).map_err(while_down);
    // A VM's table pages reserved and not needed go back to the heap,
    // whether the transaction went through or not. The host's stay in its
    // pool: they are the tables it booted with, freed when it gave a whole
    // 2 MiB away, and it needs them to map its pages again when they come
    // back, however little of the heap the VMs have left.
    if let Some(v) = vm.as_ref() {
        v.stage2.release_spare_tables();
    }
    result
}

fn transact_serialised(
    cpu: &PerCpu,
    request: LedgerRequest,
    vm: &mut Option<VmMemory<'_>>,
) -> Result<(), Error> {
    if OUT_OF_SYNC.load(core::sync::atomic::Ordering::Acquire) {
        return Err(Error::ServiceFailed);
    }
    let ledger = ledger().ok_or(Error::NotSupported)?;
    let tx: LedgerTransaction = ledger.prepare(cpu, &request)?;
    let m = machine();
    let checked = txcheck::check(
        &request,
        &tx,
        vm.as_ref().map(|v| v.handle),
        &m.platform.memory,
        m.carve_out.as_slice(),
    )
    .map_err(|why| {
        crate::log!("memory: the ledger's transaction for {request:?} refused: {why}");
        Error::Denied
    })?;

    // The core's own view of ownership: pages the host gives away (to a VM
    // or, as a share, to the hypervisor) must be mapped in its stage-2 as
    // an owner's, whatever the ledger says.
    // (Owned pages are page entries, so every table over them is there:
    // the host's changes of those frames need no table reserved.)
    let mut host_owned = None;
    if matches!(
        request.op,
        LedgerRequest::HOST_DONATE_VM
            | LedgerRequest::HOST_SHARE_HYP
            | LedgerRequest::HOST_DONATE_HYP
    ) && let Some((pa, size)) = checked
        .scrub
        .or_else(|| checked.steps().next().map(step_range))
    {
        if !host_owns(pa, size) {
            crate::log!(
                "memory: the ledger's transaction for {request:?} refused: the host does not own those frames"
            );
            return Err(Error::Denied);
        }
        host_owned = Some((pa, size));
    }

    // Everything that can fail, before anything changes: the VM's tables
    // for a donation, and the VM's record of the frames it gives up.
    let mut vm_unmaps: heapless::Vec<(u64, u64), 8> = heapless::Vec::new();
    for step in checked.steps() {
        match (step, vm.as_mut()) {
            (Step::Map { who: Who::Vm, .. }, Some(v)) => {
                // (Its tables are reserved with the others, below.)
                v.donate_ipa.ok_or(Error::Denied)?;
                if v.regions.len() >= MAX_REGIONS {
                    return Err(Error::NoMemory);
                }
            }
            (
                Step::Unmap {
                    who: Who::Vm,
                    pa,
                    size,
                },
                Some(v),
            ) => {
                let mut full = false;
                txcheck::ipa_ranges(v.regions, pa, size, |ipa, n| {
                    full |= vm_unmaps.push((ipa, n)).is_err();
                })
                .map_err(|why| {
                    crate::log!("memory: VM {} frames {pa:#x}+{size:#x}: {why}", v.handle);
                    Error::Denied
                })?;
                if full {
                    return Err(Error::InvalidParameters);
                }
            }
            (Step::Map { who: Who::Vm, .. } | Step::Unmap { who: Who::Vm, .. }, None) => {
                return Err(Error::Denied);
            }
            _ => {}
        }
    }
    // The table pages every change below could need, and room in the VM's
    // record: reserved now, so that applying allocates nothing. (A remap of
    // the host's pages creates the tables it lacks once: its unmap makes
    // them, its map finds them.)
    let mut host_ranges: heapless::Vec<(u64, u64), LEDGER_MAX_CHANGES> = heapless::Vec::new();
    let mut vm_ranges: heapless::Vec<(u64, u64), { 8 + LEDGER_MAX_CHANGES }> = heapless::Vec::new();
    let mut vm_forgets = 0;
    let mut vm_maps = false;
    for step in checked.steps() {
        let pushed = match step {
            Step::Unmap {
                who: Who::Host,
                pa,
                size,
            } if host_owned == Some((pa, size)) => true,
            Step::Unmap {
                who: Who::Host,
                pa,
                size,
            } => host_ranges.push((pa, size)).is_ok(),
            Step::Map {
                who: Who::Host,
                pa,
                size,
                ..
            } => host_ranges.push((pa, size)).is_ok(),
            Step::Map {
                who: Who::Vm, size, ..
            } => {
                vm_maps = true;
                let ipa = vm
                    .as_ref()
                    .and_then(|v| v.donate_ipa)
                    .ok_or(Error::Denied)?;
                vm_ranges.push((ipa, size)).is_ok()
            }
            Step::Unmap {
                who: Who::Vm,
                pa,
                size,
            } => {
                vm_forgets += 1;
                // A region that loses frames from its middle becomes two.
                let v = vm.as_mut().ok_or(Error::Denied)?;
                let splits = v
                    .regions
                    .iter()
                    .filter(|r| matches!(txcheck::cut(r, pa, size), [Some(_), Some(_)]))
                    .count();
                v.regions.try_reserve(splits).map_err(|_| Error::NoMemory)?;
                true
            }
            _ => true,
        };
        if !pushed {
            return Err(Error::InvalidParameters);
        }
    }
    // No transaction both gives a VM frames and takes some away, or takes
    // two ranges: the record's room reserved above relies on it.
    if (vm_maps && vm_forgets > 0) || vm_forgets > 1 {
        return Err(Error::Denied);
    }
    if vm_ranges.extend_from_slice(&vm_unmaps).is_err() {
        return Err(Error::InvalidParameters);
    }
    host_stage2()
        .reserve_tables(&host_ranges)
        .map_err(|_| Error::NoMemory)?;
    if let Some(v) = vm.as_mut() {
        v.stage2
            .reserve_tables(&vm_ranges)
            .map_err(|_| Error::NoMemory)?;
        if vm_maps {
            v.regions.try_reserve(1).map_err(|_| Error::NoMemory)?;
        }
    }

    // The ledger records the transaction before anything changes: the
    // MEMORY lock keeps every reader of the ledger out until the changes
    // below are in, so nobody can see the order, and a commit the ledger
    // refuses (or cannot give: it failed) leaves both sides as they were —
    // the request fails with the ledger's error and nothing is out of step.
    // The core's own record of shares with the hypervisor (a share maps
    // nothing, so no table shows it) must be able to take this one.
    let hyp_share = matches!(
        request.op,
        LedgerRequest::HOST_SHARE_HYP | LedgerRequest::HOST_UNSHARE_HYP
    )
    .then(|| {
        let frames = request.frames;
        (
            frames.start.saturating_mul(PAGE),
            frames
                .start
                .saturating_add(frames.count)
                .saturating_mul(PAGE),
        )
    });
    if let Some((start, end)) = hyp_share {
        let shares = ledger_restart::HYP_SHARES.lock();
        let fits = if request.op == LedgerRequest::HOST_SHARE_HYP {
            shares.can_insert(start, end)
        } else {
            shares.can_remove(start, end)
        };
        if !fits {
            return Err(Error::NoMemory);
        }
    }
    commit(cpu, ledger, tx.generation).inspect_err(|e| {
        crate::log!(
            "memory: the ledger did not commit the transaction for {request:?} ({e:?}); nothing was changed"
        );
    })?;

    // Nothing below can fail on a transaction that passed the checks (the
    // tables it maps into are reserved, above, for every change: the
    // changes take them from the pools without filling them again); if it
    // does anyway, the core and the ledger no longer agree, and memory
    // requests stop.
    let host_unmaps = checked
        .steps()
        .any(|step| matches!(step, Step::Unmap { who: Who::Host, .. }));
    let host_maps = checked
        .steps()
        .any(|step| matches!(step, Step::Map { who: Who::Host, .. }));
    let mut apply = || -> Result<(), &'static str> {
        let host_vttbr = m.host_el2.vttbr;
        // Unmaps: the page is gone from every TLB before anything else happens
        // to it (break).
        for step in checked.steps() {
            if let Step::Unmap { who, pa, size } = step {
                match who {
                    Who::Host => {
                        let mut host = host_stage2();
                        stage2::with_vmid(host_vttbr, || host.unmap_reserved(pa, size))
                            .map_err(|_| "a stage-2 change failed")?;
                    }
                    // The core maps all RAM at EL2 for zeroing and copying; its
                    // share of a page is the ledger's record, not a mapping.
                    Who::Hypervisor => {}
                    Who::Vm => {
                        if let Some(v) = vm.as_mut() {
                            let vttbr = v.stage2.vttbr();
                            for &(ipa, size) in &vm_unmaps {
                                stage2::with_vmid(vttbr, || v.stage2.unmap_reserved(ipa, size))
                                    .map_err(|_| "a stage-2 change failed")?;
                            }
                        }
                    }
                }
            }
        }
        // The host's devices translate through the host's stage-2: once
        // the SMMU has dropped what it cached, no device reaches the pages
        // the host just lost (before they are scrubbed or given away).
        if host_unmaps {
            crate::memory::smmu::host_stage2_changed();
        }
        if let Some((pa, size)) = checked.scrub {
            scrub_pages(pa, size);
        }
        // Maps (make).
        for step in checked.steps() {
            if let Step::Map {
                who,
                pa,
                size,
                perm,
            } = step
            {
                let access = match perm {
                    Perm::ReadExecute => Access::ReadExecute,
                    Perm::ReadWrite => Access::ReadWrite,
                    Perm::ReadWriteExecute => Access::ReadWriteExecute,
                };
                match who {
                    Who::Host => {
                        // (A reclaimed page the VM had shared is still
                        // mapped for the host, read/write only.)
                        let mut host = host_stage2();
                        stage2::with_vmid(host_vttbr, || {
                            host.remap_reserved_pages(pa, pa, size, access)
                        })
                        .map_err(|_| "a stage-2 change failed")?;
                    }
                    Who::Hypervisor => {}
                    Who::Vm => {
                        if let Some(v) = vm.as_mut() {
                            let ipa = v.donate_ipa.unwrap_or(0);
                            v.stage2
                                .map_reserved_pages(ipa, pa, size, access)
                                .map_err(|_| "a stage-2 change failed")?;
                            v.regions.push(Region {
                                ipa,
                                pa,
                                pages: size / PAGE,
                            });
                        }
                    }
                }
            }
        }
        // A remap broke and remade host entries: the SMMU must not keep
        // the old ones.
        if host_maps {
            crate::memory::smmu::host_stage2_changed();
        }
        for step in checked.steps() {
            if let (
                Step::Unmap {
                    who: Who::Vm,
                    pa,
                    size,
                },
                Some(v),
            ) = (step, vm.as_mut())
            {
                forget_in_place(v.regions, pa, size);
            }
        }
        Ok(())
    };
    if let Err(why) = apply() {
        OUT_OF_SYNC.store(true, core::sync::atomic::Ordering::Release);
        crate::log!(
            "memory: applying a committed transaction failed ({why}); memory requests are refused from now on"
        );
        return Err(Error::Denied);
    }
    ledger_restart::committed();
    if let Some((start, end)) = hyp_share {
        let mut shares = ledger_restart::HYP_SHARES.lock();
        // Room was checked before the commit; the memory lock is held.
        let recorded = if request.op == LedgerRequest::HOST_SHARE_HYP {
            shares.insert(start, end)
        } else {
            shares.remove(start, end)
        };
        debug_assert!(recorded);
    }
    Ok(())
}

/// The frames a step changes.
fn step_range(step: Step) -> (u64, u64) {
    match step {
        Step::Unmap { pa, size, .. } | Step::Map { pa, size, .. } => (pa, size),
    }
}

/// Whether the host's stage-2 maps every page of `[pa, pa + size)` with an
/// owner's access, each with a page entry (so every table over the range
/// is there): the core's own view of what the host may give away or have
/// copied. The caller holds [`MEMORY`], so the answer stands until it
/// lets go.
pub fn host_owns(pa: u64, size: u64) -> bool {
    host_stage2().maps_as_owner(pa, size)
}

/// The host's stage-2, locked.
pub(super) fn host_stage2() -> spin::MutexGuard<'static, &'static mut StageTwo> {
    crate::base::lockcheck::check(Rank::HostStage2);
    match stage2::HOST.get() {
        Some(host) => host.lock(),
        None => crate::base::panic::park(),
    }
}

/// Zeroes `[pa, pa + size)` and, where MTE is present, sets its allocation
/// tags to zero; then cleans data (and tags) to the point of coherency, so
/// that no old byte or tag is left in memory for a non-cacheable alias.
///
/// The core maps all RAM at EL2 as Tagged normal memory when the hardware
/// has MTE, with SCTLR_EL2.ATA set, so `DC GZVA` writes the tags.
pub fn scrub_pages(pa: u64, size: u64) {
    let tags = crate::arch::mmu::el2_tag_access();
    let end = pa + size;
    match crate::arch::cache::zero_block() {
        // SAFETY: `[pa, end)` is whole pages (block-aligned: a block is a
        // power of two no larger than a page) of RAM the core maps
        // read/write (and Tagged, with `tags`); the pages belong to no
        // partition while they are scrubbed (the unmaps came first).
        Some(block) => unsafe { crate::arch::cache::zero_blocks(pa, end, block, tags) },
        // DC ZVA prohibited: STZG zeroes a 16-byte granule and its tag at
        // once; without tags, plain stores.
        None if tags => {
            let mut addr = pa;
            while addr < end {
                // SAFETY: as above.
                unsafe { crate::arch::cache::zero_granule_and_tag(addr) };
                addr += 16;
            }
        }
        None => {
            let mut addr = pa;
            while addr < end {
                // SAFETY: as above; plain stores.
                unsafe { (addr as *mut u64).write_volatile(0) };
                addr += 8;
            }
        }
    }
    let line = crate::arch::cache::dcache_line();
    crate::arch::cache::clean_lines_to_poc(pa, end, line, tags);
    // Completes the zeroing and cleaning.
    crate::arch::cache::complete_inner_shareable();
}

/// Where the ledger and a partition's tables disagree.
#[derive(Clone, Copy, Debug)]
pub enum Mismatch {
    /// The host's stage-2 at `address`: the ledger says the host may (or
    /// may not) map it.
    Host { address: u64, host_may_map: bool },
    /// A partition's stage-2 holds an entry the core's rules forbid
    /// (`moat_kernel::mapcheck`).
    Forged {
        whose: Whose,
        leaf: mapcheck::Forged,
    },
    /// VM `handle` maps `mapped` pages, the ledger gives it `owned`.
    VmPageCount {
        handle: u16,
        mapped: u64,
        owned: u64,
    },
    /// The ledger could not be read.
    Ledger(Error),
    /// The heap had no room for the checker's own records.
    NoMemory,
    /// A table or queue the GIC hardware uses (the ITS's tables and
    /// queues, the redistributors' LPI tables) is not held as it must be,
    /// or a GIC register names memory the core did not take.
    Gic { address: u64, why: &'static str },
    /// The SMMU's stream table no longer sends every stream through the
    /// host's stage-2.
    Smmu(crate::memory::smmu::StreamMismatch),
    /// The core's record of host pages shared with the hypervisor and the
    /// ledger's differ, first at `address`.
    HypShare { address: u64 },
}

/// Whose stage-2 a [`Mismatch::Forged`] entry is in.
#[derive(Clone, Copy, Debug)]
pub enum Whose {
    Host,
    Vm(u16),
    Service(usize),
}

impl core::fmt::Display for Whose {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Whose::Host => write!(f, "the host"),
            Whose::Vm(handle) => write!(f, "VM {handle}"),
            Whose::Service(index) => write!(f, "service {index}"),
        }
    }
}

/// What the checker covered.
#[derive(Clone, Copy, Debug, Default)]
pub struct Checked {
    pub extents: u64,
    pub services: u64,
    pub vms: u64,
    pub vms_running: u64,
    /// Tables and queues of the GIC hardware checked.
    pub gic_tables: u64,
    /// SMMU stream-table entries checked (0 without an SMMU).
    pub smmu_streams: u64,
}

/// The GIC hardware's tables, as the checker sees them: the device layer
/// holds them (`device::its::Held`) and checks each against the ledger's
/// extents and the host's stage-2.
pub trait GicTables {
    /// Checks every table; returns how many it checked, or the first
    /// wrong one's address and why.
    fn check(
        &self,
        carve_out: &[moat_platform::dt::Range],
        extent_of: impl Fn(u64) -> Option<LedgerExtent> + Copy,
        host_maps: impl Fn(u64, u64, bool) -> bool,
    ) -> Result<u64, (u64, &'static str)>;
}

/// The consistency checker: compares every partition's tables with the
/// ledger. The host's stage-2 maps exactly the pages it owns or borrows;
/// each VM's stage-2 maps only frames it owns or shares, and all of them.
/// A VM running on another CPU is counted, not checked (its tables are
/// not changing: donations to a running VM are refused).
///
/// The partitions and the GIC's tables lie in the layers above: the caller
/// hands them over, already locked (every idle VM's slot, then the GIC's
/// state, before the memory lock, as their own paths take them). `services`
/// yields each service's stage-2 by index, `vms` each idle VM's tables and
/// records, `vms_running` counts the VMs skipped.
pub fn check_consistency<'a>(
    cpu: &PerCpu,
    services: impl Iterator<Item = Option<&'a StageTwo>>,
    vms: impl Iterator<Item = (u16, &'a StageTwo, &'a [Region])>,
    vms_running: u64,
    gic: Option<&impl GicTables>,
) -> Result<Checked, Mismatch> {
    let _order = crate::base::lockcheck::hold(Rank::Memory);
    let _serial = MEMORY.lock();
    crate::memory::smmu::drain_events();
    let extents = all_extents(cpu).map_err(|e| match e {
        Error::NoMemory => Mismatch::NoMemory,
        e => Mismatch::Ledger(e),
    })?;
    // The core's record of the host's shares with the hypervisor (what a
    // restarted ledger is told) is the ledger's, range for range.
    {
        let shares = ledger_restart::HYP_SHARES.lock();
        let mut recorded = shares.iter();
        for e in extents
            .iter()
            .filter(|e| e.owner.kind == Party::HOST && e.borrower.kind == Party::HYPERVISOR)
        {
            let start = e.frames.start.saturating_mul(PAGE);
            if recorded.next() != Some((start, e.frames.count.saturating_mul(PAGE))) {
                return Err(Mismatch::HypShare { address: start });
            }
        }
        if let Some((address, _)) = recorded.next() {
            return Err(Mismatch::HypShare { address });
        }
    }
    let mut checked = Checked {
        extents: extents.len() as u64,
        vms_running,
        ..Default::default()
    };
    {
        let host = host_stage2();
        for e in &extents {
            let host_may_map = e.owner.kind == Party::HOST || e.borrower.kind == Party::HOST;
            let (Some(start), Some(size)) = (
                e.frames.start.checked_mul(PAGE),
                e.frames.count.checked_mul(PAGE),
            ) else {
                return Err(Mismatch::Ledger(Error::InvalidParameters));
            };
            host.check(start, size, host_may_map)
                .map_err(|address| Mismatch::Host {
                    address,
                    host_may_map,
                })?;
        }
    }
    // Every valid entry of every partition's tables, by output address.
    let m = machine();
    // Every device stream translates through the host's stage-2, checked
    // above against the ledger.
    checked.smmu_streams =
        crate::memory::smmu::check_streams(m.host_el2.vttbr).map_err(Mismatch::Smmu)?;
    let extent_of = |pfn: u64| {
        let i = extents.partition_point(|e| e.frames.start.saturating_add(e.frames.count) <= pfn);
        extents.get(i).filter(|e| e.frames.start <= pfn).copied()
    };
    // The GIC hardware's tables: held as the hardware needs, named by
    // its registers.
    if let Some(gic) = gic {
        let host = host_stage2();
        checked.gic_tables = gic
            .check(m.carve_out.as_slice(), extent_of, |pa, size, mapped| {
                host.check(pa, size, mapped).is_ok()
            })
            .map_err(|(address, why)| Mismatch::Gic { address, why })?;
    }
    let ipa_space = 1u64 << m.ipa_bits;
    let leaves = |s2: &StageTwo, mapper: Mapper<'_>, whose: Whose, mapped: &mut u64| {
        s2.for_each_mapped(0, ipa_space, |ipa, pa, size| {
            mapcheck::check_leaf(
                mapper,
                ipa,
                pa,
                size,
                &m.platform.memory,
                m.carve_out.as_slice(),
                extent_of,
            )
            .map_err(|leaf| Mismatch::Forged { whose, leaf })?;
            *mapped += size / PAGE;
            Ok(())
        })
    };
    leaves(&host_stage2(), Mapper::Host, Whose::Host, &mut 0)?;
    // Services map only the hypervisor's memory (their images, stacks and
    // IPC pages come from the core's heap).
    for (index, s2) in services
        .enumerate()
        .filter_map(|(i, s2)| s2.map(|s2| (i, s2)))
    {
        leaves(s2, Mapper::Service, Whose::Service(index), &mut 0)?;
        checked.services += 1;
    }
    for (handle, s2, regions) in vms {
        let mut mapped = 0u64;
        let mapper = Mapper::Vm { handle, regions };
        leaves(s2, mapper, Whose::Vm(handle), &mut mapped)?;
        let owned: u64 = extents
            .iter()
            .filter(|e| e.owner.kind == Party::VM && e.owner.id == u32::from(handle))
            .map(|e| e.frames.count)
            .sum();
        if owned != mapped {
            return Err(Mismatch::VmPageCount {
                handle,
                mapped,
                owned,
            });
        }
        checked.vms += 1;
    }
    Ok(checked)
}

#[cfg(test)]
pub(crate) mod tests {
    //! The transaction engine and the checker against the ledger's own
    //! logic (`moat_ledger::LedgerServer`, behind the [`Ledger`] trait),
    //! over RAM that is a buffer of the test process: the host's stage-2
    //! maps it identity, so scrubbing and the tables are real. The machine,
    //! the host's stage-2 and the ledger are the process's, once; the
    //! tests take turns ([`serial`]) and each uses frames of its own.

    use super::*;
    use crate::arch::{Op, sysreg::HostEl2Config, take_log};
    use crate::base::state::{MACHINE, Machine};
    use moat_abi::services::ledger::Server;
    use moat_abi::services::{FrameRange, LEDGER_BOOT_RANGES, LedgerBoot};
    use moat_kernel::layout::Pieces;
    use moat_kernel::s2plan::{Region as PlanRegion, RegionKind};
    use moat_ledger::{Extent, LedgerServer};
    use moat_platform::dt::Range;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Mutex, MutexGuard, OnceLock};

    const HOST_VMID: u16 = 0;
    const VM: u16 = 3;
    const VM_VMID: u16 = 9;
    /// The test RAM: 8 MiB, 2 MiB-aligned.
    pub(crate) const RAM_SIZE: u64 = 8 << 20;

    pub(crate) struct FakeLedger {
        server: spin::Mutex<LedgerServer<'static>>,
        refuse_commit: AtomicBool,
        /// The next commit fails as a faulting ledger does: it goes down.
        pub(crate) fault_on_commit: AtomicBool,
        tamper: spin::Mutex<Option<LedgerTransaction>>,
    }

    impl Ledger for FakeLedger {
        fn lookup(&self, _: &PerCpu, pfn: u64) -> Result<LedgerExtent, Error> {
            self.server.lock().lookup(pfn)
        }
        fn extent(&self, _: &PerCpu, n: u64) -> Result<LedgerExtent, Error> {
            self.server.lock().extent(n)
        }
        fn prepare(&self, _: &PerCpu, request: &LedgerRequest) -> Result<LedgerTransaction, Error> {
            let tx = self.server.lock().prepare(*request)?;
            Ok(self.tamper.lock().take().unwrap_or(tx))
        }
        fn commit(&self, _: &PerCpu, generation: u64) -> Result<u64, Error> {
            if self.refuse_commit.load(Ordering::Relaxed) {
                return Err(Error::ServiceFailed);
            }
            if self.fault_on_commit.swap(false, Ordering::Relaxed) {
                ledger_restart::ledger_failed();
                return Err(Error::ServiceFailed);
            }
            self.server.lock().commit(generation)
        }
    }

    pub(crate) struct World {
        pub(crate) ram: u64,
        pub(crate) ledger: &'static FakeLedger,
    }

    /// The machine, the host's stage-2 and the ledger, made once.
    pub(crate) fn world() -> &'static World {
        static WORLD: OnceLock<World> = OnceLock::new();
        WORLD.get_or_init(|| {
            let layout = std::alloc::Layout::from_size_align(RAM_SIZE as usize, 2 << 20).unwrap();
            // SAFETY: a non-zero-sized layout.
            let ram = unsafe { std::alloc::alloc_zeroed(layout) };
            assert!(!ram.is_null());
            let ram = ram.expose_provenance() as u64;
            let range = Range {
                base: ram,
                size: RAM_SIZE,
            };
            let host = StageTwo::identity(
                0,
                HOST_VMID,
                &[PlanRegion {
                    range,
                    kind: RegionKind::Ram,
                }],
            )
            .unwrap();
            let vttbr = host.vttbr();
            stage2::HOST.call_once(|| spin::Mutex::new(host.activate()));
            let mut platform = moat_platform::dt::discover(include_bytes!(
                "../../../platform/testdata/qemu-virt-gicv3.dtb"
            ))
            .unwrap();
            platform.memory.clear();
            platform.memory.push(range).unwrap();
            MACHINE.call_once(|| Machine {
                platform,
                firmware: moat_platform::firmware::FirmwareConduit::new(None),
                cpu: Default::default(),
                vm_hcrx: [0; 2],
                host_el2: HostEl2Config { vttbr },
                carve_out: Pieces::default(),
                stage2_start_level: 0,
                ipa_bits: 48,
                core_powers_cpus: false,
            });
            let storage = Box::leak(vec![Extent::EMPTY; 1024].into_boxed_slice());
            let mut server = LedgerServer::new(Some(storage));
            let mut boot = LedgerBoot {
                ram_count: 1,
                hypervisor_count: 0,
                ram: [FrameRange::default(); LEDGER_BOOT_RANGES],
                hypervisor: [FrameRange::default(); LEDGER_BOOT_RANGES],
            };
            boot.ram[0] = FrameRange {
                start: ram / PAGE,
                count: RAM_SIZE / PAGE,
            };
            server.boot(boot).unwrap();
            let ledger = Box::leak(Box::new(FakeLedger {
                server: spin::Mutex::new(server),
                refuse_commit: AtomicBool::new(false),
                fault_on_commit: AtomicBool::new(false),
                tamper: spin::Mutex::new(None),
            }));
            set_ledger(ledger);
            World { ram, ledger }
        })
    }

    /// One test at a time: they share the machine.
    pub(crate) fn serial() -> MutexGuard<'static, ()> {
        static TURN: Mutex<()> = Mutex::new(());
        TURN.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn cpu() -> &'static PerCpu {
        crate::base::cpu::get(0).unwrap()
    }

    pub(crate) fn request(op: u32, party: u16, pa: u64, pages: u64) -> LedgerRequest {
        LedgerRequest {
            op,
            party: u32::from(party),
            frames: FrameRange {
                start: pa / PAGE,
                count: pages,
            },
        }
    }

    /// A VM's stage-2 and record, live, with its VMID.
    struct TestVm {
        stage2: StageTwo,
        regions: Vec<Region>,
    }

    impl TestVm {
        fn new(handle: u16) -> Self {
            transact(cpu(), request(LedgerRequest::CREATE_VM, handle, 0, 0), None).unwrap();
            let stage2 = StageTwo::new(0, VM_VMID).unwrap();
            stage2.mark_live();
            Self {
                stage2,
                regions: Vec::new(),
            }
        }

        fn memory(&mut self, handle: u16, donate_ipa: Option<u64>) -> VmMemory<'_> {
            VmMemory {
                handle,
                stage2: &mut self.stage2,
                regions: &mut self.regions,
                donate_ipa,
            }
        }
    }

    impl Drop for TestVm {
        fn drop(&mut self) {
            self.stage2.mark_dead();
        }
    }

    fn fill(pa: u64, size: u64, byte: u8) {
        let p = core::ptr::with_exposed_provenance_mut::<u8>(pa as usize);
        // SAFETY: test RAM (the world's buffer), which only the serialised
        // tests touch.
        unsafe { p.write_bytes(byte, size as usize) };
    }

    fn all_zero(pa: u64, size: u64) -> bool {
        let p = core::ptr::with_exposed_provenance::<u8>(pa as usize);
        // SAFETY: as in `fill`.
        unsafe { core::slice::from_raw_parts(p, size as usize) }
            .iter()
            .all(|&b| b == 0)
    }

    fn host_invalidations(log: &[Op]) -> Vec<Op> {
        log.iter()
            .copied()
            .filter(|op| {
                matches!(
                    op,
                    Op::InvalidateStage2Page { .. }
                        | Op::InvalidateCombined { .. }
                        | Op::InvalidateVmid { .. }
                )
            })
            .collect()
    }

    #[test]
    fn a_donation_unmaps_the_host_scrubs_and_maps_the_vm_then_a_reclaim_undoes_it() {
        let _turn = serial();
        let w = world();
        let pa = w.ram + (1 << 20);
        let ipa = 0x8000_0000;
        let mut vm = TestVm::new(VM);
        fill(pa, 2 * PAGE, 0xa5);
        take_log();

        transact(
            cpu(),
            request(LedgerRequest::HOST_DONATE_VM, VM, pa, 2),
            Some(vm.memory(VM, Some(ipa))),
        )
        .unwrap();
        // The host lost the pages, with the invalidation for its VMID.
        assert!(!host_owns(pa, PAGE));
        assert_eq!(host_stage2().check(pa, 2 * PAGE, false), Ok(()));
        assert_eq!(
            host_invalidations(&take_log()),
            [
                Op::InvalidateStage2Page {
                    vmid: HOST_VMID,
                    ipa: pa
                },
                Op::InvalidateStage2Page {
                    vmid: HOST_VMID,
                    ipa: pa + PAGE
                },
                Op::InvalidateCombined { vmid: HOST_VMID },
            ]
        );
        // Scrubbed, then mapped where the donation said.
        assert!(all_zero(pa, 2 * PAGE));
        assert_eq!(vm.stage2.translate(ipa + PAGE), Some((pa + PAGE, true)));
        assert_eq!(vm.regions, [Region { ipa, pa, pages: 2 }]);
        assert_eq!(lookup(cpu(), pa / PAGE).unwrap().owner.kind, Party::VM);

        // The checker agrees with the ledger, VM included.
        let checked = check_consistency(
            cpu(),
            core::iter::empty(),
            core::iter::once((VM, &vm.stage2, vm.regions.as_slice())),
            0,
            None::<&NoGic>,
        )
        .unwrap();
        assert_eq!(checked.vms, 1);

        // The VM writes and is destroyed; the reclaim scrubs and gives the
        // host its pages.
        fill(pa, 2 * PAGE, 0x5a);
        transact(cpu(), request(LedgerRequest::DESTROY_VM, VM, 0, 0), None).unwrap();
        transact(
            cpu(),
            request(LedgerRequest::RECLAIM, VM, pa, 2),
            Some(vm.memory(VM, None)),
        )
        .unwrap();
        assert!(all_zero(pa, 2 * PAGE));
        assert_eq!(vm.stage2.translate(ipa), None);
        assert!(vm.regions.is_empty());
        assert!(host_owns(pa, 2 * PAGE));
    }

    #[test]
    fn a_refused_commit_changes_nothing() {
        let _turn = serial();
        let w = world();
        let pa = w.ram + (2 << 20);
        let mut vm = TestVm::new(VM + 1);
        fill(pa, PAGE, 0x77);
        take_log();
        w.ledger.refuse_commit.store(true, Ordering::Relaxed);
        let r = transact(
            cpu(),
            request(LedgerRequest::HOST_DONATE_VM, VM + 1, pa, 1),
            Some(vm.memory(VM + 1, Some(0))),
        );
        w.ledger.refuse_commit.store(false, Ordering::Relaxed);
        assert_eq!(r, Err(Error::ServiceFailed));
        assert!(host_owns(pa, PAGE));
        assert_eq!(vm.stage2.translate(0), None);
        assert!(vm.regions.is_empty());
        assert!(!all_zero(pa, PAGE), "nothing scrubbed");
        assert_eq!(host_invalidations(&take_log()), []);
        assert_eq!(lookup(cpu(), pa / PAGE).unwrap().owner.kind, Party::HOST);
        transact(
            cpu(),
            request(LedgerRequest::DESTROY_VM, VM + 1, 0, 0),
            None,
        )
        .unwrap();
    }

    #[test]
    fn a_transaction_the_core_checks_and_refuses_changes_nothing() {
        let _turn = serial();
        let w = world();
        let pa = w.ram + (3 << 20);
        let mut vm = TestVm::new(VM + 2);
        // The ledger answers a one-page donation with a transaction for
        // other frames: the core's check refuses it before the commit.
        let honest = w
            .ledger
            .server
            .lock()
            .prepare(request(LedgerRequest::HOST_DONATE_VM, VM + 2, pa, 1))
            .unwrap();
        let mut forged = honest;
        for c in forged.changes.iter_mut() {
            c.frames.start += 1;
        }
        *w.ledger.tamper.lock() = Some(forged);
        let r = transact(
            cpu(),
            request(LedgerRequest::HOST_DONATE_VM, VM + 2, pa, 1),
            Some(vm.memory(VM + 2, Some(0))),
        );
        assert_eq!(r, Err(Error::Denied));
        assert!(host_owns(pa, 2 * PAGE));
        assert_eq!(vm.stage2.translate(0), None);
        assert_eq!(lookup(cpu(), pa / PAGE).unwrap().owner.kind, Party::HOST);
        // A donation needs the IPA it maps at.
        let r = transact(
            cpu(),
            request(LedgerRequest::HOST_DONATE_VM, VM + 2, pa, 1),
            Some(vm.memory(VM + 2, None)),
        );
        assert_eq!(r, Err(Error::Denied));
        // And a VM's part without the VM is refused.
        let r = transact(
            cpu(),
            request(LedgerRequest::HOST_DONATE_VM, VM + 2, pa, 1),
            None,
        );
        assert_eq!(r, Err(Error::Denied));
        assert!(host_owns(pa, PAGE));
        transact(
            cpu(),
            request(LedgerRequest::DESTROY_VM, VM + 2, 0, 0),
            None,
        )
        .unwrap();
    }

    #[test]
    fn a_share_with_the_hypervisor_is_recorded_by_the_core() {
        let _turn = serial();
        let w = world();
        let pa = w.ram + (4 << 20);
        transact(
            cpu(),
            request(LedgerRequest::HOST_SHARE_HYP, 0, pa, 3),
            None,
        )
        .unwrap();
        assert!(
            ledger_restart::HYP_SHARES
                .lock()
                .iter()
                .any(|r| r == (pa, 3 * PAGE))
        );
        // Still the host's, mapped as before.
        assert!(host_owns(pa, 3 * PAGE));
        check_consistency(
            cpu(),
            core::iter::empty(),
            core::iter::empty(),
            0,
            None::<&NoGic>,
        )
        .unwrap();
        transact(
            cpu(),
            request(LedgerRequest::HOST_UNSHARE_HYP, 0, pa, 3),
            None,
        )
        .unwrap();
        assert!(
            !ledger_restart::HYP_SHARES
                .lock()
                .iter()
                .any(|(start, _)| start == pa)
        );
    }

    #[test]
    fn the_checker_finds_a_host_mapping_the_ledger_does_not_allow() {
        let _turn = serial();
        let w = world();
        let pa = w.ram + (5 << 20);
        let mut vm = TestVm::new(VM + 3);
        transact(
            cpu(),
            request(LedgerRequest::HOST_DONATE_VM, VM + 3, pa, 1),
            Some(vm.memory(VM + 3, Some(0))),
        )
        .unwrap();
        // Put the donated page back in the host's stage-2 behind the
        // ledger's back.
        {
            let mut host = host_stage2();
            stage2::with_vmid(0, || host.map_pages(pa, pa, PAGE, Access::ReadWrite)).unwrap();
        }
        let found = check_consistency(
            cpu(),
            core::iter::empty(),
            core::iter::once((VM + 3, &vm.stage2, vm.regions.as_slice())),
            0,
            None::<&NoGic>,
        );
        assert!(
            matches!(
                found,
                Err(Mismatch::Host {
                    address,
                    host_may_map: false
                }) if address == pa
            ),
            "{found:?}"
        );
        // Undo, and give the page back.
        {
            let mut host = host_stage2();
            stage2::with_vmid(0, || host.unmap(pa, PAGE)).unwrap();
        }
        transact(
            cpu(),
            request(LedgerRequest::DESTROY_VM, VM + 3, 0, 0),
            None,
        )
        .unwrap();
        transact(
            cpu(),
            request(LedgerRequest::RECLAIM, VM + 3, pa, 1),
            Some(vm.memory(VM + 3, None)),
        )
        .unwrap();
        assert!(host_owns(pa, PAGE));
    }

    #[test]
    fn forget_in_place_splits_and_drops_regions() {
        let mut regions = vec![
            Region {
                ipa: 0,
                pa: 0x10_0000,
                pages: 4,
            },
            Region {
                ipa: 0x10_0000,
                pa: 0x20_0000,
                pages: 1,
            },
        ];
        regions.reserve(1);
        forget_in_place(&mut regions, 0x10_1000, PAGE);
        forget_in_place(&mut regions, 0x20_0000, PAGE);
        regions.sort_by_key(|r| r.pa);
        assert_eq!(
            regions,
            [
                Region {
                    ipa: 0,
                    pa: 0x10_0000,
                    pages: 1
                },
                Region {
                    ipa: 0x2000,
                    pa: 0x10_2000,
                    pages: 2
                },
            ]
        );
        assert_eq!(Whose::Vm(2).to_string(), "VM 2");
        assert_eq!(Whose::Host.to_string(), "the host");
        assert_eq!(Whose::Service(1).to_string(), "service 1");
    }

    /// No GIC tables in these tests.
    struct NoGic;

    impl GicTables for NoGic {
        fn check(
            &self,
            _: &[moat_platform::dt::Range],
            _: impl Fn(u64) -> Option<LedgerExtent> + Copy,
            _: impl Fn(u64, u64, bool) -> bool,
        ) -> Result<u64, (u64, &'static str)> {
            Ok(0)
        }
    }
}
