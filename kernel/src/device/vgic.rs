//! A protected VM's virtual GICv3 CPU interface and virtual timer, as the
//! core switches them with the vCPU (the decisions are in
//! `moat_kernel::vgic`; this module holds the register accesses).
//!
//! The core owns only what must change atomically with the world switch:
//! the list registers, ICH_VMCR_EL2, the active-priority registers and
//! ICH_HCR_EL2. The distributor and redistributors a guest sees are the
//! host VMM's to emulate from MMIO exits. Two physical PPIs of the running
//! CPU are the core's for the length of a run, each put back as the host
//! had it afterwards:
//!
//! - PPI 27, the virtual timer's: the guest's CNTV registers are in the CPU
//!   during the run, so the physical line is the guest's. It is enabled
//!   only while the guest's timer interrupt is not already in flight (for a
//!   VM without a virtual GIC, never): a fired timer traps once, the core
//!   makes virtual INTID 27 pending and the line stays off until the guest
//!   deactivates it. Without that, a guest whose timer fired and is
//!   unmasked would end every run at once.
//! - PPI 25, the GIC's maintenance interrupt, at priority 0 like the
//!   watchdog: it tells the core that the guest deactivated the timer's
//!   interrupt (EOI maintenance) or that the list registers ran low while
//!   interrupts are still waiting (underflow).

use crate::arch::gic::GicAccess;
use crate::arch::ich::{
    self, read_ap0r, read_ap1r, read_eisr, read_lr, read_misr, read_sysreg_vtr, read_vmcr,
    write_ap0r, write_ap1r, write_ich_hcr, write_lr, write_vmcr,
};
use core::ptr::{read_volatile, write_volatile};
use moat_kernel::vgic::{
    self as logic, EoiLog, InjectError, ListRegister, MAINTENANCE_INTID, MAX_LRS, PendingQueue,
    VTIMER_INTID, VTIMER_PRIORITY,
};

/// ICH_HCR_EL2.En: the virtual CPU interface is on.
const ICH_HCR_EN: u64 = 1 << 0;
/// ICH_HCR_EL2.UIE: maintenance interrupt when at most one list register
/// holds an interrupt.
const ICH_HCR_UIE: u64 = 1 << 1;

/// The guest's CNTV_CTL_EL0 and CNTV_CVAL_EL0, live in the CPU during a run.
pub fn guest_timer() -> (u64, u64) {
    ich::guest_timer()
}

/// The shape of this machine's virtual CPU interface.
#[derive(Clone, Copy, Debug)]
pub struct Geometry {
    pub lrs: usize,
    pub aprs: usize,
}

/// Reads ICH_VTR_EL2 (only on a CPU with the GIC system registers).
pub fn geometry() -> Geometry {
    let (lrs, aprs) = logic::vtr_geometry(read_sysreg_vtr());
    Geometry { lrs, aprs }
}

/// A vCPU's virtual CPU interface, while it does not run.
pub struct VgicCpu {
    geometry: Geometry,
    lrs: [ListRegister; MAX_LRS],
    ap0r: [u64; 4],
    ap1r: [u64; 4],
    vmcr: u64,
    queue: PendingQueue,
    /// Deactivations the host asked to hear of, for its next exit.
    eois: EoiLog,
}

impl VgicCpu {
    pub fn new(geometry: Geometry) -> Self {
        Self {
            geometry,
            lrs: [ListRegister::default(); MAX_LRS],
            ap0r: [0; 4],
            ap1r: [0; 4],
            vmcr: 0,
            queue: PendingQueue::EMPTY,
            eois: EoiLog::default(),
        }
    }

    /// Whether `n` more injections are sure to be taken.
    pub fn has_room(&self, n: usize) -> bool {
        self.queue.has_room(n)
    }

