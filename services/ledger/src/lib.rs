//! The memory donation ledger: the record of who owns every page of RAM, and
//! the state machine that answers each memory request with a transaction.
//!
//! The ledger is pure logic. It never touches a page table or a page; it
//! decides. The EL2 core holds the mechanism (stage-2 tables, TLB maintenance,
//! zeroing and tag scrubbing) and applies what the ledger decides. The crate is
//! `no_std`, has no `unsafe` and does not allocate; it runs inside the ledger
//! service partition and is unit-tested on the host.
//!
//! # Parties and page states
//!
//! A party ([`Owner`]) is the host, the hypervisor (the core and the memory it
//! carved out for the services), a service, or a protected VM. Every page of
//! RAM has exactly one owner; a page may additionally be mapped by exactly one
//! borrower, so sharing is always between exactly two parties (the design's
//! invariant 1). From the point of view of one party a page is in one of
//! four [`PageState`]s, as in pKVM:
//!
//! | state            | meaning                                             |
//! |------------------|-----------------------------------------------------|
//! | `Owned`          | the party owns the page and nobody else maps it     |
//! | `SharedOwned`    | the party owns the page and one borrower maps it    |
//! | `SharedBorrowed` | the party does not own the page but may map it      |
//! | `NoPage`         | the party has no access to the page                 |
//!
//! The transitions, with the state of the page for both sides:
//!
//! ```text
//!                         host_share_hyp
//!     +--------------+  ---------------->  +---------------------+
//!     | host Owned   |                     | host SharedOwned    |
//!     | hyp  NoPage  |  <----------------  | hyp  SharedBorrowed |
//!     +--------------+   host_unshare_hyp  +---------------------+
//!        |       ^
//!        |       |   reclaim(vm): vm dying; zero + tag-scrub
//!        |       +--------------------+-------------------------------+
//!        |                            |                               |
//!        |                    +--------------+  vm_share_host   +---------------------+
//!        |                    | vm   Owned   |  ------------->  | vm   SharedOwned    |
//!        +------------------> | host NoPage  |  <-------------  | host SharedBorrowed |
//!      host_donate_vm(vm):    +--------------+  vm_unshare_host +---------------------+
//!      vm alive; zero + tag-scrub
//!
//!     host Owned --donate_service(s): zero + tag-scrub--> service s Owned, host NoPage
//!     (implemented and tested here, but with no request code on the wire and
//!     no hypercall path yet: nothing in the core issues it)
//!
//!     hypervisor pages: Owned by the hypervisor, NoPage for every other party,
//!     and no operation moves them.
//! ```
//!
//! VMs have a life cycle of their own: [`Ledger::create_vm`] registers a handle
//! (alive), [`Ledger::destroy_vm`] marks it dying. Only an alive VM can be
//! donated to or share and unshare; only a dying VM's pages can be reclaimed.
//! Once a dying VM owns no page its record is dropped and the handle may be
//! created again.
//!
//! # Storage
//!
//! Ownership is stored as ranges, not per-page records: a sorted array of
//! [`Extent`]s `{start, count, owner, borrower}`, non-overlapping, covering
//! exactly the RAM given at boot, and always merged (two adjacent extents never
//! have the same owner and borrower). An operation on one range replaces the
//! extents it overlaps by at most three (a head and a tail left as they were,
//! the range in its new state) and merges with the neighbours, so it adds at
//! most two extents. A freshly booted host is one extent per RAM bank plus
//! two per hypervisor range; 4 GiB with one carve-out is three extents.
//!
//! The extent array is a caller-provided buffer (anything that is
//! `AsRef<[Extent]> + AsMut<[Extent]>`: a `[Extent; N]` inline in the service's
//! state, or a slice from its heap); the crate never allocates. Each extent
//! is 24 bytes, so a capacity of `N` extents costs `24 * N` bytes. An
//! operation adds at most two extents, so 4096 extents (96 KiB) hold a boot
//! layout of three extents plus at least 2046 operations that each split an
//! extent in three, and far more realistic ones: donations of contiguous
//! ranges and their reclaims merge back. (For scale: 10,000 single pages
//! scattered at random over 4 GiB and donated to four VMs take 19,872
//! extents, 477,024 bytes of state; see `tests/scale.rs`.) When the buffer
//! is full an operation fails with
//! [`LedgerError::OutOfCapacity`] before anything changes. The VM table is a
//! fixed array of [`MAX_VMS`] records; the boot layout keeps at most
//! [`MAX_BOOT_RANGES`] RAM and [`MAX_BOOT_RANGES`] hypervisor ranges.
//! [`Ledger::state_bytes`] reports the bytes of state in use;
//! [`Ledger::footprint_bytes`] the bytes reserved.
//!
//! Lookups are a binary search; an operation on a range costs
//! `O(log n + k)` to check (`k` extents overlapped) and its commit moves the
//! extents after it (one `copy_within`).
//!
//! # The protocol with the core
//!
//! Every operation is split in two steps so that the core can refuse a
//! transaction the ledger would accept:
//!
//! 1. **Prepare.** An operation method ([`Ledger::host_donate_vm`] and the
//!    others, or [`Ledger::prepare`] with an [`Op`]) takes `&self`: it checks
//!    the arguments (zero length, `pfn + count` overflow), the parties (the VM
//!    exists and is alive or dying as the operation requires), then every page
//!    of the range on both sides (inside RAM, in the state the operation
//!    requires), then that the extent buffer has room for the result. It
//!    returns a [`Transaction`] or a [`LedgerError`]; either way the ledger is
//!    unchanged (it cannot change: the method borrows it immutably).
//! 2. **Apply.** The core checks the transaction against its own rules (its
//!    own memory never moves, every change stays inside the requested frames,
//!    an owner change is scrubbed, and the transaction has the one shape its
//!    request allows, so no page becomes writable by a second party except as
//!    a share recorded here) and applies it whole: every [`Change::Unmap`]
//!    first (break-before-make, TLB invalidation), then zeroes and
//!    tag-scrubs [`Transaction::scrub`], then every [`Change::Map`].
//!    [`Transaction::changes`] lists the unmaps before the maps. If the core
//!    refuses the transaction, or cannot reserve what applying it needs, it
//!    drops it before changing anything: the ledger never hears of it. If
//!    applying fails after that, the core does not commit and refuses every
//!    later memory request (it fails closed rather than undo).
//! 3. **Commit.** [`Ledger::commit`] records the new ownership. It refuses,
//!    with [`LedgerError::Stale`], a transaction prepared before any other
//!    commit (each commit advances [`Ledger::generation`]), and it derives
//!    the transaction again from the request and refuses one that does not
//!    match. A transaction committed to the ledger that prepared it, in the
//!    generation it was prepared in, cannot fail: prepare already checked
//!    the state and the room it needs. The core must
//!    therefore prepare, apply and commit one transaction at a time (the
//!    service handles one request at a time, so this is the natural order).
//!
//! [`Ledger::execute`] does prepare and commit in one call, for callers with
//! no mechanism step in between (boot-time set-up, tests).
//!
//! Stage-2 changes name physical frames. A VM's intermediate physical address
//! for a donated page is the core's business (it comes with the request), and
//! a guest's request to share or unshare names its IPAs, which the core
//! translates to frames through the VM's stage-2 before asking the ledger.
//!
//! # Where this differs from pKVM
//!
//! - pKVM keeps the host's and hypervisor's state per page in `hyp_vmemmap`
//!   and the guests' state in software bits of their stage-2 entries, with
//!   the owner of a host-inaccessible page annotated in the host's stage-2.
//!   Here one range table holds the whole truth for every party, and page
//!   tables hold none of it.
//! - The borrower is explicit. pKVM's `SHARED_OWNED` says "someone else maps
//!   it" and counts guest shares; here a shared page names its one borrower,
//!   and the checker can verify both sides from one record.
//! - Reclaim requires the VM to have been destroyed first; pKVM also offers a
//!   forced reclaim of a live guest's page (poisoning it). Reclaimed pages,
//!   and donated pages, are zeroed *and* tag-scrubbed, not only zeroed.
//! - Sharing with the hypervisor returns a `Map` for it, but the core never
//!   makes that mapping: it maps all RAM at EL2 from boot (to zero, scrub and
//!   copy partition memory), so a hypervisor share is a record here, which
//!   the core consults before it reads host memory on the host's behalf.
//!   pKVM maps a page the host shares at EL2 when it is first pinned.
//! - Operations take whole ranges (`pfn, count`) and are all-or-nothing across
//!   the range, instead of one page or one block per call.
#![no_std]
#![forbid(unsafe_code)]

