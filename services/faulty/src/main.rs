//! The `faulty` service: behaves on `echo`, and on `misbehave` breaks in the
//! way it is told, so the tests can show the core contains each failure.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![forbid(unsafe_code)]

use moat_abi::Error;
use moat_abi::services::{Empty, Misbehaviour, faulty};

/// Whether the next reply should be malformed.
#[derive(Default)]
struct Faulty {
    corrupt_next_reply: bool,
}

/// The host's RAM on QEMU virt: never part of a service's stage-2.
const FOREIGN_ADDRESS: u64 = 0x4000_0000;

impl faulty::Server for Faulty {
    fn echo(&mut self, v: u64) -> Result<u64, Error> {
        Ok(v.wrapping_add(1))
    }

    fn misbehave(&mut self, how: u64) -> Result<Empty, Error> {
        match how {
            x if x == Misbehaviour::Exception as u64 => run_time::undefined(),
            x if x == Misbehaviour::MalformedReply as u64 => self.corrupt_next_reply = true,
            x if x == Misbehaviour::Spin as u64 => loop {
                core::hint::spin_loop();
            },
            x if x == Misbehaviour::ReadForeignMemory as u64 => {
                let v = run_time::read(FOREIGN_ADDRESS);
                return Err(if v == 0 { Error::Denied } else { Error::Busy });
            }
            x if x == Misbehaviour::RewriteTranslation as u64 => run_time::rewrite_translation(),
            _ => return Err(Error::InvalidParameters),
        }
        Ok(Empty)
    }
}

#[cfg(target_os = "none")]
mod run_time {
    pub fn undefined() {
        moat_rt::undefined_instruction();
    }
    pub fn read(address: u64) -> u64 {
        moat_rt::read_word_at(address)
    }
    pub fn rewrite_translation() {
        moat_rt::rewrite_translation_base();
    }
}

#[cfg(not(target_os = "none"))]
mod run_time {
    pub fn undefined() {}
    pub fn read(_: u64) -> u64 {
        0
    }
    pub fn rewrite_translation() {}
}

#[cfg(target_os = "none")]
moat_rt::service_main!(main);

#[cfg(target_os = "none")]
fn main() -> ! {
    let mut server = Faulty::default();
    moat_rt::serve(|header, body, reply_payload| {
        let mut reply = faulty::dispatch_into(&mut server, header, body, reply_payload);
        if core::mem::take(&mut server.corrupt_next_reply) {
            // Answer for the wrong call: the core must refuse it.
            reply.sequence = reply.sequence.wrapping_add(1);
        }
        reply
    })
}

#[cfg(not(target_os = "none"))]
fn main() {
    let _ = Faulty::default();
}
