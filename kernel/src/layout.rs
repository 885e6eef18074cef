//! Where everything goes in physical memory at boot.
//!
//! The core runs where the firmware loaded it. Its *carve-out* starts at its
//! load address and covers its image (text, data, BSS with the per-CPU stacks)
//! and its heap, rounded out to 2 MiB so the host's stage-2 can use block
//! mappings around it. The boot package sits right after the image, inside
//! what becomes the heap; it is consumed before the heap is handed to the
//! allocator.
//!
//! ```text
//!  RAM bank
//!  | host | carve-out: core image | heap (package lies here at boot) | host ...  | initrd | DTB |
//!         ^ load address           ^ image end                        ^ host     ^ top of the bank
//!                                                                       image
//! ```
//!
//! The host image goes to the first 2 MiB boundary after both the carve-out
//! and the package (plus the image's `text_offset`), as the Linux boot
//! protocol asks; the host's device tree and initrd go to the top of the same
//! bank, far from the image's BSS. Nothing may land on the firmware's device
//! tree, on the package it is being copied from, or on a reserved region.

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

/// The inputs of the plan.
#[derive(Clone, Debug)]
pub struct LayoutInput<'a> {
    pub memory: &'a [Range],
    /// Reserved regions from the device tree.
    pub reserved: &'a [Range],
    /// Where the core was loaded and how far its image (with BSS) reaches.
    pub image: Range,
    /// Bytes of heap the carve-out adds after the image.
    pub heap_size: u64,
    /// The boot package as loaded.
    pub package: Range,
    /// The firmware's device tree as loaded.
    pub firmware_dtb: Range,
    pub host_image: HostImageInfo,
    pub initrd_size: u64,
}

/// The result: every region the boot path writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Memory the host never gets: core image plus heap.
    pub carve_out: Range,
    /// The heap, inside the carve-out, after the image.
    pub heap: Range,
    /// Where the host image is copied; its first byte is the entry point.
    pub host_image: Range,
    pub host_initrd: Option<Range>,
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

struct Forbidden {
    ranges: [Range; MAX_FORBIDDEN],
    len: usize,
}

impl Forbidden {
    fn push(&mut self, r: Range) -> Result<(), LayoutError> {
        let slot = self.ranges.get_mut(self.len).ok_or(LayoutError::Overflow)?;
        *slot = r;
        self.len += 1;
        Ok(())
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

/// Computes the boot layout.
pub fn plan(input: &LayoutInput<'_>) -> Result<Layout, LayoutError> {
    let bank = *input
        .memory
        .iter()
        .find(|b| b.contains_range(&input.image))
        .ok_or(LayoutError::ImageNotInRam)?;
    let carve_base = align_down(input.image.base, BLOCK_2M).max(bank.base);
    let heap_base = align_up(input.image.end(), PAGE_SIZE).ok_or(LayoutError::Overflow)?;
    let carve_end = align_up(
        heap_base
            .checked_add(input.heap_size)
            .ok_or(LayoutError::Overflow)?,
        BLOCK_2M,
    )
    .ok_or(LayoutError::Overflow)?;
    let carve_out = Range::new(carve_base, carve_end - carve_base).ok_or(LayoutError::Overflow)?;
    if !bank.contains_range(&carve_out) {
        return Err(LayoutError::CarveOutTooLarge);
    }
    if input.reserved.iter().any(|r| r.overlaps(&carve_out)) {
        return Err(LayoutError::CarveOutReserved);
    }
    let heap = Range::new(heap_base, carve_end - heap_base).ok_or(LayoutError::Overflow)?;

    let mut forbidden = Forbidden {
        ranges: [Range::default(); MAX_FORBIDDEN],
        len: 0,
    };
    forbidden.push(carve_out)?;
    forbidden.push(input.package)?;
    forbidden.push(input.firmware_dtb)?;
    for r in input.reserved {
        forbidden.push(*r)?;
    }

    // The host image: above the carve-out and the package, 2 MiB + text_offset.
    let start = carve_out.end().max(input.package.end());
    let size = align_up(input.host_image.effective_size, PAGE_SIZE).ok_or(LayoutError::Overflow)?;
    let host_image = place_upwards(
        &bank,
        start,
        size,
        BLOCK_2M,
        input.host_image.text_offset,
        &forbidden,
    )
    .ok_or(LayoutError::NoRoom("host image"))?;
    forbidden.push(host_image)?;

    // Device tree and initrd: at the top of the bank.
    let host_dtb = place_downwards(&bank, bank.end(), HOST_DTB_SPACE, BLOCK_2M, &forbidden)
        .filter(|r| r.base >= host_image.end())
        .ok_or(LayoutError::NoRoom("host device tree"))?;
    forbidden.push(host_dtb)?;
    let host_initrd = if input.initrd_size == 0 {
        None
    } else {
        let size = align_up(input.initrd_size, PAGE_SIZE).ok_or(LayoutError::Overflow)?;
        let r = place_downwards(&bank, host_dtb.base, size, PAGE_SIZE, &forbidden)
            .filter(|r| r.base >= host_image.end())
            .ok_or(LayoutError::NoRoom("host initrd"))?;
        Some(Range {
            base: r.base,
            size: input.initrd_size,
        })
    };

    Ok(Layout {
        carve_out,
        heap,
        host_image,
        host_initrd,
        host_dtb,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn r(base: u64, size: u64) -> Range {
        Range::new(base, size).unwrap()
    }

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
            initrd_size: 3 * MIB + 5,
        }
    }

    #[test]
    fn qemu_virt_one_gib() {
        let mem = [r(0x4000_0000, GIB)];
        let l = plan(&qemu_input(&mem, &[])).unwrap();
        assert_eq!(l.carve_out, r(0x4020_0000, 18 * MIB));
        assert_eq!(l.heap.base, 0x4029_0000);
        assert_eq!(l.heap.end(), l.carve_out.end());
        // After the package (ends 0x42a9_0000), next 2 MiB boundary, but the
        // firmware DTB at 0x4800_0000 is in the way of a 36 MiB image only if it
        // overlaps: 0x42c0_0000 + 36 MiB = 0x4500_0000 < 0x4800_0000.
        assert_eq!(l.host_image.base, 0x42c0_0000);
        assert_eq!(l.host_dtb, r(0x7fe0_0000, 2 * MIB));
        let initrd = l.host_initrd.unwrap();
        assert_eq!(initrd.size, 3 * MIB + 5);
        assert_eq!(initrd.base % PAGE_SIZE, 0);
        assert!(initrd.end() <= l.host_dtb.base);
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
    }

    #[test]
    fn text_offset_is_honoured() {
        let mem = [r(0x4000_0000, GIB)];
        let mut input = qemu_input(&mem, &[]);
        input.host_image.text_offset = 0x8_0000;
        let l = plan(&input).unwrap();
        assert_eq!(l.host_image.base % BLOCK_2M, 0x8_0000);
        assert!(l.host_image.base >= l.carve_out.end());
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
        let mem = [r(0x4000_0000, 4 * MIB)];
        let mut input = qemu_input(&mem, &[]);
        input.image = r(0x4020_0000, MIB);
        assert_eq!(plan(&input), Err(LayoutError::CarveOutTooLarge));
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
