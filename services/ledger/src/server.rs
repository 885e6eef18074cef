//! The `ledger` interface served by a [`Ledger`]: what the ledger service
//! runs, and what a test double builds on.

use crate::ledger::Planned;
use crate::wire;
use crate::{Extent, Ledger, PfnRange};
use moat_abi::Error;
use moat_abi::services::{
    LedgerBoot, LedgerExtent, LedgerRequest, LedgerSummary, LedgerTransaction, ledger,
};

/// Extents a ledger service holds: the boot layout plus thousands of
/// fragmenting operations (24 bytes each; see the crate documentation).
pub const SERVICE_CAPACITY: usize = 4096;

/// A ledger behind the `ledger` interface. It is built at `boot` in the
/// extent buffer it was given, answers each `prepare` with a transaction
/// and keeps it until `commit` records it (a later `prepare` replaces it).
pub struct LedgerServer<'a> {
    storage: Option<&'a mut [Extent]>,
    ledger: Option<Ledger<&'a mut [Extent]>>,
    prepared: Option<Planned>,
}

impl<'a> LedgerServer<'a> {
    /// A server whose ledger `boot` builds in `storage`.
    pub fn new(storage: Option<&'a mut [Extent]>) -> Self {
        Self {
            storage,
            ledger: None,
            prepared: None,
        }
    }

    /// The ledger, once booted.
    pub fn ledger(&self) -> Option<&Ledger<&'a mut [Extent]>> {
        self.ledger.as_ref()
    }

    /// Drops the transaction waiting for `commit`, so that no commit can
    /// record it.
    pub fn forget_prepared(&mut self) {
        self.prepared = None;
    }
}

impl ledger::Server for LedgerServer<'_> {
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
        let planned = ledger.plan_for_commit(op).map_err(wire::error_of)?;
        let encoded = wire::encode(request, planned.transaction());
        self.prepared = Some(planned);
        Ok(encoded)
    }

    fn commit(&mut self, generation: u64) -> Result<u64, Error> {
        let ledger = self.ledger.as_mut().ok_or(Error::Denied)?;
        let planned = self.prepared.take().ok_or(Error::Denied)?;
        if planned.transaction().generation() != generation {
            return Err(Error::Denied);
        }
        // Planned by this server's ledger: committed without a second plan
        // (`Ledger::commit_planned`), `Stale` if another commit came first.
        ledger.commit_planned(&planned).map_err(wire::error_of)?;
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
