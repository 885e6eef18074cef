//! Traps from partitions: decode, route, apply.
//!
//! `handle_lower_exception` is what the vectors call with the stopped vCPU's
//! frame. It returns the frame to resume. Nothing a partition does may crash
//! the core: every class is either served, turned into the exception the
//! architecture would have raised, or logged and refused.

use crate::arch::sysreg;
use crate::dispatch::hvc;
use crate::partition::cpu;
use crate::partition::service;
use moat_abi::hypercall;
use moat_abi::trap::{SysRegAccess as SysRegDesc, TrapClass, TrapDescriptor};
use moat_kernel::esr::{StageTwoAbort, SysRegAccess, Trap};
use moat_kernel::inject::{self, El1Context, Injection};
use moat_kernel::regs::GuestRegs;

use crate::partition::cpu::LOWER_SYNC;
use moat_kernel::esr::HVC0 as ESR_HVC0;

#[unsafe(no_mangle)]
extern "C" fn handle_lower_exception(frame: *mut GuestRegs, vector_kind: u64) -> *mut GuestRegs {
    if crate::base::panic::is_stopping() {
        crate::base::panic::park();
    }
    let esr = sysreg::esr_el2();
    // SAFETY: TPIDR_EL2 pointed at a vCPU frame, which the vector just
    // filled; the vCPU is stopped while the core runs.
    let regs = unsafe { &mut *frame };
    // The null hypercall is the floor of every call's cost; answer it first,
    // for any partition (it changes nothing but x0).
    if vector_kind == LOWER_SYNC && esr == ESR_HVC0 && regs.x[0] as u32 == hypercall::NULL {
        regs.x[0] = 0;
        return frame;
    }
    // SAFETY: every frame TPIDR_EL2 names is the first field of a `Vcpu`.
    let kind = unsafe { (*frame.cast::<cpu::Vcpu>()).kind };
    if kind != cpu::VCPU_HOST {
        service::exit_from_service(frame.cast(), vector_kind);
    }
    // A routed service call, when HVCs are not observed: straight to the
    // service, past the general decode (this is every service call's path).
    if vector_kind == LOWER_SYNC
        && esr == ESR_HVC0
        && let Some(routes) = service::routes()
        && !routes.is_observed(TrapClass::Hvc)
        && let Some((index, operation)) = routes.hypercall(regs.x[0] as u32)
    {
        // SAFETY: the host frame is the first field of its PerCpu slot.
        let this_cpu = unsafe { cpu::from_host_frame(frame) };
        hvc::service_call(this_cpu, regs, index, operation);
        return frame;
    }
    host_trap(frame, vector_kind, esr);
    frame
}

/// Every other exception from the host: decoded, shown to the services that
/// observe its class, and handled. Kept out of line so the hot paths above
/// do not pay for its stack frame.
#[inline(never)]
fn host_trap(frame: *mut GuestRegs, vector_kind: u64, esr: u64) {
    // SAFETY: as in `handle_lower_exception`, whose frame this is.
    let regs = unsafe { &mut *frame };
    if vector_kind != LOWER_SYNC {
        unexpected_vector(regs, vector_kind);
        return;
    }
    // SAFETY: the host frame is the first field of its PerCpu slot.
    let this_cpu = unsafe { cpu::from_host_frame(frame) };
    let trap = Trap::decode(esr);
    if service::routes().is_some_and(|r| r.is_observed(class_of(&trap))) {
        service::notify_observers(this_cpu, &describe(&trap, esr, regs, this_cpu.index));
    }
    match trap {
        Trap::Hvc { imm } => hvc::handle_call(this_cpu, regs, imm),
        Trap::Smc { imm } => {
            // A trapped SMC leaves ELR at the SMC itself.
            regs.pc = regs.pc.wrapping_add(4);
            hvc::handle_call(this_cpu, regs, imm);
        }
        Trap::StageTwo(abort) => host_stage2_abort(this_cpu, regs, &abort),
        Trap::SysReg(access) => {
            match service::routes().and_then(|r| r.handler(TrapClass::SysReg)) {
                Some(index) => {
                    let trap = describe(&Trap::SysReg(access), esr, regs, this_cpu.index);
                    decide(this_cpu, regs, index, &trap, &access);
                }
                None => {
                    crate::log!(
                        "host CPU {}: system register access op0={} op1={} CRn={} CRm={} op2={} at {:#x} has no handler: UNDEFINED",
                        this_cpu.index,
                        access.op0,
                        access.op1,
                        access.crn,
                        access.crm,
                        access.op2,
                        regs.pc
                    );
                    inject_undef(regs);
                }
            }
        }
        Trap::Wfx { .. } | Trap::Other { .. } => {
            crate::log!(
                "host CPU {}: unexpected trap ESR_EL2 {esr:#010x} at {:#x}: UNDEFINED",
                this_cpu.index,
                regs.pc
            );
            inject_undef(regs);
        }
    }
}

/// The routing class of a decoded trap.
fn class_of(trap: &Trap) -> TrapClass {
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
pub fn describe(trap: &Trap, esr: u64, regs: &GuestRegs, cpu: usize) -> TrapDescriptor {
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
                    (3, 0, 0) => sysreg::read_id_register(a.crm, a.op2).unwrap_or(0),
                    _ => 0,
                }
            } else {
                regs.read_gpr(a.rt)
            };
        }
        Trap::StageTwo(_) => {
            d.far = sysreg::far_el2();
            d.ipa = sysreg::fault_ipa();
        }
        _ => {}
    }
    d
}

