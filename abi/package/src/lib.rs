//! The Moat boot package.
//!
//! A Moat image is one file: the core's flat binary, padded to the end of its
//! memory footprint, followed by a *package* that carries everything else the
//! core boots: the host payload, its initrd, its command line and, optionally,
//! a device tree that replaces the firmware's. Firmware loads the whole file as
//! if it were a Linux `Image`; the core finds the package right after its own
//! footprint, checks it, and gives each item to the host: a host payload
//! that the builder [placed](builder::Placement) where the host needs it is
//! used where it lies, anything else is copied.
//!
//! ```text
//!  image start                                   image end
//!  | core text/data | bss, stacks (zeros) | PackageHeader | entries | payload bytes ... |
//!                                        ^ package start (4 KiB aligned)
//! ```
//!
//! Every offset in the package is relative to the package start. The reader
//! ([`Package::parse`]) trusts nothing: the header, every entry and every byte
//! range are checked against the buffer before any of it is used, and a
//! checksum over everything the core relies on (all but the host's own
//! payloads) catches truncation and corruption.
#![cfg_attr(not(feature = "std"), no_std)]
#![forbid(unsafe_code)]

use core::fmt;
use zerocopy::{
    FromBytes, Immutable, IntoBytes, KnownLayout, little_endian::U16, little_endian::U32,
    little_endian::U64,
};

/// `MOATPKG\0`.
pub const MAGIC: [u8; 8] = *b"MOATPKG\0";
/// The package layout version this crate reads and writes.
pub const VERSION: u32 = 1;
/// Most entries a package may hold.
pub const MAX_ENTRIES: usize = 32;
/// Packages start on this alignment after the core's footprint.
pub const PACKAGE_ALIGN: u64 = 4096;

/// Package flag: the image runs under QEMU, so the core may end the emulation
/// through semihosting (used to stop with a non-zero status on a fatal error).
pub const FLAG_SEMIHOSTING_EXIT: u32 = 1 << 0;
/// Package flag: a benchmark image. The host's PMU may count instructions
/// executed at EL2 (MDCR_EL2.HPMD clear), so figures include the core's
/// work. Without it EL2 is invisible to the host's counters, which would
/// otherwise be a side channel into the core.
pub const FLAG_BENCHMARK: u32 = 1 << 1;

/// The fixed header at the start of the package.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct PackageHeader {
    pub magic: [u8; 8],
    pub version: U32,
    /// `size_of::<PackageHeader>()`, so readers can tell layouts apart.
    pub header_size: U32,
    /// Bytes from the package start to the end of the last payload.
    pub total_size: U64,
    pub entry_count: U32,
    pub flags: U32,
    /// FNV-1a 64 over the whole package with this field read as zero.
    pub checksum: U64,
}
const _: () = assert!(size_of::<PackageHeader>() == 40);

/// One item in the package.
#[derive(Clone, Copy, Debug, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct EntryHeader {
    /// An [`EntryKind`] value.
    pub kind: U32,
    pub reserved: U32,
    /// From the package start; 8-byte aligned.
    pub offset: U64,
    pub size: U64,
}
const _: () = assert!(size_of::<EntryHeader>() == 24);

/// What an entry holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum EntryKind {
    /// The host payload: an arm64 Linux `Image` or a raw binary.
    HostImage = 1,
    /// The host's initial ramdisk.
    HostInitrd = 2,
    /// The host's command line (UTF-8, no terminator). Replaces `/chosen/bootargs`.
    HostBootargs = 3,
    /// A flattened device tree that replaces the one the firmware passed.
    DeviceTree = 4,
    /// The service table: an array of [`ServiceRecord`]s.
    ServiceTable = 5,
    /// A service's flat binary; records name it by its index among these entries.
    ServiceImage = 6,
    /// The DMA-capable devices without an SMMU the image gives the host
    /// anyway: device-tree node names (`virtio_mmio`, `fw-cfg@9020000`),
    /// UTF-8, one per line.
    UnprotectedDma = 7,
}

