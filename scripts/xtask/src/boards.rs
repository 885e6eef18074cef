//! The boards Moat runs on besides QEMU `virt`: what the xtask does
//! differently for each.
//!
//! A board is a load address for the core (where its firmware puts an
//! arm64 Image), a QEMU machine and its command line, and the device tree
//! its firmware hands over. Nothing in the core is per board: it reads the
//! tree (see the book's "Platforms" chapter).
//!
//! * `virt`: QEMU's `virt` machine, the default.
//! * `rpi4`: a Raspberry Pi 4 Model B, under QEMU's `raspi4b` with the
//!   `bcm2711-rpi-4-b.dtb` Debian's kernel package ships (the tree the
//!   board's firmware would load from the SD card).
//! * `fvp`: Arm's FVP Base RevC model, when it is installed (`fvp.rs`).

use crate::debian;
use crate::tools;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Which machine an image is built for and run on.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Board {
    /// QEMU's `virt` machine.
    #[default]
    Virt,
    /// Raspberry Pi 4 Model B (QEMU's `raspi4b`, or the board itself).
    Rpi4,
    /// Arm's FVP Base RevC (the model must be installed).
    Fvp,
}

/// The Pi 4's RAM as QEMU's `raspi4b` models it (board revision 1.5, 2 GiB).
pub const RPI4_MEMORY: &str = "2G";
/// The Pi 4 has four Cortex-A72 cores; QEMU's `raspi4b` insists on four.
pub const RPI4_CPUS: u32 = 4;
/// The Pi 4's device tree in Debian's kernel package.
pub const RPI4_DTB: &str = "bcm2711-rpi-4-b.dtb";
/// Where the Pi 4's firmware puts an arm64 kernel (`kernel_address` in
/// `config.txt` says so explicitly) and where QEMU's `raspi4b` loads one
/// whose header asks for no offset: 2 MiB.
pub const RPI4_LOAD_ADDRESS: u64 = 0x20_0000;
/// The Pi 4's PL011 (`uart0`), for the host's `earlycon`.
pub const RPI4_PL011: u64 = 0xfe20_1000;

impl Board {
    /// The name used on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            Board::Virt => "virt",
            Board::Rpi4 => "rpi4",
            Board::Fvp => "fvp",
        }
    }

    /// The core's link address: where this board's firmware loads an arm64
    /// Image (RAM base + 2 MiB on both QEMU machines and on the FVP, whose
    /// RAM starts at 2 GiB).
    pub fn load_address(self) -> u64 {
        match self {
            Board::Virt => 0x4020_0000,
            Board::Rpi4 => RPI4_LOAD_ADDRESS,
            Board::Fvp => 0x8020_0000,
        }
    }

    /// What the host's command line gets on this board under QEMU.
    ///
    /// On the Pi 4: `earlycon` on the PL011 (the kernel finds `virt`'s
    /// PL011 through the tree's stdout-path; the Pi's stdout-path names its
    /// mini UART). Then what QEMU's `raspi4b` lacks, not the board: it does
    /// not model the HDMI block's interrupt controller or the BSC I2C
    /// controllers (their probes take an external abort) nor the clock
    /// gates Linux turns off when unused (`clk_ignore_unused`). The same
    /// kernel boots bare on `raspi4b` only with these.
    pub fn qemu_host_bootargs(self) -> Option<String> {
        match self {
            Board::Virt | Board::Fvp => None,
            Board::Rpi4 => Some(format!(
                "{} {RPI4_QEMU_QUIRKS}",
                Board::Rpi4.hardware_host_bootargs().unwrap_or_default()
            )),
        }
    }

    /// What the host's command line gets on the board itself.
    pub fn hardware_host_bootargs(self) -> Option<String> {
        match self {
            Board::Virt | Board::Fvp => None,
            Board::Rpi4 => Some(format!("earlycon=pl011,mmio32,{RPI4_PL011:#x}")),
        }
    }
}

/// A Linux host's extra command line on `board` under QEMU, then `append`.
pub fn linux_append(board: Board, append: Option<&str>) -> Option<String> {
    match (board.qemu_host_bootargs(), append) {
        (Some(b), Some(a)) => Some(format!("{b} {a}")),
        (b, a) => b.or(a.map(str::to_string)),
    }
}

/// Kernel options for what QEMU's `raspi4b` does not model (see
/// [`Board::qemu_host_bootargs`]).
pub const RPI4_QEMU_QUIRKS: &str =
    "clk_ignore_unused initcall_blacklist=brcmstb_l2_driver_init,brcmstb_i2c_driver_init";

/// Fetches what running on `board` needs besides the image (the Pi 4's
/// device tree).
pub fn prepare(board: Board) -> Result<()> {
    if board == Board::Rpi4 {
        rpi4_dtb()?;
    }
    Ok(())
}

/// The Pi 4's device tree from Debian's kernel package, extracted once to
/// `target/boards/` (the package is the one `run linux` caches, checked
/// against apt's SHA256 there).
pub fn rpi4_dtb() -> Result<PathBuf> {
    let out = tools::target_dir().join("boards").join(RPI4_DTB);
    if out.is_file() {
        return Ok(out);
    }
    let assets = debian::ensure_assets()?;
    let deb = assets
        .kernel_deb
        .context("the default kernel has no .deb to take the Pi 4's device tree from")?;
    extract_dtb(&deb, &format!("broadcom/{RPI4_DTB}"), &out)?;
    Ok(out)
}

/// Extracts `usr/lib/linux-image-*/<rel>` from a kernel `.deb` to `out`.
pub fn extract_dtb(deb: &Path, rel: &str, out: &Path) -> Result<()> {
    let tmp = out.with_extension("unpack");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)?;
    tools::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    let lib = tmp.join("usr/lib");
    let found = std::fs::read_dir(&lib)
        .with_context(|| format!("{} has no /usr/lib", deb.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .map(|dir| dir.join(rel))
        .find(|p| p.is_file())
        .with_context(|| format!("{} has no /usr/lib/linux-image-*/{rel}", deb.display()))?;
    std::fs::create_dir_all(out.parent().context("output without a folder")?)?;
    let partial = out.with_extension("partial");
    std::fs::copy(&found, &partial)?;
    std::fs::rename(&partial, out)?;
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}
