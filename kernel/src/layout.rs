//! Where everything goes in physical memory at boot.
//!
//! The core runs where the firmware loaded it, and the boot package follows
//! its image. The *carve-out* is the memory the host never gets: the 2 MiB
//! block(s) holding the core's image (text, data, BSS with the per-CPU
//! stacks) and the heap, rounded out to 2 MiB.
//!
//! Host payloads are used **in place** when the package put them where the
//! host needs them: a host image at a 2 MiB boundary plus its `text_offset`,
//! an initrd on its own pages, both outside the core's 2 MiB block and clear
//! of every reserved or forbidden range. The heap then goes after the package
//! and the carve-out is two ranges:
//!
//! ```text
//!  | host | core image | package head | initrd | host image, BSS | heap  | host ... | DTB |
//!         ^ load address              ^ 2 MiB block boundaries    ^ 2 MiB          ^ top of the bank
//!         '- carve-out (core) -------'                            '- carve-out (heap)
//! ```
//!
//! Otherwise the heap follows the image and the carve-out is one range, with
//! the package lying inside the heap at boot (it is consumed before that part
//! of the heap is handed to the allocator), and the payloads are copied out:
//!
//! ```text
//!  | host | core image | heap (package lies here at boot) | host image ... | initrd | DTB |
//!         ^ load address                                  ^ 2 MiB + text_offset     ^ top of the bank
//! ```
//!
//! A copied host image goes to the first 2 MiB boundary (plus its
//! `text_offset`) after the carve-out and the package, as the Linux boot
//! protocol asks; the host's device tree, and a copied initrd, go to the top
//! of the same bank, far from the image's BSS. Nothing may land on the
//! firmware's device tree, on the package it is being copied from, or on a
//! reserved region.

use moat_platform::dt::Range;

pub const PAGE_SIZE: u64 = 4096;
pub const BLOCK_2M: u64 = 2 << 20;
/// Space for the host's device tree: the Linux boot protocol allows up to 2 MiB.
pub const HOST_DTB_SPACE: u64 = BLOCK_2M;
/// Most forbidden ranges the planner tracks.
const MAX_FORBIDDEN: usize = 48;

pub const fn align_up(v: u64, align: u64) -> Option<u64> {
    match v.checked_add(align - 1) {
        Some(x) => Some(x & !(align - 1)),
        None => None,
    }
}

pub const fn align_down(v: u64, align: u64) -> u64 {
    v & !(align - 1)
}

/// The end of the core's 2 MiB block(s): the first 2 MiB boundary at or
/// after the end of its image. The carve-out always covers the core up to
/// here, so a payload meant to be used in place must start at or after it.
/// The image builder uses the same rule with addresses counted from the load
/// address, which is 2 MiB aligned.
pub const fn core_block_end(image_end: u64) -> Option<u64> {
    align_up(image_end, BLOCK_2M)
}

/// What the arm64 Image header of a host payload says, or what a raw binary implies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostImageInfo {
    /// Offset from a 2 MiB boundary the image must be loaded at.
    pub text_offset: u64,
    /// Bytes the image occupies once running (file plus BSS).
    pub effective_size: u64,
    /// Whether the payload carried an arm64 Image header.
    pub has_header: bool,
}

/// Reads the arm64 Image header (`ARM\x64` at byte 56). A payload without one
/// is treated as an Image with `text_offset` 0 whose BSS fits in 2 MiB.
pub fn host_image_info(image: &[u8]) -> HostImageInfo {
    let word = |at: usize| -> Option<u64> {
        image
            .get(at..at + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    };
    let has_magic = image.get(56..60) == Some(b"ARM\x64".as_slice());
    match (has_magic, word(8), word(16)) {
        (true, Some(text_offset), Some(size)) if size != 0 => HostImageInfo {
            text_offset: text_offset % BLOCK_2M,
            effective_size: size.max(image.len() as u64),
            has_header: true,
        },
        // Header with image_size 0: pre-3.17 kernels, text_offset 0x80000.
        (true, _, _) => HostImageInfo {
            text_offset: 0x8_0000,
            effective_size: image.len() as u64 + BLOCK_2M,
            has_header: true,
        },
        _ => HostImageInfo {
            text_offset: 0,
            effective_size: image.len() as u64 + BLOCK_2M,
            has_header: false,
        },
    }
}

/// Up to two disjoint ranges, sorted by address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pieces {
    ranges: [Range; 2],
    len: usize,
}

impl Pieces {
    /// The ranges, lowest first.
    pub fn as_slice(&self) -> &[Range] {
        &self.ranges[..self.len]
    }