impl EntryKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::HostImage,
            2 => Self::HostInitrd,
            3 => Self::HostBootargs,
            4 => Self::DeviceTree,
            5 => Self::ServiceTable,
            6 => Self::ServiceImage,
            7 => Self::UnprotectedDma,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::HostImage => "host image",
            Self::HostInitrd => "host initrd",
            Self::HostBootargs => "host bootargs",
            Self::DeviceTree => "device tree",
            Self::ServiceTable => "service table",
            Self::ServiceImage => "service image",
            Self::UnprotectedDma => "unprotected DMA devices",
        }
    }
}

/// Why a package was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PackageError {
    /// Fewer bytes than the header needs.
    TooShort,
    BadMagic,
    UnsupportedVersion(u32),
    BadHeaderSize(u32),
    /// The header's total size exceeds the bytes available.
    Truncated {
        total: u64,
        available: u64,
    },
    TooManyEntries(u32),
    /// An entry's kind is not known.
    UnknownKind(u32),
    /// An entry's bytes fall outside the package or overlap the entry table.
    EntryOutOfBounds(u32),
    /// An entry offset is not 8-byte aligned.
    Misaligned(u32),
    /// Two entries of the same kind.
    Duplicate(EntryKind),
    BadChecksum {
        expected: u64,
        found: u64,
    },
    /// Bootargs are not UTF-8.
    BadBootargs,
    /// The unprotected-DMA device names are not UTF-8.
    BadDeviceNames,
    /// No host image.
    NoHostImage,
    /// More service images than [`MAX_SERVICES`].
    TooManyServices,
    /// The service table's length is not a whole number of records, or it
    /// has more than [`MAX_SERVICES`] of them.
    BadServiceTable,
}

impl fmt::Display for PackageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort => write!(f, "boot package is shorter than its header"),
            Self::BadMagic => write!(f, "no boot package after the core (bad magic)"),
            Self::UnsupportedVersion(v) => {
                write!(
                    f,
                    "boot package version {v} is not supported (expected {VERSION})"
                )
            }
            Self::BadHeaderSize(s) => write!(f, "boot package header size {s} is wrong"),
            Self::Truncated { total, available } => write!(
                f,
                "boot package is truncated: header says {total} bytes, {available} available"
            ),
            Self::TooManyEntries(n) => {
                write!(f, "boot package has {n} entries (at most {MAX_ENTRIES})")
            }
            Self::UnknownKind(k) => write!(f, "boot package entry of unknown kind {k}"),
            Self::EntryOutOfBounds(i) => {
                write!(f, "boot package entry {i} lies outside the package")
            }
            Self::Misaligned(i) => write!(f, "boot package entry {i} is not 8-byte aligned"),
            Self::Duplicate(k) => write!(f, "boot package has two {} entries", k.name()),
            Self::BadChecksum { expected, found } => write!(
                f,
                "boot package checksum mismatch: header {expected:#018x}, contents {found:#018x}"
            ),
            Self::BadBootargs => write!(f, "boot package bootargs are not UTF-8"),
            Self::BadDeviceNames => write!(f, "boot package device names are not UTF-8"),
            Self::NoHostImage => write!(f, "boot package has no host image"),
            Self::TooManyServices => write!(
                f,
                "boot package has more than {MAX_SERVICES} service images"
            ),
            Self::BadServiceTable => write!(f, "boot package service table is malformed"),
        }
    }
}

