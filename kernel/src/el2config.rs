//! The EL2 control-register values the core runs a host with, each bit
//! explained. Computed from the CPU's ID registers so the same code serves
//! QEMU's `max` CPU (SVE, SME, MTE, MOPS), a Cortex-A72 (none of them) and
//! an FVP.
//!
//! [`host_controls`] is the one place the host's feature controls come
//! from: a table of features ([`FEATURES`]: ID field, the control that
//! gives it, whether VMs get it) applied to what the hardware has and what
//! the host is told, so every feature the host's ID registers show works
//! and every one they hide is disabled. [`vm_view`] and [`vm_controls`]
//! apply the same table to protected VMs.

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
    /// EL1/EL0 may use SCXTNUM_EL1/SCXTNUM_EL0 (FEAT_CSV2_2).
    pub const EN_SCXT: u64 = 1 << 53;
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
    /// ID_AA64MMFR0_EL1.FGT >= 2: the second set of fine-grained trap
    /// registers exists.
    pub fgt2: bool,
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
            fgt2: field(mmfr0, 56) >= 2,
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

/// The ID registers EL2's controls are derived from, as raw values: the
/// hardware's, or a partition's view of them (the hardware's with features
/// taken out).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdRegs {
    pub pfr0: u64,
    pub pfr1: u64,
    pub pfr2: u64,
    pub zfr0: u64,
    pub smfr0: u64,
    pub dfr0: u64,
    pub isar0: u64,
    pub isar1: u64,
    pub isar2: u64,
    pub mmfr0: u64,
    pub mmfr1: u64,
    pub mmfr2: u64,
    pub mmfr3: u64,
}

/// One ID register of [`IdRegs`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdReg {
    Pfr0,
    Pfr1,
    Pfr2,
    Zfr0,
    Smfr0,
    Dfr0,
    Isar0,
    Isar1,
    Isar2,
    Mmfr0,
    Mmfr1,
    Mmfr2,
    Mmfr3,
}

impl IdReg {
    /// Every register, in [`IdRegs`] order.
    pub const ALL: [IdReg; 13] = [
        IdReg::Pfr0,
        IdReg::Pfr1,
        IdReg::Pfr2,
        IdReg::Zfr0,
        IdReg::Smfr0,
        IdReg::Dfr0,
        IdReg::Isar0,
        IdReg::Isar1,
        IdReg::Isar2,
        IdReg::Mmfr0,
        IdReg::Mmfr1,
        IdReg::Mmfr2,
        IdReg::Mmfr3,
    ];

    /// `(CRm, op2)` of its encoding (op0 3, op1 0, CRn 0).
    pub const fn encoding(self) -> (u8, u8) {
        match self {
            IdReg::Pfr0 => (4, 0),
            IdReg::Pfr1 => (4, 1),
            IdReg::Pfr2 => (4, 2),
            IdReg::Zfr0 => (4, 4),
            IdReg::Smfr0 => (4, 5),
            IdReg::Dfr0 => (5, 0),
            IdReg::Isar0 => (6, 0),
            IdReg::Isar1 => (6, 1),
            IdReg::Isar2 => (6, 2),
            IdReg::Mmfr0 => (7, 0),
            IdReg::Mmfr1 => (7, 1),
            IdReg::Mmfr2 => (7, 2),
            IdReg::Mmfr3 => (7, 3),
        }
    }

    /// The register with this `(CRm, op2)`, if [`IdRegs`] holds it.
    pub fn from_encoding(crm: u8, op2: u8) -> Option<IdReg> {
        IdReg::ALL.into_iter().find(|r| r.encoding() == (crm, op2))
    }
}

impl IdRegs {
    /// Reads every register with `read(crm, op2)`.
    pub fn read(mut read: impl FnMut(u8, u8) -> u64) -> Self {
        let mut regs = IdRegs::default();
        for reg in IdReg::ALL {
            let (crm, op2) = reg.encoding();
            *regs.get_mut(reg) = read(crm, op2);
        }
        regs
    }

    pub const fn get(&self, reg: IdReg) -> u64 {
        match reg {
            IdReg::Pfr0 => self.pfr0,
            IdReg::Pfr1 => self.pfr1,
            IdReg::Pfr2 => self.pfr2,
            IdReg::Zfr0 => self.zfr0,
            IdReg::Smfr0 => self.smfr0,
            IdReg::Dfr0 => self.dfr0,
            IdReg::Isar0 => self.isar0,
            IdReg::Isar1 => self.isar1,
            IdReg::Isar2 => self.isar2,
            IdReg::Mmfr0 => self.mmfr0,
            IdReg::Mmfr1 => self.mmfr1,
            IdReg::Mmfr2 => self.mmfr2,
            IdReg::Mmfr3 => self.mmfr3,
        }
    }

