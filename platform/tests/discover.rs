//! Discovery on the real device trees in `testdata/` and on small trees built
//! for one case each.

mod common;

use common::*;
use moat_platform::dt::{
    Chosen, Conduit, Cpu, DtError, EnableMethod, Gic, MAX_CPUS, MAX_DEVICE_WINDOWS,
    MAX_MEMORY_RANGES, MAX_NODE_DEPTH, Platform, Psci, Range, Uart, UartKind, console_uart,
    discover,
};
use vm_fdt::FdtWriter;

fn range(base: u64, size: u64) -> Range {
    Range::new(base, size).unwrap()
}

fn ranges<const N: usize>(list: &[(u64, u64)]) -> heapless::Vec<Range, N> {
    list.iter().map(|&(base, size)| range(base, size)).collect()
}

/// QEMU `virt`'s device windows: `gic`, the flash and GIC windows that
/// differ between GICv2 and GICv3, then those after the PL011 both share.
fn virt_windows(gic: &[(u64, u64)]) -> heapless::Vec<Range, MAX_DEVICE_WINDOWS> {
    const SHARED: [(u64, u64); 8] = [
        (0x901_0000, 0x1000),
        (0x902_0000, 0x18),
        (0x903_0000, 0x1000),
        (0xa00_0000, 0x4000),
        (0xc00_0000, 0x200_0000),
        (0x1000_0000, 0x2f00_0000),
        (0x40_1000_0000, 0x1000_0000),
        (0x80_0000_0000, 0x80_0000_0000),
    ];
    ranges(&[gic, &SHARED].concat())
}

fn psci_cpus(mpidrs: &[u64]) -> heapless::Vec<Cpu, MAX_CPUS> {
    mpidrs
        .iter()
        .map(|&mpidr| Cpu {
            mpidr,
            enable_method: EnableMethod::Psci,
        })
        .collect()
}

fn pl011_at(base: u64, size: u64) -> Uart {
    Uart {
        kind: UartKind::Pl011,
        regs: range(base, size),
    }
}

#[test]
fn qemu_virt_gicv3() {
    let dtb = load("qemu-virt-gicv3.dtb");
    let expected = Platform {
        model: "linux,dummy-virt",
        compatible: "linux,dummy-virt",
        memory: ranges(&[(0x4000_0000, 0x4000_0000)]),
        reserved: ranges(&[]),
        cpus: psci_cpus(&[0, 1, 2, 3]),
        uart: pl011_at(0x0900_0000, 0x1000),
        gic: Gic::V3 {
            distributor: range(0x0800_0000, 0x1_0000),
            redistributors: ranges(&[(0x080a_0000, 0xf6_0000)]),
        },
        psci: Some(Psci {
            conduit: Conduit::Smc,
        }),
        chosen: Chosen {
            bootargs: None,
            stdout_path: Some("/pl011@9000000"),
            initrd: None,
        },
        // Every reg and bus window outside RAM, merged where they touch:
        // the flash banks with the GIC distributor; the ITS,
        // redistributors and PL011; PL031; fw-cfg; GPIO; the virtio-mmio
        // transports; the platform bus (ranges); the PCIe host bridge's
        // 32-bit memory and I/O windows (ranges, adjacent), its high ECAM
        // (reg) and its 64-bit memory window (ranges), where Linux puts
        // 64-bit BARs.
        devices: virt_windows(&[(0x0, 0x801_0000), (0x808_0000, 0xf8_1000)]),
    };
    assert_eq!(discover(&dtb), Ok(expected));
}

#[test]
fn qemu_virt_gicv2() {
    let dtb = load("qemu-virt-gicv2.dtb");
    let expected = Platform {
        model: "linux,dummy-virt",
        compatible: "linux,dummy-virt",
        memory: ranges(&[(0x4000_0000, 0x4000_0000)]),
        reserved: ranges(&[]),
        cpus: psci_cpus(&[0, 1, 2, 3]),
        uart: pl011_at(0x0900_0000, 0x1000),
        gic: Gic::V2 {
            distributor: range(0x0800_0000, 0x1_0000),
            cpu_interface: range(0x0801_0000, 0x1_0000),
            hyp_interface: Some(range(0x0803_0000, 0x1_0000)),
            virtual_cpu_interface: Some(range(0x0804_0000, 0x1_0000)),
        },
        psci: Some(Psci {
            conduit: Conduit::Smc,
        }),
        chosen: Chosen {
            bootargs: None,
            stdout_path: Some("/pl011@9000000"),
            initrd: None,
        },
        // As with GICv3, but GICv2's distributor, CPU interface, GICH and
        // GICV sit between the flash and the PL011.
        devices: virt_windows(&[
            (0x0, 0x802_1000),
            (0x803_0000, 0x2_0000),
            (0x900_0000, 0x1000),
        ]),
    };
    let platform = discover(&dtb).unwrap();
    assert_eq!(platform.gic.version(), 2);
    assert_eq!(platform, expected);
}

#[test]
fn fvp_base_revc() {
    let dtb = load("fvp-base-revc.dtb");
    let expected = Platform {
        model: "FVP Base RevC",
        compatible: "arm,fvp-base-revc",
        memory: ranges(&[(0x8000_0000, 0x8000_0000), (0x8_8000_0000, 0x8000_0000)]),
        // The /memreserve/ entry, then /reserved-memory/vram@18000000.
        reserved: ranges(&[(0x8000_0000, 0x1_0000), (0x1800_0000, 0x80_0000)]),
        cpus: psci_cpus(&[
            0x0, 0x100, 0x200, 0x300, 0x1_0000, 0x1_0100, 0x1_0200, 0x1_0300,
        ]),
        // serial@90000 on iofpga-bus@300000000, translated through three
        // levels of ranges; the tree has no stdout-path.
        uart: pl011_at(0x1c09_0000, 0x1000),
        // reg also lists GICC, GICH and GICV after the one redistributor region.
        gic: Gic::V3 {
            distributor: range(0x2f00_0000, 0x1_0000),
            redistributors: ranges(&[(0x2f10_0000, 0x20_0000)]),
        },
        psci: Some(Psci {
            conduit: Conduit::Smc,
        }),
        chosen: Chosen::default(),
        // The flash, video and motherboard buses (ranges) below the GIC;
        // the highest is pci@40000000: its ECAM (reg) and the 32-bit
        // memory window after it (ranges).
        devices: ranges(&[
            (0x800_0000, 0x1800_0000),
            (0x2b40_0000, 0x10_0000),
            (0x2c00_0000, 0x2000),
            (0x2c01_0000, 0x2000),
            (0x2c02_f000, 0x2000),
            (0x2f00_0000, 0x1_0000),
            (0x2f02_0000, 0x2_0000),
            (0x2f10_0000, 0x20_0000),
            (0x4000_0000, 0x2000_0000),
        ]),
    };
    assert_eq!(discover(&dtb), Ok(expected));
}

