//! The interfaces of Moat's services, declared once for both sides.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

pub use crate::trap::{TrapDescriptor, Verdict};

/// The empty request or reply.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Empty;

/// Trap counts per [`crate::trap::TrapClass`], plus the number of
/// notifications received. Fits a host reply (56 bytes).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct TraceCounts {
    pub by_class: [u64; crate::trap::TrapClass::COUNT],
    pub total: u64,
}

const _: () = assert!(size_of::<TraceCounts>() == crate::ipc::HOST_REPLY_BYTES);

crate::service_interface! {
    /// `trace`: counts the traps the manifest lets it observe and tells the
    /// host. Observing is one-way from the core; `counts` and `reset` are
    /// host hypercalls.
    pub mod trace: id = 1 {
        /// The core reports a trap of an observed class.
        1 => fn observe(TrapDescriptor) -> Empty;
        /// The counts so far.
        2 => fn counts(Empty) -> TraceCounts;
        /// Zeroes the counts.
        3 => fn reset(Empty) -> Empty;
        /// Does nothing: the floor of a service call's cost.
        4 => fn ping(Empty) -> Empty;
    }
}

/// What `faulty` does when asked to `misbehave`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Misbehaviour {
    /// Take an undefined-instruction exception at EL1.
    Exception = 1,
    /// Answer with a reply that does not match the call.
    MalformedReply = 2,
    /// Never answer.
    Spin = 3,
    /// Read memory outside its partition (the host's RAM).
    ReadForeignMemory = 4,
    /// Rewrite its own translation controls (TTBR0_EL1) after it started:
    /// the core loads a started service's translation registers without
    /// saving them back, so it traps such writes (HCR_EL2.TVM).
    RewriteTranslation = 5,
}

crate::service_interface! {
    /// `faulty`: a deliberately broken service for containment tests.
    pub mod faulty: id = 2 {
        /// Behaves: answers its argument plus one.
        1 => fn echo(u64) -> u64;
        /// Misbehaves as the argument (a [`Misbehaviour`]) says.
        2 => fn misbehave(u64) -> Empty;
    }
}

/// Bytes of the host's command line the MTE policy sees.
pub const MTE_CMDLINE_BYTES: usize = 216;

/// What the MTE policy decides from at boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct MteBootInfo {
    /// ID_AA64PFR1_EL1.MTE as the hardware reports it (0 none, 1 instructions
    /// only, 2 full MTE, 3 MTE3).
    pub hardware_level: u32,
    /// Bytes of `command_line` in use.
    pub command_line_len: u32,
    /// Bytes of the whole command line: more than `command_line_len` when it
    /// did not fit.
    pub command_line_total: u32,
    pub reserved: u32,
    /// The host's command line, as the boot package gives it (truncated).
    pub command_line: [u8; MTE_CMDLINE_BYTES],
}

impl Default for MteBootInfo {
    fn default() -> Self {
        Self {
            hardware_level: 0,
            command_line_len: 0,
            command_line_total: 0,
            reserved: 0,
            command_line: [0; MTE_CMDLINE_BYTES],
        }
    }
}

/// Why the host's MTE policy is what it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum MteReason {
    /// The hardware has no tag storage: nothing to police.
    NoHardware = 0,
    /// The default: the host uses MTE as the hardware offers it.
    Default = 1,
    /// The host's command line says `arm64.nomte`.
    HostDisabled = 2,
    /// `moat.host_mte=on` on the command line.
    ForcedOn = 3,
    /// `moat.host_mte=off` on the command line.
    ForcedOff = 4,
    /// The command line is longer than the policy can read: MTE is off, so
    /// a switch the policy cannot see can never leave MTE usable by a host
    /// that believes it disabled it.
    CommandLineTooLong = 5,
    /// A protected VM that did not ask for MTE: off, as in pKVM.
    VmDefaultOff = 6,
    /// A protected VM created with MTE on, on hardware with tag storage.
    VmRequested = 7,
}

/// The policy for the host.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct MtePolicy {
    /// 1: the host may use MTE; 0: it sees hardware without MTE.
    pub host_mte: u32,
    /// An [`MteReason`].
    pub reason: u32,
}

/// ID_AA64PFR1_EL1 fields that describe MTE: MTE [11:8], MTE_frac [43:40],
/// MTEX [55:52]. A partition whose MTE is off reads them as zero.
pub const PFR1_MTE_FIELDS: u64 = (0xf << 8) | (0xf << 40) | (0xf << 52);
/// ID_AA64PFR2_EL1 fields that describe MTE: MTEPERM [3:0],
/// MTESTOREONLY [7:4], MTEFAR [11:8].
pub const PFR2_MTE_FIELDS: u64 = 0xfff;

/// A new protected VM, as the MTE policy sees it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct VmMteRequest {
    /// The VM's handle.
    pub vm: u32,
    /// 1: the host created it with `VmFlags::MTE`.
    pub requested: u32,
    /// ID_AA64PFR1_EL1.MTE as the hardware reports it.
    pub hardware_level: u32,
    pub reserved: u32,
}

