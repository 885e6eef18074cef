//! The virtual GICv3 CPU interface of a protected VM: the pure part.
//!
//! A VM created with `VmFlags::VGIC` takes its interrupts through the GIC's
//! list registers: the core writes a virtual interrupt into a free list
//! register, the CPU interface signals it to the VM, and the VM acknowledges
//! and deactivates it through its own (virtual) CPU-interface registers,
//! never trapping. The list registers are few (4 on QEMU), so the interrupts
//! the host injected that do not fit yet wait in a small queue of the
//! vCPU's ([`PendingQueue`]) and move into the registers as they free up.
//!
//! What is decided here, host-tested: the list-register encoding, how an
//! injection merges with what is already in flight, which waiting interrupt
//! goes into a free register first, whether the VM has an interrupt that
//! would wake it from WFI, and when the guest's virtual timer has fired.
//! The register accesses themselves are in `device/vgic.rs`.

/// The guest's virtual timer: PPI 11, INTID 27.
pub const VTIMER_INTID: u32 = 27;
/// The GIC's maintenance interrupt: PPI 9, INTID 25.
pub const MAINTENANCE_INTID: u32 = 25;
/// The priority the core gives the timer's virtual interrupt (Linux's
/// default priority for every interrupt).
pub const VTIMER_PRIORITY: u8 = 0xa0;
/// Interrupts at or above this are special or LPIs: never injected.
pub const FIRST_SPECIAL_INTID: u32 = 1020;
/// Most interrupts waiting for a list register per vCPU.
pub const QUEUE_LEN: usize = 32;
/// Most list registers the architecture allows.
pub const MAX_LRS: usize = 16;

/// One ICH_LR<n>_EL2 value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ListRegister(pub u64);

/// The state field of a list register (bits 63:62).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrState {
    Invalid,
    Pending,
    Active,
    PendingActive,
}

impl ListRegister {
    const STATE_SHIFT: u32 = 62;
    const GROUP1: u64 = 1 << 60;
    /// With HW clear, bit 41: a maintenance interrupt when the guest
    /// deactivates the interrupt.
    const EOI: u64 = 1 << 41;

    /// A pending group-1 virtual interrupt, not tied to a physical one.
    /// `notify_eoi` asks for a maintenance interrupt on its deactivation.
    pub const fn pending(intid: u32, priority: u8, notify_eoi: bool) -> Self {
        let eoi = if notify_eoi { Self::EOI } else { 0 };
        Self(
            (0b01 << Self::STATE_SHIFT)
                | Self::GROUP1
                | eoi
                | ((priority as u64) << 48)
                | intid as u64,
        )
    }

    pub const fn intid(self) -> u32 {
        self.0 as u32
    }

    pub const fn priority(self) -> u8 {
        (self.0 >> 48) as u8
    }

    pub const fn state(self) -> LrState {
        match self.0 >> Self::STATE_SHIFT {
            0 => LrState::Invalid,
            1 => LrState::Pending,
            2 => LrState::Active,
            _ => LrState::PendingActive,
        }
    }

    /// Whether the register holds nothing (free to reuse).
    pub const fn is_free(self) -> bool {
        matches!(self.state(), LrState::Invalid)
    }

    /// The same interrupt, pending again (an edge that arrived while the
    /// guest was still handling the previous one).
    pub const fn with_pending(self) -> Self {
        Self(self.0 | (0b01 << Self::STATE_SHIFT))
    }

    /// The same interrupt, with a maintenance interrupt on its
    /// deactivation.
    pub const fn with_eoi(self) -> Self {
        Self(self.0 | Self::EOI)
    }

    /// Whether its deactivation raises a maintenance interrupt.
    pub const fn notifies_eoi(self) -> bool {
        self.0 & Self::EOI != 0
    }
}

/// An interrupt waiting for a list register.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waiting {
    pub intid: u32,
    pub priority: u8,
    /// The host asked to hear of its deactivation.
    pub notify_eoi: bool,
}

/// The interrupts injected into a vCPU that are not in a list register yet.
#[derive(Clone, Copy, Debug)]
pub struct PendingQueue {
    entries: [Waiting; QUEUE_LEN],
    len: usize,
}

impl Default for PendingQueue {
    fn default() -> Self {
        Self::EMPTY
    }
}

/// Why an injection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectError {
    /// Not an SGI, PPI or SPI.
    BadIntid,
    /// The vCPU's queue is full.
    Full,
}

