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
