//! The core's own stage-1 translation (EL2), built with aarch64-paging.
//!
//! The core runs identity-mapped. Its text is read-only and executable, its
//! read-only data read-only, and everything else it maps — its data, BSS,
//! heap, all RAM (the core zeroes and copies partition memory) and the MMIO it
//! drives — is read/write and never executable. SCTLR_EL2.WXN backs this up in
//! hardware: no writable page can ever be executed at EL2.

use aarch64_paging::descriptor::El23Attributes as A;
use aarch64_paging::idmap::IdMap;
use aarch64_paging::paging::{El2, MemoryRegion};
use alloc::boxed::Box;
use moat_platform::dt::Range;

/// Root level 1: 39-bit VA, matching TCR_EL2.T0SZ = 25 set at entry.
const ROOT_LEVEL: usize = 1;
/// MAIR_EL2 index 0: normal write-back memory; 1: Device-nGnRE; 3: RAM
/// (Tagged normal write-back where the hardware has MTE, so the core can
/// scrub allocation tags; plain normal memory otherwise).
const NORMAL: A = A::ATTRIBUTE_INDEX_0.union(A::INNER_SHAREABLE);
const DEVICE: A = A::ATTRIBUTE_INDEX_1;
const RAM: A = A::ATTRIBUTE_INDEX_3.union(A::INNER_SHAREABLE);
/// MAIR_EL2 attribute 3 with and without tags.
const MAIR_RAM_TAGGED: u64 = 0xf0 << 24;
const MAIR_RAM_UNTAGGED: u64 = 0xff << 24;
/// SCTLR_EL2.ATA: EL2 may access allocation tags (TCF stays 0: the core's
/// own accesses are never tag-checked).
const SCTLR_EL2_ATA: u64 = 1 << 43;

/// Whether the core maps RAM Tagged and may write allocation tags.
static TAG_ACCESS: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// Whether the core can scrub allocation tags (the hardware has MTE with
/// tag storage, and the core's map of RAM is Tagged).
pub fn el2_tag_access() -> bool {
    TAG_ACCESS.load(core::sync::atomic::Ordering::Relaxed)
}
const COMMON: A = A::VALID.union(A::ACCESSED);

/// SCTLR_EL2 with the final map: RES1 bits, M, C, SA, I and WXN.
const SCTLR_EL2_FINAL: u64 = 0x30c5_0830 | 1 | (1 << 2) | (1 << 3) | (1 << 12) | (1 << 19);

/// What secondary CPUs load before turning their MMU on (see entry.S).
#[repr(C)]
pub struct BootMmu {
    pub ttbr0: u64,
    pub tcr: u64,
    pub mair: u64,
    pub sctlr: u64,
}

#[unsafe(no_mangle)]
pub static mut BOOT_MMU: BootMmu = BootMmu {
    ttbr0: 0,
    tcr: 0,
    mair: 0,
    sctlr: 0,
};

unsafe extern "C" {
    static __image_start: u8;
    static __text_end: u8;
    static __rodata_end: u8;
    static __image_end: u8;
    fn enable_mmu_el2(ttbr0: u64, tcr: u64, mair: u64, sctlr: u64);
}

/// The linker's view of the core image.
#[derive(Clone, Copy, Debug)]
pub struct ImageSections {
    pub start: u64,
    pub text_end: u64,
    pub rodata_end: u64,
    pub end: u64,
}

pub fn image_sections() -> ImageSections {
    ImageSections {
        start: core::ptr::addr_of!(__image_start) as u64,
        text_end: core::ptr::addr_of!(__text_end) as u64,
        rodata_end: core::ptr::addr_of!(__rodata_end) as u64,
        end: core::ptr::addr_of!(__image_end) as u64,
    }
}

fn region(base: u64, end: u64) -> MemoryRegion {
    MemoryRegion::new(base as usize, end as usize)
}

/// Builds the core's final map and switches to it.
///
/// `ram` is every RAM bank; `mmio` the device regions the core drives;
/// `tagged` whether the hardware has MTE with tag storage.
/// Returns an error naming the region that could not be mapped.
pub fn switch_to_final_map(
    ram: &[Range],
    mmio: &[Range],
    tagged: bool,
) -> Result<(), &'static str> {
    let image = image_sections();
    let mut map = IdMap::new(ROOT_LEVEL, El2);
    for bank in ram {
        map.map_range(&region(bank.base, bank.end()), COMMON | RAM | A::XN)
            .map_err(|_| "RAM bank")?;
    }
    // The image's own permissions, split out of the RAM mapping above.
    map.map_range(
        &region(image.start, image.text_end),
        COMMON | NORMAL | A::READ_ONLY,
    )
    .map_err(|_| "core text")?;
    map.map_range(
        &region(image.text_end, image.rodata_end),
        COMMON | NORMAL | A::READ_ONLY | A::XN,
    )
    .map_err(|_| "core rodata")?;
    for dev in mmio {
        let end = dev.end().next_multiple_of(4096);
        map.map_range(&region(dev.base & !0xfff, end), COMMON | DEVICE | A::XN)
            .map_err(|_| "core MMIO")?;
    }
    let ttbr0 = map.root_address().0 as u64;
    map.mark_active();
    // The tables live for the rest of the core's life.
    let _ = Box::leak(Box::new(map));

    let tcr: u64;
    let boot_mair: u64;
    // SAFETY: reading the EL2 translation controls entry.S programmed.
    unsafe {
        core::arch::asm!("mrs {t}, tcr_el2", "mrs {m}, mair_el2", t = out(reg) tcr, m = out(reg) boot_mair,
            options(nomem, nostack, preserves_flags));
    }
    let (mair, sctlr) = if tagged {
        (
            boot_mair & !(0xff << 24) | MAIR_RAM_TAGGED,
            SCTLR_EL2_FINAL | SCTLR_EL2_ATA,
        )
    } else {
        (
            boot_mair & !(0xff << 24) | MAIR_RAM_UNTAGGED,
            SCTLR_EL2_FINAL,
        )
    };
    // SAFETY: the new tables map the running code, stack, data and console at
    // the same addresses with compatible attributes, so execution continues
    // seamlessly; enable_mmu_el2 invalidates the EL2 TLB after the switch.
    // BOOT_MMU is written before any secondary CPU is started.
    unsafe {
        enable_mmu_el2(ttbr0, tcr, mair, sctlr);
        BOOT_MMU = BootMmu {
            ttbr0,
            tcr,
            mair,
            sctlr,
        };
    }
    TAG_ACCESS.store(tagged, core::sync::atomic::Ordering::Relaxed);
    Ok(())
}
