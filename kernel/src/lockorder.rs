//! The core's lock order, and its check.
//!
//! Five locks can be held together, and only in this order (lowest rank
//! first):
//!
//! 1. a VM's slot (`vm::Slot::vm`; several at once only by `try_lock`,
//!    which cannot wait, as the consistency checker does). It is held for
//!    short VM-wide work only, never for a whole vCPU run: a run takes it
//!    to load its vCPU, again for a guest share or a PSCI power call, and
//!    to put the vCPU back, holding nothing else when it waits for it;
//! 2. [`Rank::Gic`], the emulated GICv3 ITS and redistributor state
//!    (`its::STATE`: an emulated register write that donates or returns a
//!    table runs its transaction under it);
//! 3. [`Rank::Memory`], the one-transaction-at-a-time lock (`memory::MEMORY`);
//! 4. a service's call slot (`service::Service::acquire`: the ledger, taken
//!    inside a transaction; the MTE policy, taken during a VM's exit);
//! 5. the host's stage-2 (`stage2::HOST`).
//!
//! A vCPU's load (`crate::vcpuload`: which CPU runs it) is not a lock in
//! this order: it is taken and given back under its VM's slot lock and never
//! waited for (a second run of a loaded vCPU is refused with `Busy`), so
//! holding it cannot deadlock; it only keeps the vCPU's own state to the
//! CPU that runs it.
//!
//! The heap's, the console's, the SMMU's and the core's record of host
//! shares with the hypervisor (`ledger_restart::HYP_SHARES`) locks are
//! leaves: nothing is taken while one of them is held. A ledger restart
//! takes the order from the top: every VM's slot (try-lock), `MEMORY`, the
//! ledger's call slot, the host's stage-2. A CPU that waits for a lock of rank `r` while it holds a
//! lock of rank `r` or higher can deadlock against a CPU that takes them the
//! other way round; [`Held::acquire`] refuses exactly that. The EL2 layer
//! keeps one [`Held`] per CPU and checks every acquisition in debug builds.

/// A lock's place in the order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Rank {
    VmSlot = 0,
    Gic = 1,
    Memory = 2,
    Service = 3,
    HostStage2 = 4,
}

impl Rank {
    /// Every rank, lowest first.
    pub const ALL: [Rank; 5] = [
        Rank::VmSlot,
        Rank::Gic,
        Rank::Memory,
        Rank::Service,
        Rank::HostStage2,
    ];
}

/// An acquisition against the order: `wanted` while `held` was held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OrderViolation {
    pub wanted: Rank,
    pub held: Rank,
}

/// The locks one CPU holds: a count per rank.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Held([u8; 5]);

impl Held {
    /// Nothing held.
    pub const NONE: Held = Held([0; 5]);

    /// The highest rank held, if any.
    pub fn highest(&self) -> Option<Rank> {
        Rank::ALL
            .into_iter()
            .rev()
            .find(|r| self.0[*r as usize] > 0)
    }

    /// Whether a CPU holding these locks may wait for one of rank `rank`.
    pub fn check(&self, rank: Rank) -> Result<(), OrderViolation> {
        match self.highest() {
            Some(held) if held >= rank => Err(OrderViolation { wanted: rank, held }),
            _ => Ok(()),
        }
    }

    /// Records a lock of rank `rank` taken by waiting: refused (and nothing
    /// recorded) against the order.
    pub fn acquire(&mut self, rank: Rank) -> Result<(), OrderViolation> {
        self.check(rank)?;
        self.0[rank as usize] = self.0[rank as usize].saturating_add(1);
        Ok(())
    }

    /// Records a lock taken with a try-lock, which never waits and so
    /// cannot deadlock: allowed whatever is held.
    pub fn acquired_without_waiting(&mut self, rank: Rank) {
        self.0[rank as usize] = self.0[rank as usize].saturating_add(1);
    }

    /// Records a lock of rank `rank` released.
    pub fn release(&mut self, rank: Rank) {
        self.0[rank as usize] = self.0[rank as usize].saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_is_allowed() {
        let mut h = Held::NONE;
        for r in Rank::ALL {
            assert_eq!(h.acquire(r), Ok(()));
        }
        assert_eq!(h.highest(), Some(Rank::HostStage2));
        for r in Rank::ALL.into_iter().rev() {
            h.release(r);
        }
        assert_eq!(h, Held::NONE);
    }

    #[test]
    fn a_lower_rank_while_holding_a_higher_is_refused() {
        let mut h = Held::NONE;
        h.acquire(Rank::Memory).unwrap();
        assert_eq!(
            h.acquire(Rank::VmSlot),
            Err(OrderViolation {
                wanted: Rank::VmSlot,
                held: Rank::Memory
            })
        );
        // Nothing was recorded for the refused one.
        h.release(Rank::Memory);
        assert_eq!(h, Held::NONE);
    }

    #[test]
    fn the_same_rank_twice_is_refused_unless_it_cannot_wait() {
        let mut h = Held::NONE;
        h.acquire(Rank::VmSlot).unwrap();
        assert!(h.acquire(Rank::VmSlot).is_err());
        // The checker's try-locks of every slot.
        h.acquired_without_waiting(Rank::VmSlot);
        h.acquired_without_waiting(Rank::VmSlot);
        assert_eq!(h.acquire(Rank::Memory), Ok(()));
        assert!(h.check(Rank::Service).is_ok());
        assert!(h.check(Rank::Memory).is_err());
    }

    #[test]
    fn the_gic_state_comes_before_a_transaction_never_inside_one() {
        let mut h = Held::NONE;
        h.acquire(Rank::Gic).unwrap();
        assert_eq!(h.acquire(Rank::Memory), Ok(()));
        h.release(Rank::Memory);
        h.release(Rank::Gic);
        h.acquire(Rank::Memory).unwrap();
        assert!(h.check(Rank::Gic).is_err());
    }

    #[test]
    fn every_lower_rank_is_refused_under_the_host_stage2() {
        let mut h = Held::NONE;
        h.acquire(Rank::HostStage2).unwrap();
        for r in Rank::ALL {
            assert!(h.check(r).is_err(), "{r:?}");
        }
    }
}
