//! The `ledger` service: the memory ledger (this crate's library) in a
//! partition of its own. It is built from the machine's RAM and the
//! hypervisor's memory at boot, and answers questions about ownership.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_code)]

use moat_abi::Error;
use moat_abi::services::{LedgerBoot, LedgerExtent, LedgerSummary, Party, ledger};
use moat_ledger::{Extent, Ledger, Owner, PfnRange};

/// Extents the service can hold: the boot layout plus thousands of
/// fragmenting operations (24 bytes each).
#[cfg(target_os = "none")]
const CAPACITY: usize = 4096;

struct Service<'a> {
    storage: Option<&'a mut [Extent]>,
    ledger: Option<Ledger<&'a mut [Extent]>>,
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

fn ranges(list: &[moat_abi::services::FrameRange], count: u32) -> Option<heapless_ranges::Ranges> {
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
            frames: moat_abi::services::FrameRange {
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
    };
    moat_rt::serve(|header, body, reply| ledger::dispatch_into(&mut server, header, body, reply))
}

#[cfg(not(target_os = "none"))]
fn main() {
    let _ = Service {
        storage: None,
        ledger: None,
    };
}
