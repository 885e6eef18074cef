//! Image manifests (`images/*.toml`): which host, which services, their
//! memory, budgets, hypercall ranges and trap routing.
//!
//! Everything that can be wrong with a manifest is a build error here, with
//! a message that names the service and the problem; the core checks the
//! routing again at boot (`moat_kernel::routing`, the same code).

use anyhow::{Context, Result, bail};
use moat_abi::trap::TrapClass;
use moat_kernel::routing::{RouteSpec, RoutingError, RoutingTable};
use moat_package::{SERVICE_NAME_LEN, ServiceRecord};
use serde::Deserialize;
use std::path::Path;
use zerocopy::little_endian::{U16, U32};

/// Stack a service needs after its image (the core enforces the same).
pub const MIN_STACK: u64 = 16 << 10;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The host payload: "test-host" (the workspace's test host) or a path
    /// relative to the workspace.
    pub host: String,
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceDecl>,
    /// DMA-capable devices without an SMMU the host is given anyway, by
    /// device-tree node name (`virtio_mmio`, `fw-cfg@9020000`, `pcie`):
    /// without a name here the core withholds such a device, because it
    /// can write any physical address.
    #[serde(default, rename = "unprotected-dma")]
    pub unprotected_dma: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hypercalls {
    pub first: u16,
    pub count: u16,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServiceDecl {
    pub name: String,
    /// The cargo package that builds it.
    #[serde(rename = "crate")]
    pub krate: String,
    /// The binary in that package.
    pub binary: String,
    /// The interface it serves (`moat_abi::services`).
    pub interface: String,
    /// Memory for image, BSS and stack: bytes, or with a K/M suffix.
    pub memory: String,
    pub budget_us: u32,
    pub hypercalls: Option<Hypercalls>,
    #[serde(default)]
    pub observes: Vec<String>,
    #[serde(default)]
    pub handles: Vec<String>,
}

/// What the core knows about each interface it can route to.
struct InterfaceInfo {
    id: u16,
    /// Its operation 1 is `observe(TrapDescriptor)`.
    observes: bool,
    /// Its operation 2 is `decide(TrapDescriptor) -> Verdict`.
    decides: bool,
}

fn interface(name: &str) -> Option<InterfaceInfo> {
    use moat_abi::services::{faulty, ledger, mte, trace};
    match name {
        "ledger" => Some(InterfaceInfo {
            id: ledger::SERVICE_ID,
            observes: false,
            decides: false,
        }),
        "mte" => Some(InterfaceInfo {
            id: mte::SERVICE_ID,
            observes: false,
            decides: true,
        }),
        "trace" => Some(InterfaceInfo {
            id: trace::SERVICE_ID,
            observes: true,
            decides: false,
        }),
        "faulty" => Some(InterfaceInfo {
            id: faulty::SERVICE_ID,
            observes: false,
            decides: false,
        }),
        _ => None,
    }
}

fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mult)
}

