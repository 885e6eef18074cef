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

unsafe extern "C" {
    fn secondary_entry();
}

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
        hypercall::LEDGER_RESTART => {
            regs.x[0] = match crate::partition::ledger_restart::request_restart(this_cpu) {
                Ok(()) => 0,
                Err(e) => e.to_x0(),
            }
        }
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
            args[1] = secondary_entry as *const () as u64;
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
    args[1] = secondary_entry as *const () as u64;
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
