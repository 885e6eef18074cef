//! The code that runs at EL2. Every `unsafe` block in the core lives under
//! this module and carries the argument for its soundness.

pub mod boot;
pub mod console;
pub mod cpu;
pub mod devices;
pub mod gic;
pub mod heap;
pub mod hvc;
pub mod its;
pub mod ledger_restart;
pub mod lockcheck;
pub mod memory;
pub mod mmu;
pub mod panic;
pub mod power;
pub mod service;
pub mod smmu;
pub mod stage2;
pub mod sysreg;
pub mod trap;
pub mod vgic;
pub mod vm;

core::arch::global_asm!(include_str!("../arch/entry.S"));
core::arch::global_asm!(include_str!("../arch/vectors.S"));
