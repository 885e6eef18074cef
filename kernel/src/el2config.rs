//! The EL2 control-register values the core runs a host with, each bit
//! explained. Computed from the CPU's ID registers so the same code serves
//! QEMU's `max` CPU (SVE, SME, MTE), a Cortex-A72 (none of them) and an FVP.

/// HCR_EL2 bits the core uses.
pub mod hcr {
    /// Stage-2 translation on for EL1&0.
    pub const VM: u64 = 1 << 0;
    /// Trap SMC from EL1: the host's firmware calls go through the core.
    pub const TSC: u64 = 1 << 19;
    /// Trap ID group 3 (the ID_AA64* registers) — used for partitions whose
    /// feature view the core edits.
    pub const TID3: u64 = 1 << 18;
    /// Trap ID group 2 (CTR_EL0, CCSIDR_EL1, CLIDR_EL1, CSSELR_EL1).
    pub const TID2: u64 = 1 << 17;
    /// Trap EL1 writes to the virtual-memory controls (SCTLR_EL1, TTBRn_EL1,
    /// TCR_EL1, MAIR_EL1, AMAIR_EL1, CONTEXTIDR_EL1, ESR_EL1, FAR_EL1,
    /// AFSRn_EL1) — used for services once they have started.
    pub const TVM: u64 = 1 << 26;
    /// Trap WFI / WFE.
    pub const TWI: u64 = 1 << 13;
    pub const TWE: u64 = 1 << 14;
    /// Route physical IRQ / FIQ / SError to EL2.
    pub const IMO: u64 = 1 << 4;
    pub const FMO: u64 = 1 << 3;
    pub const AMO: u64 = 1 << 5;
    /// EL1 is AArch64.
    pub const RW: u64 = 1 << 31;
    /// Do not trap pointer-authentication key registers / instructions.
    pub const APK: u64 = 1 << 40;
    pub const API: u64 = 1 << 41;
    /// EL1/EL0 may access allocation tags (MTE).
    pub const ATA: u64 = 1 << 56;
    /// Trap GMID_EL1 (ID group 5).
    pub const TID5: u64 = 1 << 58;
    /// Trap data-cache maintenance by set/way.
    pub const TSW: u64 = 1 << 22;
    /// Trap ACTLR_EL1 (not switched between partitions).
    pub const TACR: u64 = 1 << 21;
    /// Trap implementation-defined system registers.
    pub const TIDCP: u64 = 1 << 20;
    /// Trap the LORegion registers.
    pub const TLOR: u64 = 1 << 35;
    /// Trap EL1 accesses to the RAS error record registers (ERR*, ERX*).
    pub const TERR: u64 = 1 << 36;
    /// Force broadcast of EL1 TLB maintenance and branch-predictor
    /// invalidation (a vCPU may have run on another CPU).
    pub const FB: u64 = 1 << 9;
}

/// What the core needs to know about the CPU to configure EL2.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// ID_AA64MMFR0_EL1.PARange, raw.
    pub pa_range: u8,
    /// ID_AA64PFR1_EL1.MTE >= 2 (tag storage present).
    pub mte: bool,
    /// ID_AA64PFR1_EL1.MTE >= 1 (the MTE instructions and PSTATE.TCO exist).
    pub mte_instructions: bool,
    /// ID_AA64MMFR1_EL1.PAN != 0 (PSTATE.PAN exists).
    pub pan: bool,
    /// ID_AA64PFR0_EL1.SVE != 0.
    pub sve: bool,
    /// ID_AA64PFR1_EL1.SME != 0.
    pub sme: bool,
    /// ID_AA64PFR0_EL1.GIC != 0: the GIC system-register interface exists.
    pub gic_sysregs: bool,
    /// ID_AA64MMFR1_EL1.HCX != 0: HCRX_EL2 exists.
    pub hcx: bool,
    /// ID_AA64MMFR0_EL1.FGT != 0: fine-grained trap registers exist.
    pub fgt: bool,
    /// ID_AA64DFR0_EL1.PMUVer is a PMUv3 version.
    pub pmuv3: bool,
    /// ID_AA64DFR0_EL1.TraceVer != 0: a trace unit with system registers.
    pub trace: bool,
    /// ID_AA64DFR0_EL1.TraceFilt != 0: TRFCR_EL1/EL2 exist (FEAT_TRF).
    pub trace_filter: bool,
    /// ID_AA64DFR0_EL1.PMSVer != 0: the statistical profiling extension.
    pub spe: bool,
    /// ID_AA64PFR0_EL1.AMU != 0: activity monitors.
    pub amu: bool,
    /// ID_AA64PFR0_EL1.RAS != 0: error record registers.
    pub ras: bool,
}

