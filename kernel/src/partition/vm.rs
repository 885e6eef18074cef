//! Protected VMs: partitions the host creates, gives memory to and runs, but
//! can never look into.
//!
//! A VM is a slot of [`SLOTS`]: a stage-2 of its own with a VMID of its own,
//! its vCPUs (each with registers, EL1 system registers, FP/SIMD state and
//! virtual CPU interface of its own), and the record of where the frames
//! the host donated sit in its IPA space. Its memory
//! arrives only through ledger transactions ([`crate::memory`]); the host
//! loads an image into it only before it first runs, from pages the host
//! shared with the hypervisor for the purpose.
//!
//! `VCPU_RUN` is a nested partition run, like a service call: the core
//! switches the CPU to the VM, enters it, and handles its traps until one of
//! them is something only the host can answer; that becomes a typed exit
//! record in the host's registers, as a KVM run loop returns to its VMM.
//!
//! The vCPUs of one VM run in parallel, each on one physical CPU at a time:
//! a run loads its vCPU (`moat_kernel::vcpuload`) under the VM's slot lock,
//! lets the lock go, and takes it again only for VM-wide work (a guest
//! share, a PSCI power call) and to put the vCPU back. The slot's status
//! says whether the VM may run; the count of loaded vCPUs says whether it
//! runs, and the calls that need the VM idle (donate, load, destroy) are
//! `Busy` while any vCPU of it runs.
//!
//! ```text
//!   Free ──create──▶ Alive ◀──vcpu_run / exit──▶ (n vCPUs running)
//!                      │  ╲                  │ SYSTEM_OFF / crash
//!                      │   ╲                 ▼
//!                   destroy  ╲────────────▶ Off
//!                      ▼                     │ destroy
//!                    Dying ◀─────────────────┘
//!                      │ reclaim of its last page
//!                      ▼
//!                    Free
//! ```

use crate::arch::enter_nested;
use crate::arch::fpsimd::{self, FpState};
use crate::arch::sysreg::{self, El1Context, MteRegs};
use crate::base::cpu::{LOWER_FIQ, LOWER_IRQ, LOWER_SYNC, MAX_CPUS, PerCpu, Vcpu};
use crate::base::heap::try_box;
use crate::base::state::machine;
use crate::device::vgic::{self, VgicCpu};
use crate::memory::stage2::{self, StageTwo};
use crate::memory::{self, MEMORY, PAGE, Region, VmMemory};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use moat_abi::Error;
use moat_abi::services::{FrameRange, LedgerRequest, Party};
use moat_abi::trap::{PARTITION_VM_BASE, TrapClass};
use moat_abi::vm::{
    self as abi, Exit, ExitReason, Injection, MAX_VMS, MmioAccess, MmioAnswer, VmFlags, pkvm,
};
use moat_abi::{hypercall, smccc};
use moat_kernel::el2config::{self, RunMask};
use moat_kernel::esr::{self, Trap};
use moat_kernel::lockorder::Rank;
use moat_kernel::ranges::page_span;
use moat_kernel::regs::GuestRegs;
use moat_kernel::vcpuload::{LoadError, Loads};
use moat_kernel::vmfeatures;

/// A VM's vCPU kind: `VCPU_VM_BASE + handle`.
pub const VCPU_VM_BASE: u64 = 0x100;
/// What a VM's vCPU reads in MPIDR_EL1: bit 31 (RES1), with Aff0 = the
/// vCPU's index.
const VCPU_MPIDR: u64 = 1 << 31;
/// VMIDs of VMs: `VMID_BASE + slot` (services use 1..=16).
const VMID_BASE: u16 = 0x40;
/// Most bytes one `VM_LOAD` copies.
const MAX_LOAD: u64 = 64 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Status {
    Free = 0,
    Alive = 1,
    Off = 3,
    Dying = 4,
}

impl Status {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Alive,
            3 => Self::Off,
            4 => Self::Dying,
            _ => Self::Free,
        }
    }
}

/// The host's vector state while a VM runs: on a CPU with SVE its whole Z
/// registers (which hold the V registers) and FPSR/FPCR, otherwise its V
/// registers and FPSR/FPCR. Kept with each vCPU (the vCPUs of a VM run on
/// several CPUs at once), so a run allocates nothing.
struct HostVectors {
    fp: FpState,
    sve: Option<SveSave>,
}

impl HostVectors {
    /// `None`: no memory for the SVE save area.
    fn new() -> Option<Self> {
        Some(Self {
            fp: FpState::ZERO,
            sve: SveSave::new()?,
        })
    }

    /// Whether the host's vector state can be saved here now.
    fn fits(&self) -> bool {
        self.sve.as_ref().is_none_or(SveSave::fits)
    }

    /// Saves the host's vectors; the host's CPTR_EL2 is in effect.
    fn save(&mut self) {
        match self.sve.as_mut() {
            Some(z) => {
                z.save();
                self.fp.save_control();
            }
            None => self.fp.save(),
        }
    }

    /// Loads the host's vectors back, right after `switch_el2` returned the
    /// CPU to the host's controls.
    fn load(&self) {
        match self.sve.as_ref() {
            Some(z) => {
                // `fpsimd::load_z` puts the host's CPTR_EL2, which lets SVE
                // through, in effect (an ISB) before its first SVE load.
                z.load();
                self.fp.load_control();
            }
            None => self.fp.load(),
        }
    }
}

/// The largest SVE vector length (bytes) of any CPU brought up so far, as
/// `sysreg::vector_lengths` read it with ZCR_EL2.LEN all ones.
static MAX_SVE_BYTES: AtomicU64 = AtomicU64::new(0);
/// The same for SME's streaming vector length, for the log: no save area
/// holds streaming state (`run` refuses a host in streaming mode).
static MAX_SVL_BYTES: AtomicU64 = AtomicU64::new(0);

/// Notes the vector lengths a CPU reported at bring-up.
pub fn record_vector_lengths(sve: u64, sme: u64) {
    let old_sve = MAX_SVE_BYTES.fetch_max(sve, Ordering::Relaxed);
    let old_sme = MAX_SVL_BYTES.fetch_max(sme, Ordering::Relaxed);
    if sve > old_sve || sme > old_sme {
        crate::log!("vector lengths: SVE {sve} bytes, SME streaming {sme} bytes");
    }
}

/// The host's SVE vector registers, at the full vector length, while a VM
/// runs: the VM's FP/SIMD instructions write the low 128 bits of each Z
/// register and zero the rest, which would otherwise be lost to the host.
/// (The predicate registers and FFR are out of the VM's reach: SVE traps.)
/// Never used in streaming mode: `VCPU_RUN` refuses a host in it.
struct SveSave {
    z: Box<[u8]>,
}

impl SveSave {
    /// A save area for the largest vector length the hardware allows, if
    /// the CPU has SVE (`Some(None)`: no SVE); never the length in force
    /// when the host asks (a host in streaming mode would report SME's).
    /// `None`: no memory for it (a VM_CREATE on an exhausted heap fails
    /// with `NoMemory`, it does not panic).
    fn new() -> Option<Option<Self>> {
        if !machine().cpu.sve {
            return Some(None);
        }
        let bytes = 32 * MAX_SVE_BYTES.load(Ordering::Relaxed) as usize;
        let mut z = Vec::new();
        z.try_reserve_exact(bytes).ok()?;
        z.resize(bytes, 0u8);
        Some(Some(Self {
            z: z.into_boxed_slice(),
        }))
    }

    /// Whether Z0..Z31 at the vector length in force now fit the area.
    fn fits(&self) -> bool {
        fpsimd::sve_vector_bytes()
            .checked_mul(32)
            .is_some_and(|b| b <= self.z.len() as u64)
    }

    fn save(&mut self) {
        // SAFETY: `run` checked that Z0..Z31 at the EL2 vector length fit
        // the area (`fits`) with PSTATE.SM clear; it runs under the host's
        // CPTR_EL2, which does not trap SVE.
        unsafe { fpsimd::save_z(&mut self.z) };
    }

    fn load(&self) {
        // SAFETY: the inverse of `save`, under the host's CPTR_EL2 again.
        unsafe { fpsimd::load_z(&self.z) };
    }
}

/// What the previous exit left for the host to answer.
#[derive(Clone, Copy, Debug)]
enum Pending {
    None,
    /// The host's r0..r3 become the guest's x0..x3.
    Hvc,
    /// An MMIO access (the guest's PC already past it, its virtual
    /// address in `mmio_far`): a read's r0 is the loaded value; r1 may ask
    /// for an abort instead (`MmioAnswer`).
    Mmio(esr::MmioAccess),
}

struct Vm {
    handle: u16,
    /// MTE on for this VM, as the policy decided.
    mte: bool,
    stage2: Box<StageTwo>,
    regions: Vec<Region>,
    has_run: bool,
    /// Each vCPU's run state; a run touches only the one it loaded.
    /// Filled at creation and never resized, so a run's reference to its
    /// record stays valid while it runs without the slot lock.
    vcpus: Vec<VcpuCell>,
    /// Which vCPUs are loaded on which CPUs.
    loads: Loads<{ abi::MAX_VCPUS as usize }, MAX_CPUS>,
    /// Each vCPU's PSCI power state.
    power: Vec<Power>,
}

/// One vCPU's run state: everything a run of it owns alone.
struct VcpuState {
    vcpu: Box<Vcpu>,
    el1: El1Context,
    csselr: arm_sysregs::CsselrEl1,
    fp: Box<FpState>,
    /// The host's vector state during a run of this vCPU.
    host_vectors: Box<HostVectors>,
    mte_regs: MteRegs,
    pending: Pending,
    /// With `Pending::Mmio`: the virtual address the guest accessed, for
    /// an abort (kept apart so that `Pending` stays one word).
    mmio_far: u64,
    /// The virtual CPU interface, for a VM created with `VmFlags::VGIC`.
    vgic: Option<Box<VgicCpu>>,
}

impl VcpuState {
    /// A vCPU as created: `regs` its registers if given, everything else
    /// reset.
    fn new(handle: u16, regs: Option<GuestRegs>, vgic: bool) -> Result<Self, Error> {
        let mut vcpu =
            try_box(Vcpu::new(VCPU_VM_BASE + u64::from(handle), 0)).ok_or(Error::NoMemory)?;
        if let Some(regs) = regs {
            vcpu.regs = regs;
        }
        let host_vectors =
            try_box(HostVectors::new().ok_or(Error::NoMemory)?).ok_or(Error::NoMemory)?;
        let vgic = if vgic {
            Some(try_box(VgicCpu::new(vgic::geometry())).ok_or(Error::NoMemory)?)
        } else {
            None
        };
        Ok(Self {
            vcpu,
            el1: El1Context::reset(),
            csselr: arm_sysregs::CsselrEl1::empty(),
            fp: try_box(FpState::ZERO).ok_or(Error::NoMemory)?,
            host_vectors,
            mte_regs: MteRegs::default(),
            pending: Pending::None,
            mmio_far: 0,
            vgic,
        })
    }
}

/// A vCPU's record. Its state is touched only by the run that loaded the
/// vCPU (`Vm::loads`, under the slot lock), from the load until the put:
/// that is what makes the shared reference of the record enough.
struct VcpuCell(UnsafeCell<VcpuState>);

/// A vCPU's PSCI power state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Power {
    On,
    Off,
    /// Started by CPU_ON; it enters at `entry` with x0 = `context` on its
    /// next run.
    Starting {
        entry: u64,
        context: u64,
    },
}

struct Slot {
    status: AtomicU8,
    vm: spin::Mutex<Option<Vm>>,
}

static SLOTS: [Slot; MAX_VMS] = [const {
    Slot {
        status: AtomicU8::new(Status::Free as u8),
        vm: spin::Mutex::new(None),
    }
}; MAX_VMS];

impl Slot {
    fn status(&self) -> Status {
        Status::from_u8(self.status.load(Ordering::Acquire))
    }

    fn set(&self, s: Status) {
        self.status.store(s as u8, Ordering::Release);
    }
}

