//! Restarting the memory ledger, and rebuilding its state from the core's
//! own records.
//!
//! The ledger is a service: it can fault, and an operator may want a fresh
//! one. Its state is not lost with it, because everything it records is
//! either in the core's tables or in a record the core keeps for the one
//! fact no table shows (a host page shared with the hypervisor, the
//! [`HYP_SHARES`] set). A restart is the core's act:
//!
//! 1. the ledger is marked down: from then on a memory request (and
//!    `CHECK_CONSISTENCY`) answers [`Error::Retry`] at once, with nothing
//!    done; the core never waits for the ledger on the host's behalf, and
//!    VM runs, MTE policy and every call not needing the ledger go on;
//! 2. at the next host call (or at once for `LEDGER_RESTART`), with every
//!    VM's slot and then the memory lock held (the lock order), the
//!    ledger's partition is reloaded from a copy of its boot image and run
//!    to its first reply, booted with the machine's RAM and carve-out, and
//!    told, as ordinary requests, what the core's records show
//!    (`moat_kernel::rebuild`); if a VM is running on another CPU the
//!    rebuild waits for a later call (its record cannot be read mid-run);
//! 3. the consistency checker compares the rebuilt ledger with every
//!    partition's tables; only then are memory requests taken again.
//!
//! A ledger that faults [`MAX_FAULTS_IN_A_ROW`] times with no request
//! committed in between is not restarted again: memory requests then fail
//! closed (`ServiceFailed`), as they did before restarts existed.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::arch::sysreg;
use crate::memory::{self, MEMORY, PAGE};
use crate::partition::cpu::PerCpu;
use crate::partition::service;
use alloc::vec::Vec;
use moat_abi::Error;
use moat_abi::services::ledger::{self, Operation};
use moat_abi::services::{LedgerRequest, LedgerTransaction};
use moat_kernel::lockorder::Rank;
use moat_kernel::rangeset::RangeSet;
use moat_kernel::rebuild::{self, Facts, VmFacts};

/// Most separate host ranges shared with the hypervisor at once (32 KiB):
/// as many as the ledger's 4,096 extents can hold, since each share needs
/// an extent of its own and one of the host's between it and the next. A
/// share (or an unshare splitting one) that would need more is refused
/// with `NoMemory`, before it happens.
pub const MAX_HYP_SHARES: usize = 2048;

/// Faults of the ledger in a row (no request committed in between) after
/// which it is left stopped.
pub const MAX_FAULTS_IN_A_ROW: u32 = 3;

/// The core's record of host pages shared with the hypervisor, by
/// physical address. Changed only under the memory lock, after the
/// ledger committed the share or unshare; a leaf lock.
pub static HYP_SHARES: spin::Mutex<RangeSet<MAX_HYP_SHARES>> = spin::Mutex::new(RangeSet::new());

static DOWN: AtomicBool = AtomicBool::new(false);
static REBUILDING: AtomicBool = AtomicBool::new(false);
static GAVE_UP: AtomicBool = AtomicBool::new(false);
static FAULTS_IN_A_ROW: AtomicU32 = AtomicU32::new(0);
/// Requests answered `Retry` since boot.
static RETRIES: AtomicU64 = AtomicU64::new(0);
/// Restarts completed since boot.
static RESTARTS: AtomicU64 = AtomicU64::new(0);

/// Whether memory requests must be answered `Retry` now.
pub fn is_down() -> bool {
    DOWN.load(Ordering::Acquire)
}

/// The answer to a memory request while the ledger is down: `Retry`, or
/// `ServiceFailed` once the core has given up on it.
pub fn unavailable() -> Error {
    if GAVE_UP.load(Ordering::Acquire) {
        Error::ServiceFailed
    } else {
        RETRIES.fetch_add(1, Ordering::Relaxed);
        Error::Retry
    }
}

/// The ledger failed (a fault, a malformed reply, an overrun): it goes
/// down, to be restarted, unless it has failed too often in a row.
pub fn ledger_failed() {
    let faults = FAULTS_IN_A_ROW.fetch_add(1, Ordering::AcqRel) + 1;
    if faults > MAX_FAULTS_IN_A_ROW {
        GAVE_UP.store(true, Ordering::Release);
        crate::log!(
            "ledger: failed {faults} times in a row with nothing committed in between; not restarted again, memory requests are refused from now on"
        );
    }
    DOWN.store(true, Ordering::Release);
}

/// A request the ledger committed: it is working.
pub fn committed() {
    if FAULTS_IN_A_ROW.load(Ordering::Relaxed) != 0 {
        FAULTS_IN_A_ROW.store(0, Ordering::Relaxed);
    }
}

/// `LEDGER_RESTART`: stops the ledger and restarts it. Any party may ask
/// without harm to isolation: the new state comes from the core alone.
pub fn request_restart(cpu: &PerCpu) -> Result<(), Error> {
    let index = service::index_of(ledger::SERVICE_ID).ok_or(Error::NotSupported)?;
    if GAVE_UP.load(Ordering::Acquire) {
        return Err(Error::ServiceFailed);
    }
    {
        // No call to the ledger is in flight while the memory lock is held.
        let _order = crate::base::lockcheck::hold(Rank::Memory);
        let _serial = MEMORY.lock();
        if !is_down() {
            if let Some(s) = service::get(index) {
                s.stop("restart requested");
            }
            DOWN.store(true, Ordering::Release);
        }
    }
    poll(cpu)
}

