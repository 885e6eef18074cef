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
    pub use super::partition_tlb::*;
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
    pub use super::partition_gic::*;

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
    pub use super::partition_sysreg::*;
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

// ---------------------------------------------------------------------------
// The partition layer (`partition::service`, `partition::vm`): the world
// switch into EL1, scripted, and the registers a switch saves and loads,
// kept per test thread so a test can check what the host got back.
// ---------------------------------------------------------------------------

use crate::base::cpu::{NestedSave, Vcpu};
use std::collections::VecDeque;

/// What a partition does when the core enters it, once: it plays the
/// service or the guest (writes a reply, changes registers, calls into the
/// core as another CPU) and says how it trapped back (`exit_vector`,
/// `exit_esr`, the registers).
type Entry = Box<dyn FnOnce(&mut Vcpu)>;

thread_local! {
    static ENTRIES: RefCell<VecDeque<Entry>> = RefCell::new(VecDeque::new());
    static PARTITION_LOG: RefCell<Vec<PartitionOp>> = const { RefCell::new(Vec::new()) };
}

/// What the world switch asked the architecture layer for, apart from
/// [`Op`]: the partition layer's own operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionOp {
    /// `sysreg::switch_el2(hcr, cptr, mdcr, cnthctl, vttbr)`.
    SwitchEl2 { hcr: u64, vttbr: u64 },
    /// `sysreg::arm_watchdog(deadline)`.
    ArmWatchdog(u64),
    /// `tlb::invalidate_local_vmid`, with the VMID then loaded.
    InvalidateLocalVmid { vmid: u16 },
    /// `sysreg::set_vmpidr(value)`.
    SetVmpidr(u64),
}

fn record_partition(op: PartitionOp) {
    PARTITION_LOG.with(|l| l.borrow_mut().push(op));
}

/// Returns, and forgets, the partition operations this thread asked for.
pub fn take_partition_log() -> Vec<PartitionOp> {
    PARTITION_LOG.with(|l| core::mem::take(&mut *l.borrow_mut()))
}

/// Queues what the partition does at the next entry of this thread's
/// CPU (after those queued before).
pub fn on_entry(entry: impl FnOnce(&mut Vcpu) + 'static) {
    ENTRIES.with(|e| e.borrow_mut().push_back(Box::new(entry)));
}

/// Entries queued and not yet run.
pub fn entries_left() -> usize {
    ENTRIES.with(|e| e.borrow().len())
}

/// Forgets the entries not yet run.
pub fn clear_entries() {
    ENTRIES.with(|e| e.borrow_mut().clear());
}

/// Enters the vCPU `frame`: runs the next queued entry on it, which
/// returns as the partition's next trap would.
///
/// # Safety
///
/// As the real one: `frame` is a complete vCPU frame the caller holds.
pub unsafe fn enter_nested(frame: *mut Vcpu, _save: *mut NestedSave) {
    // Taken out before it runs: an entry may enter a partition itself.
    let entry = ENTRIES.with(|e| e.borrow_mut().pop_front());
    let entry = entry.expect("the core entered a partition the test queued nothing for");
    // SAFETY: per the contract, the frame is the caller's vCPU; nothing
    // else touches it while the partition "runs".
    run_until_left(|| entry(unsafe { &mut *frame }));
}

/// Leaves the nested run: back to the `enter_nested` that started it (the
/// trap entry's way out of a partition, see [`run_until_left`]).
///
/// # Safety
///
/// As the real one: called inside a run `enter_nested` started.
pub unsafe fn leave_nested(_save: *mut NestedSave) -> ! {
    leave_run()
}

/// The partition layer's system registers, reached as `sysreg::…`.
pub mod partition_sysreg {
    use super::{PartitionOp, VTTBR, record_partition};
    use crate::arch::sysreg::{counter, with_regs};
    use moat_kernel::el2config::{CpuFeatures, FineGrainedTraps};
    use moat_kernel::sysregs::SysRegs;
    use std::cell::{Cell, RefCell};
    use std::sync::atomic::AtomicU64;

    /// Words of an [`El1Context`], as the real one's.
    pub const EL1_REGS: usize = 24;
    /// Where SP_EL1 is in an [`El1Context`], as the real one's.
    pub const SP_EL1_WORD: usize = 12;
    const CNTV_CTL_WORD: usize = 22;

