//! `moat-vmm probe-errors` (hidden; for the tests): hostile arguments to
//! every ioctl of `/dev/moat`, each of which must be refused with the errno
//! the module or the core's typed error maps to, and the VM's life calls
//! that must be refused once it is off.

use crate::device::Device;
use crate::protocol as p;
use moat_abi::vm::{ExitReason, Injection};
use std::io;

const PAGE: u64 = p::PAGE_SIZE;

/// One expectation: what the call returned against what it must.
struct Probes {
    good: u32,
    bad: u32,
}

impl Probes {
    fn expect(&mut self, what: &str, got: io::Result<()>, want: Option<i32>) {
        let got = got.err().map(|e| e.raw_os_error().unwrap_or(-1));
        let ok = got == want;
        if ok {
            self.good += 1;
        } else {
            self.bad += 1;
        }
        println!(
            "moat-vmm: probe {what}: {} ({})",
            errno_name(got),
            if ok { "as expected" } else { "NOT AS EXPECTED" }
        );
    }
}

fn errno_name(e: Option<i32>) -> String {
    let names = [
        (libc::EINVAL, "EINVAL"),
        (libc::EPERM, "EPERM"),
        (libc::ENOMEM, "ENOMEM"),
        (libc::ENOENT, "ENOENT"),
        (libc::EEXIST, "EEXIST"),
        (libc::EFAULT, "EFAULT"),
        (libc::EBUSY, "EBUSY"),
        (libc::EIO, "EIO"),
    ];
    match e {
        None => "ok".into(),
        Some(n) => names
            .iter()
            .find(|(c, _)| *c == n)
            .map_or_else(|| format!("errno {n}"), |(_, s)| s.to_string()),
    }
}

/// `VCPU_RUN` until an exit other than `Interrupt`.
fn run_past_interrupts(dev: &Device, answer: [u64; 4]) -> io::Result<[u64; 7]> {
    let mut exit = dev.run(answer)?;
    while exit[0] == ExitReason::Interrupt as u64 {
        exit = dev.run([0; 4])?;
    }
    Ok(exit)
}

/// Runs the probes; `Ok(true)` if every one came out as expected.
pub fn run(guest: &[u8]) -> io::Result<bool> {
    let mut t = Probes { good: 0, bad: 0 };
    let dev = Device::open()?;
    let base = p::BASE_IPA;
    t.expect(
        "run without a VM",
        dev.run([0; 4]).map(drop),
        Some(libc::ENOENT),
    );
    t.expect(
        "donate without a VM",
        dev.donate(base, PAGE),
        Some(libc::ENOENT),
    );
    t.expect(
        "create with an unknown flag",
        dev.create(base, 1 << 7),
        Some(libc::EINVAL),
    );
    t.expect(
        "create at an unaligned entry",
        dev.create(base + 2, 0),
        Some(libc::EINVAL),
    );
    t.expect(
        "create with two vCPUs but no virtual GIC",
        dev.create_with_vcpus(base, 0, 2),
        Some(libc::EINVAL),
    );
    t.expect(
        "create with nine vCPUs",
        dev.create_with_vcpus(base, moat_abi::vm::VmFlags::VGIC, 9),
        Some(libc::EINVAL),
    );
    t.expect("create", dev.create(base, 0), None);
    t.expect(
        "create a second VM on one file",
        dev.create(base, 0),
        Some(libc::EEXIST),
    );
    t.expect("donate 0 bytes", dev.donate(base, 0), Some(libc::EINVAL));
    t.expect(
        "donate at an unaligned IPA",
        dev.donate(base + 8, PAGE),
        Some(libc::EINVAL),
    );
    t.expect(
        "donate a partial page",
        dev.donate(base, PAGE + 1),
        Some(libc::EINVAL),
    );
    t.expect(
        "donate past the end of the address space",
        dev.donate(!(PAGE - 1), 2 * PAGE),
        Some(libc::EINVAL),
    );
    t.expect(
        "donate past the VM's IPA space",
        dev.donate(1 << 60, PAGE),
        Some(libc::EINVAL),
    );
    t.expect(
        "donate more than the host has",
        dev.donate(base, 1 << 40),
        Some(libc::ENOMEM),
    );
    t.expect("donate 64 KiB", dev.donate(base, 16 * PAGE), None);
    t.expect(
        "donate the same IPAs again",
        dev.donate(base, PAGE),
        Some(libc::EINVAL),
    );
    t.expect("load 0 bytes", dev.load(base, &[]), Some(libc::EINVAL));
    t.expect(
        "load outside the VM's memory",
        dev.load(base + 16 * PAGE, guest),
        Some(libc::EINVAL),
    );
    t.expect(
        "load from an unmapped address",
        dev.load_from(base, 0x10, 64),
        Some(libc::EFAULT),
    );
    t.expect(
        "run vCPU 1 of a VM with one",
        dev.run_vcpu(1, [0; 4], [0; 2]).map(drop),
        Some(libc::EINVAL),
    );
    t.expect(
        "inject into a VM without a virtual GIC",
        dev.run_injecting([0; 4], [Injection::new(40, 0xa0).0, 0])
            .map(drop),
        Some(libc::EINVAL),
    );
    t.expect(
        "inject INTID 1020",
        dev.run_injecting([0; 4], [0, Injection::VALID | 1020])
            .map(drop),
        Some(libc::EINVAL),
    );
    t.expect("load the guest", dev.load(base, guest), None);
    // The guest asks for its mode first; MODE_OFF powers it off at once.
    let config = run_past_interrupts(&dev, [0; 4]);
    let asked = matches!(config, Ok(exit) if exit[0] == ExitReason::Hvc as u64 && exit[1] == u64::from(p::CONFIG));
    t.expect("run to the guest's first call", config.map(drop), None);
    let off = run_past_interrupts(&dev, [p::MODE_OFF, 0, 0, 0]);
    let shutdown = matches!(off, Ok(exit) if exit[0] == ExitReason::Shutdown as u64);
    t.expect("run to its SYSTEM_OFF", off.map(drop), None);
    t.expect(
        "run a VM that is off",
        dev.run([0; 4]).map(drop),
        Some(libc::EPERM),
    );
    t.expect(
        "load a VM that has run",
        dev.load(base, guest),
        Some(libc::EPERM),
    );
    t.expect(
        "donate to a VM that is off",
        dev.donate(base + 32 * PAGE, PAGE),
        Some(libc::EPERM),
    );
    if !asked {
        println!(
            "moat-vmm: probe: the guest's first exit was not its CONFIG call (NOT AS EXPECTED)"
        );
        t.bad += 1;
    }
    if !shutdown {
        println!("moat-vmm: probe: the guest did not power off (NOT AS EXPECTED)");
        t.bad += 1;
    }
    println!("moat-vmm: probes: {} as expected, {} not", t.good, t.bad);
    Ok(t.bad == 0)
}