    pub fn get_mut(&mut self, reg: IdReg) -> &mut u64 {
        match reg {
            IdReg::Pfr0 => &mut self.pfr0,
            IdReg::Pfr1 => &mut self.pfr1,
            IdReg::Pfr2 => &mut self.pfr2,
            IdReg::Zfr0 => &mut self.zfr0,
            IdReg::Smfr0 => &mut self.smfr0,
            IdReg::Dfr0 => &mut self.dfr0,
            IdReg::Isar0 => &mut self.isar0,
            IdReg::Isar1 => &mut self.isar1,
            IdReg::Isar2 => &mut self.isar2,
            IdReg::Mmfr0 => &mut self.mmfr0,
            IdReg::Mmfr1 => &mut self.mmfr1,
            IdReg::Mmfr2 => &mut self.mmfr2,
            IdReg::Mmfr3 => &mut self.mmfr3,
        }
    }

    /// The 4-bit field at `shift` of `reg`.
    pub const fn field(&self, reg: IdReg, shift: u32) -> u64 {
        (self.get(reg) >> shift) & 0xf
    }

    /// Whether `feature` is present: any of its fields reaches its level.
    pub fn has(&self, feature: &Feature) -> bool {
        feature.id.iter().any(|f| f.present_in(self))
    }

    /// These registers without `feature`: each of its fields lowered to
    /// the level below the one that means present (0 for most; for a
    /// signed field, 0xf: "not implemented"), so a lower level of the same
    /// field — LS64 when LS64_V is hidden — stays.
    pub fn without(mut self, feature: &Feature) -> Self {
        for f in feature.id {
            if !f.present_in(&self) {
                continue;
            }
            let below = if f.signed { 0xf } else { f.min - 1 };
            let value = self.get_mut(f.reg);
            *value = (*value & !(0xf << f.shift)) | (below << f.shift);
        }
        self
    }

    /// The CPU facts the core needs besides the controls.
    pub fn cpu_features(&self) -> CpuFeatures {
        CpuFeatures::from_id_regs(self.pfr0, self.pfr1, self.mmfr0, self.mmfr1, self.dfr0)
    }
}

/// A 4-bit ID-register field and the level from which it means "present".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdField {
    pub reg: IdReg,
    pub shift: u32,
    /// Lowest value that means present.
    pub min: u64,
    /// A signed field (FP, AdvSIMD): 0xf means not implemented.
    pub signed: bool,
}

impl IdField {
    const fn at(reg: IdReg, shift: u32, min: u64) -> Self {
        Self {
            reg,
            shift,
            min,
            signed: false,
        }
    }

    fn present_in(&self, regs: &IdRegs) -> bool {
        let v = regs.field(self.reg, self.shift);
        if self.signed {
            v < 8 && v >= self.min
        } else {
            v >= self.min
        }
    }
}

/// An EL2 control a feature needs, in the form "what giving the feature to
/// EL1/EL0 takes".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// HCR_EL2 bits set.
    Hcr(u64),
    /// HCRX_EL2 bits set (FEAT_HCX; the bits are RES0 without the feature).
    Hcrx(u64),
    /// A CPTR_EL2 trap bit cleared. `res1_when_absent`: the bit is RES1 on
    /// a CPU without the feature (TZ, TSM), rather than RES0 (TAM).
    CptrTrap { bit: u64, res1_when_absent: bool },
    /// HFGRTR_EL2 and HFGWTR_EL2 negative-polarity bits set (a clear `n`
    /// bit traps the register: the reset value traps what it names).
    FgtRw(u64),
    /// HFGITR_EL2 negative-polarity bits set.
    FgtInsn(u64),
    /// HDFGRTR_EL2 / HDFGWTR_EL2 negative-polarity bits set.
    FgtDebug { read: u64, write: u64 },
    /// MDCR_EL2 bits set (buffer ownership given to EL1).
    Mdcr(u64),
}

