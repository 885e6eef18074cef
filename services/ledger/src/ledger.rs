//! The ledger: operations, commit, queries and the invariant checker.

use core::fmt;
use core::mem::size_of;

use crate::store::{Extent, Splice, Store};
use crate::transaction::{Change, Op, Transaction};
use crate::{LedgerError, Owner, PageState, Perms, PfnRange, ServiceId, VmId};

/// Most VMs (alive, or dying with pages left) the ledger tracks at once.
pub const MAX_VMS: usize = 64;
/// Most RAM ranges, and most hypervisor ranges, of a boot layout.
pub const MAX_BOOT_RANGES: usize = 32;

/// Where a VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VmStatus {
    /// Created, may run, receive pages, share and unshare.
    Alive,
    /// Destroyed; its pages are waiting to be reclaimed.
    Dying,
}

/// What the ledger knows of one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VmRecord {
    /// The handle.
    pub vm: VmId,
    /// Alive or dying.
    pub status: VmStatus,
    /// How many pages it owns (shared ones included).
    pub pages: u64,
}

/// A broken ledger invariant, found by [`Ledger::check_invariants`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum InvariantViolation {
    /// An extent with no pages.
    EmptyExtent {
        /// Its index.
        index: usize,
    },
    /// An extent whose end overflows.
    ExtentOverflow {
        /// Its index.
        index: usize,
    },
    /// An extent that does not start after the previous one ends.
    Unsorted {
        /// Its index.
        index: usize,
    },
    /// An extent continuing the previous one with the same state.
    Unmerged {
        /// Its index.
        index: usize,
    },
    /// A RAM page no extent holds.
    RamNotCovered {
        /// The page.
        pfn: u64,
    },
    /// An extent holds a page that is not RAM.
    NotRam {
        /// The page.
        pfn: u64,
    },
    /// A page whose borrower is its owner.
    SelfShare {
        /// The first such page.
        pfn: u64,
    },
    /// A share no operation can create (only host to hypervisor and VM to
    /// host exist).
    IllegalShare {
        /// The first such page.
        pfn: u64,
    },
    /// A page of the boot hypervisor ranges that is not the hypervisor's
    /// alone.
    HypervisorMemoryLost {
        /// The first such page.
        pfn: u64,
    },
    /// A page owned by a VM the table does not know.
    UnknownVm {
        /// The first such page.
        pfn: u64,
        /// The VM.
        vm: VmId,
    },
    /// A VM record whose page count does not match its pages.
    VmPageCount {
        /// The VM.
        vm: VmId,
    },
    /// Two records with one handle.
    DuplicateVm {
        /// The VM.
        vm: VmId,
    },
    /// A dying VM with no page left that was not dropped.
    DeadVmLingers {
        /// The VM.
        vm: VmId,
    },
}

/// What a commit does, derived from the request again at commit time.
/// A transaction and what committing it does, as one ledger planned them.
pub(crate) struct Planned {
    tx: Transaction,
    effect: Effect,
}

impl Planned {
    /// The transaction.
    pub(crate) fn transaction(&self) -> &Transaction {
        &self.tx
    }
}

enum Effect {
    Pages {
        splice: Splice,
        vm: Option<(usize, VmPages)>,
    },
    CreateVm {
        slot: usize,
        vm: VmId,
    },
    DestroyVm {
        slot: usize,
    },
}

enum VmPages {
    Add(u64),
    Remove(u64),
}

/// The ownership of every page of RAM; see the crate documentation.
///
/// `S` is the extent buffer: its length is the capacity.
#[derive(Clone)]
pub struct Ledger<S> {
    store: Store<S>,
    vms: [Option<VmRecord>; MAX_VMS],
    ram: [PfnRange; MAX_BOOT_RANGES],
    ram_len: usize,
    hyp: [PfnRange; MAX_BOOT_RANGES],
    hyp_len: usize,
    generation: u64,
}

/// The page must be `owner`'s and not shared.
fn exclusive(owner: Owner) -> impl Fn(&Extent, u64) -> Result<(), LedgerError> {
    move |e, pfn| {
        if e.owner != owner {
            Err(LedgerError::PageNotOwned { pfn })
        } else if e.borrower.is_some() {
            Err(LedgerError::PageShared { pfn })
        } else {
            Ok(())
        }
    }
}

/// The page must be `owner`'s and shared with `borrower`.
fn shared(owner: Owner, borrower: Owner) -> impl Fn(&Extent, u64) -> Result<(), LedgerError> {
    move |e, pfn| {
        if e.owner != owner {
            Err(LedgerError::PageNotOwned { pfn })
        } else if e.borrower != Some(borrower) {
            Err(LedgerError::PageNotShared { pfn })
        } else {
            Ok(())
        }
    }
}

