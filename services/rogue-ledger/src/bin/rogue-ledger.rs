//! The `rogue-ledger` service: a test fixture serving the `ledger`
//! interface that lies about chosen requests (this crate's library).
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_code)]

use moat_ledger::Extent;
use moat_rogue_ledger::Rogue;

#[cfg(target_os = "none")]
moat_rt::service_main!(main);

#[cfg(target_os = "none")]
fn main() -> ! {
    use moat_abi::services::ledger;
    let mut extents = [Extent::EMPTY; moat_ledger::SERVICE_CAPACITY];
    let mut server = Rogue::new(Some(&mut extents));
    moat_rt::serve(|header, body, reply| ledger::dispatch_into(&mut server, header, body, reply))
}

#[cfg(not(target_os = "none"))]
fn main() {
    let _ = Rogue::new(None::<&mut [Extent]>);
}
