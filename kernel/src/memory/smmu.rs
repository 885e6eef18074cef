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

use crate::arch::mmio;
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
    unsafe { mmio::read32((base + offset) as u64) }
}

fn write32(base: usize, offset: usize, value: u32) {
    // SAFETY: as in `read32`.
    unsafe { mmio::write32((base + offset) as u64, value) }
}

fn write64(base: usize, offset: usize, value: u64) {
    // SAFETY: as in `read32`, for a 64-bit register (8-byte aligned).
    unsafe { mmio::write64((base + offset) as u64, value) }
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
    let (smmu, summary) = take(desc, vtcr, vttbr, ipa_bits)?;
    SMMU.call_once(|| Mutex::new(smmu));
    Ok(summary)
}

/// What [`init`] does before the SMMU is the core's for good.
fn take(
    desc: &SmmuV3,
    vtcr: u64,
    vttbr: u64,
    ipa_bits: u32,
) -> Result<(Smmu, Summary), &'static str> {
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
    // A two-level table needs at least one level-2 table's worth of stream
    // ID bits: an SMMU with fewer gets a linear table.
    let (streams, covered, table_base, table_cfg) = if features.two_level_table && log2 >= SPLIT {
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
    let end = desc.streams_end();
    Ok((
        s,
        Summary {
            streams: covered.min(end),
            refused_from: (end > covered).then_some(covered),
            features,
        },
    ))
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

    /// [`host_stage2_changed`] for this SMMU.
    fn stage2_changed(&mut self) {
        if self.failed {
            return;
        }
        // The table writes are complete (the stage-2 code's own barriers)
        // before the invalidation is queued.
        let vmid = self.vmid;
        if let Err(why) = self.submit(&[Command::TlbiS12Vmall { vmid }, Command::Sync]) {
            self.fail_closed(why);
        }
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
    smmu.lock().stage2_changed();
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
    smmu.lock().check_streams(host_vttbr)
}

impl Smmu {
    /// [`check_streams`] for this SMMU.
    fn check_streams(&self, host_vttbr: u64) -> Result<u64, StreamMismatch> {
        if self.failed {
            return Ok(0);
        }
        if read32(self.base, reg::CR0) & CR0_SMMUEN == 0 {
            return Err(StreamMismatch::Disabled);
        }
        if self.ste[3] != host_vttbr & 0x0000_ffff_ffff_fffe
            || self.ste[2] & 0xffff != host_vttbr >> 48
        {
            return Err(StreamMismatch::Entry { stream: 0 });
        }
        let check_table = |table: usize, entries: usize, first: u64| {
            for i in 0..entries {
                if read_words::<8>(table + i * STE_BYTES) != self.ste {
                    return Err(StreamMismatch::Entry {
                        stream: first + i as u64,
                    });
                }
            }
            Ok(entries as u64)
        };
        match &self.streams {
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

#[cfg(test)]
mod tests {
    //! The driver against a model of an SMMUv3 (`arch::mmio::FakeSmmu`):
    //! the stream table it builds, the command queue it fills and waits
    //! on, the event queue it drains, and how it gives up on an SMMU that
    //! stops answering. Each test has an SMMU of its own, at an address of
    //! its own.

    use super::*;
    use crate::arch::mmio::{self, FakeSmmu};
    use crate::arch::take_lines;
    use moat_platform::dt::Range;
    use moat_platform::iommu::StreamRange;

    /// S2P, AArch64 tables, coherent walks, 16-bit VMIDs, two-level stream
    /// tables.
    const IDR0: u32 = 1 | (0b10 << 2) | (1 << 4) | (1 << 18) | (1 << 27);
    const IDR0_LINEAR: u32 = IDR0 & !(0b11 << 27);
    /// 48-bit output addresses, 4 KiB granule.
    const IDR5: u32 = 5 | (1 << 4);
    /// The host's stage-2: VMID 7, its root table.
    const VTTBR: u64 = (7 << 48) | 0x4123_4000;

    /// IDR1 with 16-bit stream IDs, 2^7 events and 2^`cmdq_log2` commands.
    const fn idr1(cmdq_log2: u32) -> u32 {
        16 | (7 << 16) | (cmdq_log2 << 21)
    }

    fn vtcr() -> u64 {
        moat_kernel::el2config::vtcr(40, 5).0
    }

    /// A model attached for one test, taken away after it.
    struct Attached(usize);

    impl Drop for Attached {
        fn drop(&mut self) {
            mmio::detach(self.0 as u64);
        }
    }

    fn attach(base: usize, smmu: FakeSmmu) -> Attached {
        mmio::attach(base as u64, 0x2_0000, smmu);
        Attached(base)
    }

    fn fake<R>(base: usize, f: impl FnOnce(&mut FakeSmmu) -> R) -> R {
        mmio::with(base as u64, f)
    }

    fn desc(base: usize, streams: &[(u32, u32)]) -> SmmuV3 {
        SmmuV3 {
            regs: Range {
                base: base as u64,
                size: 0x2_0000,
            },
            streams: streams
                .iter()
                .map(|&(first, count)| StreamRange {
                    first,
                    count,
                    first_rid: None,
                })
                .collect(),
            phandle: None,
        }
    }

    fn words(commands: &[Command]) -> Vec<[u64; 2]> {
        commands.iter().map(|c| c.encode()).collect()
    }

    /// The SMMU attached at `base` taken as at boot.
    fn booted(base: usize, streams: &[(u32, u32)]) -> (Smmu, Summary) {
        take(&desc(base, streams), vtcr(), VTTBR, 40).unwrap()
    }

    fn host_entry() -> [u64; 8] {
        smmu::host_ste(vtcr(), VTTBR & 0x0000_ffff_ffff_fffe, 7, 5)
    }

    /// An SMMU with two-level tables but fewer stream ID bits than one
    /// level-2 table spans gets a linear table of all its streams.
    #[test]
    fn few_stream_id_bits_get_a_linear_table() {
        let base = 0x1800_0000;
        // IDR1 with 6-bit stream IDs.
        let idr1 = (idr1(8) & !0x3f) | 6;
        let _smmu = attach(base, FakeSmmu::new(IDR0, idr1, 0, IDR5));
        let (s, summary) = booted(base, &[(0, 64)]);
        assert_eq!(summary.streams, 64);
        assert!(matches!(s.streams, Streams::Linear { .. }));
    }

    #[test]
    fn every_stream_gets_the_hosts_entry_and_streams_past_the_tables_none() {
        let base = 0x1000_0000;
        let _smmu = attach(base, FakeSmmu::new(IDR0, idr1(8), 0, IDR5));
        // Streams up to 0x1304: a 2^13-stream table, of which the core
        // makes the first 16 level-2 tables (4096 streams).
        let (s, summary) = booted(base, &[(0, 8), (0x1300, 4)]);
        assert_eq!(summary.streams, 0x1000);
        assert_eq!(summary.refused_from, Some(0x1000));
        let Streams::TwoLevel { l1, l1_entries, l2 } = &s.streams else {
            panic!("a linear table on an SMMU with two-level tables");
        };
        assert_eq!((*l1_entries, l2.len()), (32, MAX_L2_TABLES));
        for i in 0..*l1_entries {
            let [d] = read_words::<1>(l1 + i * 8);
            let want = l2.get(i).map_or(0, |t| smmu::l1_descriptor(*t as u64));
            assert_eq!(d, want, "level-1 descriptor {i}");
        }
        for t in l2 {
            for stream in [0, 1, 0xff] {
                assert_eq!(read_words::<8>(t + stream * STE_BYTES), host_entry());
            }
        }
        fake(base, |f| {
            assert_eq!(f.regs.get(reg::STRTAB_BASE as u64), BASE_RA | *l1 as u64);
            assert_eq!(
                f.reg32(reg::STRTAB_BASE_CFG),
                smmu::strtab_base_cfg_2level(13)
            );
            assert_eq!(f.reg32(reg::CR0), CR0_CMDQEN | CR0_EVENTQEN | CR0_SMMUEN);
            assert_ne!(f.reg32(reg::GBPA) & GBPA_ABORT, 0);
            // Nothing cached from before: configurations and TLBs, then
            // a SYNC the core waited for.
            assert_eq!(
                f.commands,
                words(&[Command::CfgiAll, Command::TlbiNsnhAll, Command::Sync])
            );
        });
        assert_eq!(s.check_streams(VTTBR).unwrap(), 0x1000);
    }

    #[test]
    fn a_linear_table_covers_at_most_4096_streams() {
        let base = 0x1010_0000;
        let _smmu = attach(base, FakeSmmu::new(IDR0_LINEAR, idr1(8), 0, IDR5));
        let (s, summary) = booted(base, &[(0, 0x40)]);
        // At least one level-2 table's worth, even linear.
        assert_eq!((summary.streams, summary.refused_from), (0x40, None));
        assert_eq!(s.check_streams(VTTBR).unwrap(), 0x100);
        fake(base, |f| assert_eq!(f.reg32(reg::STRTAB_BASE_CFG), 8));
        drop(s);

        let base = 0x1014_0000;
        let _smmu = attach(base, FakeSmmu::new(IDR0_LINEAR, idr1(8), 0, IDR5));
        let (s, summary) = booted(base, &[(0x1ff0, 0x20)]);
        assert_eq!(summary.refused_from, Some(0x1000));
        let Streams::Linear { table, entries } = s.streams else {
            panic!("a two-level table on an SMMU without");
        };
        assert_eq!(entries, 0x1000);
        assert_eq!(read_words::<8>(table + 0xfff * STE_BYTES), host_entry());
        fake(base, |f| assert_eq!(f.reg32(reg::STRTAB_BASE_CFG), 12));
    }

    #[test]
    fn the_checker_finds_an_entry_or_a_descriptor_changed_behind_the_cores_back() {
        let base = 0x1020_0000;
        let _smmu = attach(base, FakeSmmu::new(IDR0, idr1(8), 0, IDR5));
        let (s, _) = booted(base, &[(0, 0x1800)]);
        let Streams::TwoLevel { l1, ref l2, .. } = s.streams else {
            unreachable!()
        };
        // A stream's entry bypassing translation (Config = 0b100).
        let at = l2[1] + 5 * STE_BYTES;
        write_words(at, &[1 | (0b100 << 1)]);
        assert!(matches!(
            s.check_streams(VTTBR),
            Err(StreamMismatch::Entry { stream: 0x105 })
        ));
        write_words(at, &host_entry()[..1]);
        // A level-1 descriptor past the core's tables made valid.
        write_words(l1 + 20 * 8, &[smmu::l1_descriptor(l2[0] as u64)]);
        assert!(matches!(
            s.check_streams(VTTBR),
            Err(StreamMismatch::Level1 { index: 20 })
        ));
        write_words(l1 + 20 * 8, &[0]);
        assert_eq!(s.check_streams(VTTBR).unwrap(), 0x1000);
        // The host's stage-2 is not the one the entries name.
        assert!(matches!(
            s.check_streams(VTTBR + 0x1000),
            Err(StreamMismatch::Entry { stream: 0 })
        ));
        // Translation turned off.
        fake(base, |f| f.set_reg32(reg::CR0, 0));
        assert!(matches!(
            s.check_streams(VTTBR),
            Err(StreamMismatch::Disabled)
        ));
        assert_eq!(StreamMismatch::Disabled.to_string(), "translation is off");
    }

    #[test]
    fn each_change_of_the_hosts_stage2_is_invalidated_and_waited_for_across_the_queue_wrap() {
        let base = 0x1030_0000;
        let _smmu = attach(base, FakeSmmu::new(IDR0, idr1(2), 0, IDR5));
        let (mut s, _) = booted(base, &[(0, 8)]);
        // A four-command queue: the boot's three, then two a change.
        assert_eq!(s.cmdq_index.log2, 2);
        fake(base, |f| {
            assert_eq!(f.regs.get(reg::CMDQ_BASE as u64) & 0x1f, 2);
            f.commands.clear();
        });
        for _ in 0..6 {
            s.stage2_changed();
        }
        let mut want = Vec::new();
        for _ in 0..6 {
            want.extend(words(&[Command::TlbiS12Vmall { vmid: 7 }, Command::Sync]));
        }
        fake(base, |f| {
            assert_eq!(f.commands, want);
            // 3 + 12 commands: index 15, the wrap flag set.
            assert_eq!(f.reg32(reg::CMDQ_PROD), 15 & 7);
            assert_eq!(f.reg32(reg::CMDQ_CONS), f.reg32(reg::CMDQ_PROD));
        });
        assert!(!s.failed);
    }

    #[test]
    fn a_full_queue_is_refused_before_anything_is_published() {
        let base = 0x1040_0000;
        let _smmu = attach(base, FakeSmmu::new(IDR0, idr1(2), 0, IDR5));
        let (mut s, _) = booted(base, &[(0, 8)]);
        let prod = fake(base, |f| {
            f.commands.clear();
            f.reg32(reg::CMDQ_PROD)
        });
        // Five commands in a four-command queue.
        assert_eq!(
            s.submit(&[Command::Sync; 5]),
            Err("the command queue is full")
        );
        assert_eq!(fake(base, |f| f.reg32(reg::CMDQ_PROD)), prod);
        // An SMMU that lags: four fill the queue, and it takes none.
        fake(base, |f| f.hold = true);
        assert_eq!(
            s.submit(&[Command::Sync; 4]),
            Err("the SMMU did not complete its commands")
        );
        assert_eq!(s.submit(&[Command::Sync]), Err("the command queue is full"));
        // It catches up: there is room again.
        fake(base, |f| {
            f.hold = false;
            f.consume();
            assert_eq!(f.commands.len(), 4);
        });
        assert_eq!(s.submit(&[Command::CfgiAll, Command::Sync]), Ok(()));
        fake(base, |f| assert_eq!(f.commands.len(), 6));
    }

    #[test]
    fn an_smmu_that_stops_answering_is_given_up_on_and_every_transaction_aborts() {
        let base = 0x1050_0000;
        let _smmu = attach(base, FakeSmmu::new(IDR0, idr1(8), 0, IDR5));
        let (mut s, _) = booted(base, &[(0, 8)]);
        take_lines();
        fake(base, |f| f.hold = true);
        s.stage2_changed();
        assert!(s.failed);
        fake(base, |f| {
            assert_eq!(f.reg32(reg::CR0), 0);
            assert_eq!(f.reg32(reg::GBPA), GBPA_ABORT);
        });
        assert!(take_lines()[0].contains("every DMA transaction is aborted"));
        // Nothing more is queued, and the checker has nothing to check.
        let prod = fake(base, |f| f.reg32(reg::CMDQ_PROD));
        s.stage2_changed();
        assert_eq!(s.submit(&[Command::Sync]), Err("the SMMU was given up on"));
        assert_eq!(fake(base, |f| f.reg32(reg::CMDQ_PROD)), prod);
        assert_eq!(s.check_streams(VTTBR).unwrap(), 0);
    }

    #[test]
    fn a_command_the_smmu_refuses_is_reported_and_the_smmu_given_up_on() {
        let base = 0x1060_0000;
        let _smmu = attach(base, FakeSmmu::new(IDR0, idr1(8), 0, IDR5));
        let (mut s, _) = booted(base, &[(0, 8)]);
        take_lines();
        fake(base, |f| f.refuse = Some(0x28));
        s.stage2_changed();
        assert!(s.failed);
        let lines = take_lines();
        assert_eq!(lines[0], "moat: smmu: command error 0x1");
        assert!(lines[1].contains("the SMMU refused a command"));
    }

    #[test]
    fn an_smmu_the_core_cannot_use_is_left_off_and_aborting() {
        let base = 0x1070_0000;
        let _smmu = attach(base, FakeSmmu::new(IDR0 & !1, idr1(8), 0, IDR5));
        let r = take(&desc(base, &[(0, 8)]), vtcr(), VTTBR, 40);
        assert_eq!(r.err(), Some("it has no stage-2 translation (IDR0.S2P)"));
        fake(base, |f| {
            assert_eq!(f.reg32(reg::CR0), 0);
            assert_eq!(f.reg32(reg::GBPA), GBPA_ABORT);
            assert!(f.commands.is_empty());
        });
        // One that never acknowledges its queue's enable.
        let base = 0x1074_0000;
        let mut deaf = FakeSmmu::new(IDR0, idr1(8), 0, IDR5);
        deaf.deaf = true;
        let _deaf = attach(base, deaf);
        let r = take(&desc(base, &[(0, 8)]), vtcr(), VTTBR, 40);
        assert_eq!(r.err(), Some("the SMMU did not acknowledge"));
    }

    #[test]
    fn every_event_is_counted_and_an_overflow_noticed() {
        let base = 0x1080_0000;
        let _smmu = attach(base, FakeSmmu::new(IDR0, idr1(8), 0, IDR5));
        let (mut s, _) = booted(base, &[(0, 8)]);
        take_lines();
        // The SMMU records two stage-2 translation faults.
        for (slot, stream) in [(0usize, 0x10u64), (1, 0x11)] {
            write_words(
                s.evtq + slot * EVENT_BYTES,
                &[0x10 | (stream << 32), (1 << 35) | (1 << 39), 0x8000_0000, 0],
            );
        }
        fake(base, |f| f.set_reg32(reg::EVENTQ_PROD, 2));
        s.drain();
        assert_eq!(s.events, 2);
        fake(base, |f| assert_eq!(f.reg32(reg::EVENTQ_CONS), 2));
        let lines = take_lines();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].contains("F_TRANSLATION (0x10) stream 0x11 read 0x80000000 at stage 2"));
        // It lost some since: the overflow flag is acknowledged once.
        fake(base, |f| f.set_reg32(reg::EVENTQ_PROD, 2 | EVENTQ_OVERFLOW));
        s.drain();
        s.drain();
        assert_eq!((s.events, s.overflows), (2, 1));
        fake(base, |f| {
            assert_eq!(f.reg32(reg::EVENTQ_CONS), 2 | EVENTQ_OVERFLOW);
        });
    }
}