/// An architectural feature: where the ID registers say whether it is
/// there, and what EL2 must do for EL1/EL0 to use it.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    pub name: &'static str,
    /// Present if any of these fields reaches its level.
    pub id: &'static [IdField],
    pub controls: &'static [Control],
    /// Whether protected VMs are given it (otherwise their ID registers
    /// hide it and its controls stay at their trapping values).
    pub vm: bool,
}

/// HCRX_EL2 bits.
pub mod hcrx {
    pub const EN_AS0: u64 = 1 << 0;
    pub const EN_ALS: u64 = 1 << 1;
    pub const EN_ASR: u64 = 1 << 2;
    pub const MSC_EN: u64 = 1 << 11;
    pub const TCR2_EN: u64 = 1 << 14;
    pub const SCTLR2_EN: u64 = 1 << 15;
    pub const PTTWI: u64 = 1 << 16;
    pub const D128_EN: u64 = 1 << 17;
    pub const EN_IDCP128: u64 = 1 << 21;
    pub const GCS_EN: u64 = 1 << 22;
    pub const EN_FPM: u64 = 1 << 23;
}

/// CPTR_EL2 (nVHE layout) bits.
pub mod cptr {
    /// RES1: bits 13, 9 and 7:0.
    pub const RES1: u64 = (1 << 13) | (1 << 9) | 0xff;
    pub const TZ: u64 = 1 << 8;
    pub const TFP: u64 = 1 << 10;
    pub const TSM: u64 = 1 << 12;
    pub const TAM: u64 = 1 << 30;
}

use IdReg::*;