    /// Whether `addr` lies in one of the ranges.
    pub fn contains(&self, addr: u64) -> bool {
        self.as_slice()
            .iter()
            .any(|r| addr >= r.base && addr < r.end())
    }

    /// One past the highest byte (0 when empty).
    pub fn end(&self) -> u64 {
        self.as_slice().iter().map(Range::end).max().unwrap_or(0)
    }

    /// Total bytes.
    pub fn size(&self) -> u64 {
        self.as_slice().iter().map(|r| r.size).sum()
    }

    /// Adds `r`, merging it with a range it touches; keeps the order.
    fn push(&mut self, r: Range) -> Result<(), LayoutError> {
        for existing in &mut self.ranges[..self.len] {
            if existing.end() == r.base || r.end() == existing.base {
                let base = existing.base.min(r.base);
                *existing =
                    Range::new(base, existing.size + r.size).ok_or(LayoutError::Overflow)?;
                return Ok(());
            }
        }
        let slot = self.ranges.get_mut(self.len).ok_or(LayoutError::Overflow)?;
        *slot = r;
        self.len += 1;
        self.ranges[..self.len].sort_unstable_by_key(|r| r.base);
        Ok(())
    }
}

/// The inputs of the plan.
#[derive(Clone, Debug)]
pub struct LayoutInput<'a> {
    pub memory: &'a [Range],
    /// Reserved regions from the device tree.
    pub reserved: &'a [Range],
    /// Where the core was loaded and how far its image (with BSS) reaches.
    pub image: Range,
    /// Bytes of heap the carve-out holds besides the image.
    pub heap_size: u64,
    /// The boot package as loaded.
    pub package: Range,
    /// The firmware's device tree as loaded.
    pub firmware_dtb: Range,
    pub host_image: HostImageInfo,
    /// The address of the host image's first byte inside the package.
    pub host_image_at: u64,
    /// The initrd's bytes inside the package, if there is one.
    pub initrd: Option<Range>,
}

/// The result: every region the boot path writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Memory the host never gets: the core's image and the heap, as one
    /// range or, when host payloads stay in place between them, as two.
    pub carve_out: Pieces,
    /// The heap, inside the carve-out: the rest of the core's block after
    /// its image, and the heap range proper.
    pub heap: Pieces,
    /// Where the host image runs, BSS included; its first byte is the entry
    /// point.
    pub host_image: Range,
    /// Whether the host image is used where the package holds it, or copied.
    pub host_image_in_place: bool,
    pub host_initrd: Option<Range>,
    /// Whether the initrd is used where the package holds it, or copied.
    pub host_initrd_in_place: bool,
    /// Space for the host's device tree (the tree itself may be shorter).
    pub host_dtb: Range,
}

/// Why no layout fits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// The core's image is not inside a RAM bank.
    ImageNotInRam,
    /// The carve-out runs past the end of its bank.
    CarveOutTooLarge,
    /// The carve-out overlaps a reserved region.
    CarveOutReserved,
    /// No room for the named item.
    NoRoom(&'static str),
    /// Arithmetic overflow on the inputs.
    Overflow,
}

impl core::fmt::Display for LayoutError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::ImageNotInRam => write!(
                f,
                "the core is not loaded in a RAM bank the device tree lists"
            ),
            Self::CarveOutTooLarge => {
                write!(f, "the hypervisor carve-out runs past the end of RAM")
            }
            Self::CarveOutReserved => {
                write!(f, "the hypervisor carve-out overlaps a reserved region")
            }
            Self::NoRoom(what) => write!(f, "no room in RAM for the {what}"),
            Self::Overflow => write!(f, "memory layout arithmetic overflowed"),
        }
    }
}

#[derive(Clone)]
struct Forbidden {
    ranges: [Range; MAX_FORBIDDEN],
    len: usize,
}

impl Forbidden {
    fn new() -> Self {
        Self {
            ranges: [Range::default(); MAX_FORBIDDEN],
            len: 0,
        }
    }

    fn push(&mut self, r: Range) -> Result<(), LayoutError> {
        let slot = self.ranges.get_mut(self.len).ok_or(LayoutError::Overflow)?;
        *slot = r;
        self.len += 1;
        Ok(())
    }

    fn any_overlap(&self, r: &Range) -> bool {
        self.ranges[..self.len].iter().any(|f| f.overlaps(r))
    }

    fn first_overlap(&self, r: &Range) -> Option<Range> {
        self.ranges[..self.len]
            .iter()
            .copied()
            .filter(|f| f.overlaps(r))
            .min_by_key(|f| f.base)
    }