/// The page must be `owner`'s, shared or not.
fn owned(owner: Owner) -> impl Fn(&Extent, u64) -> Result<(), LedgerError> {
    move |e, pfn| {
        if e.owner != owner {
            Err(LedgerError::PageNotOwned { pfn })
        } else {
            Ok(())
        }
    }
}

impl<S: AsRef<[Extent]> + AsMut<[Extent]>> Ledger<S> {
    /// The ledger at boot: every page of `ram` owned by the host, except
    /// the pages of `hypervisor` (the core's carve-out, the services'
    /// memory, anything else the host must never touch), owned by the
    /// hypervisor. RAM ranges may come in any order and may touch but not
    /// overlap; hypervisor ranges must lie inside RAM. `storage` is the
    /// extent buffer (its previous contents are ignored).
    pub fn new(storage: S, ram: &[PfnRange], hypervisor: &[PfnRange]) -> Result<Self, LedgerError> {
        if ram.len() > MAX_BOOT_RANGES || hypervisor.len() > MAX_BOOT_RANGES {
            return Err(LedgerError::TooManyRanges);
        }
        let mut ledger = Self {
            store: Store::new(storage),
            vms: [None; MAX_VMS],
            ram: [PfnRange::default(); MAX_BOOT_RANGES],
            ram_len: ram.len(),
            hyp: [PfnRange::default(); MAX_BOOT_RANGES],
            hyp_len: hypervisor.len(),
            generation: 0,
        };
        for (slot, range) in ledger.ram.iter_mut().zip(ram) {
            range.checked_end()?;
            *slot = *range;
        }
        let sorted = &mut ledger.ram[..ram.len()];
        sorted.sort_unstable_by_key(|r| r.start);
        for pair in sorted.windows(2) {
            if pair[0].start + pair[0].count > pair[1].start {
                return Err(LedgerError::RamOverlap);
            }
        }
        for range in &ledger.ram[..ledger.ram_len] {
            ledger.store.push(Extent {
                start: range.start,
                count: range.count,
                owner: Owner::Host,
                borrower: None,
            })?;
        }
        for (slot, range) in ledger.hyp.iter_mut().zip(hypervisor) {
            let end = range.checked_end()?;
            ledger
                .store
                .check_range(range.start, end, |_, _| Ok(()))
                .map_err(|e| match e {
                    LedgerError::OutOfRam { pfn } => LedgerError::HypervisorOutsideRam { pfn },
                    other => other,
                })?;
            let splice = ledger
                .store
                .plan_assign(range.start, end, Owner::Hypervisor, None);
            if !ledger.store.fits(&splice) {
                return Err(LedgerError::OutOfCapacity);
            }
            ledger.store.apply(&splice);
            *slot = *range;
        }
        Ok(ledger)
    }

    // ---- Operations (prepare) -------------------------------------------

    /// Prepares `op`: checks it against the current state and returns the
    /// transaction that carries it out. Changes nothing.
    pub fn prepare(&self, op: Op) -> Result<Transaction, LedgerError> {
        self.plan(op).map(|(tx, _)| tx)
    }

    /// Host `Owned` → host `SharedOwned`, hypervisor `SharedBorrowed`.
    /// The hypervisor gets a read-write mapping; the host keeps its own.
    pub fn host_share_hyp(&self, pfn: u64, count: u64) -> Result<Transaction, LedgerError> {
        self.prepare(Op::HostShareHyp {
            range: PfnRange::new(pfn, count),
        })
    }

    /// Host `SharedOwned` with the hypervisor → host `Owned`; the
    /// hypervisor's mapping goes.
    pub fn host_unshare_hyp(&self, pfn: u64, count: u64) -> Result<Transaction, LedgerError> {
        self.prepare(Op::HostUnshareHyp {
            range: PfnRange::new(pfn, count),
        })
    }

    /// Host `Owned` → VM `Owned`, host `NoPage`: unmapped from the host,
    /// zeroed and tag-scrubbed, mapped for the (alive) VM.
    pub fn host_donate_vm(
        &self,
        pfn: u64,
        count: u64,
        vm: VmId,
    ) -> Result<Transaction, LedgerError> {
        self.prepare(Op::HostDonateVm {
            range: PfnRange::new(pfn, count),
            vm,
        })
    }

    /// VM `Owned` → VM `SharedOwned`, host `SharedBorrowed` (read-write).
    pub fn vm_share_host(
        &self,
        vm: VmId,
        pfn: u64,
        count: u64,
    ) -> Result<Transaction, LedgerError> {
        self.prepare(Op::VmShareHost {
            vm,
            range: PfnRange::new(pfn, count),
        })
    }

