//! `moat-vmm probe-vgic` (hidden, for the integration tests): runs the
//! Moat guest in its interrupt probe and checks what its virtual CPU
//! interface delivered: the virtual timer's PPI 27, an SPI this process
//! injected with `VCPU_RUN`, and an SGI the guest sent itself (an `Sgi`
//! exit routed back as an injection). It also counts the `Interrupt` exits
//! while the guest spins with a fired, unmasked timer it does not take:
//! the core must keep that timer's physical interrupt from ending every
//! run.

use crate::device::{self, Device};
use crate::protocol as p;
use moat_abi::vm::{ExitReason, Injection, VmFlags};
use std::io;

/// Most `Interrupt` exits the spin may see: one per slice would be
/// `PROBE_SPIN / 2000` exits at 4,000 instructions a slice, far fewer than
/// any real slice runs; a timer that ends every run gives millions.
const MOST_SPIN_INTERRUPTS: u64 = p::PROBE_SPIN / 2000;

/// The priority injections use (Linux's default).
const PRIORITY: u8 = 0xa0;

/// Runs the probe; `Ok(true)` if everything came out as expected.
pub fn run(guest: &[u8], vgic: bool) -> io::Result<bool> {
    let dev = Device::open()?;
    let flags = if vgic { VmFlags::VGIC } else { 0 };
    dev.create(p::BASE_IPA, flags)?;
    dev.donate(p::BASE_IPA, 1 << 20)?;
    dev.load(p::BASE_IPA, guest)?;
    let mut answer = [0u64; 4];
    let mut inject = [0u64; 2];
    let mut spinning = false;
    let mut spin_interrupts = 0u64;
    let mut ok = true;
    let mut done = false;
    let mut eoi_reported = false;
    loop {
        let exit = dev.run_injecting(answer, inject)?;
        answer = [0; 4];
        inject = [0; 2];
        let reason = ExitReason::from_u64(exit[0]);
        let (function, x1, x2) = (exit[1] as u32, exit[2], exit[3]);
        match reason {
            Some(ExitReason::Hvc) if function == p::CONFIG => {
                answer[0] = p::MODE_VGIC_PROBE;
                answer[1] = if vgic { p::FLAG_VGIC } else { 0 };
            }
            Some(ExitReason::Hvc) if function == p::VGIC_TIMER => {
                println!("vgic probe: timer interrupt {x1} after {x2} waits");
                ok &= x1 == u64::from(moat_abi::vm::VTIMER_INTID);
            }
            Some(ExitReason::Hvc) if function == p::VGIC_SPINNING => spinning = true,
            Some(ExitReason::Hvc) if function == p::VGIC_SPUN => {
                spinning = false;
                println!(
                    "vgic probe: {spin_interrupts} Interrupt exits while the guest spun {} \
                     iterations with its timer fired; acknowledged after: {x1}",
                    p::PROBE_SPIN
                );
                let expected = if vgic { 27 } else { 0 };
                ok &= x1 == expected;
            }
            Some(ExitReason::Hvc) if function == p::VGIC_RAISE => {
                // Level-triggered: the core tells when the guest is done.
                inject[0] = Injection::level(x1 as u32, PRIORITY).0;
            }
            Some(ExitReason::Eoi) => {
                let listed = (exit[1] as usize).min(moat_abi::vm::EOIS_PER_EXIT);
                println!(
                    "vgic probe: the guest deactivated {:?}",
                    &exit[2..2 + listed]
                );
                eoi_reported |= exit[2..2 + listed].contains(&p::PROBE_SPI);
            }
            Some(ExitReason::Hvc) if function == p::VGIC_DONE => {
                println!("vgic probe: injected SPI acknowledged as {x1}, own SGI as {x2}");
                ok &= x1 == p::PROBE_SPI && x2 == p::PROBE_SGI;
                if vgic && !eoi_reported {
                    println!(
                        "vgic probe: FAILED: no Eoi exit for the level SPI {}",
                        p::PROBE_SPI
                    );
                    ok = false;
                }
                done = true;
            }
            Some(ExitReason::Hvc) => {
                answer[0] = moat_abi::Error::NotSupported.to_x0();
            }
            Some(ExitReason::Sgi) => {
                // ICC_SGI1R_EL1: INTID 27:24, target list 15:0, IRM 40.
                // One vCPU, Aff0 0: bit 0 of the list, or IRM.
                let value = exit[1];
                let intid = ((value >> 24) & 0xf) as u32;
                if value & (1 << 40) != 0 || value & 1 != 0 {
                    inject[0] = Injection::new(intid, PRIORITY).0;
                }
            }
            Some(ExitReason::Interrupt) => {
                if spinning {
                    spin_interrupts += 1;
                    if spin_interrupts > MOST_SPIN_INTERRUPTS {
                        println!(
                            "vgic probe: FAILED: more than {MOST_SPIN_INTERRUPTS} Interrupt \
                             exits during the spin: the guest's fired timer ends every run"
                        );
                        return Ok(false);
                    }
                }
            }
            Some(ExitReason::Wfi) => {
                if vgic {
                    std::thread::sleep(
                        device::until(exit[1]).min(std::time::Duration::from_millis(50)),
                    );
                }
            }
            Some(ExitReason::Shutdown) => break,
            _ => {
                return Err(io::Error::other(format!("unexpected exit {exit:x?}")));
            }
        }
    }
    ok &= !spinning && (done || !vgic);
    ok &= spin_interrupts <= MOST_SPIN_INTERRUPTS;
    Ok(ok)
}