    /// Makes `intid` pending (see `moat_kernel::vgic::inject`).
    pub fn inject(
        &mut self,
        intid: u32,
        priority: u8,
        notify_eoi: bool,
    ) -> Result<(), InjectError> {
        let Self { lrs, queue, .. } = self;
        logic::inject(
            &mut lrs[..self.geometry.lrs],
            queue,
            intid,
            priority,
            notify_eoi,
        )
    }

    /// The deactivations to report, as an `Eoi` exit's x2..x7; `None` if
    /// there are none.
    pub fn take_eois(&mut self) -> Option<[u64; 6]> {
        if self.eois.is_empty() {
            return None;
        }
        let mut detail = [0u64; 6];
        detail[0] = self.eois.take(&mut detail[1..]) as u64;
        Some(detail)
    }

    fn timer_in_flight(&self) -> bool {
        logic::in_flight(&self.lrs[..self.geometry.lrs], &self.queue, VTIMER_INTID)
    }

    /// At the start of a run: the active priorities and controls in.
    pub fn load(&self) {
        for i in 0..self.geometry.aprs {
            write_ap0r(i, self.ap0r[i]);
            write_ap1r(i, self.ap1r[i]);
        }
        write_vmcr(self.vmcr);
    }

    /// At the end of a run (after [`Self::after_exit`]): the active
    /// priorities and controls out, and the interface off for the host.
    pub fn save(&mut self) {
        for i in 0..self.geometry.aprs {
            self.ap0r[i] = read_ap0r(i);
            self.ap1r[i] = read_ap1r(i);
        }
        self.vmcr = read_vmcr();
        write_ich_hcr(0);
    }

    /// Before each entry: a fired timer made pending, waiting interrupts
    /// moved into free list registers, the registers and controls written.
    /// Returns whether the timer's physical PPI should be enabled (its
    /// virtual interrupt is not in flight).
    pub fn before_entry(&mut self) -> bool {
        let (ctl, _) = guest_timer();
        if logic::timer_fired(ctl) && !self.timer_in_flight() {
            // A full queue leaves the timer to fire again later.
            let _ = self.inject(VTIMER_INTID, VTIMER_PRIORITY, false);
        }
        let n = self.geometry.lrs;
        let Self { lrs, queue, .. } = self;
        let waiting = logic::fill(&mut lrs[..n], queue, |intid| intid == VTIMER_INTID);
        for (i, lr) in self.lrs[..n].iter().enumerate() {
            write_lr(i, lr.0);
        }
        write_ich_hcr(ICH_HCR_EN | if waiting { ICH_HCR_UIE } else { 0 });
        !self.timer_in_flight()
    }

    /// After each exit: the list registers read back; an EOI maintenance
    /// condition cleared (the register is freed, and the INTID logged for
    /// the host unless it is the timer's, which is the core's own).
    /// Returns whether a maintenance interrupt was what stopped the guest.
    pub fn after_exit(&mut self) -> bool {
        let n = self.geometry.lrs;
        for (i, lr) in self.lrs[..n].iter_mut().enumerate() {
            *lr = ListRegister(read_lr(i));
        }
        let misr = read_misr();
        let eisr = read_eisr();
        for i in 0..n {
            if eisr & (1 << i) != 0 {
                let intid = self.lrs[i].intid();
                if intid != VTIMER_INTID {
                    self.eois.push(intid);
                }
                self.lrs[i] = ListRegister::default();
                write_lr(i, 0);
            }
        }
        misr != 0
    }

    /// Whether the guest's timer fired while its interrupt is not in flight
    /// (a physical PPI 27 that is the guest's, not the host's).
    pub fn timer_due(&self) -> bool {
        logic::timer_fired(guest_timer().0) && !self.timer_in_flight()
    }

    /// Whether a WFI would end at once: an interrupt the interface signals
    /// is pending or waiting, or the timer is due.
    pub fn would_wake(&self) -> bool {
        let vmcr = read_vmcr();
        self.timer_due()
            || logic::has_deliverable(&self.lrs[..self.geometry.lrs], &self.queue, vmcr)
    }

