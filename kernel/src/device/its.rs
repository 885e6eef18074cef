//! The GICv3 ITS and the redistributors' LPI registers, kept from the host
//! and emulated.
//!
//! The page of each ITS control frame (GITS_CTLR, GITS_CBASER,
//! GITS_CWRITER, GITS_CREADR, GITS_BASERn) and the first page of each
//! redistributor's RD_base frame (GICR_CTLR, GICR_PROPBASER,
//! GICR_PENDBASER) are withheld from the host's stage-2; every access the
//! host makes to them is a data abort the core emulates here. GITS_TRANSLATER
//! (the ITS's second frame) stays mapped: devices and the host write MSIs
//! there, which names no memory.
//!
//! What reaches the hardware:
//!
//! - a device or collection table (GITS_BASERn) only once its pages are
//!   host RAM the host owns, donated to the hypervisor through the ledger
//!   (the host loses them; they come back, scrubbed, when the host
//!   reprograms the register with the ITS disabled);
//! - the command queue the hardware reads is the core's own page: the host
//!   writes commands into its queue (GITS_CBASER names it: host RAM, shared
//!   with the hypervisor for as long as it is in use, so it cannot be given
//!   away), and on each GITS_CWRITER write the core copies each command,
//!   checks it (`moat_kernel::its::check`) and forwards it, one at a time,
//!   waiting for the hardware to take it. A command that fails its check is
//!   dropped and counted; the host's GITS_CREADR moves past it as an ITS
//!   without SEIS moves past a command in error;
//! - every MAPD gets an ITT the core allocates from its own memory: the ITS
//!   writes ITTs, and a host's ITT lies in memory the host keeps using for
//!   other things (Linux allocates it with the slab allocator), so it can
//!   neither be left writable to the hardware nor taken from the host. The
//!   host's ITT address must still be memory the host owns;
//! - a redistributor's property table (read by the hardware, written by the
//!   host whenever it configures an LPI) is shared with the hypervisor, and
//!   its pending table (written by the hardware) donated, when the host
//!   sets GICR_CTLR.EnableLPIs: GICR_PROPBASER and GICR_PENDBASER hold what
//!   the host wrote until then, and reach the hardware only with the
//!   enable. With LPIs on they cannot change (the architecture makes them
//!   read-only then).

use crate::arch::cache;
use crate::base::cpu::PerCpu;
use crate::base::state::machine;
use crate::memory;
use alloc::vec::Vec;
use core::ptr::{read_volatile, write_volatile};
use moat_abi::Error;
use moat_abi::services::{FrameRange, LedgerRequest};
use moat_kernel::esr::StageTwoAbort;
use moat_kernel::its::{
    self as logic, COMMAND_BYTES, Command, ItsTyper, Limits, PAGE, Refusal, Table, TableKind, gicr,
    gits, merge, read_half as half,
};
use moat_kernel::lockorder::Rank;
use moat_kernel::regs::GuestRegs;
use moat_platform::dt::{Gic, MAX_ITS, Range};

/// Most redistributors the core tracks.
const MAX_REDISTRIBUTORS: usize = 16;
/// Bytes of the core's command queue for each ITS (commands are forwarded
/// one at a time, so one page is plenty).
const SHADOW_QUEUE_BYTES: u64 = PAGE;
/// Most bytes of the core's memory the ITTs of one ITS may take.
const ITT_BUDGET: u64 = 1 << 20;
/// Polls of GITS_CREADR before the core gives up on the hardware.
const PATIENCE: u32 = 10_000_000;
/// Refused commands logged in full; later ones are only counted.
const LOGGED_REFUSALS: u64 = 32;

fn rd32(addr: u64) -> u32 {
    // SAFETY: `addr` is a register of an ITS or redistributor frame the
    // core maps as device memory at EL2.
    unsafe { read_volatile(addr as *const u32) }
}

fn rd64(addr: u64) -> u64 {
    // SAFETY: as for `rd32`; the registers read 64 bits at a time are
    // 64-bit registers.
    unsafe { read_volatile(addr as *const u64) }
}

fn wr32(addr: u64, v: u32) {
    // SAFETY: as for `rd32`.
    unsafe { write_volatile(addr as *mut u32, v) }
}

fn wr64(addr: u64, v: u64) {
    // SAFETY: as for `rd64`.
    unsafe { write_volatile(addr as *mut u64, v) }
}

/// An ITT the core allocated for one device.
struct Itt {
    device: u32,
    event_bits: u32,
    pa: u64,
    bytes: u64,
}

impl Itt {
    fn layout(bytes: u64) -> Option<core::alloc::Layout> {
        core::alloc::Layout::from_size_align(bytes as usize, logic::ITT_ALIGN as usize).ok()
    }

    /// A zeroed ITT of `bytes` from the core's heap, cleaned to the point
    /// of coherency for an ITS that does not snoop.
    fn allocate(device: u32, event_bits: u32, bytes: u64) -> Option<Self> {
        let layout = Self::layout(bytes)?;
        // SAFETY: a non-zero size (at least 256 bytes) and a power-of-two
        // alignment; the block is freed by `free` with the same layout.
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        if p.is_null() {
            return None;
        }
        let pa = p as u64;
        cache::clean_dcache_to_poc(pa, bytes);
        Some(Self {
            device,
            event_bits,
            pa,
            bytes,
        })
    }

