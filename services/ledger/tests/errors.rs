//! Refusals: every way a request can be wrong gets its typed error, and a
//! refused request (or a refused commit) changes nothing.

use moat_ledger::{
    Extent, Ledger, LedgerError, MAX_BOOT_RANGES, MAX_VMS, Op, Owner, PAGE_SIZE, PfnRange,
};

type TestLedger = Ledger<Vec<Extent>>;

/// 1 GiB of RAM at 0x4000_0000 with a 2 MiB hypervisor carve-out at
/// 0x4020_0000 and a 1 MiB service region right after it.
const RAM: PfnRange = PfnRange::new(0x40000, 0x40000);
const HYP: PfnRange = PfnRange::new(0x40200, 0x200);
const SVC: PfnRange = PfnRange::new(0x40400, 0x100);
const RAM_END: u64 = 0x80000;
const P: u64 = 0x50000;

fn ledger() -> TestLedger {
    let mut l = Ledger::new(vec![Extent::EMPTY; 256], &[RAM], &[HYP]).unwrap();
    l.execute(Op::DonateService {
        range: SVC,
        service: 1,
    })
    .unwrap();
    for vm in 1..=2 {
        l.execute(Op::CreateVm { vm }).unwrap();
    }
    l
}

/// Prepares `op`, expects `err`, and checks the ledger did not change;
/// `execute` (prepare + commit) must refuse the same way.
#[track_caller]
fn refused(l: &mut TestLedger, op: Op, err: LedgerError) {
    let before = l.clone();
    assert_eq!(l.prepare(op), Err(err), "{op:?}");
    assert_eq!(*l, before);
    assert_eq!(l.execute(op), Err(err), "{op:?}");
    assert_eq!(*l, before);
    l.check_invariants().unwrap();
}

#[test]
fn donate_the_same_page_twice() {
    let mut l = ledger();
    l.host_donate_vm(P, 4, 1)
        .and_then(|tx| l.commit(&tx))
        .unwrap();
    let again = Op::HostDonateVm {
        range: PfnRange::new(P, 1),
        vm: 1,
    };
    refused(&mut l, again, LedgerError::PageNotOwned { pfn: P });
    // To another VM, and overlapping from below: the first donated page is named.
    let overlap = Op::HostDonateVm {
        range: PfnRange::new(P - 2, 4),
        vm: 2,
    };
    refused(&mut l, overlap, LedgerError::PageNotOwned { pfn: P });
}

#[test]
fn donate_hypervisor_or_service_memory() {
    let mut l = ledger();
    for (what, pfn) in [
        ("hypervisor", HYP.start),
        ("hypervisor end", HYP.start + HYP.count - 1),
        ("service", SVC.start),
    ] {
        for op in [
            Op::HostDonateVm {
                range: PfnRange::new(pfn, 1),
                vm: 1,
            },
            Op::DonateService {
                range: PfnRange::new(pfn, 1),
                service: 2,
            },
            Op::HostShareHyp {
                range: PfnRange::new(pfn, 1),
            },
        ] {
            let before = l.clone();
            assert_eq!(
                l.prepare(op),
                Err(LedgerError::PageNotOwned { pfn }),
                "{what}"
            );
            assert_eq!(l, before);
        }
    }
    // A range that runs from host memory into the carve-out names its first page.
    refused(
        &mut l,
        Op::HostDonateVm {
            range: PfnRange::new(HYP.start - 8, 16),
            vm: 1,
        },
        LedgerError::PageNotOwned { pfn: HYP.start },
    );
}

#[test]
fn overflowing_and_out_of_ram_ranges() {
    let mut l = ledger();
    let donate = |start, count| Op::HostDonateVm {
        range: PfnRange::new(start, count),
        vm: 1,
    };
    refused(&mut l, donate(u64::MAX, 2), LedgerError::Overflow);
    refused(&mut l, donate(P, u64::MAX), LedgerError::Overflow);
    refused(
        &mut l,
        donate(RAM_END - 1, 2),
        LedgerError::OutOfRam { pfn: RAM_END },
    );
    refused(
        &mut l,
        donate(RAM_END, 1),
        LedgerError::OutOfRam { pfn: RAM_END },
    );
    refused(&mut l, donate(0, 1), LedgerError::OutOfRam { pfn: 0 });
    refused(
        &mut l,
        donate(RAM.start - 1, 2),
        LedgerError::OutOfRam { pfn: RAM.start - 1 },
    );
    refused(
        &mut l,
        donate(u64::MAX - 1, 1),
        LedgerError::OutOfRam { pfn: u64::MAX - 1 },
    );
    // Every range-taking operation checks the shape first.
    for op in [
        Op::HostShareHyp {
            range: PfnRange::new(u64::MAX, 2),
        },
        Op::HostUnshareHyp {
            range: PfnRange::new(u64::MAX, 2),
        },
        Op::VmShareHost {
            vm: 9,
            range: PfnRange::new(u64::MAX, 2),
        },
        Op::VmUnshareHost {
            vm: 9,
            range: PfnRange::new(u64::MAX, 2),
        },
        Op::Reclaim {
            vm: 9,
            range: PfnRange::new(u64::MAX, 2),
        },
        Op::DonateService {
            range: PfnRange::new(u64::MAX, 2),
            service: 0,
        },
    ] {
        refused(&mut l, op, LedgerError::Overflow);
    }
}

