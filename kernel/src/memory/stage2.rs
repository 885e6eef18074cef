//! Stage-2 tables, built with aarch64-paging's `Stage2` regime.
//!
//! What to map comes from host-tested plans (`moat_kernel::s2plan` for the
//! host, the service layout for services); this module turns them into
//! descriptors. VTCR_EL2 and the VMID are the core's (aarch64-paging leaves
//! both to the caller). The core runs identity-mapped, so table memory from
//! its heap is addressed the same by the core and by the walker.
//!
//! The library's table allocation cannot fail (its hook returns a page or
//! nothing at all), so no change on a hypercall path lets it reach the
//! heap: each stage-2 has a [`TablePool`], every page-granular change first
//! fills it with the table pages the change would create (the subtree
//! below every entry on its way that is not a table yet,
//! [`moat_kernel::ranges::worst_case_tables`]), failing cleanly with
//! nothing changed when the heap cannot give them, and the library then
//! takes its tables from the pool only.

use crate::arch::tlb;
use aarch64_paging::Mapping;
use aarch64_paging::descriptor::{PhysicalAddress, Stage2Attributes as S2};
use aarch64_paging::paging::{Constraints, MemoryRegion, PageTable, Stage2, Translation};
use alloc::alloc::Layout;
use alloc::vec::Vec;
use core::mem::ManuallyDrop;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use moat_kernel::ranges::worst_case_tables;
use moat_kernel::s2plan::{Region, RegionKind};

/// Why a stage-2 change did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// The heap could not give the table pages the change might need.
    NoMemory,
    /// The range runs outside the IPA space, or the library refused it.
    Refused(&'static str),
}

impl core::fmt::Display for MapError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::NoMemory => write!(f, "out of memory for stage-2 tables"),
            Self::Refused(why) => write!(f, "{why}"),
        }
    }
}

impl From<&'static str> for MapError {
    fn from(why: &'static str) -> Self {
        Self::Refused(why)
    }
}

/// The layout of one table page.
const TABLE: Layout = Layout::new::<PageTable<S2>>();

/// Free table pages of one stage-2, linked through their first word
/// (0 ends the list). Atomics only so that a stage-2 can sit in a shared
/// static; every change runs under the stage-2's own lock.
struct TablePool {
    head: AtomicUsize,
    count: AtomicUsize,
}

impl TablePool {
    const fn new() -> Self {
        Self {
            head: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
        }
    }

    fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Takes pages from the heap until the pool holds `pages`; on failure
    /// the pool keeps what it got (free pages, invisible to any walker).
    fn fill(&self, pages: u64) -> Result<(), MapError> {
        while (self.len() as u64) < pages {
            // SAFETY: a page-sized, page-aligned allocation (non-zero size).
            let page = unsafe { alloc::alloc::alloc(TABLE) };
            let page = NonNull::new(page).ok_or(MapError::NoMemory)?;
            self.push(page.cast());
        }
        Ok(())
    }

    fn push(&self, page: NonNull<PageTable<S2>>) {
        let next = self.head.load(Ordering::Relaxed);
        // SAFETY: `page` is a whole table page from `TABLE`'s allocation that
        // nothing refers to any more (free, or just allocated); its first
        // word holds the link.
        unsafe { page.cast::<usize>().write(next) };
        self.head
            .store(page.as_ptr().expose_provenance(), Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// A zeroed page from the pool, if it has one.
    fn pop(&self) -> Option<NonNull<PageTable<S2>>> {
        let page = self.unlink()?;
        // SAFETY: the page was just unlinked: it is the caller's alone, a
        // whole page-aligned table page the core maps; zeroed as the
        // library expects of a new table.
        unsafe { crate::arch::cache::zero_page(page.as_ptr().expose_provenance() as u64) };
        Some(page)
    }

    /// Takes the first page off the list, as it is (its first word the
    /// old link).
    fn unlink(&self) -> Option<NonNull<PageTable<S2>>> {
        let page = NonNull::new(core::ptr::with_exposed_provenance_mut::<PageTable<S2>>(
            self.head.load(Ordering::Relaxed),
        ))?;
        // SAFETY: the head is a free page of the list (its address exposed
        // by `push`), whose first word is the next link.
        unsafe {
            self.head
                .store(page.cast::<usize>().read(), Ordering::Relaxed);
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
        Some(page)
    }

    /// Gives every pooled page back to the heap (not zeroed: the heap
    /// hands out memory as it is, and a table taken from the pool is
    /// zeroed when it is taken).
    fn drain(&self) {
        while let Some(page) = self.unlink() {
            // SAFETY: every pooled page came from `alloc` with `TABLE`.
            unsafe { alloc::alloc::dealloc(page.as_ptr().cast(), TABLE) };
        }
    }
}

impl Drop for TablePool {
    fn drop(&mut self) {
        self.drain();
    }
}

/// The library's view of table memory: identity-mapped pages from the
/// stage-2's pool.
struct PooledTables {
    pool: TablePool,
    /// The address of every table page the library holds (taken from the
    /// pool and not given back), so that a stage-2 that is freed gives its
    /// tables back one by one: the library's own free reads all 512
    /// entries of every table to find its subtables (12,000 instructions
    /// for the four tables of a VM with one page). Its capacity is kept at
    /// least the pages in use plus those in the pool ([`Self::fill`]), so
    /// that taking a table never reaches the heap. (A lock only because
    /// filling runs through the library's shared reference; every change
    /// of one stage-2 runs under its owner's lock, so it never waits.)
    in_use: spin::Mutex<Vec<usize>>,
}

impl PooledTables {
    /// Fills the pool to `pages` and makes room in the record of tables
    /// in use for every page the pool holds; `NoMemory`, with no table
    /// changed, if the heap cannot give either.
    fn fill(&self, pages: u64) -> Result<(), MapError> {
        self.pool.fill(pages)?;
        self.in_use
            .lock()
            .try_reserve(self.pool.len())
            .map_err(|_| MapError::NoMemory)
    }
}

impl Translation<S2> for PooledTables {
    fn allocate_table(&mut self) -> (NonNull<PageTable<S2>>, PhysicalAddress) {
        // Every change that may create tables filled the pool (and made
        // room in the record) first, except while the core builds the
        // tables it boots with (block mappings of devices), which may take
        // from the heap directly.
        let table = match self.pool.pop() {
            Some(t) => t,
            None => {
                if self.fill(1).is_err() {
                    crate::log!("stage-2: out of memory for tables while the core boots");
                    crate::base::panic::park();
                }
                self.pool
                    .pop()
                    .unwrap_or_else(|| crate::base::panic::park())
            }
        };
        let in_use = self.in_use.get_mut();
        if in_use.len() == in_use.capacity() && in_use.try_reserve(1).is_err() {
            // Only a pool filled without room in the record (by a fill
            // that failed half-way) gets here, while the core boots.
            crate::log!("stage-2: out of memory for tables while the core boots");
            crate::base::panic::park();
        }
        // The core runs identity-mapped: the table's address is its
        // physical address (and exposed, for the walks that read it back).
        let address = table.as_ptr().expose_provenance();
        in_use.push(address);
        (table, PhysicalAddress(address))
    }

    unsafe fn deallocate_table(&mut self, page_table: NonNull<PageTable<S2>>) {
        let in_use = self.in_use.get_mut();
        let address = page_table.as_ptr().expose_provenance();
        if let Some(i) = in_use.iter().position(|&t| t == address) {
            in_use.swap_remove(i);
        }
        self.pool.push(page_table);
    }

    fn physical_to_virtual(&self, pa: PhysicalAddress) -> NonNull<PageTable<S2>> {
        NonNull::new(core::ptr::with_exposed_provenance_mut(pa.0))
            .unwrap_or_else(|| crate::base::panic::park())
    }
}

/// Normal write-back memory: combined with the partition's stage-1
/// attributes, the stronger (stage-1) type wins.
const NORMAL: S2 = S2::VALID
    .union(S2::ACCESS_FLAG)
    .union(S2::SH_INNER)
    .union(S2::MEMATTR_NORMAL_INNER_WB)
    .union(S2::MEMATTR_NORMAL_OUTER_WB);
/// Device-nGnRE, read/write, never executable.
const DEVICE: S2 = S2::VALID
    .union(S2::ACCESS_FLAG)
    .union(S2::MEMATTR_DEVICE_nGnRE)
    .union(S2::S2AP_ACCESS_RW)
    .union(S2::XN);

/// What a partition may do with a range of normal memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(
    clippy::enum_variant_names,
    reason = "every access includes read; the names list the rest"
)]
pub enum Access {
    /// Read and execute (a service's text).
    ReadExecute,
    /// Read and write, never execute.
    ReadWrite,
    /// Read, write and execute (the host's RAM).
    ReadWriteExecute,
}

impl Access {
    fn flags(self) -> S2 {
        match self {
            Access::ReadExecute => NORMAL | S2::S2AP_ACCESS_RO,
            Access::ReadWrite => NORMAL | S2::S2AP_ACCESS_RW | S2::XN,
            Access::ReadWriteExecute => NORMAL | S2::S2AP_ACCESS_RW,
        }
    }
}

/// The host's stage-2. Memory transactions change it (under the memory
/// lock); the consistency checker reads it.
pub static HOST: spin::Once<spin::Mutex<&'static mut StageTwo>> = spin::Once::new();

/// Bytes in a page.
const PAGE: u64 = 4096;

/// The level of 4 KiB page entries.
const LEAF_LEVEL: usize = 3;

/// Bits [1:0] of a valid table or page descriptor.
const TABLE_BITS: u64 = 0b11;

/// Bits [47:12] of a descriptor: the address of its table or page.
const ADDRESS_BITS: u64 = 0x0000_ffff_ffff_f000;

/// Above this many pages, taking mappings away from live tables
/// invalidates the partition's whole VMID once rather than page by page.
const TLBI_PAGES_MAX: u64 = 16;

/// The bytes one entry at `level` maps (4 KiB at level 3, 2 MiB at 2,
/// 1 GiB at 1).
fn entry_size(level: usize) -> u64 {
    PAGE << (9 * (LEAF_LEVEL - level.min(LEAF_LEVEL)))
}

/// Tables a new stage-2's record has room for from the start.
const FIRST_TABLES: usize = 8;

/// A partition's stage-2.
pub struct StageTwo {
    /// Never dropped: [`StageTwo`]'s own `Drop` frees the tables from the
    /// record of those in use instead of the library's walk of them all.
    map: ManuallyDrop<Mapping<PooledTables, Stage2>>,
    /// The level of the root table.
    start_level: usize,
    vmid: u16,
}

impl Drop for StageTwo {
    fn drop(&mut self) {
        // As the library's own drop: tables a CPU may still walk are never
        // freed.
        if self.map.active() {
            crate::log!("stage-2: live tables dropped");
            crate::base::panic::park();
        }
        let tables = self.map.translation();
        tables.pool.drain();
        let in_use = core::mem::take(&mut *tables.in_use.lock());
        for address in in_use {
            // SAFETY: every recorded page came from `alloc` with `TABLE`
            // (through the pool) and is still the library's: a table it
            // gives back leaves the record. The tables are dead (no CPU
            // walks them: the caller flushed their VMID and marked them
            // inactive), and the mapping that refers to them is never used
            // again (this is its owner's drop, and the mapping is not
            // dropped: its other fields hold no memory).
            unsafe {
                alloc::alloc::dealloc(core::ptr::with_exposed_provenance_mut::<u8>(address), TABLE)
            };
        }
    }
}

impl StageTwo {
    /// An empty stage-2 whose walk starts at `start_level` (from VTCR_EL2);
    /// `NoMemory` if the heap has no page for its root table.
    pub fn new(start_level: usize, vmid: u16) -> Result<Self, MapError> {
        let tables = PooledTables {
            pool: TablePool::new(),
            in_use: spin::Mutex::new(Vec::new()),
        };
        tables.fill(1)?;
        // Room in the record for a partition's first tables (a VM's first
        // page needs four), so that its first donation does not move it.
        tables
            .in_use
            .lock()
            .try_reserve(FIRST_TABLES)
            .map_err(|_| MapError::NoMemory)?;
        Ok(Self {
            map: ManuallyDrop::new(Mapping::new(tables, start_level, Stage2)),
            start_level,
            vmid,
        })
    }

