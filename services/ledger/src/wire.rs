//! The ledger's side of the `ledger` interface (`moat_abi::services`):
//! requests, transactions, extents and errors, converted between the wire
//! structs and the ledger's own types.

use crate::{Change, Extent, Ledger, LedgerError, Op, Owner, PfnRange, Transaction};
use moat_abi::Error;
use moat_abi::services::{
    FrameRange, LEDGER_BOOT_RANGES, LEDGER_MAX_CHANGES, LedgerBoot, LedgerChange, LedgerExtent,
    LedgerRequest, LedgerTransaction, Party,
};

/// The ledger's request for a wire request; `None` for an unknown code, a
/// party id that is not a VM handle, or an argument the request does not
/// use that is not zero (a party for the host's own requests, frames for
/// creating and destroying a VM): no argument is ever silently ignored.
pub fn op_of(request: &LedgerRequest) -> Option<Op> {
    let range = PfnRange::new(request.frames.start, request.frames.count);
    let vm = u16::try_from(request.party).ok();
    let no_party = (request.party == 0).then_some(());
    let no_frames = (request.frames == FrameRange::default()).then_some(());
    Some(match request.op {
        LedgerRequest::HOST_SHARE_HYP => no_party.map(|()| Op::HostShareHyp { range })?,
        LedgerRequest::HOST_UNSHARE_HYP => no_party.map(|()| Op::HostUnshareHyp { range })?,
        LedgerRequest::HOST_DONATE_VM => Op::HostDonateVm { range, vm: vm? },
        LedgerRequest::VM_SHARE_HOST => Op::VmShareHost { vm: vm?, range },
        LedgerRequest::VM_UNSHARE_HOST => Op::VmUnshareHost { vm: vm?, range },
        LedgerRequest::CREATE_VM => no_frames.and(vm).map(|vm| Op::CreateVm { vm })?,
        LedgerRequest::DESTROY_VM => no_frames.and(vm).map(|vm| Op::DestroyVm { vm })?,
        LedgerRequest::RECLAIM => Op::Reclaim { vm: vm?, range },
        LedgerRequest::HOST_DONATE_HYP => no_party.map(|()| Op::HostDonateHyp { range })?,
        LedgerRequest::HYP_RETURN_HOST => no_party.map(|()| Op::HypReturnHost { range })?,
        _ => return None,
    })
}

/// The ABI error for a refusal: malformed requests are `InvalidParameters`,
/// pages or VMs in the wrong state `Denied`, a full ledger `NoMemory`.
pub fn error_of(e: LedgerError) -> Error {
    match e {
        LedgerError::ZeroLength
        | LedgerError::Unaligned
        | LedgerError::Overflow
        | LedgerError::OutOfRam { .. }
        | LedgerError::NoSuchVm(_)
        | LedgerError::TooManyRanges
        | LedgerError::RamOverlap
        | LedgerError::HypervisorOutsideRam { .. } => Error::InvalidParameters,
        LedgerError::PageNotOwned { .. }
        | LedgerError::PageShared { .. }
        | LedgerError::PageNotShared { .. }
        | LedgerError::VmExists(_)
        | LedgerError::VmDying(_)
        | LedgerError::VmAlive(_)
        | LedgerError::Stale => Error::Denied,
        LedgerError::TooManyVms | LedgerError::OutOfCapacity => Error::NoMemory,
    }
}

/// A range on the wire.
pub fn frames(r: PfnRange) -> FrameRange {
    FrameRange {
        start: r.start,
        count: r.count,
    }
}

/// A party on the wire (`None`: no party).
pub fn party(owner: Option<Owner>) -> Party {
    let (kind, id) = match owner {
        None => (Party::NONE, 0),
        Some(Owner::Host) => (Party::HOST, 0),
        Some(Owner::Hypervisor) => (Party::HYPERVISOR, 0),
        Some(Owner::Service(s)) => (Party::SERVICE, u32::from(s)),
        Some(Owner::Vm(v)) => (Party::VM, u32::from(v)),
    };
    Party { kind, id }
}

/// An extent on the wire.
pub fn extent_of(e: &Extent) -> LedgerExtent {
    LedgerExtent {
        frames: frames(PfnRange::new(e.start, e.count)),
        owner: party(Some(e.owner)),
        borrower: party(e.borrower),
    }
}

/// The wire form of `tx`, the answer to `request`.
pub fn encode(request: LedgerRequest, tx: &Transaction) -> LedgerTransaction {
    let mut out = LedgerTransaction {
        generation: tx.generation(),
        request,
        ..Default::default()
    };
    for (slot, change) in out.changes.iter_mut().zip(tx.changes()) {
        *slot = match *change {
            Change::Unmap { party: p, range } => LedgerChange {
                kind: LedgerChange::UNMAP,
                perms: 0,
                party: party(Some(p)),
                frames: frames(range),
            },
            Change::Map {
                party: p,
                range,
                perms,
            } => LedgerChange {
                kind: LedgerChange::MAP,
                perms: u32::from(perms.bits()),
                party: party(Some(p)),
                frames: frames(range),
            },
        };
    }
    out.change_count = tx.changes().len().min(LEDGER_MAX_CHANGES) as u32;
    if let Some(scrub) = tx.scrub() {
        out.has_scrub = 1;
        out.scrub = frames(scrub);
    }
    out
}