/// The policy for one protected VM.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct VmMtePolicy {
    /// 1: the VM may use MTE (tag access on, MTE registers switched with
    /// its vCPU); 0: it sees hardware without MTE.
    pub mte: u32,
    /// An [`MteReason`].
    pub reason: u32,
}

crate::service_interface! {
    /// `mte`: the MTE policy. It decides at boot whether the host may use
    /// MTE, and decides each trapped system-register access of a partition
    /// whose MTE is off (hide it from the ID registers, refuse the MTE
    /// registers with an Undefined Instruction exception).
    pub mod mte: id = 3 {
        /// The host's policy, from the hardware and its command line.
        1 => fn configure(MteBootInfo) -> MtePolicy;
        /// What to do with a trapped access.
        2 => fn decide(TrapDescriptor) -> Verdict;
        /// A new protected VM's policy.
        3 => fn vm_policy(VmMteRequest) -> VmMtePolicy;
    }
}

/// A range of page frames on the ledger interface.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct FrameRange {
    pub start: u64,
    pub count: u64,
}

/// Most RAM banks or hypervisor ranges the ledger is told about at boot.
pub const LEDGER_BOOT_RANGES: usize = 6;

/// What the ledger learns at boot: the RAM, and what of it the hypervisor
/// (the core and its services) keeps.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct LedgerBoot {
    pub ram_count: u32,
    pub hypervisor_count: u32,
    pub ram: [FrameRange; LEDGER_BOOT_RANGES],
    pub hypervisor: [FrameRange; LEDGER_BOOT_RANGES],
}

/// The ledger's size after boot.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct LedgerSummary {
    pub extents: u64,
    pub state_bytes: u64,
}

/// A party on the ledger interface: kind 0 none, 1 host, 2 hypervisor,
/// 3 service, 4 protected VM; `id` names the service or VM.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Party {
    pub kind: u32,
    pub id: u32,
}

impl Party {
    pub const NONE: u32 = 0;
    pub const HOST: u32 = 1;
    pub const HYPERVISOR: u32 = 2;
    pub const SERVICE: u32 = 3;
    pub const VM: u32 = 4;
}

/// One extent of the ledger: frames with one owner and at most one borrower.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct LedgerExtent {
    pub frames: FrameRange,
    pub owner: Party,
    pub borrower: Party,
}

/// A memory request to the ledger: `op` is one of the `LedgerRequest::*`
/// codes, `party` the VM (or service) it concerns, `frames` its pages.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct LedgerRequest {
    pub op: u32,
    pub party: u32,
    pub frames: FrameRange,
}

impl LedgerRequest {
    pub const HOST_SHARE_HYP: u32 = 1;
    pub const HOST_UNSHARE_HYP: u32 = 2;
    pub const HOST_DONATE_VM: u32 = 3;
    pub const VM_SHARE_HOST: u32 = 4;
    pub const VM_UNSHARE_HOST: u32 = 5;
    pub const CREATE_VM: u32 = 6;
    pub const DESTROY_VM: u32 = 7;
    pub const RECLAIM: u32 = 8;
    /// The host's pages become the hypervisor's (never a host hypercall:
    /// the core asks when the host hands a table to hardware it drives).
    pub const HOST_DONATE_HYP: u32 = 9;
    /// Pages the host donated to the hypervisor go back to it.
    pub const HYP_RETURN_HOST: u32 = 10;
}

/// One stage-2 change of a transaction: `kind` 1 unmap, 2 map; `perms`
/// R = 1, W = 2, X = 4 (maps only).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct LedgerChange {
    pub kind: u32,
    pub perms: u32,
    pub party: Party,
    pub frames: FrameRange,
}

impl LedgerChange {
    pub const UNMAP: u32 = 1;
    pub const MAP: u32 = 2;
}

/// Most changes a transaction carries.
pub const LEDGER_MAX_CHANGES: usize = 2;

/// The ledger's answer to a request: what the core must do, in order
/// (every unmap, then zero and tag-scrub `scrub` if `has_scrub`, then every
/// map), and the generation to commit it in.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct LedgerTransaction {
    pub generation: u64,
    pub request: LedgerRequest,
    pub change_count: u32,
    pub has_scrub: u32,
    pub scrub: FrameRange,
    pub changes: [LedgerChange; LEDGER_MAX_CHANGES],
}

const _: () = assert!(size_of::<LedgerRequest>() == 24);
const _: () = assert!(size_of::<LedgerChange>() == 32);
const _: () = assert!(size_of::<LedgerTransaction>() == 120);
const _: () = assert!(size_of::<LedgerTransaction>() <= crate::ipc::PAYLOAD_SIZE);

