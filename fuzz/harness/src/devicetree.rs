//! The device tree the firmware hands the core: discovery and the rewrite
//! for the host. Whoever boots the core chooses the tree, so every byte of
//! it is hostile.

use arbitrary::Unstructured;
use moat_platform::dt::{self, Conduit, DtError, Platform, Range};
use moat_platform::hostdt::{self, HostDtEdits, RewriteError};

/// Bytes at the start of a `hostdt_rewrite` input that choose the edits;
/// the device tree follows them.
pub const EDIT_BYTES: usize = 32;

/// `dt_discover`: the input is a device tree blob.
pub fn discover(data: &[u8]) {
    if let Ok(platform) = dt::discover(data) {
        check_platform(&platform);
    }
}

/// What every description discovery accepts must satisfy.
fn check_platform(p: &Platform<'_>) {
    let valid = |r: &Range| r.size > 0 && r.base.checked_add(r.size).is_some();
    for r in p.memory.iter().chain(&p.reserved).chain(&p.devices) {
        assert!(valid(r), "an empty or wrapping range {r:?}");
    }
    // RAM banks and device windows are sorted, disjoint and not adjacent
    // (adjacent ones are merged).
    for list in [&p.memory[..], &p.devices[..]] {
        for pair in list.windows(2) {
            assert!(
                pair[0].end() < pair[1].base,
                "unsorted or unmerged {pair:?}"
            );
        }
    }
    // A device window is never wholly inside RAM: the host's stage-2 maps
    // windows as device memory, and RAM must not be mapped twice.
    for d in &p.devices {
        assert!(
            !p.memory.iter().any(|m| m.contains_range(d)),
            "device window {d:?} inside RAM"
        );
    }
    assert!(p.devices_top() >= p.devices.iter().map(Range::end).max().unwrap_or(0));
    assert!(!p.cpus.is_empty() && !p.memory.is_empty());
    if let Some(initrd) = p.chosen.initrd {
        assert!(valid(&initrd), "an empty or wrapping initrd {initrd:?}");
    }
}

/// `hostdt_rewrite`: [`EDIT_BYTES`] bytes choosing the edits, then a device
/// tree blob.
pub fn rewrite(data: &[u8]) {
    let (control, dtb) = data.split_at(data.len().min(EDIT_BYTES));
    let before = dt::discover(dtb);
    let mut u = Unstructured::new(control);
    let mut reserve = Vec::new();
    for _ in 0..u.int_in_range(0..=2u8).unwrap_or(0) {
        reserve.push(region(&mut u, before.as_ref().ok()));
    }
    let bootargs = match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => None,
        1 => Some(""),
        2 => Some("console=ttyAMA0 earlycon rdinit=/init"),
        _ => Some("mem=1G \u{e9}t\u{e9}"),
    };
    let initrd = match u.arbitrary::<bool>().unwrap_or(false) {
        true => Some(region(&mut u, before.as_ref().ok())),
        false => None,
    };
    let psci_conduit = match u.int_in_range(0..=2u8).unwrap_or(0) {
        0 => None,
        1 => Some(Conduit::Hvc),
        _ => Some(Conduit::Smc),
    };
    let edits = HostDtEdits {
        reserve_no_map: &reserve,
        bootargs,
        initrd,
        psci_conduit,
    };
    let out = match hostdt::rewrite_for_host(dtb, &edits) {
        Ok(out) => out,
        Err(RewriteError::BadRange(r)) => {
            assert!(
                reserve.contains(&r) || initrd == Some(r),
                "a refused range {r:?} that is not one of the edits"
            );
            return;
        }
        Err(_) => return,
    };
    let Ok(before) = before else {
        return;
    };
    let after = match dt::discover(&out) {
        Ok(after) => after,
        // The rewrite adds `/reserved-memory` children, which may take the
        // tree past what discovery records.
        Err(DtError::TooMany("reserved memory ranges")) => return,
        Err(e) => panic!("the rewritten tree no longer describes the machine: {e}"),
    };
    check_platform(&after);
    // The host sees the same machine, less what was reserved.
    assert_eq!(before.memory, after.memory);
    assert_eq!(before.cpus, after.cpus);
    assert_eq!(before.gic, after.gic);
    assert_eq!(before.uart, after.uart);
    assert_eq!(before.model, after.model);
    assert_eq!(after.chosen.bootargs, bootargs.or(before.chosen.bootargs));
    assert_eq!(after.chosen.initrd, initrd);
    match (before.psci, psci_conduit) {
        (Some(_), Some(conduit)) => assert_eq!(after.psci.map(|p| p.conduit), Some(conduit)),
        (psci, None) => assert_eq!(after.psci, psci),
        (None, Some(_)) => assert_eq!(after.psci, None),
    }
    for r in &reserve {
        assert!(
            covered(&after.reserved, r),
            "{r:?} is not reserved for the host"
        );
    }
}

/// A range for an edit: inside the first RAM bank when the tree has one
/// (where the core's carve-out and the initrd lie), or anywhere.
fn region(u: &mut Unstructured<'_>, platform: Option<&Platform<'_>>) -> Range {
    let bank = platform.and_then(|p| p.memory.first().copied());
    match (u.arbitrary::<bool>().unwrap_or(true), bank) {
        (true, Some(bank)) => {
            let pages = bank.size / 4096;
            let first = u64::from(u.arbitrary::<u16>().unwrap_or(0)) % pages.max(1);
            let count = u64::from(u.arbitrary::<u8>().unwrap_or(0)) + 1;
            Range {
                base: bank.base + first * 4096,
                size: (count * 4096).min(bank.size - first * 4096),
            }
        }
        // Anywhere, of any size up to 64 GiB: the core reserves its own
        // carve-out, never more than RAM (a region of 2^63 bytes would be
        // split into 2^31 `reg` entries for a tree with one size cell).
        _ => Range {
            base: u.arbitrary().unwrap_or(0),
            size: u.arbitrary::<u64>().unwrap_or(0) % (1 << 36),
        },
    }
}

/// Whether the union of `ranges` holds every byte of `r`.
fn covered(ranges: &[Range], r: &Range) -> bool {
    let mut at = r.base;
    let end = r.end();
    while at < end {
        match ranges.iter().find(|x| x.base <= at && at < x.end()) {
            Some(x) => at = x.end(),
            None => return false,
        }
    }
    true
}
