//! The seam between the core and the system registers.
//!
//! Reads and writes go through `arm-sysregs` (one `mrs`/`msr` each, inlined);
//! the few registers it does not cover are written here with the same
//! one-instruction pattern. Everything above this module deals in plain
//! `u64` values computed by the host-tested logic in `moat_kernel`.

use arm_sysregs as sr;
use moat_kernel::el2config::{CpuFeatures, El2Controls, FineGrainedTraps, IdRegs};

/// The ID registers the core derives EL2's controls from, as the hardware
/// has them.
pub fn id_regs() -> IdRegs {
    IdRegs::read(|crm, op2| read_id_register(crm, op2).unwrap_or(0))
}

/// What the core needs to know about the CPU.
pub fn cpu_features() -> CpuFeatures {
    id_regs().cpu_features()
}

/// ID_AA64PFR1_EL1.MTE as the hardware reports it (0 none, 1 instructions
/// only, 2 full MTE, 3 MTE3): what the MTE policy decides from.
pub fn mte_level() -> u32 {
    ((sr::read_id_aa64pfr1_el1().bits() >> 8) & 0xf) as u32
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

/// The per-CPU EL2 configuration for running the host: its derived
/// controls (read through `Deref`: `config.cptr`, `config.hcrx`, ...),
/// with `HCR_EL2` apart because the MTE policy service sets it once more
/// after boot, and the host's stage-2.
pub struct HostEl2Config {
    /// Shadows `controls.hcr`, which is only the value before the policy.
    pub hcr: core::sync::atomic::AtomicU64,
    controls: El2Controls,
    pub vtcr: u64,
    pub vttbr: u64,
}

impl HostEl2Config {
    /// The host's configuration from its derived controls.
    pub fn new(c: &El2Controls, vtcr: u64, vttbr: u64) -> Self {
        Self {
            hcr: core::sync::atomic::AtomicU64::new(c.hcr),
            controls: *c,
            vtcr,
            vttbr,
        }
    }
}

impl core::ops::Deref for HostEl2Config {
    type Target = El2Controls;

    fn deref(&self) -> &El2Controls {
        &self.controls
    }
}

/// Writes HCRX_EL2 and the fine-grained trap registers, each only if the
/// CPU implements it (HCRX_EL2 is UNDEFINED without FEAT_HCX, the trap
/// registers without FEAT_FGT). The world switch calls this on the way into
/// a nested partition (whose values enable nothing the host's EL1 state
/// could reach it through: TCR2_EL1, SCTLR2_EL1, GCS and the permission
/// and overlay registers are the host's, live in the CPU) and back.
///
/// # Safety
///
/// The caller is about to enter (or has just left) the partition the
/// values belong to; the ERET into it synchronizes the writes.
#[inline(always)]
pub unsafe fn switch_feature_controls(cpu: &CpuFeatures, hcrx: u64, fgt: &FineGrainedTraps) {
    // SAFETY: per the function contract; these controls only affect EL1
    // and EL0, never the core's own EL2 regime.
    unsafe {
        if cpu.hcx {
            sr::write_hcrx_el2(sr::HcrxEl2::from_bits_retain(hcrx));
        }
        if cpu.fgt {
            sr::write_hfgrtr_el2(sr::HfgrtrEl2::from_bits_retain(fgt.hfgrtr));
            sr::write_hfgwtr_el2(sr::HfgwtrEl2::from_bits_retain(fgt.hfgwtr));
            sr::write_hfgitr_el2(sr::HfgitrEl2::from_bits_retain(fgt.hfgitr));
            sr::write_hdfgrtr_el2(sr::HdfgrtrEl2::from_bits_retain(fgt.hdfgrtr));
            sr::write_hdfgwtr_el2(sr::HdfgwtrEl2::from_bits_retain(fgt.hdfgwtr));
        }
    }
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
        core::arch::asm!(
            // The TLBI names the VMID in VTTBR_EL2: the direct write must be
            // synchronized before a later instruction is sure to see it.
            "isb",
            "tlbi vmalls12e1",
            "dsb nsh",
            "isb",
            options(nostack, preserves_flags)
        );
        sr::write_cptr_el2(sr::CptrEl2::from_bits_retain(config.cptr));
        // The SVE and SME accesses below depend on the new CPTR_EL2: a
        // direct write is only guaranteed to affect instructions after a
        // context synchronization event.
        core::arch::asm!("isb", options(nostack, preserves_flags));
        if cpu.sme {
            // No host state exists yet on this CPU: leave streaming mode and
            // turn ZA off, whatever firmware or an earlier host left.
            core::arch::asm!("msr s3_3_c4_c2_2, xzr", options(nostack, preserves_flags));
        }
        // ZCR_EL2 and SMCR_EL2 as derived: present only when the host has
        // SVE / SME (FA64 and EZT0 only when the CPU has them).
        if let (true, Some(zcr)) = (cpu.sve, config.zcr) {
            core::arch::asm!("msr s3_4_c1_c2_0, {v}", v = in(reg) zcr, options(nostack, preserves_flags));
        }
        if let (true, Some(smcr)) = (cpu.sme, config.smcr) {
            core::arch::asm!("msr s3_4_c1_c2_6, {v}", v = in(reg) smcr, options(nostack, preserves_flags));
        }
        sr::write_mdcr_el2(sr::MdcrEl2::from_bits_retain(config.mdcr));
        sr::write_cnthctl_el2(sr::CnthctlEl2::from_bits_retain(config.cnthctl));
        sr::write_cntvoff_el2(sr::CntvoffEl2::from_bits_retain(0));
        sr::write_vpidr_el2(sr::VpidrEl2::from_bits_retain(sr::read_midr_el1().bits()));
        sr::write_vmpidr_el2(sr::VmpidrEl2::from_bits_retain(sr::read_mpidr_el1().bits()));
        if cpu.gic_sysregs {
            sr::write_icc_sre_el2(sr::IccSreEl2::from_bits_retain(
                moat_kernel::el2config::HOST_ICC_SRE_EL2,
            ));
            // ICC_SRE_EL2.SRE must be in effect (a context synchronization
            // event after the write) before the ICH_* access below.
            core::arch::asm!("isb", options(nostack, preserves_flags));
            sr::write_ich_hcr_el2(sr::IchHcrEl2::from_bits_retain(0));
        }
        // HCRX_EL2 and the fine-grained traps as derived (their reset
        // values are UNKNOWN, and a clear negative-polarity bit traps).
        switch_feature_controls(cpu, config.hcrx, &config.fgt);
        if cpu.fgt && cpu.amu {
            sr::write_hafgrtr_el2(sr::HafgrtrEl2::from_bits_retain(0));
        }
        if cpu.fgt2 {
            // The second set holds positive traps only for the features the
            // table knows: zero traps none of them.
            sr::write_hfgrtr2_el2(sr::Hfgrtr2El2::from_bits_retain(0));
            sr::write_hfgwtr2_el2(sr::Hfgwtr2El2::from_bits_retain(0));
            sr::write_hfgitr2_el2(sr::Hfgitr2El2::from_bits_retain(0));
            sr::write_hdfgrtr2_el2(sr::Hdfgrtr2El2::from_bits_retain(0));
            sr::write_hdfgwtr2_el2(sr::Hdfgwtr2El2::from_bits_retain(0));
        }
        sr::write_sctlr_el1(sr::SctlrEl1::from_bits_retain(
            moat_kernel::el2config::SCTLR_EL1_RESET,
        ));
        sr::write_hcr_el2(sr::HcrEl2::from_bits_retain(
            config.hcr.load(core::sync::atomic::Ordering::Relaxed),
        ));
        // Every write above in effect before the next instruction (the
        // vector lengths `vector_lengths` reads depend on ZCR_EL2/SMCR_EL2).
        core::arch::asm!("isb", options(nostack, preserves_flags));
    }
}

