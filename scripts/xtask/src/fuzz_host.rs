//! `cargo xtask fuzz-host`: the random hostile host under QEMU.
//!
//! Boots the test host with `moat.fuzz=SEED,STEPS,CHECK_EVERY` (see
//! `images/test-host/src/fuzz.rs`) on the demo image's services, and reads
//! the verdict from the console. On a violation it re-runs the same seed
//! with shorter prefixes, the checker after every step, to find the
//! shortest that still fails, and prints the command that reproduces it.

use crate::MachineArgs;
use crate::image::{self, Built, ImageSpec, ServiceSet};
use crate::qemu::{self, AfterPass, Harness, OnReset, Verdict};
use crate::tools;
use anyhow::{Result, bail};
use std::time::Duration;

/// What a run's console says.
pub enum Finding {
    /// Every step ran and every check held.
    Clean { steps: u64, seconds: f64 },
    /// The first violation: the CPU, its step, the line.
    Violation { cpu: u64, step: u64, line: String },
    /// Anything else (a timeout, a crash of the core, ...).
    Broken(String),
}

/// The pass lines of a clean run (the test host's PASS line last).
pub const PASS: &[&str] = &[
    "test-host: ok   fuzz: the consistency checker agrees at the end",
    "no violation",
    "test-host: PASS",
];
/// Lines that end a run as failed.
pub const FAIL: &[&str] = &[
    "fuzz: VIOLATION",
    "test-host: FAIL",
    "PANIC",
    "FATAL: exception at EL2",
];

/// Seconds a run of `steps` steps may take on a slow, shared machine
/// (QEMU's TCG manages a few hundred steps a second on one core).
pub fn timeout_for(steps: u64) -> u64 {
    120 + steps / 20
}

/// The host's command line for a run.
pub fn bootargs(seed: u64, steps: u64, check_every: u64, stress: bool) -> String {
    let stress = if stress { ",stress" } else { "" };
    format!("moat.fuzz={seed:#x},{steps},{check_every}{stress}")
}

/// The host's command line for `run`: [`bootargs`], and the ledger's
/// restart interval when one is asked for.
fn run_bootargs(run: &Run) -> String {
    let args = bootargs(run.seed, run.steps, run.check_every, run.stress);
    match run.restart_ledger_every {
        Some(every) => format!("{args} moat.fuzz_restart={every}"),
        None => args,
    }
}

/// Reads a run's verdict from its console.
pub fn verdict(console: &str, outcome: &Verdict, exit: Option<i32>) -> Finding {
    if let Some(line) = console.lines().find(|l| l.contains("fuzz: FAILED seed")) {
        let field = |key: &str| {
            line.split(key)
                .nth(1)
                .and_then(|r| r.split([' ', ':']).next())
                .and_then(|v| v.parse().ok())
        };
        return Finding::Violation {
            cpu: field(" cpu ").unwrap_or(0),
            step: field(" step ").unwrap_or(0),
            line: line.trim().to_string(),
        };
    }
    match (outcome, exit) {
        (Verdict::Passed, Some(0)) => {
            let steps = console
                .lines()
                .find_map(|l| {
                    let rest = l.split("fuzz: seed ").nth(1)?;
                    rest.split(": ").nth(1)?.split(' ').next()?.parse().ok()
                })
                .unwrap_or(0);
            Finding::Clean {
                steps,
                seconds: 0.0,
            }
        }
        (Verdict::Failed(line), _) => Finding::Broken(format!("fail pattern: {line}")),
        (v, code) => Finding::Broken(format!("{v:?}, QEMU status {code:?}")),
    }
}

/// What one run does.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    pub seed: u64,
    /// Steps in all, shared out between the CPUs.
    pub steps: u64,
    pub smp: u32,
    pub check_every: u64,
    pub stress: bool,
    /// Restart the ledger every this many of CPU 0's steps.
    pub restart_ledger_every: Option<u64>,
}

/// One boot of the random hostile host.
pub fn run_once(
    built: &Built,
    services: &ServiceSet,
    run: Run,
    log_name: &str,
) -> Result<(Finding, String)> {
    let Run { steps, smp, .. } = run;
    let spec = ImageSpec {
        host: built.test_host.clone(),
        bootargs: Some(run_bootargs(&run)),
        semihosting_exit: true,
        services: Some(services.clone()),
        ..Default::default()
    };
    let img = image::pack_with_dtb_bytes(&built.core, &spec, None, log_name)?;
    let machine = MachineArgs {
        board: crate::boards::Board::Virt,
        no_highmem_mmio: false,
        smmu: false,
        disk: None,
        smp,
        mem: "1G".into(),
        gic: "v3".into(),
        no_mte: false,
        cpu: "max".into(),
        icount: false,
        timeout: None,
    };
    let cmd = qemu::command_on_reset(&img, &machine, &[], OnReset::Exit);
    let harness = Harness {
        pass: PASS,
        fail: FAIL,
        timeout: Duration::from_secs(timeout_for(steps)),
        after_pass: AfterPass::WaitForExit,
        echo: false,
    };
    let out = qemu::run_harnessed(cmd, &harness)?;
    let logs = tools::target_dir().join("test-logs");
    std::fs::create_dir_all(&logs)?;
    std::fs::write(logs.join(format!("{log_name}.log")), &out.console)?;
    let mut v = verdict(&out.console, &out.verdict, out.exit_code);
    if let Finding::Clean { seconds, .. } = &mut v {
        *seconds = out.seconds;
    }
    Ok((v, out.console))
}

