//! Every device the host is handed, accounted for.
//!
//! At boot each device of the device tree is classified
//! (`moat_platform::devices`): no bus mastering, DMA behind the SMMU the
//! core owns, or DMA-capable without an SMMU. The last kind can write any
//! physical address, the core's memory and every VM's among them, so it is
//! withheld from the host (its windows left out of the host's stage-2 and
//! its node disabled in the host's device tree) unless the image names it
//! (`unprotected-dma` in the manifest). The boot log says, device by
//! device, which class it is in and what was done.

use alloc::vec::Vec;
use moat_platform::devices::{self, Device, DmaClass};
use moat_platform::dt::{DtError, Range};
use moat_platform::iommu::SmmuV3;

/// What the host does not get.
#[derive(Default)]
pub struct Withheld {
    /// The withheld devices' windows (as the tree gives them).
    pub windows: Vec<Range>,
    /// Their node names, to disable in the host's tree.
    pub names: Vec<&'static str>,
}

/// Classifies the devices of `dtb`, logs each decision and returns what
/// the host must not be given. `named` is the image's list of
/// DMA-capable devices the host gets anyway.
pub fn decide(dtb: &'static [u8], smmu: Option<&SmmuV3>, named: &str) -> Result<Withheld, DtError> {
    let mut withheld = Withheld::default();
    // Devices of one name and class in a row are logged once.
    let mut run: Option<(Device<'static>, &'static str, usize)> = None;
    let flush = |run: &mut Option<(Device<'static>, &'static str, usize)>| {
        if let Some((d, done, n)) = run.take() {
            let base = d.windows.first().map_or(0, |w| w.base);
            if n > 1 {
                crate::log!(
                    "device {} at {base:#x} and {} more like it: {}: {done}",
                    d.name,
                    n - 1,
                    d.class.describe()
                );
            } else {
                crate::log!(
                    "device {} at {base:#x}: {}: {done}",
                    d.name,
                    d.class.describe()
                );
            }
        }
    };
    devices::classify(dtb, smmu, |d| {
        let done = match d.class {
            DmaClass::Unprotected if d.named_in(named) => {
                "given to the host because the image names it; its DMA is NOT confined"
            }
            DmaClass::Unprotected => {
                withheld.windows.extend(d.windows.iter().copied());
                withheld.names.push(d.name);
                "WITHHELD from the host (the image does not name it)"
            }
            DmaClass::BehindSmmu => "given to the host; its DMA goes through the host's stage-2",
            DmaClass::NoDma => "given to the host",
            // What the host may reach of it is the interrupt controller's
            // business (the ITS and LPI rules), not this table's.
            DmaClass::InterruptController => "left to the interrupt controller's own rules",
        };
        let same = run.as_ref().is_some_and(|(r, rdone, _)| {
            r.class == d.class
                && *rdone == done
                && moat_platform::dt::base_name(r.name) == moat_platform::dt::base_name(d.name)
        });
        if same {
            if let Some((_, _, n)) = run.as_mut() {
                *n += 1;
            }
        } else {
            flush(&mut run);
            run = Some((d, done, 1));
        }
    })?;
    flush(&mut run);
    Ok(withheld)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// QEMU's virt board: virtio-mmio transports master the bus and no
    /// SMMU sits in front of them.
    static VIRT: &[u8] = include_bytes!("../../../platform/testdata/qemu-virt-gicv3.dtb");

    #[test]
    fn dma_capable_devices_without_an_smmu_are_withheld_unless_named() {
        let withheld = decide(VIRT, None, "").unwrap();
        // fw-cfg, the 32 virtio-mmio transports and the PCIe host bridge.
        assert_eq!(withheld.names.len(), 34);
        assert_eq!(withheld.names[0], "fw-cfg@9020000");
        assert_eq!(withheld.names[1], "virtio_mmio@a000000");
        assert_eq!(withheld.names[33], "pcie@10000000");
        assert!(withheld.windows.len() >= withheld.names.len());
        assert!(withheld.windows.iter().any(|w| w.base == 0xa00_0000));
        // A run of like devices is one log line; what is given is logged too.
        let lines = crate::arch::take_lines();
        assert!(
            lines.contains(
                &"moat: device virtio_mmio@a000000 at 0xa000000 and 31 more like it: \
              DMA-capable without an SMMU: WITHHELD from the host (the image does not name it)"
                    .to_string()
            ),
            "{lines:?}"
        );
        assert!(
            lines.contains(
                &"moat: device pl011@9000000 at 0x9000000: no bus mastering: given to the host"
                    .to_string()
            ),
            "{lines:?}"
        );

        // Named by the image: handed over, and the log says so.
        let given = decide(VIRT, None, "virtio_mmio").unwrap();
        assert_eq!(given.names, ["fw-cfg@9020000", "pcie@10000000"]);
        assert!(
            crate::arch::take_lines()
                .iter()
                .any(|l| l.contains("virtio_mmio") && l.contains("NOT confined"))
        );
    }

    #[test]
    fn a_tree_that_does_not_parse_is_an_error() {
        assert!(decide(&[0u8; 64], None, "").is_err());
    }
}
