//! Board support for Moat.
//!
//! Everything the EL2 core needs to know about the machine comes from here: the
//! device tree is turned into one [`dt::Platform`] description (memory, CPUs,
//! console, interrupt controller, firmware conduit), and the tree handed to the
//! host is re-emitted by [`hostdt`] with the hypervisor's memory taken out.
//! Discovery and rewriting are pure logic and are unit-tested on the host
//! against real device trees kept in `testdata/`. The only code here that touches
//! hardware is the PL011 console ([`console`]) and the firmware conduit
//! ([`firmware`]), both behind `cfg(target_arch = "aarch64")`.
#![cfg_attr(not(test), no_std)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod console;
pub mod devices;
pub mod dt;
pub mod firmware;
#[cfg(feature = "alloc")]
pub mod hostdt;
pub mod iommu;
pub mod quirks;
