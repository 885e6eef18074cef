//! The ledger against a plain reference model: one `(owner, borrower)` per
//! page of a small RAM, a map of VMs, and each operation written the obvious
//! way, page by page. Random sequences of operations from the host, three
//! VMs and a VM that is never created, over random ranges (overlapping,
//! empty, huge, overflowing, outside RAM), must give the same results, the
//! same transactions and the same page states, and leave the invariants
//! holding.

use std::collections::BTreeMap;

use moat_ledger::{
    Change, Extent, Ledger, LedgerError, MAX_VMS, Op, Owner, PageState, Perms, PfnRange, VmRecord,
    VmStatus,
};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

/// Frames 0..LIMIT are modelled; RAM lies well inside.
const LIMIT: u64 = 400;
/// Three RAM banks, two of them touching, with a hole before the third.
const RAM: [PfnRange; 3] = [
    PfnRange::new(16, 184),
    PfnRange::new(200, 16),
    PfnRange::new(256, 100),
];
const HYP: [PfnRange; 2] = [PfnRange::new(40, 4), PfnRange::new(300, 1)];

type Page = Option<(Owner, Option<Owner>)>;

#[derive(Clone, Debug)]
struct Model {
    pages: Vec<Page>,
    vms: BTreeMap<u16, (VmStatus, u64)>,
}

type Expected = (Vec<Change>, Option<PfnRange>);

impl Model {
    fn new() -> Self {
        let mut pages = vec![None; LIMIT as usize];
        for r in RAM {
            for p in r.start..r.start + r.count {
                pages[p as usize] = Some((Owner::Host, None));
            }
        }
        for r in HYP {
            for p in r.start..r.start + r.count {
                pages[p as usize] = Some((Owner::Hypervisor, None));
            }
        }
        Self {
            pages,
            vms: BTreeMap::new(),
        }
    }

    fn page(&self, pfn: u64) -> Page {
        self.pages.get(pfn as usize).copied().flatten()
    }

    fn vm_must_be(&self, vm: u16, status: VmStatus) -> Result<(), LedgerError> {
        match self.vms.get(&vm) {
            None => Err(LedgerError::NoSuchVm(vm)),
            Some((s, _)) if *s == status => Ok(()),
            Some(_) => Err(match status {
                VmStatus::Alive => LedgerError::VmDying(vm),
                VmStatus::Dying => LedgerError::VmAlive(vm),
            }),
        }
    }

    /// Checks every page of the range with `ok`, in ascending order; the
    /// first page that is not RAM or fails names the error. Pages from
    /// LIMIT on are not RAM.
    fn check(
        &self,
        range: PfnRange,
        ok: impl Fn(Owner, Option<Owner>, u64) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        let end = range.start + range.count;
        for pfn in range.start..end.min(LIMIT) {
            match self.page(pfn) {
                None => return Err(LedgerError::OutOfRam { pfn }),
                Some((owner, borrower)) => ok(owner, borrower, pfn)?,
            }
        }
        if end > LIMIT {
            return Err(LedgerError::OutOfRam {
                pfn: range.start.max(LIMIT),
            });
        }
        Ok(())
    }

    fn set(&mut self, range: PfnRange, owner: Owner, borrower: Option<Owner>) {
        for pfn in range.start..range.start + range.count {
            self.pages[pfn as usize] = Some((owner, borrower));
        }
    }