fn class_mask(service: &str, what: &str, names: &[String]) -> Result<u32> {
    let mut mask = 0;
    for n in names {
        match TrapClass::from_name(n) {
            Some(c) => mask |= c.bit(),
            None => bail!(
                "service {service}: unknown trap class {n:?} in `{what}` (known: {})",
                TrapClass::ALL
                    .iter()
                    .map(|c| c.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(mask)
}

impl Manifest {
    /// The host payload this manifest names, given the built test host.
    pub fn host_path(&self, test_host: &Path) -> std::path::PathBuf {
        match self.host.as_str() {
            "test-host" => test_host.to_path_buf(),
            other => crate::tools::root().join(other),
        }
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("in {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let m: Manifest = toml::from_str(text)?;
        m.check_static()?;
        Ok(m)
    }

    /// Every check that does not need the built binaries.
    fn check_static(&self) -> Result<()> {
        for name in &self.unprotected_dma {
            if name.is_empty() || name.len() > 64 || name.chars().any(char::is_whitespace) {
                bail!("unprotected-dma: {name:?} is not a device-tree node name");
            }
        }
        if self.services.len() > moat_package::MAX_SERVICES {
            bail!(
                "{} services declared; an image holds at most {}",
                self.services.len(),
                moat_package::MAX_SERVICES
            );
        }
        let mut specs = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            if s.name.is_empty() || s.name.len() >= SERVICE_NAME_LEN {
                bail!(
                    "service {:?}: names are 1 to {} bytes",
                    s.name,
                    SERVICE_NAME_LEN - 1
                );
            }
            if self.services[..i].iter().any(|t| t.name == s.name) {
                bail!("service {}: declared twice", s.name);
            }
            let info = interface(&s.interface).with_context(|| {
                format!("service {}: unknown interface {:?}", s.name, s.interface)
            })?;
            let memory = parse_size(&s.memory).with_context(|| {
                format!("service {}: memory {:?} is not a size", s.name, s.memory)
            })?;
            if memory % 4096 != 0 || memory > u64::from(u32::MAX) {
                bail!(
                    "service {}: memory must be a whole number of 4 KiB pages below 4 GiB",
                    s.name
                );
            }
            if s.budget_us == 0 {
                bail!("service {}: budget-us must be positive", s.name);
            }
            let observes = class_mask(&s.name, "observes", &s.observes)?;
            let handles = class_mask(&s.name, "handles", &s.handles)?;
            if observes != 0 && !info.observes {
                bail!(
                    "service {}: interface {} cannot observe traps",
                    s.name,
                    s.interface
                );
            }
            if handles != 0 && !info.decides {
                bail!(
                    "service {}: interface {} cannot decide traps",
                    s.name,
                    s.interface
                );
            }
            // The core asks a handler about system-register traps only.
            if handles & !TrapClass::SysReg.bit() != 0 {
                bail!(
                    "service {}: only `sysreg` traps can be handled by a service",
                    s.name
                );
            }
            // The MTE policy hides MTE by trapping the ID registers: without
            // the handler for those traps the host could not boot.
            if s.interface == "mte" && handles != TrapClass::SysReg.bit() {
                bail!(
                    "service {}: an `mte` policy must declare handles = [\"sysreg\"]",
                    s.name
                );
            }
            let (first, count) = s.hypercalls.as_ref().map_or((0, 0), |h| (h.first, h.count));
            specs.push(RouteSpec {
                first,
                count,
                observes,
                handles,
            });
        }
        RoutingTable::build(&specs).map_err(|e| {
            let name = |i: usize| self.services.get(i).map_or("?", |s| s.name.as_str());
            match e {
                RoutingError::Overlap { first, second } => {
                    anyhow::anyhow!(
                        "services {} and {} have overlapping hypercall ranges",
                        name(first),
                        name(second)
                    )
                }
                RoutingError::OutOfRange { service } => anyhow::anyhow!(
                    "service {}: hypercall range must lie within {:#x}..{:#x}",
                    name(service),
                    moat_abi::hypercall::SERVICE_RANGE_START,
                    moat_abi::hypercall::SERVICE_RANGE_END
                ),
                RoutingError::TwoHandlers {
                    class,
                    first,
                    second,
                } => anyhow::anyhow!(
                    "services {} and {} both handle {} traps",
                    name(first),
                    name(second),
                    class.name()
                ),
                other => anyhow::anyhow!("{other}"),
            }
        })?;
        Ok(())
    }

    /// The service record for service `i`, checked against its built
    /// image's footprint (read from the image's service header).
    pub fn record(&self, i: usize, image: &[u8], image_index: u32) -> Result<ServiceRecord> {
        let s = &self.services[i];
        let info = interface(&s.interface).context("checked above")?;
        let memory = parse_size(&s.memory).context("checked above")?;
        if image.get(8..16) != Some(b"MOATSVC1".as_slice()) {
            bail!(
                "service {}: binary {} has no service header (is it built with moat-rt?)",
                s.name,
                s.binary
            );
        }
        let footprint = u64::from_le_bytes(image[24..32].try_into()?);
        // The footprint is read from the built image: checked, so that a
        // corrupt header is an error here rather than a wrapped sum.
        if footprint
            .checked_add(MIN_STACK)
            .is_none_or(|need| need > memory)
        {
            bail!(
                "service {}: over budget: its image needs {footprint} bytes plus {MIN_STACK} bytes of stack, \
                 but its memory is {memory} bytes ({})",
                s.name,
                s.memory
            );
        }
        let mut name = [0u8; SERVICE_NAME_LEN];
        name[..s.name.len()].copy_from_slice(s.name.as_bytes());
        let (first, count) = s.hypercalls.as_ref().map_or((0, 0), |h| (h.first, h.count));
        Ok(ServiceRecord {
            name,
            interface_id: U16::new(info.id),
            hypercall_first: U16::new(first),
            hypercall_count: U16::new(count),
            reserved: U16::new(0),
            memory_bytes: U32::new(memory as u32),
            budget_us: U32::new(s.budget_us),
            observes: U32::new(class_mask(&s.name, "observes", &s.observes)?),
            handles: U32::new(class_mask(&s.name, "handles", &s.handles)?),
            image_index: U32::new(image_index),
            reserved2: U32::new(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
host = "test-host"
[[service]]
name = "trace"
crate = "moat-service-trace"
binary = "trace"
interface = "trace"
memory = "64K"
budget-us = 1000
hypercalls = { first = 0x1000, count = 4 }
observes = ["smc"]
"#;

    fn err(text: &str) -> String {
        format!("{:#}", Manifest::parse(text).unwrap_err())
    }

    #[test]
    fn the_demo_manifest_is_valid() {
        let m = Manifest::load(&crate::tools::root().join("images/demo.toml")).unwrap();
        assert_eq!(m.services.len(), 8);
        assert_eq!(m.host, "test-host");
    }

    #[test]
    fn good_manifest() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.services[0].name, "trace");
    }

    #[test]
    fn overlapping_ranges() {
        let text = format!(
            "{GOOD}\n{}",
            GOOD.replace("host = \"test-host\"", "")
                .replace("\"trace\"\ncrate", "\"trace2\"\ncrate")
                .replace("0x1000", "0x1003")
        );
        assert!(
            err(&text).contains("services trace and trace2 have overlapping hypercall ranges"),
            "{}",
            err(&text)
        );
    }

    #[test]
    fn unprotected_dma_names_devices() {
        let named = GOOD.replace(
            "host = \"test-host\"",
            "host = \"test-host\"\nunprotected-dma = [\"pcie\", \"virtio_mmio@a000000\"]",
        );
        let m = Manifest::parse(&named).unwrap();
        assert_eq!(m.unprotected_dma, ["pcie", "virtio_mmio@a000000"]);
        assert!(Manifest::parse(GOOD).unwrap().unprotected_dma.is_empty());
        let bad = GOOD.replace(
            "host = \"test-host\"",
            "host = \"test-host\"\nunprotected-dma = [\"two words\"]",
        );
        assert!(
            err(&bad).contains("is not a device-tree node name"),
            "{}",
            err(&bad)
        );
    }

    #[test]
    fn unknown_things() {
        assert!(
            err(&GOOD.replace("interface = \"trace\"", "interface = \"nope\""))
                .contains("unknown interface \"nope\"")
        );
        assert!(
            err(&GOOD.replace("[\"smc\"]", "[\"irq\"]")).contains("unknown trap class \"irq\"")
        );
        assert!(err(&GOOD.replace("budget-us", "budget-ms")).contains("unknown field"));
        assert!(err(&GOOD.replace("\"64K\"", "\"lots\"")).contains("is not a size"));
        assert!(err(&GOOD.replace("0x1000", "0x10")).contains("hypercall range must lie within"));
    }

    #[test]
    fn the_mte_policy_must_handle_sysreg_traps() {
        let mte = GOOD
            .replace("interface = \"trace\"", "interface = \"mte\"")
            .replace("observes = [\"smc\"]", "");
        assert!(err(&mte).contains("must declare handles"), "{}", err(&mte));
        let wrong = mte.replace("budget-us = 1000", "budget-us = 1000\nhandles = [\"smc\"]");
        assert!(
            err(&wrong).contains("only `sysreg` traps"),
            "{}",
            err(&wrong)
        );
        let right = mte.replace(
            "budget-us = 1000",
            "budget-us = 1000\nhandles = [\"sysreg\"]",
        );
        assert!(Manifest::parse(&right).is_ok());
    }

    #[test]
    fn interfaces_that_cannot_observe() {
        let text = GOOD.replace("interface = \"trace\"", "interface = \"faulty\"");
        assert!(err(&text).contains("cannot observe traps"));
    }

    #[test]
    fn budget_overrun_is_a_build_error() {
        let m = Manifest::parse(&GOOD.replace("\"64K\"", "\"20K\"")).unwrap();
        let mut image = vec![0u8; 64];
        image[8..16].copy_from_slice(b"MOATSVC1");
        image[24..32].copy_from_slice(&(8192u64).to_le_bytes());
        let e = format!("{:#}", m.record(0, &image, 0).unwrap_err());
        assert!(e.contains("over budget"), "{e}");
        let m = Manifest::parse(GOOD).unwrap();
        let r = m.record(0, &image, 3).unwrap();
        assert_eq!(r.name(), "trace");
        assert_eq!(r.image_index.get(), 3);
        assert_eq!(r.memory_bytes.get(), 65536);
        assert_eq!(r.observes.get(), TrapClass::Smc.bit());
        image[8] = b'X';
        assert!(format!("{:#}", m.record(0, &image, 0).unwrap_err()).contains("no service header"));
    }

    #[test]
    fn a_footprint_near_the_top_of_u64_is_over_budget() {
        let m = Manifest::parse(GOOD).unwrap();
        let mut image = vec![0u8; 64];
        image[8..16].copy_from_slice(b"MOATSVC1");
        image[24..32].copy_from_slice(&(u64::MAX - 4095).to_le_bytes());
        let e = format!("{:#}", m.record(0, &image, 0).unwrap_err());
        assert!(e.contains("over budget"), "{e}");
    }
}
