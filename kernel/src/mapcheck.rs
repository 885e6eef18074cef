//! The consistency checker's judgement of one stage-2 leaf: may this
//! partition map these frames at this address?
//!
//! The walk of a partition's stage-2 (at EL2) hands each valid leaf here
//! with the ledger's extents; the rules are the core's, whatever the
//! ledger says:
//!
//! - the host maps everything at its own address (identity), never a frame
//!   of the carve-out, and a frame of RAM only if the ledger makes it the
//!   host's or lends it to the host;
//! - a VM maps only its own frames (the ledger's owner is that VM), never
//!   the carve-out, and each IPA to the frame the core recorded for it
//!   when the frame was donated;
//! - a service maps only hypervisor frames.
//!
//! Comparing output addresses is what catches a forged entry: one whose
//! permissions look right but whose frame is someone else's.

use crate::txcheck::{PAGE, Region};
use moat_abi::services::{LedgerExtent, Party};
use moat_platform::dt::Range;

/// Whose stage-2 a leaf belongs to.
#[derive(Clone, Copy, Debug)]
pub enum Mapper<'a> {
    Host,
    /// A VM, with the core's record of where its frames sit.
    Vm {
        handle: u16,
        regions: &'a [Region],
    },
    Service,
}

/// What is wrong with a leaf, at `ipa` (the first bad page) mapping `pa`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forged {
    pub ipa: u64,
    pub pa: u64,
    pub why: Why,
}

/// The rule a leaf breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Why {
    /// A host entry whose output is not its input.
    NotIdentity,
    /// The frame is in the hypervisor's carve-out.
    CarveOut,
    /// The ledger gives the frame to another party (`owner`), or to nobody
    /// (`owner.kind` is `Party::NONE`).
    Foreign { owner: Party },
    /// A VM entry whose frame is not the one the core recorded for its IPA.
    NotRecorded,
    /// A leaf whose addresses run past the end of the address space.
    Wraps,
}

impl Why {
    /// The rule, for the log.
    pub fn describe(self) -> &'static str {
        match self {
            Why::NotIdentity => "a host mapping that is not the identity",
            Why::CarveOut => "a mapping of the hypervisor's carve-out",
            Why::Foreign { .. } => "a mapping of another party's frame",
            Why::NotRecorded => "a VM mapping of a frame the core did not place at that IPA",
            Why::Wraps => "a mapping past the end of the address space",
        }
    }
}

/// Checks the leaf mapping `[ipa, ipa + size)` to `[pa, pa + size)` in
/// `mapper`'s stage-2. `ram` and `carve_out` are the platform's RAM and
/// the hypervisor's memory; `extent_of(pfn)` is the ledger's extent holding
/// frame `pfn` (the ledger covers RAM only).
pub fn check_leaf(
    mapper: Mapper<'_>,
    ipa: u64,
    pa: u64,
    size: u64,
    ram: &[Range],
    carve_out: &[Range],
    extent_of: impl Fn(u64) -> Option<LedgerExtent>,
) -> Result<(), Forged> {
    let forged = |at: u64, why| Forged {
        ipa: ipa.saturating_add(at.saturating_sub(pa)),
        pa: at,
        why,
    };
    let (Some(end), Some(_)) = (pa.checked_add(size), ipa.checked_add(size)) else {
        return Err(forged(pa, Why::Wraps));
    };
    if matches!(mapper, Mapper::Host) && ipa != pa {
        return Err(forged(pa, Why::NotIdentity));
    }
    // Services run from the hypervisor's heap, inside the carve-out.
    if !matches!(mapper, Mapper::Service)
        && let Some(c) = carve_out.iter().find(|c| c.base < end && pa < c.end())
    {
        return Err(forged(c.base.max(pa), Why::CarveOut));
    }
    if let Mapper::Vm { regions, .. } = mapper {
        let mut at = 0;
        while at < size {
            let recorded = regions
                .iter()
                .find(|r| r.ipa <= ipa + at && ipa + at - r.ipa < r.pages * PAGE)
                .map(|r| r.pa + (ipa + at - r.ipa));
            if recorded != Some(pa + at) {
                return Err(forged(pa + at, Why::NotRecorded));
            }
            at += PAGE;
        }
    }
    // Ownership, extent by extent over the leaf's frames in RAM; frames
    // outside RAM (devices) are only the host's to map.
    let mut at = pa;
    while at < end {
        let in_ram = ram.iter().find(|r| r.base <= at && at < r.end());
        let Some(bank) = in_ram else {
            if !matches!(mapper, Mapper::Host) {
                return Err(forged(at, Why::Foreign { owner: nobody() }));
            }
            // Skip to the next bank above, or the end.
            at = ram
                .iter()
                .map(|r| r.base)
                .filter(|&b| b > at)
                .min()
                .unwrap_or(end)
                .min(end);
            continue;
        };
        let Some(e) = extent_of(at / PAGE) else {
            return Err(forged(at, Why::Foreign { owner: nobody() }));
        };
        let allowed = match mapper {
            Mapper::Host => e.owner.kind == Party::HOST || e.borrower.kind == Party::HOST,
            Mapper::Vm { handle, .. } => {
                e.owner.kind == Party::VM && e.owner.id == u32::from(handle)
            }
            Mapper::Service => e.owner.kind == Party::HYPERVISOR,
        };
        if !allowed {
            return Err(forged(at, Why::Foreign { owner: e.owner }));
        }
        let extent_end = e
            .frames
            .start
            .saturating_add(e.frames.count)
            .saturating_mul(PAGE);
        // An extent that does not hold the frame asked about (or ends
        // before it) would never let the walk move on.
        if extent_end <= at || e.frames.start.saturating_mul(PAGE) > at {
            return Err(forged(at, Why::Foreign { owner: nobody() }));
        }
        at = extent_end.min(end).min(bank.end());
    }
    Ok(())
}