/// The vector lengths in force at EL2, in bytes: SVE's (non-streaming) and
/// SME's streaming one; 0 for a feature the CPU lacks. With LEN all ones in
/// ZCR_EL2 and SMCR_EL2 (`configure_for_host`), these are the largest the
/// hardware allows, what every save area of vector state is sized from.
///
/// # Safety
///
/// Runs at EL2 under the host's CPTR_EL2 (TZ and TSM clear), after
/// `configure_for_host` on this CPU, with PSTATE.SM clear (RDVL reads the
/// streaming length in streaming mode).
pub unsafe fn vector_lengths(cpu: &CpuFeatures) -> (u64, u64) {
    let (mut sve, mut sme) = (0, 0);
    // SAFETY: per the function contract; RDVL and RDSVL only read the
    // effective vector lengths.
    unsafe {
        if cpu.sve {
            core::arch::asm!(".arch_extension sve", "rdvl {}, #1", out(reg) sve,
                options(nomem, nostack, preserves_flags));
        }
        if cpu.sme {
            core::arch::asm!(".arch_extension sme", "rdsvl {}, #1", out(reg) sme,
                options(nomem, nostack, preserves_flags));
        }
    }
    (sve, sme)
}

/// SVCR (PSTATE.SM in bit 0, PSTATE.ZA in bit 1) as the calling partition
/// left it; 0 on a CPU without SME. Exception entry does not change it, so
/// at EL2 it is the host's.
pub fn streaming_state(cpu: &CpuFeatures) -> u64 {
    if !cpu.sme {
        return 0;
    }
    let v: u64;
    // SAFETY: reads SVCR, which the host's CPTR_EL2 (TSM clear) lets EL2
    // read; no side effects.
    unsafe {
        core::arch::asm!("mrs {}, s3_3_c4_c2_2", out(reg) v, options(nomem, nostack, preserves_flags));
    }
    v
}