    /// When the guest's timer next needs it running: its deadline, unless
    /// its interrupt is already in flight.
    pub fn timer_deadline(&self) -> u64 {
        if self.timer_in_flight() {
            return u64::MAX;
        }
        let (ctl, cval) = guest_timer();
        logic::timer_deadline(ctl, cval)
    }

    /// Turns the interface off while a service runs on the VM's behalf, so
    /// nothing pending is signalled to it; [`Self::before_entry`] turns it
    /// on again.
    pub fn pause() {
        write_ich_hcr(0);
    }
}

fn rd32(addr: u64) -> u32 {
    // SAFETY: `addr` is a GIC register in a region the core maps as device
    // memory.
    unsafe { read_volatile(addr as *const u32) }
}

fn wr32(addr: u64, v: u32) {
    // SAFETY: as for `rd32`.
    unsafe { write_volatile(addr as *mut u32, v) }
}

/// The banked SGI/PPI registers of this CPU: its redistributor's SGI frame
/// (GICv3) or the distributor (GICv2), and whether a write to ICENABLER0
/// must be waited for (GICR_CTLR.RWP).
fn ppi_frame(access: &GicAccess) -> (u64, Option<u64>) {
    match *access {
        GicAccess::V3 { sgi_frame, .. } => (sgi_frame, Some(sgi_frame - 0x1_0000)),
        GicAccess::V2 { distributor, .. } => (distributor, None),
    }
}

/// The host's settings of the two PPIs a run borrows.
#[derive(Clone, Copy, Debug)]
pub struct BorrowedPpis {
    timer_enabled: bool,
    maintenance_enabled: bool,
    maintenance_priority: u32,
    maintenance_group: bool,
    /// What the run has PPI 27 set to now.
    timer_now: bool,
}

/// At the start of a run: notes the host's settings of PPIs 27 and 25,
/// disables PPI 27 and, for a virtual-GIC VM, opens PPI 25 at priority 0.
pub fn borrow_ppis(access: &GicAccess, vgic: bool) -> BorrowedPpis {
    let (frame, _) = ppi_frame(access);
    let enabled = rd32(frame + 0x100);
    let priority_word = frame + 0x400 + u64::from(MAINTENANCE_INTID & !3);
    let shift = 8 * (MAINTENANCE_INTID % 4);
    let saved = BorrowedPpis {
        timer_enabled: enabled & (1 << VTIMER_INTID) != 0,
        maintenance_enabled: enabled & (1 << MAINTENANCE_INTID) != 0,
        maintenance_priority: (rd32(priority_word) >> shift) & 0xff,
        maintenance_group: rd32(frame + 0x80) & (1 << MAINTENANCE_INTID) != 0,
        timer_now: true,
    };
    let mut b = saved;
    set_timer_ppi(access, &mut b, false);
    if vgic {
        wr32(frame + 0x80, rd32(frame + 0x80) | (1 << MAINTENANCE_INTID));
        wr32(priority_word, rd32(priority_word) & !(0xff << shift));
        wr32(frame + 0x100, 1 << MAINTENANCE_INTID);
    }
    b
}

/// Enables or disables the timer's physical PPI for the rest of the run.
pub fn set_timer_ppi(access: &GicAccess, b: &mut BorrowedPpis, on: bool) {
    if b.timer_now == on {
        return;
    }
    let (frame, rwp) = ppi_frame(access);
    wr32(frame + if on { 0x100 } else { 0x180 }, 1 << VTIMER_INTID);
    if let (false, Some(rd)) = (on, rwp) {
        // Disabling completes when GICR_CTLR.RWP clears; until then the
        // interrupt may still be signalled.
        let mut spins = 0;
        while rd32(rd) & (1 << 3) != 0 && spins < 100_000 {
            spins += 1;
        }
    }
    b.timer_now = on;
}

