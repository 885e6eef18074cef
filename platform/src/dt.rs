//! Device-tree discovery: one pass over the flattened device tree the firmware
//! handed to the core, producing a [`Platform`] description.
//!
//! Discovery never allocates (it runs before the hypervisor's heap exists) and
//! never panics on malformed input: every problem is a [`DtError`] whose
//! `Display` names what is wrong, so the core can print it and stop.

use core::fmt;

use heapless::Vec;

/// Most RAM banks the core tracks.
pub const MAX_MEMORY_RANGES: usize = 16;
/// Most reserved regions (`/memreserve/` entries plus `/reserved-memory` children).
pub const MAX_RESERVED_RANGES: usize = 32;
/// Most CPUs the core brings up.
pub const MAX_CPUS: usize = 16;
/// Most GICv3 redistributor regions.
pub const MAX_REDIST_REGIONS: usize = 4;
/// Most device windows (merged `reg` and bus `ranges` windows outside RAM).
pub const MAX_DEVICE_WINDOWS: usize = 96;
/// Deepest node nesting accepted, counting the root as depth 1. Real trees
/// stay well under this; the limit bounds the fixed-size stacks discovery
/// walks the tree with.
pub const MAX_NODE_DEPTH: usize = 16;

/// A physical address range `[base, base + size)`. `size` is never zero in a
/// discovered description and `base + size` never overflows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Range {
    pub base: u64,
    pub size: u64,
}

impl Range {
    /// Builds a range, refusing empty or overflowing ones.
    pub const fn new(base: u64, size: u64) -> Option<Self> {
        if size == 0 || base.checked_add(size).is_none() {
            None
        } else {
            Some(Self { base, size })
        }
    }

    /// One past the last byte.
    pub const fn end(&self) -> u64 {
        self.base + self.size
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &Range) -> bool {
        self.base < other.end() && other.base < self.end()
    }

    /// Whether `other` lies entirely inside `self`.
    pub const fn contains_range(&self, other: &Range) -> bool {
        other.base >= self.base && other.end() <= self.end()
    }
}

/// How a CPU is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EnableMethod {
    /// Through PSCI CPU_ON.
    Psci,
    /// Through a spin table: the CPU polls `release_addr`.
    SpinTable { release_addr: u64 },
    /// The boot CPU on a tree without an `enable-method`, or an unknown method.
    None,
}

/// One CPU node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cpu {
    /// The affinity fields of MPIDR_EL1 as the `reg` property gives them.
    pub mpidr: u64,
    pub enable_method: EnableMethod,
}

/// Which UART model the console is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UartKind {
    /// `arm,pl011`.
    Pl011,
}

/// The console UART.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Uart {
    pub kind: UartKind,
    /// Its MMIO registers (CPU physical address, after `ranges` translation).
    pub regs: Range,
}

/// The interrupt controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Gic {
    /// GICv2 (`arm,cortex-a15-gic`, `arm,gic-400`, ...).
    V2 {
        distributor: Range,
        cpu_interface: Range,
        /// The virtual interface control registers (GICH), if listed.
        hyp_interface: Option<Range>,
        /// The virtual CPU interface (GICV), if listed.
        virtual_cpu_interface: Option<Range>,
    },
    /// GICv3 (`arm,gic-v3`).
    V3 {
        distributor: Range,
        redistributors: heapless::Vec<Range, MAX_REDIST_REGIONS>,
    },
}

impl Gic {
    /// 2 or 3.
    pub fn version(&self) -> u8 {
        match self {
            Gic::V2 { .. } => 2,
            Gic::V3 { .. } => 3,
        }
    }
}

/// How PSCI calls reach the firmware.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    Smc,
    Hvc,
}

/// The `/psci` node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Psci {
    pub conduit: Conduit,
}

/// What `/chosen` says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Chosen<'a> {
    pub bootargs: Option<&'a str>,
    pub stdout_path: Option<&'a str>,
    /// `linux,initrd-start` .. `linux,initrd-end`.
    pub initrd: Option<Range>,
}

/// Everything the core needs to know about the machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform<'a> {
    /// `/model`, or empty.
    pub model: &'a str,
    /// The first string of the root `compatible`, or empty.
    pub compatible: &'a str,
    /// RAM banks from every `device_type = "memory"` node: sorted by base,
    /// adjacent and overlapping banks merged, empty banks dropped.
    pub memory: heapless::Vec<Range, MAX_MEMORY_RANGES>,
    /// `/memreserve/` entries and `/reserved-memory` children with a `reg`.
    pub reserved: heapless::Vec<Range, MAX_RESERVED_RANGES>,
    /// CPU nodes under `/cpus`, in tree order.
    pub cpus: heapless::Vec<Cpu, MAX_CPUS>,
    /// The console: `/chosen/stdout-path` if it names a supported UART,
    /// otherwise the first enabled `arm,pl011`.
    pub uart: Uart,
    pub gic: Gic,
    pub psci: Option<Psci>,
    pub chosen: Chosen<'a>,
    /// Every device window the tree describes, as CPU physical addresses:
    /// the `reg` of every node and the parent side of every bus node's
    /// `ranges` (a PCIe host bridge's memory and I/O windows, where the
    /// BARs the host assigns will lie), leaving out CPUs, memory nodes,
    /// reservations and anything inside RAM. Sorted; windows that overlap
    /// or touch are merged. The host's stage-2 maps these as device memory.
    pub devices: Vec<Range, MAX_DEVICE_WINDOWS>,
}

impl Platform<'_> {
    /// One past the highest device address the tree describes (0 if none).
    pub fn devices_top(&self) -> u64 {
        self.devices.last().map_or(0, Range::end)
    }
}

