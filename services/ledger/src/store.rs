//! The range store: a sorted, merged array of extents in a caller-provided
//! buffer.

use crate::{LedgerError, Owner};

/// A run of pages with the same owner and borrower.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Extent {
    /// The first frame.
    pub start: u64,
    /// The number of frames (never 0 in the ledger).
    pub count: u64,
    /// The one owner of every page of the run.
    pub owner: Owner,
    /// The one other party that maps the pages, if they are shared.
    pub borrower: Option<Owner>,
}

impl Extent {
    /// A filler for unused slots of an extent buffer.
    pub const EMPTY: Self = Self {
        start: 0,
        count: 0,
        owner: Owner::Host,
        borrower: None,
    };

    /// One past the last frame. Extents in the ledger never overflow.
    pub const fn end(&self) -> u64 {
        self.start.saturating_add(self.count)
    }

    /// Whether the two runs have the same owner and borrower.
    pub fn same_state(&self, other: &Self) -> bool {
        self.owner == other.owner && self.borrower == other.borrower
    }
}

impl Default for Extent {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// How to rewrite the store for one assignment: replace `slots[lo..hi]` by
/// `pieces[..n]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Splice {
    lo: usize,
    hi: usize,
    pieces: [Extent; 3],
    n: usize,
}

impl Splice {
    fn push(&mut self, piece: Extent) {
        if self.n > 0 {
            let last = &mut self.pieces[self.n - 1];
            if last.end() == piece.start && last.same_state(&piece) {
                last.count += piece.count;
                return;
            }
        }
        self.pieces[self.n] = piece;
        self.n += 1;
    }

    /// How many extents the store holds after the splice, from `len`.
    fn new_len(&self, len: usize) -> usize {
        len - (self.hi - self.lo) + self.n
    }
}

#[derive(Clone)]
pub(crate) struct Store<S> {
    slots: S,
    len: usize,
}

impl<S: AsRef<[Extent]> + AsMut<[Extent]>> Store<S> {
    pub(crate) fn new(slots: S) -> Self {
        Self { slots, len: 0 }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.as_ref().len()
    }

    pub(crate) fn extents(&self) -> &[Extent] {
        &self.slots.as_ref()[..self.len]
    }

    /// The index of the first extent that ends after `pfn`.
    fn first_ending_after(&self, pfn: u64) -> usize {
        self.extents().partition_point(|e| e.end() <= pfn)
    }

    /// The extent holding `pfn`.
    pub(crate) fn find(&self, pfn: u64) -> Option<&Extent> {
        self.extents()
            .get(self.first_ending_after(pfn))
            .filter(|e| e.start <= pfn)
    }

    /// The extents overlapping `[start, end)`, in order.
    pub(crate) fn overlapping(&self, start: u64, end: u64) -> &[Extent] {
        let extents = self.extents();
        let lo = extents.partition_point(|e| e.end() <= start);
        let hi = extents.partition_point(|e| e.start < end);
        &extents[lo..hi.max(lo)]
    }

    /// Walks `[start, end)` in ascending order: every page must lie in an
    /// extent (else `OutOfRam` names the first that does not), and `check`
    /// is asked about each overlapping extent with the first page of the
    /// range inside it, stopping at its first error.
    pub(crate) fn check_range(
        &self,
        start: u64,
        end: u64,
        mut check: impl FnMut(&Extent, u64) -> Result<(), LedgerError>,
    ) -> Result<(), LedgerError> {
        let mut next = start;
        for e in self.overlapping(start, end) {
            if e.start > next {
                return Err(LedgerError::OutOfRam { pfn: next });
            }
            check(e, next)?;
            next = e.end();
        }
        if next < end {
            return Err(LedgerError::OutOfRam { pfn: next });
        }
        Ok(())
    }

    /// Plans giving every page of `[start, end)` the state `(owner,
    /// borrower)`. The range must be entirely covered by extents (checked
    /// with [`Store::check_range`] first).
    pub(crate) fn plan_assign(
        &self,
        start: u64,
        end: u64,
        owner: Owner,
        borrower: Option<Owner>,
    ) -> Splice {
        let extents = self.extents();
        let mut lo = extents.partition_point(|e| e.end() <= start);
        let mut hi = extents.partition_point(|e| e.start < end).max(lo);
        let mut splice = Splice {
            lo,
            hi,
            pieces: [Extent::EMPTY; 3],
            n: 0,
        };
        if let Some(first) = extents.get(lo).filter(|e| e.start < start) {
            splice.push(Extent {
                count: start - first.start,
                ..*first
            });
        }
        splice.push(Extent {
            start,
            count: end - start,
            owner,
            borrower,
        });
        if let Some(last) = hi
            .checked_sub(1)
            .and_then(|i| extents.get(i))
            .filter(|e| e.end() > end)
        {
            splice.push(Extent {
                start: end,
                count: last.end() - end,
                ..*last
            });
        }
        if let Some(prev) = lo.checked_sub(1).map(|i| extents[i]) {
            let first = &mut splice.pieces[0];
            if prev.end() == first.start && prev.same_state(first) {
                first.start = prev.start;
                first.count += prev.count;
                lo -= 1;
            }
        }
        if let Some(next) = extents.get(hi) {
            let last = &mut splice.pieces[splice.n - 1];
            if last.end() == next.start && last.same_state(next) {
                last.count += next.count;
                hi += 1;
            }
        }
        splice.lo = lo;
        splice.hi = hi;
        splice
    }

    /// Whether the buffer has room for the result of `splice`.
    pub(crate) fn fits(&self, splice: &Splice) -> bool {
        splice.new_len(self.len) <= self.capacity()
    }

    /// Carries out a splice planned on the current contents; the caller has
    /// checked [`Store::fits`].
    pub(crate) fn apply(&mut self, splice: &Splice) {
        let new_len = splice.new_len(self.len);
        let slots = self.slots.as_mut();
        slots.copy_within(splice.hi..self.len, splice.lo + splice.n);
        slots[splice.lo..splice.lo + splice.n].copy_from_slice(&splice.pieces[..splice.n]);
        for slot in slots.iter_mut().take(self.len).skip(new_len) {
            *slot = Extent::EMPTY;
        }
        self.len = new_len;
    }

    /// The extents in use, writable: only for tests that corrupt the
    /// ledger on purpose.
    #[cfg(test)]
    pub(crate) fn extents_mut(&mut self) -> &mut [Extent] {
        &mut self.slots.as_mut()[..self.len]
    }

    /// Appends an extent after every other one, merging if it continues the
    /// last. Boot only.
    pub(crate) fn push(&mut self, extent: Extent) -> Result<(), LedgerError> {
        if let Some(last) = self.len.checked_sub(1).map(|i| &mut self.slots.as_mut()[i])
            && last.end() == extent.start
            && last.same_state(&extent)
        {
            last.count += extent.count;
            return Ok(());
        }
        let slot = self
            .slots
            .as_mut()
            .get_mut(self.len)
            .ok_or(LedgerError::OutOfCapacity)?;
        *slot = extent;
        self.len += 1;
        Ok(())
    }
}
