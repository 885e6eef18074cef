//! The core's console.
//!
//! Every line the core prints starts with `moat: ` and is written whole
//! under one lock, so lines from different CPUs never interleave inside the
//! core. The UART is the one the board's device tree names
//! (`moat_platform::dt::console_uart`), started before the core's first
//! line: no board's UART address is built into the core. Without one (a
//! tree with no PL011), lines go to QEMU through semihosting when the image
//! allows it, and nowhere otherwise.

use core::fmt::{self, Write};
use moat_platform::console::Pl011Console;
use spin::Mutex;

static CONSOLE: Mutex<Option<Pl011Console>> = Mutex::new(None);

/// Starts the console on the UART at `base`.
///
/// # Safety
///
/// `base` must be a PL011 mapped as device memory in the core's stage-1 for
/// the rest of the core's life.
pub unsafe fn init(base: usize) {
    // SAFETY: forwarded from this function's contract; the previous console
    // (if any) is dropped under the lock, so only one exists at a time.
    *CONSOLE.lock() = Some(unsafe { Pl011Console::new(base) });
}

struct LineWriter<'a>(&'a mut Pl011Console);

impl Write for LineWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Prints one `moat: ` line.
pub fn print_line(args: fmt::Arguments<'_>) {
    let mut guard = CONSOLE.lock();
    if let Some(console) = guard.as_mut() {
        let mut w = LineWriter(console);
        let _ = w.write_str("moat: ");
        let _ = w.write_fmt(args);
        let _ = w.write_str("\n");
    } else {
        // No UART in the tree: under QEMU, the emulator prints the line.
        let mut line: heapless::String<250> = heapless::String::new();
        let _ = write!(line, "moat: {args}");
        crate::arch::semihosting::semihosting_line(&line);
    }
}

/// Prints raw text without the prefix or the lock: only for the fatal path,
/// where the lock may be held by the CPU that is failing.
pub fn print_fatal(args: fmt::Arguments<'_>) {
    // SAFETY: nothing else runs on this CPU after a fatal error, and other
    // CPUs are stopped at their next entry to the core. A line from another
    // CPU may interleave; losing the panic message to a deadlock would be worse.
    unsafe { CONSOLE.force_unlock() };
    print_line(args);
}

/// Waits for the UART to drain (before handing the machine to firmware).
pub fn flush() {
    if let Some(console) = CONSOLE.lock().as_mut() {
        console.flush();
    }
}

/// `log!("...")`: one line on the core's console.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::base::console::print_line(format_args!($($arg)*))
    };
}
