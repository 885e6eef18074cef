//! IOMMU discovery: the SMMUv3 the core takes for itself, and which streams
//! of which devices go through it.
//!
//! An `arm,smmu-v3` node gives the SMMU's register frames (its first `reg`).
//! Bus masters name their streams in two ways: a PCIe host bridge's
//! `iommu-map` turns requester IDs into stream IDs (`<rid-base &smmu
//! sid-base length>` entries, one specifier cell), and a platform device's
//! `iommus` names its stream IDs directly (`<&smmu sid>`). Discovery keeps
//! the streams that point at the SMMU it found, so the core can give each
//! of them a stream-table entry. Like [`crate::dt::discover`] it never
//! allocates and never panics on malformed input.

use crate::dt::{DtError, Range, Tree, regs};

/// Most stream ranges recorded for one SMMU.
pub const MAX_STREAM_RANGES: usize = 16;

/// Compatible strings of an SMMUv3.
pub const SMMU_V3_COMPATIBLE: [&str; 1] = ["arm,smmu-v3"];

/// A run of stream IDs that reach the SMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamRange {
    /// The first stream ID.
    pub first: u32,
    /// How many stream IDs, at least one.
    pub count: u32,
    /// For a PCIe `iommu-map`: the requester ID of the first stream.
    pub first_rid: Option<u32>,
}

impl StreamRange {
    /// One past the last stream ID (saturating at 2^32).
    pub fn end(&self) -> u64 {
        u64::from(self.first) + u64::from(self.count)
    }
}

/// An SMMUv3 the device tree describes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmmuV3 {
    /// The register frames (page 0 and page 1: 128 KiB on every known part).
    pub regs: Range,
    /// The streams bus masters use, in tree order.
    pub streams: heapless::Vec<StreamRange, MAX_STREAM_RANGES>,
    /// The node's phandle, which bus masters name it by.
    pub phandle: Option<u32>,
}

impl SmmuV3 {
    /// One past the highest stream ID a bus master uses (0 when none does).
    pub fn streams_end(&self) -> u64 {
        self.streams.iter().map(StreamRange::end).max().unwrap_or(0)
    }
}

/// Finds the first available SMMUv3 and the streams that point at it.
/// `Ok(None)` when the tree has none (or only disabled ones).
pub fn find_smmu_v3(dtb: &[u8]) -> Result<Option<SmmuV3>, DtError> {
    let tree = Tree::open(dtb)?;
    let mut found: Option<(Range, Option<u32>)> = None;
    tree.walk(|ancestors, node| {
        if found.is_some() || !node.is_compatible(&SMMU_V3_COMPATIBLE) || !node.is_available() {
            return Ok(());
        }
        let first = regs(ancestors, node)
            .ok()
            .flatten()
            .and_then(|mut r| r.next())
            .and_then(Result::ok)
            .ok_or(DtError::BadReg("the SMMUv3 node"))?;
        let range = Range::new(first.0, first.1).ok_or(DtError::BadReg("the SMMUv3 node"))?;
        let phandle = node
            .property("phandle")
            .or_else(|| node.property("linux,phandle"))
            .and_then(cell);
        found = Some((range, phandle));
        Ok(())
    })?;
    let Some((regs, phandle)) = found else {
        return Ok(None);
    };
    let mut smmu = SmmuV3 {
        regs,
        streams: heapless::Vec::new(),
        phandle,
    };
    let Some(phandle) = phandle else {
        // Nothing can point at an SMMU without a phandle.
        return Ok(Some(smmu));
    };
    const TOO_MANY: DtError = DtError::TooMany("SMMU stream ranges");
    tree.walk(|_, node| {
        if !node.is_available() {
            return Ok(());
        }
        if let Some(map) = node.property("iommu-map") {
            if !map.len().is_multiple_of(16) {
                return Err(DtError::BadProperty(
                    "an iommu-map is not <rid phandle sid length> entries",
                ));
            }
            for entry in map.chunks_exact(16) {
                let word = |i: usize| {
                    u32::from_be_bytes([entry[i], entry[i + 1], entry[i + 2], entry[i + 3]])
                };
                let (rid, target, sid, length) = (word(0), word(4), word(8), word(12));
                if target != phandle || length == 0 {
                    continue;
                }
                // Stream IDs are 32 bits: a range past the last one is no
                // range any bus master can use.
                if u64::from(sid) + u64::from(length) > 1 << 32 {
                    return Err(DtError::BadProperty(
                        "an iommu-map entry runs past the last stream ID",
                    ));
                }
                let range = StreamRange {
                    first: sid,
                    count: length,
                    first_rid: Some(rid),
                };
                smmu.streams.push(range).map_err(|_| TOO_MANY)?;
            }
        }
        if let Some(iommus) = node.property("iommus")
            && iommus.len().is_multiple_of(8)
        {
            for entry in iommus.chunks_exact(8) {
                let target = u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]);
                let sid = u32::from_be_bytes([entry[4], entry[5], entry[6], entry[7]]);
                if target == phandle {
                    let range = StreamRange {
                        first: sid,
                        count: 1,
                        first_rid: None,
                    };
                    smmu.streams.push(range).map_err(|_| TOO_MANY)?;
                }
            }
        }
        Ok(())
    })?;
    Ok(Some(smmu))
}

