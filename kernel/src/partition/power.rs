//! CPU power on boards whose firmware has no PSCI: the core releases the
//! secondary CPUs from the firmware's spin table itself and answers the
//! host's PSCI calls on its own.
//!
//! The Raspberry Pi 4's firmware parks the three secondaries in a loop that
//! reads each CPU's `cpu-release-addr` and jumps to what it finds there, at
//! EL2. A host that could write there would run code at EL2, so the host
//! never learns those addresses: the core writes its own entry points to
//! every release address before the host's first instruction, waits until
//! every CPU has left the firmware's loop, and gives the host a tree whose
//! CPUs say `enable-method = "psci"` with a `psci` node using `hvc`. From
//! then on a secondary is always either running the host or waiting in the
//! core for CPU_ON; CPU_OFF brings it back to that wait. SYSTEM_OFF and
//! SYSTEM_RESET go through the board's quirk (`moat_platform::quirks`).

use crate::arch::cache;
use crate::arch::sysreg;
use crate::base::console;
use crate::base::cpu::{self, MAX_CPUS, PerCpu, PowerState};
use crate::base::panic;
use crate::base::state::machine;
use core::sync::atomic::{AtomicBool, Ordering};
use moat_kernel::psci::{self, PsciCall, ret};
use moat_kernel::regs::GuestRegs;
use moat_platform::dt::{EnableMethod, Platform};
use moat_platform::quirks::{SystemControl, bcm2835_pm};
use spin::Once;

/// CPUs that have arrived in the core and wait there for CPU_ON (or run
/// the host).
static ARRIVED: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// Set by CPU_ON after the entry point is stored; the waiting CPU clears it.
static GO: [AtomicBool; MAX_CPUS] = [const { AtomicBool::new(false) }; MAX_CPUS];
/// How the host's SYSTEM_OFF/RESET end the machine.
static SYSTEM: Once<SystemControl> = Once::new();

/// PSCI_VERSION's answer: 1.0.
const PSCI_VERSION_1_0: u64 = 0x1_0000;
/// MIGRATE_INFO_TYPE: no Trusted OS that needs migrating.
const MIGRATE_NOT_REQUIRED: u64 = 2;
/// How long the boot CPU waits for a released CPU, in seconds of the
/// system counter, before it refuses to boot: a CPU still in the
/// firmware's loop could be sent anywhere by a write to its release address.
const ARRIVAL_SECONDS: u64 = 10;

/// Whether the core powers CPUs itself: the tree names no firmware the core
/// can call (no PSCI node, or one reachable only by `hvc`).
pub fn core_managed(platform: &Platform<'_>, firmware_available: bool) -> bool {
    !firmware_available && !platform.cpus.is_empty()
}

/// Whether the host's tree must have its spin-table CPUs turned into PSCI ones.
pub fn has_spin_table(platform: &Platform<'_>) -> bool {
    platform
        .cpus
        .iter()
        .any(|c| matches!(c.enable_method, EnableMethod::SpinTable { .. }))
}

/// Records how SYSTEM_OFF/RESET end the machine (read from the tree at boot).
pub fn set_system_control(control: SystemControl) {
    SYSTEM.call_once(|| control);
}