    /// Keeps the block allocated for good (nothing but [`Itt::free`]
    /// returns one to the heap): for memory the hardware may still use.
    fn keep(self) {
        let Self { .. } = self;
    }

    fn free(self) {
        if let Some(layout) = Self::layout(self.bytes) {
            // SAFETY: allocated by `allocate` with this layout; the
            // hardware no longer uses it (the command that replaced or
            // unmapped it has completed).
            unsafe { alloc::alloc::dealloc(self.pa as *mut u8, layout) };
        }
    }
}

/// One ITS.
struct Its {
    /// The control frame.
    base: u64,
    typer: ItsTyper,
    /// GITS_TYPER.HCC: collections the ITS holds without a table.
    hardware_collections: u64,
    /// What the host wrote to GITS_CBASER (Valid cleared if refused).
    host_cbaser: u64,
    /// The host's queue, shared with the hypervisor while it is in use.
    host_queue: Option<(u64, u64)>,
    host_cwriter: u64,
    host_creadr: u64,
    /// The core's queue, which the hardware reads.
    shadow: u64,
    shadow_write: u64,
    /// The hardware stopped taking commands: nothing more is forwarded.
    stuck: bool,
    /// The donated table behind each GITS_BASERn.
    tables: [Option<Table>; gits::BASERS as usize],
    itts: Vec<Itt>,
    itt_bytes: u64,
    refused: u64,
}

/// One redistributor's LPI state.
struct Redistributor {
    /// Its RD_base frame.
    base: u64,
    /// GICR_TYPER.Processor_Number, what a MAPC names without PTA.
    processor: u64,
    host_propbaser: u64,
    host_pendbaser: u64,
    /// The property table (shared) and pending table (donated) the
    /// hardware was given with EnableLPIs.
    property: Option<(u64, u64)>,
    pending: Option<(u64, u64)>,
}

struct State {
    its: heapless::Vec<Its, MAX_ITS>,
    redistributors: heapless::Vec<Redistributor, MAX_REDISTRIBUTORS>,
    /// The distributor's INTID bits (GICD_TYPER.IDbits + 1).
    intid_bits: u32,
    /// Pages shared with the hypervisor on the host's behalf, with users.
    pinned: heapless::Vec<((u64, u64), u32), { MAX_ITS + MAX_REDISTRIBUTORS }>,
}

static STATE: spin::Once<spin::Mutex<State>> = spin::Once::new();

/// The pages withheld from the host: each ITS's control page and each
/// redistributor's first page. Empty on a GICv2 machine.
pub fn withheld() -> heapless::Vec<Range, { MAX_ITS + MAX_REDISTRIBUTORS }> {
    let mut out = heapless::Vec::new();
    if let Some(state) = STATE.get() {
        let _order = crate::base::lockcheck::hold(Rank::Gic);
        let state = state.lock();
        for base in state
            .its
            .iter()
            .map(|i| i.base)
            .chain(state.redistributors.iter().map(|r| r.base))
        {
            if let Some(r) = Range::new(base, PAGE) {
                let _ = out.push(r);
            }
        }
    }
    out
}