fn cell(value: &[u8]) -> Option<u32> {
    let bytes: [u8; 4] = value.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qemu_virt_smmuv3_covers_every_pcie_requester() {
        let dtb = include_bytes!("../testdata/qemu-virt-smmuv3.dtb");
        let smmu = find_smmu_v3(dtb).unwrap().unwrap();
        assert_eq!(smmu.regs, Range::new(0x905_0000, 0x2_0000).unwrap());
        assert_eq!(
            smmu.streams.as_slice(),
            &[StreamRange {
                first: 0,
                count: 0x1_0000,
                first_rid: Some(0)
            }]
        );
        assert_eq!(smmu.streams_end(), 0x1_0000);
    }

    /// A tree with an SMMUv3 (phandle 1) and a PCIe node whose
    /// `iommu-map` is `<0 1 sid length>`.
    fn tree_with_iommu_map(sid: u32, length: u32) -> Vec<u8> {
        let mut fdt = vm_fdt::FdtWriter::new().unwrap();
        let root = fdt.begin_node("").unwrap();
        fdt.property_u32("#address-cells", 2).unwrap();
        fdt.property_u32("#size-cells", 2).unwrap();
        let smmu = fdt.begin_node("smmuv3@9050000").unwrap();
        fdt.property_string("compatible", "arm,smmu-v3").unwrap();
        fdt.property_array_u64("reg", &[0x905_0000, 0x2_0000])
            .unwrap();
        fdt.property_u32("phandle", 1).unwrap();
        fdt.end_node(smmu).unwrap();
        let pcie = fdt.begin_node("pcie@10000000").unwrap();
        fdt.property_array_u32("iommu-map", &[0, 1, sid, length])
            .unwrap();
        fdt.end_node(pcie).unwrap();
        fdt.end_node(root).unwrap();
        fdt.finish().unwrap()
    }

    #[test]
    fn an_iommu_map_past_the_last_stream_id_is_refused() {
        // The last stream ID itself is fine; one more is not, nor a
        // length that wraps 32 bits (found by the `dt_discover` fuzzer).
        let last = find_smmu_v3(&tree_with_iommu_map(u32::MAX, 1))
            .unwrap()
            .unwrap();
        assert_eq!(last.streams_end(), 1 << 32);
        for (sid, length) in [(u32::MAX, 2), (u32::MAX, 0xffff_6400), (2, u32::MAX)] {
            assert!(
                matches!(
                    find_smmu_v3(&tree_with_iommu_map(sid, length)),
                    Err(DtError::BadProperty(_))
                ),
                "sid {sid:#x} length {length:#x}"
            );
        }
    }

    #[test]
    fn fvp_has_an_smmuv3_in_front_of_its_pcie() {
        let dtb = include_bytes!("../testdata/fvp-base-revc.dtb");
        let smmu = find_smmu_v3(dtb).unwrap().unwrap();
        assert_eq!(smmu.regs, Range::new(0x2b40_0000, 0x10_0000).unwrap());
        assert_eq!(smmu.streams_end(), 0x1_0000);
    }

    #[test]
    fn boards_without_an_smmuv3_have_none() {
        for dtb in [
            &include_bytes!("../testdata/qemu-virt-gicv3.dtb")[..],
            include_bytes!("../testdata/qemu-raspi4b.dtb"),
            include_bytes!("../testdata/bcm2711-rpi-4-b.dtb"),
        ] {
            assert_eq!(find_smmu_v3(dtb).unwrap(), None);
        }
    }
}