/// Why discovery failed. `Display` gives a sentence naming the problem.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtError {
    /// The buffer is shorter than the FDT header or than the header's `totalsize`.
    Truncated { available: usize, needed: usize },
    /// The first word is not 0xd00dfeed.
    BadMagic(u32),
    /// The header or the structure block is malformed (bad offsets, version,
    /// unknown tokens, unbalanced nodes, nesting deeper than [`MAX_NODE_DEPTH`], ...).
    Malformed(&'static str),
    /// No memory node, or only empty ones.
    NoMemory,
    /// More RAM banks / reserved ranges / CPUs than the fixed tables hold.
    TooMany(&'static str),
    /// No PL011 UART (neither stdout-path nor any `arm,pl011` node).
    NoUart,
    /// No supported interrupt controller.
    NoGic,
    /// The GIC node has fewer `reg` entries than its version needs.
    BadGic,
    /// No `/cpus` children.
    NoCpus,
    /// A `reg` property is malformed (odd length, zero size where a size is needed, overflow).
    BadReg(&'static str),
    /// A property discovery depends on is missing or malformed: a spin-table
    /// CPU without a usable `cpu-release-addr`, a PSCI node whose `method` is
    /// neither `smc` nor `hvc`.
    BadProperty(&'static str),
}

impl fmt::Display for DtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DtError::Truncated { available, needed } => write!(
                f,
                "device tree is truncated: {available} bytes available, {needed} needed"
            ),
            DtError::BadMagic(m) => {
                write!(f, "no device tree: magic is {m:#010x}, expected 0xd00dfeed")
            }
            DtError::Malformed(what) => write!(f, "device tree is malformed: {what}"),
            DtError::NoMemory => write!(f, "device tree has no memory node with a non-empty reg"),
            DtError::TooMany(what) => write!(f, "device tree lists more {what} than Moat supports"),
            DtError::NoUart => write!(
                f,
                "device tree has no PL011 UART (no usable stdout-path and no arm,pl011 node)"
            ),
            DtError::NoGic => write!(f, "device tree has no GICv2 or GICv3 interrupt controller"),
            DtError::BadGic => write!(f, "the GIC node's reg lists fewer regions than it needs"),
            DtError::NoCpus => write!(f, "device tree has no CPU nodes under /cpus"),
            DtError::BadReg(node) => write!(f, "malformed reg property in {node}"),
            DtError::BadProperty(what) => {
                write!(f, "device tree has a missing or malformed property: {what}")
            }
        }
    }
}

/// Reads the device tree in `dtb` and describes the platform.
///
/// `dtb` may be longer than the tree (the header's `totalsize` decides); it
/// must not be shorter.
///
/// The header and every token of the structure block are checked before
/// anything is read, so no input makes discovery panic. Besides broken trees,
/// this refuses trees nested deeper than [`MAX_NODE_DEPTH`]. NOP tokens are
/// accepted anywhere (QEMU and libfdt-based firmware leave them where they
/// removed nodes or properties).
pub fn discover(dtb: &[u8]) -> Result<Platform<'_>, DtError> {
    let tree = Tree::open(dtb)?;
    let root = tree.root()?;

    let mut chosen_node = None;
    let mut aliases = None;
    for child in root.children() {
        match base_name(child.name) {
            "chosen" if chosen_node.is_none() => chosen_node = Some(child),
            "aliases" if aliases.is_none() => aliases = Some(child),
            _ => {}
        }
    }
    let chosen = chosen_node.map(read_chosen).unwrap_or_default();

    let mut survey = Survey {
        stdout_target: stdout_target(chosen.stdout_path, aliases),
        memory: Vec::new(),
        reserved: Vec::new(),
        cpus: Vec::new(),
        gic: None,
        psci: None,
        first_uart: None,
        stdout_uart: None,
    };
    for (base, size) in tree.reservations() {
        if size == 0 {
            continue;
        }
        let range = Range::new(base, size).ok_or(DtError::BadReg("a /memreserve/ entry"))?;
        survey
            .reserved
            .push(range)
            .map_err(|_| DtError::TooMany("reserved memory ranges"))?;
    }
    tree.walk(|ancestors, node| survey.visit(ancestors, node))?;

    let Survey {
        memory,
        reserved,
        cpus,
        gic,
        psci,
        first_uart,
        stdout_uart,
        ..
    } = survey;
    if memory.is_empty() {
        return Err(DtError::NoMemory);
    }
    if cpus.is_empty() {
        return Err(DtError::NoCpus);
    }
    let uart = stdout_uart
        .flatten()
        .or(first_uart)
        .ok_or(DtError::NoUart)?;
    // The core maps the console's window as device memory at EL2: a window
    // reaching into RAM would alias the core's own memory with it.
    if memory.iter().any(|bank| bank.overlaps(&uart.regs)) {
        return Err(DtError::BadReg(
            "the console UART (its window overlaps RAM)",
        ));
    }
    let gic = gic.ok_or(DtError::NoGic)?;
    let devices = device_windows(&tree, &memory)?;

    Ok(Platform {
        model: root.string("model").unwrap_or(""),
        compatible: root.string("compatible").unwrap_or(""),
        memory,
        reserved,
        cpus,
        uart,
        gic,
        psci,
        chosen,
        devices,
    })
}

/// The console alone, read before anything else so that a board's very
/// first line goes to the UART its tree names: `/chosen/stdout-path` if it
/// names an enabled PL011, otherwise the first enabled PL011 (a Raspberry
/// Pi 4's tree points stdout-path at its mini UART, which is not a PL011).
/// The same choice [`discover`] makes; `None` if the tree cannot be read or
/// has no usable PL011.
pub fn console_uart(dtb: &[u8]) -> Option<Uart> {
    let tree = Tree::open(dtb).ok()?;
    let root = tree.root().ok()?;
    let mut chosen = None;
    let mut aliases = None;
    for child in root.children() {
        match base_name(child.name) {
            "chosen" if chosen.is_none() => chosen = Some(child),
            "aliases" if aliases.is_none() => aliases = Some(child),
            _ => {}
        }
    }
    let target = stdout_target(chosen.and_then(|c| c.string("stdout-path")), aliases);
    let mut first = None;
    let mut named: Option<Option<Uart>> = None;
    let walked = tree.walk(|ancestors, node| {
        if ancestors.is_empty() {
            return Ok(());
        }
        let available = node.is_available();
        if named.is_none() && target.is_some_and(|path| path_is(ancestors, node.name, path)) {
            named = Some(if available {
                pl011(ancestors, node)
            } else {
                None
            });
        }
        if available && first.is_none() {
            first = pl011(ancestors, node);
        }
        Ok(())
    });
    walked.ok()?;
    named.flatten().or(first)
}