    /// VM `SharedOwned` with the host → VM `Owned`; the host's mapping goes.
    pub fn vm_unshare_host(
        &self,
        vm: VmId,
        pfn: u64,
        count: u64,
    ) -> Result<Transaction, LedgerError> {
        self.prepare(Op::VmUnshareHost {
            vm,
            range: PfnRange::new(pfn, count),
        })
    }

    /// Registers a new, alive VM handle.
    pub fn create_vm(&self, vm: VmId) -> Result<Transaction, LedgerError> {
        self.prepare(Op::CreateVm { vm })
    }

    /// Marks an alive VM dying: it can no longer share or be donated to,
    /// and its pages become reclaimable. A VM with no pages is dropped at
    /// once. The transaction has no page changes: the core stops the VM's
    /// vCPUs before applying it.
    pub fn destroy_vm(&self, vm: VmId) -> Result<Transaction, LedgerError> {
        self.prepare(Op::DestroyVm { vm })
    }

    /// A dying VM's pages (`Owned`, or `SharedOwned` with the host) →
    /// host `Owned`: unmapped from the VM, zeroed and tag-scrubbed, mapped
    /// for the host. The VM record goes with its last page.
    pub fn reclaim(&self, vm: VmId, pfn: u64, count: u64) -> Result<Transaction, LedgerError> {
        self.prepare(Op::Reclaim {
            vm,
            range: PfnRange::new(pfn, count),
        })
    }

    /// Host `Owned` → service `Owned`: unmapped from the host, zeroed and
    /// tag-scrubbed, mapped read-write for the service.
    pub fn donate_service(
        &self,
        pfn: u64,
        count: u64,
        service: ServiceId,
    ) -> Result<Transaction, LedgerError> {
        self.prepare(Op::DonateService {
            range: PfnRange::new(pfn, count),
            service,
        })
    }

    // ---- Commit ------------------------------------------------------------

    /// Records a transaction the core has applied. Refuses with
    /// [`LedgerError::Stale`] one prepared in another generation. The
    /// transaction is derived again from its request: if this ledger would
    /// refuse the request now, that error is returned, and if it would
    /// answer differently, `Stale`. A transaction prepared by this ledger in
    /// the current generation always commits. A refused commit changes
    /// nothing.
    pub fn commit(&mut self, tx: &Transaction) -> Result<(), LedgerError> {
        if tx.generation() != self.generation {
            return Err(LedgerError::Stale);
        }
        let (again, effect) = self.plan(tx.op())?;
        if again != *tx {
            return Err(LedgerError::Stale);
        }
        self.apply(&effect);
        Ok(())
    }

    /// Prepares `op` as [`Ledger::prepare`] does, keeping what committing
    /// it will do, for [`Ledger::commit_planned`].
    pub(crate) fn plan_for_commit(&self, op: Op) -> Result<Planned, LedgerError> {
        let (tx, effect) = self.plan(op)?;
        Ok(Planned { tx, effect })
    }

    /// Commits a transaction this ledger planned with
    /// [`Ledger::plan_for_commit`], without planning it again: `Stale`, with
    /// nothing changed, if any transaction was committed since. Every
    /// change of the ledger's state is a commit, and each advances the
    /// generation, so in the generation it was planned in the plan is what
    /// [`Ledger::commit`] would derive again from the request. (Crate-only,
    /// so that a plan cannot come from another ledger: the server keeps the
    /// one its own ledger made.)
    pub(crate) fn commit_planned(&mut self, planned: &Planned) -> Result<(), LedgerError> {
        if planned.tx.generation() != self.generation {
            return Err(LedgerError::Stale);
        }
        self.apply(&planned.effect);
        Ok(())
    }

    /// Records a planned effect and advances the generation.
    fn apply(&mut self, effect: &Effect) {
        match effect {
            Effect::Pages { splice, vm } => {
                self.store.apply(splice);
                if let Some((slot, delta)) = vm
                    && let Some(record) = &mut self.vms[*slot]
                {
                    match delta {
                        VmPages::Add(n) => record.pages += n,
                        VmPages::Remove(n) => record.pages -= n,
                    }
                    if record.pages == 0 && record.status == VmStatus::Dying {
                        self.vms[*slot] = None;
                    }
                }
            }
            Effect::CreateVm { slot, vm } => {
                self.vms[*slot] = Some(VmRecord {
                    vm: *vm,
                    status: VmStatus::Alive,
                    pages: 0,
                });
            }
            Effect::DestroyVm { slot } => {
                if let Some(record) = &mut self.vms[*slot] {
                    if record.pages == 0 {
                        self.vms[*slot] = None;
                    } else {
                        record.status = VmStatus::Dying;
                    }
                }
            }
        }
        self.generation = self.generation.wrapping_add(1);
    }

