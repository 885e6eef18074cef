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

/// Undoes [`give_up`] and brings the ledger up, its faults forgotten: the
/// host tests share one machine, and a test that makes the core give up
/// must leave it as the others expect it.
#[cfg(test)]
pub fn revive() {
    GAVE_UP.store(false, Ordering::Release);
    FAULTS_IN_A_ROW.store(0, Ordering::Relaxed);
    DOWN.store(false, Ordering::Release);
}

#[cfg(test)]
mod tests {
    //! With the transaction engine's world (`memory::tests`): the ledger's
    //! availability is the machine's, so these take their turn too, and
    //! leave the ledger up. None of them gives up on the ledger: that
    //! cannot be undone, and the other tests need it.

    use super::*;
    use crate::memory::tests::{RAM_SIZE, cpu, request, serial, world};
    use moat_abi::services::LedgerRequest;

    #[test]
    fn while_the_ledger_is_down_requests_answer_retry_at_once() {
        let _turn = serial();
        let w = world();
        mark_down();
        assert!(is_down());
        let before = retries();
        let share = request(LedgerRequest::HOST_SHARE_HYP, 0, w.ram, 1);
        assert_eq!(memory::transact(cpu(), share, None), Err(Error::Retry));
        assert_eq!(memory::lookup(cpu(), w.ram / PAGE), Err(Error::Retry));
        assert_eq!(retries(), before + 2);
        let restarts = mark_up();
        assert!(!is_down());
        assert_eq!(mark_up(), restarts + 1);
        // Up again: the request goes through (and is undone).
        memory::transact(cpu(), share, None).unwrap();
        let unshare = request(LedgerRequest::HOST_UNSHARE_HYP, 0, w.ram, 1);
        memory::transact(cpu(), unshare, None).unwrap();
        assert!(!gave_up());
    }

    #[test]
    fn a_ledger_that_fails_during_a_request_makes_it_retry() {
        let _turn = serial();
        let w = world();
        w.ledger
            .fault_on_commit
            .store(true, core::sync::atomic::Ordering::Relaxed);
        let share = request(LedgerRequest::HOST_SHARE_HYP, 0, w.ram + PAGE, 1);
        assert_eq!(memory::transact(cpu(), share, None), Err(Error::Retry));
        assert!(is_down());
        assert!(HYP_SHARES.lock().iter().all(|(s, _)| s != w.ram + PAGE));
        mark_up();
        // Faults in a row are counted until a request commits: that was
        // the first, and up to MAX_FAULTS_IN_A_ROW the ledger is restarted.
        for _ in 1..MAX_FAULTS_IN_A_ROW {
            ledger_failed();
        }
        assert!(!gave_up());
        assert_eq!(unavailable(), Error::Retry);
        mark_up();
        memory::transact(cpu(), share, None).unwrap();
        // That commit cleared the count: one more fault is only one.
        ledger_failed();
        assert!(!gave_up());
        mark_up();
        let unshare = request(LedgerRequest::HOST_UNSHARE_HYP, 0, w.ram + PAGE, 1);
        memory::transact(cpu(), unshare, None).unwrap();
    }

    #[test]
    fn one_cpu_claims_the_rebuild() {
        let _turn = serial();
        assert!(claim_rebuild());
        assert!(!claim_rebuild());
        release_rebuild();
        assert!(claim_rebuild());
        release_rebuild();
    }

    #[test]
    fn host_mapped_merges_what_the_host_maps() {
        let _turn = serial();
        let w = world();
        let half = RAM_SIZE / 2;
        // Two adjacent banks come back as one range.
        assert_eq!(
            host_mapped(&[(w.ram, half), (w.ram + half, half)]),
            Ok(vec![(w.ram, RAM_SIZE)])
        );
        // A hole where the host maps nothing splits it.
        {
            let mut host = memory::host_stage2();
            memory::stage2::with_vmid(0, || host.unmap(w.ram + PAGE, PAGE)).unwrap();
        }
        let mapped = host_mapped(&[(w.ram, RAM_SIZE)]);
        {
            let mut host = memory::host_stage2();
            memory::stage2::with_vmid(0, || {
                host.map_pages(
                    w.ram + PAGE,
                    w.ram + PAGE,
                    PAGE,
                    memory::stage2::Access::ReadWriteExecute,
                )
            })
            .unwrap();
        }
        assert_eq!(
            mapped,
            Ok(vec![(w.ram, PAGE), (w.ram + 2 * PAGE, RAM_SIZE - 2 * PAGE)])
        );
    }
}
