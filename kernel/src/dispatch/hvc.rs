//! SMCCC calls from the host: the standard queries, the PSCI relay and
//! Moat's own hypercalls.
//!
//! Results follow SMCCC: x0 is the status (or the first result), x1..x3 the
//! rest; an unknown function answers NOT_SUPPORTED (-1) and changes nothing.

use crate::base::cpu::{self, PerCpu, PowerState};
use crate::base::state::machine;
use moat_abi::ipc::{HOST_REPLY_BYTES, HOST_REQUEST_BYTES, MessageHeader};
use moat_abi::{ABI_VERSION, Error, MOAT_UID, hypercall, smccc};
use moat_kernel::psci::{self, PsciCall, ret};
use moat_kernel::regs::GuestRegs;

const NOT_SUPPORTED: u64 = smccc::NOT_SUPPORTED;

fn psci_result(regs: &mut GuestRegs, code: i64) {
    regs.set_smccc_result([code as u64, 0, 0, 0]);
}

/// Handles one SMCCC call whose registers are in `regs`.
pub fn handle_call(this_cpu: &PerCpu, regs: &mut GuestRegs, imm: u16) {
    let function = regs.x[0] as u32;
    if imm != 0 {
        // SMCCC reserves non-zero immediates.
        regs.x[0] = NOT_SUPPORTED;
        return;
    }
    match smccc::owner(function) {
        smccc::OWNER_ARCH => arch_call(regs, function),
        smccc::OWNER_STANDARD if psci::is_psci(function) => psci_call(this_cpu, regs, function),
        smccc::OWNER_VENDOR_HYP => {
            match crate::partition::service::routes().and_then(|r| r.hypercall(function)) {
                Some((index, operation)) => service_call(this_cpu, regs, index, operation),
                None => moat_call(this_cpu, regs, function),
            }
        }
        _ => regs.x[0] = NOT_SUPPORTED,
    }
}

fn arch_call(regs: &mut GuestRegs, function: u32) {
    regs.x[0] = match function {
        smccc::SMCCC_VERSION => smccc::IMPLEMENTED_VERSION,
        smccc::SMCCC_ARCH_FEATURES => match regs.x[1] as u32 {
            smccc::SMCCC_VERSION | smccc::SMCCC_ARCH_FEATURES => 0,
            // The Spectre workarounds and SoC id are not offered.
            _ => NOT_SUPPORTED,
        },
        _ => NOT_SUPPORTED,
    };
}

fn moat_call(this_cpu: &PerCpu, regs: &mut GuestRegs, function: u32) {
    // A restart the host asks for tries the ledger once: not a first time
    // here when it is down, then again for the request.
    if function == hypercall::LEDGER_RESTART {
        regs.x[0] = match crate::partition::ledger_restart::request_restart(this_cpu) {
            Ok(()) => 0,
            Err(e) => e.to_x0(),
        };
        return;
    }
    // A ledger being restarted comes back at the first call that finds no
    // VM running (one atomic load when it is up).
    let ledger = crate::partition::ledger_restart::poll(this_cpu);
    if let Some(result) = crate::partition::vm::host_call(this_cpu, regs, function) {
        match result {
            Ok(()) => regs.x[0] = 0,
            // As for a service call: with its interrupts unmasked the host
            // takes its interrupt and then issues the call again.
            Err(Error::Interrupted) if regs.pstate & PSTATE_I == 0 => {
                regs.pc = regs.pc.wrapping_sub(4)
            }
            Err(e) => regs.x[0] = e.to_x0(),
        }
        return;
    }
    match function {
        hypercall::NULL => regs.x[0] = 0,
        hypercall::ABI_VERSION => regs.set_smccc_result([0, u64::from(ABI_VERSION), 0, 0]),
        hypercall::CHECK_CONSISTENCY if ledger.is_err() => {
            regs.x[0] = ledger.err().map_or(0, Error::to_x0);
        }
        hypercall::CHECK_CONSISTENCY => {
            let ok = report_consistency(this_cpu);
            regs.x[0] = match ok {
                true => 0,
                // The ledger failed while it was being read: it is being
                // restarted, not wrong.
                false if crate::memory::ledger_restart::is_down() => {
                    crate::memory::ledger_restart::unavailable().to_x0()
                }
                false => Error::Denied.to_x0(),
            };
            // The DMA faults the SMMU recorded so far (the checker drained them).
            regs.x[1] = crate::memory::smmu::faults();
        }
        smccc::VENDOR_HYP_CALL_UID => {
            let [a, b, c, d] = MOAT_UID.map(u64::from);
            regs.set_smccc_result([a, b, c, d]);
        }
        smccc::VENDOR_HYP_REVISION => regs.set_smccc_result([
            u64::from(ABI_VERSION >> 16),
            u64::from(ABI_VERSION & 0xffff),
            0,
            0,
        ]),
        _ => regs.x[0] = NOT_SUPPORTED,
    }
}

