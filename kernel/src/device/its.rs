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

use crate::arch::{cache, mmio};
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
use moat_kernel::sysregs::SysRegs;
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
    unsafe { mmio::read32(addr) }
}

fn rd64(addr: u64) -> u64 {
    // SAFETY: as for `rd32`; the registers read 64 bits at a time are
    // 64-bit registers.
    unsafe { mmio::read64(addr) }
}

fn wr32(addr: u64, v: u32) {
    // SAFETY: as for `rd32`.
    unsafe { mmio::write32(addr, v) }
}

fn wr64(addr: u64, v: u64) {
    // SAFETY: as for `rd64`.
    unsafe { mmio::write64(addr, v) }
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
    STATE.get().map(withheld_of).unwrap_or_default()
}

fn withheld_of(
    state: &spin::Mutex<State>,
) -> heapless::Vec<Range, { MAX_ITS + MAX_REDISTRIBUTORS }> {
    let mut out = heapless::Vec::new();
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
    let Some(state) = probe(gic, its_frames) else {
        return (0, 0);
    };
    let counts = (state.its.len(), state.redistributors.len());
    STATE.call_once(|| spin::Mutex::new(state));
    counts
}

/// What [`init`] finds and sets up, before it is the core's for good;
/// `None` on a GICv2 machine.
fn probe(gic: &Gic, its_frames: &[Range]) -> Option<State> {
    let Gic::V3 { distributor, .. } = gic else {
        return None;
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
    Some(state)
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
    STATE.get().map(Held::of)
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
    fn of(state: &'static spin::Mutex<State>) -> Self {
        let _order = crate::base::lockcheck::hold(Rank::Gic);
        Held {
            state: state.lock(),
            _order,
        }
    }

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
    emulate(cpu, state, regs, abort, ipa)
}

fn emulate(
    cpu: &PerCpu,
    state: &spin::Mutex<State>,
    regs: &mut GuestRegs,
    abort: &StageTwoAbort,
    ipa: u64,
) -> bool {
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
                crate::arch::sysreg::Hw.far_el2(),
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
    unless_pinned_in(state, pa, size, f)
}

fn unless_pinned_in<R>(
    state: &spin::Mutex<State>,
    pa: u64,
    size: u64,
    f: impl FnOnce() -> R,
) -> Option<R> {
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
            // Commands the host queued while the ITS was off run now.
            run_commands(state, index);
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
/// and GITS_CWRITER, while the ITS is on.
fn run_commands(state: &mut State, index: usize) {
    let Some((queue, size)) = state.its[index].host_queue else {
        return;
    };
    // An ITS that is off takes no command (and the host's GITS_CREADR
    // stays where it is, as on the hardware): forwarding one would have
    // the core wait, the GIC's lock held, for a queue the hardware does
    // not read.
    if rd32(state.its[index].base + gits::CTLR) & gits::CTLR_ENABLED == 0 {
        return;
    }
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

#[cfg(test)]
mod tests {
    //! The emulation as the host meets it: its register accesses come in
    //! as data aborts ([`emulate`]), over models of the ITS, the
    //! redistributors and the distributor (`arch::mmio`), and over the
    //! transaction engine's machine (`memory::tests`), whose ledger takes
    //! and gives back the tables. The host's tables and queue lie in the
    //! last quarter of its RAM; each test gives back what it handed over.

    use super::*;
    use crate::arch::mmio::{self, FakeIts, Registers};
    use crate::arch::sysreg::with_regs;
    use crate::arch::take_lines;
    use crate::memory::tests::{RAM_SIZE, cpu, serial, world};
    use crate::memory::{host_owns, ledger_restart::HYP_SHARES};
    use moat_kernel::esr::{FaultKind, MmioAccess};

    const DIST: u64 = 0x2000_0000;
    const ITS: u64 = 0x2008_0000;
    /// Two redistributors, 128 KiB apart.
    const RD: u64 = 0x2010_0000;
    const RD1: u64 = RD + 0x2_0000;
    /// Physical LPIs, 8-byte ITT entries, 16 EventID and 16 DeviceID bits,
    /// targets by processor number, GICv4 (Virtual) set: the host must not
    /// see it.
    const TYPER: u64 = 1 | (1 << 1) | (7 << 4) | (15 << 8) | (15 << 13);
    /// GITS_BASER0: the device table, GITS_BASER1: the collections', both
    /// of 8-byte entries.
    const DEVICES: u64 = (1 << 56) | (7 << 48);
    const COLLECTIONS: u64 = (4 << 56) | (7 << 48);
    const VALID: u64 = 1 << 63;
    /// Host memory the host owns: 512 device and 512 collection entries.
    const TABLE_ENTRIES: u32 = 512;

    /// Where the host keeps its queue and tables.
    #[derive(Clone, Copy)]
    struct HostRam {
        queue: u64,
        devices: u64,
        collections: u64,
        itt: u64,
        property: u64,
        pending: u64,
        /// Just past the host's RAM: not its own.
        outside: u64,
    }

    fn host_ram() -> HostRam {
        let ram = world().ram;
        let at = ram + (6 << 20);
        HostRam {
            queue: at,
            devices: at + 0x1_0000,
            collections: at + 0x2_0000,
            itt: at + 0x3_0000,
            property: at + 0x4_0000,
            pending: at + 0x6_0000,
            outside: ram + RAM_SIZE,
        }
    }

    /// The GIC's frames, models attached for one test.
    struct Frames;

    impl Drop for Frames {
        fn drop(&mut self) {
            for base in [DIST, ITS, RD, RD1] {
                mmio::detach(base);
            }
        }
    }

    fn its_model<R>(f: impl FnOnce(&mut FakeIts) -> R) -> R {
        mmio::with(ITS, f)
    }

    fn rd_model<R>(base: u64, f: impl FnOnce(&mut Registers) -> R) -> R {
        mmio::with(base, f)
    }

    /// What the ITS took from the core's queue so far (and forgets it).
    fn forwarded() -> Vec<[u64; 4]> {
        its_model(|i| core::mem::take(&mut i.commands))
    }

    fn attach_frames(its: FakeIts) -> Frames {
        let mut dist = Registers::default();
        // GICD_TYPER.IDbits: 16 INTID bits.
        dist.set(0, 15 << (19 + 32));
        mmio::attach(DIST, 0x1_0000, dist);
        mmio::attach(ITS, 0x2_0000, its);
        let mut rd0 = Registers::default();
        rd0.set(gicr::TYPER, 0);
        mmio::attach(RD, 0x2_0000, rd0);
        let mut rd1 = Registers::default();
        // Processor 1, the last redistributor.
        rd1.set(gicr::TYPER, (1 << 8) | (1 << 4));
        mmio::attach(RD1, 0x2_0000, rd1);
        Frames
    }

    fn gic_v3() -> Gic {
        let mut redistributors = heapless::Vec::new();
        redistributors
            .push(Range {
                base: RD,
                size: 0x10_0000,
            })
            .unwrap();
        Gic::V3 {
            distributor: Range {
                base: DIST,
                size: 0x1_0000,
            },
            redistributors,
        }
    }

    /// The emulation over fresh models, and the host's view of it.
    struct Host {
        state: &'static spin::Mutex<State>,
        regs: GuestRegs,
        ram: HostRam,
        /// The host's next command slot.
        write: u64,
        _frames: Frames,
    }

    fn host_with(its: FakeIts) -> Host {
        world();
        let frames = attach_frames(its);
        let state = probe(&gic_v3(), &[Range::new(ITS, 0x2_0000).unwrap()]).unwrap();
        take_lines();
        Host {
            state: Box::leak(Box::new(spin::Mutex::new(state))),
            regs: GuestRegs {
                x: [0; 31],
                pc: 0x4008_0000,
                pstate: 0x3c5,
            },
            ram: host_ram(),
            write: 0,
            _frames: frames,
        }
    }

    fn host() -> Host {
        host_with(FakeIts::new(
            TYPER,
            [DEVICES, COLLECTIONS, 0, 0, 0, 0, 0, 0],
        ))
    }

    fn abort(is_write: bool, size_log2: u8) -> StageTwoAbort {
        StageTwoAbort {
            is_instruction: false,
            fault: FaultKind::Translation(3),
            is_write,
            syndrome_valid: true,
            access: Some(MmioAccess {
                size_log2,
                sign_extend: false,
                rt: 5,
                sixty_four: true,
                is_write,
            }),
            s1ptw: false,
        }
    }

    fn write_ram(at: u64, words: &[u64]) {
        for (i, w) in words.iter().enumerate() {
            let p = core::ptr::with_exposed_provenance_mut::<u64>((at + 8 * i as u64) as usize);
            // SAFETY: test RAM (the world's buffer), which only the
            // serialised tests touch.
            unsafe { p.write_volatile(*w) };
        }
    }

    impl Host {
        /// One access of 2^`size_log2` bytes, emulated as a single
        /// instruction (the PC moves on past it).
        fn access(&mut self, addr: u64, size_log2: u8, write: Option<u64>) -> u64 {
            self.regs.x[5] = write.unwrap_or(0xdead_beef_dead_beef);
            let pc = self.regs.pc;
            let abort = abort(write.is_some(), size_log2);
            assert!(emulate(cpu(), self.state, &mut self.regs, &abort, addr));
            assert_eq!(self.regs.pc, pc + 4);
            self.regs.x[5]
        }

        fn w64(&mut self, addr: u64, v: u64) {
            self.access(addr, 3, Some(v));
        }

        fn r64(&mut self, addr: u64) -> u64 {
            self.access(addr, 3, None)
        }

        fn w32(&mut self, addr: u64, v: u32) {
            self.access(addr, 2, Some(u64::from(v)));
        }

        fn r32(&mut self, addr: u64) -> u32 {
            self.access(addr, 2, None) as u32
        }

        /// Programs a device and a collection table and a one-page queue,
        /// and turns the ITS on, as a driver does.
        fn ready(&mut self) {
            let r = self.ram;
            self.w64(ITS + gits::BASER0, VALID | r.devices);
            self.w64(ITS + gits::BASER0 + 8, VALID | r.collections);
            self.w64(ITS + gits::CBASER, VALID | r.queue);
            self.w32(ITS + gits::CTLR, gits::CTLR_ENABLED);
            self.write = 0;
            assert_eq!(self.r32(ITS + gits::CTLR), gits::CTLR_ENABLED);
        }

        /// Puts commands in the host's queue without telling the ITS.
        fn queue(&mut self, commands: &[[u64; 4]]) {
            for c in commands {
                write_ram(self.ram.queue + self.write, c);
                self.write = (self.write + COMMAND_BYTES) % PAGE;
            }
        }

        /// Queues commands and moves GITS_CWRITER past them.
        fn send(&mut self, commands: &[[u64; 4]]) {
            self.queue(commands);
            let w = self.write;
            self.w64(ITS + gits::CWRITER, w);
        }

        fn its<R>(&self, f: impl FnOnce(&Its) -> R) -> R {
            f(&self.state.lock().its[0])
        }

        /// Gives back all the host handed over: the ITS off, its queue
        /// and tables unset through its registers, the redistributors'
        /// tables returned; the host owns its RAM again.
        fn release(mut self) {
            self.w32(ITS + gits::CTLR, 0);
            self.w64(ITS + gits::CBASER, 0);
            for n in 0..gits::BASERS {
                self.w64(ITS + gits::BASER0 + 8 * n, 0);
            }
            let mut state = self.state.lock();
            for i in 0..state.redistributors.len() {
                if let Some((pa, size)) = state.redistributors[i].property.take() {
                    state.unpin(cpu(), pa, size);
                }
                if let Some((pa, size)) = state.redistributors[i].pending.take() {
                    give_back(cpu(), pa, size);
                }
            }
            assert!(state.pinned.is_empty());
            drop(state);
            let start = self.ram.queue;
            assert!(host_owns(start, 1 << 20));
            assert!(
                HYP_SHARES
                    .lock()
                    .iter()
                    .all(|(pa, _)| pa < start || pa >= start + (1 << 20))
            );
        }
    }

    #[test]
    fn boot_turns_off_what_the_firmware_left_and_finds_every_redistributor() {
        let _turn = serial();
        world();
        let mut its = FakeIts::new(TYPER, [DEVICES, COLLECTIONS, 0, 0, 0, 0, 0, 0]);
        // The firmware left the ITS on with a queue and a table.
        its.regs.set(gits::CTLR, 1);
        its.regs.set(gits::CBASER, VALID | 0x4000_0000);
        its.regs.set(gits::BASER0, VALID | DEVICES | 0x4001_0000);
        let frames = attach_frames(its);
        // And LPIs on in the first redistributor.
        rd_model(RD, |r| r.set(gicr::CTLR, 1));
        take_lines();
        let state = probe(&gic_v3(), &[Range::new(ITS, 0x2_0000).unwrap()]).unwrap();
        its_model(|i| {
            assert_eq!(i.regs.get(gits::CTLR), 0);
            assert_eq!(i.regs.get(gits::CBASER), 0);
            assert_eq!(i.regs.get(gits::BASER0), DEVICES | 0x4001_0000);
        });
        assert!(take_lines()[0].contains("LPIs already on at boot"));
        assert_eq!(
            state
                .redistributors
                .iter()
                .map(|r| (r.base, r.processor))
                .collect::<Vec<_>>(),
            [(RD, 0), (RD1, 1)]
        );
        assert_eq!(state.intid_bits, 16);
        assert_eq!(state.its[0].typer, ItsTyper::decode(TYPER));
        // Each ITS's control page and each redistributor's first page is
        // withheld from the host.
        let state: &'static _ = Box::leak(Box::new(spin::Mutex::new(state)));
        assert_eq!(
            withheld_of(state)
                .iter()
                .map(|r| (r.base, r.size))
                .collect::<Vec<_>>(),
            [(ITS, PAGE), (RD, PAGE), (RD1, PAGE)]
        );
        drop(frames);
        // Nothing to do on a GICv2.
        let v2 = Gic::V2 {
            distributor: Range::new(DIST, 0x1000).unwrap(),
            cpu_interface: Range::new(DIST + 0x1_0000, 0x1000).unwrap(),
            hyp_interface: None,
            virtual_cpu_interface: None,
        };
        assert!(probe(&v2, &[]).is_none());
    }

    #[test]
    fn a_queue_or_table_in_memory_the_host_does_not_own_is_refused() {
        let _turn = serial();
        let mut h = host();
        let r = h.ram;
        // A queue outside the host's RAM: Valid reads back clear, the
        // hardware gets none, and the ITS cannot be turned on.
        h.w64(ITS + gits::CBASER, VALID | r.outside);
        assert_eq!(h.r64(ITS + gits::CBASER), r.outside);
        its_model(|i| assert_eq!(i.regs.get(gits::CBASER), 0));
        h.w32(ITS + gits::CTLR, gits::CTLR_ENABLED);
        assert_eq!(h.r32(ITS + gits::CTLR) & gits::CTLR_ENABLED, 0);
        // A device table outside it: the hardware's BASER0 is not valid.
        h.w64(ITS + gits::BASER0, VALID | r.outside);
        assert_eq!(h.r64(ITS + gits::BASER0) & VALID, 0);
        assert!(h.its(|i| i.tables[0].is_none()));
        // A device table in its RAM is taken from it.
        h.w64(ITS + gits::BASER0, VALID | r.devices);
        assert_eq!(h.r64(ITS + gits::BASER0), VALID | DEVICES | r.devices);
        assert!(!host_owns(r.devices, PAGE));
        // Now the host's no more: neither a queue nor another table there.
        h.w64(ITS + gits::CBASER, VALID | r.devices);
        assert_eq!(h.r64(ITS + gits::CBASER) & VALID, 0);
        h.w64(ITS + gits::BASER0 + 8, VALID | r.devices);
        assert_eq!(h.r64(ITS + gits::BASER0 + 8) & VALID, 0);
        // The type and entry size are the hardware's; two-level tables
        // are not offered.
        h.w64(
            ITS + gits::BASER0 + 8,
            VALID | logic::BASER_INDIRECT | (1 << 56) | (31 << 48) | r.collections,
        );
        assert_eq!(
            h.r64(ITS + gits::BASER0 + 8),
            VALID | COLLECTIONS | r.collections
        );
        // A table of a kind the core does not hand out (BASER2 has none).
        h.w64(ITS + gits::BASER0 + 16, VALID | r.itt);
        assert_eq!(h.r64(ITS + gits::BASER0 + 16) & VALID, 0);
        assert!(host_owns(r.itt, PAGE));
        // With the ITS on, nothing changes.
        h.w64(ITS + gits::CBASER, VALID | r.queue);
        h.w32(ITS + gits::CTLR, gits::CTLR_ENABLED);
        h.w64(ITS + gits::BASER0, 0);
        h.w64(ITS + gits::CBASER, VALID | r.itt);
        assert_eq!(h.r64(ITS + gits::BASER0), VALID | DEVICES | r.devices);
        assert_eq!(h.r64(ITS + gits::CBASER), VALID | r.queue);
        // Reprogrammed with the ITS off, the old table goes back.
        h.w32(ITS + gits::CTLR, 0);
        h.w64(ITS + gits::BASER0, 0);
        assert!(host_owns(r.devices, PAGE));
        let lines = take_lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("memory the host does not own")),
            "{lines:?}"
        );
        h.release();
    }

    #[test]
    fn a_page_size_the_hardware_does_not_take_gives_the_table_back() {
        let _turn = serial();
        let mut its = FakeIts::new(TYPER, [DEVICES, COLLECTIONS, 0, 0, 0, 0, 0, 0]);
        its.only_4k_pages = true;
        let mut h = host_with(its);
        let r = h.ram;
        // 16 KiB pages, one of them.
        h.w64(ITS + gits::BASER0, VALID | (1 << 8) | r.devices);
        assert_eq!(h.r64(ITS + gits::BASER0) & VALID, 0);
        assert!(h.its(|i| i.tables[0].is_none()));
        assert!(host_owns(r.devices, 4 * PAGE));
        h.release();
    }

    #[test]
    fn the_hardware_runs_the_cores_queue_with_only_the_commands_that_pass() {
        let _turn = serial();
        let mut h = host();
        let r = h.ram;
        h.ready();
        // The hardware reads the core's queue; the host's is shared with
        // the hypervisor, and cannot be unshared while in use.
        let shadow = h.its(|i| i.shadow);
        let hw = its_model(|i| i.regs.get(gits::CBASER));
        assert_eq!(logic::decode_cbaser(hw), Some((shadow, PAGE)));
        assert_ne!(shadow, r.queue);
        assert!(HYP_SHARES.lock().iter().any(|s| s == (r.queue, PAGE)));
        assert_eq!(unless_pinned_in(h.state, r.queue + 0x800, 8, || ()), None);
        assert_eq!(unless_pinned_in(h.state, r.itt, PAGE, || 1), Some(1));

        let mapc = |collection, target| {
            Command::Mapc {
                collection,
                target,
                valid: true,
            }
            .encode(0)
        };
        let mapd = |device, event_bits, itt| {
            Command::Mapd {
                device,
                event_bits,
                itt,
                valid: true,
            }
            .encode(itt)
        };
        let mapti = |device, event, intid, collection| {
            Command::Mapti {
                device,
                event,
                intid,
                collection,
            }
            .encode(0)
        };
        let good_mapc = mapc(0, 1);
        let good_mapd = mapd(3, 4, r.itt);
        let good_mapti = mapti(3, 15, 8192 + 7, 0);
        let mut unknown = good_mapc;
        unknown[0] = 0x29; // VMAPP, a GICv4 command
        h.send(&[
            good_mapc,
            mapc(TABLE_ENTRIES as u16, 1), // beyond the collection table
            mapc(1, 2),                    // no processor 2
            mapd(TABLE_ENTRIES, 4, r.itt), // beyond the device table
            mapd(4, 17, r.itt),            // more EventID bits than the ITS has
            mapd(5, 4, r.outside),         // an ITT the host does not own
            mapd(6, 4, r.devices),         // nor there (the ITS's now)
            good_mapd,
            mapti(3, 16, 8192, 0),   // beyond the device's events
            mapti(3, 0, 100, 0),     // not an LPI
            mapti(3, 0, 1 << 16, 0), // beyond the LPIs there are
            mapti(3, 0, 8192, TABLE_ENTRIES as u16),
            mapti(9, 0, 8192, 0), // a device never mapped
            unknown,
            good_mapti,
        ]);
        // The host's queue is consumed to the end.
        assert_eq!(h.r64(ITS + gits::CREADR), h.write);
        assert_eq!(h.r64(ITS + gits::CWRITER), h.write);
        // The hardware got the three that pass, the MAPD with the core's
        // own ITT for the device (16 events of 8 bytes) in place of the
        // host's.
        let itt = h.its(|i| {
            assert_eq!(i.refused, 12);
            assert_eq!(i.itts.len(), 1);
            assert_eq!((i.itts[0].device, i.itts[0].bytes), (3, 256));
            i.itts[0].pa
        });
        assert_ne!(itt, r.itt);
        assert_eq!(forwarded(), [good_mapc, mapd(3, 4, itt), good_mapti]);
        let lines = take_lines();
        assert_eq!(
            lines.iter().filter(|l| l.contains("dropped")).count(),
            12,
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("a DeviceID beyond the device table"))
        );

        // A MAPD of the device again: a new ITT, the old one freed; an
        // unmapping MAPD frees it.
        h.send(&[mapd(3, 8, r.itt)]);
        let bigger = h.its(|i| {
            assert_eq!(i.itts.len(), 1);
            assert_eq!(i.itt_bytes, 256 * 8);
            i.itts[0].pa
        });
        let mut unmap = mapd(3, 8, 0);
        unmap[2] = 0;
        h.send(&[unmap]);
        assert_eq!(forwarded(), [mapd(3, 8, bigger), unmap]);
        h.its(|i| assert_eq!((i.itts.len(), i.itt_bytes), (0, 0)));
        h.release();
    }

    #[test]
    fn the_host_queue_and_the_cores_wrap_and_a_bad_write_index_is_ignored() {
        let _turn = serial();
        let mut h = host();
        h.ready();
        let sync = Command::Sync { target: 0 }.encode(0);
        let sync1 = Command::Sync { target: 1 }.encode(0);
        // 100, then 30 more that run past the end of both one-page queues.
        h.send(&[sync; 100]);
        h.send(&[sync1; 30]);
        let got = forwarded();
        assert_eq!(got.len(), 130);
        assert!(got[..100].iter().all(|c| *c == sync));
        assert!(got[100..].iter().all(|c| *c == sync1));
        let end = 130 * COMMAND_BYTES % PAGE;
        assert_eq!(h.r64(ITS + gits::CREADR), end);
        h.its(|i| assert_eq!(i.shadow_write, end));
        its_model(|i| assert_eq!(i.regs.get(gits::CREADR), end));
        // A write index at or past the queue's end is ignored; the low
        // bits of one are not an index.
        h.queue(&[sync]);
        h.w64(ITS + gits::CWRITER, PAGE);
        h.w64(ITS + gits::CWRITER, PAGE + h.write);
        assert_eq!(h.r64(ITS + gits::CWRITER), end);
        assert!(forwarded().is_empty());
        h.w64(ITS + gits::CWRITER, h.write | 0x1f);
        assert_eq!(h.r64(ITS + gits::CWRITER), h.write);
        assert_eq!(forwarded(), [sync]);
        // Half a register at a time, as a 32-bit driver writes it.
        h.queue(&[sync]);
        h.w32(ITS + gits::CWRITER + 4, 0);
        h.w32(ITS + gits::CWRITER, h.write as u32);
        assert_eq!(h.r32(ITS + gits::CREADR), h.write as u32);
        assert_eq!(forwarded(), [sync]);
        h.release();
    }

    /// Commands queued while the ITS is off wait for it to be turned on:
    /// the core forwards none meanwhile (it would wait for a queue the
    /// hardware does not read, with the GIC's lock held) and the host's
    /// read index stays put.
    #[test]
    fn commands_wait_while_the_its_is_off() {
        let _turn = serial();
        let mut h = host();
        h.ready();
        let sync = Command::Sync { target: 0 }.encode(0);
        h.w32(ITS + gits::CTLR, 0);
        h.send(&[sync, sync]);
        assert!(forwarded().is_empty());
        assert_eq!(h.r64(ITS + gits::CREADR), 0);
        assert!(!h.its(|i| i.stuck));
        assert!(
            !take_lines()
                .iter()
                .any(|l| l.contains("the hardware stopped taking commands"))
        );
        h.w32(ITS + gits::CTLR, gits::CTLR_ENABLED);
        assert_eq!(forwarded(), [sync, sync]);
        assert_eq!(h.r64(ITS + gits::CREADR), 2 * COMMAND_BYTES);
        h.release();
    }

    #[test]
    fn an_its_that_stops_taking_commands_is_given_nothing_more() {
        let _turn = serial();
        let mut h = host();
        h.ready();
        let sync = Command::Sync { target: 0 }.encode(0);
        its_model(|i| i.stall = true);
        h.send(&[sync]);
        assert!(h.its(|i| i.stuck));
        assert!(
            take_lines()
                .iter()
                .any(|l| l.contains("the hardware stopped taking commands"))
        );
        its_model(|i| i.stall = false);
        h.send(&[sync, sync]);
        h.its(|i| assert_eq!(i.refused, 2));
        assert!(forwarded().is_empty());
        // A new queue, with the ITS off, starts afresh.
        h.w32(ITS + gits::CTLR, 0);
        its_model(|i| i.regs.set(gits::CREADR, 0));
        h.ready();
        assert!(!h.its(|i| i.stuck));
        h.send(&[sync]);
        assert_eq!(forwarded(), [sync]);
        h.release();
    }

    #[test]
    fn lpis_turn_on_only_with_tables_the_host_owns_and_then_hold_still() {
        let _turn = serial();
        let mut h = host();
        let r = h.ram;
        // 16 INTID bits: a 56 KiB property table, an 8 KiB pending table.
        let propbaser = r.property | 15;
        // The property table outside the host's RAM.
        h.w64(RD + gicr::PROPBASER, r.outside | 15);
        h.w64(RD + gicr::PENDBASER, r.pending);
        h.w32(RD + gicr::CTLR, gicr::CTLR_ENABLE_LPIS);
        assert_eq!(h.r32(RD + gicr::CTLR), 0);
        // Too few INTID bits for any LPI.
        h.w64(RD + gicr::PROPBASER, r.property | 12);
        h.w32(RD + gicr::CTLR, gicr::CTLR_ENABLE_LPIS);
        assert_eq!(h.r32(RD + gicr::CTLR), 0);
        // A pending table the host does not own: the property table it
        // shared first is unshared again.
        h.w64(RD + gicr::PROPBASER, propbaser);
        h.w64(RD + gicr::PENDBASER, r.outside);
        h.w32(RD + gicr::CTLR, gicr::CTLR_ENABLE_LPIS);
        assert_eq!(h.r32(RD + gicr::CTLR), 0);
        assert!(h.state.lock().pinned.is_empty());
        // Nothing reached the hardware.
        rd_model(RD, |m| {
            assert_eq!(m.get(gicr::PROPBASER), 0);
            assert_eq!(m.get(gicr::PENDBASER), 0);
        });
        let lines = take_lines();
        assert_eq!(
            lines.iter().filter(|l| l.contains("LPIs left off")).count(),
            3,
            "{lines:?}"
        );

        h.w64(RD + gicr::PENDBASER, r.pending);
        h.w32(RD + gicr::CTLR, gicr::CTLR_ENABLE_LPIS);
        assert_eq!(h.r32(RD + gicr::CTLR), gicr::CTLR_ENABLE_LPIS);
        rd_model(RD, |m| {
            assert_eq!(m.get(gicr::PROPBASER), propbaser);
            assert_eq!(m.get(gicr::PENDBASER), r.pending);
        });
        assert!(
            HYP_SHARES
                .lock()
                .iter()
                .any(|s| s == (r.property, 14 * PAGE))
        );
        assert!(!host_owns(r.pending, 2 * PAGE));
        assert!(host_owns(r.pending + 2 * PAGE, PAGE));
        // With LPIs on the registers hold still.
        h.w64(RD + gicr::PROPBASER, r.itt | 15);
        h.w32(RD + gicr::PENDBASER + 4, 0x10);
        assert_eq!(h.r64(RD + gicr::PROPBASER), propbaser);
        assert_eq!(h.r64(RD + gicr::PENDBASER), r.pending);
        // The other redistributor's registers are its own.
        assert_eq!(h.r64(RD1 + gicr::PROPBASER), 0);
        assert_eq!(h.r32(RD1 + gicr::CTLR), 0);
        // Registers that name no memory reach the hardware as written.
        h.w32(RD + 0x14, 0x2);
        h.w64(RD + 0x40, 8200);
        rd_model(RD, |m| {
            assert_eq!(m.read(0x14, 4), 0x2);
            assert_eq!(m.get(0x40), 8200);
        });
        h.release();
    }

    #[test]
    fn the_checker_agrees_and_then_finds_what_changed_behind_the_cores_back() {
        let _turn = serial();
        let mut h = host();
        let r = h.ram;
        h.ready();
        h.w64(RD + gicr::PROPBASER, r.property | 15);
        h.w64(RD + gicr::PENDBASER, r.pending);
        h.w32(RD + gicr::CTLR, gicr::CTLR_ENABLE_LPIS);
        // The hypervisor's memory, for the core's own queue and ITTs:
        // the test process's, all of it but the partitions' RAM.
        let ram = world().ram;
        let carve_out = [
            Range::new(0x1000, ram - 0x1000).unwrap(),
            Range::new(ram + RAM_SIZE, (1 << 52) - ram - RAM_SIZE).unwrap(),
        ];
        let check = |h: &Host| {
            let held = Held::of(h.state);
            let host = crate::memory::host_stage2();
            held.check(
                &carve_out,
                |pfn| crate::memory::lookup(cpu(), pfn).ok(),
                |pa, size, mapped| host.check(pa, size, mapped).is_ok(),
            )
        };
        // The shadow queue, the host's queue, two tables, the property
        // and pending tables.
        assert_eq!(check(&h), Ok(6));
        let finding = |h: &Host| check(h).unwrap_err();
        // The device table moved in the hardware behind the core's back.
        let baser0 = its_model(|i| i.regs.get(gits::BASER0));
        its_model(|i| i.regs.set(gits::BASER0, baser0 + PAGE));
        assert_eq!(
            finding(&h),
            (
                ITS + gits::BASER0,
                "a GITS_BASER names a table the core did not take"
            )
        );
        its_model(|i| i.regs.set(gits::BASER0, baser0));
        // The hardware reading the host's queue.
        let cbaser = its_model(|i| i.regs.get(gits::CBASER));
        its_model(|i| i.regs.set(gits::CBASER, VALID | r.queue));
        assert_eq!(
            finding(&h),
            (ITS + gits::CBASER, "the ITS reads a queue not the core's")
        );
        its_model(|i| i.regs.set(gits::CBASER, cbaser));
        // A pending table the core did not take.
        rd_model(RD, |m| m.set(gicr::PENDBASER, r.itt & !0xffff));
        assert_eq!(
            finding(&h),
            (
                RD + gicr::PENDBASER,
                "LPIs on with a pending table the core did not take"
            )
        );
        rd_model(RD, |m| m.set(gicr::PENDBASER, r.pending));
        assert_eq!(check(&h), Ok(6));
        h.release();
    }

    #[test]
    fn an_access_the_syndrome_does_not_describe_gets_an_abort() {
        let _turn = serial();
        let mut h = host();
        let r = h.ram;
        let before = with_regs(|s| s.el1_exceptions);
        // A 16-bit store, an unaligned 64-bit load, and one without a
        // syndrome: each an external abort, nothing emulated.
        for (addr, abort) in [
            (ITS + gits::CBASER, abort(true, 1)),
            (ITS + gits::CBASER + 4, abort(false, 3)),
            (
                ITS + gits::CBASER,
                StageTwoAbort {
                    access: None,
                    syndrome_valid: false,
                    ..abort(true, 3)
                },
            ),
        ] {
            h.regs.x[5] = VALID | r.queue;
            let pc = h.regs.pc;
            assert!(emulate(cpu(), h.state, &mut h.regs, &abort, addr));
            assert_ne!(h.regs.pc, pc + 4);
            h.regs.pc = pc;
        }
        assert_eq!(with_regs(|s| s.el1_exceptions), before + 3);
        assert_eq!(h.r64(ITS + gits::CBASER), 0);
        // Another page is not the emulation's.
        let abort = abort(false, 2);
        assert!(!emulate(
            cpu(),
            h.state,
            &mut h.regs,
            &abort,
            ITS + 0x1_0000
        ));
        // GITS_TYPER without GICv4; identification registers pass
        // through; other writes are dropped.
        assert_eq!(h.r64(ITS + gits::TYPER), TYPER & !(1 << 1));
        assert_eq!(h.r32(ITS + gits::TYPER + 4), 0);
        its_model(|i| i.regs.write(0x4, 4, 0x43b));
        assert_eq!(h.r32(ITS + 0x4), 0x43b);
        h.w64(ITS + gits::TYPER, 0);
        h.w32(ITS + gits::CREADR, 0x40);
        assert_eq!(h.r64(ITS + gits::CREADR), 0);
        // GITS_CBASER written half at a time.
        h.w32(ITS + gits::CBASER, r.queue as u32);
        h.w32(ITS + gits::CBASER + 4, ((VALID | r.queue) >> 32) as u32);
        assert_eq!(h.r64(ITS + gits::CBASER), VALID | r.queue);
        assert_eq!(
            h.r32(ITS + gits::CBASER + 4),
            ((VALID | r.queue) >> 32) as u32
        );
        h.release();
    }
}
