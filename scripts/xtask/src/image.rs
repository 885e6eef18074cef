//! Building the core and the payloads, and packing boot images.
//!
//! A Moat image is the core's flat binary padded to the end of its memory
//! footprint, followed by the boot package (see `moat-package`). The arm64
//! Image header's `image_size` is patched to cover the package, so firmware
//! reserves room for all of it.

use crate::tools::{self, cargo, llvm_tool, run};
use anyhow::{Context, Result, bail};
use moat_package::builder::PackageBuilder;
use moat_package::{EntryKind, FLAG_SEMIHOSTING_EXIT, PACKAGE_ALIGN};
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
}

fn objcopy(elf: &Path, bin: &Path) -> Result<()> {
    run(std::process::Command::new(llvm_tool("rust-objcopy")?).arg("-O").arg("binary").arg(elf).arg(bin))
}

/// Builds the core and the test host (release, with debug info).
pub fn build_all() -> Result<Built> {
    run(cargo().args(["build", "--release", "--package", "moat-kernel", "--bin", "moat", "--target", CORE_TARGET]))?;
    run(cargo().args(["build", "--release", "--package", "moat-test-host", "--target", PAYLOAD_TARGET]))?;
    let out = tools::target_dir().join("images");
    std::fs::create_dir_all(&out)?;
    let core_elf = tools::target_dir().join(CORE_TARGET).join("release/moat");
    let test_host_elf = tools::target_dir().join(PAYLOAD_TARGET).join("release/test-host");
    let core = out.join("moat.bin");
    let test_host = out.join("test-host.bin");
    objcopy(&core_elf, &core)?;
    objcopy(&test_host_elf, &test_host)?;
    Ok(Built { core, core_elf, test_host, test_host_elf })
}

/// What goes into an image.
#[derive(Clone, Debug)]
pub struct ImageSpec {
    pub host: PathBuf,
    pub initrd: Option<PathBuf>,
    pub bootargs: Option<String>,
    /// Device tree replacing the firmware's: a file...
    pub dtb: Option<PathBuf>,
    /// Let the core end a QEMU run through semihosting on a fatal error.
    pub semihosting_exit: bool,
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
pub fn pack_with_dtb_bytes(core: &Path, spec: &ImageSpec, dtb: Option<Vec<u8>>, name: &str) -> Result<PathBuf> {
    let mut image = read(core)?;
    if image.len() < 64 || &image[56..60] != b"ARM\x64" {
        bail!("{} is not a Moat core (no arm64 Image header)", core.display());
    }
    // The linker wrote the core's footprint (image through BSS) at offset 16.
    let footprint = u64::from_le_bytes(image[16..24].try_into().expect("8 bytes")) as usize;
    if footprint < image.len() || footprint % PACKAGE_ALIGN as usize != 0 {
        bail!("core footprint {footprint:#x} is inconsistent with its file size {:#x}", image.len());
    }
    image.resize(footprint, 0);

    let mut builder = PackageBuilder::new().entry(EntryKind::HostImage, read(&spec.host)?);
    if let Some(initrd) = &spec.initrd {
        builder = builder.entry(EntryKind::HostInitrd, read(initrd)?);
    }
    if let Some(args) = &spec.bootargs {
        builder = builder.entry(EntryKind::HostBootargs, args.as_bytes().to_vec());
    }
    if let Some(dtb) = dtb {
        builder = builder.entry(EntryKind::DeviceTree, dtb);
    }
    if spec.semihosting_exit {
        builder = builder.flags(FLAG_SEMIHOSTING_EXIT);
    }
    image.extend_from_slice(&builder.build());
    let total = image.len() as u64;
    image[16..24].copy_from_slice(&total.to_le_bytes());

    let path = tools::target_dir().join("images").join(format!("{name}.img"));
    std::fs::write(&path, &image).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}
