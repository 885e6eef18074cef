//! Rewriting the host's device tree: every real tree in `testdata/` must come
//! back whole with only the requested edits, readable by discovery and dtc.
#![cfg(feature = "alloc")]

mod common;

use common::*;
use moat_platform::dt::{Conduit, DtError, Platform, Range, discover};
use moat_platform::hostdt::{HostDtEdits, RewriteError, rewrite_for_host};
use vm_fdt::FdtWriter;

const MOAT: Range = Range {
    base: 0x4100_0000,
    size: 0x20_0000,
};
const INITRD: Range = Range {
    base: 0x4800_0000,
    size: 0x10_0000,
};
const BOOTARGS: &str = "console=ttyAMA0 earlycon root=/dev/vda rw";

fn full_edits(regions: &[Range]) -> HostDtEdits<'_> {
    HostDtEdits {
        reserve_no_map: regions,
        bootargs: Some(BOOTARGS),
        initrd: Some(INITRD),
        psci_conduit: Some(Conduit::Hvc),
        cpus_via_psci: false,
        hide_smmu_v3: false,
        disable_nodes: &[],
    }
}

fn node_at<'n>(nodes: &'n [FlatNode], path: &str) -> &'n FlatNode {
    nodes
        .iter()
        .find(|node| node.path == path)
        .unwrap_or_else(|| panic!("no node {path}"))
}

fn is_psci(node: &FlatNode) -> bool {
    node.property("compatible").is_some_and(|value| {
        value
            .split(|&b| b == 0)
            .any(|c| c == b"arm,psci" || c == b"arm,psci-0.2" || c == b"arm,psci-1.0")
    })
}

/// Checks that `output` holds every node of `input` in the same order (with
/// the nodes in `added` inserted), the same `/memreserve/` entries and boot
/// CPU, and the same properties in the same order except the `edited` ones.
fn assert_preserved(input: &[u8], output: &[u8], added: &[&str], edited: &[(&str, &str)]) {
    assert_eq!(memreserve(output), memreserve(input));
    assert_eq!(header(output, 7), header(input, 7), "boot_cpuid_phys");
    let before = flatten(input);
    let after = flatten(output);
    for path in added {
        assert!(
            after.iter().any(|node| node.path == *path),
            "{path} was not added"
        );
    }
    let kept: Vec<&FlatNode> = after
        .iter()
        .filter(|node| !added.contains(&node.path.as_str()))
        .collect();
    assert_eq!(
        kept.iter()
            .map(|node| node.path.as_str())
            .collect::<Vec<_>>(),
        before
            .iter()
            .map(|node| node.path.as_str())
            .collect::<Vec<_>>()
    );
    for (old, new) in before.iter().zip(kept) {
        let unedited = |node: &FlatNode| -> Vec<(String, Vec<u8>)> {
            node.properties
                .iter()
                .filter(|(name, _)| !edited.contains(&(node.path.as_str(), name.as_str())))
                .cloned()
                .collect()
        };
        assert_eq!(unedited(new), unedited(old), "properties of {}", old.path);
    }
}

