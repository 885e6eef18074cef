//! The little of the interrupt controller the core touches: the EL2 timer's
//! interrupt (PPI 26), which is the watchdog that bounds a service call.
//!
//! The host owns the GIC. While a service runs, physical interrupts are
//! routed to EL2 (HCR_EL2.IMO), and the core makes sure PPI 26 can reach it:
//! enabled in this CPU's redistributor (GICv3) or banked distributor
//! registers (GICv2), and the CPU interface open to it. The host's own
//! CPU-interface settings are saved before and restored after, so the host
//! never sees them change. A host that disables PPI 26 behind the core's back
//! between two calls only delays its own service calls' timeouts: every
//! service run re-enables it first.

use core::ptr::{read_volatile, write_volatile};
use moat_platform::dt::Gic;

/// The EL2 physical timer's PPI.
pub const WATCHDOG_INTID: u32 = 26;

/// The CPU interface's priority mask while a service runs: the watchdog
/// (priority 0) gets through; ordinary host interrupts (Linux gives every
/// interrupt priority 0xa0) stay pending until the run ends, so they delay a
/// call by at most its budget instead of interrupting it. Only host
/// interrupts above this priority (pseudo-NMIs) suspend a call.
pub const SERVICE_RUN_PMR: u64 = 0x80;

/// How this CPU reaches the GIC for the watchdog.
#[derive(Clone, Copy, Debug)]
pub enum GicAccess {
    /// GICv3: the distributor and this CPU's SGI/PPI frame (redistributor + 64 KiB).
    V3 { distributor: u64, sgi_frame: u64 },
    /// GICv2: distributor and CPU interface.
    V2 {
        distributor: u64,
        cpu_interface: u64,
    },
}

/// The host's CPU-interface state the core changes around a service run.
#[derive(Clone, Copy, Debug, Default)]
pub struct SavedCpuInterface {
    a: u64,
    b: u64,
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: `addr` is a GIC register in a region the core maps as device memory.
    unsafe { read_volatile(addr as *const u32) }
}

fn wr32(addr: u64, v: u32) {
    // SAFETY: as for `rd32`.
    unsafe { write_volatile(addr as *mut u32, v) }
}

fn wr8(addr: u64, v: u8) {
    // SAFETY: as for `rd32`; the priority registers are byte-accessible.
    unsafe { write_volatile(addr as *mut u8, v) }
}

/// Finds this CPU's GIC access path, given its MPIDR affinity.
pub fn locate(gic: &Gic, affinity: u64) -> Option<GicAccess> {
    match gic {
        Gic::V2 {
            distributor,
            cpu_interface,
            ..
        } => Some(GicAccess::V2 {
            distributor: distributor.base,
            cpu_interface: cpu_interface.base,
        }),
        Gic::V3 {
            distributor,
            redistributors,
        } => {
            // GICR_TYPER[63:32] holds Aff3.Aff2.Aff1.Aff0; frames are 128 KiB
            // (256 KiB with VLPIs); bit 4 (Last) ends a region.
            let want = ((affinity >> 8) & 0xff00_0000) | (affinity & 0xff_ffff);
            for region in redistributors {
                let mut frame = region.base;
                while frame + 0x2_0000 <= region.end() {
                    // SAFETY: inside a redistributor region the core maps.
                    let typer = unsafe { read_volatile((frame + 0x8) as *const u64) };
                    if typer >> 32 == want {
                        return Some(GicAccess::V3 {
                            distributor: distributor.base,
                            sgi_frame: frame + 0x1_0000,
                        });
                    }
                    if typer & (1 << 4) != 0 {
                        break;
                    }
                    frame += if typer & (1 << 1) != 0 {
                        0x4_0000
                    } else {
                        0x2_0000
                    };
                }
            }
            None
        }
    }
}

