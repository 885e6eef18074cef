//! The core's checks of what the ledger service tells it: the transaction
//! answering a memory request, and (in the consistency checker) the
//! ledger's extents against every stage-2 leaf. The ledger runs at EL1 and
//! is not trusted with the core's invariants, so its answers are hostile.

use arbitrary::Unstructured;
use moat_abi::services::{
    FrameRange, LEDGER_MAX_CHANGES, LedgerChange, LedgerExtent, LedgerRequest, LedgerTransaction,
    Party,
};
use moat_kernel::mapcheck::{self, Mapper};
use moat_kernel::txcheck::{self, PAGE, Region, Step, Who};
use moat_platform::dt::Range;

/// Up to `max` ranges as discovery could describe them (non-empty, not
/// wrapping), mostly page-aligned and near the usual RAM base, sometimes
/// anywhere, up to the top of the address space.
fn ranges(u: &mut Unstructured<'_>, max: u8) -> Vec<Range> {
    let mut out = Vec::new();
    for _ in 0..u.int_in_range(1..=max).unwrap_or(1) {
        let (base, size) = if u.ratio(1, 4).unwrap_or(false) {
            (u.arbitrary().unwrap_or(0), u.arbitrary().unwrap_or(0))
        } else {
            let base = 0x4000_0000 + u64::from(u.arbitrary::<u16>().unwrap_or(0)) * 0x10_0000;
            let size = u64::from(u.int_in_range(1..=0x400u16).unwrap_or(1)) * PAGE;
            (base, size)
        };
        out.extend(Range::new(base, size));
    }
    out
}

/// A frame range: usually whole pages of one of `near`, sometimes anything.
fn frames(u: &mut Unstructured<'_>, near: &[Range]) -> FrameRange {
    if near.is_empty() || u.ratio(1, 8).unwrap_or(false) {
        return FrameRange {
            start: u.arbitrary().unwrap_or(0),
            count: u.arbitrary().unwrap_or(0),
        };
    }
    let r = near[usize::from(u.arbitrary::<u8>().unwrap_or(0)) % near.len()];
    let first = r.base / PAGE + u64::from(u.arbitrary::<u8>().unwrap_or(0));
    FrameRange {
        start: first,
        count: u64::from(u.int_in_range(0..=16u8).unwrap_or(1)),
    }
}

fn party(u: &mut Unstructured<'_>) -> Party {
    Party {
        kind: u.int_in_range(0..=5u32).unwrap_or(0),
        id: u.int_in_range(0..=3u32).unwrap_or(0),
    }
}

