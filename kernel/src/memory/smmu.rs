//! The SMMUv3 the core owns: DMA from the host's devices goes through the
//! host's own stage-2.
//!
//! At boot the core takes the SMMU's register frames (the host's stage-2
//! leaves them out and its device tree marks the SMMU disabled), makes the
//! command queue, event queue and stream table in its own heap, and gives
//! every stream the device tree names one entry that points at the host's
//! stage-2 tables with the host's VMID and VTCR fields
//! (`moat_kernel::smmu::host_ste`). Whatever the host may not touch, its
//! devices may not touch either, with no second table to keep in step:
//! after each change of the host's stage-2 the memory path calls
//! [`host_stage2_changed`], which invalidates the SMMU's TLB for the
//! host's VMID and waits for the invalidation to complete before the
//! change is reported done.
//!
//! Faults never stop anything: the event queue is drained at every memory
//! transaction and checker run ([`drain_events`]), each event counted and
//! the first ones logged. If the SMMU stops answering commands, the core
//! disables translation with the global bypass set to abort: every DMA is
//! refused from then on, which is safe, if not useful.

use alloc::alloc::{Layout, alloc_zeroed};
use moat_kernel::smmu::{
    self, BASE_RA, BASE_WA, CMD_BYTES, CR0_CMDQEN, CR0_EVENTQEN, CR0_SMMUEN, CR1_CACHEABLE,
    CR2_RECINVSID, Command, EVENT_BYTES, EVENTQ_OVERFLOW, Event, Features, GBPA_ABORT, GBPA_UPDATE,
    GERROR_CMDQ_ERR, QueueIndex, SPLIT, STE_BYTES, reg,
};
use moat_platform::iommu::SmmuV3;
use spin::{Mutex, Once};

/// Level-2 tables the core makes (each 2^SPLIT streams, 16 KiB): streams
/// 0..4096, PCI buses 0 to 15. A stream above has no entry and is refused.
const MAX_L2_TABLES: usize = 16;
/// Streams a linear table covers when the SMMU has no two-level tables.
const MAX_LINEAR_LOG2: u32 = 12;
/// Queue sizes the core uses (at most what IDR1 allows): 4 KiB each.
const CMDQ_LOG2: u32 = 8;
const EVENTQ_LOG2: u32 = 7;
/// Register reads before an SMMU that has not acknowledged is given up on.
const PATIENCE: u32 = 1_000_000;

/// The stream table as the core made it.
enum Streams {
    TwoLevel {
        l1: usize,
        l1_entries: usize,
        l2: heapless::Vec<usize, MAX_L2_TABLES>,
    },
    Linear {
        table: usize,
        entries: usize,
    },
}

pub struct Smmu {
    base: usize,
    vmid: u16,
    cmdq: usize,
    cmdq_index: QueueIndex,
    evtq: usize,
    evtq_index: QueueIndex,
    streams: Streams,
    ste: [u64; 8],
    /// Set when the SMMU stopped answering: translation is off and every
    /// transaction aborts.
    failed: bool,
    events: u64,
    overflows: u64,
}

static SMMU: Once<Mutex<Smmu>> = Once::new();

/// What [`init`] set up, for the boot log.
pub struct Summary {
    pub streams: u64,
    pub refused_from: Option<u64>,
    pub features: Features,
}

fn read32(base: usize, offset: usize) -> u32 {
    // SAFETY: `base` is the SMMU's register frames (page 0 and page 1),
    // mapped as device memory in the core's map and in no partition's;
    // `offset` is one of `moat_kernel::smmu::reg`'s 32-bit registers.
    unsafe { core::ptr::with_exposed_provenance::<u32>(base + offset).read_volatile() }
}

fn write32(base: usize, offset: usize, value: u32) {
    // SAFETY: as in `read32`.
    unsafe { core::ptr::with_exposed_provenance_mut::<u32>(base + offset).write_volatile(value) }
}

fn write64(base: usize, offset: usize, value: u64) {
    // SAFETY: as in `read32`, for a 64-bit register (8-byte aligned).
    unsafe { core::ptr::with_exposed_provenance_mut::<u64>(base + offset).write_volatile(value) }
}

/// Completes the core's writes to memory before the SMMU is told about
/// them (a register write) or reads them.
fn barrier() {
    crate::arch::cache::complete_full_system();
}

/// Waits until `(read(offset) & mask) == want`.
fn wait_for(base: usize, offset: usize, mask: u32, want: u32) -> Result<(), &'static str> {
    for _ in 0..PATIENCE {
        if read32(base, offset) & mask == want {
            return Ok(());
        }
        core::hint::spin_loop();
    }
    Err("the SMMU did not acknowledge")
}

