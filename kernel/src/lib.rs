//! The Moat EL2 core: the pure logic.
//!
//! Everything here is `no_std`, free of `asm!` and unit-tested on the
//! development machine: trap decoding, exception injection, the EL2 register
//! values, the boot memory layout, the host stage-2 plan, the PSCI relay's
//! decisions, the checked arithmetic of hypercall ranges, the core's check
//! of the ledger's transactions and the consistency checker's rules for a
//! stage-2 entry, the core's lock order, and the requests that rebuild a
//! restarted ledger from the core's own records. The code that runs at EL2
//! (`src/main.rs` and the layer folders `boot/`, `dispatch/`, `partition/`,
//! `memory/`, `device/`, `base/` and `arch/`) is a thin layer that reads and
//! writes system registers around these functions.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod el2config;
pub mod esr;
pub mod inject;
pub mod its;
pub mod layout;
pub mod lockorder;
pub mod mapcheck;
pub mod psci;
pub mod ranges;
pub mod rangeset;
pub mod rebuild;
pub mod regs;
pub mod routing;
pub mod s2plan;
pub mod smmu;
pub mod sysregs;
pub mod txcheck;
pub mod vcpuload;
pub mod verdict;
pub mod vgic;
pub mod vmfeatures;

/// The version string the core prints at boot.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