    thread_local! {
        /// The EL1 registers of the test thread's CPU.
        static EL1: RefCell<[u64; EL1_REGS]> = const { RefCell::new([0; EL1_REGS]) };
        /// The EL2 controls last switched to: HCR, CPTR, MDCR, CNTHCTL.
        static EL2: Cell<[u64; 4]> = const { Cell::new([0; 4]) };
        static WATCHDOG: Cell<Option<u64>> = const { Cell::new(None) };
        static FIRED: Cell<bool> = const { Cell::new(false) };
        static SVCR: Cell<u64> = const { Cell::new(0) };
        static CSSELR: Cell<u64> = const { Cell::new(0) };
    }

    /// The EL1 registers of the test thread's CPU.
    pub fn el1_registers() -> [u64; EL1_REGS] {
        EL1.with(|r| *r.borrow())
    }

    /// Sets one EL1 register of the test thread's CPU (as a partition
    /// running on it would).
    pub fn set_el1_register(word: usize, value: u64) {
        EL1.with(|r| r.borrow_mut()[word] = value);
    }

    /// The EL2 controls in force: HCR, CPTR, MDCR, CNTHCTL, VTTBR.
    pub fn el2_controls() -> [u64; 5] {
        let [h, c, m, t] = EL2.get();
        [h, c, m, t, VTTBR.get()]
    }

    /// Makes the watchdog the next run arms have fired when it is disarmed.
    pub fn fire_watchdog() {
        FIRED.set(true);
    }

    /// Sets SVCR as the host would leave it (SM in bit 0, ZA in bit 1).
    pub fn set_streaming_state(value: u64) {
        SVCR.set(value);
    }

