//! A test fixture, never part of a real image: a memory ledger that lies.
//!
//! It serves the `ledger` interface with the real ledger
//! ([`moat_ledger::Ledger`]) underneath, and answers `boot`, `extent`,
//! `lookup` and most requests honestly. A few requests, chosen by the
//! request itself so that one boot can exercise them all, get a
//! transaction tampered with in a way the core's own check
//! (`moat_kernel::txcheck`) must refuse; see [`Lie`] and [`lie_for`]. The
//! integration test `core_refuses_a_lying_ledger` boots the test host with
//! this service in the ledger's place (`images/rogue-ledger.toml`) and
//! expects every lie refused, with nothing changed.
//!
//! Its `lookup` lies too ([`lookup_lie`]): a frame a VM owns is answered
//! as the host's, shared with the hypervisor, which is what `VM_LOAD` asks
//! of its source.
//!
//! A lie is never committed: the core refuses it before it applies
//! anything, and should a commit come anyway, [`Rogue::commit`] refuses it.
//! One request is answered honestly and its commit refused
//! ([`Lie::RefusedCommit`]): the core must then change nothing and go on.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use moat_abi::Error;
use moat_abi::services::{
    FrameRange, LedgerBoot, LedgerChange, LedgerExtent, LedgerRequest, LedgerSummary,
    LedgerTransaction, Party, ledger,
};
use moat_ledger::{Extent, LedgerServer, PfnRange};

/// The ways the rogue ledger lies. Each names the request that triggers it:
/// a donation to a VM (`HOST_DONATE_VM`) of a given number of frames, or a
/// share of one frame with the hypervisor. Donations of 8 frames or more
/// than 12, and every other request, are answered honestly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lie {
    /// Donation of 1 frame: the host's mapping is left in place, so the
    /// host and the VM would both write the page.
    KeepHostMapping,
    /// Donation of 2 frames: no scrub, so the VM would read the host's data.
    NoScrub,
    /// Donation of 3 frames: the map and the scrub take one frame more.
    PastTheRequest,
    /// Donation of 4 frames: the map and the scrub point at the first
    /// frames of the hypervisor's carve-out.
    IntoTheCarveOut,
    /// Donation of 5 frames: the transaction answers a donation to another
    /// VM.
    AnotherRequest,
    /// Donation of 6 frames: the frames are mapped read/write/execute for
    /// the host instead of the VM.
    MapForTheHost,
    /// Donation of 7 frames: the frames are mapped for another VM.
    MapForAnotherVm,
    /// Donation of 9 frames: a write-only mapping.
    WriteOnly,
    /// Donation of 10 frames: the map comes before the unmap.
    MapBeforeUnmap,
    /// Donation of 11 frames: the host's mapping is removed from the first
    /// frame only, while the VM maps them all.
    PartialUnmap,
    /// Donation of 12 frames: a well-formed donation whoever owns the
    /// frames (the real ledger refuses frames the host does not own).
    NotTheHosts,
    /// Share of 1 frame with the hypervisor: the hypervisor's mapping is
    /// executable.
    ExecutableShare,
    /// A donation of frames that are not the host's RAM to give (beyond
    /// RAM, or the hypervisor's): the real ledger refuses it; this one
    /// answers with a well-formed donation.
    Forged,
    /// Share of 2 frames with the hypervisor: an honest transaction, whose
    /// commit is then refused (a ledger that changed its mind, or lost
    /// the transaction).
    RefusedCommit,
}

/// The lie for `request`, given the ledger's RAM and hypervisor frames;
/// `None`: the request is answered honestly.
pub fn lie_for(request: &LedgerRequest, ram: &[PfnRange], hyp: &[PfnRange]) -> Option<Lie> {
    let frames = request.frames;
    match request.op {
        LedgerRequest::HOST_DONATE_VM => {
            let end = frames.start.checked_add(frames.count)?;
            let in_ram = ram
                .iter()
                .any(|r| r.start <= frames.start && r.end().is_some_and(|e| end <= e));
            let in_hyp = hyp
                .iter()
                .any(|h| h.start < end && h.end().is_some_and(|e| frames.start < e));
            if frames.count > 0 && (!in_ram || in_hyp) {
                return Some(Lie::Forged);
            }
            Some(match frames.count {
                1 => Lie::KeepHostMapping,
                2 => Lie::NoScrub,
                3 => Lie::PastTheRequest,
                4 => Lie::IntoTheCarveOut,
                5 => Lie::AnotherRequest,
                6 => Lie::MapForTheHost,
                7 => Lie::MapForAnotherVm,
                9 => Lie::WriteOnly,
                10 => Lie::MapBeforeUnmap,
                11 => Lie::PartialUnmap,
                12 => Lie::NotTheHosts,
                _ => return None,
            })
        }
        LedgerRequest::HOST_SHARE_HYP if frames.count == 1 => Some(Lie::ExecutableShare),
        LedgerRequest::HOST_SHARE_HYP if frames.count == 2 => Some(Lie::RefusedCommit),
        _ => None,
    }
}