/// Every feature whose use at EL1/EL0 an EL2 control gates. Adding one is
/// adding a row: its ID fields, its controls, whether VMs get it.
pub const FEATURES: &[Feature] = &[
    Feature {
        name: "FP/AdvSIMD",
        id: &[IdField {
            reg: Pfr0,
            shift: 16,
            min: 0,
            signed: true,
        }],
        controls: &[Control::CptrTrap {
            bit: cptr::TFP,
            res1_when_absent: false,
        }],
        vm: true,
    },
    Feature {
        name: "SVE",
        id: &[IdField::at(Pfr0, 32, 1)],
        controls: &[Control::CptrTrap {
            bit: cptr::TZ,
            res1_when_absent: true,
        }],
        vm: false,
    },
    Feature {
        name: "SME",
        id: &[IdField::at(Pfr1, 24, 1)],
        controls: &[
            Control::CptrTrap {
                bit: cptr::TSM,
                res1_when_absent: true,
            },
            // nTPIDR2_EL0, nSMPRI_EL1.
            Control::FgtRw((1 << 55) | (1 << 54)),
        ],
        vm: false,
    },
    Feature {
        name: "AMU",
        id: &[IdField::at(Pfr0, 44, 1)],
        controls: &[Control::CptrTrap {
            bit: cptr::TAM,
            res1_when_absent: false,
        }],
        vm: false,
    },
    Feature {
        name: "MPAM",
        id: &[IdField::at(Pfr0, 40, 1)],
        controls: &[],
        vm: false,
    },
    Feature {
        name: "MTE",
        id: &[IdField::at(Pfr1, 8, 2)],
        controls: &[Control::Hcr(hcr::ATA)],
        vm: true,
    },
    Feature {
        name: "PAuth",
        id: &[
            IdField::at(Isar1, 4, 1),
            IdField::at(Isar1, 8, 1),
            IdField::at(Isar1, 24, 1),
            IdField::at(Isar1, 28, 1),
            IdField::at(Isar2, 8, 1),
            IdField::at(Isar2, 12, 1),
        ],
        controls: &[Control::Hcr(hcr::API | hcr::APK)],
        vm: false,
    },
    Feature {
        name: "CSV2_2 (SCXTNUM)",
        id: &[IdField::at(Pfr0, 56, 2)],
        controls: &[Control::Hcr(hcr::EN_SCXT)],
        vm: false,
    },
    Feature {
        name: "MOPS",
        id: &[IdField::at(Isar2, 16, 1)],
        controls: &[Control::Hcrx(hcrx::MSC_EN)],
        vm: true,
    },
    Feature {
        name: "TCR2",
        id: &[IdField::at(Mmfr3, 0, 1)],
        controls: &[Control::Hcrx(hcrx::TCR2_EN)],
        vm: false,
    },
    Feature {
        name: "SCTLR2",
        id: &[IdField::at(Mmfr3, 4, 1)],
        controls: &[Control::Hcrx(hcrx::SCTLR2_EN)],
        vm: false,
    },
    Feature {
        name: "S1PIE",
        id: &[IdField::at(Mmfr3, 8, 1)],
        // nPIR_EL1, nPIRE0_EL1.
        controls: &[Control::FgtRw((1 << 58) | (1 << 57))],
        vm: false,
    },
    Feature {
        name: "S1POE",
        id: &[IdField::at(Mmfr3, 16, 1)],
        // nPOR_EL1, nPOR_EL0.
        controls: &[Control::FgtRw((1 << 60) | (1 << 59))],
        vm: false,
    },
    Feature {
        name: "AIE",
        id: &[IdField::at(Mmfr3, 24, 1)],
        // nAMAIR2_EL1, nMAIR2_EL1.
        controls: &[Control::FgtRw((1 << 63) | (1 << 62))],
        vm: false,
    },
    Feature {
        name: "D128",
        id: &[IdField::at(Mmfr3, 32, 1)],
        controls: &[Control::Hcrx(hcrx::D128_EN)],
        vm: false,
    },
    Feature {
        name: "THE",
        id: &[IdField::at(Pfr1, 48, 1)],
        // PTTWI, and nRCWMASK_EL1.
        controls: &[Control::Hcrx(hcrx::PTTWI), Control::FgtRw(1 << 56)],
        vm: false,
    },
    Feature {
        name: "GCS",
        id: &[IdField::at(Pfr1, 44, 1)],
        controls: &[
            Control::Hcrx(hcrx::GCS_EN),
            // nGCS_EL1, nGCS_EL0.
            Control::FgtRw((1 << 53) | (1 << 52)),
            // nGCSEPP, nGCSSTR_EL1, nGCSPUSHM_EL1.
            Control::FgtInsn((1 << 59) | (1 << 58) | (1 << 57)),
        ],
        vm: false,
    },
    Feature {
        name: "FPMR",
        id: &[IdField::at(Pfr2, 32, 1)],
        controls: &[Control::Hcrx(hcrx::EN_FPM)],
        vm: false,
    },
    Feature {
        name: "LS64",
        id: &[IdField::at(Isar1, 60, 1)],
        controls: &[Control::Hcrx(hcrx::EN_ALS)],
        vm: false,
    },
    Feature {
        name: "LS64_V",
        id: &[IdField::at(Isar1, 60, 2)],
        controls: &[Control::Hcrx(hcrx::EN_ASR)],
        vm: false,
    },
    Feature {
        name: "LS64_ACCDATA",
        id: &[IdField::at(Isar1, 60, 3)],
        // EnAS0, and nACCDATA_EL1.
        controls: &[Control::Hcrx(hcrx::EN_AS0), Control::FgtRw(1 << 50)],
        vm: false,
    },
    Feature {
        name: "SYSREG128",
        id: &[IdField::at(Isar2, 32, 1)],
        controls: &[Control::Hcrx(hcrx::EN_IDCP128)],
        vm: false,
    },
    Feature {
        name: "PMUv3",
        id: &[IdField::at(Dfr0, 8, 1)],
        // HPMN comes from PMCR_EL0.N (see `host_controls`).
        controls: &[],
        vm: false,
    },
    Feature {
        name: "SPE",
        id: &[IdField::at(Dfr0, 32, 1)],
        // E2PB = 0b11: EL1 owns the profiling buffer.
        controls: &[Control::Mdcr(0b11 << 12)],
        vm: false,
    },
    Feature {
        name: "SPEv1p2",
        id: &[IdField::at(Dfr0, 32, 3)],
        // nPMSNEVFR_EL1.
        controls: &[Control::FgtDebug {
            read: 1 << 62,
            write: 1 << 62,
        }],
        vm: false,
    },
    Feature {
        name: "TRBE",
        id: &[IdField::at(Dfr0, 44, 1)],
        // E2TB = 0b11: EL1 owns the trace buffer.
        controls: &[Control::Mdcr(0b11 << 24)],
        vm: false,
    },
    Feature {
        name: "BRBE",
        id: &[IdField::at(Dfr0, 52, 1)],
        controls: &[
            // nBRBDATA, nBRBCTL, nBRBIDR (read); nBRBDATA, nBRBCTL (write).
            Control::FgtDebug {
                read: (1 << 61) | (1 << 60) | (1 << 59),
                write: (1 << 61) | (1 << 60),
            },
            // nBRBIALL, nBRBINJ.
            Control::FgtInsn((1 << 56) | (1 << 55)),
        ],
        vm: false,
    },
];