    /// Prepares and commits `op` at once, for callers with no mechanism
    /// step in between (boot-time set-up, tests).
    pub fn execute(&mut self, op: Op) -> Result<Transaction, LedgerError> {
        let tx = self.prepare(op)?;
        self.commit(&tx)?;
        Ok(tx)
    }

    fn plan(&self, op: Op) -> Result<(Transaction, Effect), LedgerError> {
        let tx = Transaction::new(op, self.generation);
        let pages = |splice, vm| Effect::Pages { splice, vm };
        Ok(match op {
            Op::HostShareHyp { range } => {
                let end = range.checked_end()?;
                let splice = self.plan_pages(
                    range.start,
                    end,
                    exclusive(Owner::Host),
                    Owner::Host,
                    Some(Owner::Hypervisor),
                )?;
                let tx = tx.with(Change::Map {
                    party: Owner::Hypervisor,
                    range,
                    perms: Perms::RW,
                });
                (tx, pages(splice, None))
            }
            Op::HostUnshareHyp { range } => {
                let end = range.checked_end()?;
                let splice = self.plan_pages(
                    range.start,
                    end,
                    shared(Owner::Host, Owner::Hypervisor),
                    Owner::Host,
                    None,
                )?;
                let tx = tx.with(Change::Unmap {
                    party: Owner::Hypervisor,
                    range,
                });
                (tx, pages(splice, None))
            }
            Op::HostDonateVm { range, vm } => {
                let end = range.checked_end()?;
                let slot = self.alive_vm(vm)?;
                let splice = self.plan_pages(
                    range.start,
                    end,
                    exclusive(Owner::Host),
                    Owner::Vm(vm),
                    None,
                )?;
                let tx = tx
                    .with(Change::Unmap {
                        party: Owner::Host,
                        range,
                    })
                    .with_scrub(range)
                    .with(Change::Map {
                        party: Owner::Vm(vm),
                        range,
                        perms: Perms::RWX,
                    });
                (tx, pages(splice, Some((slot, VmPages::Add(range.count)))))
            }
            Op::VmShareHost { vm, range } => {
                let end = range.checked_end()?;
                self.alive_vm(vm)?;
                let splice = self.plan_pages(
                    range.start,
                    end,
                    exclusive(Owner::Vm(vm)),
                    Owner::Vm(vm),
                    Some(Owner::Host),
                )?;
                let tx = tx.with(Change::Map {
                    party: Owner::Host,
                    range,
                    perms: Perms::RW,
                });
                (tx, pages(splice, None))
            }
            Op::VmUnshareHost { vm, range } => {
                let end = range.checked_end()?;
                self.alive_vm(vm)?;
                let splice = self.plan_pages(
                    range.start,
                    end,
                    shared(Owner::Vm(vm), Owner::Host),
                    Owner::Vm(vm),
                    None,
                )?;
                let tx = tx.with(Change::Unmap {
                    party: Owner::Host,
                    range,
                });
                (tx, pages(splice, None))
            }
            Op::CreateVm { vm } => {
                if self.vm_slot(vm).is_some() {
                    return Err(LedgerError::VmExists(vm));
                }
                let slot = self
                    .vms
                    .iter()
                    .position(Option::is_none)
                    .ok_or(LedgerError::TooManyVms)?;
                (tx, Effect::CreateVm { slot, vm })
            }
            Op::DestroyVm { vm } => {
                let slot = self.alive_vm(vm)?;
                (tx, Effect::DestroyVm { slot })
            }
            Op::Reclaim { vm, range } => {
                let end = range.checked_end()?;
                let slot = self.dying_vm(vm)?;
                let splice =
                    self.plan_pages(range.start, end, owned(Owner::Vm(vm)), Owner::Host, None)?;
                let tx = tx
                    .with(Change::Unmap {
                        party: Owner::Vm(vm),
                        range,
                    })
                    .with_scrub(range)
                    .with(Change::Map {
                        party: Owner::Host,
                        range,
                        perms: Perms::RWX,
                    });
                (
                    tx,
                    pages(splice, Some((slot, VmPages::Remove(range.count)))),
                )
            }
            Op::HostDonateHyp { range } => {
                let end = range.checked_end()?;
                let splice = self.plan_pages(
                    range.start,
                    end,
                    exclusive(Owner::Host),
                    Owner::Hypervisor,
                    None,
                )?;
                let tx = tx
                    .with(Change::Unmap {
                        party: Owner::Host,
                        range,
                    })
                    .with_scrub(range);
                (tx, pages(splice, None))
            }
            Op::HypReturnHost { range } => {
                let end = range.checked_end()?;
                // The hypervisor's own memory (what it was given at boot)
                // never leaves it: only pages the host donated come back.
                if self
                    .hypervisor()
                    .iter()
                    .any(|h| h.start < end && range.start < h.start.saturating_add(h.count))
                {
                    return Err(LedgerError::PageNotOwned { pfn: range.start });
                }
                let splice = self.plan_pages(
                    range.start,
                    end,
                    exclusive(Owner::Hypervisor),
                    Owner::Host,
                    None,
                )?;
                let tx = tx.with_scrub(range).with(Change::Map {
                    party: Owner::Host,
                    range,
                    perms: Perms::RWX,
                });
                (tx, pages(splice, None))
            }
            Op::DonateService { range, service } => {
                let end = range.checked_end()?;
                let splice = self.plan_pages(
                    range.start,
                    end,
                    exclusive(Owner::Host),
                    Owner::Service(service),
                    None,
                )?;
                let tx = tx
                    .with(Change::Unmap {
                        party: Owner::Host,
                        range,
                    })
                    .with_scrub(range)
                    .with(Change::Map {
                        party: Owner::Service(service),
                        range,
                        perms: Perms::RW,
                    });
                (tx, pages(splice, None))
            }
        })
    }

