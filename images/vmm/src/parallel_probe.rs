//! `moat-vmm probe-parallel` (hidden, for the integration tests): runs the
//! Moat guest's parallel probe in a VM with two vCPUs, one thread each,
//! and checks that the two vCPUs ran at the same time.
//!
//! In each attempt each vCPU sets its flag in its own memory to the
//! attempt's number and spins (making no exit) until the other vCPU's flag
//! reaches it. This process watches each vCPU's runs: an attempt is clean
//! for a vCPU if the run in which it set its flag is the run in which it
//! saw the other's (no exit in between: no `Interrupt`, no other exit). If
//! the vCPUs took turns (one running at a time), no attempt could be clean
//! for both: vCPU A's clean run would have had to include vCPU B setting
//! its flag, and B's clean run A setting its own, so the two runs would
//! overlap. The probe passes when one attempt is clean for both.

use crate::device::Device;
use crate::protocol as p;
use moat_abi::vm::{ExitReason, VmFlags};
use std::io;
use std::sync::Mutex;

/// What each vCPU's thread reports.
#[derive(Default)]
struct Watch {
    /// Each vCPU's current attempt, while its window is clean.
    window: [Option<u64>; 2],
    /// Attempts each vCPU ended cleanly, having seen the other's flag.
    clean: [Vec<u64>; 2],
    /// Interrupt exits during windows, per vCPU.
    interrupted: [u64; 2],
    /// Attempts ended, per vCPU.
    ended: [u64; 2],
    /// The attempt clean for both vCPUs, once there is one.
    both: Option<u64>,
    /// vCPU 0 reported the end: CPU_ON's answer, and whether vCPU 1 was off.
    end: Option<(u64, u64)>,
}

impl Watch {
    fn stop(&self, attempt: u64) -> bool {
        self.both.is_some() || attempt > p::PARALLEL_ATTEMPTS
    }
}

/// Runs the probe; `Ok(true)` if the two vCPUs ran at the same time.
pub fn run(guest: &[u8]) -> io::Result<bool> {
    let dev = Device::open()?;
    dev.create_with_vcpus(p::BASE_IPA, VmFlags::VGIC, 2)?;
    dev.donate(p::BASE_IPA, 1 << 20)?;
    dev.load(p::BASE_IPA, guest)?;
    let watch = Mutex::new(Watch::default());
    let started = std::thread::scope(|scope| -> io::Result<()> {
        let (dev, watch) = (&dev, &watch);
        let mut second = None;
        let result = vcpu(dev, watch, 0, &mut || {
            if second.is_none() {
                second = Some(scope.spawn(move || vcpu(dev, watch, 1, &mut || {})));
            }
        });
        if let Some(t) = second {
            match t.join() {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::other("vCPU 1's thread panicked")),
            }
        }
        result
    });
    started?;
    let w = watch.lock().unwrap_or_else(|e| e.into_inner());
    println!(
        "parallel probe: attempts ended {:?}, clean with the other's flag seen {:?}, \
         Interrupt exits in windows {:?}",
        w.ended,
        [w.clean[0].len(), w.clean[1].len()],
        w.interrupted
    );
    match (w.end, w.both) {
        (Some((0, 1)), Some(attempt)) => {
            println!(
                "parallel probe: attempt {attempt}: both vCPUs saw the other's flag within one \
                 uninterrupted run each: they ran at the same time"
            );
            Ok(true)
        }
        (Some((on, off)), None) => {
            println!(
                "parallel probe: FAILED: no attempt of {} had both vCPUs see the other's flag \
                 within one uninterrupted run each: the vCPUs took turns (CPU_ON {on:#x}, \
                 vCPU 1 off {off})",
                p::PARALLEL_ATTEMPTS
            );
            Ok(false)
        }
        (end, _) => {
            println!("parallel probe: FAILED: the guest ended with {end:?}");
            Ok(false)
        }
    }
}

/// One vCPU's thread: runs it until it is off (vCPU 1) or the VM is
/// (vCPU 0); `started` is called when vCPU 0 starts vCPU 1.
fn vcpu(
    dev: &Device,
    watch: &Mutex<Watch>,
    index: usize,
    started: &mut dyn FnMut(),
) -> io::Result<()> {
    let mut answer = [0u64; 4];
    loop {
        let exit = dev.run_vcpu(index as u64, answer, [0; 2])?;
        answer = [0; 4];
        let (function, x) = (exit[1] as u32, [exit[2], exit[3], exit[4], exit[5]]);
        let mut w = watch.lock().unwrap_or_else(|e| e.into_inner());
        match ExitReason::from_u64(exit[0]) {
            Some(ExitReason::Hvc) if function == p::CONFIG => answer[0] = p::MODE_PARALLEL,
            Some(ExitReason::Hvc) if function == p::PARALLEL_READY => {
                let attempt = x[1];
                if w.stop(attempt) {
                    answer[0] = p::STOP;
                } else {
                    // The window opens when this answer is taken: the
                    // flag is set in the run that starts now.
                    w.window[index] = Some(attempt);
                }
            }
            Some(ExitReason::Hvc) if function == p::PARALLEL_DONE => {
                let (attempt, saw) = (x[1], x[2] == 1);
                w.ended[index] += 1;
                if saw && w.window[index] == Some(attempt) {
                    w.clean[index].push(attempt);
                    if w.clean[1 - index].contains(&attempt) {
                        w.both.get_or_insert(attempt);
                    }
                }
                w.window[index] = None;
                if w.stop(attempt + 1) {
                    answer[0] = p::STOP;
                }
            }
            Some(ExitReason::Hvc) if function == p::PARALLEL_END => {
                w.end = Some((x[0], x[1]));
            }
            Some(ExitReason::Hvc) => {
                w.window[index] = None;
                answer[0] = moat_abi::Error::NotSupported.to_x0();
            }
            Some(ExitReason::VcpuPower) if exit[1] == moat_abi::vm::POWER_STARTED => {
                drop(w);
                started();
            }
            // vCPU 1 powered itself off.
            Some(ExitReason::VcpuPower) => return Ok(()),
            Some(ExitReason::Shutdown) => return Ok(()),
            Some(ExitReason::Interrupt) => {
                if w.window[index].take().is_some() {
                    w.interrupted[index] += 1;
                }
            }
            // The guest's timer is off; anything else ends a window too.
            Some(ExitReason::Wfi | ExitReason::Eoi | ExitReason::Sgi | ExitReason::Mmio) => {
                w.window[index] = None;
            }
            _ => return Err(io::Error::other(format!("unexpected exit {exit:x?}"))),
        }
    }
}