/// The rogue answer to a lookup whose honest answer is `honest`: a frame a
/// VM owns is reported as the host's, shared with the hypervisor (the one
/// frame asked about), so that a `VM_LOAD` from it would copy that VM's
/// memory; every other answer is honest.
pub fn lookup_lie(pfn: u64, honest: LedgerExtent) -> LedgerExtent {
    if honest.owner.kind != Party::VM {
        return honest;
    }
    LedgerExtent {
        frames: FrameRange {
            start: pfn,
            count: 1,
        },
        owner: Party {
            kind: Party::HOST,
            id: 0,
        },
        borrower: Party {
            kind: Party::HYPERVISOR,
            id: 0,
        },
    }
}

/// `honest` (the real ledger's answer to `request`, a donation's being
/// `[unmap host, map VM RWX]` with a scrub), tampered with as `lie` says.
/// `hyp` is the hypervisor's first range; `generation` the ledger's.
pub fn tamper(
    lie: Lie,
    request: &LedgerRequest,
    honest: Option<LedgerTransaction>,
    hyp: FrameRange,
    generation: u64,
) -> LedgerTransaction {
    let vm = |id: u32, perms: u32, frames: FrameRange| LedgerChange {
        kind: LedgerChange::MAP,
        perms,
        party: Party {
            kind: Party::VM,
            id,
        },
        frames,
    };
    let rwx = 0b111;
    let mut tx = honest.unwrap_or_else(|| LedgerTransaction {
        generation,
        request: *request,
        change_count: 2,
        has_scrub: 1,
        scrub: request.frames,
        changes: [
            LedgerChange {
                kind: LedgerChange::UNMAP,
                perms: 0,
                party: Party {
                    kind: Party::HOST,
                    id: 0,
                },
                frames: request.frames,
            },
            vm(request.party, rwx, request.frames),
        ],
    });
    let other = request.party.wrapping_add(1);
    match lie {
        Lie::KeepHostMapping => {
            tx.changes = [tx.changes[1], LedgerChange::default()];
            tx.change_count = 1;
        }
        Lie::NoScrub => {
            tx.has_scrub = 0;
            tx.scrub = FrameRange::default();
        }
        Lie::PastTheRequest => {
            tx.changes[1].frames.count += 1;
            tx.scrub.count += 1;
        }
        Lie::IntoTheCarveOut => {
            let frames = FrameRange {
                start: hyp.start,
                count: request.frames.count,
            };
            tx.changes[1].frames = frames;
            tx.scrub = frames;
        }
        Lie::AnotherRequest => {
            tx.request.party = other;
            tx.changes[1].party.id = other;
        }
        Lie::MapForTheHost => {
            tx.changes[1].party = Party {
                kind: Party::HOST,
                id: 0,
            };
            tx.changes[1].perms = rwx;
        }
        Lie::MapForAnotherVm => tx.changes[1].party.id = other,
        Lie::WriteOnly => tx.changes[1].perms = 0b010,
        Lie::MapBeforeUnmap => tx.changes.swap(0, 1),
        Lie::PartialUnmap => tx.changes[0].frames.count = 1,
        Lie::NotTheHosts => {}
        Lie::ExecutableShare => tx.changes[0].perms = rwx,
        Lie::Forged | Lie::RefusedCommit => {}
    }
    tx
}

/// The `ledger` service, lying as [`lie_for`] says: the real
/// [`LedgerServer`] underneath, with `prepare` wrapped.
pub struct Rogue<'a> {
    honest: LedgerServer<'a>,
    /// The prepared transaction's commit will be refused.
    refuse_commit: bool,
}