fn nobody() -> Party {
    Party {
        kind: Party::NONE,
        id: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::txcheck::tests::{CARVE, RAM};
    use moat_abi::services::FrameRange;

    /// Frames the host owns.
    const HOST_FRAMES: (u64, u64) = (0x5000_0000, 0x10_0000);
    /// Frames VM 1 owns, the first 4 of them shared with the host.
    const VM1_FRAMES: (u64, u64) = (0x6000_0000, 0x10_000);
    /// Frames VM 2 owns.
    const VM2_FRAMES: (u64, u64) = (0x7000_0000, 0x10_000);
    /// The hypervisor's frames: the carve-out.
    const HYP_FRAMES: (u64, u64) = (0x4020_0000, 0x0200_0000);
    const VM1_IPA: u64 = 0x8000_0000;

    fn party(kind: u32, id: u32) -> Party {
        Party { kind, id }
    }

    fn extent(range: (u64, u64), owner: Party, borrower: Party) -> LedgerExtent {
        LedgerExtent {
            frames: FrameRange {
                start: range.0 / PAGE,
                count: range.1 / PAGE,
            },
            owner,
            borrower,
        }
    }

    /// The ledger: extents in address order.
    fn ledger() -> Vec<LedgerExtent> {
        let none = party(Party::NONE, 0);
        vec![
            extent(HYP_FRAMES, party(Party::HYPERVISOR, 0), none),
            extent(HOST_FRAMES, party(Party::HOST, 0), none),
            extent(
                (VM1_FRAMES.0, 4 * PAGE),
                party(Party::VM, 1),
                party(Party::HOST, 0),
            ),
            extent(
                (VM1_FRAMES.0 + 4 * PAGE, VM1_FRAMES.1 - 4 * PAGE),
                party(Party::VM, 1),
                none,
            ),
            extent(VM2_FRAMES, party(Party::VM, 2), none),
        ]
    }

    fn check(mapper: Mapper<'_>, ipa: u64, pa: u64, size: u64) -> Result<(), Forged> {
        let extents = ledger();
        check_leaf(mapper, ipa, pa, size, &RAM, &CARVE, |pfn| {
            extents
                .iter()
                .find(|e| e.frames.start <= pfn && pfn < e.frames.start + e.frames.count)
                .copied()
        })
    }

    fn vm1_regions() -> [Region; 1] {
        [Region {
            ipa: VM1_IPA,
            pa: VM1_FRAMES.0,
            pages: VM1_FRAMES.1 / PAGE,
        }]
    }

    fn why(r: Result<(), Forged>) -> Option<Why> {
        r.err().map(|f| f.why)
    }

    #[test]
    fn honest_leaves_pass() {
        let (h, regions) = (HOST_FRAMES.0, vm1_regions());
        let vm1 = Mapper::Vm {
            handle: 1,
            regions: &regions,
        };
        assert_eq!(check(Mapper::Host, h, h, PAGE), Ok(()));
        assert_eq!(check(Mapper::Host, h, h, HOST_FRAMES.1), Ok(()));
        // A page VM 1 shares with the host.
        let shared = VM1_FRAMES.0 + PAGE;
        assert_eq!(check(Mapper::Host, shared, shared, PAGE), Ok(()));
        // A device block outside RAM, identity.
        assert_eq!(
            check(Mapper::Host, 0x0800_0000, 0x0800_0000, 1 << 21),
            Ok(())
        );
        assert_eq!(check(vm1, VM1_IPA, VM1_FRAMES.0, VM1_FRAMES.1), Ok(()));
        assert_eq!(
            check(vm1, VM1_IPA + PAGE, VM1_FRAMES.0 + PAGE, PAGE),
            Ok(())
        );
        assert_eq!(check(Mapper::Service, 0x1000, HYP_FRAMES.0, PAGE), Ok(()));
    }

    /// One forged entry of each kind, each caught for its reason.
    #[test]
    fn forged_leaves_are_caught() {
        let regions = vm1_regions();
        let vm1 = Mapper::Vm {
            handle: 1,
            regions: &regions,
        };
        let host_page = HOST_FRAMES.0;
        // The host: an entry at one of its own pages pointing elsewhere
        // (at another of its own pages: only the address is wrong).
        assert_eq!(
            why(check(Mapper::Host, host_page, host_page + PAGE, PAGE)),
            Some(Why::NotIdentity)
        );
        // The host: an entry (identity, read/write) over the carve-out.
        let r = check(
            Mapper::Host,
            CARVE[0].base + PAGE,
            CARVE[0].base + PAGE,
            PAGE,
        );
        assert_eq!(why(r), Some(Why::CarveOut));
        assert_eq!(r.unwrap_err().pa, CARVE[0].base + PAGE);
        // The host: a block that runs into the carve-out.
        let below = CARVE[0].base - PAGE;
        assert_eq!(
            why(check(Mapper::Host, below, below, 2 * PAGE)),
            Some(Why::CarveOut)
        );
        // The host: a VM's frame (not shared).
        let vm_page = VM1_FRAMES.0 + 8 * PAGE;
        assert_eq!(
            why(check(Mapper::Host, vm_page, vm_page, PAGE)),
            Some(Why::Foreign {
                owner: party(Party::VM, 1)
            })
        );
        // The host: frames the ledger does not hold at all.
        let r = check(Mapper::Host, 0x7800_0000, 0x7800_0000, PAGE);
        assert_eq!(
            why(r),
            Some(Why::Foreign {
                owner: party(Party::NONE, 0)
            })
        );
        // A VM: another VM's frame at one of its IPAs.
        assert_eq!(
            why(check(vm1, VM1_IPA, VM2_FRAMES.0, PAGE)),
            Some(Why::NotRecorded)
        );
        // A VM: a frame of its own, but not the one recorded at that IPA.
        assert_eq!(
            why(check(vm1, VM1_IPA, VM1_FRAMES.0 + PAGE, PAGE)),
            Some(Why::NotRecorded)
        );
        // A VM: an IPA the core never mapped for it.
        assert_eq!(
            why(check(vm1, 0x1000, VM1_FRAMES.0, PAGE)),
            Some(Why::NotRecorded)
        );
        // A VM: the carve-out.
        assert_eq!(
            why(check(vm1, VM1_IPA, CARVE[0].base, PAGE)),
            Some(Why::CarveOut)
        );
        // A VM whose record itself names another VM's frames: the ledger
        // check still refuses them.
        let lying_record = [Region {
            ipa: VM1_IPA,
            pa: VM2_FRAMES.0,
            pages: 1,
        }];
        let vm1_lying = Mapper::Vm {
            handle: 1,
            regions: &lying_record,
        };
        assert_eq!(
            why(check(vm1_lying, VM1_IPA, VM2_FRAMES.0, PAGE)),
            Some(Why::Foreign {
                owner: party(Party::VM, 2)
            })
        );
        // A VM: a device outside RAM.
        let dev = [Region {
            ipa: 0x1000,
            pa: 0x0900_0000,
            pages: 1,
        }];
        let vm_dev = Mapper::Vm {
            handle: 1,
            regions: &dev,
        };
        assert!(matches!(
            why(check(vm_dev, 0x1000, 0x0900_0000, PAGE)),
            Some(Why::Foreign { .. })
        ));
        // A service: the host's frame, a VM's frame, a device.
        for pa in [host_page, VM2_FRAMES.0, 0x0900_0000] {
            assert!(
                matches!(
                    why(check(Mapper::Service, 0x1000, pa, PAGE)),
                    Some(Why::Foreign { .. })
                ),
                "{pa:#x}"
            );
        }
    }

    #[test]
    fn a_leaf_whose_end_wraps_is_refused() {
        let top = u64::MAX - PAGE + 1;
        assert_eq!(
            why(check(Mapper::Host, top, top, 2 * PAGE)),
            Some(Why::Wraps)
        );
        assert_eq!(
            why(check(Mapper::Service, top, 0x1000, 2 * PAGE)),
            Some(Why::Wraps)
        );
    }
}
