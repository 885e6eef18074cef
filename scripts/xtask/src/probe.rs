//! The feature probe (`images/probe`): built for
//! `aarch64-unknown-linux-musl`, a target `rust-toolchain.toml` lists, and
//! linked with the toolchain's own LLD against the musl the target ships,
//! so it is static and needs no cross compiler from the distribution.

use crate::tools::{self, cargo, run};
use anyhow::Result;
use std::path::PathBuf;

/// The probe's target.
pub const TARGET: &str = "aarch64-unknown-linux-musl";

/// Builds the probe; returns the static binary's path.
pub fn build() -> Result<PathBuf> {
    let dir = tools::root().join("images/probe");
    let target_dir = tools::target_dir().join("probe");
    run(cargo()
        .current_dir(&dir)
        .args([
            "build",
            "--quiet",
            "--release",
            "--target",
            TARGET,
            "--target-dir",
        ])
        .arg(&target_dir))?;
    Ok(target_dir.join(TARGET).join("release/moat-probe"))
}