    fn last_overlap(&self, r: &Range) -> Option<Range> {
        self.ranges[..self.len]
            .iter()
            .copied()
            .filter(|f| f.overlaps(r))
            .max_by_key(|f| f.end())
    }
}

/// Lowest `base ≡ offset (mod align)`, `base >= from`, with `[base, base+size)`
/// inside `bank` and clear of everything forbidden.
fn place_upwards(
    bank: &Range,
    from: u64,
    size: u64,
    align: u64,
    offset: u64,
    forbidden: &Forbidden,
) -> Option<Range> {
    let mut cursor = from.max(bank.base);
    loop {
        let base = align_up(cursor.saturating_sub(offset), align)?.checked_add(offset)?;
        let base = if base < cursor {
            base.checked_add(align)?
        } else {
            base
        };
        let r = Range::new(base, size)?;
        if !bank.contains_range(&r) {
            return None;
        }
        match forbidden.first_overlap(&r) {
            None => return Some(r),
            Some(f) => cursor = f.end(),
        }
    }
}

/// Highest aligned placement below `below`, inside `bank`.
fn place_downwards(
    bank: &Range,
    below: u64,
    size: u64,
    align: u64,
    forbidden: &Forbidden,
) -> Option<Range> {
    let mut ceiling = below.min(bank.end());
    loop {
        let base = align_down(ceiling.checked_sub(size)?, align);
        let r = Range::new(base, size)?;
        if !bank.contains_range(&r) {
            return None;
        }
        match forbidden.last_overlap(&r) {
            None => return Some(r),
            Some(f) => ceiling = f.base,
        }
    }
}

/// `r` widened to whole pages.
fn pages_of(r: Range) -> Option<Range> {
    let base = align_down(r.base, PAGE_SIZE);
    let end = align_up(r.end(), PAGE_SIZE)?;
    Range::new(base, end - base)
}

/// Computes the boot layout: host payloads in place where the package allows
/// it and the rest of the plan still fits, copied otherwise.
pub fn plan(input: &LayoutInput<'_>) -> Result<Layout, LayoutError> {
    match plan_with(input, true) {
        Err(LayoutError::NoRoom(_)) => plan_with(input, false),
        other => other,
    }
}