#[test]
fn zero_length_and_unaligned_ranges() {
    let mut l = ledger();
    for op in [
        Op::HostShareHyp {
            range: PfnRange::new(P, 0),
        },
        Op::HostUnshareHyp {
            range: PfnRange::new(P, 0),
        },
        Op::HostDonateVm {
            range: PfnRange::new(P, 0),
            vm: 1,
        },
        Op::VmShareHost {
            vm: 1,
            range: PfnRange::new(P, 0),
        },
        Op::VmUnshareHost {
            vm: 1,
            range: PfnRange::new(P, 0),
        },
        Op::Reclaim {
            vm: 1,
            range: PfnRange::new(P, 0),
        },
        Op::DonateService {
            range: PfnRange::new(P, 0),
            service: 0,
        },
    ] {
        refused(&mut l, op, LedgerError::ZeroLength);
    }
    // Byte addresses are converted at the boundary, and checked there.
    let base = P * PAGE_SIZE;
    assert_eq!(
        PfnRange::from_bytes(base, 3 * PAGE_SIZE),
        Ok(PfnRange::new(P, 3))
    );
    assert_eq!(
        PfnRange::from_bytes(base + 8, PAGE_SIZE),
        Err(LedgerError::Unaligned)
    );
    assert_eq!(
        PfnRange::from_bytes(base, PAGE_SIZE + 1),
        Err(LedgerError::Unaligned)
    );
    assert_eq!(PfnRange::from_bytes(base, 0), Err(LedgerError::ZeroLength));
    assert_eq!(
        PfnRange::from_bytes(u64::MAX - PAGE_SIZE + 1, PAGE_SIZE),
        Err(LedgerError::Overflow)
    );
}

#[test]
fn reclaim_refusals() {
    let mut l = ledger();
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P, 8),
        vm: 1,
    })
    .unwrap();
    let reclaim = |vm, start, count| Op::Reclaim {
        vm,
        range: PfnRange::new(start, count),
    };
    // While the VM runs.
    refused(&mut l, reclaim(1, P, 8), LedgerError::VmAlive(1));
    // A VM that does not exist.
    refused(&mut l, reclaim(7, P, 8), LedgerError::NoSuchVm(7));
    l.execute(Op::DestroyVm { vm: 1 }).unwrap();
    // Never donated: host memory, hypervisor memory, another VM's memory.
    refused(
        &mut l,
        reclaim(1, P + 8, 1),
        LedgerError::PageNotOwned { pfn: P + 8 },
    );
    refused(
        &mut l,
        reclaim(1, HYP.start, 1),
        LedgerError::PageNotOwned { pfn: HYP.start },
    );
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P + 100, 1),
        vm: 2,
    })
    .unwrap();
    refused(
        &mut l,
        reclaim(1, P + 100, 1),
        LedgerError::PageNotOwned { pfn: P + 100 },
    );
    // More than was donated.
    refused(
        &mut l,
        reclaim(1, P, 9),
        LedgerError::PageNotOwned { pfn: P + 8 },
    );
    // Part of it, then the rest; the VM goes with its last page.
    let tx = l.reclaim(1, P + 2, 3).unwrap();
    assert_eq!(tx.scrub(), Some(PfnRange::new(P + 2, 3)));
    l.commit(&tx).unwrap();
    assert_eq!(l.vm(1).map(|r| r.pages), Some(5));
    refused(
        &mut l,
        reclaim(1, P, 8),
        LedgerError::PageNotOwned { pfn: P + 2 },
    );
    l.execute(reclaim(1, P, 2)).unwrap();
    l.execute(reclaim(1, P + 5, 3)).unwrap();
    assert_eq!(l.vm(1), None);
    refused(&mut l, reclaim(1, P, 1), LedgerError::NoSuchVm(1));
    l.check_invariants().unwrap();
}