    /// Checks every page of `[start, end)` with `check`, then plans giving
    /// them `(owner, borrower)` and checks there is room for it.
    fn plan_pages(
        &self,
        start: u64,
        end: u64,
        check: impl Fn(&Extent, u64) -> Result<(), LedgerError>,
        owner: Owner,
        borrower: Option<Owner>,
    ) -> Result<Splice, LedgerError> {
        self.store.check_range(start, end, check)?;
        let splice = self.store.plan_assign(start, end, owner, borrower);
        if !self.store.fits(&splice) {
            return Err(LedgerError::OutOfCapacity);
        }
        Ok(splice)
    }

    fn vm_slot(&self, vm: VmId) -> Option<usize> {
        self.vms.iter().position(|r| r.is_some_and(|r| r.vm == vm))
    }

    fn vm_with_status(&self, vm: VmId, status: VmStatus) -> Result<usize, LedgerError> {
        let slot = self.vm_slot(vm).ok_or(LedgerError::NoSuchVm(vm))?;
        match self.vms[slot] {
            Some(record) if record.status == status => Ok(slot),
            _ => Err(match status {
                VmStatus::Alive => LedgerError::VmDying(vm),
                VmStatus::Dying => LedgerError::VmAlive(vm),
            }),
        }
    }

    fn alive_vm(&self, vm: VmId) -> Result<usize, LedgerError> {
        self.vm_with_status(vm, VmStatus::Alive)
    }

    fn dying_vm(&self, vm: VmId) -> Result<usize, LedgerError> {
        self.vm_with_status(vm, VmStatus::Dying)
    }

    // ---- Queries -----------------------------------------------------------

    /// The owner and borrower of `pfn`, or `None` if it is not RAM.
    pub fn page(&self, pfn: u64) -> Option<(Owner, Option<Owner>)> {
        self.store.find(pfn).map(|e| (e.owner, e.borrower))
    }

    /// `pfn` as `party` sees it (`NoPage` outside RAM).
    pub fn state(&self, party: Owner, pfn: u64) -> PageState {
        match self.page(pfn) {
            Some((owner, borrower)) => PageState::of(party, owner, borrower),
            None => PageState::NoPage,
        }
    }

    /// The extents, in ascending order.
    pub fn extents(&self) -> &[Extent] {
        self.store.extents()
    }

    /// The extents overlapping `range`, in ascending order.
    pub fn extents_in(&self, range: PfnRange) -> &[Extent] {
        self.store
            .overlapping(range.start, range.end().unwrap_or(u64::MAX))
    }

    /// What the ledger knows of `vm`.
    pub fn vm(&self, vm: VmId) -> Option<VmRecord> {
        self.vm_slot(vm).and_then(|slot| self.vms[slot])
    }