impl CpuFeatures {
    /// Decodes the ID registers.
    pub fn from_id_regs(pfr0: u64, pfr1: u64, mmfr0: u64, mmfr1: u64, dfr0: u64) -> Self {
        let field = |reg: u64, shift: u32| ((reg >> shift) & 0xf) as u8;
        let pmuver = field(dfr0, 8);
        Self {
            pa_range: field(mmfr0, 0),
            mte: field(pfr1, 8) >= 2,
            mte_instructions: field(pfr1, 8) >= 1,
            pan: field(mmfr1, 20) != 0,
            sve: field(pfr0, 32) != 0,
            sme: field(pfr1, 24) != 0,
            gic_sysregs: field(pfr0, 24) != 0,
            hcx: field(mmfr1, 40) != 0,
            fgt: field(mmfr0, 56) != 0,
            pmuv3: pmuver != 0 && pmuver != 0xf,
            trace: field(dfr0, 4) != 0,
            trace_filter: field(dfr0, 40) != 0,
            spe: field(dfr0, 32) != 0,
            amu: field(pfr0, 44) != 0,
            ras: field(pfr0, 28) != 0,
        }
    }

    /// Physical address bits implemented.
    pub fn pa_bits(&self) -> u32 {
        match self.pa_range {
            0 => 32,
            1 => 36,
            2 => 40,
            3 => 42,
            4 => 44,
            5 => 48,
            _ => 52,
        }
    }
}

/// HCR_EL2 for the host.
///
/// Set: VM (the host runs under its stage-2), RW (AArch64 EL1), API/APK (the
/// host's pointer authentication is its own business), TSC (SMCs reach the
/// core, so the host cannot talk to firmware behind its back — PSCI CPU_ON
/// in particular must go through the relay), ATA when MTE is implemented and
/// `host_mte` allows it.
/// Clear: IMO/FMO/AMO (the host takes its own interrupts; the core is never in
/// the interrupt path), TWI/TWE, TID3, TGE/E2H (the core is a plain nVHE EL2).
/// With MTE implemented but the host's policy off, ATA stays clear (the MTE
/// registers trap), TID5 traps GMID_EL1 and TID3 traps the ID registers so
/// the policy can report hardware without MTE.
pub fn host_hcr(cpu: &CpuFeatures, host_mte: bool) -> u64 {
    let mut v = hcr::VM | hcr::RW | hcr::API | hcr::APK | hcr::TSC;
    if cpu.mte {
        if host_mte {
            v |= hcr::ATA;
        } else {
            // GMID_EL1 (TID5) and the ID registers (TID3) trap, so the
            // policy can hide MTE; ATA clear makes the MTE registers trap.
            v |= hcr::TID5 | hcr::TID3;
        }
    }
    v
}

/// CPTR_EL2 (nVHE layout) that traps nothing the host may use: FP/SIMD
/// (TFP, bit 10), SVE (TZ, bit 8) and SME (TSM, bit 12) are all left to EL1.
/// Bits 13, 9 and 7:0 are RES1; TZ and TSM are RES1 too when the feature is
/// absent.
pub fn host_cptr(cpu: &CpuFeatures) -> u64 {
    let mut v: u64 = (1 << 13) | (1 << 9) | 0xff;
    if !cpu.sve {
        v |= 1 << 8;
    }
    if !cpu.sme {
        v |= 1 << 12;
    }
    v
}