#[test]
fn debian_raspberry_pi_4_has_no_memory_until_firmware_fills_it() {
    let dtb = load("bcm2711-rpi-4-b.dtb");
    assert_eq!(discover(&dtb), Err(DtError::NoMemory));
}

fn pi4_cpus() -> heapless::Vec<Cpu, MAX_CPUS> {
    [(0, 0xd8), (1, 0xe0), (2, 0xe8), (3, 0xf0)]
        .iter()
        .map(|&(mpidr, release_addr)| Cpu {
            mpidr,
            enable_method: EnableMethod::SpinTable { release_addr },
        })
        .collect()
}

#[test]
fn qemu_raspberry_pi_4() {
    let dtb = load("qemu-raspi4b.dtb");
    let expected = Platform {
        model: "Raspberry Pi 4 Model B",
        compatible: "raspberrypi,4-model-b",
        memory: ranges(&[(0, 0x3c00_0000)]),
        reserved: ranges(&[(0, 0x1000)]),
        cpus: pi4_cpus(),
        // stdout-path is "serial1:115200n8", the mini UART (not a PL011), so
        // the first enabled PL011 (uart0, 0x7e201000 on /soc) is taken.
        uart: pl011_at(0xfe20_1000, 0x200),
        gic: Gic::V2 {
            distributor: range(0xff84_1000, 0x1000),
            cpu_interface: range(0xff84_2000, 0x2000),
            hyp_interface: Some(range(0xff84_4000, 0x2000)),
            virtual_cpu_interface: Some(range(0xff84_6000, 0x2000)),
        },
        psci: None,
        chosen: Chosen {
            bootargs: None,
            stdout_path: Some("serial1:115200n8"),
            initrd: None,
        },
        // The SoC bus's window onto its peripherals (ranges), which holds
        // every device node under it, and the window of the bus above 4 GiB.
        devices: ranges(&[(0xfc00_0000, 0x400_0000), (0x6_0000_0000, 0x4000_0000)]),
    };
    assert_eq!(discover(&dtb), Ok(expected));
}

#[test]
fn qemu_raspberry_pi_4_tree_holds_nop_tokens() {
    // QEMU deletes the nodes it does not model by overwriting them with NOPs;
    // discovery must read straight past them.
    let dtb = load("qemu-raspi4b.dtb");
    assert_eq!(nop_tokens(&dtb), 326);
    assert_eq!(nop_tokens(&load("bcm2711-rpi-4-b.dtb")), 0);
}

#[test]
fn nop_tokens_anywhere_change_nothing() {
    for name in REAL_TREES {
        let dtb = load(name);
        let nopped = with_nops(&dtb);
        assert_eq!(discover(&nopped), discover(&dtb), "{name}");
    }
}

#[test]
fn a_buffer_longer_than_the_tree_is_fine() {
    let dtb = load("fvp-base-revc.dtb");
    let mut longer = dtb.clone();
    longer.extend_from_slice(&[0xff; 100]);
    assert_eq!(discover(&longer), discover(&dtb));
}

#[test]
fn every_truncation_is_reported_as_truncated() {
    for name in REAL_TREES {
        let dtb = load(name);
        let totalsize = header(&dtb, 1) as usize;
        assert_eq!(totalsize, dtb.len(), "{name}");
        for len in 0..totalsize {
            let needed = if len < 8 { 40 } else { totalsize };
            assert_eq!(
                discover(&dtb[..len]).err(),
                Some(DtError::Truncated {
                    available: len,
                    needed
                }),
                "{name} cut to {len} bytes"
            );
        }
    }
}

#[test]
fn bad_magic() {
    let mut dtb = load("qemu-virt-gicv3.dtb");
    dtb[0] = 0xde;
    assert_eq!(discover(&dtb).err(), Some(DtError::BadMagic(0xde0d_feed)));
    assert_eq!(
        discover(b"not a device tree at all, really not").err(),
        Some(DtError::BadMagic(0x6e6f_7420))
    );
    assert_eq!(discover(&[0; 64]).err(), Some(DtError::BadMagic(0)));
}

#[test]
fn header_problems_are_malformed() {
    let dtb = tree(complete);
    let with_field = |index: usize, value: u32| {
        let mut bad = dtb.clone();
        bad[index * 4..index * 4 + 4].copy_from_slice(&value.to_be_bytes());
        discover(&bad).err()
    };
    assert!(
        matches!(with_field(1, 39), Some(DtError::Malformed(_))),
        "totalsize below the header"
    );
    assert!(
        matches!(with_field(5, 16), Some(DtError::Malformed(_))),
        "version 16"
    );
    assert!(
        matches!(with_field(6, 18), Some(DtError::Malformed(_))),
        "last compatible 18"
    );
    assert!(
        matches!(with_field(2, 0xffff_fff0), Some(DtError::Malformed(_))),
        "struct offset"
    );
    assert!(
        matches!(with_field(9, 0xffff_fff0), Some(DtError::Malformed(_))),
        "struct size"
    );
    assert!(
        matches!(with_field(3, 0xffff_fff0), Some(DtError::Malformed(_))),
        "strings offset"
    );
    assert!(
        matches!(with_field(8, 0), Some(DtError::Malformed(_))),
        "empty strings block"
    );
    assert!(
        matches!(
            with_field(4, dtb.len() as u32 - 8),
            Some(DtError::Malformed(_))
        ),
        "rsvmap"
    );
}

