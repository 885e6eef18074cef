//! The memory ledger's availability, and the one record the core keeps so
//! that a restarted ledger can be rebuilt from the core alone.
//!
//! The ledger is a service: it can fault, and an operator may want a fresh
//! one. Its state is not lost with it, because everything it records is
//! either in the core's tables or in a record the core keeps for the one
//! fact no table shows (a host page shared with the hypervisor, the
//! [`HYP_SHARES`] set). This module holds what the transaction engine needs
//! to know: whether the ledger is down (memory requests then answer
//! [`Error::Retry`] at once, with nothing done), whether the core gave up
//! on it, and the share record. The restart itself — reloading the
//! partition, replaying the core's facts, checking the result — needs the
//! services and the VM records, so it lives a layer up, in
//! `partition::ledger_restart`.
//!
//! A ledger that faults [`MAX_FAULTS_IN_A_ROW`] times with no request
//! committed in between is not restarted again: memory requests then fail
//! closed (`ServiceFailed`), as they did before restarts existed.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::memory::{self, PAGE};
use alloc::vec::Vec;
use moat_abi::Error;
use moat_kernel::rangeset::RangeSet;

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
#[inline(always)]
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

/// The RAM the host's stage-2 maps (identity), merged, ascending.
pub fn host_mapped(ram: &[(u64, u64)]) -> Result<Vec<(u64, u64)>, Error> {
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

/// Marks the ledger down (a stop or a fault): memory requests answer
/// `Retry` until [`mark_up`].
pub fn mark_down() {
    DOWN.store(true, Ordering::Release);
}

/// The rebuilt ledger agreed with the tables: memory requests resume.
/// Returns how many restarts have completed since boot.
pub fn mark_up() -> u64 {
    DOWN.store(false, Ordering::Release);
    RESTARTS.fetch_add(1, Ordering::Relaxed) + 1
}

/// The core gives up on the ledger: memory requests fail closed.
pub fn give_up() {
    GAVE_UP.store(true, Ordering::Release);
}

/// Whether the core gave up on the ledger.
pub fn gave_up() -> bool {
    GAVE_UP.load(Ordering::Acquire)
}

/// Claims the rebuild for this CPU; `false` when another CPU has it.
pub fn claim_rebuild() -> bool {
    !REBUILDING.swap(true, Ordering::Acquire)
}

/// Ends this CPU's claim on the rebuild.
pub fn release_rebuild() {
    REBUILDING.store(false, Ordering::Release);
}

/// Requests answered `Retry` since boot.
pub fn retries() -> u64 {
    RETRIES.load(Ordering::Relaxed)
}