/// The CPU interface's priority mask while a service runs: the watchdog
/// (priority 0) gets through; ordinary host interrupts (Linux gives every
/// interrupt priority 0xa0) stay pending until the run ends, so they delay a
/// call by at most its budget instead of interrupting it. Only host
/// interrupts above this priority (pseudo-NMIs) suspend a call.
pub const SERVICE_RUN_PMR: u64 = 0x80;

/// What a run lets through the CPU interface besides the watchdog.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMask {
    /// A service call a host interrupt may suspend: [`SERVICE_RUN_PMR`].
    Service,
    /// A service call that must run to its reply (a memory transaction, a
    /// boot-time call): only priority 0, the watchdog's.
    Transaction,
    /// A protected VM: whatever the host's own mask lets through (its
    /// interrupts end the run), and the backstop.
    Vm,
}

/// The priority mask for a run: `host_pmr` is the host's own, `implemented`
/// the bits the CPU interface implements (what 0xff reads back as). The
/// lowest non-zero mask lets exactly priority 0 through.
pub const fn run_pmr(mask: RunMask, host_pmr: u64, implemented: u64) -> u64 {
    let only_priority_0 = implemented & implemented.wrapping_neg();
    match mask {
        RunMask::Service => SERVICE_RUN_PMR,
        RunMask::Transaction => only_priority_0,
        RunMask::Vm if host_pmr > only_priority_0 => host_pmr,
        RunMask::Vm => only_priority_0,
    }
}

/// How many slices a second of counter time holds: a VM runs for at most
/// one (10 ms) before its vCPU returns to the host, whatever the guest does
/// and whatever timer the host uses.
pub const VM_SLICES_PER_SECOND: u64 = 100;

/// The counter value at which a VM run must end at the latest (the EL2
/// timer is armed for it while the VM runs). The guest's virtual timer
/// replaces the host's in the CPU during the run, so the host's own
/// deadline is kept here: if the host's CNTV_CTL_EL0 has ENABLE set and
/// IMASK clear, the run ends at its CNTV_CVAL_EL0 (the host's CNTVOFF_EL2
/// is 0, so that is a physical counter value), and then the host, with its
/// timer back, takes the interrupt. The host's physical timer is never
/// switched out (a VM cannot reach it) and ends a run by itself.
pub const fn vm_run_deadline(now: u64, freq: u64, host_cntv_ctl: u64, host_cntv_cval: u64) -> u64 {
    let slice_end = now.saturating_add(freq / VM_SLICES_PER_SECOND);
    if host_cntv_ctl & 0b11 == 0b01 && host_cntv_cval < slice_end {
        host_cntv_cval
    } else {
        slice_end
    }
}

/// HCR_EL2 bits every nested partition (a service or a protected VM) runs
/// with: stage-2 on, AArch64 EL1, physical interrupts to EL2 (they are the
/// host's, or the core's watchdog), SMC and WFI/WFE trapped. Pointer
/// authentication is trapped (API, APK clear): the keys in the registers
/// are the host's.
pub const NESTED_HCR: u64 =
    hcr::VM | hcr::RW | hcr::IMO | hcr::FMO | hcr::AMO | hcr::TSC | hcr::TWI | hcr::TWE;

/// HCR_EL2 for a service: cache-geometry registers trapped (CSSELR_EL1 is
/// the host's, unswitched) and, once it has started, its translation
/// controls fixed (TVM: the core loads them and never saves them back).
pub const fn service_hcr(started: bool) -> u64 {
    let tvm = if started { hcr::TVM } else { 0 };
    NESTED_HCR | hcr::TID2 | tvm
}

