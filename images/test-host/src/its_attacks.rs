//! A host that aims the GICv3 ITS and the redistributors' LPI tables at
//! memory it does not own. Each case runs alone (`moat.attack=NAME`):
//!
//! - `its_device_table`: the ITS's device table (GITS_BASERn) at a page
//!   donated to a VM, then MAPD, MAPTI and INT;
//! - `its_itt`: a MAPD whose ITT is a VM's page, then the hypervisor's
//!   memory, then MAPTI and INT;
//! - `its_command_queue`: the command queue (GITS_CBASER) at a VM's page,
//!   and a queue in use given to a VM;
//! - `lpi_pending_table`: GICR_PENDBASER, then GICR_PROPBASER, at a VM's
//!   page, then an LPI made pending.
//!
//! A hardware write that lands where it should not is seen by its effect:
//! the ITS finds a device or an event only through what it wrote, so an
//! LPI delivered after INT means the write landed; a redistributor with
//! LPIs on sets the pending bit in its pending table before it delivers.
//! Every case ends with the same flow on the host's own memory, which must
//! deliver its LPI (so the absence of one above is not a broken setup),
//! and with the ledger agreeing with the host's stage-2.

use super::{
    Checks, Code, PAGE, Ram, consistent, destroy, donate, expect_abort, hypervisor_region, p,
    read_u64, reclaim, vm_create,
};
use moat_abi::Error;
use moat_platform::dt::{Gic, Platform};

/// The LPI the attacks try to raise, and the one the honest flow raises.
const ATTACK_LPI: u64 = 8192;
const HONEST_LPI: u64 = 8193;
/// The LPIs of the ITT attacks, one per attempt (a device each).
const ITT_ATTACK_LPIS: [u64; 2] = [8194, 8195];
/// LPI INTID bits the cases give the redistributor (GICR_PROPBASER.IDbits
/// + 1): a two-page property table and a one-page pending table.
const LPI_BITS: u64 = 14;
/// Polls of GITS_CREADR, or of the CPU interface, before giving up.
const POLLS: u32 = 100_000;

const GITS_CTLR: u64 = 0x0;
const GITS_TYPER: u64 = 0x8;
const GITS_CBASER: u64 = 0x80;
const GITS_CWRITER: u64 = 0x88;
const GITS_CREADR: u64 = 0x90;
const GITS_BASER0: u64 = 0x100;
const GICR_CTLR: u64 = 0x0;
const GICR_TYPER: u64 = 0x8;
const GICR_PROPBASER: u64 = 0x70;
const GICR_PENDBASER: u64 = 0x78;
const VALID: u64 = 1 << 63;