#[test]
fn structure_problems_are_malformed() {
    let dtb = tree(complete);
    let structs = header(&dtb, 2) as usize;
    let size = header(&dtb, 9) as usize;
    // An unknown token where the root's first property is.
    let first_property = structs + 8;
    assert_eq!(be32(&dtb, first_property), 3);
    let mut bad = dtb.clone();
    bad[first_property..first_property + 4].copy_from_slice(&7u32.to_be_bytes());
    assert!(matches!(discover(&bad), Err(DtError::Malformed(_))));
    // A property length running past the block.
    let mut bad = dtb.clone();
    bad[first_property + 4..first_property + 8].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    assert!(matches!(discover(&bad), Err(DtError::Malformed(_))));
    // A property name offset outside the strings block.
    let mut bad = dtb.clone();
    bad[first_property + 8..first_property + 12].copy_from_slice(&0xffffu32.to_be_bytes());
    assert!(matches!(discover(&bad), Err(DtError::Malformed(_))));
    // The FDT_END token turned into an END_NODE: one end too many.
    let mut bad = dtb.clone();
    assert_eq!(be32(&dtb, structs + size - 4), 9);
    bad[structs + size - 4..structs + size].copy_from_slice(&2u32.to_be_bytes());
    assert!(matches!(discover(&bad), Err(DtError::Malformed(_))));
    // The last END_NODE turned into a NOP: the root never ends.
    let mut bad = dtb.clone();
    bad[structs + size - 8..structs + size - 4].copy_from_slice(&4u32.to_be_bytes());
    assert!(matches!(discover(&bad), Err(DtError::Malformed(_))));
}

#[test]
fn nesting_limit() {
    let nested = |depth: usize| {
        tree(|w| {
            complete(w);
            let mut handles = Vec::new();
            for level in 1..depth {
                handles.push(w.begin_node(&format!("level{level}")).unwrap());
            }
            for handle in handles.into_iter().rev() {
                w.end_node(handle).unwrap();
            }
        })
    };
    // The root is depth 1.
    assert!(discover(&nested(MAX_NODE_DEPTH)).is_ok());
    assert_eq!(
        discover(&nested(MAX_NODE_DEPTH + 1)).err(),
        Some(DtError::Malformed(
            "nodes are nested deeper than Moat supports"
        ))
    );
}

#[test]
fn small_complete_tree() {
    let dtb = tree(complete);
    let platform = discover(&dtb).unwrap();
    assert_eq!(platform.model, "test board");
    assert_eq!(platform.compatible, "test,board");
    assert_eq!(
        platform.memory,
        ranges::<MAX_MEMORY_RANGES>(&[(0x4000_0000, 0x4000_0000)])
    );
    assert_eq!(platform.cpus, psci_cpus(&[0, 1]));
    assert_eq!(platform.uart, pl011_at(0x900_0000, 0x1000));
    assert_eq!(platform.gic.version(), 3);
    assert_eq!(
        platform.psci,
        Some(Psci {
            conduit: Conduit::Smc
        })
    );
    assert_eq!(platform.chosen, Chosen::default());
    // The PL011 ends at 0x900_1000; the redistributors end at 0x900_0000.
    assert_eq!(platform.devices_top(), 0x900_1000);
}

#[test]
fn no_memory_node() {
    let dtb = tree(|w| {
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert_eq!(discover(&dtb).err(), Some(DtError::NoMemory));
}

#[test]
fn disabled_memory_is_not_memory() {
    let dtb = tree(|w| {
        node(w, "memory@40000000", |w| {
            w.property_string("device_type", "memory").unwrap();
            w.property_array_u64("reg", &[0x4000_0000, 0x1000_0000])
                .unwrap();
            w.property_string("status", "disabled").unwrap();
        });
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert_eq!(discover(&dtb).err(), Some(DtError::NoMemory));
}

#[test]
fn no_uart() {
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        cpus(w, 1);
        gicv3(w);
        pl011(w, 0x900_0000, Some("disabled"));
        node(w, "serial@9100000", |w| {
            w.property_string("compatible", "ns16550a").unwrap();
            w.property_array_u64("reg", &[0x910_0000, 0x100]).unwrap();
        });
    });
    assert_eq!(discover(&dtb).err(), Some(DtError::NoUart));
}

/// A console whose window reaches into RAM (a size of 0xffff_ffff_0000_0000
/// from the fuzzer, or one inside a bank) would have the core map RAM as
/// device memory: refused, whichever way it overlaps.
#[test]
fn a_console_window_over_ram_is_refused() {
    for (base, size) in [
        (0x900_0000, 0xffff_ffff_0000_0000),
        (0x3fff_f000, 0x2000),
        (0x4800_0000, 0x1000),
    ] {
        let dtb = tree(|w| {
            memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
            cpus(w, 1);
            gicv3(w);
            node(w, &format!("serial@{base:x}"), |w| {
                w.property_string("compatible", "arm,pl011").unwrap();
                w.property_array_u64("reg", &[base, size]).unwrap();
            });
        });
        assert_eq!(
            discover(&dtb).err(),
            Some(DtError::BadReg(
                "the console UART (its window overlaps RAM)"
            )),
            "{base:#x} + {size:#x}"
        );
    }
}

#[test]
fn no_gic() {
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        node(w, "interrupt-controller@8000000", |w| {
            w.property_string("compatible", "riscv,plic0").unwrap();
            w.property_array_u64("reg", &[0x800_0000, 0x1_0000])
                .unwrap();
        });
    });
    assert_eq!(discover(&dtb).err(), Some(DtError::NoGic));
}

#[test]
fn no_cpus() {
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        node(w, "cpus", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 0).unwrap();
            node(w, "cpu-map", |_| {});
        });
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert_eq!(discover(&dtb).err(), Some(DtError::NoCpus));
}

fn with_gic(gic: impl FnOnce(&mut FdtWriter)) -> Result<Gic, DtError> {
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        node(w, "interrupt-controller@2c000000", gic);
    });
    discover(&dtb).map(|platform| platform.gic)
}