/// Whether dtc reads `dtb` back; `None` when dtc is not installed.
fn dtc_accepts(dtb: &[u8]) -> Option<bool> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("dtc")
        .args(["-I", "dtb", "-O", "dts", "-o", "/dev/null", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take().unwrap().write_all(dtb).unwrap();
    let output = child.wait_with_output().unwrap();
    if !output.status.success() {
        eprintln!("dtc: {}", String::from_utf8_lossy(&output.stderr));
    }
    Some(output.status.success())
}

fn assert_dtc_accepts(dtb: &[u8], what: &str) {
    match dtc_accepts(dtb) {
        Some(accepted) => assert!(accepted, "dtc refused the rewritten {what}"),
        None => eprintln!("dtc is not installed; not checking {what} with it"),
    }
}

#[test]
fn every_real_tree_survives_a_rewrite() {
    for name in REAL_TREES {
        let input = load(name);
        let output = rewrite_for_host(&input, &full_edits(&[MOAT])).unwrap();

        let before = flatten(&input);
        let mut added = vec!["/reserved-memory/moat@41000000"];
        if !before.iter().any(|node| node.path == "/reserved-memory") {
            added.push("/reserved-memory");
        }
        if !before.iter().any(|node| node.path == "/chosen") {
            added.push("/chosen");
        }
        let mut edited = vec![
            ("/chosen", "bootargs"),
            ("/chosen", "linux,initrd-start"),
            ("/chosen", "linux,initrd-end"),
        ];
        let psci_paths: Vec<String> = before
            .iter()
            .filter(|node| is_psci(node))
            .map(|node| node.path.clone())
            .collect();
        edited.extend(psci_paths.iter().map(|path| (path.as_str(), "method")));
        assert_preserved(&input, &output, &added, &edited);
        assert_dtc_accepts(&output, name);

        let after = flatten(&output);
        let chosen = node_at(&after, "/chosen");
        assert_eq!(
            chosen.property("bootargs"),
            Some(format!("{BOOTARGS}\0").as_bytes())
        );
        assert_eq!(
            chosen.property("linux,initrd-start"),
            Some(&0x4800_0000u64.to_be_bytes()[..])
        );
        assert_eq!(
            chosen.property("linux,initrd-end"),
            Some(&0x4810_0000u64.to_be_bytes()[..])
        );
        for path in &psci_paths {
            assert_eq!(
                node_at(&after, path).property("method"),
                Some(&b"hvc\0"[..])
            );
        }
        let moat = node_at(&after, "/reserved-memory/moat@41000000");
        assert_eq!(moat.property("no-map"), Some(&[][..]));

        match discover(&input) {
            Ok(original) => {
                let rewritten = discover(&output).unwrap();
                let mut reserved = original.reserved.clone();
                reserved.push(MOAT).unwrap();
                let expected = Platform {
                    reserved,
                    psci: original.psci.map(|mut psci| {
                        psci.conduit = Conduit::Hvc;
                        psci
                    }),
                    chosen: moat_platform::dt::Chosen {
                        bootargs: Some(BOOTARGS),
                        initrd: Some(INITRD),
                        ..original.chosen
                    },
                    ..original.clone()
                };
                assert_eq!(rewritten, expected, "{name}");
            }
            Err(error) => {
                assert_eq!(name, "bcm2711-rpi-4-b.dtb");
                assert_eq!(discover(&output).err(), Some(error));
            }
        }
    }
}

#[test]
fn default_edits_leave_a_tree_without_initrd_as_it_was() {
    for name in REAL_TREES {
        let input = load(name);
        let output = rewrite_for_host(&input, &HostDtEdits::default()).unwrap();
        assert_preserved(&input, &output, &[], &[]);
        assert_eq!(flatten(&output), flatten(&input), "{name}");
        // The writer's output is canonical: rewriting it again changes nothing.
        assert_eq!(
            rewrite_for_host(&output, &HostDtEdits::default()).unwrap(),
            output,
            "{name}"
        );
    }
}

#[test]
fn reserved_memory_is_created_with_the_roots_cells() {
    // QEMU virt has no /reserved-memory and a 2/2 root.
    let output = rewrite_for_host(&load("qemu-virt-gicv3.dtb"), &full_edits(&[MOAT])).unwrap();
    let after = flatten(&output);
    let reserved = node_at(&after, "/reserved-memory");
    assert_eq!(
        reserved.property("#address-cells"),
        Some(&2u32.to_be_bytes()[..])
    );
    assert_eq!(
        reserved.property("#size-cells"),
        Some(&2u32.to_be_bytes()[..])
    );
    assert_eq!(reserved.property("ranges"), Some(&[][..]));
    let moat = node_at(&after, "/reserved-memory/moat@41000000");
    let reg: Vec<u8> = [0u32, 0x4100_0000, 0, 0x20_0000]
        .iter()
        .flat_map(|c| c.to_be_bytes())
        .collect();
    assert_eq!(moat.property("reg"), Some(reg.as_slice()));

    // A 2/1 root gets a 2/1 /reserved-memory.
    let dtb = tree_with_root_cells(2, 1, |w| {
        node(w, "memory@40000000", |w| {
            w.property_string("device_type", "memory").unwrap();
            w.property_array_u32("reg", &[0, 0x4000_0000, 0x4000_0000])
                .unwrap();
        });
        cpus(w, 1);
        node(w, "serial@9000000", |w| {
            w.property_string("compatible", "arm,pl011").unwrap();
            w.property_array_u32("reg", &[0, 0x900_0000, 0x1000])
                .unwrap();
        });
        node(w, "interrupt-controller@8000000", |w| {
            w.property_string("compatible", "arm,gic-v3").unwrap();
            w.property_array_u32("reg", &[0, 0x800_0000, 0x1_0000, 0, 0x80a_0000, 0xf6_0000])
                .unwrap();
        });
    });
    let output = rewrite_for_host(&dtb, &full_edits(&[MOAT])).unwrap();
    let after = flatten(&output);
    assert_eq!(
        node_at(&after, "/reserved-memory").property("#size-cells"),
        Some(&1u32.to_be_bytes()[..])
    );
    let reg: Vec<u8> = [0u32, 0x4100_0000, 0x20_0000]
        .iter()
        .flat_map(|c| c.to_be_bytes())
        .collect();
    assert_eq!(
        node_at(&after, "/reserved-memory/moat@41000000").property("reg"),
        Some(reg.as_slice())
    );
    assert_eq!(discover(&output).unwrap().reserved.as_slice(), &[MOAT]);
    assert_dtc_accepts(&output, "2/1 tree");
}

#[test]
fn existing_reserved_memory_keeps_its_cells_and_large_regions_are_split() {
    // The Raspberry Pi 4 tree's /reserved-memory uses 2/1 cells.
    let input = load("qemu-raspi4b.dtb");
    let large = Range::new(0x1_0000_0000, 0x1_4000_0000).unwrap();
    let regions = [MOAT, large];
    let output = rewrite_for_host(&input, &full_edits(&regions)).unwrap();
    let after = flatten(&output);
    let reg: Vec<u8> = [0u32, 0x4100_0000, 0x20_0000]
        .iter()
        .flat_map(|c| c.to_be_bytes())
        .collect();
    assert_eq!(
        node_at(&after, "/reserved-memory/moat@41000000").property("reg"),
        Some(reg.as_slice())
    );
    let reg: Vec<u8> = [1u32, 0, 0xffff_f000, 1, 0xffff_f000, 0x4000_1000]
        .iter()
        .flat_map(|c| c.to_be_bytes())
        .collect();
    assert_eq!(
        node_at(&after, "/reserved-memory/moat@100000000").property("reg"),
        Some(reg.as_slice())
    );
    // The firmware's children stay first.
    let children: Vec<&str> = after
        .iter()
        .filter_map(|node| node.path.strip_prefix("/reserved-memory/"))
        .collect();
    assert_eq!(
        children,
        ["linux,cma", "nvram@0", "moat@41000000", "moat@100000000"]
    );
    assert_eq!(
        discover(&output).unwrap().reserved.as_slice(),
        &[
            Range::new(0, 0x1000).unwrap(),
            MOAT,
            Range::new(0x1_0000_0000, 0xffff_f000).unwrap(),
            Range::new(0x1_ffff_f000, 0x4000_1000).unwrap(),
        ]
    );
    assert_dtc_accepts(&output, "Raspberry Pi 4 tree");
}

#[test]
fn initrd_set_then_removed() {
    let input = load("fvp-base-revc.dtb");
    let with_initrd = rewrite_for_host(&input, &full_edits(&[])).unwrap();
    assert_eq!(discover(&with_initrd).unwrap().chosen.initrd, Some(INITRD));
    // Default edits keep bootargs and drop the initrd.
    let without = rewrite_for_host(&with_initrd, &HostDtEdits::default()).unwrap();
    let chosen = discover(&without).unwrap().chosen;
    assert_eq!(chosen.initrd, None);
    assert_eq!(chosen.bootargs, Some(BOOTARGS));
    let after = flatten(&without);
    let names: Vec<&str> = node_at(&after, "/chosen")
        .properties
        .iter()
        .map(|(name, _)| name.as_str())
        .collect();
    assert_eq!(names, ["bootargs"]);
    assert_preserved(
        &input,
        &without,
        &[],
        &[("/chosen", "bootargs"), ("/psci", "method")],
    );
}

#[test]
fn chosen_properties_are_replaced_where_they_are() {
    let dtb = tree(|w| {
        complete(w);
        node(w, "chosen", |w| {
            w.property_u32("linux,initrd-start", 0x4400_0000).unwrap();
            w.property_string("bootargs", "old").unwrap();
            w.property_string("stdout-path", "/serial@9000000").unwrap();
            w.property_u32("linux,initrd-end", 0x4500_0000).unwrap();
            w.property_array_u32("kaslr-seed", &[1, 2]).unwrap();
        });
    });
    assert_eq!(
        discover(&dtb).unwrap().chosen.initrd,
        Range::new(0x4400_0000, 0x100_0000)
    );
    let output = rewrite_for_host(&dtb, &full_edits(&[])).unwrap();
    let after = flatten(&output);
    let chosen = node_at(&after, "/chosen");
    let expected: Vec<(String, Vec<u8>)> = vec![
        (
            "linux,initrd-start".into(),
            0x4800_0000u64.to_be_bytes().to_vec(),
        ),
        ("bootargs".into(), format!("{BOOTARGS}\0").into_bytes()),
        ("stdout-path".into(), b"/serial@9000000\0".to_vec()),
        (
            "linux,initrd-end".into(),
            0x4810_0000u64.to_be_bytes().to_vec(),
        ),
        ("kaslr-seed".into(), [0, 0, 0, 1, 0, 0, 0, 2].to_vec()),
    ];
    assert_eq!(chosen.properties, expected);
    let chosen = discover(&output).unwrap().chosen;
    assert_eq!(
        (chosen.bootargs, chosen.initrd),
        (Some(BOOTARGS), Some(INITRD))
    );
}

#[test]
fn chosen_is_created_when_absent() {
    let dtb = tree(complete);
    assert!(!flatten(&dtb).iter().any(|node| node.path == "/chosen"));
    let output = rewrite_for_host(&dtb, &full_edits(&[])).unwrap();
    let chosen = discover(&output).unwrap().chosen;
    assert_eq!(
        (chosen.bootargs, chosen.initrd),
        (Some(BOOTARGS), Some(INITRD))
    );
    assert_preserved(&dtb, &output, &["/chosen"], &[("/psci", "method")]);
    // Even with nothing to put in it.
    let output = rewrite_for_host(&dtb, &HostDtEdits::default()).unwrap();
    assert_eq!(node_at(&flatten(&output), "/chosen").properties, []);
}

#[test]
fn psci_method() {
    let input = load("qemu-virt-gicv2.dtb");
    let edits = HostDtEdits {
        psci_conduit: Some(Conduit::Hvc),
        ..HostDtEdits::default()
    };
    let hvc = rewrite_for_host(&input, &edits).unwrap();
    assert_eq!(discover(&hvc).unwrap().psci.unwrap().conduit, Conduit::Hvc);
    let edits = HostDtEdits {
        psci_conduit: Some(Conduit::Smc),
        ..HostDtEdits::default()
    };
    let smc = rewrite_for_host(&hvc, &edits).unwrap();
    assert_eq!(
        smc,
        rewrite_for_host(&input, &HostDtEdits::default()).unwrap()
    );

    // A PSCI node without a method gets one.
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        gicv3(w);
        node(w, "psci", |w| {
            w.property_string("compatible", "arm,psci-0.2").unwrap()
        });
    });
    assert!(matches!(discover(&dtb), Err(DtError::BadProperty(_))));
    let output = rewrite_for_host(&dtb, &full_edits(&[])).unwrap();
    assert_eq!(
        discover(&output).unwrap().psci.unwrap().conduit,
        Conduit::Hvc
    );

    // A tree without PSCI gets none.
    let output = rewrite_for_host(&load("qemu-raspi4b.dtb"), &full_edits(&[])).unwrap();
    assert_eq!(discover(&output).unwrap().psci, None);
}

