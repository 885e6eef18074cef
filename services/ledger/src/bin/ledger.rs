//! The `ledger` service: the memory ledger (this crate's library) in a
//! partition of its own. It is built from the machine's RAM and the
//! hypervisor's memory at boot, answers each memory request with a
//! transaction, records the transactions the core applied, and answers
//! questions about ownership.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_code)]

use moat_abi::Error;
use moat_abi::services::{
    LedgerBoot, LedgerExtent, LedgerRequest, LedgerSummary, LedgerTransaction, ledger,
};
use moat_ledger::wire;
use moat_ledger::{Extent, Ledger, PfnRange, Transaction};

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

impl ledger::Server for Service<'_> {
    fn boot(&mut self, boot: LedgerBoot) -> Result<LedgerSummary, Error> {
        let storage = self.storage.take().ok_or(Error::Denied)?;
        let ledger = wire::boot(storage, &boot)?;
        let summary = LedgerSummary {
            extents: ledger.extents().len() as u64,
            state_bytes: ledger.state_bytes() as u64,
        };
        self.ledger = Some(ledger);
        Ok(summary)
    }

    fn extent(&mut self, index: u64) -> Result<LedgerExtent, Error> {
        let ledger = self.ledger.as_ref().ok_or(Error::Denied)?;
        usize::try_from(index)
            .ok()
            .and_then(|i| ledger.extents().get(i))
            .map(wire::extent_of)
            .ok_or(Error::NotSupported)
    }

    fn prepare(&mut self, request: LedgerRequest) -> Result<LedgerTransaction, Error> {
        let ledger = self.ledger.as_ref().ok_or(Error::Denied)?;
        self.prepared = None;
        let op = wire::op_of(&request).ok_or(Error::InvalidParameters)?;
        let tx = ledger.prepare(op).map_err(wire::error_of)?;
        self.prepared = Some(tx);
        Ok(wire::encode(request, &tx))
    }

    fn commit(&mut self, generation: u64) -> Result<u64, Error> {
        let ledger = self.ledger.as_mut().ok_or(Error::Denied)?;
        let tx = self.prepared.take().ok_or(Error::Denied)?;
        if tx.generation() != generation {
            return Err(Error::Denied);
        }
        ledger.commit(&tx).map_err(wire::error_of)?;
        Ok(ledger.generation())
    }

    fn lookup(&mut self, pfn: u64) -> Result<LedgerExtent, Error> {
        let ledger = self.ledger.as_ref().ok_or(Error::Denied)?;
        ledger
            .extents_in(PfnRange::new(pfn, 1))
            .first()
            .filter(|e| e.start <= pfn && pfn < e.end())
            .map(wire::extent_of)
            .ok_or(Error::NotSupported)
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
