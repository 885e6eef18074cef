//! What the host's stage-2 maps: an identity map of the RAM and devices the
//! device tree describes, with the core's memory and the core's own devices
//! absent.
//!
//! RAM is mapped as normal memory (the host's stage-1 attributes decide the
//! final type). Every device window the tree describes — each node's `reg`
//! and each bus's `ranges`, among them the PCIe windows where the host puts
//! the BARs it assigns — is mapped as Device-nGnRE and never executable,
//! rounded out to whole pages. Nothing else is: an address the tree does
//! not describe is not the host's to touch. Holes are left for the
//! carve-out and for MMIO the core keeps (a GICv2 hypervisor interface);
//! what lies beyond the IPA size the CPU allows is reported, not mapped.

use moat_platform::dt::Range;

/// Most regions a plan holds.
pub const MAX_REGIONS: usize = 128;

/// The stage-2 granule: device windows are rounded out to it.
const PAGE: u64 = 4096;

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

/// The host's stage-2 plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPlan {
    /// What is mapped, sorted by base.
    pub regions: heapless::Vec<Region, MAX_REGIONS>,
    /// The part of the described address space at or above the IPA limit
    /// (from the limit to the top of the highest window), if any: not
    /// mapped, because the CPU cannot translate it.
    pub beyond_ipa: Option<Range>,
}

/// Plans the host's stage-2.
///
/// * `ram`: the RAM banks, sorted and disjoint.
/// * `devices`: the device windows the device tree describes, sorted.
/// * `withheld`: memory and MMIO the host must not reach (carve-out, core devices).
/// * `ipa_limit`: one past the highest IPA the stage-2 can translate.
pub fn host_regions(
    ram: &[Range],
    devices: &[Range],
    withheld: &[Range],
    ipa_limit: u64,
) -> Result<HostPlan, PlanError> {
    let mut out = heapless::Vec::new();
    // RAM banks are holes in the device windows, and so is anything withheld.
    let mut device_holes: heapless::Vec<Range, { MAX_REGIONS * 2 }> = heapless::Vec::new();
    for r in ram.iter().chain(withheld) {
        device_holes
            .push(*r)
            .map_err(|_| PlanError::TooManyRegions)?;
    }
    // Whole pages: a window of 0x18 bytes needs its page mapped. Windows
    // that share a page after rounding are mapped once.
    let mut pages: heapless::Vec<(u64, u64), MAX_REGIONS> = heapless::Vec::new();
    let mut top = 0;
    for window in devices {
        let start = window.base & !(PAGE - 1);
        let end = window
            .end()
            .checked_next_multiple_of(PAGE)
            .unwrap_or(!(PAGE - 1));
        top = top.max(end);
        match pages.last_mut() {
            Some((_, e)) if start <= *e => *e = (*e).max(end),
            _ => pages
                .push((start, end))
                .map_err(|_| PlanError::TooManyRegions)?,
        }
    }
    for (start, end) in pages {
        let end = end.min(ipa_limit);
        push_minus_holes(&mut out, start, end, &device_holes, RegionKind::Device)?;
    }
    for bank in ram {
        let end = bank.end().min(ipa_limit);
        top = top.max(bank.end());
        push_minus_holes(&mut out, bank.base, end, withheld, RegionKind::Ram)?;
    }
    out.sort_unstable_by_key(|r| r.range.base);
    Ok(HostPlan {
        regions: out,
        beyond_ipa: top
            .checked_sub(ipa_limit)
            .and_then(|size| Range::new(ipa_limit, size)),
    })
}

