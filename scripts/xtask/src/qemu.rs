//! Running images under QEMU: interactively (`cargo xtask run`) and under a
//! test harness that matches the serial console against explicit pass and
//! fail patterns with a timeout.

use crate::MachineArgs;
use crate::boards::{self, Board};
use crate::image::Built;
use crate::tools;
use anyhow::{Context, Result};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// What QEMU does when the guest resets the machine (PSCI SYSTEM_RESET).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnReset {
    /// Exit (`-no-reboot`): a reset, or a kernel's reboot on panic, ends the run.
    Exit,
    /// Reset the machine and boot again.
    Reboot,
}

/// The machine, CPU, memory and console options every run shares. The
/// console is `serial` (`stdio`, or `mon:stdio` to let Ctrl-C through to
/// the guest and keep Ctrl-A X for QEMU).
///
/// No network card (QEMU's default one needs an option ROM that a QEMU
/// installed without recommends lacks), and one virtio-rng on PCIe: a PCI
/// device whose 64-bit BAR Linux places in the host bridge's 64-bit window,
/// and a source of bytes the tests can read from `/dev/hwrng`. With
/// `--smmu`, an SMMUv3 with stage 2 in front of PCIe, and with `--disk`, a
/// virtio-blk on PCIe.
fn machine_command(
    m: &MachineArgs,
    virtualization: bool,
    on_reset: OnReset,
    serial: &str,
) -> Command {
    let mut c = Command::new("qemu-system-aarch64");
    match m.board {
        Board::Rpi4 => {
            // The board's own CPUs (four Cortex-A72), RAM and tree: QEMU
            // fills in the memory node and starts the kernel at EL2 with the
            // secondaries parked on the tree's spin table, as the Pi's
            // firmware does. `boards::prepare` extracted the tree.
            c.args(["-M", "raspi4b", "-dtb"])
                .arg(tools::target_dir().join("boards").join(boards::RPI4_DTB))
                .args(["-smp", &boards::RPI4_CPUS.to_string()])
                .args(["-m", boards::RPI4_MEMORY])
                .args(["-display", "none", "-serial", serial, "-monitor", "none"]);
        }
        Board::Virt | Board::Fvp => virt_machine(&mut c, m, virtualization, serial),
    }
    if on_reset == OnReset::Exit {
        c.arg("-no-reboot");
    }
    if m.icount {
        c.args(["-icount", "shift=0,sleep=off"]);
    }
    c
}

/// QEMU `virt`'s machine, CPU, memory, console and device options.
fn virt_machine(c: &mut Command, m: &MachineArgs, virtualization: bool, serial: &str) {
    let gic = if m.gic == "v2" { "2" } else { "3" };
    let mte = if m.no_mte { "off" } else { "on" };
    let virt = if virtualization { "on" } else { "off" };
    let iommu = if m.smmu { ",iommu=smmuv3" } else { "" };
    let highmem_mmio = if m.no_highmem_mmio {
        ",highmem-mmio=off"
    } else {
        ""
    };
    c.arg("-M")
        .arg(format!(
            "virt,virtualization={virt},mte={mte},gic-version={gic}{iommu}{highmem_mmio}"
        ))
        .args(["-cpu", &m.cpu, "-smp", &m.smp.to_string(), "-m", &m.mem])
        .args(["-display", "none", "-serial", serial, "-monitor", "none"])
        .args(["-nic", "none", "-device"]);
    // Behind an SMMU, the device takes the IOMMU's path (QEMU's virtio
    // devices otherwise reach memory directly, which no real device could),
    // which needs the modern interface.
    c.arg(if m.smmu {
        "virtio-rng-pci,disable-legacy=on,iommu_platform=on"
    } else {
        "virtio-rng-pci"
    });
    if m.smmu {
        // QEMU's SMMUv3 offers stage 1 only unless told otherwise; Moat
        // needs stage 2.
        c.args(["-global", "arm-smmuv3.stage=2"]);
    }
    if let Some(disk) = &m.disk {
        c.arg("-drive").arg(format!(
            "file={},if=none,id=disk0,format=raw",
            disk.display()
        ));
        c.arg("-device").arg(if m.smmu {
            "virtio-blk-pci,drive=disk0,disable-legacy=on,iommu_platform=on"
        } else {
            "virtio-blk-pci,drive=disk0"
        });
    }
}

