//! The FP/SIMD and SVE registers, which the core itself never uses: a VM
//! run saves the host's and loads the guest's, and back.

/// The FP/SIMD registers: the core itself never uses them, so the host's
/// stay live in the CPU except while a VM runs (`partition::vm` switches
/// them).
#[derive(Clone, Copy)]
#[repr(C, align(16))]
pub struct FpState {
    q: [u128; 32],
    fpsr: u64,
    fpcr: u64,
}

impl FpState {
    pub const ZERO: Self = Self {
        q: [0; 32],
        fpsr: 0,
        fpcr: 0,
    };

    pub fn save(&mut self) {
        let p = self as *mut Self as u64;
        // SAFETY: stores the 32 vector registers and FPSR/FPCR into `self`
        // (repr(C), 16-byte aligned, 528 bytes); CPTR_EL2.TFP is clear for
        // the core while a VM is being switched.
        unsafe {
            core::arch::asm!(
                ".arch_extension fp",
                ".arch_extension simd",
                "stp q0, q1, [{p}, #0]", "stp q2, q3, [{p}, #32]",
                "stp q4, q5, [{p}, #64]", "stp q6, q7, [{p}, #96]",
                "stp q8, q9, [{p}, #128]", "stp q10, q11, [{p}, #160]",
                "stp q12, q13, [{p}, #192]", "stp q14, q15, [{p}, #224]",
                "stp q16, q17, [{p}, #256]", "stp q18, q19, [{p}, #288]",
                "stp q20, q21, [{p}, #320]", "stp q22, q23, [{p}, #352]",
                "stp q24, q25, [{p}, #384]", "stp q26, q27, [{p}, #416]",
                "stp q28, q29, [{p}, #448]", "stp q30, q31, [{p}, #480]",
                "mrs {t}, fpsr", "str {t}, [{p}, #512]",
                "mrs {t}, fpcr", "str {t}, [{p}, #520]",
                p = in(reg) p, t = out(reg) _,
                options(nostack, preserves_flags),
            );
        }
    }

    pub fn load(&self) {
        let p = self as *const Self as u64;
        // SAFETY: the inverse of `save`; the vector registers belong to
        // whichever partition runs next.
        unsafe {
            core::arch::asm!(
                ".arch_extension fp",
                ".arch_extension simd",
                "ldp q0, q1, [{p}, #0]", "ldp q2, q3, [{p}, #32]",
                "ldp q4, q5, [{p}, #64]", "ldp q6, q7, [{p}, #96]",
                "ldp q8, q9, [{p}, #128]", "ldp q10, q11, [{p}, #160]",
                "ldp q12, q13, [{p}, #192]", "ldp q14, q15, [{p}, #224]",
                "ldp q16, q17, [{p}, #256]", "ldp q18, q19, [{p}, #288]",
                "ldp q20, q21, [{p}, #320]", "ldp q22, q23, [{p}, #352]",
                "ldp q24, q25, [{p}, #384]", "ldp q26, q27, [{p}, #416]",
                "ldp q28, q29, [{p}, #448]", "ldp q30, q31, [{p}, #480]",
                "ldr {t}, [{p}, #512]", "msr fpsr, {t}",
                "ldr {t}, [{p}, #520]", "msr fpcr, {t}",
                p = in(reg) p, t = out(reg) _,
                options(nostack, preserves_flags),
            );
        }
    }

    /// Saves only FPSR and FPCR (the V registers are saved as part of Z).
    pub fn save_control(&mut self) {
        // SAFETY: reads FPSR and FPCR; CPTR_EL2.TFP is clear here.
        unsafe {
            core::arch::asm!(
                ".arch_extension fp",
                "mrs {s}, fpsr", "mrs {c}, fpcr",
                s = out(reg) self.fpsr, c = out(reg) self.fpcr,
                options(nomem, nostack, preserves_flags),
            );
        }
    }

    /// Loads only FPSR and FPCR.
    pub fn load_control(&self) {
        // SAFETY: writes FPSR and FPCR, the host's own, back.
        unsafe {
            core::arch::asm!(
                ".arch_extension fp",
                "msr fpsr, {s}", "msr fpcr, {c}",
                s = in(reg) self.fpsr, c = in(reg) self.fpcr,
                options(nomem, nostack, preserves_flags),
            );
        }
    }
}

/// The SVE vector length in force at EL2, in bytes.
pub fn sve_vector_bytes() -> u64 {
    let vl: u64;
    // SAFETY: reads the vector length at EL2; runs under the host's
    // CPTR_EL2, which does not trap SVE.
    unsafe {
        core::arch::asm!(".arch_extension sve", "rdvl {}, #1", out(reg) vl, options(nomem, nostack, preserves_flags))
    };
    vl
}