crate::service_interface! {
    /// `ledger`: the record of who owns every page of RAM.
    pub mod ledger: id = 4 {
        /// Builds the ledger for this machine (once, at boot).
        1 => fn boot(LedgerBoot) -> LedgerSummary;
        /// Extent number `index` in address order; `NotSupported` past the last.
        2 => fn extent(u64) -> LedgerExtent;
        /// Checks a request and answers with its transaction; nothing changes
        /// until `commit`. A refused request comes back as `InvalidParameters`
        /// (malformed: empty, overflowing, not RAM, unknown VM), `Denied`
        /// (a page or VM in the wrong state) or `NoMemory` (ledger full).
        3 => fn prepare(LedgerRequest) -> LedgerTransaction;
        /// Records the transaction last prepared, if it was prepared in this
        /// generation (`Denied` otherwise); returns the new generation.
        4 => fn commit(u64) -> u64;
        /// The extent holding frame `pfn`; `NotSupported` if it is not RAM.
        5 => fn lookup(u64) -> LedgerExtent;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::ipc::{Message, MessageError};

    struct Tracer(TraceCounts);

    impl trace::Server for Tracer {
        fn observe(&mut self, t: TrapDescriptor) -> Result<Empty, Error> {
            let slot = self
                .0
                .by_class
                .get_mut(t.class as usize)
                .ok_or(Error::InvalidParameters)?;
            *slot += 1;
            self.0.total += 1;
            Ok(Empty)
        }
        fn counts(&mut self, _: Empty) -> Result<TraceCounts, Error> {
            Ok(self.0)
        }
        fn reset(&mut self, _: Empty) -> Result<Empty, Error> {
            self.0 = TraceCounts::default();
            Ok(Empty)
        }
        fn ping(&mut self, _: Empty) -> Result<Empty, Error> {
            Ok(Empty)
        }
    }

    #[test]
    fn one_declaration_drives_both_sides() {
        let mut s = Tracer(TraceCounts::default());
        let t = TrapDescriptor {
            class: 2,
            ..Default::default()
        };
        let call = trace::client::observe::request(1, &t);
        let reply = trace::dispatch(&mut s, &call);
        assert_eq!(
            trace::client::observe::reply(&reply, &call.header),
            Ok(Empty)
        );
        let call = trace::client::counts::request(2, &Empty);
        let reply = trace::dispatch(&mut s, &call);
        let counts = trace::client::counts::reply(&reply, &call.header).unwrap();
        assert_eq!(counts.by_class[2], 1);
        assert_eq!(counts.total, 1);
    }

    #[test]
    fn errors_are_typed() {
        let mut s = Tracer(TraceCounts::default());
        // Unknown operation.
        let call = Message::call(trace::SERVICE_ID, 99, 5, &[]).unwrap();
        let reply = trace::dispatch(&mut s, &call);
        assert_eq!(
            reply.check_reply(&call.header),
            Ok(Err(Error::NotSupported))
        );
        // Wrong service.
        let call = Message::call(42, 2, 5, &[]).unwrap();
        let reply = trace::dispatch(&mut s, &call);
        assert_eq!(
            reply.check_reply(&call.header),
            Ok(Err(Error::InvalidParameters))
        );
        // Short payload for a typed request.
        let call = Message::call(trace::SERVICE_ID, 1, 5, &[1, 2, 3]).unwrap();
        let reply = trace::dispatch(&mut s, &call);
        assert_eq!(
            reply.check_reply(&call.header),
            Ok(Err(Error::InvalidParameters))
        );
        // Non-zero bytes past the request: refused, not ignored.
        let call = Message::call(trace::SERVICE_ID, 4, 5, &[0, 0, 1]).unwrap();
        let reply = trace::dispatch(&mut s, &call);
        assert_eq!(
            reply.check_reply(&call.header),
            Ok(Err(Error::InvalidParameters))
        );
        // Zero padding (a host call's 48 bytes) is fine.
        let call = Message::call(trace::SERVICE_ID, 4, 5, &[0; 48]).unwrap();
        let reply = trace::dispatch(&mut s, &call);
        assert_eq!(reply.check_reply(&call.header), Ok(Ok(&[][..])));
        // Another major version.
        let mut call = Message::call(trace::SERVICE_ID, 4, 5, &[]).unwrap();
        call.header.abi_version = 7 << 16;
        let reply = trace::dispatch(&mut s, &call);
        assert_eq!(
            reply.check_reply(&call.header),
            Ok(Err(Error::VersionMismatch))
        );
        // A server error comes back as itself.
        let call = trace::client::observe::request(
            1,
            &TrapDescriptor {
                class: 9,
                ..Default::default()
            },
        );
        let reply = trace::dispatch(&mut s, &call);
        assert_eq!(
            trace::client::observe::reply(&reply, &call.header),
            Err(Error::InvalidParameters)
        );
    }

    #[test]
    fn operations_are_enumerable() {
        assert_eq!(trace::Operation::ALL.len(), 4);
        assert_eq!(
            trace::Operation::from_u16(2),
            Some(trace::Operation::counts)
        );
        assert_eq!(faulty::Operation::from_u16(3), None);
        let _ = MessageError::Mismatch;
    }
}