#[test]
fn gic_with_too_few_regions() {
    let v2 = with_gic(|w| {
        w.property_string("compatible", "arm,gic-400").unwrap();
        w.property_array_u64("reg", &[0x2c00_1000, 0x1000]).unwrap();
    });
    assert_eq!(v2, Err(DtError::BadGic));
    let v3 = with_gic(|w| {
        w.property_string("compatible", "arm,gic-v3").unwrap();
        w.property_array_u64("reg", &[0x2f00_0000, 0x1_0000])
            .unwrap();
    });
    assert_eq!(v3, Err(DtError::BadGic));
    let v3 = with_gic(|w| {
        w.property_string("compatible", "arm,gic-v3").unwrap();
        w.property_u32("#redistributor-regions", 2).unwrap();
        w.property_array_u64(
            "reg",
            &reg2(&[(0x2f00_0000, 0x1_0000), (0x2f10_0000, 0x2_0000)]),
        )
        .unwrap();
    });
    assert_eq!(v3, Err(DtError::BadGic));
    let without_reg = with_gic(|w| w.property_string("compatible", "arm,gic-v3").unwrap());
    assert_eq!(without_reg, Err(DtError::BadGic));
}

#[test]
fn gicv2_without_virtualization_extensions() {
    let gic = with_gic(|w| {
        w.property_string("compatible", "arm,cortex-a9-gic")
            .unwrap();
        w.property_array_u64(
            "reg",
            &reg2(&[(0x2c00_1000, 0x1000), (0x2c00_2000, 0x2000)]),
        )
        .unwrap();
    });
    assert_eq!(
        gic,
        Ok(Gic::V2 {
            distributor: range(0x2c00_1000, 0x1000),
            cpu_interface: range(0x2c00_2000, 0x2000),
            hyp_interface: None,
            virtual_cpu_interface: None,
        })
    );
}

#[test]
fn gicv3_redistributor_regions() {
    let gic = with_gic(|w| {
        w.property_string("compatible", "arm,gic-v3").unwrap();
        w.property_u32("#redistributor-regions", 2).unwrap();
        w.property_array_u64(
            "reg",
            &reg2(&[
                (0x2f00_0000, 0x1_0000),
                (0x2f10_0000, 0x10_0000),
                (0x3000_0000, 0x10_0000),
                (0x2c00_0000, 0x2000),
                (0x2c01_0000, 0x2000),
                (0x2c02_f000, 0x2000),
            ]),
        )
        .unwrap();
    });
    assert_eq!(
        gic,
        Ok(Gic::V3 {
            distributor: range(0x2f00_0000, 0x1_0000),
            redistributors: ranges(&[(0x2f10_0000, 0x10_0000), (0x3000_0000, 0x10_0000)]),
        })
    );
    let too_many = with_gic(|w| {
        w.property_string("compatible", "arm,gic-v3").unwrap();
        w.property_u32("#redistributor-regions", 5).unwrap();
        w.property_array_u64("reg", &reg2(&[(0x2f00_0000, 0x1_0000); 6]))
            .unwrap();
    });
    assert_eq!(
        too_many,
        Err(DtError::TooMany("GICv3 redistributor regions"))
    );
}

#[test]
fn gic_region_of_size_zero() {
    let gic = with_gic(|w| {
        w.property_string("compatible", "arm,gic-400").unwrap();
        w.property_array_u64("reg", &reg2(&[(0x2c00_1000, 0x1000), (0x2c00_2000, 0)]))
            .unwrap();
    });
    assert!(matches!(gic, Err(DtError::BadReg(_))));
}

#[test]
fn too_many_cpus() {
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        cpus(w, MAX_CPUS as u32 + 1);
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert_eq!(discover(&dtb).err(), Some(DtError::TooMany("CPUs")));
}

#[test]
fn cpu_enable_methods_and_status() {
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        node(w, "cpus", |w| {
            w.property_u32("#address-cells", 2).unwrap();
            w.property_u32("#size-cells", 0).unwrap();
            node(w, "cpu@0", |w| {
                w.property_string("device_type", "cpu").unwrap();
                w.property_array_u32("reg", &[0, 0]).unwrap();
            });
            node(w, "cpu@100", |w| {
                w.property_string("device_type", "cpu").unwrap();
                w.property_array_u32("reg", &[0, 0x100]).unwrap();
                w.property_string("enable-method", "spin-table").unwrap();
                w.property_u32("cpu-release-addr", 0xfff8).unwrap();
                // Parked by firmware, still a CPU to bring up.
                w.property_string("status", "disabled").unwrap();
            });
            node(w, "cpu@1_0000", |w| {
                w.property_string("device_type", "cpu").unwrap();
                w.property_array_u32("reg", &[0x1, 0x0]).unwrap();
                w.property_string("enable-method", "spin-table").unwrap();
                w.property_u64("cpu-release-addr", 0x8_0000_00f0).unwrap();
            });
            node(w, "cpu@2", |w| {
                w.property_string("device_type", "cpu").unwrap();
                w.property_array_u32("reg", &[0, 2]).unwrap();
                w.property_string("status", "fail").unwrap();
            });
            node(w, "cpu@3", |w| {
                w.property_string("device_type", "cpu").unwrap();
                w.property_array_u32("reg", &[0, 3]).unwrap();
                w.property_string("enable-method", "brcm,bcm2836-smp")
                    .unwrap();
            });
            node(w, "l2-cache", |w| {
                w.property_string("compatible", "cache").unwrap();
            });
        });
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    let platform = discover(&dtb).unwrap();
    assert_eq!(
        platform.cpus.as_slice(),
        &[
            Cpu {
                mpidr: 0,
                enable_method: EnableMethod::None
            },
            Cpu {
                mpidr: 0x100,
                enable_method: EnableMethod::SpinTable {
                    release_addr: 0xfff8
                }
            },
            Cpu {
                mpidr: 0x1_0000_0000,
                enable_method: EnableMethod::SpinTable {
                    release_addr: 0x8_0000_00f0
                }
            },
            Cpu {
                mpidr: 3,
                enable_method: EnableMethod::None
            },
        ]
    );
    assert_eq!(platform.psci, None);
}