/// Brings a down ledger back if it can be done now. Cheap when the ledger
/// is up (one load). `Retry` while it stays down.
pub fn poll(cpu: &PerCpu) -> Result<(), Error> {
    if !is_down() {
        return Ok(());
    }
    if GAVE_UP.load(Ordering::Acquire) {
        return Err(Error::ServiceFailed);
    }
    if REBUILDING.swap(true, Ordering::Acquire) {
        return Err(unavailable());
    }
    let result = restart_and_rebuild(cpu);
    REBUILDING.store(false, Ordering::Release);
    result
}

fn restart_and_rebuild(cpu: &PerCpu) -> Result<(), Error> {
    let index = service::index_of(ledger::SERVICE_ID).ok_or(Error::NotSupported)?;
    let s = service::get(index).ok_or(Error::NotSupported)?;
    let started = sysreg::now();
    // Every VM's record, or none: one that is running (or in a call of its
    // own on another CPU) is waited for at a later call.
    let vms = crate::partition::vm::lock_all_idle().map_err(|_| Error::NoMemory)?;
    if vms.running > 0 {
        return Err(unavailable());
    }
    let requests = {
        let _order = crate::base::lockcheck::hold(Rank::Memory);
        let _serial = MEMORY.lock();
        s.restart(cpu).inspect_err(|e| {
            crate::log!("ledger: the restarted ledger did not start ({e:?})");
        })?;
        let m = crate::boot::machine();
        match service::ledger_boot(cpu, &m.platform.memory, m.carve_out.as_slice()) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(Error::NotSupported),
        }
        let bytes = |r: &moat_platform::dt::Range| (r.base, r.size);
        let ram: Vec<(u64, u64)> = m.platform.memory.iter().map(bytes).collect();
        let carve_out: Vec<(u64, u64)> = m.carve_out.as_slice().iter().map(bytes).collect();
        let host_mapped = host_mapped(&ram)?;
        let mut hyp_shares = Vec::new();
        hyp_shares
            .try_reserve(MAX_HYP_SHARES)
            .map_err(|_| Error::NoMemory)?;
        hyp_shares.extend(HYP_SHARES.lock().iter());
        let mut facts_vms = Vec::new();
        facts_vms
            .try_reserve(moat_abi::vm::MAX_VMS)
            .map_err(|_| Error::NoMemory)?;
        facts_vms.extend(vms.records().map(|(handle, dying, regions)| VmFacts {
            handle,
            dying,
            regions,
        }));
        let facts = Facts {
            ram: &ram,
            carve_out: &carve_out,
            host_mapped: &host_mapped,
            vms: &facts_vms,
            hyp_shares: &hyp_shares,
        };
        let mut requests = 0u64;
        rebuild::replay(&facts, |request| {
            requests += 1;
            record(cpu, index, request).inspect_err(|e| {
                crate::log!("ledger: rebuilding, {request:?} was refused ({e:?})");
            })
        })?;
        requests
    };
    drop(vms);
    let rebuilt = sysreg::now();
    // The rebuilt ledger must agree with every partition's tables before
    // anything relies on it.
    let checked = memory::check_consistency(cpu).map_err(|mismatch| {
        crate::log!("ledger: the rebuilt ledger disagrees with the tables ({mismatch:?})");
        s.stop("its rebuilt state disagrees with the tables");
        GAVE_UP.store(true, Ordering::Release);
        Error::ServiceFailed
    })?;
    DOWN.store(false, Ordering::Release);
    let n = RESTARTS.fetch_add(1, Ordering::Relaxed) + 1;
    let (_, freq) = sysreg::counter();
    let micros = |from: u64, to: u64| to.wrapping_sub(from).saturating_mul(1_000_000) / freq.max(1);
    crate::log!(
        "ledger: restarted and rebuilt from the core's records (restart {n}): {requests} request(s) replayed, {} extent(s), {} VM(s); {} request(s) answered Retry so far; reload and rebuild {} us, check {} us",
        checked.extents,
        checked.vms,
        RETRIES.load(Ordering::Relaxed),
        micros(started, rebuilt),
        micros(rebuilt, sysreg::now()),
    );
    Ok(())
}

/// Records `request` in the ledger without applying anything: prepare,
/// then commit the transaction prepared.
fn record(cpu: &PerCpu, index: usize, request: LedgerRequest) -> Result<(), Error> {
    let tx: LedgerTransaction =
        service::call_typed(cpu, index, Operation::prepare as u16, &request)?;
    if tx.request != request {
        return Err(Error::Denied);
    }
    service::call_typed::<u64, u64>(cpu, index, Operation::commit as u16, &tx.generation)
        .map(|_| ())
}

/// The RAM the host's stage-2 maps (identity), merged, ascending.
fn host_mapped(ram: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, Error> {
    let host = memory::host_stage2();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(base, size) in ram {
        host.for_each_mapped(base, size, |_, pa, len| {
            if let Some(last) = out.last_mut()
                && last.0 + last.1 == pa
            {
                last.1 += len;
                return Ok(());
            }
            out.try_reserve(1).map_err(|_| Error::NoMemory)?;
            out.push((pa, len));
            Ok(())
        })?;
    }
    // Whole pages only (the host's stage-2 maps nothing smaller).
    debug_assert!(out.iter().all(|(b, s)| b % PAGE == 0 && s % PAGE == 0));
    Ok(out)
}
