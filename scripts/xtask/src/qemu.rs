//! Running images under QEMU: interactively (`cargo xtask run`) and under a
//! test harness that matches the serial console against explicit pass and
//! fail patterns with a timeout.

use crate::MachineArgs;
use crate::image::Built;
use anyhow::{Context, Result};
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// QEMU's command line for an image.
pub fn command(image: &Path, m: &MachineArgs, extra: &[&str]) -> Command {
    let mut c = Command::new("qemu-system-aarch64");
    let gic = if m.gic == "v2" { "2" } else { "3" };
    let mte = if m.no_mte { "off" } else { "on" };
    c.arg("-M")
        .arg(format!("virt,virtualization=on,mte={mte},gic-version={gic}"))
        .args(["-cpu", "max", "-smp", &m.smp.to_string(), "-m", &m.mem])
        .args(["-display", "none", "-serial", "stdio", "-monitor", "none", "-no-reboot"])
        .args(["-semihosting-config", "enable=on,target=native"])
        .arg("-kernel")
        .arg(image)
        .args(extra);
    c
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<Option<i32>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status.code());
        }
        if Instant::now() >= deadline {
            // Only the QEMU this harness started, by its own handle.
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Boots with the console on this terminal; returns QEMU's exit status.
pub fn run_interactive(image: &Path, m: &MachineArgs, gdb: bool, built: &Built) -> Result<i32> {
    let extra: &[&str] = if gdb { &["-s", "-S"] } else { &[] };
    let mut cmd = command(image, m, extra);
    if gdb {
        println!("xtask: QEMU is halted with its gdbstub on localhost:1234. In another terminal:");
        println!(
            "  gdb-multiarch -ex 'target remote :1234' -ex 'symbol-file {}' -ex 'add-symbol-file {}'",
            built.core_elf.display(),
            built.test_host_elf.display()
        );
        println!("  (the test host is position-independent: add `-o <load address>` from the core's log)");
    }
    let mut child = cmd.stdin(Stdio::inherit()).spawn().context("starting qemu-system-aarch64")?;
    let timeout = if gdb { Duration::from_secs(24 * 3600) } else { Duration::from_secs(m.timeout) };
    match wait_with_timeout(&mut child, timeout)? {
        Some(code) => Ok(code),
        None => {
            eprintln!("xtask: QEMU was stopped after {} s (--timeout)", m.timeout);
            Ok(124)
        }
    }
}

/// How a harnessed run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A pass pattern was seen (and QEMU then exited with this status, if it did).
    Passed,
    /// A fail pattern was seen: the line.
    Failed(String),
    /// QEMU exited without a pass pattern.
    Exited(Option<i32>),
    /// Nothing conclusive before the timeout.
    TimedOut,
}

/// The console output and verdict of a harnessed run.
pub struct Outcome {
    pub verdict: Verdict,
    pub console: String,
    pub exit_code: Option<i32>,
    pub seconds: f64,
}

/// Boots `cmd`, watching its console. Pass patterns must *all* appear (in
/// any order); any fail pattern ends the run at once. After the pass
/// patterns are seen the run waits (up to the timeout) for QEMU to exit.
pub fn run_harnessed(mut cmd: Command, pass: &[&str], fail: &[&str], timeout: Duration) -> Result<Outcome> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-aarch64")?;
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    for mut stream in [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stream.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let deadline = start + timeout;
    let mut console = String::new();
    let mut seen = vec![false; pass.len()];
    let mut verdict = None;
    let mut exit_code = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(50))) {
            Ok(bytes) => console.push_str(&String::from_utf8_lossy(&bytes)),
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                exit_code = child.wait()?.code();
                break;
            }
        }
        if verdict.is_none() {
            if let Some(line) = console.lines().find(|l| fail.iter().any(|f| l.contains(f))) {
                verdict = Some(Verdict::Failed(line.to_string()));
                break;
            }
            for (i, p) in pass.iter().enumerate() {
                seen[i] |= console.contains(p);
            }
            if seen.iter().all(|s| *s) && !pass.is_empty() {
                verdict = Some(Verdict::Passed);
            }
        }
        if let Some(status) = child.try_wait()? {
            // Drain what is left in the pipes.
            while let Ok(bytes) = rx.recv_timeout(Duration::from_millis(100)) {
                console.push_str(&String::from_utf8_lossy(&bytes));
            }
            exit_code = status.code();
            break;
        }
    }
    if child.try_wait()?.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    // Late output may still carry a fail pattern or complete the pass set.
    if verdict.is_none() || verdict == Some(Verdict::Passed) {
        if let Some(line) = console.lines().find(|l| fail.iter().any(|f| l.contains(f))) {
            verdict = Some(Verdict::Failed(line.to_string()));
        } else if !pass.is_empty() && pass.iter().all(|p| console.contains(p)) {
            verdict = Some(Verdict::Passed);
        }
    }
    let verdict = match verdict {
        Some(v) => v,
        None if exit_code.is_some() => Verdict::Exited(exit_code),
        None => Verdict::TimedOut,
    };
    Ok(Outcome { verdict, console, exit_code, seconds: start.elapsed().as_secs_f64() })
}
