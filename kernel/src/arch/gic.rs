//! The little of the interrupt controller the core touches: the EL2 timer's
//! interrupt (PPI 26), which is the watchdog that bounds a service call and
//! the backstop that bounds a VM run.
//!
//! The host owns the GIC. While a service or a VM runs, physical interrupts
//! are routed to EL2 (HCR_EL2.IMO/FMO), and the core makes sure PPI 26 can
//! reach it: enabled in this CPU's redistributor (GICv3) or banked
//! distributor registers (GICv2), at priority 0, and the CPU interface open
//! to it. The host's own CPU-interface settings are saved before and
//! restored after, so the host never sees them change. A host that disables
//! PPI 26 behind the core's back between two runs gains nothing: every run
//! re-enables it first.
//!
//! The priority mask during a run depends on what runs ([`RunMask`]). The
//! host chooses its interrupts' priorities (any value, 0 included), so a
//! call that must finish cannot rely on the mask alone: a host interrupt
//! that still gets through is held back ([`hold_back`]) — disabled at the
//! distributor for the rest of the call and enabled again after it
//! ([`release`]), still pending for the host to take.

use core::ptr::{read_volatile, write_volatile};
use moat_kernel::el2config::{RunMask, run_pmr};
use moat_platform::dt::Gic;

/// The EL2 physical timer's PPI.
pub const WATCHDOG_INTID: u32 = 26;

/// INTIDs at or above this are special (1020..1023) or LPIs (8192..), which
/// have no enable bit in the distributor.
const FIRST_SPECIAL_INTID: u32 = 1020;

/// Host interrupts held back during one call (see [`hold_back`]).
#[derive(Debug, Default)]
pub struct HeldBack {
    intids: heapless::Vec<u32, 8>,
}