/// The RAM and hypervisor ranges of a boot message, or `None` if a count
/// exceeds what the message holds.
pub fn boot_ranges(
    boot: &LedgerBoot,
) -> Option<(
    [PfnRange; LEDGER_BOOT_RANGES],
    usize,
    [PfnRange; LEDGER_BOOT_RANGES],
    usize,
)> {
    let ranges = |list: &[FrameRange], n: u32| {
        let n = n as usize;
        let mut out = [PfnRange::default(); LEDGER_BOOT_RANGES];
        for (slot, r) in out.iter_mut().zip(list.get(..n)?) {
            *slot = PfnRange::new(r.start, r.count);
        }
        Some((out, n))
    };
    let (ram, nram) = ranges(&boot.ram, boot.ram_count)?;
    let (hyp, nhyp) = ranges(&boot.hypervisor, boot.hypervisor_count)?;
    Some((ram, nram, hyp, nhyp))
}

/// Builds the ledger a boot message describes in `storage`.
pub fn boot<S: AsRef<[Extent]> + AsMut<[Extent]>>(
    storage: S,
    boot: &LedgerBoot,
) -> Result<Ledger<S>, Error> {
    let (ram, nram, hyp, nhyp) = boot_ranges(boot).ok_or(Error::InvalidParameters)?;
    Ledger::new(storage, &ram[..nram], &hyp[..nhyp]).map_err(|_| Error::InvalidParameters)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_to_ops() {
        let r = |op, party| LedgerRequest {
            op,
            party,
            frames: FrameRange { start: 5, count: 2 },
        };
        let range = PfnRange::new(5, 2);
        assert_eq!(
            op_of(&r(LedgerRequest::HOST_DONATE_VM, 3)),
            Some(Op::HostDonateVm { range, vm: 3 })
        );
        assert_eq!(
            op_of(&r(LedgerRequest::RECLAIM, 3)),
            Some(Op::Reclaim { vm: 3, range })
        );
        assert_eq!(op_of(&r(LedgerRequest::HOST_DONATE_VM, 1 << 20)), None);
        assert_eq!(op_of(&r(99, 0)), None);
    }

    #[test]
    fn an_argument_a_request_does_not_use_must_be_zero() {
        let r = |op, party, start, count| LedgerRequest {
            op,
            party,
            frames: FrameRange { start, count },
        };
        // The core refuses a transaction for a request whose frames
        // overflow; the ledger must not answer one either.
        assert_eq!(
            op_of(&r(LedgerRequest::CREATE_VM, 5, 1 << 60, 1 << 61)),
            None
        );
        assert_eq!(op_of(&r(LedgerRequest::DESTROY_VM, 5, 0, 1)), None);
        assert_eq!(op_of(&r(LedgerRequest::HOST_SHARE_HYP, 3, 5, 2)), None);
        assert_eq!(op_of(&r(LedgerRequest::HOST_DONATE_HYP, 1, 5, 2)), None);
        assert_eq!(
            op_of(&r(LedgerRequest::CREATE_VM, 5, 0, 0)),
            Some(Op::CreateVm { vm: 5 })
        );
        assert_eq!(
            op_of(&r(LedgerRequest::HOST_SHARE_HYP, 0, 5, 2)),
            Some(Op::HostShareHyp {
                range: PfnRange::new(5, 2)
            })
        );
    }

    #[test]
    fn a_transaction_encodes_its_changes_and_scrub() {
        let mut storage = [Extent::EMPTY; 16];
        let ledger = Ledger::new(&mut storage[..], &[PfnRange::new(0x40000, 0x1000)], &[]).unwrap();
        let tx = ledger.prepare(Op::CreateVm { vm: 1 }).unwrap();
        let request = LedgerRequest {
            op: LedgerRequest::CREATE_VM,
            party: 1,
            frames: FrameRange::default(),
        };
        let wire = encode(request, &tx);
        assert_eq!(wire.change_count, 0);
        assert_eq!(wire.has_scrub, 0);
        assert_eq!(error_of(LedgerError::PageShared { pfn: 1 }), Error::Denied);
        assert_eq!(error_of(LedgerError::OutOfCapacity), Error::NoMemory);
        assert_eq!(
            error_of(LedgerError::OutOfRam { pfn: 1 }),
            Error::InvalidParameters
        );
    }
}
