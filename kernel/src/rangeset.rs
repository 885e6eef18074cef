//! A bounded set of address ranges: the core's own record of the host pages
//! shared with the hypervisor.
//!
//! A share with the hypervisor changes no mapping (the core maps all RAM),
//! so without this record the ledger alone would know of it, and a ledger
//! rebuilt after a restart could not be told. The set holds sorted,
//! non-overlapping, merged ranges, changed in place (no copy of the set on
//! the stack); a caller that checks [`RangeSet::can_insert`] or
//! [`RangeSet::can_remove`] before a transaction commits can always record
//! it afterwards.

/// Ranges `[start, end)`, sorted, disjoint, never touching.
#[derive(Clone, Debug, Default)]
pub struct RangeSet<const N: usize> {
    ranges: heapless::Vec<(u64, u64), N>,
}

impl<const N: usize> RangeSet<N> {
    /// The empty set.
    pub const fn new() -> Self {
        Self {
            ranges: heapless::Vec::new(),
        }
    }

    /// The ranges, as `(start, size)`, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|&(s, e)| (s, e - s))
    }

    /// The indices of the ranges touching or overlapping `[start, end)`.
    fn touching(&self, start: u64, end: u64) -> (usize, usize) {
        let first = self.ranges.partition_point(|&(_, e)| e < start);
        let last = self.ranges.partition_point(|&(s, _)| s <= end);
        (first, last)
    }

    /// Whether inserting `[start, end)` fits: it does unless the set is
    /// full and the range touches none of its ranges.
    pub fn can_insert(&self, start: u64, end: u64) -> bool {
        let (first, last) = self.touching(start, end);
        start >= end || first < last || !self.ranges.is_full()
    }

    /// Whether removing `[start, end)` fits: it does unless the set is full
    /// and the removal splits a range in two.
    pub fn can_remove(&self, start: u64, end: u64) -> bool {
        !self.ranges.is_full() || !self.ranges.iter().any(|&(s, e)| s < start && end < e)
    }

    /// Adds `[start, end)`, merging what it touches. `false` (and nothing
    /// changed) if it does not fit ([`Self::can_insert`]).
    pub fn insert(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        if !self.can_insert(start, end) {
            return false;
        }
        let (first, last) = self.touching(start, end);
        if first == last {
            return self.ranges.insert(first, (start, end)).is_ok();
        }
        let merged = (
            start.min(self.ranges[first].0),
            end.max(self.ranges[last - 1].1),
        );
        self.ranges[first] = merged;
        for _ in first + 1..last {
            self.ranges.remove(first + 1);
        }
        true
    }

    /// Removes `[start, end)`. `false` (and nothing changed) if a range
    /// split in two does not fit ([`Self::can_remove`]).
    pub fn remove(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        if !self.can_remove(start, end) {
            return false;
        }
        let mut i = self.ranges.partition_point(|&(_, e)| e <= start);
        while i < self.ranges.len() && self.ranges[i].0 < end {
            let (s, e) = self.ranges[i];
            match (s < start, end < e) {
                (true, true) => {
                    self.ranges[i] = (s, start);
                    // Room was checked above.
                    let _ = self.ranges.insert(i + 1, (end, e));
                    return true;
                }
                (true, false) => {
                    self.ranges[i] = (s, start);
                    i += 1;
                }
                (false, true) => {
                    self.ranges[i] = (end, e);
                    return true;
                }
                (false, false) => {
                    self.ranges.remove(i);
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all<const N: usize>(s: &RangeSet<N>) -> Vec<(u64, u64)> {
        s.ranges.iter().copied().collect()
    }

    #[test]
    fn inserts_merge_and_removes_split() {
        let mut s = RangeSet::<4>::new();
        assert!(s.insert(10, 20));
        assert!(s.insert(30, 40));
        assert!(s.insert(20, 25));
        assert_eq!(all(&s), [(10, 25), (30, 40)]);
        assert!(s.insert(24, 31));
        assert_eq!(all(&s), [(10, 40)]);
        assert!(s.insert(0, 5));
        assert_eq!(all(&s), [(0, 5), (10, 40)]);
        assert!(s.remove(15, 20));
        assert_eq!(all(&s), [(0, 5), (10, 15), (20, 40)]);
        assert!(s.remove(0, 12));
        assert_eq!(all(&s), [(12, 15), (20, 40)]);
        assert!(s.remove(12, 40));
        assert_eq!(all(&s), []);
        assert_eq!(s.iter().count(), 0);
    }

    #[test]
    fn one_change_spans_several_ranges() {
        let mut s = RangeSet::<8>::new();
        for (a, b) in [(0, 2), (4, 6), (8, 10), (12, 14)] {
            assert!(s.insert(a, b));
        }
        assert!(s.remove(1, 13));
        assert_eq!(all(&s), [(0, 1), (13, 14)]);
        assert!(s.insert(1, 13));
        assert_eq!(all(&s), [(0, 14)]);
        assert!(s.remove(0, 14));
        assert!(all(&s).is_empty());
    }

    #[test]
    fn a_full_set_refuses_what_would_grow_it_and_changes_nothing() {
        let mut s = RangeSet::<2>::new();
        assert!(s.insert(0, 10));
        assert!(s.insert(20, 30));
        assert!(!s.can_insert(40, 50) && !s.insert(40, 50));
        assert!(!s.can_remove(22, 25) && !s.remove(22, 25));
        // Growing a range, or trimming one, needs no room.
        assert!(s.can_insert(10, 12) && s.can_remove(0, 2));
        assert_eq!(all(&s), [(0, 10), (20, 30)]);
        // What does not grow it still works.
        assert!(s.insert(10, 20));
        assert_eq!(all(&s), [(0, 30)]);
        assert!(s.remove(0, 5));
        assert_eq!(s.iter().collect::<Vec<_>>(), [(5, 25)]);
    }
}