#[test]
fn unshare_what_was_never_shared() {
    let mut l = ledger();
    refused(
        &mut l,
        Op::HostUnshareHyp {
            range: PfnRange::new(P, 1),
        },
        LedgerError::PageNotShared { pfn: P },
    );
    l.execute(Op::HostShareHyp {
        range: PfnRange::new(P, 2),
    })
    .unwrap();
    // Partly shared: the first page that is not.
    refused(
        &mut l,
        Op::HostUnshareHyp {
            range: PfnRange::new(P, 3),
        },
        LedgerError::PageNotShared { pfn: P + 2 },
    );
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P + 10, 2),
        vm: 1,
    })
    .unwrap();
    refused(
        &mut l,
        Op::VmUnshareHost {
            vm: 1,
            range: PfnRange::new(P + 10, 1),
        },
        LedgerError::PageNotShared { pfn: P + 10 },
    );
    // Unsharing another VM's page.
    l.execute(Op::VmShareHost {
        vm: 1,
        range: PfnRange::new(P + 10, 1),
    })
    .unwrap();
    refused(
        &mut l,
        Op::VmUnshareHost {
            vm: 2,
            range: PfnRange::new(P + 10, 1),
        },
        LedgerError::PageNotOwned { pfn: P + 10 },
    );
}

#[test]
fn share_with_hyp_then_donate() {
    let mut l = ledger();
    l.execute(Op::HostShareHyp {
        range: PfnRange::new(P + 1, 1),
    })
    .unwrap();
    for op in [
        Op::HostDonateVm {
            range: PfnRange::new(P, 4),
            vm: 1,
        },
        Op::DonateService {
            range: PfnRange::new(P, 4),
            service: 3,
        },
        Op::HostShareHyp {
            range: PfnRange::new(P, 4),
        },
    ] {
        refused(&mut l, op, LedgerError::PageShared { pfn: P + 1 });
    }
    l.execute(Op::HostUnshareHyp {
        range: PfnRange::new(P + 1, 1),
    })
    .unwrap();
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P, 4),
        vm: 1,
    })
    .unwrap();
}

#[test]
fn guest_shares_a_page_it_does_not_own() {
    let mut l = ledger();
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P, 4),
        vm: 1,
    })
    .unwrap();
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P + 4, 4),
        vm: 2,
    })
    .unwrap();
    let share = |vm, start, count| Op::VmShareHost {
        vm,
        range: PfnRange::new(start, count),
    };
    // Host memory, hypervisor memory, service memory, another VM's memory.
    refused(
        &mut l,
        share(1, P + 100, 1),
        LedgerError::PageNotOwned { pfn: P + 100 },
    );
    refused(
        &mut l,
        share(1, HYP.start, 1),
        LedgerError::PageNotOwned { pfn: HYP.start },
    );
    refused(
        &mut l,
        share(1, SVC.start, 1),
        LedgerError::PageNotOwned { pfn: SVC.start },
    );
    refused(
        &mut l,
        share(1, P + 2, 4),
        LedgerError::PageNotOwned { pfn: P + 4 },
    );
    // Twice.
    l.execute(share(1, P, 2)).unwrap();
    refused(
        &mut l,
        share(1, P + 1, 2),
        LedgerError::PageShared { pfn: P + 1 },
    );
    // A VM that does not exist, and one being destroyed.
    refused(&mut l, share(5, P, 1), LedgerError::NoSuchVm(5));
    l.execute(Op::DestroyVm { vm: 2 }).unwrap();
    refused(&mut l, share(2, P + 4, 1), LedgerError::VmDying(2));
    refused(
        &mut l,
        Op::VmUnshareHost {
            vm: 2,
            range: PfnRange::new(P + 4, 1),
        },
        LedgerError::VmDying(2),
    );
}

#[test]
fn donate_to_a_vm_that_is_not_alive() {
    let mut l = ledger();
    let donate = |vm| Op::HostDonateVm {
        range: PfnRange::new(P, 1),
        vm,
    };
    refused(&mut l, donate(3), LedgerError::NoSuchVm(3));
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P + 1, 1),
        vm: 1,
    })
    .unwrap();
    l.execute(Op::DestroyVm { vm: 1 }).unwrap();
    refused(&mut l, donate(1), LedgerError::VmDying(1));
    refused(&mut l, Op::DestroyVm { vm: 1 }, LedgerError::VmDying(1));
    refused(&mut l, Op::CreateVm { vm: 1 }, LedgerError::VmExists(1));
    refused(&mut l, Op::DestroyVm { vm: 3 }, LedgerError::NoSuchVm(3));
}