#[test]
fn existing_reserved_memory_without_ranges_gets_one() {
    let dtb = tree(|w| {
        complete(w);
        node(w, "reserved-memory", |w| {
            w.property_u32("#address-cells", 2).unwrap();
            w.property_u32("#size-cells", 2).unwrap();
        });
    });
    let output = rewrite_for_host(&dtb, &full_edits(&[MOAT])).unwrap();
    let after = flatten(&output);
    assert_eq!(
        node_at(&after, "/reserved-memory").property("ranges"),
        Some(&[][..])
    );
    assert_eq!(discover(&output).unwrap().reserved.as_slice(), &[MOAT]);
}

#[test]
fn unusable_reserved_memory_is_an_input_error() {
    let translating = tree(|w| {
        complete(w);
        node(w, "reserved-memory", |w| {
            w.property_u32("#address-cells", 2).unwrap();
            w.property_u32("#size-cells", 2).unwrap();
            w.property_array_u64("ranges", &[0, 0x4000_0000, 0x4000_0000])
                .unwrap();
        });
    });
    assert!(matches!(
        rewrite_for_host(&translating, &full_edits(&[MOAT])),
        Err(RewriteError::Input(DtError::Malformed(_)))
    ));
    // Nothing to add: left alone.
    assert!(rewrite_for_host(&translating, &HostDtEdits::default()).is_ok());
    let other_cells = tree(|w| {
        complete(w);
        node(w, "reserved-memory", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 1).unwrap();
            w.property_null("ranges").unwrap();
        });
    });
    assert!(matches!(
        rewrite_for_host(&other_cells, &full_edits(&[MOAT])),
        Err(RewriteError::Input(DtError::Malformed(_)))
    ));
}