/// Zeroed, naturally aligned memory from the heap, or an error.
fn zeroed(bytes: usize) -> Result<usize, &'static str> {
    let layout = Layout::from_size_align(bytes, bytes.max(64)).map_err(|_| "bad table size")?;
    // SAFETY: a non-zero-sized layout.
    let p = unsafe { alloc_zeroed(layout) };
    if p.is_null() {
        return Err("out of memory for the SMMU's tables");
    }
    // Kept for the core's life: the SMMU reads it.
    Ok(p.expose_provenance())
}

fn write_words(at: usize, words: &[u64]) {
    for (i, w) in words.iter().enumerate() {
        // SAFETY: `at` is inside memory the core allocated for the SMMU
        // (a table or queue), with room for `words`; the SMMU only reads it.
        unsafe { core::ptr::with_exposed_provenance_mut::<u64>(at + i * 8).write_volatile(*w) };
    }
}

fn read_words<const N: usize>(at: usize) -> [u64; N] {
    let mut out = [0; N];
    for (i, w) in out.iter_mut().enumerate() {
        // SAFETY: `at` is inside a table or queue the core allocated for
        // the SMMU, with room for N words.
        *w = unsafe { core::ptr::with_exposed_provenance::<u64>(at + i * 8).read_volatile() };
    }
    out
}

/// Takes the SMMU described by `desc` and points every stream at the
/// host's stage-2 (`vtcr`, `vttbr`). On error the SMMU is left disabled
/// with incoming transactions aborted, if it answered at all.
pub fn init(desc: &SmmuV3, vtcr: u64, vttbr: u64, ipa_bits: u32) -> Result<Summary, &'static str> {
    let base = desc.regs.base as usize;
    let features = Features::from_idr(
        read32(base, reg::IDR0),
        read32(base, reg::IDR1),
        read32(base, reg::IDR3),
        read32(base, reg::IDR5),
    );
    let vmid = (vttbr >> 48) as u16;
    // Off, and aborting whatever arrives, before anything is changed.
    write32(base, reg::CR0, 0);
    wait_for(base, reg::CR0ACK, !0, 0)?;
    write32(base, reg::GBPA, GBPA_ABORT | GBPA_UPDATE);
    wait_for(base, reg::GBPA, GBPA_UPDATE, 0)?;
    write32(base, reg::IRQ_CTRL, 0);
    wait_for(base, reg::IRQ_CTRLACK, !0, 0)?;
    if let Some(why) = features.unusable_for(ipa_bits, vmid) {
        return Err(why);
    }

    let ste = smmu::host_ste(vtcr, vttbr & 0x0000_ffff_ffff_fffe, vmid, features.oas);
    let log2 = smmu::stream_table_log2(desc.streams_end(), features.sid_bits);
    let (streams, covered, table_base, table_cfg) = if features.two_level_table {
        let l1_entries = 1usize << (log2 - SPLIT);
        let l1 = zeroed(l1_entries * 8)?;
        let mut l2 = heapless::Vec::new();
        for i in 0..l1_entries.min(MAX_L2_TABLES) {
            let table = zeroed(STE_BYTES << SPLIT)?;
            for s in 0..1usize << SPLIT {
                write_words(table + s * STE_BYTES, &ste);
            }
            write_words(l1 + i * 8, &[smmu::l1_descriptor(table as u64)]);
            let _ = l2.push(table);
        }
        let covered = (l2.len() as u64) << SPLIT;
        let cfg = smmu::strtab_base_cfg_2level(log2);
        (Streams::TwoLevel { l1, l1_entries, l2 }, covered, l1, cfg)
    } else {
        let log2 = log2.min(MAX_LINEAR_LOG2);
        let entries = 1usize << log2;
        let table = zeroed(entries * STE_BYTES)?;
        for s in 0..entries {
            write_words(table + s * STE_BYTES, &ste);
        }
        (
            Streams::Linear { table, entries },
            entries as u64,
            table,
            log2,
        )
    };
    let cmdq_log2 = CMDQ_LOG2.min(features.cmdq_log2);
    let evtq_log2 = EVENTQ_LOG2.min(features.eventq_log2);
    let cmdq = zeroed(CMD_BYTES << cmdq_log2)?;
    let evtq = zeroed(EVENT_BYTES << evtq_log2)?;
    barrier();

    write32(base, reg::CR1, CR1_CACHEABLE);
    write32(base, reg::CR2, CR2_RECINVSID);
    write64(
        base,
        reg::STRTAB_BASE,
        BASE_RA | (table_base as u64 & 0x000f_ffff_ffff_ffc0),
    );
    write32(base, reg::STRTAB_BASE_CFG, table_cfg);
    write64(
        base,
        reg::CMDQ_BASE,
        smmu::queue_base(cmdq as u64, cmdq_log2, BASE_RA),
    );
    write32(base, reg::CMDQ_PROD, 0);
    write32(base, reg::CMDQ_CONS, 0);
    write64(
        base,
        reg::EVENTQ_BASE,
        smmu::queue_base(evtq as u64, evtq_log2, BASE_WA),
    );
    write32(base, reg::EVENTQ_PROD, 0);
    write32(base, reg::EVENTQ_CONS, 0);
    write32(base, reg::CR0, CR0_CMDQEN);
    wait_for(base, reg::CR0ACK, !0, CR0_CMDQEN)?;

    let mut s = Smmu {
        base,
        vmid,
        cmdq,
        cmdq_index: QueueIndex { log2: cmdq_log2 },
        evtq,
        evtq_index: QueueIndex { log2: evtq_log2 },
        streams,
        ste,
        failed: false,
        events: 0,
        overflows: 0,
    };
    // Nothing cached from before: configurations and TLB entries.
    s.submit(&[Command::CfgiAll, Command::TlbiNsnhAll, Command::Sync])?;
    let on = CR0_CMDQEN | CR0_EVENTQEN;
    write32(base, reg::CR0, on);
    wait_for(base, reg::CR0ACK, !0, on)?;
    write32(base, reg::CR0, on | CR0_SMMUEN);
    wait_for(base, reg::CR0ACK, !0, on | CR0_SMMUEN)?;
    SMMU.call_once(|| Mutex::new(s));
    let end = desc.streams_end();
    Ok(Summary {
        streams: covered.min(end),
        refused_from: (end > covered).then_some(covered),
        features,
    })
}