#[test]
fn the_vm_table_fills_up() {
    let mut l = ledger();
    for vm in 3..=MAX_VMS as u16 {
        l.execute(Op::CreateVm { vm }).unwrap();
    }
    refused(&mut l, Op::CreateVm { vm: 1000 }, LedgerError::TooManyVms);
    refused(&mut l, Op::CreateVm { vm: 5 }, LedgerError::VmExists(5));
    l.execute(Op::DestroyVm { vm: 5 }).unwrap();
    l.execute(Op::CreateVm { vm: 1000 }).unwrap();
    l.check_invariants().unwrap();
}

#[test]
fn a_stale_transaction_is_refused() {
    let mut l = ledger();
    let a = l.host_donate_vm(P, 1, 1).unwrap();
    let b = l.host_donate_vm(P, 1, 2).unwrap();
    let c = l.host_share_hyp(P + 1, 1).unwrap();
    assert_eq!(a.generation(), l.generation());
    l.commit(&a).unwrap();
    let after = l.clone();
    // Conflicting, and not conflicting: both were prepared before `a`
    // committed, so both are refused; the core prepares again.
    assert_eq!(l.commit(&b), Err(LedgerError::Stale));
    assert_eq!(l.commit(&c), Err(LedgerError::Stale));
    assert_eq!(l.commit(&a), Err(LedgerError::Stale));
    assert_eq!(l, after);
    assert_eq!(
        l.host_donate_vm(P, 1, 2),
        Err(LedgerError::PageNotOwned { pfn: P })
    );
    let c = l.host_share_hyp(P + 1, 1).unwrap();
    l.commit(&c).unwrap();
    l.check_invariants().unwrap();
}

#[test]
fn a_transaction_from_another_ledger_is_refused() {
    let mut l = ledger();
    let mut other = ledger();
    other
        .execute(Op::HostDonateVm {
            range: PfnRange::new(P, 1),
            vm: 1,
        })
        .unwrap();
    l.execute(Op::HostShareHyp {
        range: PfnRange::new(P + 50, 1),
    })
    .unwrap();
    // Same generation, different state: the commit derives the transaction
    // again from this ledger's state and refuses.
    let tx = other.vm_share_host(1, P, 1).unwrap();
    assert_eq!(tx.generation(), l.generation());
    let before = l.clone();
    assert_eq!(l.commit(&tx), Err(LedgerError::PageNotOwned { pfn: P }));
    assert_eq!(l, before);
}

#[test]
fn a_full_extent_buffer_refuses_and_changes_nothing() {
    // Boot needs 3 extents; each scattered single page adds 2.
    let mut l = Ledger::new([Extent::EMPTY; 7], &[RAM], &[HYP]).unwrap();
    l.execute(Op::CreateVm { vm: 1 }).unwrap();
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P, 1),
        vm: 1,
    })
    .unwrap();
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P + 10, 1),
        vm: 1,
    })
    .unwrap();
    assert_eq!(l.extents().len(), 7);
    let before = l.clone();
    assert_eq!(
        l.host_donate_vm(P + 20, 1, 1),
        Err(LedgerError::OutOfCapacity)
    );
    assert_eq!(l.host_share_hyp(P + 5, 1), Err(LedgerError::OutOfCapacity));
    assert!(l == before);
    // Merging operations still fit: a neighbour of a donated page.
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P + 1, 1),
        vm: 1,
    })
    .unwrap();
    // Other refusals come first.
    assert_eq!(
        l.host_donate_vm(P, 1, 1),
        Err(LedgerError::PageNotOwned { pfn: P })
    );
    l.check_invariants().unwrap();
}

