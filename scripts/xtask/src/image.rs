//! Building the core and the payloads, and packing boot images.
//!
//! A Moat image is the core's flat binary padded to the end of its memory
//! footprint, followed by the boot package (see `moat-package`). The arm64
//! Image header's `image_size` is patched to cover the package and the host
//! image's BSS after it, so firmware reserves room for all of it.
//!
//! The package holds the core's own entries first (command line, device
//! tree, services), where they fit in the rest of the core's 2 MiB block and
//! so stay inside the carve-out. The host's payloads follow, placed for use
//! in place when that costs less padding than the payload's own size (a
//! Linux Image and its initramfs, not the small test payloads): the initrd
//! from the first 2 MiB boundary after the core, the host image last, at a
//! 2 MiB boundary plus its `text_offset`, with its BSS running past the end
//! of the file. The core then boots them where QEMU loaded them instead of
//! copying tens of megabytes.

use crate::boards::Board;
use crate::manifest::Manifest;
use crate::tools::{self, cargo, llvm_tool, run};
use anyhow::{Context, Result, bail};
use moat_kernel::layout;
use moat_package::builder::{PackageBuilder, Placement};
use moat_package::{EntryKind, FLAG_BENCHMARK, FLAG_SEMIHOSTING_EXIT, PACKAGE_ALIGN, Package};
use std::path::{Path, PathBuf};

pub const CORE_TARGET: &str = "aarch64-unknown-none-softfloat";
pub const PAYLOAD_TARGET: &str = "aarch64-unknown-none";

/// The built artefacts.
#[derive(Clone, Debug)]
pub struct Built {
    /// The core's flat binary.
    pub core: PathBuf,
    /// The core's ELF (symbols for gdb).
    pub core_elf: PathBuf,
    /// The test host's flat binary.
    pub test_host: PathBuf,
    pub test_host_elf: PathBuf,
    /// The protected-VM guest's flat binary.
    pub guest: PathBuf,
}

/// Turns an ELF into the raw binary firmware loads.
pub fn objcopy(elf: &Path, bin: &Path) -> Result<()> {
    run(std::process::Command::new(llvm_tool("rust-objcopy")?)
        .arg("-O")
        .arg("binary")
        .arg(elf)
        .arg(bin))
}

/// Builds the core (release, with debug info) linked at `board`'s load
/// address into the cargo target folder `target_dir`; returns its ELF.
pub fn build_core(board: Board, target_dir: &Path) -> Result<PathBuf> {
    run(cargo()
        .args([
            "build",
            "--release",
            "--package",
            "moat-kernel",
            "--bin",
            "moat",
            "--target",
            CORE_TARGET,
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .env("MOAT_LOAD_ADDRESS", format!("{:#x}", board.load_address())))?;
    Ok(target_dir.join(CORE_TARGET).join("release/moat"))
}

/// Builds the core, the guest and the test host that carries it (release,
/// with debug info).
pub fn build_all() -> Result<Built> {
    build_core(Board::Virt, &tools::target_dir())?;
    let out = tools::target_dir().join("images");
    std::fs::create_dir_all(&out)?;
    // The test host carries the protected-VM guest: build it first.
    let guest = build_payload("moat-guest", "guest")?;
    run(cargo()
        .args([
            "build",
            "--release",
            "--package",
            "moat-test-host",
            "--target",
            PAYLOAD_TARGET,
        ])
        .env("MOAT_GUEST_BIN", &guest))?;
    let core_elf = tools::target_dir().join(CORE_TARGET).join("release/moat");
    let test_host_elf = tools::target_dir()
        .join(PAYLOAD_TARGET)
        .join("release/test-host");
    let core = out.join("moat.bin");
    let test_host = out.join("test-host.bin");
    objcopy(&core_elf, &core)?;
    objcopy(&test_host_elf, &test_host)?;
    Ok(Built {
        core,
        core_elf,
        test_host,
        test_host_elf,
        guest,
    })
}

/// [`build_all`] with the core linked for `board`: `virt`'s core is the one
/// `build_all` makes; another board's is built into a target folder of its
/// own (`target/board-<name>/`), so switching boards rebuilds nothing.
pub fn build_for(board: Board) -> Result<Built> {
    let mut built = build_all()?;
    if board != Board::Virt {
        let dir = tools::target_dir().join(format!("board-{}", board.name()));
        built.core_elf = build_core(board, &dir)?;
        built.core = tools::target_dir()
            .join("images")
            .join(format!("moat-{}.bin", board.name()));
        objcopy(&built.core_elf, &built.core)?;
    }
    Ok(built)
}

/// Builds the bare-metal binary `bin` of workspace package `package`
/// (release, for the payload target) to `target/images/{bin}.bin`.
fn build_payload(package: &str, bin: &str) -> Result<PathBuf> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        package,
        "--target",
        PAYLOAD_TARGET,
    ]))?;
    let elf = tools::target_dir()
        .join(PAYLOAD_TARGET)
        .join("release")
        .join(bin);
    let out = tools::target_dir().join("images");
    std::fs::create_dir_all(&out)?;
    let raw = out.join(format!("{bin}.bin"));
    objcopy(&elf, &raw)?;
    Ok(raw)
}

