//! A bounded set of address ranges: the core's own record of the host pages
//! shared with the hypervisor.
//!
//! A share with the hypervisor changes no mapping (the core maps all RAM),
//! so without this record the ledger alone would know of it, and a ledger
//! rebuilt after a restart could not be told. The set holds sorted,
//! non-overlapping, merged ranges; an insertion or a removal adds at most
//! one range, so a caller that checks [`RangeSet::has_room`] before a
//! transaction commits can always record it afterwards.

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

    /// Whether one more insertion or removal is sure to fit.
    pub fn has_room(&self) -> bool {
        self.ranges.len() < N
    }

    /// The ranges, as `(start, size)`, ascending.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().map(|&(s, e)| (s, e - s))
    }

    /// Adds `[start, end)`. `false` (and nothing changed) if it does not fit.
    pub fn insert(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        // Every range touching or overlapping the new one merges into it.
        let first = self.ranges.partition_point(|&(_, e)| e < start);
        let last = self.ranges.partition_point(|&(s, _)| s <= end);
        let (mut s, mut e) = (start, end);
        if first < last {
            s = s.min(self.ranges[first].0);
            e = e.max(self.ranges[last - 1].1);
        } else if self.ranges.is_full() {
            return false;
        }
        let mut out: heapless::Vec<(u64, u64), N> = heapless::Vec::new();
        for (i, &r) in self.ranges.iter().enumerate() {
            if i == first {
                let _ = out.push((s, e));
            }
            if i < first || i >= last {
                let _ = out.push(r);
            }
        }
        if first == self.ranges.len() {
            let _ = out.push((s, e));
        }
        self.ranges = out;
        true
    }

    /// Removes `[start, end)`. `false` (and nothing changed) if a range
    /// split in two does not fit.
    pub fn remove(&mut self, start: u64, end: u64) -> bool {
        if start >= end {
            return true;
        }
        let splits = self.ranges.iter().any(|&(s, e)| s < start && end < e);
        if splits && self.ranges.is_full() {
            return false;
        }
        let mut out: heapless::Vec<(u64, u64), N> = heapless::Vec::new();
        for &(s, e) in &self.ranges {
            if e <= start || end <= s {
                let _ = out.push((s, e));
                continue;
            }
            if s < start {
                let _ = out.push((s, start));
            }
            if end < e {
                let _ = out.push((end, e));
            }
        }
        self.ranges = out;
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
    fn a_full_set_refuses_what_would_grow_it_and_changes_nothing() {
        let mut s = RangeSet::<2>::new();
        assert!(s.insert(0, 10));
        assert!(s.insert(20, 30));
        assert!(!s.has_room());
        assert!(!s.insert(40, 50));
        assert!(!s.remove(22, 25));
        assert_eq!(all(&s), [(0, 10), (20, 30)]);
        // What does not grow it still works.
        assert!(s.insert(10, 20));
        assert_eq!(all(&s), [(0, 30)]);
        assert!(s.remove(0, 5));
        assert_eq!(s.iter().collect::<Vec<_>>(), [(5, 25)]);
    }
}
