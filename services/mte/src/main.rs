//! The `mte` service: the MTE policy in a partition of its own (see the
//! library for the policy itself).
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_code)]

use moat_abi::Error;
use moat_abi::services::{MteBootInfo, MtePolicy, VmMtePolicy, VmMteRequest, mte};
use moat_abi::trap::{TrapDescriptor, Verdict};

#[derive(Default)]
struct Mte {
    host: Option<MtePolicy>,
}

impl mte::Server for Mte {
    fn configure(&mut self, info: MteBootInfo) -> Result<MtePolicy, Error> {
        let policy = moat_mte_policy::host_policy(&info);
        self.host = Some(policy);
        #[cfg(target_os = "none")]
        moat_rt::log!(
            "host MTE {} ({})",
            if policy.host_mte == 1 { "on" } else { "off" },
            match policy.reason {
                r if r == moat_abi::services::MteReason::NoHardware as u32 =>
                    "the hardware has no tag storage",
                r if r == moat_abi::services::MteReason::HostDisabled as u32 =>
                    "arm64.nomte on the host's command line",
                r if r == moat_abi::services::MteReason::ForcedOn as u32 => "moat.host_mte=on",
                r if r == moat_abi::services::MteReason::ForcedOff as u32 => "moat.host_mte=off",
                r if r == moat_abi::services::MteReason::CommandLineTooLong as u32 => {
                    "the command line is too long to check: off, to be safe"
                }
                _ => "default",
            }
        );
        Ok(policy)
    }

    fn decide(&mut self, trap: TrapDescriptor) -> Result<Verdict, Error> {
        // Only partitions whose MTE is off have their accesses trapped.
        Ok(moat_mte_policy::decide(&trap))
    }

    fn vm_policy(&mut self, request: VmMteRequest) -> Result<VmMtePolicy, Error> {
        let policy = moat_mte_policy::vm_policy(&request);
        #[cfg(target_os = "none")]
        moat_rt::log!(
            "VM {} MTE {}",
            request.vm,
            if policy.mte == 1 { "on" } else { "off" }
        );
        Ok(policy)
    }
}

#[cfg(target_os = "none")]
moat_rt::service_main!(main);

#[cfg(target_os = "none")]
fn main() -> ! {
    let mut server = Mte::default();
    moat_rt::serve(|header, body, reply| mte::dispatch_into(&mut server, header, body, reply))
}

#[cfg(not(target_os = "none"))]
fn main() {
    let _ = Mte::default();
}