    fn pool(&self) -> &TablePool {
        &self.map.translation().pool
    }

    /// Fills the table pool with the pages that page-granular changes of
    /// `ranges` (IPA start and size each) would create between them, so
    /// that making them, one after the other, never reaches the heap: the
    /// tables missing now, counted per range, cover every table created
    /// for the first time, and a table a change frees goes to the pool,
    /// ready for the change that needs it again. `NoMemory` with nothing
    /// changed if the heap cannot give that many.
    pub fn reserve_tables(&self, ranges: &[(u64, u64)]) -> Result<(), MapError> {
        let mut pages = 0u64;
        for &(ipa, size) in ranges {
            let tables = self.missing_tables(ipa, size)?;
            pages = pages.checked_add(tables).ok_or(MapError::NoMemory)?;
        }
        self.map.translation().fill(pages)
    }

    /// The table pages mapping `[ipa, ipa + size)` with 4 KiB pages would
    /// create: the whole subtree below every entry on the way that is not
    /// a table yet (invalid, or a block to split).
    fn missing_tables(&self, ipa: u64, size: u64) -> Result<u64, MapError> {
        let end = ipa.checked_add(size).ok_or("stage-2 range overflows")?;
        if self.page_entries(ipa, end).is_some() {
            // Its last-level table is there, and every one above it.
            return Ok(0);
        }
        let region = MemoryRegion::new(ipa as usize, end as usize);
        let mut pages = 0u64;
        self.map
            .walk_range(&region, &mut |chunk, _, level| {
                let (lo, hi) = (chunk.start().0 as u64, chunk.end().0 as u64);
                pages = worst_case_tables(level, lo, hi)
                    .and_then(|t| pages.checked_add(t))
                    .ok_or(())?;
                Ok(())
            })
            .map_err(|_| MapError::Refused("stage-2 range outside the IPA space"))?;
        Ok(pages)
    }