mod ledger;
mod server;
mod store;
mod transaction;
pub mod wire;

pub use ledger::{InvariantViolation, Ledger, MAX_BOOT_RANGES, MAX_VMS, VmRecord, VmStatus};
pub use server::{LedgerServer, SERVICE_CAPACITY};
pub use store::Extent;
pub use transaction::{Change, MAX_CHANGES, Op, Transaction};

use core::fmt;

/// Bits of a byte address below the page frame number.
pub const PAGE_SHIFT: u32 = 12;
/// Bytes in a page (a granule of 4 KiB).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

/// A VM handle, as the core hands them out.
pub type VmId = u16;
/// A service partition's index.
pub type ServiceId = u16;

/// A party that can own or borrow memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    /// The host OS.
    Host,
    /// The EL2 core and the memory it carved out at boot.
    Hypervisor,
    /// An EL1 service partition.
    Service(ServiceId),
    /// A protected VM.
    Vm(VmId),
}

/// One party's view of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PageState {
    /// Owned, and mapped by nobody else.
    Owned,
    /// Owned, and also mapped by one borrower.
    SharedOwned,
    /// Not owned, but mapped: borrowed from the owner.
    SharedBorrowed,
    /// No access.
    NoPage,
}

impl PageState {
    /// The state of a page with `owner` and `borrower`, as `party` sees it.
    pub fn of(party: Owner, owner: Owner, borrower: Option<Owner>) -> Self {
        if owner == party {
            if borrower.is_some() {
                Self::SharedOwned
            } else {
                Self::Owned
            }
        } else if borrower == Some(party) {
            Self::SharedBorrowed
        } else {
            Self::NoPage
        }
    }
}

