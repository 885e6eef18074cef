//! Which devices can master DMA, and through what.
//!
//! Every device the host's stage-2 would map is put in one of three
//! classes ([`DmaClass`]): it cannot write memory on its own; it can, but
//! only through an SMMU the core owns (so only where the host itself may
//! write); or it can write any physical address. The core withholds the
//! last kind from the host unless the image names it, because such a
//! device is a way around every stage-2 the core keeps.
//!
//! What is a bus master is read from the tree: a PCI host bridge
//! (`device_type = "pci"`, whose endpoints master DMA) is behind the SMMU
//! when its `iommu-map` names it, and unprotected otherwise; a node whose
//! `iommus` names the SMMU is behind it; a DMA controller (`#dma-cells`)
//! and the devices of [`DMA_MASTERS`] (QEMU virt's, the Raspberry Pi 4's,
//! Arm FVP's) are unprotected. A bus master the list does not know is
//! taken for a device without DMA: the list is the part to extend for a
//! new board (see the book's DMA chapter).

use crate::dt::{DtError, Range, Tree, base_name, regs};
use crate::iommu::SmmuV3;

/// Most windows recorded per device.
pub const MAX_WINDOWS: usize = 8;

/// Compatible strings of devices that write memory by themselves, with no
/// SMMU on their path, on the boards Moat knows.
pub const DMA_MASTERS: [&str; 11] = [
    // QEMU virt (and FVP): a virtio-mmio transport's device reads and
    // writes its rings and buffers at any guest physical address.
    "virtio,mmio",
    // QEMU's fw_cfg: its DMA interface copies to any guest physical address.
    "qemu,fw-cfg-mmio",
    // Raspberry Pi 4: Ethernet, USB, the SD/eMMC controllers' own DMA, the
    // display pipeline (HVS reads, TXP writes back) and the V3D GPU.
    "brcm,bcm2711-genet-v5",
    "brcm,bcm2835-usb",
    "brcm,bcm2835-sdhci",
    "brcm,bcm2711-emmc2",
    "brcm,bcm2711-hvs",
    "brcm,bcm2835-txp",
    "brcm,2711-v3d",
    // Arm FVP: the CLCD and HDLCD display controllers read frame buffers.
    "arm,pl111",
    "arm,hdlcd",
];

/// Interrupt controllers that write memory themselves (GICv3 redistributors
/// and ITSs keep LPI tables in RAM the host names). Their rules are the
/// interrupt controller's, not this module's.
pub const INTERRUPT_CONTROLLERS: [&str; 3] = ["arm,gic-v3", "arm,gic-v3-its", "arm,gic-400"];

/// How a device can reach memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaClass {
    /// It does not master the bus: only the CPUs reach memory through it.
    NoDma,
    /// Its DMA goes through the SMMU the core owns, which translates with
    /// the host's own stage-2.
    BehindSmmu,
    /// It can write any physical address: no SMMU on its path.
    Unprotected,
    /// An interrupt controller: see [`INTERRUPT_CONTROLLERS`].
    InterruptController,
}

impl DmaClass {
    pub fn describe(self) -> &'static str {
        match self {
            DmaClass::NoDma => "no bus mastering",
            DmaClass::BehindSmmu => "DMA behind the SMMU the core owns",
            DmaClass::Unprotected => "DMA-capable without an SMMU",
            DmaClass::InterruptController => {
                "interrupt controller (a GICv3 keeps LPI tables in memory)"
            }
        }
    }
}

/// One device and the windows the host's stage-2 would map for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device<'a> {
    /// The node's name with its unit address (`virtio_mmio@a000000`).
    pub name: &'a str,
    pub class: DmaClass,
    /// Its `reg` entries and, for a bus, its `ranges` windows, as CPU
    /// physical addresses.
    pub windows: heapless::Vec<Range, MAX_WINDOWS>,
}

impl Device<'_> {
    /// Whether the image's `unprotected-dma` list names this device: by
    /// its full name or by its name without the unit address.
    pub fn named_in(&self, names: &str) -> bool {
        names
            .lines()
            .map(str::trim)
            .any(|n| !n.is_empty() && (n == self.name || n == base_name(self.name)))
    }
}

