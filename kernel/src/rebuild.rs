//! Rebuilding the memory ledger after a restart, from the core's own
//! records.
//!
//! A restarted ledger starts from its boot state (the RAM, the carve-out the
//! hypervisor keeps, everything else the host's). The core then tells it,
//! as ordinary requests, what its own tables and records show, and reads
//! nothing back from the ledger that was stopped:
//!
//! | fact the core holds | request replayed |
//! |---|---|
//! | a VM exists (its slot) | `CREATE_VM` |
//! | a VM's region: frames mapped in its stage-2 at an IPA | `HOST_DONATE_VM` of those frames |
//! | a VM's frame the host's stage-2 maps too | `VM_SHARE_HOST` |
//! | a range in the core's record of host→hypervisor shares | `HOST_SHARE_HYP` |
//! | RAM outside the carve-out that neither the host's stage-2 maps nor any VM holds | `HOST_DONATE_HYP` (a table the host handed to the interrupt controller) |
//! | a VM destroyed, its pages awaiting reclaim | `DESTROY_VM` |
//!
//! The ledger checks each replayed request as it checks any other, so a
//! set of facts that contradicts itself (two VMs holding one frame, say) is
//! refused rather than recorded. The requests are only recorded, never
//! applied: the tables already are in that state.

use moat_abi::services::{FrameRange, LedgerRequest};

use crate::txcheck::Region;

const PAGE: u64 = 4096;

/// What the core knows of one VM.
#[derive(Clone, Copy, Debug)]
pub struct VmFacts<'a> {
    /// Its handle.
    pub handle: u16,
    /// Destroyed: its pages await reclaim.
    pub dying: bool,
    /// Where its frames sit in its IPA space.
    pub regions: &'a [Region],
}

/// Everything the rebuild reads, all of it the core's own. Ranges are in
/// bytes, page-aligned.
#[derive(Clone, Copy, Debug)]
pub struct Facts<'a> {
    /// The machine's RAM banks.
    pub ram: &'a [(u64, u64)],
    /// The hypervisor's carve-out (the ledger's boot hypervisor ranges).
    pub carve_out: &'a [(u64, u64)],
    /// The RAM the host's stage-2 maps, sorted, not overlapping.
    pub host_mapped: &'a [(u64, u64)],
    /// Every VM.
    pub vms: &'a [VmFacts<'a>],
    /// The core's record of host pages shared with the hypervisor.
    pub hyp_shares: &'a [(u64, u64)],
}

