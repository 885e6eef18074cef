//! The `trace` service: counts the traps of the classes the image manifest
//! lets it observe, and answers the host's `counts` hypercall.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_code)]

use moat_abi::Error;
use moat_abi::services::{Empty, TraceCounts, TrapDescriptor, trace};

/// The service's whole state.
#[derive(Default)]
struct Trace {
    counts: TraceCounts,
}

impl trace::Server for Trace {
    fn observe(&mut self, trap: TrapDescriptor) -> Result<Empty, Error> {
        let slot = self
            .counts
            .by_class
            .get_mut(trap.class as usize)
            .ok_or(Error::InvalidParameters)?;
        *slot = slot.saturating_add(1);
        self.counts.total = self.counts.total.saturating_add(1);
        Ok(Empty)
    }

    fn counts(&mut self, _: Empty) -> Result<TraceCounts, Error> {
        Ok(self.counts)
    }

    fn reset(&mut self, _: Empty) -> Result<Empty, Error> {
        self.counts = TraceCounts::default();
        Ok(Empty)
    }

    fn ping(&mut self, _: Empty) -> Result<Empty, Error> {
        Ok(Empty)
    }
}

#[cfg(target_os = "none")]
moat_rt::service_main!(main);

#[cfg(target_os = "none")]
fn main() -> ! {
    let mut server = Trace::default();
    moat_rt::log!("ready: counting observed traps");
    moat_rt::serve(|header, body, reply| trace::dispatch_into(&mut server, header, body, reply))
}

#[cfg(not(target_os = "none"))]
fn main() {
    // The service only runs in its partition; on the development machine this
    // binary exists so the workspace builds as one.
    let _ = Trace::default();
}