    /// Every VM the ledger tracks.
    pub fn vms(&self) -> impl Iterator<Item = VmRecord> + '_ {
        self.vms.iter().flatten().copied()
    }

    /// The RAM of the boot layout, sorted.
    pub fn ram(&self) -> &[PfnRange] {
        &self.ram[..self.ram_len]
    }

    /// The hypervisor ranges of the boot layout.
    pub fn hypervisor(&self) -> &[PfnRange] {
        &self.hyp[..self.hyp_len]
    }

    /// How many commits the ledger has seen.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many extents the buffer holds at most.
    pub fn capacity(&self) -> usize {
        self.store.capacity()
    }

    /// Bytes of ledger state in use: the extents (24 bytes each), the VM
    /// records (16 bytes each) and the boot ranges (16 bytes each).
    pub fn state_bytes(&self) -> usize {
        core::mem::size_of_val(self.extents())
            + self.vms().count() * size_of::<VmRecord>()
            + (self.ram_len + self.hyp_len) * size_of::<PfnRange>()
    }

    /// Bytes the ledger reserves: the whole extent buffer and the fixed
    /// tables, wherever the buffer lives.
    pub fn footprint_bytes(&self) -> usize {
        self.capacity() * size_of::<Extent>() + size_of::<Self>() - size_of::<S>()
    }

    // ---- Invariants --------------------------------------------------------

    /// Verifies the ledger's invariants: the extents are non-empty, sorted,
    /// non-overlapping and merged, and cover exactly the RAM; every share is
    /// one the operations can create, between two distinct parties (the
    /// owner `SharedOwned`, the borrower `SharedBorrowed`, nobody else
    /// mapping); the boot hypervisor ranges are the hypervisor's alone; every
    /// VM owning pages is in the table with the right page count.
    ///
    /// "Exactly one owner" holds by construction: an extent names one owner.
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let extents = self.extents();
        for (index, e) in extents.iter().enumerate() {
            if e.count == 0 {
                return Err(InvariantViolation::EmptyExtent { index });
            }
            if e.start.checked_add(e.count).is_none() {
                return Err(InvariantViolation::ExtentOverflow { index });
            }
            if let Some(prev) = index.checked_sub(1).map(|i| &extents[i]) {
                if prev.end() > e.start {
                    return Err(InvariantViolation::Unsorted { index });
                }
                if prev.end() == e.start && prev.same_state(e) {
                    return Err(InvariantViolation::Unmerged { index });
                }
            }
        }
        self.check_coverage()?;

        let mut pages = [0u64; MAX_VMS];
        for e in extents {
            let pfn = e.start;
            match (e.owner, e.borrower) {
                (owner, Some(borrower)) if owner == borrower => {
                    return Err(InvariantViolation::SelfShare { pfn });
                }
                (_, None) | (Owner::Host, Some(Owner::Hypervisor)) => {}
                (Owner::Vm(_), Some(Owner::Host)) => {}
                _ => return Err(InvariantViolation::IllegalShare { pfn }),
            }
            if let Owner::Vm(vm) = e.owner {
                let slot = self
                    .vm_slot(vm)
                    .ok_or(InvariantViolation::UnknownVm { pfn, vm })?;
                pages[slot] += e.count;
            }
        }
        for hyp in self.hypervisor() {
            let end = hyp.start + hyp.count;
            let mut next = hyp.start;
            for e in self.store.overlapping(hyp.start, end) {
                if e.start > next || e.owner != Owner::Hypervisor || e.borrower.is_some() {
                    return Err(InvariantViolation::HypervisorMemoryLost { pfn: next });
                }
                next = e.end();
            }
            if next < end {
                return Err(InvariantViolation::HypervisorMemoryLost { pfn: next });
            }
        }
        for (slot, record) in self.vms.iter().enumerate() {
            let Some(record) = record else { continue };
            if self.vms[..slot].iter().flatten().any(|r| r.vm == record.vm) {
                return Err(InvariantViolation::DuplicateVm { vm: record.vm });
            }
            if pages[slot] != record.pages {
                return Err(InvariantViolation::VmPageCount { vm: record.vm });
            }
            if record.pages == 0 && record.status == VmStatus::Dying {
                return Err(InvariantViolation::DeadVmLingers { vm: record.vm });
            }
        }
        Ok(())
    }

    /// The extents cover exactly the union of the RAM ranges (sorted, and
    /// the extents sorted and non-overlapping already).
    fn check_coverage(&self) -> Result<(), InvariantViolation> {
        let extents = self.extents();
        let mut i = 0;
        let ram = self.ram();
        let mut r = 0;
        while r < ram.len() {
            // One run of touching RAM ranges.
            let start = ram[r].start;
            let mut end = ram[r].start + ram[r].count;
            r += 1;
            while r < ram.len() && ram[r].start == end {
                end += ram[r].count;
                r += 1;
            }
            let mut next = start;
            while next < end {
                let Some(e) = extents.get(i) else {
                    return Err(InvariantViolation::RamNotCovered { pfn: next });
                };
                if e.start < next {
                    return Err(InvariantViolation::NotRam { pfn: e.start });
                }
                if e.start > next {
                    return Err(InvariantViolation::RamNotCovered { pfn: next });
                }
                if e.end() > end {
                    return Err(InvariantViolation::NotRam { pfn: end });
                }
                next = e.end();
                i += 1;
            }
        }
        match extents.get(i) {
            Some(e) => Err(InvariantViolation::NotRam { pfn: e.start }),
            None => Ok(()),
        }
    }
}

impl<S: AsRef<[Extent]> + AsMut<[Extent]>> PartialEq for Ledger<S> {
    /// Two ledgers are equal when their state in use is.
    fn eq(&self, other: &Self) -> bool {
        self.extents() == other.extents()
            && self.vms == other.vms
            && self.ram() == other.ram()
            && self.hypervisor() == other.hypervisor()
            && self.generation == other.generation
    }
}