/// A host hypercall routed to a service: x1..x6 are the request's 48 bytes,
/// the reply's 56 bytes come back in x1..x7 with the status in x0.
pub fn service_call(this_cpu: &PerCpu, regs: &mut GuestRegs, index: usize, operation: u16) {
    use crate::partition::service;
    let Some(s) = service::get(index) else {
        regs.x[0] = NOT_SUPPORTED;
        return;
    };
    // Little-endian words: register n is request bytes 8(n-1)..8n.
    let mut body = [
        regs.x[1], regs.x[2], regs.x[3], regs.x[4], regs.x[5], regs.x[6], 0, 0,
    ];
    let header = MessageHeader::call(
        s.interface_id,
        operation,
        s.next_sequence(),
        HOST_REQUEST_BYTES as u32,
    );
    match s.call(this_cpu, &header, &mut body, service::Preemption::Allowed) {
        Ok(Ok(len)) if len as usize <= HOST_REPLY_BYTES => {
            // Bytes past the reply's length come back as zero, never as
            // whatever the service left in its IPC page.
            let len = len as usize;
            regs.x[0] = 0;
            for (i, x) in regs.x[1..8].iter_mut().enumerate() {
                *x = match len.saturating_sub(i * 8) {
                    0 => 0,
                    n if n >= 8 => body[i],
                    n => body[i] & ((1u64 << (n * 8)) - 1),
                };
            }
        }
        Ok(Ok(_)) => regs.x[0] = Error::InvalidParameters.to_x0(),
        Ok(Err(e)) => regs.x[0] = e.to_x0(),
        // With its interrupts unmasked the host takes its interrupt on return
        // and then re-executes the call, which finishes the suspended one.
        Err(Error::Interrupted) if regs.pstate & PSTATE_I == 0 => regs.pc = regs.pc.wrapping_sub(4),
        Err(e) => regs.x[0] = e.to_x0(),
    }
}

/// PSTATE.I: IRQs masked.
const PSTATE_I: u64 = 1 << 7;

fn forward(function: u32, regs: &GuestRegs) -> [u64; 18] {
    let mut args = [0u64; 17];
    args[..3].copy_from_slice(&regs.x[1..4]);
    machine().firmware.call(function, args)
}

