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
                // After the ISB that puts the host's CPTR_EL2 in effect
                // (`fpsimd::load_z`).
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
        let prepared = prepare(vm, index, st, starting, answer, inject);
        let abort = match prepared {
            Ok(abort) => abort,
            Err(e) => {
                let _ = vm.loads.put(index, cpu.index);
                return Err(e);
            }
        };
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
/// injections. On an error nothing of the vCPU changed (but a CPU_ON's
/// reset). `Ok(Some(is_write))`: the host asked for an abort of the MMIO
/// access.
fn prepare(
    vm: &mut Vm,
    index: usize,
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
        vm.power[index] = Power::On;
    }
    // The answer to an MMIO exit, checked before anything is taken.
    // (r1 is looked at first: after any other exit it is free.)
    if MmioAnswer(answer[1]).aborts().is_none() && matches!(st.pending, Pending::Mmio(_)) {
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
        let v = st.vgic.as_mut().ok_or(Error::InvalidParameters)?;
        if !v.has_room(count) {
            return Err(Error::NoMemory);
        }
        for &(intid, priority, notify_eoi) in &injections[..count] {
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
