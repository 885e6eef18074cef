//! `/dev/moat`: the ioctls of the kernel module (`images/linux-module`);
//! and, in [`kvm`], the few `/dev/kvm` ones `bench-kvm` compares with.
//!
//! The layouts mirror `moat_uapi.h`: 64-bit fields only, so they have no
//! padding. This is the VMM's only `unsafe` code: an `ioctl` system call
//! has no safe wrapper in the standard library, nor have the signal calls
//! of [`Kick`], with which one vCPU's thread ends another's run.
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
    vcpus: u64,
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
    vcpu: u64,
    answer: [u64; 4],
    inject: [u64; 2],
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
const RESTART_LEDGER: u64 = ioc(0, 5, 0);

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
        self.create_with_vcpus(entry, flags, 1)
    }

    /// `VM_CREATE` with `vcpus` vCPUs.
    pub fn create_with_vcpus(&self, entry: u64, flags: u64, vcpus: u64) -> io::Result<()> {
        self.ioctl(
            CREATE,
            &mut Create {
                entry,
                flags,
                vcpus,
            },
        )
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
        self.run_injecting(answer, [0; 2])
    }

    /// `VCPU_RUN` with `answer` and up to two interrupts to make pending
    /// (`moat_abi::vm::Injection` words, 0 for none).
    pub fn run_injecting(&self, answer: [u64; 4], inject: [u64; 2]) -> io::Result<[u64; 7]> {
        self.run_vcpu(0, answer, inject)
    }

    /// `VCPU_RUN` of vCPU `vcpu`.
    pub fn run_vcpu(&self, vcpu: u64, answer: [u64; 4], inject: [u64; 2]) -> io::Result<[u64; 7]> {
        let mut arg = Run {
            vcpu,
            answer,
            inject,
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

    /// `LEDGER_RESTART`: the memory ledger stopped and rebuilt from the
    /// core's records. `EAGAIN` if a VM is running: the rebuild waits for
    /// a host call made with none running.
    pub fn restart_ledger(&self) -> io::Result<()> {
        self.ioctl::<u8>(RESTART_LEDGER, std::ptr::null_mut())
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

/// A kick: a signal one vCPU's thread sends another to end its run, so
/// that it runs again with the interrupts queued for it. The signal's
/// handler does nothing and is installed without `SA_RESTART`: a signal
/// that reaches the thread in `VCPU_RUN` ends the run (an `Interrupt` exit),
/// one that reaches it just before makes the ioctl fail with `EINTR`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kick(libc::pthread_t);

// SAFETY: a `pthread_t` only names a thread of this process (a pointer on
// musl, never dereferenced here); any thread may send it a signal.
unsafe impl Send for Kick {}

/// The kick's signal.
const KICK_SIGNAL: libc::c_int = libc::SIGUSR1;

extern "C" fn kicked(_: libc::c_int) {}

impl Kick {
    /// Installs the kick's handler for the whole process.
    pub fn install() -> io::Result<()> {
        // SAFETY: a zeroed `sigaction` is a valid empty one; its handler
        // is a function that does nothing (async-signal-safe), and the
        // call only replaces SIGUSR1's disposition.
        let r = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = kicked as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = 0;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(KICK_SIGNAL, &action, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The kick of the calling thread.
    pub fn this_thread() -> Self {
        // SAFETY: `pthread_self` has no preconditions.
        Self(unsafe { libc::pthread_self() })
    }

    /// Sends the kick; the thread must still exist (the caller's vCPU
    /// threads live as long as the VM runs).
    pub fn send(self) {
        // SAFETY: `self.0` names a live thread of this process (per the
        // contract above); the signal's handler is installed.
        unsafe { libc::pthread_kill(self.0, KICK_SIGNAL) };
    }
}

/// Linux's `/dev/kvm`, for `bench-kvm`: the same kind of exit through KVM,
/// to compare with. Layouts and numbers from the arm64 KVM uapi.
pub mod kvm {
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, RawFd};

    const KVMIO: u64 = 0xae;
    const WRITE: u64 = 1;
    const READ: u64 = 2;

    const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
    }

    /// `struct kvm_userspace_memory_region`.
    #[repr(C)]
    struct MemoryRegion {
        slot: u32,
        flags: u32,
        guest_phys_addr: u64,
        memory_size: u64,
        userspace_addr: u64,
    }

    /// `struct kvm_one_reg`.
    #[repr(C)]
    struct OneReg {
        id: u64,
        addr: u64,
    }

    /// `struct kvm_vcpu_init`.
    #[repr(C)]
    #[derive(Default)]
    struct VcpuInit {
        target: u32,
        features: [u32; 7],
    }

    const CREATE_VM: u64 = ioc(0, 0x01, 0);
    const GET_VCPU_MMAP_SIZE: u64 = ioc(0, 0x04, 0);
    const CREATE_VCPU: u64 = ioc(0, 0x41, 0);
    const SET_USER_MEMORY_REGION: u64 = ioc(WRITE, 0x46, size_of::<MemoryRegion>());
    const RUN: u64 = ioc(0, 0x80, 0);
    const SET_ONE_REG: u64 = ioc(WRITE, 0xac, size_of::<OneReg>());
    const ARM_VCPU_INIT: u64 = ioc(WRITE, 0xae, size_of::<VcpuInit>());
    const ARM_PREFERRED_TARGET: u64 = ioc(READ, 0xaf, size_of::<VcpuInit>());

    /// `KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE` and the offset
    /// of `regs.pc` in `struct kvm_regs` (31 x registers and sp before it)
    /// in 32-bit words.
    const REG_PC: u64 = 0x6000_0000_0000_0000 | 0x0030_0000_0000_0000 | 0x0010_0000 | (32 * 8 / 4);

    /// `KVM_EXIT_MMIO`.
    pub const EXIT_MMIO: u32 = 6;
    /// Offset of `exit_reason` in `struct kvm_run`.
    const RUN_EXIT_REASON: usize = 8;

    /// Issues `request` on `fd` with `arg` (a pointer or a plain value).
    fn ioctl(fd: RawFd, request: u64, arg: u64) -> io::Result<i32> {
        // SAFETY: every request made here either takes no argument or takes a
        // pointer to a live value of the exact layout its number encodes,
        // borrowed for the call's duration.
        let r = unsafe { libc::ioctl(fd, request as _, arg) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    /// An anonymous or file mapping this module made, unmapped on drop.
    struct Mapping {
        at: *mut libc::c_void,
        len: usize,
    }

    impl Mapping {
        fn new(len: usize, flags: libc::c_int, fd: RawFd) -> io::Result<Self> {
            // SAFETY: a new read-write mapping at an address the kernel
            // chooses; no existing memory is affected.
            let at = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    flags,
                    fd,
                    0,
                )
            };
            if at == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            Ok(Self { at, len })
        }
    }

    impl Drop for Mapping {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping `new` made; nothing refers
            // to it any more.
            unsafe { libc::munmap(self.at, self.len) };
        }
    }

    /// A KVM VM with `len` bytes of memory at `ipa`, holding `program`, and
    /// one vCPU about to run it from its first instruction.
    pub struct Vm {
        // Field order is drop order: the vCPU's run area and file first,
        // then the VM, then its memory.
        run: Mapping,
        vcpu: File,
        _vm: File,
        _memory: Mapping,
    }

    impl Vm {
        pub fn new(ipa: u64, len: usize, program: &[u32]) -> io::Result<Self> {
            let kvm = OpenOptions::new().read(true).write(true).open("/dev/kvm")?;
            let vm = owned(ioctl(kvm.as_raw_fd(), CREATE_VM, 0)?);
            let memory = Mapping::new(len, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1)?;
            let words = len / 4;
            if program.len() > words {
                return Err(io::Error::other("the program does not fit"));
            }
            // SAFETY: `memory` is a fresh, page-aligned, writable mapping of
            // `len` bytes that nothing else refers to yet; `program` fits.
            let guest = unsafe { std::slice::from_raw_parts_mut(memory.at.cast::<u32>(), words) };
            guest[..program.len()].copy_from_slice(program);
            let mut region = MemoryRegion {
                slot: 0,
                flags: 0,
                guest_phys_addr: ipa,
                memory_size: len as u64,
                userspace_addr: memory.at as u64,
            };
            ioctl(
                vm.as_raw_fd(),
                SET_USER_MEMORY_REGION,
                &raw mut region as u64,
            )?;
            let vcpu = owned(ioctl(vm.as_raw_fd(), CREATE_VCPU, 0)?);
            let mut init = VcpuInit::default();
            ioctl(vm.as_raw_fd(), ARM_PREFERRED_TARGET, &raw mut init as u64)?;
            ioctl(vcpu.as_raw_fd(), ARM_VCPU_INIT, &raw mut init as u64)?;
            // KVM_ARM_VCPU_INIT leaves the vCPU in EL1h with interrupts
            // masked and the MMU off; only the PC needs setting.
            let mut pc = ipa;
            let mut reg = OneReg {
                id: REG_PC,
                addr: &raw mut pc as u64,
            };
            ioctl(vcpu.as_raw_fd(), SET_ONE_REG, &raw mut reg as u64)?;
            let run_len = ioctl(kvm.as_raw_fd(), GET_VCPU_MMAP_SIZE, 0)?;
            let run_len = usize::try_from(run_len).map_err(io::Error::other)?;
            if run_len < RUN_EXIT_REASON + 4 {
                return Err(io::Error::other("kvm_run is too small"));
            }
            let run = Mapping::new(run_len, libc::MAP_SHARED, vcpu.as_raw_fd())?;
            Ok(Self {
                run,
                vcpu,
                _vm: vm,
                _memory: memory,
            })
        }

        /// `KVM_RUN`; returns `exit_reason`.
        pub fn run(&mut self) -> io::Result<u32> {
            ioctl(self.vcpu.as_raw_fd(), RUN, 0)?;
            // SAFETY: the run area is a live shared mapping of at least
            // RUN_EXIT_REASON + 4 bytes (checked in `new`), page-aligned, so
            // the u32 is aligned; KVM writes it only during KVM_RUN.
            Ok(unsafe {
                self.run
                    .at
                    .cast::<u8>()
                    .add(RUN_EXIT_REASON)
                    .cast::<u32>()
                    .read_volatile()
            })
        }
    }

    /// Takes ownership of a descriptor an ioctl just returned.
    fn owned(fd: i32) -> File {
        // SAFETY: `fd` is a new descriptor KVM just created for this
        // process, owned by nothing else.
        unsafe { File::from_raw_fd(fd) }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn ioctl_numbers_match_linux_encoding() {
            assert_eq!(CREATE_VM, 0xae01);
            assert_eq!(CREATE_VCPU, 0xae41);
            assert_eq!(SET_USER_MEMORY_REGION, 0x4020_ae46);
            assert_eq!(RUN, 0xae80);
            assert_eq!(SET_ONE_REG, 0x4010_aeac);
            assert_eq!(ARM_VCPU_INIT, 0x4020_aeae);
            assert_eq!(ARM_PREFERRED_TARGET, 0x8020_aeaf);
            assert_eq!(REG_PC, 0x6030_0000_0010_0040);
        }
    }
}

/// The generic counter as this process sees it (CNTVCT_EL0; the host's
/// CNTVOFF_EL2 is 0, so this is the physical count a `Wfi` exit's timer
/// deadline is given in) and its frequency.
#[cfg(target_arch = "aarch64")]
pub fn counter() -> (u64, u64) {
    let (now, freq): (u64, u64);
    // SAFETY: reads the virtual counter and its frequency, which Linux lets
    // userspace read (CNTKCTL_EL1.EL0VCTEN); no memory is touched.
    unsafe {
        std::arch::asm!("isb", "mrs {n}, cntvct_el0", "mrs {f}, cntfrq_el0",
            n = out(reg) now, f = out(reg) freq, options(nomem, nostack));
    }
    (now, freq)
}

/// The counter elsewhere (the VMM's host tests): derived from the clock.
#[cfg(not(target_arch = "aarch64"))]
pub fn counter() -> (u64, u64) {
    use std::time::{SystemTime, UNIX_EPOCH};
    let ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    (ns, 1_000_000_000)
}

/// How long until the counter reaches `deadline` (zero if it has).
pub fn until(deadline: u64) -> std::time::Duration {
    let (now, freq) = counter();
    let ticks = deadline.saturating_sub(now);
    let nanos = u128::from(ticks) * 1_000_000_000 / u128::from(freq.max(1));
    std::time::Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_linux_encoding() {
        // _IOW(0xb7, 0, 24 bytes), _IOWR(0xb7, 3, 112 bytes), _IO(0xb7, 4).
        assert_eq!(CREATE, 0x4018_b700);
        assert_eq!(RUN, 0xc070_b703);
        assert_eq!(CHECK, 0xb704);
    }
}