impl Smmu {
    /// Queues `commands` and waits until the SMMU has consumed them all
    /// (the last being a SYNC, every earlier one has completed).
    fn submit(&mut self, commands: &[Command]) -> Result<(), &'static str> {
        if self.failed {
            return Err("the SMMU was given up on");
        }
        let q = self.cmdq_index;
        let mut prod = read32(self.base, reg::CMDQ_PROD);
        for c in commands {
            let cons = read32(self.base, reg::CMDQ_CONS);
            if q.full(prod, cons) {
                return Err("the command queue is full");
            }
            write_words(self.cmdq + q.slot(prod) * CMD_BYTES, &c.encode());
            prod = q.next(prod);
        }
        barrier();
        write32(self.base, reg::CMDQ_PROD, prod);
        for _ in 0..PATIENCE {
            let cons = read32(self.base, reg::CMDQ_CONS);
            if read32(self.base, reg::GERROR) & GERROR_CMDQ_ERR
                != read32(self.base, reg::GERRORN) & GERROR_CMDQ_ERR
            {
                crate::log!(
                    "smmu: command error {:#x}",
                    (cons >> smmu::CMDQ_CONS_ERR_SHIFT) & 0x7f
                );
                return Err("the SMMU refused a command");
            }
            if q.same(cons, prod) {
                return Ok(());
            }
            core::hint::spin_loop();
        }
        Err("the SMMU did not complete its commands")
    }

    /// Gives up on the SMMU: translation off, the global bypass aborting.
    fn fail_closed(&mut self, why: &str) {
        crate::log!(
            "smmu: {why}; translation disabled, every DMA transaction is aborted from now on"
        );
        self.failed = true;
        write32(self.base, reg::GBPA, GBPA_ABORT | GBPA_UPDATE);
        write32(self.base, reg::CR0, 0);
    }

    fn drain(&mut self) {
        let q = self.evtq_index;
        let prod = read32(self.base, reg::EVENTQ_PROD);
        let mut cons = read32(self.base, reg::EVENTQ_CONS);
        let mut budget = 1usize << q.log2;
        while !q.same(prod, cons) && budget > 0 {
            let event = Event::decode(read_words::<4>(self.evtq + q.slot(cons) * EVENT_BYTES));
            self.events += 1;
            if smmu::log_event(self.events) {
                crate::log!(
                    "smmu: fault {} ({:#x}) stream {:#x} {} {:#x}{} ({} recorded)",
                    event.name(),
                    event.kind,
                    event.stream,
                    if event.read { "read" } else { "write" },
                    event.address,
                    if event.stage2 { " at stage 2" } else { "" },
                    self.events
                );
            }
            cons = q.next(cons);
            budget -= 1;
        }
        let overflow = prod & EVENTQ_OVERFLOW;
        if overflow != cons & EVENTQ_OVERFLOW {
            self.overflows += 1;
            crate::log!("smmu: the event queue overflowed; events were lost");
        }
        write32(
            self.base,
            reg::EVENTQ_CONS,
            (cons & !EVENTQ_OVERFLOW) | overflow,
        );
    }
}

