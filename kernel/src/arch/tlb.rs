//! TLB maintenance for stage-2 changes, broadcast to every CPU of the
//! inner-shareable domain. Each operation acts on the VMID that
//! VTTBR_EL2 names on this CPU (the caller loads it first, see
//! `memory::stage2::with_vmid`); none of them changes memory.

/// Makes earlier table writes visible to the table walkers of every CPU,
/// before the invalidations that follow.
pub fn publish_table_writes() {
    // SAFETY: a barrier; no memory effect.
    unsafe { core::arch::asm!("dsb ishst", options(nostack, preserves_flags)) };
}

/// Invalidates the stage-2 entries of the 4 KiB page at `ipa`.
/// Complete it with [`complete_stage2`] before the combined entries go.
pub fn invalidate_stage2_page(ipa: u64) {
    // SAFETY: TLB maintenance by IPA (bits 47:12 in the operand's 35:0);
    // no memory effect.
    unsafe {
        core::arch::asm!("tlbi ipas2e1is, {}", in(reg) ipa >> 12, options(nostack, preserves_flags))
    };
}

/// Waits until the stage-2 invalidations issued so far are complete on
/// every CPU: only then can no walk refill a combined entry from them.
pub fn complete_stage2() {
    // SAFETY: a barrier; no memory effect.
    unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
}

/// Invalidates the combined stage-1+2 entries of the loaded VMID (a by-IPA
/// invalidation does not reach them), and waits for it on every CPU.
pub fn invalidate_combined() {
    // SAFETY: TLB maintenance for the loaded VMID and barriers; no memory
    // effect.
    unsafe {
        core::arch::asm!(
            "dsb ishst",
            "tlbi vmalle1is",
            "dsb ish",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}

/// Invalidates every entry of the loaded VMID, stage-1 and stage-2, and
/// waits for it on every CPU: one broadcast instead of one per page.
pub fn invalidate_vmid() {
    // SAFETY: TLB maintenance for the loaded VMID and barriers; no memory
    // effect.
    unsafe {
        core::arch::asm!(
            "dsb ishst",
            "tlbi vmalls12e1is",
            "dsb ish",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}

/// The VTTBR_EL2 value of this CPU.
pub fn current_vttbr() -> u64 {
    arm_sysregs::read_vttbr_el2().bits()
}

/// Loads `v` into VTTBR_EL2, so that the maintenance that follows names
/// its VMID.
pub fn load_vttbr(v: u64) {
    // SAFETY: `v` is a live stage-2's VTTBR_EL2 value (the caller's, or the
    // one read back); the core runs at EL2 and no partition runs on this CPU
    // while it handles a call, so VTTBR_EL2 only names the VMID for TLB
    // maintenance here, and it is restored before any partition is entered.
    unsafe { arm_sysregs::write_vttbr_el2(arm_sysregs::VttbrEl2::from_bits_retain(v)) };
    // SAFETY: a barrier: the VMID is in effect for the maintenance that follows.
    unsafe { core::arch::asm!("isb", options(nostack, preserves_flags)) };
}

/// Invalidates, on this CPU only, the stage-1 and stage-2 entries of the
/// VMID just loaded into VTTBR_EL2: before a vCPU runs on a CPU that may
/// hold stale entries of its VM.
pub fn invalidate_local_vmid() {
    // SAFETY: local TLB maintenance for the VMID in VTTBR_EL2.
    unsafe {
        core::arch::asm!(
            // TLBI VMALLS12E1 acts on the VMID in VTTBR_EL2, and a
            // direct write of it is only certain to be seen by later
            // instructions after a context synchronization event.
            "isb",
            "tlbi vmalls12e1",
            "dsb nsh",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}
