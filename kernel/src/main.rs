//! The Moat EL2 core binary.
//!
//! Built for `aarch64-unknown-none-softfloat`: the core never touches FP/SIMD
//! registers, so it never has to save a partition's vector state on a trap.
//! On the development machine this file compiles to an empty program so the
//! workspace builds and tests as one; its unit tests there build the layers
//! that can run without the machine (`memory/`; of `base/`, the machine's
//! record, the per-CPU slots, exception injection, the lock-order check,
//! the console and the fatal path's parking; the device inventory, a
//! VM's virtual GIC and the ITS emulation; the partitions: the PSCI relay,
//! the service calls, the protected VMs and the ledger's restart; the
//! dispatch of traps and host hypercalls) over a host stand-in for `arch`
//! (`kernel/fake/`), which puts models of the ITS and the SMMU behind
//! `arch::mmio`.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(any(target_os = "none", test))]
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
#[cfg(any(target_os = "none", test))]
#[cfg_attr(
    not(target_os = "none"),
    allow(dead_code, reason = "the host tests build only part of the layer")
)]
mod memory;
#[cfg(target_os = "none")]
mod partition;

// The host unit tests' build of the layers: the real code, over the host
// stand-in for `arch`, with an allocator a test can make fail. Only what
// the tests exercise is built, so the rest of each layer looks unused.
#[cfg(all(test, not(target_os = "none")))]
#[path = "../fake/arch.rs"]
mod arch;
#[cfg(all(test, not(target_os = "none")))]
#[path = "../fake/heap.rs"]
mod fake_heap;
#[cfg(all(test, not(target_os = "none")))]
#[allow(dead_code, reason = "the host tests build only part of the layer")]
mod base {
    pub mod console;
    pub mod cpu;
    pub mod inject;
    pub mod lockcheck;
    pub mod panic;
    pub mod state;
    // The host's allocator stands in for the core's (`try_box` alike).
    pub(crate) use crate::fake_heap as heap;
}
#[cfg(all(test, not(target_os = "none")))]
#[allow(dead_code, reason = "the host tests build only part of the layer")]
mod device {
    pub mod inventory;
    // The ITS and redistributor emulation, over the models of
    // `arch::mmio`.
    pub mod its;
    pub mod vgic;
}

#[cfg(not(target_os = "none"))]
fn main() {}

// ---------------------------------------------------------------------------
// The top of the trap path on the host: the dispatch layer (syndrome to
// typed trap, route and verdict; the host's hypercalls) and the whole
// partition layer (with the ledger's restart and the consistency check),
// over the same stand-in, whose world switch can leave a partition through
// the trap entry as the vectors do.
// ---------------------------------------------------------------------------
#[cfg(all(test, not(target_os = "none")))]
#[allow(dead_code, reason = "the host tests build only part of the layer")]
mod dispatch;
#[cfg(all(test, not(target_os = "none")))]
#[allow(dead_code, reason = "the host tests build only part of the layer")]
mod partition;
