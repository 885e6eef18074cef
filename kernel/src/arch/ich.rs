//! The virtual GICv3 CPU interface's system registers (ICH_*_EL2) and the
//! guest's virtual timer, as the core switches them with a vCPU
//! (`device::vgic` holds what is done with them).

macro_rules! lr_access {
    ($($n:literal: $reg:literal),* $(,)?) => {
        pub fn read_lr(n: usize) -> u64 {
            let v: u64;
            match n {
                $(
                    // SAFETY: reads a list register that ICH_VTR_EL2 says
                    // exists (callers stay below its count).
                    $n => unsafe {
                        core::arch::asm!(concat!("mrs {}, ", $reg), out(reg) v,
                            options(nomem, nostack, preserves_flags))
                    },
                )*
                _ => v = 0,
            }
            v
        }

        pub fn write_lr(n: usize, v: u64) {
            match n {
                $(
                    // SAFETY: writes a list register of the vCPU being
                    // switched (callers stay below the count).
                    $n => unsafe {
                        core::arch::asm!(concat!("msr ", $reg, ", {}"), in(reg) v,
                            options(nomem, nostack, preserves_flags))
                    },
                )*
                _ => {}
            }
        }
    };
}

lr_access!(
    0: "s3_4_c12_c12_0", 1: "s3_4_c12_c12_1", 2: "s3_4_c12_c12_2", 3: "s3_4_c12_c12_3",
    4: "s3_4_c12_c12_4", 5: "s3_4_c12_c12_5", 6: "s3_4_c12_c12_6", 7: "s3_4_c12_c12_7",
    8: "s3_4_c12_c13_0", 9: "s3_4_c12_c13_1", 10: "s3_4_c12_c13_2", 11: "s3_4_c12_c13_3",
    12: "s3_4_c12_c13_4", 13: "s3_4_c12_c13_5", 14: "s3_4_c12_c13_6", 15: "s3_4_c12_c13_7",
);

macro_rules! apr_access {
    ($read:ident, $write:ident, $($n:literal: $reg:literal),* $(,)?) => {
        pub fn $read(n: usize) -> u64 {
            let v: u64;
            match n {
                $(
                    // SAFETY: an active-priority register ICH_VTR_EL2 says
                    // exists.
                    $n => unsafe {
                        core::arch::asm!(concat!("mrs {}, ", $reg), out(reg) v,
                            options(nomem, nostack, preserves_flags))
                    },
                )*
                _ => v = 0,
            }
            v
        }

        pub fn $write(n: usize, v: u64) {
            match n {
                $(
                    // SAFETY: as above, the vCPU's value being switched in.
                    $n => unsafe {
                        core::arch::asm!(concat!("msr ", $reg, ", {}"), in(reg) v,
                            options(nomem, nostack, preserves_flags))
                    },
                )*
                _ => {}
            }
        }
    };
}

apr_access!(read_ap0r, write_ap0r,
    0: "s3_4_c12_c8_0", 1: "s3_4_c12_c8_1", 2: "s3_4_c12_c8_2", 3: "s3_4_c12_c8_3");
apr_access!(read_ap1r, write_ap1r,
    0: "s3_4_c12_c9_0", 1: "s3_4_c12_c9_1", 2: "s3_4_c12_c9_2", 3: "s3_4_c12_c9_3");

/// The ICH_* registers `arm-sysregs` does not name, through its own
/// accessor generator: reading them has no side effects.
mod unnamed {
    arm_sysregs::read_sysreg!(ich_vtr_el2: s3_4_c12_c11_1, u64, safe);
    arm_sysregs::read_sysreg!(ich_misr_el2: s3_4_c12_c11_2, u64, safe);
    arm_sysregs::read_sysreg!(ich_eisr_el2: s3_4_c12_c11_3, u64, safe);
}

pub use unnamed::{
    read_ich_eisr_el2 as read_eisr, read_ich_misr_el2 as read_misr,
    read_ich_vtr_el2 as read_sysreg_vtr,
};

pub fn write_ich_hcr(v: u64) {
    // SAFETY: the virtual CPU interface's controls, switched with the vCPU
    // (0 while anyone but a virtual-GIC VM runs); they affect only the
    // virtual interface a guest sees.
    unsafe { arm_sysregs::write_ich_hcr_el2(arm_sysregs::IchHcrEl2::from_bits_retain(v)) };
}

/// ICH_VMCR_EL2, the guest's view of its CPU-interface controls.
pub fn read_vmcr() -> u64 {
    arm_sysregs::read_ich_vmcr_el2().bits()
}

/// The vCPU's ICH_VMCR_EL2 being switched in.
pub fn write_vmcr(v: u64) {
    arm_sysregs::write_ich_vmcr_el2(arm_sysregs::IchVmcrEl2::from_bits_retain(v));
}

/// The guest's CNTV_CTL_EL0 and CNTV_CVAL_EL0, live in the CPU during a run.
pub fn guest_timer() -> (u64, u64) {
    (
        arm_sysregs::read_cntv_ctl_el0().bits(),
        arm_sysregs::read_cntv_cval_el0().bits(),
    )
}
