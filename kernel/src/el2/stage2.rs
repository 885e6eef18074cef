//! Stage-2 tables, built with aarch64-paging's `Stage2` regime.
//!
//! The plan of what to map comes from `moat_kernel::s2plan` (host-tested);
//! this module turns it into descriptors. VTCR_EL2 and the VMID are the
//! core's (aarch64-paging leaves both to the caller).

use aarch64_paging::descriptor::Stage2Attributes as S2;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{MemoryRegion, Stage2};
use moat_kernel::s2plan::{Region, RegionKind};

/// Normal write-back memory, read/write/execute: combined with the
/// partition's stage-1 attributes, the stronger (stage-1) type wins.
const RAM: S2 = S2::VALID
    .union(S2::ACCESS_FLAG)
    .union(S2::SH_INNER)
    .union(S2::MEMATTR_NORMAL_INNER_WB)
    .union(S2::MEMATTR_NORMAL_OUTER_WB)
    .union(S2::S2AP_ACCESS_RW);
/// Device-nGnRE, read/write, never executable.
const DEVICE: S2 = S2::VALID
    .union(S2::ACCESS_FLAG)
    .union(S2::MEMATTR_DEVICE_nGnRE)
    .union(S2::S2AP_ACCESS_RW)
    .union(S2::XN);

/// A partition's stage-2: its tables and the VTTBR_EL2 value that selects them.
pub struct StageTwo {
    map: IdMap<Stage2>,
    vmid: u16,
}

impl StageTwo {
    /// Builds an identity stage-2 from a plan.
    pub fn identity(start_level: usize, vmid: u16, plan: &[Region]) -> Result<Self, &'static str> {
        let mut map = IdMap::new(start_level, Stage2);
        for r in plan {
            let flags = match r.kind {
                RegionKind::Ram => RAM,
                RegionKind::Device => DEVICE,
            };
            let region = MemoryRegion::new(r.range.base as usize, r.range.end() as usize);
            map.map_range(&region, flags).map_err(|_| "stage-2 mapping failed")?;
        }
        map.mark_active();
        Ok(Self { map, vmid })
    }

    /// VTTBR_EL2: the root table and the VMID in bits [63:48].
    pub fn vttbr(&self) -> u64 {
        self.map.root_address().0 as u64 | (u64::from(self.vmid) << 48)
    }

}