impl PendingQueue {
    pub const EMPTY: Self = Self {
        entries: [Waiting {
            intid: 0,
            priority: 0,
            notify_eoi: false,
        }; QUEUE_LEN],
        len: 0,
    };

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, intid: u32) -> bool {
        self.entries[..self.len].iter().any(|w| w.intid == intid)
    }

    /// Whether `n` more distinct interrupts would fit.
    pub fn has_room(&self, n: usize) -> bool {
        self.len + n <= QUEUE_LEN
    }

    fn push(&mut self, w: Waiting) -> Result<(), InjectError> {
        let slot = self.entries.get_mut(self.len).ok_or(InjectError::Full)?;
        *slot = w;
        self.len += 1;
        Ok(())
    }

    /// Takes out the most urgent waiting interrupt: the lowest priority
    /// value, then the lowest INTID.
    fn pop_most_urgent(&mut self) -> Option<Waiting> {
        let (i, _) = self.entries[..self.len]
            .iter()
            .enumerate()
            .min_by_key(|(_, w)| (w.priority, w.intid))?;
        let w = self.entries[i];
        self.entries.copy_within(i + 1..self.len, i);
        self.len -= 1;
        Some(w)
    }
}

/// Makes `intid` pending for the vCPU whose list registers are `lrs`:
/// an interrupt already pending (in a register or waiting) stays as it is
/// (pending is a state, not a count); one the guest is handling (active)
/// becomes pending and active; any other waits for a free register.
/// `notify_eoi` (kept once asked for) raises a maintenance interrupt when
/// the guest deactivates it. Nothing changes on an error.
pub fn inject(
    lrs: &mut [ListRegister],
    queue: &mut PendingQueue,
    intid: u32,
    priority: u8,
    notify_eoi: bool,
) -> Result<(), InjectError> {
    if intid >= FIRST_SPECIAL_INTID {
        return Err(InjectError::BadIntid);
    }
    if let Some(lr) = lrs
        .iter_mut()
        .find(|lr| !lr.is_free() && lr.intid() == intid)
    {
        if lr.state() == LrState::Active {
            *lr = lr.with_pending();
        }
        if notify_eoi {
            *lr = lr.with_eoi();
        }
        return Ok(());
    }
    let len = queue.len;
    if let Some(w) = queue.entries[..len].iter_mut().find(|w| w.intid == intid) {
        w.notify_eoi |= notify_eoi;
        return Ok(());
    }
    queue.push(Waiting {
        intid,
        priority,
        notify_eoi,
    })
}

/// The INTIDs whose deactivation the host asked to hear of and the guest
/// has done, not yet reported. At most one per list register accrues per
/// exit, and every entry into the guest first reports what is here, so
/// [`MAX_LRS`] entries are enough.
#[derive(Clone, Copy, Debug, Default)]
pub struct EoiLog {
    intids: [u16; MAX_LRS],
    len: usize,
}

