//! What a protected VM's ID registers say: the hardware's values with the
//! features the core does not give VMs taken out, so a guest that probes
//! them never reaches an instruction that traps.
//!
//! The feature table in [`crate::el2config`] says which features VMs are
//! given; this answers a trapped read from it.
//!
//! A VM runs with SVE and SME trapped (CPTR_EL2.TZ, TSM: only the 128-bit
//! FP/SIMD registers are switched), pointer authentication trapped
//! (HCR_EL2.API/APK clear: the keys in the registers are the host's), the
//! PMU and the statistical profiler trapped (MDCR_EL2), and activity
//! monitors and MPAM not offered. Whether a VM has MTE is the policy
//! service's decision, taken when the VM is created; a VM whose MTE is off
//! reads the MTE fields as zero, as the policy edits them for the host.

use crate::el2config;

/// The value a VM whose MTE is `mte` reads from the ID register
/// `(crm, op2)` whose hardware value is `value`: the register's part of
/// [`el2config::vm_view`], which takes out every feature the feature table
/// does not give VMs (and MTE unless `mte`). Registers the table does not
/// describe read as the hardware has them.
pub fn vm_view(crm: u8, op2: u8, value: u64, mte: bool) -> u64 {
    let Some(reg) = el2config::IdReg::from_encoding(crm, op2) else {
        return value;
    };
    let mut hw = el2config::IdRegs::default();
    *hw.get_mut(reg) = value;
    el2config::vm_view(&hw, mte).get(reg)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// ID_AA64PFR0_EL1 of QEMU's `max` CPU (SVE, AMU-less, GIC sysregs).
    const MAX_PFR0: u64 = 0x1201_1111_1111_2222_u64 | (1 << 32);

    #[test]
    fn trapped_features_are_hidden() {
        let pfr0 = vm_view(4, 0, MAX_PFR0, true);
        assert_eq!((pfr0 >> 32) & 0xf, 0, "SVE hidden");
        // EL0..EL3, FP, AdvSIMD and GIC fields are kept.
        assert_eq!(pfr0 & 0xffff_ffff, MAX_PFR0 & 0xffff_ffff);
        assert_eq!((vm_view(4, 1, 0x0000_0000_0100_0321, true) >> 24) & 0xf, 0);
        assert_eq!(vm_view(4, 4, 0x1234, true), 0);
        assert_eq!(vm_view(4, 5, 0x1234, false), 0);
        let isar1 = vm_view(6, 1, 0xffff_ffff_ffff_ffff, true);
        assert_eq!(isar1 & (0xff << 4), 0);
        assert_eq!(isar1 & (0xff << 24), 0);
        assert_eq!(isar1 & 0xf, 0xf, "DPB kept");
        let dfr0 = vm_view(5, 0, 0x0000_0001_1030_5116, true);
        assert_eq!((dfr0 >> 8) & 0xf, 0, "no PMU");
        assert_eq!(dfr0 & 0xf, 6, "DebugVer kept");
    }

    #[test]
    fn mte_follows_the_vms_policy() {
        let pfr1 = 0x0000_0000_0100_0321;
        assert_eq!((vm_view(4, 1, pfr1, true) >> 8) & 0xf, 3);
        assert_eq!((vm_view(4, 1, pfr1, false) >> 8) & 0xf, 0);
        assert_eq!(vm_view(4, 1, pfr1, false) & 0xff, 0x21, "BT and SSBS kept");
        assert_eq!(vm_view(4, 2, 0x111, true), 0x111);
        assert_eq!(vm_view(4, 2, 0x111, false), 0);
    }

    #[test]
    fn other_registers_pass_through() {
        assert_eq!(vm_view(7, 0, 0xdead_beef, false), 0xdead_beef);
        assert_eq!(vm_view(1, 0, 7, true), 7);
    }
}