/// HCR_EL2 for a protected VM: set/way maintenance, ACTLR_EL1,
/// implementation-defined and LORegion registers trapped; ID registers
/// trapped and answered by the core; EL1 TLB maintenance broadcast (its
/// vCPU may have run on another CPU); tag access only with MTE on, and
/// GMID_EL1 trapped with it off; the RAS error records (which describe
/// errors in anyone's memory, and which an EL1 write could clear) trapped.
///
/// TEA stays clear: a synchronous external abort on the VM's own access
/// goes to the VM, which is what the hardware would do without the core;
/// SErrors, which may belong to anyone, reach the core (AMO).
pub fn vm_hcr(cpu: &CpuFeatures, mte: bool) -> u64 {
    let mut v = NESTED_HCR | hcr::TSW | hcr::TACR | hcr::TIDCP | hcr::TLOR | hcr::TID3 | hcr::FB;
    if cpu.mte {
        v |= if mte { hcr::ATA } else { hcr::TID5 };
    }
    if cpu.ras {
        v |= hcr::TERR;
    }
    v
}

/// CPTR_EL2 (nVHE) for a service: FP/SIMD (TFP), SVE (TZ) and SME (TSM)
/// trapped; services are built without them and the host's vector
/// registers stay untouched in the CPU. Bits 13, 9 and 7:0 are RES1.
pub const SERVICE_CPTR: u64 = (1 << 13) | (1 << 12) | (1 << 10) | (1 << 9) | (1 << 8) | 0xff;
/// CPTR_EL2 for a protected VM: FP/SIMD allowed (the core switches the
/// V registers), SVE and SME trapped; where they exist, the trace unit's
/// system registers (TTA: the trace unit is the host's, and would trace
/// it) and the activity monitors (TAM: their counters run across every
/// partition, a clock of the host's work) trapped. TTA and TAM are RES0
/// without the feature, so they are set only with it.
pub fn vm_cptr(cpu: &CpuFeatures) -> u64 {
    let mut v: u64 = (1 << 13) | (1 << 12) | (1 << 9) | (1 << 8) | 0xff;
    if cpu.trace {
        v |= 1 << 20;
    }
    if cpu.amu {
        v |= 1 << 30;
    }
    v
}

/// MDCR_EL2 for a nested partition: the host's (HPMN, HPMD: the core's
/// work stays invisible to the host's counters outside benchmark images)
/// plus the PMU (TPM, TPMCR) and debug (TDA, TDOSA, TDRA) trapped.
pub const fn nested_mdcr(host_mdcr: u64) -> u64 {
    host_mdcr | (1 << 5) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11)
}

/// MDCR_EL2 for a protected VM: a nested partition's, plus the trace
/// filter (TTRF) and the profiling controls (TPMS) trapped where they exist
/// (RES0 otherwise). The host's own debug, PMU and trace controls are parked
/// while the VM runs (`ParkedHostMonitors` in the core's sysreg layer).
pub fn vm_mdcr(cpu: &CpuFeatures, host_mdcr: u64) -> u64 {
    let mut v = nested_mdcr(host_mdcr);
    if cpu.trace_filter {
        v |= 1 << 19;
    }
    if cpu.spe {
        v |= 1 << 14;
    }
    v
}

/// CNTHCTL_EL2 for a nested partition: the counter is readable; the
/// physical timer is not (it is the host's).
pub const NESTED_CNTHCTL: u64 = 0b01;

/// CNTHCTL_EL2 (E2H = 0): EL1 may read the physical counter and use the
/// physical timer (EL1PCTEN, EL1PCEN).
pub const HOST_CNTHCTL: u64 = 0b11;

/// ICC_SRE_EL2: SRE (EL2 uses system registers), DFB, DIB, and Enable (EL1
/// may use ICC_SRE_EL1 to turn on its own system-register interface).
pub const HOST_ICC_SRE_EL2: u64 = 0b1111;