    /// Gives the pages left in the table pool back to the heap.
    pub fn release_spare_tables(&self) {
        self.pool().drain();
    }

    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)`.
    pub fn map(&mut self, ipa: u64, pa: u64, size: u64, access: Access) -> Result<(), MapError> {
        self.map_flags(ipa, pa, size, access.flags(), Constraints::empty())
    }

    /// Writes the entries of `[ipa, ipa + size)`. A page-granular change
    /// (every change on a hypercall path) first fills the table pool for
    /// its worst case; block mappings are made only while the core boots.
    fn map_flags(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        flags: S2,
        constraints: Constraints,
    ) -> Result<(), MapError> {
        ipa.checked_add(size).ok_or("stage-2 range overflows")?;
        pa.checked_add(size).ok_or("stage-2 range overflows")?;
        if constraints.contains(Constraints::NO_BLOCK_MAPPINGS) {
            self.reserve_tables(&[(ipa, size)])?;
        }
        self.write_entries(ipa, pa, size, flags, constraints)
    }

    /// [`StageTwo::map_flags`] once the table pool holds what the change
    /// may create.
    fn write_entries(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        flags: S2,
        constraints: Constraints,
    ) -> Result<(), MapError> {
        let end = ipa.checked_add(size).ok_or("stage-2 range overflows")?;
        pa.checked_add(size).ok_or("stage-2 range overflows")?;
        let region = MemoryRegion::new(ipa as usize, end as usize);
        if self.map.active()
            && constraints.contains(Constraints::NO_BLOCK_MAPPINGS)
            && let Some(result) = self.change_live_pages(&region, pa, flags)
        {
            return result;
        }
        let live = self.map.active();
        self.map
            .map_range(&region, PhysicalAddress(pa as usize), flags, constraints)
            .map_err(|_| MapError::Refused("stage-2 mapping failed"))?;
        if live {
            // The library invalidated each leaf by IPA; the combined
            // stage-1+2 entries remain.
            tlb::invalidate_combined();
        }
        Ok(())
    }

    /// A page-granular change of live tables with the TLB maintenance it
    /// needs and no more; `None` for a map over valid entries, which then
    /// goes through the library's break-before-make checks.
    ///
    /// aarch64-paging invalidates every leaf a change of live tables
    /// covers, one broadcast TLBI per 4 KiB page, mapped or not: a 2 MiB
    /// donation cost three times 512 of them, and on an emulator every
    /// broadcast stops all CPUs. Here:
    /// - entries made valid where none was need no invalidation (an
    ///   invalid entry is never cached), only the table writes published;
    /// - entries made invalid are invalidated when any of them was valid:
    ///   the range page by page up to [`TLBI_PAGES_MAX`] pages, and above
    ///   that with one invalidation of the whole VMID, as pKVM does past its
    ///   own threshold;
    /// - no table is freed (an unmap writes invalid leaves and keeps its
    ///   tables), so no walker can hold a table that was given away.
    fn change_live_pages(
        &mut self,
        region: &MemoryRegion,
        pa: u64,
        flags: S2,
    ) -> Option<Result<(), MapError>> {
        let making_valid = flags.contains(S2::VALID);
        let (start, end) = (region.start().0 as u64, region.end().0 as u64);
        // Pages of one last-level table that is there: written directly.
        if let Some(entries) = self.page_entries(start, end) {
            let valid = entries
                .iter()
                .filter(|e| e.load(Ordering::Acquire) & S2::VALID.bits() as u64 != 0)
                .count() as u64;
            if making_valid && valid > 0 {
                // Replacing a valid entry is the library's to refuse.
                return None;
            }
            let mut out = pa;
            for entry in entries {
                // A page entry as the library writes one: the output
                // address, the attributes and the page bit; an invalid one
                // is the attributes alone.
                let bits = if making_valid {
                    (out & ADDRESS_BITS) | (flags | S2::TABLE_OR_PAGE).bits() as u64
                } else {
                    flags.bits() as u64
                };
                entry.store(bits, Ordering::Release);
                out = out.wrapping_add(PAGE);
            }
            finish_live_change(start, end, valid);
            return Some(Ok(()));
        }
        // An unmap that spans no whole 2 MiB (so no entry above the pages
        // lies wholly inside it, whose table the library would free) and
        // meets no block writes its invalid pages as a map does: the
        // library's general update (below) costs about 1,500 instructions
        // more for one page, most of them comparing a 64-byte bitmap of
        // updated entries with zero, byte by byte, at every level.
        let no_whole_block = start
            .checked_next_multiple_of(entry_size(LEAF_LEVEL - 1))
            .and_then(|first| first.checked_add(entry_size(LEAF_LEVEL - 1)))
            .is_none_or(|first_end| first_end > end);
        // What the range holds now, where it matters: valid pages, and
        // valid entries above the pages (blocks).
        let (mut valid_pages, mut valid_blocks) = (0u64, false);
        if making_valid || no_whole_block {
            self.map
                .walk_range(region, &mut |_, d, level| {
                    if d.is_valid() {
                        if level == LEAF_LEVEL {
                            valid_pages += 1;
                        } else {
                            valid_blocks = true;
                        }
                    }
                    Ok(())
                })
                .ok()?;
        }
        if making_valid && (valid_pages > 0 || valid_blocks) {
            // Only where nothing is mapped: replacing a valid entry is the
            // library's to refuse (break-before-make).
            return None;
        }
        let writes_pages_only = making_valid || (no_whole_block && !valid_blocks);
        // The library skips its per-leaf maintenance on tables it believes
        // inactive; the maintenance below replaces it. Every change of one
        // stage-2 runs under its owner's lock, so nobody else sees the
        // count meanwhile.
        let cleared = core::cell::Cell::new(0u64);
        self.map.mark_inactive();
        let result = if writes_pages_only {
            // Writes page entries (and any missing table) only: a valid
            // change never frees a table, nor does an invalid one that
            // covers no table's whole span.
            cleared.set(valid_pages);
            self.map.map_range(
                region,
                PhysicalAddress(pa as usize),
                flags,
                Constraints::NO_BLOCK_MAPPINGS,
            )
        } else {
            self.map.modify_range(region, &|_, d| {
                if d.level() == LEAF_LEVEL {
                    if d.flags().contains(S2::VALID) {
                        cleared.set(cleared.get() + 1);
                    }
                    d.set(PhysicalAddress(0), flags)
                } else if d.is_table() || !d.flags().contains(S2::VALID) {
                    // An invalid entry above the leaves: nothing mapped.
                    Ok(())
                } else {
                    // A valid block: partition RAM is mapped in pages, so
                    // this is no range a transaction names. The change
                    // stops here (what it cleared is invalidated below)
                    // and fails, and memory requests stop with it.
                    Err(())
                }
            })
        };
        self.map.mark_active();
        finish_live_change(start, end, cleared.get());
        Some(result.map_err(|_| MapError::Refused("stage-2 mapping failed")))
    }

    /// The page entries of `[ipa, end)`, when the range is whole pages
    /// inside the span of one last-level table (2 MiB) and that table and
    /// every one above it are there; `None` otherwise (the library's walks
    /// then do the work). A change of a page or a few costs a few dozen
    /// instructions this way; the library's general walk costs hundreds.
    ///
    /// Each entry is read and written as the library does, as an atomic
    /// word (the descriptors' layout is the architecture's, for the 4 KiB
    /// granule: bits [1:0] 0b11 a table or page, bits [47:12] its address).
    fn page_entries(&self, ipa: u64, end: u64) -> Option<&[AtomicU64]> {
        const TABLE_SPAN: u64 = 2 << 20;
        if ipa >= end
            || !ipa.is_multiple_of(PAGE)
            || !end.is_multiple_of(PAGE)
            || ipa / TABLE_SPAN != (end - 1) / TABLE_SPAN
        {
            return None;
        }
        // The root covers 512 entries of its level.
        if end > 512 * entry_size(self.start_level) {
            return None;
        }
        let mut table = self.map.root_address().0;
        for level in self.start_level..LEAF_LEVEL {
            let index = ((ipa / entry_size(level)) % 512) as usize;
            // SAFETY: `table` is a table page of this stage-2 (the root, or
            // the address in a table entry the library wrote), taken from
            // its pool, whose address `allocate_table` exposed; it holds
            // 512 descriptors, and `index` < 512. Descriptors are atomic
            // words (the library's own `Descriptor` is one).
            let entry =
                unsafe { &*core::ptr::with_exposed_provenance::<AtomicU64>(table).add(index) };
            let d = entry.load(Ordering::Acquire);
            if d & TABLE_BITS != TABLE_BITS {
                return None;
            }
            table = (d & ADDRESS_BITS) as usize;
        }
        let first = ((ipa / PAGE) % 512) as usize;
        // SAFETY: `table` is this stage-2's last-level table for the range
        // (as above); the entries `first..first + count` lie inside it (the
        // range is inside its 2 MiB span). They stay valid while `self` is
        // borrowed: every change of the tables runs through `self`.
        Some(unsafe {
            core::slice::from_raw_parts(
                core::ptr::with_exposed_provenance::<AtomicU64>(table).add(first),
                ((end - ipa) / PAGE) as usize,
            )
        })
    }

    /// An identity stage-2 from a plan (the host's).
    ///
    /// RAM is mapped with 4 KiB pages, devices with the largest blocks that
    /// fit. Pages because ownership changes page by page (a donation must
    /// not split a live block), and because an emulator that caches a
    /// combined stage-1+2 translation at the larger of the two page sizes
    /// must flush its whole TLB whenever the host invalidates one page
    /// inside a stage-2 block: QEMU's TCG does, and Linux invalidates single
    /// pages by the ten thousand while it boots. The cost is 2 MiB of tables
    /// per GiB of host RAM, which the carve-out's heap is sized for.
    pub fn identity(start_level: usize, vmid: u16, plan: &[Region]) -> Result<Self, MapError> {
        let mut s2 = Self::new(start_level, vmid)?;
        for r in plan {
            let (base, size) = (r.range.base, r.range.size);
            match r.kind {
                RegionKind::Ram => s2.map_identity_pages(base, size, Access::ReadWriteExecute)?,
                RegionKind::Device => {
                    s2.map_flags(base, base, size, DEVICE, Constraints::empty())?;
                }
            }
        }
        Ok(s2)
    }

    /// Maps `[base, base + size)` to itself with 4 KiB pages, on tables that
    /// are not live yet (the host's, while the core boots).
    ///
    /// aarch64-paging writes each page entry through its general mapping
    /// path, about thirty instructions a page: 8 million instructions for
    /// 1 GiB of host RAM, most of the core's boot. So whole 2 MiB chunks
    /// take a short cut: the library maps the chunk's first page (creating
    /// its last-level table and writing entry 0), and the other 511 entries
    /// of that table are entry 0 with the output address advanced a page at
    /// a time: the same attribute bits the library chose, in the layout the
    /// architecture fixes for a 4 KiB-granule last-level table. The ragged
    /// ends of the range go through the library as usual.
    fn map_identity_pages(&mut self, base: u64, size: u64, access: Access) -> Result<(), MapError> {
        const CHUNK: u64 = 2 << 20;
        const ENTRIES: u64 = CHUNK / PAGE;
        let flags = access.flags();
        let end = base.checked_add(size).ok_or("stage-2 range overflows")?;
        let first_chunk = base.next_multiple_of(CHUNK).min(end);
        let chunks_end = (end - end % CHUNK).max(first_chunk);
        let pages = Constraints::NO_BLOCK_MAPPINGS;
        if first_chunk > base {
            self.map_flags(base, base, first_chunk - base, flags, pages)?;
        }
        let mut chunk = first_chunk;
        while chunk < chunks_end {
            self.map_flags(chunk, chunk, PAGE, flags, pages)?;
            let (table, entry0) = self
                .last_level_entry(chunk)
                .ok_or("stage-2: the chunk's first page has no last-level entry")?;
            let table = core::ptr::with_exposed_provenance_mut::<u64>(table);
            for i in 1..ENTRIES {
                // SAFETY: `table` is the chunk's last-level table, which the
                // library allocated from the core's heap a moment ago (its
                // address came from that allocation, exposed when the
                // library turned it into a physical address: the core's map
                // is the identity). It holds ENTRIES descriptors; entry 0 is
                // the chunk's first page. The tables are not live (no CPU
                // walks them before `activate`) and nothing else refers to
                // this table while the entries are written.
                unsafe { table.add(i as usize).write(entry0 + i * PAGE) };
            }
            chunk += CHUNK;
        }
        if end > chunks_end {
            self.map_flags(chunks_end, chunks_end, end - chunks_end, flags, pages)?;
        }
        Ok(())
    }

    /// The address of the last-level table holding the page entry for
    /// `ipa`, and that entry's bits, when `ipa` is mapped by a valid page
    /// entry at index 0 of its table.
    fn last_level_entry(&self, ipa: u64) -> Option<(usize, u64)> {
        let region = MemoryRegion::new(ipa as usize, ipa.checked_add(PAGE)? as usize);
        let mut found = None;
        let _ = self.map.walk_range(&region, &mut |range, d, level| {
            if level == 3 && d.is_valid() && range.start().0 as u64 == ipa {
                let at = core::ptr::from_ref(d).expose_provenance();
                if at % PAGE as usize == 0 {
                    found = Some((at, d.output_address().0 as u64 | d.flags().bits() as u64));
                }
            }
            Ok(())
        });
        found
    }

    /// Marks the tables live and keeps them for the rest of the core's life.
    pub fn activate(self) -> &'static mut Self {
        self.map.mark_active();
        alloc::boxed::Box::leak(alloc::boxed::Box::new(self))
    }

    /// Marks the tables live: from now on every change keeps to
    /// break-before-make and is followed by TLB maintenance.
    pub fn mark_live(&self) {
        self.map.mark_active();
    }

    /// Marks the tables dead: no CPU will walk them again. The caller has
    /// invalidated the VMID's TLB entries ([`flush_vmid`]).
    pub fn mark_dead(&self) {
        self.map.mark_inactive();
    }

    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)` with 4 KiB pages
    /// (ownership moves page by page, so partition RAM is never a block).
    /// On live tables the range must be unmapped: a map never replaces a
    /// valid entry (break-before-make). (The core's changes reserve their
    /// tables first and use [`StageTwo::map_reserved_pages`]; this and the
    /// other unreserved changes fill the pool themselves, for the tests.)
    #[cfg(test)]
    pub fn map_pages(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        access: Access,
    ) -> Result<(), MapError> {
        self.map_flags(
            ipa,
            pa,
            size,
            access.flags(),
            Constraints::NO_BLOCK_MAPPINGS,
        )
    }

