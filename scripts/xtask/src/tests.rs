//! `cargo xtask test` and `cargo xtask bench`.
//!
//! Integration tests boot real images under QEMU and match the serial console
//! against explicit pass and fail patterns with a timeout; a run that ends in
//! silence, times out, or exits with an unexpected status fails. Every run's
//! console is kept in `target/test-logs/<name>.log`.

use crate::image::{self, Built, ImageSpec};
use crate::qemu::{self, Verdict};
use crate::synthetic_dt::{self, Parts};
use crate::tools::{self, cargo, run};
use crate::MachineArgs;
use anyhow::{Context, Result, bail};
use std::path::PathBuf;
use std::time::Duration;

/// Lines that always mean failure, whatever the test.
const ALWAYS_FAIL: &[&str] = &["PANIC", "FATAL: exception at EL2", "test-host: FAIL"];

fn machine(smp: u32, gic: &str) -> MachineArgs {
    MachineArgs { smp, mem: "1G".into(), gic: gic.into(), no_mte: false, timeout: 60 }
}

/// Where a test's host payload comes from.
enum Host {
    TestHost,
    External,
}

/// Which device tree the core boots with.
enum Tree {
    Firmware,
    Synthetic(Parts),
    Truncated,
}

struct Case {
    name: &'static str,
    host: Host,
    bootargs: Option<&'static str>,
    tree: Tree,
    machine: MachineArgs,
    pass: Vec<&'static str>,
    fail: Vec<&'static str>,
    exit_code: i32,
    timeout: u64,
}

fn host_boot(name: &'static str, smp: u32, gic: &str, extra_pass: &[&'static str]) -> Case {
    let mut pass = vec!["entering the host", "test-host: ok   running at EL1", "test-host: PASS"];
    pass.extend_from_slice(extra_pass);
    Case {
        name,
        host: Host::TestHost,
        bootargs: None,
        tree: Tree::Firmware,
        machine: machine(smp, gic),
        pass,
        fail: vec!["boot failed"],
        exit_code: 0,
        timeout: 60,
    }
}

fn bad_tree(name: &'static str, tree: Tree, message: &'static str) -> Case {
    Case {
        name,
        host: Host::TestHost,
        bootargs: None,
        tree,
        machine: machine(1, "v3"),
        pass: vec![message],
        fail: vec!["entering the host"],
        exit_code: 1,
        timeout: 30,
    }
}

fn cases() -> Vec<Case> {
    vec![
        host_boot("boot_gicv3", 1, "v3", &["GICv3"]),
        host_boot("boot_gicv2_two_cpus", 2, "v2", &["GICv2", "test-host: CPU 1 online at EL1"]),
        host_boot(
            "boot_four_cpus_through_psci_relay",
            4,
            "v3",
            &["test-host: CPU 3 online at EL1", "test-host: ok   3 secondary CPU(s) ran at EL1"],
        ),
        host_boot(
            "host_touching_hypervisor_memory_gets_an_abort",
            1,
            "v3",
            &[
                "synchronous external abort injected",
                "test-host: ok   read of hypervisor memory",
                "test-host: ok   write of hypervisor memory",
                "test-host: ok   instruction fetch from hypervisor memory",
            ],
        ),
        host_boot(
            "system_off_ends_qemu_with_status_0",
            1,
            "v3",
            &["host CPU 0 asked for SYSTEM_OFF", "test-host: powering off"],
        ),
        bad_tree("bad_dt_truncated", Tree::Truncated, "boot failed: device tree: device tree is truncated"),
        bad_tree(
            "bad_dt_without_memory",
            Tree::Synthetic(Parts { memory: false, uart: true, gic: true }),
            "boot failed: device tree: device tree has no memory node",
        ),
        bad_tree(
            "bad_dt_without_uart",
            Tree::Synthetic(Parts { memory: true, uart: false, gic: true }),
            "boot failed: device tree: device tree has no PL011 UART",
        ),
        bad_tree(
            "bad_dt_without_gic",
            Tree::Synthetic(Parts { memory: true, uart: true, gic: false }),
            "boot failed: device tree: device tree has no GICv2 or GICv3",
        ),
        Case {
            name: "external_raw_payload_sees_its_bootargs",
            host: Host::External,
            bootargs: Some("x=1 moat.test=external"),
            tree: Tree::Firmware,
            machine: machine(1, "v3"),
            pass: vec!["raw binary", "external payload: bootargs=x=1 moat.test=external"],
            fail: vec!["boot failed"],
            exit_code: 0,
            timeout: 30,
        },
    ]
}

/// Builds the payload in `images/external-payload`, a cargo project of its
/// own outside the workspace, to a raw binary.
pub fn build_external_payload() -> Result<PathBuf> {
    let dir = tools::root().join("images/external-payload");
    let target_dir = tools::target_dir().join("external-payload");
    run(cargo()
        .current_dir(&dir)
        .args(["build", "--release", "--target", image::PAYLOAD_TARGET, "--target-dir"])
        .arg(&target_dir))?;
    let elf = target_dir.join(image::PAYLOAD_TARGET).join("release/external-payload");
    let bin = tools::target_dir().join("images/external-payload.bin");
    run(std::process::Command::new(tools::llvm_tool("rust-objcopy")?).arg("-O").arg("binary").arg(&elf).arg(&bin))?;
    Ok(bin)
}

