//! Device emulation: the GICv3 ITS and the redistributors' LPI registers,
//! kept from the host and emulated, a protected VM's virtual GIC, and the
//! inventory of the devices the host is handed. It sits above `memory`: the
//! ITS emulation takes and returns the host's pages through memory
//! transactions, as a VM does.

pub mod inventory;
pub mod its;
pub mod vgic;
