//! The Moat service runtime.
//!
//! A service is an EL1 program in a partition of its own: its stage-2 maps
//! its image, its stack and one IPC page, and nothing else. This crate is the
//! only code under `services/` that may use `unsafe`: the entry code (stack,
//! BSS, an identity MMU map so Rust runs on normal memory, exception vectors
//! that report any fault to the core), the hypercall instruction, and the
//! copies in and out of the IPC page. A service crate is
//! `#![forbid(unsafe_code)]` and writes only:
//!
//! ```ignore
//! moat_rt::service_main!(main);
//! fn main() -> ! {
//!     let mut server = MyService::default();
//!     moat_rt::serve(|header, body, reply| my_interface::dispatch_into(&mut server, header, body, reply))
//! }
//! ```
//!
//! The receive loop: the service tells the core it is ready (or hands it the
//! reply to the previous call) with `SVC_REPLY_WAIT`; the core returns from
//! that hypercall when the next call is in the IPC page.
#![no_std]
#![deny(unsafe_op_in_unsafe_fn)]
// The runtime only exists on the target; on the development machine the
// crate is empty so the workspace builds and tests as one.
#![cfg(target_os = "none")]

use core::fmt;
use moat_abi::hypercall;
use moat_abi::ipc::{MessageHeader, PAYLOAD_SIZE};

const HEADER_SIZE: usize = size_of::<MessageHeader>();
const HEADER_WORDS: usize = HEADER_SIZE / 8;

core::arch::global_asm!(include_str!("entry.S"));

/// Where every service finds its IPC page (intermediate physical address).
pub const IPC_PAGE: usize = 0x8_0000;
/// Offset of the log buffer inside the IPC page.
const LOG_OFFSET: usize = 2048;
/// Bytes of log text per `SVC_LOG`.
pub const LOG_CAPACITY: usize = 2048;

/// Makes `$main` the service's entry point.
#[macro_export]
macro_rules! service_main {
    ($main:path) => {
        /// Called by the runtime's entry code once the stack, BSS and MMU are set up.
        #[unsafe(no_mangle)]
        extern "C" fn moat_rt_main() -> ! {
            $main()
        }

        #[panic_handler]
        fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
            $crate::panic(info)
        }
    };
}

/// Issues a Moat hypercall with up to three arguments; returns x0.
fn hvc(function: u32, a1: u64, a2: u64, a3: u64) -> u64 {
    let r = smccc_hvc(function, [a1, a2, a3]);
    r[0]
}

#[inline(always)]
fn smccc_hvc(function: u32, args: [u64; 3]) -> [u64; 4] {
    let mut r = [0u64; 4];
    // SAFETY: HVC to the core follows SMCCC: it may change x0..x17 (declared
    // as clobbered) and no memory the compiler knows about, except the IPC
    // page, which is only ever accessed through volatile copies.
    unsafe {
        core::arch::asm!(
            "hvc #0",
            inout("x0") u64::from(function) => r[0],
            inout("x1") args[0] => r[1],
            inout("x2") args[1] => r[2],
            inout("x3") args[2] => r[3],
            out("x4") _, out("x5") _, out("x6") _, out("x7") _,
            out("x8") _, out("x9") _, out("x10") _, out("x11") _,
            out("x12") _, out("x13") _, out("x14") _, out("x15") _,
            out("x16") _, out("x17") _,
            options(nostack),
        );
    }
    r
}

