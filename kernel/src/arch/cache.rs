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

/// DCZID_EL0's block size in bytes, or `None` if DC ZVA is prohibited.
pub fn zero_block() -> Option<u64> {
    let dczid: u64;
    // SAFETY: reads DCZID_EL0.
    unsafe {
        core::arch::asm!("mrs {}, dczid_el0", out(reg) dczid, options(nomem, nostack, preserves_flags))
    };
    (dczid & (1 << 4) == 0).then(|| 4u64 << (dczid & 0xf))
}

/// Runs the by-address maintenance instruction `$op` (`dc zva`, `dc
/// cvac`, ...) on every `$step`-aligned address of `[$start, $end)`, eight
/// to a loop iteration when the range holds a multiple of eight steps (two
/// instructions a step instead of four), one at a time otherwise; nothing
/// for an empty range.
macro_rules! each_step {
    ($op:literal, $start:expr, $end:expr, $step:expr) => {{
        let (start, end, step): (u64, u64, u64) = ($start, $end, $step);
        if end <= start {
        } else if (end - start) % (8 * step) == 0 {
            core::arch::asm!(
                ".arch_extension memtag",
                "2:",
                concat!($op, ", {a}"), "add {a}, {a}, {s}",
                concat!($op, ", {a}"), "add {a}, {a}, {s}",
                concat!($op, ", {a}"), "add {a}, {a}, {s}",
                concat!($op, ", {a}"), "add {a}, {a}, {s}",
                concat!($op, ", {a}"), "add {a}, {a}, {s}",
                concat!($op, ", {a}"), "add {a}, {a}, {s}",
                concat!($op, ", {a}"), "add {a}, {a}, {s}",
                concat!($op, ", {a}"), "add {a}, {a}, {s}",
                "cmp {a}, {e}",
                "b.lo 2b",
                a = inout(reg) start => _,
                s = in(reg) step,
                e = in(reg) end,
                options(nostack),
            );
        } else {
            let mut addr = start;
            while addr < end {
                core::arch::asm!(
                    ".arch_extension memtag",
                    concat!($op, ", {}"),
                    in(reg) addr,
                    options(nostack, preserves_flags)
                );
                addr += step;
            }
        }
    }};
}

/// Zeroes the 4 KiB page at `page` (its data only, never its tags): one
/// `DC ZVA` per block where the CPU allows it, 64 of them for a page at
/// the usual 64-byte block, instead of 512 stores.
///
/// # Safety
///
/// `page` is a 4 KiB-aligned page of normal memory the core maps
/// read/write and owns: nothing else reads or writes it meanwhile.
pub unsafe fn zero_page(page: u64) {
    const PAGE: u64 = 4096;
    match zero_block().filter(|&b| b <= PAGE) {
        // SAFETY: per the contract; every block-aligned address of the
        // page (a power of two no larger than it) lies inside it.
        Some(block) => unsafe { each_step!("dc zva", page, page + PAGE, block) },
        // SAFETY: per the contract.
        None => unsafe { (page as *mut u8).write_bytes(0, PAGE as usize) },
    }
}

/// Zeroes `[start, end)` a DC ZVA block ([`zero_block`] bytes) at a time,
/// and its allocation tags too when `tags` (`DC GZVA`).
///
/// # Safety
///
/// `start` and `end` are block-aligned, the range is RAM the core maps
/// read/write (and Tagged, when `tags`), and nothing else reads or writes
/// it meanwhile.
pub unsafe fn zero_blocks(start: u64, end: u64, block: u64, tags: bool) {
    if tags {
        // SAFETY: per the contract.
        unsafe { each_step!("dc gzva", start, end, block) };
    } else {
        // SAFETY: per the contract, without tags.
        unsafe { each_step!("dc zva", start, end, block) };
    }
}

/// Zeroes the 16-byte granule at `addr` and its allocation tag (`STZG`).
///
/// # Safety
///
/// As [`zero_block_at`] with tags, for one granule.
#[inline(always)]
pub unsafe fn zero_granule_and_tag(addr: u64) {
    // SAFETY: per the contract; STZG writes one granule's data and tag.
    unsafe {
        core::arch::asm!(".arch_extension memtag", "stzg {0}, [{0}]", in(reg) addr, options(nostack, preserves_flags))
    };
}

/// Cleans the data-cache lines of `[start, end)` (`line` bytes each, and
/// their tags, when `tags`) to the point of coherency.
///
/// `start` and `end` are line-aligned and the range is memory the core
/// maps (Tagged, when `tags`).
pub fn clean_lines_to_poc(start: u64, end: u64, line: u64, tags: bool) {
    if tags {
        // SAFETY: cache maintenance by VA of data and tags; no memory effect.
        unsafe { each_step!("dc cgdvac", start, end, line) };
    } else {
        // SAFETY: cache maintenance by VA; no memory effect.
        unsafe { each_step!("dc cvac", start, end, line) };
    }
}

/// Waits for the stores and cache maintenance issued so far, in the
/// inner-shareable domain.
#[inline(always)]
pub fn complete_inner_shareable() {
    // SAFETY: a barrier has no memory effect.
    unsafe { core::arch::asm!("dsb ish", options(nostack, preserves_flags)) };
}

/// Waits for the stores issued so far, for every observer (devices
/// included).
#[inline(always)]
pub fn complete_full_system() {
    // SAFETY: a barrier has no memory effect.
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
}
