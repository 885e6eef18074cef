//! Every operation from every page state, on a small fixture: the exact
//! result (the transaction, or the error) and the exact state of the page
//! for every party afterwards.

use moat_ledger::{
    Change, Extent, Ledger, LedgerError, Op, Owner, PageState, Perms, PfnRange, VmRecord, VmStatus,
};

type TestLedger = Ledger<[Extent; 64]>;

const VM1: u16 = 1;
const VM2: u16 = 2;
const VM3: u16 = 3;
const SVC: u16 = 7;

/// The fixture's pages, one per state.
const HOST: u64 = 0x100;
const HYP_SHARED: u64 = 0x102;
const VM1_OWNED: u64 = 0x104;
const VM1_SHARED: u64 = 0x106;
const DEAD: u64 = 0x108;
const DEAD_SHARED: u64 = 0x10a;
const SERVICE: u64 = 0x10c;
const HYPERVISOR: u64 = 0x10f;
const OUTSIDE: u64 = 0x200;

const PAGES: [(&str, u64); 9] = [
    ("host owned", HOST),
    ("shared with hyp", HYP_SHARED),
    ("donated to VM1", VM1_OWNED),
    ("VM1 shared back", VM1_SHARED),
    ("VM2 destroyed", DEAD),
    ("VM2 destroyed, shared back", DEAD_SHARED),
    ("service owned", SERVICE),
    ("hypervisor owned", HYPERVISOR),
    ("outside RAM", OUTSIDE),
];

/// The parties whose view the table asserts, in this order.
const PARTIES: [Owner; 5] = [
    Owner::Host,
    Owner::Hypervisor,
    Owner::Vm(VM1),
    Owner::Vm(VM2),
    Owner::Service(SVC),
];

use PageState::{NoPage as N, Owned as O, SharedBorrowed as SB, SharedOwned as SO};

/// RAM: 16 pages at 0x100; the last one is the hypervisor's. VM1 alive,
/// VM2 destroyed with two pages left, one of them shared with the host.
fn fixture() -> TestLedger {
    let mut l = Ledger::new(
        [Extent::EMPTY; 64],
        &[PfnRange::new(0x100, 0x10)],
        &[PfnRange::new(HYPERVISOR, 1)],
    )
    .unwrap();
    let ops = [
        Op::CreateVm { vm: VM1 },
        Op::CreateVm { vm: VM2 },
        Op::HostShareHyp {
            range: PfnRange::new(HYP_SHARED, 1),
        },
        Op::HostDonateVm {
            range: PfnRange::new(VM1_OWNED, 1),
            vm: VM1,
        },
        Op::HostDonateVm {
            range: PfnRange::new(VM1_SHARED, 1),
            vm: VM1,
        },
        Op::VmShareHost {
            vm: VM1,
            range: PfnRange::new(VM1_SHARED, 1),
        },
        Op::HostDonateVm {
            range: PfnRange::new(DEAD, 1),
            vm: VM2,
        },
        Op::HostDonateVm {
            range: PfnRange::new(DEAD_SHARED, 1),
            vm: VM2,
        },
        Op::VmShareHost {
            vm: VM2,
            range: PfnRange::new(DEAD_SHARED, 1),
        },
        Op::DestroyVm { vm: VM2 },
        Op::DonateService {
            range: PfnRange::new(SERVICE, 1),
            service: SVC,
        },
    ];
    for op in ops {
        l.execute(op).unwrap();
    }
    l.check_invariants().unwrap();
    l
}

fn states(l: &TestLedger, pfn: u64) -> [PageState; 5] {
    PARTIES.map(|p| l.state(p, pfn))
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    ShareHyp,
    UnshareHyp,
    DonateVm1,
    DonateVm2,
    DonateVm3,
    Vm1Share,
    Vm1Unshare,
    Vm2Share,
    ReclaimVm1,
    ReclaimVm2,
    DonateService,
}

use Kind::*;

fn op(kind: Kind, pfn: u64) -> Op {
    let range = PfnRange::new(pfn, 1);
    match kind {
        ShareHyp => Op::HostShareHyp { range },
        UnshareHyp => Op::HostUnshareHyp { range },
        DonateVm1 => Op::HostDonateVm { range, vm: VM1 },
        DonateVm2 => Op::HostDonateVm { range, vm: VM2 },
        DonateVm3 => Op::HostDonateVm { range, vm: VM3 },
        Vm1Share => Op::VmShareHost { vm: VM1, range },
        Vm1Unshare => Op::VmUnshareHost { vm: VM1, range },
        Vm2Share => Op::VmShareHost { vm: VM2, range },
        ReclaimVm1 => Op::Reclaim { vm: VM1, range },
        ReclaimVm2 => Op::Reclaim { vm: VM2, range },
        DonateService => Op::DonateService {
            range,
            service: SVC,
        },
    }
}

