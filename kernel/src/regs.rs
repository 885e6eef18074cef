//! The register frame of a partition's vCPU as the exception vectors save it.

/// General-purpose registers, PC and PSTATE of a stopped vCPU.
///
/// The layout is shared with `arch/vectors.S`: `x[n]` at `8 * n`, `pc` at 248,
/// `pstate` at 256. Compile-time assertions below keep the two in step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct GuestRegs {
    pub x: [u64; 31],
    /// ELR_EL2 at the exception: where the vCPU resumes.
    pub pc: u64,
    /// SPSR_EL2 at the exception: the vCPU's PSTATE.
    pub pstate: u64,
}

const _: () = {
    assert!(core::mem::offset_of!(GuestRegs, x) == 0);
    assert!(core::mem::offset_of!(GuestRegs, pc) == 248);
    assert!(core::mem::offset_of!(GuestRegs, pstate) == 256);
    assert!(core::mem::size_of::<GuestRegs>() == 264);
};

impl GuestRegs {
    /// A vCPU about to enter EL1h with all of DAIF masked at `entry`, with
    /// `x0` as its first argument: the state the Linux boot protocol and PSCI
    /// CPU_ON both promise.
    pub const fn el1h_entry(entry: u64, x0: u64) -> Self {
        let mut x = [0; 31];
        x[0] = x0;
        Self {
            x,
            pc: entry,
            pstate: crate::inject::PSTATE_DAIF | crate::inject::PSTATE_MODE_EL1H,
        }
    }

    /// Reads `Xn` as an instruction's register field names it (31 = XZR).
    pub fn read_gpr(&self, n: u8) -> u64 {
        match self.x.get(usize::from(n)) {
            Some(v) => *v,
            None => 0,
        }
    }

    /// Writes `Xn` (writes to 31, the zero register, are dropped).
    pub fn write_gpr(&mut self, n: u8, value: u64) {
        if let Some(slot) = self.x.get_mut(usize::from(n)) {
            *slot = value;
        }
    }

    /// Places an SMCCC result in x0..x3.
    pub fn set_smccc_result(&mut self, r: [u64; 4]) {
        self.x[..4].copy_from_slice(&r);
    }
}
