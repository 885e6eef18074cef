//! The PSCI relay's decisions: which calls the core intercepts, which it
//! forwards to firmware untouched, and which it refuses.
//!
//! The core must own every CPU's entry into EL1: a host that could call
//! firmware's CPU_ON directly would start a CPU at EL2 without the core, or
//! at EL1 without a stage-2. So CPU_ON and CPU_SUSPEND are rewritten to enter
//! the core first, and the core then enters the host at the address it asked
//! for. Calls that cannot compromise isolation are forwarded as they are.

use smccc::psci as ids;

/// PSCI return codes.
pub mod ret {
    pub const SUCCESS: i64 = 0;
    pub const NOT_SUPPORTED: i64 = -1;
    pub const INVALID_PARAMETERS: i64 = -2;
    pub const DENIED: i64 = -3;
    pub const ALREADY_ON: i64 = -4;
    pub const ON_PENDING: i64 = -5;
    pub const INTERNAL_FAILURE: i64 = -6;
}

/// A decoded PSCI call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciCall {
    /// Pass to firmware with the same arguments (VERSION, AFFINITY_INFO,
    /// MIGRATE_INFO_TYPE, FEATURES of supported calls, SYSTEM_OFF/RESET/RESET2).
    Forward { function: u32, ends_machine: bool },
    /// CPU_ON: start `target` at `entry` with `context` in x0.
    CpuOn {
        target_mpidr: u64,
        entry: u64,
        context: u64,
    },
    /// CPU_OFF: the calling CPU leaves.
    CpuOff,
    /// CPU_SUSPEND: may resume at `entry` if the state is a powerdown one.
    CpuSuspend {
        power_state: u64,
        entry: u64,
        context: u64,
    },
    /// PSCI_FEATURES: answered NOT_SUPPORTED for anything the relay refuses,
    /// otherwise forwarded.
    Features { queried: u32 },
    /// Anything else in the PSCI range.
    NotSupported,
}

/// Whether a function id belongs to PSCI (standard service, 0x00–0x1f).
pub const fn is_psci(function: u32) -> bool {
    matches!(function & 0xbfff_ffe0, 0x8400_0000)
}

/// Whether the relay accepts `function` at all.
pub const fn relay_supports(function: u32) -> bool {
    matches!(
        function,
        ids::PSCI_VERSION
            | ids::PSCI_CPU_SUSPEND_32
            | ids::PSCI_CPU_SUSPEND_64
            | ids::PSCI_CPU_OFF
            | ids::PSCI_CPU_ON_32
            | ids::PSCI_CPU_ON_64
            | ids::PSCI_AFFINITY_INFO_32
            | ids::PSCI_AFFINITY_INFO_64
            | ids::PSCI_MIGRATE_INFO_TYPE
            | ids::PSCI_SYSTEM_OFF
            | ids::PSCI_SYSTEM_RESET
            | ids::PSCI_SYSTEM_RESET2_32
            | ids::PSCI_SYSTEM_RESET2_64
            | ids::PSCI_FEATURES
    )
}

/// Decodes a PSCI call from its registers. 32-bit calls take their arguments
/// from the low words.
pub fn decode(function: u32, x1: u64, x2: u64, x3: u64) -> PsciCall {
    let is32 = function & (1 << 30) == 0;
    let arg = |v: u64| if is32 { v & 0xffff_ffff } else { v };
    match function {
        ids::PSCI_CPU_ON_32 | ids::PSCI_CPU_ON_64 => PsciCall::CpuOn {
            target_mpidr: arg(x1),
            entry: arg(x2),
            context: arg(x3),
        },
        ids::PSCI_CPU_SUSPEND_32 | ids::PSCI_CPU_SUSPEND_64 => PsciCall::CpuSuspend {
            power_state: arg(x1),
            entry: arg(x2),
            context: arg(x3),
        },
        ids::PSCI_CPU_OFF => PsciCall::CpuOff,
        ids::PSCI_FEATURES => PsciCall::Features { queried: x1 as u32 },
        ids::PSCI_SYSTEM_OFF
        | ids::PSCI_SYSTEM_RESET
        | ids::PSCI_SYSTEM_RESET2_32
        | ids::PSCI_SYSTEM_RESET2_64 => PsciCall::Forward {
            function,
            ends_machine: true,
        },
        f if relay_supports(f) => PsciCall::Forward {
            function: f,
            ends_machine: false,
        },
        _ => PsciCall::NotSupported,
    }
}

/// MPIDR_EL1 affinity fields (Aff3, Aff2, Aff1, Aff0), as PSCI and the device
/// tree name CPUs.
pub const fn mpidr_affinity(mpidr: u64) -> u64 {
    mpidr & 0xff_00ff_ffff
}