    /// As `map_pages`, over a range some of which may be mapped
    /// already (with other permissions): the old entries are broken first
    /// (unmapped and invalidated), then the new ones made.
    #[cfg(test)]
    pub fn remap_pages(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        access: Access,
    ) -> Result<(), MapError> {
        self.reserve_tables(&[(ipa, size)])?;
        self.remap_reserved_pages(ipa, pa, size, access)
    }

    /// Maps `[ipa, ipa + size)` to `[pa, pa + size)` with 4 KiB pages
    /// (ownership moves page by page, so partition RAM is never a block),
    /// taking the tables the caller has just reserved with
    /// [`StageTwo::reserve_tables`] (a memory transaction reserves those of
    /// all its changes before its commit), without walking the range again
    /// to fill the pool. On live tables the range must be unmapped: a map
    /// never replaces a valid entry (break-before-make).
    pub fn map_reserved_pages(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        access: Access,
    ) -> Result<(), MapError> {
        self.write_entries(
            ipa,
            pa,
            size,
            access.flags(),
            Constraints::NO_BLOCK_MAPPINGS,
        )
    }

    /// As [`StageTwo::map_reserved_pages`], over a range some of which may
    /// be mapped already (with other permissions): the old entries are
    /// broken first (unmapped and invalidated), then the new ones made.
    pub fn remap_reserved_pages(
        &mut self,
        ipa: u64,
        pa: u64,
        size: u64,
        access: Access,
    ) -> Result<(), MapError> {
        if self.for_each_mapped(ipa, size, |_, _, _| Err(())).is_err() {
            self.unmap_reserved(ipa, size)?;
        }
        self.map_reserved_pages(ipa, pa, size, access)
    }

    /// Removes every mapping of `[ipa, ipa + size)`, with tables the caller
    /// reserved (see [`StageTwo::map_reserved_pages`]). On live tables the
    /// pages that were mapped are gone from every CPU's TLB when it
    /// returns (invalidations name the current VTTBR's VMID: call through
    /// [`with_vmid`]).
    pub fn unmap_reserved(&mut self, ipa: u64, size: u64) -> Result<(), MapError> {
        self.write_entries(
            ipa,
            0,
            size,
            Access::ReadWrite.flags().difference(S2::VALID),
            Constraints::NO_BLOCK_MAPPINGS,
        )
    }

    /// Removes every mapping of `[ipa, ipa + size)`. On live tables the
    /// pages that were mapped are gone from every CPU's TLB when it
    /// returns (invalidations name the current VTTBR's VMID: call through
    /// [`with_vmid`]).
    #[cfg(test)]
    pub fn unmap(&mut self, ipa: u64, size: u64) -> Result<(), MapError> {
        self.reserve_tables(&[(ipa, size)])?;
        self.unmap_reserved(ipa, size)
    }

