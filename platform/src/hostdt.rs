//! Rewriting the device tree the host boots with.
//!
//! The host must not learn about memory it may not use, and its PSCI calls must
//! reach the core. The rewrite re-emits every node and property of the
//! firmware's tree, applying [`HostDtEdits`].

use crate::dt::{self, Conduit, DtError, Level, Node, Range, Tree};
use alloc::format;
use alloc::vec::Vec;
use core::fmt;
use vm_fdt::{FdtReserveEntry, FdtWriter};

/// What the core changes in the host's device tree.
#[derive(Clone, Debug, Default)]
pub struct HostDtEdits<'a> {
    /// Regions the host must never map: each becomes a `no-map` child of
    /// `/reserved-memory` named `moat@<base>` (base in lower-case hex). If the
    /// tree has no `/reserved-memory`, one is created with empty `ranges` and
    /// the root's `#address-cells`/`#size-cells` (2/2 on the usual arm64
    /// trees): Linux ignores a `/reserved-memory` whose cell sizes differ from
    /// the root's; an existing one without `ranges` gets an empty one. A
    /// region too large for one size cell is split across several `reg`
    /// entries.
    pub reserve_no_map: &'a [Range],
    /// Replaces `/chosen/bootargs` (created if absent) when `Some`.
    pub bootargs: Option<&'a str>,
    /// Sets `/chosen/linux,initrd-start` and `linux,initrd-end` (as 64-bit
    /// cells) when `Some`; removes both when `None`.
    pub initrd: Option<Range>,
    /// Sets the `method` of every PSCI node (`arm,psci`, `arm,psci-0.2`,
    /// `arm,psci-1.0`) when `Some`. A tree without a PSCI node is left
    /// without one.
    pub psci_conduit: Option<Conduit>,
    /// Every CPU node under `/cpus` gets `enable-method = "psci"` and loses
    /// its `cpu-release-addr`, and a root `psci` node (`arm,psci-1.0`, with
    /// [`Self::psci_conduit`]'s method) is added if the tree has none (an
    /// existing one loses any `status`, so a disabled node is enabled): the
    /// core starts and stops the CPUs, the host only ever asks it. For boards
    /// whose firmware parks the secondaries on a spin table.
    pub cpus_via_psci: bool,
    /// The core owns the SMMUv3 (its frames are not in the host's stage-2):
    /// every `arm,smmu-v3` node is marked `status = "disabled"` and the
    /// `iommu-map`, `iommu-map-mask` and `iommus` properties that would send
    /// the host's drivers to it are dropped, so the host's devices work
    /// without an IOMMU driver (their DMA goes through the SMMU's stage-2,
    /// which is the host's own).
    pub hide_smmu_v3: bool,
    /// Nodes (by name with unit address) the host is not given: each gets
    /// `status = "disabled"`, so that the host's drivers leave alone the
    /// MMIO its stage-2 does not map.
    pub disable_nodes: &'a [&'a str],
}

/// Why a rewrite failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewriteError {
    /// The input is not a valid device tree, or its `/reserved-memory` cannot
    /// take more regions (its `ranges` translates addresses, or its cell sizes
    /// differ from the root's).
    Input(crate::dt::DtError),
    /// The writer refused the output: a node or property name it does not
    /// accept (vm-fdt wants node names to start with a letter, so overlay
    /// metadata such as `__symbols__` is refused), a string holding a NUL,
    /// a value or tree too large, or overlapping `/memreserve/` entries.
    Output,
    /// A region to reserve or the initrd is empty or overflows, a region
    /// overlaps another, or a region does not fit the cells of
    /// `/reserved-memory`.
    BadRange(Range),
}

impl fmt::Display for RewriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RewriteError::Input(error) => {
                write!(f, "cannot rewrite the host's device tree: {error}")
            }
            RewriteError::Output => write!(
                f,
                "the device tree writer refused the host's tree (a name it does not accept, or a value too large)"
            ),
            RewriteError::BadRange(range) => write!(
                f,
                "cannot write the {:#x}-byte range at {:#x} into the host's device tree: it is empty, overflows, overlaps another reserved region or does not fit /reserved-memory's cells",
                range.size, range.base
            ),
        }
    }
}