/// How firmware lays out CPU_SUSPEND's power_state argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerStateFormat {
    /// StateID in bits [15:0], StateType (1: powerdown) in bit 16,
    /// PowerLevel in bits [25:24].
    Original,
    /// StateID in bits [27:0], StateType in bit 30.
    Extended,
}

impl PowerStateFormat {
    /// The format PSCI_FEATURES(CPU_SUSPEND) reports in bit 1 of its flags
    /// (PSCI 1.0 and later). A negative answer (PSCI 0.2 has no
    /// PSCI_FEATURES, or CPU_SUSPEND is missing) means the original format.
    pub const fn from_features(answer: u64) -> Self {
        if (answer as i64) >= 0 && answer & (1 << 1) != 0 {
            Self::Extended
        } else {
            Self::Original
        }
    }
}

/// Whether a CPU_SUSPEND power_state in `format` requests a powerdown
/// state, after which the CPU resumes at the entry point rather than
/// returning. The bit is the StateType field of the format firmware uses:
/// reading the other format's bit would take a powerdown for a standby
/// (the CPU would come back through the core's entry with no resume point).
pub const fn is_powerdown_state(power_state: u64, format: PowerStateFormat) -> bool {
    let bit = match format {
        PowerStateFormat::Original => 16,
        PowerStateFormat::Extended => 30,
    };
    power_state & (1 << bit) != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psci_range() {
        assert!(is_psci(0x8400_0000));
        assert!(is_psci(0xc400_0003));
        assert!(is_psci(0x8400_001f));
        assert!(!is_psci(0x8400_0020));
        assert!(!is_psci(0xc600_0000));
        assert!(!is_psci(0x8000_0000));
    }

    #[test]
    fn cpu_on_both_conventions() {
        assert_eq!(
            decode(0xc400_0003, 1, 0x4008_0000, 7),
            PsciCall::CpuOn {
                target_mpidr: 1,
                entry: 0x4008_0000,
                context: 7
            }
        );
        // SMC32: upper halves ignored.
        assert_eq!(
            decode(0x8400_0003, 0xdead_0000_0000_0002, 0xffff_ffff_4008_0000, 0),
            PsciCall::CpuOn {
                target_mpidr: 2,
                entry: 0x4008_0000,
                context: 0
            }
        );
    }

    #[test]
    fn forwarding_and_refusal() {
        assert_eq!(
            decode(0x8400_0000, 0, 0, 0),
            PsciCall::Forward {
                function: 0x8400_0000,
                ends_machine: false
            }
        );
        assert_eq!(
            decode(0x8400_0008, 0, 0, 0),
            PsciCall::Forward {
                function: 0x8400_0008,
                ends_machine: true
            }
        );
        assert_eq!(
            decode(0x8400_0009, 0, 0, 0),
            PsciCall::Forward {
                function: 0x8400_0009,
                ends_machine: true
            }
        );
        // MEM_PROTECT, SYSTEM_SUSPEND, MIGRATE: refused.
        assert_eq!(decode(0x8400_0013, 0, 0, 0), PsciCall::NotSupported);
        assert_eq!(decode(0xc400_000e, 0, 0, 0), PsciCall::NotSupported);
        assert_eq!(decode(0x8400_0005, 0, 0, 0), PsciCall::NotSupported);
        assert_eq!(
            decode(0x8400_000a, 0xc400_0003, 0, 0),
            PsciCall::Features {
                queried: 0xc400_0003
            }
        );
    }

    #[test]
    fn affinity_and_power_state() {
        assert_eq!(mpidr_affinity(0x8000_0001), 1);
        assert_eq!(mpidr_affinity(0xff_8100_0203), 0xff_0000_0203);
        use PowerStateFormat::{Extended, Original};
        assert!(is_powerdown_state(1 << 16, Original));
        assert!(!is_powerdown_state(0, Original));
        assert!(!is_powerdown_state(1 << 30, Original));
        // Extended: StateType is bit 30; bit 16 is part of the StateID.
        assert!(is_powerdown_state(1 << 30, Extended));
        assert!(!is_powerdown_state(1 << 16, Extended));
        assert!(!is_powerdown_state(0x0fff_ffff, Extended));
    }

    #[test]
    fn power_state_format_from_features() {
        assert_eq!(
            PowerStateFormat::from_features(0b10),
            PowerStateFormat::Extended
        );
        assert_eq!(
            PowerStateFormat::from_features(0b01),
            PowerStateFormat::Original
        );
        assert_eq!(
            PowerStateFormat::from_features(0),
            PowerStateFormat::Original
        );
        // NOT_SUPPORTED (-1) has every bit set: still the original format.
        assert_eq!(
            PowerStateFormat::from_features(u64::MAX),
            PowerStateFormat::Original
        );
        assert_eq!(
            PowerStateFormat::from_features(-2i64 as u64),
            PowerStateFormat::Original
        );
    }
}
