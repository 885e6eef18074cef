//! Which vCPUs of one VM are loaded on which physical CPUs.
//!
//! The vCPUs of a VM run in parallel, each on one physical CPU at a time.
//! A run *loads* its vCPU (claims it for its CPU) under the VM's slot lock
//! and *puts* it back under the same lock when it ends; in between the run
//! owns the vCPU's registers, system registers, FP/SIMD state and virtual
//! CPU interface alone, without the slot lock. The VM-wide rules read the
//! count of loaded vCPUs: a VM may be destroyed, given memory or loaded
//! with an image only while none runs.
//!
//! The record also remembers which vCPU of the VM last ran on each
//! physical CPU: a CPU that last ran another vCPU of the same VM (same
//! VMID) may hold TLB entries that vCPU's guest-local invalidations never
//! reached for this one, so the vCPU flushes the VMID's local entries
//! first (as does a vCPU that moved to another CPU).
//!
//! Pure bookkeeping: the caller holds the VM's slot lock for every call.

/// Why a vCPU could not be loaded or put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadError {
    /// No such vCPU (or no such CPU).
    OutOfRange,
    /// The vCPU is loaded already, on the CPU given.
    Busy { cpu: usize },
    /// `put` of a vCPU that is not loaded on that CPU.
    NotLoaded,
}

/// The loads of one VM with `VCPUS` vCPUs at most, on `CPUS` CPUs at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loads<const VCPUS: usize, const CPUS: usize> {
    /// The CPU each vCPU is loaded on.
    on: [Option<u16>; VCPUS],
    /// The CPU each vCPU ran on last.
    last_cpu: [Option<u16>; VCPUS],
    /// The vCPU of this VM that ran last on each CPU.
    last_ran: [Option<u16>; CPUS],
    /// How many vCPUs are loaded.
    running: u16,
}

/// What a successful load tells the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The CPU may hold TLB entries of this VM's VMID that are stale for
    /// this vCPU: another vCPU of the VM ran on it last, or this vCPU last
    /// ran elsewhere (or never ran).
    pub flush_local_tlb: bool,
}

impl<const VCPUS: usize, const CPUS: usize> Default for Loads<VCPUS, CPUS> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const VCPUS: usize, const CPUS: usize> Loads<VCPUS, CPUS> {
    /// Nothing loaded, nothing ran.
    pub const fn new() -> Self {
        Self {
            on: [None; VCPUS],
            last_cpu: [None; VCPUS],
            last_ran: [None; CPUS],
            running: 0,
        }
    }

    /// How many vCPUs are loaded (running) now.
    pub fn running(&self) -> u16 {
        self.running
    }

    /// The CPU vCPU `vcpu` is loaded on, if it is.
    pub fn loaded_on(&self, vcpu: usize) -> Option<usize> {
        self.on.get(vcpu).copied().flatten().map(usize::from)
    }

    /// Loads vCPU `vcpu` on CPU `cpu`. Refused, with nothing changed, if
    /// it is loaded already (anywhere: a vCPU runs on one CPU at a time).
    pub fn load(&mut self, vcpu: usize, cpu: usize) -> Result<Loaded, LoadError> {
        let cpu16 = u16::try_from(cpu).map_err(|_| LoadError::OutOfRange)?;
        let vcpu16 = u16::try_from(vcpu).map_err(|_| LoadError::OutOfRange)?;
        let last = self.last_ran.get(cpu).ok_or(LoadError::OutOfRange)?;
        let slot = self.on.get(vcpu).ok_or(LoadError::OutOfRange)?;
        if let Some(held) = slot {
            return Err(LoadError::Busy {
                cpu: usize::from(*held),
            });
        }
        let flush_local_tlb = *last != Some(vcpu16) || self.last_cpu[vcpu] != Some(cpu16);
        self.on[vcpu] = Some(cpu16);
        self.last_cpu[vcpu] = Some(cpu16);
        self.last_ran[cpu] = Some(vcpu16);
        self.running += 1;
        Ok(Loaded { flush_local_tlb })
    }

