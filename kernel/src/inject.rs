//! Injecting synchronous exceptions into EL1, exactly as the architecture
//! would have delivered them.
//!
//! When the core turns a trap into an exception for the partition (an
//! Undefined Instruction for a hidden system register, a synchronous external
//! abort for memory the partition may not touch), the partition must not be
//! able to tell it from the real thing: the syndrome, the return address, the
//! saved PSTATE, the vector and the new PSTATE all follow the rules of
//! "taking an exception to EL1" (Arm ARM D1.3, AArch64.TakeException).
//!
//! The functions here are pure: they compute the register values from the
//! trapped state, and the EL2 side writes them.

use crate::esr::{ESR_IL, ec};

pub const PSTATE_N_Z_C_V: u64 = 0xf << 28;
pub const PSTATE_TCO: u64 = 1 << 25;
pub const PSTATE_DIT: u64 = 1 << 24;
pub const PSTATE_UAO: u64 = 1 << 23;
pub const PSTATE_PAN: u64 = 1 << 22;
pub const PSTATE_SS: u64 = 1 << 21;
pub const PSTATE_IL: u64 = 1 << 20;
pub const PSTATE_SSBS: u64 = 1 << 12;
pub const PSTATE_BTYPE: u64 = 3 << 10;
pub const PSTATE_DAIF: u64 = 0xf << 6;
/// AArch32 execution state bit of SPSR.M.
pub const PSTATE_MODE_RW32: u64 = 1 << 4;
pub const PSTATE_MODE_MASK: u64 = 0xf;
pub const PSTATE_MODE_EL0T: u64 = 0b0000;
pub const PSTATE_MODE_EL1T: u64 = 0b0100;
pub const PSTATE_MODE_EL1H: u64 = 0b0101;

/// SCTLR_EL1.SPAN: 0 means PAN is set on exception entry to EL1.
pub const SCTLR_EL1_SPAN: u64 = 1 << 23;
/// SCTLR_EL1.DSSBS: the value PSTATE.SSBS takes on exception entry.
pub const SCTLR_EL1_DSSBS: u64 = 1 << 44;

/// Synchronous external abort, not on a translation table walk (DFSC/IFSC).
pub const FSC_SEA: u64 = 0x10;

/// The EL1 state an injection depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct El1Context {
    pub vbar_el1: u64,
    pub sctlr_el1: u64,
    /// FEAT_MTE is implemented, so PSTATE.TCO is set on exception entry.
    pub mte_implemented: bool,
    /// FEAT_PAN is implemented, so PSTATE.PAN follows SCTLR_EL1.SPAN.
    pub pan_implemented: bool,
}

/// The register writes that deliver a synchronous exception to EL1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    pub esr_el1: u64,
    /// `Some` only for aborts, whose FAR is architecturally valid.
    pub far_el1: Option<u64>,
    /// The preferred return address: the faulting instruction itself.
    pub elr_el1: u64,
    /// The interrupted PSTATE.
    pub spsr_el1: u64,
    /// Where the partition resumes: its vector.
    pub pc: u64,
    /// PSTATE at the vector.
    pub pstate: u64,
}

/// Where the exception vector for a synchronous exception to EL1 lies,
/// relative to VBAR_EL1, given the interrupted PSTATE.
pub const fn sync_vector_offset(old_pstate: u64) -> u64 {
    if old_pstate & PSTATE_MODE_RW32 != 0 {
        0x600 // lower EL, AArch32
    } else {
        match old_pstate & PSTATE_MODE_MASK {
            PSTATE_MODE_EL1T => 0x000, // current EL, SP_EL0
            PSTATE_MODE_EL1H => 0x200, // current EL, SP_EL1
            _ => 0x400,                // lower EL (EL0), AArch64
        }
    }
}

/// Whether the interrupted context was at EL1 (rather than EL0).
pub const fn was_el1(old_pstate: u64) -> bool {
    old_pstate & PSTATE_MODE_RW32 == 0
        && matches!(
            old_pstate & PSTATE_MODE_MASK,
            PSTATE_MODE_EL1T | PSTATE_MODE_EL1H
        )
}

/// PSTATE on entry to EL1h for a synchronous exception.
pub const fn entry_pstate(old_pstate: u64, el1: &El1Context) -> u64 {
    // Kept: the condition flags, DIT and PAN; everything else starts afresh
    // (SS, IL, BTYPE, UAO and the old mode are cleared).
    let mut new = old_pstate & (PSTATE_N_Z_C_V | PSTATE_DIT | PSTATE_PAN);
    new |= PSTATE_DAIF | PSTATE_MODE_EL1H;
    if el1.pan_implemented && el1.sctlr_el1 & SCTLR_EL1_SPAN == 0 {
        new |= PSTATE_PAN;
    }
    if el1.sctlr_el1 & SCTLR_EL1_DSSBS != 0 {
        new |= PSTATE_SSBS;
    }
    if el1.mte_implemented {
        new |= PSTATE_TCO;
    }
    new
}

