//! The PL011 UART the VMM gives a guest, emulated from MMIO exits.
//!
//! Enough of the PL011 for a polling driver: the data register (a write sends
//! a byte to the VMM's standard output; a read takes one from its standard
//! input), the flag register (the transmitter is never full: output is
//! written at once; the receiver is empty until input arrives), the
//! configuration registers as plain storage, and the identification
//! registers Linux's and Arm's drivers probe. There are no interrupts: a
//! protected VM has no interrupt controller.

use std::collections::VecDeque;

/// Bytes of the register window.
pub const SIZE: u64 = 0x1000;

const DR: u64 = 0x000;
const RSR_ECR: u64 = 0x004;
const FR: u64 = 0x018;
const IBRD: u64 = 0x024;
const FBRD: u64 = 0x028;
const LCR_H: u64 = 0x02c;
const CR: u64 = 0x030;
const IFLS: u64 = 0x034;
const IMSC: u64 = 0x038;
const RIS: u64 = 0x03c;
const MIS: u64 = 0x040;
const ICR: u64 = 0x044;
const ID: u64 = 0xfe0;

const FR_TXFE: u32 = 1 << 7;
const FR_RXFE: u32 = 1 << 4;
/// DR: the break error bit, which marks the end of the VMM's input.
const DR_BE: u32 = 1 << 10;
/// RIS/MIS/IMSC bits: receive (4) and receive timeout (6); transmit (5).
const RX_INTERRUPTS: u32 = (1 << 4) | (1 << 6);
const TX_INTERRUPT: u32 = 1 << 5;
/// PeriphID0..3 and PCellID0..3 of an Arm PL011 (r1p5).
const ID_BYTES: [u32; 8] = [0x11, 0x10, 0x34, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// The UART's state.
#[derive(Debug, Default)]
pub struct Pl011 {
    /// Received data register values, oldest first (a byte, or [`DR_BE`]).
    rx: VecDeque<u32>,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    imsc: u32,
}

impl Pl011 {
    pub fn new() -> Self {
        Self {
            // Reset values: UART, TX and RX enabled as firmware leaves them.
            cr: 0x301,
            ifls: 0x12,
            ..Self::default()
        }
    }

    /// A byte from the VMM's input.
    pub fn receive(&mut self, byte: u8) {
        self.rx.push_back(u32::from(byte));
    }

    /// The VMM's input has ended: the guest reads a break.
    pub fn receive_break(&mut self) {
        self.rx.push_back(DR_BE);
    }

    /// Whether the guest has input waiting.
    pub fn has_input(&self) -> bool {
        !self.rx.is_empty()
    }

    /// The raw interrupt status: receive (and receive timeout) while input
    /// waits; transmit always (the transmit FIFO is always empty).
    fn raw_interrupts(&self) -> u32 {
        let rx = if self.rx.is_empty() { 0 } else { RX_INTERRUPTS };
        rx | TX_INTERRUPT
    }

    /// Whether the UART's interrupt line is up (a masked status bit set).
    pub fn interrupt_line(&self) -> bool {
        self.raw_interrupts() & self.imsc != 0
    }

    /// A read of the register at `offset`.
    pub fn read(&mut self, offset: u64) -> u32 {
        match offset {
            DR => self.rx.pop_front().unwrap_or(0),
            FR => FR_TXFE | if self.rx.is_empty() { FR_RXFE } else { 0 },
            IBRD => self.ibrd,
            FBRD => self.fbrd,
            LCR_H => self.lcr_h,
            CR => self.cr,
            IFLS => self.ifls,
            IMSC => self.imsc,
            RIS => self.raw_interrupts(),
            MIS => self.raw_interrupts() & self.imsc,
            RSR_ECR => 0,
            o if (ID..ID + 0x20).contains(&o) && o % 4 == 0 => ID_BYTES[((o - ID) / 4) as usize],
            _ => 0,
        }
    }

    /// A write of `value` to the register at `offset`; returns the byte to
    /// send for a write to the data register.
    pub fn write(&mut self, offset: u64, value: u64) -> Option<u8> {
        let v = value as u32;
        match offset {
            DR => return Some(value as u8),
            IBRD => self.ibrd = v & 0xffff,
            FBRD => self.fbrd = v & 0x3f,
            LCR_H => self.lcr_h = v & 0xff,
            CR => self.cr = v & 0xff87,
            IFLS => self.ifls = v & 0x3f,
            IMSC => self.imsc = v & 0x7ff,
            // Error clear and interrupt clear: nothing is latched.
            RSR_ECR | ICR => {}
            // Read-only registers and holes.
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_goes_out_and_input_comes_in() {
        let mut u = Pl011::new();
        assert_eq!(u.write(DR, 0x1_0041), Some(b'A'));
        assert_eq!(u.read(FR) & FR_RXFE, FR_RXFE);
        u.receive(b'x');
        assert_eq!(u.read(FR) & FR_RXFE, 0);
        assert_eq!(u.read(DR), u32::from(b'x'));
        assert_eq!(u.read(FR) & FR_RXFE, FR_RXFE);
        u.receive_break();
        assert_eq!(u.read(DR), DR_BE);
    }

    #[test]
    fn registers_keep_what_they_hold() {
        let mut u = Pl011::new();
        assert_eq!(u.write(LCR_H, 0x70), None);
        assert_eq!(u.read(LCR_H), 0x70);
        assert_eq!(u.write(IBRD, 0xf_ffff), None);
        assert_eq!(u.read(IBRD), 0xffff);
        assert_eq!(u.read(0xfe0), 0x11);
        assert_eq!(u.read(0xffc), 0xb1);
        assert_eq!(u.read(0x800), 0);
    }
}