/// The host's self-hosted debug, PMU and trace controls, parked while a VM
/// runs: without this the host's breakpoints and watchpoints (MDSCR_EL1.MDE,
/// KDE) would fire inside the VM, its event and cycle counters would count
/// the VM's EL1 work, and its trace filter could trace it. The VM cannot
/// reach any of these registers (MDCR_EL2.TDA, TPM, TPMCR, TTRF trap them).
pub struct ParkedHostMonitors {
    mdscr: u64,
    pmcr: Option<u64>,
    trfcr: Option<u64>,
}

/// PMCR_EL0.E: the enable of every counter below MDCR_EL2.HPMN and of the
/// cycle counter (the host's HPMN gives it all of them).
const PMCR_E: u64 = 1;

impl ParkedHostMonitors {
    /// Saves the host's controls and turns them all off: MDSCR_EL1 zero (no
    /// breakpoint, watchpoint or software-step exception), PMCR_EL0.E clear
    /// (no counter counts), TRFCR_EL1 zero (no trace at EL0 or EL1). With
    /// `pmu_sees_all` (benchmark images, which count the core's own work
    /// too: MDCR_EL2.HPMD clear) the counters are left running.
    ///
    /// # Safety
    ///
    /// The CPU is at EL2 about to run a VM; the host's EL1 state is saved
    /// (these registers are not part of it).
    pub unsafe fn park(cpu: &CpuFeatures, pmu_sees_all: bool) -> Self {
        let mdscr = sr::read_mdscr_el1().bits();
        let pmcr = (cpu.pmuv3 && !pmu_sees_all).then(|| sr::read_pmcr_el0().bits());
        let trfcr = cpu.trace_filter.then(|| {
            let v: u64;
            // SAFETY: reads TRFCR_EL1 (FEAT_TRF), no side effects.
            unsafe {
                core::arch::asm!("mrs {}, s3_0_c1_c2_1", out(reg) v, options(nomem, nostack, preserves_flags));
            }
            v
        });
        // SAFETY: per the function contract: the registers are the host's,
        // saved above; zero disables without resetting anything (PMCR_EL0's
        // reset bits P and C read as zero, so they are written as zero). No
        // ISB: the ERET into the VM is a context synchronization event
        // (SCTLR_EL2.EOS), after which the writes are in effect for it.
        unsafe {
            sr::write_mdscr_el1(sr::MdscrEl1::from_bits_retain(0));
            if let Some(v) = pmcr {
                sr::write_pmcr_el0(sr::PmcrEl0::from_bits_retain(v & !PMCR_E));
            }
            if trfcr.is_some() {
                core::arch::asm!("msr s3_0_c1_c2_1, xzr", options(nostack, preserves_flags));
            }
        }
        Self { mdscr, pmcr, trfcr }
    }

    /// Puts the host's controls back (the ERET into the host synchronizes).
    pub fn restore(self) {
        // SAFETY: writes back the host's own values, saved by `park`.
        unsafe {
            sr::write_mdscr_el1(sr::MdscrEl1::from_bits_retain(self.mdscr));
            if let Some(v) = self.pmcr {
                sr::write_pmcr_el0(sr::PmcrEl0::from_bits_retain(v));
            }
            if let Some(v) = self.trfcr {
                core::arch::asm!("msr s3_0_c1_c2_1, {}", in(reg) v, options(nostack, preserves_flags));
            }
        }
    }
}

/// PMCR_EL0.N: the number of event counters.
pub fn pmu_counters(cpu: &CpuFeatures) -> u64 {
    if cpu.pmuv3 {
        (sr::read_pmcr_el0().bits() >> 11) & 0x1f
    } else {
        0
    }
}

