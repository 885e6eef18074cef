//! The `ledger` service: the memory ledger (this crate's library) in a
//! partition of its own. It is built from the machine's RAM and the
//! hypervisor's memory at boot, answers each memory request with a
//! transaction, records the transactions the core applied, and answers
//! questions about ownership ([`moat_ledger::LedgerServer`]).
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_code)]

use moat_ledger::{Extent, LedgerServer};

#[cfg(target_os = "none")]
moat_rt::service_main!(main);

#[cfg(target_os = "none")]
fn main() -> ! {
    use moat_abi::services::ledger;
    let mut extents = [Extent::EMPTY; moat_ledger::SERVICE_CAPACITY];
    let mut server = LedgerServer::new(Some(&mut extents));
    moat_rt::serve(|header, body, reply| ledger::dispatch_into(&mut server, header, body, reply))
}

#[cfg(not(target_os = "none"))]
fn main() {
    let _ = LedgerServer::new(None::<&mut [Extent]>);
}
