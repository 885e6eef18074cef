//! The hypervisor's own memory allocator.
//!
//! A buddy allocator (`buddy_system_allocator`) backs `alloc` for the core:
//! page tables, the host's device tree, per-partition state. It starts with a
//! small pool inside the core's BSS, enough to build the EL2 page tables and
//! the host's device tree while the boot package still occupies the heap
//! region, and grows to the whole heap of the carve-out once the package has
//! been consumed.

use alloc::boxed::Box;
use buddy_system_allocator::LockedHeap;
use core::alloc::Layout;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering};

/// Buddy orders up to 2^32 bytes.
#[global_allocator]
static HEAP: LockedHeap<32> = LockedHeap::empty();

const EARLY_POOL_SIZE: usize = 1 << 20;

#[repr(C, align(4096))]
struct EarlyPool([u8; EARLY_POOL_SIZE]);

static mut EARLY_POOL: EarlyPool = EarlyPool([0; EARLY_POOL_SIZE]);
static HEAP_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Hands the BSS pool to the allocator. Called once, on the boot CPU, first.
pub fn init_early() {
    let start = core::ptr::addr_of_mut!(EARLY_POOL) as usize;
    // SAFETY: the pool is a static the core owns and touches nowhere else;
    // `init_early` runs once before any allocation.
    unsafe { HEAP.lock().init(start, EARLY_POOL_SIZE) };
    HEAP_BYTES.store(EARLY_POOL_SIZE, Ordering::Relaxed);
}

/// Adds `[start, start + size)` to the heap.
///
/// # Safety
///
/// The range must be RAM inside the carve-out, mapped read/write in the
/// core's stage-1, and unused by anything else from now on.
pub unsafe fn add_region(start: usize, size: usize) {
    // SAFETY: forwarded from this function's contract.
    unsafe { HEAP.lock().add_to_heap(start, start + size) };
    HEAP_BYTES.fetch_add(size, Ordering::Relaxed);
}

/// Total bytes handed to the allocator.
pub fn total_bytes() -> usize {
    HEAP_BYTES.load(Ordering::Relaxed)
}

/// Bytes currently allocated.
pub fn used_bytes() -> usize {
    HEAP.lock().stats_alloc_actual()
}

/// `value` in a new box, or `None` if the heap cannot hold it: `Box::new`
/// would panic instead, which no hypercall path may do.
pub fn try_box<T>(value: T) -> Option<Box<T>> {
    let layout = Layout::new::<T>();
    if layout.size() == 0 {
        return Some(Box::new(value));
    }
    // SAFETY: a non-zero-sized layout.
    let p = NonNull::new(unsafe { alloc::alloc::alloc(layout) }.cast::<T>())?;
    // SAFETY: `p` is a fresh allocation with `T`'s layout from the global
    // allocator, the one `Box` frees with; writing `value` initialises it
    // before the box owns it.
    unsafe {
        p.as_ptr().write(value);
        Some(Box::from_raw(p.as_ptr()))
    }
}