/// Every redistributor frame of a GICv3 (the regions walked as the
/// architecture lays them out).
fn redistributor_frames(gic: &Gic) -> heapless::Vec<(u64, u64), MAX_REDISTRIBUTORS> {
    let mut out = heapless::Vec::new();
    if let Gic::V3 { redistributors, .. } = gic {
        for region in redistributors {
            let mut frame = region.base;
            while frame + 0x2_0000 <= region.end() {
                let typer = rd64(frame + gicr::TYPER);
                if out.push((frame, (typer >> 8) & 0xffff)).is_err() {
                    return out;
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
    }
    out
}

/// At boot, with the ITS frames and the redistributors mapped at EL2:
/// records every ITS and redistributor and gives each ITS the core's
/// command queue. Returns how many ITSs and redistributors it took.
pub fn init(gic: &Gic, its_frames: &[Range]) -> (usize, usize) {
    let Gic::V3 { distributor, .. } = gic else {
        return (0, 0);
    };
    let intid_bits = ((rd32(distributor.base + 0x4) >> 19) & 0x1f) + 1;
    let mut state = State {
        its: heapless::Vec::new(),
        redistributors: heapless::Vec::new(),
        intid_bits,
        pinned: heapless::Vec::new(),
    };
    for (base, processor) in redistributor_frames(gic) {
        if rd32(base + gicr::CTLR) & gicr::CTLR_ENABLE_LPIS != 0 {
            // LPIs the firmware turned on may not turn off again: the
            // tables it gave stay in use, which the core cannot vouch for.
            crate::log!(
                "GICR {base:#x}: LPIs already on at boot with GICR_PENDBASER {:#x}: left as they are",
                rd64(base + gicr::PENDBASER)
            );
        }
        let _ = state.redistributors.push(Redistributor {
            base,
            processor,
            host_propbaser: 0,
            host_pendbaser: 0,
            property: None,
            pending: None,
        });
    }
    for frame in its_frames {
        let base = frame.base;
        let typer = rd64(base + gits::TYPER);
        // The hardware starts with no queue and no tables: an ITS the
        // firmware left on is turned off first (its tables may lie in what
        // is now the host's memory).
        wr32(
            base + gits::CTLR,
            rd32(base + gits::CTLR) & !gits::CTLR_ENABLED,
        );
        let mut polls = 0;
        while !its_quiet(base) && polls < PATIENCE {
            polls += 1;
            core::hint::spin_loop();
        }
        if !its_quiet(base) {
            crate::log!("ITS {base:#x}: does not go quiet; left out (the host cannot reach it)");
            continue;
        }
        wr64(base + gits::CBASER, 0);
        for n in 0..gits::BASERS {
            let at = base + gits::BASER0 + 8 * n;
            wr64(at, rd64(at) & !logic::BASER_VALID);
        }
        let Some(shadow) = shadow_queue() else {
            crate::log!("ITS {base:#x}: no memory for the core's command queue; left off");
            continue;
        };
        let _ = state.its.push(Its {
            base,
            typer: ItsTyper::decode(typer),
            hardware_collections: (typer >> 24) & 0xff,
            host_cbaser: 0,
            host_queue: None,
            host_cwriter: 0,
            host_creadr: 0,
            shadow,
            shadow_write: 0,
            stuck: false,
            tables: [None; gits::BASERS as usize],
            itts: Vec::new(),
            itt_bytes: 0,
            refused: 0,
        });
    }
    let counts = (state.its.len(), state.redistributors.len());
    STATE.call_once(|| spin::Mutex::new(state));
    counts
}

/// A zeroed page from the core's heap for an ITS's command queue, cleaned
/// to the point of coherency. GITS_CBASER holds a page number, so the
/// queue is page-aligned; it lives as long as the core.
fn shadow_queue() -> Option<u64> {
    let layout =
        core::alloc::Layout::from_size_align(SHADOW_QUEUE_BYTES as usize, PAGE as usize).ok()?;
    // SAFETY: a non-zero size and a power-of-two alignment; the block is
    // never freed.
    let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
    if p.is_null() {
        return None;
    }
    let pa = p as u64;
    cache::clean_dcache_to_poc(pa, SHADOW_QUEUE_BYTES);
    Some(pa)
}

/// The GIC state held for the consistency checker: taken before the
/// memory lock, as every emulated access takes them.
pub struct Held {
    state: spin::MutexGuard<'static, State>,
    // Declared after the guard, so dropped after it: the lock is released
    // before the order record says so.
    _order: crate::base::lockcheck::Holding,
}

/// Locks the GIC state for [`Held::check`]; `None` without an ITS or
/// redistributor the core emulates.
pub fn hold() -> Option<Held> {
    STATE.get().map(|s| {
        let _order = crate::base::lockcheck::hold(Rank::Gic);
        Held {
            state: s.lock(),
            _order,
        }
    })
}

/// A table or register the checker found wrong: its address and why.
pub type Finding = (u64, &'static str);

impl crate::memory::GicTables for Held {
    fn check(
        &self,
        carve_out: &[Range],
        extent_of: impl Fn(u64) -> Option<moat_abi::services::LedgerExtent> + Copy,
        host_maps: impl Fn(u64, u64, bool) -> bool,
    ) -> Result<u64, Finding> {
        Held::check(self, carve_out, extent_of, host_maps)
    }
}

impl Held {
    /// Checks every table and queue the GIC hardware uses: the ones the
    /// core took are held as the hardware needs (`logic::check_holding`
    /// against the ledger, and the host's stage-2 through `host_maps`,
    /// which says whether every page of a range is mapped for the host or
    /// none is), and the hardware's registers name exactly those. Returns
    /// how many tables and queues it checked.
    pub fn check(
        &self,
        carve_out: &[Range],
        extent_of: impl Fn(u64) -> Option<moat_abi::services::LedgerExtent> + Copy,
        host_maps: impl Fn(u64, u64, bool) -> bool,
    ) -> Result<u64, Finding> {
        use logic::Holding;
        let state = &self.state;
        let mut count = 0;
        let mut held = |holding, pa: u64, size: u64| -> Result<(), Finding> {
            logic::check_holding(holding, pa, size, carve_out, extent_of)?;
            let mapped = match holding {
                Holding::Donated => Some(false),
                Holding::Pinned => Some(true),
                Holding::Core => None,
            };
            if let Some(m) = mapped
                && !host_maps(pa, size, m)
            {
                return Err((
                    pa,
                    "the host's stage-2 disagrees with how a GIC table is held",
                ));
            }
            count += 1;
            Ok(())
        };
        for ((pa, size), _) in &state.pinned {
            held(Holding::Pinned, *pa, *size)?;
        }
        for its in &state.its {
            held(Holding::Core, its.shadow, SHADOW_QUEUE_BYTES)?;
            for itt in &its.itts {
                held(Holding::Core, itt.pa, itt.bytes)?;
            }
            for (n, table) in its.tables.iter().enumerate() {
                let hw = rd64(its.base + gits::BASER0 + 8 * n as u64);
                let in_use = logic::decode_baser(hw & !logic::BASER_INDIRECT)
                    .ok()
                    .flatten();
                match (table, in_use) {
                    (Some(t), Some(u)) if (t.pa, t.size) == (u.pa, u.size) => {
                        held(Holding::Donated, t.pa, t.size)?;
                    }
                    (_, None) if hw & logic::BASER_VALID == 0 => {
                        if let Some(t) = table {
                            held(Holding::Donated, t.pa, t.size)?;
                        }
                    }
                    _ => {
                        return Err((
                            its.base + gits::BASER0 + 8 * n as u64,
                            "a GITS_BASER names a table the core did not take",
                        ));
                    }
                }
            }
            let cbaser = rd64(its.base + gits::CBASER);
            if let Some((pa, _)) = logic::decode_cbaser(cbaser)
                && pa != its.shadow
            {
                return Err((
                    its.base + gits::CBASER,
                    "the ITS reads a queue not the core's",
                ));
            }
            if let Some((pa, size)) = its.host_queue
                && !state.pinned.iter().any(|(r, _)| *r == (pa, size))
            {
                return Err((pa, "the host's command queue in use is not shared"));
            }
        }
        for r in &state.redistributors {
            if let Some((pa, size)) = r.pending {
                held(Holding::Donated, pa, size)?;
            }
            if rd32(r.base + gicr::CTLR) & gicr::CTLR_ENABLE_LPIS == 0 {
                continue;
            }
            let prop = rd64(r.base + gicr::PROPBASER) & (((1 << 52) - 1) & !0xfff);
            let pend = rd64(r.base + gicr::PENDBASER) & (((1 << 52) - 1) & !0xffff);
            if r.property.map(|(pa, _)| pa) != Some(prop) {
                return Err((
                    r.base + gicr::PROPBASER,
                    "LPIs on with a property table the core did not take",
                ));
            }
            if r.pending.map(|(pa, _)| pa) != Some(pend) {
                return Err((
                    r.base + gicr::PENDBASER,
                    "LPIs on with a pending table the core did not take",
                ));
            }
            if let Some((pa, size)) = r.property
                && !state.pinned.iter().any(|(p, _)| *p == (pa, size))
            {
                return Err((pa, "a property table in use is not shared"));
            }
        }
        Ok(count)
    }
}

/// The result of emulating one access.
enum Emulated {
    /// A read's value.
    Read(u64),
    Written,
}

/// A host data abort on an IPA: `true` if it was one of the withheld GIC
/// pages and was emulated (or refused with an abort), `false` if the page
/// is not the core's to emulate.
pub fn handle_abort(cpu: &PerCpu, regs: &mut GuestRegs, abort: &StageTwoAbort, ipa: u64) -> bool {
    let Some(state) = STATE.get() else {
        return false;
    };
    let page = ipa & !(PAGE - 1);
    let offset = ipa - page;
    let _order = crate::base::lockcheck::hold(Rank::Gic);
    let mut state = state.lock();
    let its = state.its.iter().position(|i| i.base == page);
    let rd = state.redistributors.iter().position(|r| r.base == page);
    if its.is_none() && rd.is_none() {
        return false;
    }
    // Only single 32- and 64-bit accesses, naturally aligned: what a
    // driver makes (an access the syndrome does not describe, or of
    // another size, gets the abort an unmapped page would give).
    let access = match abort.access {
        Some(a)
            if !abort.is_instruction
                && (a.size_log2 == 2 || a.size_log2 == 3)
                && offset.is_multiple_of(1 << a.size_log2) =>
        {
            a
        }
        _ => {
            drop(state);
            crate::base::inject::inject_abort(
                regs,
                abort.is_instruction,
                abort.is_write,
                crate::arch::sysreg::far_el2(),
            );
            return true;
        }
    };
    let wide = access.size_log2 == 3;
    let value = if access.is_write {
        regs.read_gpr(access.rt)
    } else {
        0
    };
    let done = match (its, rd) {
        (Some(i), _) => its_access(cpu, &mut state, i, offset, wide, access.is_write, value),
        (None, Some(r)) => rd_access(cpu, &mut state, r, offset, wide, access.is_write, value),
        (None, None) => return false,
    };
    drop(state);
    if let Emulated::Read(v) = done {
        regs.write_gpr(access.rt, access.loaded_value(v));
    }
    regs.pc = regs.pc.wrapping_add(4);
    true
}

fn frames(pa: u64, size: u64) -> FrameRange {
    FrameRange {
        start: pa / PAGE,
        count: size / PAGE,
    }
}

/// Whether `[pa, pa + size)` is RAM the host owns (mapped in its stage-2
/// with an owner's access).
fn host_owned(pa: u64, size: u64) -> bool {
    let Some(end) = pa.checked_add(size) else {
        return false;
    };
    let ram = machine()
        .platform
        .memory
        .iter()
        .any(|b| b.base <= pa && end <= b.end());
    ram && memory::host_owns(pa, size)
}

fn ledger(cpu: &PerCpu, op: u32, pa: u64, size: u64) -> Result<(), Error> {
    memory::transact(
        cpu,
        LedgerRequest {
            op,
            party: 0,
            frames: frames(pa, size),
        },
        None,
    )
}

impl State {
    /// Shares `[pa, pa + size)` with the hypervisor for the hardware to
    /// read, or counts one more user of a range already shared.
    fn pin(&mut self, cpu: &PerCpu, pa: u64, size: u64) -> Result<(), Refusal> {
        if let Some((_, users)) = self.pinned.iter_mut().find(|(r, _)| *r == (pa, size)) {
            *users += 1;
            return Ok(());
        }
        if !host_owned(pa, size) {
            return Err(Refusal::NotOwned);
        }
        if self.pinned.is_full() {
            return Err(Refusal::NoMemory);
        }
        ledger(cpu, LedgerRequest::HOST_SHARE_HYP, pa, size).map_err(|_| Refusal::NotOwned)?;
        let _ = self.pinned.push(((pa, size), 1));
        Ok(())
    }

    fn unpin(&mut self, cpu: &PerCpu, pa: u64, size: u64) {
        let Some(i) = self.pinned.iter().position(|(r, _)| *r == (pa, size)) else {
            return;
        };
        self.pinned[i].1 -= 1;
        if self.pinned[i].1 == 0 {
            self.pinned.swap_remove(i);
            if let Err(e) = ledger(cpu, LedgerRequest::HOST_UNSHARE_HYP, pa, size) {
                crate::log!("GIC: unsharing {pa:#x}+{size:#x} failed ({e:?})");
            }
        }
    }
}

/// Takes `[pa, pa + size)` from the host for the hardware to write.
fn donate(cpu: &PerCpu, pa: u64, size: u64) -> Result<(), Refusal> {
    if !host_owned(pa, size) {
        return Err(Refusal::NotOwned);
    }
    ledger(cpu, LedgerRequest::HOST_DONATE_HYP, pa, size).map_err(|_| Refusal::NotOwned)
}

fn give_back(cpu: &PerCpu, pa: u64, size: u64) {
    if let Err(e) = ledger(cpu, LedgerRequest::HYP_RETURN_HOST, pa, size) {
        crate::log!("GIC: returning {pa:#x}+{size:#x} to the host failed ({e:?})");
    }
}

/// Whether host-shared pages `[pa, pa + size)` may be unshared by the host
/// (none of them is a table the hardware reads); calls `f` with the GIC
/// state locked, so no table can be pinned meanwhile.
pub fn unless_pinned<R>(pa: u64, size: u64, f: impl FnOnce() -> R) -> Option<R> {
    let Some(state) = STATE.get() else {
        return Some(f());
    };
    let _order = crate::base::lockcheck::hold(Rank::Gic);
    let state = state.lock();
    let end = pa.saturating_add(size);
    if state
        .pinned
        .iter()
        .any(|((p, s), _)| *p < end && pa < p.saturating_add(*s))
    {
        return None;
    }
    Some(f())
}

fn its_access(
    cpu: &PerCpu,
    state: &mut State,
    index: usize,
    offset: u64,
    wide: bool,
    is_write: bool,
    value: u64,
) -> Emulated {
    let base = state.its[index].base;
    let baser_end = gits::BASER0 + 8 * gits::BASERS;
    let reg64 = offset & !7;
    match (offset, is_write) {
        (gits::CTLR, false) => Emulated::Read(u64::from(rd32(base + gits::CTLR))),
        (gits::CTLR, true) => {
            let its = &state.its[index];
            let mut v = value as u32;
            // No queue of the host's, no ITS: enabling it would have the
            // hardware run the core's queue with nothing checked in it.
            if its.host_queue.is_none() {
                v &= !gits::CTLR_ENABLED;
            }
            wr32(base + gits::CTLR, v);
            Emulated::Written
        }
        // GITS_TYPER without Virtual: the core forwards no GICv4 command.
        (0x8 | 0xc, false) => Emulated::Read(half(
            rd64(base + gits::TYPER) & !(1 << 1),
            gits::TYPER,
            offset,
            wide,
        )),
        (gits::CBASER | 0x84, false) => Emulated::Read(half(
            state.its[index].host_cbaser,
            gits::CBASER,
            offset,
            wide,
        )),
        (gits::CBASER | 0x84, true) => {
            let v = merge(
                state.its[index].host_cbaser,
                gits::CBASER,
                offset,
                wide,
                value,
            );
            write_cbaser(cpu, state, index, v);
            Emulated::Written
        }
        (gits::CWRITER | 0x8c, false) => Emulated::Read(half(
            state.its[index].host_cwriter,
            gits::CWRITER,
            offset,
            wide,
        )),
        (gits::CWRITER | 0x8c, true) => {
            let its = &mut state.its[index];
            let v = merge(its.host_cwriter, gits::CWRITER, offset, wide, value);
            let write = v & 0xf_ffe0;
            if let Some((_, size)) = its.host_queue
                && write < size
            {
                its.host_cwriter = write;
                run_commands(state, index);
            }
            Emulated::Written
        }
        (gits::CREADR | 0x94, false) => Emulated::Read(half(
            state.its[index].host_creadr,
            gits::CREADR,
            offset,
            wide,
        )),
        (o, false) if (gits::BASER0..baser_end).contains(&o) => Emulated::Read(half(
            rd64(base + reg64) & !logic::BASER_INDIRECT,
            reg64,
            offset,
            wide,
        )),
        (o, true) if (gits::BASER0..baser_end).contains(&o) => {
            let n = ((reg64 - gits::BASER0) / 8) as usize;
            let old = rd64(base + reg64);
            let v = merge(old, reg64, offset, wide, value);
            write_baser(cpu, state, index, n, v);
            Emulated::Written
        }
        // Identification and status registers read as the hardware's;
        // nothing else on the page is the host's to write.
        (_, false) => Emulated::Read(if wide {
            rd64(base + offset)
        } else {
            u64::from(rd32(base + offset))
        }),
        (_, true) => Emulated::Written,
    }
}

/// Whether the ITS is off and has finished with its tables.
fn its_quiet(base: u64) -> bool {
    let ctlr = rd32(base + gits::CTLR);
    ctlr & gits::CTLR_ENABLED == 0 && ctlr & gits::CTLR_QUIESCENT != 0
}

fn write_cbaser(cpu: &PerCpu, state: &mut State, index: usize, v: u64) {
    let base = state.its[index].base;
    if !its_quiet(base) {
        // The architecture leaves a write with the ITS on unpredictable;
        // here it is ignored.
        return;
    }
    if let Some((pa, size)) = state.its[index].host_queue.take() {
        state.unpin(cpu, pa, size);
    }
    let queue = logic::decode_cbaser(v);
    let accepted = match queue {
        Some((pa, size)) => match state.pin(cpu, pa, size) {
            Ok(()) => Some((pa, size)),
            Err(why) => {
                crate::log!(
                    "ITS {base:#x}: command queue {pa:#x}+{size:#x} refused: {}",
                    why.describe()
                );
                None
            }
        },
        None => None,
    };
    let its = &mut state.its[index];
    its.host_queue = accepted;
    its.host_cbaser = if accepted.is_some() {
        v
    } else {
        v & !(1 << 63)
    };
    its.host_cwriter = 0;
    its.host_creadr = 0;
    its.shadow_write = 0;
    its.stuck = false;
    // The hardware always reads the core's queue: the host's
    // cacheability and shareability, the core's address and size.
    let attributes = v & ((0x7 << 59) | (0x7 << 53) | (0x3 << 10));
    let hw = if accepted.is_some() {
        (1 << 63) | attributes | its.shadow | (SHADOW_QUEUE_BYTES / PAGE - 1)
    } else {
        0
    };
    wr64(base + gits::CBASER, hw);
    wr64(base + gits::CWRITER, 0);
}

fn write_baser(cpu: &PerCpu, state: &mut State, index: usize, n: usize, v: u64) {
    let its = &mut state.its[index];
    let base = its.base;
    let at = base + gits::BASER0 + 8 * n as u64;
    if !its_quiet(base) {
        return;
    }
    // The hardware stops using the old table before it goes back.
    let old = rd64(at);
    wr64(at, old & !logic::BASER_VALID);
    if let Some(t) = its.tables[n].take() {
        give_back(cpu, t.pa, t.size);
    }
    // Type and entry size are the hardware's; two-level tables are not
    // offered (the host would write their first level).
    let read_only = (0x7 << 56) | (0x1f << 48);
    let v = ((v & !read_only) | (old & read_only)) & !logic::BASER_INDIRECT;
    let table = match logic::decode_baser(v) {
        Ok(Some(t)) => t,
        Ok(None) => {
            wr64(at, v);
            return;
        }
        Err(why) => {
            crate::log!(
                "ITS {base:#x}: GITS_BASER{n} {v:#x} refused: {}",
                why.describe()
            );
            wr64(at, v & !logic::BASER_VALID);
            return;
        }
    };
    if let Err(why) = donate(cpu, table.pa, table.size) {
        crate::log!(
            "ITS {base:#x}: GITS_BASER{n} table {:#x}+{:#x} refused: {}",
            table.pa,
            table.size,
            why.describe()
        );
        wr64(at, v & !logic::BASER_VALID);
        return;
    }
    wr64(at, v);
    // A page size or size the hardware does not take reads back
    // different: the table is not in use, and the host tries another.
    let fields = (0x3 << 8) | 0xff | logic::BASER_VALID;
    if rd64(at) & fields != v & fields {
        wr64(at, rd64(at) & !logic::BASER_VALID);
        give_back(cpu, table.pa, table.size);
        return;
    }
    its.tables[n] = Some(table);
}

/// Copies, checks and forwards every command between the host's GITS_CREADR
/// and GITS_CWRITER.
fn run_commands(state: &mut State, index: usize) {
    let Some((queue, size)) = state.its[index].host_queue else {
        return;
    };
    while state.its[index].host_creadr != state.its[index].host_cwriter {
        let at = queue + state.its[index].host_creadr;
        let mut raw = [0u64; 4];
        for (i, word) in raw.iter_mut().enumerate() {
            // SAFETY: the host's queue is host RAM shared with the
            // hypervisor (pinned), which the core maps at EL2; `at` is a
            // 32-byte-aligned offset below its size. The host may change
            // it meanwhile: the copy is what is checked and forwarded.
            *word = unsafe { read_volatile((at + 8 * i as u64) as *const u64) };
        }
        match prepare(state, index, raw) {
            Ok((command, itt)) => forward(state, index, &command, itt),
            Err(why) => refuse(state, index, raw, why),
        }
        let its = &mut state.its[index];
        its.host_creadr = (its.host_creadr + COMMAND_BYTES) % size;
    }
}

fn refuse(state: &mut State, index: usize, raw: [u64; 4], why: Refusal) {
    let its = &mut state.its[index];
    its.refused += 1;
    if its.refused <= LOGGED_REFUSALS {
        crate::log!(
            "ITS {:#x}: command {:#018x} {:#018x} {:#018x} {:#018x} dropped: {} ({} dropped so far)",
            its.base,
            raw[0],
            raw[1],
            raw[2],
            raw[3],
            why.describe(),
            its.refused
        );
    }
}

/// The checked command and, for a MAPD that maps, the ITT the core
/// allocated for it.
fn prepare(
    state: &mut State,
    index: usize,
    raw: [u64; 4],
) -> Result<(Command, Option<Itt>), Refusal> {
    let command = Command::decode(raw)?;
    let its = &state.its[index];
    if its.stuck {
        return Err(Refusal::InUse);
    }
    let table_entries = |kind| {
        its.tables
            .iter()
            .flatten()
            .find(|t| t.kind == kind)
            .map_or(0, Table::entries)
    };
    let physical = its.typer.physical_targets;
    let redistributors = &state.redistributors;
    let target_ok = |t: u64| {
        redistributors.iter().any(|r| {
            if physical {
                r.base >> 16 == t
            } else {
                r.processor == t
            }
        })
    };
    let event_bits_of = |d: u32| {
        its.itts
            .iter()
            .find(|i| i.device == d)
            .map(|i| i.event_bits)
    };
    let limits = Limits {
        typer: its.typer,
        devices: table_entries(TableKind::Devices),
        collections: table_entries(TableKind::Collections).max(its.hardware_collections),
        lpi_bits: state.intid_bits,
        target_ok: &target_ok,
        event_bits_of: &event_bits_of,
    };
    logic::check(&command, &limits)?;
    let Command::Mapd {
        device,
        event_bits,
        itt,
        valid: true,
    } = command
    else {
        return Ok((command, None));
    };
    let bytes = logic::itt_bytes(event_bits, its.typer.ite_bytes)?;
    // The host's ITT must be its own memory, though the hardware gets
    // the core's.
    let first = itt & !(PAGE - 1);
    let last = itt
        .checked_add(bytes)
        .and_then(|e| e.checked_next_multiple_of(PAGE))
        .ok_or(Refusal::Size)?;
    if !host_owned(first, last - first) {
        return Err(Refusal::NotOwned);
    }
    let replaced = its
        .itts
        .iter()
        .find(|i| i.device == device)
        .map_or(0, |i| i.bytes);
    if its.itt_bytes - replaced + bytes > ITT_BUDGET {
        return Err(Refusal::NoMemory);
    }
    let fresh = Itt::allocate(device, event_bits, bytes).ok_or(Refusal::NoMemory)?;
    Ok((command, Some(fresh)))
}

/// Puts one checked command in the core's queue and waits for the hardware
/// to take it; then the ITTs it replaced or unmapped are freed.
fn forward(state: &mut State, index: usize, command: &Command, itt: Option<Itt>) {
    let its = &mut state.its[index];
    let words = command.encode(itt.as_ref().map_or(0, |i| i.pa));
    let slot = its.shadow + its.shadow_write;
    for (i, w) in words.iter().enumerate() {
        // SAFETY: the core's own queue page (heap, mapped at EL2), read by
        // the ITS only; `slot` is a 32-byte slot inside it.
        unsafe { write_volatile((slot + 8 * i as u64) as *mut u64, *w) };
    }
    cache::clean_dcache_to_poc(slot, COMMAND_BYTES);
    its.shadow_write = (its.shadow_write + COMMAND_BYTES) % SHADOW_QUEUE_BYTES;
    wr64(its.base + gits::CWRITER, its.shadow_write);
    let mut polls = 0;
    while rd64(its.base + gits::CREADR) & 0xf_ffe0 != its.shadow_write {
        polls += 1;
        if polls == PATIENCE || rd64(its.base + gits::CREADR) & 1 != 0 {
            its.stuck = true;
            crate::log!(
                "ITS {:#x}: the hardware stopped taking commands; none is forwarded any more",
                its.base
            );
            // The ITT stays allocated: the hardware may still use it.
            if let Some(i) = itt {
                i.keep();
            }
            return;
        }
        core::hint::spin_loop();
    }
    // The hardware is done with the command: the device's old ITT (a
    // MAPD replaced or unmapped it) is no longer in use.
    if let Command::Mapd { device, .. } = *command {
        if let Some(i) = its.itts.iter().position(|i| i.device == device) {
            let old = its.itts.swap_remove(i);
            its.itt_bytes -= old.bytes;
            old.free();
        }
        if let Some(new) = itt {
            if its.itts.try_reserve(1).is_ok() {
                its.itt_bytes += new.bytes;
                its.itts.push(new);
            } else {
                // No room to remember it: the hardware keeps it; the core
                // never frees what it cannot account for.
                new.keep();
            }
        }
    }
}

fn rd_access(
    cpu: &PerCpu,
    state: &mut State,
    index: usize,
    offset: u64,
    wide: bool,
    is_write: bool,
    value: u64,
) -> Emulated {
    let base = state.redistributors[index].base;
    let lpis_on = || rd32(base + gicr::CTLR) & gicr::CTLR_ENABLE_LPIS != 0;
    match (offset & !7, is_write) {
        (gicr::PROPBASER, false) => Emulated::Read(half(
            state.redistributors[index].host_propbaser,
            gicr::PROPBASER,
            offset,
            wide,
        )),
        (gicr::PENDBASER, false) => Emulated::Read(half(
            state.redistributors[index].host_pendbaser,
            gicr::PENDBASER,
            offset,
            wide,
        )),
        (gicr::PROPBASER, true) => {
            if !lpis_on() {
                let r = &mut state.redistributors[index];
                r.host_propbaser = merge(r.host_propbaser, gicr::PROPBASER, offset, wide, value);
            }
            Emulated::Written
        }
        (gicr::PENDBASER, true) => {
            if !lpis_on() {
                let r = &mut state.redistributors[index];
                r.host_pendbaser = merge(r.host_pendbaser, gicr::PENDBASER, offset, wide, value);
            }
            Emulated::Written
        }
        (gicr::CTLR, true) if offset == gicr::CTLR => {
            let mut v = value as u32;
            if v & gicr::CTLR_ENABLE_LPIS != 0 && !lpis_on() && !enable_lpis(cpu, state, index) {
                v &= !gicr::CTLR_ENABLE_LPIS;
            }
            wr32(base + gicr::CTLR, v);
            Emulated::Written
        }
        // GICR_STATUSR, GICR_WAKER, GICR_SETLPIR, GICR_CLRLPIR,
        // GICR_INVLPIR, GICR_INVALLR, GICR_SYNCR: they name no memory.
        (0x10 | 0x14 | 0x40 | 0x48 | 0xa0 | 0xb0 | 0xc0, true) => {
            if wide {
                wr64(base + offset, value);
            } else {
                wr32(base + offset, value as u32);
            }
            Emulated::Written
        }
        (_, false) => Emulated::Read(if wide {
            rd64(base + offset)
        } else {
            u64::from(rd32(base + offset))
        }),
        (_, true) => Emulated::Written,
    }
}

/// The host turns LPIs on: its property table is shared and its pending
/// table donated (the ones the hardware had before go back), then the
/// hardware gets both. `false` if either is refused: LPIs stay off.
fn enable_lpis(cpu: &PerCpu, state: &mut State, index: usize) -> bool {
    let base = state.redistributors[index].base;
    let (prop, pend) = {
        let r = &state.redistributors[index];
        (r.host_propbaser, r.host_pendbaser)
    };
    let tables = logic::lpi_bits(prop, state.intid_bits).and_then(|bits| {
        Ok((
            logic::property_table(prop, bits)?,
            logic::pending_table(pend, bits)?,
        ))
    });
    let ((ppa, psize), (qpa, qsize)) = match tables {
        Ok(t) => t,
        Err(why) => {
            crate::log!(
                "GICR {base:#x}: LPIs left off: GICR_PROPBASER {prop:#x}: {}",
                why.describe()
            );
            return false;
        }
    };
    // Tables of an earlier enable go back once the redistributor has
    // finished turning LPIs off (GICR_CTLR.RWP).
    let mut polls = 0;
    while rd32(base + gicr::CTLR) & (1 << 3) != 0 {
        polls += 1;
        if polls == PATIENCE {
            crate::log!("GICR {base:#x}: LPIs left off: the redistributor is still busy");
            return false;
        }
        core::hint::spin_loop();
    }
    if let Some((pa, size)) = state.redistributors[index].property.take() {
        state.unpin(cpu, pa, size);
    }
    if let Some((pa, size)) = state.redistributors[index].pending.take() {
        give_back(cpu, pa, size);
    }
    if let Err(why) = state.pin(cpu, ppa, psize) {
        crate::log!(
            "GICR {base:#x}: LPIs left off: property table {ppa:#x}+{psize:#x}: {}",
            why.describe()
        );
        return false;
    }
    if let Err(why) = donate(cpu, qpa, qsize) {
        state.unpin(cpu, ppa, psize);
        crate::log!(
            "GICR {base:#x}: LPIs left off: pending table {qpa:#x}+{qsize:#x}: {}",
            why.describe()
        );
        return false;
    }
    let r = &mut state.redistributors[index];
    r.property = Some((ppa, psize));
    r.pending = Some((qpa, qsize));
    wr64(base + gicr::PROPBASER, prop);
    wr64(base + gicr::PENDBASER, pend);
    true
}
