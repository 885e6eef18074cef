//! Exceptions delivered to a partition, as the architecture would have
//! raised them, on this CPU's registers: `moat_kernel::verdict` decides and
//! writes through the `SysRegs` seam. Used by every layer that refuses a
//! partition's access (dispatch, the VMs, the device emulation).

use crate::arch::sysreg::Hw;
use crate::base::state::machine;
use moat_kernel::regs::GuestRegs;
use moat_kernel::verdict;

/// Delivers an Undefined Instruction exception for the instruction at `regs.pc`.
pub fn inject_undef(regs: &mut GuestRegs) {
    verdict::inject_undef(&mut Hw, &machine().cpu, regs);
}

/// Delivers a synchronous external abort for the access at `regs.pc`, as
/// a bus error on it would.
pub fn inject_abort(regs: &mut GuestRegs, is_instruction: bool, is_write: bool, far: u64) {
    verdict::inject_abort(&mut Hw, &machine().cpu, regs, is_instruction, is_write, far);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::sysreg::with_regs;
    use moat_kernel::esr::exception_class;

    /// Exception classes: unknown reason, data abort from the current EL.
    const EC_UNKNOWN: u8 = 0x00;
    const EC_DATA_ABORT_SAME_EL: u8 = 0x25;

    /// EL1h with interrupts masked, as a kernel runs.
    const EL1H: u64 = 0x3c5;

    fn regs_at(pc: u64) -> GuestRegs {
        // The machine record the injection reads (its CPU features).
        crate::memory::tests::world();
        let mut regs = GuestRegs {
            x: [0; 31],
            pc,
            pstate: EL1H,
        };
        regs.x[0] = 7;
        regs
    }

    #[test]
    fn an_undefined_instruction_goes_to_the_el1_vector_with_its_syndrome() {
        with_regs(|r| r.vbar_el1 = 0xffff_8000_1000_0000);
        let mut regs = regs_at(0xffff_8000_0020_0004);
        inject_undef(&mut regs);
        with_regs(|r| {
            assert_eq!(r.el1_exceptions, 1);
            assert_eq!(r.elr_el1, 0xffff_8000_0020_0004);
            assert_eq!(r.spsr_el1, EL1H);
            assert_eq!(exception_class(r.esr_el1), EC_UNKNOWN);
        });
        // Current EL with SP_ELx: the synchronous vector at +0x200.
        assert_eq!(regs.pc, 0xffff_8000_1000_0200);
        assert_eq!(regs.x[0], 7, "the general registers are left alone");
    }

    #[test]
    fn an_abort_carries_its_address() {
        with_regs(|r| r.vbar_el1 = 0x4000_0000);
        let mut regs = regs_at(0x4008_0000);
        inject_abort(&mut regs, false, true, 0x1234_5678);
        with_regs(|r| {
            assert_eq!(r.el1_exceptions, 1);
            assert_eq!(r.far_el1, 0x1234_5678);
            assert_eq!(exception_class(r.esr_el1), EC_DATA_ABORT_SAME_EL);
            // WnR: the access was a write.
            assert_ne!(r.esr_el1 & (1 << 6), 0);
        });
        assert_eq!(regs.pc, 0x4000_0200);
    }
}
