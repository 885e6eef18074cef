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

#[cfg(test)]
mod tests {
    //! The restart through the host's calls (`LEDGER_RESTART`, and any
    //! call that finds the ledger down), over the services' machine: the
    //! ledger's partition is the LEDGER service, whose runs the test
    //! scripts with the ledger's own logic (`moat_ledger::LedgerServer`),
    //! while the memory engine keeps the memory tests' ledger, the one the
    //! rebuilt ledger must equal. The test services' memory is the test
    //! process's heap, which no ledger knows, so the check after a rebuild
    //! always finds a mismatch: the core gives up on the ledger, which the
    //! test then undoes (`revive`) for the others.

    use super::*;
    use crate::arch::{clear_entries, entries_left, on_entry};
    use crate::dispatch::hvc::tests::{call, frame, memory_state, refused};
    use crate::memory::Ledger as _;
    use crate::memory::tests::world;
    use crate::partition::service::tests::{
        LEDGER, cpu, read_payload, reply_wait, service, services, write_reply,
    };
    use moat_abi::hypercall;
    use moat_abi::ipc::MessageHeader;
    use moat_abi::services::ledger::Server as _;
    use moat_abi::services::{LedgerBoot, LedgerExtent};
    use moat_abi::vm as abi;
    use moat_ledger::{Extent, LedgerServer};
    use std::cell::RefCell;
    use std::rc::Rc;
    use zerocopy::{FromBytes, IntoBytes};

    type Server = Rc<RefCell<LedgerServer<'static>>>;

    /// A fresh ledger, not booted: what the restarted partition holds.
    fn fresh_ledger() -> Server {
        let storage = Box::leak(vec![Extent::EMPTY; 1024].into_boxed_slice());
        Rc::new(RefCell::new(LedgerServer::new(Some(storage))))
    }

    /// The LEDGER service serves its next `calls` calls with `server`.
    fn serve(server: &Server, calls: usize) {
        for _ in 0..calls {
            let server = server.clone();
            on_entry(move |v| {
                let (call, request) = read_payload(LEDGER);
                let mut server = server.borrow_mut();
                let words = |bytes: &[u8]| -> Vec<u64> {
                    bytes
                        .chunks(8)
                        .map(|c| {
                            let mut w = [0u8; 8];
                            w[..c.len()].copy_from_slice(c);
                            u64::from_le_bytes(w)
                        })
                        .collect()
                };
                let word = u64::from_le_bytes(request[..8].try_into().unwrap());
                use moat_abi::services::ledger::Operation as Op;
                let reply: Result<Vec<u8>, Error> = match call.operation {
                    o if o == Op::boot as u16 => server
                        .boot(LedgerBoot::read_from_bytes(&request).unwrap())
                        .map(|s| s.as_bytes().to_vec()),
                    o if o == Op::prepare as u16 => server
                        .prepare(LedgerRequest::read_from_bytes(&request).unwrap())
                        .map(|t| t.as_bytes().to_vec()),
                    o if o == Op::commit as u16 => {
                        server.commit(word).map(|g| g.as_bytes().to_vec())
                    }
                    o if o == Op::extent as u16 => {
                        server.extent(word).map(|e| e.as_bytes().to_vec())
                    }
                    o => panic!("the rebuild asked the ledger for operation {o}"),
                };
                let body = reply.as_deref().map(words).unwrap_or_default();
                let header = MessageHeader::reply_to(
                    &call,
                    reply.as_ref().map(|_| ()).map_err(|e| *e),
                    8 * body.len() as u32,
                );
                write_reply(LEDGER, &header, &body);
                reply_wait(v);
            });
        }
    }

    /// Every extent of a ledger, from extent 0 on.
    fn extents(mut extent: impl FnMut(u64) -> Result<LedgerExtent, Error>) -> Vec<LedgerExtent> {
        (0..).map_while(|n| extent(n).ok()).collect()
    }

    fn x0(function: u32, args: &[u64]) -> Result<(), Error> {
        Error::from_x0(call(function, args).x[0]).unwrap()
    }

    /// Brings the ledger back up however the test ends, so that a failure
    /// here does not fail the tests that come after it.
    struct Revive;

    impl Drop for Revive {
        fn drop(&mut self) {
            memory_side::release_rebuild();
            memory_side::revive();
        }
    }

