//! Memory ownership and protected VMs: the host's and guests' hypercalls,
//! and the exit records `VCPU_RUN` returns.
//!
//! Every call is a fast SMC64 call in Moat's range (see [`crate::hypercall`]);
//! x0 comes back as 0 or an [`crate::Error`] code. Addresses are byte
//! addresses and sizes are page counts (4 KiB pages). A call that fails
//! changes nothing.
//!
//! | call                  | x1       | x2          | x3         | x4    | returns            |
//! |-----------------------|----------|-------------|------------|-------|--------------------|
//! | [`HOST_SHARE_HYP`]    | PA       | pages       |            |       |                    |
//! | [`HOST_UNSHARE_HYP`]  | PA       | pages       |            |       |                    |
//! | [`VM_CREATE`]         | entry IPA| [`VmFlags`] | vCPUs      |       | x1 = handle        |
//! | [`VM_DONATE`]         | handle   | PA          | pages      | IPA   |                    |
//! | [`VM_LOAD`]           | handle   | dest IPA    | source PA  | bytes |                    |
//! | [`VCPU_RUN`]          | handle (31:16 vCPU) | r0          | r1         | r2, x5 = r3, x6/x7 = [`Injection`] | x1..x7 = [`Exit`] |
//! | [`VM_DESTROY`]        | handle   |             |            |       |                    |
//! | [`VM_RECLAIM`]        | handle   | PA          | pages      |       |                    |
//! | [`GUEST_SHARE_HOST`]  | IPA      | pages       |            |       | (from a guest)     |
//! | [`GUEST_UNSHARE_HOST`]| IPA      | pages       |            |       | (from a guest)     |
//!
//! `VM_LOAD` copies `bytes` from host pages the host has shared with the
//! hypervisor into the VM's memory; it is allowed only before the VM first
//! runs (the host never writes into a VM that has run). `VCPU_RUN`'s r0..r3
//! answer the previous exit: after [`ExitReason::Hvc`] they become the
//! guest's x0..x3, after an MMIO read r0 becomes the loaded register; after
//! any MMIO exit r1 holds [`MmioAnswer`] bits (0: the access completed, and
//! [`MmioAnswer::ABORT`]: there is no device there, and the guest takes a
//! synchronous external abort on the access, as on a bus error); after any
//! other exit they are ignored.

use crate::hypercall::id;

/// Host: share `pages` of its memory from `PA` with the hypervisor.
pub const HOST_SHARE_HYP: u32 = id(0x10);
/// Host: end a share with the hypervisor.
pub const HOST_UNSHARE_HYP: u32 = id(0x11);
/// Host: create a protected VM that will start at `entry` (an IPA), with
/// [`VmFlags`] and, in x3, its vCPUs (0 or 1: one; up to [`MAX_VCPUS`] for
/// a [`VmFlags::VGIC`] VM); x1 returns its handle. vCPU 0 starts at
/// `entry`; the others are off until the guest's PSCI CPU_ON.
pub const VM_CREATE: u32 = id(0x12);
/// Host: give `pages` of its memory from `PA` to a VM, mapped at `IPA`.
/// The pages are zeroed (and their tags cleared) on the way.
pub const VM_DONATE: u32 = id(0x13);
/// Host: copy an image into a VM that has never run (see the module text).
pub const VM_LOAD: u32 = id(0x14);
/// Host: run the VM's vCPU until it exits; the exit comes back in x1..x7.
/// The vCPUs of one VM may run at once on different CPUs; a vCPU that runs
/// on another CPU is refused with `Busy`, nothing changed. Refused with
/// `Denied`, nothing touched, while the calling CPU is in SME
/// streaming mode or has ZA on (SVCR.SM or SVCR.ZA set): the host leaves
/// both (`SMSTOP`) before running a VM.
pub const VCPU_RUN: u32 = id(0x15);
/// Host: end a VM. It never runs again; its pages become reclaimable.
pub const VM_DESTROY: u32 = id(0x16);
/// Host: take back `pages` from `PA` of a destroyed VM (zeroed, tags cleared).
/// The handle is free again once the VM owns no page.
pub const VM_RECLAIM: u32 = id(0x17);

