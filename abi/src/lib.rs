//! The Moat ABI: every value that crosses a privilege boundary.
//!
//! Partitions reach the core with SMCCC calls (HVC, or SMC trapped by the
//! core). Moat's own calls live in the *vendor-specific hypervisor* service
//! range (owner 6) as fast calls, so they coexist with PSCI and with the
//! standard SMCCC queries; results come back in x0..x3 with x0 an
//! [`Error`] code (0 on success) unless a call says otherwise.
#![no_std]
#![forbid(unsafe_code)]

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
    /// The version the core implements: 1.1.
    pub const IMPLEMENTED_VERSION: u64 = 0x1_0001;

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
}

/// Error codes a Moat call returns in x0. Negative, as SMCCC errors are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum Error {
    NotSupported = -1,
    InvalidParameters = -2,
    Denied = -3,
    NoMemory = -4,
    Busy = -5,
}

impl Error {
    /// The value placed in x0.
    pub const fn to_x0(self) -> u64 {
        self as i64 as u64
    }

    /// Decodes x0; `Ok(())` for 0, `None` for an unknown code.
    pub const fn from_x0(x0: u64) -> Option<Result<(), Error>> {
        Some(match x0 as i64 {
            0 => Ok(()),
            -1 => Err(Error::NotSupported),
            -2 => Err(Error::InvalidParameters),
            -3 => Err(Error::Denied),
            -4 => Err(Error::NoMemory),
            -5 => Err(Error::Busy),
            _ => return None,
        })
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
        for e in [
            Error::NotSupported,
            Error::InvalidParameters,
            Error::Denied,
            Error::NoMemory,
            Error::Busy,
        ] {
            assert_eq!(Error::from_x0(e.to_x0()), Some(Err(e)));
        }
        assert_eq!(Error::from_x0(0), Some(Ok(())));
        assert_eq!(Error::from_x0(7), None);
        assert_eq!(Error::NotSupported.to_x0(), smccc::NOT_SUPPORTED);
    }
}
