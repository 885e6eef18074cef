//! The GICv3 distributor and redistributors a Linux guest sees, emulated
//! from MMIO exits.
//!
//! The core owns the virtual CPU interface (list registers, the guest's
//! acknowledge and end-of-interrupt registers, which never trap); what is
//! left to emulate is configuration: which interrupts are enabled, their
//! priorities, groups, triggers and routes. The VMM consults it when it
//! decides what to inject: an interrupt is delivered only if the guest
//! enabled it, in group 1, with the distributor's group 1 on. Nothing here
//! reads or writes guest memory; every access is one register.

/// Where the distributor is (64 KiB).
pub const GICD_BASE: u64 = 0x0800_0000;
pub const GICD_SIZE: u64 = 0x1_0000;
/// Where the redistributors start: one 128 KiB pair of frames (RD_base,
/// SGI_base) per vCPU.
pub const GICR_BASE: u64 = 0x080a_0000;
pub const GICR_STRIDE: u64 = 0x2_0000;
/// SPIs implemented: INTIDs 32..32 + SPIS.
pub const SPIS: u32 = 64;
const INTIDS: usize = 32 + SPIS as usize;

/// GICD_PIDR2 / GICR_PIDR2: architecture revision 3.
const PIDR2: u32 = 0x3b;
const PIDR2_OFFSET: u64 = 0xffe8;
/// GICD_IIDR / GICR_IIDR: implementer Arm.
const IIDR: u32 = 0x43b;

/// Interrupt state banked per vCPU (SGIs and PPIs) or global (SPIs).
#[derive(Clone, Debug)]
struct Bank<const N: usize> {
    group: [bool; N],
    enabled: [bool; N],
    pending: [bool; N],
    active: [bool; N],
    priority: [u8; N],
    /// Two configuration bits per interrupt, as ICFGR holds them.
    config: [u8; N],
}

impl<const N: usize> Default for Bank<N> {
    fn default() -> Self {
        Self {
            group: [false; N],
            enabled: [false; N],
            pending: [false; N],
            active: [false; N],
            priority: [0; N],
            config: [0; N],
        }
    }
}

impl<const N: usize> Bank<N> {
    /// A register of one bit per interrupt, interrupts `first..` (from
    /// byte offset `o` in the block starting at `base`): read.
    fn read_bits(field: &[bool; N], first: usize) -> u32 {
        (0..32)
            .filter(|i| field.get(first + i).copied().unwrap_or(false))
            .fold(0, |acc, i| acc | 1 << i)
    }

    fn write_bits(field: &mut [bool; N], first: usize, value: u32, how: Bits) {
        for i in 0..32 {
            let Some(f) = field.get_mut(first + i) else {
                break;
            };
            let bit = value & (1 << i) != 0;
            match how {
                Bits::Replace => *f = bit,
                Bits::Set if bit => *f = true,
                Bits::Clear if bit => *f = false,
                _ => {}
            }
        }
    }

    /// The registers common to the distributor and an SGI frame, at offset
    /// `o`, covering interrupts from `first_intid`: `None` if `o` is not one.
    fn read(&self, o: u64) -> Option<u32> {
        let word = |base: u64| ((o - base) / 4) as usize * 32;
        Some(match o {
            0x080..=0x0fc => Self::read_bits(&self.group, word(0x080)),
            0x100..=0x17c => Self::read_bits(&self.enabled, word(0x100)),
            0x180..=0x1fc => Self::read_bits(&self.enabled, word(0x180)),
            0x200..=0x27c => Self::read_bits(&self.pending, word(0x200)),
            0x280..=0x2fc => Self::read_bits(&self.pending, word(0x280)),
            0x300..=0x37c => Self::read_bits(&self.active, word(0x300)),
            0x380..=0x3fc => Self::read_bits(&self.active, word(0x380)),
            0x400..=0x7fb => {
                let first = (o - 0x400) as usize;
                (0..4).fold(0, |acc, i| {
                    acc | u32::from(self.priority.get(first + i).copied().unwrap_or(0)) << (8 * i)
                })
            }
            0xc00..=0xcfc => {
                let first = (o - 0xc00) as usize * 4;
                (0..16).fold(0, |acc, i| {
                    acc | u32::from(self.config.get(first + i).copied().unwrap_or(0)) << (2 * i)
                })
            }
            // IGRPMODR: group 1 non-secure only.
            0xd00..=0xd7c => 0,
            _ => return None,
        })
    }

