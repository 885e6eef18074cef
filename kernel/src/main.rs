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

// The layers, top to bottom; each imports only from the layers below it.
// Every `unsafe` block of the core lives in these modules and carries the
// argument for its soundness.
#[cfg(target_os = "none")]
mod arch;
#[cfg(target_os = "none")]
mod base;
#[cfg(target_os = "none")]
mod boot;
#[cfg(target_os = "none")]
mod device;
#[cfg(target_os = "none")]
mod dispatch;
#[cfg(target_os = "none")]
mod memory;
#[cfg(target_os = "none")]
mod partition;

#[cfg(not(target_os = "none"))]
fn main() {}