impl<S: AsRef<[Extent]> + AsMut<[Extent]>> Eq for Ledger<S> {}

impl<S: AsRef<[Extent]> + AsMut<[Extent]>> fmt::Debug for Ledger<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ledger")
            .field("generation", &self.generation)
            .field("capacity", &self.capacity())
            .field("extents", &self.extents())
            .field("vms", &VmList(self))
            .field("ram", &self.ram())
            .field("hypervisor", &self.hypervisor())
            .finish()
    }
}

struct VmList<'a, S>(&'a Ledger<S>);

impl<S: AsRef<[Extent]> + AsMut<[Extent]>> fmt::Debug for VmList<'_, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.0.vms()).finish()
    }
}

#[cfg(test)]
mod tests {
    //! The checker against ledgers corrupted on purpose: each invariant is
    //! broken in turn and must be reported.

    use super::*;

    type Small = Ledger<[Extent; 16]>;

    /// host | hyp | host | VM1 (2 pages) | host, and VM2 alive without pages.
    fn ledger() -> Small {
        let mut l = Ledger::new(
            [Extent::EMPTY; 16],
            &[PfnRange::new(0x100, 0x40)],
            &[PfnRange::new(0x110, 0x10)],
        )
        .unwrap();
        l.execute(Op::CreateVm { vm: 1 }).unwrap();
        l.execute(Op::CreateVm { vm: 2 }).unwrap();
        l.execute(Op::HostDonateVm {
            range: PfnRange::new(0x128, 2),
            vm: 1,
        })
        .unwrap();
        l.check_invariants().unwrap();
        assert_eq!(l.extents().len(), 5);
        l
    }

    fn broken(corrupt: impl FnOnce(&mut Small)) -> InvariantViolation {
        let mut l = ledger();
        corrupt(&mut l);
        l.check_invariants().unwrap_err()
    }

    fn extent(l: &mut Small, i: usize) -> &mut Extent {
        &mut l.store.extents_mut()[i]
    }

    #[test]
    fn empty_and_overflowing_extents() {
        assert_eq!(
            broken(|l| extent(l, 1).count = 0),
            InvariantViolation::EmptyExtent { index: 1 }
        );
        assert_eq!(
            broken(|l| extent(l, 4).count = u64::MAX),
            InvariantViolation::ExtentOverflow { index: 4 }
        );
    }

    #[test]
    fn unsorted_overlapping_and_unmerged_extents() {
        assert_eq!(
            broken(|l| l.store.extents_mut().swap(1, 2)),
            InvariantViolation::Unsorted { index: 2 }
        );
        assert_eq!(
            broken(|l| extent(l, 0).count += 1),
            InvariantViolation::Unsorted { index: 1 }
        );
        assert_eq!(
            broken(|l| extent(l, 1).owner = Owner::Host),
            InvariantViolation::Unmerged { index: 1 }
        );
    }

    #[test]
    fn coverage_of_ram() {
        // A gap: the hypervisor extent starts one page late.
        assert_eq!(
            broken(|l| {
                extent(l, 1).start += 1;
                extent(l, 1).count -= 1;
            }),
            InvariantViolation::RamNotCovered { pfn: 0x110 }
        );
        // The last extent runs past the end of RAM.
        assert_eq!(
            broken(|l| extent(l, 4).count += 1),
            InvariantViolation::NotRam { pfn: 0x140 }
        );
        // The first extent starts before RAM.
        assert_eq!(
            broken(|l| {
                extent(l, 0).start -= 1;
                extent(l, 0).count += 1;
            }),
            InvariantViolation::NotRam { pfn: 0xff }
        );
    }

    #[test]
    fn shares_between_exactly_two_parties() {
        assert_eq!(
            broken(|l| extent(l, 0).borrower = Some(Owner::Host)),
            InvariantViolation::SelfShare { pfn: 0x100 }
        );
        // A VM page borrowed by the hypervisor, by another VM, by a service.
        for borrower in [Owner::Hypervisor, Owner::Vm(2), Owner::Service(0)] {
            assert_eq!(
                broken(|l| extent(l, 3).borrower = Some(borrower)),
                InvariantViolation::IllegalShare { pfn: 0x128 }
            );
        }
        // Hypervisor memory borrowed by the host.
        assert_eq!(
            broken(|l| extent(l, 1).borrower = Some(Owner::Host)),
            InvariantViolation::IllegalShare { pfn: 0x110 }
        );
        // A host page shared with a VM (pKVM's non-protected guest share,
        // which Moat does not have).
        assert_eq!(
            broken(|l| extent(l, 0).borrower = Some(Owner::Vm(1))),
            InvariantViolation::IllegalShare { pfn: 0x100 }
        );
    }