/// The first `reg` entry, as a CPU physical address, of the first enabled
/// node compatible with one of `compatible` (a board quirk's device).
/// `None` if the tree cannot be read or has no such CPU-addressable node.
pub fn first_reg_of(dtb: &[u8], compatible: &[&str]) -> Option<Range> {
    let tree = Tree::open(dtb).ok()?;
    let mut found = None;
    tree.walk(|ancestors, node| {
        if found.is_none()
            && !ancestors.is_empty()
            && node.is_available()
            && node.is_compatible(compatible)
            && let Ok(Some(mut regs)) = regs(ancestors, node)
            && let Some(Ok((base, size))) = regs.next()
        {
            found = Range::new(base, size);
        }
        Ok(())
    })
    .ok()?;
    found
}

/// Most GICv3 ITSs [`gic_its`] reports.
pub const MAX_ITS: usize = 4;

/// The register frames of every available `arm,gic-v3-its` node (its
/// control frame, then the translation frame 64 KiB above it), as CPU
/// physical addresses, in tree order. An ITS the CPU cannot address is
/// left out.
pub fn gic_its(dtb: &[u8]) -> Result<Vec<Range, MAX_ITS>, DtError> {
    let tree = Tree::open(dtb)?;
    let mut out = Vec::new();
    tree.walk(|ancestors, node| {
        if !node.is_compatible(&["arm,gic-v3-its"]) || !node.is_available() {
            return Ok(());
        }
        let first = match regs(ancestors, node) {
            Ok(Some(mut regs)) => regs.next(),
            Err(RegFault::Unaddressable) => return Ok(()),
            _ => None,
        };
        let frames = match first {
            Some(Ok((base, size))) => Range::new(base, size),
            _ => None,
        }
        .ok_or(DtError::BadReg("a GICv3 ITS node"))?;
        out.push(frames).map_err(|_| DtError::TooMany("GICv3 ITSs"))
    })?;
    Ok(out)
}

const FDT_MAGIC: u32 = 0xd00d_feed;
const HEADER_LEN: usize = 40;
/// The format version read; older trees lack `size_dt_struct`.
const FDT_VERSION: u32 = 17;

const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// Header fields, as indices of big-endian words.
const HEADER_TOTALSIZE: usize = 1;
const HEADER_OFF_DT_STRUCT: usize = 2;
const HEADER_OFF_DT_STRINGS: usize = 3;
const HEADER_OFF_MEM_RSVMAP: usize = 4;
const HEADER_VERSION: usize = 5;
const HEADER_LAST_COMP_VERSION: usize = 6;
const HEADER_BOOT_CPUID_PHYS: usize = 7;
const HEADER_SIZE_DT_STRINGS: usize = 8;
const HEADER_SIZE_DT_STRUCT: usize = 9;

pub(crate) const PSCI_COMPATIBLE: [&str; 3] = ["arm,psci", "arm,psci-0.2", "arm,psci-1.0"];
const PL011_COMPATIBLE: [&str; 1] = ["arm,pl011"];
const GICV3_COMPATIBLE: [&str; 1] = ["arm,gic-v3"];
const GICV2_COMPATIBLE: [&str; 4] = [
    "arm,cortex-a15-gic",
    "arm,gic-400",
    "arm,cortex-a9-gic",
    "arm,arm11mp-gic",
];
/// `reg` entries of a GIC node looked at: the distributor plus either the
/// redistributor regions (GICv3) or GICC, GICH and GICV (GICv2).
const GIC_REGS: usize = MAX_REDIST_REGIONS + 4;

const TOO_DEEP: DtError = DtError::Malformed("nodes are nested deeper than Moat supports");

fn be32(bytes: &[u8], offset: usize) -> Option<u32> {
    match *bytes.get(offset..offset.checked_add(4)?)? {
        [a, b, c, d] => Some(u32::from_be_bytes([a, b, c, d])),
        _ => None,
    }
}

fn be64(bytes: &[u8], offset: usize) -> Option<u64> {
    let high = be32(bytes, offset)?;
    let low = be32(bytes, offset.checked_add(4)?)?;
    Some(u64::from(high) << 32 | u64::from(low))
}

fn to_usize(value: u32) -> usize {
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// The NUL-terminated UTF-8 string at `offset` in `bytes`.
fn c_string(bytes: &[u8], offset: usize) -> Option<&str> {
    let rest = bytes.get(offset..)?;
    let len = rest.iter().position(|&byte| byte == 0)?;
    core::str::from_utf8(rest.get(..len)?).ok()
}

/// `offset + len` rounded up to the next multiple of four.
fn aligned_end(offset: usize, len: usize) -> Option<usize> {
    Some(offset.checked_add(len)?.checked_add(3)? & !3)
}

/// One token of the structure block.
#[derive(Clone, Copy)]
enum Token<'a> {
    /// `FDT_BEGIN_NODE`; `body` is the offset just past the name.
    Begin { name: &'a str, body: usize },
    /// `FDT_END_NODE`.
    End,
    /// `FDT_PROP`.
    Property { name: &'a str, value: &'a [u8] },
    /// `FDT_NOP`.
    Nop,
    /// `FDT_END`.
    Finish,
}

/// A flattened device tree whose header and structure have been checked.
///
/// Reading a checked tree cannot fail, but every access is still bounds
/// checked: a reader that meets something unexpected just stops.
#[derive(Clone, Copy)]
pub(crate) struct Tree<'a> {
    structs: &'a [u8],
    strings: &'a [u8],
    /// The memory reservation entries, without the terminating one.
    reservations: &'a [u8],
    /// Only the host tree rewrite reads it.
    #[cfg_attr(not(feature = "alloc"), allow(dead_code))]
    boot_cpuid_phys: u32,
}