/// The package checksum: FNV-1a's multiply-xor step applied to 64-bit
/// little-endian words (a trailing partial word is zero-padded), so the core
/// hashes tens of megabytes of payload in an eighth of the steps a
/// byte-wise FNV-1a needs. Enough to catch truncation and corruption in
/// transit; the package is not a security boundary (whoever writes the image
/// owns the machine).
pub fn hash_words(state: u64, bytes: &[u8]) -> u64 {
    let mut h = state;
    let (words, tail) = bytes.as_chunks::<8>();
    for w in words {
        h ^= u64::from_le_bytes(*w);
        h = h.wrapping_mul(FNV_PRIME);
    }
    if !tail.is_empty() {
        let mut last = [0u8; 8];
        last[..tail.len()].copy_from_slice(tail);
        h ^= u64::from_le_bytes(last);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The checksum of a package whose entry table ends at `table_end`: the
/// header (with the checksum field read as zero), the entry table, and the
/// bytes of every entry the core itself relies on — everything but the host
/// image and the host initrd. Those are the host's own business (a corrupt
/// host payload cannot weaken isolation, it only fails to boot), and hashing
/// tens of megabytes of them would be most of the core's boot time.
///
/// Public so that tools (and the fuzz harness) can seal a package they
/// edited; a package shorter than its header hashes what there is.
pub fn checksum(package: &[u8], table_end: usize) -> u64 {
    let h = hash_words(FNV_OFFSET, &package[..32.min(package.len())]);
    let mut h = hash_words(h, &[0u8; 8]);
    let table_end = table_end.min(package.len());
    h = hash_words(h, &package[40.min(table_end)..table_end]);
    let table = &package[size_of::<PackageHeader>().min(table_end)..table_end];
    for raw in table.chunks_exact(size_of::<EntryHeader>()) {
        let Ok((entry, _)) = EntryHeader::read_from_prefix(raw) else {
            continue;
        };
        let host_payload = matches!(
            EntryKind::from_u32(entry.kind.get()),
            Some(EntryKind::HostImage | EntryKind::HostInitrd)
        );
        let (offset, size) = (entry.offset.get() as usize, entry.size.get() as usize);
        if !host_payload
            && let Some(bytes) = offset
                .checked_add(size)
                .and_then(|end| package.get(offset..end))
        {
            h = hash_words(h, bytes);
        }
    }
    h
}

/// Most services an image carries.
pub const MAX_SERVICES: usize = 8;
/// Bytes of a service name, NUL-padded.
pub const SERVICE_NAME_LEN: usize = 24;

/// One service, as the image manifest declared it and the image builder
/// checked it.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable,
)]
#[repr(C)]
pub struct ServiceRecord {
    /// UTF-8, NUL-padded.
    pub name: [u8; SERVICE_NAME_LEN],
    /// The id of the interface it serves (`moat_abi::services`).
    pub interface_id: U16,
    /// First Moat function number routed to it (`0xC600_0000 | n`), or 0.
    pub hypercall_first: U16,
    /// How many function numbers from `hypercall_first`.
    pub hypercall_count: U16,
    pub reserved: U16,
    /// Bytes of memory: image, BSS and stack.
    pub memory_bytes: U32,
    /// Microseconds a call may run before the service is declared failed.
    pub budget_us: U32,
    /// Trap classes (bit = `moat_abi::trap::TrapClass`) it is told about.
    pub observes: U32,
    /// Trap classes it decides.
    pub handles: U32,
    /// Index of its image among the package's service images.
    pub image_index: U32,
    pub reserved2: U32,
}
const _: () = assert!(size_of::<ServiceRecord>() == 56);

impl ServiceRecord {
    /// The name, up to its first NUL (lossy: invalid UTF-8 gives "?").
    pub fn name(&self) -> &str {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(SERVICE_NAME_LEN);
        core::str::from_utf8(&self.name[..end]).unwrap_or("?")
    }
}

/// A checked package.
#[derive(Clone, Copy, Debug)]
pub struct Package<'a> {
    pub flags: u32,
    pub host_image: &'a [u8],
    pub host_initrd: Option<&'a [u8]>,
    pub host_bootargs: Option<&'a str>,
    /// [`EntryKind::UnprotectedDma`]'s names, if the image names any.
    pub unprotected_dma: Option<&'a str>,
    pub device_tree: Option<&'a [u8]>,
    /// The raw service table (validated to be whole records).
    pub service_table: &'a [u8],
    pub service_images: [&'a [u8]; MAX_SERVICES],
    pub service_image_count: usize,
    /// Bytes the package occupies from its start.
    pub total_size: u64,
}