    /// Puts vCPU `vcpu` back from CPU `cpu`, where it must be loaded.
    pub fn put(&mut self, vcpu: usize, cpu: usize) -> Result<(), LoadError> {
        let slot = self.on.get_mut(vcpu).ok_or(LoadError::OutOfRange)?;
        if slot.map(usize::from) != Some(cpu) {
            return Err(LoadError::NotLoaded);
        }
        *slot = None;
        self.running -= 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type L = Loads<4, 3>;

    #[test]
    fn vcpus_load_on_different_cpus_at_once() {
        let mut l = L::new();
        assert_eq!(l.running(), 0);
        l.load(0, 0).unwrap();
        l.load(1, 1).unwrap();
        l.load(2, 2).unwrap();
        assert_eq!(l.running(), 3);
        assert_eq!(l.loaded_on(1), Some(1));
        l.put(1, 1).unwrap();
        assert_eq!(l.running(), 2);
        assert_eq!(l.loaded_on(1), None);
        l.put(0, 0).unwrap();
        l.put(2, 2).unwrap();
        assert_eq!(l.running(), 0);
    }

    #[test]
    fn the_same_vcpu_twice_is_busy_and_changes_nothing() {
        let mut l = L::new();
        l.load(3, 0).unwrap();
        let before = l.clone();
        assert_eq!(l.load(3, 1), Err(LoadError::Busy { cpu: 0 }));
        assert_eq!(l.load(3, 0), Err(LoadError::Busy { cpu: 0 }));
        assert_eq!(l, before);
        l.put(3, 0).unwrap();
        assert!(l.load(3, 1).is_ok());
    }

    #[test]
    fn out_of_range_and_wrong_puts_change_nothing() {
        let mut l = L::new();
        l.load(0, 0).unwrap();
        let before = l.clone();
        assert_eq!(l.load(4, 0), Err(LoadError::OutOfRange));
        assert_eq!(l.load(1, 3), Err(LoadError::OutOfRange));
        assert_eq!(l.load(usize::MAX, 0), Err(LoadError::OutOfRange));
        assert_eq!(l.put(0, 1), Err(LoadError::NotLoaded));
        assert_eq!(l.put(1, 0), Err(LoadError::NotLoaded));
        assert_eq!(l.put(9, 0), Err(LoadError::OutOfRange));
        assert_eq!(l, before);
    }

    #[test]
    fn local_tlb_flush_when_another_vcpu_ran_here_or_this_one_moved() {
        let mut l = L::new();
        // First run anywhere: flush.
        assert!(l.load(0, 0).unwrap().flush_local_tlb);
        l.put(0, 0).unwrap();
        // Same vCPU, same CPU, nothing else ran there: no flush.
        assert!(!l.load(0, 0).unwrap().flush_local_tlb);
        l.put(0, 0).unwrap();
        // vCPU 1 on CPU 0, where vCPU 0 ran last: flush.
        assert!(l.load(1, 0).unwrap().flush_local_tlb);
        l.put(1, 0).unwrap();
        // vCPU 0 back on CPU 0: vCPU 1 ran there since: flush.
        assert!(l.load(0, 0).unwrap().flush_local_tlb);
        l.put(0, 0).unwrap();
        // vCPU 0 moves to CPU 2, then back to CPU 0 (where it was the
        // last of the VM): its invalidations on CPU 2 never reached CPU 0.
        assert!(l.load(0, 2).unwrap().flush_local_tlb);
        l.put(0, 2).unwrap();
        assert!(l.load(0, 0).unwrap().flush_local_tlb);
    }

    #[test]
    fn racing_loads_of_one_vcpu_leave_exactly_one_winner() {
        // The slot lock serialises loads; model it with a mutex and let
        // threads race for the same vCPU.
        use std::sync::{Arc, Barrier, Mutex};
        for _ in 0..50 {
            let loads = Arc::new(Mutex::new(L::new()));
            let barrier = Arc::new(Barrier::new(3));
            let winners: Vec<_> = (0..3)
                .map(|cpu| {
                    let (loads, barrier) = (loads.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        loads.lock().unwrap().load(2, cpu).is_ok()
                    })
                })
                .collect();
            let won = winners
                .into_iter()
                .map(|t| t.join().unwrap())
                .filter(|w| *w)
                .count();
            assert_eq!(won, 1);
            assert_eq!(loads.lock().unwrap().running(), 1);
        }
    }
}