/// QEMU's command line for an image.
pub fn command(image: &Path, m: &MachineArgs, extra: &[&str]) -> Command {
    command_on_reset(image, m, extra, OnReset::Exit)
}

/// As [`command`], choosing what a machine reset does.
pub fn command_on_reset(
    image: &Path,
    m: &MachineArgs,
    extra: &[&str],
    on_reset: OnReset,
) -> Command {
    let mut c = machine_command(m, true, on_reset, "stdio");
    c.args(["-semihosting-config", "enable=on,target=native"])
        .arg("-kernel")
        .arg(image)
        .args(extra);
    c
}

/// QEMU booting a Linux Image directly, without Moat: the baseline Linux
/// under Moat is compared with. `virtualization=off` makes QEMU enter the
/// kernel at EL1, where it runs under Moat too, so both boots take the same
/// path through the kernel (no KVM/EL2 setup in either).
pub fn linux_direct_command(
    kernel: &Path,
    initrd: &Path,
    append: &str,
    m: &MachineArgs,
) -> Command {
    let mut c = machine_command(m, false, OnReset::Exit, "stdio");
    c.arg("-kernel").arg(kernel);
    linux_boot_args(&mut c, initrd, append);
    c
}

/// As [`linux_direct_command`] but with `virtualization=on`: QEMU enters the
/// kernel at EL2, so Linux has KVM (in VHE mode on `-cpu max`). For
/// comparing Moat's exits with KVM's on the same emulator and kernel.
pub fn linux_direct_el2_command(
    kernel: &Path,
    initrd: &Path,
    append: &str,
    m: &MachineArgs,
) -> Command {
    let mut c = machine_command(m, true, OnReset::Exit, "stdio");
    c.arg("-kernel").arg(kernel);
    linux_boot_args(&mut c, initrd, append);
    c
}

/// The initramfs and command line firmware hands a Linux kernel.
fn linux_boot_args(c: &mut Command, initrd: &Path, append: &str) {
    c.arg("-initrd").arg(initrd).arg("-append").arg(append);
}

/// QEMU booting the same Linux through the null hypervisor
/// (`images/el2-stub`): firmware enters the stub at EL2 with the device
/// tree, initramfs and command line it would give Linux; the stub enters the
/// kernel, loaded at `kernel_at`, at EL1 with nothing trapped and no stage-2.
pub fn linux_el2_stub_command(
    stub: &Path,
    kernel: &Path,
    kernel_at: u64,
    initrd: &Path,
    append: &str,
    m: &MachineArgs,
) -> Command {
    let mut c = machine_command(m, true, OnReset::Exit, "stdio");
    c.arg("-kernel").arg(stub).arg("-device").arg(format!(
        "loader,file={},addr={kernel_at:#x},force-raw=on",
        kernel.display()
    ));
    linux_boot_args(&mut c, initrd, append);
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
    let cmd = command(image, m, extra);
    if gdb {
        println!("xtask: QEMU is halted with its gdbstub on localhost:1234. In another terminal:");
        println!(
            "  gdb-multiarch -ex 'target remote :1234' -ex 'symbol-file {}' -ex 'add-symbol-file {}'",
            built.core_elf.display(),
            built.test_host_elf.display()
        );
        println!(
            "  (the test host is position-independent: add `-o <load address>` from the core's log)"
        );
    }
    let timeout = if gdb { 24 * 3600 } else { m.timeout() };
    wait_interactive(cmd, timeout)
}