/// A range of page frames: `count` pages from frame `start`.
///
/// Plain data: it may be empty or overflow; [`PfnRange::end`] and the
/// ledger's operations check.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PfnRange {
    /// The first frame.
    pub start: u64,
    /// The number of frames.
    pub count: u64,
}

impl PfnRange {
    /// `count` frames from `start`.
    pub const fn new(start: u64, count: u64) -> Self {
        Self { start, count }
    }

    /// The frames covering the bytes `[base, base + size)`, which must be
    /// page-aligned, non-empty and not overflow.
    pub const fn from_bytes(base: u64, size: u64) -> Result<Self, LedgerError> {
        if !base.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(LedgerError::Unaligned);
        }
        if size == 0 {
            return Err(LedgerError::ZeroLength);
        }
        if base.checked_add(size).is_none() {
            return Err(LedgerError::Overflow);
        }
        Ok(Self::new(base >> PAGE_SHIFT, size >> PAGE_SHIFT))
    }

    /// One past the last frame, or `None` if that overflows.
    pub const fn end(&self) -> Option<u64> {
        self.start.checked_add(self.count)
    }

    /// One past the last frame, refusing an empty or overflowing range.
    pub const fn checked_end(&self) -> Result<u64, LedgerError> {
        if self.count == 0 {
            return Err(LedgerError::ZeroLength);
        }
        match self.end() {
            Some(end) => Ok(end),
            None => Err(LedgerError::Overflow),
        }
    }

    /// Whether `pfn` lies in the range.
    pub const fn contains(&self, pfn: u64) -> bool {
        pfn >= self.start && pfn - self.start < self.count
    }
}

