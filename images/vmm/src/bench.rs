//! `moat-vmm bench-exits` (hidden): the cost of an exit to this process and
//! back, measured with the guest's ping mode: each `PING` call is an `Hvc`
//! exit the VMM answers at once. Under QEMU's `-icount shift=0` one
//! nanosecond of virtual time is one instruction, so the figure is an
//! instruction count.

use crate::device::Device;
use crate::protocol as p;
use moat_abi::vm::ExitReason;
use std::io;
use std::time::{Duration, Instant};

/// What a run of `count` round trips took.
pub struct Measured {
    pub elapsed: Duration,
    /// `Interrupt` exits during the measured round trips.
    pub interrupts: u64,
}

/// Runs `guest` in ping mode and times `count` round trips after the first.
pub fn run(guest: &[u8], count: u64) -> io::Result<Measured> {
    let dev = Device::open()?;
    dev.create(p::BASE_IPA, 0)?;
    dev.donate(p::BASE_IPA, 1 << 20)?;
    dev.load(p::BASE_IPA, guest)?;
    let mut answer = [0u64; 4];
    let mut pings = 0u64;
    let mut interrupts = 0u64;
    let mut start = None;
    let mut elapsed = None;
    loop {
        let exit = dev.run(answer)?;
        answer = [0; 4];
        match ExitReason::from_u64(exit[0]) {
            Some(ExitReason::Hvc) if exit[1] == u64::from(p::CONFIG) => {
                answer[0] = p::MODE_PING;
            }
            Some(ExitReason::Hvc) if exit[1] == u64::from(p::PING) => {
                if pings == 0 {
                    start = Some(Instant::now());
                } else if pings == count {
                    elapsed = start.map(|s| s.elapsed());
                    answer[0] = p::STOP;
                }
                pings += 1;
            }
            Some(ExitReason::Interrupt) => {
                if start.is_some() && elapsed.is_none() {
                    interrupts += 1;
                }
            }
            Some(ExitReason::Shutdown) => break,
            _ => {
                return Err(io::Error::other(format!("unexpected exit {exit:x?}")));
            }
        }
    }
    let elapsed = elapsed.ok_or_else(|| io::Error::other("the guest stopped early"))?;
    Ok(Measured {
        elapsed,
        interrupts,
    })
}

/// Where `bench-kvm` puts its guest's memory, as the Moat guest's.
const KVM_GUEST_IPA: u64 = p::BASE_IPA;
/// An address with nothing behind it in the KVM guest: a store there is an
/// MMIO exit to this process.
const KVM_MMIO_IPA: u64 = 0x1000_0000;

/// The KVM guest: `movz x2, #0x1000, lsl #16` (x2 = [`KVM_MMIO_IPA`]), then
/// `str x1, [x2]` and `b` back to it for ever: one MMIO exit per loop.
const KVM_GUEST: [u32; 3] = [0xd2a2_0002, 0xf900_0041, 0x17ff_ffff];

/// `bench-kvm`: `count` round trips after the first through Linux KVM, each
/// a `KVM_RUN` ending in an MMIO exit (the store) and the next `KVM_RUN`
/// completing it.
pub fn run_kvm(count: u64) -> io::Result<Duration> {
    const _: () = assert!(KVM_MMIO_IPA == (0x1000 << 16));
    let mut vm = crate::device::kvm::Vm::new(KVM_GUEST_IPA, 16 << 10, &KVM_GUEST)?;
    let mut start = None;
    for exits in 0..=count {
        if exits == 1 {
            start = Some(Instant::now());
        }
        let reason = vm.run()?;
        if reason != crate::device::kvm::EXIT_MMIO {
            return Err(io::Error::other(format!(
                "KVM_RUN exit {reason} after {exits} MMIO exits"
            )));
        }
    }
    start
        .map(|s| s.elapsed())
        .ok_or_else(|| io::Error::other("no round trip timed"))
}