fn r32(addr: u64) -> u32 {
    // SAFETY: a GIC register (or a page the core emulates), device memory
    // in the test host's map.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

fn w32(addr: u64, v: u32) {
    // SAFETY: as for `r32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}

fn r64(addr: u64) -> u64 {
    // SAFETY: as for `r32`; a 64-bit register.
    unsafe { core::ptr::read_volatile(addr as *const u64) }
}

fn w64(addr: u64, v: u64) {
    // SAFETY: as for `r64`.
    unsafe { core::ptr::write_volatile(addr as *mut u64, v) }
}

/// Zeroes pages of the host's own RAM.
fn zero(pa: u64, pages: u64) {
    for a in (pa..pa + pages * PAGE).step_by(8) {
        // SAFETY: RAM the test host took for this case ([`Ram::take`]).
        unsafe { core::ptr::write_volatile(a as *mut u64, 0) };
    }
}

/// Whether any byte of `[pa, pa + bytes)` (the host's RAM) is not zero.
fn dirty(pa: u64, bytes: u64) -> bool {
    // SAFETY: RAM the test host took for this case.
    (pa..pa + bytes)
        .step_by(8)
        .any(|a| unsafe { core::ptr::read_volatile(a as *const u64) } != 0)
}

/// What the cases need of the machine.
struct Gic3 {
    its: u64,
    /// This CPU's RD_base frame.
    rd: u64,
    /// What a MAPC or SYNC names for this CPU.
    target: u64,
}

fn discover(c: &mut Checks, platform: &Platform<'_>, dtb: &[u8]) -> Option<Gic3> {
    let its = moat_platform::dt::gic_its(dtb)
        .ok()
        .and_then(|v| v.first().copied());
    let Gic::V3 { redistributors, .. } = &platform.gic else {
        c.check(false, format_args!("its: the machine has a GICv3"));
        return None;
    };
    let Some(its) = its else {
        c.check(false, format_args!("its: the machine has a GICv3 ITS"));
        return None;
    };
    let mpidr: u64;
    // SAFETY: reads this CPU's affinity.
    unsafe { core::arch::asm!("mrs {}, mpidr_el1", out(reg) mpidr, options(nomem, nostack)) };
    let want = ((mpidr >> 8) & 0xff00_0000) | (mpidr & 0xff_ffff);
    for region in redistributors {
        let mut frame = region.base;
        while frame + 0x2_0000 <= region.end() {
            let typer = r64(frame + GICR_TYPER);
            if typer >> 32 == want {
                let physical = r64(its.base + GITS_TYPER) & (1 << 19) != 0;
                let target = if physical {
                    frame >> 16
                } else {
                    (typer >> 8) & 0xffff
                };
                return Some(Gic3 {
                    its: its.base,
                    rd: frame,
                    target,
                });
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
    c.check(false, format_args!("its: this CPU's redistributor found"));
    None
}

/// Opens this CPU's interface to group-1 interrupts above priority 0xf0
/// (PSTATE keeps them masked: they are polled).
fn open_cpu_interface() {
    // SAFETY: this CPU's GIC system registers.
    unsafe {
        core::arch::asm!(
            "mrs {t}, icc_sre_el1", "orr {t}, {t}, #1", "msr icc_sre_el1, {t}", "isb",
            "msr icc_pmr_el1, {ff}", "msr icc_igrpen1_el1, {one}", "isb",
            t = out(reg) _, ff = in(reg) 0xf0u64, one = in(reg) 1u64, options(nostack),
        );
    }
}

/// Acknowledges and ends every pending interrupt for a while; whether
/// `intid` was among them.
fn lpi_taken(intid: u64) -> bool {
    let mut seen = false;
    for _ in 0..POLLS {
        let got: u64;
        // SAFETY: acknowledges and, if there was one, ends an interrupt.
        unsafe {
            core::arch::asm!(
                "mrs {i}, icc_iar1_el1", "cmp {i}, #1020", "b.hs 1f",
                "msr icc_eoir1_el1, {i}", "1:", "isb",
                i = out(reg) got, options(nostack),
            );
        }
        let got = got & 0xff_ffff;
        if got == intid {
            seen = true;
        }
        if seen && got >= 1020 {
            break;
        }
    }
    seen
}

/// The host's LPI tables: a property table with `lpis` enabled at
/// priority 0xa0, and a 64 KiB-aligned pending table.
struct LpiTables {
    prop: u64,
    pend: u64,
}

impl LpiTables {
    fn take(ram: &mut Ram) -> Option<Self> {
        let prop = ram.take(2, PAGE)?;
        let pend = ram.take(16, 0x1_0000)?;
        zero(prop, 2);
        zero(pend, 1);
        for lpi in [
            ATTACK_LPI,
            HONEST_LPI,
            ITT_ATTACK_LPIS[0],
            ITT_ATTACK_LPIS[1],
        ] {
            // SAFETY: the property table's byte for `lpi`, in our RAM.
            unsafe { core::ptr::write_volatile((prop + lpi - 8192) as *mut u8, 0xa0 | 1) };
        }
        Some(Self { prop, pend })
    }
}

/// Programs this CPU's redistributor with `prop` and `pend` and turns LPIs
/// on; whether they read back on.
fn enable_lpis(g: &Gic3, prop: u64, pend: u64) -> bool {
    w32(g.rd + GICR_CTLR, r32(g.rd + GICR_CTLR) & !1);
    w64(g.rd + GICR_PROPBASER, prop | (LPI_BITS - 1));
    w64(g.rd + GICR_PENDBASER, pend);
    w32(g.rd + GICR_CTLR, r32(g.rd + GICR_CTLR) | 1);
    r32(g.rd + GICR_CTLR) & 1 != 0
}

/// The ITS's GITS_BASERn for table type `kind` (1 devices, 4 collections).
fn baser(g: &Gic3, kind: u64) -> Option<u64> {
    (0..8)
        .map(|n| g.its + GITS_BASER0 + 8 * n)
        .find(|&at| (r64(at) >> 56) & 7 == kind)
}

/// A one-page flat table at `pa` with 4 KiB pages.
fn table_value(pa: u64) -> u64 {
    VALID | pa
}

/// The ITS off, every table and the queue cleared.
fn its_off(g: &Gic3) {
    w32(g.its + GITS_CTLR, 0);
    for n in 0..8 {
        let at = g.its + GITS_BASER0 + 8 * n;
        w64(at, r64(at) & !VALID);
    }
    w64(g.its + GITS_CBASER, 0);
}

/// A host command queue of one page at `queue`, and the write offset.
struct Queue {
    pa: u64,
    write: u64,
}

impl Queue {
    fn install(g: &Gic3, pa: u64) -> Self {
        zero(pa, 1);
        w64(g.its + GITS_CBASER, VALID | pa);
        w64(g.its + GITS_CWRITER, 0);
        Self { pa, write: 0 }
    }

    /// Writes `commands` and GITS_CWRITER; whether GITS_CREADR caught up.
    fn send(&mut self, g: &Gic3, commands: &[[u64; 4]]) -> bool {
        for cmd in commands {
            for (i, w) in cmd.iter().enumerate() {
                // SAFETY: the host's own queue page.
                unsafe {
                    core::ptr::write_volatile((self.pa + self.write + 8 * i as u64) as *mut u64, *w)
                };
            }
            self.write = (self.write + 32) % PAGE;
        }
        w64(g.its + GITS_CWRITER, self.write);
        (0..POLLS).any(|_| r64(g.its + GITS_CREADR) & 0xf_ffe0 == self.write)
    }
}

fn mapd(device: u64, itt: u64) -> [u64; 4] {
    // Two events (Size = EventID bits - 1 = 0).
    [0x08 | (device << 32), 0, VALID | itt, 0]
}

fn mapc(collection: u64, target: u64) -> [u64; 4] {
    [0x09, 0, VALID | (target << 16) | collection, 0]
}

fn mapti(device: u64, event: u64, intid: u64, collection: u64) -> [u64; 4] {
    [0x0a | (device << 32), event | (intid << 32), collection, 0]
}

fn int(device: u64, event: u64) -> [u64; 4] {
    [0x03 | (device << 32), event, 0, 0]
}

fn sync(target: u64) -> [u64; 4] {
    [0x05, 0, target << 16, 0]
}

/// A VM holding one page of the host's RAM (64 KiB-aligned, so it can be
/// named as a pending table): the memory the host does not own.
fn victim(c: &mut Checks, ram: &mut Ram) -> Option<(u64, u64)> {
    let pa = ram.take(16, 0x1_0000)?;
    let (r, handle) = vm_create(p::BASE_IPA, 0);
    let d = donate(handle, pa, 1, p::BASE_IPA);
    c.check(
        r.ok() && d.ok(),
        format_args!("its: a VM holds page {pa:#x} (VM_CREATE {r}, VM_DONATE {d})"),
    );
    (r.ok() && d.ok()).then_some((handle, pa))
}

fn release(c: &mut Checks, handle: u64, pa: u64) {
    let d = destroy(handle);
    let r = reclaim(handle, pa, 1);
    c.check(
        d.ok() && r.ok(),
        format_args!(
            "its: the VM destroyed and its page taken back (VM_DESTROY {d}, VM_RECLAIM {r})"
        ),
    );
}

/// Runs the ITS case `name`; false if there is none by that name.
pub(super) fn run(c: &mut Checks, platform: &Platform<'_>, dtb: &[u8], name: &str) -> bool {
    let case: fn(&mut Checks, &Gic3, &mut Ram, &[u8]) = match name {
        "its_device_table" => device_table,
        "its_itt" => itt,
        "its_command_queue" => command_queue,
        "lpi_pending_table" => lpi_tables,
        _ => return false,
    };
    let Some(g) = discover(c, platform, dtb) else {
        return true;
    };
    open_cpu_interface();
    let mut ram = Ram::new(platform, dtb);
    case(c, &g, &mut ram, dtb);
    consistent(c, name);
    let alive = super::hvc(moat_abi::hypercall::NULL, [0; 3])[0];
    c.check(
        alive == 0,
        format_args!("its: the core still answers after {name} ({})", Code(alive)),
    );
    true
}

/// The honest flow on the host's own memory: tables `devices` and
/// `collections`, the queue at `queue`, device 2 with its ITT at `itt`
/// raising [`HONEST_LPI`], which must be delivered.
fn honest_flow(c: &mut Checks, g: &Gic3, devices: u64, collections: u64, queue: u64, itt: u64) {
    its_off(g);
    let (Some(dt), Some(ct)) = (baser(g, 1), baser(g, 4)) else {
        c.check(
            false,
            format_args!("its: device and collection tables offered"),
        );
        return;
    };
    zero(devices, 1);
    zero(collections, 1);
    zero(itt, 1);
    w64(
        dt,
        (r64(dt) & (0x1f << 48 | 7 << 56)) | table_value(devices),
    );
    w64(
        ct,
        (r64(ct) & (0x1f << 48 | 7 << 56)) | table_value(collections),
    );
    let mut q = Queue::install(g, queue);
    w32(g.its + GITS_CTLR, 1);
    let taken = q.send(
        g,
        &[
            mapc(0, g.target),
            mapd(2, itt),
            mapti(2, 0, HONEST_LPI, 0),
            int(2, 0),
            sync(g.target),
        ],
    );
    c.check(
        r64(dt) & VALID != 0 && taken && lpi_taken(HONEST_LPI),
        format_args!(
            "its: with tables in the host's own memory, MAPD, MAPTI and INT deliver LPI {HONEST_LPI}"
        ),
    );
    // Tables in use are the hypervisor's: the host can no longer read them.
    expect_abort(
        c,
        format_args!("its: the host reads its device table while the ITS uses it"),
        devices,
        devices + PAGE,
        Some(false),
        || {
            read_u64(devices);
        },
    );
    consistent(c, "the ITS took the host's tables");
    its_off(g);
}

/// Case 1: the device table at a VM's page.
fn device_table(c: &mut Checks, g: &Gic3, ram: &mut Ram, _dtb: &[u8]) {
    let (Some(lpi), Some(col), Some(q), Some(itt), Some(honest)) = (
        LpiTables::take(ram),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
    ) else {
        c.check(false, format_args!("its: pages for the case"));
        return;
    };
    c.check(
        enable_lpis(g, lpi.prop, lpi.pend),
        format_args!("its: LPIs on with the host's own property and pending tables"),
    );
    let Some((handle, page)) = victim(c, ram) else {
        return;
    };
    its_off(g);
    let (Some(dt), Some(ct)) = (baser(g, 1), baser(g, 4)) else {
        c.check(
            false,
            format_args!("its: device and collection tables offered"),
        );
        return;
    };
    zero(col, 1);
    zero(itt, 1);
    w64(ct, (r64(ct) & (0x1f << 48 | 7 << 56)) | table_value(col));
    w64(dt, (r64(dt) & (0x1f << 48 | 7 << 56)) | table_value(page));
    c.check(
        r64(dt) & VALID == 0,
        format_args!("its: GITS_BASER with the device table at the VM's page {page:#x} reads back not valid ({:#x})", r64(dt)),
    );
    let mut queue = Queue::install(g, q);
    w32(g.its + GITS_CTLR, 1);
    let taken = queue.send(
        g,
        &[
            mapc(0, g.target),
            mapd(1, itt),
            mapti(1, 0, ATTACK_LPI, 0),
            int(1, 0),
            sync(g.target),
        ],
    );
    c.check(
        taken,
        format_args!("its: GITS_CREADR moves past every command"),
    );
    c.check(
        !lpi_taken(ATTACK_LPI) && !dirty(itt, PAGE),
        format_args!(
            "its: MAPD with the device table at a VM's page never lands (no LPI {ATTACK_LPI}, the host's ITT untouched)"
        ),
    );
    honest_flow(c, g, honest, col, q, itt);
    release(c, handle, page);
}

/// Case 2: an ITT at a VM's page, then at the hypervisor's memory.
fn itt(c: &mut Checks, g: &Gic3, ram: &mut Ram, dtb: &[u8]) {
    let (Some(lpi), Some(dev), Some(col), Some(q), Some(itt)) = (
        LpiTables::take(ram),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
    ) else {
        c.check(false, format_args!("its: pages for the case"));
        return;
    };
    c.check(
        enable_lpis(g, lpi.prop, lpi.pend),
        format_args!("its: LPIs on with the host's own property and pending tables"),
    );
    let Some((handle, page)) = victim(c, ram) else {
        return;
    };
    let carve = hypervisor_region(dtb).map_or(0, |r| r.base + r.size / 2) & !0xff;
    its_off(g);
    let (Some(dt), Some(ct)) = (baser(g, 1), baser(g, 4)) else {
        c.check(
            false,
            format_args!("its: device and collection tables offered"),
        );
        return;
    };
    zero(dev, 1);
    zero(col, 1);
    w64(dt, (r64(dt) & (0x1f << 48 | 7 << 56)) | table_value(dev));
    w64(ct, (r64(ct) & (0x1f << 48 | 7 << 56)) | table_value(col));
    let mut queue = Queue::install(g, q);
    w32(g.its + GITS_CTLR, 1);
    let attempts = [("a VM's page", page), ("the hypervisor's memory", carve)];
    for (device, ((what, bad), lpi)) in (3..).zip(attempts.into_iter().zip(ITT_ATTACK_LPIS)) {
        let taken = queue.send(
            g,
            &[
                mapc(0, g.target),
                mapd(device, bad),
                mapti(device, 0, lpi, 0),
                int(device, 0),
                sync(g.target),
            ],
        );
        c.check(
            taken && !lpi_taken(lpi),
            format_args!(
                "its: MAPD with the ITT at {what} ({bad:#x}) never lands (GITS_CREADR moved on, no LPI {lpi})"
            ),
        );
    }
    // The device table the ITS uses cannot be given to a VM.
    let d = donate(handle, dev, 1, p::BASE_IPA + PAGE);
    c.check(
        d.is(Error::Denied),
        format_args!("its: VM_DONATE of the ITS's device table refused ({d})"),
    );
    honest_flow(c, g, dev, col, q, itt);
    release(c, handle, page);
}

/// Case 3: the command queue at a VM's page, and a queue in use given away.
fn command_queue(c: &mut Checks, g: &Gic3, ram: &mut Ram, _dtb: &[u8]) {
    let (Some(lpi), Some(dev), Some(col), Some(q), Some(itt)) = (
        LpiTables::take(ram),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
    ) else {
        c.check(false, format_args!("its: pages for the case"));
        return;
    };
    c.check(
        enable_lpis(g, lpi.prop, lpi.pend),
        format_args!("its: LPIs on with the host's own property and pending tables"),
    );
    let Some((handle, page)) = victim(c, ram) else {
        return;
    };
    its_off(g);
    w64(g.its + GITS_CBASER, VALID | page);
    w64(g.its + GITS_CWRITER, 0);
    w32(g.its + GITS_CTLR, 1);
    let cbaser = r64(g.its + GITS_CBASER);
    w64(g.its + GITS_CWRITER, 32);
    // Each read of the page is a trap into the core: a thousand are ample
    // for an ITS that processes its queue as GITS_CWRITER is written.
    let mut read = 0;
    for _ in 0..1000 {
        read = r64(g.its + GITS_CREADR);
    }
    c.check(
        cbaser & VALID == 0 && read == 0,
        format_args!(
            "its: GITS_CBASER at the VM's page {page:#x} refused (reads back {cbaser:#x}; GITS_CREADR {read:#x}: the hardware read nothing there)"
        ),
    );
    its_off(g);
    let mut queue = Queue::install(g, q);
    w32(g.its + GITS_CTLR, 1);
    let d = donate(handle, q, 1, p::BASE_IPA + PAGE);
    c.check(
        d.is(Error::Denied),
        format_args!("its: VM_DONATE of the command queue in use refused ({d})"),
    );
    let taken = queue.send(g, &[sync(g.target)]);
    c.check(
        taken,
        format_args!("its: the queue still works after the refused donation"),
    );
    honest_flow(c, g, dev, col, q, itt);
    release(c, handle, page);
}

/// The ITS on with tables in the host's own memory, device 1's events 0
/// and 1 mapped to [`ATTACK_LPI`] and [`HONEST_LPI`]: INT then makes
/// either pending at this CPU's redistributor.
fn its_ready(g: &Gic3, dev: u64, col: u64, q: u64, itt: u64) -> Option<Queue> {
    its_off(g);
    let (dt, ct) = (baser(g, 1)?, baser(g, 4)?);
    zero(dev, 1);
    zero(col, 1);
    zero(itt, 1);
    w64(dt, (r64(dt) & (0x1f << 48 | 7 << 56)) | table_value(dev));
    w64(ct, (r64(ct) & (0x1f << 48 | 7 << 56)) | table_value(col));
    let mut queue = Queue::install(g, q);
    w32(g.its + GITS_CTLR, 1);
    queue
        .send(
            g,
            &[
                mapc(0, g.target),
                mapd(1, itt),
                mapti(1, 0, ATTACK_LPI, 0),
                mapti(1, 1, HONEST_LPI, 0),
                sync(g.target),
            ],
        )
        .then_some(queue)
}

/// Case 4: GICR_PENDBASER, then GICR_PROPBASER, at a VM's page; the LPI is
/// made pending through the ITS (INT), as a device's MSI would.
fn lpi_tables(c: &mut Checks, g: &Gic3, ram: &mut Ram, _dtb: &[u8]) {
    let (Some(lpi), Some(dev), Some(col), Some(q), Some(itt)) = (
        LpiTables::take(ram),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
        ram.take(1, PAGE),
    ) else {
        c.check(false, format_args!("its: pages for the case"));
        return;
    };
    let Some((handle, page)) = victim(c, ram) else {
        return;
    };
    let Some(mut queue) = its_ready(g, dev, col, q, itt) else {
        c.check(false, format_args!("its: the ITS takes the host's tables"));
        return;
    };
    let on = enable_lpis(g, lpi.prop, page);
    let taken = queue.send(g, &[int(1, 0), sync(g.target)]);
    let delivered = lpi_taken(ATTACK_LPI);
    c.check(
        !on && taken && !delivered,
        format_args!(
            "its: GICR_PENDBASER at the VM's page {page:#x}: LPIs stay off and LPI {ATTACK_LPI} made pending is never written or delivered (EnableLPIs {on}, delivered {delivered})"
        ),
    );
    let on = enable_lpis(g, page, lpi.pend);
    let taken = queue.send(g, &[int(1, 0), sync(g.target)]);
    let delivered = lpi_taken(ATTACK_LPI);
    c.check(
        !on && taken && !delivered,
        format_args!(
            "its: GICR_PROPBASER at the VM's page {page:#x}: LPIs stay off (EnableLPIs {on}, delivered {delivered})"
        ),
    );
    w32(g.rd + GICR_CTLR, r32(g.rd + GICR_CTLR) & !1);
    let on = enable_lpis(g, lpi.prop, lpi.pend);
    let taken = queue.send(g, &[int(1, 1), sync(g.target)]);
    let delivered = lpi_taken(HONEST_LPI);
    c.check(
        on && taken && delivered,
        format_args!(
            "its: with the host's own tables LPIs come on and LPI {HONEST_LPI} is delivered (EnableLPIs {on}, delivered {delivered})"
        ),
    );
    expect_abort(
        c,
        format_args!("its: the host reads its pending table while the redistributor uses it"),
        lpi.pend,
        lpi.pend + PAGE,
        Some(false),
        || {
            read_u64(lpi.pend);
        },
    );
    consistent(c, "the redistributor took the host's tables");
    its_off(g);
    release(c, handle, page);
}