/// Re-emits `dtb` with `edits` applied.
///
/// The input is checked the way [`dt::discover`] checks it. Nodes, properties
/// and `/memreserve/` entries keep their order; added properties follow a
/// node's existing ones and added nodes follow its existing children.
pub fn rewrite_for_host(dtb: &[u8], edits: &HostDtEdits<'_>) -> Result<Vec<u8>, RewriteError> {
    let tree = Tree::open(dtb).map_err(RewriteError::Input)?;
    check_edits(edits)?;

    let mut reservations = Vec::new();
    for (base, size) in tree.reservations() {
        if size == 0 {
            continue;
        }
        reservations.push(FdtReserveEntry::new(base, size).map_err(output)?);
    }
    let mut writer = FdtWriter::new_with_mem_reserv(&reservations).map_err(output)?;
    writer.set_boot_cpuid_phys(tree.boot_cpuid_phys());

    let root = tree.root().map_err(RewriteError::Input)?;
    let mut rewriter = Rewriter {
        edits,
        root: Level::of(root).map_err(RewriteError::Input)?,
        chosen_seen: false,
        reserved_memory_seen: false,
        psci_seen: false,
    };
    rewriter.node(&mut writer, root, 0, false)?;
    writer.finish().map_err(output)
}

fn output(_: vm_fdt::Error) -> RewriteError {
    RewriteError::Output
}

fn check_edits(edits: &HostDtEdits<'_>) -> Result<(), RewriteError> {
    for (index, region) in edits.reserve_no_map.iter().enumerate() {
        if Range::new(region.base, region.size).is_none()
            || edits.reserve_no_map.iter().take(index).any(|other| {
                region.base < other.base.saturating_add(other.size)
                    && other.base < region.base.saturating_add(region.size)
            })
        {
            return Err(RewriteError::BadRange(*region));
        }
    }
    if let Some(initrd) = edits.initrd
        && Range::new(initrd.base, initrd.size).is_none()
    {
        return Err(RewriteError::BadRange(initrd));
    }
    Ok(())
}

/// What a node gets rewritten as.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Copied,
    Chosen,
    ReservedMemory,
    Psci,
    /// A CPU node, when the host is to start CPUs through PSCI.
    Cpu,
}

struct Rewriter<'e, 'a> {
    edits: &'e HostDtEdits<'e>,
    root: Level<'a>,
    chosen_seen: bool,
    reserved_memory_seen: bool,
    psci_seen: bool,
}