/// Stage-2 (or, for the hypervisor, EL2 stage-1) access permissions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perms(u8);

impl Perms {
    /// Readable.
    pub const R: Self = Self(1);
    /// Writable.
    pub const W: Self = Self(2);
    /// Executable.
    pub const X: Self = Self(4);
    /// Readable and writable: a borrower's mapping, a service's heap.
    pub const RW: Self = Self(1 | 2);
    /// Readable, writable and executable: an owner's normal memory.
    pub const RWX: Self = Self(1 | 2 | 4);

    /// The permission bits: R = 1, W = 2, X = 4.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether every permission of `other` is in `self`.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

/// Why the ledger refused an operation or a boot layout. Errors about pages
/// name the first page of the range, in ascending order, that fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LedgerError {
    /// The range has no pages.
    ZeroLength,
    /// A byte address or size is not a multiple of [`PAGE_SIZE`].
    Unaligned,
    /// `start + count` overflows.
    Overflow,
    /// A page of the range is not RAM.
    OutOfRam {
        /// The first such page.
        pfn: u64,
    },
    /// A page of the range is not owned by the party the operation needs.
    PageNotOwned {
        /// The first such page.
        pfn: u64,
    },
    /// A page of the range is shared, and the operation needs it exclusive.
    PageShared {
        /// The first such page.
        pfn: u64,
    },
    /// A page of the range is not shared the way the unshare expects.
    PageNotShared {
        /// The first such page.
        pfn: u64,
    },
    /// No VM has this handle.
    NoSuchVm(VmId),
    /// A VM with this handle exists (alive, or dying with pages left).
    VmExists(VmId),
    /// The VM is being destroyed: it cannot run, share or receive pages.
    VmDying(VmId),
    /// The VM is alive: its pages cannot be reclaimed.
    VmAlive(VmId),
    /// The VM table is full.
    TooManyVms,
    /// The extent buffer has no room for the result.
    OutOfCapacity,
    /// The transaction was prepared before another commit.
    Stale,
    /// The boot layout has more ranges than [`MAX_BOOT_RANGES`].
    TooManyRanges,
    /// Two RAM ranges of the boot layout overlap.
    RamOverlap,
    /// A hypervisor range of the boot layout is not entirely RAM.
    HypervisorOutsideRam {
        /// The first page of it that is not RAM.
        pfn: u64,
    },
}

impl fmt::Display for LedgerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::ZeroLength => write!(f, "empty range"),
            Self::Unaligned => write!(f, "address or size not page-aligned"),
            Self::Overflow => write!(f, "range overflows"),
            Self::OutOfRam { pfn } => write!(f, "page {pfn:#x} is not RAM"),
            Self::PageNotOwned { pfn } => write!(f, "page {pfn:#x} is not owned by the caller"),
            Self::PageShared { pfn } => write!(f, "page {pfn:#x} is shared"),
            Self::PageNotShared { pfn } => write!(f, "page {pfn:#x} is not shared"),
            Self::NoSuchVm(vm) => write!(f, "no VM {vm}"),
            Self::VmExists(vm) => write!(f, "VM {vm} exists"),
            Self::VmDying(vm) => write!(f, "VM {vm} is being destroyed"),
            Self::VmAlive(vm) => write!(f, "VM {vm} is alive"),
            Self::TooManyVms => write!(f, "VM table full"),
            Self::OutOfCapacity => write!(f, "ledger extent buffer full"),
            Self::Stale => write!(f, "transaction prepared before another commit"),
            Self::TooManyRanges => write!(f, "too many boot ranges"),
            Self::RamOverlap => write!(f, "RAM ranges overlap"),
            Self::HypervisorOutsideRam { pfn } => {
                write!(f, "hypervisor page {pfn:#x} is not RAM")
            }
        }
    }
}