/// Stores Z0..Z31 at the EL2 vector length into `area`.
///
/// # Safety
///
/// `area` holds 32 registers at the vector length in force
/// ([`sve_vector_bytes`]), PSTATE.SM is clear, and the host's CPTR_EL2
/// (which does not trap SVE) is in force.
pub unsafe fn save_z(area: &mut [u8]) {
    let p = area.as_mut_ptr();
    // SAFETY: per the function contract, the stores stay inside `area`.
    unsafe {
        core::arch::asm!(
            ".arch_extension sve",
            "str z0, [{p}, #0, mul vl]", "str z1, [{p}, #1, mul vl]",
            "str z2, [{p}, #2, mul vl]", "str z3, [{p}, #3, mul vl]",
            "str z4, [{p}, #4, mul vl]", "str z5, [{p}, #5, mul vl]",
            "str z6, [{p}, #6, mul vl]", "str z7, [{p}, #7, mul vl]",
            "str z8, [{p}, #8, mul vl]", "str z9, [{p}, #9, mul vl]",
            "str z10, [{p}, #10, mul vl]", "str z11, [{p}, #11, mul vl]",
            "str z12, [{p}, #12, mul vl]", "str z13, [{p}, #13, mul vl]",
            "str z14, [{p}, #14, mul vl]", "str z15, [{p}, #15, mul vl]",
            "str z16, [{p}, #16, mul vl]", "str z17, [{p}, #17, mul vl]",
            "str z18, [{p}, #18, mul vl]", "str z19, [{p}, #19, mul vl]",
            "str z20, [{p}, #20, mul vl]", "str z21, [{p}, #21, mul vl]",
            "str z22, [{p}, #22, mul vl]", "str z23, [{p}, #23, mul vl]",
            "str z24, [{p}, #24, mul vl]", "str z25, [{p}, #25, mul vl]",
            "str z26, [{p}, #26, mul vl]", "str z27, [{p}, #27, mul vl]",
            "str z28, [{p}, #28, mul vl]", "str z29, [{p}, #29, mul vl]",
            "str z30, [{p}, #30, mul vl]", "str z31, [{p}, #31, mul vl]",
            p = in(reg) p,
            options(nostack, preserves_flags),
        );
    }
}

/// Loads Z0..Z31 back from `area`, right after `sysreg::switch_el2`
/// returned the CPU to the host's controls.
///
/// # Safety
///
/// As for [`save_z`]: `area` is what it saved, at the same vector length.
pub unsafe fn load_z(area: &[u8]) {
    let p = area.as_ptr();
    // The host's CPTR_EL2, which lets SVE through, must be in effect before
    // the first SVE instruction: a direct write needs a context
    // synchronization event (`switch_el2` leaves it to the ERET, which
    // comes too late here), hence the ISB first.
    // SAFETY: per the function contract; the loads stay inside `area`.
    unsafe {
        core::arch::asm!("isb", options(nostack, preserves_flags));
        core::arch::asm!(
            ".arch_extension sve",
            "ldr z0, [{p}, #0, mul vl]", "ldr z1, [{p}, #1, mul vl]",
            "ldr z2, [{p}, #2, mul vl]", "ldr z3, [{p}, #3, mul vl]",
            "ldr z4, [{p}, #4, mul vl]", "ldr z5, [{p}, #5, mul vl]",
            "ldr z6, [{p}, #6, mul vl]", "ldr z7, [{p}, #7, mul vl]",
            "ldr z8, [{p}, #8, mul vl]", "ldr z9, [{p}, #9, mul vl]",
            "ldr z10, [{p}, #10, mul vl]", "ldr z11, [{p}, #11, mul vl]",
            "ldr z12, [{p}, #12, mul vl]", "ldr z13, [{p}, #13, mul vl]",
            "ldr z14, [{p}, #14, mul vl]", "ldr z15, [{p}, #15, mul vl]",
            "ldr z16, [{p}, #16, mul vl]", "ldr z17, [{p}, #17, mul vl]",
            "ldr z18, [{p}, #18, mul vl]", "ldr z19, [{p}, #19, mul vl]",
            "ldr z20, [{p}, #20, mul vl]", "ldr z21, [{p}, #21, mul vl]",
            "ldr z22, [{p}, #22, mul vl]", "ldr z23, [{p}, #23, mul vl]",
            "ldr z24, [{p}, #24, mul vl]", "ldr z25, [{p}, #25, mul vl]",
            "ldr z26, [{p}, #26, mul vl]", "ldr z27, [{p}, #27, mul vl]",
            "ldr z28, [{p}, #28, mul vl]", "ldr z29, [{p}, #29, mul vl]",
            "ldr z30, [{p}, #30, mul vl]", "ldr z31, [{p}, #31, mul vl]",
            p = in(reg) p,
            options(nostack, preserves_flags),
        );
    }
}
