//! Every device the host is handed, accounted for.
//!
//! At boot each device of the device tree is classified
//! (`moat_platform::devices`): no bus mastering, DMA behind the SMMU the
//! core owns, or DMA-capable without an SMMU. The last kind can write any
//! physical address, the core's memory and every VM's among them, so it is
//! withheld from the host (its windows left out of the host's stage-2 and
//! its node disabled in the host's device tree) unless the image names it
//! (`unprotected-dma` in the manifest). The boot log says, device by
//! device, which class it is in and what was done.

use alloc::vec::Vec;
use moat_platform::devices::{self, Device, DmaClass};
use moat_platform::dt::{DtError, Range};
use moat_platform::iommu::SmmuV3;

/// What the host does not get.
#[derive(Default)]
pub struct Withheld {
    /// The withheld devices' windows (as the tree gives them).
    pub windows: Vec<Range>,
    /// Their node names, to disable in the host's tree.
    pub names: Vec<&'static str>,
}

/// Classifies the devices of `dtb`, logs each decision and returns what
/// the host must not be given. `named` is the image's list of
/// DMA-capable devices the host gets anyway.
pub fn decide(dtb: &'static [u8], smmu: Option<&SmmuV3>, named: &str) -> Result<Withheld, DtError> {
    let mut withheld = Withheld::default();
    // Devices of one name and class in a row are logged once.
    let mut run: Option<(Device<'static>, &'static str, usize)> = None;
    let flush = |run: &mut Option<(Device<'static>, &'static str, usize)>| {
        if let Some((d, done, n)) = run.take() {
            let base = d.windows.first().map_or(0, |w| w.base);
            if n > 1 {
                crate::log!(
                    "device {} at {base:#x} and {} more like it: {}: {done}",
                    d.name,
                    n - 1,
                    d.class.describe()
                );
            } else {
                crate::log!(
                    "device {} at {base:#x}: {}: {done}",
                    d.name,
                    d.class.describe()
                );
            }
        }
    };
    devices::classify(dtb, smmu, |d| {
        let done = match d.class {
            DmaClass::Unprotected if d.named_in(named) => {
                "given to the host because the image names it; its DMA is NOT confined"
            }
            DmaClass::Unprotected => {
                withheld.windows.extend(d.windows.iter().copied());
                withheld.names.push(d.name);
                "WITHHELD from the host (the image does not name it)"
            }
            DmaClass::BehindSmmu => "given to the host; its DMA goes through the host's stage-2",
            DmaClass::NoDma => "given to the host",
            // What the host may reach of it is the interrupt controller's
            // business (the ITS and LPI rules), not this table's.
            DmaClass::InterruptController => "left to the interrupt controller's own rules",
        };
        let same = run.as_ref().is_some_and(|(r, rdone, _)| {
            r.class == d.class
                && *rdone == done
                && moat_platform::dt::base_name(r.name) == moat_platform::dt::base_name(d.name)
        });
        if same {
            if let Some((_, _, n)) = run.as_mut() {
                *n += 1;
            }
        } else {
            flush(&mut run);
            run = Some((d, done, 1));
        }
    })?;
    flush(&mut run);
    Ok(withheld)
}
