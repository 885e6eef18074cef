//! The fatal path: a bug in the core (a Rust panic or an exception taken at
//! EL2) prints what is known — the message, ESR/FAR/ELR/SPSR, the registers
//! and the frame-pointer chain — then stops the machine.
//!
//! Stopping: this CPU parks. Other CPUs park at their next entry to the core
//! (every trap checks the flag first). When the image runs under QEMU with
//! semihosting enabled (a boot package flag), the core also ends the emulation
//! with a non-zero status so test runs fail fast instead of hanging.

use crate::arch::STOPPING;
use core::sync::atomic::Ordering;
#[cfg(target_os = "none")]
use moat_kernel::regs::GuestRegs;

/// Whether the machine is stopping; CPUs entering the core then park.
pub fn is_stopping() -> bool {
    STOPPING.load(Ordering::Relaxed)
}

/// Parks this CPU forever.
pub fn park() -> ! {
    loop {
        crate::arch::wait_for_event();
    }
}

/// Stops the machine after a fatal error.
pub fn stop(code: u64) -> ! {
    STOPPING.store(true, Ordering::Relaxed);
    crate::base::console::flush();
    crate::arch::semihosting::semihosting_exit(code);
    park()
}

/// Prints up to 16 frame records starting at `fp`.
#[cfg(target_os = "none")]
fn print_backtrace(mut fp: u64) {
    let (lo, hi) = crate::arch::stack_bounds();
    for depth in 0..16 {
        if fp < lo || fp + 16 > hi || !fp.is_multiple_of(16) {
            break;
        }
        // SAFETY: `fp` lies inside the core's stacks (checked above) and is
        // 16-byte aligned; a frame record is two words.
        let (next, lr) = unsafe { (*(fp as *const u64), *((fp + 8) as *const u64)) };
        crate::base::console::print_fatal(format_args!("  #{depth} lr {lr:#018x} fp {fp:#018x}"));
        if next <= fp {
            break;
        }
        fp = next;
    }
}

// The fatal path's entry points exist on the target only: host tests
// run under the test harness, which has its own.
#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    crate::base::console::print_fatal(format_args!("PANIC: {info}"));
    let fp: u64;
    // SAFETY: reads the frame pointer register.
    unsafe {
        core::arch::asm!("mov {}, x29", out(reg) fp, options(nomem, nostack, preserves_flags))
    };
    print_backtrace(fp);
    stop(2)
}

/// Exceptions taken at EL2: always a bug in the core.
#[cfg(target_os = "none")]
#[unsafe(no_mangle)]
extern "C" fn handle_el2_exception(frame: *const GuestRegs, kind: u64) -> ! {
    // SAFETY: the vector saved a full frame on the stack and passed its address.
    let f = unsafe { &*frame };
    let esr = crate::arch::sysreg::esr_el2();
    let far = crate::arch::sysreg::far_el2();
    crate::base::console::print_fatal(format_args!(
        "FATAL: exception at EL2 (vector {kind}): ESR_EL2 {esr:#010x} FAR_EL2 {far:#018x} ELR_EL2 {:#018x} SPSR_EL2 {:#010x}",
        f.pc, f.pstate
    ));
    for row in 0..8 {
        let r = row * 4;
        let reg = |n: usize| f.x.get(n).copied().unwrap_or(0);
        crate::base::console::print_fatal(format_args!(
            "  x{:<2} {:#018x}  x{:<2} {:#018x}  x{:<2} {:#018x}  x{:<2} {:#018x}",
            r,
            reg(r),
            r + 1,
            reg(r + 1),
            r + 2,
            reg(r + 2),
            r + 3,
            reg(r + 3)
        ));
    }
    print_backtrace(f.x[29]);
    stop(3)
}