/// Writes the core's entry for every spin-table CPU but the boot CPU to its
/// release address and waits until each has arrived in the core. A release
/// address outside the RAM the core maps, or inside the hypervisor's own
/// memory, is refused; so is a CPU that does not arrive.
pub fn release_secondaries(boot_index: usize) -> Result<usize, &'static str> {
    let m = machine();
    ARRIVED[boot_index].store(true, Ordering::Release);
    let base = crate::arch::spin_table_entries();
    let mut released = 0;
    for (index, c) in m.platform.cpus.iter().enumerate().take(MAX_CPUS) {
        let EnableMethod::SpinTable { release_addr } = c.enable_method else {
            continue;
        };
        if index == boot_index {
            continue;
        }
        let end = release_addr
            .checked_add(8)
            .ok_or("a cpu-release-addr overflows")?;
        let in_ram = m
            .platform
            .memory
            .iter()
            .any(|b| release_addr >= b.base && end <= b.end());
        if !release_addr.is_multiple_of(8) || !in_ram || m.carve_out.contains(release_addr) {
            return Err("a cpu-release-addr is not an aligned RAM address outside the hypervisor");
        }
        let entry = base + 8 * index as u64;
        // SAFETY: the release address is an aligned 8-byte word of RAM (checked
        // above), mapped read/write in the core's final map, outside the
        // hypervisor's memory; the firmware's loop on the parked CPU reads it
        // with its MMU and caches off, so it is cleaned to the point of
        // coherency before the event that wakes the CPU.
        unsafe { core::ptr::write_volatile(release_addr as *mut u64, entry) };
        cache::clean_dcache_to_poc(release_addr, 8);
        released += 1;
    }
    // The CPUs waiting in the firmware's WFE loop wake after the release
    // addresses are visible.
    crate::arch::send_event();

    let (start, freq) = sysreg::counter();
    for (index, c) in m.platform.cpus.iter().enumerate().take(MAX_CPUS) {
        if index == boot_index || !matches!(c.enable_method, EnableMethod::SpinTable { .. }) {
            continue;
        }
        while !ARRIVED[index].load(Ordering::Acquire) {
            let (now, _) = sysreg::counter();
            if now.wrapping_sub(start) > ARRIVAL_SECONDS.saturating_mul(freq.max(1)) {
                crate::log!(
                    "CPU {index} (MPIDR {:#x}) did not leave the firmware's spin table",
                    c.mpidr
                );
                return Err(
                    "a secondary CPU stayed on the spin table, where the host could redirect it",
                );
            }
            core::hint::spin_loop();
        }
    }
    Ok(released)
}

/// A CPU that has arrived in the core (from the spin table, or after
/// CPU_OFF) waits here until the host's CPU_ON gives it an entry point.
pub fn wait_for_cpu_on(slot: &PerCpu) {
    let go = &GO[slot.index];
    ARRIVED[slot.index].store(true, Ordering::Release);
    while !go.swap(false, Ordering::AcqRel) {
        // Until the SEV of CPU_ON.
        crate::arch::wait_for_event();
    }
}

fn result(regs: &mut GuestRegs, value: u64) {
    regs.set_smccc_result([value, 0, 0, 0]);
}

/// The host's PSCI call on a board where the core powers CPUs itself.
pub fn psci_call(this_cpu: &PerCpu, regs: &mut GuestRegs, function: u32) {
    use ::smccc::psci as ids;
    match psci::decode(function, regs.x[1], regs.x[2], regs.x[3]) {
        PsciCall::CpuOn {
            target_mpidr,
            entry,
            context,
        } => result(regs, cpu_on(target_mpidr, entry, context) as u64),
        PsciCall::CpuOff => {
            this_cpu.set_power(PowerState::Off);
            // This CPU leaves the host for good (CPU_OFF does not return
            // on success): it drops the trap's stack and waits in the core
            // for the next CPU_ON.
            crate::arch::restart_in_core(this_cpu.index)
        }
        PsciCall::CpuSuspend { .. } => {
            // A standby: the CPU waits for an interrupt and returns, which
            // PSCI allows for any requested state when a wake-up arrives.
            crate::arch::wait_for_interrupt();
            result(regs, ret::SUCCESS as u64);
        }
        PsciCall::Features { queried } => {
            let supported = queried == moat_abi::smccc::SMCCC_VERSION
                || (psci::relay_supports(queried) && !is_reset2(queried));
            result(
                regs,
                if supported {
                    ret::SUCCESS as u64
                } else {
                    ret::NOT_SUPPORTED as u64
                },
            );
        }
        PsciCall::Forward { function, .. } => match function {
            ids::PSCI_VERSION => result(regs, PSCI_VERSION_1_0),
            ids::PSCI_MIGRATE_INFO_TYPE => result(regs, MIGRATE_NOT_REQUIRED),
            ids::PSCI_AFFINITY_INFO_32 | ids::PSCI_AFFINITY_INFO_64 => {
                result(regs, affinity_info(regs.x[1], regs.x[2]) as u64)
            }
            ids::PSCI_SYSTEM_OFF => end_machine(this_cpu, true),
            ids::PSCI_SYSTEM_RESET => end_machine(this_cpu, false),
            _ => result(regs, ret::NOT_SUPPORTED as u64),
        },
        PsciCall::NotSupported => result(regs, ret::NOT_SUPPORTED as u64),
    }
}