/// MDCR_EL2.HPMD: event counting prohibited at EL2 (FEAT_PMUv3p1).
pub const MDCR_HPMD: u64 = 1 << 17;

/// MDCR_EL2 for the host: HPMN = all counters belong to EL1, nothing
/// trapped. Counting at EL2 is prohibited unless `count_el2` (benchmark
/// images only: otherwise the host could time the core's work).
pub fn host_mdcr(pmcr_n: u64, count_el2: bool) -> u64 {
    let hpmd = if count_el2 { 0 } else { MDCR_HPMD };
    (pmcr_n & 0x1f) | hpmd
}

/// SCTLR_EL1 for a vCPU entering at reset: MMU and caches off, RES1 bits set.
pub const SCTLR_EL1_RESET: u64 = 0x30d0_0800;

/// VTCR_EL2 for a stage-2 covering `ipa_bits` of IPA with a 4 KiB granule,
/// together with the level its walk starts at.
///
/// The walk starts at level 0 for 40–48 bits and at level 1 below that, so no
/// concatenated root tables are needed. Table walks are inner-shareable,
/// write-back cacheable; VMIDs are 8 bits.
pub fn vtcr(ipa_bits: u32, pa_range: u8) -> (u64, usize) {
    let ipa_bits = ipa_bits.clamp(32, 48);
    let t0sz = u64::from(64 - ipa_bits);
    let (sl0, start_level) = if ipa_bits >= 40 { (0b10, 0) } else { (0b01, 1) };
    let ps = u64::from(pa_range.min(5));
    let v = (1 << 31) // RES1
        | (ps << 16) // TG0 (bits 15:14) = 0: 4 KiB granule
        | (0b11 << 12) // SH0: inner shareable
        | (0b01 << 10) // ORGN0: write-back
        | (0b01 << 8) // IRGN0: write-back
        | (sl0 << 6)
        | t0sz;
    (v, start_level)
}

