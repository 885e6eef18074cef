//! The lock order of `moat_kernel::lockorder`, checked on every CPU in
//! debug builds: a lock taken against the order panics there, and costs
//! nothing in a release build.

use moat_kernel::lockorder::Rank;

/// While alive, the CPU holds a lock of this rank.
#[must_use]
pub struct Holding {
    #[cfg(debug_assertions)]
    rank: Rank,
}

/// Records that this CPU is about to wait for a lock of rank `rank`;
/// panics in a debug build if it holds one of that rank or higher.
pub fn hold(rank: Rank) -> Holding {
    #[cfg(debug_assertions)]
    {
        imp::with_held(|held| {
            if let Err(v) = held.acquire(rank) {
                panic!(
                    "lock order: {:?} wanted while {:?} is held",
                    v.wanted, v.held
                );
            }
        });
        Holding { rank }
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = rank;
        Holding {}
    }
}

/// Checks, in a debug build, that this CPU may wait for a lock of rank
/// `rank` (for locks whose guards are held across calls the order need not
/// follow further).
pub fn check(rank: Rank) {
    #[cfg(debug_assertions)]
    imp::with_held(|held| {
        if let Err(v) = held.check(rank) {
            panic!(
                "lock order: {:?} wanted while {:?} is held",
                v.wanted, v.held
            );
        }
    });
    #[cfg(not(debug_assertions))]
    let _ = rank;
}

impl Drop for Holding {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        imp::with_held(|held| held.release(self.rank));
    }
}

#[cfg(debug_assertions)]
mod imp {
    use crate::arch::sysreg;
    use crate::base::cpu::MAX_CPUS;
    use moat_kernel::lockorder::Held;

    /// Each CPU's locks; only that CPU touches its entry, the mutex only
    /// makes the static shareable.
    static HELD: [spin::Mutex<Held>; MAX_CPUS] = [const { spin::Mutex::new(Held::NONE) }; MAX_CPUS];

    pub fn with_held(f: impl FnOnce(&mut Held)) {
        // Affinity level 0 names the CPU within its cluster: enough to keep
        // the CPUs apart on the machines debug builds run on; a collision
        // would only merge two CPUs' records (a false alarm, never a miss).
        let index = (sysreg::mpidr() & 0xff) as usize % MAX_CPUS;
        f(&mut HELD[index].lock());
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;
    use crate::arch::sysreg::set_mpidr;

    // Each test plays a CPU of its own: the record is per CPU, and tests
    // run in parallel.

    #[test]
    fn locks_taken_in_order_and_released_in_any_order() {
        set_mpidr(1);
        let vm = hold(Rank::VmSlot);
        let memory = hold(Rank::Memory);
        check(Rank::HostStage2);
        let host = hold(Rank::HostStage2);
        drop(memory);
        drop(host);
        drop(vm);
        // All released: the lowest rank may be taken again.
        let _vm = hold(Rank::VmSlot);
    }

    #[test]
    #[should_panic(expected = "lock order: Memory wanted while HostStage2 is held")]
    fn a_lock_against_the_order_panics() {
        set_mpidr(2);
        let _host = hold(Rank::HostStage2);
        let _memory = hold(Rank::Memory);
    }

    #[test]
    #[should_panic(expected = "lock order: Memory wanted while Memory is held")]
    fn a_lock_of_the_rank_held_panics() {
        set_mpidr(3);
        let _memory = hold(Rank::Memory);
        let _again = hold(Rank::Memory);
    }

    #[test]
    #[should_panic(expected = "lock order: Gic wanted while Service is held")]
    fn check_panics_against_the_order() {
        set_mpidr(4);
        let _service = hold(Rank::Service);
        check(Rank::Gic);
    }

    #[test]
    fn cpus_keep_separate_records() {
        set_mpidr(5);
        let _host = hold(Rank::HostStage2);
        set_mpidr(6);
        let _vm = hold(Rank::VmSlot);
        set_mpidr(5);
    }
}