/// Before a service run: PPI 26 enabled, highest priority, group 1, and the
/// CPU interface letting it through. Returns the host's interface state.
/// Group 1 at the distributor and the redistributor's wake state are
/// re-established too if the host changed them (and left so: any GIC driver
/// keeps them on).
pub fn open_watchdog(access: &GicAccess) -> SavedCpuInterface {
    match *access {
        GicAccess::V3 {
            distributor,
            sgi_frame,
        } => {
            // The host may have turned group 1 off or put this CPU's
            // redistributor to sleep; the watchdog needs both.
            if rd32(distributor) & 0x12 != 0x12 {
                wr32(distributor, rd32(distributor) | 0x12);
            }
            let waker = sgi_frame - 0x1_0000 + 0x14;
            if rd32(waker) & (1 << 1) != 0 {
                wr32(waker, rd32(waker) & !(1 << 1));
            }
            wr32(
                sgi_frame + 0x80,
                rd32(sgi_frame + 0x80) | (1 << WATCHDOG_INTID),
            ); // IGROUPR0
            wr8(sgi_frame + 0x400 + u64::from(WATCHDOG_INTID), 0); // IPRIORITYR
            wr32(sgi_frame + 0x100, 1 << WATCHDOG_INTID); // ISENABLER0
            let (pmr, grpen): (u64, u64);
            // SAFETY: the physical CPU interface's priority mask and group-1
            // enable, saved here and restored by `close_watchdog`. No ISB:
            // they matter once the service runs, and the ERET into it is a
            // context synchronization event (SCTLR_EL2.EOS).
            unsafe {
                core::arch::asm!(
                    "mrs {p}, icc_pmr_el1", "mrs {g}, icc_igrpen1_el1",
                    "msr icc_pmr_el1, {ff}", "msr icc_igrpen1_el1, {one}",
                    p = out(reg) pmr, g = out(reg) grpen, ff = in(reg) SERVICE_RUN_PMR, one = in(reg) 1u64,
                    options(nostack, preserves_flags),
                );
            }
            SavedCpuInterface { a: pmr, b: grpen }
        }
        GicAccess::V2 {
            distributor,
            cpu_interface,
        } => {
            wr8(distributor + 0x400 + u64::from(WATCHDOG_INTID), 0);
            wr32(distributor + 0x100, 1 << WATCHDOG_INTID);
            wr32(distributor, rd32(distributor) | 1);
            let saved = SavedCpuInterface {
                a: u64::from(rd32(cpu_interface + 0x4)),
                b: u64::from(rd32(cpu_interface)),
            };
            wr32(cpu_interface + 0x4, SERVICE_RUN_PMR as u32);
            wr32(cpu_interface, saved.b as u32 | 0b11);
            saved
        }
    }
}

/// After a service run: the host's interface state back.
pub fn close_watchdog(access: &GicAccess, saved: SavedCpuInterface) {
    match *access {
        GicAccess::V3 { .. } => {
            // SAFETY: restores what `open_watchdog` saved. No ISB: the core
            // runs with interrupts masked, and the ERET back into the host
            // synchronizes the writes.
            unsafe {
                core::arch::asm!(
                    "msr icc_pmr_el1, {p}", "msr icc_igrpen1_el1, {g}",
                    p = in(reg) saved.a, g = in(reg) saved.b,
                    options(nostack, preserves_flags),
                );
            }
        }
        GicAccess::V2 { cpu_interface, .. } => {
            wr32(cpu_interface + 0x4, saved.a as u32);
            wr32(cpu_interface, saved.b as u32);
        }
    }
}

/// Once per CPU before the host runs: wake this CPU's redistributor and turn
/// on affinity routing and group 1 in the distributor (GICv3), so PPIs can be
/// delivered before the host has initialised the GIC itself. Both are what
/// any GICv3 driver sets; the host may reprogram them.
pub fn prepare_cpu(gic: &Gic, access: &GicAccess) {
    if let (
        Gic::V3 { .. },
        GicAccess::V3 {
            distributor,
            sgi_frame,
        },
    ) = (gic, access)
    {
        let d = *distributor;
        wr32(d, rd32(d) | 0x12); // ARE_NS | EnableGrp1NS
        let mut spins = 0;
        while rd32(d) & (1 << 31) != 0 && spins < 1_000_000 {
            spins += 1; // RWP
        }
        let waker = sgi_frame - 0x1_0000 + 0x14;
        wr32(waker, rd32(waker) & !(1 << 1));
        let mut spins = 0;
        while rd32(waker) & (1 << 2) != 0 && spins < 1_000_000 {
            spins += 1;
        }
    }
}
