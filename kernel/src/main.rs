//! The Moat EL2 core binary.
//!
//! Built for `aarch64-unknown-none-softfloat`: the core never touches FP/SIMD
//! registers, so it never has to save a partition's vector state on a trap.
//! On the development machine this file compiles to an empty program so the
//! workspace builds and tests as one.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod el2;

#[cfg(not(target_os = "none"))]
fn main() {}