    /// A write of `size` bytes: whether `o` is one of these registers.
    fn write(&mut self, o: u64, value: u64, size: u64) -> bool {
        let v = value as u32;
        let word = |base: u64| ((o - base) / 4) as usize * 32;
        match o {
            0x080..=0x0fc => Self::write_bits(&mut self.group, word(0x080), v, Bits::Replace),
            0x100..=0x17c => Self::write_bits(&mut self.enabled, word(0x100), v, Bits::Set),
            0x180..=0x1fc => Self::write_bits(&mut self.enabled, word(0x180), v, Bits::Clear),
            0x200..=0x27c => Self::write_bits(&mut self.pending, word(0x200), v, Bits::Set),
            0x280..=0x2fc => Self::write_bits(&mut self.pending, word(0x280), v, Bits::Clear),
            0x300..=0x37c => Self::write_bits(&mut self.active, word(0x300), v, Bits::Set),
            0x380..=0x3fc => Self::write_bits(&mut self.active, word(0x380), v, Bits::Clear),
            0x400..=0x7ff => {
                let first = (o - 0x400) as usize;
                for i in 0..size.min(8) as usize {
                    if let Some(p) = self.priority.get_mut(first + i) {
                        *p = (value >> (8 * i)) as u8;
                    }
                }
            }
            0xc00..=0xcfc => {
                let first = (o - 0xc00) as usize * 4;
                for i in 0..16 {
                    if let Some(c) = self.config.get_mut(first + i) {
                        *c = ((v >> (2 * i)) & 3) as u8;
                    }
                }
            }
            0xd00..=0xd7c => {}
            _ => return false,
        }
        true
    }
}

#[derive(Clone, Copy)]
enum Bits {
    Replace,
    Set,
    Clear,
}

/// One vCPU's redistributor.
#[derive(Clone, Debug, Default)]
struct Redistributor {
    /// GICR_WAKER.ProcessorSleep.
    sleep: bool,
    bank: Bank<32>,
}

/// The distributor and every redistributor of one VM.
#[derive(Debug)]
pub struct Gic {
    ctlr: u32,
    /// SPIs (and, unused, the SGI/PPI slots of the distributor's own bank).
    spis: Bank<INTIDS>,
    routes: [u64; INTIDS],
    redistributors: Vec<Redistributor>,
}

impl Gic {
    pub fn new(vcpus: usize) -> Self {
        Self {
            ctlr: 0,
            spis: Bank::default(),
            routes: [0; INTIDS],
            redistributors: vec![
                Redistributor {
                    sleep: true,
                    ..Redistributor::default()
                };
                vcpus
            ],
        }
    }

    /// The redistributor region's size.
    pub fn gicr_size(&self) -> u64 {
        GICR_STRIDE * self.redistributors.len() as u64
    }

