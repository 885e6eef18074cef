//! The host's stand-in for `arch`, for the unit tests of the layers above
//! it: the functions those layers call, with no assembly. TLB and cache
//! maintenance, VTTBR_EL2 and the console's fallback output are per test
//! thread, and what the code asked for is recorded, so a test can check
//! the maintenance a change issued as well as the tables it wrote.
//!
//! It lies outside `src/` because it is no part of the core: the target
//! builds the real `arch`, and the coverage figure counts `src/` only.

use std::cell::{Cell, RefCell};

/// One operation the code under test asked the architecture layer for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `tlb::publish_table_writes`.
    PublishTableWrites,
    /// `tlb::invalidate_stage2_page`, with the VMID then loaded.
    InvalidateStage2Page { vmid: u16, ipa: u64 },
    /// `tlb::complete_stage2`.
    CompleteStage2,
    /// `tlb::invalidate_combined`, with the VMID then loaded.
    InvalidateCombined { vmid: u16 },
    /// `tlb::invalidate_vmid`, with the VMID then loaded.
    InvalidateVmid { vmid: u16 },
    /// `cache::zero_page` of the page at this address.
    ZeroPage(u64),
    /// `send_event`.
    SendEvent,
    /// `wait_for_interrupt`.
    WaitForInterrupt,
}

thread_local! {
    static LOG: RefCell<Vec<Op>> = const { RefCell::new(Vec::new()) };
    static LINES: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    static VTTBR: Cell<u64> = const { Cell::new(0) };
    static MPIDR: Cell<u64> = const { Cell::new(0) };
    static COUNTER: Cell<u64> = const { Cell::new(0) };
}

fn record(op: Op) {
    LOG.with(|l| l.borrow_mut().push(op));
}

fn loaded_vmid() -> u16 {
    (VTTBR.get() >> 48) as u16
}

/// Returns, and forgets, what this thread asked for so far.
pub fn take_log() -> Vec<Op> {
    LOG.with(|l| core::mem::take(&mut *l.borrow_mut()))
}

/// Returns, and forgets, the console lines this thread printed so far.
pub fn take_lines() -> Vec<String> {
    LINES.with(|l| core::mem::take(&mut *l.borrow_mut()))
}

/// As the real layer's: set when the machine stops after a fatal error.
pub static STOPPING: core::sync::atomic::AtomicBool = core::sync::atomic::AtomicBool::new(false);

/// No event ever comes on the host: a CPU that would wait forever ends
/// the test instead.
pub fn wait_for_event() {
    panic!("the core parked this CPU");
}

pub fn send_event() {
    record(Op::SendEvent);
}

/// The interrupt comes at once.
pub fn wait_for_interrupt() {
    record(Op::WaitForInterrupt);
}

/// Where the spin-table entry points would be.
pub fn spin_table_entries() -> u64 {
    0x4000_1000
}

/// The CPU leaves the partition for good: on the host, the test ends.
pub fn restart_in_core(index: usize) -> ! {
    panic!("CPU {index} restarted in the core");
}

pub mod tlb {
    use super::{Op, VTTBR, loaded_vmid, record};

    pub fn publish_table_writes() {
        record(Op::PublishTableWrites);
    }

    pub fn invalidate_stage2_page(ipa: u64) {
        record(Op::InvalidateStage2Page {
            vmid: loaded_vmid(),
            ipa,
        });
    }

    pub fn complete_stage2() {
        record(Op::CompleteStage2);
    }

    pub fn invalidate_combined() {
        record(Op::InvalidateCombined {
            vmid: loaded_vmid(),
        });
    }

    pub fn invalidate_vmid() {
        record(Op::InvalidateVmid {
            vmid: loaded_vmid(),
        });
    }

    pub fn current_vttbr() -> u64 {
        VTTBR.get()
    }

    pub fn load_vttbr(v: u64) {
        VTTBR.set(v);
    }
}

pub mod cache {
    use super::{Op, record};