/// Computes the boot layout, using payloads in place only if `in_place`.
fn plan_with(input: &LayoutInput<'_>, in_place: bool) -> Result<Layout, LayoutError> {
    let bank = *input
        .memory
        .iter()
        .find(|b| b.contains_range(&input.image))
        .ok_or(LayoutError::ImageNotInRam)?;
    let carve_base = align_down(input.image.base, BLOCK_2M).max(bank.base);
    let heap_base = align_up(input.image.end(), PAGE_SIZE).ok_or(LayoutError::Overflow)?;
    let core_end = core_block_end(input.image.end()).ok_or(LayoutError::Overflow)?;
    let core_block = Range::new(carve_base, core_end - carve_base).ok_or(LayoutError::Overflow)?;

    // What no placement may touch, whatever the layout.
    let mut fixed = Forbidden::new();
    fixed.push(input.firmware_dtb)?;
    for r in input.reserved {
        fixed.push(*r)?;
    }
    let mut outside_core = fixed.clone();
    outside_core.push(core_block)?;

    // The payloads the package already holds where the host needs them.
    let image_size =
        align_up(input.host_image.effective_size, PAGE_SIZE).ok_or(LayoutError::Overflow)?;
    let image_in_place = Range::new(input.host_image_at, image_size).filter(|r| {
        in_place
            && r.base % BLOCK_2M == input.host_image.text_offset
            && r.base.is_multiple_of(PAGE_SIZE)
            && bank.contains_range(r)
            && !outside_core.any_overlap(r)
    });
    let initrd_in_place = input.initrd.filter(|i| {
        in_place
            && pages_of(*i).is_some_and(|p| {
                bank.contains_range(&p)
                    && !outside_core.any_overlap(&p)
                    && !image_in_place.is_some_and(|img| img.overlaps(&p))
            })
    });
    let mut in_place_ranges = Forbidden::new();
    for r in image_in_place.iter().chain(initrd_in_place.iter()) {
        in_place_ranges.push(pages_of(*r).ok_or(LayoutError::Overflow)?)?;
    }

    // The carve-out: the heap right after the image if that leaves every
    // in-place payload alone, otherwise the heap after the package.
    let carve_end = align_up(
        heap_base
            .checked_add(input.heap_size)
            .ok_or(LayoutError::Overflow)?,
        BLOCK_2M,
    )
    .ok_or(LayoutError::Overflow)?;
    let whole = Range::new(carve_base, carve_end - carve_base).ok_or(LayoutError::Overflow)?;
    let mut carve_out = Pieces::default();
    let mut heap = Pieces::default();
    if in_place_ranges.len == 0 || !in_place_ranges.any_overlap(&whole) {
        if !bank.contains_range(&whole) {
            return Err(LayoutError::CarveOutTooLarge);
        }
        if input.reserved.iter().any(|r| r.overlaps(&whole)) {
            return Err(LayoutError::CarveOutReserved);
        }
        carve_out.push(whole)?;
        heap.push(Range::new(heap_base, carve_end - heap_base).ok_or(LayoutError::Overflow)?)?;
    } else {
        if !bank.contains_range(&core_block) {
            return Err(LayoutError::CarveOutTooLarge);
        }
        if input.reserved.iter().any(|r| r.overlaps(&core_block)) {
            return Err(LayoutError::CarveOutReserved);
        }
        let mut avoid = outside_core.clone();
        avoid.push(input.package)?;
        for r in &in_place_ranges.ranges[..in_place_ranges.len] {
            avoid.push(*r)?;
        }
        let from = in_place_ranges.ranges[..in_place_ranges.len]
            .iter()
            .map(Range::end)
            .fold(core_end.max(input.package.end()), u64::max);
        let size = align_up(input.heap_size, BLOCK_2M).ok_or(LayoutError::Overflow)?;
        let heap_range = place_upwards(&bank, from, size, BLOCK_2M, 0, &avoid)
            .ok_or(LayoutError::NoRoom("heap"))?;
        carve_out.push(core_block)?;
        carve_out.push(heap_range)?;
        if let Some(spare) = Range::new(heap_base, core_end.saturating_sub(heap_base)) {
            heap.push(spare)?;
        }
        heap.push(heap_range)?;
    }

    let mut forbidden = fixed;
    for r in carve_out.as_slice() {
        forbidden.push(*r)?;
    }
    forbidden.push(input.package)?;
    for r in &in_place_ranges.ranges[..in_place_ranges.len] {
        forbidden.push(*r)?;
    }

    // A host image that must be copied: above the carve-out and the package,
    // 2 MiB + text_offset.
    let host_image = match image_in_place {
        Some(r) => r,
        None => {
            let start = carve_out.end().max(input.package.end());
            let r = place_upwards(
                &bank,
                start,
                image_size,
                BLOCK_2M,
                input.host_image.text_offset,
                &forbidden,
            )
            .ok_or(LayoutError::NoRoom("host image"))?;
            forbidden.push(r)?;
            r
        }
    };

    // Device tree and a copied initrd: at the top of the bank.
    let host_dtb = place_downwards(&bank, bank.end(), HOST_DTB_SPACE, BLOCK_2M, &forbidden)
        .filter(|r| r.base >= host_image.end())
        .ok_or(LayoutError::NoRoom("host device tree"))?;
    forbidden.push(host_dtb)?;
    let host_initrd = match (input.initrd, initrd_in_place) {
        (_, Some(r)) => Some(r),
        (None, None) => None,
        (Some(initrd), None) => {
            let size = align_up(initrd.size, PAGE_SIZE).ok_or(LayoutError::Overflow)?;
            let r = place_downwards(&bank, host_dtb.base, size, PAGE_SIZE, &forbidden)
                .filter(|r| r.base >= host_image.end())
                .ok_or(LayoutError::NoRoom("host initrd"))?;
            Some(Range {
                base: r.base,
                size: initrd.size,
            })
        }
    };

    Ok(Layout {
        carve_out,
        heap,
        host_image,
        host_image_in_place: image_in_place.is_some(),
        host_initrd,
        host_initrd_in_place: initrd_in_place.is_some(),
        host_dtb,
    })
}

/// A heap range split around the boot package: what the allocator may have
/// while the package is still being read, and what it gets once the package
/// is consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapSplit {
    /// Clear of the package (whole pages).
    pub now: Pieces,
    /// Under the package.
    pub later: Option<Range>,
}