    /// Emulates an access at `ipa`: `Some(value read)` (0 for a write) if
    /// it is the GIC's, `None` otherwise.
    pub fn mmio(&mut self, ipa: u64, is_write: bool, size: u64, value: u64) -> Option<u64> {
        if let Some(o) = ipa.checked_sub(GICD_BASE).filter(|o| *o < GICD_SIZE) {
            return Some(self.distributor(o, is_write, size, value));
        }
        let o = ipa
            .checked_sub(GICR_BASE)
            .filter(|o| *o < self.gicr_size())?;
        let cpu = (o / GICR_STRIDE) as usize;
        let last = cpu + 1 == self.redistributors.len();
        let o = o % GICR_STRIDE;
        let rd = &mut self.redistributors[cpu];
        Some(if o < 0x1_0000 {
            match (o, is_write) {
                // GICR_CTLR: nothing to enable (no LPIs); RWP never set.
                (0x0000, _) => 0,
                (0x0004, false) => u64::from(IIDR),
                // GICR_TYPER: affinity (Aff0 = the vCPU), processor
                // number, Last for the final frame. Also read as halves.
                (0x0008, false) => {
                    let typer = ((cpu as u64) << 32) | ((cpu as u64) << 8) | (u64::from(last) << 4);
                    if size == 4 {
                        typer & 0xffff_ffff
                    } else {
                        typer
                    }
                }
                (0x000c, false) => cpu as u64,
                // GICR_WAKER: ChildrenAsleep follows ProcessorSleep at once.
                (0x0014, false) => (u64::from(rd.sleep) << 1) | (u64::from(rd.sleep) << 2),
                (0x0014, true) => {
                    rd.sleep = value & 2 != 0;
                    0
                }
                (PIDR2_OFFSET, false) => u64::from(PIDR2),
                _ => 0,
            }
        } else {
            let o = o - 0x1_0000;
            if is_write {
                rd.bank.write(o, value, size);
                0
            } else {
                u64::from(rd.bank.read(o).unwrap_or(0))
            }
        })
    }

    fn distributor(&mut self, o: u64, is_write: bool, size: u64, value: u64) -> u64 {
        match (o, is_write) {
            // GICD_CTLR: group enables and ARE_NS kept; RWP never set.
            (0x0000, false) => u64::from(self.ctlr),
            (0x0000, true) => {
                self.ctlr = (value as u32) & 0x13;
                0
            }
            // GICD_TYPER: ITLinesNumber for SPIS, 10 INTID bits, no LPIs.
            (0x0004, false) => u64::from((9 << 19) | (INTIDS as u32 / 32 - 1)),
            (0x0008, false) => u64::from(IIDR),
            (PIDR2_OFFSET, false) => u64::from(PIDR2),
            (0x6000..=0x7fd8, _) => {
                let intid = ((o - 0x6000) / 8) as usize;
                let high = o % 8 == 4;
                let Some(route) = self.routes.get_mut(intid) else {
                    return 0;
                };
                if is_write {
                    *route = match (size, high) {
                        (8, _) => value,
                        (_, false) => (*route & !0xffff_ffff) | (value & 0xffff_ffff),
                        (_, true) => (*route & 0xffff_ffff) | (value << 32),
                    };
                    0
                } else if high {
                    *route >> 32
                } else if size == 8 {
                    *route
                } else {
                    *route & 0xffff_ffff
                }
            }
            (_, true) => {
                // The SGI and PPI slots are kept but unused: with ARE on
                // those are the redistributors'.
                self.spis.write(o, value, size);
                0
            }
            (_, false) => u64::from(self.spis.read(o).unwrap_or(0)),
        }
    }

    /// Whether the guest would take `intid` on `vcpu` now, and at which
    /// priority: enabled, group 1, with group 1 on in the distributor.
    pub fn deliverable(&self, vcpu: usize, intid: u32) -> Option<u8> {
        if self.ctlr & 0x2 == 0 {
            return None;
        }
        let i = intid as usize;
        let (enabled, group, priority) = if intid < 32 {
            let b = &self.redistributors.get(vcpu)?.bank;
            (b.enabled[i], b.group[i], b.priority[i])
        } else {
            let b = &self.spis;
            (*b.enabled.get(i)?, b.group[i], b.priority[i])
        };
        (enabled && group).then_some(priority)
    }