/// `cargo xtask fuzz-host`.
pub fn fuzz_host(run: Run, shrink: bool) -> Result<()> {
    let Run {
        seed,
        steps,
        smp,
        check_every,
        stress,
        restart_ledger_every,
    } = run;
    tools::ensure_qemu()?;
    let built = image::build_all()?;
    let services = image::services_from(std::path::Path::new(crate::DEMO_MANIFEST))?.1;
    println!(
        "fuzz-host: seed {seed:#x}, {steps} step(s) over {smp} CPU(s), checker every {check_every} step(s){}{}",
        if stress { ", SMP stress" } else { "" },
        restart_ledger_every
            .map(|n| format!(", the ledger restarted every {n} of CPU 0's steps"))
            .unwrap_or_default()
    );
    let (v, console) = run_once(&built, &services, run, "fuzz-host")?;
    for line in console.lines().filter(|l| {
        l.contains("fuzz: cpu ")
            || l.contains(" operation(s) (")
            || l.contains("fuzz: the ledger was restarted")
    }) {
        println!("  {}", line.trim());
    }
    match v {
        Finding::Clean { steps, seconds } => {
            println!(
                "fuzz-host: seed {seed:#x}: {steps} step(s), no violation ({seconds:.1} s, {:.0} steps/s)",
                steps as f64 / seconds.max(0.001)
            );
            Ok(())
        }
        Finding::Broken(why) => bail!(
            "fuzz-host: seed {seed:#x}: the run broke: {why} (console in target/test-logs/fuzz-host.log)"
        ),
        Finding::Violation { cpu, step, line } => {
            println!("fuzz-host: {line}");
            if shrink {
                let n = shortest_prefix(&built, &services, run, step)?;
                match n {
                    Some((per_cpu, line)) => {
                        println!(
                            "fuzz-host: shortest failing prefix: {per_cpu} step(s) per CPU: {line}"
                        );
                        println!(
                            "fuzz-host: reproduce with: cargo xtask fuzz-host --seed {seed:#x} --steps {} --smp {smp} --check-every 1{}",
                            per_cpu * u64::from(smp),
                            if stress { " --stress" } else { "" }
                        );
                    }
                    None => println!(
                        "fuzz-host: no shorter prefix failed again (with several CPUs the interleaving differs from run to run)"
                    ),
                }
            }
            bail!("fuzz-host: seed {seed:#x}: violation on CPU {cpu} at step {step}")
        }
    }
}

/// The fewest steps per CPU that still fail with the checker after every
/// step: a binary search over prefixes of the same seed.
fn shortest_prefix(
    built: &Built,
    services: &ServiceSet,
    run: Run,
    failing_step: u64,
) -> Result<Option<(u64, String)>> {
    let cpus = u64::from(run.smp);
    let (mut lo, mut hi) = (1u64, failing_step.max(1));
    let mut best = None;
    // The full prefix first: does the failure come back at all?
    let mut tries = 0;
    while lo <= hi && tries < 14 {
        tries += 1;
        let mid = if best.is_none() {
            hi
        } else {
            lo + (hi - lo) / 2
        };
        let prefix = Run {
            steps: mid * cpus,
            check_every: 1,
            ..run
        };
        let (v, _) = run_once(built, services, prefix, "fuzz-host-shrink")?;
        match v {
            Finding::Violation { step, line, .. } => {
                println!("fuzz-host: {mid} step(s) per CPU: fails at step {step}");
                best = Some((step.min(mid), line));
                hi = step.min(mid).saturating_sub(1);
            }
            _ => {
                println!("fuzz-host: {mid} step(s) per CPU: clean");
                if best.is_none() {
                    return Ok(None);
                }
                lo = mid + 1;
            }
        }
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_violation_names_its_cpu_and_step() {
        let console = "moat: VM 2 created\n\
            test-host: fuzz: FAILED seed 0x5 cpu 3 step 217: VM_DONATE(handle 0x2, 0x7f8bf000, 1, IPA 0x40010000) = Denied (-3)\n\
            test-host: fuzz: VIOLATION (details above)\n";
        match verdict(console, &Verdict::Failed("fuzz: VIOLATION".into()), None) {
            Finding::Violation { cpu, step, line } => {
                assert_eq!((cpu, step), (3, 217));
                assert!(line.starts_with("test-host: fuzz: FAILED seed 0x5"));
            }
            _ => panic!("not read as a violation"),
        }
    }

    #[test]
    fn a_clean_run_reports_its_steps_and_anything_else_is_broken() {
        let console = "test-host: ok   fuzz: the consistency checker agrees at the end (0)\n\
            test-host: ok   fuzz: seed 0x7: 2000 step(s) over 4 CPU(s), no violation\n\
            test-host: PASS (12 checks)\n";
        assert!(matches!(
            verdict(console, &Verdict::Passed, Some(0)),
            Finding::Clean { steps: 2000, .. }
        ));
        assert!(matches!(
            verdict(console, &Verdict::TimedOut, None),
            Finding::Broken(_)
        ));
        assert!(matches!(
            verdict(console, &Verdict::Passed, Some(1)),
            Finding::Broken(_)
        ));
    }

    #[test]
    fn bootargs_carry_the_stress_flag() {
        assert_eq!(bootargs(0x10, 400, 8, false), "moat.fuzz=0x10,400,8");
        assert_eq!(bootargs(1, 4, 1, true), "moat.fuzz=0x1,4,1,stress");
        let run = Run {
            seed: 2,
            steps: 100,
            smp: 4,
            check_every: 8,
            stress: false,
            restart_ledger_every: Some(25),
        };
        assert_eq!(
            run_bootargs(&run),
            "moat.fuzz=0x2,100,8 moat.fuzz_restart=25"
        );
    }
}