    /// A CPU's EL1 registers, as the real one's: saved from and loaded
    /// into the test thread's CPU.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct El1Context {
        regs: [u64; EL1_REGS],
    }

    impl El1Context {
        pub const ZERO: Self = Self {
            regs: [0; EL1_REGS],
        };

        pub const fn reset() -> Self {
            let mut c = Self::ZERO;
            c.regs[0] = moat_kernel::el2config::SCTLR_EL1_RESET;
            c
        }

        pub fn save(&mut self) {
            self.regs = el1_registers();
        }

        /// # Safety
        ///
        /// As the real one's (nothing to uphold on the host).
        pub unsafe fn load(&self) {
            EL1.with(|r| *r.borrow_mut() = self.regs);
        }

        pub fn save_sp_el1(&mut self) {
            self.regs[SP_EL1_WORD] = el1_registers()[SP_EL1_WORD];
        }

        pub fn virtual_timer(&self) -> (u64, u64) {
            (self.regs[CNTV_CTL_WORD], self.regs[CNTV_CTL_WORD + 1])
        }

        /// One word, for a test's checks.
        pub fn word(&self, i: usize) -> u64 {
            self.regs[i]
        }
    }

    /// The host's EL2 controls (what `HostEl2Config` reads through
    /// `Deref` in the real layer): distinct values, so a test sees the
    /// host's come back after a run.
    pub struct HostControls {
        pub hcr: AtomicU64,
        pub hcrx: u64,
        pub cptr: u64,
        pub mdcr: u64,
        pub cnthctl: u64,
        pub fgt: FineGrainedTraps,
    }

    pub const HOST_HCR: u64 = 0x8000_0000;
    pub const HOST_CPTR: u64 = 0x33ff;

    pub static HOST_CONTROLS: HostControls = HostControls {
        hcr: AtomicU64::new(HOST_HCR),
        hcrx: 0,
        cptr: HOST_CPTR,
        mdcr: 0x6,
        cnthctl: 0x3,
        fgt: FineGrainedTraps {
            hfgrtr: 0,
            hfgwtr: 0,
            hfgitr: 0,
            hdfgrtr: 0,
            hdfgwtr: 0,
        },
    };

    impl core::ops::Deref for super::sysreg::HostEl2Config {
        type Target = HostControls;

        fn deref(&self) -> &HostControls {
            &HOST_CONTROLS
        }
    }

    pub fn esr_el2() -> u64 {
        with_regs(|r| r.esr_el2())
    }

    pub fn far_el2() -> u64 {
        with_regs(|r| r.far_el2())
    }

    pub fn fault_ipa() -> u64 {
        with_regs(|r| r.fault_ipa())
    }

    pub fn read_id_register(crm: u8, op2: u8) -> Option<u64> {
        with_regs(|r| r.read_id_register(crm, op2))
    }

    /// The counter, one tick further (see `counter`).
    pub fn now() -> u64 {
        counter().0
    }

    pub fn arm_watchdog(deadline: u64) {
        WATCHDOG.set(Some(deadline));
        record_partition(PartitionOp::ArmWatchdog(deadline));
    }

    /// Whether the watchdog fired: only when a test said so
    /// ([`fire_watchdog`]), once.
    pub fn disarm_watchdog() -> bool {
        WATCHDOG.set(None);
        FIRED.replace(false)
    }

    /// # Safety
    ///
    /// As the real one's (nothing to uphold on the host).
    pub unsafe fn switch_el2(hcr: u64, cptr: u64, mdcr: u64, cnthctl: u64, vttbr: u64) {
        EL2.set([hcr, cptr, mdcr, cnthctl]);
        VTTBR.set(vttbr);
        record_partition(PartitionOp::SwitchEl2 { hcr, vttbr });
    }

    /// # Safety
    ///
    /// As the real one's (nothing to uphold on the host).
    pub unsafe fn switch_feature_controls(_cpu: &CpuFeatures, _hcrx: u64, _fgt: &FineGrainedTraps) {
    }

    pub fn streaming_state(_cpu: &CpuFeatures) -> u64 {
        SVCR.get()
    }

    /// The host tests' CPU has no MTE.
    pub fn mte_level() -> u32 {
        0
    }

    pub fn set_vmpidr(value: u64) {
        record_partition(PartitionOp::SetVmpidr(value));
    }

    pub fn read_csselr() -> arm_sysregs::CsselrEl1 {
        arm_sysregs::CsselrEl1::from_bits_retain(CSSELR.get())
    }

    pub fn write_csselr(value: arm_sysregs::CsselrEl1) {
        CSSELR.set(value.bits());
    }

    /// The host's debug, PMU and trace controls: the host tests' CPU has
    /// none to park.
    pub struct ParkedHostMonitors;

    impl ParkedHostMonitors {
        /// # Safety
        ///
        /// As the real one's (nothing to uphold on the host).
        pub unsafe fn park(_cpu: &CpuFeatures, _pmu_sees_all: bool) -> Self {
            Self
        }

        pub fn restore(self) {}
    }

    /// The MTE registers: never switched on the host (no VM there has MTE).
    #[derive(Clone, Copy, Debug, Default)]
    pub struct MteRegs {
        _gcr: u64,
        _rgsr: u64,
        _tfsr: u64,
        _tfsre0: u64,
    }

    impl MteRegs {
        pub fn save(&mut self) {
            unreachable!("the host tests' CPU has no MTE");
        }

        pub fn load(&self) {
            unreachable!("the host tests' CPU has no MTE");
        }
    }
}

/// The partition layer's part of the GIC's CPU interface: a host test's
/// CPUs have no GIC access (`PerCpu::gic_access` is `None`), so these are
/// never reached.
pub mod partition_gic {
    use super::gic::GicAccess;
    use moat_kernel::el2config::RunMask;

    /// As the real one's: the host interrupts held back during a call.
    #[derive(Debug, Default)]
    pub struct HeldBack {
        _intids: Vec<u32>,
    }

    /// As the real one's: the host's CPU-interface state around a run.
    #[derive(Clone, Copy, Debug, Default)]
    pub struct SavedCpuInterface {
        _a: u64,
        _b: u64,
    }

    pub fn open_watchdog(_access: &GicAccess, _mask: RunMask) -> SavedCpuInterface {
        unreachable!("a host test's CPU has no GIC access");
    }

    pub fn close_watchdog(_access: &GicAccess, _saved: SavedCpuInterface) {
        unreachable!("a host test's CPU has no GIC access");
    }

    pub fn hold_back(_access: &GicAccess, _held: &mut HeldBack) -> bool {
        unreachable!("a host test's CPU has no GIC access");
    }

    pub fn release(_access: &GicAccess, _held: &HeldBack) {
        unreachable!("a host test's CPU has no GIC access");
    }

    pub fn mask_all(_access: &GicAccess) {
        unreachable!("a host test's CPU has no GIC access");
    }
}

/// The partition layer's TLB maintenance, reached as `tlb::…`.
pub mod partition_tlb {
    use super::{PartitionOp, loaded_vmid, record_partition};