fn psci_call(this_cpu: &PerCpu, regs: &mut GuestRegs, function: u32) {
    if machine().core_powers_cpus {
        return crate::partition::power::psci_call(this_cpu, regs, function);
    }
    match psci::decode(function, regs.x[1], regs.x[2], regs.x[3]) {
        PsciCall::Forward {
            function,
            ends_machine,
        } => {
            if ends_machine {
                crate::log!(
                    "host CPU {} asked for {}; handing over to firmware",
                    this_cpu.index,
                    match function {
                        smccc_psci::PSCI_SYSTEM_OFF => "SYSTEM_OFF",
                        smccc_psci::PSCI_SYSTEM_RESET => "SYSTEM_RESET",
                        _ => "SYSTEM_RESET2",
                    }
                );
                crate::base::console::flush();
            }
            let r = forward(function, regs);
            regs.set_smccc_result([r[0], 0, 0, 0]);
        }
        PsciCall::Features { queried } => {
            let r = if queried == smccc::SMCCC_VERSION {
                ret::SUCCESS as u64
            } else if psci::relay_supports(queried) {
                let mut args = [0u64; 17];
                args[0] = u64::from(queried);
                machine().firmware.call(function, args)[0]
            } else {
                NOT_SUPPORTED
            };
            regs.set_smccc_result([r, 0, 0, 0]);
        }
        PsciCall::CpuOn {
            target_mpidr,
            entry,
            context,
        } => {
            let code = cpu_on(target_mpidr, entry, context, function);
            psci_result(regs, code);
        }
        PsciCall::CpuOff => {
            this_cpu.set_power(PowerState::Off);
            let r = forward(function, regs);
            // CPU_OFF only returns on failure.
            this_cpu.set_power(PowerState::On);
            psci_result(regs, r[0] as i64);
        }
        PsciCall::CpuSuspend {
            power_state,
            entry,
            context,
        } => {
            let powerdown = psci::is_powerdown_state(power_state, suspend_format());
            if powerdown {
                this_cpu.set_host_entry(entry, context);
                this_cpu.set_power(PowerState::Suspended);
            }
            let mut args = [0u64; 17];
            args[0] = power_state;
            args[1] = crate::arch::secondary_entry();
            args[2] = this_cpu.index as u64;
            let r = machine().firmware.call(function | (1 << 30), args);
            // Back here: a standby state, or a refused request.
            this_cpu.set_power(PowerState::On);
            psci_result(regs, r[0] as i64);
        }
        PsciCall::NotSupported => psci_result(regs, ret::NOT_SUPPORTED),
    }
}

/// The power_state format firmware uses, asked once with
/// PSCI_FEATURES(CPU_SUSPEND): the same answer the host gets when it asks
/// (the relay forwards that query), so host and core read the argument alike.
fn suspend_format() -> psci::PowerStateFormat {
    static FORMAT: spin::Once<psci::PowerStateFormat> = spin::Once::new();
    *FORMAT.call_once(|| {
        let mut args = [0u64; 17];
        args[0] = u64::from(smccc_psci::PSCI_CPU_SUSPEND_64);
        let answer = machine().firmware.call(smccc_psci::PSCI_FEATURES, args)[0];
        psci::PowerStateFormat::from_features(answer)
    })
}

/// CPU_ON through the core: the firmware starts the CPU in the core's
/// `secondary_entry` with the logical index as context, and the core then
/// enters the host at `entry` with `context` in x0.
fn cpu_on(target_mpidr: u64, entry: u64, context: u64, function: u32) -> i64 {
    let (index, slot) = match crate::partition::power::claim_for_cpu_on(target_mpidr, entry) {
        Ok(claimed) => claimed,
        Err(code) => return code,
    };
    slot.set_host_entry(entry, context);
    let m = machine();
    let target = psci::mpidr_affinity(target_mpidr);
    let mut args = [0u64; 17];
    args[0] = target;
    args[1] = crate::arch::secondary_entry();
    args[2] = index as u64;
    // Always the SMC64 form: the core's entry point is a 64-bit address.
    let r = m.firmware.call(function | (1 << 30), args)[0] as i64;
    if r != ret::SUCCESS {
        slot.set_power(PowerState::Off);
    }
    r
}

use ::smccc::psci as smccc_psci;

