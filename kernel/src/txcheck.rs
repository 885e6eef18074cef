//! The core's own check of a ledger transaction, and the record of where a
//! VM's frames sit in its IPA space.
//!
//! The ledger service decides who owns what; the core does not take its
//! word for the things the core is responsible for. Before applying a
//! transaction it checks that:
//!
//! - the transaction answers the request the core sent;
//! - every change and the scrub cover exactly the requested frames, which
//!   are RAM and not the hypervisor's own memory (which never moves);
//! - every change is for the host, the hypervisor or the one VM the request
//!   names, with permissions the core gives;
//! - frames that leave one party for another are scrubbed on the way;
//! - the transaction has the shape its kind of request allows: a share
//!   only adds the borrower's mapping (read/write, never executable), an
//!   unshare only removes it, a donation and a reclaim move the frames from
//!   the one party to the other with a scrub, and creating or destroying a
//!   VM changes no mapping; a donation to the hypervisor only removes the
//!   host's mapping and its return only restores it, both with a scrub. So no page ever becomes writable by a second
//!   party except as a share the ledger records.
//!
//! A transaction that fails any of these is refused whole.

use moat_abi::services::{
    LEDGER_MAX_CHANGES, LedgerChange, LedgerRequest, LedgerTransaction, Party,
};
use moat_platform::dt::Range;

/// Bytes in a page.
pub const PAGE: u64 = 4096;

/// Whose tables a change touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    Host,
    Hypervisor,
    /// The VM the request names.
    Vm,
}

/// The access a mapping gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Perm {
    ReadExecute,
    ReadWrite,
    ReadWriteExecute,
}

/// One checked change, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    Unmap {
        who: Who,
        pa: u64,
        size: u64,
    },
    Map {
        who: Who,
        pa: u64,
        size: u64,
        perm: Perm,
    },
}

/// A transaction the core accepted: its changes (unmaps before maps, as the
/// ledger lists them) and the bytes to scrub.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Checked {
    pub steps: [Option<Step>; LEDGER_MAX_CHANGES],
    pub scrub: Option<(u64, u64)>,
}

impl Checked {
    /// The changes, in order.
    pub fn steps(&self) -> impl Iterator<Item = Step> + '_ {
        self.steps.iter().flatten().copied()
    }
}

fn range_bytes(start: u64, count: u64) -> Option<(u64, u64)> {
    let pa = start.checked_mul(PAGE)?;
    let size = count.checked_mul(PAGE)?;
    pa.checked_add(size)?;
    (size > 0).then_some((pa, size))
}

fn inside(outer: (u64, u64), inner: (u64, u64)) -> bool {
    inner.0 >= outer.0 && inner.0 + inner.1 <= outer.0 + outer.1
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.0 + b.1 && b.0 < a.0 + a.1
}

