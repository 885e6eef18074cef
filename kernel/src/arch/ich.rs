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

pub fn read_sysreg_vtr() -> u64 {
    let v: u64;
    // SAFETY: ICH_VTR_EL2 is read-only and has no side effects.
    unsafe {
        core::arch::asm!("mrs {}, s3_4_c12_c11_1", out(reg) v,
            options(nomem, nostack, preserves_flags))
    };
    v
}

pub fn write_ich_hcr(v: u64) {
    // SAFETY: the virtual CPU interface's controls, switched with the vCPU
    // (0 while anyone but a virtual-GIC VM runs).
    unsafe {
        core::arch::asm!("msr s3_4_c12_c11_0, {}", in(reg) v,
            options(nomem, nostack, preserves_flags))
    };
}

pub fn read_misr() -> u64 {
    let v: u64;
    // SAFETY: ICH_MISR_EL2 is read-only.
    unsafe {
        core::arch::asm!("mrs {}, s3_4_c12_c11_2", out(reg) v,
            options(nomem, nostack, preserves_flags))
    };
    v
}

pub fn read_eisr() -> u64 {
    let v: u64;
    // SAFETY: ICH_EISR_EL2 is read-only.
    unsafe {
        core::arch::asm!("mrs {}, s3_4_c12_c11_3", out(reg) v,
            options(nomem, nostack, preserves_flags))
    };
    v
}

pub fn read_vmcr() -> u64 {
    let v: u64;
    // SAFETY: ICH_VMCR_EL2, the guest's view of its CPU-interface controls.
    unsafe {
        core::arch::asm!("mrs {}, s3_4_c12_c11_7", out(reg) v,
            options(nomem, nostack, preserves_flags))
    };
    v
}

pub fn write_vmcr(v: u64) {
    // SAFETY: as for `read_vmcr`; the vCPU's value being switched in.
    unsafe {
        core::arch::asm!("msr s3_4_c12_c11_7, {}", in(reg) v,
            options(nomem, nostack, preserves_flags))
    };
}

/// The guest's CNTV_CTL_EL0 and CNTV_CVAL_EL0, live in the CPU during a run.
pub fn guest_timer() -> (u64, u64) {
    let (ctl, cval): (u64, u64);
    // SAFETY: reads the virtual timer registers (the running VM's).
    unsafe {
        core::arch::asm!("mrs {c}, cntv_ctl_el0", "mrs {v}, cntv_cval_el0",
            c = out(reg) ctl, v = out(reg) cval,
            options(nomem, nostack, preserves_flags))
    };
    (ctl, cval)
}