#[test]
fn spin_table_without_release_address() {
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        node(w, "cpus", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 0).unwrap();
            node(w, "cpu@0", |w| {
                w.property_string("device_type", "cpu").unwrap();
                w.property_u32("reg", 0).unwrap();
                w.property_string("enable-method", "spin-table").unwrap();
            });
        });
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert!(matches!(discover(&dtb), Err(DtError::BadProperty(_))));
}

#[test]
fn cpu_without_reg() {
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        node(w, "cpus", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 0).unwrap();
            node(w, "cpu@0", |w| {
                w.property_string("device_type", "cpu").unwrap()
            });
        });
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert_eq!(discover(&dtb).err(), Some(DtError::BadReg("a CPU node")));
}

#[test]
fn psci_conduits() {
    for (method, expected) in [("smc", Ok(Conduit::Smc)), ("hvc", Ok(Conduit::Hvc))] {
        let dtb = tree(|w| {
            memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
            cpus(w, 1);
            pl011(w, 0x900_0000, None);
            gicv3(w);
            psci(w, method);
        });
        assert_eq!(discover(&dtb).map(|p| p.psci.unwrap().conduit), expected);
    }
    let dtb = tree(|w| {
        complete(w);
        node(w, "firmware", |w| {
            node(w, "psci", |w| {
                w.property_string("compatible", "arm,psci").unwrap();
                w.property_string("method", "trap").unwrap();
            });
        });
    });
    // The first PSCI node decides; this tree's first one says "smc".
    assert_eq!(
        discover(&dtb).unwrap().psci,
        Some(Psci {
            conduit: Conduit::Smc
        })
    );
    let dtb = tree(|w| {
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        gicv3(w);
        psci(w, "trap");
    });
    assert_eq!(
        discover(&dtb).err(),
        Some(DtError::BadProperty("method of the PSCI node"))
    );
}

#[test]
fn memory_from_every_memory_node_sorted_and_merged() {
    let dtb = tree(|w| {
        memory(
            w,
            "memory@80000000",
            &[(0x8000_0000, 0x1000_0000), (0x1_0000_0000, 0)],
        );
        cpus(w, 1);
        // Not called "memory", still memory.
        memory(
            w,
            "ram@40000000",
            &[(0x4000_0000, 0x1000_0000), (0x5000_0000, 0x1000_0000)],
        );
        memory(w, "memory@48000000", &[(0x4800_0000, 0x1000_0000)]);
        memory(
            w,
            "memory@2000000000",
            &[(0x20_0000_0000, 0x4000_0000), (0x7000_0000, 0x1000_0000)],
        );
        // Adjacent to 0x8000_0000: merged.
        memory(w, "memory@90000000", &[(0x9000_0000, 0x1000)]);
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    let platform = discover(&dtb).unwrap();
    assert_eq!(
        platform.memory,
        ranges::<MAX_MEMORY_RANGES>(&[
            (0x4000_0000, 0x2000_0000),
            (0x7000_0000, 0x2000_1000),
            (0x20_0000_0000, 0x4000_0000),
        ])
    );
}

#[test]
fn memory_under_translating_bus() {
    let dtb = tree(|w| {
        node(w, "soc", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 1).unwrap();
            w.property_array_u32("ranges", &[0x0, 0x8, 0x0, 0x1000_0000])
                .unwrap();
            node(w, "memory@0", |w| {
                w.property_string("device_type", "memory").unwrap();
                w.property_array_u32("reg", &[0x0, 0x1000_0000]).unwrap();
            });
        });
        node(w, "isolated", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 1).unwrap();
            node(w, "memory@0", |w| {
                w.property_string("device_type", "memory").unwrap();
                w.property_array_u32("reg", &[0x0, 0x1000_0000]).unwrap();
            });
        });
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert_eq!(
        discover(&dtb).unwrap().memory,
        ranges::<MAX_MEMORY_RANGES>(&[(0x8_0000_0000, 0x1000_0000)])
    );
}

