//! Decoding ESR_EL2 into typed trap descriptions.
//!
//! Only the exception classes the core routes are decoded into their fields;
//! everything else stays an [`Trap::Other`] carrying the raw class, so the
//! dispatcher's `match` is exhaustive and nothing falls through silently.

/// Exception class values (ESR_ELx.EC, bits [31:26]).
/// ESR_EL2 of `hvc #0` from AArch64 EL1 (EC 0x16, IL set, immediate 0):
/// the syndrome of every fast-path hypercall.
pub const HVC0: u64 = 0x5a00_0000;

pub mod ec {
    pub const UNKNOWN: u8 = 0x00;
    pub const WFX: u8 = 0x01;
    pub const FP_ASIMD: u8 = 0x07;
    pub const HVC64: u8 = 0x16;
    pub const SMC64: u8 = 0x17;
    pub const SYS64: u8 = 0x18;
    pub const IABT_LOW: u8 = 0x20;
    pub const IABT_CUR: u8 = 0x21;
    pub const PC_ALIGN: u8 = 0x22;
    pub const DABT_LOW: u8 = 0x24;
    pub const DABT_CUR: u8 = 0x25;
    pub const SP_ALIGN: u8 = 0x26;
    pub const SERROR: u8 = 0x2f;
    pub const BRK64: u8 = 0x3c;
}

/// ESR_ELx.IL: the trapped instruction was 32 bits wide.
pub const ESR_IL: u64 = 1 << 25;

/// The exception class of an ESR value.
pub const fn exception_class(esr: u64) -> u8 {
    ((esr >> 26) & 0x3f) as u8
}

/// The instruction-specific syndrome (ISS, bits [24:0]).
pub const fn iss(esr: u64) -> u32 {
    (esr & 0x01ff_ffff) as u32
}

/// A system-register access trapped by EC 0x18.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SysRegAccess {
    pub op0: u8,
    pub op1: u8,
    pub crn: u8,
    pub crm: u8,
    pub op2: u8,
    /// The general-purpose register transferred.
    pub rt: u8,
    /// `true` for MRS (a read), `false` for MSR.
    pub is_read: bool,
}

impl SysRegAccess {
    /// Decodes the ISS of an EC 0x18 syndrome.
    pub const fn decode(iss: u32) -> Self {
        Self {
            op0: ((iss >> 20) & 0x3) as u8,
            op2: ((iss >> 17) & 0x7) as u8,
            op1: ((iss >> 14) & 0x7) as u8,
            crn: ((iss >> 10) & 0xf) as u8,
            rt: ((iss >> 5) & 0x1f) as u8,
            crm: ((iss >> 1) & 0xf) as u8,
            is_read: iss & 1 == 1,
        }
    }

    /// The register, as `(op0, op1, CRn, CRm, op2)`.
    pub const fn encoding(&self) -> (u8, u8, u8, u8, u8) {
        (self.op0, self.op1, self.crn, self.crm, self.op2)
    }
}

/// The data-fault status codes the core cares about (ESR ISS bits [5:0]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultKind {
    /// Translation fault at the given level (-1..=3 encoded as 0..=3 here, level 0 to 3).
    Translation(u8),
    AccessFlag(u8),
    Permission(u8),
    /// Any other status code.
    Other(u8),
}

impl FaultKind {
    pub const fn decode(fsc: u8) -> Self {
        match fsc & 0x3f {
            f @ 0x04..=0x07 => FaultKind::Translation(f & 3),
            f @ 0x08..=0x0b => FaultKind::AccessFlag(f & 3),
            f @ 0x0c..=0x0f => FaultKind::Permission(f & 3),
            f => FaultKind::Other(f),
        }
    }
}

/// A stage-2 abort taken from a lower EL (EC 0x20 or 0x24).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageTwoAbort {
    /// Instruction fetch (EC 0x20) rather than data access (EC 0x24).
    pub is_instruction: bool,
    pub fault: FaultKind,
    /// Data aborts only: the access was a write.
    pub is_write: bool,
    /// Data aborts only: ISV, so `access` below is valid.
    pub syndrome_valid: bool,
    /// Data aborts with ISV: size (log2 bytes), sign-extend, register, 64-bit register.
    pub access: Option<MmioAccess>,
    /// The fault happened on a stage-1 table walk.
    pub s1ptw: bool,
}