/// Asks the service that handles system-register traps, and applies its
/// verdict. Anything but a well-formed verdict fails closed: the access is
/// UNDEFINED, as on hardware without the feature.
fn decide(
    cpu: &cpu::PerCpu,
    regs: &mut GuestRegs,
    index: usize,
    trap: &TrapDescriptor,
    access: &SysRegAccess,
) {
    let answer = ask(cpu, index, trap);
    apply_verdict(regs, answer, access);
}

/// A handler service's answer to a trapped access.
pub enum Answer {
    Verdict(moat_abi::trap::Verdict),
    /// An interrupt suspended the decision: run the instruction again.
    Interrupted,
    /// No well-formed answer.
    Refused,
}

/// Sends `trap` to handler service `index` for a verdict.
pub fn ask(cpu: &cpu::PerCpu, index: usize, trap: &TrapDescriptor) -> Answer {
    use moat_abi::Error;
    use moat_abi::ipc::MessageHeader;
    use moat_abi::trap::{DECIDE_OPERATION, Verdict};
    use zerocopy::{FromBytes, IntoBytes};
    let Some(s) = service::get(index) else {
        return Answer::Refused;
    };
    let mut body = service::trap_body(trap);
    let header = MessageHeader::call(
        s.interface_id,
        DECIDE_OPERATION,
        s.next_sequence(),
        size_of::<TrapDescriptor>() as u32,
    );
    match s.call(cpu, &header, &mut body, service::Preemption::Allowed) {
        Ok(Ok(len)) if len as usize == size_of::<Verdict>() => {
            match Verdict::read_from_bytes(&body.as_bytes()[..size_of::<Verdict>()]) {
                Ok(v) => Answer::Verdict(v),
                Err(_) => Answer::Refused,
            }
        }
        // The instruction runs again after the interrupt, and the
        // suspended decision is finished then.
        Err(Error::Interrupted) => Answer::Interrupted,
        _ => Answer::Refused,
    }
}

/// Applies a verdict to the trapped partition, whose EL1 state is loaded.
pub fn apply_verdict(regs: &mut GuestRegs, answer: Answer, access: &SysRegAccess) {
    use moat_abi::trap::Action;
    match answer {
        Answer::Verdict(verdict) => match verdict.action() {
            Some(Action::Skip) => regs.pc = regs.pc.wrapping_add(4),
            Some(Action::EmulateRead) if access.is_read => {
                regs.write_gpr(access.rt, verdict.value);
                regs.pc = regs.pc.wrapping_add(4);
            }
            _ => inject_undef(regs),
        },
        Answer::Interrupted => {}
        Answer::Refused => inject_undef(regs),
    }
}

fn el1_context() -> El1Context {
    El1Context {
        vbar_el1: sysreg::vbar_el1(),
        sctlr_el1: sysreg::sctlr_el1(),
        mte_implemented: crate::boot::machine().cpu.mte_instructions,
        pan_implemented: crate::boot::machine().cpu.pan,
    }
}

fn apply(regs: &mut GuestRegs, inj: &Injection) {
    sysreg::write_el1_exception(inj.esr_el1, inj.elr_el1, inj.spsr_el1, inj.far_el1);
    regs.pc = inj.pc;
    regs.pstate = inj.pstate;
}

/// Delivers an Undefined Instruction exception for the instruction at `regs.pc`.
pub fn inject_undef(regs: &mut GuestRegs) {
    let inj = inject::undefined_instruction(regs.pc, regs.pstate, &el1_context());
    apply(regs, &inj);
}

/// Delivers a synchronous external abort for the access at `regs.pc`, as
/// a bus error on it would.
pub fn inject_abort(regs: &mut GuestRegs, is_instruction: bool, is_write: bool, far: u64) {
    let inj = inject::external_abort(
        regs.pc,
        regs.pstate,
        &el1_context(),
        is_instruction,
        is_write,
        far,
    );
    apply(regs, &inj);
}

/// The host touched an IPA its stage-2 does not map: memory it does not own.
/// It gets a synchronous external abort, as a bus error on that access would
/// give it; the core keeps running.
fn host_stage2_abort(cpu: &cpu::PerCpu, regs: &mut GuestRegs, abort: &StageTwoAbort) {
    let far = sysreg::far_el2();
    let ipa = sysreg::fault_ipa();
    // The GIC's withheld pages (the ITS and LPI registers) are emulated.
    if crate::device::its::handle_abort(cpu, regs, abort, ipa) {
        return;
    }
    crate::log!(
        "host {} at {:#x} to IPA {ipa:#x} denied ({:?}): synchronous external abort injected",
        if abort.is_instruction {
            "fetch"
        } else if abort.is_write {
            "write"
        } else {
            "read"
        },
        regs.pc,
        abort.fault
    );
    inject_abort(regs, abort.is_instruction, abort.is_write, far);
}

fn unexpected_vector(regs: &GuestRegs, kind: u64) {
    // IRQ/FIQ/SError are routed to EL1 (HCR_EL2.IMO/FMO/AMO clear) and
    // AArch32 EL1 is disabled (HCR_EL2.RW), so these cannot happen on a
    // correctly configured CPU; report and resume.
    crate::log!(
        "unexpected exception vector {kind} from a partition at {:#x}; resuming",
        regs.pc
    );
}
