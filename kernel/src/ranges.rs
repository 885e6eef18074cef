//! Address-range arithmetic for hypercall arguments and stage-2 tables.
//!
//! Every address and length a partition passes is a full 64-bit value the
//! core has not chosen: a sum or a rounding of two of them may wrap. These
//! helpers do that arithmetic checked, and answer `None` where the true
//! value does not fit, so the caller refuses the call before it looks at
//! memory.

/// Bytes in a page (the 4 KiB granule of every stage-2 table).
pub const PAGE: u64 = 4096;

/// The pages holding the bytes `[addr, addr + len)`: the first page's
/// address and one past the last page's. `None` for an empty range or one
/// whose end (or that end rounded up to a page) does not fit in 64 bits.
pub fn page_span(addr: u64, len: u64) -> Option<(u64, u64)> {
    if len == 0 {
        return None;
    }
    let end = addr.checked_add(len)?.checked_next_multiple_of(PAGE)?;
    Some((addr - addr % PAGE, end))
}

/// Bytes a table at `level` covers with the 4 KiB granule: 512 entries of
/// the level's granule (a level-3 table 2 MiB, level 2 1 GiB, level 1
/// 512 GiB).
fn table_span(level: usize) -> u32 {
    12 + 9 * (4 - level as u32)
}

/// The table pages mapping `[start, end)` with 4 KiB pages creates below
/// an entry at `level` (0..=3) that is not a table yet (the root, for an
/// empty stage-2 whose walk starts there): one table per aligned span of
/// each deeper level the range touches. `None` for a backwards range or a
/// level out of 0..=3; zero for an empty range.
pub fn worst_case_tables(start_level: usize, start: u64, end: u64) -> Option<u64> {
    if start > end || start_level > 3 {
        return None;
    }
    if start == end {
        return Some(0);
    }
    let last = end - 1;
    let mut tables = 0u64;
    for level in start_level + 1..=3 {
        let shift = table_span(level);
        tables = tables.checked_add((last >> shift) - (start >> shift) + 1)?;
    }
    Some(tables)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn page_span_rounds_out_and_refuses_wraps() {
        assert_eq!(page_span(0x1000, 1), Some((0x1000, 0x2000)));
        assert_eq!(page_span(0x1fff, 2), Some((0x1000, 0x3000)));
        assert_eq!(page_span(0x1000, 0x1000), Some((0x1000, 0x2000)));
        assert_eq!(page_span(0, 0), None);
        // The end fits, its rounding up to a page does not.
        assert_eq!(page_span(0xffff_ffff_ffff_f000, 0x800), None);
        assert_eq!(page_span(0xffff_ffff_ffff_f000, 0x1000), None);
        assert_eq!(page_span(u64::MAX, 1), None);
        assert_eq!(page_span(1, u64::MAX), None);
        assert_eq!(
            page_span(0xffff_ffff_ffff_e000, 0x1000),
            Some((0xffff_ffff_ffff_e000, 0xffff_ffff_ffff_f000))
        );
    }

    #[test]
    fn worst_case_tables_counts_each_level_touched() {
        // One page: a table at each level below the root.
        assert_eq!(worst_case_tables(0, 0x4000_0000, 0x4000_1000), Some(3));
        assert_eq!(worst_case_tables(1, 0x4000_0000, 0x4000_1000), Some(2));
        assert_eq!(worst_case_tables(3, 0x4000_0000, 0x4000_1000), Some(0));
        // Two pages across a 1 GiB boundary: two level-2 and two level-3
        // tables, one level-1 table.
        assert_eq!(worst_case_tables(0, GIB - 0x1000, GIB + 0x1000), Some(5));
        assert_eq!(worst_case_tables(1, GIB - 0x1000, GIB + 0x1000), Some(4));
        // 4 MiB from a 2 MiB boundary: two level-3 tables.
        assert_eq!(worst_case_tables(1, 0x20_0000, 0x60_0000), Some(3));
        assert_eq!(worst_case_tables(0, 0, 0), Some(0));
        assert_eq!(worst_case_tables(0, 2, 1), None);
        assert_eq!(worst_case_tables(4, 0, 1), None);
        // The whole 48-bit space from level 0: 512 + 512^2 + 512^3 tables.
        assert_eq!(
            worst_case_tables(0, 0, 1 << 48),
            Some(512 + 512 * 512 + 512 * 512 * 512)
        );
        assert!(worst_case_tables(0, 0, u64::MAX).is_some());
    }
}