fn is_reset2(function: u32) -> bool {
    use ::smccc::psci as ids;
    matches!(
        function,
        ids::PSCI_SYSTEM_RESET2_32 | ids::PSCI_SYSTEM_RESET2_64
    )
}

/// The checks every host CPU_ON passes, whoever then starts the CPU (the
/// core here, or firmware through the relay): the target names a CPU of the
/// tree within the core's slots, the entry point is host RAM outside the
/// carve-out, and the slot moves `Off` -> `OnPending` atomically. Returns
/// the target's index and slot, or the PSCI error to answer.
pub fn claim_for_cpu_on(target_mpidr: u64, entry: u64) -> Result<(usize, &'static PerCpu), i64> {
    let m = machine();
    let index = m
        .cpu_index_of(psci::mpidr_affinity(target_mpidr))
        .ok_or(ret::INVALID_PARAMETERS)?;
    let slot = cpu::get(index).ok_or(ret::INVALID_PARAMETERS)?;
    if !m.host_may_execute(entry) {
        return Err(ret::INVALID_PARAMETERS);
    }
    match slot.transition(PowerState::Off, PowerState::OnPending) {
        Ok(()) => Ok((index, slot)),
        Err(PowerState::OnPending) => Err(ret::ON_PENDING),
        Err(_) => Err(ret::ALREADY_ON),
    }
}

fn cpu_on(target_mpidr: u64, entry: u64, context: u64) -> i64 {
    let (index, slot) = match claim_for_cpu_on(target_mpidr, entry) {
        Ok(claimed) => claimed,
        Err(code) => return code,
    };
    if !ARRIVED[index].load(Ordering::Acquire) {
        // Never reached the core: nothing the core can start.
        slot.set_power(PowerState::Off);
        return ret::INTERNAL_FAILURE;
    }
    slot.set_host_entry(entry, context);
    GO[index].store(true, Ordering::Release);
    // Wakes the CPU waiting in `wait_for_cpu_on`.
    crate::arch::send_event();
    ret::SUCCESS
}

/// AFFINITY_INFO for one CPU (level 0 only, as PSCI 1.0 requires of callers
/// that do not use OS-initiated mode).
fn affinity_info(target_mpidr: u64, level: u64) -> i64 {
    const ON: i64 = 0;
    const OFF: i64 = 1;
    const PENDING: i64 = 2;
    if level != 0 {
        return ret::INVALID_PARAMETERS;
    }
    let m = machine();
    let Some(slot) = m
        .cpu_index_of(psci::mpidr_affinity(target_mpidr))
        .and_then(cpu::get)
    else {
        return ret::INVALID_PARAMETERS;
    };
    match slot.power() {
        PowerState::Off => OFF,
        PowerState::OnPending => PENDING,
        PowerState::On | PowerState::Suspended => ON,
    }
}

/// SYSTEM_OFF (`halt`) or SYSTEM_RESET through the board's quirk.
fn end_machine(this_cpu: &PerCpu, halt: bool) -> ! {
    let what = if halt { "SYSTEM_OFF" } else { "SYSTEM_RESET" };
    match SYSTEM.get().copied().unwrap_or(SystemControl::None) {
        SystemControl::Bcm2835Watchdog { pm } => {
            crate::log!(
                "host CPU {} asked for {what}; the BCM2835 watchdog at {:#x} resets the SoC{}",
                this_cpu.index,
                pm.base,
                if halt {
                    " into the firmware's halt partition"
                } else {
                    ""
                }
            );
            console::flush();
            // SAFETY: `pm` is the power-management block the tree names,
            // mapped as device memory in the core's final map (boot adds it);
            // the reads and writes are 32-bit, as the block requires.
            unsafe {
                let reg = |offset: u64| (pm.base + offset) as *mut u32;
                let rsts = core::ptr::read_volatile(reg(bcm2835_pm::RSTS));
                let rstc = core::ptr::read_volatile(reg(bcm2835_pm::RSTC));
                for (offset, value) in bcm2835_pm::reset_writes(halt, rsts, rstc) {
                    core::ptr::write_volatile(reg(offset), value);
                }
            }
            panic::park()
        }
        SystemControl::None => {
            crate::log!(
                "host CPU {} asked for {what}, but the board has neither PSCI firmware nor a known reset: stopping",
                this_cpu.index
            );
            panic::stop(0)
        }
    }
}