/// The transaction a successful `kind` on `pfn` must produce:
/// (changes, in order; pages to scrub).
fn expected_tx(kind: Kind, pfn: u64) -> (Vec<Change>, Option<PfnRange>) {
    let range = PfnRange::new(pfn, 1);
    let map = |party, perms| Change::Map {
        party,
        range,
        perms,
    };
    let unmap = |party| Change::Unmap { party, range };
    match kind {
        ShareHyp => (vec![map(Owner::Hypervisor, Perms::RW)], None),
        UnshareHyp => (vec![unmap(Owner::Hypervisor)], None),
        DonateVm1 => (
            vec![unmap(Owner::Host), map(Owner::Vm(VM1), Perms::RWX)],
            Some(range),
        ),
        Vm1Share => (vec![map(Owner::Host, Perms::RW)], None),
        Vm1Unshare => (vec![unmap(Owner::Host)], None),
        ReclaimVm2 => (
            vec![unmap(Owner::Vm(VM2)), map(Owner::Host, Perms::RWX)],
            Some(range),
        ),
        DonateService => (
            vec![unmap(Owner::Host), map(Owner::Service(SVC), Perms::RW)],
            Some(range),
        ),
        DonateVm2 | DonateVm3 | Vm2Share | ReclaimVm1 => unreachable!("never succeeds"),
    }
}

const OK: Result<(), LedgerError> = Ok(());
const fn not_owned(pfn: u64) -> Result<(), LedgerError> {
    Err(LedgerError::PageNotOwned { pfn })
}
const fn shared(pfn: u64) -> Result<(), LedgerError> {
    Err(LedgerError::PageShared { pfn })
}
const fn not_shared(pfn: u64) -> Result<(), LedgerError> {
    Err(LedgerError::PageNotShared { pfn })
}
const fn outside(pfn: u64) -> Result<(), LedgerError> {
    Err(LedgerError::OutOfRam { pfn })
}
const DYING2: Result<(), LedgerError> = Err(LedgerError::VmDying(VM2));
const NO_VM3: Result<(), LedgerError> = Err(LedgerError::NoSuchVm(VM3));
const ALIVE1: Result<(), LedgerError> = Err(LedgerError::VmAlive(VM1));

// The page's state before any operation, for [host, hyp, VM1, VM2, service].
const S_HOST: [PageState; 5] = [O, N, N, N, N];
const S_HYP_SHARED: [PageState; 5] = [SO, SB, N, N, N];
const S_VM1_OWNED: [PageState; 5] = [N, N, O, N, N];
const S_VM1_SHARED: [PageState; 5] = [SB, N, SO, N, N];
const S_DEAD: [PageState; 5] = [N, N, N, O, N];
const S_DEAD_SHARED: [PageState; 5] = [SB, N, N, SO, N];
const S_SERVICE: [PageState; 5] = [N, N, N, N, O];
const S_HYPERVISOR: [PageState; 5] = [N, O, N, N, N];
const S_OUTSIDE: [PageState; 5] = [N, N, N, N, N];

type Row = (u64, Kind, Result<(), LedgerError>, [PageState; 5]);