/// Guest: share `pages` of its own memory from `IPA` with the host.
pub const GUEST_SHARE_HOST: u32 = id(0x20);
/// Guest: end a share with the host.
pub const GUEST_UNSHARE_HOST: u32 = id(0x21);

/// The pKVM guest ABI (upstream Linux's KVM/arm64 vendor hypercalls), which
/// the core serves to a guest so that a kernel with the pKVM guest driver
/// finds its memory-sharing calls. The function ids are KVM's.
pub mod pkvm {
    /// SMCCC vendor-hypervisor Call UID (32-bit): answered with KVM's UID.
    pub const CALL_UID: u32 = 0x8600_ff01;
    /// KVM's UID, `28b46fb6-2ec5-11e9-a9ca-4b564d003a74`, as x0..x3.
    pub const UID: [u64; 4] = [0xb66f_b428, 0xe911_c52e, 0x564b_caa9, 0x743a_004d];
    /// KVM_FEATURES: x0 = the bitmap of the functions served.
    pub const FEATURES: u32 = 0x8600_0000;
    /// HYP_MEMINFO: x0 = the granule of sharing, in bytes.
    pub const HYP_MEMINFO: u32 = 0xc600_0002;
    /// MEM_SHARE, x1 = the IPA of one granule: shares it with the host.
    pub const MEM_SHARE: u32 = 0xc600_0003;
    /// MEM_UNSHARE, x1 = the IPA of one granule: ends the share.
    pub const MEM_UNSHARE: u32 = 0xc600_0004;
    /// Function numbers in the FEATURES bitmap.
    pub const FUNC_FEATURES: u32 = 0;
    pub const FUNC_HYP_MEMINFO: u32 = 2;
    pub const FUNC_MEM_SHARE: u32 = 3;
    pub const FUNC_MEM_UNSHARE: u32 = 4;
    /// What FEATURES answers.
    pub const FEATURE_BITS: u64 = (1 << FUNC_FEATURES)
        | (1 << FUNC_HYP_MEMINFO)
        | (1 << FUNC_MEM_SHARE)
        | (1 << FUNC_MEM_UNSHARE);
    /// SMCCC's "invalid parameter", what a refused share answers.
    pub const INVALID_PARAMETER: u64 = -3i64 as u64;
}

/// Options of [`VM_CREATE`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmFlags(pub u64);

impl VmFlags {
    /// The VM may use MTE: tag access is enabled for it, its MTE registers
    /// are switched with the vCPU, and its pages are tag-scrubbed on donate
    /// and reclaim (as every page is). Off by default.
    pub const MTE: u64 = 1 << 0;
    /// The VM gets a virtual GICv3 CPU interface: the core switches the
    /// GIC's list registers and virtual-interface state with the vCPU,
    /// delivers the guest's virtual timer as PPI 27, takes the interrupts
    /// the host injects with `VCPU_RUN` ([`Injection`]) and passes the
    /// guest's SGIs on as [`ExitReason::Sgi`] exits. The host emulates the
    /// distributor and redistributors from MMIO exits. Needs GICv3
    /// (`NotSupported` otherwise).
    pub const VGIC: u64 = 1 << 1;
    /// Every flag the core knows; any other bit is `InvalidParameters`.
    pub const KNOWN: u64 = Self::MTE | Self::VGIC;

    /// Whether the VM asked for MTE.
    pub const fn mte(self) -> bool {
        self.0 & Self::MTE != 0
    }

    /// Whether the VM asked for a virtual GIC.
    pub const fn vgic(self) -> bool {
        self.0 & Self::VGIC != 0
    }
}