impl<'a> Tree<'a> {
    /// Checks the header and every token of the tree in `dtb`.
    pub(crate) fn open(dtb: &'a [u8]) -> Result<Self, DtError> {
        let available = dtb.len();
        let Some(magic) = be32(dtb, 0) else {
            return Err(DtError::Truncated {
                available,
                needed: HEADER_LEN,
            });
        };
        if magic != FDT_MAGIC {
            return Err(DtError::BadMagic(magic));
        }
        if available < HEADER_LEN {
            let needed = be32(dtb, 4).map_or(HEADER_LEN, |size| to_usize(size).max(HEADER_LEN));
            return Err(DtError::Truncated { available, needed });
        }
        let field = |index: usize| be32(dtb, index * 4).unwrap_or(0);
        let totalsize = to_usize(field(HEADER_TOTALSIZE));
        if totalsize < HEADER_LEN {
            return Err(DtError::Malformed(
                "the header's totalsize is smaller than the header",
            ));
        }
        let tree = dtb.get(..totalsize).ok_or(DtError::Truncated {
            available,
            needed: totalsize,
        })?;
        if field(HEADER_VERSION) < FDT_VERSION {
            return Err(DtError::Malformed("the format version is older than 17"));
        }
        if field(HEADER_LAST_COMP_VERSION) > FDT_VERSION {
            return Err(DtError::Malformed(
                "the format is not backwards compatible with version 17",
            ));
        }
        let block = |offset: usize, size: usize| {
            let start = to_usize(field(offset));
            tree.get(start..start.checked_add(to_usize(field(size)))?)
        };
        let structs = block(HEADER_OFF_DT_STRUCT, HEADER_SIZE_DT_STRUCT).ok_or(
            DtError::Malformed("the structure block lies outside the tree"),
        )?;
        let strings = block(HEADER_OFF_DT_STRINGS, HEADER_SIZE_DT_STRINGS).ok_or(
            DtError::Malformed("the strings block lies outside the tree"),
        )?;
        let checked = Tree {
            structs,
            strings,
            reservations: reservation_entries(tree, to_usize(field(HEADER_OFF_MEM_RSVMAP)))?,
            boot_cpuid_phys: field(HEADER_BOOT_CPUID_PHYS),
        };
        checked.check_structure()?;
        Ok(checked)
    }

    /// The header's `boot_cpuid_phys`.
    #[cfg_attr(not(feature = "alloc"), allow(dead_code))]
    pub(crate) fn boot_cpuid_phys(&self) -> u32 {
        self.boot_cpuid_phys
    }

    /// The `/memreserve/` entries as `(address, size)`.
    pub(crate) fn reservations(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        self.reservations
            .chunks_exact(16)
            .filter_map(|entry| Some((be64(entry, 0)?, be64(entry, 8)?)))
    }

    /// The token at `offset` and the offset of the next one.
    fn token(&self, offset: usize) -> Result<(Token<'a>, usize), &'static str> {
        const PAST_END: &str = "a token runs past the structure block";
        let tag = be32(self.structs, offset)
            .ok_or("the structure block ends without an FDT_END token")?;
        let after = offset.checked_add(4).ok_or(PAST_END)?;
        match tag {
            FDT_BEGIN_NODE => {
                let name = c_string(self.structs, after)
                    .ok_or("a node name is not a terminated UTF-8 string")?;
                let body = aligned_end(after, name.len() + 1).ok_or(PAST_END)?;
                Ok((Token::Begin { name, body }, body))
            }
            FDT_PROP => {
                let len = to_usize(be32(self.structs, after).ok_or(PAST_END)?);
                let name_offset = after.checked_add(4).ok_or(PAST_END)?;
                let name_offset = to_usize(be32(self.structs, name_offset).ok_or(PAST_END)?);
                let start = after.checked_add(8).ok_or(PAST_END)?;
                let value = self
                    .structs
                    .get(start..start.checked_add(len).ok_or(PAST_END)?);
                let value = value.ok_or("a property value runs past the structure block")?;
                let name = c_string(self.strings, name_offset).ok_or(
                    "a property name is not a terminated UTF-8 string in the strings block",
                )?;
                Ok((
                    Token::Property { name, value },
                    aligned_end(start, len).ok_or(PAST_END)?,
                ))
            }
            FDT_END_NODE => Ok((Token::End, after)),
            FDT_NOP => Ok((Token::Nop, after)),
            FDT_END => Ok((Token::Finish, after)),
            _ => Err("the structure block holds an unknown token"),
        }
    }

    /// Checks that the structure block is one root node, nested at most
    /// [`MAX_NODE_DEPTH`] deep, with each node's properties before its
    /// children, followed by `FDT_END`.
    fn check_structure(&self) -> Result<(), DtError> {
        let mut offset = 0;
        let mut depth = 0usize;
        let mut root_seen = false;
        let mut in_children = false;
        loop {
            let (token, next) = self.token(offset).map_err(DtError::Malformed)?;
            match token {
                Token::Begin { .. } => {
                    if depth == 0 {
                        if root_seen {
                            return Err(DtError::Malformed("the tree has more than one root node"));
                        }
                        root_seen = true;
                    }
                    depth += 1;
                    if depth > MAX_NODE_DEPTH {
                        return Err(TOO_DEEP);
                    }
                    in_children = false;
                }
                Token::Property { .. } => {
                    if depth == 0 || in_children {
                        return Err(DtError::Malformed(
                            "a property lies outside any node or after a child node",
                        ));
                    }
                }
                Token::End => {
                    if depth == 0 {
                        return Err(DtError::Malformed("a node ends that never began"));
                    }
                    depth -= 1;
                    in_children = true;
                }
                Token::Nop => {}
                Token::Finish => {
                    if depth != 0 || !root_seen {
                        return Err(DtError::Malformed("the structure block ends inside a node"));
                    }
                    return Ok(());
                }
            }
            offset = next;
        }
    }

    /// The root node.
    pub(crate) fn root(&self) -> Result<Node<'a>, DtError> {
        let mut offset = 0;
        loop {
            match self.token(offset).map_err(DtError::Malformed)? {
                (Token::Begin { name, body }, _) => {
                    return Ok(Node {
                        tree: *self,
                        name,
                        body,
                    });
                }
                (Token::Nop, next) => offset = next,
                _ => return Err(DtError::Malformed("the tree has no root node")),
            }
        }
    }