/// The feature called `name` in [`FEATURES`].
pub fn feature(name: &str) -> Option<&'static Feature> {
    FEATURES.iter().find(|f| f.name == name)
}

/// The fine-grained trap registers (FEAT_FGT; the `2` set with FEAT_FGT2,
/// written as zero: every trap they hold is positive).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FineGrainedTraps {
    pub hfgrtr: u64,
    pub hfgwtr: u64,
    pub hfgitr: u64,
    pub hdfgrtr: u64,
    pub hdfgwtr: u64,
}

/// The EL2 controls of a partition, each derived from its ID registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct El2Controls {
    pub hcr: u64,
    /// Written only with FEAT_HCX (HCRX_EL2 is UNDEFINED without it).
    pub hcrx: u64,
    pub cptr: u64,
    pub mdcr: u64,
    /// Written only with FEAT_FGT.
    pub fgt: FineGrainedTraps,
    pub cnthctl: u64,
    /// ZCR_EL2, when the partition has SVE.
    pub zcr: Option<u64>,
    /// SMCR_EL2, when the partition has SME.
    pub smcr: Option<u64>,
}

/// ZCR_EL2 / SMCR_EL2 LEN all ones (a 4-bit field; the bits above it are
/// RES0): every vector length the CPU has (a write of an unimplemented
/// length selects the largest implemented one below it).
const VECTOR_LEN_MAX: u64 = 0xf;
/// SMCR_EL2.FA64 (FEAT_SME_FA64) and EZT0 (SME2's ZT0).
const SMCR_FA64: u64 = 1 << 31;
const SMCR_EZT0: u64 = 1 << 30;

/// What the host is told: the hardware's ID registers, without MTE when
/// its policy is off (as the MTE policy service edits them: the same
/// fields).
pub fn host_view(hw: &IdRegs, host_mte: bool) -> IdRegs {
    use moat_abi::services::{PFR1_MTE_FIELDS, PFR2_MTE_FIELDS};
    let mut view = *hw;
    if !host_mte {
        view.pfr1 &= !PFR1_MTE_FIELDS;
        view.pfr2 &= !PFR2_MTE_FIELDS;
    }
    view
}

/// What a protected VM is told: the hardware's ID registers without every
/// feature it is not given ([`Feature::vm`]), without MTE unless `mte`, and
/// without SVE's and SME's own feature registers.
pub fn vm_view(hw: &IdRegs, mte: bool) -> IdRegs {
    let mut view = *hw;
    for f in FEATURES.iter().filter(|f| !f.vm) {
        view = view.without(f);
    }
    if !mte {
        view = host_view(&view, false);
    }
    // The SVE and SME feature registers describe features VMs lack.
    view.zfr0 = 0;
    view.smfr0 = 0;
    view
}

/// The host's EL2 controls: every feature its ID registers (`view`) show
/// works, every feature the hardware (`hw`) has and the view hides is
/// disabled, and nothing else is trapped.
///
/// Besides the table: HCR_EL2 VM, RW and TSC always (stage-2 on, AArch64
/// EL1, firmware calls through the core); TID3 when the view differs from
/// the hardware (the core's policy answers ID-register reads) and TID5 when
/// it hides MTE the hardware has (GMID_EL1). MDCR_EL2.HPMN gives EL1 all
/// `pmcr_n` counters; HPMD keeps EL2 out of them unless `count_el2`.
pub fn host_controls(hw: &IdRegs, view: &IdRegs, pmcr_n: u64, count_el2: bool) -> El2Controls {
    let mut c = El2Controls {
        hcr: hcr::VM | hcr::RW | hcr::TSC,
        cptr: cptr::RES1,
        cnthctl: HOST_CNTHCTL,
        ..Default::default()
    };
    apply_features(&mut c, hw, view);
    if view != hw {
        c.hcr |= hcr::TID3;
    }
    let mte = feature("MTE").is_some_and(|f| hw.has(f) && !view.has(f));
    if mte {
        c.hcr |= hcr::TID5;
    }
    if let Some(pmu) = feature("PMUv3")
        && view.has(pmu)
        && view.field(Dfr0, 8) != 0xf
    {
        c.mdcr |= pmcr_n & 0x1f;
    }
    if !count_el2 {
        c.mdcr |= MDCR_HPMD;
    }
    c
}