/// The null hypervisor the Linux boot benchmark compares Moat with
/// (`images/el2-stub`), as a raw arm64 Image, and the address its kernel
/// must be loaded at (the word at offset 0x40 of the stub).
pub fn build_el2_stub() -> Result<(PathBuf, u64)> {
    let bin = build_payload("moat-el2-stub", "el2-stub")?;
    let bytes = read(&bin)?;
    let kernel_at = bytes
        .get(0x40..0x48)
        .and_then(|w| w.try_into().ok())
        .map(u64::from_le_bytes)
        .context("the EL2 stub has no kernel address at offset 0x40")?;
    if kernel_at % (2 << 20) != 0 {
        bail!("the EL2 stub's kernel address {kernel_at:#x} is not 2 MiB aligned");
    }
    Ok((bin, kernel_at))
}

/// What goes into an image.
#[derive(Clone, Debug, Default)]
pub struct ImageSpec {
    pub host: PathBuf,
    pub initrd: Option<PathBuf>,
    pub bootargs: Option<String>,
    /// Device tree replacing the firmware's: a file...
    pub dtb: Option<PathBuf>,
    /// Let the core end a QEMU run through semihosting on a fatal error.
    pub semihosting_exit: bool,
    /// The services to carry (built from a manifest).
    pub services: Option<ServiceSet>,
    /// A benchmark image: the host's PMU may count the core's work at EL2.
    pub benchmark: bool,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// Packs `core` and the spec's payloads into `target/images/<name>.img`.
pub fn pack(core: &Path, spec: &ImageSpec, name: &str) -> Result<PathBuf> {
    let dtb = spec.dtb.as_deref().map(read).transpose()?;
    pack_with_dtb_bytes(core, spec, dtb, name)
}

/// As [`pack`], with the replacement device tree given as bytes.
pub fn pack_with_dtb_bytes(
    core: &Path,
    spec: &ImageSpec,
    dtb: Option<Vec<u8>>,
    name: &str,
) -> Result<PathBuf> {
    pack_image(core, spec, dtb, spec.services.as_ref(), name)
}

/// Built services, ready to pack: the service table and the images it names.
#[derive(Clone, Debug, Default)]
pub struct ServiceSet {
    pub table: Vec<u8>,
    pub images: Vec<Vec<u8>>,
    /// The manifest's `unprotected-dma` device names.
    pub unprotected_dma: Vec<String>,
}

/// Builds every service a manifest declares and checks each against its
/// budget.
pub fn build_services(manifest: &Manifest) -> Result<ServiceSet> {
    use zerocopy::IntoBytes;
    let mut set = ServiceSet {
        unprotected_dma: manifest.unprotected_dma.clone(),
        ..ServiceSet::default()
    };
    let mut built: Vec<(String, u32)> = Vec::new();
    for (i, s) in manifest.services.iter().enumerate() {
        let index = match built.iter().find(|(b, _)| *b == s.binary) {
            Some((_, index)) => *index,
            None => {
                run(cargo().args([
                    "build",
                    "--release",
                    "--package",
                    &s.krate,
                    "--bin",
                    &s.binary,
                    "--target",
                    CORE_TARGET,
                ]))
                .with_context(|| {
                    format!(
                        "building service {} (crate {}, binary {})",
                        s.name, s.krate, s.binary
                    )
                })?;
                let elf = tools::target_dir()
                    .join(CORE_TARGET)
                    .join("release")
                    .join(&s.binary);
                let bin = tools::target_dir()
                    .join("images")
                    .join(format!("service-{}.bin", s.binary));
                objcopy(&elf, &bin)?;
                set.images.push(read(&bin)?);
                let index = (set.images.len() - 1) as u32;
                built.push((s.binary.clone(), index));
                index
            }
        };
        let record = manifest.record(i, &set.images[index as usize], index)?;
        set.table.extend_from_slice(record.as_bytes());
    }
    Ok(set)
}

/// Loads the manifest at `path` (relative to the workspace) and builds its
/// services.
pub fn services_from(path: &Path) -> Result<(Manifest, ServiceSet)> {
    let manifest = Manifest::load(&tools::root().join(path))?;
    let set = build_services(&manifest)?;
    Ok((manifest, set))
}

/// The boot package for a core whose footprint is `footprint` bytes: the
/// core's own entries first, then the initrd, then the host image.
fn build_package(
    footprint: u64,
    spec: &ImageSpec,
    dtb: Option<Vec<u8>>,
    services: Option<&ServiceSet>,
) -> Result<Vec<u8>> {
    // Addresses count from the core's load address, a 2 MiB boundary. The
    // carve-out covers the core up to the end of its 2 MiB block, so a
    // payload the core is to use in place must start after it.
    let core_end = layout::core_block_end(footprint).context("core footprint")?;
    let mut builder = PackageBuilder::new().at(footprint);
    if let Some(args) = &spec.bootargs {
        builder = builder.entry(EntryKind::HostBootargs, args.as_bytes().to_vec());
    }
    if let Some(dtb) = dtb {
        builder = builder.entry(EntryKind::DeviceTree, dtb);
    }
    if let Some(set) = services.filter(|s| !s.unprotected_dma.is_empty()) {
        builder = builder.entry(
            EntryKind::UnprotectedDma,
            set.unprotected_dma.join("\n").into_bytes(),
        );
    }
    if let Some(set) = services.filter(|s| !s.images.is_empty()) {
        builder = builder.entry(EntryKind::ServiceTable, set.table.clone());
        for image in &set.images {
            builder = builder.entry(EntryKind::ServiceImage, image.clone());
        }
    }
    if let Some(initrd) = &spec.initrd {
        let bytes = read(initrd)?;
        let placement = Placement {
            align: PACKAGE_ALIGN,
            offset: 0,
            not_before: core_end,
            max_padding: bytes.len() as u64,
        };
        builder = builder.entry_placed(EntryKind::HostInitrd, bytes, placement);
    }
    let host = read(&spec.host)?;
    let info = layout::host_image_info(&host);
    builder = if info.text_offset.is_multiple_of(8) {
        let placement = Placement {
            align: layout::BLOCK_2M,
            offset: info.text_offset,
            not_before: core_end,
            max_padding: host.len() as u64,
        };
        builder.entry_placed(EntryKind::HostImage, host, placement)
    } else {
        builder.entry(EntryKind::HostImage, host)
    };
    if spec.semihosting_exit {
        builder = builder.flags(FLAG_SEMIHOSTING_EXIT);
    }
    if spec.benchmark {
        builder = builder.flags(FLAG_BENCHMARK);
    }
    Ok(builder.build())
}

/// Packs an image with everything: payloads, an optional device tree and services.
pub fn pack_image(
    core: &Path,
    spec: &ImageSpec,
    dtb: Option<Vec<u8>>,
    services: Option<&ServiceSet>,
    name: &str,
) -> Result<PathBuf> {
    let mut image = read(core)?;
    if image.len() < 64 || &image[56..60] != b"ARM\x64" {
        bail!(
            "{} is not a Moat core (no arm64 Image header)",
            core.display()
        );
    }
    // The linker wrote the core's footprint (image through BSS) at offset 16.
    let footprint = u64::from_le_bytes(image[16..24].try_into().expect("8 bytes")) as usize;
    if footprint < image.len() || !footprint.is_multiple_of(PACKAGE_ALIGN as usize) {
        bail!(
            "core footprint {footprint:#x} is inconsistent with its file size {:#x}",
            image.len()
        );
    }
    image.resize(footprint, 0);
    let package = build_package(footprint as u64, spec, dtb, services)?;
    // The whole footprint in RAM: the file, and the host image's BSS when
    // the image is the file's last bytes.
    let host_end = {
        let p = Package::parse(&package).map_err(|e| anyhow::anyhow!("{e}"))?;
        let at = p.host_image.as_ptr() as usize - package.as_ptr() as usize;
        footprint as u64 + at as u64 + layout::host_image_info(p.host_image).effective_size
    };
    image.extend_from_slice(&package);
    let total = (image.len() as u64).max(host_end);
    image[16..24].copy_from_slice(&total.to_le_bytes());

    let path = tools::target_dir()
        .join("images")
        .join(format!("{name}.img"));
    std::fs::write(&path, &image).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