/// `windows` rounded out to whole pages, sorted, with overlapping or
/// touching pieces merged: what the host loses when a device is withheld
/// (a page shared with a withheld device is withheld too).
pub fn whole_pages(windows: &[Range]) -> Result<heapless::Vec<Range, MAX_REGIONS>, PlanError> {
    let mut out: heapless::Vec<Range, MAX_REGIONS> = heapless::Vec::new();
    for w in windows {
        let start = w.base & !(PAGE - 1);
        let end = w
            .end()
            .checked_next_multiple_of(PAGE)
            .unwrap_or(!(PAGE - 1));
        if let Some(r) = Range::new(start, end - start) {
            out.push(r).map_err(|_| PlanError::TooManyRegions)?;
        }
    }
    out.sort_unstable_by_key(|r| r.base);
    let mut merged: heapless::Vec<Range, MAX_REGIONS> = heapless::Vec::new();
    for r in out {
        match merged.last_mut() {
            Some(last) if r.base <= last.end() => {
                let end = last.end().max(r.end());
                last.size = end - last.base;
            }
            _ => merged.push(r).map_err(|_| PlanError::TooManyRegions)?,
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(base: u64, size: u64) -> Range {
        Range::new(base, size).unwrap()
    }

    /// QEMU virt's device windows, as discovery finds them in its tree.
    fn virt_devices() -> heapless::Vec<Range, { moat_platform::dt::MAX_DEVICE_WINDOWS }> {
        let dtb = include_bytes!("../../platform/testdata/qemu-virt-gicv3.dtb");
        moat_platform::dt::discover(dtb).unwrap().devices
    }

    fn device(base: u64, size: u64) -> Region {
        Region {
            range: r(base, size),
            kind: RegionKind::Device,
        }
    }

    #[test]
    fn withheld_devices_cover_whole_pages() {
        // Two virtio-mmio transports in one page, fw-cfg's 0x18 bytes.
        let windows = [
            r(0xa00_0200, 0x200),
            r(0x902_0000, 0x18),
            r(0xa00_0000, 0x200),
            r(0xa00_0e00, 0x400),
        ];
        assert_eq!(
            whole_pages(&windows).unwrap().as_slice(),
            &[r(0x902_0000, 0x1000), r(0xa00_0000, 0x2000)]
        );
        // Withheld, they are holes in the host's plan.
        let ram = [r(0x4000_0000, 0x4000_0000)];
        let held = whole_pages(&windows).unwrap();
        let plan = host_regions(&ram, &virt_devices(), &held, 1 << 48).unwrap();
        for region in &plan.regions {
            for w in &held {
                assert!(!region.range.overlaps(w), "{region:?} overlaps {w:?}");
            }
        }
    }

    #[test]
    fn qemu_virt_layout() {
        let ram = [r(0x4000_0000, 0x4000_0000)];
        let carve = r(0x4020_0000, 0x120_0000);
        let plan = host_regions(&ram, &virt_devices(), &[carve], 1 << 48).unwrap();
        assert_eq!(
            plan.regions.as_slice(),
            &[
                device(0, 0x801_0000),
                device(0x808_0000, 0xf8_1000),
                device(0x901_0000, 0x1000),
                // fw-cfg's 0x18 bytes: its page.
                device(0x902_0000, 0x1000),
                device(0x903_0000, 0x1000),
                device(0xa00_0000, 0x4000),
                device(0xc00_0000, 0x200_0000),
                device(0x1000_0000, 0x2f00_0000),
                Region {
                    range: r(0x4000_0000, 0x20_0000),
                    kind: RegionKind::Ram
                },
                Region {
                    range: r(0x4140_0000, 0x3ec0_0000),
                    kind: RegionKind::Ram
                },
                device(0x40_1000_0000, 0x1000_0000),
                // The PCIe 64-bit window, where 64-bit BARs go.
                device(0x80_0000_0000, 0x80_0000_0000),
            ]
        );
        assert_eq!(plan.beyond_ipa, None);
    }

    #[test]
    fn undescribed_addresses_stay_unmapped() {
        let ram = [r(0x4000_0000, 0x4000_0000)];
        let plan = host_regions(&ram, &virt_devices(), &[], 1 << 40).unwrap();
        for hole in [
            0x801_0000,
            0x900_1000 + 0x1_0000,
            0x3f00_0000,
            0x8000_0000,
            0x40_0000_0000,
        ] {
            assert!(
                !plan
                    .regions
                    .iter()
                    .any(|g| g.range.contains_range(&r(hole, 1))),
                "{hole:#x} mapped"
            );
        }
    }

    #[test]
    fn withheld_mmio_punches_the_device_window() {
        let ram = [r(0x4000_0000, 0x1000_0000)];
        let gich = r(0x0803_0000, 0x1_0000);
        let plan = host_regions(&ram, &[r(0x800_0000, 0x5_0000)], &[gich], 1 << 40).unwrap();
        assert_eq!(plan.regions[0].range, r(0x800_0000, 0x3_0000));
        assert_eq!(plan.regions[1].range, r(0x0804_0000, 0x1_0000));
        assert_eq!(plan.regions[2].range, ram[0]);
        assert_eq!(plan.regions.len(), 3);
    }

    #[test]
    fn nothing_withheld_is_ever_mapped() {
        let ram = [r(0x8000_0000, 0x8000_0000), r(0x8_8000_0000, 0x8000_0000)];
        let devices = [r(0x1c09_0000, 0x1000), r(0x2f00_0000, 0x1_0000)];
        let withheld = [
            r(0x8100_0000, 0x200_0000),
            r(0x1c09_0000, 0x1000),
            r(0x8_8000_0000, 0x1000),
        ];
        let plan = host_regions(&ram, &devices, &withheld, 1 << 44).unwrap();
        for region in &plan.regions {
            for w in &withheld {
                assert!(!region.range.overlaps(w), "{region:?} overlaps {w:?}");
            }
        }
        // RAM is covered except the withheld parts.
        let ram_mapped: u64 = plan
            .regions
            .iter()
            .filter(|r| r.kind == RegionKind::Ram)
            .map(|r| r.range.size)
            .sum();
        assert_eq!(ram_mapped, 0x1_0000_0000 - 0x200_0000 - 0x1000);
    }

    #[test]
    fn a_device_window_over_ram_leaves_ram_normal() {
        let ram = [r(0x4000_0000, 0x4000_0000)];
        let plan = host_regions(&ram, &[r(0x3fff_f000, 0x4000_2000)], &[], 1 << 40).unwrap();
        assert_eq!(plan.regions[0], device(0x3fff_f000, 0x1000));
        assert_eq!(plan.regions[1].kind, RegionKind::Ram);
        assert_eq!(plan.regions[2], device(0x8000_0000, 0x1000));
    }

    #[test]
    fn ipa_limit_caps_the_map_and_says_what_it_left_out() {
        let ram = [r(0x4000_0000, 0x4000_0000)];
        let plan = host_regions(&ram, &virt_devices(), &[], 1 << 39).unwrap();
        assert!(plan.regions.iter().all(|r| r.range.end() <= 1 << 39));
        assert_eq!(plan.beyond_ipa, Some(r(1 << 39, 1 << 39)));
    }
}