#[test]
fn bad_edits() {
    let dtb = load("qemu-virt-gicv3.dtb");
    let empty = Range {
        base: 0x4000_0000,
        size: 0,
    };
    let overflowing = Range {
        base: u64::MAX - 0xfff,
        size: 0x2000,
    };
    let overlapping = Range {
        base: 0x4110_0000,
        size: 0x20_0000,
    };
    for regions in [vec![empty], vec![overflowing], vec![MOAT, overlapping]] {
        let bad = *regions.last().unwrap();
        assert_eq!(
            rewrite_for_host(&dtb, &full_edits(&regions)).err(),
            Some(RewriteError::BadRange(bad))
        );
    }
    let edits = HostDtEdits {
        initrd: Some(empty),
        ..HostDtEdits::default()
    };
    assert_eq!(
        rewrite_for_host(&dtb, &edits).err(),
        Some(RewriteError::BadRange(empty))
    );
    // Above 4 GiB with one address cell.
    let dtb = tree_with_root_cells(1, 1, |w| {
        node(w, "reserved-memory", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 1).unwrap();
            w.property_null("ranges").unwrap();
        });
    });
    let high = Range::new(0x1_0000_0000, 0x1000).unwrap();
    assert_eq!(
        rewrite_for_host(&dtb, &full_edits(&[high])).err(),
        Some(RewriteError::BadRange(high))
    );
    assert!(rewrite_for_host(&dtb, &full_edits(&[MOAT])).is_ok());
}