fn image_for(case: &Case, built: &Built, external: &Option<PathBuf>) -> Result<PathBuf> {
    let host = match case.host {
        Host::TestHost => built.test_host.clone(),
        Host::External => external.clone().context("external payload not built")?,
    };
    let spec = ImageSpec {
        host,
        initrd: None,
        bootargs: case.bootargs.map(str::to_string),
        dtb: None,
        semihosting_exit: true,
    };
    let dtb = match &case.tree {
        Tree::Firmware => None,
        Tree::Synthetic(parts) => Some(synthetic_dt::virt_tree(parts)?),
        Tree::Truncated => Some(synthetic_dt::virt_tree(&Parts { memory: true, uart: true, gic: true })?[..96].to_vec()),
    };
    image::pack_with_dtb_bytes(&built.core, &spec, dtb, &format!("test-{}", case.name))
}

/// Runs the integration tests; returns (passed, failed names).
fn integration(filter: Option<&str>) -> Result<(u32, Vec<String>)> {
    tools::ensure_qemu()?;
    let built = image::build_all()?;
    let external = Some(build_external_payload()?);
    let logs = tools::target_dir().join("test-logs");
    std::fs::create_dir_all(&logs)?;
    let mut passed = 0;
    let mut failed = Vec::new();
    for case in cases().into_iter().filter(|c| filter.is_none_or(|f| c.name.contains(f))) {
        let img = image_for(&case, &built, &external)?;
        let cmd = qemu::command(&img, &case.machine, &[]);
        let mut fail = case.fail.clone();
        fail.extend_from_slice(ALWAYS_FAIL);
        let out = qemu::run_harnessed(cmd, &case.pass, &fail, Duration::from_secs(case.timeout))?;
        std::fs::write(logs.join(format!("{}.log", case.name)), &out.console)?;
        let problem = match (&out.verdict, out.exit_code) {
            (Verdict::Passed, Some(code)) if code == case.exit_code => None,
            (Verdict::Passed, code) => Some(format!("QEMU exit status {code:?}, expected {}", case.exit_code)),
            (Verdict::Failed(line), _) => Some(format!("fail pattern: {line}")),
            (Verdict::Exited(code), _) => Some(format!(
                "QEMU exited ({code:?}) before every pass pattern appeared; missing: {:?}",
                case.pass.iter().filter(|p| !out.console.contains(*p)).collect::<Vec<_>>()
            )),
            (Verdict::TimedOut, _) => Some(format!("timed out after {} s", case.timeout)),
        };
        match problem {
            None => {
                passed += 1;
                println!("test integration::{} ... ok ({:.1} s)", case.name, out.seconds);
            }
            Some(why) => {
                println!("test integration::{} ... FAILED ({why})", case.name);
                println!("---- console ({}) ----", logs.join(format!("{}.log", case.name)).display());
                for line in out.console.lines().rev().take(25).collect::<Vec<_>>().into_iter().rev() {
                    println!("  | {line}");
                }
                failed.push(case.name.to_string());
            }
        }
    }
    Ok((passed, failed))
}

fn unit_tests_and_lints() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"])).context("cargo fmt --check: run `cargo fmt --all`")?;
    run(cargo().args(["test", "--workspace", "--exclude", "moat-test-host", "--all-features"]))?;
    run(cargo().args(["clippy", "--workspace", "--exclude", "moat-test-host", "--all-targets", "--all-features", "--", "-D", "warnings"]))?;
    run(cargo().args(["clippy", "--package", "moat-kernel", "--target", image::CORE_TARGET, "--", "-D", "warnings"]))?;
    run(cargo().args(["clippy", "--package", "moat-test-host", "--target", image::PAYLOAD_TARGET, "--", "-D", "warnings"]))?;
    Ok(())
}

fn book() -> Result<()> {
    let mdbook = tools::ensure_mdbook()?;
    run(std::process::Command::new(mdbook).arg("build").arg(tools::root().join("book")))
}

pub fn run_all(filter: Option<&str>, integration_only: bool) -> Result<()> {
    if !integration_only && filter.is_none() {
        unit_tests_and_lints()?;
        book()?;
        println!("xtask: unit tests, lints and the book passed");
    }
    let (passed, failed) = integration(filter)?;
    println!("integration: {passed} passed, {} failed", failed.len());
    if !failed.is_empty() {
        bail!("integration tests failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Extracts `key=N` from a `bench:` line.
fn bench_value(console: &str, key: &str) -> Option<u64> {
    console
        .lines()
        .filter(|l| l.contains("bench:"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| w.strip_prefix(&format!("{key}=")).and_then(|v| v.parse().ok()))
}

pub fn bench() -> Result<()> {
    tools::ensure_qemu()?;
    let built = image::build_all()?;
    let spec = ImageSpec {
        host: built.test_host.clone(),
        initrd: None,
        bootargs: Some("moat.bench".into()),
        dtb: None,
        semihosting_exit: true,
    };
    let img = image::pack(&built.core, &spec, "bench")?;
    let cmd = qemu::command(&img, &machine(1, "v3"), &["-icount", "shift=0,sleep=off"]);
    let out = qemu::run_harnessed(cmd, &["bench: null_hvc=", "test-host: PASS"], ALWAYS_FAIL, Duration::from_secs(120))?;
    std::fs::write(tools::target_dir().join("bench.log"), &out.console)?;
    if out.verdict != Verdict::Passed {
        bail!("benchmark run failed ({:?}); console in target/bench.log", out.verdict);
    }
    let null_hvc = bench_value(&out.console, "null_hvc").context("no null_hvc figure in the console")?;
    let json = serde_json::json!({ "null_hvc": null_hvc });
    let path = tools::target_dir().join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("null_hvc: {null_hvc} instructions per round trip (host HVC -> core -> host)");
    println!("xtask: wrote {}", path.display());
    Ok(())
}