impl<'a> Package<'a> {
    /// Checks and decodes the package at the start of `bytes` (which may run
    /// past the package's end).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, PackageError> {
        let (header, _) =
            PackageHeader::read_from_prefix(bytes).map_err(|_| PackageError::TooShort)?;
        if header.magic != MAGIC {
            return Err(PackageError::BadMagic);
        }
        if header.version.get() != VERSION {
            return Err(PackageError::UnsupportedVersion(header.version.get()));
        }
        if header.header_size.get() as usize != size_of::<PackageHeader>() {
            return Err(PackageError::BadHeaderSize(header.header_size.get()));
        }
        let total = header.total_size.get();
        let available = bytes.len() as u64;
        let table_end = size_of::<PackageHeader>() as u64
            + u64::from(header.entry_count.get()) * size_of::<EntryHeader>() as u64;
        if header.entry_count.get() as usize > MAX_ENTRIES {
            return Err(PackageError::TooManyEntries(header.entry_count.get()));
        }
        if total > available {
            return Err(PackageError::Truncated { total, available });
        }
        if total < table_end {
            return Err(PackageError::Truncated {
                total: table_end,
                available: total,
            });
        }
        // `total <= bytes.len()`, so this cannot truncate.
        let package = &bytes[..total as usize];
        let found = checksum(package, table_end as usize);
        if found != header.checksum.get() {
            return Err(PackageError::BadChecksum {
                expected: header.checksum.get(),
                found,
            });
        }

        let mut out = Package {
            flags: header.flags.get(),
            host_image: &[],
            host_initrd: None,
            host_bootargs: None,
            unprotected_dma: None,
            device_tree: None,
            service_table: &[],
            service_images: [&[]; MAX_SERVICES],
            service_image_count: 0,
            total_size: total,
        };
        let mut have_table = false;
        let mut have_image = false;
        let table = &package[size_of::<PackageHeader>()..table_end as usize];
        for (i, raw) in table.chunks_exact(size_of::<EntryHeader>()).enumerate() {
            let i = i as u32;
            let (entry, _) = EntryHeader::read_from_prefix(raw)
                .map_err(|_| PackageError::EntryOutOfBounds(i))?;
            let kind = EntryKind::from_u32(entry.kind.get())
                .ok_or(PackageError::UnknownKind(entry.kind.get()))?;
            let (offset, size) = (entry.offset.get(), entry.size.get());
            if offset % 8 != 0 {
                return Err(PackageError::Misaligned(i));
            }
            let end = offset
                .checked_add(size)
                .ok_or(PackageError::EntryOutOfBounds(i))?;
            if offset < table_end || end > total {
                return Err(PackageError::EntryOutOfBounds(i));
            }
            let data = &package[offset as usize..end as usize];
            let duplicate = match kind {
                EntryKind::HostImage => core::mem::replace(&mut have_image, true),
                EntryKind::HostInitrd => out.host_initrd.replace(data).is_some(),
                EntryKind::HostBootargs => {
                    let s = core::str::from_utf8(data).map_err(|_| PackageError::BadBootargs)?;
                    out.host_bootargs.replace(s).is_some()
                }
                EntryKind::DeviceTree => out.device_tree.replace(data).is_some(),
                EntryKind::UnprotectedDma => {
                    let s = core::str::from_utf8(data).map_err(|_| PackageError::BadDeviceNames)?;
                    out.unprotected_dma.replace(s).is_some()
                }
                EntryKind::ServiceTable => {
                    let n = data.len() / size_of::<ServiceRecord>();
                    if !data.len().is_multiple_of(size_of::<ServiceRecord>()) || n > MAX_SERVICES {
                        return Err(PackageError::BadServiceTable);
                    }
                    out.service_table = data;
                    core::mem::replace(&mut have_table, true)
                }
                EntryKind::ServiceImage => {
                    let slot = out
                        .service_images
                        .get_mut(out.service_image_count)
                        .ok_or(PackageError::TooManyServices)?;
                    *slot = data;
                    out.service_image_count += 1;
                    false
                }
            };
            if duplicate {
                return Err(PackageError::Duplicate(kind));
            }
            if kind == EntryKind::HostImage {
                out.host_image = data;
            }
        }
        if !have_image {
            return Err(PackageError::NoHostImage);
        }
        Ok(out)
    }

    /// The service records.
    pub fn services(&self) -> impl Iterator<Item = ServiceRecord> + '_ {
        self.service_table
            .chunks_exact(size_of::<ServiceRecord>())
            .filter_map(|c| ServiceRecord::read_from_bytes(c).ok())
    }

    /// The image a record names, if it exists.
    pub fn service_image(&self, record: &ServiceRecord) -> Option<&'a [u8]> {
        let i = record.image_index.get() as usize;
        if i < self.service_image_count {
            self.service_images.get(i).copied()
        } else {
            None
        }
    }
}