#[test]
fn bootargs_with_a_nul_is_refused_by_the_writer() {
    let edits = HostDtEdits {
        bootargs: Some("a\0b"),
        ..HostDtEdits::default()
    };
    assert_eq!(
        rewrite_for_host(&load("fvp-base-revc.dtb"), &edits).err(),
        Some(RewriteError::Output)
    );
}

#[test]
fn node_names_the_writer_refuses_are_an_output_error() {
    // vm-fdt only accepts node names that start with a letter, so trees
    // carrying overlay metadata such as `__symbols__` cannot be re-emitted.
    let mut dtb = tree(|w| {
        complete(w);
        node(w, "xxsymbols__", |w| {
            w.property_string("uart0", "/serial@9000000").unwrap()
        });
    });
    let at = dtb
        .windows(12)
        .position(|window| window == b"xxsymbols__\0")
        .unwrap();
    dtb[at..at + 2].copy_from_slice(b"__");
    assert!(discover(&dtb).is_ok());
    assert_eq!(
        rewrite_for_host(&dtb, &HostDtEdits::default()).err(),
        Some(RewriteError::Output)
    );
}

#[test]
fn input_errors() {
    let dtb = load("fvp-base-revc.dtb");
    assert_eq!(
        rewrite_for_host(&dtb[..100], &HostDtEdits::default()).err(),
        Some(RewriteError::Input(DtError::Truncated {
            available: 100,
            needed: dtb.len()
        }))
    );
    let mut bad = dtb.clone();
    bad[3] = 0;
    assert_eq!(
        rewrite_for_host(&bad, &HostDtEdits::default()).err(),
        Some(RewriteError::Input(DtError::BadMagic(0xd00d_fe00)))
    );
}