/// The receive loop: waits for a call, hands it to `handle`, sends back the
/// reply, forever.
///
/// `handle` gets the call's header and body (read in place from the IPC
/// page) and a buffer for the reply's payload, and returns the reply's
/// header; a generated `dispatch_into` has exactly this shape:
///
/// ```ignore
/// moat_rt::serve(|header, body, reply| trace::dispatch_into(&mut server, header, body, reply))
/// ```
pub fn serve(
    mut handle: impl FnMut(&MessageHeader, &[u8], &mut [u8; PAYLOAD_SIZE]) -> MessageHeader,
) -> ! {
    /// The reply's payload, word-aligned so it can be stored a word at a time.
    #[repr(C, align(8))]
    struct Payload([u8; PAYLOAD_SIZE]);
    let mut reply_payload = Payload([0; PAYLOAD_SIZE]);
    let page = IPC_PAGE as *mut u64;
    // The first wait carries no reply: it tells the core the service is ready.
    hvc(hypercall::SVC_REPLY_WAIT, 0, 0, 0);
    loop {
        // Word-sized volatile accesses: the IPC page is on every call's path,
        // and a generic byte copy would cost more than the rest of it.
        let mut header_words = [0u64; HEADER_WORDS];
        for (i, w) in header_words.iter_mut().enumerate() {
            // SAFETY: the IPC page is page-aligned, mapped read/write in this
            // partition for its whole life, and begins with a message header
            // (every bit pattern is valid). The core writes it only while this
            // service is stopped in a hypercall.
            *w = unsafe { page.add(i).read_volatile() };
        }
        let header: MessageHeader = zerocopy::transmute!(header_words);
        let len = (header.payload_len as usize).min(PAYLOAD_SIZE);
        // SAFETY: as above; `len` is within the message's payload, which is
        // read in place and not written until `handle` has returned.
        let body =
            unsafe { core::slice::from_raw_parts((IPC_PAGE + HEADER_SIZE) as *const u8, len) };
        let reply = handle(&header, body, &mut reply_payload.0);
        let reply_words: [u64; HEADER_WORDS] = zerocopy::transmute!(reply);
        let payload_words = (reply.payload_len as usize).min(PAYLOAD_SIZE).div_ceil(8);
        let payload = reply_payload.0.as_ptr().cast::<u64>();
        // SAFETY: as above; the request body is no longer borrowed, and
        // `payload` is the 8-byte-aligned reply buffer, read in whole words
        // within its length.
        unsafe {
            for (i, w) in reply_words.iter().enumerate() {
                page.add(i).write_volatile(*w);
            }
            for i in 0..payload_words {
                page.add(HEADER_WORDS + i)
                    .write_volatile(payload.add(i).read());
            }
        }
        hvc(hypercall::SVC_REPLY_WAIT, 1, 0, 0);
    }
}

fn ipc_write_at(offset: usize, bytes: &[u8]) {
    debug_assert!(offset + bytes.len() <= 4096);
    // SAFETY: the IPC page is mapped read/write; callers keep
    // `offset + len` within the page, and nothing else in this partition
    // aliases it while this runs.
    unsafe {
        core::ptr::copy_nonoverlapping(bytes.as_ptr(), (IPC_PAGE + offset) as *mut u8, bytes.len())
    };
}

/// Prints one line on the core's console, prefixed with the service's name.
pub fn log(args: fmt::Arguments<'_>) {
    struct Buf {
        bytes: [u8; LOG_CAPACITY],
        len: usize,
    }
    impl fmt::Write for Buf {
        fn write_str(&mut self, s: &str) -> fmt::Result {
            let room = LOG_CAPACITY - self.len;
            let n = s.len().min(room);
            self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
            self.len += n;
            Ok(())
        }
    }
    let mut buf = Buf {
        bytes: [0; LOG_CAPACITY],
        len: 0,
    };
    let _ = fmt::write(&mut buf, args);
    ipc_write_at(LOG_OFFSET, &buf.bytes[..buf.len]);
    hvc(hypercall::SVC_LOG, buf.len as u64, 0, 0);
}

/// `log!("...")`: one line on the core's console.
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::log(format_args!($($arg)*))
    };
}

/// Reports a panic as a fault: the core marks the service failed.
pub fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    log(format_args!("panic: {info}"));
    hvc(hypercall::SVC_FAULT, 0, 0, 0);
    loop {
        core::hint::spin_loop();
    }
}

/// Executes an undefined instruction (for containment tests).
pub fn undefined_instruction() {
    // SAFETY: `udf` raises an Undefined Instruction exception, which the
    // runtime's vectors report to the core; nothing returns from it.
    unsafe { core::arch::asm!("udf #0", options(nomem, nostack)) };
}

/// Writes TTBR0_EL1 with the value it holds (for containment tests: a
/// started service may not change its translation controls).
pub fn rewrite_translation_base() {
    // SAFETY: writes TTBR0_EL1 back unchanged, so translation is the same
    // whether or not the write traps; a trap is taken to the core, which
    // stops this service.
    unsafe {
        core::arch::asm!("mrs {t}, ttbr0_el1", "msr ttbr0_el1, {t}", t = out(reg) _, options(nostack, preserves_flags))
    };
}

/// Reads a word at an arbitrary address (for containment tests: reading
/// outside the partition must fault in its stage-2).
pub fn read_word_at(address: u64) -> u64 {
    // SAFETY: deliberately touches `address`; a fault is taken to the core,
    // which stops this service. A mapped address is read like any other.
    unsafe { core::ptr::read_volatile(address as *const u64) }
}