/// Builds packages (used by the image builder on the development machine).
#[cfg(feature = "std")]
pub mod builder {
    use super::*;

    /// Where an entry's first byte should fall, so that the core can use it
    /// where it lies instead of copying it.
    ///
    /// Addresses are counted from the origin [`PackageBuilder::at`] gives
    /// the package's position in. The image builder counts from the core's
    /// load address, which is 2 MiB aligned, so "0 modulo 2 MiB" there is a
    /// 2 MiB boundary in RAM.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Placement {
        /// A power of two, at least [`PACKAGE_ALIGN`].
        pub align: u64,
        /// The remainder modulo `align` the entry's address must have; a
        /// multiple of 8.
        pub offset: u64,
        /// The lowest address the entry may start at.
        pub not_before: u64,
        /// The most padding the placement may add before the entry. If it
        /// would need more, the entry is laid out as any other: placing it
        /// would then cost more than it saves.
        pub max_padding: u64,
    }

    impl Placement {
        /// Where the entry goes if its plain (4 KiB aligned) position is
        /// `plain`, both counted from the origin; `None` if that needs more
        /// padding than allowed.
        fn position(&self, plain: u64) -> Option<u64> {
            let lowest = plain.max(self.not_before);
            let steps = lowest.saturating_sub(self.offset).div_ceil(self.align);
            let placed = steps.checked_mul(self.align)?.checked_add(self.offset)?;
            (placed - plain <= self.max_padding).then_some(placed)
        }
    }

    /// Collects entries and lays them out.
    #[derive(Debug, Default)]
    pub struct PackageBuilder {
        flags: u32,
        at: u64,
        entries: Vec<(EntryKind, Vec<u8>, Option<Placement>)>,
    }

    impl PackageBuilder {
        pub fn new() -> Self {
            Self::default()
        }

        pub fn flags(mut self, flags: u32) -> Self {
            self.flags |= flags;
            self
        }

        /// Where the package will start, counted from the origin of every
        /// [`Placement`] (0 unless set). A multiple of [`PACKAGE_ALIGN`].
        pub fn at(mut self, position: u64) -> Self {
            assert!(position.is_multiple_of(PACKAGE_ALIGN));
            self.at = position;
            self
        }

        pub fn entry(mut self, kind: EntryKind, bytes: Vec<u8>) -> Self {
            self.entries.push((kind, bytes, None));
            self
        }

        /// An entry placed as `placement` asks, when the padding allows.
        pub fn entry_placed(
            mut self,
            kind: EntryKind,
            bytes: Vec<u8>,
            placement: Placement,
        ) -> Self {
            assert!(
                placement.align.is_power_of_two()
                    && placement.align >= PACKAGE_ALIGN
                    && placement.offset < placement.align
                    && placement.offset.is_multiple_of(8)
            );
            self.entries.push((kind, bytes, Some(placement)));
            self
        }

        /// Lays out header, entry table and payloads in the order they were
        /// added: each payload 4 KiB aligned, or where its placement asks.
        pub fn build(self) -> Vec<u8> {
            let table_end =
                size_of::<PackageHeader>() + self.entries.len() * size_of::<EntryHeader>();
            let mut out = vec![0u8; table_end];
            let mut table = Vec::new();
            for (kind, bytes, placement) in &self.entries {
                let plain = out.len().next_multiple_of(PACKAGE_ALIGN as usize);
                let offset = placement
                    .and_then(|p| p.position(self.at + plain as u64))
                    .map_or(plain, |placed| (placed - self.at) as usize);
                out.resize(offset, 0);
                out.extend_from_slice(bytes);
                table.push(EntryHeader {
                    kind: U32::new(*kind as u32),
                    reserved: U32::new(0),
                    offset: U64::new(offset as u64),
                    size: U64::new(bytes.len() as u64),
                });
            }
            let header = PackageHeader {
                magic: MAGIC,
                version: U32::new(VERSION),
                header_size: U32::new(size_of::<PackageHeader>() as u32),
                total_size: U64::new(out.len() as u64),
                entry_count: U32::new(self.entries.len() as u32),
                flags: U32::new(self.flags),
                checksum: U64::new(0),
            };
            out[..size_of::<PackageHeader>()].copy_from_slice(header.as_bytes());
            for (i, e) in table.iter().enumerate() {
                let at = size_of::<PackageHeader>() + i * size_of::<EntryHeader>();
                out[at..at + size_of::<EntryHeader>()].copy_from_slice(e.as_bytes());
            }
            let sum = checksum(&out, table_end);
            out[32..40].copy_from_slice(&sum.to_le_bytes());
            out
        }
    }
}

