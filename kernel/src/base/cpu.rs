//! Per-CPU state and vCPUs.
//!
//! Each physical CPU has a `PerCpu` slot, indexed by its logical number (its
//! position in the device tree's `/cpus`). The host's vCPU is the first field,
//! so the pointer TPIDR_EL2 holds while the host runs is also the pointer to
//! the slot. The power state is what the PSCI relay checks before starting or
//! stopping a CPU.

use crate::arch::gic::GicAccess;
use crate::arch::sysreg::El1Context;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use moat_kernel::regs::GuestRegs;

/// Vector slot numbers `vectors.S` passes for an exception from a lower EL.
pub const LOWER_SYNC: u64 = 8;
pub const LOWER_IRQ: u64 = 9;
pub const LOWER_FIQ: u64 = 10;

/// Which partition a vCPU belongs to.
pub const VCPU_HOST: u64 = 0;
/// Service `i` is `VCPU_SERVICE_BASE + i`.
pub const VCPU_SERVICE_BASE: u64 = 1;

/// A vCPU: the register frame the vectors fill (first, at offset 0), and who
/// it is. While a service vCPU runs, `cpu` is the physical CPU running it and
/// `exit_*` record why it last stopped.
#[repr(C)]
pub struct Vcpu {
    pub regs: GuestRegs,
    pub kind: u64,
    pub cpu: u64,
    pub exit_vector: u64,
    pub exit_esr: u64,
}

impl Vcpu {
    pub const fn new(kind: u64, cpu: u64) -> Self {
        Self {
            regs: GuestRegs {
                x: [0; 31],
                pc: 0,
                pstate: 0,
            },
            kind,
            cpu,
            exit_vector: 0,
            exit_esr: 0,
        }
    }
}

/// Callee-saved registers and stack pointer of a nested partition run
/// (layout shared with `enter_nested`/`leave_nested` in vectors.S).
#[derive(Default)]
#[repr(C)]
pub struct NestedSave {
    regs: [u64; 13],
}

/// Most CPUs the core runs on (stacks are sized for this many).
pub const MAX_CPUS: usize = 8;

/// A CPU's power state as the relay tracks it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PowerState {
    Off = 0,
    OnPending = 1,
    On = 2,
    /// In a powerdown CPU_SUSPEND: will come back through `secondary_entry`.
    Suspended = 3,
}

impl PowerState {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::OnPending,
            2 => Self::On,
            3 => Self::Suspended,
            _ => Self::Off,
        }
    }
}

#[repr(C)]
pub struct PerCpu {
    /// The host vCPU, whose registers are here while it is stopped in the core.
    host: UnsafeCell<Vcpu>,
    /// The host's EL1 state while a service runs on this CPU.
    pub host_el1: UnsafeCell<El1Context>,
    /// Where a nested service run returns to.
    pub nested: UnsafeCell<NestedSave>,
    /// How this CPU reaches the GIC for the service watchdog.
    pub gic: UnsafeCell<Option<GicAccess>>,
    pub index: usize,
    power: AtomicU8,
    /// Where the host asked this CPU to start (CPU_ON / resume), and its x0.
    entry: AtomicU64,
    context: AtomicU64,
}

// SAFETY: `host`, `host_el1`, `nested` and `gic` are only touched by the
// CPU the slot belongs to (while its host vCPU is stopped in the core, or
// before it first runs); every other field is atomic.
unsafe impl Sync for PerCpu {}

impl PerCpu {
    const fn new(index: usize) -> Self {
        Self {
            host: UnsafeCell::new(Vcpu::new(VCPU_HOST, index as u64)),
            host_el1: UnsafeCell::new(El1Context::ZERO),
            nested: UnsafeCell::new(NestedSave { regs: [0; 13] }),
            gic: UnsafeCell::new(None),
            index,
            power: AtomicU8::new(PowerState::Off as u8),
            entry: AtomicU64::new(0),
            context: AtomicU64::new(0),
        }
    }

    pub fn power(&self) -> PowerState {
        PowerState::from_u8(self.power.load(Ordering::Acquire))
    }

    pub fn set_power(&self, s: PowerState) {
        self.power.store(s as u8, Ordering::Release);
    }

