//! Board quirks: what a board needs beyond its device tree, kept small and
//! in one place.
//!
//! A board whose firmware has no PSCI (the Raspberry Pi 4 parks its
//! secondary CPUs on a spin table and has no secure firmware) leaves the
//! core to power CPUs itself and to end the machine through the SoC. The
//! only SoC so far is the BCM2711: system reset and power-off go through
//! the power-management block's watchdog, the way the Pi's own firmware
//! and Linux's watchdog driver do it. Adding a board with a different
//! reset means a new variant of [`SystemControl`] here and its register
//! sequence; nothing else in the core changes.

use crate::dt::{self, Range};

/// How the core ends the machine when the host asks (PSCI SYSTEM_OFF and
/// SYSTEM_RESET) and the firmware cannot be asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemControl {
    /// No way known: the core stops its CPUs and says so.
    None,
    /// The BCM2835-family power-management watchdog at `pm` (the first
    /// `reg` of the `brcm,bcm2835-pm-wdt` / `brcm,bcm2835-pm` node).
    Bcm2835Watchdog { pm: Range },
}

/// The compatibles of the BCM2835-family power-management block.
pub const BCM2835_PM_COMPATIBLE: [&str; 3] =
    ["brcm,bcm2835-pm-wdt", "brcm,bcm2835-pm", "brcm,bcm2711-pm"];

/// What the tree offers for ending the machine without firmware.
pub fn system_control(dtb: &[u8]) -> SystemControl {
    match dt::first_reg_of(dtb, &BCM2835_PM_COMPATIBLE) {
        Some(pm) if pm.size >= bcm2835_pm::WDOG + 4 => SystemControl::Bcm2835Watchdog { pm },
        _ => SystemControl::None,
    }
}

/// The BCM2835 power-management block's reset registers. Every write
/// carries the password in its top byte or the block ignores it.
pub mod bcm2835_pm {
    /// Reset control: WRCFG (bits 5:4) selects what the watchdog resets.
    pub const RSTC: u64 = 0x1c;
    /// Reset status: the boot partition the firmware reads after a reset,
    /// its six bits spread over the even bit positions 0..10.
    pub const RSTS: u64 = 0x20;
    /// Watchdog countdown, in 16 µs ticks.
    pub const WDOG: u64 = 0x24;
    pub const PASSWORD: u32 = 0x5a00_0000;
    const WRCFG_MASK: u32 = 0x30;
    const WRCFG_FULL_RESET: u32 = 0x20;
    const PARTITION_MASK: u32 = 0x555;
    /// The partition the Pi's firmware (and QEMU's model) reads as "halt,
    /// do not boot again": 63.
    pub const HALT_PARTITION: u8 = 63;
    /// Watchdog ticks before the reset (about 160 µs).
    pub const TICKS: u32 = 10;

    /// `partition`'s six bits at the even bit positions RSTS uses.
    pub const fn partition_bits(partition: u8) -> u32 {
        let mut bits = 0;
        let mut i = 0;
        while i < 6 {
            bits |= (((partition >> i) & 1) as u32) << (2 * i);
            i += 1;
        }
        bits
    }

    /// The register writes, in order, that reset the SoC (`halt`: and tell
    /// the firmware not to boot again, which is power-off on a Pi), given
    /// the current RSTS and RSTC values.
    pub fn reset_writes(halt: bool, rsts: u32, rstc: u32) -> [(u64, u32); 3] {
        let partition = if halt {
            partition_bits(HALT_PARTITION)
        } else {
            0
        };
        let keep = 0x00ff_ffff;
        [
            (RSTS, PASSWORD | (rsts & keep & !PARTITION_MASK) | partition),
            (WDOG, PASSWORD | TICKS),
            (
                RSTC,
                PASSWORD | (rstc & keep & !WRCFG_MASK) | WRCFG_FULL_RESET,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::bcm2835_pm::*;

    #[test]
    fn halt_partition_is_0x555() {
        assert_eq!(partition_bits(HALT_PARTITION), 0x555);
        assert_eq!(partition_bits(0), 0);
        assert_eq!(partition_bits(1), 1);
        assert_eq!(partition_bits(2), 4);
    }

    #[test]
    fn reset_and_halt_sequences() {
        // The values the block holds after its own reset.
        let (rsts, rstc) = (0x1000, 0x102);
        assert_eq!(
            reset_writes(false, rsts, rstc),
            [
                (RSTS, 0x5a00_1000),
                (WDOG, 0x5a00_000a),
                (RSTC, 0x5a00_0122)
            ]
        );
        assert_eq!(reset_writes(true, rsts, rstc)[0], (RSTS, 0x5a00_1555));
        // Stale partition and WRCFG bits, and a read-back top byte, are replaced.
        assert_eq!(
            reset_writes(false, 0xff00_0aaa, 0xff00_0010),
            [
                (RSTS, 0x5a00_0aaa & !0x555 & 0x00ff_ffff | 0x5a00_0000),
                (WDOG, 0x5a00_000a),
                (RSTC, 0x5a00_0020)
            ]
        );
    }
}