#[cfg(all(test, feature = "std"))]
mod tests {
    use super::builder::PackageBuilder;
    use super::*;

    fn sample() -> Vec<u8> {
        PackageBuilder::new()
            .flags(FLAG_SEMIHOSTING_EXIT)
            .entry(EntryKind::HostImage, vec![0xaa; 5000])
            .entry(EntryKind::HostInitrd, vec![0x55; 17])
            .entry(EntryKind::HostBootargs, b"console=ttyAMA0 x=1".to_vec())
            .build()
    }

    #[test]
    fn unprotected_dma_names() {
        let bytes = PackageBuilder::new()
            .entry(EntryKind::HostImage, vec![0xaa; 64])
            .entry(EntryKind::UnprotectedDma, b"pcie\nfw-cfg".to_vec())
            .build();
        let p = Package::parse(&bytes).unwrap();
        assert_eq!(p.unprotected_dma, Some("pcie\nfw-cfg"));
        assert_eq!(Package::parse(&sample()).unwrap().unprotected_dma, None);
        let bad = PackageBuilder::new()
            .entry(EntryKind::HostImage, vec![0xaa; 64])
            .entry(EntryKind::UnprotectedDma, vec![0xff])
            .build();
        assert_eq!(
            Package::parse(&bad).unwrap_err(),
            PackageError::BadDeviceNames
        );
    }

    #[test]
    fn round_trip() {
        let bytes = sample();
        let p = Package::parse(&bytes).unwrap();
        assert_eq!(p.flags, FLAG_SEMIHOSTING_EXIT);
        assert_eq!(p.host_image, &[0xaa; 5000][..]);
        assert_eq!(p.host_initrd, Some(&[0x55; 17][..]));
        assert_eq!(p.host_bootargs, Some("console=ttyAMA0 x=1"));
        assert_eq!(p.device_tree, None);
        assert_eq!(p.total_size, bytes.len() as u64);
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let mut bytes = sample();
        bytes.extend_from_slice(&[1, 2, 3]);
        assert!(Package::parse(&bytes).is_ok());
    }

    #[test]
    fn every_truncation_is_refused() {
        let bytes = sample();
        for len in 0..bytes.len() {
            assert!(
                Package::parse(&bytes[..len]).is_err(),
                "length {len} accepted"
            );
        }
    }