/// The EL1/EL0 system-register state a partition owns: everything that
/// must be switched when the CPU moves between the host and a service, so
/// neither can read or disturb the other's.
///
/// Newer EL1 state (TCR2_EL1, permission indirection, overlays, GCS) is not
/// listed: services never enable it and the host kernels Moat runs today do
/// not either. MDSCR_EL1 and CSSELR_EL1 are not switched because a service
/// cannot reach them: MDCR_EL2.TDA and HCR_EL2.TID2 trap its accesses.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub struct El1Context {
    regs: [u64; EL1_REGS],
}

impl El1Context {
    pub const ZERO: Self = Self {
        regs: [0; EL1_REGS],
    };

    /// The state of a vCPU at reset: everything zero but SCTLR_EL1's RES1 bits.
    pub const fn reset() -> Self {
        let mut c = Self::ZERO;
        c.regs[0] = moat_kernel::el2config::SCTLR_EL1_RESET;
        c
    }
}

macro_rules! el1_context {
    ($(($a:ident, $b:ident)),* $(,)?) => {
        const EL1_REGS: usize = 2 * [$(stringify!($a)),*].len();

        impl El1Context {
            /// Saves this CPU's EL1 state.
            #[inline(always)]
            pub fn save(&mut self) {
                // SAFETY: reading an EL1 register from EL2 has no side
                // effects; the stores stay within `regs` (two words per pair).
                unsafe {
                    core::arch::asm!(
                        $(
                            concat!("mrs {a}, ", stringify!($a)),
                            concat!("mrs {b}, ", stringify!($b)),
                            "stp {a}, {b}, [{p}], #16",
                        )*
                        p = inout(reg) self.regs.as_mut_ptr() => _,
                        a = out(reg) _,
                        b = out(reg) _,
                        options(nostack, preserves_flags),
                    );
                }
            }

            /// Loads this context into the CPU's EL1 registers.
            ///
            /// # Safety
            ///
            /// The CPU must be at EL2 about to run the partition this context
            /// belongs to (the current EL1 state must already be saved).
            #[inline(always)]
            pub unsafe fn load(&self) {
                // SAFETY: per the function contract: EL1 state is the
                // partition's and nothing at EL2 depends on it; the loads
                // stay within `regs`.
                unsafe {
                    core::arch::asm!(
                        $(
                            "ldp {a}, {b}, [{p}], #16",
                            concat!("msr ", stringify!($a), ", {a}"),
                            concat!("msr ", stringify!($b), ", {b}"),
                        )*
                        p = inout(reg) self.regs.as_ptr() => _,
                        a = out(reg) _,
                        b = out(reg) _,
                        options(nostack, preserves_flags, readonly),
                    );
                }
            }
        }
    };
}

// In pairs, each pair stored as one `stp`. SP_EL1 is word `SP_EL1_WORD`.
el1_context!(
    (sctlr_el1, ttbr0_el1),
    (ttbr1_el1, tcr_el1),
    (mair_el1, amair_el1),
    (vbar_el1, contextidr_el1),
    (tpidr_el1, tpidr_el0),
    (tpidrro_el0, sp_el0),
    (sp_el1, elr_el1),
    (spsr_el1, esr_el1),
    (far_el1, afsr0_el1),
    (afsr1_el1, par_el1),
    (cpacr_el1, cntkctl_el1),
    (cntv_ctl_el0, cntv_cval_el0),
);

/// Where SP_EL1 is in an [`El1Context`].
const SP_EL1_WORD: usize = 12;
/// Where CNTV_CTL_EL0 (and after it CNTV_CVAL_EL0) is in an [`El1Context`]:
/// the last pair.
const CNTV_CTL_WORD: usize = 22;
const _: () = assert!(EL1_REGS == CNTV_CTL_WORD + 2);

impl El1Context {
    /// The virtual timer this context holds: CNTV_CTL_EL0, CNTV_CVAL_EL0.
    pub fn virtual_timer(&self) -> (u64, u64) {
        (self.regs[CNTV_CTL_WORD], self.regs[CNTV_CTL_WORD + 1])
    }
}

