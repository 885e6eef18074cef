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
    lower_exception(frame, vector_kind)
}

/// The trap entry's body, apart so that the host tests can leave a nested
/// run through it (an unwind, which an `extern "C"` function may not pass).
#[inline(always)]
fn lower_exception(frame: *mut GuestRegs, vector_kind: u64) -> *mut GuestRegs {
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

#[cfg(test)]
mod tests {
    //! Traps through the core's trap entry, as the vectors take them: the
    //! syndrome in ESR_EL2 (the fake's registers), the partition's saved
    //! frame, the vector's kind. Over the services' machine
    //! (`partition::service::tests`), where ECHO observes SMCs, decides
    //! system-register traps and serves the routed range's first
    //! functions; its runs are scripted, and a partition's own trap may
    //! leave its run through this same entry.

    use super::*;
    use crate::arch::sysreg::with_regs;
    use crate::arch::{entries_left, on_entry};
    use crate::base::cpu::{LOWER_IRQ, Vcpu};
    use crate::dispatch::hvc::tests::{call, frame, host_regs};
    use crate::partition::service::tests::{
        ECHO, answer, cpu, read_call, reply_wait, services, write_reply,
    };
    use moat_abi::Error;
    use moat_abi::ipc::MessageHeader;
    use moat_abi::trap::Verdict;
    use moat_kernel::esr::{ESR_IL, ec};

    /// The host's EL1 vector base; a synchronous exception it takes from
    /// EL1h lands 0x200 past it.
    const VBAR: u64 = 0x4100_0000;
    const EL1H_SYNC: u64 = VBAR + 0x200;
    /// The trapping instruction's address.
    const PC: u64 = 0x8_1000;

    fn esr(class: u8, iss: u64) -> u64 {
        (u64::from(class) << 26) | ESR_IL | iss
    }

    /// An MRS (`read`) or MSR of GCR_EL1 (op0 3, op1 0, CRn 1, CRm 0, op2
    /// 6) with register `rt`.
    fn gcr_el1(read: bool, rt: u64) -> u64 {
        esr(
            ec::SYS64,
            (3 << 20) | (6 << 17) | (1 << 10) | (rt << 5) | u64::from(read),
        )
    }

    /// The host traps with `esr` at [`PC`] (or past its HVC) with `regs`:
    /// the trap entry gets the host's frame, which is returned.
    fn host_trap(esr: u64, mut regs: GuestRegs, vector: u64) -> GuestRegs {
        with_regs(|r| {
            r.esr_el2 = esr;
            r.vbar_el1 = VBAR;
        });
        regs.pc = PC;
        let frame = cpu(0).host_frame();
        // SAFETY: CPU 0's host frame, which only the test holding the turn
        // touches.
        unsafe { *frame = regs };
        assert_eq!(lower_exception(frame, vector), frame);
        // SAFETY: as above.
        unsafe { *frame }
    }

    /// How many exceptions the core has given EL1, and the last one's ESR,
    /// ELR and FAR.
    fn el1_exceptions() -> (u32, u64, u64, u64) {
        with_regs(|r| (r.el1_exceptions, r.esr_el1, r.elr_el1, r.far_el1))
    }

    /// The ECHO service answers a decision with `verdict`, after checking
    /// it was asked about the trap with syndrome `esr`.
    fn decide(esr: u64, verdict: Verdict) {
        on_entry(move |v| {
            let (call, body) = read_call(ECHO);
            assert_eq!(call.operation, moat_abi::trap::DECIDE_OPERATION);
            assert_eq!(body[0] as u32, TrapClass::SysReg as u32);
            assert_eq!(body[1..3], [esr, PC]);
            let words: [u64; 2] = zerocopy::transmute!(verdict);
            write_reply(ECHO, &MessageHeader::reply_to(&call, Ok(()), 16), &words);
            reply_wait(v);
        });
    }

    fn verdict(action: u32, value: u64) -> Verdict {
        Verdict {
            action,
            reserved: 0,
            value,
        }
    }

    #[test]
    fn the_hosts_calls_reach_the_call_handlers_through_the_trap_entry() {
        let _turn = services();
        // An HVC: ELR is already past it; the answer is in x0..x3.
        let regs = host_trap(ESR_HVC0, host_regs(hypercall::ABI_VERSION, &[]), LOWER_SYNC);
        assert_eq!((regs.pc, regs.x[1]), (PC, u64::from(moat_abi::ABI_VERSION)));
        // A non-zero immediate is reserved.
        let regs = host_trap(ESR_HVC0 | 5, host_regs(hypercall::NULL, &[]), LOWER_SYNC);
        assert_eq!(regs.x[0], moat_abi::smccc::NOT_SUPPORTED);
        // A routed function goes straight to its service.
        let function = hypercall::id(hypercall::SERVICE_RANGE_START);
        answer(ECHO, vec![0x55], |_| {});
        let regs = host_trap(ESR_HVC0, host_regs(function, &[1]), LOWER_SYNC);
        assert_eq!(regs.x[..3], [0, 0x55, 0]);
        // An SMC: ELR is at it, so the core steps past it; ECHO observes
        // SMCs and hears of it first, with the syndrome and the address.
        let smc = esr(ec::SMC64, 0);
        on_entry(move |v| {
            let (call, body) = read_call(ECHO);
            assert_eq!(call.operation, moat_abi::trap::OBSERVE_OPERATION);
            assert_eq!(body[0] as u32, TrapClass::Smc as u32);
            assert_eq!(body[1..3], [smc, PC]);
            write_reply(ECHO, &MessageHeader::reply_to(&call, Ok(()), 0), &[]);
            reply_wait(v);
        });
        let regs = host_trap(
            smc,
            host_regs(moat_abi::smccc::SMCCC_VERSION, &[]),
            LOWER_SYNC,
        );
        assert_eq!(
            (regs.pc, regs.x[0]),
            (PC + 4, moat_abi::smccc::IMPLEMENTED_VERSION)
        );
        assert_eq!(entries_left(), 0);
    }

    #[test]
    fn the_hosts_mte_register_traps_get_the_policys_verdict_applied_to_its_frame() {
        let _turn = services();
        let mut regs = host_regs(0, &[]);
        regs.x[5] = 0x5555;
        // The policy says UNDEF: the host takes an Undefined Instruction
        // exception at the MRS, x5 untouched.
        let (count, ..) = el1_exceptions();
        let mrs = gcr_el1(true, 5);
        decide(mrs, verdict(Action::InjectUndef as u32, 0));
        let after = host_trap(mrs, regs, LOWER_SYNC);
        assert_eq!((after.pc, after.x[5]), (EL1H_SYNC, 0x5555));
        let (n, esr_el1, elr, _) = el1_exceptions();
        assert_eq!((n, esr_el1 >> 26, elr), (count + 1, 0, PC));
        // Emulated: x5 gets the value, the MRS is stepped over.
        decide(mrs, verdict(Action::EmulateRead as u32, 0x1234));
        let after = host_trap(mrs, regs, LOWER_SYNC);
        assert_eq!((after.pc, after.x[5]), (PC + 4, 0x1234));
        // Skipped: stepped over, nothing written.
        let msr = gcr_el1(false, 5);
        decide(msr, verdict(Action::Skip as u32, 0x1234));
        let after = host_trap(msr, regs, LOWER_SYNC);
        assert_eq!((after.pc, after.x[5]), (PC + 4, 0x5555));
        // An emulated read of a write, an unknown action, a verdict of the
        // wrong size: UNDEF, as on hardware without the register.
        decide(msr, verdict(Action::EmulateRead as u32, 0x1234));
        decide(mrs, verdict(7, 0x1234));
        answer(ECHO, vec![2], |_| {});
        for esr in [msr, mrs, mrs] {
            let after = host_trap(esr, regs, LOWER_SYNC);
            assert_eq!((after.pc, after.x[5]), (EL1H_SYNC, 0x5555));
        }
        assert_eq!(el1_exceptions().0, count + 4);
        assert_eq!(entries_left(), 0);
    }

    use moat_abi::trap::Action;

    #[test]
    fn the_hosts_aborts_and_unexpected_traps_become_the_exceptions_hardware_raises() {
        let _turn = services();
        let regs = host_regs(0, &[]);
        // A write to memory the host does not own: a synchronous external
        // abort at the access, with its address.
        with_regs(|r| {
            r.far_el2 = 0xdead_b000;
            r.fault_ipa = 0xdead_b000;
        });
        let write = esr(ec::DABT_LOW, (1 << 6) | 0x07);
        let after = host_trap(write, regs, LOWER_SYNC);
        let (n, esr_el1, elr, far) = el1_exceptions();
        assert_eq!(after.pc, EL1H_SYNC);
        assert_eq!(
            (esr_el1 >> 26, esr_el1 & (1 << 6), elr, far),
            (u64::from(ec::DABT_CUR), 1 << 6, PC, 0xdead_b000)
        );
        // A read: the same, marked a read.
        let read = esr(ec::DABT_LOW, 0x07);
        host_trap(read, regs, LOWER_SYNC);
        let (_, esr_el1, ..) = el1_exceptions();
        assert_eq!(
            (esr_el1 >> 26, esr_el1 & (1 << 6)),
            (u64::from(ec::DABT_CUR), 0)
        );
        // A fetch: an instruction abort.
        let fetch = esr(ec::IABT_LOW, 0x07);
        host_trap(fetch, regs, LOWER_SYNC);
        assert_eq!(el1_exceptions().1 >> 26, u64::from(ec::IABT_CUR));
        // WFI (the host's are not trapped) and a class the core never
        // enables: UNDEF.
        for class in [ec::WFX, ec::BRK64, ec::UNKNOWN] {
            let after = host_trap(esr(class, 0), regs, LOWER_SYNC);
            assert_eq!(after.pc, EL1H_SYNC);
            assert_eq!(el1_exceptions().1 >> 26, 0);
        }
        assert_eq!(el1_exceptions().0, n + 5);
        // An interrupt vector from the host (routed to EL1, so never
        // seen): reported and resumed, nothing changed.
        let after = host_trap(ESR_HVC0, host_regs(hypercall::NULL, &[7]), LOWER_IRQ);
        assert_eq!(after, {
            let mut r = host_regs(hypercall::NULL, &[7]);
            r.pc = PC;
            r
        });
        assert_eq!(el1_exceptions().0, n + 5);
    }

    /// The partition running on `v` traps through the core's trap entry.
    fn trap_from(v: &mut Vcpu, esr: u64) {
        with_regs(|r| r.esr_el2 = esr);
        let frame = (v as *mut Vcpu).cast::<GuestRegs>();
        lower_exception(frame, LOWER_SYNC);
    }

    #[test]
    fn service_and_vm_traps_are_answered_in_place_or_leave_the_run() {
        let _turn = services();
        // A service's NULL call is answered in place; its SVC_REPLY_WAIT
        // leaves the run, as the vectors' way out of `enter_nested` does.
        let function = hypercall::id(hypercall::SERVICE_RANGE_START + 2);
        on_entry(|v| {
            v.regs.x[0] = u64::from(hypercall::NULL);
            v.regs.x[1] = 0x77;
            trap_from(v, ESR_HVC0);
            assert_eq!(v.regs.x[..2], [0, 0x77]);
            let (call, _) = read_call(ECHO);
            assert_eq!(call.operation, 3);
            write_reply(ECHO, &MessageHeader::reply_to(&call, Ok(()), 8), &[0x99]);
            v.regs.x[0] = u64::from(hypercall::SVC_REPLY_WAIT);
            trap_from(v, ESR_HVC0);
            unreachable!("the service's run went on after its reply");
        });
        let regs = host_trap(ESR_HVC0, host_regs(function, &[]), LOWER_SYNC);
        assert_eq!(regs.x[..2], [0, 0x99]);
        // A VM's likewise: its WFI ends the run, and the host hears why.
        use moat_abi::vm as abi;
        let created = call(abi::VM_CREATE, &[0x8_0000, 0, 1]);
        assert_eq!(created.x[0], 0);
        let handle = created.x[1];
        assert_eq!(call(abi::VM_DONATE, &[handle, frame(8), 1, 0]).x[0], 0);
        on_entry(|v| {
            assert_eq!(v.regs.pc, 0x8_0000);
            v.regs.x[0] = u64::from(hypercall::NULL);
            trap_from(v, ESR_HVC0);
            assert_eq!(v.regs.x[0], 0);
            trap_from(v, esr(ec::WFX, 0));
            unreachable!("the guest's run went on after its WFI");
        });
        let run = host_trap(
            ESR_HVC0,
            host_regs(
                abi::VCPU_RUN,
                &[abi::run_target(handle as u16, 0), 0, 0, 0, 0, 0, 0],
            ),
            LOWER_SYNC,
        );
        assert_eq!(run.x[..2], [0, abi::ExitReason::Wfi as u64]);
        assert_eq!(call(abi::VM_DESTROY, &[handle]).x[0], 0);
        assert_eq!(call(abi::VM_RECLAIM, &[handle, frame(8), 1]).x[0], 0);
        assert_eq!(
            Error::from_x0(call(abi::VM_DESTROY, &[handle]).x[0]),
            Some(Err(Error::InvalidParameters))
        );
        assert_eq!(entries_left(), 0);
    }
}