/// Splits `heap` around `package`, at page boundaries.
pub fn heap_around_package(heap: Range, package: Range) -> HeapSplit {
    let mut split = HeapSplit::default();
    let Some(under) = pages_of(package).filter(|p| p.overlaps(&heap)) else {
        let _ = split.now.push(heap);
        return split;
    };
    let start = under.base.max(heap.base);
    let end = under.end().min(heap.end());
    if let Some(before) = Range::new(heap.base, start - heap.base) {
        let _ = split.now.push(before);
    }
    if let Some(after) = Range::new(end, heap.end() - end) {
        let _ = split.now.push(after);
    }
    split.later = Range::new(start, end - start);
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    const KIB: u64 = 1 << 10;

    fn r(base: u64, size: u64) -> Range {
        Range::new(base, size).unwrap()
    }

    /// A package as the image builder laid it out before payloads were
    /// placed for use in place: host image first, right after the table.
    fn qemu_input<'a>(memory: &'a [Range], reserved: &'a [Range]) -> LayoutInput<'a> {
        LayoutInput {
            memory,
            reserved,
            image: r(0x4020_0000, 0x9_0000),
            heap_size: 16 * MIB,
            package: r(0x4029_0000, 40 * MIB),
            firmware_dtb: r(0x4800_0000, MIB),
            host_image: HostImageInfo {
                text_offset: 0,
                effective_size: 36 * MIB,
                has_header: true,
            },
            host_image_at: 0x4029_1000,
            initrd: Some(r(0x4269_1000, 3 * MIB + 5)),
        }
    }

    /// The Linux package as the image builder lays it out now: the core's
    /// own entries in the core's 2 MiB block, the initrd from the next 2 MiB
    /// boundary, the Image at the one after.
    fn in_place_input<'a>(memory: &'a [Range], reserved: &'a [Range]) -> LayoutInput<'a> {
        LayoutInput {
            memory,
            reserved,
            image: r(0x4020_0000, 1440 * KIB),
            heap_size: 18 * MIB,
            package: r(0x4036_8000, 0x4060_0000 + 32182 * KIB - 0x4036_8000),
            firmware_dtb: r(0x4800_0000, MIB),
            host_image: HostImageInfo {
                text_offset: 0,
                effective_size: 32832 * KIB,
                has_header: true,
            },
            host_image_at: 0x4060_0000,
            initrd: Some(r(0x4040_0000, 1805 * KIB + 17)),
        }
    }

    /// Every range the host is given lies outside the carve-out and every
    /// reserved or firmware range, and the host's ranges do not overlap.
    fn assert_sound(input: &LayoutInput<'_>, l: &Layout) {
        let mut host = vec![l.host_image, l.host_dtb];
        host.extend(l.host_initrd.map(|i| pages_of(i).unwrap()));
        for (i, h) in host.iter().enumerate() {
            assert!(
                input.memory.iter().any(|b| b.contains_range(h)),
                "{h:x?} not in RAM"
            );
            for c in l.carve_out.as_slice() {
                assert!(!c.overlaps(h), "{h:x?} overlaps the carve-out {c:x?}");
            }
            for f in input.reserved.iter().chain([&input.firmware_dtb]) {
                assert!(!f.overlaps(h), "{h:x?} overlaps {f:x?}");
            }
            for other in &host[..i] {
                assert!(!other.overlaps(h), "{h:x?} overlaps {other:x?}");
            }
        }
        // The core's image is inside the carve-out, the heap too.
        assert!(
            l.carve_out
                .as_slice()
                .iter()
                .any(|c| c.contains_range(&input.image))
        );
        for h in l.heap.as_slice() {
            assert!(l.carve_out.as_slice().iter().any(|c| c.contains_range(h)));
            assert!(!h.overlaps(&input.image));
            for f in input.reserved.iter().chain([&input.firmware_dtb]) {
                assert!(!f.overlaps(h), "heap {h:x?} overlaps {f:x?}");
            }
        }
        assert!(l.heap.size() >= input.heap_size);
        for c in l.carve_out.as_slice() {
            assert_eq!(c.base % BLOCK_2M, 0);
            assert_eq!(c.size % BLOCK_2M, 0);
        }
        // A copied payload never lands on the package it is copied from.
        if !l.host_image_in_place {
            assert!(!l.host_image.overlaps(&input.package));
        }
        if let (Some(i), false) = (l.host_initrd, l.host_initrd_in_place) {
            assert!(!i.overlaps(&input.package));
        }
        assert_eq!(l.host_image.base % BLOCK_2M, input.host_image.text_offset);
    }

    #[test]
    fn qemu_virt_one_gib() {
        let mem = [r(0x4000_0000, GIB)];
        let input = qemu_input(&mem, &[]);
        let l = plan(&input).unwrap();
        assert_eq!(l.carve_out.as_slice(), &[r(0x4020_0000, 18 * MIB)]);
        assert_eq!(
            l.heap.as_slice(),
            &[r(0x4029_0000, 0x4140_0000 - 0x4029_0000)]
        );
        // The image is not at a 2 MiB boundary in the package: copied.
        assert!(!l.host_image_in_place);
        // After the package (ends 0x42a9_0000), next 2 MiB boundary, but the
        // firmware DTB at 0x4800_0000 is in the way of a 36 MiB image only if it
        // overlaps: 0x42c0_0000 + 36 MiB = 0x4500_0000 < 0x4800_0000.
        assert_eq!(l.host_image.base, 0x42c0_0000);
        assert_eq!(l.host_dtb, r(0x7fe0_0000, 2 * MIB));
        // The initrd lies outside the carve-out on its own pages: it stays.
        assert!(l.host_initrd_in_place);
        assert_eq!(l.host_initrd, input.initrd);
        assert_sound(&input, &l);
        // Without it, everything is copied, the initrd below the tree.
        let l = plan_with(&input, false).unwrap();
        assert!(!l.host_initrd_in_place);
        let initrd = l.host_initrd.unwrap();
        assert_eq!(initrd.size, 3 * MIB + 5);
        assert_eq!(initrd.base % PAGE_SIZE, 0);
        assert!(initrd.end() <= l.host_dtb.base);
        assert_sound(&input, &l);
    }

    #[test]
    fn payloads_in_place_move_the_heap_after_the_package() {
        let mem = [r(0x4000_0000, GIB)];
        let input = in_place_input(&mem, &[]);
        let l = plan(&input).unwrap();
        assert!(l.host_image_in_place);
        assert!(l.host_initrd_in_place);
        assert_eq!(l.host_image, r(0x4060_0000, 32832 * KIB));
        assert_eq!(l.host_initrd, input.initrd);
        // The core's block, then the heap at the first 2 MiB boundary after
        // the image's BSS (0x4260_0000 + 64 KiB).
        assert_eq!(
            l.carve_out.as_slice(),
            &[r(0x4020_0000, 2 * MIB), r(0x4280_0000, 18 * MIB)]
        );
        assert_eq!(
            l.heap.as_slice(),
            &[
                r(0x4036_8000, 0x4040_0000 - 0x4036_8000),
                r(0x4280_0000, 18 * MIB)
            ]
        );
        assert_eq!(l.host_dtb, r(0x7fe0_0000, 2 * MIB));
        assert_sound(&input, &l);
    }

    #[test]
    fn in_place_image_with_a_copied_initrd() {
        let mem = [r(0x4000_0000, GIB)];
        let mut input = in_place_input(&mem, &[]);
        // An initrd that starts inside the core's block cannot stay there.
        input.initrd = Some(r(0x4037_0000, MIB));
        let l = plan(&input).unwrap();
        assert!(l.host_image_in_place);
        assert!(!l.host_initrd_in_place);
        let initrd = l.host_initrd.unwrap();
        assert!(initrd.end() <= l.host_dtb.base);
        assert_sound(&input, &l);
    }

    #[test]
    fn in_place_refusals_fall_back_to_copies() {
        let mem = [r(0x4000_0000, GIB)];
        // Not at 2 MiB + text_offset.
        let mut input = in_place_input(&mem, &[]);
        input.host_image.text_offset = 0x8_0000;
        let l = plan(&input).unwrap();
        assert!(!l.host_image_in_place);
        assert_eq!(l.host_image.base % BLOCK_2M, 0x8_0000);
        assert_sound(&input, &l);

        // Inside the core's block.
        let mut input = in_place_input(&mem, &[]);
        input.host_image_at = 0x4020_0000;
        input.initrd = None;
        let l = plan(&input).unwrap();
        assert!(!l.host_image_in_place);
        assert_sound(&input, &l);

        // Its BSS would run over a reserved region, or the firmware's tree.
        for reserved in [r(0x4250_0000, PAGE_SIZE), r(0x4000_0000, PAGE_SIZE)] {
            let res = [reserved];
            let mut input = in_place_input(&mem, &res);
            if reserved.base == 0x4000_0000 {
                input.firmware_dtb = r(0x4260_0000, 64 * KIB);
            }
            let l = plan(&input).unwrap();
            assert!(!l.host_image_in_place, "{reserved:x?}");
            // The initrd can still stay where it is.
            assert!(l.host_initrd_in_place);
            assert_sound(&input, &l);
        }

        // An initrd inside the image's BSS.
        let mut input = in_place_input(&mem, &[]);
        input.initrd = Some(r(0x4260_0000, 4 * KIB));
        input.package = r(0x4036_8000, 0x4260_1000 - 0x4036_8000);
        let l = plan(&input).unwrap();
        assert!(l.host_image_in_place);
        assert!(!l.host_initrd_in_place);
        assert_sound(&input, &l);

        // The bank ends inside the image's BSS.
        let mem_small = [r(0x4000_0000, 0x4260_0000 - 0x4000_0000)];
        let input = in_place_input(&mem_small, &[]);
        assert!(plan(&input).is_err());
    }

    #[test]
    fn in_place_fits_where_copies_do_not() {
        // 64 MiB of RAM: the heap fits after the Image in place, but a copy
        // of the Image does not fit after the package.
        let mem = [r(0x4000_0000, 64 * MIB)];
        let input = in_place_input(&mem, &[]);
        let l = plan(&input).unwrap();
        assert!(l.host_image_in_place);
        assert_sound(&input, &l);
        assert_eq!(
            plan_with(&input, false),
            Err(LayoutError::NoRoom("host image"))
        );
    }

    #[test]
    fn an_in_place_initrd_that_leaves_no_room_is_copied_instead() {
        // The Image is not aligned, so it is copied; keeping the initrd in
        // place would push the heap after the package and leave no room for
        // the copy, so the initrd is copied too and the heap follows the core.
        let mem = [r(0x4000_0000, 76 * MIB)];
        let mut input = in_place_input(&mem, &[]);
        input.host_image_at = 0x4060_1000;
        input.package = r(0x4036_8000, 0x4260_0000 - 0x4036_8000);
        assert_eq!(
            plan_with(&input, true),
            Err(LayoutError::NoRoom("host image"))
        );
        let l = plan(&input).unwrap();
        assert!(!l.host_image_in_place && !l.host_initrd_in_place);
        assert_eq!(l.carve_out.as_slice(), &[r(0x4020_0000, 20 * MIB)]);
        assert_sound(&input, &l);
    }

    #[test]
    fn in_place_payloads_clear_of_the_contiguous_heap_keep_one_carve_out() {
        let mem = [r(0x4000_0000, GIB)];
        let mut input = in_place_input(&mem, &[]);
        // Far enough that the heap after the image does not reach them.
        input.host_image_at = 0x4400_0000;
        input.initrd = Some(r(0x4300_0000, MIB));
        input.package = r(0x4036_8000, 0x4400_0000 + 32182 * KIB - 0x4036_8000);
        let l = plan(&input).unwrap();
        assert!(l.host_image_in_place && l.host_initrd_in_place);
        assert_eq!(l.carve_out.as_slice(), &[r(0x4020_0000, 20 * MIB)]);
        assert_sound(&input, &l);
    }

    #[test]
    fn image_skips_the_firmware_dtb_and_reserved_memory() {
        let mem = [r(0x4000_0000, GIB)];
        let reserved = [r(0x4300_0000, 4096)];
        let mut input = qemu_input(&mem, &reserved);
        input.host_image.effective_size = 100 * MIB;
        let l = plan(&input).unwrap();
        // 0x42c0_0000 would cover the reserved page; 0x4300_1000 rounds to 0x4320_0000,
        // which would cover the firmware DTB at 0x4800_0000; so after it.
        assert_eq!(l.host_image.base, 0x4820_0000);
        assert_sound(&input, &l);
    }

    #[test]
    fn heap_skips_the_firmware_dtb_and_reserved_memory() {
        let mem = [r(0x4000_0000, GIB)];
        let reserved = [r(0x4300_0000, 4096)];
        let mut input = in_place_input(&mem, &reserved);
        input.firmware_dtb = r(0x4400_0000, MIB);
        let l = plan(&input).unwrap();
        assert!(l.host_image_in_place);
        // 0x4280_0000 + 18 MiB covers both; the first 2 MiB boundary after
        // the firmware's tree.
        assert_eq!(l.carve_out.as_slice()[1], r(0x4420_0000, 18 * MIB));
        assert_sound(&input, &l);
    }

    #[test]
    fn text_offset_is_honoured() {
        let mem = [r(0x4000_0000, GIB)];
        let mut input = qemu_input(&mem, &[]);
        input.host_image.text_offset = 0x8_0000;
        let l = plan(&input).unwrap();
        assert_eq!(l.host_image.base % BLOCK_2M, 0x8_0000);
        assert!(l.host_image.base >= l.carve_out.end());
        let mut input = in_place_input(&mem, &[]);
        input.host_image.text_offset = 0x8_0000;
        input.host_image_at = 0x4068_0000;
        let l = plan(&input).unwrap();
        assert!(l.host_image_in_place);
        assert_eq!(l.host_image.base, 0x4068_0000);
        assert_sound(&input, &l);
    }

    #[test]
    fn refusals() {
        let mem = [r(0x4000_0000, 64 * MIB)];
        let input = qemu_input(&mem, &[]);
        assert_eq!(plan(&input), Err(LayoutError::NoRoom("host image")));
        let mem = [r(0x8000_0000, GIB)];
        assert_eq!(
            plan(&qemu_input(&mem, &[])),
            Err(LayoutError::ImageNotInRam)
        );
        let mem = [r(0x4000_0000, GIB)];
        let reserved = [r(0x4100_0000, 4096)];
        assert_eq!(
            plan(&qemu_input(&mem, &reserved)),
            Err(LayoutError::CarveOutReserved)
        );
        // The core's own block reserved: refused in either layout.
        let reserved = [r(0x4030_0000, 4096)];
        assert_eq!(
            plan(&in_place_input(&mem, &reserved)),
            Err(LayoutError::CarveOutReserved)
        );
        let mem = [r(0x4000_0000, 4 * MIB)];
        let mut input = qemu_input(&mem, &[]);
        input.image = r(0x4020_0000, MIB);
        assert_eq!(plan(&input), Err(LayoutError::CarveOutTooLarge));
    }

    #[test]
    fn core_block_end_rounds_to_2_mib() {
        assert_eq!(core_block_end(0x4036_8000), Some(0x4040_0000));
        assert_eq!(core_block_end(0x4040_0000), Some(0x4040_0000));
        assert_eq!(core_block_end(1440 * KIB), Some(2 * MIB));
        assert_eq!(core_block_end(u64::MAX), None);
    }

    #[test]
    fn pieces_merge_and_sort() {
        let mut p = Pieces::default();
        p.push(r(0x4280_0000, 2 * MIB)).unwrap();
        p.push(r(0x4020_0000, 2 * MIB)).unwrap();
        assert_eq!(
            p.as_slice(),
            &[r(0x4020_0000, 2 * MIB), r(0x4280_0000, 2 * MIB)]
        );
        assert!(p.contains(0x4020_0000) && p.contains(0x429f_ffff));
        assert!(!p.contains(0x4040_0000) && !p.contains(0x42a0_0000));
        assert_eq!(p.end(), 0x42a0_0000);
        assert_eq!(p.size(), 4 * MIB);
        let mut q = Pieces::default();
        q.push(r(0x4020_0000, 2 * MIB)).unwrap();
        q.push(r(0x4040_0000, 2 * MIB)).unwrap();
        assert_eq!(q.as_slice(), &[r(0x4020_0000, 4 * MIB)]);
        assert_eq!(p.push(r(0x5000_0000, MIB)), Err(LayoutError::Overflow));
    }

    #[test]
    fn heap_split_around_the_package() {
        // The package at the start of the heap: the rest now, the part under
        // it (to its last page) later.
        let s = heap_around_package(r(0x4029_0000, 0x0117_0000), r(0x4029_0000, MIB + 5));
        assert_eq!(
            s.now.as_slice(),
            &[r(0x4039_1000, 0x4140_0000 - 0x4039_1000)]
        );
        assert_eq!(s.later, Some(r(0x4029_0000, MIB + PAGE_SIZE)));
        // A package longer than the heap: nothing now.
        let s = heap_around_package(r(0x4029_0000, MIB), r(0x4029_0000, 40 * MIB));
        assert_eq!(s.now.as_slice(), &[]);
        assert_eq!(s.later, Some(r(0x4029_0000, MIB)));
        // A heap clear of the package: all of it now.
        let s = heap_around_package(r(0x4280_0000, 18 * MIB), r(0x4036_8000, 30 * MIB));
        assert_eq!(s.now.as_slice(), &[r(0x4280_0000, 18 * MIB)]);
        assert_eq!(s.later, None);
        // A package in the middle of a heap: both sides now.
        let s = heap_around_package(r(0x4000_0000, 4 * MIB), r(0x4010_0000, MIB));
        assert_eq!(
            s.now.as_slice(),
            &[r(0x4000_0000, MIB), r(0x4020_0000, 2 * MIB)]
        );
        assert_eq!(s.later, Some(r(0x4010_0000, MIB)));
    }

    #[test]
    fn image_header_parsing() {
        let mut img = vec![0u8; 4096];
        img[56..60].copy_from_slice(b"ARM\x64");
        img[8..16].copy_from_slice(&0u64.to_le_bytes());
        img[16..24].copy_from_slice(&(8 * MIB).to_le_bytes());
        assert_eq!(
            host_image_info(&img),
            HostImageInfo {
                text_offset: 0,
                effective_size: 8 * MIB,
                has_header: true
            }
        );
        let raw = vec![0u8; 100];
        assert!(!host_image_info(&raw).has_header);
        assert_eq!(host_image_info(&raw).effective_size, 100 + BLOCK_2M);
        assert!(!host_image_info(&[]).has_header);
    }
}