    #[test]
    fn a_restarted_ledger_answers_retry_while_away_and_is_rebuilt_from_the_cores_records() {
        let _turn = services();
        let _revive = Revive;
        let initial = memory_state();
        // What the lost ledger recorded: a VM holding a page, a host page
        // shared with the hypervisor.
        let handle = call(abi::VM_CREATE, &[0x8_0000, 0, 1]).x[1];
        assert_eq!(
            x0(abi::VM_DONATE, &[handle, frame(20), 2, 0x10_0000]),
            Ok(())
        );
        assert_eq!(x0(abi::HOST_SHARE_HYP, &[frame(23), 1]), Ok(()));
        let before = memory_state();
        let lost = extents(|n| world().ledger.extent(cpu(0), n));

        // Another CPU holds the rebuild: the restart is asked, the ledger
        // goes down, and every call needing it answers Retry at once with
        // nothing done; the calls that do not go on.
        assert!(memory_side::claim_rebuild());
        let retries = memory_side::retries();
        assert_eq!(x0(hypercall::LEDGER_RESTART, &[]), Err(Error::Retry));
        assert!(memory_side::is_down());
        refused(abi::HOST_SHARE_HYP, &[frame(24), 1], Error::Retry);
        refused(abi::VM_DONATE, &[handle, frame(24), 1, 0], Error::Retry);
        refused(hypercall::CHECK_CONSISTENCY, &[], Error::Retry);
        assert_eq!(call(hypercall::ABI_VERSION, &[]).x[0], 0);
        assert!(memory_side::retries() >= retries + 3);
        assert_eq!(memory_state(), before);
        memory_side::release_rebuild();

        // The ledger's partition faults as it restarts, at the next call:
        // that call is answered all the same, and the ledger stays down for
        // a later call to bring back.
        on_entry(|v| {
            v.exit_vector = crate::base::cpu::LOWER_SYNC;
            v.exit_esr = (u64::from(moat_kernel::esr::ec::DABT_LOW) << 26) | (1 << 25);
        });
        let r = call(hypercall::ABI_VERSION, &[]);
        assert_eq!(r.x[..2], [0, u64::from(moat_abi::ABI_VERSION)]);
        assert!(memory_side::is_down() && !memory_side::gave_up());
        assert_eq!(entries_left(), 0);

        // The host asks for the restart while the ledger is down: it is
        // tried once (one entry into the partition, which faults again),
        // not once for the call and again for the request.
        on_entry(|v| {
            v.exit_vector = crate::base::cpu::LOWER_SYNC;
            v.exit_esr = (u64::from(moat_kernel::esr::ec::DABT_LOW) << 26) | (1 << 25);
        });
        assert!(x0(hypercall::LEDGER_RESTART, &[]).is_err());
        assert!(memory_side::is_down() && !memory_side::gave_up());
        assert_eq!(entries_left(), 0);

        // The next call brings it back: reloaded, run to its first reply,
        // booted with the machine's RAM, told the core's records.
        on_entry(reply_wait);
        let rebuilt = fresh_ledger();
        serve(&rebuilt, 400);
        assert_eq!(call(hypercall::ABI_VERSION, &[]).x[0], 0);
        let served = 401 - entries_left();
        clear_entries();
        // The restart's first reply, the boot, then a prepare and a commit
        // for each fact at least: the VM, its pages, the share.
        assert!(served >= 8, "{served} calls");
        let mut server = rebuilt.borrow_mut();
        assert_eq!(extents(|n| server.extent(n)), lost);
        drop(server);
        // The check compares it with every partition's tables, and the test
        // services' heap pages are none of its: the core gives up on it.
        // Memory requests then fail closed, and no restart is tried again.
        assert!(memory_side::gave_up());
        let lines = crate::arch::take_lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("rebuilt ledger disagrees with the tables")),
            "{lines:#?}"
        );
        refused(abi::HOST_SHARE_HYP, &[frame(24), 1], Error::ServiceFailed);
        refused(hypercall::LEDGER_RESTART, &[], Error::ServiceFailed);
        refused(hypercall::CHECK_CONSISTENCY, &[], Error::ServiceFailed);
        assert_eq!(memory_state(), before);

        // Put back for the other tests: the ledger up, its partition
        // restarted, the VM and the share undone.
        memory_side::revive();
        on_entry(reply_wait);
        service(LEDGER).restart(cpu(0)).unwrap();
        assert_eq!(x0(abi::HOST_UNSHARE_HYP, &[frame(23), 1]), Ok(()));
        assert_eq!(x0(abi::VM_DESTROY, &[handle]), Ok(()));
        assert_eq!(x0(abi::VM_RECLAIM, &[handle, frame(20), 2]), Ok(()));
        assert_eq!(memory_state(), initial);
        assert_eq!(entries_left(), 0);
    }
}
