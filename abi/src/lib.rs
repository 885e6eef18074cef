//! The Moat ABI: every value that crosses a privilege boundary.
//!
//! Partitions reach the core with SMCCC calls (HVC, or SMC trapped by the
//! core). Moat's own calls live in the *vendor-specific hypervisor* service
//! range (owner 6) as fast calls, so they coexist with PSCI and with the
//! standard SMCCC queries; results come back in x0..x3 with x0 an
//! [`Error`] code (0 on success) unless a call says otherwise.
#![no_std]
#![forbid(unsafe_code)]

pub mod ipc;
pub mod service;
pub mod services;
pub mod trap;
pub mod vm;

/// Re-exported so interface declarations expand without a direct dependency.
pub use zerocopy;

/// The ABI version as `(major << 16) | minor`. A major change breaks callers.
pub const ABI_VERSION: u32 = 1 << 16;

/// SMCCC function-id layout.
pub mod smccc {
    /// Bit 31: fast call.
    pub const FAST_CALL: u32 = 1 << 31;
    /// Bit 30: SMC64/HVC64 calling convention.
    pub const CONV_64: u32 = 1 << 30;
    /// Bits 29:24: the owning service.
    pub const OWNER_SHIFT: u32 = 24;
    pub const OWNER_MASK: u32 = 0x3f;
    pub const OWNER_ARCH: u32 = 0;
    pub const OWNER_STANDARD: u32 = 4;
    pub const OWNER_VENDOR_HYP: u32 = 6;

    /// SMCCC_VERSION.
    pub const SMCCC_VERSION: u32 = 0x8000_0000;
    /// SMCCC_ARCH_FEATURES.
    pub const SMCCC_ARCH_FEATURES: u32 = 0x8000_0001;
    /// The version the core implements: 1.2 (results may use x0..x7, as
    /// routed service calls do).
    pub const IMPLEMENTED_VERSION: u64 = 0x1_0002;

    /// Vendor-hyp general queries (32-bit convention, as SMCCC defines them).
    pub const VENDOR_HYP_CALL_UID: u32 = 0x8600_ff01;
    pub const VENDOR_HYP_REVISION: u32 = 0x8600_ff03;

    /// The call's owner.
    pub const fn owner(function_id: u32) -> u32 {
        (function_id >> OWNER_SHIFT) & OWNER_MASK
    }

    /// SMCCC NOT_SUPPORTED as seen in x0.
    pub const NOT_SUPPORTED: u64 = -1i64 as u64;
}

/// Moat's identifier for `VENDOR_HYP_CALL_UID`, returned in w0..w3
/// (UUID 6d6f6174-0001-4d6f-6174-2d6879702d32).
pub const MOAT_UID: [u32; 4] = [0x7461_6f6d, 0x4d6f_0001, 0x2d74_6f61, 0x322d_7079];

/// Moat hypercall ids: fast SMC64 calls owned by the vendor-specific hypervisor service.
pub mod hypercall {
    /// Builds the function id of Moat call `n`.
    pub const fn id(n: u16) -> u32 {
        super::smccc::FAST_CALL
            | super::smccc::CONV_64
            | (super::smccc::OWNER_VENDOR_HYP << super::smccc::OWNER_SHIFT)
            | n as u32
    }

    /// Does nothing and returns 0: the floor of every hypercall's cost.
    pub const NULL: u32 = id(0);
    /// Returns [`crate::ABI_VERSION`] in x1.
    pub const ABI_VERSION: u32 = id(1);
    /// Runs the consistency checker (the memory ledger against the host's
    /// stage-2, and the SMMU's stream table against it): 0 if they agree,
    /// `Denied` if not or if there is no ledger; x1 = how many DMA faults
    /// the SMMU has recorded since boot. A debugging aid the tests call
    /// after each scenario.
    pub const CHECK_CONSISTENCY: u32 = id(2);
    /// Restarts the memory ledger service: its partition is reloaded from
    /// the boot image and its state rebuilt from the core's own tables.
    /// Until the rebuild is done, memory requests answer `Retry`. Returns 0
    /// once the ledger is back, `Retry` if the rebuild is still waiting (a
    /// VM is running on another CPU), `ServiceFailed` if the ledger cannot
    /// come back, `NotSupported` if the image has no ledger. The host may
    /// ask at any time: the ledger's new state comes from the core, never
    /// from the old ledger or the host, so a restart can delay memory
    /// requests but not change who owns what.
    pub const LEDGER_RESTART: u32 = id(3);