    /// Calls `visit` on every node in tree order with the node's ancestors
    /// (root first; empty for the root itself).
    pub(crate) fn walk(
        &self,
        mut visit: impl FnMut(&[Level<'a>], Node<'a>) -> Result<(), DtError>,
    ) -> Result<(), DtError> {
        let mut levels: Vec<Level<'a>, MAX_NODE_DEPTH> = Vec::new();
        let mut offset = 0;
        loop {
            let (token, next) = self.token(offset).map_err(DtError::Malformed)?;
            match token {
                Token::Begin { name, body } => {
                    let node = Node {
                        tree: *self,
                        name,
                        body,
                    };
                    visit(&levels, node)?;
                    levels.push(Level::of(node)?).map_err(|_| TOO_DEEP)?;
                }
                Token::End => {
                    levels.pop();
                    if levels.is_empty() {
                        return Ok(());
                    }
                }
                Token::Property { .. } | Token::Nop => {}
                Token::Finish => return Ok(()),
            }
            offset = next;
        }
    }
}

/// The memory reservation entries at `offset`, up to (not including) the
/// all-zero entry that must end them inside the tree.
fn reservation_entries(tree: &[u8], offset: usize) -> Result<&[u8], DtError> {
    const UNTERMINATED: DtError =
        DtError::Malformed("the memory reservation block has no terminating entry");
    let mut end = offset;
    loop {
        let next = end.checked_add(16).ok_or(UNTERMINATED)?;
        let entry = tree.get(end..next).ok_or(UNTERMINATED)?;
        if entry.iter().all(|&byte| byte == 0) {
            return tree.get(offset..end).ok_or(UNTERMINATED);
        }
        end = next;
    }
}

/// A node of a checked tree.
#[derive(Clone, Copy)]
pub(crate) struct Node<'a> {
    tree: Tree<'a>,
    /// The name with its unit address; empty for the root.
    pub(crate) name: &'a str,
    /// Offset of the first token after the name.
    body: usize,
}

impl<'a> Node<'a> {
    /// The node's properties as `(name, value)`, in order.
    pub(crate) fn properties(self) -> impl Iterator<Item = (&'a str, &'a [u8])> {
        let mut offset = self.body;
        core::iter::from_fn(move || {
            loop {
                match self.tree.token(offset).ok()? {
                    (Token::Nop, next) => offset = next,
                    (Token::Property { name, value }, next) => {
                        offset = next;
                        return Some((name, value));
                    }
                    _ => return None,
                }
            }
        })
    }

    /// The raw value of property `name`.
    pub(crate) fn property(self, name: &str) -> Option<&'a [u8]> {
        self.properties()
            .find(|&(candidate, _)| candidate == name)
            .map(|(_, value)| value)
    }

    /// The first string of property `name`.
    pub(crate) fn string(self, name: &str) -> Option<&'a str> {
        let value = self.property(name)?;
        core::str::from_utf8(value.split(|&byte| byte == 0).next()?).ok()
    }

    /// Whether `compatible` lists any of `with`.
    pub(crate) fn is_compatible(self, with: &[&str]) -> bool {
        self.property("compatible")
            .is_some_and(|value| strings(value).any(|compatible| with.contains(&compatible)))
    }

    /// Whether `status` is absent, `okay` or `ok`.
    pub(crate) fn is_available(self) -> bool {
        self.property("status").is_none() || matches!(self.string("status"), Some("okay" | "ok"))
    }

    /// The node's children, in order.
    pub(crate) fn children(self) -> impl Iterator<Item = Node<'a>> {
        let mut offset = Some(self.body);
        core::iter::from_fn(move || {
            loop {
                match self.tree.token(offset?).ok()? {
                    (Token::Nop | Token::Property { .. }, next) => offset = Some(next),
                    (Token::Begin { name, body }, _) => {
                        offset = self.tree.skip_node(body);
                        return Some(Node {
                            tree: self.tree,
                            name,
                            body,
                        });
                    }
                    _ => return None,
                }
            }
        })
    }
}

impl Tree<'_> {
    /// The offset just past the end of the node whose body starts at `body`.
    fn skip_node(&self, body: usize) -> Option<usize> {
        let mut offset = body;
        let mut depth = 1usize;
        loop {
            let (token, next) = self.token(offset).ok()?;
            match token {
                Token::Begin { .. } => depth += 1,
                Token::End => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(next);
                    }
                }
                Token::Property { .. } | Token::Nop => {}
                Token::Finish => return None,
            }
            offset = next;
        }
    }
}

/// A node name without its unit address.
pub fn base_name(name: &str) -> &str {
    name.split('@').next().unwrap_or(name)
}

/// The strings of a string-list value.
fn strings(value: &[u8]) -> impl Iterator<Item = &str> {
    value
        .split(|&byte| byte == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| core::str::from_utf8(s).ok())
}

/// The big-endian number in `bytes` (up to four cells), if it fits in 64 bits.
fn read_cells(bytes: &[u8]) -> Option<u64> {
    if !bytes.len().is_multiple_of(4) || bytes.len() > 16 {
        return None;
    }
    let mut value = 0u128;
    for cell in bytes.chunks_exact(4) {
        if let [a, b, c, d] = *cell {
            value = (value << 32) | u128::from(u32::from_be_bytes([a, b, c, d]));
        }
    }
    u64::try_from(value).ok()
}

/// A one- or two-cell integer property value.
fn integer(value: &[u8]) -> Option<u64> {
    if value.len() == 4 || value.len() == 8 {
        read_cells(value)
    } else {
        None
    }
}

fn one_cell(value: &[u8]) -> Option<u32> {
    match *value {
        [a, b, c, d] => Some(u32::from_be_bytes([a, b, c, d])),
        _ => None,
    }
}