impl El1Context {
    /// Saves SP_EL1 alone: the one EL1 register a running service changes
    /// (see `service`: the rest of a service's context is fixed once it has
    /// started).
    #[inline(always)]
    pub fn save_sp_el1(&mut self) {
        // SAFETY: reading SP_EL1 from EL2 has no side effects.
        unsafe {
            core::arch::asm!("mrs {}, sp_el1", out(reg) self.regs[SP_EL1_WORD],
                options(nomem, nostack, preserves_flags));
        }
    }
}

/// Switches this CPU's EL2 controls between a partition's values.
///
/// # Safety
///
/// The caller is about to enter (or has just left) the partition the values
/// belong to, and `vttbr` names a live stage-2.
#[inline(always)]
pub unsafe fn switch_el2(hcr: u64, cptr: u64, mdcr: u64, cnthctl: u64, vttbr: u64) {
    // SAFETY: per the function contract. No ISB: nothing the core does at
    // EL2 depends on these controls, and the ERET into the partition is a
    // context synchronization event (SCTLR_EL2.EOS is set), which makes the
    // new stage-2 and trap controls take effect for it.
    unsafe {
        core::arch::asm!(
            "msr vttbr_el2, {vttbr}",
            "msr hcr_el2, {hcr}",
            "msr cptr_el2, {cptr}",
            "msr mdcr_el2, {mdcr}",
            "msr cnthctl_el2, {cnthctl}",
            vttbr = in(reg) vttbr, hcr = in(reg) hcr, cptr = in(reg) cptr,
            mdcr = in(reg) mdcr, cnthctl = in(reg) cnthctl,
            options(nostack, preserves_flags),
        );
    }
}

/// The MTE registers of an MTE-on VM, switched with its vCPU (and the
/// host's around the run): the tag generation controls and the tag-check
/// fault status.
#[derive(Clone, Copy, Debug, Default)]
pub struct MteRegs {
    gcr: u64,
    rgsr: u64,
    tfsr: u64,
    tfsre0: u64,
}

impl MteRegs {
    pub fn save(&mut self) {
        // SAFETY: reads GCR_EL1, RGSR_EL1, TFSR_EL1 and TFSRE0_EL1 (by
        // encoding), which exist when the hardware has tag storage (the
        // only case an MTE-on VM exists).
        unsafe {
            core::arch::asm!(
                "mrs {g}, s3_0_c1_c0_6", "mrs {r}, s3_0_c1_c0_5",
                "mrs {t}, s3_0_c5_c6_0", "mrs {e}, s3_0_c5_c6_1",
                g = out(reg) self.gcr, r = out(reg) self.rgsr,
                t = out(reg) self.tfsr, e = out(reg) self.tfsre0,
                options(nomem, nostack, preserves_flags),
            );
        }
    }

    pub fn load(&self) {
        // SAFETY: as for `save`; the registers belong to the partition
        // about to run.
        unsafe {
            core::arch::asm!(
                "msr s3_0_c1_c0_6, {g}", "msr s3_0_c1_c0_5, {r}",
                "msr s3_0_c5_c6_0, {t}", "msr s3_0_c5_c6_1, {e}",
                g = in(reg) self.gcr, r = in(reg) self.rgsr,
                t = in(reg) self.tfsr, e = in(reg) self.tfsre0,
                options(nomem, nostack, preserves_flags),
            );
        }
    }
}

/// CSSELR_EL1, which a VM run switches (services cannot reach it:
/// HCR_EL2.TID2 traps it).
pub fn read_csselr() -> sr::CsselrEl1 {
    sr::read_csselr_el1()
}

/// Writes CSSELR_EL1 (see [`read_csselr`]).
pub fn write_csselr(value: sr::CsselrEl1) {
    sr::write_csselr_el1(value);
}

/// Sets what EL1 reads in MPIDR_EL1 (VMPIDR_EL2).
pub fn set_vmpidr(value: u64) {
    // SAFETY: VMPIDR_EL2 only changes what EL1 reads as its MPIDR; the
    // ERET into the partition synchronizes it.
    unsafe {
        core::arch::asm!("msr vmpidr_el2, {}", in(reg) value,
            options(nomem, nostack, preserves_flags))
    };
}

/// The generic counter and its frequency.
pub fn counter() -> (u64, u64) {
    let (now, freq): (u64, u64);
    // SAFETY: reads the physical counter and its frequency.
    unsafe {
        core::arch::asm!("isb", "mrs {n}, cntpct_el0", "mrs {f}, cntfrq_el0", n = out(reg) now, f = out(reg) freq,
            options(nomem, nostack, preserves_flags));
    }
    (now, freq)
}

