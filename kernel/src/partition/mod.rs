//! Partitions: the host, the services and the protected VMs, their per-CPU
//! contexts and their lifecycles.

pub mod ledger_restart;
pub mod power;
pub mod service;
pub mod vm;

use crate::base::cpu::PerCpu;
use crate::memory::{Checked, Mismatch};

/// Runs the consistency checker over every partition: the ledger against
/// the host's, every service's and every idle VM's stage-2 and the GIC's
/// tables. Takes the locks in their order: every idle VM's slot, the GIC,
/// then memory (inside the checker).
pub fn check_consistency(cpu: &PerCpu) -> Result<Checked, Mismatch> {
    let vms = vm::lock_all_idle().map_err(|_| Mismatch::NoMemory)?;
    let gic = crate::device::its::hold();
    let services = (0..).map_while(service::get).map(|s| s.stage2);
    crate::memory::check_consistency(cpu, services, vms.stage2s(), vms.running, gic.as_ref())
}