/// `txcheck`: a machine (RAM and carve-out), a request and the ledger's
/// answer to it, as hostile as the ledger can make it.
pub fn transaction(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let ram = ranges(&mut u, 3);
    let carve_out = ranges(&mut u, 2);
    let vm = u.arbitrary::<Option<u16>>().unwrap_or(None);
    let request = LedgerRequest {
        op: u.int_in_range(0..=11u32).unwrap_or(0),
        party: u32::from(vm.unwrap_or(0)),
        frames: frames(&mut u, &ram),
    };
    let mut tx = LedgerTransaction {
        generation: u.arbitrary().unwrap_or(0),
        request,
        change_count: u.int_in_range(0..=3u32).unwrap_or(0),
        has_scrub: u.int_in_range(0..=1u32).unwrap_or(0),
        ..Default::default()
    };
    // Mostly about the requested frames, so the checks past the first are
    // reached.
    let near = |u: &mut Unstructured<'_>| {
        if u.ratio(3, 4).unwrap_or(true) {
            request.frames
        } else {
            frames(u, &ram)
        }
    };
    tx.scrub = near(&mut u);
    for c in &mut tx.changes {
        *c = LedgerChange {
            kind: u.int_in_range(0..=3u32).unwrap_or(0),
            perms: u.int_in_range(0..=7u32).unwrap_or(0),
            party: party(&mut u),
            frames: near(&mut u),
        };
    }
    if u.ratio(1, 16).unwrap_or(false) {
        tx.request.op ^= 1;
    }
    let Ok(checked) = txcheck::check(&request, &tx, vm, &ram, &carve_out) else {
        return;
    };
    // What the core relies on when it applies an accepted transaction.
    let requested = || {
        let pa = request.frames.start.checked_mul(PAGE);
        let size = request.frames.count.checked_mul(PAGE);
        pa.zip(size)
            .expect("an accepted change of an overflowing request")
    };
    let in_ram = |pa: u64, size: u64| {
        ram.iter()
            .any(|r| r.base <= pa && pa.checked_add(size).is_some_and(|end| end <= r.end()))
    };
    let clear_of_carve_out =
        |pa: u64, size: u64| !carve_out.iter().any(|c| c.base < pa + size && pa < c.end());
    let steps: Vec<Step> = checked.steps().collect();
    assert!(steps.len() <= LEDGER_MAX_CHANGES);
    for step in &steps {
        let (Step::Map { who, pa, size, .. } | Step::Unmap { who, pa, size }) = *step;
        assert!(size > 0 && in_ram(pa, size), "{step:?} leaves RAM");
        assert!(
            clear_of_carve_out(pa, size),
            "{step:?} touches the carve-out"
        );
        assert_eq!(
            (pa, size),
            requested(),
            "{step:?} is not the requested frames"
        );
        assert!(
            who != Who::Vm || vm.is_some(),
            "{step:?} for a VM not named"
        );
    }
    if let Some((pa, size)) = checked.scrub {
        assert!(size > 0 && in_ram(pa, size) && clear_of_carve_out(pa, size));
    }
    // Frames given from one party to another are scrubbed on the way.
    for unmap in &steps {
        for map in &steps {
            if let (Step::Unmap { who: from, .. }, Step::Map { who: to, .. }) = (unmap, map)
                && from != to
            {
                assert_eq!(checked.scrub, Some(requested()), "unscrubbed hand-over");
            }
        }
    }
    // The record of a VM's frames follows the checked changes without
    // wrapping: drop the frames from a region that holds them.
    if let Some(&Step::Unmap { pa, size, .. }) = steps.first() {
        let region = Region {
            ipa: u64::from(u.arbitrary::<u32>().unwrap_or(0)) * PAGE,
            pa,
            pages: size / PAGE,
        };
        let mut seen = 0;
        txcheck::ipa_ranges(&[region], pa, size, |_, n| seen += n)
            .expect("the region holds the frames");
        assert_eq!(seen, size);
        assert_eq!(txcheck::forget_frames(&[region], pa, size).count(), 0);
    }
}