/// The single load/store an ISV=1 data abort describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioAccess {
    /// log2 of the access size in bytes.
    pub size_log2: u8,
    pub sign_extend: bool,
    pub rt: u8,
    /// The destination is a 64-bit register (SF).
    pub sixty_four: bool,
    pub is_write: bool,
}

impl MmioAccess {
    /// The register value a load of `raw` (the bytes the device returned,
    /// in the low bits) leaves in the destination: truncated to the access
    /// size, sign-extended if the load sign-extends, and cut to 32 bits for
    /// a W register.
    pub const fn loaded_value(&self, raw: u64) -> u64 {
        let bits = 8u32 << self.size_log2;
        let mut v = if bits >= 64 {
            raw
        } else {
            raw & ((1u64 << bits) - 1)
        };
        if self.sign_extend && bits < 64 {
            let shift = 64 - bits;
            v = (((v << shift) as i64) >> shift) as u64;
        }
        if !self.sixty_four {
            v &= 0xffff_ffff;
        }
        v
    }
}

impl StageTwoAbort {
    pub const fn decode(ec: u8, iss: u32) -> Self {
        let is_instruction = ec == ec::IABT_LOW;
        let is_write = !is_instruction && (iss >> 6) & 1 == 1;
        let syndrome_valid = !is_instruction && (iss >> 24) & 1 == 1;
        let access = if syndrome_valid {
            Some(MmioAccess {
                size_log2: ((iss >> 22) & 0x3) as u8,
                sign_extend: (iss >> 21) & 1 == 1,
                rt: ((iss >> 16) & 0x1f) as u8,
                sixty_four: (iss >> 15) & 1 == 1,
                is_write,
            })
        } else {
            None
        };
        Self {
            is_instruction,
            fault: FaultKind::decode((iss & 0x3f) as u8),
            is_write,
            syndrome_valid,
            access,
            s1ptw: (iss >> 7) & 1 == 1,
        }
    }
}

/// What a trap from a partition is, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trap {
    /// HVC with its 16-bit immediate. ELR already points past it.
    Hvc { imm: u16 },
    /// SMC trapped by HCR_EL2.TSC. ELR points *at* it.
    Smc { imm: u16 },
    /// MSR/MRS/SYS trapped to EL2.
    SysReg(SysRegAccess),
    /// Stage-2 instruction or data abort.
    StageTwo(StageTwoAbort),
    /// WFI (`false`) or WFE (`true`) trapped.
    Wfx { is_wfe: bool },
    /// Anything else, with its class.
    Other { ec: u8 },
}