/// Classifies every available device node that has MMIO (a `reg` or bus
/// `ranges`) and hands each to `each`, in tree order. `smmu` is the SMMU
/// the core owns, if any.
pub fn classify<'a>(
    dtb: &'a [u8],
    smmu: Option<&SmmuV3>,
    mut each: impl FnMut(Device<'a>),
) -> Result<(), DtError> {
    let tree = Tree::open(dtb)?;
    let phandle = smmu.and_then(|s| s.phandle);
    let mut skip_below: Option<usize> = None;
    tree.walk(|ancestors, node| {
        let depth = ancestors.len();
        if depth == 0 {
            return Ok(());
        }
        if let Some(d) = skip_below {
            if depth > d {
                return Ok(());
            }
            skip_below = None;
        }
        let top = base_name(ancestors.get(1).map_or(node.name, |l| l.name));
        if matches!(
            top,
            "cpus" | "memory" | "reserved-memory" | "chosen" | "aliases"
        ) || node.property("device_type") == Some(b"memory\0")
        {
            return Ok(());
        }
        if !node.is_available() {
            // Nothing below a disabled node is in use either.
            skip_below = Some(depth);
            return Ok(());
        }
        if node.is_compatible(&crate::iommu::SMMU_V3_COMPATIBLE) {
            // The core's own.
            return Ok(());
        }
        let points_at_smmu = |property: &str, stride: usize, at: usize| {
            phandle.is_some_and(|p| {
                node.property(property).is_some_and(|v| {
                    v.len().is_multiple_of(stride)
                        && v.chunks_exact(stride).any(|e| {
                            e.get(at..at + 4)
                                .and_then(|b| b.try_into().ok())
                                .map(u32::from_be_bytes)
                                == Some(p)
                        })
                })
            })
        };
        let pci = node.property("device_type") == Some(b"pci\0");
        let class = if node.is_compatible(&INTERRUPT_CONTROLLERS) {
            DmaClass::InterruptController
        } else if points_at_smmu("iommu-map", 16, 4) || points_at_smmu("iommus", 8, 0) {
            DmaClass::BehindSmmu
        } else if pci || node.is_compatible(&DMA_MASTERS) || node.property("#dma-cells").is_some() {
            DmaClass::Unprotected
        } else {
            DmaClass::NoDma
        };
        let mut windows = heapless::Vec::new();
        if let Ok(Some(r)) = regs(ancestors, node) {
            for (base, size) in r.flatten() {
                if let Some(range) = Range::new(base, size) {
                    let _ = windows.push(range);
                }
            }
        }
        if pci {
            // A bridge's windows are where its endpoints' BARs go.
            for (base, size) in crate::dt::bus_windows(ancestors, node) {
                if let Some(range) = Range::new(base, size) {
                    let _ = windows.push(range);
                }
            }
            // Its children are functions, not MMIO of their own.
            skip_below = Some(depth);
        }
        if windows.is_empty() {
            return Ok(());
        }
        each(Device {
            name: node.name,
            class,
            windows,
        });
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iommu::find_smmu_v3;

    fn all<'a>(dtb: &'a [u8], smmu: Option<&SmmuV3>) -> Vec<Device<'a>> {
        let mut out = Vec::new();
        classify(dtb, smmu, |d| out.push(d)).unwrap();
        out
    }

    fn class_of<'a>(devices: &'a [Device<'a>], name: &str) -> Vec<DmaClass> {
        devices
            .iter()
            .filter(|d| base_name(d.name) == name)
            .map(|d| d.class)
            .collect()
    }

    #[test]
    fn qemu_virt_without_an_smmu() {
        let dtb = include_bytes!("../testdata/qemu-virt-gicv3.dtb");
        let devices = all(dtb, None);
        let virtio = class_of(&devices, "virtio_mmio");
        assert_eq!(virtio.len(), 32);
        assert!(virtio.iter().all(|c| *c == DmaClass::Unprotected));
        assert_eq!(class_of(&devices, "fw-cfg"), [DmaClass::Unprotected]);
        assert_eq!(class_of(&devices, "pcie"), [DmaClass::Unprotected]);
        assert_eq!(class_of(&devices, "pl011"), [DmaClass::NoDma]);
        assert_eq!(class_of(&devices, "pl031"), [DmaClass::NoDma]);
        assert_eq!(class_of(&devices, "intc"), [DmaClass::InterruptController]);
        // The PCIe bridge: ECAM, then the I/O, 32-bit and 64-bit windows.
        let pcie = devices.iter().find(|d| d.name == "pcie@10000000").unwrap();
        assert_eq!(pcie.windows.len(), 4);
        assert!(
            pcie.windows
                .contains(&Range::new(0x80_0000_0000, 0x80_0000_0000).unwrap())
        );
    }

    #[test]
    fn qemu_virt_with_the_smmu_the_core_owns() {
        let dtb = include_bytes!("../testdata/qemu-virt-smmuv3.dtb");
        let smmu = find_smmu_v3(dtb).unwrap();
        let devices = all(dtb, smmu.as_ref());
        assert_eq!(class_of(&devices, "pcie"), [DmaClass::BehindSmmu]);
        assert_eq!(class_of(&devices, "fw-cfg"), [DmaClass::Unprotected]);
        assert!(class_of(&devices, "smmuv3").is_empty());
        // Without the core owning it, the same bridge is unprotected.
        let devices = all(dtb, None);
        assert_eq!(class_of(&devices, "pcie"), [DmaClass::Unprotected]);
    }

    #[test]
    fn raspberry_pi_4() {
        let dtb = include_bytes!("../testdata/bcm2711-rpi-4-b.dtb");
        let devices = all(dtb, None);
        for unprotected in ["pcie", "ethernet", "usb", "dma", "mmc", "gpu", "hvs", "txp"] {
            let classes = class_of(&devices, unprotected);
            assert!(
                classes.contains(&DmaClass::Unprotected),
                "{unprotected}: {classes:?}"
            );
        }
        assert_eq!(class_of(&devices, "serial")[0], DmaClass::NoDma);
        assert_eq!(
            class_of(&devices, "interrupt-controller")[0],
            DmaClass::InterruptController
        );
    }

    #[test]
    fn fvp() {
        let dtb = include_bytes!("../testdata/fvp-base-revc.dtb");
        let smmu = find_smmu_v3(dtb).unwrap();
        let devices = all(dtb, smmu.as_ref());
        assert_eq!(class_of(&devices, "pci"), [DmaClass::BehindSmmu]);
        assert!(
            class_of(&devices, "virtio")
                .iter()
                .all(|c| *c == DmaClass::Unprotected)
        );
        assert_eq!(class_of(&devices, "clcd"), [DmaClass::Unprotected]);
        assert_eq!(class_of(&devices, "ethernet"), [DmaClass::NoDma]);
    }

    #[test]
    fn the_image_names_devices_by_name_or_full_name() {
        let d = Device {
            name: "virtio_mmio@a000000",
            class: DmaClass::Unprotected,
            windows: heapless::Vec::new(),
        };
        assert!(d.named_in("pcie\nvirtio_mmio"));
        assert!(d.named_in("virtio_mmio@a000000"));
        assert!(!d.named_in("virtio_mmio@a000200\nvirtio"));
        assert!(!d.named_in(""));
    }
}
