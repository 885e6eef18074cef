//! The trap path's decisions and the writes that carry them out: the
//! routing class of a decoded trap, the typed descriptor a service
//! receives, a handling service's verdict applied to the trapped vCPU, and
//! the exceptions delivered when the core refuses an access.
//!
//! Every register goes through [`SysRegs`], so the same code runs at EL2
//! (with the real registers) and under `cargo test` (with
//! [`FakeSysRegs`](crate::sysregs::FakeSysRegs)).

use crate::el2config::CpuFeatures;
use crate::esr::{SysRegAccess, Trap};
use crate::inject::{self, El1Context, Injection};
use crate::regs::GuestRegs;
use crate::sysregs::SysRegs;
use moat_abi::trap::{Action, SysRegAccess as SysRegDesc, TrapClass, TrapDescriptor, Verdict};

/// The routing class of a decoded trap.
pub fn class_of(trap: &Trap) -> TrapClass {
    match trap {
        Trap::Hvc { .. } => TrapClass::Hvc,
        Trap::Smc { .. } => TrapClass::Smc,
        Trap::SysReg(_) => TrapClass::SysReg,
        Trap::StageTwo(a) if a.is_instruction => TrapClass::InstructionAbort,
        Trap::StageTwo(_) => TrapClass::DataAbort,
        Trap::Wfx { .. } | Trap::Other { .. } => TrapClass::Other,
    }
}

/// The typed descriptor services receive.
pub fn describe(
    sys: &impl SysRegs,
    trap: &Trap,
    esr: u64,
    regs: &GuestRegs,
    cpu: usize,
) -> TrapDescriptor {
    let mut d = TrapDescriptor {
        class: class_of(trap) as u32,
        partition: 0,
        cpu: cpu as u16,
        esr,
        pc: regs.pc,
        ..Default::default()
    };
    match trap {
        Trap::SysReg(a) => {
            d.sysreg = SysRegDesc {
                op0: a.op0,
                op1: a.op1,
                crn: a.crn,
                crm: a.crm,
                op2: a.op2,
                rt: a.rt,
                is_read: u8::from(a.is_read),
                reserved: 0,
            };
            d.value = if a.is_read {
                // ID-group-3 registers: the hardware value, for a policy to edit.
                match (a.op0, a.op1, a.crn) {
                    (3, 0, 0) => sys.read_id_register(a.crm, a.op2).unwrap_or(0),
                    _ => 0,
                }
            } else {
                regs.read_gpr(a.rt)
            };
        }
        Trap::StageTwo(_) => {
            d.far = sys.far_el2();
            d.ipa = sys.fault_ipa();
        }
        _ => {}
    }
    d
}

/// A handling service's answer to a trapped access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    Verdict(Verdict),
    /// An interrupt suspended the decision: run the instruction again.
    Interrupted,
    /// No well-formed answer.
    Refused,
}

/// Applies a verdict to the trapped partition, whose EL1 state is loaded.
/// Anything but a well-formed verdict that fits the access fails closed:
/// the access is UNDEFINED, as on hardware without the feature.
pub fn apply_verdict(
    sys: &mut impl SysRegs,
    cpu: &CpuFeatures,
    regs: &mut GuestRegs,
    answer: Answer,
    access: &SysRegAccess,
) {
    match answer {
        Answer::Verdict(verdict) => match verdict.action() {
            Some(Action::Skip) => regs.pc = regs.pc.wrapping_add(4),
            Some(Action::EmulateRead) if access.is_read => {
                regs.write_gpr(access.rt, verdict.value);
                regs.pc = regs.pc.wrapping_add(4);
            }
            _ => inject_undef(sys, cpu, regs),
        },
        Answer::Interrupted => {}
        Answer::Refused => inject_undef(sys, cpu, regs),
    }
}

fn el1_context(sys: &impl SysRegs, cpu: &CpuFeatures) -> El1Context {
    El1Context {
        vbar_el1: sys.vbar_el1(),
        sctlr_el1: sys.sctlr_el1(),
        mte_implemented: cpu.mte_instructions,
        pan_implemented: cpu.pan,
    }
}

fn apply(sys: &mut impl SysRegs, regs: &mut GuestRegs, inj: &Injection) {
    sys.write_el1_exception(inj.esr_el1, inj.elr_el1, inj.spsr_el1, inj.far_el1);
    regs.pc = inj.pc;
    regs.pstate = inj.pstate;
}

/// Delivers an Undefined Instruction exception for the instruction at `regs.pc`.
pub fn inject_undef(sys: &mut impl SysRegs, cpu: &CpuFeatures, regs: &mut GuestRegs) {
    let inj = inject::undefined_instruction(regs.pc, regs.pstate, &el1_context(sys, cpu));
    apply(sys, regs, &inj);
}