    #[test]
    fn host_pages_go_to_the_hypervisor_and_come_back() {
        let mut l = ledger();
        let range = PfnRange::new(0x130, 4);
        let tx = l.execute(Op::HostDonateHyp { range }).unwrap();
        assert_eq!(
            tx.changes(),
            &[Change::Unmap {
                party: Owner::Host,
                range
            }]
        );
        assert_eq!(tx.scrub(), Some(range));
        assert_eq!(l.page(0x131), Some((Owner::Hypervisor, None)));
        l.check_invariants().unwrap();
        // Donated once: not the host's to donate again.
        assert_eq!(
            l.prepare(Op::HostDonateHyp { range }).unwrap_err(),
            LedgerError::PageNotOwned { pfn: 0x130 }
        );
        let back = l.execute(Op::HypReturnHost { range }).unwrap();
        assert_eq!(back.scrub(), Some(range));
        assert_eq!(l.page(0x133), Some((Owner::Host, None)));
        l.check_invariants().unwrap();
    }

    #[test]
    fn a_planned_transaction_commits_in_its_generation_only() {
        let mut l = ledger();
        let range = PfnRange::new(0x130, 4);
        let planned = l
            .plan_for_commit(Op::HostDonateVm { range, vm: 2 })
            .unwrap();
        assert_eq!(
            *planned.transaction(),
            l.prepare(Op::HostDonateVm { range, vm: 2 }).unwrap()
        );
        // Another commit first: the plan is stale and nothing changes.
        let other = l.plan_for_commit(Op::HostDonateHyp { range }).unwrap();
        l.commit_planned(&other).unwrap();
        let after_other = l.clone();
        assert_eq!(l.commit_planned(&planned), Err(LedgerError::Stale));
        assert_eq!(l, after_other);
        // Planned again in the new generation: the ledger's own answer
        // now (the pages are no longer the host's).
        assert_eq!(
            l.plan_for_commit(Op::HostDonateVm { range, vm: 2 }).err(),
            Some(LedgerError::PageNotOwned { pfn: 0x130 })
        );
        // Committed in its generation: the same ledger as a commit of
        // the transaction would leave.
        let back = l.plan_for_commit(Op::HypReturnHost { range }).unwrap();
        let mut by_commit = l.clone();
        by_commit.commit(back.transaction()).unwrap();
        l.commit_planned(&back).unwrap();
        assert_eq!(l, by_commit);
        assert_eq!(l.page(0x131), Some((Owner::Host, None)));
        l.check_invariants().unwrap();
    }

    #[test]
    fn the_hypervisors_own_memory_is_never_returned() {
        let l = ledger();
        for range in [PfnRange::new(0x110, 1), PfnRange::new(0x10f, 2)] {
            assert!(l.prepare(Op::HypReturnHost { range }).is_err());
        }
        // Pages that are the host's, a VM's or shared are not the hypervisor's to return.
        for range in [PfnRange::new(0x100, 1), PfnRange::new(0x128, 1)] {
            assert_eq!(
                l.prepare(Op::HypReturnHost { range }).unwrap_err(),
                LedgerError::PageNotOwned { pfn: range.start }
            );
        }
    }

    #[test]
    fn hypervisor_memory_stays_the_hypervisors() {
        assert_eq!(
            broken(|l| {
                extent(l, 1).owner = Owner::Vm(2);
                let slot = l.vm_slot(2).unwrap();
                l.vms[slot].as_mut().unwrap().pages = 0x10;
            }),
            InvariantViolation::HypervisorMemoryLost { pfn: 0x110 }
        );
        assert_eq!(
            broken(|l| extent(l, 1).owner = Owner::Service(3)),
            InvariantViolation::HypervisorMemoryLost { pfn: 0x110 }
        );
    }

    #[test]
    fn the_vm_table_matches_the_pages() {
        assert_eq!(
            broken(|l| extent(l, 3).owner = Owner::Vm(9)),
            InvariantViolation::UnknownVm { pfn: 0x128, vm: 9 }
        );
        assert_eq!(
            broken(|l| {
                let slot = l.vm_slot(1).unwrap();
                l.vms[slot].as_mut().unwrap().pages += 1;
            }),
            InvariantViolation::VmPageCount { vm: 1 }
        );
        assert_eq!(
            broken(|l| {
                let record = l.vm(1);
                let free = l.vms.iter().position(Option::is_none).unwrap();
                l.vms[free] = record;
            }),
            InvariantViolation::DuplicateVm { vm: 1 }
        );
        assert_eq!(
            broken(|l| {
                let slot = l.vm_slot(2).unwrap();
                l.vms[slot].as_mut().unwrap().status = VmStatus::Dying;
            }),
            InvariantViolation::DeadVmLingers { vm: 2 }
        );
    }
}