    /// The physical address `ipa` maps to, and whether the mapping is
    /// writable; `None` if unmapped.
    pub fn translate(&self, ipa: u64) -> Option<(u64, bool)> {
        let page = ipa & !(PAGE - 1);
        let region = MemoryRegion::new(page as usize, page.checked_add(PAGE)? as usize);
        let mut out = None;
        let _ = self.map.walk_range(&region, &mut |_, d, level| {
            if d.is_valid() {
                // The walk hands over the part of the entry inside the
                // region; a block's output address is that of its start.
                out = Some((
                    d.output_address().0 as u64 + (ipa & (entry_size(level) - 1)),
                    d.flags().contains(S2::S2AP_ACCESS_RW),
                ));
            }
            Ok(())
        });
        out
    }

    /// Calls `f(ipa, pa, size)` for every valid leaf in `[ipa, ipa + size)`,
    /// in ascending order; stops at the first error `f` returns.
    pub fn for_each_mapped<E>(
        &self,
        ipa: u64,
        size: u64,
        mut f: impl FnMut(u64, u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let Some(end) = ipa.checked_add(size) else {
            return Ok(());
        };
        if let Some(entries) = self.page_entries(ipa, end) {
            let mut at = ipa;
            for entry in entries {
                let d = entry.load(Ordering::Acquire);
                if d & S2::VALID.bits() as u64 != 0 {
                    f(at, d & ADDRESS_BITS, PAGE)?;
                }
                at += PAGE;
            }
            return Ok(());
        }
        let region = MemoryRegion::new(ipa as usize, end as usize);
        let mut failure = None;
        let _ = self.map.walk_range(&region, &mut |range, d, level| {
            if d.is_valid() {
                let (start, stop) = (range.start().0 as u64, range.end().0 as u64);
                let pa = d.output_address().0 as u64 + (start & (entry_size(level) - 1));
                if let Err(e) = f(start, pa, stop - start) {
                    failure = Some(e);
                    return Err(());
                }
            }
            Ok(())
        });
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// The VTTBR_EL2 value: root table, VMID in bits [63:48].
    pub fn vttbr(&self) -> u64 {
        self.map.root_address().0 as u64 | (u64::from(self.vmid) << 48)
    }

    /// Whether every page of `[ipa, ipa + size)` is mapped with an owner's
    /// access (read, write and execute) by a page entry: a borrowed page is
    /// never executable, an unmapped one is not the partition's at all,
    /// and partition RAM is never a block. (So no table is missing over
    /// the range: changing it page by page creates none.)
    pub fn maps_as_owner(&self, ipa: u64, size: u64) -> bool {
        let Some(end) = ipa.checked_add(size) else {
            return false;
        };
        // As the walk below checks each entry.
        let owners = (S2::VALID | S2::S2AP_ACCESS_RW).bits() as u64;
        if let Some(entries) = self.page_entries(ipa, end) {
            return entries.iter().all(|entry| {
                let d = entry.load(Ordering::Acquire);
                d & owners == owners && d & S2::XN.bits() as u64 == 0
            });
        }
        let region = MemoryRegion::new(ipa as usize, end as usize);
        self.map
            .walk_range(&region, &mut |_, d, level| {
                let f = d.flags();
                if level == LEAF_LEVEL
                    && d.is_valid()
                    && f.contains(S2::S2AP_ACCESS_RW)
                    && !f.contains(S2::XN)
                {
                    Ok(())
                } else {
                    Err(())
                }
            })
            .is_ok()
    }

    /// Checks that every page of `[ipa, ipa + size)` is mapped read/write
    /// (`mapped`) or not mapped at all (`!mapped`); returns the first IPA
    /// that is not. The consistency checker compares this with the ledger.
    pub fn check(&self, ipa: u64, size: u64, mapped: bool) -> Result<(), u64> {
        let Some(end) = ipa.checked_add(size) else {
            return Err(ipa);
        };
        let region = MemoryRegion::new(ipa as usize, end as usize);
        let mut first_bad = None;
        let result = self
            .map
            .walk_range(&region, &mut |range, descriptor, _level| {
                let valid = descriptor.is_valid();
                let ok = if mapped {
                    valid && descriptor.flags().contains(S2::S2AP_ACCESS_RW)
                } else {
                    !valid
                };
                if ok {
                    Ok(())
                } else {
                    first_bad = Some((range.start().0 as u64).max(ipa));
                    Err(())
                }
            });
        match (result, first_bad) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(at)) => Err(at),
            (Err(_), None) => Err(ipa),
        }
    }
}

/// The TLB maintenance after a page-granular change of live tables over
/// `[start, end)` that made `cleared` valid entries invalid (see
/// `StageTwo::change_live_pages`).
fn finish_live_change(start: u64, end: u64, cleared: u64) {
    tlb::publish_table_writes();
    if cleared > 0 {
        if (end - start) / PAGE <= TLBI_PAGES_MAX {
            let mut ipa = start;
            while ipa < end {
                tlb::invalidate_stage2_page(ipa);
                ipa += PAGE;
            }
            tlb::complete_stage2();
            tlb::invalidate_combined();
        } else {
            tlb::invalidate_vmid();
        }
    }
}

/// Runs `f` (stage-2 changes of the partition whose VTTBR_EL2 value is
/// `vttbr`) with that VTTBR loaded, so that the invalidations the changes
/// issue (each change completes its own, combined stage-1+2 entries
/// included) name its VMID.
pub fn with_vmid<R>(vttbr: u64, f: impl FnOnce() -> R) -> R {
    let previous = tlb::current_vttbr();
    tlb::load_vttbr(vttbr);
    let r = f();
    tlb::load_vttbr(previous);
    r
}

