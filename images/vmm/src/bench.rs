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