/// How this CPU reaches the GIC for the watchdog. `priority_bits` is the
/// priority-mask bits its CPU interface implements (what a write of 0xff
/// reads back as), learnt once at bring-up by [`probe_priority_bits`]
/// rather than on every run; the run masks are computed from it.
#[derive(Clone, Copy, Debug)]
pub enum GicAccess {
    /// GICv3: the distributor and this CPU's SGI/PPI frame (redistributor + 64 KiB).
    V3 {
        distributor: u64,
        sgi_frame: u64,
        priority_bits: u64,
    },
    /// GICv2: distributor and CPU interface.
    V2 {
        distributor: u64,
        cpu_interface: u64,
        priority_bits: u64,
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
            priority_bits: 0xff,
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
                            priority_bits: 0xff,
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

/// Before a run: PPI 26 enabled, highest priority, group 1, and the CPU
/// interface letting it through with the mask `mask` asks for. Returns the
/// host's interface state. Group 1 at the distributor and the
/// redistributor's wake state are re-established too if the host changed
/// them (and left so: any GIC driver keeps them on).
pub fn open_watchdog(access: &GicAccess, mask: RunMask) -> SavedCpuInterface {
    match *access {
        GicAccess::V3 {
            distributor,
            sgi_frame,
            priority_bits,
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
            // they matter once the run starts, and the ERET into it is a
            // context synchronization event (SCTLR_EL2.EOS).
            unsafe {
                core::arch::asm!(
                    "mrs {p}, icc_pmr_el1", "mrs {g}, icc_igrpen1_el1",
                    p = out(reg) pmr, g = out(reg) grpen,
                    options(nomem, nostack, preserves_flags),
                );
                core::arch::asm!(
                    "msr icc_pmr_el1, {m}", "msr icc_igrpen1_el1, {one}",
                    m = in(reg) run_pmr(mask, pmr, priority_bits), one = in(reg) 1u64,
                    options(nostack, preserves_flags),
                );
            }
            SavedCpuInterface { a: pmr, b: grpen }
        }
        GicAccess::V2 {
            distributor,
            cpu_interface,
            priority_bits,
        } => {
            wr8(distributor + 0x400 + u64::from(WATCHDOG_INTID), 0);
            wr32(distributor + 0x100, 1 << WATCHDOG_INTID);
            wr32(distributor, rd32(distributor) | 1);
            let saved = SavedCpuInterface {
                a: u64::from(rd32(cpu_interface + 0x4)),
                b: u64::from(rd32(cpu_interface)),
            };
            wr32(
                cpu_interface + 0x4,
                run_pmr(mask, saved.a, priority_bits) as u32,
            );
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

/// The pending host interrupt that just interrupted a call that must finish
/// (see [`RunMask::Transaction`]): disabled at the distributor (or this
/// CPU's redistributor) until [`release`], so the call can go on. It stays
/// pending, so the host takes it once the call is over. Returns `false` if
/// it cannot be held back (an LPI, which has no enable bit, or more
/// distinct interrupts than `held` keeps); the caller must then close the
/// CPU interface for the rest of the call.
pub fn hold_back(access: &GicAccess, held: &mut HeldBack) -> bool {
    let intid = match *access {
        GicAccess::V3 { .. } => {
            let (g1, g0): (u64, u64);
            // SAFETY: reads the highest-priority pending interrupt of each
            // group without acknowledging it.
            unsafe {
                core::arch::asm!(
                    "mrs {a}, icc_hppir1_el1", "mrs {b}, icc_hppir0_el1",
                    a = out(reg) g1, b = out(reg) g0,
                    options(nomem, nostack, preserves_flags),
                );
            }
            let g1 = (g1 & 0xff_ffff) as u32;
            if !(FIRST_SPECIAL_INTID..8192).contains(&g1) {
                g1
            } else {
                (g0 & 0xff_ffff) as u32
            }
        }
        GicAccess::V2 { cpu_interface, .. } => rd32(cpu_interface + 0x18) & 0x3ff,
    };
    if intid == 1023 {
        // Nothing pending any more (the host's device dropped its line):
        // the call simply goes on.
        return true;
    }
    if intid == WATCHDOG_INTID {
        // The host made the core's own timer interrupt pending (the timer
        // itself had not fired, or the caller would not be here): drop the
        // forged pending state, which is not the host's to keep.
        write_bit(access, intid, 0x280);
        return true;
    }
    // An interrupt that comes back once held back cannot be disabled (some
    // GICs keep SGIs always enabled): the caller falls back.
    if intid >= FIRST_SPECIAL_INTID
        || held.intids.contains(&intid)
        || held.intids.push(intid).is_err()
    {
        return false;
    }
    write_bit(access, intid, 0x180);
    true
}

/// Enables again every interrupt [`hold_back`] disabled.
pub fn release(access: &GicAccess, held: &HeldBack) {
    for &intid in &held.intids {
        write_bit(access, intid, 0x100);
    }
}

/// Closes the CPU interface to every interrupt (priority mask 0) for the
/// rest of a call that must finish: the last resort of [`hold_back`]. The
/// watchdog cannot reach the core either until `close_watchdog`.
pub fn mask_all(access: &GicAccess) {
    match *access {
        // SAFETY: the CPU interface's priority mask; the core runs with
        // interrupts masked and `close_watchdog` restores the host's mask.
        GicAccess::V3 { .. } => unsafe {
            core::arch::asm!("msr icc_pmr_el1, xzr", options(nostack, preserves_flags));
        },
        GicAccess::V2 { cpu_interface, .. } => wr32(cpu_interface + 0x4, 0),
    }
}

/// Writes `intid`'s bit in the set-or-clear register bank at `bank`
/// (ISENABLER 0x100, ICENABLER 0x180, ICPENDR 0x280): SGIs and PPIs in this
/// CPU's SGI frame (GICv3) or the banked distributor registers (GICv2), SPIs
/// in the distributor.
fn write_bit(access: &GicAccess, intid: u32, bank: u64) {
    let offset = bank + 4 * u64::from(intid / 32);
    let bit = 1 << (intid % 32);
    match *access {
        GicAccess::V3 { sgi_frame, .. } if intid < 32 => wr32(sgi_frame + offset, bit),
        GicAccess::V3 { distributor, .. } | GicAccess::V2 { distributor, .. } => {
            wr32(distributor + offset, bit)
        }
    }
}

/// Once per CPU, with the GIC's system-register interface open to EL2
/// (`configure_for_host`): learns which priority-mask bits this CPU
/// interface implements, by writing 0xff and reading it back, and puts the
/// mask back as it was.
pub fn probe_priority_bits(access: &mut GicAccess) {
    match access {
        GicAccess::V3 { priority_bits, .. } => {
            let bits: u64;
            // SAFETY: this CPU's priority mask, restored before the host
            // runs; the core runs with interrupts masked meanwhile. The ISB
            // makes the write visible to the read-back (a system-register
            // write is synchronized by a context synchronization event).
            unsafe {
                core::arch::asm!(
                    "mrs {old}, icc_pmr_el1", "msr icc_pmr_el1, {ff}", "isb",
                    "mrs {bits}, icc_pmr_el1", "msr icc_pmr_el1, {old}",
                    old = out(reg) _, bits = out(reg) bits, ff = in(reg) 0xffu64,
                    options(nostack, preserves_flags),
                );
            }
            *priority_bits = bits;
        }
        GicAccess::V2 {
            cpu_interface,
            priority_bits,
            ..
        } => {
            let old = rd32(*cpu_interface + 0x4);
            wr32(*cpu_interface + 0x4, 0xff);
            *priority_bits = u64::from(rd32(*cpu_interface + 0x4));
            wr32(*cpu_interface + 0x4, old);
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
            ..
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