/// What a node tells its children: the cell sizes of their `reg`s and how its
/// address space maps onto its parent's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Level<'a> {
    pub(crate) name: &'a str,
    pub(crate) address_cells: u32,
    pub(crate) size_cells: u32,
    /// `None` when the node has no `ranges` (its children are not
    /// CPU-addressable); empty for an identity mapping.
    pub(crate) ranges: Option<&'a [u8]>,
}

impl<'a> Level<'a> {
    /// Reads `#address-cells` (default 2), `#size-cells` (default 1) and `ranges`.
    pub(crate) fn of(node: Node<'a>) -> Result<Self, DtError> {
        const NOT_A_CELL: DtError =
            DtError::Malformed("an #address-cells or #size-cells property is not one cell");
        let mut level = Level {
            name: node.name,
            address_cells: 2,
            size_cells: 1,
            ranges: None,
        };
        for (name, value) in node.properties() {
            match name {
                "#address-cells" => level.address_cells = one_cell(value).ok_or(NOT_A_CELL)?,
                "#size-cells" => level.size_cells = one_cell(value).ok_or(NOT_A_CELL)?,
                "ranges" => level.ranges = Some(value),
                _ => {}
            }
        }
        Ok(level)
    }
}

/// Maps `address`, in the address space of the children of the last of
/// `ancestors`, to a CPU physical address through every ancestor's `ranges`.
/// `None` if some ancestor below the root has no `ranges` or no window of its
/// `ranges` holds the address.
fn translate(ancestors: &[Level<'_>], address: u64) -> Option<u64> {
    let mut address = address;
    for pair in ancestors.windows(2).rev() {
        let [outer, bus] = pair else { return None };
        let ranges = bus.ranges?;
        if !ranges.is_empty() {
            address = through_window(ranges, bus, outer, address)?;
        }
    }
    Some(address)
}

/// Maps `address` through the non-empty `ranges` of `bus`, whose parent is `outer`.
fn through_window(ranges: &[u8], bus: &Level<'_>, outer: &Level<'_>, address: u64) -> Option<u64> {
    let child_bytes = to_usize(bus.address_cells).checked_mul(4)?;
    let parent_bytes = to_usize(outer.address_cells).checked_mul(4)?;
    let size_bytes = to_usize(bus.size_cells).checked_mul(4)?;
    let entry = child_bytes
        .checked_add(parent_bytes)?
        .checked_add(size_bytes)?;
    if entry == 0 || !ranges.len().is_multiple_of(entry) {
        return None;
    }
    for window in ranges.chunks_exact(entry) {
        let (child, rest) = window.split_at_checked(child_bytes)?;
        let (parent, size) = rest.split_at_checked(parent_bytes)?;
        let (Some(child), Some(parent), Some(size)) =
            (read_cells(child), read_cells(parent), read_cells(size))
        else {
            continue;
        };
        if let Some(offset) = address.checked_sub(child)
            && offset < size
        {
            return parent.checked_add(offset);
        }
    }
    None
}

/// Why a node's `reg` could not be turned into CPU physical ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RegFault {
    /// The node is not on a CPU-addressable bus: an ancestor has no `ranges`,
    /// no window holds the address, or the cells are not a plain address.
    Unaddressable,
    /// The property's length is not a whole number of entries.
    Malformed,
}

/// The entries of a `reg` as `(base, size)`, bases translated to CPU
/// physical addresses.
pub(crate) struct Regs<'x, 'a> {
    ancestors: &'x [Level<'a>],
    rest: &'a [u8],
    address_bytes: usize,
    entry_bytes: usize,
}

/// `node`'s `reg` entries; `Ok(None)` if it has no `reg`.
pub(crate) fn regs<'x, 'a>(
    ancestors: &'x [Level<'a>],
    node: Node<'a>,
) -> Result<Option<Regs<'x, 'a>>, RegFault> {
    let Some(value) = node.property("reg") else {
        return Ok(None);
    };
    let parent = ancestors.last().ok_or(RegFault::Unaddressable)?;
    let address_cells = to_usize(parent.address_cells);
    let size_cells = to_usize(parent.size_cells);
    if !(1..=4).contains(&address_cells) || !(1..=4).contains(&size_cells) {
        return Err(RegFault::Unaddressable);
    }
    let entry_bytes = (address_cells + size_cells) * 4;
    if !value.len().is_multiple_of(entry_bytes) {
        return Err(RegFault::Malformed);
    }
    Ok(Some(Regs {
        ancestors,
        rest: value,
        address_bytes: address_cells * 4,
        entry_bytes,
    }))
}

impl Iterator for Regs<'_, '_> {
    type Item = Result<(u64, u64), RegFault>;

    fn next(&mut self) -> Option<Self::Item> {
        let (entry, rest) = self.rest.split_at_checked(self.entry_bytes)?;
        self.rest = rest;
        let (address, size) = entry.split_at_checked(self.address_bytes)?;
        let base = read_cells(address).and_then(|address| translate(self.ancestors, address));
        Some(match (base, read_cells(size)) {
            (Some(base), Some(size)) => Ok((base, size)),
            _ => Err(RegFault::Unaddressable),
        })
    }
}

/// Adds `bank` to the sorted, disjoint, non-adjacent `banks`, merging it with
/// every bank it overlaps or touches.
fn add_bank<const N: usize>(banks: &mut Vec<Range, N>, bank: Range) -> Result<(), Range> {
    let mut merged = bank;
    let mut index = 0;
    while let Some(existing) = banks.get(index).copied() {
        if existing.base <= merged.end() && merged.base <= existing.end() {
            let base = existing.base.min(merged.base);
            let end = existing.end().max(merged.end());
            merged = Range {
                base,
                size: end - base,
            };
            banks.remove(index);
        } else {
            index += 1;
        }
    }
    let at = banks
        .iter()
        .position(|existing| existing.base > merged.base)
        .unwrap_or(banks.len());
    banks.insert(at, merged)
}

