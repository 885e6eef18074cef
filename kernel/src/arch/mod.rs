//! The architecture layer: the exception vectors and the world switch
//! (`entry.S`, `vectors.S`), the system registers, cache maintenance, the
//! GIC's CPU interface and the EL2 timer, the core's own stage-1
//! translation. The only place for assembly; every layer above reaches the
//! hardware through here.

pub mod cache;
pub mod gic;
pub mod mmu;
pub mod semihosting;
pub mod sysreg;
pub mod tlb;

core::arch::global_asm!(include_str!("entry.S"));
core::arch::global_asm!(include_str!("vectors.S"));

unsafe extern "C" {
    /// Per-CPU stacks (32 KiB each, `MAX_CPUS` of them), defined in entry.S.
    static CPU_STACKS: u8;
    static CPU_STACKS_END: u8;
}

/// The address range of all CPU stacks (for the fatal path's backtrace).
pub fn stack_bounds() -> (u64, u64) {
    (
        core::ptr::addr_of!(CPU_STACKS) as u64,
        core::ptr::addr_of!(CPU_STACKS_END) as u64,
    )
}

/// Waits for an event (an interrupt, or another CPU's `sev`).
pub fn wait_for_event() {
    // SAFETY: WFE only waits for an event; it has no memory effects.
    unsafe { core::arch::asm!("wfe", options(nomem, nostack, preserves_flags)) };
}
