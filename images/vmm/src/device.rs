//! `/dev/moat`: the ioctls of the kernel module (`images/linux-module`).
//!
//! The layouts mirror `moat_uapi.h`: 64-bit fields only, so they have no
//! padding. This is the VMM's only `unsafe` code: an `ioctl` system call
//! has no safe wrapper in the standard library.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;

/// The device node the module registers.
pub const PATH: &str = "/dev/moat";

#[repr(C)]
struct Create {
    entry: u64,
    flags: u64,
}

#[repr(C)]
struct Donate {
    ipa: u64,
    size: u64,
}

#[repr(C)]
struct Load {
    ipa: u64,
    addr: u64,
    size: u64,
}

/// `MOAT_RUN`'s argument: the answer in, the exit (x1..x7) out.
#[repr(C)]
struct Run {
    answer: [u64; 4],
    exit: [u64; 7],
}

const MAGIC: u64 = 0xb7;
const WRITE: u64 = 1;
const READ: u64 = 2;

/// Linux's `_IOC(dir, MAGIC, nr, size)` on arm64.
const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (MAGIC << 8) | nr
}

const CREATE: u64 = ioc(WRITE, 0, size_of::<Create>());
const DONATE: u64 = ioc(WRITE, 1, size_of::<Donate>());
const LOAD: u64 = ioc(WRITE, 2, size_of::<Load>());
const RUN: u64 = ioc(READ | WRITE, 3, size_of::<Run>());
const CHECK: u64 = ioc(0, 4, 0);

/// An open `/dev/moat`: at most one VM, which lives as long as the file.
pub struct Device {
    file: File,
}

impl Device {
    pub fn open() -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(PATH)?;
        Ok(Self { file })
    }

    /// Issues `request` with `arg`; `arg` is the argument's exact layout.
    fn ioctl<T>(&self, request: u64, arg: *mut T) -> io::Result<()> {
        // SAFETY: `request` encodes `size_of::<T>()` and the direction the
        // module copies; `arg` points to a live, exclusively borrowed `T` (or
        // is null for a request without argument) for the call's duration.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), request as _, arg) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `VM_CREATE` for this file's VM.
    pub fn create(&self, entry: u64, flags: u64) -> io::Result<()> {
        self.ioctl(CREATE, &mut Create { entry, flags })
    }

    /// `VM_DONATE` of `size` bytes of kernel memory at `ipa`.
    pub fn donate(&self, ipa: u64, size: u64) -> io::Result<()> {
        self.ioctl(DONATE, &mut Donate { ipa, size })
    }

    /// `VM_LOAD` of `image` at `ipa`.
    pub fn load(&self, ipa: u64, image: &[u8]) -> io::Result<()> {
        self.load_from(ipa, image.as_ptr() as u64, image.len() as u64)
    }

    /// `VM_LOAD` of `size` bytes at address `addr` of this process: the
    /// module reads them with `copy_from_user`, so any address is safe to
    /// pass (a bad one is `EFAULT`).
    pub fn load_from(&self, ipa: u64, addr: u64, size: u64) -> io::Result<()> {
        self.ioctl(LOAD, &mut Load { ipa, addr, size })
    }

    /// `VCPU_RUN` with `answer`; returns x1..x7 of the exit.
    pub fn run(&self, answer: [u64; 4]) -> io::Result<[u64; 7]> {
        let mut arg = Run {
            answer,
            exit: [0; 7],
        };
        self.ioctl(RUN, &mut arg)?;
        Ok(arg.exit)
    }

    /// `CHECK_CONSISTENCY`: whether the core's ledger and the host's stage-2
    /// agree.
    pub fn check(&self) -> io::Result<()> {
        self.ioctl::<u8>(CHECK, std::ptr::null_mut())
    }
}

impl Device {
    /// Tests only, with the test build of `moat.ko` (`MOAT_TEST_HOOKS`): maps
    /// the first page this file's VM was given into this process and reads
    /// its first word. The core has taken the page from the host, so the
    /// read must never return: it aborts, and Linux sends SIGBUS.
    pub fn read_donated_page(&self) -> io::Result<u64> {
        let page = 4096;
        // SAFETY: a new shared read-only mapping of one page of the device,
        // at an address the kernel chooses; no existing memory is affected.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ,
                libc::MAP_SHARED,
                self.file.as_raw_fd(),
                0,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `at` is the start of the page-sized mapping made above,
        // aligned for a u64.
        let word = unsafe { (at as *const u64).read_volatile() };
        // SAFETY: unmaps exactly the mapping made above, no longer used.
        unsafe { libc::munmap(at, page) };
        Ok(word)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_encoding() {
        // _IOW(0xb7, 0, 16 bytes), _IOWR(0xb7, 3, 88 bytes), _IO(0xb7, 4).
        assert_eq!(CREATE, 0x4010_b700);
        assert_eq!(RUN, 0xc058_b703);
        assert_eq!(CHECK, 0xb704);
    }
}