#[rustfmt::skip]
const TABLE: &[Row] = &[
    // host_share_hyp
    (HOST,        ShareHyp, OK,                      [SO, SB, N, N, N]),
    (HYP_SHARED,  ShareHyp, shared(HYP_SHARED),      S_HYP_SHARED),
    (VM1_OWNED,   ShareHyp, not_owned(VM1_OWNED),    S_VM1_OWNED),
    (VM1_SHARED,  ShareHyp, not_owned(VM1_SHARED),   S_VM1_SHARED),
    (DEAD,        ShareHyp, not_owned(DEAD),         S_DEAD),
    (DEAD_SHARED, ShareHyp, not_owned(DEAD_SHARED),  S_DEAD_SHARED),
    (SERVICE,     ShareHyp, not_owned(SERVICE),      S_SERVICE),
    (HYPERVISOR,  ShareHyp, not_owned(HYPERVISOR),   S_HYPERVISOR),
    (OUTSIDE,     ShareHyp, outside(OUTSIDE),        S_OUTSIDE),
    // host_unshare_hyp
    (HOST,        UnshareHyp, not_shared(HOST),        S_HOST),
    (HYP_SHARED,  UnshareHyp, OK,                      [O, N, N, N, N]),
    (VM1_OWNED,   UnshareHyp, not_owned(VM1_OWNED),    S_VM1_OWNED),
    (VM1_SHARED,  UnshareHyp, not_owned(VM1_SHARED),   S_VM1_SHARED),
    (DEAD,        UnshareHyp, not_owned(DEAD),         S_DEAD),
    (DEAD_SHARED, UnshareHyp, not_owned(DEAD_SHARED),  S_DEAD_SHARED),
    (SERVICE,     UnshareHyp, not_owned(SERVICE),      S_SERVICE),
    (HYPERVISOR,  UnshareHyp, not_owned(HYPERVISOR),   S_HYPERVISOR),
    (OUTSIDE,     UnshareHyp, outside(OUTSIDE),        S_OUTSIDE),
    // host_donate_vm to the alive VM1
    (HOST,        DonateVm1, OK,                      [N, N, O, N, N]),
    (HYP_SHARED,  DonateVm1, shared(HYP_SHARED),      S_HYP_SHARED),
    (VM1_OWNED,   DonateVm1, not_owned(VM1_OWNED),    S_VM1_OWNED),
    (VM1_SHARED,  DonateVm1, not_owned(VM1_SHARED),   S_VM1_SHARED),
    (DEAD,        DonateVm1, not_owned(DEAD),         S_DEAD),
    (DEAD_SHARED, DonateVm1, not_owned(DEAD_SHARED),  S_DEAD_SHARED),
    (SERVICE,     DonateVm1, not_owned(SERVICE),      S_SERVICE),
    (HYPERVISOR,  DonateVm1, not_owned(HYPERVISOR),   S_HYPERVISOR),
    (OUTSIDE,     DonateVm1, outside(OUTSIDE),        S_OUTSIDE),
    // host_donate_vm to the dying VM2: the party is checked before the pages
    (HOST,        DonateVm2, DYING2, S_HOST),
    (HYP_SHARED,  DonateVm2, DYING2, S_HYP_SHARED),
    (VM1_OWNED,   DonateVm2, DYING2, S_VM1_OWNED),
    (VM1_SHARED,  DonateVm2, DYING2, S_VM1_SHARED),
    (DEAD,        DonateVm2, DYING2, S_DEAD),
    (DEAD_SHARED, DonateVm2, DYING2, S_DEAD_SHARED),
    (SERVICE,     DonateVm2, DYING2, S_SERVICE),
    (HYPERVISOR,  DonateVm2, DYING2, S_HYPERVISOR),
    (OUTSIDE,     DonateVm2, DYING2, S_OUTSIDE),
    // host_donate_vm to a VM that was never created
    (HOST,        DonateVm3, NO_VM3, S_HOST),
    (HYP_SHARED,  DonateVm3, NO_VM3, S_HYP_SHARED),
    (VM1_OWNED,   DonateVm3, NO_VM3, S_VM1_OWNED),
    (VM1_SHARED,  DonateVm3, NO_VM3, S_VM1_SHARED),
    (DEAD,        DonateVm3, NO_VM3, S_DEAD),
    (DEAD_SHARED, DonateVm3, NO_VM3, S_DEAD_SHARED),
    (SERVICE,     DonateVm3, NO_VM3, S_SERVICE),
    (HYPERVISOR,  DonateVm3, NO_VM3, S_HYPERVISOR),
    (OUTSIDE,     DonateVm3, NO_VM3, S_OUTSIDE),
    // vm_share_host by VM1
    (HOST,        Vm1Share, not_owned(HOST),         S_HOST),
    (HYP_SHARED,  Vm1Share, not_owned(HYP_SHARED),   S_HYP_SHARED),
    (VM1_OWNED,   Vm1Share, OK,                      [SB, N, SO, N, N]),
    (VM1_SHARED,  Vm1Share, shared(VM1_SHARED),      S_VM1_SHARED),
    (DEAD,        Vm1Share, not_owned(DEAD),         S_DEAD),
    (DEAD_SHARED, Vm1Share, not_owned(DEAD_SHARED),  S_DEAD_SHARED),
    (SERVICE,     Vm1Share, not_owned(SERVICE),      S_SERVICE),
    (HYPERVISOR,  Vm1Share, not_owned(HYPERVISOR),   S_HYPERVISOR),
    (OUTSIDE,     Vm1Share, outside(OUTSIDE),        S_OUTSIDE),
    // vm_unshare_host by VM1
    (HOST,        Vm1Unshare, not_owned(HOST),         S_HOST),
    (HYP_SHARED,  Vm1Unshare, not_owned(HYP_SHARED),   S_HYP_SHARED),
    (VM1_OWNED,   Vm1Unshare, not_shared(VM1_OWNED),   S_VM1_OWNED),
    (VM1_SHARED,  Vm1Unshare, OK,                      [N, N, O, N, N]),
    (DEAD,        Vm1Unshare, not_owned(DEAD),         S_DEAD),
    (DEAD_SHARED, Vm1Unshare, not_owned(DEAD_SHARED),  S_DEAD_SHARED),
    (SERVICE,     Vm1Unshare, not_owned(SERVICE),      S_SERVICE),
    (HYPERVISOR,  Vm1Unshare, not_owned(HYPERVISOR),   S_HYPERVISOR),
    (OUTSIDE,     Vm1Unshare, outside(OUTSIDE),        S_OUTSIDE),
    // vm_share_host by the dying VM2
    (HOST,        Vm2Share, DYING2, S_HOST),
    (HYP_SHARED,  Vm2Share, DYING2, S_HYP_SHARED),
    (VM1_OWNED,   Vm2Share, DYING2, S_VM1_OWNED),
    (VM1_SHARED,  Vm2Share, DYING2, S_VM1_SHARED),
    (DEAD,        Vm2Share, DYING2, S_DEAD),
    (DEAD_SHARED, Vm2Share, DYING2, S_DEAD_SHARED),
    (SERVICE,     Vm2Share, DYING2, S_SERVICE),
    (HYPERVISOR,  Vm2Share, DYING2, S_HYPERVISOR),
    (OUTSIDE,     Vm2Share, DYING2, S_OUTSIDE),
    // reclaim from the alive VM1
    (HOST,        ReclaimVm1, ALIVE1, S_HOST),
    (HYP_SHARED,  ReclaimVm1, ALIVE1, S_HYP_SHARED),
    (VM1_OWNED,   ReclaimVm1, ALIVE1, S_VM1_OWNED),
    (VM1_SHARED,  ReclaimVm1, ALIVE1, S_VM1_SHARED),
    (DEAD,        ReclaimVm1, ALIVE1, S_DEAD),
    (DEAD_SHARED, ReclaimVm1, ALIVE1, S_DEAD_SHARED),
    (SERVICE,     ReclaimVm1, ALIVE1, S_SERVICE),
    (HYPERVISOR,  ReclaimVm1, ALIVE1, S_HYPERVISOR),
    (OUTSIDE,     ReclaimVm1, ALIVE1, S_OUTSIDE),
    // reclaim from the dying VM2
    (HOST,        ReclaimVm2, not_owned(HOST),         S_HOST),
    (HYP_SHARED,  ReclaimVm2, not_owned(HYP_SHARED),   S_HYP_SHARED),
    (VM1_OWNED,   ReclaimVm2, not_owned(VM1_OWNED),    S_VM1_OWNED),
    (VM1_SHARED,  ReclaimVm2, not_owned(VM1_SHARED),   S_VM1_SHARED),
    (DEAD,        ReclaimVm2, OK,                      [O, N, N, N, N]),
    (DEAD_SHARED, ReclaimVm2, OK,                      [O, N, N, N, N]),
    (SERVICE,     ReclaimVm2, not_owned(SERVICE),      S_SERVICE),
    (HYPERVISOR,  ReclaimVm2, not_owned(HYPERVISOR),   S_HYPERVISOR),
    (OUTSIDE,     ReclaimVm2, outside(OUTSIDE),        S_OUTSIDE),
    // donate_service
    (HOST,        DonateService, OK,                      [N, N, N, N, O]),
    (HYP_SHARED,  DonateService, shared(HYP_SHARED),      S_HYP_SHARED),
    (VM1_OWNED,   DonateService, not_owned(VM1_OWNED),    S_VM1_OWNED),
    (VM1_SHARED,  DonateService, not_owned(VM1_SHARED),   S_VM1_SHARED),
    (DEAD,        DonateService, not_owned(DEAD),         S_DEAD),
    (DEAD_SHARED, DonateService, not_owned(DEAD_SHARED),  S_DEAD_SHARED),
    (SERVICE,     DonateService, not_owned(SERVICE),      S_SERVICE),
    (HYPERVISOR,  DonateService, not_owned(HYPERVISOR),   S_HYPERVISOR),
    (OUTSIDE,     DonateService, outside(OUTSIDE),        S_OUTSIDE),
];