impl Rewriter<'_, '_> {
    fn node(
        &mut self,
        writer: &mut FdtWriter,
        node: Node<'_>,
        depth: usize,
        in_cpus: bool,
    ) -> Result<(), RewriteError> {
        let handle = writer
            .begin_node(if depth == 0 { "" } else { node.name })
            .map_err(output)?;
        let name = dt::base_name(node.name);
        let role = if depth == 1 && name == "chosen" && !self.chosen_seen {
            self.chosen_seen = true;
            Role::Chosen
        } else if depth == 1 && name == "reserved-memory" && !self.reserved_memory_seen {
            self.reserved_memory_seen = true;
            Role::ReservedMemory
        } else if node.is_compatible(&dt::PSCI_COMPATIBLE) {
            self.psci_seen = true;
            Role::Psci
        } else if in_cpus && self.edits.cpus_via_psci && node.string("device_type") == Some("cpu") {
            Role::Cpu
        } else {
            Role::Copied
        };

        match role {
            Role::Copied if self.edits.hide_smmu_v3 || !self.edits.disable_nodes.is_empty() => {
                let hide = self.edits.hide_smmu_v3;
                let disable = (hide && node.is_compatible(&crate::iommu::SMMU_V3_COMPATIBLE))
                    || (depth > 0 && self.edits.disable_nodes.contains(&node.name));
                for (name, value) in node.properties() {
                    match name {
                        "iommu-map" | "iommu-map-mask" | "iommus" if hide => {}
                        "status" if disable => {}
                        _ => writer.property(name, value).map_err(output)?,
                    }
                }
                if disable {
                    writer
                        .property_string("status", "disabled")
                        .map_err(output)?;
                }
            }
            Role::Copied => copy_properties(writer, node)?,
            Role::Chosen => self.chosen_properties(writer, Some(node))?,
            Role::Psci => self.psci_properties(writer, node)?,
            Role::Cpu => {
                for (name, value) in node.properties() {
                    match name {
                        "enable-method" | "cpu-release-addr" => {}
                        _ => writer.property(name, value).map_err(output)?,
                    }
                }
                writer
                    .property_string("enable-method", "psci")
                    .map_err(output)?;
            }
            Role::ReservedMemory => {
                copy_properties(writer, node)?;
                if !self.edits.reserve_no_map.is_empty() {
                    let level = Level::of(node).map_err(RewriteError::Input)?;
                    self.check_reserved_memory(&level)?;
                    if level.ranges.is_none() {
                        writer.property_null("ranges").map_err(output)?;
                    }
                }
            }
        }
        let children_in_cpus = depth == 1 && name == "cpus";
        for child in node.children() {
            self.node(writer, child, depth + 1, children_in_cpus)?;
        }
        if role == Role::ReservedMemory {
            let level = Level::of(node).map_err(RewriteError::Input)?;
            self.regions(writer, &level)?;
        }
        if depth == 0 {
            if let (true, false, Some(conduit)) = (
                self.edits.cpus_via_psci,
                self.psci_seen,
                self.edits.psci_conduit,
            ) {
                let psci = writer.begin_node("psci").map_err(output)?;
                writer
                    .property_string_list(
                        "compatible",
                        alloc::vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
                    )
                    .map_err(output)?;
                writer
                    .property_string("method", conduit_method(conduit))
                    .map_err(output)?;
                writer.end_node(psci).map_err(output)?;
            }
            if !self.chosen_seen {
                let chosen = writer.begin_node("chosen").map_err(output)?;
                self.chosen_properties(writer, None)?;
                writer.end_node(chosen).map_err(output)?;
            }
            if !self.reserved_memory_seen && !self.edits.reserve_no_map.is_empty() {
                let reserved = writer.begin_node("reserved-memory").map_err(output)?;
                writer
                    .property_u32("#address-cells", self.root.address_cells)
                    .map_err(output)?;
                writer
                    .property_u32("#size-cells", self.root.size_cells)
                    .map_err(output)?;
                writer.property_null("ranges").map_err(output)?;
                let root = self.root;
                self.regions(writer, &root)?;
                writer.end_node(reserved).map_err(output)?;
            }
        }
        writer.end_node(handle).map_err(output)
    }

    /// `/chosen`'s properties (`node` is `None` when the tree has no `/chosen`).
    fn chosen_properties(
        &self,
        writer: &mut FdtWriter,
        node: Option<Node<'_>>,
    ) -> Result<(), RewriteError> {
        let mut bootargs_written = false;
        let mut start_written = false;
        let mut end_written = false;
        for (name, value) in node.into_iter().flat_map(|node| node.properties()) {
            match name {
                "bootargs" if self.edits.bootargs.is_some() => {
                    if let Some(bootargs) = self.edits.bootargs
                        && !bootargs_written
                    {
                        writer
                            .property_string("bootargs", bootargs)
                            .map_err(output)?;
                        bootargs_written = true;
                    }
                }
                "linux,initrd-start" => {
                    if let Some(initrd) = self.edits.initrd
                        && !start_written
                    {
                        writer.property_u64(name, initrd.base).map_err(output)?;
                        start_written = true;
                    }
                }
                "linux,initrd-end" => {
                    if let Some(initrd) = self.edits.initrd
                        && !end_written
                    {
                        writer.property_u64(name, initrd.end()).map_err(output)?;
                        end_written = true;
                    }
                }
                _ => writer.property(name, value).map_err(output)?,
            }
        }
        if let Some(bootargs) = self.edits.bootargs
            && !bootargs_written
        {
            writer
                .property_string("bootargs", bootargs)
                .map_err(output)?;
        }
        if let Some(initrd) = self.edits.initrd {
            if !start_written {
                writer
                    .property_u64("linux,initrd-start", initrd.base)
                    .map_err(output)?;
            }
            if !end_written {
                writer
                    .property_u64("linux,initrd-end", initrd.end())
                    .map_err(output)?;
            }
        }
        Ok(())
    }