/// After a change to the host's stage-2: the SMMU forgets every
/// translation of the host's VMID, and the call returns once it has.
/// Without an SMMU there is nothing to do.
pub fn host_stage2_changed() {
    let Some(smmu) = SMMU.get() else { return };
    let mut s = smmu.lock();
    if s.failed {
        return;
    }
    // The table writes are complete (the stage-2 code's own barriers)
    // before the invalidation is queued.
    let vmid = s.vmid;
    if let Err(why) = s.submit(&[Command::TlbiS12Vmall { vmid }, Command::Sync]) {
        s.fail_closed(why);
    }
}

/// Reads the event queue: counts every event, logs the first ones.
pub fn drain_events() {
    if let Some(smmu) = SMMU.get() {
        smmu.lock().drain();
    }
}

/// Faults the SMMU recorded since boot (drained so far).
pub fn faults() -> u64 {
    SMMU.get().map_or(0, |s| s.lock().events)
}

/// Why the stream table is not what the core made it.
#[derive(Clone, Copy, Debug)]
pub enum StreamMismatch {
    /// The stream's entry is not the host's stage-2 entry.
    Entry { stream: u64 },
    /// A level-1 descriptor points somewhere else.
    Level1 { index: u64 },
    /// The SMMU is not translating (and did not fail closed).
    Disabled,
}

impl core::fmt::Display for StreamMismatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Entry { stream } => write!(f, "stream {stream:#x}'s entry was changed"),
            Self::Level1 { index } => write!(f, "level-1 descriptor {index} was changed"),
            Self::Disabled => write!(f, "translation is off"),
        }
    }
}

/// Checks every stream-table entry against the one the core wrote (the
/// host's stage-2, its VMID and VTCR fields) and every level-1 descriptor
/// against the core's own level-2 tables or invalid; returns the streams
/// checked (0 without an SMMU).
pub fn check_streams(host_vttbr: u64) -> Result<u64, StreamMismatch> {
    let Some(smmu) = SMMU.get() else {
        return Ok(0);
    };
    let s = smmu.lock();
    if s.failed {
        return Ok(0);
    }
    if read32(s.base, reg::CR0) & CR0_SMMUEN == 0 {
        return Err(StreamMismatch::Disabled);
    }
    if s.ste[3] != host_vttbr & 0x0000_ffff_ffff_fffe || s.ste[2] & 0xffff != host_vttbr >> 48 {
        return Err(StreamMismatch::Entry { stream: 0 });
    }
    let check_table = |table: usize, entries: usize, first: u64| {
        for i in 0..entries {
            if read_words::<8>(table + i * STE_BYTES) != s.ste {
                return Err(StreamMismatch::Entry {
                    stream: first + i as u64,
                });
            }
        }
        Ok(entries as u64)
    };
    match &s.streams {
        Streams::Linear { table, entries } => check_table(*table, *entries, 0),
        Streams::TwoLevel { l1, l1_entries, l2 } => {
            let mut checked = 0;
            for i in 0..*l1_entries {
                let [d] = read_words::<1>(l1 + i * 8);
                let want = l2.get(i).map_or(0, |t| smmu::l1_descriptor(*t as u64));
                if d != want {
                    return Err(StreamMismatch::Level1 { index: i as u64 });
                }
                if let Some(t) = l2.get(i) {
                    checked += check_table(*t, 1 << SPLIT, (i as u64) << SPLIT)?;
                }
            }
            Ok(checked)
        }
    }
}

/// Boot: takes the SMMU and says what it did. An SMMU the core cannot use
/// is left disabled with every transaction aborted (the host's devices
/// behind it cannot master DMA at all), and the log says why.
pub fn boot(desc: &SmmuV3, vtcr: u64, vttbr: u64, ipa_bits: u32) {
    match init(desc, vtcr, vttbr, ipa_bits) {
        Ok(summary) => {
            let f = summary.features;
            crate::log!(
                "smmu: SMMUv3 at {:#x} owned by the core: streams 0x0..{:#x} translate through the host's stage-2 (VMID {}, {}-bit IPA; SMMU {}-bit OAS, {}-bit stream IDs, {} stream table{})",
                desc.regs.base,
                summary.streams,
                vttbr >> 48,
                ipa_bits,
                f.oas_bits,
                f.sid_bits,
                if f.two_level_table {
                    "2-level"
                } else {
                    "linear"
                },
                if f.fwb {
                    ", FWB available and unused"
                } else {
                    ""
                }
            );
            if let Some(from) = summary.refused_from {
                crate::log!(
                    "smmu: streams from {from:#x} up have no entry: their transactions are refused (C_BAD_STREAMID)"
                );
            }
        }
        Err(why) => crate::log!(
            "smmu: SMMUv3 at {:#x} NOT used: {why}; it stays disabled and aborts every DMA transaction",
            desc.regs.base
        ),
    }
}