    /// Zeroes the page with plain stores and records it.
    ///
    /// # Safety
    ///
    /// As the real one: `page` is a 4 KiB page the caller owns, its address
    /// exposed.
    pub unsafe fn zero_page(page: u64) {
        record(Op::ZeroPage(page));
        let at = core::ptr::with_exposed_provenance_mut::<u8>(page as usize);
        // SAFETY: per the contract, a whole page the caller owns.
        unsafe { at.write_bytes(0, 4096) };
    }

    /// The host's DC ZVA block: 64 bytes, as on most cores.
    pub fn zero_block() -> Option<u64> {
        Some(64)
    }

    pub fn dcache_line() -> u64 {
        64
    }

    /// Zeroes `[start, end)` with plain stores (no tags).
    ///
    /// # Safety
    ///
    /// As the real one: the range is the caller's, its address exposed.
    pub unsafe fn zero_blocks(start: u64, end: u64, _block: u64, tags: bool) {
        assert!(!tags, "the host tests' RAM has no tags");
        let at = core::ptr::with_exposed_provenance_mut::<u8>(start as usize);
        // SAFETY: per the contract.
        unsafe { at.write_bytes(0, (end - start) as usize) };
    }

    /// # Safety
    ///
    /// Never called: the host has a DC ZVA block and no tags.
    pub unsafe fn zero_granule_and_tag(_addr: u64) {
        unreachable!("the host tests' RAM has no tags");
    }

    /// Host memory is coherent: nothing to clean.
    pub fn clean_lines_to_poc(_start: u64, _end: u64, _line: u64, _tags: bool) {}

    pub fn clean_dcache_to_poc(_start: u64, _len: u64) {}

    pub fn complete_inner_shareable() {}

    pub fn complete_full_system() {}
}

pub mod mmu {
    /// The host tests' RAM has no allocation tags.
    pub fn el2_tag_access() -> bool {
        false
    }
}

pub mod semihosting {
    use super::LINES;

    /// Keeps the line: a test reads what the core printed.
    pub fn semihosting_line(line: &str) {
        LINES.with(|l| l.borrow_mut().push(line.to_string()));
    }

    /// The host has no emulator to end; the caller parks next.
    pub fn semihosting_exit(_code: u64) {}
}

pub mod gic {
    /// The GIC's per-CPU access, as the real one: the addresses of its
    /// frames (in a test, buffers standing for them).
    #[derive(Clone, Copy, Debug)]
    #[allow(dead_code, reason = "the real one's shape; the tests use part of it")]
    pub enum GicAccess {
        V3 {
            distributor: u64,
            sgi_frame: u64,
            priority_bits: u64,
        },
        V2 {
            distributor: u64,
            cpu_interface: u64,
            priority_bits: u64,
        },
    }
}

pub mod ich {
    use std::cell::RefCell;

    /// The virtual CPU interface's registers and the guest's virtual timer,
    /// as one CPU holds them.
    #[derive(Clone, Debug, Default)]
    pub struct IchRegs {
        pub lr: [u64; 16],
        pub ap0r: [u64; 4],
        pub ap1r: [u64; 4],
        pub vtr: u64,
        pub hcr: u64,
        pub misr: u64,
        pub eisr: u64,
        pub vmcr: u64,
        pub cntv_ctl: u64,
        pub cntv_cval: u64,
    }

    thread_local! {
        static REGS: RefCell<IchRegs> = RefCell::new(IchRegs::default());
    }

    /// Runs `f` on the test thread's registers.
    pub fn with_ich<R>(f: impl FnOnce(&mut IchRegs) -> R) -> R {
        REGS.with(|r| f(&mut r.borrow_mut()))
    }

    pub fn read_lr(n: usize) -> u64 {
        with_ich(|r| r.lr.get(n).copied().unwrap_or(0))
    }

    pub fn write_lr(n: usize, v: u64) {
        with_ich(|r| {
            if let Some(lr) = r.lr.get_mut(n) {
                *lr = v;
            }
        });
    }