/// Runs the consistency checker (the ledger against every partition's
/// stage-2) and logs the outcome; returns whether they agree.
pub fn report_consistency(cpu: &cpu::PerCpu) -> bool {
    use crate::memory::Mismatch;
    let checked = crate::partition::check_consistency(cpu);
    match checked {
        Ok(c) => {
            crate::log!(
                "consistency: the ledger and the stage-2 tables agree ({} extent(s); host, {} service(s), {} VM(s), {} GIC table(s) and {} SMMU stream(s) checked{})",
                c.extents,
                c.services,
                c.vms,
                c.gic_tables,
                c.smmu_streams,
                if c.vms_running > 0 {
                    ", running VMs skipped"
                } else {
                    ""
                }
            );
            true
        }
        Err(Mismatch::Host {
            address,
            host_may_map,
        }) => {
            crate::log!(
                "consistency: MISMATCH at {address:#x}: the ledger says the host {} map it, its stage-2 disagrees",
                if host_may_map { "may" } else { "may not" }
            );
            false
        }
        Err(Mismatch::Forged { whose, leaf }) => {
            crate::log!(
                "consistency: MISMATCH: {whose} maps frame {:#x} at IPA {:#x}: {}",
                leaf.pa,
                leaf.ipa,
                leaf.why.describe()
            );
            false
        }
        Err(Mismatch::VmPageCount {
            handle,
            mapped,
            owned,
        }) => {
            crate::log!(
                "consistency: MISMATCH: VM {handle} maps {mapped} page(s), the ledger gives it {owned}"
            );
            false
        }
        Err(Mismatch::Gic { address, why }) => {
            crate::log!("consistency: MISMATCH at {address:#x}: {why}");
            false
        }
        Err(Mismatch::Smmu(why)) => {
            crate::log!(
                "consistency: MISMATCH: the SMMU's stream table no longer sends every stream through the host's stage-2: {why}"
            );
            false
        }
        Err(Mismatch::HypShare { address }) => {
            crate::log!(
                "consistency: MISMATCH at {address:#x}: the core's record of host pages shared with the hypervisor and the ledger's differ"
            );
            false
        }
        Err(Mismatch::NoMemory) => {
            crate::log!("consistency: not checked: the heap has no room for the checker's records");
            false
        }
        Err(Mismatch::Ledger(e)) => {
            crate::log!("consistency: the ledger could not be read ({e:?})");
            false
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! The host's calls as the trap path hands them over (`handle_call`
    //! with the host's saved registers), over the services' machine
    //! (`partition::service::tests`: the memory tests' RAM and ledger, and
    //! services whose runs the test scripts). A refused call must answer
    //! its typed error in x0 and change nothing else: not the host's other
    //! registers, not the ledger, not the host's stage-2, not the record of
    //! pages shared with the hypervisor.

    use super::*;
    use crate::arch::entries_left;
    use crate::memory::ledger_restart::{HYP_SHARES, host_mapped};
    use crate::memory::tests::{RAM_SIZE, world};
    use crate::memory::{Ledger as _, PAGE};
    use crate::partition::service::tests::{ECHO, ECHO_FUNCTIONS, answer, cpu, services};
    use moat_abi::services::LedgerExtent;
    use moat_abi::vm as abi;

    /// Where these tests' frames are in the test RAM (the memory tests
    /// use the first 6 MiB, the VM tests the last).
    const FRAMES: u64 = (6 << 20) + (512 << 10);

    /// The last page of the address space.
    const LAST_PAGE: u64 = !(PAGE - 1);

    pub(crate) fn frame(n: u64) -> u64 {
        world().ram + FRAMES + n * PAGE
    }

    /// The host's registers for a call of `function` with `args` in x1...;
    /// the others hold marks, to be found unchanged.
    pub(crate) fn host_regs(function: u32, args: &[u64]) -> GuestRegs {
        let mut regs = GuestRegs::default();
        for (i, x) in regs.x.iter_mut().enumerate() {
            *x = 0xa000 + i as u64;
        }
        regs.x[0] = u64::from(function);
        regs.x[1..=args.len()].copy_from_slice(args);
        regs.pc = 0x8_1004;
        regs.pstate = 0x3c5;
        regs
    }

    pub(crate) fn call(function: u32, args: &[u64]) -> GuestRegs {
        let mut regs = host_regs(function, args);
        handle_call(cpu(0), &mut regs, 0);
        regs
    }

    /// The call was refused with `error` and the host's registers are as
    /// it left them but x0.
    #[track_caller]
    pub(crate) fn refused(function: u32, args: &[u64], error: Error) {
        let before = host_regs(function, args);
        let after = call(function, args);
        assert_eq!(
            Error::from_x0(after.x[0]),
            Some(Err(error)),
            "{function:#x} {args:#x?}"
        );
        assert_eq!(after.x[1..], before.x[1..], "{function:#x} {args:#x?}");
        assert_eq!((after.pc, after.pstate), (before.pc, before.pstate));
    }

    /// The memory as the core knows it: every extent of the ledger, the
    /// RAM the host's stage-2 maps, the pages shared with the hypervisor.
    pub(crate) type MemoryState = (Vec<LedgerExtent>, Vec<(u64, u64)>, Vec<(u64, u64)>);

    pub(crate) fn memory_state() -> MemoryState {
        let w = world();
        let extents = (0..)
            .map_while(|n| w.ledger.extent(cpu(0), n).ok())
            .collect();
        let mapped = host_mapped(&[(w.ram, RAM_SIZE)]).unwrap();
        let shares = HYP_SHARES.lock().iter().collect();
        (extents, mapped, shares)
    }

    #[test]
    fn the_standard_queries_are_answered_and_unknown_functions_change_nothing() {
        let _turn = services();
        assert_eq!(
            call(smccc::SMCCC_VERSION, &[]).x[0],
            smccc::IMPLEMENTED_VERSION
        );
        let features = |f: u32| call(smccc::SMCCC_ARCH_FEATURES, &[u64::from(f)]).x[0];
        assert_eq!(features(smccc::SMCCC_VERSION), 0);
        assert_eq!(features(smccc::SMCCC_ARCH_FEATURES), 0);
        // SMCCC_ARCH_WORKAROUND_1: not offered.
        assert_eq!(features(0x8000_8000), NOT_SUPPORTED);
        // Moat's own: NULL, the ABI version, the UID and the revision.
        let r = call(hypercall::NULL, &[]);
        assert_eq!((r.x[0], r.x[1]), (0, 0xa001));
        let r = call(hypercall::ABI_VERSION, &[]);
        assert_eq!(r.x[..4], [0, u64::from(ABI_VERSION), 0, 0]);
        let r = call(smccc::VENDOR_HYP_CALL_UID, &[]);
        assert_eq!(r.x[..4], MOAT_UID.map(u64::from));
        let r = call(smccc::VENDOR_HYP_REVISION, &[]);
        assert_eq!(r.x[..2], [u64::from(ABI_VERSION >> 16), 0]);
        // SMCCC reads W0: the upper half of x0 is no part of the function.
        let mut regs = host_regs(hypercall::ABI_VERSION, &[]);
        regs.x[0] |= 0xffff_ffff << 32;
        handle_call(cpu(0), &mut regs, 0);
        assert_eq!(regs.x[1], u64::from(ABI_VERSION));
        // Unknown: an architecture call, another owner's, one of Moat's
        // functions that does not exist, the last function of all, and a
        // routed range's function no service serves.
        let unrouted = hypercall::id(hypercall::SERVICE_RANGE_START + ECHO_FUNCTIONS);
        for function in [
            0x8000_00ff,
            0x8300_0001,
            hypercall::id(0x0fff),
            u32::MAX,
            unrouted,
        ] {
            refused(function, &[1, 2, 3], Error::NotSupported);
        }
        // A non-zero immediate is reserved: nothing is answered but that.
        let mut regs = host_regs(hypercall::ABI_VERSION, &[]);
        let before = regs;
        handle_call(cpu(0), &mut regs, 1);
        assert_eq!(regs.x[0], NOT_SUPPORTED);
        assert_eq!(regs.x[1..], before.x[1..]);
        assert_eq!(entries_left(), 0);
    }

    #[test]
    fn hostile_share_arguments_get_their_typed_error_and_change_nothing() {
        use Error::{Denied, InvalidParameters};
        let _turn = services();
        let ram = world().ram;
        let end = ram + RAM_SIZE;
        let before = memory_state();
        for function in [abi::HOST_SHARE_HYP, abi::HOST_UNSHARE_HYP] {
            // Misaligned, empty, a count whose bytes overflow, a range that
            // runs past the address space: refused before the ledger is
            // asked.
            for (pa, pages) in [
                (frame(0) + 8, 1),
                (frame(0) + PAGE - 1, 1),
                (frame(0), 0),
                (frame(0), u64::MAX),
                (frame(0), u64::MAX / PAGE),
                (frame(0), 1 << 52),
                (LAST_PAGE, 2),
                (u64::MAX, 1),
            ] {
                refused(function, &[pa, pages], InvalidParameters);
            }
        }
        // Past RAM, below it, at 0, the last page of all: frames the
        // ledger does not know.
        for pa in [end, ram - PAGE, 0, LAST_PAGE] {
            refused(abi::HOST_SHARE_HYP, &[pa, 1], InvalidParameters);
            refused(abi::HOST_UNSHARE_HYP, &[pa, 1], InvalidParameters);
        }
        // Straddling RAM's end: not all frames are known (to share), the
        // first was never shared (to unshare).
        refused(abi::HOST_SHARE_HYP, &[end - PAGE, 2], InvalidParameters);
        refused(abi::HOST_UNSHARE_HYP, &[end - PAGE, 2], Denied);
        // A page the host never shared cannot be unshared.
        refused(abi::HOST_UNSHARE_HYP, &[frame(0), 1], Denied);
        assert_eq!(memory_state(), before);
        // A good share is recorded, a second of the same page refused, and
        // the unshare puts everything back.
        assert_eq!(call(abi::HOST_SHARE_HYP, &[frame(0), 2]).x[0], 0);
        let shared = memory_state();
        assert_ne!(shared, before);
        assert!(shared.2.contains(&(frame(0), 2 * PAGE)));
        refused(abi::HOST_SHARE_HYP, &[frame(1), 1], Denied);
        assert_eq!(memory_state(), shared);
        assert_eq!(call(abi::HOST_UNSHARE_HYP, &[frame(0), 2]).x[0], 0);
        assert_eq!(memory_state(), before);
    }

    #[test]
    fn hostile_vm_calls_get_their_typed_error_and_leave_other_partitions_pages_alone() {
        use Error::{Denied, InvalidParameters};
        let _turn = services();
        let before = memory_state();
        // Creation: unknown flags, a misaligned entry, too many vCPUs.
        refused(abi::VM_CREATE, &[0x8_0000, 1 << 63, 1], InvalidParameters);
        refused(abi::VM_CREATE, &[0x8_0002, 0, 1], InvalidParameters);
        refused(abi::VM_CREATE, &[0x8_0000, 0, u64::MAX], InvalidParameters);
        let create = || {
            let r = call(abi::VM_CREATE, &[0x8_0000, 0, 1]);
            assert_eq!(r.x[0], 0);
            u64::from(r.x[1] as u16)
        };
        let (a, b) = (create(), create());
        assert_ne!(a, b);
        assert_eq!(call(abi::VM_DONATE, &[a, frame(2), 1, 0x4000_0000]).x[0], 0);
        let setup = memory_state();
        assert_ne!(setup, before);
        // Handles that name no VM; ranges that are misaligned, empty,
        // overflowing, past RAM or past the IPA space.
        for handle in [0, u64::MAX, 1 << 16 | a, abi::MAX_VMS as u64 + 1] {
            refused(abi::VM_DONATE, &[handle, frame(3), 1, 0], InvalidParameters);
            refused(abi::VM_DESTROY, &[handle], InvalidParameters);
            refused(abi::VM_RECLAIM, &[handle, frame(2), 1], InvalidParameters);
        }
        for (pa, pages, ipa) in [
            (frame(3) + 8, 1, 0),
            (frame(3), 1, 8),
            (frame(3), 0, 0),
            (frame(3), u64::MAX, 0),
            (frame(3), 1, LAST_PAGE),
            (frame(3), 1, 1 << 48),
            (frame(3), 2, (1 << 48) - PAGE),
        ] {
            refused(abi::VM_DONATE, &[b, pa, pages, ipa], InvalidParameters);
        }
        refused(
            abi::VM_DONATE,
            &[b, world().ram + RAM_SIZE, 1, 0],
            InvalidParameters,
        );
        // Another partition's page: VM a's, for VM b, for the host to
        // share, for a to take twice (the IPA is taken too).
        refused(abi::VM_DONATE, &[b, frame(2), 1, 0], Denied);
        refused(abi::HOST_SHARE_HYP, &[frame(2), 1], Denied);
        refused(abi::VM_DONATE, &[a, frame(2), 1, 0x5000_0000], Denied);
        refused(
            abi::VM_DONATE,
            &[a, frame(3), 1, 0x4000_0000],
            InvalidParameters,
        );
        // A live VM's pages are not reclaimed; a dying one's only by it.
        refused(abi::VM_RECLAIM, &[a, frame(2), 1], Denied);
        assert_eq!(memory_state(), setup);
        assert_eq!(call(abi::VM_DESTROY, &[a]).x[0], 0);
        refused(abi::VM_DESTROY, &[a], Denied);
        refused(abi::VM_RECLAIM, &[a, frame(3), 1], Denied);
        refused(abi::VM_RECLAIM, &[a, frame(2), u64::MAX], InvalidParameters);
        refused(abi::VM_RECLAIM, &[b, frame(2), 1], Denied);
        assert_eq!(call(abi::VM_RECLAIM, &[a, frame(2), 1]).x[0], 0);
        assert_eq!(call(abi::VM_DESTROY, &[b]).x[0], 0);
        assert_eq!(memory_state(), before);
    }

    #[test]
    fn a_routed_call_carries_the_request_in_registers_and_never_more_than_the_reply() {
        let _turn = services();
        let function = hypercall::id(hypercall::SERVICE_RANGE_START + 1);
        let args = [1, 2, 3, 4, 5, 6];
        // 13 bytes of reply: x1 whole, five bytes of x2, nothing after,
        // whatever else the service left in its page.
        crate::arch::on_entry(|v| {
            use crate::partition::service::tests::{read_call, reply_wait, write_reply};
            let (call, body) = read_call(ECHO);
            assert_eq!((call.operation, call.payload_len), (2, 48));
            assert_eq!(body, [1, 2, 3, 4]);
            let reply = moat_abi::ipc::MessageHeader::reply_to(&call, Ok(()), 13);
            write_reply(ECHO, &reply, &[u64::MAX; 7]);
            reply_wait(v);
        });
        let r = call(function, &args);
        assert_eq!(r.x[..8], [0, u64::MAX, 0xff_ffff_ffff, 0, 0, 0, 0, 0]);
        // A reply longer than the registers hold is refused.
        answer(ECHO, vec![7; 8], |_| {});
        let r = call(function, &args);
        assert_eq!(Error::from_x0(r.x[0]), Some(Err(Error::InvalidParameters)));
        // The service's own error is its answer.
        answer(ECHO, vec![], |h| {
            *h = moat_abi::ipc::MessageHeader::reply_to(h, Err(Error::Denied), 0)
        });
        assert_eq!(call(function, &args).x[0], Error::Denied.to_x0());
        // Interrupted, with the host's interrupts unmasked: the host is
        // sent back to the call; masked, it hears Interrupted. The
        // reissue gets the suspended call's reply.
        crate::arch::on_entry(|v| v.exit_vector = crate::base::cpu::LOWER_IRQ);
        let mut regs = host_regs(function, &args);
        regs.pstate = 0x345;
        handle_call(cpu(0), &mut regs, 0);
        assert_eq!((regs.pc, regs.x[0]), (0x8_1000, u64::from(function)));
        answer(ECHO, vec![9], |_| {});
        regs.pc += 4;
        handle_call(cpu(0), &mut regs, 0);
        assert_eq!(regs.x[..3], [0, 9, 0]);
        crate::arch::on_entry(|v| v.exit_vector = crate::base::cpu::LOWER_IRQ);
        let mut regs = host_regs(function, &args);
        handle_call(cpu(0), &mut regs, 0);
        assert_eq!(Error::from_x0(regs.x[0]), Some(Err(Error::Interrupted)));
        assert_eq!(regs.pc, 0x8_1004);
        answer(ECHO, vec![], |_| {});
        regs = host_regs(function, &args);
        handle_call(cpu(0), &mut regs, 0);
        assert_eq!(regs.x[0], 0);
        assert_eq!(entries_left(), 0);
    }

    #[test]
    fn the_consistency_check_reports_a_mismatch_as_denied() {
        let _turn = services();
        crate::arch::take_lines();
        // The test services' memory is the test process's heap, which the
        // ledger does not know: the checker finds their mappings forged.
        let r = call(hypercall::CHECK_CONSISTENCY, &[]);
        assert_eq!(Error::from_x0(r.x[0]), Some(Err(Error::Denied)));
        // x1: the DMA faults the SMMU recorded (none here).
        assert_eq!(r.x[1], 0);
        assert_eq!(r.x[2..], host_regs(0, &[]).x[2..]);
        let lines = crate::arch::take_lines();
        assert!(
            lines
                .iter()
                .any(|l| l.contains("consistency: MISMATCH") && l.contains("service 0 maps frame")),
            "{lines:#?}"
        );
    }

    #[test]
    fn the_psci_relay_checks_what_it_can_and_forwards_the_rest_to_firmware() {
        use smccc_psci::{
            PSCI_CPU_OFF, PSCI_CPU_ON_64, PSCI_CPU_SUSPEND_64, PSCI_FEATURES, PSCI_SYSTEM_OFF,
            PSCI_VERSION,
        };
        let _turn = services();
        let this = cpu(0);
        let power = this.power();
        // The host tests' machine has no firmware: what is forwarded
        // comes back NOT_SUPPORTED, and only x0 is an answer.
        let answer = |function: u32, args: &[u64]| {
            let r = call(function, args);
            assert_eq!(r.x[1..4], [0; 3], "{function:#x}");
            r.x[0] as i64
        };
        assert_eq!(answer(PSCI_VERSION, &[]), ret::NOT_SUPPORTED);
        assert_eq!(answer(PSCI_SYSTEM_OFF, &[]), ret::NOT_SUPPORTED);
        // FEATURES: SMCCC's version is the relay's own answer; what it
        // relays is asked of firmware; anything else is not offered.
        let features = |f: u32| answer(PSCI_FEATURES, &[u64::from(f)]);
        assert_eq!(features(smccc::SMCCC_VERSION), ret::SUCCESS);
        assert_eq!(features(PSCI_CPU_ON_64), ret::NOT_SUPPORTED);
        assert_eq!(features(0x8400_00ff), ret::NOT_SUPPORTED);
        assert_eq!(answer(0x8400_001f, &[]), ret::NOT_SUPPORTED);
        // CPU_ON: a CPU the machine lacks, an entry outside the host's
        // RAM, a CPU already on; one that is off is asked of firmware and
        // stays off when firmware refuses.
        let ram = world().ram;
        let last = crate::base::cpu::get(3).unwrap();
        let mpidr = machine().platform.cpus[3].mpidr;
        last.set_power(PowerState::Off);
        assert_eq!(
            answer(PSCI_CPU_ON_64, &[0xdead, ram, 0]),
            ret::INVALID_PARAMETERS
        );
        assert_eq!(
            answer(PSCI_CPU_ON_64, &[mpidr, 0x10, 0]),
            ret::INVALID_PARAMETERS
        );
        assert_eq!(answer(PSCI_CPU_ON_64, &[mpidr, ram, 7]), ret::NOT_SUPPORTED);
        assert_eq!(last.power(), PowerState::Off);
        last.set_power(PowerState::On);
        assert_eq!(answer(PSCI_CPU_ON_64, &[mpidr, ram, 7]), ret::ALREADY_ON);
        last.set_power(PowerState::Off);
        // CPU_OFF and CPU_SUSPEND (standby and powerdown) return here only
        // when refused: the CPU is on again.
        assert_eq!(answer(PSCI_CPU_OFF, &[]), ret::NOT_SUPPORTED);
        assert_eq!(this.power(), PowerState::On);
        for state in [0, 1 << 16] {
            assert_eq!(
                answer(PSCI_CPU_SUSPEND_64, &[state, ram, 9]),
                ret::NOT_SUPPORTED
            );
            assert_eq!(this.power(), PowerState::On);
        }
        this.set_power(power);
    }
}