    fn psci_properties(&self, writer: &mut FdtWriter, node: Node<'_>) -> Result<(), RewriteError> {
        let Some(conduit) = self.edits.psci_conduit else {
            return copy_properties(writer, node);
        };
        let method = conduit_method(conduit);
        let mut method_written = false;
        for (name, value) in node.properties() {
            match name {
                "method" if !method_written => {
                    writer.property_string("method", method).map_err(output)?;
                    method_written = true;
                }
                "method" => {}
                // The host's CPUs now start through this node: it stays
                // only if it is available, or Linux finds no PSCI and
                // brings up no secondary. The core answers the calls, so
                // the firmware's reason for disabling it does not apply.
                "status" if self.edits.cpus_via_psci => {}
                _ => writer.property(name, value).map_err(output)?,
            }
        }
        if !method_written {
            writer.property_string("method", method).map_err(output)?;
        }
        Ok(())
    }

    /// An existing `/reserved-memory` must map its children's addresses one to
    /// one and use the root's cell sizes, or the regions added to it would be
    /// misread or ignored.
    fn check_reserved_memory(&self, level: &Level<'_>) -> Result<(), RewriteError> {
        if level.ranges.is_some_and(|ranges| !ranges.is_empty()) {
            return Err(RewriteError::Input(DtError::Malformed(
                "/reserved-memory has a ranges that translates addresses",
            )));
        }
        if level.address_cells != self.root.address_cells
            || level.size_cells != self.root.size_cells
        {
            return Err(RewriteError::Input(DtError::Malformed(
                "/reserved-memory's cell sizes differ from the root's",
            )));
        }
        Ok(())
    }

    /// One `moat@<base>` child per region, in `level`'s cell sizes.
    fn regions(&self, writer: &mut FdtWriter, level: &Level<'_>) -> Result<(), RewriteError> {
        for &region in self.edits.reserve_no_map {
            let reg = encode_reg(region, level.address_cells, level.size_cells)
                .ok_or(RewriteError::BadRange(region))?;
            let child = writer
                .begin_node(&format!("moat@{:x}", region.base))
                .map_err(output)?;
            writer.property("reg", &reg).map_err(output)?;
            writer.property_null("no-map").map_err(output)?;
            writer.end_node(child).map_err(output)?;
        }
        Ok(())
    }
}

fn conduit_method(conduit: Conduit) -> &'static str {
    match conduit {
        Conduit::Smc => "smc",
        Conduit::Hvc => "hvc",
    }
}

fn copy_properties(writer: &mut FdtWriter, node: Node<'_>) -> Result<(), RewriteError> {
    for (name, value) in node.properties() {
        writer.property(name, value).map_err(output)?;
    }
    Ok(())
}

/// `region` as `reg` entries of `address_cells`/`size_cells` cells, split
/// into pieces small enough for one size cell if need be.
fn encode_reg(region: Range, address_cells: u32, size_cells: u32) -> Option<Vec<u8>> {
    let largest = match size_cells {
        1 => 0xffff_f000,
        2 => u64::MAX,
        _ => return None,
    };
    let mut reg = Vec::new();
    let mut base = region.base;
    let mut left = region.size;
    while left > 0 {
        let size = left.min(largest);
        push_cells(&mut reg, base, address_cells)?;
        push_cells(&mut reg, size, size_cells)?;
        base = base.checked_add(size)?;
        left -= size;
    }
    Some(reg)
}

fn push_cells(out: &mut Vec<u8>, value: u64, cells: u32) -> Option<()> {
    match cells {
        1 => out.extend_from_slice(&u32::try_from(value).ok()?.to_be_bytes()),
        2 => out.extend_from_slice(&value.to_be_bytes()),
        _ => return None,
    }
    Some(())
}
