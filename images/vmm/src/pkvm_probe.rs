//! `moat-vmm probe-pkvm` (hidden, for the integration tests): runs the
//! Moat guest in its pKVM probe, which makes the calls of upstream Linux's
//! pKVM guest driver (the vendor-hypervisor UID, the KVM features,
//! HYP_MEMINFO, MEM_SHARE and MEM_UNSHARE), all served by the core, and
//! checks their answers.

use crate::device::Device;
use crate::protocol as p;
use moat_abi::vm::{ExitReason, pkvm};
use std::io;

/// Runs the probe; `Ok(true)` if every answer was the expected one.
pub fn run(guest: &[u8]) -> io::Result<bool> {
    let dev = Device::open()?;
    dev.create(p::BASE_IPA, 0)?;
    dev.donate(p::BASE_IPA, 1 << 20)?;
    dev.load(p::BASE_IPA, guest)?;
    let mut answer = [0u64; 4];
    let mut ok = true;
    let mut reports = 0;
    loop {
        let exit = dev.run(answer)?;
        answer = [0; 4];
        let function = exit[1] as u32;
        let x = [exit[2], exit[3], exit[4], exit[5], exit[6]];
        match ExitReason::from_u64(exit[0]) {
            Some(ExitReason::Hvc) if function == p::CONFIG => answer[0] = p::MODE_PKVM_PROBE,
            Some(ExitReason::Hvc) if function == p::PKVM_IDS => {
                println!(
                    "pkvm probe: UID is KVM's: {}, features {:#x}, granule {}",
                    x[0] == 1,
                    x[1],
                    x[2]
                );
                ok &= x[0] == 1 && x[1] == pkvm::FEATURE_BITS && x[2] == 4096;
                reports += 1;
            }
            Some(ExitReason::Hvc) if function == p::PKVM_SHARES => {
                let show = |v: u64| v as i64;
                println!(
                    "pkvm probe: share {}, again {}, unshare {}, again {}, unbacked IPA {}",
                    show(x[0]),
                    show(x[1]),
                    show(x[2]),
                    show(x[3]),
                    show(x[4])
                );
                let bad = pkvm::INVALID_PARAMETER;
                ok &= x == [0, bad, 0, bad, bad];
                reports += 1;
            }
            Some(ExitReason::Hvc) => answer[0] = moat_abi::Error::NotSupported.to_x0(),
            Some(ExitReason::Interrupt) => {}
            Some(ExitReason::Shutdown) => break,
            _ => return Err(io::Error::other(format!("unexpected exit {exit:x?}"))),
        }
    }
    Ok(ok && reports == 2)
}