#[cfg(test)]
mod tests {
    //! Over the transaction engine's machine (`memory::tests`): QEMU's
    //! virt board (PSCI, no spin table) with the test RAM as its memory.
    //! The CPU slots are the machine's, so the tests take turns.

    use super::*;
    use crate::arch::{Op, take_log};
    use crate::memory::tests::{RAM_SIZE, serial, world};
    use ::smccc::psci as ids;

    fn call(this: &PerCpu, function: u32, args: [u64; 3]) -> (GuestRegs, i64) {
        let mut regs = GuestRegs {
            x: [0; 31],
            pc: 0,
            pstate: 0,
        };
        regs.x[0] = u64::from(function);
        regs.x[1..4].copy_from_slice(&args);
        psci_call(this, &mut regs, function);
        let code = regs.x[0] as i64;
        (regs, code)
    }

    /// The machine's second CPU: its affinity and slot, powered off.
    fn second_cpu() -> (u64, &'static PerCpu) {
        world();
        let m = machine();
        assert!(m.platform.cpus.len() >= 2, "the test board has two CPUs");
        let slot = cpu::get(1).unwrap();
        slot.set_power(PowerState::Off);
        ARRIVED[1].store(false, Ordering::Relaxed);
        GO[1].store(false, Ordering::Relaxed);
        (m.platform.cpus[1].mpidr, slot)
    }

    #[test]
    fn cpu_on_checks_the_target_and_the_entry_then_wakes_the_cpu() {
        let _turn = serial();
        let ram = world().ram;
        let this = cpu::get(0).unwrap();
        let (mpidr, slot) = second_cpu();
        // No such CPU; an entry outside the host's RAM.
        let (_, code) = call(this, ids::PSCI_CPU_ON_64, [0xff_0000, ram, 0]);
        assert_eq!(code, ret::INVALID_PARAMETERS);
        let (_, code) = call(this, ids::PSCI_CPU_ON_64, [mpidr, ram + RAM_SIZE, 0]);
        assert_eq!(code, ret::INVALID_PARAMETERS);
        assert_eq!(slot.power(), PowerState::Off);
        // A CPU that never arrived in the core cannot be started.
        let (_, code) = call(this, ids::PSCI_CPU_ON_64, [mpidr, ram, 0]);
        assert_eq!(code, ret::INTERNAL_FAILURE);
        assert_eq!(slot.power(), PowerState::Off);
        // Arrived: CPU_ON records the entry and wakes it.
        ARRIVED[1].store(true, Ordering::Release);
        take_log();
        let (_, code) = call(this, ids::PSCI_CPU_ON_64, [mpidr, ram + 0x80, 0x55]);
        assert_eq!(code, ret::SUCCESS);
        assert_eq!(slot.power(), PowerState::OnPending);
        assert_eq!(slot.host_entry(), (ram + 0x80, 0x55));
        assert!(GO[1].load(Ordering::Acquire));
        assert_eq!(take_log(), [Op::SendEvent]);
        let (_, code) = call(this, ids::PSCI_CPU_ON_64, [mpidr, ram, 0]);
        assert_eq!(code, ret::ON_PENDING);
        assert_eq!(affinity(this, mpidr), 2);
        // The woken CPU finds its GO and takes it.
        wait_for_cpu_on(slot);
        assert!(!GO[1].load(Ordering::Acquire));
        slot.set_power(PowerState::On);
        let (_, code) = call(this, ids::PSCI_CPU_ON_64, [mpidr, ram, 0]);
        assert_eq!(code, ret::ALREADY_ON);
        assert_eq!(affinity(this, mpidr), 0);
        slot.set_power(PowerState::Off);
        assert_eq!(affinity(this, mpidr), 1);
        ARRIVED[1].store(false, Ordering::Relaxed);
    }

