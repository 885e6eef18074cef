//! `moat-vmm probe-parallel` (hidden, for the integration tests): runs the
//! Moat guest's parallel probe in a VM with two vCPUs, one thread each,
//! and checks that the two vCPUs ran at the same time.
//!
//! In each attempt each vCPU sets its flag in its memory to the attempt's
//! number, reads the other vCPU's flag, and spins (making no exit) until
//! that reaches the attempt's number. This process watches each vCPU's
//! runs: an attempt is clean for a vCPU if no exit came between its
//! `PARALLEL_READY` and its `PARALLEL_DONE` (one run). If the vCPUs took
//! turns (one running at a time), the other vCPU's flag could never change
//! during one run of this one. The probe passes when a vCPU reports a clean
//! attempt in which the other's flag read below the attempt's number just
//! after it set its own, and reached it before it stopped spinning.

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
    /// Attempts ended, per vCPU.
    ended: [u64; 2],
    /// Clean attempts in which the other's flag was already there.
    clean_unchanged: [u64; 2],
    /// Interrupt exits during windows, per vCPU.
    interrupted: [u64; 2],
    /// The evidence, once there is some: the vCPU, the attempt, and the
    /// other's flag when it started and when it stopped spinning.
    changed: Option<(usize, u64, u64, u64)>,
    /// vCPU 0 reported the end: CPU_ON's answer, and whether vCPU 1 was off.
    end: Option<(u64, u64)>,
}

impl Watch {
    fn stop(&self, attempt: u64) -> bool {
        self.changed.is_some() || attempt > p::PARALLEL_ATTEMPTS
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
        "parallel probe: attempts ended {:?}, clean with the other's flag already there {:?}, \
         Interrupt exits in windows {:?}",
        w.ended, w.clean_unchanged, w.interrupted
    );
    match (w.end, w.changed) {
        (Some((0, 1)), Some((v, attempt, initial, seen))) => {
            println!(
                "parallel probe: attempt {attempt}: vCPU {v} saw vCPU {}'s flag go from {initial} \
                 to {seen} within one uninterrupted run: the two ran at the same time",
                1 - v
            );
            Ok(true)
        }
        (Some((on, off)), None) => {
            println!(
                "parallel probe: FAILED: in no attempt of {} did a vCPU see the other's flag \
                 change within one uninterrupted run: the vCPUs took turns (CPU_ON {on:#x}, \
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
                let (attempt, seen, initial) = (x[1], x[2], exit[6]);
                w.ended[index] += 1;
                if w.window[index] == Some(attempt) && seen >= attempt {
                    if initial < attempt {
                        w.changed.get_or_insert((index, attempt, initial, seen));
                    } else {
                        w.clean_unchanged[index] += 1;
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
