//! What the core knows about the machine after boot: discovered once by
//! `boot`, read-only from then on by every layer.

use crate::arch::sysreg::HostEl2Config;
use crate::base::cpu::MAX_CPUS;
use moat_kernel::el2config::CpuFeatures;
use moat_kernel::layout;
use moat_platform::dt::Platform;
use moat_platform::firmware::FirmwareConduit;
use spin::Once;

/// What the core knows about the machine after boot. Read-only from then on.
pub struct Machine {
    pub platform: Platform<'static>,
    pub firmware: FirmwareConduit,
    pub cpu: CpuFeatures,
    /// HCRX_EL2 for a protected VM without and with MTE.
    pub vm_hcrx: [u64; 2],
    pub host_el2: HostEl2Config,
    /// The hypervisor's memory (the core's image and its heap): one range,
    /// or two when the host's payloads stay in place between them.
    pub carve_out: layout::Pieces,
    /// Where stage-2 walks start (from VTCR_EL2, shared by every partition).
    pub stage2_start_level: usize,
    /// Bits of intermediate physical address every stage-2 translates.
    pub ipa_bits: u32,
    /// The board has no PSCI firmware the core can call: the core starts
    /// and stops CPUs itself and answers the host's PSCI (`power.rs`).
    pub core_powers_cpus: bool,
}

impl Machine {
    /// The logical index of the CPU with these affinity fields.
    pub fn cpu_index_of(&self, affinity: u64) -> Option<usize> {
        self.platform
            .cpus
            .iter()
            .take(MAX_CPUS)
            .position(|c| c.mpidr == affinity)
    }

    /// Whether `addr` is host RAM (an acceptable CPU_ON entry point).
    pub fn host_may_execute(&self, addr: u64) -> bool {
        self.platform
            .memory
            .iter()
            .any(|b| addr >= b.base && addr < b.end())
            && !self.carve_out.contains(addr)
    }
}

pub static MACHINE: Once<Machine> = Once::new();

pub fn machine() -> &'static Machine {
    // Set before any partition runs; traps cannot arrive earlier.
    MACHINE
        .get()
        .unwrap_or_else(|| panic!("machine used before boot completed"))
}

#[cfg(test)]
mod tests {
    use crate::memory::tests::{RAM_SIZE, world};

    #[test]
    fn cpus_are_found_by_affinity_and_host_entries_must_be_its_ram() {
        let ram = world().ram;
        let m = super::machine();
        assert!(!m.platform.cpus.is_empty());
        for (i, c) in m.platform.cpus.iter().enumerate() {
            assert_eq!(m.cpu_index_of(c.mpidr), Some(i));
        }
        assert_eq!(m.cpu_index_of(0xdead_0000), None);
        assert!(m.host_may_execute(ram));
        assert!(m.host_may_execute(ram + RAM_SIZE - 4));
        assert!(!m.host_may_execute(ram + RAM_SIZE));
        assert!(!m.host_may_execute(ram - 4));
    }
}