    /// Moves `from` → `to` atomically; returns the state found on failure.
    pub fn transition(&self, from: PowerState, to: PowerState) -> Result<(), PowerState> {
        self.power
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .map(|_| ())
            .map_err(PowerState::from_u8)
    }

    pub fn set_host_entry(&self, entry: u64, context: u64) {
        self.entry.store(entry, Ordering::Relaxed);
        self.context.store(context, Ordering::Release);
    }

    pub fn host_entry(&self) -> (u64, u64) {
        let context = self.context.load(Ordering::Acquire);
        (self.entry.load(Ordering::Relaxed), context)
    }

    /// The host frame's address (what TPIDR_EL2 holds while the host runs).
    pub fn host_frame(&self) -> *mut GuestRegs {
        self.host.get().cast()
    }

    /// This CPU's GIC access path, set once at bring-up.
    pub fn gic_access(&self) -> Option<GicAccess> {
        // SAFETY: written once by this CPU before its host runs; read only by it.
        unsafe { *self.gic.get() }
    }
}

static CPUS: [PerCpu; MAX_CPUS] = {
    let mut i = 0;
    let mut cpus = [const { PerCpu::new(0) }; MAX_CPUS];
    while i < MAX_CPUS {
        cpus[i] = PerCpu::new(i);
        i += 1;
    }
    cpus
};

pub fn get(index: usize) -> Option<&'static PerCpu> {
    CPUS.get(index)
}

/// The slot whose host frame is `frame`.
///
/// # Safety
///
/// `frame` must be a pointer obtained from [`PerCpu::host_frame`].
pub unsafe fn from_host_frame(frame: *mut GuestRegs) -> &'static PerCpu {
    // SAFETY: `host` (whose first field is the frame) is the first field of a
    // `#[repr(C)]` PerCpu that lives in the static `CPUS`, so the frame
    // pointer is the slot pointer.
    unsafe { &*(frame as *const PerCpu) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_exist_for_max_cpus_and_know_their_index() {
        for i in 0..MAX_CPUS {
            assert_eq!(get(i).map(|c| c.index), Some(i));
        }
        assert!(get(MAX_CPUS).is_none());
    }

    #[test]
    fn power_transitions_happen_only_from_the_expected_state() {
        let cpu = PerCpu::new(3);
        assert_eq!(cpu.power(), PowerState::Off);
        assert_eq!(
            cpu.transition(PowerState::On, PowerState::Suspended),
            Err(PowerState::Off)
        );
        assert_eq!(cpu.power(), PowerState::Off);
        cpu.transition(PowerState::Off, PowerState::OnPending)
            .unwrap();
        assert_eq!(cpu.power(), PowerState::OnPending);
        cpu.set_power(PowerState::On);
        assert_eq!(
            cpu.transition(PowerState::OnPending, PowerState::On),
            Err(PowerState::On)
        );
        cpu.set_power(PowerState::Suspended);
        assert_eq!(cpu.power(), PowerState::Suspended);
        // Anything else read back is Off.
        assert_eq!(PowerState::from_u8(9), PowerState::Off);
    }

    #[test]
    fn host_entry_is_kept() {
        let cpu = PerCpu::new(0);
        assert_eq!(cpu.host_entry(), (0, 0));
        cpu.set_host_entry(0x4008_0000, 0x1234);
        assert_eq!(cpu.host_entry(), (0x4008_0000, 0x1234));
        assert!(cpu.gic_access().is_none());
    }

    #[test]
    fn the_host_frame_leads_back_to_its_slot() {
        let cpu = get(2).unwrap();
        let frame = cpu.host_frame();
        // SAFETY: `frame` came from `host_frame`.
        let back = unsafe { from_host_frame(frame) };
        assert!(core::ptr::eq(back, cpu));
        // SAFETY: the frame of a slot no CPU runs in this test.
        let regs = unsafe { &*frame };
        assert_eq!((regs.pc, regs.x[0]), (0, 0));
        let vcpu = Vcpu::new(VCPU_SERVICE_BASE, 5);
        assert_eq!(
            (vcpu.kind, vcpu.cpu, vcpu.exit_esr),
            (VCPU_SERVICE_BASE, 5, 0)
        );
    }
}
