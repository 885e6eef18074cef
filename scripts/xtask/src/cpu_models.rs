//! The CPU models Moat is tested on under QEMU `virt`.
//!
//! Each model has a different set of the features the core must detect
//! rather than assume (SVE, SME, MTE, pointer authentication, the PA size):
//! `cargo xtask test --cpus all` boots Linux under
//! Moat on every one and runs a protected VM from its userspace; the default
//! run takes [`DEFAULT`], three models that differ the most from `max`, which
//! every other case uses.

use anyhow::{Result, bail};

/// A QEMU CPU model and what it has (as QEMU 10 models it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Model {
    /// QEMU's `-cpu` name.
    pub name: &'static str,
    /// The integration case's name.
    pub case: &'static str,
    /// MTE with tag storage: QEMU's `virt` refuses `mte=on` without it.
    pub mte: bool,
    /// Physical address bits. Below 44, Moat's stage-2 stops at 39 IPA
    /// bits, and the case runs `virt` without its 64-bit PCIe window above
    /// 512 GiB (`highmem-mmio=off`).
    pub pa_bits: u32,
    /// What the book's matrix says the model has, in brief.
    pub features: &'static str,
}

/// Every model the matrix covers, oldest architecture first.
pub const ALL: [Model; 7] = [
    Model {
        name: "cortex-a57",
        pa_bits: 44,
        case: "cpu_model_cortex_a57",
        mte: false,
        features: "Armv8.0, 44-bit PA: FP/AdvSIMD and PMUv3 only",
    },
    Model {
        name: "cortex-a72",
        pa_bits: 44,
        case: "cpu_model_cortex_a72",
        mte: false,
        features: "Armv8.0, 44-bit PA (the Raspberry Pi 4's CPU): as the A57",
    },
    Model {
        name: "cortex-a76",
        pa_bits: 40,
        case: "cpu_model_cortex_a76",
        mte: false,
        features: "Armv8.2, 40-bit PA: no SVE, PAuth or MTE; 39-bit IPA",
    },
    Model {
        name: "neoverse-n1",
        pa_bits: 48,
        case: "cpu_model_neoverse_n1",
        mte: false,
        features: "Armv8.2, 48-bit PA: no SVE, PAuth or MTE",
    },
    Model {
        name: "neoverse-v1",
        pa_bits: 48,
        case: "cpu_model_neoverse_v1",
        mte: false,
        features: "Armv8.4, 48-bit PA: SVE (256-bit), PAuth; no MTE or SME",
    },
    Model {
        name: "a64fx",
        pa_bits: 40,
        case: "cpu_model_a64fx",
        mte: false,
        features: "Armv8.2, 40-bit PA: SVE (512-bit); no PAuth or MTE; 39-bit IPA",
    },
    Model {
        name: "max",
        pa_bits: 52,
        case: "cpu_model_max",
        mte: true,
        features: "52-bit PA: SVE and SME (2048-bit), MTE, PAuth, CSV2_2, MOPS",
    },
];

/// The models a plain `cargo xtask test` runs: the oldest architecture,
/// a VHE-capable core without SVE, and SVE at 512 bits.
pub const DEFAULT: [&str; 3] = ["cortex-a57", "neoverse-n1", "a64fx"];

/// The models `--cpus` names: `all`, `default`, or a comma-separated list.
pub fn select(spec: Option<&str>) -> Result<Vec<Model>> {
    let names: Vec<&str> = match spec.unwrap_or("default") {
        "all" => ALL.iter().map(|m| m.name).collect(),
        "default" => DEFAULT.to_vec(),
        list => list.split(',').map(str::trim).collect(),
    };
    names
        .iter()
        .map(|name| match ALL.iter().find(|m| m.name == *name) {
            Some(m) => Ok(*m),
            None => bail!(
                "--cpus: no CPU model {name:?} in the matrix (all, default, or a list of: {})",
                ALL.map(|m| m.name).join(", ")
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selections() {
        assert_eq!(select(None).unwrap().len(), 3);
        assert_eq!(select(Some("all")).unwrap().len(), ALL.len());
        let two = select(Some("max, cortex-a72")).unwrap();
        assert_eq!(
            two.iter().map(|m| m.name).collect::<Vec<_>>(),
            ["max", "cortex-a72"]
        );
        assert!(select(Some("cortex-a53")).is_err());
        // Only `max` has MTE; every case name is distinct.
        assert_eq!(ALL.iter().filter(|m| m.mte).count(), 1);
        let mut cases: Vec<_> = ALL.iter().map(|m| m.case).collect();
        cases.dedup();
        assert_eq!(cases.len(), ALL.len());
    }
}