/// Delivers a synchronous external abort for the access at `regs.pc`, as
/// a bus error on it would.
pub fn inject_abort(
    sys: &mut impl SysRegs,
    cpu: &CpuFeatures,
    regs: &mut GuestRegs,
    is_instruction: bool,
    is_write: bool,
    far: u64,
) {
    let inj = inject::external_abort(
        regs.pc,
        regs.pstate,
        &el1_context(sys, cpu),
        is_instruction,
        is_write,
        far,
    );
    apply(sys, regs, &inj);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::esr::{ESR_IL, HVC0, ec};
    use crate::inject::{PSTATE_DAIF, PSTATE_MODE_EL1H, PSTATE_TCO};
    use crate::sysregs::FakeSysRegs;

    const VBAR: u64 = 0xffff_8000_1000_0000;
    const PC: u64 = 0x4008_0000;

    /// An ESR_EL2 for a trapped MSR/MRS (EC 0x18), as the CPU builds it.
    fn sysreg_esr(op0: u64, op1: u64, crn: u64, crm: u64, op2: u64, rt: u64, read: bool) -> u64 {
        (0x18 << 26)
            | ESR_IL
            | (op0 << 20)
            | (op2 << 17)
            | (op1 << 14)
            | (crn << 10)
            | (rt << 5)
            | (crm << 1)
            | u64::from(read)
    }

    fn host_at_el1() -> GuestRegs {
        GuestRegs {
            pc: PC,
            pstate: PSTATE_MODE_EL1H,
            ..Default::default()
        }
    }

    fn fake() -> FakeSysRegs {
        FakeSysRegs {
            vbar_el1: VBAR,
            ..Default::default()
        }
    }

    fn mte_cpu() -> CpuFeatures {
        CpuFeatures {
            mte_instructions: true,
            ..Default::default()
        }
    }

    fn access_of(trap: &Trap) -> SysRegAccess {
        match trap {
            Trap::SysReg(a) => *a,
            other => panic!("not a system-register trap: {other:?}"),
        }
    }

    #[test]
    fn a_write_to_gcr_el1_is_described_with_the_value_written() {
        // MSR GCR_EL1, x5 (op0=3 op1=0 CRn=1 CRm=0 op2=6).
        let esr = sysreg_esr(3, 0, 1, 0, 6, 5, false);
        let mut regs = host_at_el1();
        regs.x[5] = 0x1_0000_ffff;
        let trap = Trap::decode(esr);
        let d = describe(&fake(), &trap, esr, &regs, 3);
        assert_eq!(d.class, TrapClass::SysReg as u32);
        assert_eq!(d.cpu, 3);
        assert_eq!(d.esr, esr);
        assert_eq!(d.pc, PC);
        assert_eq!(
            (
                d.sysreg.op0,
                d.sysreg.op1,
                d.sysreg.crn,
                d.sysreg.crm,
                d.sysreg.op2
            ),
            (3, 0, 1, 0, 6)
        );
        assert_eq!((d.sysreg.rt, d.sysreg.is_read), (5, 0));
        assert_eq!(d.value, 0x1_0000_ffff);
    }

    #[test]
    fn a_read_of_an_id_register_carries_the_hardware_value() {
        // MRS x2, ID_AA64PFR1_EL1 (op0=3 op1=0 CRn=0 CRm=4 op2=1).
        let esr = sysreg_esr(3, 0, 0, 4, 1, 2, true);
        let mut sys = fake();
        sys.id_registers[4][1] = 0x0000_0000_0000_0210;
        let trap = Trap::decode(esr);
        let d = describe(&sys, &trap, esr, &host_at_el1(), 0);
        assert_eq!(d.value, 0x210);
        assert_eq!(d.sysreg.is_read, 1);
        // A read outside ID group 3 carries nothing from the hardware.
        let esr = sysreg_esr(3, 0, 1, 0, 6, 2, true);
        let d = describe(&sys, &Trap::decode(esr), esr, &host_at_el1(), 0);
        assert_eq!(d.value, 0);
    }

    #[test]
    fn a_stage2_abort_is_described_with_its_addresses() {
        // Data abort from a lower EL, translation fault level 3, a write.
        let esr = (0x24 << 26) | ESR_IL | (1 << 6) | 0x07;
        let mut sys = fake();
        sys.far_el2 = 0x1234_5678;
        sys.fault_ipa = 0x8_0000_0678;
        let trap = Trap::decode(esr);
        let d = describe(&sys, &trap, esr, &host_at_el1(), 1);
        assert_eq!(d.class, TrapClass::DataAbort as u32);
        assert_eq!((d.far, d.ipa), (0x1234_5678, 0x8_0000_0678));
        assert_eq!(class_of(&Trap::decode(HVC0)), TrapClass::Hvc);
    }

    #[test]
    fn skip_steps_over_the_access_and_changes_nothing_else() {
        let esr = sysreg_esr(3, 0, 1, 0, 6, 5, false);
        let access = access_of(&Trap::decode(esr));
        let mut sys = fake();
        let mut regs = host_at_el1();
        let before = regs;
        let skip = Verdict {
            action: Action::Skip as u32,
            ..Default::default()
        };
        apply_verdict(
            &mut sys,
            &mte_cpu(),
            &mut regs,
            Answer::Verdict(skip),
            &access,
        );
        assert_eq!(regs.pc, PC + 4);
        assert_eq!(regs.x, before.x);
        assert_eq!(sys, fake());
    }

    #[test]
    fn emulate_read_completes_an_mrs() {
        let esr = sysreg_esr(3, 0, 0, 4, 1, 7, true);
        let access = access_of(&Trap::decode(esr));
        let mut sys = fake();
        let mut regs = host_at_el1();
        let read = Verdict {
            action: Action::EmulateRead as u32,
            value: 0xdead_beef,
            ..Default::default()
        };
        apply_verdict(
            &mut sys,
            &mte_cpu(),
            &mut regs,
            Answer::Verdict(read),
            &access,
        );
        assert_eq!(regs.x[7], 0xdead_beef);
        assert_eq!(regs.pc, PC + 4);
        assert_eq!(sys.el1_exceptions, 0);
        // To XZR, the value goes nowhere.
        let esr = sysreg_esr(3, 0, 0, 4, 1, 31, true);
        let access = access_of(&Trap::decode(esr));
        let mut regs = host_at_el1();
        apply_verdict(
            &mut sys,
            &mte_cpu(),
            &mut regs,
            Answer::Verdict(read),
            &access,
        );
        assert_eq!(regs.x, [0; 31]);
        assert_eq!(regs.pc, PC + 4);
    }

    /// The vCPU was sent to its EL1 vector with an Undefined Instruction
    /// exception for the access at `PC`.
    fn assert_undefined(sys: &FakeSysRegs, regs: &GuestRegs) {
        assert_eq!(sys.el1_exceptions, 1);
        assert_eq!(sys.esr_el1, ((ec::UNKNOWN as u64) << 26) | ESR_IL);
        assert_eq!(sys.elr_el1, PC);
        assert_eq!(sys.spsr_el1, PSTATE_MODE_EL1H);
        assert_eq!(regs.pc, VBAR + 0x200);
        assert_eq!(regs.pstate, PSTATE_DAIF | PSTATE_MODE_EL1H | PSTATE_TCO);
    }

    #[test]
    fn anything_but_a_fitting_verdict_fails_closed() {
        let write = access_of(&Trap::decode(sysreg_esr(3, 0, 1, 0, 6, 5, false)));
        let read = access_of(&Trap::decode(sysreg_esr(3, 0, 0, 4, 1, 5, true)));
        let verdict = |action: u32| {
            Answer::Verdict(Verdict {
                action,
                value: 0x55,
                ..Default::default()
            })
        };
        for (answer, access) in [
            // Emulating a read for an MSR.
            (verdict(Action::EmulateRead as u32), write),
            (verdict(Action::InjectUndef as u32), read),
            // An action the ABI does not define.
            (verdict(7), read),
            (Answer::Refused, write),
        ] {
            let mut sys = fake();
            let mut regs = host_at_el1();
            apply_verdict(&mut sys, &mte_cpu(), &mut regs, answer, &access);
            assert_undefined(&sys, &regs);
            assert_eq!(regs.x[5], 0, "{answer:?}");
        }
    }

    #[test]
    fn an_interrupted_decision_runs_the_instruction_again() {
        let access = access_of(&Trap::decode(sysreg_esr(3, 0, 1, 0, 6, 5, false)));
        let mut sys = fake();
        let mut regs = host_at_el1();
        apply_verdict(
            &mut sys,
            &mte_cpu(),
            &mut regs,
            Answer::Interrupted,
            &access,
        );
        assert_eq!(regs, host_at_el1());
        assert_eq!(sys, fake());
    }

    #[test]
    fn an_abort_sets_far_el1_and_an_undefined_instruction_does_not() {
        let mut sys = fake();
        sys.far_el1 = 0x77;
        let mut regs = host_at_el1();
        inject_undef(&mut sys, &CpuFeatures::default(), &mut regs);
        assert_eq!(sys.far_el1, 0x77);
        // Without MTE, TCO is not set on entry.
        assert_eq!(regs.pstate, PSTATE_DAIF | PSTATE_MODE_EL1H);
        let mut sys = fake();
        let mut regs = host_at_el1();
        inject_abort(&mut sys, &mte_cpu(), &mut regs, false, true, 0x4020_0000);
        assert_eq!(sys.far_el1, 0x4020_0000);
        assert_eq!(sys.esr_el1 >> 26, u64::from(ec::DABT_CUR));
        assert_eq!(sys.esr_el1 & (1 << 6), 1 << 6, "WnR kept");
        assert_eq!(regs.pc, VBAR + 0x200);
    }
}
