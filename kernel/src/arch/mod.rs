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
core::arch::global_asm!(
    include_str!("vectors.S"),
    NULL = const moat_abi::hypercall::NULL,
    ESR_HVC0 = const moat_kernel::esr::HVC0,
    VCPU_KIND = const core::mem::offset_of!(crate::base::cpu::Vcpu, kind),
    STOPPING = sym crate::base::panic::STOPPING,
);

// The vectors' NULL fast path loads the running vCPU's kind (a u64) and
// tests it with `cbnz`: the host's kind must be zero.
const _: () = assert!(crate::base::cpu::VCPU_HOST == 0);

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
