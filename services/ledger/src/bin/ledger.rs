//! The `ledger` service: the memory ledger (this crate's library) in a
//! partition of its own. It is built from the machine's RAM and the
//! hypervisor's memory at boot, and answers questions about ownership.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_code)]

use moat_abi::Error;
use moat_abi::services::{
    FrameRange, LEDGER_MAX_CHANGES, LedgerBoot, LedgerChange, LedgerExtent, LedgerRequest,
    LedgerSummary, LedgerTransaction, Party, ledger,
};
use moat_ledger::{Change, Extent, Ledger, LedgerError, Op, Owner, PfnRange, Transaction};

/// Extents the service can hold: the boot layout plus thousands of
/// fragmenting operations (24 bytes each).
#[cfg(target_os = "none")]
const CAPACITY: usize = 4096;

struct Service<'a> {
    storage: Option<&'a mut [Extent]>,
    ledger: Option<Ledger<&'a mut [Extent]>>,
    /// The transaction last prepared, waiting for the core to apply and
    /// commit it. A later `prepare` replaces it.
    prepared: Option<Transaction>,
}

/// The ledger's request for a wire request; `None` for an unknown code or
/// a party id that is not a VM handle.
fn op_of(request: &LedgerRequest) -> Option<Op> {
    let range = PfnRange::new(request.frames.start, request.frames.count);
    let vm = u16::try_from(request.party).ok();
    Some(match request.op {
        LedgerRequest::HOST_SHARE_HYP => Op::HostShareHyp { range },
        LedgerRequest::HOST_UNSHARE_HYP => Op::HostUnshareHyp { range },
        LedgerRequest::HOST_DONATE_VM => Op::HostDonateVm { range, vm: vm? },
        LedgerRequest::VM_SHARE_HOST => Op::VmShareHost { vm: vm?, range },
        LedgerRequest::VM_UNSHARE_HOST => Op::VmUnshareHost { vm: vm?, range },
        LedgerRequest::CREATE_VM => Op::CreateVm { vm: vm? },
        LedgerRequest::DESTROY_VM => Op::DestroyVm { vm: vm? },
        LedgerRequest::RECLAIM => Op::Reclaim { vm: vm?, range },
        _ => return None,
    })
}

/// The ABI error for a refusal: malformed requests are `InvalidParameters`,
/// pages or VMs in the wrong state `Denied`, a full ledger `NoMemory`.
fn error_of(e: LedgerError) -> Error {
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

fn frames(r: PfnRange) -> FrameRange {
    FrameRange {
        start: r.start,
        count: r.count,
    }
}

/// The wire form of a transaction answering `request`.
fn encode(request: LedgerRequest, tx: &Transaction) -> LedgerTransaction {
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

fn party(owner: Option<Owner>) -> Party {
    match owner {
        None => Party {
            kind: Party::NONE,
            id: 0,
        },
        Some(Owner::Host) => Party {
            kind: Party::HOST,
            id: 0,
        },
        Some(Owner::Hypervisor) => Party {
            kind: Party::HYPERVISOR,
            id: 0,
        },
        Some(Owner::Service(s)) => Party {
            kind: Party::SERVICE,
            id: u32::from(s),
        },
        Some(Owner::Vm(v)) => Party {
            kind: Party::VM,
            id: u32::from(v),
        },
    }
}

fn ranges(list: &[FrameRange], count: u32) -> Option<heapless_ranges::Ranges> {
    let n = count as usize;
    if n > list.len() {
        return None;
    }
    let mut out = heapless_ranges::Ranges::default();
    for (slot, r) in out.0.iter_mut().zip(&list[..n]) {
        *slot = PfnRange::new(r.start, r.count);
    }
    out.1 = n;
    Some(out)
}

/// A fixed-size list of ranges (the boot message holds at most six).
mod heapless_ranges {
    use moat_ledger::PfnRange;

    #[derive(Default)]
    pub struct Ranges(
        pub [PfnRange; moat_abi::services::LEDGER_BOOT_RANGES],
        pub usize,
    );

    impl Ranges {
        pub fn as_slice(&self) -> &[PfnRange] {
            &self.0[..self.1]
        }
    }
}

impl ledger::Server for Service<'_> {
    fn boot(&mut self, boot: LedgerBoot) -> Result<LedgerSummary, Error> {
        let storage = self.storage.take().ok_or(Error::Denied)?;
        let ram = ranges(&boot.ram, boot.ram_count).ok_or(Error::InvalidParameters)?;
        let hyp =
            ranges(&boot.hypervisor, boot.hypervisor_count).ok_or(Error::InvalidParameters)?;
        let ledger = Ledger::new(storage, ram.as_slice(), hyp.as_slice())
            .map_err(|_| Error::InvalidParameters)?;
        let summary = LedgerSummary {
            extents: ledger.extents().len() as u64,
            state_bytes: ledger.state_bytes() as u64,
        };
        self.ledger = Some(ledger);
        Ok(summary)
    }

    fn extent(&mut self, index: u64) -> Result<LedgerExtent, Error> {
        let ledger = self.ledger.as_ref().ok_or(Error::Denied)?;
        let e = usize::try_from(index)
            .ok()
            .and_then(|i| ledger.extents().get(i))
            .ok_or(Error::NotSupported)?;
        Ok(LedgerExtent {
            frames: frames(PfnRange::new(e.start, e.count)),
            owner: party(Some(e.owner)),
            borrower: party(e.borrower),
        })
    }

    fn prepare(&mut self, request: LedgerRequest) -> Result<LedgerTransaction, Error> {
        let ledger = self.ledger.as_ref().ok_or(Error::Denied)?;
        self.prepared = None;
        let op = op_of(&request).ok_or(Error::InvalidParameters)?;
        let tx = ledger.prepare(op).map_err(error_of)?;
        self.prepared = Some(tx);
        Ok(encode(request, &tx))
    }

    fn commit(&mut self, generation: u64) -> Result<u64, Error> {
        let ledger = self.ledger.as_mut().ok_or(Error::Denied)?;
        let tx = self.prepared.take().ok_or(Error::Denied)?;
        if tx.generation() != generation {
            return Err(Error::Denied);
        }
        ledger.commit(&tx).map_err(error_of)?;
        Ok(ledger.generation())
    }

    fn lookup(&mut self, pfn: u64) -> Result<LedgerExtent, Error> {
        let ledger = self.ledger.as_ref().ok_or(Error::Denied)?;
        let e = ledger
            .extents_in(PfnRange::new(pfn, 1))
            .first()
            .filter(|e| e.start <= pfn && pfn < e.end())
            .ok_or(Error::NotSupported)?;
        Ok(LedgerExtent {
            frames: FrameRange {
                start: e.start,
                count: e.count,
            },
            owner: party(Some(e.owner)),
            borrower: party(e.borrower),
        })
    }
}

#[cfg(target_os = "none")]
moat_rt::service_main!(main);

#[cfg(target_os = "none")]
fn main() -> ! {
    let mut extents = [Extent::EMPTY; CAPACITY];
    let mut server = Service {
        storage: Some(&mut extents),
        ledger: None,
        prepared: None,
    };
    moat_rt::serve(|header, body, reply| ledger::dispatch_into(&mut server, header, body, reply))
}

#[cfg(not(target_os = "none"))]
fn main() {
    let _ = Service {
        storage: None,
        ledger: None,
        prepared: None,
    };
}