    pub fn invalidate_local_vmid() {
        record_partition(PartitionOp::InvalidateLocalVmid {
            vmid: loaded_vmid(),
        });
    }
}

/// The FP/SIMD and SVE registers a VM run switches: the test thread's
/// CPU's, so a test sees the host's come back.
pub mod fpsimd {
    use std::cell::RefCell;

    thread_local! {
        static CPU: RefCell<FpState> = const { RefCell::new(FpState::ZERO) };
    }

    /// The FP/SIMD registers, as the real one's.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct FpState {
        pub q: [u128; 32],
        pub fpsr: u64,
        pub fpcr: u64,
    }

    impl FpState {
        pub const ZERO: Self = Self {
            q: [0; 32],
            fpsr: 0,
            fpcr: 0,
        };

        pub fn save(&mut self) {
            *self = cpu_registers();
        }

        pub fn load(&self) {
            CPU.with(|c| *c.borrow_mut() = *self);
        }

        pub fn save_control(&mut self) {
            let c = cpu_registers();
            (self.fpsr, self.fpcr) = (c.fpsr, c.fpcr);
        }

        pub fn load_control(&self) {
            CPU.with(|c| {
                let mut c = c.borrow_mut();
                (c.fpsr, c.fpcr) = (self.fpsr, self.fpcr);
            });
        }
    }

    /// The test thread's CPU's FP/SIMD registers.
    pub fn cpu_registers() -> FpState {
        CPU.with(|c| *c.borrow())
    }

    /// Sets them (as a partition running on the CPU would).
    pub fn set_cpu_registers(state: FpState) {
        CPU.with(|c| *c.borrow_mut() = state);
    }

    /// The host tests' CPU has no SVE (`CpuFeatures::sve` is false), so
    /// these are never reached.
    pub fn sve_vector_bytes() -> u64 {
        unreachable!("the host tests' CPU has no SVE");
    }

    /// # Safety
    ///
    /// Never called (see above).
    pub unsafe fn save_z(_area: &mut [u8]) {
        unreachable!("the host tests' CPU has no SVE");
    }

    /// # Safety
    ///
    /// Never called (see above).
    pub unsafe fn load_z(_area: &[u8]) {
        unreachable!("the host tests' CPU has no SVE");
    }
}

// ---------------------------------------------------------------------
// Device registers: the ITS, redistributor and distributor frames that
// `device::its` emulates for the host, and the SMMU that `memory::smmu`
// drives. A test attaches a model of each device at the address of its
// frame; every register access the code makes goes to the model there.
// ---------------------------------------------------------------------

pub mod mmio {
    use moat_kernel::its::{COMMAND_BYTES, PAGE, gits};
    use moat_kernel::smmu::{
        self, CMD_BYTES, CR0_CMDQEN, GBPA_UPDATE, GERROR_CMDQ_ERR, QueueIndex,
    };
    use std::any::Any;
    use std::collections::BTreeMap;
    use std::sync::{Mutex, MutexGuard};

    /// A device model: what a register read returns and what a write does.
    pub trait Device: Any + Send {
        fn read(&mut self, offset: u64, bytes: u64) -> u64;
        fn write(&mut self, offset: u64, bytes: u64, value: u64);
    }

    struct Attached {
        base: u64,
        size: u64,
        device: Box<dyn Device>,
    }

    /// Shared by the test threads: each test attaches its devices at
    /// addresses of its own.
    static DEVICES: Mutex<Vec<Attached>> = Mutex::new(Vec::new());

    fn devices() -> MutexGuard<'static, Vec<Attached>> {
        DEVICES.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts `device` behind `[base, base + size)`.
    pub fn attach(base: u64, size: u64, device: impl Device) {
        let mut all = devices();
        assert!(
            all.iter()
                .all(|a| a.base + a.size <= base || base + size <= a.base),
            "a device is already attached in {base:#x}+{size:#x}"
        );
        all.push(Attached {
            base,
            size,
            device: Box::new(device),
        });
    }

    /// Takes away the device attached at `base`.
    pub fn detach(base: u64) {
        devices().retain(|a| a.base != base);
    }