/// Invalidates every TLB entry of the VMID in `vttbr` (stage-1 and
/// stage-2), on every CPU: a VM's tables are about to be freed or its
/// VMID reused.
pub fn flush_vmid(vttbr: u64) {
    let previous = tlb::current_vttbr();
    tlb::load_vttbr(vttbr);
    tlb::invalidate_vmid();
    tlb::load_vttbr(previous);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{Op, take_log};
    use crate::fake_heap::{limit_allocations, live_pages};
    use moat_platform::dt::Range;

    const VMID: u16 = 7;
    /// A walk from level 1: a 512 GiB IPA space.
    const START_LEVEL: usize = 1;
    const RAM: u64 = 0x4000_0000;

    fn stage2() -> StageTwo {
        let s2 = StageTwo::new(START_LEVEL, VMID).expect("a root table");
        take_log();
        s2
    }

    /// Live tables, marked dead again when the test ends (the library
    /// refuses to drop live ones), also when an assertion fails.
    struct Live(StageTwo);

    impl Live {
        fn new(s2: StageTwo) -> Self {
            s2.mark_live();
            take_log();
            Self(s2)
        }
    }

    impl core::ops::Deref for Live {
        type Target = StageTwo;
        fn deref(&self) -> &StageTwo {
            &self.0
        }
    }

    impl core::ops::DerefMut for Live {
        fn deref_mut(&mut self) -> &mut StageTwo {
            &mut self.0
        }
    }

    impl Drop for Live {
        fn drop(&mut self) {
            self.0.mark_dead();
        }
    }

    /// The TLB maintenance in `log` (table zeroing left out).
    fn tlb_ops(log: &[Op]) -> Vec<Op> {
        log.iter()
            .copied()
            .filter(|op| !matches!(op, Op::ZeroPage(_)))
            .collect()
    }

    fn invalidations(log: &[Op]) -> Vec<Op> {
        tlb_ops(log)
            .into_iter()
            .filter(|op| !matches!(op, Op::PublishTableWrites | Op::CompleteStage2))
            .collect()
    }

    fn per_page(ipa: u64, pages: u64) -> Vec<Op> {
        (0..pages)
            .map(|i| Op::InvalidateStage2Page {
                vmid: VMID,
                ipa: ipa + i * PAGE,
            })
            .collect()
    }

    #[test]
    fn pages_map_translate_and_unmap_on_tables_not_live() {
        let mut s2 = stage2();
        s2.map_pages(RAM, 0x8000_0000, 3 * PAGE, Access::ReadWrite)
            .unwrap();
        assert_eq!(s2.translate(RAM), Some((0x8000_0000, true)));
        assert_eq!(s2.translate(RAM + PAGE + 0x123), Some((0x8000_1123, true)));
        assert_eq!(s2.translate(RAM + 3 * PAGE), None);
        assert_eq!(s2.check(RAM, 3 * PAGE, true), Ok(()));
        assert_eq!(s2.check(RAM, 4 * PAGE, true), Err(RAM + 3 * PAGE));
        // Read/write but never executable: not an owner's mapping.
        assert!(!s2.maps_as_owner(RAM, PAGE));

        s2.unmap(RAM + PAGE, PAGE).unwrap();
        assert_eq!(s2.translate(RAM + PAGE), None);
        assert_eq!(s2.translate(RAM), Some((0x8000_0000, true)));
        assert_eq!(s2.check(RAM + PAGE, PAGE, false), Ok(()));
        assert_eq!(s2.check(RAM, 2 * PAGE, false), Err(RAM));
        // Tables nobody walks yet need no TLB maintenance.
        assert_eq!(invalidations(&take_log()), []);
    }

    #[test]
    fn access_sets_the_permission_bits() {
        let mut s2 = stage2();
        s2.map_pages(RAM, RAM, PAGE, Access::ReadExecute).unwrap();
        s2.map_pages(RAM + PAGE, RAM + PAGE, PAGE, Access::ReadWriteExecute)
            .unwrap();
        assert_eq!(s2.translate(RAM), Some((RAM, false)));
        assert!(!s2.maps_as_owner(RAM, PAGE));
        assert_eq!(s2.translate(RAM + PAGE), Some((RAM + PAGE, true)));
        assert!(s2.maps_as_owner(RAM + PAGE, PAGE));
        assert!(!s2.maps_as_owner(RAM, 2 * PAGE));
        assert!(!s2.maps_as_owner(RAM + 2 * PAGE, PAGE));
        assert!(!s2.maps_as_owner(u64::MAX - PAGE, 2 * PAGE));
    }

    #[test]
    fn for_each_mapped_lists_valid_leaves_in_order_and_stops_on_error() {
        let mut s2 = stage2();
        s2.map_pages(RAM, 0x9000_0000, PAGE, Access::ReadWrite)
            .unwrap();
        s2.map_pages(RAM + 2 * PAGE, 0x9000_5000, PAGE, Access::ReadWrite)
            .unwrap();
        let mut seen = Vec::new();
        s2.for_each_mapped(RAM, 4 * PAGE, |ipa, pa, size| {
            seen.push((ipa, pa, size));
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(
            seen,
            [
                (RAM, 0x9000_0000, PAGE),
                (RAM + 2 * PAGE, 0x9000_5000, PAGE)
            ]
        );
        let mut calls = 0;
        let stopped = s2.for_each_mapped(RAM, 4 * PAGE, |ipa, _, _| {
            calls += 1;
            Err(ipa)
        });
        assert_eq!((stopped, calls), (Err(RAM), 1));
        assert_eq!(s2.for_each_mapped(u64::MAX, 2, |_, _, _| Err(())), Ok(()));
    }

    #[test]
    fn ranges_that_overflow_or_leave_the_ipa_space_are_refused() {
        let mut s2 = stage2();
        assert!(matches!(
            s2.map_pages(u64::MAX - PAGE + 1, 0, 2 * PAGE, Access::ReadWrite),
            Err(MapError::Refused(_))
        ));
        assert!(matches!(
            s2.map_pages(0, u64::MAX - PAGE + 1, 2 * PAGE, Access::ReadWrite),
            Err(MapError::Refused(_))
        ));
        // Level 1 walks cover 512 GiB.
        let beyond = 1u64 << 39;
        assert_eq!(
            s2.reserve_tables(&[(beyond, PAGE)]),
            Err(MapError::Refused("stage-2 range outside the IPA space"))
        );
        assert_eq!(s2.pool().len(), 0, "nothing taken for a refused range");
        assert_eq!(s2.check(u64::MAX, 2, true), Err(u64::MAX));
        assert_eq!(s2.translate(u64::MAX), None);
        assert_eq!(
            MapError::NoMemory.to_string(),
            "out of memory for stage-2 tables"
        );
        assert_eq!(MapError::Refused("why").to_string(), "why");
    }

    #[test]
    fn live_invalid_to_valid_needs_no_invalidation() {
        let mut s2 = Live::new(stage2());
        with_vmid(s2.vttbr(), || {
            s2.map_pages(RAM, RAM, 4 * PAGE, Access::ReadWrite)
        })
        .unwrap();
        assert_eq!(s2.translate(RAM + 3 * PAGE), Some((RAM + 3 * PAGE, true)));
        // The table writes are published, nothing is invalidated.
        assert_eq!(tlb_ops(&take_log()), [Op::PublishTableWrites]);
    }

    #[test]
    fn live_unmap_of_up_to_16_pages_invalidates_page_by_page() {
        let mut s2 = stage2();
        s2.map_pages(RAM, RAM, 16 * PAGE, Access::ReadWrite)
            .unwrap();
        let mut s2 = Live::new(s2);
        with_vmid(s2.vttbr(), || s2.unmap(RAM, 16 * PAGE)).unwrap();
        let mut expected = vec![Op::PublishTableWrites];
        expected.extend(per_page(RAM, 16));
        expected.push(Op::CompleteStage2);
        expected.push(Op::InvalidateCombined { vmid: VMID });
        assert_eq!(tlb_ops(&take_log()), expected);
        assert_eq!(s2.check(RAM, 16 * PAGE, false), Ok(()));
        // The VMID loaded for the change is put back.
        assert_eq!(crate::arch::tlb::current_vttbr(), 0);
    }

    #[test]
    fn live_unmap_above_16_pages_invalidates_the_vmid_once() {
        let mut s2 = stage2();
        s2.map_pages(RAM, RAM, 17 * PAGE, Access::ReadWrite)
            .unwrap();
        let mut s2 = Live::new(s2);
        with_vmid(s2.vttbr(), || s2.unmap(RAM, 17 * PAGE)).unwrap();
        assert_eq!(
            tlb_ops(&take_log()),
            [Op::PublishTableWrites, Op::InvalidateVmid { vmid: VMID }]
        );
        assert_eq!(s2.check(RAM, 17 * PAGE, false), Ok(()));
    }

    #[test]
    fn live_unmap_of_nothing_mapped_invalidates_nothing() {
        let mut s2 = stage2();
        s2.map_pages(RAM, RAM, PAGE, Access::ReadWrite).unwrap();
        let mut s2 = Live::new(s2);
        with_vmid(s2.vttbr(), || s2.unmap(RAM + PAGE, 64 * PAGE)).unwrap();
        assert_eq!(invalidations(&take_log()), []);
        // A range that covers one valid page invalidates the range's pages.
        with_vmid(s2.vttbr(), || s2.unmap(RAM, 2 * PAGE)).unwrap();
        let mut expected = per_page(RAM, 2);
        expected.push(Op::InvalidateCombined { vmid: VMID });
        assert_eq!(invalidations(&take_log()), expected);
    }

    #[test]
    fn a_live_unmap_keeps_every_table_whatever_it_spans() {
        let block = 2u64 << 20;
        let mut s2 = stage2();
        s2.map_pages(RAM, RAM, 2 * block, Access::ReadWrite)
            .unwrap();
        s2.release_spare_tables();
        let tables = s2.map.translation().in_use.lock().len();
        let mut s2 = Live::new(s2);
        // Part of one last-level table, then the rest of it, then the
        // whole of the next (the span of a level-2 entry).
        for (ipa, size) in [(RAM + PAGE, 3 * PAGE), (RAM, block), (RAM + block, block)] {
            with_vmid(s2.vttbr(), || s2.unmap(ipa, size)).unwrap();
            assert_eq!(s2.check(ipa, size, false), Ok(()));
            assert_eq!(s2.map.translation().in_use.lock().len(), tables);
            assert_eq!(s2.pool().len(), 0, "no table given back");
        }
        assert_eq!(
            invalidations(&take_log()),
            [
                per_page(RAM + PAGE, 3),
                vec![Op::InvalidateCombined { vmid: VMID }],
                vec![Op::InvalidateVmid { vmid: VMID }; 2]
            ]
            .concat()
        );
        // A map where the unmaps left invalid pages needs no invalidation.
        with_vmid(s2.vttbr(), || {
            s2.map_pages(RAM, RAM, PAGE, Access::ReadWrite)
        })
        .unwrap();
        assert_eq!(s2.translate(RAM), Some((RAM, true)));
        assert_eq!(invalidations(&take_log()), []);
    }

    #[test]
    fn pages_written_directly_are_the_librarys_own() {
        let block = 2u64 << 20;
        let mut s2 = stage2();
        // The library writes the first table's entries (tables not live),
        // and the direct path the second's (its table made first).
        s2.map_pages(RAM, 0x8000_0000, 2 * PAGE, Access::ReadWrite)
            .unwrap();
        s2.unmap(RAM + PAGE, PAGE).unwrap();
        s2.map_pages(RAM + block, RAM, PAGE, Access::ReadWrite)
            .unwrap();
        let mut s2 = Live::new(s2);
        with_vmid(s2.vttbr(), || {
            s2.map_pages(RAM + block + PAGE, 0x8000_0000, PAGE, Access::ReadWrite)
        })
        .unwrap();
        with_vmid(s2.vttbr(), || s2.unmap(RAM + block, PAGE)).unwrap();
        let bits = |s2: &StageTwo, ipa: u64| {
            s2.page_entries(ipa, ipa + PAGE).unwrap()[0].load(Ordering::Relaxed)
        };
        assert_eq!(bits(&s2, RAM + block + PAGE), bits(&s2, RAM));
        assert_eq!(bits(&s2, RAM + block), bits(&s2, RAM + PAGE));
        // What reads them directly agrees with the walks across tables.
        let mut near = Vec::new();
        s2.for_each_mapped(RAM + block, 2 * PAGE, |ipa, pa, size| {
            near.push((ipa, pa, size));
            Ok::<(), ()>(())
        })
        .unwrap();
        let mut across = Vec::new();
        s2.for_each_mapped(RAM, 2 * block, |ipa, pa, size| {
            across.push((ipa, pa, size));
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(near, [(RAM + block + PAGE, 0x8000_0000, PAGE)]);
        assert_eq!(across, [(RAM, 0x8000_0000, PAGE), near[0]]);
        assert!(!s2.maps_as_owner(RAM + block + PAGE, PAGE));
        // Neither a range across two tables nor one without its table is
        // read directly.
        assert!(
            s2.page_entries(RAM + block - PAGE, RAM + block + PAGE)
                .is_none()
        );
        assert!(
            s2.page_entries(RAM + 2 * block, RAM + 2 * block + PAGE)
                .is_none()
        );
        assert_eq!(s2.missing_tables(RAM + block, PAGE), Ok(0));
        assert_eq!(s2.missing_tables(RAM + 2 * block, PAGE), Ok(1));
    }

    #[test]
    fn live_map_over_a_valid_entry_keeps_break_before_make() {
        let mut s2 = stage2();
        s2.map_pages(RAM, 0x8000_0000, PAGE, Access::ReadWrite)
            .unwrap();
        let mut s2 = Live::new(s2);
        // Another output address for a valid entry without breaking it
        // first: the library refuses, and nothing changes.
        let r = with_vmid(s2.vttbr(), || {
            s2.map_pages(RAM, 0x9000_0000, PAGE, Access::ReadWrite)
        });
        assert!(matches!(r, Err(MapError::Refused(_))), "{r:?}");
        assert_eq!(s2.translate(RAM), Some((0x8000_0000, true)));

        // remap_pages breaks first (with the invalidation), then makes.
        with_vmid(s2.vttbr(), || {
            s2.remap_pages(RAM, 0x9000_0000, 2 * PAGE, Access::ReadExecute)
        })
        .unwrap();
        assert_eq!(s2.translate(RAM), Some((0x9000_0000, false)));
        assert_eq!(s2.translate(RAM + PAGE), Some((0x9000_1000, false)));
        let mut expected = per_page(RAM, 2);
        expected.push(Op::InvalidateCombined { vmid: VMID });
        assert_eq!(invalidations(&take_log()), expected);
    }

    #[test]
    fn remap_of_an_unmapped_range_just_maps() {
        let mut s2 = Live::new(stage2());
        with_vmid(s2.vttbr(), || {
            s2.remap_pages(RAM, RAM, PAGE, Access::ReadWrite)
        })
        .unwrap();
        assert_eq!(s2.translate(RAM), Some((RAM, true)));
        assert_eq!(invalidations(&take_log()), []);
    }

    #[test]
    fn a_live_unmap_across_a_block_fails_after_invalidating_what_it_cleared() {
        let mut s2 = stage2();
        // A device block (made only while the core boots) next to pages.
        let block = 0x20_0000u64;
        s2.map_flags(block, block, block, DEVICE, Constraints::empty())
            .unwrap();
        s2.map_pages(0, 0x100_0000, PAGE, Access::ReadWrite)
            .unwrap();
        let mut s2 = Live::new(s2);
        let r = with_vmid(s2.vttbr(), || s2.unmap(0, 2 * block));
        assert_eq!(r, Err(MapError::Refused("stage-2 mapping failed")));
        assert_eq!(s2.translate(0), None);
        assert_eq!(s2.translate(block + PAGE), Some((block + PAGE, true)));
        assert_eq!(
            invalidations(&take_log()),
            [Op::InvalidateVmid { vmid: VMID }]
        );
    }

    #[test]
    fn identity_maps_ram_in_pages_and_devices_in_blocks() {
        // RAM with ragged ends around two whole 2 MiB chunks, and a device.
        let ram = Range {
            base: RAM - 3 * PAGE,
            size: 3 * PAGE + (4 << 20) + 5 * PAGE,
        };
        let device = Range {
            base: 0x0900_0000,
            size: 2 << 20,
        };
        let plan = [
            Region {
                range: ram,
                kind: RegionKind::Ram,
            },
            Region {
                range: device,
                kind: RegionKind::Device,
            },
        ];
        let s2 = StageTwo::identity(START_LEVEL, VMID, &plan).unwrap();
        for ipa in (ram.base..ram.base + ram.size).step_by(PAGE as usize) {
            assert_eq!(s2.translate(ipa), Some((ipa, true)), "{ipa:#x}");
        }
        assert!(s2.maps_as_owner(ram.base, ram.size));
        assert_eq!(s2.translate(ram.base - PAGE), None);
        assert_eq!(s2.translate(ram.base + ram.size), None);
        // Every RAM entry is a page: a walk sees one leaf per page.
        let mut leaves = 0;
        s2.for_each_mapped(ram.base, ram.size, |_, _, size| {
            assert_eq!(size, PAGE);
            leaves += 1;
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(leaves, ram.size / PAGE);
        // The device is one block, never executable.
        let mut blocks = Vec::new();
        s2.for_each_mapped(device.base, device.size, |ipa, pa, size| {
            blocks.push((ipa, pa, size));
            Ok::<(), ()>(())
        })
        .unwrap();
        assert_eq!(blocks, [(device.base, device.base, device.size)]);
        assert!(!s2.maps_as_owner(device.base, PAGE));
        // A block with an owner's access (none such is made) is not a
        // page the partition owns either: it has no tables below it.
        let mut blocks = stage2();
        blocks
            .map_flags(
                RAM,
                RAM,
                2 << 20,
                Access::ReadWriteExecute.flags(),
                Constraints::empty(),
            )
            .unwrap();
        assert_eq!(blocks.translate(RAM + PAGE), Some((RAM + PAGE, true)));
        assert!(!blocks.maps_as_owner(RAM, PAGE));
    }

    #[test]
    fn the_pool_fills_for_the_worst_case_and_the_change_takes_from_it() {
        let mut s2 = stage2();
        // From an empty level-1 root, a page needs a level-2 and a
        // level-3 table; two far-apart pages need two each.
        s2.reserve_tables(&[(RAM, PAGE), (RAM + (1 << 30), PAGE)])
            .unwrap();
        // (The root took the one page `new` put in the pool.)
        assert_eq!(s2.pool().len(), 4);
        limit_allocations(Some(0));
        let mapped = s2.map_pages(RAM, RAM, PAGE, Access::ReadWrite);
        let mapped_far = s2.map_pages(RAM + (1 << 30), RAM, PAGE, Access::ReadWrite);
        limit_allocations(None);
        mapped.unwrap();
        mapped_far.unwrap();
        assert_eq!(s2.pool().len(), 0);
        // Every table taken from the pool was zeroed as it was taken.
        let zeroed = take_log()
            .iter()
            .filter(|op| matches!(op, Op::ZeroPage(_)))
            .count();
        assert_eq!(zeroed, 4);
        // Present tables need nothing more.
        s2.reserve_tables(&[(RAM + PAGE, 511 * PAGE)]).unwrap();
        assert_eq!(s2.pool().len(), 0);
        s2.reserve_tables(&[(RAM + (2 << 20), PAGE)]).unwrap();
        assert_eq!(s2.pool().len(), 1);
        s2.release_spare_tables();
        assert_eq!(s2.pool().len(), 0);
    }

    #[test]
    fn reserved_changes_take_their_tables_from_the_pool_only() {
        let mut s2 = stage2();
        s2.map_pages(RAM, RAM, PAGE, Access::ReadWrite).unwrap();
        s2.release_spare_tables();
        let mut s2 = Live::new(s2);
        let far = RAM + (1 << 30);
        // An unmap and a remap where tables exist, a map where none does:
        // reserved together, then made with no page from the heap.
        s2.reserve_tables(&[(RAM, PAGE), (RAM + PAGE, PAGE), (far, 2 * PAGE)])
            .unwrap();
        assert_eq!(s2.pool().len(), 2);
        limit_allocations(Some(0));
        let unmapped = with_vmid(s2.vttbr(), || s2.unmap_reserved(RAM, PAGE));
        let remapped = with_vmid(s2.vttbr(), || {
            s2.remap_reserved_pages(RAM + PAGE, RAM, PAGE, Access::ReadExecute)
        });
        let mapped = with_vmid(s2.vttbr(), || {
            s2.map_reserved_pages(far, RAM, 2 * PAGE, Access::ReadWrite)
        });
        limit_allocations(None);
        unmapped.unwrap();
        remapped.unwrap();
        mapped.unwrap();
        assert_eq!(s2.translate(RAM), None);
        assert_eq!(s2.translate(RAM + PAGE), Some((RAM, false)));
        assert_eq!(s2.translate(far + PAGE), Some((RAM + PAGE, true)));
        assert_eq!(s2.pool().len(), 0);
        // The invalidations are those of the unreserved changes: the one
        // page that was mapped, nothing for the maps.
        let mut expected = per_page(RAM, 1);
        expected.push(Op::InvalidateCombined { vmid: VMID });
        assert_eq!(invalidations(&take_log()), expected);
    }

    #[test]
    fn reserving_fails_cleanly_when_the_heap_is_out() {
        let mut s2 = stage2();
        limit_allocations(Some(1));
        let r = s2.map_pages(RAM, RAM, PAGE, Access::ReadWrite);
        limit_allocations(None);
        assert_eq!(r, Err(MapError::NoMemory));
        // Nothing mapped; the page the pool got stays in it, free.
        assert_eq!(s2.translate(RAM), None);
        assert_eq!(s2.check(RAM, 2 << 20, false), Ok(()));
        assert_eq!(s2.pool().len(), 1);
        assert!(take_log().is_empty());
        limit_allocations(Some(0));
        assert_eq!(
            StageTwo::new(START_LEVEL, VMID).err(),
            Some(MapError::NoMemory)
        );
        limit_allocations(None);
    }

    #[test]
    fn a_dropped_stage2_gives_back_every_table_it_holds() {
        let before = live_pages();
        {
            let mut s2 = stage2();
            let block = 2u64 << 20;
            s2.map_pages(RAM, RAM, PAGE, Access::ReadWrite).unwrap();
            s2.map_pages(RAM + (1 << 30), RAM, PAGE, Access::ReadWrite)
                .unwrap();
            s2.map_pages(RAM + block, RAM, block, Access::ReadWrite)
                .unwrap();
            s2.release_spare_tables();
            // The root, two level-2 and three level-3 tables.
            let held = live_pages() - before;
            assert_eq!(held, 6);
            assert_eq!(s2.map.translation().in_use.lock().len(), 6);
            // A whole 2 MiB unmapped on tables nobody walks: the library
            // frees its last-level table, which leaves the record (and
            // waits in the pool until the pool is emptied).
            s2.unmap(RAM + block, block).unwrap();
            assert_eq!(s2.map.translation().in_use.lock().len(), 5);
            s2.release_spare_tables();
            assert_eq!(live_pages() - before, 5);
            assert_eq!(s2.translate(RAM), Some((RAM, true)));
            // Spare pages in the pool go with the tables.
            s2.reserve_tables(&[(RAM + 2 * block, PAGE)]).unwrap();
            assert_eq!(live_pages() - before, 6);
        }
        assert_eq!(live_pages(), before, "every table and pooled page freed");
    }

    #[test]
    fn a_pooled_page_is_zeroed_when_taken_not_when_given_back() {
        let pool = TablePool::new();
        pool.fill(2).unwrap();
        assert_eq!(pool.len(), 2);
        let page = pool.pop().unwrap();
        let addr = page.as_ptr().expose_provenance() as u64;
        assert_eq!(take_log(), [Op::ZeroPage(addr)]);
        let words = page.cast::<[u64; 512]>();
        // SAFETY: a whole table page the test took from the pool.
        unsafe {
            assert!((*words.as_ptr()).iter().all(|&w| w == 0));
            (*words.as_ptr())[7] = 0xdead;
        }
        pool.push(page);
        assert_eq!(pool.len(), 2);
        // Back in the pool as it was (only its link word written) ...
        // SAFETY: the page is in the pool, which nothing else uses here.
        assert_eq!(unsafe { (*words.as_ptr())[7] }, 0xdead);
        // ... and zero again when the next change takes it.
        let again = pool.pop().unwrap();
        assert_eq!(again, page);
        // SAFETY: as above, the test's again.
        assert!(unsafe { (*words.as_ptr()).iter().all(|&w| w == 0) });
        pool.push(again);
        pool.drain();
        assert_eq!(pool.len(), 0);
        assert!(pool.pop().is_none());
    }

    #[test]
    fn vttbr_holds_the_root_and_the_vmid() {
        let s2 = stage2();
        let root = s2.map.root_address().0 as u64;
        assert_eq!(s2.vttbr(), root | (u64::from(VMID) << 48));
        assert_eq!(root % PAGE, 0);
    }

    #[test]
    fn flush_vmid_names_the_vmid_and_restores_the_loaded_one() {
        crate::arch::tlb::load_vttbr(3 << 48);
        flush_vmid(9 << 48);
        assert_eq!(take_log(), [Op::InvalidateVmid { vmid: 9 }]);
        assert_eq!(crate::arch::tlb::current_vttbr(), 3 << 48);
        assert_eq!(with_vmid(5 << 48, crate::arch::tlb::current_vttbr), 5 << 48);
        assert_eq!(crate::arch::tlb::current_vttbr(), 3 << 48);
        crate::arch::tlb::load_vttbr(0);
    }

    #[test]
    fn a_table_the_heap_cannot_give_while_booting_parks() {
        let mut s2 = stage2();
        s2.pool().drain();
        limit_allocations(Some(0));
        let parked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s2.map(RAM, RAM, PAGE, Access::ReadWrite)
        }));
        limit_allocations(None);
        assert!(parked.is_err(), "the core parks instead of mapping");
        assert_eq!(
            crate::arch::take_lines(),
            ["moat: stage-2: out of memory for tables while the core boots"]
        );
    }
}
