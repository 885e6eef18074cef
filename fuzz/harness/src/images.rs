//! What an image is made of: the manifest the image builder reads, and the
//! boot package the core parses at boot. Whoever writes the image owns the
//! machine, so neither is a security boundary; but a malformed one must be
//! refused with a message (manifest) or a typed error (package), never
//! crash the builder or the core.

use moat_package::builder::PackageBuilder;
use moat_package::{EntryKind, MAX_SERVICES, Package, checksum};
use xtask::manifest::{MIN_STACK, Manifest};

/// `manifest`: the first 8 bytes are the footprint a built service image
/// declares in its header, the rest the manifest's text.
pub fn manifest(data: &[u8]) {
    let (footprint, text) = data.split_at(data.len().min(8));
    let Ok(text) = std::str::from_utf8(text) else {
        return;
    };
    let Ok(manifest) = Manifest::parse(text) else {
        return;
    };
    assert!(manifest.services.len() <= MAX_SERVICES);
    // A service image as the builder reads it: the header's magic at byte
    // 8 and its footprint at byte 24.
    let mut image = vec![0u8; 32];
    image[8..16].copy_from_slice(b"MOATSVC1");
    let mut word = [0u8; 8];
    word[..footprint.len()].copy_from_slice(footprint);
    image[24..32].copy_from_slice(&word);
    let footprint = u64::from_le_bytes(word);
    for (i, s) in manifest.services.iter().enumerate() {
        let Ok(record) = manifest.record(i, &image, i as u32) else {
            continue;
        };
        assert_eq!(record.name(), s.name);
        let memory = u64::from(record.memory_bytes.get());
        assert!(memory.is_multiple_of(4096));
        assert!(
            footprint
                .checked_add(MIN_STACK)
                .is_some_and(|need| need <= memory),
            "service {} accepted over budget",
            s.name
        );
        assert_eq!(record.image_index.get(), i as u32);
    }
}

/// `package`: a flag byte, then a boot package. With the flag's low bit
/// set the package's checksum is recomputed first, so that the checks
/// behind it are reached.
pub fn package(data: &[u8]) {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let mut bytes = bytes.to_vec();
    if flags & 1 != 0 && bytes.len() >= 40 {
        let entries = u32::from_le_bytes(bytes[24..28].try_into().expect("4 bytes"));
        let table_end = 40 + entries.min(64) as usize * 24;
        let total = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
        let end = usize::try_from(total).map_or(bytes.len(), |t| t.min(bytes.len()));
        bytes[32..40].fill(0);
        let sum = checksum(&bytes[..end], table_end);
        bytes[32..40].copy_from_slice(&sum.to_le_bytes());
    }
    let Ok(package) = Package::parse(&bytes) else {
        return;
    };
    // Everything it hands out lies inside the package.
    assert!(package.total_size <= bytes.len() as u64);
    let inside = |part: &[u8]| {
        let start = (part.as_ptr() as usize).wrapping_sub(bytes.as_ptr() as usize);
        part.is_empty() || start + part.len() <= package.total_size as usize
    };
    assert!(inside(package.host_image));
    for part in [
        package.host_initrd,
        package.device_tree,
        package.unprotected_dma.map(str::as_bytes),
        Some(package.service_table),
    ]
    .into_iter()
    .flatten()
    .chain(
        package.service_images[..package.service_image_count]
            .iter()
            .copied(),
    ) {
        assert!(inside(part));
    }
    assert!(package.services().count() <= MAX_SERVICES);
    for record in package.services() {
        let image = package.service_image(&record);
        assert_eq!(
            image.is_some(),
            (record.image_index.get() as usize) < package.service_image_count
        );
    }
    // Built again from what was read, it reads back the same.
    let mut builder = PackageBuilder::new()
        .flags(package.flags)
        .entry(EntryKind::HostImage, package.host_image.to_vec());
    if let Some(initrd) = package.host_initrd {
        builder = builder.entry(EntryKind::HostInitrd, initrd.to_vec());
    }
    if let Some(args) = package.host_bootargs {
        builder = builder.entry(EntryKind::HostBootargs, args.as_bytes().to_vec());
    }
    if let Some(names) = package.unprotected_dma {
        builder = builder.entry(EntryKind::UnprotectedDma, names.as_bytes().to_vec());
    }
    if let Some(dt) = package.device_tree {
        builder = builder.entry(EntryKind::DeviceTree, dt.to_vec());
    }
    if !package.service_table.is_empty() {
        builder = builder.entry(EntryKind::ServiceTable, package.service_table.to_vec());
    }
    for image in &package.service_images[..package.service_image_count] {
        builder = builder.entry(EntryKind::ServiceImage, image.to_vec());
    }
    let rebuilt = builder.build();
    let again = Package::parse(&rebuilt).expect("a rebuilt package parses");
    assert_eq!(again.flags, package.flags);
    assert_eq!(again.host_image, package.host_image);
    assert_eq!(again.host_initrd, package.host_initrd);
    assert_eq!(again.host_bootargs, package.host_bootargs);
    assert_eq!(again.device_tree, package.device_tree);
    assert_eq!(again.unprotected_dma, package.unprotected_dma);
    assert_eq!(again.service_table, package.service_table);
    assert_eq!(again.service_image_count, package.service_image_count);
    assert_eq!(
        again.service_images[..again.service_image_count],
        package.service_images[..package.service_image_count]
    );
}