/// An Undefined Instruction exception (EC 0) for the instruction at `pc`.
pub const fn undefined_instruction(pc: u64, old_pstate: u64, el1: &El1Context) -> Injection {
    Injection {
        esr_el1: ((ec::UNKNOWN as u64) << 26) | ESR_IL,
        far_el1: None,
        elr_el1: pc,
        spsr_el1: old_pstate,
        pc: el1.vbar_el1.wrapping_add(sync_vector_offset(old_pstate)),
        pstate: entry_pstate(old_pstate, el1),
    }
}

/// A synchronous external abort on the access at `pc` to `far`.
///
/// The syndrome is what a bus error on that access would give: a data or
/// instruction abort from the current EL (or from EL0), DFSC/IFSC = SEA, with
/// WnR kept for data accesses and FAR valid.
pub const fn external_abort(
    pc: u64,
    old_pstate: u64,
    el1: &El1Context,
    is_instruction: bool,
    is_write: bool,
    far: u64,
) -> Injection {
    let from_el1 = was_el1(old_pstate);
    let class = match (is_instruction, from_el1) {
        (true, true) => ec::IABT_CUR,
        (true, false) => ec::IABT_LOW,
        (false, true) => ec::DABT_CUR,
        (false, false) => ec::DABT_LOW,
    };
    let mut iss = FSC_SEA;
    if !is_instruction && is_write {
        iss |= 1 << 6; // WnR
    }
    Injection {
        esr_el1: ((class as u64) << 26) | ESR_IL | iss,
        far_el1: Some(far),
        elr_el1: pc,
        spsr_el1: old_pstate,
        pc: el1.vbar_el1.wrapping_add(sync_vector_offset(old_pstate)),
        pstate: entry_pstate(old_pstate, el1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EL1: El1Context = El1Context {
        vbar_el1: 0x4100_0000,
        sctlr_el1: 0,
        mte_implemented: true,
        pan_implemented: true,
    };

    #[test]
    fn undef_from_el1h_goes_to_the_current_el_spx_vector() {
        let old = PSTATE_MODE_EL1H | PSTATE_DAIF | (0x6 << 28);
        let inj = undefined_instruction(0x4020_1000, old, &EL1);
        assert_eq!(inj.esr_el1, 0x0200_0000); // EC 0, IL
        assert_eq!(inj.elr_el1, 0x4020_1000); // not advanced
        assert_eq!(inj.spsr_el1, old);
        assert_eq!(inj.pc, 0x4100_0200);
        assert_eq!(inj.far_el1, None);
        // NZCV kept, DAIF masked, EL1h, PAN set (SPAN = 0), TCO set (MTE).
        assert_eq!(
            inj.pstate,
            (0x6 << 28) | PSTATE_DAIF | PSTATE_MODE_EL1H | PSTATE_PAN | PSTATE_TCO
        );
    }

    #[test]
    fn vector_offsets_by_origin() {
        assert_eq!(sync_vector_offset(PSTATE_MODE_EL1T), 0x000);
        assert_eq!(sync_vector_offset(PSTATE_MODE_EL1H), 0x200);
        assert_eq!(sync_vector_offset(PSTATE_MODE_EL0T), 0x400);
        assert_eq!(sync_vector_offset(PSTATE_MODE_RW32), 0x600);
    }

    #[test]
    fn span_dssbs_and_mte_shape_the_new_pstate() {
        let el1 = El1Context {
            vbar_el1: 0,
            sctlr_el1: SCTLR_EL1_SPAN | SCTLR_EL1_DSSBS,
            mte_implemented: false,
            pan_implemented: true,
        };
        // SPAN = 1 keeps the old PAN (here clear); DSSBS sets SSBS; no TCO.
        let p = entry_pstate(
            PSTATE_MODE_EL0T | PSTATE_SS | PSTATE_BTYPE | PSTATE_UAO,
            &el1,
        );
        assert_eq!(p, PSTATE_DAIF | PSTATE_MODE_EL1H | PSTATE_SSBS);
        // SPAN = 1 with PAN already set keeps it.
        let p = entry_pstate(PSTATE_MODE_EL1H | PSTATE_PAN, &el1);
        assert_eq!(p & PSTATE_PAN, PSTATE_PAN);
    }

    #[test]
    fn no_pan_without_feat_pan() {
        let el1 = El1Context {
            pan_implemented: false,
            ..EL1
        };
        assert_eq!(entry_pstate(PSTATE_MODE_EL1H, &el1) & PSTATE_PAN, 0);
    }

    #[test]
    fn external_abort_syndromes() {
        let inj = external_abort(0x1000, PSTATE_MODE_EL1H, &EL1, false, true, 0x4020_0000);
        assert_eq!(inj.esr_el1, (0x25 << 26) | ESR_IL | (1 << 6) | 0x10);
        assert_eq!(inj.far_el1, Some(0x4020_0000));
        assert_eq!(inj.elr_el1, 0x1000);
        let inj = external_abort(0x1000, PSTATE_MODE_EL0T, &EL1, false, false, 0x10);
        assert_eq!(inj.esr_el1, (0x24 << 26) | ESR_IL | 0x10);
        assert_eq!(inj.pc, EL1.vbar_el1 + 0x400);
        let inj = external_abort(0x1000, PSTATE_MODE_EL1H, &EL1, true, true, 0x1000);
        assert_eq!(
            inj.esr_el1,
            (0x21 << 26) | ESR_IL | 0x10,
            "no WnR on fetches"
        );
    }
}