    pub fn read_ap0r(n: usize) -> u64 {
        with_ich(|r| r.ap0r.get(n).copied().unwrap_or(0))
    }

    pub fn write_ap0r(n: usize, v: u64) {
        with_ich(|r| {
            if let Some(a) = r.ap0r.get_mut(n) {
                *a = v;
            }
        });
    }

    pub fn read_ap1r(n: usize) -> u64 {
        with_ich(|r| r.ap1r.get(n).copied().unwrap_or(0))
    }

    pub fn write_ap1r(n: usize, v: u64) {
        with_ich(|r| {
            if let Some(a) = r.ap1r.get_mut(n) {
                *a = v;
            }
        });
    }

    pub fn read_sysreg_vtr() -> u64 {
        with_ich(|r| r.vtr)
    }

    pub fn write_ich_hcr(v: u64) {
        with_ich(|r| r.hcr = v);
    }

    pub fn read_misr() -> u64 {
        with_ich(|r| r.misr)
    }

    pub fn read_eisr() -> u64 {
        with_ich(|r| r.eisr)
    }

    pub fn read_vmcr() -> u64 {
        with_ich(|r| r.vmcr)
    }

    pub fn write_vmcr(v: u64) {
        with_ich(|r| r.vmcr = v);
    }

    pub fn guest_timer() -> (u64, u64) {
        with_ich(|r| (r.cntv_ctl, r.cntv_cval))
    }
}

pub mod sysreg {
    use super::{COUNTER, MPIDR};
    use moat_kernel::sysregs::{FakeSysRegs, SysRegs};
    use std::cell::RefCell;

    thread_local! {
        static REGS: RefCell<FakeSysRegs> = RefCell::new(FakeSysRegs::default());
    }

    /// Runs `f` on the registers the test thread's CPU has.
    pub fn with_regs<R>(f: impl FnOnce(&mut FakeSysRegs) -> R) -> R {
        REGS.with(|r| f(&mut r.borrow_mut()))
    }

    /// This CPU's registers: the test thread's [`FakeSysRegs`].
    pub struct Hw;

    impl SysRegs for Hw {
        fn esr_el2(&self) -> u64 {
            with_regs(|r| r.esr_el2())
        }

        fn far_el2(&self) -> u64 {
            with_regs(|r| r.far_el2())
        }

        fn fault_ipa(&self) -> u64 {
            with_regs(|r| r.fault_ipa())
        }

        fn read_id_register(&self, crm: u8, op2: u8) -> Option<u64> {
            with_regs(|r| r.read_id_register(crm, op2))
        }

        fn vbar_el1(&self) -> u64 {
            with_regs(|r| r.vbar_el1())
        }

        fn sctlr_el1(&self) -> u64 {
            with_regs(|r| r.sctlr_el1())
        }

        fn write_el1_exception(&mut self, esr: u64, elr: u64, spsr: u64, far: Option<u64>) {
            with_regs(|r| r.write_el1_exception(esr, elr, spsr, far));
        }
    }

    /// The EL2 configuration the host runs with: what the layers read of
    /// it.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct HostEl2Config {
        pub vttbr: u64,
    }

    /// A CPU's EL1 registers; the host tests never switch to EL1.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct El1Context;

    impl El1Context {
        pub const ZERO: Self = Self;
    }

    /// The generic counter, one tick further at each read, and its
    /// frequency (1 Hz): a wait for something that never happens times
    /// out after as many reads as it allows seconds.
    pub fn counter() -> (u64, u64) {
        COUNTER.set(COUNTER.get() + 1);
        (COUNTER.get(), 1)
    }

    /// MPIDR_EL1 of the CPU the test thread plays.
    pub fn mpidr() -> u64 {
        MPIDR.get()
    }

    /// Makes the test thread play the CPU whose MPIDR_EL1 is `value`.
    pub fn set_mpidr(value: u64) {
        MPIDR.set(value);
    }
}