    #[test]
    fn every_corruption_of_what_the_core_trusts_is_refused() {
        let bytes = sample();
        let p = Package::parse(&bytes).unwrap();
        let host_payload = |i: usize| {
            let within = |s: &[u8]| {
                let start = s.as_ptr() as usize - bytes.as_ptr() as usize;
                (start..start + s.len()).contains(&i)
            };
            within(p.host_image) || p.host_initrd.is_some_and(within)
        };
        let padding = |i: usize| {
            // Bytes between entries belong to nothing.
            let in_entry = [
                Some(p.host_image),
                p.host_initrd,
                p.host_bootargs.map(str::as_bytes),
            ]
            .into_iter()
            .flatten()
            .any(|s| {
                let start = s.as_ptr() as usize - bytes.as_ptr() as usize;
                (start..start + s.len()).contains(&i)
            });
            let table_end = size_of::<PackageHeader>() + 3 * size_of::<EntryHeader>();
            i >= table_end && !in_entry
        };
        let mut refused = 0;
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            let parsed = Package::parse(&b);
            if host_payload(i) {
                // The host's payload is not the core's to check.
                assert!(parsed.is_ok(), "host payload byte {i}");
            } else if !padding(i) {
                assert!(parsed.is_err(), "corruption at {i} accepted");
                refused += 1;
            }
        }
        assert!(refused > 100);
    }

    #[test]
    fn bad_magic_and_version() {
        let mut b = sample();
        b[0] = b'X';
        assert_eq!(Package::parse(&b).unwrap_err(), PackageError::BadMagic);
        let mut b = sample();
        b[8] = 9;
        assert_eq!(
            Package::parse(&b).unwrap_err(),
            PackageError::UnsupportedVersion(9)
        );
    }

    #[test]
    fn missing_image_and_duplicates() {
        let b = PackageBuilder::new()
            .entry(EntryKind::HostInitrd, vec![1])
            .build();
        assert_eq!(Package::parse(&b).unwrap_err(), PackageError::NoHostImage);
        let b = PackageBuilder::new()
            .entry(EntryKind::HostImage, vec![1])
            .entry(EntryKind::HostImage, vec![2])
            .build();
        assert_eq!(
            Package::parse(&b).unwrap_err(),
            PackageError::Duplicate(EntryKind::HostImage)
        );
    }

    #[test]
    fn services_round_trip() {
        let mut rec = ServiceRecord::default();
        rec.name[..5].copy_from_slice(b"trace");
        rec.image_index = U32::new(1);
        let b = PackageBuilder::new()
            .entry(EntryKind::HostImage, vec![1])
            .entry(EntryKind::ServiceTable, rec.as_bytes().to_vec())
            .entry(EntryKind::ServiceImage, vec![7; 10])
            .entry(EntryKind::ServiceImage, vec![8; 20])
            .build();
        let p = Package::parse(&b).unwrap();
        let recs: Vec<_> = p.services().collect();
        assert_eq!(recs.len(), 1);
        assert_eq!(recs[0].name(), "trace");
        assert_eq!(p.service_image(&recs[0]), Some(&[8u8; 20][..]));
        let mut bad = rec;
        bad.image_index = U32::new(2);
        assert_eq!(p.service_image(&bad), None);
        // A table that is not whole records is refused.
        let b = PackageBuilder::new()
            .entry(EntryKind::HostImage, vec![1])
            .entry(EntryKind::ServiceTable, vec![0; 57])
            .build();
        assert_eq!(
            Package::parse(&b).unwrap_err(),
            PackageError::BadServiceTable
        );
        let mut builder = PackageBuilder::new().entry(EntryKind::HostImage, vec![1]);
        for _ in 0..=MAX_SERVICES {
            builder = builder.entry(EntryKind::ServiceImage, vec![1]);
        }
        assert_eq!(
            Package::parse(&builder.build()).unwrap_err(),
            PackageError::TooManyServices
        );
    }

    #[test]
    fn placed_entries_land_where_asked() {
        use super::builder::Placement;
        const MIB: u64 = 1 << 20;
        // A package at 1440 KiB from a 2 MiB-aligned origin: a small entry,
        // an initrd from 2 MiB on, an image at the next 2 MiB boundary.
        let at = 0x16_8000;
        let initrd = vec![0x11; 1_800_000];
        let image = vec![0x22; 3 * MIB as usize];
        let b = PackageBuilder::new()
            .at(at)
            .entry(EntryKind::HostBootargs, b"x=1".to_vec())
            .entry_placed(
                EntryKind::HostInitrd,
                initrd.clone(),
                Placement {
                    align: PACKAGE_ALIGN,
                    offset: 0,
                    not_before: 2 * MIB,
                    max_padding: initrd.len() as u64,
                },
            )
            .entry_placed(
                EntryKind::HostImage,
                image.clone(),
                Placement {
                    align: 2 * MIB,
                    offset: 0,
                    not_before: 2 * MIB,
                    max_padding: image.len() as u64,
                },
            )
            .build();
        let p = Package::parse(&b).unwrap();
        let address = |s: &[u8]| at + (s.as_ptr() as usize - b.as_ptr() as usize) as u64;
        assert_eq!(address(p.host_initrd.unwrap()), 2 * MIB);
        assert_eq!(p.host_initrd, Some(&initrd[..]));
        assert_eq!(address(p.host_image), 4 * MIB);
        assert_eq!(p.host_image, &image[..]);
        assert_eq!(p.host_bootargs, Some("x=1"));
        // The image is the last entry: nothing follows it.
        assert_eq!(at + b.len() as u64, 4 * MIB + image.len() as u64);

        // An offset from the boundary.
        let b = PackageBuilder::new()
            .at(at)
            .entry_placed(
                EntryKind::HostImage,
                vec![1; 100],
                Placement {
                    align: 2 * MIB,
                    offset: 0x8_0000,
                    not_before: 0,
                    max_padding: 2 * MIB,
                },
            )
            .build();
        let p = Package::parse(&b).unwrap();
        let address = |s: &[u8]| at + (s.as_ptr() as usize - b.as_ptr() as usize) as u64;
        assert_eq!(address(p.host_image), 2 * MIB + 0x8_0000);
    }

    #[test]
    fn placement_is_dropped_when_the_padding_costs_more() {
        use super::builder::Placement;
        let b = PackageBuilder::new()
            .at(0x16_8000)
            .entry_placed(
                EntryKind::HostImage,
                vec![3; 54_552],
                Placement {
                    align: 2 << 20,
                    offset: 0,
                    not_before: 0,
                    max_padding: 54_552,
                },
            )
            .build();
        let p = Package::parse(&b).unwrap();
        // Right after the entry table, as any entry.
        assert_eq!(
            p.host_image.as_ptr() as usize - b.as_ptr() as usize,
            PACKAGE_ALIGN as usize
        );
    }

    #[test]
    fn non_utf8_bootargs() {
        let b = PackageBuilder::new()
            .entry(EntryKind::HostImage, vec![1])
            .entry(EntryKind::HostBootargs, vec![0xff, 0xfe])
            .build();
        assert_eq!(Package::parse(&b).unwrap_err(), PackageError::BadBootargs);
    }

    #[test]
    fn entry_pointing_outside_is_refused_even_with_valid_checksum() {
        let mut b = sample();
        // Point the first entry past the end and re-seal the checksum.
        let at = size_of::<PackageHeader>() + 8;
        let past_end = (b.len() as u64).next_multiple_of(8);
        b[at..at + 8].copy_from_slice(&past_end.to_le_bytes());
        let table_end = size_of::<PackageHeader>() + 3 * size_of::<EntryHeader>();
        let sum = checksum(&b, table_end);
        b[32..40].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(
            Package::parse(&b).unwrap_err(),
            PackageError::EntryOutOfBounds(0)
        );
    }
}
