//! DMA attacks: the host drives a PCI device itself and tells it to write
//! where the host may not.
//!
//! The tool is QEMU's virtio-rng-pci through its modern interface, with
//! ACCESS_PLATFORM (QEMU's virtio devices take the IOMMU's path only with
//! `iommu_platform=on`, as a real device always would): the host finds it
//! in the PCIe host bridge's ECAM, gives it a memory BAR and bus mastering,
//! sets up one virtqueue in its own RAM, and hands the device a
//! one-descriptor buffer at any physical address; the device fills the
//! buffer with random bytes. The device reaches memory only through
//! whatever sits between it and RAM: with the core's SMMU, the host's own
//! stage-2.
//!
//! - `dma_smmu` (run on `-M virt,iommu=smmuv3`): a DMA into a host page
//!   lands; into a page the host has given a VM (which the VM then reads)
//!   and into the hypervisor's carve-out it does not, and the SMMU records
//!   a fault each time; a page the device reached a moment before stops
//!   being reachable in the transaction that donates it; the device and
//!   the host go on, and a later DMA into a host page lands again.
//! - `dma_withheld` (run on plain `-M virt`): the DMA-capable devices
//!   without an SMMU that the image did not name (QEMU virt's virtio-mmio
//!   transports and fw_cfg, whose DMA interface writes any guest physical
//!   address, and the PCIe host bridge, whose devices master DMA) are not
//!   in the host's stage-2: touching them is a synchronous external abort.

use super::{
    Checks, Guest, PAGE, Ram, consistent, expect_abort, hvc, hypervisor_region, p, read_u64,
    write_u64,
};
use moat_abi::hypercall;
use moat_platform::dt::Platform;

/// Spin iterations before a DMA is given up on.
const PATIENCE: u64 = 200_000_000;
/// The PCI memory address the host gives the device's BAR4 (in the host
/// bridge's 32-bit window).
const MEM_BAR: u64 = 0x1000_0000;
/// Virtio's PCI vendor, and the (modern) entropy device.
const VIRTIO_VENDOR: u32 = 0x1af4;
const VIRTIO_RNG: u32 = 0x1044;
/// Pages of host RAM for the virtqueue: descriptors and available ring,
/// then the used ring.
const RING_PAGES: u64 = 2;
/// Entries the host gives the queue.
const QUEUE_ENTRIES: u16 = 8;

/// `struct virtio_pci_common_cfg` offsets.
const DRIVER_FEATURE_SELECT: u64 = 0x08;
const DRIVER_FEATURE: u64 = 0x0c;
const DEVICE_STATUS: u64 = 0x14;
const QUEUE_SELECT: u64 = 0x16;
const QUEUE_SIZE: u64 = 0x18;
const QUEUE_ENABLE: u64 = 0x1c;
const QUEUE_NOTIFY_OFF: u64 = 0x1e;
const QUEUE_DESC: u64 = 0x20;
const QUEUE_DRIVER: u64 = 0x28;
const QUEUE_DEVICE: u64 = 0x30;
/// Device status bits.
const STATUS_DRIVER: u8 = 1 | 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;
const STATUS_NEEDS_RESET: u8 = 64;
/// Feature bits 32 and up the host accepts: VERSION_1 and ACCESS_PLATFORM
/// (the device's DMA goes through the platform's IOMMU; QEMU's virtio
/// devices reach memory through the SMMU only with it).
const FEATURES_HIGH: u32 = 0b11;

fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: a device register (ECAM or the device's BAR) mapped as device
    // memory in the test host's map, or a word of the test host's own RAM.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}
fn mmio_write32(addr: u64, v: u32) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u32, v) }
}
fn mmio_read16(addr: u64) -> u16 {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}
fn mmio_write16(addr: u64, v: u16) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}
fn mmio_read8(addr: u64) -> u8 {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}
fn mmio_write8(addr: u64, v: u8) {
    // SAFETY: as for `mmio_read32`.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}
fn barrier() {
    // SAFETY: a barrier: the ring's writes reach memory before the device
    // is told, and its writes are seen after it says so.
    unsafe { core::arch::asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// The PCIe host bridge: ECAM base, and the CPU address of PCI memory
/// address 0 in its 32-bit window.
fn pci_host(dtb: &[u8]) -> Option<(u64, u64)> {
    let fdt = fdt::Fdt::new(dtb).ok()?;
    let node = fdt.find_compatible(&["pci-host-ecam-generic"])?;
    let ecam = node.reg()?.next()?.starting_address as u64;
    let ranges = node.property("ranges")?.value;
    // <pci-hi pci-mid pci-lo cpu-hi cpu-lo size-hi size-lo>
    for entry in ranges.chunks_exact(28) {
        let cell =
            |i: usize| u32::from_be_bytes(entry[i * 4..i * 4 + 4].try_into().unwrap_or([0; 4]));
        if (cell(0) >> 24) & 3 == 2 {
            let pci = (u64::from(cell(1)) << 32) | u64::from(cell(2));
            let cpu = (u64::from(cell(3)) << 32) | u64::from(cell(4));
            return Some((ecam, cpu.wrapping_sub(pci)));
        }
    }
    None
}

/// The virtio-rng device, driven through its modern interface.
struct Rng {
    /// CPU addresses of the common configuration and of queue 0's notify
    /// register.
    common: u64,
    notify: u64,
    /// [`RING_PAGES`] pages of host RAM.
    ring: u64,
    next_avail: u16,
}

impl Rng {
    fn find(c: &mut Checks, dtb: &[u8], ring: u64) -> Option<Rng> {
        let Some((ecam, mem_cpu)) = pci_host(dtb) else {
            c.check(
                false,
                format_args!("dma: a PCIe host bridge in the device tree"),
            );
            return None;
        };
        let devfn = (0..32u64).map(|d| d << 3).find(|devfn| {
            let id = mmio_read32(ecam + (devfn << 12));
            id & 0xffff == VIRTIO_VENDOR && id >> 16 == VIRTIO_RNG
        });
        let Some(devfn) = devfn else {
            c.check(
                false,
                format_args!("dma: a modern virtio-rng-pci (device {VIRTIO_RNG:#x}) on bus 0"),
            );
            return None;
        };
        let cfg = ecam + (devfn << 12);
        // BAR4/5: the 64-bit memory BAR holding the virtio structures.
        mmio_write32(cfg + 0x20, MEM_BAR as u32);
        mmio_write32(cfg + 0x24, (MEM_BAR >> 32) as u32);
        let command = mmio_read32(cfg + 4);
        // Memory space and bus mastering on.
        mmio_write32(cfg + 4, (command & !0xffff) | 0b110);
        // The vendor capabilities: where the common configuration and the
        // notify registers are.
        let (mut common, mut notify) = (None, None);
        let mut cap = u64::from(mmio_read8(cfg + 0x34));
        let mut hops = 0;
        while cap != 0 && hops < 32 {
            hops += 1;
            let bar_address =
                |bar: u8| -> Option<u64> { (bar == 4).then_some(mem_cpu.wrapping_add(MEM_BAR)) };
            if mmio_read8(cfg + cap) == 0x09 {
                let kind = mmio_read8(cfg + cap + 3);
                let bar = mmio_read8(cfg + cap + 4);
                let offset = u64::from(mmio_read32(cfg + cap + 8));
                match kind {
                    1 => common = bar_address(bar).map(|b| b + offset),
                    2 => {
                        let multiplier = u64::from(mmio_read32(cfg + cap + 16));
                        notify = bar_address(bar).map(|b| (b + offset, multiplier));
                    }
                    _ => {}
                }
            }
            cap = u64::from(mmio_read8(cfg + cap + 1));
        }
        let (Some(common), Some((notify_base, multiplier))) = (common, notify) else {
            c.check(
                false,
                format_args!("dma: the device's common and notify structures in BAR4"),
            );
            return None;
        };
        let mut rng = Rng {
            common,
            notify: notify_base,
            ring,
            next_avail: 0,
        };
        let ok = rng.reset_and_set_up(multiplier);
        c.check(
            ok,
            format_args!(
                "dma: virtio-rng-pci at 00:{:02x}.{} (stream {devfn:#x}), ACCESS_PLATFORM accepted, a queue of {QUEUE_ENTRIES} entries in host RAM at {ring:#x}",
                devfn >> 3,
                devfn & 7,
            ),
        );
        ok.then_some(rng)
    }

    /// Resets the device and sets up queue 0; false if the device refused.
    fn reset_and_set_up(&mut self, notify_multiplier: u64) -> bool {
        let common = self.common;
        mmio_write8(common + DEVICE_STATUS, 0);
        while mmio_read8(common + DEVICE_STATUS) != 0 {
            core::hint::spin_loop();
        }
        for i in 0..RING_PAGES * PAGE / 8 {
            write_u64(self.ring + i * 8, 0);
        }
        mmio_write8(common + DEVICE_STATUS, STATUS_DRIVER);
        mmio_write32(common + DRIVER_FEATURE_SELECT, 0);
        mmio_write32(common + DRIVER_FEATURE, 0);
        mmio_write32(common + DRIVER_FEATURE_SELECT, 1);
        mmio_write32(common + DRIVER_FEATURE, FEATURES_HIGH);
        mmio_write8(common + DEVICE_STATUS, STATUS_DRIVER | STATUS_FEATURES_OK);
        if mmio_read8(common + DEVICE_STATUS) & STATUS_FEATURES_OK == 0 {
            return false;
        }
        mmio_write16(common + QUEUE_SELECT, 0);
        if mmio_read16(common + QUEUE_SIZE) < QUEUE_ENTRIES {
            return false;
        }
        mmio_write16(common + QUEUE_SIZE, QUEUE_ENTRIES);
        let write64 = |offset: u64, v: u64| {
            mmio_write32(common + offset, v as u32);
            mmio_write32(common + offset + 4, (v >> 32) as u32);
        };
        write64(QUEUE_DESC, self.ring);
        write64(QUEUE_DRIVER, self.avail_ring());
        write64(QUEUE_DEVICE, self.used_ring());
        let notify_off = u64::from(mmio_read16(common + QUEUE_NOTIFY_OFF));
        self.notify += notify_off * notify_multiplier;
        barrier();
        mmio_write16(common + QUEUE_ENABLE, 1);
        mmio_write8(
            common + DEVICE_STATUS,
            STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        self.next_avail = 0;
        true
    }

    fn avail_ring(&self) -> u64 {
        self.ring + 16 * u64::from(QUEUE_ENTRIES)
    }

    fn used_ring(&self) -> u64 {
        self.ring + PAGE
    }

    fn used_index(&self) -> u16 {
        mmio_read16(self.used_ring() + 2)
    }

    /// Asks the device to write `len` random bytes at physical `target`;
    /// true if it answered (which says nothing of where the bytes went).
    fn fill(&mut self, target: u64, len: u32) -> bool {
        let avail = self.avail_ring();
        // Descriptor 0: the buffer, device-writable.
        write_u64(self.ring, target);
        write_u64(self.ring + 8, u64::from(len) | (2 << 32));
        let slot = u64::from(self.next_avail % QUEUE_ENTRIES);
        mmio_write16(avail + 4 + 2 * slot, 0);
        // No interrupts: the host polls.
        mmio_write16(avail, 1);
        let before = self.used_index();
        self.next_avail = self.next_avail.wrapping_add(1);
        barrier();
        mmio_write16(avail + 2, self.next_avail);
        barrier();
        mmio_write16(self.notify, 0);
        for _ in 0..PATIENCE {
            if self.used_index() != before {
                barrier();
                return true;
            }
            if mmio_read8(self.common + DEVICE_STATUS) & STATUS_NEEDS_RESET != 0 {
                break;
            }
            core::hint::spin_loop();
        }
        false
    }
}

/// Non-zero words of the page at `pa` (host RAM).
fn nonzero_words(pa: u64) -> u64 {
    (0..PAGE / 8)
        .map(|i| u64::from(read_u64(pa + i * 8) != 0))
        .sum()
}

fn zero_page(pa: u64) {
    for i in 0..PAGE / 8 {
        write_u64(pa + i * 8, 0);
    }
}

/// The checker's verdict and the SMMU's fault count so far.
fn faults(c: &mut Checks, after: &str) -> u64 {
    let r = hvc(hypercall::CHECK_CONSISTENCY, [0; 3]);
    c.check(
        r[0] == 0,
        format_args!("dma: the checker is clean after {after} ({:#x})", r[0]),
    );
    r[1]
}

/// A DMA into a host page: it must land.
fn lands(c: &mut Checks, rng: &mut Rng, page: u64, what: &str) -> bool {
    zero_page(page);
    barrier();
    let answered = rng.fill(page, PAGE as u32);
    let words = nonzero_words(page);
    c.check(
        answered && words > 0,
        format_args!("dma: {what}: the device answered ({answered}) and wrote {words} non-zero words of host page {page:#x}"),
    );
    answered && words > 0
}

/// A DMA the SMMU must refuse; returns the faults it recorded meanwhile
/// and whether the device answered.
fn attempt(c: &mut Checks, rng: &mut Rng, target: u64, what: &str) -> (u64, bool) {
    let before = faults(c, "the DMAs so far");
    let answered = rng.fill(target, PAGE as u32);
    let after = faults(c, what);
    (after.wrapping_sub(before), answered)
}

/// The verdict on an [`attempt`]: a fault recorded, the device still there.
fn refused(c: &mut Checks, (faults, answered): (u64, bool), target: u64, what: &str) {
    c.check(
        faults > 0,
        format_args!("dma: {what} at {target:#x}: the SMMU recorded {faults} fault(s)"),
    );
    c.check(
        answered,
        format_args!("dma: after {what}, the device still answers"),
    );
}

pub(super) fn through_smmu(c: &mut Checks, platform: &Platform<'_>, dtb: &[u8]) {
    let mut ram = Ram::new(platform, dtb);
    let (Some(ring), Some(host_page)) = (ram.take(RING_PAGES, PAGE), ram.take(1, PAGE)) else {
        c.check(false, format_args!("dma: free host RAM"));
        return;
    };
    let Some(mut rng) = Rng::find(c, dtb, ring) else {
        return;
    };
    if !lands(c, &mut rng, host_page, "into a host page") {
        return;
    }

    // A page the device reaches now, given to a VM: from the donation on
    // the device must not reach it. The VM reads the page to tell.
    let Some(mut g) = Guest::new(c, &mut ram, "dma", 0, |c, pa| {
        let target = pa + (p::TAG_PAGE_IPA - p::BASE_IPA);
        lands(
            c,
            &mut rng,
            target,
            "into a page the host is about to donate",
        );
    }) else {
        return;
    };
    let target = g.pa_of(p::TAG_PAGE_IPA);
    let what = "a DMA into the page just donated to a VM";
    let outcome = attempt(c, &mut rng, target, what);
    // First what the VM sees (the donation zeroed the page), then the
    // SMMU's record.
    if g.start(c, p::MODE_PEEK, 0).is_some()
        && let Some([nonzero, ..]) = g.expect_hvc(c, p::PEEKED, "PEEKED")
    {
        c.check(
            nonzero == 0,
            format_args!("dma: the VM finds {nonzero} non-zero words in its page: the device's write never landed"),
        );
    }
    refused(c, outcome, target, what);
    g.end(c, true);

    // The hypervisor's memory: its last page.
    match hypervisor_region(dtb) {
        Some(carve) => {
            let what = "a DMA into the hypervisor's carve-out";
            let target = carve.end() - PAGE;
            let outcome = attempt(c, &mut rng, target, what);
            refused(c, outcome, target, what);
        }
        None => c.check(false, format_args!("dma: the carve-out in the device tree")),
    }

    lands(
        c,
        &mut rng,
        host_page,
        "after the refused DMAs, into a host page again",
    );
    consistent(c, "the DMA attacks");
}

/// The DMA-capable devices the host was not given: each window aborts.
pub(super) fn withheld(c: &mut Checks, dtb: &[u8]) {
    let Ok(fdt) = fdt::Fdt::new(dtb) else {
        c.check(false, format_args!("dma: the device tree"));
        return;
    };
    let mut seen = 0;
    for node in fdt.all_nodes() {
        let Some(compatible) = node.compatible().map(|c| c.first()) else {
            continue;
        };
        // Without an SMMU in front of it, the PCIe host bridge too.
        if !matches!(
            compatible,
            "virtio,mmio" | "qemu,fw-cfg-mmio" | "pci-host-ecam-generic"
        ) {
            continue;
        }
        let Some(reg) = node.reg().and_then(|mut r| r.next()) else {
            continue;
        };
        let base = reg.starting_address as u64;
        let size = reg.size.unwrap_or(8) as u64;
        seen += 1;
        if seen > 4 && compatible == "virtio,mmio" {
            // Four transports are enough to show the rule.
            continue;
        }
        expect_abort(
            c,
            format_args!("dma: a read of {compatible} at {base:#x}"),
            base,
            base + size,
            Some(false),
            || {
                read_u64(base);
            },
        );
    }
    c.check(
        seen > 0,
        format_args!("dma: {seen} DMA-capable device(s) without an SMMU in the device tree"),
    );
    consistent(c, "touching the withheld devices");
}