    fn apply(&mut self, op: Op) -> Result<Expected, LedgerError> {
        fn exclusive(want: Owner) -> impl Fn(Owner, Option<Owner>, u64) -> Result<(), LedgerError> {
            move |owner, borrower, pfn| {
                if owner != want {
                    Err(LedgerError::PageNotOwned { pfn })
                } else if borrower.is_some() {
                    Err(LedgerError::PageShared { pfn })
                } else {
                    Ok(())
                }
            }
        }
        fn shared_with(
            want: Owner,
            with: Owner,
        ) -> impl Fn(Owner, Option<Owner>, u64) -> Result<(), LedgerError> {
            move |owner, borrower, pfn| {
                if owner != want {
                    Err(LedgerError::PageNotOwned { pfn })
                } else if borrower != Some(with) {
                    Err(LedgerError::PageNotShared { pfn })
                } else {
                    Ok(())
                }
            }
        }
        fn shape(range: PfnRange) -> Result<(), LedgerError> {
            if range.count == 0 {
                Err(LedgerError::ZeroLength)
            } else if range.start.checked_add(range.count).is_none() {
                Err(LedgerError::Overflow)
            } else {
                Ok(())
            }
        }
        let map = |party, range, perms| Change::Map {
            party,
            range,
            perms,
        };
        let unmap = |party, range| Change::Unmap { party, range };
        match op {
            Op::HostShareHyp { range } => {
                shape(range)?;
                self.check(range, exclusive(Owner::Host))?;
                self.set(range, Owner::Host, Some(Owner::Hypervisor));
                Ok((vec![map(Owner::Hypervisor, range, Perms::RW)], None))
            }
            Op::HostUnshareHyp { range } => {
                shape(range)?;
                self.check(range, shared_with(Owner::Host, Owner::Hypervisor))?;
                self.set(range, Owner::Host, None);
                Ok((vec![unmap(Owner::Hypervisor, range)], None))
            }
            Op::HostDonateVm { range, vm } => {
                shape(range)?;
                self.vm_must_be(vm, VmStatus::Alive)?;
                self.check(range, exclusive(Owner::Host))?;
                self.set(range, Owner::Vm(vm), None);
                self.vms.get_mut(&vm).unwrap().1 += range.count;
                Ok((
                    vec![
                        unmap(Owner::Host, range),
                        map(Owner::Vm(vm), range, Perms::RWX),
                    ],
                    Some(range),
                ))
            }
            Op::VmShareHost { vm, range } => {
                shape(range)?;
                self.vm_must_be(vm, VmStatus::Alive)?;
                self.check(range, exclusive(Owner::Vm(vm)))?;
                self.set(range, Owner::Vm(vm), Some(Owner::Host));
                Ok((vec![map(Owner::Host, range, Perms::RW)], None))
            }
            Op::VmUnshareHost { vm, range } => {
                shape(range)?;
                self.vm_must_be(vm, VmStatus::Alive)?;
                self.check(range, shared_with(Owner::Vm(vm), Owner::Host))?;
                self.set(range, Owner::Vm(vm), None);
                Ok((vec![unmap(Owner::Host, range)], None))
            }
            Op::CreateVm { vm } => {
                if self.vms.contains_key(&vm) {
                    return Err(LedgerError::VmExists(vm));
                }
                if self.vms.len() == MAX_VMS {
                    return Err(LedgerError::TooManyVms);
                }
                self.vms.insert(vm, (VmStatus::Alive, 0));
                Ok((vec![], None))
            }
            Op::DestroyVm { vm } => {
                self.vm_must_be(vm, VmStatus::Alive)?;
                let entry = self.vms.get_mut(&vm).unwrap();
                if entry.1 == 0 {
                    self.vms.remove(&vm);
                } else {
                    entry.0 = VmStatus::Dying;
                }
                Ok((vec![], None))
            }
            Op::Reclaim { vm, range } => {
                shape(range)?;
                self.vm_must_be(vm, VmStatus::Dying)?;
                self.check(range, |owner, _, pfn| {
                    if owner == Owner::Vm(vm) {
                        Ok(())
                    } else {
                        Err(LedgerError::PageNotOwned { pfn })
                    }
                })?;
                self.set(range, Owner::Host, None);
                let entry = self.vms.get_mut(&vm).unwrap();
                entry.1 -= range.count;
                if entry.1 == 0 {
                    self.vms.remove(&vm);
                }
                Ok((
                    vec![
                        unmap(Owner::Vm(vm), range),
                        map(Owner::Host, range, Perms::RWX),
                    ],
                    Some(range),
                ))
            }
            Op::HostDonateHyp { range } => {
                shape(range)?;
                self.check(range, exclusive(Owner::Host))?;
                self.set(range, Owner::Hypervisor, None);
                Ok((vec![unmap(Owner::Host, range)], Some(range)))
            }
            Op::HypReturnHost { range } => {
                shape(range)?;
                let end = range.start + range.count;
                if HYP
                    .iter()
                    .any(|h| h.start < end && range.start < h.start + h.count)
                {
                    return Err(LedgerError::PageNotOwned { pfn: range.start });
                }
                self.check(range, exclusive(Owner::Hypervisor))?;
                self.set(range, Owner::Host, None);
                Ok((vec![map(Owner::Host, range, Perms::RWX)], Some(range)))
            }
            Op::DonateService { range, service } => {
                shape(range)?;
                self.check(range, exclusive(Owner::Host))?;
                self.set(range, Owner::Service(service), None);
                Ok((
                    vec![
                        unmap(Owner::Host, range),
                        map(Owner::Service(service), range, Perms::RW),
                    ],
                    Some(range),
                ))
            }
        }
    }
}

