//! The firmware conduit: how the core itself calls PSCI and other SMCCC
//! services below it.
//!
//! At EL2 the only way down is `SMC` (an `HVC` from EL2 would trap to the core
//! itself), so a tree whose PSCI node says `hvc` has no firmware the core can
//! reach; [`FirmwareConduit::call`] then answers NOT_SUPPORTED.

use crate::dt::Conduit;

/// SMCCC's NOT_SUPPORTED, as the 64-bit value a caller sees in x0.
pub const NOT_SUPPORTED: u64 = -1i64 as u64;

/// The conduit the device tree named for PSCI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirmwareConduit {
    conduit: Option<Conduit>,
}

impl FirmwareConduit {
    /// A conduit as discovered (`None` when the tree has no PSCI node).
    pub const fn new(conduit: Option<Conduit>) -> Self {
        Self { conduit }
    }

    /// Whether calls can reach firmware at all.
    pub fn is_available(&self) -> bool {
        self.conduit == Some(Conduit::Smc)
    }

    /// Issues an SMC64 call with `function` in w0 and `args` in x1..x17,
    /// returning x0..x17.
    pub fn call(&self, function: u32, args: [u64; 17]) -> [u64; 18] {
        if !self.is_available() {
            let mut ret = [0; 18];
            ret[0] = NOT_SUPPORTED;
            return ret;
        }
        #[cfg(target_arch = "aarch64")]
        {
            smccc::smc64(function, args)
        }
        #[cfg(not(target_arch = "aarch64"))]
        {
            let _ = (function, args);
            let mut ret = [0; 18];
            ret[0] = NOT_SUPPORTED;
            ret
        }
    }
}