    fn affinity(this: &PerCpu, mpidr: u64) -> i64 {
        call(this, ids::PSCI_AFFINITY_INFO_64, [mpidr, 0, 0]).1
    }

    #[test]
    fn affinity_info_answers_level_0_of_known_cpus_only() {
        let _turn = serial();
        let this = cpu::get(0).unwrap();
        let (mpidr, _) = second_cpu();
        assert_eq!(affinity(this, 0xff_0000), ret::INVALID_PARAMETERS);
        let (_, code) = call(this, ids::PSCI_AFFINITY_INFO_64, [mpidr, 1, 0]);
        assert_eq!(code, ret::INVALID_PARAMETERS);
    }

    #[test]
    fn version_features_and_the_rest_are_answered_by_the_core() {
        let this = cpu::get(0).unwrap();
        world();
        assert_eq!(call(this, ids::PSCI_VERSION, [0; 3]).1, 0x1_0000);
        assert_eq!(call(this, ids::PSCI_MIGRATE_INFO_TYPE, [0; 3]).1, 2);
        let features = |f: u32| call(this, ids::PSCI_FEATURES, [u64::from(f), 0, 0]).1;
        assert_eq!(features(moat_abi::smccc::SMCCC_VERSION), ret::SUCCESS);
        assert_eq!(features(ids::PSCI_CPU_ON_64), ret::SUCCESS);
        assert_eq!(features(ids::PSCI_SYSTEM_RESET2_64), ret::NOT_SUPPORTED);
        assert_eq!(features(0x8400_00ff), ret::NOT_SUPPORTED);
        assert_eq!(call(this, 0x8400_00ff, [0; 3]).1, ret::NOT_SUPPORTED);
        assert_eq!(
            call(this, ids::PSCI_SYSTEM_RESET2_64, [0; 3]).1,
            ret::NOT_SUPPORTED
        );
        // A standby suspend waits for an interrupt and returns.
        take_log();
        let (_, code) = call(this, ids::PSCI_CPU_SUSPEND_64, [0, 0, 0]);
        assert_eq!(code, ret::SUCCESS);
        assert_eq!(take_log(), [Op::WaitForInterrupt]);
    }

    #[test]
    fn cpu_off_powers_the_slot_off_and_restarts_in_the_core() {
        let _turn = serial();
        let (_, slot) = second_cpu();
        slot.set_power(PowerState::On);
        let left = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            call(slot, ids::PSCI_CPU_OFF, [0; 3])
        }));
        let why = left.unwrap_err();
        assert_eq!(
            why.downcast_ref::<String>().map(String::as_str),
            Some("CPU 1 restarted in the core")
        );
        assert_eq!(slot.power(), PowerState::Off);
    }

    #[test]
    fn system_off_without_firmware_or_a_reset_stops_the_machine() {
        let this = cpu::get(0).unwrap();
        world();
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            call(this, ids::PSCI_SYSTEM_OFF, [0; 3])
        }));
        assert!(stopped.is_err());
        assert!(panic::is_stopping());
        assert_eq!(
            crate::arch::take_lines(),
            [
                "moat: host CPU 0 asked for SYSTEM_OFF, but the board has neither PSCI firmware nor a known reset: stopping"
            ]
        );
    }

    #[test]
    fn the_virt_board_has_no_spin_table_and_nothing_to_release() {
        let _turn = serial();
        world();
        let m = machine();
        assert!(!has_spin_table(&m.platform));
        assert!(core_managed(&m.platform, false));
        assert!(!core_managed(&m.platform, true));
        assert_eq!(release_secondaries(0), Ok(0));
        assert!(ARRIVED[0].load(Ordering::Acquire));
    }
}