impl Trap {
    /// Decodes a raw ESR_EL2 value.
    pub const fn decode(esr: u64) -> Self {
        let ec = exception_class(esr);
        let iss = iss(esr);
        match ec {
            ec::HVC64 => Trap::Hvc {
                imm: (iss & 0xffff) as u16,
            },
            ec::SMC64 => Trap::Smc {
                imm: (iss & 0xffff) as u16,
            },
            ec::SYS64 => Trap::SysReg(SysRegAccess::decode(iss)),
            ec::IABT_LOW | ec::DABT_LOW => Trap::StageTwo(StageTwoAbort::decode(ec, iss)),
            ec::WFX => Trap::Wfx {
                is_wfe: iss & 1 == 1,
            },
            _ => Trap::Other { ec },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hvc_as_qemu_reports_it() {
        // `hvc #0` from EL1 arrives with ESR_EL2 = 0x5a000000.
        assert_eq!(Trap::decode(0x5a00_0000), Trap::Hvc { imm: 0 });
        assert_eq!(Trap::decode(0x5a00_1234), Trap::Hvc { imm: 0x1234 });
    }

    #[test]
    fn smc_is_its_own_class() {
        assert_eq!(Trap::decode(0x5e00_0000), Trap::Smc { imm: 0 });
    }

    #[test]
    fn mrs_gcr_el1_syndrome() {
        // `mrs x0, gcr_el1` with HCR_EL2.ATA = 0 (measured under QEMU): 0x623c0521? The
        // documented value for Rt = 0 is 0x623c0401; Rt = 9 gives 0x623c0521.
        let t = Trap::decode(0x623c_0401);
        let Trap::SysReg(a) = t else { panic!("{t:?}") };
        assert_eq!(a.encoding(), (3, 0, 1, 0, 6));
        assert!(a.is_read);
        assert_eq!(a.rt, 0);
        let Trap::SysReg(a) = Trap::decode(0x623c_0521) else {
            panic!()
        };
        assert_eq!(a.rt, 9);
        assert_eq!(a.encoding(), (3, 0, 1, 0, 6));
    }

    #[test]
    fn every_mte_register_encoding() {
        let cases = [
            (0x623a_0401u64, (3, 0, 1, 0, 5)), // RGSR_EL1
            (0x6230_140d, (3, 0, 5, 6, 0)),    // TFSR_EL1
            (0x6232_140d, (3, 0, 5, 6, 1)),    // TFSRE0_EL1
            (0x6238_4001, (3, 1, 0, 0, 4)),    // GMID_EL1
            (0x6232_0009, (3, 0, 0, 4, 1)),    // ID_AA64PFR1_EL1
        ];
        for (esr, enc) in cases {
            let Trap::SysReg(a) = Trap::decode(esr) else {
                panic!("{esr:#x}")
            };
            assert_eq!(a.encoding(), enc, "{esr:#x}");
            assert!(a.is_read);
        }
        // MSR (write) has direction 0.
        let Trap::SysReg(a) = Trap::decode(0x623c_0400) else {
            panic!()
        };
        assert!(!a.is_read);
    }

    #[test]
    fn data_abort_with_syndrome() {
        // EC 0x24, IL, ISV, SAS = 2 (word), SRT = 3, SF = 0, WnR = 1, DFSC = translation L3.
        let esr = (0x24u64 << 26) | ESR_IL | (1 << 24) | (2 << 22) | (3 << 16) | (1 << 6) | 0x07;
        let Trap::StageTwo(a) = Trap::decode(esr) else {
            panic!()
        };
        assert!(!a.is_instruction && a.is_write && a.syndrome_valid);
        assert_eq!(a.fault, FaultKind::Translation(3));
        let m = a.access.unwrap();
        assert_eq!(
            (m.size_log2, m.rt, m.sixty_four, m.sign_extend),
            (2, 3, false, false)
        );
    }

    #[test]
    fn instruction_abort_never_claims_a_write() {
        let esr = (0x20u64 << 26) | ESR_IL | (1 << 6) | 0x06;
        let Trap::StageTwo(a) = Trap::decode(esr) else {
            panic!()
        };
        assert!(a.is_instruction && !a.is_write && a.access.is_none());
        assert_eq!(a.fault, FaultKind::Translation(2));
    }

    #[test]
    fn every_class_decodes_without_panicking() {
        for ec in 0..64u64 {
            for iss in [0u64, 0x1ff_ffff, 0x155_5555] {
                let _ = Trap::decode((ec << 26) | ESR_IL | iss);
            }
        }
    }

    #[test]
    fn mmio_loads_truncate_and_extend() {
        let byte = MmioAccess {
            size_log2: 0,
            sign_extend: true,
            rt: 1,
            sixty_four: true,
            is_write: false,
        };
        assert_eq!(byte.loaded_value(0x1_80), 0xffff_ffff_ffff_ff80);
        let word = MmioAccess {
            size_log2: 2,
            sign_extend: false,
            rt: 1,
            sixty_four: false,
            is_write: false,
        };
        assert_eq!(word.loaded_value(0xdead_beef_cafe_f00d), 0xcafe_f00d);
        let wsigned = MmioAccess {
            size_log2: 1,
            sign_extend: true,
            rt: 1,
            sixty_four: false,
            is_write: false,
        };
        assert_eq!(wsigned.loaded_value(0x8000), 0xffff_8000);
        let dword = MmioAccess {
            size_log2: 3,
            sign_extend: false,
            rt: 1,
            sixty_four: true,
            is_write: false,
        };
        assert_eq!(dword.loaded_value(u64::MAX), u64::MAX);
    }
}