#[test]
fn errors_display_a_sentence() {
    for error in [
        RewriteError::Input(DtError::NoMemory),
        RewriteError::Output,
        RewriteError::BadRange(Range {
            base: 0x1000,
            size: 0,
        }),
    ] {
        assert!(error.to_string().len() > 30, "{error}");
    }
}

#[test]
fn mutated_trees_never_panic_and_output_is_well_formed() {
    let regions = [MOAT];
    let edits = full_edits(&regions);
    for (index, name) in REAL_TREES.iter().enumerate() {
        let dtb = load(name);
        let used = (header(&dtb, 3) + header(&dtb, 8)) as usize;
        let values: Vec<(usize, usize)> = property_values(&dtb)
            .into_iter()
            .filter(|&(_, len)| len > 0)
            .collect();
        let mut rng = XorShift(0x1234_5678 ^ index as u64);
        let mut buffer = dtb.clone();
        let mut rewritten = 0;
        for _ in 0..300 {
            buffer.copy_from_slice(&dtb);
            for _ in 0..1 + rng.below(3) {
                if rng.below(2) == 0 {
                    let (at, len) = values[rng.below(values.len())];
                    buffer[at + rng.below(len)] = rng.next() as u8;
                } else {
                    let at = rng.below(used);
                    buffer[at] ^= 1 << rng.below(8);
                }
            }
            if let Ok(output) = rewrite_for_host(&buffer, &edits) {
                rewritten += 1;
                assert!(
                    !matches!(
                        discover(&output),
                        Err(DtError::Malformed(_)
                            | DtError::Truncated { .. }
                            | DtError::BadMagic(_))
                    ),
                    "{name}: the rewrite of a mutated tree is not a well-formed tree"
                );
            }
        }
        assert!(rewritten > 0, "{name}");
    }
}

#[test]
fn boot_cpu_is_kept() {
    let mut w = FdtWriter::new().unwrap();
    w.set_boot_cpuid_phys(3);
    let root = w.begin_node("").unwrap();
    complete(&mut w);
    w.end_node(root).unwrap();
    let dtb = w.finish().unwrap();
    let output = rewrite_for_host(&dtb, &full_edits(&[MOAT])).unwrap();
    assert_eq!(header(&output, 7), 3);
}

/// A board whose firmware parks the secondaries on a spin table (the
/// Raspberry Pi 4): the host's CPUs start through PSCI calls to the core, so
/// the host never learns a release address.
#[test]
fn spin_table_cpus_become_psci_cpus() {
    use moat_platform::dt::EnableMethod;
    let input = load("qemu-raspi4b.dtb");
    let before = discover(&input).unwrap();
    assert!(before.psci.is_none());
    assert!(
        before
            .cpus
            .iter()
            .all(|c| matches!(c.enable_method, EnableMethod::SpinTable { .. }))
    );
    let edits = HostDtEdits {
        psci_conduit: Some(Conduit::Hvc),
        cpus_via_psci: true,
        ..HostDtEdits::default()
    };
    let host = rewrite_for_host(&input, &edits).unwrap();
    let after = discover(&host).unwrap();
    assert_eq!(after.psci.map(|p| p.conduit), Some(Conduit::Hvc));
    assert_eq!(after.cpus.len(), 4);
    assert!(
        after
            .cpus
            .iter()
            .all(|c| c.enable_method == EnableMethod::Psci)
    );
    let nodes = flatten(&host);
    assert!(
        nodes
            .iter()
            .all(|n| n.property("cpu-release-addr").is_none())
    );
    let psci = node_at(&nodes, "/psci");
    assert_eq!(
        psci.property("compatible"),
        Some(&b"arm,psci-1.0\0arm,psci-0.2\0"[..])
    );
    assert_eq!(psci.property("method"), Some(&b"hvc\0"[..]));
    // Everything else is as discovery saw it.
    assert_eq!(
        Platform {
            psci: None,
            cpus: before.cpus.clone(),
            ..after.clone()
        },
        before
    );
    // A tree that already has a PSCI node keeps exactly one.
    let fvp = rewrite_for_host(&load("fvp-base-revc.dtb"), &edits).unwrap();
    assert_eq!(flatten(&fvp).iter().filter(|n| is_psci(n)).count(), 1);
    assert_eq!(discover(&fvp).unwrap().psci.unwrap().conduit, Conduit::Hvc);
    // Without the edit the spin table stays.
    let plain = rewrite_for_host(
        &input,
        &HostDtEdits {
            psci_conduit: Some(Conduit::Hvc),
            ..HostDtEdits::default()
        },
    )
    .unwrap();
    assert_eq!(discover(&plain).unwrap().cpus, before.cpus);
    assert!(discover(&plain).unwrap().psci.is_none());
}