#[test]
fn too_many_ram_banks() {
    let banks: Vec<(u64, u64)> = (0..MAX_MEMORY_RANGES as u64 + 1)
        .map(|i| (0x1_0000_0000 * (i + 1), 0x1000_0000))
        .collect();
    let dtb = tree(|w| {
        memory(w, "memory@100000000", &banks);
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert_eq!(discover(&dtb).err(), Some(DtError::TooMany("RAM banks")));
    // The same number of banks that merge into one fits.
    let touching: Vec<(u64, u64)> = (0..MAX_MEMORY_RANGES as u64 + 8)
        .map(|i| (0x1000_0000 * (i + 1), 0x1000_0000))
        .collect();
    let dtb = tree(|w| {
        memory(w, "memory@10000000", &touching);
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert_eq!(discover(&dtb).unwrap().memory.len(), 1);
}

#[test]
fn malformed_memory_reg() {
    let overflowing = tree(|w| {
        memory(w, "memory@0", &[(0xffff_ffff_ffff_f000, 0x2000)]);
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert_eq!(
        discover(&overflowing).err(),
        Some(DtError::BadReg("a memory node"))
    );
    let odd_length = tree(|w| {
        node(w, "memory@0", |w| {
            w.property_string("device_type", "memory").unwrap();
            w.property_array_u32("reg", &[0, 0x4000_0000, 0]).unwrap();
        });
        cpus(w, 1);
        pl011(w, 0x900_0000, None);
        gicv3(w);
    });
    assert_eq!(
        discover(&odd_length).err(),
        Some(DtError::BadReg("a memory node"))
    );
}

#[test]
fn reservations() {
    let dtb = {
        let entries = [
            vm_fdt::FdtReserveEntry::new(0x4000_0000, 0x1000).unwrap(),
            vm_fdt::FdtReserveEntry::new(0x4800_0000, 0x20_0000).unwrap(),
        ];
        let mut w = FdtWriter::new_with_mem_reserv(&entries).unwrap();
        let root = w.begin_node("").unwrap();
        w.property_u32("#address-cells", 2).unwrap();
        w.property_u32("#size-cells", 2).unwrap();
        complete(&mut w);
        node(&mut w, "reserved-memory", |w| {
            w.property_u32("#address-cells", 2).unwrap();
            w.property_u32("#size-cells", 1).unwrap();
            w.property_null("ranges").unwrap();
            node(w, "tee@50000000", |w| {
                w.property_array_u32("reg", &[0, 0x5000_0000, 0x100_0000, 0, 0x5800_0000, 0x1000])
                    .unwrap();
                w.property_null("no-map").unwrap();
            });
            node(w, "pool", |w| {
                w.property_string("compatible", "shared-dma-pool").unwrap();
                w.property_u32("size", 0x400_0000).unwrap();
            });
            node(w, "off@60000000", |w| {
                w.property_array_u32("reg", &[0, 0x6000_0000, 0x1000])
                    .unwrap();
                w.property_string("status", "disabled").unwrap();
            });
            node(w, "empty@0", |w| {
                w.property_array_u32("reg", &[0, 0, 0]).unwrap();
            });
        });
        w.end_node(root).unwrap();
        w.finish().unwrap()
    };
    let platform = discover(&dtb).unwrap();
    assert_eq!(
        platform.reserved.as_slice(),
        &[
            range(0x4000_0000, 0x1000),
            range(0x4800_0000, 0x20_0000),
            range(0x5000_0000, 0x100_0000),
            range(0x5800_0000, 0x1000),
        ]
    );
}

#[test]
fn unreadable_reservation_is_an_error() {
    let dtb = tree(|w| {
        complete(w);
        node(w, "reserved-memory", |w| {
            w.property_u32("#address-cells", 2).unwrap();
            w.property_u32("#size-cells", 2).unwrap();
            w.property_null("ranges").unwrap();
            node(w, "broken@0", |w| {
                w.property_array_u32("reg", &[0, 0x5000_0000, 0]).unwrap()
            });
        });
    });
    assert_eq!(
        discover(&dtb).err(),
        Some(DtError::BadReg("a /reserved-memory child"))
    );
}

fn uart_of(
    stdout_path: Option<&str>,
    aliases: &[(&str, &str)],
    serials: impl FnOnce(&mut FdtWriter),
) -> Result<Uart, DtError> {
    let dtb = tree(|w| {
        node(w, "aliases", |w| {
            for (name, path) in aliases {
                w.property_string(name, path).unwrap();
            }
        });
        node(w, "chosen", |w| {
            if let Some(path) = stdout_path {
                w.property_string("stdout-path", path).unwrap();
            }
        });
        memory(w, "memory@40000000", &[(0x4000_0000, 0x4000_0000)]);
        cpus(w, 1);
        gicv3(w);
        serials(w);
    });
    let found = discover(&dtb).map(|platform| platform.uart);
    // The console the core starts with before discovery is the same one.
    assert_eq!(console_uart(&dtb), found.ok());
    found
}

fn three_pl011s(w: &mut FdtWriter) {
    pl011(w, 0x900_0000, Some("disabled"));
    pl011(w, 0x901_0000, None);
    pl011(w, 0x902_0000, Some("okay"));
}

#[test]
fn uart_without_stdout_path_is_the_first_enabled_pl011() {
    assert_eq!(
        uart_of(None, &[], three_pl011s),
        Ok(pl011_at(0x901_0000, 0x1000))
    );
}

#[test]
fn uart_named_by_stdout_path() {
    assert_eq!(
        uart_of(Some("/serial@9020000"), &[], three_pl011s),
        Ok(pl011_at(0x902_0000, 0x1000))
    );
    assert_eq!(
        uart_of(Some("/serial@9020000:115200n8"), &[], three_pl011s),
        Ok(pl011_at(0x902_0000, 0x1000))
    );
    assert_eq!(
        uart_of(
            Some("serial2:115200n8"),
            &[("serial2", "/serial@9020000")],
            three_pl011s
        ),
        Ok(pl011_at(0x902_0000, 0x1000))
    );
    assert_eq!(
        uart_of(
            Some("serial2"),
            &[("serial2", "/serial@9020000")],
            three_pl011s
        ),
        Ok(pl011_at(0x902_0000, 0x1000))
    );
}

#[test]
fn stdout_path_to_an_unusable_uart_falls_back() {
    // Disabled.
    assert_eq!(
        uart_of(Some("/serial@9000000"), &[], three_pl011s),
        Ok(pl011_at(0x901_0000, 0x1000))
    );
    // Missing.
    assert_eq!(
        uart_of(Some("/serial@1234"), &[], three_pl011s),
        Ok(pl011_at(0x901_0000, 0x1000))
    );
    // Unknown alias.
    assert_eq!(
        uart_of(Some("serial9"), &[], three_pl011s),
        Ok(pl011_at(0x901_0000, 0x1000))
    );
    // Not a PL011.
    let with_16550 = |w: &mut FdtWriter| {
        node(w, "serial@9100000", |w| {
            w.property_string("compatible", "ns16550a").unwrap();
            w.property_array_u64("reg", &[0x910_0000, 0x100]).unwrap();
        });
        three_pl011s(w);
    };
    assert_eq!(
        uart_of(Some("/serial@9100000"), &[], with_16550),
        Ok(pl011_at(0x901_0000, 0x1000))
    );
}

#[test]
fn uart_behind_buses() {
    let buses = |w: &mut FdtWriter| {
        // No ranges: not CPU-addressable, skipped although it comes first.
        node(w, "i2c-bridge", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 1).unwrap();
            node(w, "serial@1000", |w| {
                w.property_string("compatible", "arm,pl011").unwrap();
                w.property_array_u32("reg", &[0x1000, 0x1000]).unwrap();
            });
        });
        // Two levels: soc maps 0x7e000000 to 0xfe000000, sub identity-maps.
        node(w, "soc", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 1).unwrap();
            w.property_array_u32("ranges", &[0x7e00_0000, 0x0, 0xfe00_0000, 0x180_0000])
                .unwrap();
            node(w, "sub", |w| {
                w.property_u32("#address-cells", 1).unwrap();
                w.property_u32("#size-cells", 1).unwrap();
                w.property_null("ranges").unwrap();
                node(w, "serial@7e201000", |w| {
                    w.property_string("compatible", "arm,pl011").unwrap();
                    w.property_array_u32("reg", &[0x7e20_1000, 0x200]).unwrap();
                });
                // Outside every window of soc's ranges.
                node(w, "serial@10000000", |w| {
                    w.property_string("compatible", "arm,pl011").unwrap();
                    w.property_array_u32("reg", &[0x1000_0000, 0x200]).unwrap();
                });
            });
        });
    };
    assert_eq!(uart_of(None, &[], buses), Ok(pl011_at(0xfe20_1000, 0x200)));
    assert_eq!(
        uart_of(Some("/i2c-bridge/serial@1000"), &[], buses),
        Ok(pl011_at(0xfe20_1000, 0x200))
    );
    assert_eq!(
        uart_of(Some("/soc/sub/serial"), &[], buses),
        Ok(pl011_at(0xfe20_1000, 0x200))
    );
    assert_eq!(
        uart_of(Some("/soc/sub/serial@10000000"), &[], buses),
        Ok(pl011_at(0xfe20_1000, 0x200))
    );
}

#[test]
fn chosen_properties() {
    let chosen_with = |body: fn(&mut FdtWriter)| {
        let dtb = tree(|w| {
            complete(w);
            node(w, "chosen", body);
        });
        discover(&dtb).map(|platform| {
            (
                platform.chosen.bootargs.map(str::to_owned),
                platform.chosen.initrd,
            )
        })
    };
    assert_eq!(
        chosen_with(|w| {
            w.property_string("bootargs", "console=ttyAMA0 root=/dev/vda")
                .unwrap();
            w.property_u32("linux,initrd-start", 0x4800_0000).unwrap();
            w.property_u32("linux,initrd-end", 0x4880_0000).unwrap();
        }),
        Ok((
            Some("console=ttyAMA0 root=/dev/vda".into()),
            Some(range(0x4800_0000, 0x80_0000))
        ))
    );
    assert_eq!(
        chosen_with(|w| {
            w.property_u64("linux,initrd-start", 0x8_4800_0000).unwrap();
            w.property_u32("linux,initrd-end", 0x4880_0000).unwrap();
        }),
        Ok((None, None)),
        "an initrd that ends before it starts is no initrd"
    );
    assert_eq!(
        chosen_with(|w| {
            w.property_u64("linux,initrd-start", 0x8_4800_0000).unwrap();
            w.property_u64("linux,initrd-end", 0x8_4900_0000).unwrap();
        }),
        Ok((None, Some(range(0x8_4800_0000, 0x100_0000))))
    );
    assert_eq!(
        chosen_with(|w| w.property_u64("linux,initrd-start", 0x8_4800_0000).unwrap()),
        Ok((None, None))
    );
}

#[test]
fn devices_top_ignores_ram_cpus_and_reservations() {
    let dtb = tree(|w| {
        complete(w);
        // Inside RAM: not a device.
        node(w, "shm@48000000", |w| {
            w.property_array_u64("reg", &[0x4800_0000, 0x1000]).unwrap()
        });
        node(w, "reserved-memory", |w| {
            w.property_u32("#address-cells", 2).unwrap();
            w.property_u32("#size-cells", 2).unwrap();
            w.property_null("ranges").unwrap();
            node(w, "far@f000000000", |w| {
                w.property_array_u64("reg", &[0xf0_0000_0000, 0x1000])
                    .unwrap()
            });
        });
        // Straddles the end of RAM: counted.
        node(w, "odd@7ffff000", |w| {
            w.property_array_u64("reg", &[0x7fff_f000, 0x2000]).unwrap()
        });
        // No ranges on the parent: not CPU-addressable.
        node(w, "mdio", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 1).unwrap();
            node(w, "phy@ffffffff", |w| {
                w.property_array_u32("reg", &[0xffff_ffff, 0x1000]).unwrap()
            });
        });
    });
    assert_eq!(discover(&dtb).unwrap().devices_top(), 0x8000_1000);
}