/// Sets the table's controls: each feature the view shows (and the hardware
/// has) gets what it needs; every other trap stays set.
fn apply_features(c: &mut El2Controls, hw: &IdRegs, view: &IdRegs) {
    for f in FEATURES {
        let implemented = hw.has(f);
        let given = implemented && view.has(f);
        for control in f.controls {
            match *control {
                Control::CptrTrap {
                    bit,
                    res1_when_absent,
                } => {
                    let trap = if implemented {
                        !given
                    } else {
                        res1_when_absent
                    };
                    if trap {
                        c.cptr |= bit;
                    }
                }
                _ if !given => {}
                Control::Hcr(bits) => c.hcr |= bits,
                Control::Hcrx(bits) => c.hcrx |= bits,
                Control::FgtRw(bits) => {
                    c.fgt.hfgrtr |= bits;
                    c.fgt.hfgwtr |= bits;
                }
                Control::FgtInsn(bits) => c.fgt.hfgitr |= bits,
                Control::FgtDebug { read, write } => {
                    c.fgt.hdfgrtr |= read;
                    c.fgt.hdfgwtr |= write;
                }
                Control::Mdcr(bits) => c.mdcr |= bits,
            }
        }
    }
    if feature("SVE").is_some_and(|f| hw.has(f) && view.has(f)) {
        c.zcr = Some(VECTOR_LEN_MAX);
    }
    if feature("SME").is_some_and(|f| hw.has(f) && view.has(f)) {
        let mut smcr = VECTOR_LEN_MAX;
        if view.smfr0 >> 63 != 0 {
            smcr |= SMCR_FA64;
        }
        if view.field(Pfr1, 24) >= 2 {
            smcr |= SMCR_EZT0;
        }
        c.smcr = Some(smcr);
    }
}

