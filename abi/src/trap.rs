//! Typed trap descriptors: what the core tells a service about a trap it
//! routes to it, and the verdict the service returns.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// [`TrapDescriptor::partition`] of protected VM `handle` is this plus `handle`.
pub const PARTITION_VM_BASE: u16 = 0x100;

/// The class of a trap, as the manifest names it for routing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum TrapClass {
    /// An HVC from the partition.
    Hvc = 0,
    /// An SMC trapped by HCR_EL2.TSC.
    Smc = 1,
    /// An MSR/MRS trapped to EL2 (EC 0x18).
    SysReg = 2,
    /// A stage-2 data abort.
    DataAbort = 3,
    /// A stage-2 instruction abort.
    InstructionAbort = 4,
    /// Anything else.
    Other = 5,
}

impl TrapClass {
    pub const COUNT: usize = 6;
    pub const ALL: [TrapClass; Self::COUNT] = [
        Self::Hvc,
        Self::Smc,
        Self::SysReg,
        Self::DataAbort,
        Self::InstructionAbort,
        Self::Other,
    ];

    pub const fn from_u32(v: u32) -> Option<Self> {
        if (v as usize) < Self::COUNT {
            Some(Self::ALL[v as usize])
        } else {
            None
        }
    }

    /// The name the image manifest uses.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hvc => "hvc",
            Self::Smc => "smc",
            Self::SysReg => "sysreg",
            Self::DataAbort => "data-abort",
            Self::InstructionAbort => "instruction-abort",
            Self::Other => "other",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }

    /// This class's bit in a routing mask.
    pub const fn bit(self) -> u32 {
        1 << self as u32
    }
}

/// The operation number an observing service's interface gives to
/// `observe(TrapDescriptor) -> Empty`: the core sends trap notices to it.
pub const OBSERVE_OPERATION: u16 = 1;
/// The operation number a handling service's interface gives to
/// `decide(TrapDescriptor) -> Verdict`.
pub const DECIDE_OPERATION: u16 = 2;

/// A system-register access, decoded.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct SysRegAccess {
    pub op0: u8,
    pub op1: u8,
    pub crn: u8,
    pub crm: u8,
    pub op2: u8,
    /// The general-purpose register transferred.
    pub rt: u8,
    /// 1 for MRS (read), 0 for MSR (write).
    pub is_read: u8,
    pub reserved: u8,
}

/// One trap, as the core reports it to the service that handles or observes it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct TrapDescriptor {
    /// A [`TrapClass`].
    pub class: u32,
    /// The partition that trapped: 0 the host, [`PARTITION_VM_BASE`] + handle
    /// a protected VM.
    pub partition: u16,
    /// The physical CPU's logical index.
    pub cpu: u16,
    /// ESR_EL2 as the core read it.
    pub esr: u64,
    /// The trapping instruction's address.
    pub pc: u64,
    /// FAR_EL2 (aborts only).
    pub far: u64,
    /// The faulting IPA (stage-2 aborts only).
    pub ipa: u64,
    /// System-register traps only.
    pub sysreg: SysRegAccess,
    /// For MSR: the value being written. For MRS of an ID register: the
    /// value the hardware holds, for the service to edit.
    pub value: u64,
}

const _: () = assert!(size_of::<TrapDescriptor>() == 56);

/// What the core does after a handling service decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Action {
    /// Resume the partition at the trapping instruction's successor.
    Skip = 0,
    /// Deliver an Undefined Instruction exception, as the architecture would.
    InjectUndef = 1,
    /// Complete an MRS with `value` and skip it.
    EmulateRead = 2,
}

/// A handling service's decision.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct Verdict {
    /// An [`Action`].
    pub action: u32,
    pub reserved: u32,
    pub value: u64,
}

impl Verdict {
    pub const fn action(&self) -> Option<Action> {
        match self.action {
            0 => Some(Action::Skip),
            1 => Some(Action::InjectUndef),
            2 => Some(Action::EmulateRead),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_names_round_trip() {
        for c in TrapClass::ALL {
            assert_eq!(TrapClass::from_name(c.name()), Some(c));
            assert_eq!(TrapClass::from_u32(c as u32), Some(c));
        }
        assert_eq!(TrapClass::from_u32(6), None);
        assert_eq!(TrapClass::from_name("irq"), None);
    }

    #[test]
    fn verdict_actions() {
        assert_eq!(
            Verdict {
                action: 1,
                ..Default::default()
            }
            .action(),
            Some(Action::InjectUndef)
        );
        assert_eq!(
            Verdict {
                action: 9,
                ..Default::default()
            }
            .action(),
            None
        );
    }
}