fn pfn() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => 0..LIMIT,
        1 => Just(0),
        1 => (u64::MAX - 8)..=u64::MAX,
        1 => any::<u64>(),
    ]
}

fn count() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => 1..8u64,
        3 => 1..64u64,
        1 => 1..400u64,
        1 => Just(0),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
}

/// What an action does; the pages come from its [`Target`].
#[derive(Clone, Copy, Debug)]
enum Kind {
    ShareHyp,
    UnshareHyp,
    DonateVm,
    VmShare,
    VmUnshare,
    Create,
    Destroy,
    Reclaim,
    DonateService,
    DonateHyp,
    ReturnHyp,
}

/// How an action picks its pages.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// Any range at all.
    Random(PfnRange),
    /// A run of pages that are in the state the operation needs (as the
    /// model has them), starting at the `pick`-th such page, at most `len`
    /// long; `jitter` then makes it one page longer (1), start one page
    /// earlier (2), or leaves it (0), so refusals at the edges of runs are
    /// exercised too.
    Aimed { pick: usize, len: u64, jitter: u8 },
}

#[derive(Clone, Copy, Debug)]
struct Action {
    kind: Kind,
    vm: u16,
    service: u16,
    target: Target,
}

fn target() -> impl Strategy<Value = Target> {
    prop_oneof![
        1 => (pfn(), count()).prop_map(|(s, c)| Target::Random(PfnRange::new(s, c))),
        3 => (any::<usize>(), 1..24u64, prop_oneof![6 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)])
            .prop_map(|(pick, len, jitter)| Target::Aimed { pick, len, jitter }),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    // Service donations are for good (nothing gives the pages back), so they
    // are rare and, when aimed, one page long: the host keeps most of its RAM
    // through a long run.
    let kind = prop_oneof![
        4 => Just(Kind::ShareHyp),
        4 => Just(Kind::UnshareHyp),
        8 => Just(Kind::DonateVm),
        6 => Just(Kind::VmShare),
        6 => Just(Kind::VmUnshare),
        4 => Just(Kind::Create),
        2 => Just(Kind::Destroy),
        6 => Just(Kind::Reclaim),
        1 => Just(Kind::DonateService),
        3 => Just(Kind::DonateHyp),
        3 => Just(Kind::ReturnHyp),
    ];
    // VMs 1..=3 are created; VM 4 appears as an argument but never exists.
    let vm = prop_oneof![12 => 1..=3u16, 1 => Just(4u16)];
    (kind, vm, 0..3u16, target()).prop_map(|(kind, vm, service, target)| Action {
        kind,
        vm,
        service,
        target,
    })
}