impl EoiLog {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Records a deactivation (dropped only if the log were full, which the
    /// bound above rules out).
    pub fn push(&mut self, intid: u32) {
        if let Some(slot) = self.intids.get_mut(self.len) {
            *slot = intid as u16;
            self.len += 1;
        }
    }

    /// Takes out up to `n` of the oldest INTIDs into `out`; returns how
    /// many.
    pub fn take(&mut self, out: &mut [u64]) -> usize {
        let n = out.len().min(self.len);
        for (o, i) in out.iter_mut().zip(&self.intids[..n]) {
            *o = u64::from(*i);
        }
        self.intids.copy_within(n..self.len, 0);
        self.len -= n;
        n
    }
}

/// Whether `intid` is in flight: pending or active in a register, or
/// waiting for one.
pub fn in_flight(lrs: &[ListRegister], queue: &PendingQueue, intid: u32) -> bool {
    queue.contains(intid) || lrs.iter().any(|lr| !lr.is_free() && lr.intid() == intid)
}

/// Moves waiting interrupts into free list registers, most urgent first.
/// `notify_eoi(intid)` says which ones the core wants to hear the guest
/// deactivate. Returns whether some are still waiting (the caller then
/// asks for an underflow maintenance interrupt).
pub fn fill(
    lrs: &mut [ListRegister],
    queue: &mut PendingQueue,
    notify_eoi: impl Fn(u32) -> bool,
) -> bool {
    for lr in lrs.iter_mut().filter(|lr| lr.is_free()) {
        let Some(w) = queue.pop_most_urgent() else {
            break;
        };
        *lr = ListRegister::pending(w.intid, w.priority, w.notify_eoi || notify_eoi(w.intid));
    }
    !queue.is_empty()
}

/// Whether the guest has a pending interrupt that its CPU interface would
/// signal: group 1 enabled in `vmcr` (ICH_VMCR_EL2.VENG1, bit 1) and a
/// priority below its mask (VPMR, bits 31:24). Such an interrupt ends a WFI
/// at once, whatever PSTATE.I says, so the core does not exit for it.
pub fn has_deliverable(lrs: &[ListRegister], queue: &PendingQueue, vmcr: u64) -> bool {
    if vmcr & (1 << 1) == 0 {
        return false;
    }
    let mask = (vmcr >> 24) as u8;
    let pending_lr = lrs.iter().any(|lr| {
        matches!(lr.state(), LrState::Pending | LrState::PendingActive) && lr.priority() < mask
    });
    pending_lr || queue.entries[..queue.len].iter().any(|w| w.priority < mask)
}

/// Whether a virtual timer with this CNTV_CTL_EL0 asserts its interrupt:
/// ENABLE and ISTATUS set, IMASK clear.
pub const fn timer_fired(cntv_ctl: u64) -> bool {
    cntv_ctl & 0b111 == 0b101
}

/// The counter value at which a virtual timer with this CNTV_CTL_EL0 and
/// CNTV_CVAL_EL0 will fire (CNTVOFF_EL2 is 0 for every partition), or
/// `u64::MAX` if it is disabled or masked.
pub const fn timer_deadline(cntv_ctl: u64, cntv_cval: u64) -> u64 {
    if cntv_ctl & 0b011 == 0b001 {
        cntv_cval
    } else {
        u64::MAX
    }
}

/// ICH_VTR_EL2: the number of list registers (ListRegs + 1) and of
/// active-priority registers per group (1, 2 or 4 for 5, 6 or 7 bits of
/// preemption).
pub const fn vtr_geometry(vtr: u64) -> (usize, usize) {
    let lrs = (vtr & 0x1f) as usize + 1;
    let pre_bits = ((vtr >> 26) & 0x7) as usize + 1;
    let aprs = match pre_bits {
        7 => 4,
        6 => 2,
        _ => 1,
    };
    (if lrs > MAX_LRS { MAX_LRS } else { lrs }, aprs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_register_encoding() {
        let lr = ListRegister::pending(27, 0xa0, true);
        assert_eq!(lr.intid(), 27);
        assert_eq!(lr.priority(), 0xa0);
        assert_eq!(lr.state(), LrState::Pending);
        assert_eq!(lr.0 >> 60 & 1, 1, "group 1");
        assert_eq!(lr.0 >> 61 & 1, 0, "not hardware-backed");
        assert_eq!(lr.0 >> 41 & 1, 1, "EOI maintenance");
        assert_eq!(ListRegister::pending(3, 0, false).0 >> 41 & 1, 0);
        assert!(ListRegister(0).is_free());
        let active = ListRegister((0b10 << 62) | 40);
        assert_eq!(active.with_pending().state(), LrState::PendingActive);
    }

    #[test]
    fn injection_merges_with_what_is_in_flight() {
        let mut lrs = [ListRegister::default(); 4];
        let mut q = PendingQueue::EMPTY;
        inject(&mut lrs, &mut q, 40, 0xa0, false).unwrap();
        inject(&mut lrs, &mut q, 40, 0xa0, false).unwrap();
        assert_eq!(q.len(), 1, "pending twice is pending once");
        assert!(!fill(&mut lrs, &mut q, |_| false));
        assert_eq!(lrs[0].intid(), 40);
        inject(&mut lrs, &mut q, 40, 0xa0, false).unwrap();
        assert!(q.is_empty(), "already pending in a register");
        lrs[0] = ListRegister((0b10 << 62) | (1 << 60) | 40);
        inject(&mut lrs, &mut q, 40, 0xa0, false).unwrap();
        assert_eq!(lrs[0].state(), LrState::PendingActive);
        assert!(q.is_empty());
        assert!(in_flight(&lrs, &q, 40));
        assert!(!in_flight(&lrs, &q, 41));
    }

    #[test]
    fn eoi_notification_follows_the_interrupt_into_its_register() {
        let mut lrs = [ListRegister::default(); 1];
        let mut q = PendingQueue::EMPTY;
        inject(&mut lrs, &mut q, 33, 0xa0, true).unwrap();
        inject(&mut lrs, &mut q, 34, 0xa0, false).unwrap();
        inject(&mut lrs, &mut q, 34, 0xa0, true).unwrap();
        assert!(fill(&mut lrs, &mut q, |_| false));
        assert!(lrs[0].notifies_eoi() && lrs[0].intid() == 33);
        lrs[0] = ListRegister::default();
        assert!(!fill(&mut lrs, &mut q, |_| false));
        assert!(lrs[0].notifies_eoi(), "asked for on a later injection");
        // Asked for while the interrupt is already in its register.
        let mut lrs = [ListRegister::pending(35, 0xa0, false)];
        inject(&mut lrs, &mut q, 35, 0xa0, true).unwrap();
        assert!(lrs[0].notifies_eoi());
    }

    #[test]
    fn eoi_log_hands_out_the_oldest_first() {
        let mut log = EoiLog::default();
        assert!(log.is_empty());
        for i in 0..7 {
            log.push(32 + i);
        }
        let mut out = [0u64; 5];
        assert_eq!(log.take(&mut out), 5);
        assert_eq!(out, [32, 33, 34, 35, 36]);
        assert_eq!(log.take(&mut out), 2);
        assert_eq!(&out[..2], &[37, 38]);
        assert!(log.is_empty());
        for i in 0..MAX_LRS as u32 + 3 {
            log.push(i);
        }
        let mut all = [0u64; MAX_LRS + 3];
        assert_eq!(log.take(&mut all), MAX_LRS, "bounded");
    }

    #[test]
    fn injection_refuses_special_intids_and_a_full_queue() {
        let mut lrs = [ListRegister::default(); 4];
        let mut q = PendingQueue::EMPTY;
        assert_eq!(
            inject(&mut lrs, &mut q, 1020, 0, false),
            Err(InjectError::BadIntid)
        );
        assert_eq!(
            inject(&mut lrs, &mut q, 8192, 0, false),
            Err(InjectError::BadIntid)
        );
        for i in 0..QUEUE_LEN as u32 {
            inject(&mut lrs, &mut q, 32 + i, 0xa0, false).unwrap();
        }
        assert!(!q.has_room(1));
        assert_eq!(
            inject(&mut lrs, &mut q, 999, 0, false),
            Err(InjectError::Full)
        );
        assert_eq!(q.len(), QUEUE_LEN);
        // Re-injecting one that waits is not a new entry.
        assert_eq!(inject(&mut lrs, &mut q, 32, 0xa0, false), Ok(()));
    }

    #[test]
    fn fill_takes_the_most_urgent_first_and_reports_leftovers() {
        let mut lrs = [ListRegister::default(); 2];
        let mut q = PendingQueue::EMPTY;
        for (intid, prio) in [(50, 0xa0), (33, 0xa0), (60, 0x20)] {
            inject(&mut lrs, &mut q, intid, prio, false).unwrap();
        }
        assert!(fill(&mut lrs, &mut q, |i| i == 33));
        assert_eq!(lrs[0].intid(), 60);
        assert_eq!(lrs[1].intid(), 33);
        assert_eq!(lrs[1].0 >> 41 & 1, 1);
        assert_eq!(lrs[0].0 >> 41 & 1, 0);
        assert_eq!(q.len(), 1);
        lrs[0] = ListRegister::default();
        assert!(!fill(&mut lrs, &mut q, |_| false));
        assert_eq!(lrs[0].intid(), 50);
    }

    #[test]
    fn wfi_wakes_only_for_what_the_interface_would_signal() {
        let mut lrs = [ListRegister::default(); 4];
        let mut q = PendingQueue::EMPTY;
        let enabled_open = (0xf0u64 << 24) | 2;
        assert!(!has_deliverable(&lrs, &q, enabled_open));
        lrs[0] = ListRegister::pending(27, 0xa0, false);
        assert!(has_deliverable(&lrs, &q, enabled_open));
        assert!(!has_deliverable(&lrs, &q, 0xf0 << 24), "group 1 off");
        assert!(!has_deliverable(&lrs, &q, (0x80 << 24) | 2), "masked");
        lrs[0] = ListRegister((0b10 << 62) | 27);
        assert!(!has_deliverable(&lrs, &q, enabled_open), "active only");
        inject(&mut lrs, &mut q, 40, 0x10, false).unwrap();
        lrs[0] = ListRegister::default();
        assert!(has_deliverable(&lrs, &q, enabled_open));
    }

    #[test]
    fn timer_conditions() {
        assert!(timer_fired(0b101));
        assert!(!timer_fired(0b111), "masked");
        assert!(!timer_fired(0b001), "not yet");
        assert!(!timer_fired(0b100), "disabled");
        assert_eq!(timer_deadline(0b001, 500), 500);
        assert_eq!(timer_deadline(0b011, 500), u64::MAX);
        assert_eq!(timer_deadline(0b000, 500), u64::MAX);
    }

    #[test]
    fn vtr_decoding() {
        // QEMU: 4 list registers, 5 preemption bits.
        assert_eq!(vtr_geometry((4 << 26) | 3), (4, 1));
        assert_eq!(vtr_geometry((6 << 26) | 15), (16, 4));
        assert_eq!(vtr_geometry((5 << 26) | 7), (8, 2));
    }
}