/// Boots `image` with a shell on this terminal: Ctrl-C goes to the guest
/// (QEMU's console multiplexer takes the terminal), Ctrl-A X quits QEMU.
/// Returns QEMU's exit status.
pub fn run_shell(image: &Path, m: &MachineArgs) -> Result<i32> {
    let mut cmd = machine_command(m, true, OnReset::Exit, "mon:stdio");
    cmd.args(["-semihosting-config", "enable=on,target=native"])
        .arg("-kernel")
        .arg(image);
    eprintln!(
        "xtask: Ctrl-A X quits QEMU; Ctrl-C goes to the shell; the run ends after {} s",
        m.timeout()
    );
    wait_interactive(cmd, m.timeout())
}

/// Runs `cmd` on this terminal for up to `timeout` seconds.
fn wait_interactive(mut cmd: Command, timeout: u64) -> Result<i32> {
    let mut child = cmd
        .stdin(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-aarch64")?;
    match wait_with_timeout(&mut child, Duration::from_secs(timeout))? {
        Some(code) => Ok(code),
        None => {
            eprintln!("xtask: QEMU was stopped after {timeout} s (--timeout)");
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

/// What a harnessed run does once every pass pattern has been seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterPass {
    /// Wait (up to the timeout) for QEMU to exit, and report its status.
    WaitForExit,
    /// Stop QEMU at once: for runs that do not end by themselves (a machine
    /// that reboots) or whose end does not matter (boot-time measurements).
    Stop,
}

/// How to watch a run.
#[derive(Clone, Copy, Debug)]
pub struct Harness<'a> {
    /// Patterns that must all appear, in any order. A pattern listed n times
    /// must appear n times (a second boot after a reset, say).
    pub pass: &'a [&'a str],
    /// Any of these on a line ends the run as a failure at once.
    pub fail: &'a [&'a str],
    pub timeout: Duration,
    pub after_pass: AfterPass,
    /// Copy the console to this process's standard output as it arrives.
    pub echo: bool,
}

/// The console output and verdict of a harnessed run.
pub struct Outcome {
    pub verdict: Verdict,
    pub console: String,
    pub exit_code: Option<i32>,
    pub seconds: f64,
    /// Seconds from starting QEMU until the last pass pattern appeared.
    pub passed_after: Option<f64>,
}

/// Matches a growing console against a harness's patterns. Complete lines
/// are examined once each, so the cost stays linear however finely QEMU
/// splits its output (the PL011 is written a character at a time).
struct Watcher<'a> {
    pass: &'a [&'a str],
    fail: &'a [&'a str],
    /// Byte offset of the first line not yet complete.
    line_start: usize,
    /// Occurrences of each pass pattern in the complete lines.
    seen: Vec<usize>,
}

/// What the console shows so far.
#[derive(Debug, PartialEq, Eq)]
enum Progress {
    /// This line carries a fail pattern.
    Failed(String),
    /// Every pass pattern has appeared (as often as it is listed).
    Passed,
    Pending,
}

impl<'a> Watcher<'a> {
    fn new(pass: &'a [&'a str], fail: &'a [&'a str]) -> Self {
        Self {
            pass,
            fail,
            line_start: 0,
            seen: vec![0; pass.len()],
        }
    }

    fn failing(&self, line: &str) -> bool {
        self.fail.iter().any(|f| line.contains(f))
    }

    /// Looks at what was appended to `console` since the last call.
    fn update(&mut self, console: &str) -> Progress {
        let new = &console[self.line_start..];
        let complete = new.rfind('\n').map_or(0, |i| i + 1);
        for line in new[..complete].lines() {
            if self.failing(line) {
                return Progress::Failed(line.to_string());
            }
            for (seen, p) in self.seen.iter_mut().zip(self.pass) {
                *seen += line.matches(p).count();
            }
        }
        self.line_start += complete;
        // The unfinished last line counts too, without being consumed.
        let tail = &new[complete..];
        if self.failing(tail) {
            return Progress::Failed(tail.to_string());
        }
        let passed = !self.pass.is_empty()
            && self.pass.iter().zip(&self.seen).all(|(p, seen)| {
                let wanted = self.pass.iter().filter(|q| *q == p).count();
                seen + tail.matches(p).count() >= wanted
            });
        if passed {
            Progress::Passed
        } else {
            Progress::Pending
        }
    }
}