/// An interrupt for the host to inject into a VM's vCPU: x6 and x7 of
/// [`VCPU_RUN`] (0 = none). Bits 9:0 the INTID (an SGI, PPI or SPI: below
/// 1020), bits 23:16 its priority, bit 63 set; bit 62
/// ([`Injection::NOTIFY_EOI`]) asks for an [`ExitReason::Eoi`] once the
/// guest deactivates it (a level-triggered interrupt, whose device the host
/// checks again then). The core makes it pending
/// in the vCPU's virtual CPU interface before the run; an interrupt
/// already pending stays pending once. Only a VM created with
/// [`VmFlags::VGIC`] takes injections (`InvalidParameters` otherwise, and
/// for an INTID of 1020 or more, or any other bit set); `NoMemory` when
/// the vCPU already has 32 interrupts waiting for a list register. A
/// refused injection refuses the run, with nothing changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injection(pub u64);

impl Injection {
    /// Bit 63: the word holds an interrupt.
    pub const VALID: u64 = 1 << 63;
    /// Bit 62: report the guest's deactivation of it ([`ExitReason::Eoi`]).
    pub const NOTIFY_EOI: u64 = 1 << 62;
    const KNOWN: u64 = Self::VALID | Self::NOTIFY_EOI | 0xff_0000 | 0x3ff;

    /// The word injecting `intid` at `priority`.
    pub const fn new(intid: u32, priority: u8) -> Self {
        Self(Self::VALID | ((priority as u64) << 16) | (intid as u64 & 0x3ff))
    }

    /// The word injecting level-triggered `intid` at `priority`: the host
    /// hears of its deactivation.
    pub const fn level(intid: u32, priority: u8) -> Self {
        Self(Self::new(intid, priority).0 | Self::NOTIFY_EOI)
    }

    /// Whether the host asked to hear of the deactivation.
    pub const fn notify_eoi(self) -> bool {
        self.0 & Self::NOTIFY_EOI != 0
    }

    /// `None` for the empty word; `Some(Err(()))` for a malformed one;
    /// else `(intid, priority)`.
    pub const fn decode(self) -> Option<Result<(u32, u8), ()>> {
        if self.0 == 0 {
            return None;
        }
        if self.0 & !Self::KNOWN != 0 || self.0 & Self::VALID == 0 {
            return Some(Err(()));
        }
        let intid = (self.0 & 0x3ff) as u32;
        if intid >= 1020 {
            return Some(Err(()));
        }
        Some(Ok((intid, (self.0 >> 16) as u8)))
    }
}

/// INTID of the guest's virtual timer (PPI 11), which the core itself
/// injects when the guest's CNTV timer fires.
pub const VTIMER_INTID: u32 = 27;

/// Most VMs alive (or awaiting reclaim) at once.
pub const MAX_VMS: usize = 8;

/// Why `VCPU_RUN` returned (x1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum ExitReason {
    /// The guest made a call the core does not serve: x2..x7 are its x0..x5.
    Hvc = 1,
    /// The guest accessed an IPA its stage-2 does not map: x2 = IPA, x3 =
    /// [`MmioAccess`] bits, x4 = the value written (0 for a read).
    Mmio = 2,
    /// The guest waits for an interrupt (WFI/WFE). For a
    /// [`VmFlags::VGIC`] VM, x2 = the physical counter value at which its
    /// virtual timer fires (`u64::MAX`: never): the host runs it again by
    /// then. (A VGIC guest with an interrupt already pending does not exit.)
    Wfi = 3,
    /// An interrupt for the host arrived; the host takes it on return and
    /// may run the vCPU again.
    Interrupt = 4,
    /// The guest called PSCI SYSTEM_OFF (x2 = 0) or SYSTEM_RESET (x2 = 1):
    /// the VM is off and never runs again. The machine is not affected.
    Shutdown = 5,
    /// The VM stopped on an exception the core does not deliver to it (an
    /// SError, or an exception vector that cannot occur for a correctly
    /// configured VM; x2 = ESR_EL2): the VM is off.
    Crashed = 6,
    /// A [`VmFlags::VGIC`] guest asked for SGIs: x2 = the value it wrote,
    /// x3 = which register (0 ICC_SGI1R_EL1, 1 ICC_ASGI1R_EL1, 2
    /// ICC_SGI0R_EL1). The host delivers them to the target vCPUs with
    /// [`Injection`]s.
    Sgi = 7,
    /// A vCPU's power changed, or it has none: x2 = [`POWER_IS_OFF`] (the
    /// vCPU asked to run is off: nothing ran) or [`POWER_STARTED`] (the
    /// guest's PSCI CPU_ON, served, started vCPU x3: run it).
    VcpuPower = 8,
    /// The guest deactivated (EOI) interrupts the host injected with
    /// [`Injection::NOTIFY_EOI`]: x2 = how many are listed (1..=5), x3..x7
    /// = their INTIDs. More, if any, come with the next run's first exit.
    /// The host runs the vCPU again, injecting any whose line is still up.
    Eoi = 9,
}

