//! The feature probe (`images/probe`): built for
//! `aarch64-unknown-linux-musl`, a target `rust-toolchain.toml` lists, and
//! linked with the toolchain's own LLD against the musl the target ships,
//! so it is static and needs no cross compiler from the distribution.

use crate::tools;
use anyhow::Result;
use std::path::PathBuf;

/// The probe's target.
pub const TARGET: &str = "aarch64-unknown-linux-musl";

/// Builds the probe; returns the static binary's path.
pub fn build() -> Result<PathBuf> {
    tools::build_outside_workspace("probe", TARGET).map(|dir| dir.with_file_name("moat-probe"))
}
