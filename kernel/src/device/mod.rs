//! Devices the core owns or emulates: the interrupt controller the core
//! touches, the ITS and LPI registers kept from the host, the SMMU, a VM's
//! virtual GIC, and the inventory of the host's devices.

pub mod gic;
pub mod inventory;
pub mod its;
pub mod smmu;
pub mod vgic;