/// Most INTIDs one [`ExitReason::Eoi`] exit lists.
pub const EOIS_PER_EXIT: usize = 5;

/// x2 of [`ExitReason::VcpuPower`]: the vCPU is off (PSCI CPU_OFF, or never
/// started); nothing ran.
pub const POWER_IS_OFF: u64 = 0;
/// x2 of [`ExitReason::VcpuPower`]: vCPU x3 was started by this vCPU's
/// CPU_ON.
pub const POWER_STARTED: u64 = 1;
/// Most vCPUs in one VM ([`VM_CREATE`]'s x3; 0 means 1).
pub const MAX_VCPUS: u64 = 8;
/// [`VCPU_RUN`]'s x1: the handle in bits 15:0, the vCPU in bits 31:16.
pub const fn run_target(handle: u16, vcpu: u16) -> u64 {
    handle as u64 | (vcpu as u64) << 16
}

impl ExitReason {
    /// Every reason.
    pub const ALL: [ExitReason; 9] = [
        Self::Hvc,
        Self::Mmio,
        Self::Wfi,
        Self::Interrupt,
        Self::Shutdown,
        Self::Crashed,
        Self::Sgi,
        Self::VcpuPower,
        Self::Eoi,
    ];

    /// The reason with this code.
    pub fn from_u64(v: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u64 == v)
    }
}

/// x3 of an [`ExitReason::Mmio`] exit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioAccess(pub u64);

impl MmioAccess {
    /// Bit 0: a write.
    pub const WRITE: u64 = 1;

    /// Builds the bits: write or read, `size_log2` (0..=3) bytes, register `rt`.
    pub const fn new(is_write: bool, size_log2: u8, rt: u8) -> Self {
        Self(is_write as u64 | ((size_log2 as u64 & 3) << 8) | ((rt as u64 & 31) << 16))
    }

    /// Whether the access writes.
    pub const fn is_write(self) -> bool {
        self.0 & Self::WRITE != 0
    }

    /// Bytes accessed.
    pub const fn size(self) -> u64 {
        1 << ((self.0 >> 8) & 3)
    }

    /// The guest register (31 = zero register).
    pub const fn register(self) -> u8 {
        ((self.0 >> 16) & 31) as u8
    }
}

/// r1 of the `VCPU_RUN` that answers an [`ExitReason::Mmio`] exit.
///
/// With [`MmioAnswer::ABORT`] the core delivers a synchronous external
/// abort to the guest for the access (a data abort from the guest's current
/// EL, DFSC 0x10, WnR as the access, FAR_EL1 = the address the guest used,
/// ELR_EL1 = the access itself), at its VBAR_EL1 like the hardware would:
/// no register of the guest is written by the host, and a read's target
/// register keeps its value. Any other bit refuses the run with
/// `InvalidParameters`, nothing changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MmioAnswer(pub u64);

impl MmioAnswer {
    /// Bit 0: no device answers the access; the guest takes an abort.
    pub const ABORT: u64 = 1;
    /// Every bit the core knows.
    pub const KNOWN: u64 = Self::ABORT;

    /// `None` for a word with an unknown bit; else whether it aborts.
    pub const fn aborts(self) -> Option<bool> {
        if self.0 & !Self::KNOWN != 0 {
            None
        } else {
            Some(self.0 & Self::ABORT != 0)
        }
    }
}

