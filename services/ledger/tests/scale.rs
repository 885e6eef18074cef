//! Size and speed: the ledger's state for a 4 GiB host after boot and after
//! 10,000 scattered single-page donations, and a 1 GiB (262,144-page) range
//! donated and reclaimed in one call each.
//!
//! The figures are printed (run with `--nocapture`) and pinned: they are
//! exact and deterministic.

use std::mem::size_of;
use std::time::{Duration, Instant};

use moat_ledger::{Extent, Ledger, Op, Owner, PfnRange, VmRecord};

/// QEMU virt: RAM from 0x4000_0000; the core's 32 MiB carve-out at
/// 0x4020_0000.
fn host(ram_bytes: u64) -> Ledger<Vec<Extent>> {
    let ram = PfnRange::from_bytes(0x4000_0000, ram_bytes).unwrap();
    let hyp = PfnRange::from_bytes(0x4020_0000, 32 << 20).unwrap();
    Ledger::new(vec![Extent::EMPTY; 32768], &[ram], &[hyp]).unwrap()
}

/// A deterministic xorshift64 sequence.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[test]
fn record_sizes() {
    assert_eq!(size_of::<Extent>(), 24);
    assert_eq!(size_of::<VmRecord>(), 16);
    assert_eq!(size_of::<PfnRange>(), 16);
}

#[test]
fn state_of_a_4_gib_host() {
    let mut l = host(4 << 30);
    let ram = l.ram()[0];
    assert_eq!(ram.count, 1 << 20);

    // After boot: host | hypervisor | host, one RAM and one hypervisor range.
    let boot = l.state_bytes();
    eprintln!(
        "4 GiB host after boot: {} extents, {boot} bytes of ledger state",
        l.extents().len()
    );
    assert_eq!(l.extents().len(), 3);
    assert_eq!(boot, 3 * 24 + 2 * 16);
    assert_eq!(boot, 104);

    // 10,000 single pages at xorshift addresses, to VMs 1..=4 in turn;
    // an address that is not the host's (the carve-out, or a page already
    // donated) is skipped.
    for vm in 1..=4 {
        l.execute(Op::CreateVm { vm }).unwrap();
    }
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let mut donated = Vec::new();
    let mut skipped = 0;
    while donated.len() < 10_000 {
        let pfn = ram.start + rng.next() % ram.count;
        let vm = (donated.len() % 4) as u16 + 1;
        match l.host_donate_vm(pfn, 1, vm) {
            Ok(tx) => {
                l.commit(&tx).unwrap();
                donated.push((pfn, vm));
            }
            Err(_) => skipped += 1,
        }
    }
    l.check_invariants().unwrap();
    let scattered = l.state_bytes();
    let extents = l.extents().len();
    eprintln!(
        "4 GiB host after 10,000 scattered single-page donations to 4 VMs: \
         {extents} extents, {scattered} bytes of ledger state \
         ({skipped} addresses skipped; buffer reserved: {} bytes)",
        l.footprint_bytes()
    );
    // Each isolated page costs two extents (itself and the host run it
    // splits); neighbours given to the same VM merge.
    assert!(extents <= 3 + 2 * 10_000);
    assert_eq!(scattered, extents * 24 + 4 * 16 + 2 * 16);
    assert_eq!(extents, 19_872);
    assert_eq!(scattered, 477_024);

    // Reclaiming everything merges back to the boot state.
    for vm in 1..=4 {
        l.execute(Op::DestroyVm { vm }).unwrap();
    }
    for &(pfn, vm) in &donated {
        l.execute(Op::Reclaim {
            vm,
            range: PfnRange::new(pfn, 1),
        })
        .unwrap();
    }
    l.check_invariants().unwrap();
    assert_eq!(l.vms().count(), 0);
    assert_eq!(l.state_bytes(), boot);
}

#[test]
fn state_does_not_grow_with_ram() {
    for gib in [1u64, 4, 16, 256, 4096] {
        let l = host(gib << 30);
        eprintln!("{gib} GiB host after boot: {} bytes", l.state_bytes());
        assert_eq!(l.state_bytes(), 104, "{gib} GiB");
    }
}

#[test]
fn a_gib_in_one_call() {
    let mut l = host(16 << 30);
    let boot = l.state_bytes();
    l.execute(Op::CreateVm { vm: 1 }).unwrap();
    let start = 0x4000_0000 / 4096 + (1 << 20);
    let count = 262_144;

    let t = Instant::now();
    let tx = l.host_donate_vm(start, count, 1).unwrap();
    l.commit(&tx).unwrap();
    let donate = t.elapsed();
    assert_eq!(tx.scrub(), Some(PfnRange::new(start, count)));
    assert_eq!(
        l.state(Owner::Vm(1), start + count - 1),
        moat_ledger::PageState::Owned
    );
    assert_eq!(l.vm(1).unwrap().pages, count);
    assert!(l.extents().len() <= 5);

    l.execute(Op::VmShareHost {
        vm: 1,
        range: PfnRange::new(start + 1000, 100_000),
    })
    .unwrap();
    l.execute(Op::DestroyVm { vm: 1 }).unwrap();
    let t = Instant::now();
    let tx = l.reclaim(1, start, count).unwrap();
    l.commit(&tx).unwrap();
    let reclaim = t.elapsed();
    l.check_invariants().unwrap();
    assert_eq!(l.state_bytes(), boot);
    assert_eq!(l.vm(1), None);

    eprintln!("262,144 pages: donate {donate:?}, reclaim {reclaim:?}");
    assert!(donate < Duration::from_millis(100));
    assert!(reclaim < Duration::from_millis(100));
}