impl Model {
    /// The pages an action of `kind` by or for `vm` needs, as `(owner, borrower)`.
    fn wanted(kind: Kind, vm: u16) -> impl Fn(Owner, Option<Owner>) -> bool {
        move |owner, borrower| match kind {
            Kind::ShareHyp
            | Kind::DonateVm
            | Kind::DonateService
            | Kind::DonateHyp
            | Kind::Create
            | Kind::Destroy => (owner, borrower) == (Owner::Host, None),
            Kind::UnshareHyp => (owner, borrower) == (Owner::Host, Some(Owner::Hypervisor)),
            Kind::VmShare => (owner, borrower) == (Owner::Vm(vm), None),
            Kind::VmUnshare => (owner, borrower) == (Owner::Vm(vm), Some(Owner::Host)),
            Kind::Reclaim => owner == Owner::Vm(vm),
            Kind::ReturnHyp => (owner, borrower) == (Owner::Hypervisor, None),
        }
    }

    /// The concrete request for `action` in the model's current state.
    fn concretise(&self, action: Action) -> Op {
        let range = match action.target {
            Target::Random(range) => range,
            Target::Aimed { pick, len, jitter } => {
                let len = match action.kind {
                    Kind::DonateService => 1,
                    _ => len,
                };
                let wanted = Self::wanted(action.kind, action.vm);
                let ok = |pfn: u64| self.page(pfn).is_some_and(|(o, b)| wanted(o, b));
                let candidates: Vec<u64> = (0..LIMIT).filter(|&p| ok(p)).collect();
                let (start, mut count) = if candidates.is_empty() {
                    (pick as u64 % LIMIT, len)
                } else {
                    let start = candidates[pick % candidates.len()];
                    let mut count = 1;
                    while count < len && ok(start + count) {
                        count += 1;
                    }
                    (start, count)
                };
                let mut start = start;
                match jitter {
                    1 => count += 1,
                    2 if start > 0 => {
                        start -= 1;
                        count += 1;
                    }
                    _ => {}
                }
                PfnRange::new(start, count)
            }
        };
        let vm = action.vm;
        match action.kind {
            Kind::ShareHyp => Op::HostShareHyp { range },
            Kind::UnshareHyp => Op::HostUnshareHyp { range },
            Kind::DonateVm => Op::HostDonateVm { range, vm },
            Kind::VmShare => Op::VmShareHost { vm, range },
            Kind::VmUnshare => Op::VmUnshareHost { vm, range },
            Kind::Create => Op::CreateVm { vm },
            Kind::Destroy => Op::DestroyVm { vm },
            Kind::Reclaim => Op::Reclaim { vm, range },
            Kind::DonateService => Op::DonateService {
                range,
                service: action.service,
            },
            Kind::DonateHyp => Op::HostDonateHyp { range },
            Kind::ReturnHyp => Op::HypReturnHost { range },
        }
    }
}

fn new_ledger(capacity: usize) -> Ledger<Vec<Extent>> {
    Ledger::new(vec![Extent::EMPTY; capacity], &RAM, &HYP).unwrap()
}

/// The same pages and VMs in both. The extents are expanded page by page
/// and compared with the model every time; with `thorough`, every page is
/// also looked up one by one, as every party sees it.
fn assert_agree(l: &Ledger<Vec<Extent>>, m: &Model, thorough: bool) {
    let mut pages: Vec<Page> = vec![None; LIMIT as usize];
    for e in l.extents() {
        assert!(e.end() <= LIMIT, "extent {e:?} outside the model");
        for pfn in e.start..e.end() {
            pages[pfn as usize] = Some((e.owner, e.borrower));
        }
    }
    assert_eq!(pages, m.pages);
    if thorough {
        for pfn in 0..LIMIT + 8 {
            assert_eq!(l.page(pfn), m.page(pfn), "page {pfn}");
            for party in [
                Owner::Host,
                Owner::Hypervisor,
                Owner::Service(0),
                Owner::Vm(1),
                Owner::Vm(2),
                Owner::Vm(3),
                Owner::Vm(4),
            ] {
                let want = match m.page(pfn) {
                    Some((o, b)) => PageState::of(party, o, b),
                    None => PageState::NoPage,
                };
                assert_eq!(l.state(party, pfn), want, "page {pfn} for {party:?}");
            }
        }
    }
    for vm in 1..=4 {
        let want = m
            .vms
            .get(&vm)
            .map(|&(status, pages)| VmRecord { vm, status, pages });
        assert_eq!(l.vm(vm), want, "VM {vm}");
    }
}

