//! The MTE policy, as pure functions (the service binary wraps them).
//!
//! * [`host_policy`]: whether the host may use MTE, from what the hardware
//!   offers and the host's own command line. `arm64.nomte` is how a Linux
//!   host says it runs without MTE; pKVM keys its enforcement off the host's
//!   own view in the same way. `moat.host_mte=on|off` overrides both.
//! * [`decide`]: for a partition whose MTE is off, what each trapped
//!   system-register access gets. The MTE registers (GCR_EL1, RGSR_EL1,
//!   TFSR_EL1, TFSRE0_EL1) and GMID_EL1 raise an Undefined Instruction
//!   exception, as on hardware without MTE. ID registers read as the hardware
//!   has them with every MTE field cleared, so the partition's feature
//!   discovery finds no MTE. Writes to ID registers, and anything else that
//!   reaches the policy, are refused the same way.
//!
//! What this does not do, and why it is still sound: clearing HCR_EL2.ATA
//! does not make LDG/STG and the other tag instructions trap — with tag
//! access disabled they read tag 0 and their tag writes are dropped. So a
//! partition with MTE off can neither read nor set real tags on its own
//! memory, and it can never reach another partition's memory at all, tags
//! or data: the stage-2 does not map it.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

use moat_abi::services::{MteBootInfo, MtePolicy, MteReason, VmMtePolicy, VmMteRequest};
use moat_abi::trap::{Action, SysRegAccess, TrapClass, TrapDescriptor, Verdict};

/// `(op0, op1, CRn, CRm, op2)` of a system register.
pub type Encoding = (u8, u8, u8, u8, u8);

pub const GCR_EL1: Encoding = (3, 0, 1, 0, 6);
pub const RGSR_EL1: Encoding = (3, 0, 1, 0, 5);
pub const TFSR_EL1: Encoding = (3, 0, 5, 6, 0);
pub const TFSRE0_EL1: Encoding = (3, 0, 5, 6, 1);
pub const GMID_EL1: Encoding = (3, 1, 0, 0, 4);
pub const ID_AA64PFR1_EL1: Encoding = (3, 0, 0, 4, 1);
pub const ID_AA64PFR2_EL1: Encoding = (3, 0, 0, 4, 2);

pub use moat_abi::services::{PFR1_MTE_FIELDS, PFR2_MTE_FIELDS};

/// The host's policy.
pub fn host_policy(info: &MteBootInfo) -> MtePolicy {
    let len = (info.command_line_len as usize).min(info.command_line.len());
    let bytes = &info.command_line[..len];
    // A NUL ends the line, whatever the length says.
    let bytes = bytes.split(|b| *b == 0).next().unwrap_or(&[]);
    let line = core::str::from_utf8(bytes).unwrap_or("");
    let reason = if info.hardware_level < 2 {
        MteReason::NoHardware
    } else if info.command_line_total as usize > len {
        MteReason::CommandLineTooLong
    } else {
        let mut reason = MteReason::Default;
        let mut forced = None;
        for word in line.split_ascii_whitespace() {
            match word {
                // Linux's own spelling, and the ID-register override it aliases.
                "arm64.nomte" | "id_aa64pfr1.mte=0" => reason = MteReason::HostDisabled,
                "moat.host_mte=on" => forced = Some(MteReason::ForcedOn),
                "moat.host_mte=off" => forced = Some(MteReason::ForcedOff),
                _ => {}
            }
        }
        forced.unwrap_or(reason)
    };
    let host_mte = matches!(reason, MteReason::Default | MteReason::ForcedOn);
    MtePolicy {
        host_mte: u32::from(host_mte),
        reason: reason as u32,
    }
}

fn encoding(a: &SysRegAccess) -> Encoding {
    (a.op0, a.op1, a.crn, a.crm, a.op2)
}

const UNDEF: Verdict = Verdict {
    action: Action::InjectUndef as u32,
    reserved: 0,
    value: 0,
};

/// A protected VM's policy: MTE only if the host asked for it and the
/// hardware has tag storage; off otherwise (upstream pKVM offers protected
/// VMs no MTE at all).
pub fn vm_policy(request: &VmMteRequest) -> VmMtePolicy {
    let (mte, reason) = match (request.requested != 0, request.hardware_level >= 2) {
        (true, true) => (1, MteReason::VmRequested),
        (true, false) => (0, MteReason::NoHardware),
        (false, _) => (0, MteReason::VmDefaultOff),
    };
    VmMtePolicy {
        mte,
        reason: reason as u32,
    }
}