    /// Runs `f` on the model attached at `base`, a `D`.
    pub fn with<D: Device, R>(base: u64, f: impl FnOnce(&mut D) -> R) -> R {
        let mut all = devices();
        let attached = all
            .iter_mut()
            .find(|a| a.base == base)
            .unwrap_or_else(|| panic!("no device attached at {base:#x}"));
        let any: &mut dyn Any = &mut *attached.device;
        f(any.downcast_mut::<D>().expect("a device of another kind"))
    }

    fn access<R>(addr: u64, bytes: u64, f: impl FnOnce(&mut dyn Device, u64) -> R) -> R {
        assert!(
            addr.is_multiple_of(bytes),
            "an unaligned register access at {addr:#x}"
        );
        let mut all = devices();
        let attached = all
            .iter_mut()
            .find(|a| a.base <= addr && addr + bytes <= a.base + a.size)
            .unwrap_or_else(|| panic!("a register access at {addr:#x}, where no device is"));
        let offset = addr - attached.base;
        f(&mut *attached.device, offset)
    }

    /// # Safety
    ///
    /// None needed on the host: the access goes to a model.
    pub unsafe fn read32(addr: u64) -> u32 {
        access(addr, 4, |d, offset| d.read(offset, 4)) as u32
    }

    /// # Safety
    ///
    /// As [`read32`].
    pub unsafe fn read64(addr: u64) -> u64 {
        access(addr, 8, |d, offset| d.read(offset, 8))
    }

    /// # Safety
    ///
    /// As [`read32`].
    pub unsafe fn write32(addr: u64, value: u32) {
        access(addr, 4, |d, offset| d.write(offset, 4, u64::from(value)));
    }

    /// # Safety
    ///
    /// As [`read32`].
    pub unsafe fn write64(addr: u64, value: u64) {
        access(addr, 8, |d, offset| d.write(offset, 8, value));
    }

    /// Registers as plain storage, 64 bits at a time: what was written
    /// reads back, a register never written reads 0.
    #[derive(Clone, Debug, Default)]
    pub struct Registers {
        words: BTreeMap<u64, u64>,
    }

    impl Registers {
        /// The 64 bits at `offset` (8-byte aligned).
        pub fn get(&self, offset: u64) -> u64 {
            self.words.get(&offset).copied().unwrap_or(0)
        }

        pub fn set(&mut self, offset: u64, value: u64) {
            self.words.insert(offset, value);
        }

        fn lane(offset: u64, bytes: u64) -> (u64, u32, u64) {
            let shift = 8 * (offset & 7) as u32;
            let mask = if bytes == 8 {
                u64::MAX
            } else {
                ((1u64 << (8 * bytes)) - 1) << shift
            };
            (offset & !7, shift, mask)
        }

        pub fn read(&self, offset: u64, bytes: u64) -> u64 {
            let (word, shift, mask) = Self::lane(offset, bytes);
            (self.get(word) & mask) >> shift
        }

        pub fn write(&mut self, offset: u64, bytes: u64, value: u64) {
            let (word, shift, mask) = Self::lane(offset, bytes);
            let old = self.get(word);
            self.set(word, (old & !mask) | ((value << shift) & mask));
        }
    }

    /// A frame with no behaviour of its own: a GIC distributor or
    /// redistributor, as far as the ITS emulation uses them.
    impl Device for Registers {
        fn read(&mut self, offset: u64, bytes: u64) -> u64 {
            Registers::read(self, offset, bytes)
        }

        fn write(&mut self, offset: u64, bytes: u64, value: u64) {
            Registers::write(self, offset, bytes, value);
        }
    }

    fn read_memory(at: u64) -> u64 {
        // SAFETY: the queues the models read are memory the code under
        // test allocated and gave the device (the core's heap), alive for
        // the test; a read of eight aligned bytes.
        unsafe { core::ptr::with_exposed_provenance::<u64>(at as usize).read_volatile() }
    }

    /// A GICv3 ITS's control frame: GITS_CTLR's Enabled with Quiescent
    /// whenever it is off, GITS_TYPER and the GITS_BASERn types and
    /// entry sizes read-only, and a command queue that it runs from
    /// GITS_CREADR to GITS_CWRITER while enabled, keeping each command
    /// it took.
    #[derive(Debug, Default)]
    pub struct FakeIts {
        pub regs: Registers,
        /// Every command the ITS took from its queue, in order.
        pub commands: Vec<[u64; 4]>,
        /// The ITS stops taking commands and says so (GITS_CREADR.Stalled).
        pub stall: bool,
        /// Page sizes other than 4 KiB are not implemented: GITS_BASERn
        /// reads back 4 KiB whatever was written.
        pub only_4k_pages: bool,
    }