/// A decoded `VCPU_RUN` result: x1..x7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// x1.
    pub reason: ExitReason,
    /// x2..x7.
    pub detail: [u64; 6],
}

impl Exit {
    /// The registers x1..x7 that carry this exit.
    pub const fn to_regs(&self) -> [u64; 7] {
        let d = self.detail;
        [self.reason as u64, d[0], d[1], d[2], d[3], d[4], d[5]]
    }

    /// Decodes x1..x7; `None` for an unknown reason.
    pub fn from_regs(regs: [u64; 7]) -> Option<Self> {
        let mut detail = [0; 6];
        detail.copy_from_slice(&regs[1..]);
        Some(Self {
            reason: ExitReason::from_u64(regs[0])?,
            detail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::smccc;

    #[test]
    fn calls_are_distinct_moat_calls_below_the_service_range() {
        let all = [
            HOST_SHARE_HYP,
            HOST_UNSHARE_HYP,
            VM_CREATE,
            VM_DONATE,
            VM_LOAD,
            VCPU_RUN,
            VM_DESTROY,
            VM_RECLAIM,
            GUEST_SHARE_HOST,
            GUEST_UNSHARE_HOST,
        ];
        for (i, a) in all.iter().enumerate() {
            assert_eq!(smccc::owner(*a), smccc::OWNER_VENDOR_HYP);
            assert!((*a & 0xffff) < u32::from(crate::hypercall::SERVICE_RANGE_START));
            for b in &all[i + 1..] {
                assert_ne!(a, b);
            }
        }
        assert_eq!(VM_CREATE, 0xc600_0012);
    }

    #[test]
    fn exits_round_trip() {
        for reason in ExitReason::ALL {
            let e = Exit {
                reason,
                detail: [1, 2, 3, 4, 5, 6],
            };
            assert_eq!(Exit::from_regs(e.to_regs()), Some(e));
        }
        assert_eq!(Exit::from_regs([0; 7]), None);
        assert_eq!(Exit::from_regs([99, 0, 0, 0, 0, 0, 0]), None);
    }

    #[test]
    fn mmio_access_bits() {
        let a = MmioAccess::new(true, 2, 7);
        assert!(a.is_write());
        assert_eq!(a.size(), 4);
        assert_eq!(a.register(), 7);
        let r = MmioAccess::new(false, 3, 31);
        assert!(!r.is_write());
        assert_eq!(r.size(), 8);
        assert_eq!(r.register(), 31);
    }

    #[test]
    fn mmio_answers() {
        assert_eq!(MmioAnswer(0).aborts(), Some(false));
        assert_eq!(MmioAnswer(MmioAnswer::ABORT).aborts(), Some(true));
        assert_eq!(MmioAnswer(2).aborts(), None);
        assert_eq!(MmioAnswer(1 << 63 | 1).aborts(), None);
    }

    #[test]
    fn flags() {
        assert!(VmFlags(VmFlags::MTE).mte());
        assert!(!VmFlags(0).mte());
        assert!(VmFlags(VmFlags::VGIC).vgic());
        assert_eq!(VmFlags::KNOWN & !(VmFlags::MTE | VmFlags::VGIC), 0);
    }

    #[test]
    fn injections() {
        assert_eq!(Injection(0).decode(), None);
        assert_eq!(Injection::new(27, 0xa0).decode(), Some(Ok((27, 0xa0))));
        assert_eq!(Injection::new(1019, 0).decode(), Some(Ok((1019, 0))));
        assert_eq!(Injection::new(1020, 0).decode(), Some(Err(())));
        assert_eq!(Injection(40).decode(), Some(Err(())), "no valid bit");
        let level = Injection::level(33, 0xa0);
        assert_eq!(level.decode(), Some(Ok((33, 0xa0))));
        assert!(level.notify_eoi() && !Injection::new(33, 0xa0).notify_eoi());
        assert_eq!(
            Injection(Injection::new(40, 0).0 | 1 << 40).decode(),
            Some(Err(()))
        );
    }
}
