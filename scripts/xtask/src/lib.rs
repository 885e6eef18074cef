//! The parts of the xtask other crates build on: the image manifest's parser
//! and checks (which the fuzz harness drives with hostile manifests) and the
//! workspace paths they use. The `cargo xtask` binary is `main.rs`.

pub mod manifest;
pub mod tools;
