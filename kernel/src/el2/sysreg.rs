//! The seam between the core and the system registers.
//!
//! Reads and writes go through `arm-sysregs` (one `mrs`/`msr` each, inlined);
//! the few registers it does not cover are written here with the same
//! one-instruction pattern. Everything above this module deals in plain
//! `u64` values computed by the host-tested logic in `moat_kernel`.

use arm_sysregs as sr;
use moat_kernel::el2config::CpuFeatures;

/// The ID registers the core configures EL2 from.
pub fn cpu_features() -> CpuFeatures {
    CpuFeatures::from_id_regs(
        sr::read_id_aa64pfr0_el1().bits(),
        sr::read_id_aa64pfr1_el1().bits(),
        sr::read_id_aa64mmfr0_el1().bits(),
        sr::read_id_aa64mmfr1_el1().bits(),
        sr::read_id_aa64dfr0_el1().bits(),
    )
}

pub fn esr_el2() -> u64 {
    sr::read_esr_el2().bits()
}

pub fn far_el2() -> u64 {
    sr::read_far_el2().bits()
}

/// The faulting IPA of a stage-2 abort: HPFAR_EL2.FIPA gives bits [51:12],
/// FAR_EL2 the offset within the page.
pub fn fault_ipa() -> u64 {
    let hpfar = sr::read_hpfar_el2().bits();
    ((hpfar >> 4) & 0xff_ffff_ffff) << 12 | (far_el2() & 0xfff)
}

pub fn mpidr() -> u64 {
    sr::read_mpidr_el1().bits()
}

/// The EL1 state an injected exception depends on.
pub fn vbar_el1() -> u64 {
    sr::read_vbar_el1().bits()
}

pub fn sctlr_el1() -> u64 {
    sr::read_sctlr_el1().bits()
}

/// Writes the EL1 exception registers of an injection.
pub fn write_el1_exception(esr: u64, elr: u64, spsr: u64, far: Option<u64>) {
    // SAFETY: these registers belong to the partition whose context is live
    // on this CPU; the core writes them exactly as the architecture would on
    // taking an exception to EL1, which is what it is emulating.
    unsafe {
        sr::write_esr_el1(sr::EsrEl1::from_bits_retain(esr));
        sr::write_elr_el1(sr::ElrEl1::from_bits_retain(elr));
        sr::write_spsr_el1(sr::SpsrEl1::from_bits_retain(spsr));
        if let Some(far) = far {
            sr::write_far_el1(sr::FarEl1::from_bits_retain(far));
        }
    }
}

/// The per-CPU EL2 configuration for running the host.
pub struct HostEl2Config {
    pub hcr: u64,
    pub cptr: u64,
    pub mdcr: u64,
    pub vtcr: u64,
    pub vttbr: u64,
}

/// Programs this CPU's EL2 controls for the host and resets its EL1 state.
///
/// # Safety
///
/// `config.vttbr` must point at a complete stage-2 table that stays alive for
/// as long as the host runs, and the caller must be about to enter the host
/// (or already running it) on this CPU.
pub unsafe fn configure_for_host(cpu: &CpuFeatures, config: &HostEl2Config) {
    // SAFETY: per the function contract; each write below configures this
    // CPU's EL2 for the host and none of them affects the core's own
    // translation regime (EL2 stage-1) or memory.
    unsafe {
        sr::write_vtcr_el2(sr::VtcrEl2::from_bits_retain(config.vtcr));
        sr::write_vttbr_el2(sr::VttbrEl2::from_bits_retain(config.vttbr));
        core::arch::asm!("isb", "tlbi vmalls12e1", "dsb nsh", "isb", options(nostack, preserves_flags));
        sr::write_cptr_el2(sr::CptrEl2::from_bits_retain(config.cptr));
        core::arch::asm!("isb", options(nostack, preserves_flags));
        if cpu.sve {
            // ZCR_EL2.LEN = max: the host may use every vector length the CPU has.
            core::arch::asm!("msr s3_4_c1_c2_0, {v}", v = in(reg) 0x1ffu64, options(nostack, preserves_flags));
        }
        if cpu.sme {
            // SMCR_EL2: FA64 | EZT0 | LEN = max.
            core::arch::asm!("msr s3_4_c1_c2_6, {v}", v = in(reg) (0xc000_0000u64 | 0x1ff), options(nostack, preserves_flags));
        }
        sr::write_mdcr_el2(sr::MdcrEl2::from_bits_retain(config.mdcr));
        sr::write_cnthctl_el2(sr::CnthctlEl2::from_bits_retain(moat_kernel::el2config::HOST_CNTHCTL));
        sr::write_cntvoff_el2(sr::CntvoffEl2::from_bits_retain(0));
        sr::write_vpidr_el2(sr::VpidrEl2::from_bits_retain(sr::read_midr_el1().bits()));
        sr::write_vmpidr_el2(sr::VmpidrEl2::from_bits_retain(sr::read_mpidr_el1().bits()));
        if cpu.gic_sysregs {
            sr::write_icc_sre_el2(sr::IccSreEl2::from_bits_retain(moat_kernel::el2config::HOST_ICC_SRE_EL2));
            core::arch::asm!("isb", options(nostack, preserves_flags));
            sr::write_ich_hcr_el2(sr::IchHcrEl2::from_bits_retain(0));
        }
        if cpu.hcx {
            sr::write_hcrx_el2(sr::HcrxEl2::from_bits_retain(0));
        }
        if cpu.fgt {
            // No fine-grained traps: the host owns its EL1.
            sr::write_hfgrtr_el2(sr::HfgrtrEl2::from_bits_retain(0));
            sr::write_hfgwtr_el2(sr::HfgwtrEl2::from_bits_retain(0));
            sr::write_hfgitr_el2(sr::HfgitrEl2::from_bits_retain(0));
            sr::write_hdfgrtr_el2(sr::HdfgrtrEl2::from_bits_retain(0));
            sr::write_hdfgwtr_el2(sr::HdfgwtrEl2::from_bits_retain(0));
        }
        sr::write_sctlr_el1(sr::SctlrEl1::from_bits_retain(moat_kernel::el2config::SCTLR_EL1_RESET));
        sr::write_hcr_el2(sr::HcrEl2::from_bits_retain(config.hcr));
        core::arch::asm!("isb", options(nostack, preserves_flags));
    }
}

/// PMCR_EL0.N: the number of event counters.
pub fn pmu_counters(cpu: &CpuFeatures) -> u64 {
    if cpu.pmuv3 { (sr::read_pmcr_el0().bits() >> 11) & 0x1f } else { 0 }
}
