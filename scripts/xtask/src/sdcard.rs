//! `cargo xtask image --board rpi4 OUT/`: the files Moat adds to a Raspberry
//! Pi 4's boot partition.
//!
//! The Pi's firmware (`start4.elf`, from the partition) reads `config.txt`,
//! loads the device tree and the kernel file it names, fills in memory and
//! `/chosen`, parks the three secondary CPUs on the tree's spin table and
//! enters the kernel at EL2 with the tree's address in x0: the same hand-off
//! QEMU's `raspi4b` gives, which is where this image is tested. The kernel
//! file is a Moat image carrying Debian's arm64 Linux, a busybox initramfs
//! with `moat.ko`, `moat-vmm` and the protected-VM guest, and the services of
//! `images/linux.toml`.

use crate::boards::{self, Board};
use crate::debian;
use crate::image;
use crate::linux;
use crate::linux_vm;
use anyhow::{Context, Result, bail};
use moat_package::{FLAG_SEMIHOSTING_EXIT, Package};
use std::path::{Path, PathBuf};

/// The Moat image's name on the boot partition.
pub const KERNEL_FILE: &str = "moat.img";

/// `config.txt` for Moat on a Pi 4.
pub fn config_txt() -> String {
    format!(
        "# Moat on a Raspberry Pi 4 Model B (written by cargo xtask image --board rpi4).\n\
         # 64-bit: the firmware enters the kernel at EL2 with the secondaries\n\
         # parked on the device tree's spin table.\n\
         arm_64bit=1\n\
         kernel={KERNEL_FILE}\n\
         # The address Moat is linked at (RAM + 2 MiB), whatever the firmware's default.\n\
         kernel_address={:#x}\n\
         # Debian's tree for the board; the firmware adds memory and /chosen.\n\
         device_tree={}\n\
         # The GIC-400, not the legacy interrupt controller.\n\
         enable_gic=1\n\
         # The serial console on GPIO 14 (TX) and 15 (RX), 115200 8N1, on the\n\
         # PL011 (uart0): Bluetooth gives it up, the mini UART is not used.\n\
         enable_uart=1\n\
         dtoverlay=disable-bt\n",
        boards::RPI4_LOAD_ADDRESS,
        boards::RPI4_DTB
    )
}

/// What a written boot partition must hold: checked after writing and by
/// the tests.
pub fn check(dir: &Path) -> Result<()> {
    let config = std::fs::read_to_string(dir.join("config.txt"))
        .with_context(|| format!("reading {}", dir.join("config.txt").display()))?;
    let settings: Vec<&str> = config
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    let load = format!("kernel_address={:#x}", boards::RPI4_LOAD_ADDRESS);
    let device_tree = format!("device_tree={}", boards::RPI4_DTB);
    let kernel = format!("kernel={KERNEL_FILE}");
    for wanted in [
        "arm_64bit=1",
        kernel.as_str(),
        load.as_str(),
        device_tree.as_str(),
        "enable_gic=1",
        "enable_uart=1",
        "dtoverlay=disable-bt",
    ] {
        if !settings.contains(&wanted) {
            bail!("config.txt has no line {wanted:?}");
        }
    }
    let img = std::fs::read(dir.join(KERNEL_FILE))?;
    if img.len() < 64 || &img[56..60] != b"ARM\x64" {
        bail!("{KERNEL_FILE} has no arm64 Image header");
    }
    // The firmware loads the file at kernel_address: the core must be linked there.
    let text_offset = u64::from_le_bytes(img[8..16].try_into()?);
    if text_offset != 0 {
        bail!("{KERNEL_FILE}'s text_offset is {text_offset:#x}, expected 0");
    }
    let footprint = u64::from_le_bytes(img[16..24].try_into()?) as usize;
    // The package starts at the core's footprint, a page boundary.
    let package = (0..img.len())
        .step_by(moat_package::PACKAGE_ALIGN as usize)
        .filter(|&at| img[at..].starts_with(&moat_package::MAGIC))
        .find_map(|at| Package::parse(&img[at..]).ok())
        .context("no boot package in the image")?;
    if package.flags & FLAG_SEMIHOSTING_EXIT != 0 {
        bail!("{KERNEL_FILE} would use semihosting, which a board does not have");
    }
    if !debian::is_arm64_image(package.host_image) || package.host_initrd.is_none() {
        bail!("{KERNEL_FILE} does not carry a Linux Image and its initramfs");
    }
    let args = package.host_bootargs.unwrap_or("");
    if !args.contains("console=ttyAMA0") || args.contains("initcall_blacklist") {
        bail!("{KERNEL_FILE}'s host command line is not the board's: {args:?}");
    }
    if footprint < img.len() {
        bail!("{KERNEL_FILE}'s image_size {footprint:#x} is smaller than the file");
    }
    let dtb = std::fs::read(dir.join(boards::RPI4_DTB))?;
    let model = moat_platform::dt::discover(&dtb)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    // Debian's tree has an empty memory node: the firmware fills it in.
    if !model.contains("no memory node") {
        bail!(
            "{} is not the board's tree as the firmware expects it",
            boards::RPI4_DTB
        );
    }
    if moat_platform::dt::console_uart(&dtb).map(|u| u.regs.base) != Some(boards::RPI4_PL011) {
        bail!(
            "{}'s console is not the PL011 at {:#x}",
            boards::RPI4_DTB,
            boards::RPI4_PL011
        );
    }
    Ok(())
}

/// Writes the boot-partition files for `board` into `out`.
pub fn write(board: Board, out: &Path) -> Result<Vec<PathBuf>> {
    if board != Board::Rpi4 {
        bail!(
            "image --board {}: only the Raspberry Pi 4 boots from files of its own; `cargo xtask run --board {}` builds and runs its image",
            board.name(),
            board.name()
        );
    }
    let assets = debian::ensure_assets()?;
    boards::prepare(board)?;
    let built = image::build_for(board)?;
    let vm = linux_vm::build(&assets, &built, false)?;
    let initrd = linux::write_initramfs(&assets, Some(&vm), None, "rpi4-boot")?;
    let services = linux::services()?;
    let spec = image::ImageSpec {
        semihosting_exit: false,
        ..linux::image_spec(
            &assets,
            &initrd,
            board.hardware_host_bootargs().as_deref(),
            &services,
        )
    };
    let img = image::pack(&built.core, &spec, "rpi4-boot")?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let files = [
        (img, out.join(KERNEL_FILE)),
        (boards::rpi4_dtb()?, out.join(boards::RPI4_DTB)),
    ];
    for (from, to) in &files {
        std::fs::copy(from, to).with_context(|| format!("writing {}", to.display()))?;
    }
    std::fs::write(out.join("config.txt"), config_txt())?;
    check(out)?;
    Ok(vec![
        out.join(KERNEL_FILE),
        out.join(boards::RPI4_DTB),
        out.join("config.txt"),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_names_the_image_its_address_and_the_pl011() {
        let c = config_txt();
        assert!(c.contains("\narm_64bit=1\n"));
        assert!(c.contains("\nkernel=moat.img\n"));
        assert!(c.contains("\nkernel_address=0x200000\n"));
        assert!(c.contains("\ndevice_tree=bcm2711-rpi-4-b.dtb\n"));
        assert!(c.contains("\nenable_uart=1\n"));
        assert!(c.contains("\ndtoverlay=disable-bt\n"));
        assert!(c.contains("\nenable_gic=1\n"));
    }
}