/// The IPA size the core gives partitions: enough for `platform_top` (one
/// past the highest RAM or device address the host may be given), at least
/// 32 bits, at most what the CPU implements and 48 (no LPA2).
///
/// No larger than the platform needs because every stage-2 walk (the CPU's,
/// or an emulator's for each TLB fill) is one level shorter up to 39 bits,
/// where the walk starts at level 1 ([`vtcr`]).
pub fn ipa_bits(cpu: &CpuFeatures, platform_top: u64) -> u32 {
    let needed = u64::BITS - platform_top.saturating_sub(1).leading_zeros();
    needed.max(32).min(cpu.pa_bits().min(48))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_runs_end_by_the_hosts_timer_or_a_slice() {
        let (now, freq) = (1_000_000, 62_500_000);
        let slice = now + freq / VM_SLICES_PER_SECOND;
        // No host timer armed, or armed but masked, or disabled: one slice.
        assert_eq!(vm_run_deadline(now, freq, 0, now + 10), slice);
        assert_eq!(vm_run_deadline(now, freq, 0b11, now + 10), slice);
        assert_eq!(vm_run_deadline(now, freq, 0b10, now + 10), slice);
        // Armed and unmasked: its deadline, if sooner (a past one included).
        assert_eq!(vm_run_deadline(now, freq, 0b01, now + 10), now + 10);
        assert_eq!(vm_run_deadline(now, freq, 0b101, now - 5), now - 5);
        assert_eq!(vm_run_deadline(now, freq, 0b01, slice + 1), slice);
        // The counter's end does not wrap.
        assert_eq!(vm_run_deadline(u64::MAX - 1, freq, 0, 0), u64::MAX);
    }

    #[test]
    fn run_masks_let_the_watchdog_through() {
        // 5 priority bits (0xf8 implemented): the lowest mask is 0x08.
        assert_eq!(run_pmr(RunMask::Transaction, 0xf0, 0xf8), 0x08);
        // 4 bits: 0x10; 8 bits: 0x01.
        assert_eq!(run_pmr(RunMask::Transaction, 0xf0, 0xf0), 0x10);
        assert_eq!(run_pmr(RunMask::Transaction, 0xf0, 0xff), 0x01);
        assert_eq!(run_pmr(RunMask::Service, 0, 0xf8), SERVICE_RUN_PMR);
        // A VM run keeps the host's mask, or opens it just for priority 0.
        assert_eq!(run_pmr(RunMask::Vm, 0xf0, 0xf8), 0xf0);
        assert_eq!(run_pmr(RunMask::Vm, 0, 0xf8), 0x08);
        // Every mask lets priority 0 (the watchdog) through: priority < mask.
        for implemented in [0xf0, 0xf8, 0xfc, 0xfe, 0xff] {
            for host in [0u64, 0x08, 0x80, 0xf0, 0xff] {
                for m in [RunMask::Service, RunMask::Transaction, RunMask::Vm] {
                    assert!(run_pmr(m, host, implemented) > 0);
                }
            }
        }
    }

    #[test]
    fn vtcr_for_common_pa_ranges() {
        // 48-bit (QEMU max): T0SZ 16, SL0 level 0, PS 5.
        assert_eq!(vtcr(48, 5), (0x8005_3590, 0));
        // 44-bit (Cortex-A72): T0SZ 20, level 0, PS 4.
        assert_eq!(vtcr(44, 4), (0x8004_3594, 0));
        // 36-bit: T0SZ 28, level 1.
        assert_eq!(vtcr(36, 1), (0x8001_355c, 1));
    }

    #[test]
    fn nested_partitions_trap_what_they_must() {
        for h in [service_hcr(false), service_hcr(true)] {
            assert_eq!(h & NESTED_HCR, NESTED_HCR);
            assert_eq!(h & (hcr::API | hcr::APK | hcr::ATA), 0);
        }
        assert_eq!(service_hcr(true) & hcr::TVM, hcr::TVM);
        assert_eq!(service_hcr(false) & hcr::TVM, 0);
        let mut cpu = CpuFeatures::default();
        assert_eq!(vm_hcr(&cpu, true) & (hcr::ATA | hcr::TID5), 0);
        cpu.mte = true;
        assert_eq!(vm_hcr(&cpu, true) & (hcr::ATA | hcr::TID5), hcr::ATA);
        assert_eq!(vm_hcr(&cpu, false) & (hcr::ATA | hcr::TID5), hcr::TID5);
        assert_eq!(vm_hcr(&cpu, false) & hcr::TID3, hcr::TID3);
        // FP/SIMD: trapped for services, the VM's own.
        assert_eq!(SERVICE_CPTR & (1 << 10), 1 << 10);
        assert_eq!(vm_cptr(&cpu) & (1 << 10), 0);
        assert_eq!(nested_mdcr(0x11) & 0x1f, 0x11);
        // PMU (TPM, TPMCR) and debug (TDA, TDOSA, TDRA) trapped for every
        // nested partition.
        assert_eq!(nested_mdcr(0) & 0xe60, 0xe60);
    }

    #[test]
    fn vm_traps_follow_the_features_present() {
        let mut cpu = CpuFeatures::default();
        // Without trace, AMU, TRF, SPE or RAS: their RES0 trap bits clear.
        assert_eq!(vm_cptr(&cpu) & (1 << 20 | 1 << 30), 0);
        assert_eq!(vm_mdcr(&cpu, 0) & (1 << 19 | 1 << 14), 0);
        assert_eq!(vm_hcr(&cpu, false) & hcr::TERR, 0);
        cpu.trace = true;
        cpu.amu = true;
        cpu.trace_filter = true;
        cpu.spe = true;
        cpu.ras = true;
        assert_eq!(vm_cptr(&cpu) & (1 << 20 | 1 << 30), 1 << 20 | 1 << 30);
        assert_eq!(
            vm_mdcr(&cpu, 3) & (1 << 19 | 1 << 14 | 0x1f),
            1 << 19 | 1 << 14 | 3
        );
        assert_eq!(vm_hcr(&cpu, false) & hcr::TERR, hcr::TERR);
        // SVE and SME stay trapped for a VM.
        assert_eq!(vm_cptr(&cpu) & (1 << 8 | 1 << 12), 1 << 8 | 1 << 12);
    }

    #[test]
    fn hcr_follows_mte_policy() {
        let mut cpu = CpuFeatures::default();
        let base = hcr::VM | hcr::RW | hcr::API | hcr::APK | hcr::TSC;
        assert_eq!(host_hcr(&cpu, true), base);
        cpu.mte = true;
        assert_eq!(host_hcr(&cpu, true), base | hcr::ATA);
        assert_eq!(host_hcr(&cpu, false), base | hcr::TID5 | hcr::TID3);
    }

    #[test]
    fn cptr_res1_bits_follow_features() {
        let mut cpu = CpuFeatures::default();
        assert_eq!(host_cptr(&cpu), 0x33ff);
        cpu.sve = true;
        cpu.sme = true;
        assert_eq!(host_cptr(&cpu), 0x22ff);
    }

    #[test]
    fn el2_is_invisible_to_the_pmu_unless_benchmarking() {
        assert_eq!(host_mdcr(6, false), 6 | MDCR_HPMD);
        assert_eq!(host_mdcr(6, true), 6);
    }

    #[test]
    fn id_register_decode() {
        // MTE = 2 in PFR1[11:8], SVE in PFR0[35:32], PARange 5.
        let f = CpuFeatures::from_id_regs(1 << 32 | 1 << 24, 2 << 8, 5, 0, 1 << 8);
        assert!(f.mte && f.sve && f.gic_sysregs && f.pmuv3 && !f.sme);
        assert!(!(f.trace || f.trace_filter || f.spe || f.amu || f.ras));
        // RAS in PFR0[31:28], AMU in PFR0[47:44]; TraceVer DFR0[7:4],
        // PMSVer DFR0[35:32], TraceFilt DFR0[43:40].
        let f = CpuFeatures::from_id_regs(1 << 28 | 1 << 44, 0, 5, 0, 1 << 4 | 1 << 32 | 1 << 40);
        assert!(f.trace && f.trace_filter && f.spe && f.amu && f.ras);
        assert_eq!(f.pa_bits(), 48);
        let f = CpuFeatures::from_id_regs(0, 1 << 8, 2, 0, 0xf << 8);
        assert!(!f.mte, "MTE = 1 has no tag storage");
        assert!(!f.pmuv3, "PMUVer 0xf is IMPLEMENTATION DEFINED, not PMUv3");
        assert_eq!(ipa_bits(&f, 1 << 40), 40);
    }

    #[test]
    fn ipa_space_fits_the_platform() {
        let cpu = CpuFeatures::from_id_regs(0, 0, 5, 0, 0); // 48-bit PA
        // QEMU virt: devices up to the high ECAM just above 256 GiB.
        assert_eq!(ipa_bits(&cpu, 0x40_2000_0000), 39);
        assert_eq!(vtcr(39, 5).1, 1, "39 bits start at level 1");
        // Exactly a power of two needs no more bits; one byte past does.
        assert_eq!(ipa_bits(&cpu, 1 << 39), 39);
        assert_eq!(ipa_bits(&cpu, (1 << 39) + 1), 40);
        // Never below 32 bits, never above the CPU's PA size or 48.
        assert_eq!(ipa_bits(&cpu, 0x4000_0000), 32);
        assert_eq!(ipa_bits(&cpu, u64::MAX), 48);
        let small = CpuFeatures::from_id_regs(0, 0, 1, 0, 0); // 36-bit PA
        assert_eq!(ipa_bits(&small, 1 << 40), 36);
    }
}
