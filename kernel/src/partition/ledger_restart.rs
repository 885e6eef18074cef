//! Restarting the memory ledger, and rebuilding its state from the core's
//! own records.
//!
//! A restart is the core's act:
//!
//! 1. the ledger is marked down (`memory::ledger_restart`): from then on a
//!    memory request (and `CHECK_CONSISTENCY`) answers `Retry` at once,
//!    with nothing done; the core never waits for the ledger on the host's
//!    behalf, and VM runs, MTE policy and every call not needing the ledger
//!    go on;
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
//! It lives with the partitions because it drives one (the ledger's) and
//! reads the others' records (the VMs').

use crate::arch::sysreg;
use crate::base::cpu::PerCpu;
use crate::memory::MEMORY;
use crate::memory::ledger_restart as memory_side;
use crate::partition::service;
use alloc::vec::Vec;
use moat_abi::Error;
use moat_abi::services::LedgerRequest;
use moat_abi::services::ledger;
use moat_kernel::lockorder::Rank;
use moat_kernel::rebuild::{self, Facts, VmFacts};

/// `LEDGER_RESTART`: stops the ledger and restarts it. Any party may ask
/// without harm to isolation: the new state comes from the core alone.
pub fn request_restart(cpu: &PerCpu) -> Result<(), Error> {
    let index = service::index_of(ledger::SERVICE_ID).ok_or(Error::NotSupported)?;
    if memory_side::gave_up() {
        return Err(Error::ServiceFailed);
    }
    {
        // No call to the ledger is in flight while the memory lock is held.
        let _order = crate::base::lockcheck::hold(Rank::Memory);
        let _serial = MEMORY.lock();
        if !memory_side::is_down() {
            if let Some(s) = service::get(index) {
                s.stop("restart requested");
            }
            memory_side::mark_down();
        }
    }
    poll(cpu)
}

/// Brings a down ledger back if it can be done now. Cheap when the ledger
/// is up (one load, inlined into the hypercall path). `Retry` while it
/// stays down.
#[inline(always)]
pub fn poll(cpu: &PerCpu) -> Result<(), Error> {
    if !memory_side::is_down() {
        return Ok(());
    }
    bring_back(cpu)
}

/// The ledger is down: restart and rebuild it if no other CPU is.
#[cold]
#[inline(never)]
fn bring_back(cpu: &PerCpu) -> Result<(), Error> {
    if memory_side::gave_up() {
        return Err(Error::ServiceFailed);
    }
    if !memory_side::claim_rebuild() {
        return Err(memory_side::unavailable());
    }
    let result = restart_and_rebuild(cpu);
    memory_side::release_rebuild();
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
        return Err(memory_side::unavailable());
    }
    let requests = {
        let _order = crate::base::lockcheck::hold(Rank::Memory);
        let _serial = MEMORY.lock();
        s.restart(cpu).inspect_err(|e| {
            crate::log!("ledger: the restarted ledger did not start ({e:?})");
        })?;
        let m = crate::base::state::machine();
        match service::ledger_boot(cpu, &m.platform.memory, m.carve_out.as_slice()) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e),
            None => return Err(Error::NotSupported),
        }
        let bytes = |r: &moat_platform::dt::Range| (r.base, r.size);
        let ram: Vec<(u64, u64)> = m.platform.memory.iter().map(bytes).collect();
        let carve_out: Vec<(u64, u64)> = m.carve_out.as_slice().iter().map(bytes).collect();
        let host_mapped = memory_side::host_mapped(&ram)?;
        let mut hyp_shares = Vec::new();
        hyp_shares
            .try_reserve(memory_side::MAX_HYP_SHARES)
            .map_err(|_| Error::NoMemory)?;
        hyp_shares.extend(memory_side::HYP_SHARES.lock().iter());
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
            record(cpu, request).inspect_err(|e| {
                crate::log!("ledger: rebuilding, {request:?} was refused ({e:?})");
            })
        })?;
        requests
    };
    drop(vms);
    let rebuilt = sysreg::now();
    // The rebuilt ledger must agree with every partition's tables before
    // anything relies on it.
    let checked = super::check_consistency(cpu).map_err(|mismatch| {
        crate::log!("ledger: the rebuilt ledger disagrees with the tables ({mismatch:?})");
        s.stop("its rebuilt state disagrees with the tables");
        memory_side::give_up();
        Error::ServiceFailed
    })?;
    let n = memory_side::mark_up();
    let (_, freq) = sysreg::counter();
    let micros = |from: u64, to: u64| to.wrapping_sub(from).saturating_mul(1_000_000) / freq.max(1);
    crate::log!(
        "ledger: restarted and rebuilt from the core's records (restart {n}): {requests} request(s) replayed, {} extent(s), {} VM(s); {} request(s) answered Retry so far; reload and rebuild {} us, check {} us",
        checked.extents,
        checked.vms,
        memory_side::retries(),
        micros(started, rebuilt),
        micros(rebuilt, sysreg::now()),
    );
    Ok(())
}

/// Records `request` in the ledger without applying anything: prepare,
/// then commit the transaction prepared.
fn record(cpu: &PerCpu, request: LedgerRequest) -> Result<(), Error> {
    use crate::memory::Ledger as _;
    let tx = service::LEDGER.prepare(cpu, &request)?;
    if tx.request != request {
        return Err(Error::Denied);
    }
    service::LEDGER.commit(cpu, tx.generation).map(|_| ())
}