/// What a trapped access by a partition whose MTE is off gets.
pub fn decide(trap: &TrapDescriptor) -> Verdict {
    if trap.class != TrapClass::SysReg as u32 {
        return UNDEF;
    }
    let access = &trap.sysreg;
    let enc = encoding(access);
    let is_id_group3 = enc.0 == 3 && enc.1 == 0 && enc.2 == 0 && (1..=7).contains(&enc.3);
    if access.is_read == 0 || !is_id_group3 {
        // MSR to anything, the MTE registers, GMID_EL1, and whatever else
        // was routed here: as on hardware without MTE.
        return UNDEF;
    }
    let value = match enc {
        ID_AA64PFR1_EL1 => trap.value & !PFR1_MTE_FIELDS,
        ID_AA64PFR2_EL1 => trap.value & !PFR2_MTE_FIELDS,
        _ => trap.value,
    };
    Verdict {
        action: Action::EmulateRead as u32,
        reserved: 0,
        value,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_get_mte_only_when_asked_and_present() {
        let ask = |requested, hardware_level| {
            vm_policy(&VmMteRequest {
                vm: 1,
                requested,
                hardware_level,
                reserved: 0,
            })
        };
        assert_eq!(ask(1, 2).mte, 1);
        assert_eq!(ask(1, 3).reason, MteReason::VmRequested as u32);
        assert_eq!(ask(1, 1).mte, 0);
        assert_eq!(ask(1, 0).reason, MteReason::NoHardware as u32);
        assert_eq!(ask(0, 3).mte, 0);
        assert_eq!(ask(0, 3).reason, MteReason::VmDefaultOff as u32);
    }

    fn boot(level: u32, line: &str) -> MtePolicy {
        let mut info = MteBootInfo {
            hardware_level: level,
            ..Default::default()
        };
        info.command_line[..line.len()].copy_from_slice(line.as_bytes());
        info.command_line_len = line.len() as u32;
        info.command_line_total = line.len() as u32;
        host_policy(&info)
    }

    #[test]
    fn host_policy_from_hardware_and_command_line() {
        assert_eq!(
            boot(0, ""),
            MtePolicy {
                host_mte: 0,
                reason: MteReason::NoHardware as u32
            }
        );
        assert_eq!(
            boot(1, "moat.host_mte=on"),
            MtePolicy {
                host_mte: 0,
                reason: MteReason::NoHardware as u32
            }
        );
        assert_eq!(
            boot(2, "console=ttyAMA0"),
            MtePolicy {
                host_mte: 1,
                reason: MteReason::Default as u32
            }
        );
        assert_eq!(
            boot(3, "console=ttyAMA0 arm64.nomte"),
            MtePolicy {
                host_mte: 0,
                reason: MteReason::HostDisabled as u32
            }
        );
        assert_eq!(
            boot(3, "moat.host_mte=off"),
            MtePolicy {
                host_mte: 0,
                reason: MteReason::ForcedOff as u32
            }
        );
        assert_eq!(
            boot(3, "arm64.nomte moat.host_mte=on"),
            MtePolicy {
                host_mte: 1,
                reason: MteReason::ForcedOn as u32
            }
        );
        // The last override wins; words must match whole.
        assert_eq!(boot(3, "moat.host_mte=on moat.host_mte=off").host_mte, 0);
        assert_eq!(boot(3, "xarm64.nomte moat.host_mte=offx").host_mte, 1);
        // A length past the buffer is clamped, not trusted.
        let mut info = MteBootInfo {
            hardware_level: 2,
            command_line_len: u32::MAX,
            ..Default::default()
        };
        info.command_line[..11].copy_from_slice(b"arm64.nomte");
        assert_eq!(host_policy(&info).host_mte, 0);
    }

    fn sysreg(enc: Encoding, is_read: bool, value: u64) -> TrapDescriptor {
        TrapDescriptor {
            class: TrapClass::SysReg as u32,
            sysreg: SysRegAccess {
                op0: enc.0,
                op1: enc.1,
                crn: enc.2,
                crm: enc.3,
                op2: enc.4,
                rt: 0,
                is_read: u8::from(is_read),
                reserved: 0,
            },
            value,
            ..Default::default()
        }
    }

    #[test]
    fn mte_registers_are_undefined_both_ways() {
        for enc in [GCR_EL1, RGSR_EL1, TFSR_EL1, TFSRE0_EL1, GMID_EL1] {
            for read in [true, false] {
                assert_eq!(
                    decide(&sysreg(enc, read, 5)).action(),
                    Some(Action::InjectUndef),
                    "{enc:?} read={read}"
                );
            }
        }
    }

    #[test]
    fn id_registers_lose_their_mte_fields_only() {
        // QEMU's max CPU: MTE = 3 and other fields set.
        let pfr1 = 0x0000_0010_0100_0321;
        let v = decide(&sysreg(ID_AA64PFR1_EL1, true, pfr1));
        assert_eq!(v.action(), Some(Action::EmulateRead));
        assert_eq!(v.value, 0x0000_0010_0100_0021);
        assert_eq!((v.value >> 8) & 0xf, 0);
        let v = decide(&sysreg(ID_AA64PFR2_EL1, true, 0x1111));
        assert_eq!(v.value, 0x1000);
        // Other ID registers pass through unchanged.
        let pfr0 = 0x1301_0011_2111_0222;
        assert_eq!(decide(&sysreg((3, 0, 0, 4, 0), true, pfr0)).value, pfr0);
        // Writes to ID registers are refused.
        assert_eq!(
            decide(&sysreg(ID_AA64PFR1_EL1, false, 0)).action(),
            Some(Action::InjectUndef)
        );
    }

    #[test]
    fn anything_else_is_refused() {
        assert_eq!(
            decide(&sysreg((3, 0, 1, 0, 0), true, 0)).action(),
            Some(Action::InjectUndef)
        ); // SCTLR_EL1
        let mut t = sysreg(ID_AA64PFR1_EL1, true, 0);
        t.class = TrapClass::DataAbort as u32;
        assert_eq!(decide(&t).action(), Some(Action::InjectUndef));
    }
}