#[test]
fn boot_layout_refusals() {
    let new = |ram: &[PfnRange], hyp: &[PfnRange]| {
        Ledger::new(vec![Extent::EMPTY; 16], ram, hyp).map(|_| ())
    };
    assert_eq!(
        new(&[RAM, PfnRange::new(RAM_END - 1, 4)], &[]),
        Err(LedgerError::RamOverlap)
    );
    assert_eq!(
        new(&[PfnRange::new(0, 0)], &[]),
        Err(LedgerError::ZeroLength)
    );
    assert_eq!(
        new(&[PfnRange::new(u64::MAX, 2)], &[]),
        Err(LedgerError::Overflow)
    );
    assert_eq!(
        new(&[RAM], &[PfnRange::new(RAM_END - 1, 2)]),
        Err(LedgerError::HypervisorOutsideRam { pfn: RAM_END })
    );
    assert_eq!(
        new(&[RAM], &[PfnRange::new(0x1000, 1)]),
        Err(LedgerError::HypervisorOutsideRam { pfn: 0x1000 })
    );
    assert_eq!(
        new(&[RAM], &[PfnRange::new(RAM.start, 0)]),
        Err(LedgerError::ZeroLength)
    );
    let many = [RAM; MAX_BOOT_RANGES + 1];
    assert_eq!(new(&many, &[]), Err(LedgerError::TooManyRanges));
    assert_eq!(new(&[RAM], &many), Err(LedgerError::TooManyRanges));
    assert_eq!(
        Ledger::new([Extent::EMPTY; 2], &[RAM], &[HYP]).map(|_| ()),
        Err(LedgerError::OutOfCapacity)
    );
    // A hole between banks is not RAM; touching banks make one extent;
    // banks may come in any order.
    let l = Ledger::new(
        vec![Extent::EMPTY; 16],
        &[
            PfnRange::new(0x300, 0x100),
            PfnRange::new(0x100, 0x100),
            PfnRange::new(0x200, 0x80),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(l.extents().len(), 2);
    assert_eq!(l.page(0x27f), Some((Owner::Host, None)));
    assert_eq!(l.page(0x280), None);
    assert_eq!(
        l.host_share_hyp(0x270, 0x20),
        Err(LedgerError::OutOfRam { pfn: 0x280 })
    );
    l.check_invariants().unwrap();
}

#[test]
fn failed_operations_change_nothing() {
    // A ledger in a busy state, then a volley of refused requests of every
    // kind; the ledger, its generation included, must be exactly as before.
    let mut l = ledger();
    l.execute(Op::HostShareHyp {
        range: PfnRange::new(P, 4),
    })
    .unwrap();
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P + 8, 8),
        vm: 1,
    })
    .unwrap();
    l.execute(Op::VmShareHost {
        vm: 1,
        range: PfnRange::new(P + 10, 2),
    })
    .unwrap();
    l.execute(Op::HostDonateVm {
        range: PfnRange::new(P + 20, 8),
        vm: 2,
    })
    .unwrap();
    l.execute(Op::DestroyVm { vm: 2 }).unwrap();
    let before = l.clone();
    let r = PfnRange::new;
    let refusals = [
        Op::HostShareHyp { range: r(P, 8) },
        Op::HostShareHyp { range: r(P + 4, 6) },
        Op::HostUnshareHyp { range: r(P, 5) },
        Op::HostUnshareHyp { range: r(P + 8, 1) },
        Op::HostDonateVm {
            range: r(P + 3, 2),
            vm: 1,
        },
        Op::HostDonateVm {
            range: r(P + 4, 20),
            vm: 1,
        },
        Op::HostDonateVm {
            range: r(P + 30, 2),
            vm: 2,
        },
        Op::VmShareHost {
            vm: 1,
            range: r(P + 8, 8),
        },
        Op::VmShareHost {
            vm: 1,
            range: r(P + 14, 4),
        },
        Op::VmUnshareHost {
            vm: 1,
            range: r(P + 9, 2),
        },
        Op::VmUnshareHost {
            vm: 1,
            range: r(P + 10, 3),
        },
        Op::Reclaim {
            vm: 1,
            range: r(P + 8, 1),
        },
        Op::Reclaim {
            vm: 2,
            range: r(P + 19, 9),
        },
        Op::Reclaim {
            vm: 2,
            range: r(P + 20, 9),
        },
        Op::DonateService {
            range: r(P + 2, 1),
            service: 4,
        },
        Op::DonateService {
            range: r(RAM_END - 1, 2),
            service: 4,
        },
        Op::CreateVm { vm: 1 },
        Op::CreateVm { vm: 2 },
        Op::DestroyVm { vm: 2 },
        Op::DestroyVm { vm: 9 },
    ];
    for op in refusals {
        assert!(l.prepare(op).is_err(), "{op:?} was accepted");
        assert!(l.execute(op).is_err(), "{op:?} was accepted");
        assert_eq!(l, before, "{op:?}");
    }
    l.check_invariants().unwrap();
}