/// Whether the node called `name`, whose ancestors are `ancestors`, is the
/// node `path` names. A path component without a unit address matches a node
/// by its base name.
fn path_is(ancestors: &[Level<'_>], name: &str, path: &str) -> bool {
    let matches = |name: &str, component: &str| {
        name == component || (!component.contains('@') && base_name(name) == component)
    };
    let mut components = path.split('/').filter(|component| !component.is_empty());
    for ancestor in ancestors.iter().skip(1) {
        match components.next() {
            Some(component) if matches(ancestor.name, component) => {}
            _ => return false,
        }
    }
    components
        .next()
        .is_some_and(|component| matches(name, component))
        && components.next().is_none()
}

/// The node path `/chosen/stdout-path` names: options after ':' stripped,
/// an alias resolved through `/aliases`.
fn stdout_target<'a>(stdout_path: Option<&'a str>, aliases: Option<Node<'a>>) -> Option<&'a str> {
    let name = stdout_path?.split(':').next()?;
    if name.starts_with('/') {
        return Some(name);
    }
    let path = aliases?.string(name)?;
    path.starts_with('/').then_some(path)
}

fn read_chosen(node: Node<'_>) -> Chosen<'_> {
    let start = node.property("linux,initrd-start").and_then(integer);
    let end = node.property("linux,initrd-end").and_then(integer);
    let initrd = match (start, end) {
        (Some(start), Some(end)) if end > start => Range::new(start, end - start),
        _ => None,
    };
    Chosen {
        bootargs: node.string("bootargs"),
        stdout_path: node.string("stdout-path"),
        initrd,
    }
}

/// What the main walk collects.
struct Survey<'a> {
    stdout_target: Option<&'a str>,
    memory: Vec<Range, MAX_MEMORY_RANGES>,
    reserved: Vec<Range, MAX_RESERVED_RANGES>,
    cpus: Vec<Cpu, MAX_CPUS>,
    gic: Option<Gic>,
    psci: Option<Psci>,
    /// The first enabled, CPU-addressable PL011.
    first_uart: Option<Uart>,
    /// Set once the stdout-path node is seen: the UART if it is a usable PL011.
    stdout_uart: Option<Option<Uart>>,
}

impl<'a> Survey<'a> {
    fn visit(&mut self, ancestors: &[Level<'a>], node: Node<'a>) -> Result<(), DtError> {
        let depth = ancestors.len();
        if depth == 0 {
            return Ok(());
        }
        let top = base_name(ancestors.get(1).map_or(node.name, |level| level.name));
        let available = node.is_available();
        let device_type = node.string("device_type");

        if self.stdout_uart.is_none()
            && self
                .stdout_target
                .is_some_and(|path| path_is(ancestors, node.name, path))
        {
            self.stdout_uart = Some(if available {
                pl011(ancestors, node)
            } else {
                None
            });
        }
        // A "disabled" CPU is one the firmware has parked; only "fail" rules it out.
        if depth == 2
            && top == "cpus"
            && device_type == Some("cpu")
            && !node
                .string("status")
                .is_some_and(|status| status.starts_with("fail"))
        {
            self.add_cpu(ancestors, node)?;
        }
        if !available {
            return Ok(());
        }
        if depth == 2 && top == "reserved-memory" {
            self.add_reservation(ancestors, node)?;
        }
        if device_type == Some("memory") {
            self.add_memory(ancestors, node)?;
        }
        if self.first_uart.is_none() {
            self.first_uart = pl011(ancestors, node);
        }
        if self.gic.is_none() {
            self.gic = gic(ancestors, node)?;
        }
        if self.psci.is_none() && node.is_compatible(&PSCI_COMPATIBLE) {
            self.psci = Some(psci(node)?);
        }
        Ok(())
    }

    fn add_cpu(&mut self, ancestors: &[Level<'a>], node: Node<'a>) -> Result<(), DtError> {
        const BAD: DtError = DtError::BadReg("a CPU node");
        let cells = ancestors
            .last()
            .map_or(0, |cpus| to_usize(cpus.address_cells));
        if !(1..=2).contains(&cells) {
            return Err(BAD);
        }
        let reg = node.property("reg").ok_or(BAD)?;
        let mpidr = reg.get(..cells * 4).and_then(read_cells).ok_or(BAD)?;
        let enable_method = match node.string("enable-method") {
            Some("psci") => EnableMethod::Psci,
            Some("spin-table") => EnableMethod::SpinTable {
                release_addr: node
                    .property("cpu-release-addr")
                    .and_then(integer)
                    .ok_or(DtError::BadProperty("cpu-release-addr of a spin-table CPU"))?,
            },
            _ => EnableMethod::None,
        };
        self.cpus
            .push(Cpu {
                mpidr,
                enable_method,
            })
            .map_err(|_| DtError::TooMany("CPUs"))
    }

    /// A `/reserved-memory` child. Firmware memory must never be handed out,
    /// so a reservation that cannot be read is an error rather than skipped.
    fn add_reservation(&mut self, ancestors: &[Level<'a>], node: Node<'a>) -> Result<(), DtError> {
        const BAD: DtError = DtError::BadReg("a /reserved-memory child");
        let Some(regs) = regs(ancestors, node).map_err(|_| BAD)? else {
            return Ok(());
        };
        for entry in regs {
            let (base, size) = entry.map_err(|_| BAD)?;
            if size == 0 {
                continue;
            }
            let range = Range::new(base, size).ok_or(BAD)?;
            self.reserved
                .push(range)
                .map_err(|_| DtError::TooMany("reserved memory ranges"))?;
        }
        Ok(())
    }

    /// A `device_type = "memory"` node: banks not reachable from the CPU are
    /// left out, empty ones dropped.
    fn add_memory(&mut self, ancestors: &[Level<'a>], node: Node<'a>) -> Result<(), DtError> {
        const BAD: DtError = DtError::BadReg("a memory node");
        let regs = match regs(ancestors, node) {
            Ok(Some(regs)) => regs,
            Ok(None) | Err(RegFault::Unaddressable) => return Ok(()),
            Err(RegFault::Malformed) => return Err(BAD),
        };
        for entry in regs {
            let Ok((base, size)) = entry else { continue };
            if size == 0 {
                continue;
            }
            let bank = Range::new(base, size).ok_or(BAD)?;
            add_bank(&mut self.memory, bank).map_err(|_| DtError::TooMany("RAM banks"))?;
        }
        Ok(())
    }
}

/// `node` as the console, if it is a CPU-addressable PL011.
fn pl011(ancestors: &[Level<'_>], node: Node<'_>) -> Option<Uart> {
    if !node.is_compatible(&PL011_COMPATIBLE) {
        return None;
    }
    let (base, size) = regs(ancestors, node).ok()??.next()?.ok()?;
    Some(Uart {
        kind: UartKind::Pl011,
        regs: Range::new(base, size)?,
    })
}

/// `node` as the interrupt controller: `Ok(None)` if it is not a supported
/// GIC or not CPU-addressable.
///
/// A GICv3's `reg` lists the distributor, `#redistributor-regions` (default 1)
/// redistributor regions, then optionally GICC, GICH and GICV; only the
/// redistributor regions are taken as redistributors.
fn gic(ancestors: &[Level<'_>], node: Node<'_>) -> Result<Option<Gic>, DtError> {
    const BAD: DtError = DtError::BadReg("the interrupt controller node");
    let v3 = node.is_compatible(&GICV3_COMPATIBLE);
    if !v3 && !node.is_compatible(&GICV2_COMPATIBLE) {
        return Ok(None);
    }
    let regs = match regs(ancestors, node) {
        Ok(Some(regs)) => regs,
        Ok(None) => return Err(DtError::BadGic),
        Err(RegFault::Unaddressable) => return Ok(None),
        Err(RegFault::Malformed) => return Err(BAD),
    };
    let mut entries: Vec<(u64, u64), GIC_REGS> = Vec::new();
    for entry in regs.take(GIC_REGS) {
        let Ok(entry) = entry else { return Ok(None) };
        entries.push(entry).map_err(|_| BAD)?;
    }
    let region = |index: usize| -> Result<Option<Range>, DtError> {
        match entries.get(index) {
            Some(&(base, size)) => Range::new(base, size).map(Some).ok_or(BAD),
            None => Ok(None),
        }
    };
    let distributor = region(0)?.ok_or(DtError::BadGic)?;
    if v3 {
        let count = match node.property("#redistributor-regions") {
            None => 1,
            Some(value) => one_cell(value).map(to_usize).ok_or(DtError::BadProperty(
                "#redistributor-regions of the GICv3 node",
            ))?,
        };
        if count == 0 {
            return Err(DtError::BadGic);
        }
        if count > MAX_REDIST_REGIONS {
            return Err(DtError::TooMany("GICv3 redistributor regions"));
        }
        let mut redistributors = Vec::new();
        for index in 1..=count {
            let region = region(index)?.ok_or(DtError::BadGic)?;
            redistributors
                .push(region)
                .map_err(|_| DtError::TooMany("GICv3 redistributor regions"))?;
        }
        Ok(Some(Gic::V3 {
            distributor,
            redistributors,
        }))
    } else {
        Ok(Some(Gic::V2 {
            distributor,
            cpu_interface: region(1)?.ok_or(DtError::BadGic)?,
            hyp_interface: region(2)?,
            virtual_cpu_interface: region(3)?,
        }))
    }
}

fn psci(node: Node<'_>) -> Result<Psci, DtError> {
    let conduit = match node.string("method") {
        Some("smc") => Conduit::Smc,
        Some("hvc") => Conduit::Hvc,
        _ => return Err(DtError::BadProperty("method of the PSCI node")),
    };
    Ok(Psci { conduit })
}

/// The windows a bus node opens onto its parent: the parent side of each
/// `ranges` entry, translated to CPU physical addresses. Nothing for a node
/// without `ranges`, with an empty (identity) one, or whose entries cannot
/// be read or translated (such a bus is not CPU-addressable).
pub(crate) fn bus_windows<'x, 'a>(
    ancestors: &'x [Level<'a>],
    node: Node<'a>,
) -> impl Iterator<Item = (u64, u64)> + 'x
where
    'a: 'x,
{
    let bus = Level::of(node).ok();
    let entry = bus.zip(ancestors.last()).and_then(|(bus, outer)| {
        let child = to_usize(bus.address_cells).checked_mul(4)?;
        let parent = to_usize(outer.address_cells).checked_mul(4)?;
        let size = to_usize(bus.size_cells).checked_mul(4)?;
        let ranges = bus.ranges.filter(|r| !r.is_empty())?;
        let total = child.checked_add(parent)?.checked_add(size)?;
        (total != 0 && ranges.len().is_multiple_of(total)).then_some((ranges, child, parent, total))
    });
    entry
        .into_iter()
        .flat_map(move |(ranges, child, parent, total)| {
            ranges.chunks_exact(total).filter_map(move |window| {
                let (parent_side, size) = window.get(child..)?.split_at_checked(parent)?;
                let base = translate(ancestors, read_cells(parent_side)?)?;
                Some((base, read_cells(size)?))
            })
        })
}

/// Every device window: translated `reg`s and bus `ranges` windows outside
/// RAM, leaving out CPUs, memory nodes and reservations; sorted and merged.
fn device_windows(
    tree: &Tree<'_>,
    memory: &[Range],
) -> Result<Vec<Range, MAX_DEVICE_WINDOWS>, DtError> {
    let mut windows = Vec::new();
    tree.walk(|ancestors, node| {
        if ancestors.is_empty() {
            return Ok(());
        }
        let top_name = base_name(ancestors.get(1).map_or(node.name, |level| level.name));
        if matches!(top_name, "cpus" | "memory" | "reserved-memory")
            || node.string("device_type") == Some("memory")
        {
            return Ok(());
        }
        let regs = regs(ancestors, node).ok().flatten().into_iter().flatten();
        for (base, size) in regs.flatten().chain(bus_windows(ancestors, node)) {
            if let Some(window) = Range::new(base, size)
                && !memory.iter().any(|bank| bank.contains_range(&window))
            {
                add_bank(&mut windows, window).map_err(|_| DtError::TooMany("device windows"))?;
            }
        }
        Ok(())
    })?;
    Ok(windows)
}