/// After the run: both PPIs as the host had them.
pub fn return_ppis(access: &GicAccess, mut b: BorrowedPpis, vgic: bool) {
    let (frame, _) = ppi_frame(access);
    let timer = b.timer_enabled;
    set_timer_ppi(access, &mut b, timer);
    if vgic {
        if !b.maintenance_enabled {
            wr32(frame + 0x180, 1 << MAINTENANCE_INTID);
        }
        let priority_word = frame + 0x400 + u64::from(MAINTENANCE_INTID & !3);
        let shift = 8 * (MAINTENANCE_INTID % 4);
        wr32(
            priority_word,
            (rd32(priority_word) & !(0xff << shift)) | (b.maintenance_priority << shift),
        );
        if !b.maintenance_group {
            wr32(frame + 0x80, rd32(frame + 0x80) & !(1 << MAINTENANCE_INTID));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::ich::with_ich;
    use moat_kernel::vgic::LrState;

    /// Four list registers, 5 priority bits (one active-priority register
    /// of each group).
    const VTR: u64 = 3 | (4 << 29) | (4 << 26);

    fn vcpu() -> VgicCpu {
        with_ich(|r| r.vtr = VTR);
        let g = geometry();
        assert_eq!((g.lrs, g.aprs), (4, 1));
        VgicCpu::new(g)
    }

    fn lrs() -> Vec<ListRegister> {
        with_ich(|r| r.lr[..4].iter().map(|&v| ListRegister(v)).collect())
    }

    #[test]
    fn a_run_loads_and_saves_the_controls_and_turns_the_interface_off() {
        let mut v = vcpu();
        with_ich(|r| {
            r.ap0r[0] = 0x11;
            r.ap1r[0] = 0x22;
            r.vmcr = 0xf000_0002;
            r.hcr = ICH_HCR_EN;
        });
        v.save();
        with_ich(|r| {
            assert_eq!(r.hcr, 0);
            r.ap0r[0] = 0;
            r.ap1r[0] = 0;
            r.vmcr = 0;
        });
        v.load();
        with_ich(|r| assert_eq!((r.ap0r[0], r.ap1r[0], r.vmcr), (0x11, 0x22, 0xf000_0002)));
        with_ich(|r| r.hcr = ICH_HCR_EN);
        VgicCpu::pause();
        with_ich(|r| assert_eq!(r.hcr, 0));
    }

    #[test]
    fn injected_interrupts_reach_the_list_registers_and_wait_beyond_them() {
        let mut v = vcpu();
        for intid in 40..46 {
            v.inject(intid, 0x80, false).unwrap();
        }
        assert!(v.has_room(1));
        // Four fit; two wait, so the underflow maintenance is asked for.
        assert!(v.before_entry(), "the timer is not in flight");
        let written = lrs();
        assert_eq!(
            written.iter().map(|lr| lr.intid()).collect::<Vec<_>>(),
            [40, 41, 42, 43]
        );
        assert!(written.iter().all(|lr| lr.state() == LrState::Pending));
        with_ich(|r| assert_eq!(r.hcr, ICH_HCR_EN | ICH_HCR_UIE));
        // Group 1 enabled, priority mask open: something is deliverable.
        with_ich(|r| r.vmcr = (0xff << 24) | (1 << 1));
        assert!(v.would_wake());
        with_ich(|r| r.vmcr = 0);
        assert!(!v.would_wake());
    }

    #[test]
    fn a_deactivation_frees_the_register_and_is_reported_unless_it_is_the_timer() {
        let mut v = vcpu();
        v.inject(50, 0x80, true).unwrap();
        assert!(v.before_entry());
        assert_eq!(v.take_eois(), None);
        // The guest took and deactivated INTID 50: the register's state is
        // invalid again (its INTID stays), EOI maintenance on LR 0.
        with_ich(|r| {
            r.lr[0] &= !(0b11 << 62);
            r.eisr = 1;
            r.misr = 1;
        });
        assert!(
            v.after_exit(),
            "the maintenance interrupt stopped the guest"
        );
        assert_eq!(v.take_eois(), Some([1, 50, 0, 0, 0, 0]));
        assert_eq!(v.take_eois(), None);
        with_ich(|r| {
            r.eisr = 0;
            r.misr = 0;
        });
        assert!(!v.after_exit());
    }

    #[test]
    fn a_fired_timer_is_injected_once_and_its_line_held_until_deactivated() {
        let mut v = vcpu();
        // Enabled, not masked, fired; deadline 1000.
        with_ich(|r| {
            r.cntv_ctl = 0b101;
            r.cntv_cval = 1000;
        });
        assert!(v.timer_due());
        assert!(
            !v.before_entry(),
            "the timer's line stays off while in flight"
        );
        assert_eq!(lrs()[0].intid(), VTIMER_INTID);
        assert!(!v.timer_due());
        assert_eq!(v.timer_deadline(), u64::MAX);
        // Entering again injects nothing more.
        assert!(!v.before_entry());
        assert_eq!(
            lrs().iter().filter(|lr| lr.intid() == VTIMER_INTID).count(),
            1
        );
        // The guest deactivates it: not reported to the host (the core's).
        with_ich(|r| {
            r.lr[0] &= !(0b11 << 62);
            r.eisr = 1;
            r.cntv_ctl = 0b001;
        });
        v.after_exit();
        assert_eq!(v.take_eois(), None);
        assert_eq!(v.timer_deadline(), 1000);
        with_ich(|r| r.eisr = 0);
        assert!(v.before_entry());
    }

    /// A GICv3 redistributor's RD and SGI frames, as a buffer.
    struct Frames(Vec<u32>);

    impl Frames {
        fn new() -> Self {
            Self(vec![0; 0x2_0000 / 4])
        }

        fn access(&mut self) -> GicAccess {
            let base = self.0.as_mut_ptr().expose_provenance() as u64;
            GicAccess::V3 {
                distributor: 0,
                sgi_frame: base + 0x1_0000,
                priority_bits: 5,
            }
        }

        fn sgi(&mut self, offset: usize) -> &mut u32 {
            &mut self.0[(0x1_0000 + offset) / 4]
        }
    }

    #[test]
    fn a_run_borrows_the_timer_and_maintenance_ppis_and_gives_them_back() {
        let mut f = Frames::new();
        // The host: timer PPI enabled, maintenance PPI disabled at 0xa0,
        // group 0.
        *f.sgi(0x100) = 1 << VTIMER_INTID;
        *f.sgi(0x418) = 0xa0 << 8;
        let access = f.access();
        let mut b = borrow_ppis(&access, true);
        // Timer line disabled (ICENABLER0), maintenance opened at priority
        // 0 in group 1 and enabled (ISENABLER0).
        assert_eq!(*f.sgi(0x180), 1 << VTIMER_INTID);
        assert_eq!(*f.sgi(0x80), 1 << MAINTENANCE_INTID);
        assert_eq!(*f.sgi(0x418) & 0xff00, 0);
        assert_eq!(*f.sgi(0x100), 1 << MAINTENANCE_INTID);
        // The run turns the timer line on (and again: no second write).
        set_timer_ppi(&access, &mut b, true);
        assert_eq!(*f.sgi(0x100), 1 << VTIMER_INTID);
        *f.sgi(0x100) = 0;
        set_timer_ppi(&access, &mut b, true);
        assert_eq!(*f.sgi(0x100), 0);
        set_timer_ppi(&access, &mut b, false);
        *f.sgi(0x180) = 0;
        return_ppis(&access, b, true);
        // As the host had them.
        assert_eq!(*f.sgi(0x100), 1 << VTIMER_INTID);
        assert_eq!(*f.sgi(0x180), 1 << MAINTENANCE_INTID);
        assert_eq!(*f.sgi(0x418), 0xa0 << 8);
        assert_eq!(*f.sgi(0x80), 0);
    }
}
