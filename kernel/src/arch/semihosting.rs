//! Semihosting: the trap (`HLT #0xf000`) through which a core run under
//! QEMU prints its last lines and ends the emulation, used only when the
//! boot package allows it.

use core::sync::atomic::{AtomicBool, Ordering};

static SEMIHOSTING_EXIT: AtomicBool = AtomicBool::new(false);

/// Allows the fatal path to end a QEMU run through semihosting.
pub fn allow_semihosting_exit() {
    SEMIHOSTING_EXIT.store(true, Ordering::Relaxed);
}

/// Writes one line through semihosting (SYS_WRITE0), if allowed: the
/// core's last resort when the device tree gave it no console, so a test
/// run still shows why the boot failed.
pub fn semihosting_line(line: &str) {
    if !SEMIHOSTING_EXIT.load(Ordering::Relaxed) {
        return;
    }
    let mut text: heapless::Vec<u8, 256> = heapless::Vec::new();
    for &b in line.as_bytes().iter().filter(|&&b| b != 0).take(253) {
        let _ = text.push(b);
    }
    let _ = text.extend_from_slice(b"\n\0");
    // SAFETY: HLT #0xf000 with x0 = SYS_WRITE0 (4) asks QEMU (run with
    // semihosting enabled, which the package flag asserts) to print the
    // NUL-terminated string at x1; it returns with x0 corrupted.
    unsafe {
        core::arch::asm!("hlt #0xf000", inout("x0") 4u64 => _, in("x1") text.as_ptr(), options(nostack));
    }
}

/// Ends a QEMU run with `code` (semihosting SYS_EXIT_EXTENDED), if allowed.
pub fn semihosting_exit(code: u64) {
    if !SEMIHOSTING_EXIT.load(Ordering::Relaxed) {
        return;
    }
    // ADP_Stopped_ApplicationExit, with the exit status.
    let block: [u64; 2] = [0x2_0026, code];
    // SAFETY: HLT #0xf000 is the AArch64 semihosting trap; QEMU (run with
    // semihosting enabled, which the package flag asserts) services it by
    // reading `block` and exiting. It does not return.
    unsafe {
        core::arch::asm!("hlt #0xf000", in("x0") 0x20u64, in("x1") block.as_ptr(), options(nostack));
    }
}