/// A PCIe host bridge as QEMU's `virt` describes it: the ECAM in `reg`,
/// the I/O, 32-bit and 64-bit memory windows only in `ranges`.
#[test]
fn bus_windows_are_device_windows() {
    let dtb = tree(|w| {
        complete(w);
        node(w, "pcie@10000000", |w| {
            w.property_string("device_type", "pci").unwrap();
            w.property_u32("#address-cells", 3).unwrap();
            w.property_u32("#size-cells", 2).unwrap();
            w.property_array_u64("reg", &[0x40_1000_0000, 0x1000_0000])
                .unwrap();
            #[rustfmt::skip]
            w.property_array_u32("ranges", &[
                // I/O: PCI 0 at CPU 0x3eff0000, 64 KiB.
                0x0100_0000, 0, 0, 0, 0x3eff_0000, 0, 0x1_0000,
                // 32-bit memory, identity, 0x10000000 + 0x2eff0000.
                0x0200_0000, 0, 0x1000_0000, 0, 0x1000_0000, 0, 0x2eff_0000,
                // 64-bit memory at 512 GiB, 512 GiB long.
                0x0300_0000, 0x80, 0, 0x80, 0, 0x80, 0,
            ])
            .unwrap();
        });
        // A bus whose parent has no ranges: not CPU-addressable, not mapped.
        node(w, "i2c", |w| {
            w.property_u32("#address-cells", 1).unwrap();
            w.property_u32("#size-cells", 1).unwrap();
            node(w, "mux@50", |w| {
                w.property_u32("#address-cells", 1).unwrap();
                w.property_u32("#size-cells", 1).unwrap();
                w.property_array_u32("ranges", &[0, 0x7000_0000, 0x1000])
                    .unwrap();
            });
        });
    });
    let platform = discover(&dtb).unwrap();
    let has = |base: u64, size: u64| {
        platform
            .devices
            .iter()
            .any(|d| d.contains_range(&range(base, size)))
    };
    assert!(has(0x1000_0000, 0x2f00_0000), "{:x?}", platform.devices);
    assert!(has(0x40_1000_0000, 0x1000_0000));
    assert!(has(0x80_0000_0000, 0x80_0000_0000));
    assert!(!has(0x7000_0000, 0x1000));
    assert_eq!(platform.devices_top(), 0x100_0000_0000);
}

