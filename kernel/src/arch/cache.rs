//! Data- and instruction-cache maintenance by address.

/// Waits for earlier cache maintenance to complete and drops stale
/// instructions, so code the core wrote is what a partition fetches.
pub fn complete_cache_maintenance() {
    // SAFETY: barriers and instruction-cache invalidation have no memory effect.
    unsafe {
        core::arch::asm!(
            "dsb sy",
            "ic iallu",
            "dsb sy",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}

/// The smallest data-cache line, in bytes (CTR_EL0.DminLine).
/// The smallest data-cache line, from CTR_EL0.DminLine.
pub fn dcache_line() -> u64 {
    let ctr: u64;
    // SAFETY: reads CTR_EL0.
    unsafe {
        core::arch::asm!("mrs {}, ctr_el0", out(reg) ctr, options(nomem, nostack, preserves_flags))
    };
    4u64 << ((ctr >> 16) & 0xf)
}

/// Cleans `[start, start + len)` to the point of coherency, so a partition
/// that starts with its MMU and caches off sees what the core wrote.
pub fn clean_dcache_to_poc(start: u64, len: u64) {
    let line = dcache_line();
    let mut addr = start & !(line - 1);
    while addr < start + len {
        // SAFETY: cache maintenance by VA on memory the core maps; no memory effect.
        unsafe { core::arch::asm!("dc cvac, {}", in(reg) addr, options(nostack, preserves_flags)) };
        addr += line;
    }
    complete_cache_maintenance();
}