/// Checks `tx` (the ledger's answer to `request`, which concerns VM `vm`
/// if any) against the machine's `ram` and the hypervisor's `carve_out`.
pub fn check(
    request: &LedgerRequest,
    tx: &LedgerTransaction,
    vm: Option<u16>,
    ram: &[Range],
    carve_out: &[Range],
) -> Result<Checked, &'static str> {
    if tx.request != *request {
        return Err("the transaction answers another request");
    }
    let requested = if request.frames.count == 0 {
        None
    } else {
        Some(
            range_bytes(request.frames.start, request.frames.count)
                .ok_or("the request's range overflows")?,
        )
    };
    let frames_ok = |r: (u64, u64)| -> Result<(), &'static str> {
        let requested = requested.ok_or("a change for a request that names no pages")?;
        if !inside(requested, r) {
            return Err("a change outside the requested frames");
        }
        // Every change moves the whole range: a change of part of it would
        // leave the rest with its old owner's mapping next to the new one.
        if r != requested {
            return Err("a change of only part of the requested frames");
        }
        if !ram.iter().any(|b| inside((b.base, b.size), r)) {
            return Err("a change of frames that are not RAM");
        }
        if carve_out.iter().any(|c| overlaps((c.base, c.size), r)) {
            return Err("a change of the hypervisor's own memory");
        }
        Ok(())
    };
    let scrub = if tx.has_scrub != 0 {
        let r = range_bytes(tx.scrub.start, tx.scrub.count).ok_or("a malformed scrub range")?;
        frames_ok(r)?;
        Some(r)
    } else {
        None
    };
    let count = tx.change_count as usize;
    if count > LEDGER_MAX_CHANGES {
        return Err("too many changes");
    }
    let mut steps = [None; LEDGER_MAX_CHANGES];
    let mut seen_map = false;
    for (slot, c) in steps.iter_mut().zip(&tx.changes[..count]) {
        let (pa, size) =
            range_bytes(c.frames.start, c.frames.count).ok_or("a malformed change range")?;
        frames_ok((pa, size))?;
        let who = match (c.party.kind, vm) {
            (Party::HOST, _) => Who::Host,
            (Party::HYPERVISOR, _) => Who::Hypervisor,
            (Party::VM, Some(handle)) if c.party.id == u32::from(handle) => Who::Vm,
            _ => return Err("a change for a party the request does not name"),
        };
        *slot = Some(match c.kind {
            LedgerChange::UNMAP if seen_map => return Err("an unmap after a map"),
            LedgerChange::UNMAP => Step::Unmap { who, pa, size },
            LedgerChange::MAP => {
                seen_map = true;
                let perm = match c.perms {
                    0b111 => Perm::ReadWriteExecute,
                    0b011 => Perm::ReadWrite,
                    0b101 => Perm::ReadExecute,
                    _ => return Err("a mapping with permissions the core does not give"),
                };
                Step::Map {
                    who,
                    pa,
                    size,
                    perm,
                }
            }
            _ => return Err("an unknown change"),
        });
    }
    // Frames that leave one party for another are scrubbed on the way.
    for unmap in steps.iter().flatten() {
        let Step::Unmap {
            who: from,
            pa,
            size,
        } = *unmap
        else {
            continue;
        };
        for map in steps.iter().flatten() {
            if let Step::Map {
                who: to,
                pa: mpa,
                size: msize,
                ..
            } = *map
                && to != from
                && overlaps((pa, size), (mpa, msize))
                && !scrub.is_some_and(|s| inside(s, (mpa, msize)))
            {
                return Err("frames change owner without being scrubbed");
            }
        }
    }
    shape_ok(request.op, &steps, scrub.is_some())?;
    Ok(Checked { steps, scrub })
}

/// The one shape each kind of request may have.
fn shape_ok(
    op: u32,
    steps: &[Option<Step>; LEDGER_MAX_CHANGES],
    scrubbed: bool,
) -> Result<(), &'static str> {
    use Who::{Host, Hypervisor, Vm};
    let shape = |s: &Option<Step>| match *s {
        None => None,
        Some(Step::Unmap { who, .. }) => Some((false, who, None)),
        Some(Step::Map { who, perm, .. }) => Some((true, who, Some(perm))),
    };
    let got = [shape(&steps[0]), shape(&steps[1])];
    let map = |who, perm| Some((true, who, Some(perm)));
    let unmap = |who| Some((false, who, None));
    let rw = Perm::ReadWrite;
    let rwx = Perm::ReadWriteExecute;
    let allowed = match op {
        LedgerRequest::HOST_SHARE_HYP => got == [map(Hypervisor, rw), None] && !scrubbed,
        LedgerRequest::HOST_UNSHARE_HYP => got == [unmap(Hypervisor), None] && !scrubbed,
        LedgerRequest::VM_SHARE_HOST => got == [map(Host, rw), None] && !scrubbed,
        LedgerRequest::VM_UNSHARE_HOST => got == [unmap(Host), None] && !scrubbed,
        LedgerRequest::HOST_DONATE_VM => got == [unmap(Host), map(Vm, rwx)] && scrubbed,
        LedgerRequest::RECLAIM => {
            // A reclaimed page the VM still shared with the host is already
            // mapped for the host; the ledger maps the whole range again.
            got == [unmap(Vm), map(Host, rwx)] && scrubbed
        }
        LedgerRequest::CREATE_VM | LedgerRequest::DESTROY_VM => got == [None, None] && !scrubbed,
        // A table handed to the interrupt controller: the host loses it
        // (the hypervisor's share is the ledger's record, not a mapping),
        // and gets it back scrubbed of what the hardware wrote.
        LedgerRequest::HOST_DONATE_HYP => got == [unmap(Host), None] && scrubbed,
        LedgerRequest::HYP_RETURN_HOST => got == [map(Host, rwx), None] && scrubbed,
        _ => false,
    };
    if allowed {
        Ok(())
    } else {
        Err("a transaction of a shape its request does not allow")
    }
}

/// `pages` frames from `pa`, mapped at `ipa` in a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub ipa: u64,
    pub pa: u64,
    pub pages: u64,
}

impl Region {
    /// One past the last byte of its frames.
    pub fn pa_end(&self) -> u64 {
        self.pa + self.pages * PAGE
    }
}

