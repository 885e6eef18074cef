//! Requests and the transactions that answer them.

use crate::{Owner, Perms, PfnRange, ServiceId, VmId};

/// A memory request, as the ledger receives it. Ranges are unchecked: the
/// ledger validates them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// The host shares its pages with the hypervisor.
    HostShareHyp {
        /// The host's pages.
        range: PfnRange,
    },
    /// The host takes back pages it shared with the hypervisor.
    HostUnshareHyp {
        /// The host's pages.
        range: PfnRange,
    },
    /// The host gives its pages to an alive VM.
    HostDonateVm {
        /// The host's pages.
        range: PfnRange,
        /// The VM receiving them.
        vm: VmId,
    },
    /// A VM shares its own pages with the host (for I/O).
    VmShareHost {
        /// The VM sharing.
        vm: VmId,
        /// Its pages, as frames.
        range: PfnRange,
    },
    /// A VM takes back pages it shared with the host.
    VmUnshareHost {
        /// The VM unsharing.
        vm: VmId,
        /// Its pages, as frames.
        range: PfnRange,
    },
    /// A new VM handle.
    CreateVm {
        /// The handle.
        vm: VmId,
    },
    /// The VM is being torn down: it will not run again and its pages become
    /// reclaimable.
    DestroyVm {
        /// The handle.
        vm: VmId,
    },
    /// The host takes back pages of a destroyed VM.
    Reclaim {
        /// The destroyed VM.
        vm: VmId,
        /// Its pages.
        range: PfnRange,
    },
    /// The host gives its pages to the hypervisor, which hands them to
    /// hardware it drives for the host (the interrupt controller's tables):
    /// the host loses every mapping of them until they come back.
    HostDonateHyp {
        /// The host's pages.
        range: PfnRange,
    },
    /// The hypervisor gives back pages the host donated to it.
    HypReturnHost {
        /// The pages.
        range: PfnRange,
    },
    /// The host gives its pages to a service (a service heap).
    DonateService {
        /// The host's pages.
        range: PfnRange,
        /// The service receiving them.
        service: ServiceId,
    },
}

impl Op {
    /// The pages the request names, if it names any.
    pub const fn range(&self) -> Option<PfnRange> {
        match *self {
            Self::HostShareHyp { range }
            | Self::HostUnshareHyp { range }
            | Self::HostDonateVm { range, .. }
            | Self::VmShareHost { range, .. }
            | Self::VmUnshareHost { range, .. }
            | Self::Reclaim { range, .. }
            | Self::HostDonateHyp { range }
            | Self::HypReturnHost { range }
            | Self::DonateService { range, .. } => Some(range),
            Self::CreateVm { .. } | Self::DestroyVm { .. } => None,
        }
    }
}

/// One change to one party's translation tables: its stage-2, or for the
/// hypervisor its EL2 stage-1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Change {
    /// Map the frames for `party` with `perms` (replacing any mapping it has).
    Map {
        /// Whose tables change.
        party: Owner,
        /// The frames.
        range: PfnRange,
        /// The access the party gets.
        perms: Perms,
    },
    /// Remove every mapping of the frames for `party`.
    Unmap {
        /// Whose tables change.
        party: Owner,
        /// The frames.
        range: PfnRange,
    },
}

impl Change {
    /// Whose tables change.
    pub const fn party(&self) -> Owner {
        match *self {
            Self::Map { party, .. } | Self::Unmap { party, .. } => party,
        }
    }

    /// The frames.
    pub const fn range(&self) -> PfnRange {
        match *self {
            Self::Map { range, .. } | Self::Unmap { range, .. } => range,
        }
    }
}

/// Most stage-2 changes one transaction carries.
pub const MAX_CHANGES: usize = 2;

/// What the core must do to carry out one request, as plain data: apply
/// every [`Change::Unmap`], then zero and tag-scrub [`Transaction::scrub`],
/// then apply every [`Change::Map`]; then [`crate::Ledger::commit`] it.
///
/// Only the ledger makes transactions; each remembers the request and the
/// ledger generation it was prepared in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Transaction {
    op: Op,
    generation: u64,
    changes: [Change; MAX_CHANGES],
    len: u8,
    scrub: Option<PfnRange>,
}

impl Transaction {
    pub(crate) const fn new(op: Op, generation: u64) -> Self {
        Self {
            op,
            generation,
            changes: [Change::Unmap {
                party: Owner::Host,
                range: PfnRange::new(0, 0),
            }; MAX_CHANGES],
            len: 0,
            scrub: None,
        }
    }

    /// Adds a change; callers never add more than [`MAX_CHANGES`].
    pub(crate) const fn with(mut self, change: Change) -> Self {
        self.changes[self.len as usize] = change;
        self.len += 1;
        self
    }

    pub(crate) const fn with_scrub(mut self, range: PfnRange) -> Self {
        self.scrub = Some(range);
        self
    }

    /// The request this answers.
    pub const fn op(&self) -> Op {
        self.op
    }

    /// The ledger generation the transaction was prepared in.
    pub const fn generation(&self) -> u64 {
        self.generation
    }

    /// The translation-table changes, every unmap before every map.
    pub fn changes(&self) -> &[Change] {
        &self.changes[..usize::from(self.len)]
    }

    /// The frames to zero and tag-scrub after the unmaps and before the maps.
    pub const fn scrub(&self) -> Option<PfnRange> {
        self.scrub
    }
}
