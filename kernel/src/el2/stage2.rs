//! Stage-2 tables, built with aarch64-paging's `Stage2` regime.
//!
//! What to map comes from host-tested plans (`moat_kernel::s2plan` for the
//! host, the service layout for services); this module turns them into
//! descriptors. VTCR_EL2 and the VMID are the core's (aarch64-paging leaves
//! both to the caller). The core runs identity-mapped, so table memory from
//! its heap is addressed the same by the core and by the walker.

use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{PhysicalAddress, Stage2Attributes as S2};
use aarch64_paging::idmap::IdTranslation;
use aarch64_paging::paging::{Constraints, MemoryRegion, Stage2};
use moat_kernel::s2plan::{Region, RegionKind};

/// Normal write-back memory: combined with the partition's stage-1
/// attributes, the stronger (stage-1) type wins.
const NORMAL: S2 = S2::VALID
    .union(S2::ACCESS_FLAG)
    .union(S2::SH_INNER)
    .union(S2::MEMATTR_NORMAL_INNER_WB)
    .union(S2::MEMATTR_NORMAL_OUTER_WB);
/// Device-nGnRE, read/write, never executable.
const DEVICE: S2 = S2::VALID
    .union(S2::ACCESS_FLAG)
    .union(S2::MEMATTR_DEVICE_nGnRE)
    .union(S2::S2AP_ACCESS_RW)
    .union(S2::XN);

/// What a partition may do with a range of normal memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(
    clippy::enum_variant_names,
    reason = "every access includes read; the names list the rest"
)]
pub enum Access {
    /// Read and execute (a service's text).
    ReadExecute,
    /// Read and write, never execute.
    ReadWrite,
    /// Read, write and execute (the host's RAM).
    ReadWriteExecute,
}

impl Access {
    fn flags(self) -> S2 {
        match self {
            Access::ReadExecute => NORMAL | S2::S2AP_ACCESS_RO,
            Access::ReadWrite => NORMAL | S2::S2AP_ACCESS_RW | S2::XN,
            Access::ReadWriteExecute => NORMAL | S2::S2AP_ACCESS_RW,
        }
    }
}

/// The host's stage-2, for the consistency checker.
pub static HOST: spin::Once<&'static StageTwo> = spin::Once::new();

/// A partition's stage-2.
pub struct StageTwo {
    map: Mapping<IdTranslation<S2>, Stage2>,
    vmid: u16,
}

impl StageTwo {
    /// An empty stage-2 whose walk starts at `start_level` (from VTCR_EL2).
    pub fn new(start_level: usize, vmid: u16) -> Self {
        Self {
            map: Mapping::new(IdTranslation::new(), start_level, Stage2),
            vmid,
        }
    }

    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)`.
    pub fn map(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        access: Access,
    ) -> Result<(), &'static str> {
        self.map_flags(ipa, pa, size, access.flags(), Constraints::empty())
    }

    fn map_flags(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        flags: S2,
        constraints: Constraints,
    ) -> Result<(), &'static str> {
        let end = ipa.checked_add(size).ok_or("stage-2 range overflows")?;
        let region = MemoryRegion::new(ipa as usize, end as usize);
        self.map
            .map_range(&region, PhysicalAddress(pa as usize), flags, constraints)
            .map_err(|_| "stage-2 mapping failed")
    }

    /// An identity stage-2 from a plan (the host's).
    ///
    /// RAM is mapped with 4 KiB pages, devices with the largest blocks that
    /// fit. Pages because ownership changes page by page (a donation must
    /// not split a live block), and because an emulator that caches a
    /// combined stage-1+2 translation at the larger of the two page sizes
    /// must flush its whole TLB whenever the host invalidates one page
    /// inside a stage-2 block: QEMU's TCG does, and Linux invalidates single
    /// pages by the ten thousand while it boots. The cost is 2 MiB of tables
    /// per GiB of host RAM, which the carve-out's heap is sized for.
    pub fn identity(start_level: usize, vmid: u16, plan: &[Region]) -> Result<Self, &'static str> {
        let mut s2 = Self::new(start_level, vmid);
        for r in plan {
            let (flags, constraints) = match r.kind {
                RegionKind::Ram => (
                    Access::ReadWriteExecute.flags(),
                    Constraints::NO_BLOCK_MAPPINGS,
                ),
                RegionKind::Device => (DEVICE, Constraints::empty()),
            };
            s2.map_flags(r.range.base, r.range.base, r.range.size, flags, constraints)?;
        }
        Ok(s2)
    }

    /// Marks the tables live and keeps them for the rest of the core's life.
    pub fn activate(self) -> &'static Self {
        self.map.mark_active();
        alloc::boxed::Box::leak(alloc::boxed::Box::new(self))
    }

    /// The VTTBR_EL2 value: root table, VMID in bits [63:48].
    pub fn vttbr(&self) -> u64 {
        self.map.root_address().0 as u64 | (u64::from(self.vmid) << 48)
    }

    /// Checks that every page of `[ipa, ipa + size)` is mapped read/write
    /// (`mapped`) or not mapped at all (`!mapped`); returns the first IPA
    /// that is not. The consistency checker compares this with the ledger.
    pub fn check(&self, ipa: u64, size: u64, mapped: bool) -> Result<(), u64> {
        let Some(end) = ipa.checked_add(size) else {
            return Err(ipa);
        };
        let region = MemoryRegion::new(ipa as usize, end as usize);
        let mut first_bad = None;
        let result = self
            .map
            .walk_range(&region, &mut |range, descriptor, _level| {
                let valid = descriptor.is_valid();
                let ok = if mapped {
                    valid && descriptor.flags().contains(S2::S2AP_ACCESS_RW)
                } else {
                    !valid
                };
                if ok {
                    Ok(())
                } else {
                    first_bad = Some((range.start().0 as u64).max(ipa));
                    Err(())
                }
            });
        match (result, first_bad) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(at)) => Err(at),
            (Err(_), None) => Err(ipa),
        }
    }
}