/// Calls `f(ipa, size)` for the IPA ranges of a VM that hold frames
/// `[pa, pa + size)`, in region order. Fails without calling `f` if a frame
/// is in no region: then the core's record and the ledger disagree.
pub fn ipa_ranges(
    regions: &[Region],
    pa: u64,
    size: u64,
    mut f: impl FnMut(u64, u64),
) -> Result<(), &'static str> {
    let end = pa.checked_add(size).ok_or("frames overflow")?;
    let pieces = || {
        regions.iter().filter_map(move |r| {
            let (lo, hi) = (pa.max(r.pa), end.min(r.pa_end()));
            (lo < hi).then(|| (r.ipa + (lo - r.pa), hi - lo))
        })
    };
    if pieces().map(|(_, n)| n).sum::<u64>() != size {
        return Err("frames the core never mapped for this VM");
    }
    pieces().for_each(|(ipa, n)| f(ipa, n));
    Ok(())
}

/// What is left of region `r` once frames `[pa, pa + size)` are dropped
/// from it: `r` itself if it holds none of them, otherwise the part below
/// them and the part above them (either may be empty).
pub fn cut(r: &Region, pa: u64, size: u64) -> [Option<Region>; 2] {
    let end = pa + size;
    if r.pa_end() <= pa || r.pa >= end {
        return [Some(*r), None];
    }
    let head = (r.pa < pa).then(|| Region {
        ipa: r.ipa,
        pa: r.pa,
        pages: (pa - r.pa) / PAGE,
    });
    let tail = (r.pa_end() > end).then(|| Region {
        ipa: r.ipa + (end - r.pa),
        pa: end,
        pages: (r.pa_end() - end) / PAGE,
    });
    [head, tail]
}