/// Boots `cmd`, watching its console. Any fail pattern ends the run at once.
/// After the pass patterns are seen the run waits (up to the timeout) for
/// QEMU to exit, or stops it, as `h.after_pass` says.
pub fn run_harnessed(mut cmd: Command, h: &Harness<'_>) -> Result<Outcome> {
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
    let take = |console: &mut String, bytes: &[u8]| {
        if h.echo {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(bytes);
            let _ = out.flush();
        }
        console.push_str(&String::from_utf8_lossy(bytes));
    };
    let deadline = start + h.timeout;
    let mut watcher = Watcher::new(h.pass, h.fail);
    let mut console = String::new();
    let mut verdict = None;
    let mut exit_code = None;
    let mut passed_after = None;
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_millis(50))) {
            Ok(bytes) => {
                take(&mut console, &bytes);
                while let Ok(more) = rx.try_recv() {
                    take(&mut console, &more);
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                exit_code = child.wait()?.code();
                break;
            }
        }
        if verdict.is_none() {
            match watcher.update(&console) {
                Progress::Failed(line) => {
                    verdict = Some(Verdict::Failed(line));
                    break;
                }
                Progress::Passed => {
                    verdict = Some(Verdict::Passed);
                    passed_after = Some(start.elapsed().as_secs_f64());
                    if h.after_pass == AfterPass::Stop {
                        break;
                    }
                }
                Progress::Pending => {}
            }
        }
        if let Some(status) = child.try_wait()? {
            // Drain what is left in the pipes.
            while let Ok(bytes) = rx.recv_timeout(Duration::from_millis(100)) {
                take(&mut console, &bytes);
            }
            exit_code = status.code();
            break;
        }
    }
    if child.try_wait()?.is_none() {
        // Only the QEMU this harness started, by its own handle.
        let _ = child.kill();
        let _ = child.wait();
    }
    // Late output may still carry a fail pattern or complete the pass set.
    if verdict.is_none() || verdict == Some(Verdict::Passed) {
        match Watcher::new(h.pass, h.fail).update(&console) {
            Progress::Failed(line) => verdict = Some(Verdict::Failed(line)),
            Progress::Passed => verdict = Some(Verdict::Passed),
            Progress::Pending => {}
        }
    }
    let verdict = match verdict {
        Some(v) => v,
        None if exit_code.is_some() => Verdict::Exited(exit_code),
        None => Verdict::TimedOut,
    };
    Ok(Outcome {
        verdict,
        console,
        exit_code,
        seconds: start.elapsed().as_secs_f64(),
        passed_after,
    })
}

#[cfg(test)]
mod tests {
    use super::{Progress, Watcher};

    fn once(pass: &[&str], fail: &[&str], console: &str) -> Progress {
        Watcher::new(pass, fail).update(console)
    }

    #[test]
    fn repeated_pass_patterns_count_occurrences() {
        assert_eq!(once(&["a", "b"], &[], "b then\na"), Progress::Passed);
        assert_eq!(
            once(&["boot", "boot"], &[], "boot once\n"),
            Progress::Pending
        );
        assert_eq!(
            once(&["boot", "x", "boot"], &[], "boot\nx\nboot"),
            Progress::Passed
        );
        assert_eq!(once(&[], &[], "anything\n"), Progress::Pending);
    }

    #[test]
    fn output_split_anywhere_gives_the_same_result() {
        let console = "moat: start\nline with PASS\nsecond PASS\nKernel panic - not syncing\n";
        for step in [1, 2, 3, 7, console.len()] {
            let mut w = Watcher::new(&["PASS", "PASS"], &["Kernel panic"]);
            let mut shown = String::new();
            let mut results = Vec::new();
            for chunk in console.as_bytes().chunks(step) {
                shown.push_str(std::str::from_utf8(chunk).unwrap());
                results.push(w.update(&shown));
            }
            if step < console.len() {
                assert!(results.contains(&Progress::Passed), "step {step}");
            }
            assert_eq!(
                results.last(),
                Some(&Progress::Failed("Kernel panic - not syncing".into())),
                "step {step}"
            );
        }
    }
}