    /// First function number the image manifest may route to services.
    /// Function `first + k - 1` of the range a service is given is its
    /// operation `k`: x1..x6 carry the request (48 bytes, unused bytes zero),
    /// and the answer comes back as x0 = status, x1..x7 = reply (56 bytes).
    pub const SERVICE_RANGE_START: u16 = 0x1000;
    /// One past the last routable function number.
    pub const SERVICE_RANGE_END: u16 = 0xff00;

    /// Service -> core: the reply is in the IPC page (or, on the first call,
    /// the service is ready); returns when the next call is in the IPC page.
    pub const SVC_REPLY_WAIT: u32 = id(0x100);
    /// Service -> core: print x1 bytes from the IPC page's payload.
    pub const SVC_LOG: u32 = id(0x101);
    /// Service -> core: the service took an exception it cannot handle
    /// (x1 = ESR_EL1, x2 = ELR_EL1, x3 = FAR_EL1).
    pub const SVC_FAULT: u32 = id(0x102);
}

/// Error codes a Moat call returns in x0. Negative, as SMCCC errors are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum Error {
    /// Unknown function or operation.
    NotSupported = -1,
    /// An argument is out of range, misaligned or malformed.
    InvalidParameters = -2,
    /// The caller may not do this.
    Denied = -3,
    /// The core or a service is out of memory.
    NoMemory = -4,
    /// The target is serving another caller; try again.
    Busy = -5,
    /// The service has failed (faulted, replied malformed, or overran its
    /// budget) and is refusing every request.
    ServiceFailed = -6,
    /// The caller and callee speak different major ABI versions.
    VersionMismatch = -7,
    /// An interrupt for the caller arrived while the service was running;
    /// issue the same call again (with interrupts unmasked) to resume it.
    Interrupted = -8,
    /// The memory ledger is being restarted and rebuilt from the core's own
    /// tables: nothing was done; issue the same call again later.
    Retry = -9,
}

impl Error {
    /// Every error, for exhaustive tests and decoders.
    pub const ALL: [Error; 9] = [
        Error::NotSupported,
        Error::InvalidParameters,
        Error::Denied,
        Error::NoMemory,
        Error::Busy,
        Error::ServiceFailed,
        Error::VersionMismatch,
        Error::Interrupted,
        Error::Retry,
    ];

    /// The numeric code.
    pub const fn code(self) -> i64 {
        self as i64
    }

    /// The value placed in x0.
    pub const fn to_x0(self) -> u64 {
        self as i64 as u64
    }

    /// The error with this code, if any.
    pub const fn from_code(code: i64) -> Option<Error> {
        let mut i = 0;
        while i < Self::ALL.len() {
            if Self::ALL[i] as i64 == code {
                return Some(Self::ALL[i]);
            }
            i += 1;
        }
        None
    }

    /// Decodes x0; `Ok(())` for 0, `None` for an unknown code.
    pub const fn from_x0(x0: u64) -> Option<Result<(), Error>> {
        if x0 == 0 {
            return Some(Ok(()));
        }
        match Self::from_code(x0 as i64) {
            Some(e) => Some(Err(e)),
            None => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypercall_ids_are_fast_smc64_vendor_hyp() {
        assert_eq!(hypercall::NULL, 0xc600_0000);
        assert_eq!(hypercall::ABI_VERSION, 0xc600_0001);
        assert_eq!(smccc::owner(hypercall::NULL), smccc::OWNER_VENDOR_HYP);
        assert_eq!(smccc::owner(0x8400_0000), smccc::OWNER_STANDARD);
    }

    #[test]
    fn errors_round_trip() {
        for e in Error::ALL {
            assert_eq!(Error::from_x0(e.to_x0()), Some(Err(e)));
        }
        assert_eq!(Error::from_x0(0), Some(Ok(())));
        assert_eq!(Error::from_x0(7), None);
        assert_eq!(Error::NotSupported.to_x0(), smccc::NOT_SUPPORTED);
    }
}