/// The controls a protected VM's view needs from the feature table: its
/// HCRX_EL2 (MOPS when it is shown), and the trap bits its other controls
/// ([`vm_hcr`], [`vm_cptr`]) must agree with.
pub fn vm_controls(hw: &IdRegs, mte: bool) -> El2Controls {
    let view = vm_view(hw, mte);
    let mut c = El2Controls {
        cptr: cptr::RES1,
        cnthctl: NESTED_CNTHCTL,
        ..Default::default()
    };
    apply_features(&mut c, hw, &view);
    c
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

/// MDCR_EL2 for a nested partition: the host's HPMN and HPMD (the core's
/// work stays invisible to the host's counters outside benchmark images)
/// plus the PMU (TPM, TPMCR) and debug (TDA, TDOSA, TDRA) trapped. The
/// host's profiling and trace buffer ownership (E2PB, E2TB) is not carried
/// over: at 0 the buffers belong to EL2 and a nested partition's accesses
/// to them trap.
pub const fn nested_mdcr(host_mdcr: u64) -> u64 {
    (host_mdcr & (0x1f | MDCR_HPMD)) | (1 << 5) | (1 << 6) | (1 << 9) | (1 << 10) | (1 << 11)
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
///
/// A stage-2 walk may start at level 0 (more than 39 bits, with the 4 KiB
/// granule) only on a CPU whose PA size is at least 44 bits; below that the
/// architecture requires concatenated level-1 root tables, which the core
/// does not build. So a CPU with 40 or 42 PA bits (a Cortex-A76, an A64FX)
/// gets at most 39 IPA bits, and what the platform describes above 512 GiB
/// is withheld from the host and logged.
pub fn ipa_bits(cpu: &CpuFeatures, platform_top: u64) -> u32 {
    let needed = u64::BITS - platform_top.saturating_sub(1).leading_zeros();
    let walkable = if cpu.pa_bits() >= 44 { 48 } else { 39 };
    needed.max(32).min(cpu.pa_bits().min(walkable))
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

    /// Registers with every feature of the table present, each field at
    /// its highest level a row asks for, and FEAT_HCX and FEAT_FGT.
    fn everything() -> IdRegs {
        let mut hw = IdRegs::default();
        for f in FEATURES {
            for field in f.id {
                let level = if field.signed { 1 } else { field.min };
                let value = hw.get_mut(field.reg);
                let current = (*value >> field.shift) & 0xf;
                *value = (*value & !(0xf << field.shift)) | (current.max(level) << field.shift);
            }
        }
        hw.mmfr1 |= 1 << 40; // HCX
        hw.mmfr0 |= 1 << 56; // FGT
        hw.smfr0 |= 1 << 63; // FA64
        hw
    }

    /// Whether `c` gives EL1/EL0 what `control` controls.
    fn allows(c: &El2Controls, control: &Control) -> bool {
        match *control {
            Control::Hcr(bits) => c.hcr & bits == bits,
            Control::Hcrx(bits) => c.hcrx & bits == bits,
            Control::CptrTrap { bit, .. } => c.cptr & bit == 0,
            Control::FgtRw(bits) => c.fgt.hfgrtr & bits == bits && c.fgt.hfgwtr & bits == bits,
            Control::FgtInsn(bits) => c.fgt.hfgitr & bits == bits,
            Control::FgtDebug { read, write } => {
                c.fgt.hdfgrtr & read == read && c.fgt.hdfgwtr & write == write
            }
            Control::Mdcr(bits) => c.mdcr & bits == bits,
        }
    }

    #[test]
    fn every_shown_feature_works_and_every_hidden_one_is_disabled() {
        let hw = everything();
        let full = host_controls(&hw, &hw, 0, false);
        for f in FEATURES {
            assert!(hw.has(f), "{} present", f.name);
            let hidden = hw.without(f);
            assert!(!hidden.has(f), "{} hidden", f.name);
            let c = host_controls(&hw, &hidden, 0, false);
            for control in f.controls {
                assert!(allows(&full, control), "{}: {control:?} given", f.name);
                assert!(!allows(&c, control), "{}: {control:?} withheld", f.name);
            }
            // Hiding a feature makes the core answer ID-register reads.
            assert_eq!(c.hcr & hcr::TID3, hcr::TID3, "{}", f.name);
        }
        assert_eq!(full.hcr & hcr::TID3, 0);
    }

    #[test]
    fn absent_features_get_no_enable_bits() {
        // Bits for features the CPU lacks are RES0 (TZ and TSM are RES1).
        let c = host_controls(&IdRegs::default(), &IdRegs::default(), 0, true);
        assert_eq!(c.hcrx, 0);
        assert_eq!(c.fgt, FineGrainedTraps::default());
        assert_eq!(c.cptr, cptr::RES1 | cptr::TZ | cptr::TSM);
        assert_eq!(c.hcr, hcr::VM | hcr::RW | hcr::TSC);
        assert_eq!(c.mdcr, 0);
        assert_eq!((c.zcr, c.smcr), (None, None));
    }

    #[test]
    fn mops_shown_is_mops_enabled() {
        let mut hw = IdRegs {
            mmfr1: 1 << 40,
            ..Default::default()
        };
        assert_eq!(host_controls(&hw, &hw, 0, false).hcrx & hcrx::MSC_EN, 0);
        hw.isar2 |= 1 << 16;
        let c = host_controls(&hw, &hw, 0, false);
        assert_eq!(
            c.hcrx,
            hcrx::MSC_EN,
            "MCE2 stays clear: MOPS exceptions go to EL1"
        );
    }

    #[test]
    fn hcr_follows_mte_policy() {
        let mut hw = everything();
        hw.isar1 &= !(0xff << 4 | 0xff << 24);
        hw.isar2 &= !(0xff << 8);
        hw.pfr0 &= !(0xf << 56);
        let base = hcr::VM | hcr::RW | hcr::TSC;
        let on = host_controls(&hw, &host_view(&hw, true), 0, false);
        let off = host_controls(&hw, &host_view(&hw, false), 0, false);
        assert_eq!(on.hcr, base | hcr::ATA);
        assert_eq!(off.hcr, base | hcr::TID5 | hcr::TID3);
        // MTE changes HCR_EL2 alone, so the policy's late decision need
        // only rewrite it.
        assert_eq!(El2Controls { hcr: 0, ..on }, El2Controls { hcr: 0, ..off });
        // Without MTE in hardware, the policy has nothing to hide.
        hw.pfr1 &= !(0xf << 8);
        assert_eq!(
            host_controls(&hw, &host_view(&hw, false), 0, false).hcr,
            base
        );
    }

    #[test]
    fn cptr_res1_bits_follow_features() {
        let mut hw = IdRegs::default();
        assert_eq!(host_controls(&hw, &hw, 0, false).cptr, 0x33ff);
        hw.pfr0 |= 1 << 32 | 1 << 44; // SVE, AMU
        hw.pfr1 |= 1 << 24; // SME
        assert_eq!(host_controls(&hw, &hw, 0, false).cptr, 0x22ff);
        // FP hidden (0xf: not implemented): TFP traps it.
        let view = hw.without(feature("FP/AdvSIMD").unwrap());
        assert_eq!(host_controls(&hw, &view, 0, false).cptr, 0x26ff);
        // AMU hidden: TAM traps the counters.
        let view = hw.without(feature("AMU").unwrap());
        assert_eq!(
            host_controls(&hw, &view, 0, false).cptr & cptr::TAM,
            cptr::TAM
        );
    }

    #[test]
    fn vector_lengths_and_sme_controls() {
        let mut hw = IdRegs {
            pfr0: 1 << 32,
            pfr1: 1 << 24,
            ..Default::default()
        };
        let c = host_controls(&hw, &hw, 0, false);
        assert_eq!((c.zcr, c.smcr), (Some(0xf), Some(0xf)));
        hw.pfr1 = 2 << 24; // SME2: ZT0
        hw.smfr0 = 1 << 63; // FA64
        let c = host_controls(&hw, &hw, 0, false);
        assert_eq!(c.smcr, Some(0xf | SMCR_FA64 | SMCR_EZT0));
    }

    #[test]
    fn el2_is_invisible_to_the_pmu_unless_benchmarking() {
        let hw = IdRegs {
            dfr0: 6 << 8,
            ..Default::default()
        };
        assert_eq!(host_controls(&hw, &hw, 6, false).mdcr, 6 | MDCR_HPMD);
        assert_eq!(host_controls(&hw, &hw, 6, true).mdcr, 6);
        let imp_def = IdRegs {
            dfr0: 0xf << 8,
            ..Default::default()
        };
        assert_eq!(host_controls(&imp_def, &imp_def, 6, true).mdcr, 0);
        // Nested partitions keep HPMN and HPMD, never the buffers' owner.
        let spe = IdRegs {
            dfr0: 6 << 8 | 1 << 32 | 1 << 44,
            ..Default::default()
        };
        let host = host_controls(&spe, &spe, 6, false).mdcr;
        assert_eq!(host & (0b11 << 12 | 0b11 << 24), 0b11 << 12 | 0b11 << 24);
        assert_eq!(nested_mdcr(host) & (0b11 << 12 | 0b11 << 24), 0);
        assert_eq!(nested_mdcr(host) & (0x1f | MDCR_HPMD), 6 | MDCR_HPMD);
    }

    #[test]
    fn vms_are_told_only_what_they_are_given() {
        let hw = everything();
        for mte in [false, true] {
            let view = vm_view(&hw, mte);
            for f in FEATURES {
                let shown = view.has(f);
                let expected = f.vm && (f.name != "MTE" || mte);
                assert_eq!(shown, expected, "{} (VM MTE {mte})", f.name);
            }
            let c = vm_controls(&hw, mte);
            // The VM's CPTR_EL2 (`vm_cptr`) agrees with the table.
            let cpu = hw.cpu_features();
            assert_eq!(c.cptr, vm_cptr(&cpu));
            let pauth_mte = hcr::API | hcr::APK | hcr::ATA;
            assert_eq!(vm_hcr(&cpu, mte) & pauth_mte, c.hcr & pauth_mte);
            assert_eq!(c.hcrx, hcrx::MSC_EN, "MOPS only");
            assert_eq!(c.fgt, FineGrainedTraps::default());
        }
    }

    #[test]
    fn hiding_a_level_keeps_the_levels_below() {
        let hw = IdRegs {
            isar1: 3 << 60, // LS64_ACCDATA
            ..Default::default()
        };
        let view = hw.without(feature("LS64_ACCDATA").unwrap());
        assert_eq!(view.isar1, 2 << 60);
        assert!(view.has(feature("LS64_V").unwrap()));
        let fp = hw.without(feature("FP/AdvSIMD").unwrap());
        assert_eq!(fp.field(Pfr0, 16), 0xf);
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
        // 40 PA bits: a level-0 start is not allowed, so 39 IPA bits at most.
        assert_eq!(ipa_bits(&f, 1 << 40), 39);
        assert_eq!(vtcr(ipa_bits(&f, 1 << 40), f.pa_range).1, 1);
        let f = CpuFeatures::from_id_regs(0, 0, 4, 0, 0); // 44-bit PA
        assert_eq!(ipa_bits(&f, 1 << 40), 40);
        assert_eq!(vtcr(40, 4).1, 0);
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