/// Runs `actions` on a ledger with `capacity` extents and on the model. With a
/// small capacity the ledger may refuse with `OutOfCapacity` where the
/// model succeeds; the model then skips the operation.
fn run(actions: &[Action], capacity: usize) -> Result<(), TestCaseError> {
    let mut l = new_ledger(capacity);
    let mut m = Model::new();
    l.check_invariants().unwrap();
    assert_agree(&l, &m, true);
    for (step, &action) in actions.iter().enumerate() {
        let op = m.concretise(action);
        let before = l.clone();
        let mut next = m.clone();
        let want = next.apply(op);
        let got = l.prepare(op);
        prop_assert_eq!(&l, &before, "prepare changed the ledger");
        match (got, want) {
            (Ok(tx), Ok((changes, scrub))) => {
                prop_assert_eq!(tx.op(), op);
                prop_assert_eq!(tx.changes(), &changes[..], "{:?}", op);
                prop_assert_eq!(tx.scrub(), scrub, "{:?}", op);
                l.commit(&tx).unwrap();
                // The same transaction cannot be committed twice.
                let committed = l.clone();
                prop_assert_eq!(l.commit(&tx), Err(LedgerError::Stale));
                prop_assert_eq!(&l, &committed);
                m = next;
            }
            (Err(LedgerError::OutOfCapacity), Ok(_)) if capacity < LIMIT as usize => {
                prop_assert_eq!(&l, &before);
            }
            (Err(got), Err(want)) => {
                prop_assert_eq!(got, want, "{:?}", op);
                prop_assert_eq!(&l, &before, "a refusal changed the ledger");
            }
            (got, want) => {
                prop_assert!(false, "{:?}: ledger {:?}, model {:?}", op, got, want);
            }
        }
        if let Err(v) = l.check_invariants() {
            prop_assert!(false, "after {:?}: {:?}\n{:?}", op, v, l);
        }
        assert_agree(&l, &m, step % 16 == 0 || step + 1 == actions.len());
    }
    Ok(())
}

/// VMs 1..=3 exist from the start so that most VM operations get past the
/// party checks; they are destroyed, reclaimed and created again as the
/// actions go.
fn with_vms(mut actions: Vec<Action>) -> Vec<Action> {
    let mut all: Vec<Action> = (1..=3)
        .map(|vm| Action {
            kind: Kind::Create,
            vm,
            service: 0,
            target: Target::Random(PfnRange::new(0, 0)),
        })
        .collect();
    all.append(&mut actions);
    all
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn ledger_agrees_with_the_model(actions in prop::collection::vec(action(), 1..80)) {
        run(&with_vms(actions), 1024)?;
    }

    #[test]
    fn a_full_extent_buffer_refuses_cleanly(actions in prop::collection::vec(action(), 1..80)) {
        run(&with_vms(actions), 10)?;
    }
}

/// Long deterministic runs: many more operations than the random cases.
#[test]
fn long_runs_agree_with_the_model() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = prop::collection::vec(action(), 2000);
    for _ in 0..8 {
        let actions = strategy.new_tree(&mut runner).unwrap().current();
        run(&with_vms(actions), 1024).unwrap();
    }
}