    /// GITS_BASERn's read-only fields: Type and Entry_Size.
    pub const BASER_READ_ONLY: u64 = (0x7 << 56) | (0x1f << 48);

    impl FakeIts {
        /// An ITS whose GITS_TYPER is `typer` and whose GITS_BASERn have
        /// the type and entry size of `basers` (the rest ignored).
        pub fn new(typer: u64, basers: [u64; gits::BASERS as usize]) -> Self {
            let mut its = Self::default();
            its.regs.set(gits::TYPER, typer);
            for (n, b) in basers.iter().enumerate() {
                its.regs
                    .set(gits::BASER0 + 8 * n as u64, b & BASER_READ_ONLY);
            }
            its
        }

        fn run_queue(&mut self) {
            let enabled = self.regs.get(gits::CTLR) & u64::from(gits::CTLR_ENABLED) != 0;
            let cbaser = self.regs.get(gits::CBASER);
            if !enabled || cbaser & (1 << 63) == 0 {
                return;
            }
            let mut read = self.regs.get(gits::CREADR) & 0xf_ffe0;
            if self.stall {
                self.regs.set(gits::CREADR, read | 1);
                return;
            }
            let queue = cbaser & 0x000f_ffff_ffff_f000;
            let size = ((cbaser & 0xff) + 1) * PAGE;
            let write = self.regs.get(gits::CWRITER) & 0xf_ffe0;
            while read != write {
                let at = queue + read;
                self.commands
                    .push([0, 1, 2, 3].map(|i| read_memory(at + 8 * i)));
                read = (read + COMMAND_BYTES) % size;
            }
            self.regs.set(gits::CREADR, read);
        }
    }

    impl Device for FakeIts {
        fn read(&mut self, offset: u64, bytes: u64) -> u64 {
            if offset == gits::CTLR {
                let ctlr = self.regs.get(gits::CTLR) & u64::from(gits::CTLR_ENABLED);
                let quiet = if ctlr == 0 {
                    u64::from(gits::CTLR_QUIESCENT)
                } else {
                    0
                };
                return ctlr | quiet;
            }
            self.regs.read(offset, bytes)
        }

        fn write(&mut self, offset: u64, bytes: u64, value: u64) {
            let reg = offset & !7;
            match reg {
                gits::CTLR => {
                    self.regs
                        .write(gits::CTLR, 4, value & u64::from(gits::CTLR_ENABLED));
                    self.run_queue();
                }
                gits::TYPER | gits::CREADR => {}
                gits::CWRITER => {
                    self.regs.write(offset, bytes, value);
                    self.run_queue();
                }
                r if (gits::BASER0..gits::BASER0 + 8 * gits::BASERS).contains(&r) => {
                    let old = self.regs.get(r);
                    self.regs.write(offset, bytes, value);
                    let mut new = (self.regs.get(r) & !BASER_READ_ONLY) | (old & BASER_READ_ONLY);
                    if self.only_4k_pages {
                        new &= !(0x3 << 8);
                    }
                    self.regs.set(r, new);
                }
                _ => self.regs.write(offset, bytes, value),
            }
        }
    }

    /// An SMMUv3's two register pages: CR0 and IRQ_CTRL acknowledged at
    /// once (unless `deaf`), GBPA's updates done at once, and a command
    /// queue it consumes from CMDQ_CONS to CMDQ_PROD as soon as CMDQ_PROD
    /// moves (unless `hold`), keeping each command; a CMD_SYNC is done
    /// when consumed (the core polls CMDQ_CONS for it). A command whose
    /// opcode is `refuse` stops the queue with CERROR_ILL in CMDQ_CONS
    /// and GERROR.CMDQ_ERR toggled, as the architecture has it.
    #[derive(Debug, Default)]
    pub struct FakeSmmu {
        pub regs: Registers,
        /// Every command consumed, in order.
        pub commands: Vec<[u64; 2]>,
        pub deaf: bool,
        pub hold: bool,
        pub refuse: Option<u8>,
    }

