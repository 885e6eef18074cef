//! The PL011 console, driven through `arm-pl011-uart`.
//!
//! The core never reconfigures the UART (baud rate and line settings are the
//! firmware's); it only waits for FIFO space and writes bytes. Serialising
//! writers is the caller's job (the core keeps one console behind a lock).

use arm_pl011_uart::{PL011Registers, Uart, UniqueMmioPointer};
use core::fmt;
use core::ptr::NonNull;

/// A PL011 used as a byte sink.
pub struct Pl011Console {
    uart: Uart<'static>,
}

impl Pl011Console {
    /// Wraps the PL011 whose registers start at `base`.
    ///
    /// # Safety
    ///
    /// `base` must be the physical (identity-mapped) address of a PL011's
    /// register block, mapped as device memory for the life of the console, and
    /// no other `Pl011Console` may exist for the same device at the same time.
    pub unsafe fn new(base: usize) -> Self {
        let regs = NonNull::new(base as *mut PL011Registers).expect("PL011 base is not null");
        // SAFETY: the caller guarantees `base` is a live, exclusively owned
        // PL011 register block.
        let regs = unsafe { UniqueMmioPointer::new(regs) };
        Self {
            uart: Uart::new(regs),
        }
    }

    /// Writes one byte, waiting while the transmit FIFO is full.
    pub fn write_byte(&mut self, byte: u8) {
        while self.uart.is_tx_fifo_full() {
            core::hint::spin_loop();
        }
        self.uart.write_word(byte);
    }

    /// Writes `bytes`, turning `\n` into `\r\n`.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(b);
        }
    }

    /// Waits until every queued byte has left the shift register.
    pub fn flush(&mut self) {
        while self.uart.is_busy() {
            core::hint::spin_loop();
        }
    }

    /// Reads a received byte, if one is waiting.
    pub fn read_byte(&mut self) -> Option<u8> {
        self.uart.read_word().ok().flatten()
    }
}

impl fmt::Write for Pl011Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}