fn slot_of(handle: u64) -> Result<(&'static Slot, u16), Error> {
    let h = u16::try_from(handle).map_err(|_| Error::InvalidParameters)?;
    let slot = usize::from(h)
        .checked_sub(1)
        .and_then(|i| SLOTS.get(i))
        .ok_or(Error::InvalidParameters)?;
    if slot.status() == Status::Free {
        return Err(Error::InvalidParameters);
    }
    Ok((slot, h))
}

/// Bytes of `pages` pages, refusing zero and overflow.
fn pages_bytes(pages: u64) -> Result<u64, Error> {
    if pages == 0 {
        return Err(Error::InvalidParameters);
    }
    pages.checked_mul(PAGE).ok_or(Error::InvalidParameters)
}

/// Checks a page-aligned, non-empty, non-overflowing byte range.
fn checked_range(base: u64, pages: u64) -> Result<u64, Error> {
    let size = pages_bytes(pages)?;
    if !base.is_multiple_of(PAGE) {
        return Err(Error::InvalidParameters);
    }
    base.checked_add(size).ok_or(Error::InvalidParameters)?;
    Ok(size)
}

fn frames(pa: u64, pages: u64) -> FrameRange {
    FrameRange {
        start: pa / PAGE,
        count: pages,
    }
}

/// Serves a host hypercall of the VM family; `None` if `function` is not one.
pub fn host_call(cpu: &PerCpu, regs: &mut GuestRegs, function: u32) -> Option<Result<(), Error>> {
    let [_, a1, a2, a3, a4, a5, ..] = regs.x;
    Some(match function {
        abi::HOST_SHARE_HYP => host_share(cpu, a1, a2, LedgerRequest::HOST_SHARE_HYP),
        abi::HOST_UNSHARE_HYP => host_share(cpu, a1, a2, LedgerRequest::HOST_UNSHARE_HYP),
        abi::VM_CREATE => create(cpu, a1, a2, a3).map(|handle| regs.x[1] = u64::from(handle)),
        abi::VM_DONATE => donate(cpu, a1, a2, a3, a4),
        abi::VM_LOAD => load(cpu, a1, a2, a3, a4),
        abi::VCPU_RUN => run(cpu, a1, [a2, a3, a4, a5], [regs.x[6], regs.x[7]]).map(|exit| {
            regs.x[1..8].copy_from_slice(&exit.to_regs());
        }),
        abi::VM_DESTROY => destroy(cpu, a1),
        abi::VM_RECLAIM => reclaim(cpu, a1, a2, a3),
        _ => return None,
    })
}

fn host_share(cpu: &PerCpu, pa: u64, pages: u64, op: u32) -> Result<(), Error> {
    checked_range(pa, pages)?;
    let request = LedgerRequest {
        op,
        party: 0,
        frames: frames(pa, pages),
    };
    if op == LedgerRequest::HOST_UNSHARE_HYP {
        // A page the interrupt controller reads (an LPI property table, an
        // ITS command queue) stays shared while it is in use.
        return crate::device::its::unless_pinned(pa, pages.saturating_mul(memory::PAGE), || {
            memory::transact(cpu, request, None)
        })
        .unwrap_or(Err(Error::Denied));
    }
    memory::transact(cpu, request, None)
}

fn create(cpu: &PerCpu, entry: u64, flags: u64, vcpus: u64) -> Result<u16, Error> {
    let flags = VmFlags(flags);
    if flags.0 & !VmFlags::KNOWN != 0 || !entry.is_multiple_of(4) {
        return Err(Error::InvalidParameters);
    }
    // Several vCPUs only with a virtual GIC (there is no other way for
    // them to signal each other).
    let vcpus = vcpus.max(1);
    if vcpus > abi::MAX_VCPUS || (vcpus > 1 && !flags.vgic()) {
        return Err(Error::InvalidParameters);
    }
    if flags.mte() && !machine().cpu.mte {
        return Err(Error::NotSupported);
    }
    let gicv3 = matches!(machine().platform.gic, moat_platform::dt::Gic::V3 { .. });
    if flags.vgic() && !(gicv3 && machine().cpu.gic_sysregs) {
        return Err(Error::NotSupported);
    }
    // Claim a free slot: Free → Alive under its lock.
    let (index, slot, mut guard) = SLOTS
        .iter()
        .enumerate()
        .find_map(|(i, s)| {
            let g = s.vm.try_lock()?;
            (s.status() == Status::Free && g.is_none()).then_some((i, s, g))
        })
        .ok_or(Error::NoMemory)?;
    let handle = index as u16 + 1;
    // The VM's memory first (the heap may be out), then the policy: a
    // failure or a refusal must leave the ledger untouched.
    let m = machine();
    let no_memory = |_| Error::NoMemory;
    let stage2 =
        StageTwo::new(m.stage2_start_level, VMID_BASE + index as u16).map_err(no_memory)?;
    let stage2 = try_box(stage2).ok_or(Error::NoMemory)?;
    let mut vcpu_cells = Vec::new();
    vcpu_cells
        .try_reserve(vcpus as usize)
        .map_err(|_| Error::NoMemory)?;
    for i in 0..vcpus {
        // vCPU 0 starts at the entry point; the others when CPU_ON says.
        let regs = (i == 0).then(|| GuestRegs::el1h_entry(entry, 0));
        let state = VcpuState::new(handle, regs, flags.vgic())?;
        vcpu_cells.push(VcpuCell(UnsafeCell::new(state)));
    }
    let mut power = Vec::new();
    power
        .try_reserve(vcpus as usize)
        .map_err(|_| Error::NoMemory)?;
    power.push(Power::On);
    power.resize(vcpus as usize, Power::Off);
    let mte = mte_policy(cpu, handle, flags)?;
    memory::transact(
        cpu,
        LedgerRequest {
            op: LedgerRequest::CREATE_VM,
            party: u32::from(handle),
            frames: FrameRange::default(),
        },
        None,
    )?;
    stage2.mark_live();
    *guard = Some(Vm {
        handle,
        mte,
        stage2,
        regions: Vec::new(),
        has_run: false,
        vcpus: vcpu_cells,
        loads: Loads::new(),
        power,
    });
    slot.set(Status::Alive);
    crate::log!(
        "VM {handle} created: entry {entry:#x}, VMID {}, MTE {}",
        VMID_BASE + index as u16,
        if mte { "on" } else { "off" }
    );
    Ok(handle)
}