    impl FakeSmmu {
        /// An SMMU with these ID registers.
        pub fn new(idr0: u32, idr1: u32, idr3: u32, idr5: u32) -> Self {
            let mut s = Self::default();
            for (offset, v) in [
                (smmu::reg::IDR0, idr0),
                (smmu::reg::IDR1, idr1),
                (smmu::reg::IDR3, idr3),
                (smmu::reg::IDR5, idr5),
            ] {
                s.regs.write(offset as u64, 4, u64::from(v));
            }
            s
        }

        pub fn reg32(&self, offset: usize) -> u32 {
            self.regs.read(offset as u64, 4) as u32
        }

        pub fn set_reg32(&mut self, offset: usize, value: u32) {
            self.regs.write(offset as u64, 4, u64::from(value));
        }

        /// Consumes what the core queued, if the queue is on.
        pub fn consume(&mut self) {
            if self.hold || self.reg32(smmu::reg::CR0ACK) & CR0_CMDQEN == 0 {
                return;
            }
            let base = self.regs.get(smmu::reg::CMDQ_BASE as u64);
            let q = QueueIndex {
                log2: (base & 0x1f) as u32,
            };
            let queue = base & 0x000f_ffff_ffff_ffe0;
            let prod = self.reg32(smmu::reg::CMDQ_PROD);
            let mut cons = self.reg32(smmu::reg::CMDQ_CONS);
            while !q.same(cons, prod) {
                let at = queue + (q.slot(cons) * CMD_BYTES) as u64;
                let command = [read_memory(at), read_memory(at + 8)];
                if Some(command[0] as u8) == self.refuse {
                    let gerror = self.reg32(smmu::reg::GERROR) ^ GERROR_CMDQ_ERR;
                    self.set_reg32(smmu::reg::GERROR, gerror);
                    // CERROR_ILL.
                    cons = (cons & !(0x7f << smmu::CMDQ_CONS_ERR_SHIFT))
                        | (1 << smmu::CMDQ_CONS_ERR_SHIFT);
                    break;
                }
                self.commands.push(command);
                cons = q.next(cons);
            }
            self.set_reg32(smmu::reg::CMDQ_CONS, cons);
        }
    }

    impl Device for FakeSmmu {
        fn read(&mut self, offset: u64, bytes: u64) -> u64 {
            self.regs.read(offset, bytes)
        }

        fn write(&mut self, offset: u64, bytes: u64, value: u64) {
            let value32 = value as u32;
            match offset as usize {
                smmu::reg::IDR0
                | smmu::reg::IDR1
                | smmu::reg::IDR3
                | smmu::reg::IDR5
                | smmu::reg::CR0ACK
                | smmu::reg::IRQ_CTRLACK => {}
                smmu::reg::CR0 => {
                    self.set_reg32(smmu::reg::CR0, value32);
                    if !self.deaf {
                        self.set_reg32(smmu::reg::CR0ACK, value32);
                    }
                }
                smmu::reg::IRQ_CTRL => {
                    self.set_reg32(smmu::reg::IRQ_CTRL, value32);
                    self.set_reg32(smmu::reg::IRQ_CTRLACK, value32);
                }
                smmu::reg::GBPA => self.set_reg32(smmu::reg::GBPA, value32 & !GBPA_UPDATE),
                smmu::reg::CMDQ_PROD => {
                    self.set_reg32(smmu::reg::CMDQ_PROD, value32);
                    self.consume();
                }
                _ => self.regs.write(offset, bytes, value),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The dispatch layer (`dispatch::trap`, `dispatch::hvc`): a partition's trap
// may go through the core's trap entry, as the vectors take it, and leave
// the nested run from there; firmware's entry point for the CPUs it starts.
// ---------------------------------------------------------------------------

/// What unwinds a nested run from `leave_nested` to its `enter_nested`.
struct LeftNested;

/// Runs a queued entry; a `leave_nested` inside it (a trap the entry
/// hands to the core's trap entry) ends the run there, as the vectors'
/// return to `enter_nested`'s caller does. Any other panic goes on.
fn run_until_left(entry: impl FnOnce()) {
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(entry))
        && !payload.is::<LeftNested>()
    {
        std::panic::resume_unwind(payload);
    }
}

fn leave_run() -> ! {
    // `resume_unwind`: no panic message, it is no failure.
    std::panic::resume_unwind(Box::new(LeftNested))
}

/// Where firmware would start a CPU for the core.
pub fn secondary_entry() -> u64 {
    0x4000_2000
}
