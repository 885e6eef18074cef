//! The architecture layer: the exception vectors and the world switch
//! (`entry.S`, `vectors.S`), the system registers, cache maintenance, the
//! GIC's CPU interface (and the virtual one's registers) and the EL2
//! timer, the device registers of the ITS, redistributors and SMMU, the
//! core's own stage-1 translation. The only place for assembly; every layer above reaches the
//! hardware through here.

pub mod cache;
pub mod fpsimd;
pub mod gic;
pub mod ich;
pub mod mmio;
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
    STOPPING = sym STOPPING,
);

/// Set when the machine stops after a fatal error: every entry to the core
/// parks instead (`base::panic`), and the vectors' NULL fast path checks it
/// too, which is why it lives in this layer.
pub static STOPPING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

// The vectors' NULL fast path loads the running vCPU's kind (a u64) and
// tests it with `cbnz`: the host's kind must be zero.
const _: () = assert!(crate::base::cpu::VCPU_HOST == 0);

unsafe extern "C" {
    /// Enters the vCPU `frame` as a nested run; returns when its next trap
    /// reaches `leave_nested` (see `vectors.S`).
    pub fn enter_nested(
        frame: *mut crate::base::cpu::Vcpu,
        save: *mut crate::base::cpu::NestedSave,
    );
    /// Returns from the `enter_nested` whose state `save` holds.
    pub fn leave_nested(save: *mut crate::base::cpu::NestedSave) -> !;
    /// Per-CPU stacks (32 KiB each, `MAX_CPUS` of them), defined in entry.S.
    static CPU_STACKS: u8;
    static CPU_STACKS_END: u8;
    /// Eight 8-byte entry points, one per logical CPU (entry.S).
    #[link_name = "spin_table_entries"]
    static SPIN_TABLE_ENTRIES: u8;
    #[link_name = "restart_in_core"]
    fn restart_in_core_entry(index: u64) -> !;
    /// Where firmware starts a CPU for the core (entry.S), its logical
    /// index in x0.
    #[link_name = "secondary_entry"]
    fn secondary_entry_code();
}

/// The address firmware starts a CPU at, for CPU_ON and for the wake-up
/// from a powerdown CPU_SUSPEND: the core's secondary entry (entry.S).
#[inline(always)]
pub fn secondary_entry() -> u64 {
    secondary_entry_code as *const () as u64
}

/// The address of the spin-table entry points: CPU `n` enters the core at
/// this address plus `8 * n`.
pub fn spin_table_entries() -> u64 {
    core::ptr::addr_of!(SPIN_TABLE_ENTRIES) as u64
}

/// Leaves the partition this CPU ran for good: drops the trap's stack and
/// waits in the core for the next CPU_ON of CPU `index` (this CPU).
pub fn restart_in_core(index: usize) -> ! {
    // SAFETY: the caller's CPU is `index` and leaves the partition for good;
    // entry.S's routine resets the stack and never returns.
    unsafe { restart_in_core_entry(index as u64) }
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

/// Completes every earlier memory access, then wakes the CPUs waiting for
/// an event.
pub fn send_event() {
    // SAFETY: DSB then SEV; no memory effect.
    unsafe { core::arch::asm!("dsb sy", "sev", options(nostack, preserves_flags)) };
}

/// Completes every earlier memory access, then waits for an interrupt.
pub fn wait_for_interrupt() {
    // SAFETY: DSB then WFI; no memory effect.
    unsafe { core::arch::asm!("dsb sy", "wfi", options(nostack, preserves_flags)) };
}