    /// The vCPU an SPI is routed to (Aff0 of GICD_IROUTER; 0 when
    /// "any" is asked for).
    pub fn spi_target(&self, intid: u32) -> usize {
        let route = self.routes.get(intid as usize).copied().unwrap_or(0);
        if route & (1 << 31) != 0 {
            0
        } else {
            (route & 0xff) as usize
        }
    }

    /// SPIs the guest made pending itself (GICD_ISPENDR), taken.
    pub fn take_soft_pending(&mut self) -> Vec<u32> {
        let mut out = Vec::new();
        for i in 32..INTIDS {
            if std::mem::take(&mut self.spis.pending[i]) {
                out.push(i as u32);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identification_registers() {
        let mut g = Gic::new(2);
        assert_eq!(g.mmio(GICD_BASE + PIDR2_OFFSET, false, 4, 0), Some(0x3b));
        assert_eq!(g.mmio(GICD_BASE + 4, false, 4, 0), Some((9 << 19) | 2));
        let typer0 = g.mmio(GICR_BASE + 8, false, 8, 0).unwrap();
        let typer1 = g.mmio(GICR_BASE + GICR_STRIDE + 8, false, 8, 0).unwrap();
        assert_eq!(typer0 & (1 << 4), 0);
        assert_eq!(typer1 >> 32, 1);
        assert_ne!(typer1 & (1 << 4), 0, "Last");
        assert_eq!(g.mmio(GICR_BASE + GICR_STRIDE * 2, false, 4, 0), None);
        assert_eq!(g.mmio(0x0900_0000, false, 4, 0), None);
    }

    #[test]
    fn waking_a_redistributor() {
        let mut g = Gic::new(1);
        assert_eq!(g.mmio(GICR_BASE + 0x14, false, 4, 0), Some(6));
        g.mmio(GICR_BASE + 0x14, true, 4, 0);
        assert_eq!(g.mmio(GICR_BASE + 0x14, false, 4, 0), Some(0));
    }

    #[test]
    fn delivery_needs_enable_group_and_distributor() {
        let mut g = Gic::new(1);
        assert_eq!(g.deliverable(0, 33), None);
        g.mmio(GICD_BASE + 0x84, true, 4, 0xffff_ffff); // IGROUPR1
        g.mmio(GICD_BASE + 0x424, true, 4, 0xa0a0_a0a0); // priorities 36..39
        g.mmio(GICD_BASE + 0x420, true, 1, 0x80); // priority of 32 (byte)
        g.mmio(GICD_BASE + 0x104, true, 4, 1 << 1); // enable 33
        assert_eq!(g.deliverable(0, 33), None, "distributor off");
        g.mmio(GICD_BASE, true, 4, 0x12);
        assert_eq!(g.deliverable(0, 33), Some(0));
        assert_eq!(g.deliverable(0, 32), None);
        assert_eq!(g.mmio(GICD_BASE + 0x420, false, 4, 0), Some(0x80));
        g.mmio(GICD_BASE + 0x184, true, 4, 1 << 1);
        assert_eq!(g.deliverable(0, 33), None);
        // SGIs and PPIs through the SGI frame.
        let sgi = GICR_BASE + 0x1_0000;
        g.mmio(sgi + 0x80, true, 4, 0xffff_ffff);
        g.mmio(sgi + 0x100, true, 4, 1 << 5);
        g.mmio(sgi + 0x404, true, 4, 0x0000_a000);
        assert_eq!(g.deliverable(0, 5), Some(0xa0));
    }

    #[test]
    fn routes() {
        let mut g = Gic::new(2);
        g.mmio(GICD_BASE + 0x6000 + 8 * 33, true, 8, 1);
        assert_eq!(g.spi_target(33), 1);
        g.mmio(GICD_BASE + 0x6000 + 8 * 34, true, 8, 1 << 31);
        assert_eq!(g.spi_target(34), 0);
        assert_eq!(g.mmio(GICD_BASE + 0x6000 + 8 * 33, false, 8, 0), Some(1));
    }
}
