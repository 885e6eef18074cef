//! Traps from partitions: decode, route, apply.
//!
//! `handle_lower_exception` is what the vectors call with the stopped vCPU's
//! frame. It returns the frame to resume. Nothing a partition does may crash
//! the core: every class is either served, turned into the exception the
//! architecture would have raised, or logged and refused.

use crate::arch::sysreg;
use crate::arch::sysreg::Hw;
use crate::base::cpu;
use crate::base::inject::{inject_abort, inject_undef};
use crate::base::state::machine;
use crate::dispatch::hvc;
use crate::partition::service;
use moat_abi::hypercall;
use moat_abi::trap::{TrapClass, TrapDescriptor};
use moat_kernel::esr::{StageTwoAbort, SysRegAccess, Trap};
use moat_kernel::regs::GuestRegs;
use moat_kernel::verdict::{self, class_of};

use crate::base::cpu::LOWER_SYNC;
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
    // SAFETY: every frame TPIDR_EL2 names is the first field of a `Vcpu`.
    let kind = unsafe { (*frame.cast::<cpu::Vcpu>()).kind };
    if kind != cpu::VCPU_HOST {
        // The null hypercall changes nothing but x0: a VM's or a service's
        // is answered here. (The host's is answered in the vector,
        // `vectors.S`, and reaches this function only once the machine is
        // stopping, which parked above.)
        if vector_kind == LOWER_SYNC && esr == ESR_HVC0 && regs.x[0] as u32 == hypercall::NULL {
            regs.x[0] = 0;
            return frame;
        }
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
    let answer = service::ask(cpu, index, trap);
    verdict::apply_verdict(&mut Hw, &machine().cpu, regs, answer, access);
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

/// The typed descriptor services receive, read from this CPU's registers.
fn describe(trap: &Trap, esr: u64, regs: &GuestRegs, cpu: usize) -> TrapDescriptor {
    verdict::describe(&Hw, trap, esr, regs, cpu)
}