impl<'a> Rogue<'a> {
    /// A service that builds its ledger in `storage` at `boot`.
    pub fn new(storage: Option<&'a mut [Extent]>) -> Self {
        Self {
            honest: LedgerServer::new(storage),
            refuse_commit: false,
        }
    }
}

use moat_ledger::wire::{encode, error_of, frames, op_of};

impl ledger::Server for Rogue<'_> {
    fn boot(&mut self, boot: LedgerBoot) -> Result<LedgerSummary, Error> {
        self.honest.boot(boot)
    }

    fn extent(&mut self, index: u64) -> Result<LedgerExtent, Error> {
        self.honest.extent(index)
    }

    fn prepare(&mut self, request: LedgerRequest) -> Result<LedgerTransaction, Error> {
        let ledger = self.honest.ledger().ok_or(Error::Denied)?;
        self.refuse_commit = false;
        let Some(lie) = lie_for(&request, ledger.ram(), ledger.hypervisor()) else {
            return self.honest.prepare(request);
        };
        if lie == Lie::RefusedCommit {
            self.refuse_commit = true;
            return self.honest.prepare(request);
        }
        let op = op_of(&request).ok_or(Error::InvalidParameters)?;
        let honest = ledger.prepare(op);
        let generation = ledger.generation();
        let hyp = ledger.hypervisor().first().copied().unwrap_or_default();
        // A lie is never committed: nothing waits for `commit`.
        self.honest.forget_prepared();
        match lie {
            // A forged donation answers a request the real ledger refuses.
            Lie::Forged | Lie::NotTheHosts => Ok(tamper(
                lie,
                &request,
                None,
                FrameRange::default(),
                generation,
            )),
            // Any other lie starts from the honest answer.
            _ => {
                let tx = honest.map_err(error_of)?;
                Ok(tamper(
                    lie,
                    &request,
                    Some(encode(request, &tx)),
                    frames(hyp),
                    tx.generation(),
                ))
            }
        }
    }

    fn commit(&mut self, generation: u64) -> Result<u64, Error> {
        if core::mem::take(&mut self.refuse_commit) {
            // The honest transaction is dropped unrecorded.
            self.honest.forget_prepared();
            return Err(Error::Denied);
        }
        // After a lie nothing is pending, and the commit is refused.
        self.honest.commit(generation)
    }

    fn lookup(&mut self, pfn: u64) -> Result<LedgerExtent, Error> {
        self.honest.lookup(pfn).map(|e| lookup_lie(pfn, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ledger::Server as _;
    use moat_kernel::txcheck;
    use moat_platform::dt::Range;

    const RAM: (u64, u64) = (0x40000, 0x40000);
    const HYP: (u64, u64) = (0x40200, 0x1400);
    const VM: u32 = 1;
    const AT: u64 = 0x70000;

    fn booted(storage: &mut [Extent]) -> Rogue<'_> {
        let mut rogue = Rogue::new(Some(storage));
        let mut boot = LedgerBoot {
            ram_count: 1,
            hypervisor_count: 1,
            ..Default::default()
        };
        boot.ram[0] = FrameRange {
            start: RAM.0,
            count: RAM.1,
        };
        boot.hypervisor[0] = FrameRange {
            start: HYP.0,
            count: HYP.1,
        };
        rogue.boot(boot).unwrap();
        let create = LedgerRequest {
            op: LedgerRequest::CREATE_VM,
            party: VM,
            frames: FrameRange::default(),
        };
        let tx = rogue.prepare(create).unwrap();
        rogue.commit(tx.generation).unwrap();
        rogue
    }

    fn check(request: &LedgerRequest, tx: &LedgerTransaction) -> Result<(), &'static str> {
        let ram = [Range {
            base: RAM.0 << 12,
            size: RAM.1 << 12,
        }];
        let carve_out = [Range {
            base: HYP.0 << 12,
            size: HYP.1 << 12,
        }];
        txcheck::check(request, tx, Some(VM as u16), &ram, &carve_out).map(|_| ())
    }

    fn request(op: u32, start: u64, count: u64) -> LedgerRequest {
        LedgerRequest {
            op,
            party: if op == LedgerRequest::HOST_DONATE_VM {
                VM
            } else {
                0
            },
            frames: FrameRange { start, count },
        }
    }

    /// The refused commit: an honest transaction the core's check accepts,
    /// whose commit is refused; the ledger records nothing, and the next
    /// request prepares and commits as usual.
    #[test]
    fn a_refused_commit_records_nothing() {
        let mut storage = [Extent::EMPTY; 64];
        let mut rogue = booted(&mut storage);
        let share = request(LedgerRequest::HOST_SHARE_HYP, AT, 2);
        let tx = rogue.prepare(share).unwrap();
        assert_eq!(check(&share, &tx), Ok(()));
        assert_eq!(rogue.commit(tx.generation), Err(Error::Denied));
        let owner = rogue.lookup(AT).unwrap();
        assert_eq!(owner.owner.kind, Party::HOST);
        assert_eq!(owner.borrower.kind, Party::NONE);
        let donate = request(LedgerRequest::HOST_DONATE_VM, AT, 8);
        let tx = rogue.prepare(donate).unwrap();
        rogue.commit(tx.generation).unwrap();
    }

    /// Every lie is one the core's check refuses, for the reason expected;
    /// none of them can be committed; honest answers still pass and commit.
    #[test]
    fn every_lie_is_refused_by_the_core_and_never_committed() {
        let donate = LedgerRequest::HOST_DONATE_VM;
        let cases = [
            (request(donate, AT, 1), "a transaction of a shape"),
            (
                request(donate, AT, 2),
                "frames change owner without being scrubbed",
            ),
            (
                request(donate, AT, 3),
                "a change outside the requested frames",
            ),
            (
                request(donate, AT, 4),
                "a change outside the requested frames",
            ),
            (
                request(donate, AT, 5),
                "the transaction answers another request",
            ),
            (request(donate, AT, 6), "a transaction of a shape"),
            (
                request(donate, AT, 7),
                "a change for a party the request does not name",
            ),
            (
                request(donate, AT, 9),
                "a mapping with permissions the core does not give",
            ),
            (request(donate, AT, 10), "an unmap after a map"),
            (
                request(donate, AT, 11),
                "a change of only part of the requested frames",
            ),
            (
                request(LedgerRequest::HOST_SHARE_HYP, AT, 1),
                "a transaction of a shape",
            ),
            (
                request(donate, HYP.0, 1),
                "a change of the hypervisor's own memory",
            ),
            (
                request(donate, RAM.0 + RAM.1 - 1, 2),
                "a change of frames that are not RAM",
            ),
        ];
        let mut storage = [Extent::EMPTY; 64];
        let mut rogue = booted(&mut storage);
        for (req, why) in cases {
            let tx = rogue.prepare(req).unwrap();
            let refused = check(&req, &tx).unwrap_err();
            assert!(refused.starts_with(why), "{req:?}: {refused}");
            assert_eq!(rogue.commit(tx.generation), Err(Error::Denied));
        }
        // A well-formed donation of frames the host does not own passes the
        // transaction check: only the core's own stage-2 can tell (the
        // integration test shows it refusing).
        let req = request(donate, AT, 12);
        let tx = rogue.prepare(req).unwrap();
        assert_eq!(check(&req, &tx), Ok(()));
        assert_eq!(rogue.commit(tx.generation), Err(Error::Denied));
        // Frames a VM owns are looked up as the host's, shared with the
        // hypervisor; the host's own frames honestly.
        let host_frame = rogue.lookup(AT + 40).unwrap();
        assert_eq!(host_frame.owner.kind, Party::HOST);
        assert_eq!(host_frame.borrower.kind, Party::NONE);
        for (op, at, count) in [
            (donate, AT, 8),
            (donate, AT + 8, 16),
            (LedgerRequest::HOST_SHARE_HYP, AT + 24, 3),
        ] {
            let req = request(op, at, count);
            let tx = rogue.prepare(req).unwrap();
            assert_eq!(check(&req, &tx), Ok(()));
            rogue.commit(tx.generation).unwrap();
        }
        let vm_frame = rogue.lookup(AT + 1).unwrap();
        assert_eq!(
            (vm_frame.owner.kind, vm_frame.borrower.kind),
            (Party::HOST, Party::HYPERVISOR)
        );
        assert_eq!(
            vm_frame.frames,
            FrameRange {
                start: AT + 1,
                count: 1
            }
        );
    }
}