fn name(pfn: u64) -> &'static str {
    PAGES.iter().find(|(_, p)| *p == pfn).unwrap().0
}

#[test]
fn the_fixture_has_every_state() {
    let l = fixture();
    let expect = [
        S_HOST,
        S_HYP_SHARED,
        S_VM1_OWNED,
        S_VM1_SHARED,
        S_DEAD,
        S_DEAD_SHARED,
        S_SERVICE,
        S_HYPERVISOR,
        S_OUTSIDE,
    ];
    for ((name, pfn), want) in PAGES.iter().zip(expect) {
        assert_eq!(states(&l, *pfn), want, "{name}");
    }
    assert_eq!(
        l.vm(VM2),
        Some(VmRecord {
            vm: VM2,
            status: VmStatus::Dying,
            pages: 2
        })
    );
}

#[test]
fn every_operation_from_every_state() {
    // Every (page, operation) pair appears exactly once.
    let kinds = [
        ShareHyp,
        UnshareHyp,
        DonateVm1,
        DonateVm2,
        DonateVm3,
        Vm1Share,
        Vm1Unshare,
        Vm2Share,
        ReclaimVm1,
        ReclaimVm2,
        DonateService,
    ];
    assert_eq!(TABLE.len(), PAGES.len() * kinds.len());
    for (_, pfn) in PAGES {
        for kind in kinds {
            let n = TABLE
                .iter()
                .filter(|(p, k, ..)| *p == pfn && format!("{k:?}") == format!("{kind:?}"))
                .count();
            assert_eq!(n, 1, "{} / {kind:?}", name(pfn));
        }
    }

    for &(pfn, kind, expect, after) in TABLE {
        let what = format!("{kind:?} on the {} page", name(pfn));
        let mut l = fixture();
        let before = l.clone();
        let others: Vec<_> = PAGES
            .iter()
            .filter(|(_, p)| *p != pfn)
            .map(|(_, p)| (*p, states(&l, *p)))
            .collect();

        let result = l.prepare(op(kind, pfn));
        assert_eq!(l, before, "{what}: prepare changed the ledger");
        match (result, expect) {
            (Ok(tx), Ok(())) => {
                let (changes, scrub) = expected_tx(kind, pfn);
                assert_eq!(tx.op(), op(kind, pfn), "{what}");
                assert_eq!(tx.changes(), &changes[..], "{what}");
                assert_eq!(tx.scrub(), scrub, "{what}");
                l.commit(&tx).unwrap();
            }
            (Err(got), Err(want)) => {
                assert_eq!(got, want, "{what}");
                assert_eq!(l, before, "{what}: a refusal changed the ledger");
            }
            (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
        }
        assert_eq!(states(&l, pfn), after, "{what}");
        for (p, s) in others {
            assert_eq!(states(&l, p), s, "{what}: page {p:#x} changed");
        }
        l.check_invariants()
            .unwrap_or_else(|v| panic!("{what}: {v:?}"));
    }
}

#[test]
fn vm_life_cycle_from_every_vm_state() {
    // VM1 alive with pages, VM2 dying with pages, VM3 unknown, VM4 alive
    // without pages.
    let base = {
        let mut l = fixture();
        l.execute(Op::CreateVm { vm: 4 }).unwrap();
        l
    };
    let alive = |pages| {
        Some(VmRecord {
            vm: 0,
            status: VmStatus::Alive,
            pages,
        })
    };
    let dying = |pages| {
        Some(VmRecord {
            vm: 0,
            status: VmStatus::Dying,
            pages,
        })
    };
    #[rustfmt::skip]
    let table: [(Op, Result<(), LedgerError>, Option<VmRecord>); 8] = [
        (Op::CreateVm { vm: VM1 },  Err(LedgerError::VmExists(VM1)), alive(2)),
        (Op::CreateVm { vm: VM2 },  Err(LedgerError::VmExists(VM2)), dying(2)),
        (Op::CreateVm { vm: VM3 },  Ok(()),                          alive(0)),
        (Op::CreateVm { vm: 4 },    Err(LedgerError::VmExists(4)),   alive(0)),
        (Op::DestroyVm { vm: VM1 }, Ok(()),                          dying(2)),
        (Op::DestroyVm { vm: VM2 }, Err(LedgerError::VmDying(VM2)),  dying(2)),
        (Op::DestroyVm { vm: VM3 }, Err(LedgerError::NoSuchVm(VM3)), None),
        // A VM without pages is dropped at once.
        (Op::DestroyVm { vm: 4 },   Ok(()),                          None),
    ];
    for (op, expect, after) in table {
        let mut l = base.clone();
        let vm = match op {
            Op::CreateVm { vm } | Op::DestroyVm { vm } => vm,
            _ => unreachable!(),
        };
        match (l.prepare(op), expect) {
            (Ok(tx), Ok(())) => {
                assert!(tx.changes().is_empty(), "{op:?}");
                assert_eq!(tx.scrub(), None, "{op:?}");
                l.commit(&tx).unwrap();
            }
            (Err(got), Err(want)) => {
                assert_eq!(got, want, "{op:?}");
                assert_eq!(l, base, "{op:?}");
            }
            (got, want) => panic!("{op:?}: got {got:?}, want {want:?}"),
        }
        let after = after.map(|r| VmRecord { vm, ..r });
        assert_eq!(l.vm(vm), after, "{op:?}");
        l.check_invariants().unwrap();
    }
}

/// One page through every state and back, as pKVM's ownership self-test
/// walks it, asserting (host, hyp, VM1, VM2, service) at each step.
#[test]
fn one_page_walks_the_whole_cycle() {
    let mut l = fixture();
    let p = HOST;
    let r = PfnRange::new(p, 1);
    let steps: [(Op, Result<(), LedgerError>, [PageState; 5]); 14] = [
        (Op::HostShareHyp { range: r }, Ok(()), [SO, SB, N, N, N]),
        (Op::HostShareHyp { range: r }, shared(p), [SO, SB, N, N, N]),
        (
            Op::HostDonateVm { range: r, vm: VM1 },
            shared(p),
            [SO, SB, N, N, N],
        ),
        (Op::HostUnshareHyp { range: r }, Ok(()), [O, N, N, N, N]),
        (
            Op::HostUnshareHyp { range: r },
            not_shared(p),
            [O, N, N, N, N],
        ),
        (
            Op::HostDonateVm { range: r, vm: VM1 },
            Ok(()),
            [N, N, O, N, N],
        ),
        (
            Op::HostDonateVm { range: r, vm: VM1 },
            not_owned(p),
            [N, N, O, N, N],
        ),
        (
            Op::VmShareHost { vm: VM1, range: r },
            Ok(()),
            [SB, N, SO, N, N],
        ),
        (
            Op::VmUnshareHost { vm: VM1, range: r },
            Ok(()),
            [N, N, O, N, N],
        ),
        (
            Op::VmShareHost { vm: VM1, range: r },
            Ok(()),
            [SB, N, SO, N, N],
        ),
        (
            Op::Reclaim { vm: VM1, range: r },
            Err(LedgerError::VmAlive(VM1)),
            [SB, N, SO, N, N],
        ),
        (Op::DestroyVm { vm: VM1 }, Ok(()), [SB, N, SO, N, N]),
        (Op::Reclaim { vm: VM1, range: r }, Ok(()), [O, N, N, N, N]),
        (
            Op::Reclaim { vm: VM1, range: r },
            not_owned(p),
            [O, N, N, N, N],
        ),
    ];
    for (i, (op, expect, after)) in steps.into_iter().enumerate() {
        let before = l.clone();
        let got = l.execute(op).map(|_| ());
        assert_eq!(got, expect, "step {i}: {op:?}");
        if got.is_err() {
            assert_eq!(l, before, "step {i}");
        }
        assert_eq!(states(&l, p), after, "step {i}: {op:?}");
        l.check_invariants().unwrap();
    }
    // VM1 still has its other two pages (one shared back): it lingers, dying.
    assert_eq!(
        l.vm(VM1),
        Some(VmRecord {
            vm: VM1,
            status: VmStatus::Dying,
            pages: 2
        })
    );
    for pfn in [VM1_OWNED, VM1_SHARED] {
        l.execute(Op::Reclaim {
            vm: VM1,
            range: PfnRange::new(pfn, 1),
        })
        .unwrap();
    }
    assert_eq!(l.vm(VM1), None);
    // The handle can be used again.
    l.execute(Op::CreateVm { vm: VM1 }).unwrap();
    l.check_invariants().unwrap();
}
