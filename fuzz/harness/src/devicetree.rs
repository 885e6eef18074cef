//! The device tree the firmware hands the core: discovery and the rewrite
//! for the host. Whoever boots the core chooses the tree, so every byte of
//! it is hostile.

use arbitrary::Unstructured;
use moat_platform::dt::{self, Conduit, DtError, EnableMethod, Platform, Range};
use moat_platform::hostdt::{self, HostDtEdits, RewriteError};
use moat_platform::{devices, iommu};

/// Bytes at the start of a `hostdt_rewrite` input that choose the edits;
/// the device tree follows them.
pub const EDIT_BYTES: usize = 32;

/// `dt_discover`: the input is a device tree blob.
pub fn discover(data: &[u8]) {
    if let Ok(platform) = dt::discover(data) {
        check_platform(&platform);
    }
    let smmu = iommu::find_smmu_v3(data).ok().flatten();
    if let Some(s) = &smmu {
        assert!(s.regs.size > 0 && s.regs.base.checked_add(s.regs.size).is_some());
        for stream in &s.streams {
            assert!(stream.count > 0 && stream.end() <= 1 << 32, "{stream:?}");
        }
    }
    let _ = devices::classify(data, smmu.as_ref(), |d| {
        for w in &d.windows {
            assert!(w.size > 0 && w.base.checked_add(w.size).is_some(), "{d:?}");
        }
        // The image's `unprotected-dma` list can name any device whose
        // name has no blanks in it.
        assert!(
            d.name.is_empty() || d.name.contains(char::is_whitespace) || d.named_in(d.name),
            "{d:?} cannot be named"
        );
    });
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
    assert!(
        !p.memory.iter().any(|bank| bank.overlaps(&p.uart.regs)),
        "the console's window {:?} overlaps RAM",
        p.uart.regs
    );
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
    // Nodes the core withholds from the host: none of them the console,
    // the GIC or a CPU, which the host keeps.
    let disable_nodes: &[&str] = match u.int_in_range(0..=2u8).unwrap_or(0) {
        0 => &[],
        1 => &["pcie@10000000"],
        _ => &["virtio_mmio@a000000", "fw-cfg@9020000", "smmuv3@9050000"],
    };
    let edits = HostDtEdits {
        reserve_no_map: &reserve,
        bootargs,
        initrd,
        psci_conduit,
        hide_smmu_v3: u.arbitrary().unwrap_or(false),
        disable_nodes,
        cpus_via_psci: u.arbitrary().unwrap_or(false),
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
        // A fuzzed tree may give its console the name of a node the core
        // withholds: disabling that node hides the console, as the edit
        // asks. Without that edit the console must survive.
        Err(DtError::NoUart) if !edits.disable_nodes.is_empty() => {
            let keep = HostDtEdits {
                disable_nodes: &[],
                ..edits
            };
            if let Ok(out) = hostdt::rewrite_for_host(dtb, &keep) {
                assert!(
                    !matches!(dt::discover(&out), Err(DtError::NoUart)),
                    "the rewrite lost the console without disabling a node"
                );
            }
            return;
        }
        Err(e) => panic!("the rewritten tree no longer describes the machine: {e}"),
    };
    check_platform(&after);
    // The host sees the same machine, less what was reserved.
    assert_eq!(before.memory, after.memory);
    // The same CPUs; started through PSCI if the edit says so.
    let mpidrs = |p: &Platform<'_>| p.cpus.iter().map(|c| c.mpidr).collect::<Vec<_>>();
    assert_eq!(mpidrs(&before), mpidrs(&after));
    if edits.cpus_via_psci {
        assert!(
            after
                .cpus
                .iter()
                .all(|c| c.enable_method == EnableMethod::Psci)
        );
    } else {
        assert_eq!(before.cpus, after.cpus);
    }
    assert_eq!(before.gic, after.gic);
    assert_eq!(before.uart, after.uart);
    if edits.hide_smmu_v3 {
        assert_eq!(
            iommu::find_smmu_v3(&out).ok().flatten(),
            None,
            "the SMMU is still the host's"
        );
    }
    assert_eq!(before.model, after.model);
    assert_eq!(after.chosen.bootargs, bootargs.or(before.chosen.bootargs));
    assert_eq!(after.chosen.initrd, initrd);
    match (before.psci, psci_conduit) {
        (Some(_), Some(conduit)) => assert_eq!(after.psci.map(|p| p.conduit), Some(conduit)),
        (psci, None) => assert_eq!(after.psci, psci),
        // A PSCI node is added only for CPUs moved to PSCI.
        (None, Some(conduit)) if edits.cpus_via_psci => {
            assert_eq!(after.psci.map(|p| p.conduit), Some(conduit))
        }
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