/// `mapcheck`: a stage-2 leaf of some partition, and the ledger's extents
/// (in any order, overlapping or not).
pub fn leaf(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let ram = ranges(&mut u, 3);
    let carve_out = ranges(&mut u, 2);
    let mut extents = Vec::new();
    for _ in 0..u.int_in_range(0..=6u8).unwrap_or(0) {
        extents.push(LedgerExtent {
            frames: frames(&mut u, &ram),
            owner: party(&mut u),
            borrower: party(&mut u),
        });
    }
    if u.arbitrary().unwrap_or(true) {
        extents.sort_by_key(|e| e.frames.start);
    }
    // The core's record of a VM's frames: regions it placed itself, so
    // they never wrap.
    let mut regions = Vec::new();
    for _ in 0..u.int_in_range(0..=3u8).unwrap_or(0) {
        let r = Region {
            ipa: u64::from(u.arbitrary::<u32>().unwrap_or(0)) * PAGE,
            pa: frames(&mut u, &ram).start.wrapping_mul(PAGE),
            pages: u64::from(u.int_in_range(1..=1024u16).unwrap_or(1)),
        };
        if r.pa.checked_add(r.pages * PAGE).is_some()
            && regions.iter().all(|o: &Region| {
                let (a_end, b_end) = (r.pa + r.pages * PAGE, o.pa_end());
                (a_end <= o.pa || b_end <= r.pa)
                    && (r.ipa + r.pages * PAGE <= o.ipa || o.ipa + o.pages * PAGE <= r.ipa)
            })
        {
            regions.push(r);
        }
    }
    let handle = u.int_in_range(0..=3u16).unwrap_or(0);
    let mapper = match u.int_in_range(0..=2u8).unwrap_or(0) {
        0 => Mapper::Host,
        1 => Mapper::Vm {
            handle,
            regions: &regions,
        },
        _ => Mapper::Service,
    };
    // Stage-2 leaves are 4 KiB pages and 2 MiB blocks (and 1 GiB blocks
    // for the host).
    let size = match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 | 1 => PAGE,
        2 => 2 << 20,
        _ if matches!(mapper, Mapper::Host) => 1 << 30,
        _ => 2 << 20,
    };
    let pa = match u.int_in_range(0..=3u8).unwrap_or(0) {
        0 => u.arbitrary::<u64>().unwrap_or(0) & !(size - 1),
        1 => regions.first().map_or(0, |r| r.pa),
        _ => frames(&mut u, &ram).start.wrapping_mul(PAGE) & !(size - 1),
    };
    let ipa = match (mapper, u.arbitrary::<bool>().unwrap_or(true)) {
        (Mapper::Host, true) => pa,
        (Mapper::Vm { .. }, true) => regions.first().map_or(0, |r| r.ipa),
        _ => u.arbitrary::<u64>().unwrap_or(0) & !(size - 1),
    };
    // As the core looks extents up (`kernel/src/memory/mod.rs`).
    let extent_of = |pfn: u64| {
        let i = extents.partition_point(|e| e.frames.start.saturating_add(e.frames.count) <= pfn);
        extents.get(i).filter(|e| e.frames.start <= pfn).copied()
    };
    let verdict = mapcheck::check_leaf(mapper, ipa, pa, size, &ram, &carve_out, extent_of);
    let sorted_disjoint = extents.windows(2).all(|w| {
        w[0].frames
            .start
            .checked_add(w[0].frames.count)
            .is_some_and(|end| end <= w[1].frames.start)
    });
    if let Ok(()) = verdict {
        // Checked page by page, independently of how the checker skips
        // through extents: only meaningful when the ledger's extents are
        // a consistent list.
        assert!(pa.checked_add(size).is_some() && ipa.checked_add(size).is_some());
        if matches!(mapper, Mapper::Host) {
            assert_eq!(ipa, pa, "a host leaf that is not the identity");
        }
        if !matches!(mapper, Mapper::Service) {
            assert!(
                !carve_out.iter().any(|c| c.base < pa + size && pa < c.end()),
                "a leaf over the carve-out"
            );
        }
        if !sorted_disjoint {
            return;
        }
        for at in (pa..pa + size).step_by(PAGE as usize) {
            if !ram.iter().any(|r| r.base <= at && at < r.end()) {
                assert!(
                    matches!(mapper, Mapper::Host),
                    "a non-host leaf outside RAM"
                );
                continue;
            }
            let e = extent_of(at / PAGE).expect("a frame of RAM the ledger does not know");
            let allowed = match mapper {
                Mapper::Host => e.owner.kind == Party::HOST || e.borrower.kind == Party::HOST,
                Mapper::Vm { handle, .. } => {
                    e.owner
                        == Party {
                            kind: Party::VM,
                            id: u32::from(handle),
                        }
                }
                Mapper::Service => e.owner.kind == Party::HYPERVISOR,
            };
            assert!(allowed, "frame {at:#x} of {e:?} mapped by {mapper:?}");
            if let Mapper::Vm { regions, .. } = mapper {
                let ipa_at = ipa + (at - pa);
                assert!(
                    regions.iter().any(|r| r.ipa <= ipa_at
                        && ipa_at - r.ipa < r.pages * PAGE
                        && r.pa + (ipa_at - r.ipa) == at),
                    "a VM page the core did not record"
                );
            }
        }
    }
}