/// A disabled PSCI node beside spin-table CPUs: once the CPUs start through
/// PSCI the node must be available, or the host finds no PSCI and brings up
/// no secondary. Without that edit it stays as the firmware left it.
#[test]
fn a_disabled_psci_node_is_enabled_when_the_cpus_move_to_psci() {
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        node(w, "cpus", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 0).unwrap();
            for index in 0..2u32 {
                node(w, &format!("cpu@{index:x}"), |w| {
                    w.property_string("device_type", "cpu").unwrap();
                    w.property_u32("reg", index).unwrap();
                    w.property_string("enable-method", "spin-table").unwrap();
                    w.property_u64("cpu-release-addr", 0xd8).unwrap();
                });
            }
        });
        pl011(w, 0x900_0000, None);
        gicv3(w);
        node(w, "psci", |w| {
            w.property_string("compatible", "arm,psci-1.0").unwrap();
            w.property_string("status", "disabled").unwrap();
            w.property_string("method", "smc").unwrap();
        });
    });
    assert!(discover(&dtb).unwrap().psci.is_none());
    let moved = rewrite_for_host(
        &dtb,
        &HostDtEdits {
            psci_conduit: Some(Conduit::Hvc),
            cpus_via_psci: true,
            ..HostDtEdits::default()
        },
    )
    .unwrap();
    assert_eq!(
        discover(&moved).unwrap().psci.map(|p| p.conduit),
        Some(Conduit::Hvc)
    );
    let nodes = flatten(&moved);
    assert_eq!(nodes.iter().filter(|n| is_psci(n)).count(), 1);
    assert_eq!(node_at(&nodes, "/psci").property("status"), None);
    let kept = rewrite_for_host(
        &dtb,
        &HostDtEdits {
            psci_conduit: Some(Conduit::Hvc),
            ..HostDtEdits::default()
        },
    )
    .unwrap();
    assert!(discover(&kept).unwrap().psci.is_none());
    assert_eq!(
        node_at(&flatten(&kept), "/psci").property("status"),
        Some(&b"disabled\0"[..])
    );
}

#[test]
fn a_withheld_smmu_v3_is_disabled_and_nothing_points_at_it() {
    let dtb = load("qemu-virt-smmuv3.dtb");
    assert!(moat_platform::iommu::find_smmu_v3(&dtb).unwrap().is_some());
    let edits = HostDtEdits {
        hide_smmu_v3: true,
        ..HostDtEdits::default()
    };
    let host = rewrite_for_host(&dtb, &edits).unwrap();
    assert_eq!(moat_platform::iommu::find_smmu_v3(&host).unwrap(), None);
    let has = |bytes: &[u8], what: &[u8]| bytes.windows(what.len()).any(|w| w == what);
    assert!(has(&dtb, b"iommu-map\0"));
    assert!(!has(&host, b"iommu-map\0"));
    // The rest of the tree is what it was.
    assert_eq!(
        discover(&host).unwrap().devices,
        discover(&dtb).unwrap().devices
    );
}

#[test]
fn withheld_devices_are_disabled_in_the_hosts_tree() {
    let dtb = load("qemu-virt-gicv3.dtb");
    let edits = HostDtEdits {
        disable_nodes: &["fw-cfg@9020000", "virtio_mmio@a000000"],
        ..HostDtEdits::default()
    };
    let host = rewrite_for_host(&dtb, &edits).unwrap();
    let mut seen = Vec::new();
    moat_platform::devices::classify(&host, None, |d| seen.push(d.name)).unwrap();
    assert!(!seen.contains(&"fw-cfg@9020000"));
    assert!(!seen.contains(&"virtio_mmio@a000000"));
    assert!(seen.contains(&"virtio_mmio@a000200"));
    assert_eq!(seen.len() + 2, {
        let mut all = 0;
        moat_platform::devices::classify(&dtb, None, |_| all += 1).unwrap();
        all
    });
}