/// The generic counter now.
pub fn now() -> u64 {
    let now: u64;
    // SAFETY: reads the physical counter (the ISB keeps the read in order).
    unsafe {
        core::arch::asm!("isb", "mrs {n}, cntpct_el0", n = out(reg) now,
            options(nomem, nostack, preserves_flags));
    }
    now
}

/// Arms the EL2 physical timer to fire at counter value `deadline`.
pub fn arm_watchdog(deadline: u64) {
    // SAFETY: CNTHP_* is the core's own timer; nothing else uses it. No ISB:
    // the ERET into the service that follows synchronizes the writes
    // (SCTLR_EL2.EOS), and the timer only matters once the service runs.
    unsafe {
        core::arch::asm!("msr cnthp_cval_el2, {d}", "msr cnthp_ctl_el2, {c}", d = in(reg) deadline, c = in(reg) 1u64,
            options(nostack, preserves_flags));
    }
}

/// Disarms the EL2 timer; returns whether it had fired.
pub fn disarm_watchdog() -> bool {
    let ctl: u64;
    // SAFETY: as for `arm_watchdog`. Disabling the timer drops its
    // level-triggered interrupt, so nothing needs acknowledging at the GIC.
    unsafe {
        core::arch::asm!("mrs {c}, cnthp_ctl_el2", "msr cnthp_ctl_el2, xzr", "isb", c = out(reg) ctl,
            options(nostack, preserves_flags));
    }
    ctl & 0b101 == 0b101 // ENABLE and ISTATUS
}

macro_rules! id_group3 {
    ($crm:expr, $op2:expr, $( ($m:literal, $o:literal) ),* $(,)?) => {
        match ($crm, $op2) {
            $(
                ($m, $o) => {
                    let v: u64;
                    // SAFETY: reads an ID register (op0 3, op1 0, CRn 0):
                    // no side effects; unallocated encodings read as zero.
                    unsafe {
                        core::arch::asm!(concat!("mrs {}, s3_0_c0_c", stringify!($m), "_", stringify!($o)), out(reg) v,
                            options(nomem, nostack, preserves_flags));
                    }
                    Some(v)
                }
            )*
            _ => None,
        }
    };
}

/// The value of the ID-group-3 register `(3, 0, 0, crm, op2)` (CRm 1..=7),
/// as the hardware has it: what a trapped MRS would have read.
pub fn read_id_register(crm: u8, op2: u8) -> Option<u64> {
    id_group3!(
        crm,
        op2,
        (1, 0),
        (1, 1),
        (1, 2),
        (1, 3),
        (1, 4),
        (1, 5),
        (1, 6),
        (1, 7),
        (2, 0),
        (2, 1),
        (2, 2),
        (2, 3),
        (2, 4),
        (2, 5),
        (2, 6),
        (2, 7),
        (3, 0),
        (3, 1),
        (3, 2),
        (3, 3),
        (3, 4),
        (3, 5),
        (3, 6),
        (3, 7),
        (4, 0),
        (4, 1),
        (4, 2),
        (4, 3),
        (4, 4),
        (4, 5),
        (4, 6),
        (4, 7),
        (5, 0),
        (5, 1),
        (5, 2),
        (5, 3),
        (5, 4),
        (5, 5),
        (5, 6),
        (5, 7),
        (6, 0),
        (6, 1),
        (6, 2),
        (6, 3),
        (6, 4),
        (6, 5),
        (6, 6),
        (6, 7),
        (7, 0),
        (7, 1),
        (7, 2),
        (7, 3),
        (7, 4),
        (7, 5),
        (7, 6),
        (7, 7),
    )
}

/// This CPU's registers, behind the seam the logic above is written
/// against (`moat_kernel::sysregs::SysRegs`).
pub struct Hw;

impl moat_kernel::sysregs::SysRegs for Hw {
    fn esr_el2(&self) -> u64 {
        esr_el2()
    }

    fn far_el2(&self) -> u64 {
        far_el2()
    }

    fn fault_ipa(&self) -> u64 {
        fault_ipa()
    }

    fn read_id_register(&self, crm: u8, op2: u8) -> Option<u64> {
        read_id_register(crm, op2)
    }

    fn vbar_el1(&self) -> u64 {
        vbar_el1()
    }

    fn sctlr_el1(&self) -> u64 {
        sctlr_el1()
    }

    fn write_el1_exception(&mut self, esr: u64, elr: u64, spsr: u64, far: Option<u64>) {
        write_el1_exception(esr, elr, spsr, far);
    }
}