#[test]
fn errors_display_a_sentence() {
    let errors = [
        DtError::Truncated {
            available: 3,
            needed: 40,
        },
        DtError::BadMagic(0x1234_5678),
        DtError::Malformed("the structure block holds an unknown token"),
        DtError::NoMemory,
        DtError::TooMany("CPUs"),
        DtError::NoUart,
        DtError::NoGic,
        DtError::BadGic,
        DtError::NoCpus,
        DtError::BadReg("a memory node"),
        DtError::BadProperty("method of the PSCI node"),
    ];
    for error in errors {
        let text = error.to_string();
        assert!(text.len() > 20 && !text.ends_with('.'), "{text}");
    }
    assert_eq!(
        DtError::BadMagic(0x1234_5678).to_string(),
        "no device tree: magic is 0x12345678, expected 0xd00dfeed"
    );
}

/// Mutates `dtb` at random (byte flips, interesting words, header fields,
/// truncation) and checks that discovery returns instead of panicking.
fn fuzz(name: &str, dtb: &[u8], rounds: usize, seed: u64) -> (usize, usize) {
    // Mutations are aimed at the bytes that matter: header, reservation map,
    // structure and strings blocks (QEMU's virt trees are padded to 1 MiB).
    let used = (header(dtb, 3) + header(dtb, 8)) as usize;
    let interesting = [
        0u32,
        1,
        2,
        3,
        4,
        9,
        0xffff_ffff,
        0x8000_0000,
        0x7fff_ffff,
        40,
        used as u32,
    ];
    let values: Vec<(usize, usize)> = property_values(dtb)
        .into_iter()
        .filter(|&(_, len)| len > 0)
        .collect();
    let mut rng = XorShift(seed);
    let mut buffer = dtb.to_vec();
    let (mut accepted, mut refused) = (0, 0);
    for _ in 0..rounds {
        buffer.copy_from_slice(dtb);
        let mut len = buffer.len();
        for _ in 0..1 + rng.below(4) {
            match rng.below(8) {
                0 => {
                    let at = rng.below(used);
                    buffer[at] ^= 1 << rng.below(8);
                }
                1 => {
                    let at = rng.below(used);
                    buffer[at] = rng.next() as u8;
                }
                2 => {
                    let at = rng.below(used - 4) & !3;
                    let word = interesting[rng.below(interesting.len())];
                    buffer[at..at + 4].copy_from_slice(&word.to_be_bytes());
                }
                3 => {
                    let field = 1 + rng.below(9);
                    let word = interesting[rng.below(interesting.len())];
                    buffer[field * 4..field * 4 + 4].copy_from_slice(&word.to_be_bytes());
                }
                4 => len = rng.below(len + 1),
                5 | 6 => {
                    // Inside a property value: the structure stays valid and
                    // the reg, ranges, cells and string readers get the noise.
                    let (at, value_len) = values[rng.below(values.len())];
                    let at = at + rng.below(value_len);
                    buffer[at] = match rng.below(3) {
                        0 => 0,
                        1 => 0xff,
                        _ => rng.next() as u8,
                    };
                }
                _ => {
                    // A property length or name offset in the structure block.
                    let structs = header(dtb, 2) as usize;
                    let at = structs + (rng.below(used - structs - 8) & !3);
                    buffer[at..at + 4]
                        .copy_from_slice(&(rng.next() as u32 >> rng.below(32)).to_be_bytes());
                }
            }
        }
        match discover(&buffer[..len]) {
            Ok(_) => accepted += 1,
            Err(error) => {
                assert!(!error.to_string().is_empty());
                refused += 1;
            }
        }
    }
    eprintln!("{name}: {accepted} mutations accepted, {refused} refused");
    (accepted, refused)
}

/// Rounds per tree; `MOAT_FUZZ_ROUNDS` raises it for a longer run.
fn fuzz_rounds(default: usize) -> usize {
    std::env::var("MOAT_FUZZ_ROUNDS")
        .ok()
        .and_then(|rounds| rounds.parse().ok())
        .unwrap_or(default)
}

#[test]
fn mutated_real_trees_never_panic() {
    for (index, name) in REAL_TREES.iter().enumerate() {
        let dtb = load(name);
        let rounds = fuzz_rounds(2000);
        let (accepted, refused) = fuzz(name, &dtb, rounds, 0x9e37_79b9_7f4a_7c15 ^ index as u64);
        assert!(refused > 0, "{name}: no mutation was refused");
        if *name != "bcm2711-rpi-4-b.dtb" {
            assert!(accepted > 0, "{name}: every mutation was refused");
        }
    }
}

#[test]
fn mutated_small_trees_never_panic() {
    let dtb = with_nops(&tree(complete));
    fuzz("small tree with NOPs", &dtb, fuzz_rounds(10_000), 7);
}

/// The console read before discovery is the UART discovery picks, on every
/// real tree: on the Raspberry Pi 4, stdout-path names the mini UART (not a
/// PL011), so it is the first enabled PL011, uart0 at 0xfe201000.
#[test]
fn early_console_matches_discovery_on_real_trees() {
    for file in [
        "qemu-virt-gicv3.dtb",
        "qemu-virt-gicv2.dtb",
        "fvp-base-revc.dtb",
        "qemu-raspi4b.dtb",
        "bcm2711-rpi-4-b.dtb",
    ] {
        let dtb = load(file);
        let early = console_uart(&dtb).unwrap_or_else(|| panic!("{file}: no early console"));
        if let Ok(platform) = discover(&dtb) {
            assert_eq!(early, platform.uart, "{file}");
        }
    }
    assert_eq!(
        console_uart(&load("qemu-raspi4b.dtb")).map(|u| u.regs.base),
        Some(0xfe20_1000)
    );
    assert_eq!(console_uart(b"not a tree"), None);
}

#[test]
fn the_gicv3_its_frames_are_found() {
    let dtb = load("qemu-virt-gicv3.dtb");
    let its = moat_platform::dt::gic_its(&dtb).unwrap();
    assert_eq!(
        its.as_slice(),
        &[Range::new(0x0808_0000, 0x2_0000).unwrap()]
    );
    // A GICv2 machine has none.
    assert!(
        moat_platform::dt::gic_its(&load("qemu-virt-gicv2.dtb"))
            .unwrap()
            .is_empty()
    );
}