/// Locks a VM's slot. Every holder keeps it for short VM-wide work only
/// (a check, one transaction, a vCPU's load or put), never for a run, so
/// it is waited for: two CPUs donating to one VM are served in turn.
fn lock_slot(slot: &'static Slot) -> spin::MutexGuard<'static, Option<Vm>> {
    crate::base::lockcheck::check(Rank::VmSlot);
    slot.vm.lock()
}

/// Locks an idle VM; `Busy` while any vCPU of it runs.
fn lock_idle(slot: &'static Slot) -> Result<spin::MutexGuard<'static, Option<Vm>>, Error> {
    let guard = lock_slot(slot);
    match guard.as_ref() {
        None => Err(Error::InvalidParameters),
        Some(vm) if vm.loads.running() > 0 => Err(Error::Busy),
        Some(_) => Ok(guard),
    }
}

fn donate(cpu: &PerCpu, handle: u64, pa: u64, pages: u64, ipa: u64) -> Result<(), Error> {
    let size = checked_range(pa, pages)?;
    checked_range(ipa, pages)?;
    let ipa_end = ipa.checked_add(size).ok_or(Error::InvalidParameters)?;
    if ipa_end > 1u64 << machine().ipa_bits {
        return Err(Error::InvalidParameters);
    }
    let (slot, handle) = slot_of(handle)?;
    let mut guard = lock_idle(slot)?;
    // A VM that is off never runs again: it gets no more memory.
    if slot.status() == Status::Off {
        return Err(Error::Denied);
    }
    let vm = guard.as_mut().ok_or(Error::InvalidParameters)?;
    // The IPA range must be free in the VM: a donation never replaces a page.
    if vm
        .stage2
        .for_each_mapped(ipa, size, |_, _, _| Err(()))
        .is_err()
    {
        return Err(Error::InvalidParameters);
    }
    memory::transact(
        cpu,
        LedgerRequest {
            op: LedgerRequest::HOST_DONATE_VM,
            party: u32::from(handle),
            frames: frames(pa, pages),
        },
        Some(VmMemory {
            handle,
            stage2: &mut vm.stage2,
            regions: &mut vm.regions,
            donate_ipa: Some(ipa),
        }),
    )
}

/// Copies `bytes` from host pages shared with the hypervisor into a VM
/// that has never run.
fn load(cpu: &PerCpu, handle: u64, ipa: u64, src: u64, bytes: u64) -> Result<(), Error> {
    if bytes == 0 || bytes > MAX_LOAD {
        return Err(Error::InvalidParameters);
    }
    let (first, last) = page_span(src, bytes).ok_or(Error::InvalidParameters)?;
    ipa.checked_add(bytes).ok_or(Error::InvalidParameters)?;
    let (slot, _) = slot_of(handle)?;
    let guard = lock_idle(slot)?;
    let vm = guard.as_ref().ok_or(Error::InvalidParameters)?;
    if vm.has_run || slot.status() != Status::Alive {
        return Err(Error::Denied);
    }
    // Holding the memory lock keeps the host from ending the share while
    // the core copies.
    let _order = crate::base::lockcheck::hold(moat_kernel::lockorder::Rank::Memory);
    let _serial = MEMORY.lock();
    // The source: RAM outside the hypervisor's memory and mapped for the
    // host as an owner's (the core's own checks, on its own tables), every
    // page the host's and shared with the hypervisor (the ledger's record,
    // each answer checked to hold the page asked about). The ledger alone
    // is not enough: a ledger that names another VM's frames as the host's
    // would have the core copy that VM's memory into this one.
    let m = machine();
    if !m
        .platform
        .memory
        .iter()
        .any(|b| first >= b.base && last <= b.end())
        || m.carve_out
            .as_slice()
            .iter()
            .any(|c| first < c.end() && c.base < last)
    {
        return Err(Error::InvalidParameters);
    }
    if !memory::host_owns(first, last - first) {
        crate::log!(
            "VM_LOAD: source {first:#x}..{last:#x} is not mapped for the host as its own: refused"
        );
        return Err(Error::Denied);
    }
    let mut pfn = first / PAGE;
    while pfn < last / PAGE {
        let e = memory::lookup(cpu, pfn).map_err(|e| match e {
            Error::NotSupported => Error::InvalidParameters,
            e => e,
        })?;
        let end = e.frames.start.saturating_add(e.frames.count);
        if e.frames.start > pfn || end <= pfn {
            crate::log!(
                "VM_LOAD: the ledger answered a lookup of frame {pfn:#x} with another extent"
            );
            return Err(Error::Denied);
        }
        if e.owner.kind != Party::HOST || e.borrower.kind != Party::HYPERVISOR {
            return Err(Error::Denied);
        }
        pfn = end;
    }
    // The destination: every page mapped in the VM, hence the VM's.
    let mut done = 0;
    while done < bytes {
        let at = ipa + done;
        let (pa, writable) = vm.stage2.translate(at).ok_or(Error::InvalidParameters)?;
        if !writable {
            return Err(Error::Denied);
        }
        let chunk = (PAGE - (at % PAGE)).min(bytes - done);
        let from = src + done;
        // SAFETY: `from..from + chunk` is host RAM the host shared with the
        // hypervisor (checked above, and the memory lock keeps it so), `pa..`
        // is a frame the VM owns and that never ran; both lie in RAM the
        // core maps read/write, and they cannot overlap (one is the host's,
        // the other the VM's).
        unsafe {
            core::ptr::copy_nonoverlapping(from as *const u8, pa as *mut u8, chunk as usize);
        }
        crate::arch::cache::clean_dcache_to_poc(pa, chunk);
        done += chunk;
    }
    Ok(())
}

fn destroy(cpu: &PerCpu, handle: u64) -> Result<(), Error> {
    let (slot, handle) = slot_of(handle)?;
    if slot.status() == Status::Dying {
        return Err(Error::Denied);
    }
    let mut guard = lock_idle(slot)?;
    memory::transact(
        cpu,
        LedgerRequest {
            op: LedgerRequest::DESTROY_VM,
            party: u32::from(handle),
            frames: FrameRange::default(),
        },
        None,
    )?;
    slot.set(Status::Dying);
    crate::log!("VM {handle} destroyed; its pages await reclaim");
    free_if_empty(slot, &mut guard);
    Ok(())
}

fn reclaim(cpu: &PerCpu, handle: u64, pa: u64, pages: u64) -> Result<(), Error> {
    checked_range(pa, pages)?;
    let (slot, handle) = slot_of(handle)?;
    if slot.status() != Status::Dying {
        return Err(Error::Denied);
    }
    let mut guard = lock_idle(slot)?;
    let vm = guard.as_mut().ok_or(Error::InvalidParameters)?;
    memory::transact(
        cpu,
        LedgerRequest {
            op: LedgerRequest::RECLAIM,
            party: u32::from(handle),
            frames: frames(pa, pages),
        },
        Some(VmMemory {
            handle,
            stage2: &mut vm.stage2,
            regions: &mut vm.regions,
            donate_ipa: None,
        }),
    )?;
    free_if_empty(slot, &mut guard);
    Ok(())
}

/// A dying VM with no page left is gone: its VMID's TLB entries are
/// invalidated, its tables freed, its handle free again.
fn free_if_empty(slot: &Slot, guard: &mut Option<Vm>) {
    let empty = guard.as_ref().is_some_and(|vm| vm.regions.is_empty());
    if slot.status() != Status::Dying || !empty {
        return;
    }
    if let Some(vm) = guard.take() {
        stage2::flush_vmid(vm.stage2.vttbr());
        vm.stage2.mark_dead();
        crate::log!("VM {} has no page left: freed", vm.handle);
    }
    slot.set(Status::Free);
}

/// What a run knows of its VM without holding the slot lock: fixed for
/// the VM's life, which lasts at least as long as the run (a VM with a
/// loaded vCPU cannot be destroyed).
#[derive(Clone, Copy)]
struct RunVm {
    slot: &'static Slot,
    handle: u16,
    mte: bool,
    vttbr: u64,
    /// The vCPU this run loaded.
    index: usize,
}

/// The EL2 controls while a VM runs.
fn vm_el2(vm: &RunVm) -> (u64, u64, u64, u64, u64) {
    use moat_kernel::el2config::{NESTED_CNTHCTL, vm_cptr, vm_hcr, vm_mdcr};
    let m = machine();
    let hcr = vm_hcr(&m.cpu, vm.mte);
    let mdcr = vm_mdcr(&m.cpu, m.host_el2.mdcr);
    (hcr, vm_cptr(&m.cpu), mdcr, NESTED_CNTHCTL, vm.vttbr)
}

/// Loads the VM's HCRX_EL2 (derived from what its ID registers show) and
/// fine-grained traps (none of the features they open is a VM's).
///
/// # Safety
///
/// The CPU is about to enter the VM.
unsafe fn enter_vm_feature_controls(vm: &RunVm) {
    let m = machine();
    let hcrx = m.vm_hcrx[usize::from(vm.mte)];
    // SAFETY: per the function contract.
    unsafe {
        sysreg::switch_feature_controls(
            &m.cpu,
            hcrx,
            &moat_kernel::el2config::FineGrainedTraps::default(),
        )
    };
}

/// How one entry into the VM ended, as the run loop sees it.
enum Step {
    Resume,
    Exit(Exit),
    /// The VM can never run again (shut down or crashed); the exit says why.
    End(Exit),
}

fn exit(reason: ExitReason, detail: [u64; 6]) -> Exit {
    Exit { reason, detail }
}

fn run(cpu: &PerCpu, target: u64, answer: [u64; 4], inject: [u64; 2]) -> Result<Exit, Error> {
    // x1: the handle in bits 15:0, the vCPU in bits 31:16.
    if target >> 32 != 0 {
        return Err(Error::InvalidParameters);
    }
    let (handle, index) = (target & 0xffff, ((target >> 16) & 0xffff) as usize);
    // A vCPU no VM can have is malformed whatever the VM's state: refused
    // before the VM is looked at, so the answer does not depend on it.
    if index as u64 >= abi::MAX_VCPUS {
        return Err(Error::InvalidParameters);
    }
    // A host in SME streaming mode, or with ZA on, is refused before
    // anything is touched: its Z registers are at the streaming length,
    // which no save area is sized for, and its ZA/ZT0 storage would have
    // to be saved too. The VM therefore always runs with SVCR clear.
    if sysreg::streaming_state(&machine().cpu) != 0 {
        return Err(Error::Denied);
    }
    let (slot, _) = slot_of(handle)?;
    let (vm, st, flush_local_tlb, abort) = {
        let mut guard = lock_slot(slot);
        match slot.status() {
            Status::Alive => {}
            Status::Off | Status::Dying => return Err(Error::Denied),
            Status::Free => return Err(Error::InvalidParameters),
        }
        let vm = guard.as_mut().ok_or(Error::InvalidParameters)?;
        let starting = match vm.power.get(index).copied() {
            None => return Err(Error::InvalidParameters),
            Some(Power::Off) => {
                return Ok(exit(
                    ExitReason::VcpuPower,
                    [abi::POWER_IS_OFF, 0, 0, 0, 0, 0],
                ));
            }
            Some(Power::On) => None,
            Some(Power::Starting { entry, context }) => Some((entry, context)),
        };
        let cell: &VcpuCell = vm.vcpus.get(index).ok_or(Error::InvalidParameters)?;
        let cell: *const VcpuCell = cell;
        // The same vCPU asked to run on two CPUs at once: the second is
        // refused, with nothing changed.
        let loaded = vm.loads.load(index, cpu.index).map_err(|e| match e {
            LoadError::Busy { .. } => Error::Busy,
            _ => Error::InvalidParameters,
        })?;
        // SAFETY: this run loaded the vCPU just now (under the slot lock),
        // so no other CPU touches its state until it is put back; the
        // record does not move (the vector is never resized) and lives as
        // long as the VM, which cannot be destroyed while a vCPU of it is
        // loaded.
        let st = unsafe { &mut *(*cell).0.get() };
        let prepared = prepare(st, starting, answer, inject);
        let abort = match prepared {
            Ok(abort) => abort,
            Err(e) => {
                let _ = vm.loads.put(index, cpu.index);
                return Err(e);
            }
        };
        if starting.is_some() {
            vm.power[index] = Power::On;
        }
        vm.has_run = true;
        let run_vm = RunVm {
            slot,
            handle: vm.handle,
            mte: vm.mte,
            vttbr: vm.stage2.vttbr(),
            index,
        };
        (run_vm, st, loaded.flush_local_tlb, abort)
    };
    let outcome = run_loaded(cpu, &vm, st, flush_local_tlb, abort);
    // Putting the vCPU back: its state is not touched after this.
    let mut guard = lock_slot(slot);
    if outcome.1 == Status::Off && slot.status() == Status::Alive {
        slot.set(Status::Off);
    }
    if let Some(vm) = guard.as_mut() {
        let _ = vm.loads.put(index, cpu.index);
    }
    Ok(outcome.0)
}

/// The checks and the answer of a run, with the vCPU loaded and the slot
/// lock held: a CPU_ON's reset, the host's answer to the last exit and its
/// injections. Every check is made first, against the state the vCPU has
/// once a CPU_ON's reset is applied, so that on an error nothing of the
/// vCPU changed, the reset included (the caller marks the vCPU on only
/// after success). `Ok(Some(is_write))`: the host asked for an abort of the
/// MMIO access.
fn prepare(
    st: &mut VcpuState,
    starting: Option<(u64, u64)>,
    answer: [u64; 4],
    inject: [u64; 2],
) -> Result<Option<bool>, Error> {
    // A CPU with a longer vector length than any before it came up after
    // the VM was created.
    if !st.host_vectors.fits() {
        return Err(Error::Denied);
    }
    // A reset leaves nothing pending and the virtual CPU interface empty.
    let pending = if starting.is_some() {
        Pending::None
    } else {
        st.pending
    };
    // The answer to an MMIO exit, checked before anything is taken.
    // (r1 is looked at first: after any other exit it is free.)
    if MmioAnswer(answer[1]).aborts().is_none() && matches!(pending, Pending::Mmio(_)) {
        return Err(Error::InvalidParameters);
    }
    // The injections, all checked before any is taken.
    let mut injections = [(0u32, 0u8, false); 2];
    let mut count = 0;
    for word in inject {
        match Injection(word).decode() {
            None => {}
            Some(Ok((intid, priority))) => {
                injections[count] = (intid, priority, Injection(word).notify_eoi());
                count += 1;
            }
            Some(Err(())) => return Err(Error::InvalidParameters),
        }
    }
    if count > 0 {
        let v = st.vgic.as_ref().ok_or(Error::InvalidParameters)?;
        if starting.is_none() && !v.has_room(count) {
            return Err(Error::NoMemory);
        }
    }
    if let Some((entry, context)) = starting {
        // CPU_ON's reset: the entry point, x0 = the context, every other
        // register as at creation.
        st.vcpu.regs = GuestRegs::el1h_entry(entry, context);
        st.el1 = El1Context::reset();
        *st.fp = FpState::ZERO;
        st.csselr = arm_sysregs::CsselrEl1::empty();
        st.mte_regs = MteRegs::default();
        st.pending = Pending::None;
        if let Some(v) = st.vgic.as_mut() {
            **v = VgicCpu::new(vgic::geometry());
        }
    }
    if let Some(v) = st.vgic.as_mut() {
        for &(intid, priority, notify_eoi) in &injections[..count] {
            // Room was checked and every INTID decoded: this cannot fail.
            v.inject(intid, priority, notify_eoi)
                .map_err(|_| Error::InvalidParameters)?;
        }
    }
    // An abort the host asked for, delivered once the VM's EL1 state is
    // loaded: whether the access wrote.
    let mut abort = None;
    match core::mem::replace(&mut st.pending, Pending::None) {
        Pending::Hvc => st.vcpu.regs.x[..4].copy_from_slice(&answer),
        Pending::Mmio(access) if answer[1] != 0 => abort = Some(access.is_write),
        Pending::Mmio(access) if !access.is_write => {
            let v = access.loaded_value(answer[0]);
            st.vcpu.regs.write_gpr(access.rt, v);
        }
        Pending::Mmio(_) | Pending::None => {}
    }
    Ok(abort)
}

/// Runs a loaded vCPU until an exit for the host, without the slot lock;
/// the status the slot takes after (`Off` if the VM can never run again).
fn run_loaded(
    cpu: &PerCpu,
    vm: &RunVm,
    st: &mut VcpuState,
    flush_local_tlb: bool,
    abort: Option<bool>,
) -> (Exit, Status) {
    st.vcpu.cpu = cpu.index as u64;

    let host_csselr = sysreg::read_csselr();
    // SAFETY: this CPU loaded the vCPU; the host's EL1 state is saved
    // before the VM's is loaded and restored after.
    unsafe {
        (*cpu.host_el1.get()).save();
        st.el1.load();
    }
    if let Some(is_write) = abort {
        // The host found no device: the access takes a synchronous
        // external abort, from the access itself (the MMIO exit moved the
        // PC past it), at the guest's vector.
        let regs = &mut st.vcpu.regs;
        regs.pc = regs.pc.wrapping_sub(4);
        crate::base::inject::inject_abort(regs, false, is_write, st.mmio_far);
    }
    st.host_vectors.save();
    st.fp.load();
    let m = machine();
    let benchmark = m.host_el2.mdcr & moat_kernel::el2config::MDCR_HPMD == 0;
    // SAFETY: the host's EL1 state is saved and the VM's about to run.
    let host_monitors = unsafe { sysreg::ParkedHostMonitors::park(&m.cpu, benchmark) };
    sysreg::write_csselr(st.csselr);
    let mut host_mte = MteRegs::default();
    if vm.mte {
        host_mte.save();
        st.mte_regs.load();
    }
    let (h, c, md, ct, v) = vm_el2(vm);
    // SAFETY: the VM's stage-2 is live and its EL1 state is loaded.
    unsafe {
        sysreg::switch_el2(h, c, md, ct, v);
        enter_vm_feature_controls(vm);
    }
    // The guest's MPIDR_EL1 names its vCPU (Aff0 = its index, bit 31
    // RES1), not the physical CPU it happens to run on: a guest matches it
    // against the CPUs its device tree lists.
    sysreg::set_vmpidr(VCPU_MPIDR | vm.index as u64);
    if flush_local_tlb {
        // This CPU may hold the VMID's entries from an earlier run that
        // the guest has since invalidated on another CPU, or that another
        // vCPU of the VM left here (its guest-local invalidations never
        // reached this vCPU's view).
        // The VM's VMID is in VTTBR_EL2 (`switch_el2` above).
        crate::arch::tlb::invalidate_local_vmid();
    }

    // The run ends by the host's own timer or after one slice at the latest
    // (the backstop: the EL2 timer, which the CPU interface lets through).
    // SAFETY: the host's EL1 state was saved above and is not written
    // again until the run ends.
    let (host_cntv_ctl, host_cntv_cval) = unsafe { (*cpu.host_el1.get()).virtual_timer() };
    let (now, freq) = sysreg::counter();
    let deadline = el2config::vm_run_deadline(now, freq, host_cntv_ctl, host_cntv_cval);
    let gic = cpu.gic_access();
    let saved_icc = gic
        .as_ref()
        .map(|access| crate::arch::gic::open_watchdog(access, RunMask::Vm));
    // Without a virtual GIC the guest's timer can raise the host's PPI 27
    // only if the guest left it enabled and unmasked; otherwise the line is
    // not borrowed (three register reads, a disable with its RWP wait and a
    // restore saved on every run). A guest that arms its timer during the
    // run costs one Interrupt exit, and the next run borrows the line.
    let (guest_cntv_ctl, _) = st.el1.virtual_timer();
    let guest_timer_armed = guest_cntv_ctl & 0b11 == 0b01;
    let mut borrowed = gic
        .as_ref()
        .filter(|_| st.vgic.is_some() || guest_timer_armed)
        .map(|access| vgic::borrow_ppis(access, st.vgic.is_some()));
    if let Some(v) = st.vgic.as_ref() {
        v.load();
    }
    let outcome = loop {
        if let Some(v) = st.vgic.as_mut() {
            // Deactivations the host asked to hear of end the run first.
            if let Some(eois) = v.take_eois() {
                break (exit(ExitReason::Eoi, eois), Status::Alive);
            }
            let timer_line = v.before_entry();
            if let (Some(access), Some(b)) = (gic.as_ref(), borrowed.as_mut()) {
                vgic::set_timer_ppi(access, b, timer_line);
            }
        }
        // Armed again before every entry: a service call made on the VM's
        // behalf (`outside_vm`) uses the same timer for its own watchdog.
        sysreg::arm_watchdog(deadline);
        // SAFETY: the vCPU frame is complete, the VM's EL1 and EL2 state is
        // loaded, and `nested` is this CPU's save area; the VM's next trap
        // returns here through `leave_nested`.
        unsafe { enter_nested(&mut *st.vcpu, cpu.nested.get()) };
        // The backstop's interrupt ends the run as an Interrupt exit, like
        // any host interrupt; disarming it drops its level.
        sysreg::disarm_watchdog();
        let maintenance = st.vgic.as_mut().is_some_and(|v| v.after_exit());
        match handle_exit(cpu, vm, st, maintenance, deadline) {
            Step::Resume => continue,
            Step::Exit(e) => break (e, Status::Alive),
            Step::End(e) => break (e, Status::Off),
        }
    };

    if let Some(v) = st.vgic.as_mut() {
        v.save();
    }
    if let (Some(access), Some(b)) = (gic.as_ref(), borrowed) {
        vgic::return_ppis(access, b, st.vgic.is_some());
    }
    if let (Some(access), Some(saved)) = (gic.as_ref(), saved_icc) {
        crate::arch::gic::close_watchdog(access, saved);
    }
    if vm.mte {
        st.mte_regs.save();
        host_mte.load();
    }
    host_monitors.restore();
    st.csselr = sysreg::read_csselr();
    st.fp.save();
    // SAFETY: as above, in reverse.
    unsafe {
        st.el1.save();
        (*cpu.host_el1.get()).load();
    }
    sysreg::write_csselr(host_csselr);
    sysreg::set_vmpidr(sysreg::mpidr());
    let hel2 = &machine().host_el2;
    // SAFETY: back to the host's own controls and stage-2.
    unsafe {
        sysreg::switch_el2(
            hel2.hcr.load(Ordering::Relaxed),
            hel2.cptr,
            hel2.mdcr,
            hel2.cnthctl,
            hel2.vttbr,
        );
        sysreg::switch_feature_controls(&machine().cpu, hel2.hcrx, &hel2.fgt);
    };
    st.host_vectors.load();
    outcome
}

/// Handles one trap from a running VM. `maintenance`: the virtual CPU
/// interface raised a maintenance interrupt (already dealt with);
/// `deadline`: when the run must end.
fn handle_exit(
    cpu: &PerCpu,
    vm: &RunVm,
    st: &mut VcpuState,
    maintenance: bool,
    deadline: u64,
) -> Step {
    let vector = st.vcpu.exit_vector;
    let esr_el2 = st.vcpu.exit_esr;
    match vector {
        LOWER_SYNC => {}
        LOWER_IRQ | LOWER_FIQ => {
            // The core's own business (a maintenance interrupt, or the
            // guest's timer firing on a line that is the guest's for the
            // run) goes back into the guest, which `before_entry` handles;
            // anything else is the host's. Never past the deadline.
            let ours = maintenance || st.vgic.as_ref().is_some_and(|v| v.timer_due());
            if ours && sysreg::now() < deadline {
                return Step::Resume;
            }
            return Step::Exit(exit(ExitReason::Interrupt, [0; 6]));
        }
        _ => {
            crate::log!(
                "VM {}: SError or unexpected vector {vector}: VM off",
                vm.handle
            );
            return Step::End(exit(ExitReason::Crashed, [esr_el2, 0, 0, 0, 0, 0]));
        }
    }
    let trap = Trap::decode(esr_el2);
    if matches!(trap, Trap::Hvc { imm: 0 }) {
        return guest_call(cpu, vm, st);
    }
    if matches!(trap, Trap::Smc { imm: 0 }) {
        st.vcpu.regs.pc = st.vcpu.regs.pc.wrapping_add(4);
        return guest_call(cpu, vm, st);
    }
    let regs = &mut st.vcpu.regs;
    match trap {
        Trap::Hvc { .. } => {
            regs.x[0] = smccc::NOT_SUPPORTED;
            Step::Resume
        }
        Trap::Smc { .. } => {
            // A trapped SMC leaves ELR at the SMC itself.
            regs.pc = regs.pc.wrapping_add(4);
            regs.x[0] = smccc::NOT_SUPPORTED;
            Step::Resume
        }
        Trap::Wfx { is_wfe } => {
            regs.pc = regs.pc.wrapping_add(4);
            match st.vgic.as_mut() {
                // A virtual-GIC guest's WFE waits for another vCPU's SEV,
                // which the core cannot see: it just goes on (a spin). Its
                // WFI ends at once if an interrupt is pending; otherwise
                // the host learns when the guest's timer wants it back.
                Some(_) if is_wfe => Step::Resume,
                Some(v) if v.would_wake() => Step::Resume,
                Some(v) => {
                    let wake = v.timer_deadline();
                    Step::Exit(exit(ExitReason::Wfi, [wake, 0, 0, 0, 0, 0]))
                }
                None => Step::Exit(exit(ExitReason::Wfi, [0; 6])),
            }
        }
        Trap::StageTwo(abort) => {
            let ipa = sysreg::fault_ipa();
            match abort.access {
                Some(access) if !abort.is_instruction && !abort.s1ptw => {
                    let value = if access.is_write {
                        let bits = 8u32 << access.size_log2;
                        let v = regs.read_gpr(access.rt);
                        if bits >= 64 {
                            v
                        } else {
                            v & ((1u64 << bits) - 1)
                        }
                    } else {
                        0
                    };
                    st.pending = Pending::Mmio(access);
                    st.mmio_far = sysreg::far_el2();
                    regs.pc = regs.pc.wrapping_add(4);
                    let bits = MmioAccess::new(access.is_write, access.size_log2, access.rt);
                    Step::Exit(exit(ExitReason::Mmio, [ipa, bits.0, value, 0, 0, 0]))
                }
                _ => {
                    // No syndrome to emulate from (a pair, a fetch, a table
                    // walk): what a bus error on that access would give it.
                    crate::base::inject::inject_abort(
                        regs,
                        abort.is_instruction,
                        abort.is_write,
                        sysreg::far_el2(),
                    );
                    Step::Resume
                }
            }
        }
        Trap::SysReg(access) => {
            // Set/way cache maintenance (DC ISW/CSW/CISW) is a no-op: the
            // VM's memory is cleaned to the point of coherency whenever it
            // changes hands, and set/way operations cannot be virtualised.
            if access.op0 == 1 && access.crn == 7 && matches!(access.crm, 6 | 10 | 14) {
                regs.pc = regs.pc.wrapping_add(4);
                return Step::Resume;
            }
            // A virtual-GIC guest's SGIs: the host routes them.
            if let (Some(_), Some(which)) = (st.vgic.as_ref(), sgi_register(&access)) {
                let value = regs.read_gpr(access.rt);
                regs.pc = regs.pc.wrapping_add(4);
                return Step::Exit(exit(ExitReason::Sgi, [value, which, 0, 0, 0, 0]));
            }
            // The debug registers (op0 2: MDSCR_EL1, the OS lock, the
            // breakpoints and watchpoints) of a virtual-GIC guest, a
            // general-purpose kernel that resets them as it boots: they read
            // as zero and ignore writes. The hardware's stay parked for the
            // host either way (MDCR_EL2.TDA, TDOSA keep them trapped).
            if st.vgic.is_some() && access.op0 == 2 {
                if access.is_read {
                    regs.write_gpr(access.rt, 0);
                }
                regs.pc = regs.pc.wrapping_add(4);
                return Step::Resume;
            }
            // ID group 3: the hardware's value, less what the VM lacks.
            if access.is_read && (access.op0, access.op1, access.crn) == (3, 0, 0) {
                let hardware = sysreg::read_id_register(access.crm, access.op2).unwrap_or(0);
                let value = vmfeatures::vm_view(access.crm, access.op2, hardware, vm.mte);
                regs.write_gpr(access.rt, value);
                regs.pc = regs.pc.wrapping_add(4);
                return Step::Resume;
            }
            // Everything else goes to the policy service that handles system
            // registers (the MTE policy), as the host's traps do.
            let Some(index) = sysreg_handler() else {
                crate::base::inject::inject_undef(regs);
                return Step::Resume;
            };
            let mut trap = moat_kernel::verdict::describe(
                &sysreg::Hw,
                &Trap::SysReg(access),
                esr_el2,
                regs,
                cpu.index,
            );
            trap.partition = PARTITION_VM_BASE + vm.handle;
            let answer = outside_vm(cpu, vm, st, || {
                crate::partition::service::ask(cpu, index, &trap)
            });
            moat_kernel::verdict::apply_verdict(
                &mut sysreg::Hw,
                &machine().cpu,
                &mut st.vcpu.regs,
                answer,
                &access,
            );
            Step::Resume
        }
        Trap::Other { .. } => {
            crate::base::inject::inject_undef(regs);
            Step::Resume
        }
    }
}

/// Which SGI-generation register a trapped write is: 0 ICC_SGI1R_EL1, 1
/// ICC_ASGI1R_EL1, 2 ICC_SGI0R_EL1 (they trap while HCR_EL2.IMO/FMO are
/// set).
fn sgi_register(a: &esr::SysRegAccess) -> Option<u64> {
    if a.is_read || (a.op0, a.crn, a.crm) != (3, 12, 11) {
        return None;
    }
    match (a.op1, a.op2) {
        (0, 5) => Some(0),
        (1, 6) => Some(1),
        (2, 7) => Some(2),
        _ => None,
    }
}

/// The service that handles system-register traps, if the image has one.
fn sysreg_handler() -> Option<usize> {
    crate::partition::service::routes().and_then(|r| r.handler(TrapClass::SysReg))
}

/// Asks the MTE policy service, if there is one, whether a new VM gets MTE.
/// Without one, a VM gets MTE when it asks and the hardware has it.
fn mte_policy(cpu: &PerCpu, handle: u16, flags: VmFlags) -> Result<bool, Error> {
    use moat_abi::services::{VmMtePolicy, VmMteRequest, mte};
    let hardware_level = sysreg::mte_level();
    let Some(index) = crate::partition::service::index_of(mte::SERVICE_ID) else {
        return Ok(flags.mte() && machine().cpu.mte);
    };
    let request = VmMteRequest {
        vm: u32::from(handle),
        requested: u32::from(flags.mte()),
        hardware_level,
        reserved: 0,
    };
    let p: VmMtePolicy = crate::partition::service::call_typed(
        cpu,
        index,
        mte::Operation::vm_policy as u16,
        &request,
    )?;
    // The policy may refuse MTE to a VM that asked; it may never grant it
    // to one that did not, or on hardware without it.
    match (p.mte == 1, flags.mte()) {
        (true, true) if machine().cpu.mte => Ok(true),
        (false, false) => Ok(false),
        (false, true) => Err(Error::Denied),
        _ => Err(Error::ServiceFailed),
    }
}

use ::smccc::psci::{
    PSCI_AFFINITY_INFO_32, PSCI_AFFINITY_INFO_64, PSCI_CPU_OFF, PSCI_CPU_ON_32, PSCI_CPU_ON_64,
    PSCI_FEATURES, PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET, PSCI_VERSION,
};

/// PSCI's return codes for the vCPU calls, as 64-bit registers.
const PSCI_INVALID_PARAMETERS: u64 = -2i64 as u64;
const PSCI_ALREADY_ON: u64 = -4i64 as u64;
const PSCI_ON_PENDING: u64 = -5i64 as u64;
const PSCI_INVALID_ADDRESS: u64 = -9i64 as u64;

/// The vCPU an MPIDR names (Aff0 = the index, bit 31 ignored, every other
/// affinity 0), if the VM has it.
fn vcpu_of(power: &[Power], mpidr: u64) -> Option<usize> {
    let mpidr = mpidr & !(1 << 31);
    if mpidr > 0xff {
        return None;
    }
    let index = mpidr as usize;
    (index < power.len()).then_some(index)
}

/// Runs `f` on the VM's vCPU power states, under the slot lock (the vCPUs
/// of the VM that run on other CPUs read and change them too).
fn with_power<R>(vm: &RunVm, f: impl FnOnce(&mut [Power]) -> R) -> Option<R> {
    let mut guard = lock_slot(vm.slot);
    guard.as_mut().map(|v| f(&mut v.power))
}

/// PSCI CPU_ON: the target vCPU starts at `entry` with x0 = `context` on
/// its next run; this vCPU's run ends so that the host can run it.
fn cpu_on(
    vm: &RunVm,
    st: &mut VcpuState,
    function: u32,
    mpidr: u64,
    entry: u64,
    context: u64,
) -> Step {
    let (entry, context) = if function == PSCI_CPU_ON_32 {
        (entry & 0xffff_ffff, context & 0xffff_ffff)
    } else {
        (entry, context)
    };
    let started = with_power(vm, |power| match vcpu_of(power, mpidr) {
        None => Err(PSCI_INVALID_PARAMETERS),
        Some(_) if !entry.is_multiple_of(4) => Err(PSCI_INVALID_ADDRESS),
        Some(t) => match power[t] {
            Power::On => Err(PSCI_ALREADY_ON),
            Power::Starting { .. } => Err(PSCI_ON_PENDING),
            Power::Off => {
                power[t] = Power::Starting { entry, context };
                Ok(t)
            }
        },
    });
    match started.unwrap_or(Err(PSCI_INVALID_PARAMETERS)) {
        Ok(t) => {
            st.vcpu.regs.x[0] = 0;
            Step::Exit(exit(
                ExitReason::VcpuPower,
                [abi::POWER_STARTED, t as u64, 0, 0, 0, 0],
            ))
        }
        Err(answer) => {
            st.vcpu.regs.x[0] = answer;
            Step::Resume
        }
    }
}

/// A hypercall from the guest: the core serves its memory calls and the
/// PSCI calls that end it; everything else goes to the host.
fn guest_call(cpu: &PerCpu, vm: &RunVm, st: &mut VcpuState) -> Step {
    let x = st.vcpu.regs.x;
    let function = x[0] as u32;
    let result = match function {
        abi::GUEST_SHARE_HOST => guest_share(cpu, vm, st, x[1], x[2], LedgerRequest::VM_SHARE_HOST),
        abi::GUEST_UNSHARE_HOST => {
            guest_share(cpu, vm, st, x[1], x[2], LedgerRequest::VM_UNSHARE_HOST)
        }
        hypercall::ABI_VERSION => {
            st.vcpu
                .regs
                .set_smccc_result([0, u64::from(moat_abi::ABI_VERSION), 0, 0]);
            return Step::Resume;
        }
        smccc::SMCCC_VERSION => {
            st.vcpu.regs.x[0] = smccc::IMPLEMENTED_VERSION;
            return Step::Resume;
        }
        // The pKVM guest ABI: a kernel with the pKVM guest driver checks
        // the UID, then the features, and shares its bounce buffers one
        // granule at a time. Served as Moat's own guest share.
        pkvm::CALL_UID => {
            st.vcpu.regs.set_smccc_result(pkvm::UID);
            return Step::Resume;
        }
        pkvm::FEATURES => {
            st.vcpu.regs.set_smccc_result([pkvm::FEATURE_BITS, 0, 0, 0]);
            return Step::Resume;
        }
        pkvm::HYP_MEMINFO => {
            let answer = if x[1..4] == [0, 0, 0] {
                PAGE
            } else {
                pkvm::INVALID_PARAMETER
            };
            st.vcpu.regs.set_smccc_result([answer, 0, 0, 0]);
            return Step::Resume;
        }
        pkvm::MEM_SHARE | pkvm::MEM_UNSHARE if x[2..4] != [0, 0] => {
            st.vcpu.regs.x[0] = pkvm::INVALID_PARAMETER;
            return Step::Resume;
        }
        pkvm::MEM_SHARE | pkvm::MEM_UNSHARE => {
            let op = if function == pkvm::MEM_SHARE {
                LedgerRequest::VM_SHARE_HOST
            } else {
                LedgerRequest::VM_UNSHARE_HOST
            };
            match guest_share(cpu, vm, st, x[1], 1, op) {
                Err(Error::Interrupted) => Err(Error::Interrupted),
                Ok(()) => Ok(()),
                Err(_) => {
                    st.vcpu.regs.x[0] = pkvm::INVALID_PARAMETER;
                    return Step::Resume;
                }
            }
        }
        PSCI_VERSION => {
            st.vcpu.regs.x[0] = 0x1_0000;
            return Step::Resume;
        }
        PSCI_FEATURES => {
            st.vcpu.regs.x[0] = match x[1] as u32 {
                PSCI_VERSION | PSCI_FEATURES | PSCI_SYSTEM_OFF | PSCI_SYSTEM_RESET => 0,
                PSCI_CPU_ON_32
                | PSCI_CPU_ON_64
                | PSCI_CPU_OFF
                | PSCI_AFFINITY_INFO_32
                | PSCI_AFFINITY_INFO_64 => 0,
                _ => smccc::NOT_SUPPORTED,
            };
            return Step::Resume;
        }
        PSCI_CPU_ON_32 | PSCI_CPU_ON_64 => return cpu_on(vm, st, function, x[1], x[2], x[3]),
        PSCI_CPU_OFF => {
            let me = vm.index;
            with_power(vm, |power| power[me] = Power::Off);
            return Step::Exit(exit(
                ExitReason::VcpuPower,
                [abi::POWER_IS_OFF, 0, 0, 0, 0, 0],
            ));
        }
        PSCI_AFFINITY_INFO_32 | PSCI_AFFINITY_INFO_64 => {
            let state = with_power(vm, |power| match (vcpu_of(power, x[1]), x[2]) {
                (Some(t), 0) => match power[t] {
                    Power::On => 0,
                    Power::Off => 1,
                    Power::Starting { .. } => 2,
                },
                _ => PSCI_INVALID_PARAMETERS,
            });
            st.vcpu.regs.x[0] = state.unwrap_or(PSCI_INVALID_PARAMETERS);
            return Step::Resume;
        }
        PSCI_SYSTEM_OFF | PSCI_SYSTEM_RESET => {
            let reset = u64::from(function == PSCI_SYSTEM_RESET);
            crate::log!(
                "VM {} asked for {}: the VM is off",
                vm.handle,
                if reset == 1 {
                    "SYSTEM_RESET"
                } else {
                    "SYSTEM_OFF"
                }
            );
            return Step::End(exit(ExitReason::Shutdown, [reset, 0, 0, 0, 0, 0]));
        }
        _ => {
            st.pending = Pending::Hvc;
            return Step::Exit(exit(ExitReason::Hvc, [x[0], x[1], x[2], x[3], x[4], x[5]]));
        }
    };
    match result {
        // An interrupt for the host arrived while the ledger ran: the host
        // takes it, and the guest issues the call again when it next runs
        // (the ledger finishes the suspended request first).
        Err(Error::Interrupted) => {
            st.vcpu.regs.pc = st.vcpu.regs.pc.wrapping_sub(4);
            Step::Exit(exit(ExitReason::Interrupt, [0; 6]))
        }
        Ok(()) => {
            st.vcpu.regs.x[0] = 0;
            Step::Resume
        }
        Err(e) => {
            st.vcpu.regs.x[0] = e.to_x0();
            Step::Resume
        }
    }
}

/// GUEST_SHARE_HOST / GUEST_UNSHARE_HOST: the IPA range must be mapped in
/// the VM and backed by contiguous frames.
fn guest_share(
    cpu: &PerCpu,
    run: &RunVm,
    st: &mut VcpuState,
    ipa: u64,
    pages: u64,
    op: u32,
) -> Result<(), Error> {
    let size = checked_range(ipa, pages)?;
    // The VM's stage-2 and record are VM-wide: other vCPUs of the VM may
    // share or unshare at the same time on other CPUs.
    outside_vm(cpu, run, st, || {
        let mut guard = lock_slot(run.slot);
        let vm = guard.as_mut().ok_or(Error::InvalidParameters)?;
        let (first, _) = vm.stage2.translate(ipa).ok_or(Error::InvalidParameters)?;
        let mut at = PAGE;
        while at < size {
            match vm.stage2.translate(ipa + at) {
                Some((pa, _)) if pa == first + at => {}
                _ => return Err(Error::InvalidParameters),
            }
            at += PAGE;
        }
        // The transaction changes only the host's stage-2; the VM keeps
        // its mapping (the ledger never names the VM in a share's changes).
        memory::transact(
            cpu,
            LedgerRequest {
                op,
                party: u32::from(vm.handle),
                frames: frames(first, pages),
            },
            Some(VmMemory {
                handle: vm.handle,
                stage2: &mut vm.stage2,
                regions: &mut vm.regions,
                donate_ipa: None,
            }),
        )
    })
}

/// Runs `f` (which may call services) in the middle of a VM run with the
/// host's EL1 state back in the CPU, so that a service call saves and
/// restores the host's state, not the VM's; then loads the VM's again.
/// The VM's FP/SIMD and CSSELR_EL1 stay live: services cannot reach them
/// (CPTR_EL2.TFP and HCR_EL2.TID2 trap them).
fn outside_vm<R>(cpu: &PerCpu, vm: &RunVm, st: &mut VcpuState, f: impl FnOnce() -> R) -> R {
    // SAFETY: this CPU runs the vCPU (it loaded it); the vCPU's EL1 state
    // is saved before the host's is loaded, and loaded again after.
    unsafe {
        st.el1.save();
        (*cpu.host_el1.get()).load();
    }
    if st.vgic.is_some() {
        VgicCpu::pause();
    }
    let r = f();
    let (h, c, md, ct, v) = vm_el2(vm);
    // SAFETY: as above; a service call in `f` restored the host's EL1 state
    // and EL2 controls, which are now replaced by the VM's again.
    unsafe {
        st.el1.load();
        sysreg::switch_el2(h, c, md, ct, v);
        enter_vm_feature_controls(vm);
    }
    r
}

/// Every idle VM's stage-2, locked, for the consistency checker.
pub struct IdleVms {
    guards: Vec<spin::MutexGuard<'static, Option<Vm>>>,
    /// VMs with a vCPU running on another CPU, or in a call of their own
    /// there (not checked).
    pub running: u64,
}

impl IdleVms {
    /// Handle, stage-2 and the record of where its frames sit, of each
    /// idle VM.
    pub fn stage2s(&self) -> impl Iterator<Item = (u16, &StageTwo, &[Region])> {
        self.guards.iter().filter_map(|g| {
            g.as_ref()
                .map(|vm| (vm.handle, &*vm.stage2, vm.regions.as_slice()))
        })
    }
}

impl IdleVms {
    /// Handle, whether it is destroyed (its pages awaiting reclaim), and
    /// the record of where its frames sit, of each idle VM: the facts a
    /// restarted ledger is rebuilt from.
    pub fn records(&self) -> impl Iterator<Item = (u16, bool, &[Region])> {
        self.guards.iter().filter_map(|g| {
            g.as_ref().map(|vm| {
                let dying = usize::from(vm.handle)
                    .checked_sub(1)
                    .and_then(|i| SLOTS.get(i))
                    .is_some_and(|slot| slot.status() == Status::Dying);
                (vm.handle, dying, vm.regions.as_slice())
            })
        })
    }
}

/// Locks every VM no vCPU of which runs (before the memory lock: the lock
/// order is slot, then memory).
pub fn lock_all_idle() -> Result<IdleVms, Error> {
    let mut out = IdleVms {
        guards: Vec::new(),
        running: 0,
    };
    out.guards
        .try_reserve(SLOTS.len())
        .map_err(|_| Error::NoMemory)?;
    for slot in &SLOTS {
        match slot.vm.try_lock() {
            Some(g) if g.as_ref().is_some_and(|vm| vm.loads.running() > 0) => out.running += 1,
            Some(g) if g.is_some() => out.guards.push(g),
            Some(_) => {}
            None => out.running += 1,
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    //! Protected VMs over the host stand-in for `arch`: a run's entry into
    //! the guest is scripted (`arch::on_entry`: what the guest does and how
    //! it traps back), the VM's memory is the memory tests' RAM buffer and
    //! its ledger their ledger (`memory::tests::world`). Each test leaves
    //! every slot free again.

    use super::*;
    use crate::arch::fpsimd::{self, FpState};
    use crate::arch::sysreg::{
        HOST_CPTR, HOST_HCR, el1_registers, el2_controls, set_el1_register, set_mpidr,
        set_streaming_state, with_regs,
    };
    use crate::arch::{PartitionOp, clear_entries, entries_left, on_entry, take_partition_log};
    use crate::memory::tests::world;
    use std::sync::MutexGuard;

    /// Where the VM tests' frames are in the test RAM.
    const FRAMES: u64 = 7 << 20;
    const ENTRY: u64 = 0x8_0000;
    /// The IPA the tests donate their first page at.
    const IPA: u64 = 0x4000_0000;

    /// The machine with its services, always (ECHO decides system-register
    /// traps, a VM's too), whichever test made them.
    fn turn() -> MutexGuard<'static, ()> {
        let turn = crate::partition::service::tests::services();
        world();
        set_mpidr(0);
        clear_entries();
        take_partition_log();
        turn
    }

    fn cpu(i: usize) -> &'static PerCpu {
        crate::base::cpu::get(i).unwrap()
    }

    /// Frame `n` of the tests' frames.
    fn frame(n: u64) -> u64 {
        world().ram + FRAMES + n * PAGE
    }

    fn target(handle: u16) -> u64 {
        abi::run_target(handle, 0)
    }

    fn status(handle: u16) -> Status {
        SLOTS[usize::from(handle) - 1].status()
    }

    /// The guest traps with `esr`.
    fn trap(v: &mut Vcpu, esr: u64) {
        v.exit_vector = LOWER_SYNC;
        v.exit_esr = esr;
    }

    /// The guest calls `x[0]` with `x[1..]`.
    fn hvc(v: &mut Vcpu, x: &[u64]) {
        v.regs.x[..x.len()].copy_from_slice(x);
        trap(v, esr::HVC0);
    }

    /// The guest waits for an interrupt (WFI).
    fn wfi(v: &mut Vcpu) {
        trap(v, (u64::from(esr::ec::WFX) << 26) | (1 << 25));
    }

    fn run0(handle: u16) -> Result<Exit, Error> {
        run(cpu(0), target(handle), [0; 4], [0; 2])
    }

    /// A VM with one page donated at [`IPA`] (frame 0).
    fn vm_with_a_page() -> u16 {
        let handle = create(cpu(0), ENTRY, 0, 1).unwrap();
        assert_eq!(status(handle), Status::Alive);
        donate(cpu(0), u64::from(handle), frame(0), 1, IPA).unwrap();
        handle
    }

    /// Destroys the VM and takes frame 0 back: its slot is free again.
    fn destroy_and_reclaim(handle: u16) {
        destroy(cpu(0), u64::from(handle)).unwrap();
        assert_eq!(status(handle), Status::Dying);
        // What a restarted ledger would be rebuilt from: a destroyed VM
        // still holding its page.
        {
            let idle = lock_all_idle().unwrap();
            let (_, dying, regions) = idle.records().find(|r| r.0 == handle).unwrap();
            assert!(dying);
            assert_eq!(regions.iter().map(|r| r.pa).collect::<Vec<_>>(), [frame(0)]);
        }
        reclaim(cpu(0), u64::from(handle), frame(0), 1).unwrap();
        assert_eq!(status(handle), Status::Free);
        assert_eq!(
            slot_of(u64::from(handle)).map(|_| ()),
            Err(Error::InvalidParameters)
        );
    }

    /// A run that starts a vCPU (CPU_ON) and fails a later check changes
    /// nothing: not the registers, not what was pending, and the vCPU is
    /// still to be reset on its next run.
    #[test]
    fn a_refused_run_of_a_starting_vcpu_leaves_it_unreset() {
        let _turn = turn();
        let mut st = VcpuState::new(1, None, false).unwrap();
        st.vcpu.regs.pc = 0x1234;
        st.vcpu.regs.x[5] = 5;
        st.pending = Pending::Hvc;
        let starting = Some((ENTRY, 7));
        // An injection, but the VM has no virtual GIC; then one that does
        // not decode.
        let no_gic = [Injection::new(40, 0x80).0, 0];
        let malformed = [u64::MAX, 0];
        for inject in [no_gic, malformed] {
            assert_eq!(
                prepare(&mut st, starting, [0; 4], inject),
                Err(Error::InvalidParameters)
            );
            assert_eq!((st.vcpu.regs.pc, st.vcpu.regs.x[5]), (0x1234, 5));
            assert!(matches!(st.pending, Pending::Hvc));
        }
        // The same start, well formed: the reset, and the host's answer to
        // a pending call is not applied over it.
        assert_eq!(prepare(&mut st, starting, [9; 4], [0; 2]), Ok(None));
        assert_eq!(st.vcpu.regs.pc, ENTRY);
        assert_eq!(st.vcpu.regs.x[..6], [7, 0, 0, 0, 0, 0]);
        assert!(matches!(st.pending, Pending::None));
    }

    #[test]
    fn the_lifecycle_refuses_each_call_out_of_order_with_a_typed_error() {
        let _turn = turn();
        let cpu = cpu(0);
        // Creation: unknown flags, a misaligned entry, too many vCPUs,
        // several without a virtual GIC, features the machine lacks.
        assert_eq!(create(cpu, ENTRY, 1 << 5, 1), Err(Error::InvalidParameters));
        assert_eq!(create(cpu, ENTRY + 2, 0, 1), Err(Error::InvalidParameters));
        assert_eq!(
            create(cpu, ENTRY, VmFlags::VGIC, 9),
            Err(Error::InvalidParameters)
        );
        assert_eq!(create(cpu, ENTRY, 0, 2), Err(Error::InvalidParameters));
        assert_eq!(
            create(cpu, ENTRY, VmFlags::MTE, 1),
            Err(Error::NotSupported)
        );
        assert_eq!(
            create(cpu, ENTRY, VmFlags::VGIC, 2),
            Err(Error::NotSupported)
        );
        // No VM yet.
        assert_eq!(run0(1), Err(Error::InvalidParameters));
        assert_eq!(destroy(cpu, 1), Err(Error::InvalidParameters));
        assert_eq!(destroy(cpu, 0), Err(Error::InvalidParameters));
        assert_eq!(destroy(cpu, 1 << 16), Err(Error::InvalidParameters));

        let mut regs = GuestRegs::default();
        regs.x[1] = ENTRY;
        assert_eq!(host_call(cpu, &mut regs, abi::VM_CREATE), Some(Ok(())));
        let handle = regs.x[1] as u16;
        assert_eq!(status(handle), Status::Alive);
        let h = u64::from(handle);
        // Reclaim is for a destroyed VM.
        assert_eq!(reclaim(cpu, h, frame(0), 1), Err(Error::Denied));
        // Donations: empty, misaligned, past the IPA space, over a page
        // already there.
        assert_eq!(
            donate(cpu, h, frame(0), 0, IPA),
            Err(Error::InvalidParameters)
        );
        assert_eq!(
            donate(cpu, h, frame(0) + 8, 1, IPA),
            Err(Error::InvalidParameters)
        );
        assert_eq!(
            donate(cpu, h, frame(0), 1, IPA + 8),
            Err(Error::InvalidParameters)
        );
        assert_eq!(
            donate(cpu, h, frame(0), 1, 1 << 48),
            Err(Error::InvalidParameters)
        );
        assert_eq!(donate(cpu, h, frame(0), 1, IPA), Ok(()));
        assert_eq!(
            donate(cpu, h, frame(1), 1, IPA),
            Err(Error::InvalidParameters)
        );
        // Runs: a target with bits past the vCPU, a vCPU no VM has, one
        // this VM lacks.
        assert_eq!(
            run(cpu, 1 << 32 | h, [0; 4], [0; 2]),
            Err(Error::InvalidParameters)
        );
        assert_eq!(
            run(cpu, abi::run_target(handle, 8), [0; 4], [0; 2]),
            Err(Error::InvalidParameters)
        );
        assert_eq!(
            run(cpu, abi::run_target(handle, 1), [0; 4], [0; 2]),
            Err(Error::InvalidParameters)
        );
        // A host in streaming mode is refused before anything is looked at.
        set_streaming_state(1);
        assert_eq!(run0(handle), Err(Error::Denied));
        set_streaming_state(0);
        // Injections need a virtual GIC; refused with the vCPU put back.
        let inject = [Injection::new(40, 0x80).0, 0];
        assert_eq!(
            run(cpu, target(handle), [0; 4], inject),
            Err(Error::InvalidParameters)
        );
        assert_eq!(entries_left(), 0, "nothing ran");
        // It runs; then an image can no longer be loaded.
        on_entry(|v| {
            assert_eq!(v.regs.pc, ENTRY);
            wfi(v);
        });
        assert_eq!(run0(handle).map(|e| e.reason), Ok(ExitReason::Wfi));
        assert_eq!(load(cpu, h, IPA, frame(2), 8), Err(Error::Denied));
        destroy_and_reclaim(handle);
        // Gone: every call about it is refused.
        assert_eq!(run0(handle), Err(Error::InvalidParameters));
        assert_eq!(
            donate(cpu, h, frame(0), 1, IPA),
            Err(Error::InvalidParameters)
        );
        assert_eq!(entries_left(), 0);
    }

    #[test]
    fn a_running_vcpu_is_busy_for_another_cpu_and_its_vm_is_left_alone() {
        let _turn = turn();
        let handle = vm_with_a_page();
        let h = u64::from(handle);
        on_entry(move |v| {
            // While CPU 0 runs the vCPU, CPU 1 asks for it, and for what
            // needs the VM idle: each is refused, nothing changed.
            set_mpidr(1);
            let other = cpu(1);
            assert_eq!(run(other, target(handle), [0; 4], [0; 2]), Err(Error::Busy));
            assert_eq!(donate(other, h, frame(1), 1, IPA + PAGE), Err(Error::Busy));
            assert_eq!(load(other, h, IPA, frame(2), 8), Err(Error::Busy));
            assert_eq!(destroy(other, h), Err(Error::Busy));
            assert_eq!(reclaim(other, h, frame(0), 1), Err(Error::Denied));
            assert_eq!(status(handle), Status::Alive);
            // The consistency checker leaves a running VM out.
            let idle = lock_all_idle().unwrap();
            assert_eq!(idle.running, 1);
            assert!(idle.stage2s().all(|(vm, _, _)| vm != handle));
            drop(idle);
            set_mpidr(0);
            wfi(v);
        });
        assert_eq!(run0(handle).map(|e| e.reason), Ok(ExitReason::Wfi));
        // Put back: another CPU may run it now, and flushes the VMID from
        // its TLB first (the vCPU last ran elsewhere); the same CPU again
        // does not.
        let vmid = VMID_BASE + handle - 1;
        take_partition_log();
        set_mpidr(1);
        on_entry(wfi);
        assert_eq!(
            run(cpu(1), target(handle), [0; 4], [0; 2]).map(|e| e.reason),
            Ok(ExitReason::Wfi)
        );
        on_entry(wfi);
        assert_eq!(
            run(cpu(1), target(handle), [0; 4], [0; 2]).map(|e| e.reason),
            Ok(ExitReason::Wfi)
        );
        set_mpidr(0);
        let flushes: Vec<_> = take_partition_log()
            .into_iter()
            .filter(|op| matches!(op, PartitionOp::InvalidateLocalVmid { .. }))
            .collect();
        assert_eq!(flushes, [PartitionOp::InvalidateLocalVmid { vmid }]);
        // And the VM, idle, can be changed again.
        assert_eq!(donate(cpu(0), h, frame(1), 1, IPA + PAGE), Ok(()));
        destroy(cpu(0), h).unwrap();
        reclaim(cpu(0), h, frame(1), 1).unwrap();
        assert_eq!(status(handle), Status::Dying);
        reclaim(cpu(0), h, frame(0), 1).unwrap();
        assert_eq!(status(handle), Status::Free);
    }

    #[test]
    fn the_host_gets_its_registers_back_and_the_guest_keeps_its_own() {
        let _turn = turn();
        let handle = vm_with_a_page();
        for w in 0..24 {
            set_el1_register(w, 0x1000 + w as u64);
        }
        let host_el1 = el1_registers();
        let mut host_fp = FpState::ZERO;
        host_fp.q[7] = 0x77;
        host_fp.fpcr = 0x300_0000;
        fpsimd::set_cpu_registers(host_fp);
        let host_el2 = el2_controls();
        assert_eq!(host_el2[..2], [0, 0], "not yet switched");
        on_entry(|v| {
            // The guest's state at reset: none of the host's.
            let el1 = el1_registers();
            assert_eq!(el1[0], moat_kernel::el2config::SCTLR_EL1_RESET);
            assert!(el1[1..].iter().all(|w| *w == 0));
            assert_eq!(fpsimd::cpu_registers(), FpState::ZERO);
            assert_ne!(el2_controls()[0], HOST_HCR);
            // It changes them, and calls the host.
            set_el1_register(4, 0xaaaa);
            let mut fp = FpState::ZERO;
            fp.q[0] = 0xbbbb;
            fpsimd::set_cpu_registers(fp);
            hvc(v, &[0xc600_0fff, 1, 2, 3, 4, 5]);
        });
        let exit = run0(handle).unwrap();
        assert_eq!(exit.reason, ExitReason::Hvc);
        assert_eq!(exit.detail, [0xc600_0fff, 1, 2, 3, 4, 5]);
        // The host's EL1, FP/SIMD and EL2 state, as it left them.
        assert_eq!(el1_registers(), host_el1);
        assert_eq!(fpsimd::cpu_registers(), host_fp);
        let host_vttbr = crate::base::state::machine().host_el2.vttbr;
        assert_eq!(el2_controls(), [HOST_HCR, HOST_CPTR, 0x6, 0x3, host_vttbr]);
        // The next run: the guest finds its own state, and the host's
        // answer to its call in x0..x3.
        on_entry(|v| {
            assert_eq!(el1_registers()[4], 0xaaaa);
            assert_eq!(fpsimd::cpu_registers().q[0], 0xbbbb);
            assert_eq!(v.regs.x[..4], [10, 11, 12, 13]);
            wfi(v);
        });
        let exit = run(cpu(0), target(handle), [10, 11, 12, 13], [0; 2]).unwrap();
        assert_eq!(exit.reason, ExitReason::Wfi);
        assert_eq!(el1_registers(), host_el1);
        assert_eq!(fpsimd::cpu_registers(), host_fp);
        // The guest's MPIDR names its vCPU while it runs; the CPU's after.
        let vmpidr: Vec<_> = take_partition_log()
            .into_iter()
            .filter_map(|op| match op {
                PartitionOp::SetVmpidr(v) => Some(v),
                _ => None,
            })
            .collect();
        assert_eq!(vmpidr, [1 << 31, 0, 1 << 31, 0]);
        destroy_and_reclaim(handle);
    }

    #[test]
    fn an_mmio_exit_is_answered_by_the_next_run_and_a_bad_answer_changes_nothing() {
        let _turn = turn();
        let handle = vm_with_a_page();
        // A 4-byte load into x5 from an IPA the VM does not map.
        let load_x5 =
            (u64::from(esr::ec::DABT_LOW) << 26) | (1 << 25) | (1 << 24) | (2 << 22) | (5 << 16);
        on_entry(move |v| {
            v.regs.pc = 0x9000;
            with_regs(|r| {
                r.fault_ipa = 0x0900_0000;
                r.far_el2 = 0xffff_0000_0900_0000;
            });
            trap(v, load_x5);
        });
        let exit = run0(handle).unwrap();
        assert_eq!(exit.reason, ExitReason::Mmio);
        assert_eq!(
            exit.detail[..3],
            [0x0900_0000, MmioAccess::new(false, 2, 5).0, 0]
        );
        // An answer with unknown bits is refused, the vCPU put back as it was.
        assert_eq!(
            run(cpu(0), target(handle), [0x1234, 1 << 9, 0, 0], [0; 2]),
            Err(Error::InvalidParameters)
        );
        // The value read: truncated to the access, in x5, past the load.
        on_entry(|v| {
            assert_eq!(v.regs.x[5], 0x5678_1234);
            assert_eq!(v.regs.pc, 0x9004);
            // A 2-byte store of x2: its value goes to the host.
            v.regs.x[2] = 0xabcd_ef01;
            trap(
                v,
                (u64::from(esr::ec::DABT_LOW) << 26)
                    | (1 << 25)
                    | (1 << 24)
                    | (1 << 22)
                    | (2 << 16)
                    | (1 << 6),
            );
        });
        let exit = run(
            cpu(0),
            target(handle),
            [0xffff_ffff_5678_1234, 0, 0, 0],
            [0; 2],
        )
        .unwrap();
        assert_eq!(exit.reason, ExitReason::Mmio);
        assert_eq!(exit.detail[1..3], [MmioAccess::new(true, 1, 2).0, 0xef01]);
        // The host finds no device: the store takes an abort at the
        // guest's vector, from the store itself.
        on_entry(|v| {
            assert_ne!(v.regs.pc, 0x9008);
            wfi(v);
        });
        let exit = run(cpu(0), target(handle), [0, MmioAnswer::ABORT, 0, 0], [0; 2]);
        assert_eq!(exit.map(|e| e.reason), Ok(ExitReason::Wfi));
        assert!(with_regs(|r| r.el1_exceptions) > 0);
        destroy_and_reclaim(handle);
    }

    #[test]
    fn guest_calls_are_served_and_power_calls_end_the_run() {
        let _turn = turn();
        let handle = vm_with_a_page();
        use ::smccc::psci::{
            PSCI_AFFINITY_INFO_64, PSCI_CPU_OFF, PSCI_CPU_ON_64, PSCI_FEATURES, PSCI_SYSTEM_OFF,
            PSCI_VERSION,
        };
        // A series of calls the core answers itself, one entry each.
        let calls: Vec<(Vec<u64>, u64)> = vec![
            (vec![u64::from(PSCI_VERSION)], 0x1_0000),
            (vec![u64::from(PSCI_FEATURES), u64::from(PSCI_CPU_OFF)], 0),
            (
                vec![u64::from(PSCI_FEATURES), 0x8400_00ff],
                smccc::NOT_SUPPORTED,
            ),
            (
                vec![u64::from(smccc::SMCCC_VERSION)],
                smccc::IMPLEMENTED_VERSION,
            ),
            (vec![u64::from(pkvm::HYP_MEMINFO), 0, 0, 0], PAGE),
            (
                vec![u64::from(pkvm::HYP_MEMINFO), 1, 0, 0],
                pkvm::INVALID_PARAMETER,
            ),
            (
                vec![u64::from(pkvm::MEM_SHARE), IPA, 1, 0],
                pkvm::INVALID_PARAMETER,
            ),
            (vec![u64::from(PSCI_AFFINITY_INFO_64), 0, 0], 0),
            (
                vec![u64::from(PSCI_AFFINITY_INFO_64), 5, 0],
                PSCI_INVALID_PARAMETERS,
            ),
            // CPU_ON of a vCPU the VM does not have.
            (
                vec![u64::from(PSCI_CPU_ON_64), 1, ENTRY, 0],
                PSCI_INVALID_PARAMETERS,
            ),
            (
                vec![u64::from(PSCI_CPU_ON_64), 0, ENTRY, 0],
                PSCI_ALREADY_ON,
            ),
            // An HVC with another immediate is not a call.
            (vec![], smccc::NOT_SUPPORTED),
        ];
        let answers = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let n = calls.len();
        for (i, (x, _)) in calls.iter().cloned().enumerate() {
            let answers = answers.clone();
            on_entry(move |v| {
                if i > 0 {
                    answers.borrow_mut().push(v.regs.x[0]);
                }
                if x.is_empty() {
                    trap(v, esr::HVC0 | 1);
                } else {
                    hvc(v, &x);
                }
            });
        }
        let answers2 = answers.clone();
        on_entry(move |v| {
            answers2.borrow_mut().push(v.regs.x[0]);
            // CPU_OFF: the run ends, and the vCPU is off.
            hvc(v, &[u64::from(PSCI_CPU_OFF)]);
        });
        let exit = run0(handle).unwrap();
        assert_eq!(exit.reason, ExitReason::VcpuPower);
        assert_eq!(exit.detail[0], abi::POWER_IS_OFF);
        let expected: Vec<u64> = calls.iter().map(|(_, a)| *a).collect();
        assert_eq!(*answers.borrow(), expected);
        assert_eq!(answers.borrow().len(), n);
        // An off vCPU does not run (nothing is queued: an entry would panic).
        let exit = run0(handle).unwrap();
        assert_eq!(
            (exit.reason, exit.detail[0]),
            (ExitReason::VcpuPower, abi::POWER_IS_OFF)
        );
        destroy_and_reclaim(handle);

        // SYSTEM_OFF: the VM is off for good; it gets no more memory and
        // runs no more, but can be destroyed.
        let handle = vm_with_a_page();
        let h = u64::from(handle);
        on_entry(|v| hvc(v, &[u64::from(PSCI_SYSTEM_OFF)]));
        let exit = run0(handle).unwrap();
        assert_eq!((exit.reason, exit.detail[0]), (ExitReason::Shutdown, 0));
        assert_eq!(status(handle), Status::Off);
        assert_eq!(run0(handle), Err(Error::Denied));
        assert_eq!(
            donate(cpu(0), h, frame(1), 1, IPA + PAGE),
            Err(Error::Denied)
        );
        assert_eq!(load(cpu(0), h, IPA, frame(2), 8), Err(Error::Denied));
        destroy_and_reclaim(handle);
    }

    #[test]
    fn a_guest_shares_its_pages_with_the_host_and_takes_them_back() {
        let _turn = turn();
        let handle = vm_with_a_page();
        let share = u64::from(abi::GUEST_SHARE_HOST);
        let unshare = u64::from(abi::GUEST_UNSHARE_HOST);
        let host_owns = |pa| {
            let _serial = MEMORY.lock();
            memory::host_stage2().maps_as_owner(pa, PAGE)
        };
        on_entry(move |v| hvc(v, &[share, IPA, 1]));
        on_entry(move |v| {
            assert_eq!(v.regs.x[0], 0);
            // Again: the page is shared already.
            hvc(v, &[share, IPA, 1]);
        });
        on_entry(move |v| {
            assert_ne!(v.regs.x[0], 0);
            // A page it does not have; a range past its pages.
            hvc(v, &[share, IPA + 16 * PAGE, 1]);
        });
        on_entry(move |v| {
            assert_eq!(v.regs.x[0], Error::InvalidParameters.to_x0());
            hvc(v, &[share, IPA, 2]);
        });
        on_entry(move |v| {
            assert_eq!(v.regs.x[0], Error::InvalidParameters.to_x0());
            wfi(v);
        });
        assert_eq!(run0(handle).map(|e| e.reason), Ok(ExitReason::Wfi));
        // Shared, the page is mapped for the host, but not as its own.
        let mapped = {
            let _serial = MEMORY.lock();
            memory::host_stage2().translate(frame(0)).is_some()
        };
        assert!(mapped);
        assert!(!host_owns(frame(0)));
        on_entry(move |v| hvc(v, &[unshare, IPA, 1]));
        on_entry(|v| {
            assert_eq!(v.regs.x[0], 0);
            wfi(v);
        });
        assert_eq!(run0(handle).map(|e| e.reason), Ok(ExitReason::Wfi));
        let mapped = {
            let _serial = MEMORY.lock();
            memory::host_stage2().translate(frame(0)).is_some()
        };
        assert!(!mapped);
        destroy_and_reclaim(handle);
        assert!(host_owns(frame(0)));
    }

    #[test]
    fn an_image_is_loaded_only_from_pages_the_host_shared_into_a_vm_that_never_ran() {
        let _turn = turn();
        let handle = vm_with_a_page();
        let h = u64::from(handle);
        let cpu = cpu(0);
        let src = frame(2);
        let text = b"guest image";
        // SAFETY: a test frame of the host's, which only this test uses.
        unsafe { core::ptr::copy_nonoverlapping(text.as_ptr(), src as *mut u8, text.len()) };
        // Not shared with the hypervisor yet.
        assert_eq!(
            load(cpu, h, IPA + 8, src, text.len() as u64),
            Err(Error::Denied)
        );
        let mut regs = GuestRegs::default();
        regs.x[1] = src;
        regs.x[2] = 1;
        assert_eq!(host_call(cpu, &mut regs, abi::HOST_SHARE_HYP), Some(Ok(())));
        // Empty, too long, outside RAM, into an IPA the VM lacks.
        assert_eq!(load(cpu, h, IPA, src, 0), Err(Error::InvalidParameters));
        assert_eq!(
            load(cpu, h, IPA, src, MAX_LOAD + 1),
            Err(Error::InvalidParameters)
        );
        assert_eq!(load(cpu, h, IPA, 0x1000, 8), Err(Error::InvalidParameters));
        assert_eq!(
            load(cpu, h, IPA + PAGE, src, 8),
            Err(Error::InvalidParameters)
        );
        assert_eq!(load(cpu, h, IPA + 8, src, text.len() as u64), Ok(()));
        let mut copied = [0u8; 11];
        // SAFETY: the VM's frame, which only this test uses.
        unsafe {
            core::ptr::copy_nonoverlapping((frame(0) + 8) as *const u8, copied.as_mut_ptr(), 11)
        };
        assert_eq!(&copied, text);
        assert_eq!(
            host_call(cpu, &mut regs, abi::HOST_UNSHARE_HYP),
            Some(Ok(()))
        );
        assert_eq!(host_call(cpu, &mut regs, 0xc600_0fff), None);
        destroy_and_reclaim(handle);
    }

    /// A system-register access's syndrome: `(op0, op1, CRn, CRm, op2)`,
    /// `rt`, whether it reads.
    fn sysreg_esr(enc: (u64, u64, u64, u64, u64), rt: u64, read: bool) -> u64 {
        let (op0, op1, crn, crm, op2) = enc;
        (u64::from(esr::ec::SYS64) << 26)
            | (1 << 25)
            | (op0 << 20)
            | (op2 << 17)
            | (op1 << 14)
            | (crn << 10)
            | (rt << 5)
            | (crm << 1)
            | u64::from(read)
    }

    #[test]
    fn traps_the_core_can_answer_go_back_into_the_guest() {
        let _turn = turn();
        let handle = vm_with_a_page();
        let undefs_before = with_regs(|r| r.el1_exceptions);
        with_regs(|r| r.id_registers[4][0] = 0x1100_0000_0011_1111);
        let smc = |v: &mut Vcpu, imm: u64, x0: u32| {
            v.regs.x[0] = u64::from(x0);
            v.regs.pc = 0x2000;
            trap(v, (u64::from(esr::ec::SMC64) << 26) | (1 << 25) | imm);
        };
        // Each entry checks what the core did with the trap before it.
        on_entry(move |v| smc(v, 0, ::smccc::psci::PSCI_VERSION));
        on_entry(move |v| {
            // A trapped SMC leaves ELR at the SMC: the core steps over it.
            assert_eq!((v.regs.x[0], v.regs.pc), (0x1_0000, 0x2004));
            smc(v, 1, 0);
        });
        on_entry(|v| {
            assert_eq!((v.regs.x[0], v.regs.pc), (smccc::NOT_SUPPORTED, 0x2004));
            hvc(v, &[u64::from(pkvm::CALL_UID)]);
        });
        on_entry(|v| {
            assert_eq!(v.regs.x[..4], pkvm::UID);
            hvc(v, &[u64::from(pkvm::FEATURES)]);
        });
        on_entry(|v| {
            assert_eq!(v.regs.x[0], pkvm::FEATURE_BITS);
            hvc(v, &[u64::from(hypercall::ABI_VERSION)]);
        });
        on_entry(|v| {
            assert_eq!(v.regs.x[..2], [0, u64::from(moat_abi::ABI_VERSION)]);
            // DC ISW: set/way maintenance is a no-op, stepped over.
            v.regs.pc = 0x3000;
            trap(v, sysreg_esr((1, 0, 7, 6, 2), 1, false));
        });
        on_entry(|v| {
            assert_eq!(v.regs.pc, 0x3004);
            // MRS x3, ID_AA64PFR0_EL1: the hardware's, less what a VM lacks.
            trap(v, sysreg_esr((3, 0, 0, 4, 0), 3, true));
        });
        on_entry(|v| {
            let want = vmfeatures::vm_view(4, 0, 0x1100_0000_0011_1111, false);
            assert_eq!((v.regs.x[3], v.regs.pc), (want, 0x3008));
            // Any other register goes to the policy service that decides
            // system-register traps (ECHO), paused out of the VM.
            trap(v, sysreg_esr((3, 0, 1, 0, 1), 2, false));
        });
        on_entry(move |v| {
            use crate::partition::service::tests::{ECHO, read_call, reply_wait, write_reply};
            let (call, body) = read_call(ECHO);
            assert_eq!(call.operation, moat_abi::trap::DECIDE_OPERATION);
            // The VM is named as the partition that trapped.
            assert_eq!(
                (body[0] >> 32) as u16,
                moat_abi::trap::PARTITION_VM_BASE + handle
            );
            // It says UNDEF.
            let undef = moat_abi::trap::Verdict {
                action: moat_abi::trap::Action::InjectUndef as u32,
                reserved: 0,
                value: 0,
            };
            let words: [u64; 2] = zerocopy::transmute!(undef);
            let reply = moat_abi::ipc::MessageHeader::reply_to(&call, Ok(()), 16);
            write_reply(ECHO, &reply, &words);
            reply_wait(v);
        });
        on_entry(|v| {
            // An instruction the core does not know: UNDEF too.
            trap(v, 1 << 25);
        });
        on_entry(|v| {
            // A fetch from an IPA the VM lacks: an abort, no MMIO exit.
            with_regs(|r| r.far_el2 = 0x7000);
            trap(v, (u64::from(esr::ec::IABT_LOW) << 26) | (1 << 25) | 0x6);
        });
        on_entry(|v| {
            // WFE without a virtual GIC: the host decides when it runs.
            trap(v, (u64::from(esr::ec::WFX) << 26) | (1 << 25) | 1);
        });
        let exit = run0(handle).unwrap();
        assert_eq!(
            exit,
            Exit {
                reason: ExitReason::Wfi,
                detail: [0; 6]
            }
        );
        assert_eq!(entries_left(), 0);
        // Two UNDEFs and an abort, each an exception at the guest's EL1.
        assert_eq!(with_regs(|r| r.el1_exceptions), undefs_before + 3);

        // A host interrupt ends the run for the host to take.
        on_entry(|v| v.exit_vector = LOWER_IRQ);
        assert_eq!(run0(handle).map(|e| e.reason), Ok(ExitReason::Interrupt));
        // The pKVM guest ABI's share and unshare of one granule.
        on_entry(|v| hvc(v, &[u64::from(pkvm::MEM_SHARE), IPA, 0, 0]));
        on_entry(|v| {
            assert_eq!(v.regs.x[0], 0);
            hvc(v, &[u64::from(pkvm::MEM_UNSHARE), IPA, 0, 0]);
        });
        on_entry(|v| {
            assert_eq!(v.regs.x[0], 0);
            hvc(v, &[u64::from(pkvm::MEM_SHARE), IPA + 64 * PAGE, 0, 0]);
        });
        on_entry(|v| {
            assert_eq!(v.regs.x[0], pkvm::INVALID_PARAMETER);
            hvc(v, &[u64::from(::smccc::psci::PSCI_SYSTEM_RESET)]);
        });
        let exit = run0(handle).unwrap();
        assert_eq!((exit.reason, exit.detail[0]), (ExitReason::Shutdown, 1));
        assert_eq!(status(handle), Status::Off);
        destroy_and_reclaim(handle);

        // An exception vector no correctly configured VM can reach (an
        // SError): the VM is off.
        let handle = vm_with_a_page();
        on_entry(|v| {
            v.exit_vector = 11;
            v.exit_esr = 0xbf00_0000;
        });
        let exit = run0(handle).unwrap();
        assert_eq!(
            (exit.reason, exit.detail[0]),
            (ExitReason::Crashed, 0xbf00_0000)
        );
        assert_eq!(status(handle), Status::Off);
        assert_eq!(run0(handle), Err(Error::Denied));
        destroy_and_reclaim(handle);
    }
}
