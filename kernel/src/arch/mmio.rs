//! Device registers that the layers above drive: the GICv3 ITS and
//! redistributor frames whose accesses `device::its` emulates, and the
//! SMMUv3's frames (`memory::smmu`). Plain volatile loads and stores of
//! device memory that the core maps at EL2. They live here so that the
//! host tests can put a model of each device behind the same four
//! functions.

/// Reads the 32-bit register at `addr`.
///
/// # Safety
///
/// `addr` is a 4-byte-aligned register of a device frame that the core
/// maps as device memory at EL2, and reading it has no side effect the
/// caller does not intend.
#[inline(always)]
pub unsafe fn read32(addr: u64) -> u32 {
    // SAFETY: per the contract.
    unsafe { core::ptr::with_exposed_provenance::<u32>(addr as usize).read_volatile() }
}

/// Reads the 64-bit register at `addr`.
///
/// # Safety
///
/// As for [`read32`], for an 8-byte-aligned 64-bit register.
#[inline(always)]
pub unsafe fn read64(addr: u64) -> u64 {
    // SAFETY: per the contract.
    unsafe { core::ptr::with_exposed_provenance::<u64>(addr as usize).read_volatile() }
}

/// Writes the 32-bit register at `addr`.
///
/// # Safety
///
/// As for [`read32`]; the write does what the caller means it to.
#[inline(always)]
pub unsafe fn write32(addr: u64, value: u32) {
    // SAFETY: per the contract.
    unsafe { core::ptr::with_exposed_provenance_mut::<u32>(addr as usize).write_volatile(value) }
}

/// Writes the 64-bit register at `addr`.
///
/// # Safety
///
/// As for [`write32`], for an 8-byte-aligned 64-bit register.
#[inline(always)]
pub unsafe fn write64(addr: u64, value: u64) {
    // SAFETY: per the contract.
    unsafe { core::ptr::with_exposed_provenance_mut::<u64>(addr as usize).write_volatile(value) }
}