/// Drops frames `[pa, pa + size)` from `regions`, splitting regions that
/// hold them partly; returns the regions left.
pub fn forget_frames(regions: &[Region], pa: u64, size: u64) -> impl Iterator<Item = Region> + '_ {
    regions
        .iter()
        .flat_map(move |r| cut(r, pa, size).into_iter().flatten())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use moat_abi::services::FrameRange;

    pub(crate) const RAM: [Range; 1] = [Range {
        base: 0x4000_0000,
        size: 0x4000_0000,
    }];
    pub(crate) const CARVE: [Range; 1] = [Range {
        base: 0x4020_0000,
        size: 0x0200_0000,
    }];
    const VM: u16 = 3;

    fn party(kind: u32, id: u32) -> Party {
        Party { kind, id }
    }

    fn change(kind: u32, perms: u32, p: Party, start: u64, count: u64) -> LedgerChange {
        LedgerChange {
            kind,
            perms,
            party: p,
            frames: FrameRange { start, count },
        }
    }

    /// A donation of 4 frames at 0x5000_0000 to VM 3, as the ledger answers it.
    fn donation() -> (LedgerRequest, LedgerTransaction) {
        let request = LedgerRequest {
            op: LedgerRequest::HOST_DONATE_VM,
            party: u32::from(VM),
            frames: FrameRange {
                start: 0x50000,
                count: 4,
            },
        };
        let mut tx = LedgerTransaction {
            generation: 7,
            request,
            change_count: 2,
            has_scrub: 1,
            scrub: request.frames,
            ..Default::default()
        };
        tx.changes[0] = change(LedgerChange::UNMAP, 0, party(Party::HOST, 0), 0x50000, 4);
        tx.changes[1] = change(LedgerChange::MAP, 7, party(Party::VM, 3), 0x50000, 4);
        (request, tx)
    }

    #[test]
    fn a_donation_is_accepted_in_order() {
        let (request, tx) = donation();
        let c = check(&request, &tx, Some(VM), &RAM, &CARVE).unwrap();
        let steps: Vec<Step> = c.steps().collect();
        assert_eq!(
            steps,
            [
                Step::Unmap {
                    who: Who::Host,
                    pa: 0x5000_0000,
                    size: 0x4000
                },
                Step::Map {
                    who: Who::Vm,
                    pa: 0x5000_0000,
                    size: 0x4000,
                    perm: Perm::ReadWriteExecute
                }
            ]
        );
        assert_eq!(c.scrub, Some((0x5000_0000, 0x4000)));
    }

    #[test]
    fn an_owner_change_without_scrub_is_refused() {
        let (request, mut tx) = donation();
        tx.has_scrub = 0;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
        let (request, mut tx) = donation();
        tx.scrub.count = 2;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
    }

    #[test]
    fn changes_outside_the_request_or_ram_or_into_the_carve_out_are_refused() {
        let (request, mut tx) = donation();
        tx.changes[1].frames.count = 5;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());

        let (mut request, mut tx) = donation();
        for f in [&mut request.frames, &mut tx.scrub] {
            f.start = 0x40200;
        }
        tx.request = request;
        for c in &mut tx.changes {
            c.frames.start = 0x40200;
        }
        assert_eq!(
            check(&request, &tx, Some(VM), &RAM, &CARVE),
            Err("a change of the hypervisor's own memory")
        );

        let (mut request, mut tx) = donation();
        request.frames.start = 0x1000;
        tx.request = request;
        tx.scrub.start = 0x1000;
        for c in &mut tx.changes {
            c.frames.start = 0x1000;
        }
        assert_eq!(
            check(&request, &tx, Some(VM), &RAM, &CARVE),
            Err("a change of frames that are not RAM")
        );
    }

    #[test]
    fn a_change_for_another_vm_or_a_service_is_refused() {
        let (request, mut tx) = donation();
        tx.changes[1].party.id = 4;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
        let (request, mut tx) = donation();
        tx.changes[1].party = party(Party::SERVICE, 1);
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
        let (request, tx) = donation();
        assert!(check(&request, &tx, None, &RAM, &CARVE).is_err());
    }

    #[test]
    fn malformed_transactions_are_refused() {
        let (request, mut tx) = donation();
        tx.request.frames.count = 3;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
        let (request, mut tx) = donation();
        tx.change_count = 3;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
        let (request, mut tx) = donation();
        tx.changes[1].perms = 2;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
        let (request, mut tx) = donation();
        tx.changes[0].kind = 9;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
        let (request, mut tx) = donation();
        tx.changes.swap(0, 1);
        assert_eq!(
            check(&request, &tx, Some(VM), &RAM, &CARVE),
            Err("an unmap after a map")
        );
        let (request, mut tx) = donation();
        tx.changes[0].frames.start = u64::MAX / 2;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
    }

    #[test]
    fn a_change_of_part_of_the_range_is_refused() {
        // The host keeps frame 1 while the VM maps both: two writers.
        let (request, mut tx) = donation();
        tx.changes[0].frames.count = 1;
        assert_eq!(
            check(&request, &tx, Some(VM), &RAM, &CARVE),
            Err("a change of only part of the requested frames")
        );
        // The unmap and the map name different frames.
        let (request, mut tx) = donation();
        tx.changes[1].frames.start += 1;
        tx.changes[1].frames.count -= 1;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
        // A scrub of part of the range.
        let (request, mut tx) = donation();
        tx.scrub.count = 3;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
    }

    #[test]
    fn a_share_needs_no_scrub() {
        let request = LedgerRequest {
            op: LedgerRequest::VM_SHARE_HOST,
            party: u32::from(VM),
            frames: FrameRange {
                start: 0x50001,
                count: 1,
            },
        };
        let mut tx = LedgerTransaction {
            request,
            change_count: 1,
            ..Default::default()
        };
        tx.changes[0] = change(LedgerChange::MAP, 3, party(Party::HOST, 0), 0x50001, 1);
        let c = check(&request, &tx, Some(VM), &RAM, &CARVE).unwrap();
        assert_eq!(c.scrub, None);
        assert!(matches!(
            c.steps().next(),
            Some(Step::Map {
                who: Who::Host,
                perm: Perm::ReadWrite,
                ..
            })
        ));
    }

    #[test]
    fn each_request_allows_one_shape() {
        // A donation that leaves the host its mapping: two writers.
        let (request, mut tx) = donation();
        tx.changes[0] = change(LedgerChange::MAP, 3, party(Party::HOST, 0), 0x50000, 4);
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
        // A donation presented as a share.
        let (mut request, mut tx) = donation();
        request.op = LedgerRequest::VM_SHARE_HOST;
        tx.request = request;
        assert!(check(&request, &tx, Some(VM), &RAM, &CARVE).is_err());
        // A share that gives the borrower execute permission.
        let request = LedgerRequest {
            op: LedgerRequest::HOST_SHARE_HYP,
            party: 0,
            frames: FrameRange {
                start: 0x50000,
                count: 1,
            },
        };
        let mut tx = LedgerTransaction {
            request,
            change_count: 1,
            ..Default::default()
        };
        tx.changes[0] = change(
            LedgerChange::MAP,
            7,
            party(Party::HYPERVISOR, 0),
            0x50000,
            1,
        );
        assert!(check(&request, &tx, None, &RAM, &CARVE).is_err());
        tx.changes[0].perms = 3;
        assert!(check(&request, &tx, None, &RAM, &CARVE).is_ok());
        // An unknown request kind.
        let mut bad = request;
        bad.op = 99;
        tx.request = bad;
        assert!(check(&bad, &tx, None, &RAM, &CARVE).is_err());
    }

    #[test]
    fn a_table_goes_to_the_hypervisor_and_back_scrubbed() {
        let frames = FrameRange {
            start: 0x50000,
            count: 16,
        };
        let give = LedgerRequest {
            op: LedgerRequest::HOST_DONATE_HYP,
            party: 0,
            frames,
        };
        let mut tx = LedgerTransaction {
            request: give,
            change_count: 1,
            has_scrub: 1,
            scrub: frames,
            ..Default::default()
        };
        tx.changes[0] = change(LedgerChange::UNMAP, 0, party(Party::HOST, 0), 0x50000, 16);
        let c = check(&give, &tx, None, &RAM, &CARVE).unwrap();
        assert_eq!(c.scrub, Some((0x5000_0000, 0x1_0000)));
        // Without the scrub, or leaving the host a mapping: refused.
        tx.has_scrub = 0;
        assert!(check(&give, &tx, None, &RAM, &CARVE).is_err());
        tx.has_scrub = 1;
        tx.changes[0] = change(LedgerChange::MAP, 3, party(Party::HOST, 0), 0x50000, 16);
        assert!(check(&give, &tx, None, &RAM, &CARVE).is_err());
        // The return maps the host again, scrubbed.
        let back = LedgerRequest {
            op: LedgerRequest::HYP_RETURN_HOST,
            ..give
        };
        tx.request = back;
        tx.changes[0] = change(LedgerChange::MAP, 7, party(Party::HOST, 0), 0x50000, 16);
        assert!(check(&back, &tx, None, &RAM, &CARVE).is_ok());
        tx.has_scrub = 0;
        assert!(check(&back, &tx, None, &RAM, &CARVE).is_err());
    }

    #[test]
    fn a_request_without_pages_allows_no_change() {
        let request = LedgerRequest {
            op: LedgerRequest::CREATE_VM,
            party: 1,
            frames: FrameRange::default(),
        };
        let mut tx = LedgerTransaction {
            request,
            ..Default::default()
        };
        assert!(check(&request, &tx, Some(1), &RAM, &CARVE).is_ok());
        tx.change_count = 1;
        tx.changes[0] = change(LedgerChange::UNMAP, 0, party(Party::HOST, 0), 0x50000, 1);
        assert!(check(&request, &tx, Some(1), &RAM, &CARVE).is_err());
    }

    fn regions() -> Vec<Region> {
        vec![
            Region {
                ipa: 0x4000_0000,
                pa: 0x5000_0000,
                pages: 4,
            },
            Region {
                ipa: 0x8000_0000,
                pa: 0x6000_0000,
                pages: 2,
            },
        ]
    }

    #[test]
    fn frames_translate_to_ipa_ranges() {
        let mut out = Vec::new();
        ipa_ranges(&regions(), 0x5000_1000, 0x2000, |i, n| out.push((i, n))).unwrap();
        assert_eq!(out, [(0x4000_1000, 0x2000)]);
        assert!(ipa_ranges(&regions(), 0x5000_3000, 0x2000, |_, _| {}).is_err());
        out.clear();
        ipa_ranges(&regions(), 0x6000_0000, 0x2000, |i, n| out.push((i, n))).unwrap();
        assert_eq!(out, [(0x8000_0000, 0x2000)]);
        assert!(ipa_ranges(&regions(), u64::MAX - 0xfff, 0x2000, |_, _| {}).is_err());
    }

    #[test]
    fn forgetting_frames_splits_regions() {
        let left: Vec<Region> = forget_frames(&regions(), 0x5000_1000, 0x1000).collect();
        assert_eq!(
            left,
            [
                Region {
                    ipa: 0x4000_0000,
                    pa: 0x5000_0000,
                    pages: 1
                },
                Region {
                    ipa: 0x4000_2000,
                    pa: 0x5000_2000,
                    pages: 2
                },
                Region {
                    ipa: 0x8000_0000,
                    pa: 0x6000_0000,
                    pages: 2
                },
            ]
        );
        let left: Vec<Region> = forget_frames(&regions(), 0x5000_0000, 0x4000).collect();
        assert_eq!(left.len(), 1);
        let left: Vec<Region> = forget_frames(&left, 0x6000_0000, 0x2000).collect();
        assert!(left.is_empty());
    }
}
