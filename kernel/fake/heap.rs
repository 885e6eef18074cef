//! The host's allocator for the unit tests of the layers: the system's,
//! except that a test can make this thread's allocations of whole pages
//! (table pages) fail, to see a change that runs out of memory fail
//! cleanly. Smaller allocations (the test harness's own) always succeed.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local! {
    /// Page allocations this thread may still make; `None`: no limit.
    static BUDGET: Cell<Option<usize>> = const { Cell::new(None) };
    /// Page allocations this thread made and has not freed.
    static LIVE_PAGES: Cell<isize> = const { Cell::new(0) };
}

/// Page allocations (table pages) this thread made and has not freed.
pub fn live_pages() -> isize {
    LIVE_PAGES.get()
}

/// Lets this thread make `n` more page allocations, and none after them;
/// `None` lifts the limit.
pub fn limit_allocations(n: Option<usize>) {
    BUDGET.set(n);
}

pub struct LimitedSystem;

// SAFETY: forwards to the system allocator, or returns null (a failed
// allocation) without touching memory.
unsafe impl GlobalAlloc for LimitedSystem {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.align() >= 4096 {
            match BUDGET.get() {
                Some(0) => return core::ptr::null_mut(),
                Some(n) => BUDGET.set(Some(n - 1)),
                None => {}
            }
            LIVE_PAGES.set(LIVE_PAGES.get() + 1);
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if layout.align() >= 4096 {
            LIVE_PAGES.set(LIVE_PAGES.get() - 1);
        }
        // SAFETY: forwarded: `ptr` came from `alloc` above, i.e. from System.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static HEAP: LimitedSystem = LimitedSystem;

/// As the core's `base::heap::try_box`: `value` in a new box, or `None`
/// when the allocator has no room for it.
pub fn try_box<T>(value: T) -> Option<Box<T>> {
    let layout = Layout::new::<T>();
    if layout.size() == 0 {
        return Some(Box::new(value));
    }
    // SAFETY: a non-zero-sized layout.
    let p = core::ptr::NonNull::new(unsafe { std::alloc::alloc(layout) }.cast::<T>())?;
    // SAFETY: a fresh allocation with `T`'s layout from the global
    // allocator, the one `Box` frees with; written before the box owns it.
    unsafe {
        p.as_ptr().write(value);
        Some(Box::from_raw(p.as_ptr()))
    }
}
