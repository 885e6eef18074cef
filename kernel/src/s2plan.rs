//! What the host's stage-2 maps: an identity map of the RAM and devices the
//! host may use, with the core's memory and the core's own devices absent.
//!
//! RAM is mapped as normal memory (the host's stage-1 attributes decide the
//! final type), everything else below the top of the devices the device tree
//! names is mapped as Device-nGnRE and never executable. Holes are left for
//! the carve-out and for MMIO the core keeps (a GICv2 hypervisor interface).

use moat_platform::dt::Range;

/// Most regions a plan holds.
pub const MAX_REGIONS: usize = 64;

/// How a region is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    /// Normal memory, read/write/execute.
    Ram,
    /// Device-nGnRE, read/write, never execute.
    Device,
}

/// One region of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub range: Range,
    pub kind: RegionKind,
}

/// Why a plan failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlanError {
    /// More pieces than [`MAX_REGIONS`].
    TooManyRegions,
}

/// `[start, end)` minus every range in `holes`, appended to `out` as `kind`.
fn push_minus_holes(
    out: &mut heapless::Vec<Region, MAX_REGIONS>,
    start: u64,
    end: u64,
    holes: &[Range],
    kind: RegionKind,
) -> Result<(), PlanError> {
    let mut cursor = start;
    while cursor < end {
        // The first hole that starts before `end` and ends after `cursor`.
        let next_hole = holes
            .iter()
            .filter(|h| h.end() > cursor && h.base < end)
            .min_by_key(|h| h.base);
        let piece_end = match next_hole {
            Some(h) if h.base <= cursor => {
                cursor = h.end();
                continue;
            }
            Some(h) => h.base,
            None => end,
        };
        if let Some(range) = Range::new(cursor, piece_end - cursor) {
            out.push(Region { range, kind })
                .map_err(|_| PlanError::TooManyRegions)?;
        }
        cursor = piece_end;
    }
    Ok(())
}

/// Plans the host's stage-2.
///
/// * `ram`: the RAM banks, sorted and disjoint.
/// * `withheld`: memory and MMIO the host must not reach (carve-out, core devices).
/// * `device_top`: one past the highest device address to map.
/// * `ipa_limit`: one past the highest IPA the stage-2 can translate.
pub fn host_regions(
    ram: &[Range],
    withheld: &[Range],
    device_top: u64,
    ipa_limit: u64,
) -> Result<heapless::Vec<Region, MAX_REGIONS>, PlanError> {
    let mut out = heapless::Vec::new();
    // Devices: everything below `device_top` that is not RAM. RAM banks are
    // holes in the device window, and so is anything withheld.
    let top = device_top.min(ipa_limit);
    let mut device_holes: heapless::Vec<Range, { MAX_REGIONS * 2 }> = heapless::Vec::new();
    for r in ram.iter().chain(withheld) {
        device_holes
            .push(*r)
            .map_err(|_| PlanError::TooManyRegions)?;
    }
    push_minus_holes(&mut out, 0, top, &device_holes, RegionKind::Device)?;
    for bank in ram {
        let end = bank.end().min(ipa_limit);
        push_minus_holes(&mut out, bank.base, end, withheld, RegionKind::Ram)?;
    }
    out.sort_unstable_by_key(|r| r.range.base);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(base: u64, size: u64) -> Range {
        Range::new(base, size).unwrap()
    }

    #[test]
    fn qemu_virt_layout() {
        let ram = [r(0x4000_0000, 0x4000_0000)];
        let carve = r(0x4020_0000, 0x120_0000);
        let plan = host_regions(&ram, &[carve], 0x100_0000_0000, 1 << 48).unwrap();
        assert_eq!(
            plan.as_slice(),
            &[
                Region {
                    range: r(0, 0x4000_0000),
                    kind: RegionKind::Device
                },
                Region {
                    range: r(0x4000_0000, 0x20_0000),
                    kind: RegionKind::Ram
                },
                Region {
                    range: r(0x4140_0000, 0x3ec0_0000),
                    kind: RegionKind::Ram
                },
                Region {
                    range: r(0x8000_0000, 0x100_0000_0000 - 0x8000_0000),
                    kind: RegionKind::Device
                },
            ]
        );
    }

    #[test]
    fn withheld_mmio_punches_the_device_window() {
        let ram = [r(0x4000_0000, 0x1000_0000)];
        let gich = r(0x0803_0000, 0x1_0000);
        let plan = host_regions(&ram, &[gich], 0x4000_0000, 1 << 40).unwrap();
        assert_eq!(plan[0].range, r(0, 0x0803_0000));
        assert_eq!(plan[1].range, r(0x0804_0000, 0x4000_0000 - 0x0804_0000));
        assert_eq!(plan[2].range, ram[0]);
        assert_eq!(plan.len(), 3);
    }

    #[test]
    fn nothing_withheld_is_ever_mapped() {
        let ram = [r(0x8000_0000, 0x8000_0000), r(0x8_8000_0000, 0x8000_0000)];
        let withheld = [
            r(0x8100_0000, 0x200_0000),
            r(0x1c09_0000, 0x1000),
            r(0x8_8000_0000, 0x1000),
        ];
        let plan = host_regions(&ram, &withheld, 0x10_0000_0000, 1 << 44).unwrap();
        for region in &plan {
            for w in &withheld {
                assert!(!region.range.overlaps(w), "{region:?} overlaps {w:?}");
            }
        }
        // RAM is covered except the withheld parts.
        let ram_mapped: u64 = plan
            .iter()
            .filter(|r| r.kind == RegionKind::Ram)
            .map(|r| r.range.size)
            .sum();
        assert_eq!(ram_mapped, 0x1_0000_0000 - 0x200_0000 - 0x1000);
    }

    #[test]
    fn ipa_limit_caps_the_map() {
        let ram = [r(0x4000_0000, 0x4000_0000)];
        let plan = host_regions(&ram, &[], 1 << 45, 1 << 40).unwrap();
        assert!(plan.iter().all(|r| r.range.end() <= 1 << 40));
    }
}
