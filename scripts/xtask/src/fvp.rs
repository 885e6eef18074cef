//! `cargo xtask run --board fvp`: Moat on Arm's FVP Base RevC model.
//!
//! The model is not free software and is not on this machine's package
//! registries, so the run needs it on PATH, and a TF-A BL31 built for the
//! FVP to boot straight into (Debian's `arm-trusted-firmware` package has
//! none for the FVP): its path in `MOAT_FVP_BL31`. BL31 starts at the reset
//! vector, provides PSCI through SMC, and enters Moat (preloaded at
//! [`Board::Fvp`]'s load address) at EL2 with the device tree's address in
//! x0. The tree is `arm/fvp-base-revc.dtb` from Debian's kernel package,
//! the same one `platform/testdata/` holds.
//!
//! Without the model or BL31 the run stops with one line saying what to
//! install and where. What can be checked without them is: the core links
//! and packs for the FVP ([`build_image`], part of `cargo xtask test`), and
//! discovery and the host-tree rewrite on the FVP's tree (the platform
//! crate's tests).

use crate::boards::{self, Board};
use crate::debian;
use crate::image::{self, ImageSpec};
use crate::tools;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The model's executable.
pub const MODEL: &str = "FVP_Base_RevC-2xAEMvA";
/// The environment variable naming BL31.
pub const BL31_VAR: &str = "MOAT_FVP_BL31";
/// Where BL31 runs from (the FVP's trusted SRAM), and where it is built to
/// find the device tree (`ARM_PRELOADED_DTB_BASE`).
pub const BL31_BASE: u64 = 0x0400_1000;
pub const DTB_BASE: u64 = 0x9fe0_0000;
/// The tree in Debian's kernel package.
pub const DTB: &str = "fvp-base-revc.dtb";

/// The TF-A build BL31 must come from, for the message and the book.
pub fn bl31_build() -> String {
    format!(
        "make PLAT=fvp RESET_TO_BL31=1 ARM_LINUX_KERNEL_AS_BL33=1 PRELOADED_BL33_BASE={:#x} ARM_PRELOADED_DTB_BASE={DTB_BASE:#x} bl31",
        Board::Fvp.load_address()
    )
}

/// The model on PATH, if there.
fn find_model() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(MODEL))
            .find(|p| p.is_file())
    })
}

/// What is missing, as one line, or the model and BL31.
pub fn requirements() -> Result<(PathBuf, PathBuf)> {
    let Some(model) = find_model() else {
        bail!(
            "{MODEL} is not on PATH: install Arm's FVP Base RevC AEMvA model (Arm Ecosystem FVPs, free download from Arm's developer site) and add its Linux64_GCC folder to PATH"
        );
    };
    let bl31 = std::env::var_os(BL31_VAR)
        .map(PathBuf::from)
        .filter(|p| p.is_file());
    let Some(bl31) = bl31 else {
        bail!(
            "{BL31_VAR} does not name a file: build TF-A's BL31 for the FVP ({}) and set {BL31_VAR} to build/fvp/release/bl31.bin",
            bl31_build()
        );
    };
    Ok((model, bl31))
}

/// The model's command line.
pub fn command(model: &Path, bl31: &Path, dtb: &Path, image: &Path, cpus: u32) -> Command {
    let mut c = Command::new(model);
    c.args([
        "-C",
        "bp.vis.disable_visualisation=1",
        "-C",
        "bp.terminal_0.start_telnet=0",
        "-C",
        "bp.pl011_uart0.out_file=-",
        "-C",
        "bp.pl011_uart0.unbuffered_output=1",
        "-C",
        "bp.secure_memory=0",
        "-C",
        "cache_state_modelled=0",
        "-C",
        "pctl.startup=0.0.0.0",
        "-C",
        "cluster1.NUM_CORES=0",
    ]);
    c.arg("-C").arg(format!("cluster0.NUM_CORES={cpus}"));
    for cpu in 0..cpus {
        c.arg("-C")
            .arg(format!("cluster0.cpu{cpu}.RVBAR={BL31_BASE:#x}"));
    }
    c.arg("--data")
        .arg(format!("cluster0.cpu0={}@{BL31_BASE:#x}", bl31.display()));
    c.arg("--data")
        .arg(format!("cluster0.cpu0={}@{DTB_BASE:#x}", dtb.display()));
    c.arg("--data").arg(format!(
        "cluster0.cpu0={}@{:#x}",
        image.display(),
        Board::Fvp.load_address()
    ));
    c
}

/// The FVP's tree from Debian's kernel package, extracted once.
pub fn dtb() -> Result<PathBuf> {
    let out = tools::target_dir().join("boards").join(DTB);
    if !out.is_file() {
        let assets = debian::ensure_assets()?;
        let deb = assets
            .kernel_deb
            .context("the default kernel has no .deb to take the FVP's tree from")?;
        boards::extract_dtb(&deb, &format!("arm/{DTB}"), &out)?;
    }
    Ok(out)
}

/// The demo image (the test host and the demo services) linked for the
/// FVP: what `cargo xtask test` builds to show the FVP's image is sound.
pub fn build_image() -> Result<PathBuf> {
    let built = image::build_for(Board::Fvp)?;
    let (manifest, services) = image::services_from(Path::new(crate::DEMO_MANIFEST))?;
    let spec = ImageSpec {
        host: manifest.host_path(&built.test_host),
        services: Some(services),
        ..Default::default()
    };
    let img = image::pack(&built.core, &spec, "fvp-demo")?;
    let bytes = std::fs::read(&img)?;
    let text_offset = u64::from_le_bytes(bytes[8..16].try_into()?);
    if &bytes[56..60] != b"ARM\x64" || text_offset != 0 {
        bail!(
            "{} is not an arm64 Image to preload at its link address",
            img.display()
        );
    }
    Ok(img)
}

/// `cargo xtask run --board fvp`: the demo image on the model.
pub fn run(cpus: u32) -> Result<i32> {
    let (model, bl31) = requirements()?;
    let img = build_image()?;
    let dtb = dtb()?;
    let mut cmd = command(&model, &bl31, &dtb, &img, cpus.clamp(1, 4));
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().context("starting the FVP")?;
    Ok(status.code().unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_preloads_bl31_the_tree_and_moat() {
        let c = command(
            Path::new("/m/FVP"),
            Path::new("bl31.bin"),
            Path::new("t.dtb"),
            Path::new("moat.img"),
            2,
        );
        let args: Vec<String> = c.get_args().map(|a| a.to_string_lossy().into()).collect();
        let has = |a: &str| args.iter().any(|x| x == a);
        assert!(has("cluster0.cpu0=bl31.bin@0x4001000"));
        assert!(has("cluster0.cpu0=t.dtb@0x9fe00000"));
        assert!(has("cluster0.cpu0=moat.img@0x80200000"));
        assert!(has("cluster0.cpu1.RVBAR=0x4001000"));
        assert!(!has("cluster0.cpu2.RVBAR=0x4001000"));
        assert!(bl31_build().contains("PRELOADED_BL33_BASE=0x80200000"));
    }
}
