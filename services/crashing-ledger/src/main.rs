//! The `crashing-ledger` service: a test fixture serving the `ledger`
//! interface with the real ledger, except that every tenth `RECLAIM` it is
//! asked to prepare makes it take an undefined-instruction exception. The
//! core must restart it and rebuild its state from its own records; the
//! rebuild never replays a reclaim, so a restarted instance always comes
//! back, and crashes again ten reclaims later.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_code)]

use moat_abi::Error;
use moat_abi::services::{
    LedgerBoot, LedgerExtent, LedgerRequest, LedgerSummary, LedgerTransaction, ledger,
};
use moat_ledger::LedgerServer;

/// Reclaims prepared between two crashes.
const CRASH_EVERY: u64 = 10;

struct Crashing<'a> {
    inner: LedgerServer<'a>,
    reclaims: u64,
}

impl ledger::Server for Crashing<'_> {
    fn boot(&mut self, boot: LedgerBoot) -> Result<LedgerSummary, Error> {
        self.inner.boot(boot)
    }

    fn extent(&mut self, index: u64) -> Result<LedgerExtent, Error> {
        self.inner.extent(index)
    }

    fn prepare(&mut self, request: LedgerRequest) -> Result<LedgerTransaction, Error> {
        if request.op == LedgerRequest::RECLAIM {
            self.reclaims += 1;
            if self.reclaims.is_multiple_of(CRASH_EVERY) {
                crash();
            }
        }
        self.inner.prepare(request)
    }

    fn commit(&mut self, generation: u64) -> Result<u64, Error> {
        self.inner.commit(generation)
    }

    fn lookup(&mut self, pfn: u64) -> Result<LedgerExtent, Error> {
        self.inner.lookup(pfn)
    }
}

#[cfg(target_os = "none")]
fn crash() {
    moat_rt::undefined_instruction();
}

#[cfg(not(target_os = "none"))]
fn crash() {}

#[cfg(target_os = "none")]
moat_rt::service_main!(main);

#[cfg(target_os = "none")]
fn main() -> ! {
    let mut extents = [moat_ledger::Extent::EMPTY; moat_ledger::SERVICE_CAPACITY];
    let mut server = Crashing {
        inner: LedgerServer::new(Some(&mut extents)),
        reclaims: 0,
    };
    moat_rt::serve(|header, body, reply| ledger::dispatch_into(&mut server, header, body, reply))
}

#[cfg(not(target_os = "none"))]
fn main() {
    let mut server = Crashing {
        inner: LedgerServer::new(None),
        reclaims: 0,
    };
    crash();
    let _ = ledger::Server::lookup(&mut server, 0);
}