/// Calls `f` with each part of `[start, end)` that no range of `holes`
/// covers, in ascending order. Quadratic in the holes, which are few.
fn uncovered<I, E>(
    start: u64,
    end: u64,
    holes: impl Fn() -> I,
    mut f: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E>
where
    I: Iterator<Item = (u64, u64)>,
{
    let mut at = start;
    while at < end {
        if let Some(h_end) = holes()
            .filter(|&(b, s)| b <= at && at < b.saturating_add(s))
            .map(|(b, s)| b.saturating_add(s))
            .max()
        {
            at = h_end;
            continue;
        }
        let next = holes()
            .map(|(b, _)| b)
            .filter(|&b| b > at && b < end)
            .min()
            .unwrap_or(end);
        f(at, next)?;
        at = next;
    }
    Ok(())
}

/// Calls `f` with each part of `[start, end)` some range of `over` covers.
fn covered<E>(
    start: u64,
    end: u64,
    over: &[(u64, u64)],
    mut f: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    for &(b, s) in over {
        let (lo, hi) = (b.max(start), b.saturating_add(s).min(end));
        if lo < hi {
            f(lo, hi)?;
        }
    }
    Ok(())
}

fn frames(start: u64, end: u64) -> FrameRange {
    FrameRange {
        start: start / PAGE,
        count: (end - start) / PAGE,
    }
}

/// The requests that bring a ledger fresh from boot to the state `facts`
/// describe, in an order the ledger accepts: VMs created, their frames
/// donated, then shared; host shares with the hypervisor; the hypervisor's
/// donated tables; destroyed VMs marked dying last (a dying VM takes no
/// donation). Stops at the first error `emit` returns.
pub fn replay<E>(
    facts: &Facts<'_>,
    mut emit: impl FnMut(LedgerRequest) -> Result<(), E>,
) -> Result<(), E> {
    let request = |op, party, frames| LedgerRequest { op, party, frames };
    for vm in facts.vms {
        emit(request(
            LedgerRequest::CREATE_VM,
            u32::from(vm.handle),
            FrameRange::default(),
        ))?;
    }
    for vm in facts.vms {
        for r in vm.regions {
            emit(request(
                LedgerRequest::HOST_DONATE_VM,
                u32::from(vm.handle),
                frames(r.pa, r.pa_end()),
            ))?;
        }
    }
    for vm in facts.vms {
        for r in vm.regions {
            covered(r.pa, r.pa_end(), facts.host_mapped, |a, b| {
                emit(request(
                    LedgerRequest::VM_SHARE_HOST,
                    u32::from(vm.handle),
                    frames(a, b),
                ))
            })?;
        }
    }
    for &(b, s) in facts.hyp_shares {
        emit(request(LedgerRequest::HOST_SHARE_HYP, 0, frames(b, b + s)))?;
    }
    // What no one maps and no VM holds, outside the carve-out, is the
    // hypervisor's by donation.
    let taken = || {
        facts
            .carve_out
            .iter()
            .chain(facts.host_mapped)
            .copied()
            .chain(
                facts
                    .vms
                    .iter()
                    .flat_map(|vm| vm.regions.iter().map(|r| (r.pa, r.pages * PAGE))),
            )
    };
    for &(base, size) in facts.ram {
        uncovered(base, base.saturating_add(size), taken, |a, b| {
            emit(request(LedgerRequest::HOST_DONATE_HYP, 0, frames(a, b)))
        })?;
    }
    for vm in facts.vms.iter().filter(|vm| vm.dying) {
        emit(request(
            LedgerRequest::DESTROY_VM,
            u32::from(vm.handle),
            FrameRange::default(),
        ))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The rebuild against the ledger itself: a ledger is driven into a
    //! state, the core's facts are read off that state as the core's tables
    //! would show it, and the replay into a fresh ledger must give back the
    //! same state.

    use super::*;
    use moat_ledger::{Extent, Ledger, Op, Owner, PfnRange, VmStatus, wire};

    type Big = Ledger<alloc_free::Buf>;

    mod alloc_free {
        use moat_ledger::Extent;
        /// A heap-free extent buffer big enough for the tests.
        pub struct Buf(pub [Extent; 256]);
        impl AsRef<[Extent]> for Buf {
            fn as_ref(&self) -> &[Extent] {
                &self.0
            }
        }
        impl AsMut<[Extent]> for Buf {
            fn as_mut(&mut self) -> &mut [Extent] {
                &mut self.0
            }
        }
    }

    const RAM: [(u64, u64); 2] = [(0x4000_0000, 0x100_0000), (0x8000_0000, 0x40_0000)];
    const CARVE: [(u64, u64); 1] = [(0x4080_0000, 0x20_0000)];

    fn fresh() -> Big {
        let pfns = |r: &[(u64, u64)]| -> Vec<PfnRange> {
            r.iter()
                .map(|&(b, s)| PfnRange::new(b / PAGE, s / PAGE))
                .collect()
        };
        Ledger::new(
            alloc_free::Buf([Extent::EMPTY; 256]),
            &pfns(&RAM),
            &pfns(&CARVE),
        )
        .unwrap()
    }

    fn pfn(pa: u64) -> u64 {
        pa / PAGE
    }

    /// A ledger in every kind of state: VMs alive and dying, with and
    /// without pages, pages shared both ways, tables donated to the
    /// hypervisor.
    fn busy() -> Big {
        let mut l = fresh();
        for vm in [1, 2, 3, 5] {
            l.execute(Op::CreateVm { vm }).unwrap();
        }
        let donate = |l: &mut Big, pa: u64, n: u64, vm: u16| {
            l.execute(Op::HostDonateVm {
                range: PfnRange::new(pfn(pa), n),
                vm,
            })
            .unwrap();
        };
        donate(&mut l, 0x4010_0000, 16, 1);
        donate(&mut l, 0x4012_0000, 4, 1);
        donate(&mut l, 0x4020_0000, 32, 2);
        donate(&mut l, 0x8000_0000, 8, 3);
        l.execute(Op::VmShareHost {
            vm: 1,
            range: PfnRange::new(pfn(0x4010_3000), 2),
        })
        .unwrap();
        l.execute(Op::VmShareHost {
            vm: 2,
            range: PfnRange::new(pfn(0x4020_0000), 1),
        })
        .unwrap();
        l.execute(Op::HostShareHyp {
            range: PfnRange::new(pfn(0x4030_0000), 3),
        })
        .unwrap();
        l.execute(Op::HostDonateHyp {
            range: PfnRange::new(pfn(0x4040_0000), 16),
        })
        .unwrap();
        l.execute(Op::HostDonateHyp {
            range: PfnRange::new(pfn(0x8010_0000), 1),
        })
        .unwrap();
        // VM 2 destroyed, half reclaimed; VM 3 destroyed with its share
        // of nothing; VM 5 alive without pages.
        l.execute(Op::DestroyVm { vm: 2 }).unwrap();
        l.execute(Op::Reclaim {
            vm: 2,
            range: PfnRange::new(pfn(0x4021_0000), 16),
        })
        .unwrap();
        l.execute(Op::DestroyVm { vm: 3 }).unwrap();
        l.check_invariants().unwrap();
        l
    }

    /// What the core's tables show of `l`'s state: the host maps what it
    /// owns or borrows; each VM's regions hold what it owns (at made-up
    /// IPAs); the core records the host's shares with the hypervisor.
    struct CoreView {
        host_mapped: Vec<(u64, u64)>,
        regions: Vec<(u16, bool, Vec<Region>)>,
        hyp_shares: Vec<(u64, u64)>,
    }

    fn core_view(l: &Big) -> CoreView {
        let bytes = |e: &Extent| (e.start * PAGE, e.count * PAGE);
        let mut host_mapped: Vec<(u64, u64)> = Vec::new();
        let mut hyp_shares = Vec::new();
        let mut regions: Vec<(u16, bool, Vec<Region>)> = l
            .vms()
            .map(|r| (r.vm, r.status == VmStatus::Dying, Vec::new()))
            .collect();
        for e in l.extents() {
            let (b, s) = bytes(e);
            if e.owner == Owner::Host || e.borrower == Some(Owner::Host) {
                match host_mapped.last_mut() {
                    Some(last) if last.0 + last.1 == b => last.1 += s,
                    _ => host_mapped.push((b, s)),
                }
            }
            if e.owner == Owner::Host && e.borrower == Some(Owner::Hypervisor) {
                hyp_shares.push((b, s));
            }
            if let Owner::Vm(vm) = e.owner {
                let at = regions.iter_mut().find(|r| r.0 == vm).unwrap();
                at.2.push(Region {
                    ipa: 0x1000_0000 + b,
                    pa: b,
                    pages: e.count,
                });
            }
        }
        CoreView {
            host_mapped,
            regions,
            hyp_shares,
        }
    }

    fn rebuild(view: &CoreView, skip: Option<u32>) -> Result<Big, (LedgerRequest, String)> {
        let vms: Vec<VmFacts<'_>> = view
            .regions
            .iter()
            .map(|(handle, dying, regions)| VmFacts {
                handle: *handle,
                dying: *dying,
                regions,
            })
            .collect();
        let facts = Facts {
            ram: &RAM,
            carve_out: &CARVE,
            host_mapped: &view.host_mapped,
            vms: &vms,
            hyp_shares: &view.hyp_shares,
        };
        let mut l = fresh();
        replay(&facts, |request| {
            if Some(request.op) == skip {
                return Ok(());
            }
            let op = wire::op_of(&request).ok_or((request, "not a request".into()))?;
            l.execute(op)
                .map(|_| ())
                .map_err(|e| (request, format!("{e:?}")))
        })?;
        Ok(l)
    }

    fn same_state(a: &Big, b: &Big) -> bool {
        let mut va: Vec<_> = a.vms().collect();
        let mut vb: Vec<_> = b.vms().collect();
        va.sort_by_key(|r| r.vm);
        vb.sort_by_key(|r| r.vm);
        a.extents() == b.extents() && va == vb
    }

    #[test]
    fn a_rebuilt_ledger_equals_the_one_it_replaces() {
        let before = busy();
        let after = rebuild(&core_view(&before), None).unwrap();
        after.check_invariants().unwrap();
        assert!(same_state(&before, &after), "{before:?}\n{after:?}");
        // And from boot: nothing to replay but the boot state.
        let boot = fresh();
        assert!(same_state(
            &boot,
            &rebuild(&core_view(&boot), None).unwrap()
        ));
    }

    #[test]
    fn a_rebuild_that_misses_a_class_of_page_differs() {
        let before = busy();
        for op in [
            LedgerRequest::CREATE_VM,
            LedgerRequest::HOST_DONATE_VM,
            LedgerRequest::VM_SHARE_HOST,
            LedgerRequest::HOST_SHARE_HYP,
            LedgerRequest::HOST_DONATE_HYP,
            LedgerRequest::DESTROY_VM,
        ] {
            // Either the ledger refuses the rest of the replay, or the
            // state it ends in is not the one before.
            if let Ok(after) = rebuild(&core_view(&before), Some(op)) {
                assert!(
                    !same_state(&before, &after),
                    "skipping op {op} went unnoticed"
                );
            }
        }
    }

    #[test]
    fn contradicting_facts_are_refused() {
        let before = busy();
        let mut view = core_view(&before);
        // VM 5 claims VM 1's first frame too.
        let stolen = view.regions.iter().find(|r| r.0 == 1).unwrap().2[0];
        view.regions
            .iter_mut()
            .find(|r| r.0 == 5)
            .unwrap()
            .2
            .push(stolen);
        let (request, _) = rebuild(&view, None).unwrap_err();
        assert_eq!(request.op, LedgerRequest::HOST_DONATE_VM);
        assert_eq!(request.party, 5);
    }

    #[test]
    fn uncovered_parts() {
        let holes = [(10u64, 5u64), (20, 10), (12, 10)];
        let mut out = Vec::new();
        uncovered(
            0,
            40,
            || holes.iter().copied(),
            |a, b| {
                out.push((a, b));
                Ok::<(), ()>(())
            },
        )
        .unwrap();
        assert_eq!(out, [(0, 10), (30, 40)]);
    }
}
