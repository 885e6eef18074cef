//! Linux as the host: Debian's arm64 kernel with a busybox initramfs.
//!
//! `cargo xtask run linux` boots Debian bookworm's stock arm64 kernel under
//! Moat with an initramfs written here: busybox, `/dev/console` and an
//! `/init` script that either starts a shell on the console or runs the
//! `--cmd` commands, prints their exit status and powers the machine off.
//! The tests and the boot-time benchmark use the same pieces.
//!
//! `--kernel IMAGE` and `--kernel-package NAME` boot another kernel
//! (`kernels.rs`). The initramfs also carries the modules of the kernel's
//! own package that a run needs, which `/init` loads first (`modules.rs`),
//! and the feature probe, `/bin/moat-probe` (`probe.rs`).
//!
//! The kernel and busybox come from Debian's archive through apt, kept in a
//! checked cache outside the work tree (`debian.rs`).

use crate::MachineArgs;
use crate::boards::{self, Board};
use crate::cpio;
use crate::debian::Assets;
use crate::image::{self, ImageSpec};
use crate::kernels::{self, Kernel};
use crate::linux_vm;
use crate::modules::{self, Modules};
use crate::probe;
use crate::qemu::{self, AfterPass, Harness, Verdict};
use crate::tools;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The first line `/init` prints: the shell has run its first command.
pub const MARKER_INIT: &str = "moat-linux: init started";
/// Printed right before the `--cmd` commands run.
pub const MARKER_COMMANDS: &str = "moat-linux: running commands";
/// Printed after the commands, followed by their exit status.
pub const MARKER_STATUS: &str = "moat-linux: exit status ";

/// Printed by `/init` for a module that would not load, followed by its path.
pub const MARKER_MODULE_FAILED: &str = "moat-linux: could not load module ";

/// Console lines that mean the kernel or the core failed, whatever the run.
pub const FAIL_PATTERNS: &[&str] = &[
    MARKER_MODULE_FAILED,
    "Kernel panic",
    "Oops",
    "BUG:",
    "Internal error:",
    "Unable to handle kernel",
    "WARNING: CPU:",
    "failed to come online",
    "failed to boot",
    "moat: boot failed",
    "PANIC",
    "FATAL",
];

/// The host's command line.
///
/// * `console=ttyAMA0`: the kernel's console on the PL011, the UART the core
///   logs to, so one serial stream shows both in order.
/// * `panic=-1`: reboot at once on a panic. QEMU runs with `-no-reboot`, so
///   the reset ends it: a panicking kernel ends the run in a second instead
///   of hanging until the timeout, and the panic stays the last thing on the
///   console.
///
/// Anything in `append` follows, so it can override both.
pub fn bootargs(append: Option<&str>) -> String {
    let mut args = String::from("console=ttyAMA0 panic=-1");
    if let Some(extra) = append.map(str::trim).filter(|a| !a.is_empty()) {
        args.push(' ');
        args.push_str(extra);
    }
    args
}

/// The `/init` script. It runs as PID 1 with the initramfs as its root.
fn init_script() -> String {
    let module = linux_vm::MODULE_PATH;
    let start = linux_vm::START_VM;
    format!(
        r#"#!/bin/sh
# PID 1 of the initramfs `cargo xtask run linux` writes.
# The boot benchmark's clock: instructions run since reset, read first.
[ -f /{BOOT_COUNTER_FLAG} ] && /bin/moat-probe counter
echo "{MARKER_INIT}"
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# The kernel's own modules this run needs, dependencies first.
if [ -f /etc/moat-modules ]; then
    while read -r module; do
        insmod "$module" || echo "{MARKER_MODULE_FAILED}$module"
    done < /etc/moat-modules
fi
if [ -f /etc/moat-commands ]; then
    echo "{MARKER_COMMANDS}"
    # Unattended: nobody types on this console, so a command that reads its
    # input sees the end at once instead of waiting for ever.
    sh /etc/moat-commands < /dev/null
    echo "{MARKER_STATUS}$?"
    poweroff -f
fi
echo "moat-linux: shell on the console; 'poweroff -f' ends the machine"
if [ -f /{module} ]; then
    echo "moat-linux: start a protected VM with: {start}"
fi
# A session of its own with the console as controlling terminal: job
# control and Ctrl-C work in the shell.
setsid cttyhack sh
poweroff -f
"#
    )
}

/// What an initramfs carries besides busybox and `/init`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras<'a> {
    /// The kernel's modules `/init` loads, in order.
    pub modules: Option<&'a Modules>,
    /// The feature probe, as `/bin/moat-probe`.
    pub probe: Option<&'a [u8]>,
    /// More files: path, mode, contents (the protected-VM pieces).
    pub files: &'a [(&'a str, u32, Vec<u8>)],
}

/// An initramfs (newc cpio) with busybox, `/init`, the `extras` and, if
/// given, the commands `/init` runs instead of starting a shell.
pub fn initramfs(busybox: &[u8], commands: Option<&str>, extras: &Extras) -> Result<Vec<u8>> {
    let mut w = cpio::Writer::new();
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "etc", "proc", "sys", "tmp", "root", "guest",
    ] {
        w.dir(dir, 0o755);
    }
    // The console must exist before devtmpfs is mounted: the kernel opens
    // /dev/console for PID 1's standard streams before /init runs.
    w.dir("dev", 0o755).char_device("dev/console", 0o600, 5, 1);
    w.file("bin/busybox", 0o755, busybox)
        .symlink("bin/sh", "busybox");
    w.file("init", 0o755, init_script().as_bytes());
    if let Some(commands) = commands {
        let mut text = commands.to_string();
        text.push('\n');
        w.file("etc/moat-commands", 0o644, text.as_bytes());
    }
    if let Some(probe) = extras.probe {
        w.file("bin/moat-probe", 0o755, probe);
    }
    for (path, mode, bytes) in extras.files {
        w.file(path, *mode, bytes);
    }
    if let Some(m) = extras.modules.filter(|m| !m.load_order.is_empty()) {
        let base = format!("lib/modules/{}", m.release);
        let mut dirs: Vec<String> = vec!["lib".into(), "lib/modules".into(), base.clone()];
        let mut list = String::new();
        for path in &m.load_order {
            let mut at = base.clone();
            for part in path
                .split('/')
                .rev()
                .skip(1)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                at = format!("{at}/{part}");
                if !dirs.contains(&at) {
                    dirs.push(at.clone());
                }
            }
            list.push_str(&format!("/{base}/{path}\n"));
        }
        for d in &dirs {
            w.dir(d, 0o755);
        }
        for path in &m.load_order {
            w.file(&format!("{base}/{path}"), 0o644, &m.read(path)?);
        }
        w.file(&format!("{base}/modules.dep"), 0o644, m.dep.as_bytes());
        w.file("etc/moat-modules", 0o644, list.as_bytes());
    }
    Ok(w.finish())
}

/// The exit status `/init` reported for the commands. The marker may
/// follow output that did not end its line (`cat /proc/device-tree/model`).
pub fn exit_status(console: &str) -> Option<i32> {
    console.lines().find_map(|l| {
        let l = l.trim_end_matches('\r');
        l[l.find(MARKER_STATUS)? + MARKER_STATUS.len()..]
            .trim()
            .parse()
            .ok()
    })
}

/// Whether a console line is the kernel's or the core's rather than the
/// commands': `[    1.234567] ...` (the kernel stamps every line) or
/// `moat: ...`.
fn is_log_line(line: &str) -> bool {
    if line.starts_with("moat: ") {
        return true;
    }
    let Some(rest) = line.strip_prefix('[') else {
        return false;
    };
    let Some((stamp, _)) = rest.split_once(']') else {
        return false;
    };
    let stamp = stamp.trim_start();
    !stamp.is_empty() && stamp.chars().all(|c| c.is_ascii_digit() || c == '.')
}

/// The lines the commands printed, without kernel and core log lines that
/// may land among them.
pub fn command_output(console: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in console.lines().map(|l| l.trim_end_matches('\r')) {
        if line == MARKER_COMMANDS {
            inside = true;
            out.clear();
        } else if let Some(at) = line.find(MARKER_STATUS) {
            if inside {
                // Output whose last line had no newline ends where the marker starts.
                if at > 0 {
                    out.push(line[..at].to_string());
                }
                break;
            }
        } else if inside && !is_log_line(line) {
            // A log line can land in the middle of a command's line (the
            // kernel prints from interrupt context on a busy machine): the
            // command's text is what came before it.
            let own = (1..line.len())
                .find(|&at| line.is_char_boundary(at) && is_log_line(&line[at..]))
                .map_or(line, |at| &line[..at]);
            out.push(own.to_string());
        }
    }
    out
}

/// Writes an initramfs for `commands` to `target/images/<name>.cpio`, with
/// the modules of the kernel's package a run needs, the feature probe and
/// the protected-VM pieces if given.
pub fn write_initramfs(
    assets: &Assets,
    vm: Option<&linux_vm::Pieces>,
    commands: Option<&str>,
    name: &str,
) -> Result<PathBuf> {
    write_initramfs_with(assets, vm, commands, name, Vec::new())
}

/// The file whose presence makes `/init` print the virtual counter
/// (`probe: counter=N`) before anything else.
pub const BOOT_COUNTER_FLAG: &str = "etc/moat-boot-counter";

/// [`write_initramfs`] with `more` files (path, mode, contents) added.
pub fn write_initramfs_with(
    assets: &Assets,
    vm: Option<&linux_vm::Pieces>,
    commands: Option<&str>,
    name: &str,
    more: Vec<(&str, u32, Vec<u8>)>,
) -> Result<PathBuf> {
    let busybox = std::fs::read(&assets.busybox)
        .with_context(|| format!("reading {}", assets.busybox.display()))?;
    let modules = assets
        .kernel_deb
        .as_deref()
        .map(modules::from_deb)
        .transpose()?;
    let probe = std::fs::read(probe::build()?)?;
    let mut files = Vec::new();
    let linux_guest = vm
        .filter(|_| linux_vm::Pieces::wants_linux_guest(commands))
        .map(|v| v.linux_guest_files());
    for (path, mode, file) in vm
        .iter()
        .flat_map(|v| v.files())
        .chain(linux_guest.into_iter().flatten())
    {
        let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        files.push((path, mode, bytes));
    }
    files.extend(more);
    let extras = Extras {
        modules: modules.as_ref(),
        probe: Some(&probe),
        files: &files,
    };
    let path = tools::target_dir()
        .join("images")
        .join(format!("{name}.cpio"));
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    std::fs::write(&path, initramfs(&busybox, commands, &extras)?)?;
    Ok(path)
}

/// The manifest of Linux images: the services that run beside Linux.
pub const LINUX_MANIFEST: &str = "images/linux.toml";

/// The services of [`LINUX_MANIFEST`], built.
pub fn services() -> Result<image::ServiceSet> {
    Ok(image::services_from(Path::new(LINUX_MANIFEST))?.1)
}

/// The image spec for Linux under Moat, with the services of
/// [`LINUX_MANIFEST`].
pub fn image_spec(
    assets: &Assets,
    initramfs: &Path,
    append: Option<&str>,
    services: &image::ServiceSet,
) -> ImageSpec {
    ImageSpec {
        host: assets.kernel.clone(),
        initrd: Some(initramfs.to_path_buf()),
        bootargs: Some(bootargs(append)),
        dtb: None,
        semihosting_exit: true,
        services: Some(services.clone()),
        ..Default::default()
    }
}

/// `cargo xtask run linux`: boots Linux under Moat. With `commands`, runs
/// them, shows the console as it comes, and returns their exit status; without,
/// gives a shell on this terminal and returns QEMU's status.
pub fn run(
    commands: Option<&str>,
    append: Option<&str>,
    machine: &MachineArgs,
    kernel: &Kernel,
) -> Result<i32> {
    if machine.board == Board::Fvp {
        bail!(
            "run --board fvp linux is not supported: the FVP runs the demo image (cargo xtask run --board fvp)"
        );
    }
    tools::ensure_qemu()?;
    let assets = kernels::assets(kernel)?;
    eprintln!(
        "xtask: Linux: Debian {}; {}",
        assets.kernel_package, assets.busybox_package
    );
    boards::prepare(machine.board)?;
    let built = image::build_for(machine.board)?;
    let append = boards::linux_append(machine.board, append);
    let append = append.as_deref();
    // The module is built against the default kernel's headers only.
    let vm = if *kernel == Kernel::Default {
        let vm = linux_vm::build(&assets, &built, false)?;
        eprintln!(
            "xtask: the initramfs has /{}, /{} and /{}; start a protected VM with: {}",
            linux_vm::MODULE_PATH,
            linux_vm::VMM_PATH,
            linux_vm::GUEST_PATH,
            linux_vm::START_VM
        );
        eprintln!(
            "xtask: and /{} and /{}; boot Debian's kernel as a protected VM with: {}",
            linux_vm::LINUX_GUEST_KERNEL_PATH,
            linux_vm::LINUX_GUEST_INITRD_PATH,
            linux_vm::START_LINUX_VM
        );
        Some(vm)
    } else {
        eprintln!(
            "xtask: another kernel than the default: no moat.ko or moat-vmm in the initramfs"
        );
        None
    };
    let name = match machine.board {
        Board::Virt => "linux-run".to_string(),
        board => format!("linux-run-{}", board.name()),
    };
    let initrd = write_initramfs(&assets, vm.as_ref(), commands, &name)?;
    let services = services()?;
    let img = image::pack(
        &built.core,
        &image_spec(&assets, &initrd, append, &services),
        &name,
    )?;
    if commands.is_none() {
        return qemu::run_shell(&img, machine);
    }
    let timeout = machine.timeout();
    let harness = Harness {
        pass: &[MARKER_STATUS],
        fail: &[],
        timeout: Duration::from_secs(timeout),
        after_pass: AfterPass::WaitForExit,
        echo: true,
    };
    let out = qemu::run_harnessed(qemu::command(&img, machine, &[]), &harness)?;
    match (exit_status(&out.console), &out.verdict) {
        (Some(status), _) => {
            if out.exit_code != Some(0) {
                eprintln!(
                    "xtask: the commands ended with status {status}, but QEMU exited with {:?}",
                    out.exit_code
                );
            }
            Ok(status)
        }
        (None, Verdict::TimedOut) => {
            eprintln!(
                "\nxtask: QEMU was stopped after {timeout} s (--timeout) before the commands finished"
            );
            Ok(124)
        }
        (None, _) => {
            eprintln!(
                "\nxtask: QEMU exited ({:?}) before the commands finished",
                out.exit_code
            );
            Ok(out.exit_code.filter(|c| *c != 0).unwrap_or(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bootargs_append_after_the_defaults() {
        assert_eq!(bootargs(None), "console=ttyAMA0 panic=-1");
        assert_eq!(bootargs(Some("  ")), "console=ttyAMA0 panic=-1");
        assert_eq!(
            bootargs(Some("loglevel=8 nokaslr")),
            "console=ttyAMA0 panic=-1 loglevel=8 nokaslr"
        );
    }

    #[test]
    fn command_output_skips_log_lines() {
        let console = "moat: entering the host\r\n[    0.000000] Booting Linux\r\n\
                       moat-linux: init started\r\nmoat-linux: running commands\r\n4\r\n\
                       [    2.345678] random: crng init done\r\nmoat: host CPU 0 asked for SYSTEM_OFF\r\n\
                       aarch64\r\n[not a stamp] stays\r\n\r\n4\r\n\
                       probe: sve ok[    5.959703] hrtimer: interrupt took 63299911 ns\r\n\
                       probe: sb okmoat: host CPU 1 is on\r\n\
                       moat-linux: exit status 3\r\n[    3.0] later\r\n";
        assert_eq!(
            command_output(console),
            vec![
                "4",
                "aarch64",
                "[not a stamp] stays",
                "",
                "4",
                "probe: sve ok",
                "probe: sb ok"
            ]
        );
        assert_eq!(exit_status(console), Some(3));
        assert_eq!(exit_status("moat-linux: running commands\n"), None);
    }

    #[test]
    fn output_without_a_final_newline_is_kept() {
        let console = "moat-linux: running commands\r\n4\r\nRaspberry Pi 4 Model B\0moat-linux: exit status 0\r\n";
        assert_eq!(
            command_output(console),
            vec!["4", "Raspberry Pi 4 Model B\0"]
        );
        assert_eq!(exit_status(console), Some(0));
    }

    #[test]
    fn the_last_boots_commands_count() {
        // After a reboot the second boot's output replaces the first's.
        let console = "moat-linux: running commands\na\nmoat-linux: running commands\nb\nmoat-linux: exit status 0\n";
        assert_eq!(command_output(console), vec!["b"]);
    }

    /// The archive as text, after checking it holds every one of `names`.
    fn holds(archive: &[u8], names: &[&str]) -> String {
        let text = String::from_utf8_lossy(archive).into_owned();
        for name in names {
            assert!(text.contains(name), "{name:?} missing");
        }
        text
    }

    #[test]
    fn initramfs_holds_modules_in_load_order_the_probe_and_more_files() {
        let dir = std::env::temp_dir().join(format!("xtask-modules-{}", std::process::id()));
        let files = dir.join("files/kernel/drivers/virtio");
        std::fs::create_dir_all(&files).unwrap();
        std::fs::write(files.join("a.ko"), b"KO-A").unwrap();
        std::fs::write(files.join("b.ko"), b"KO-B").unwrap();
        let m = Modules {
            release: "6.1.0-57-arm64".into(),
            load_order: vec![
                "kernel/drivers/virtio/a.ko".into(),
                "kernel/drivers/virtio/b.ko".into(),
            ],
            dep: "kernel/drivers/virtio/a.ko: \nkernel/drivers/virtio/b.ko: kernel/drivers/virtio/a.ko\n".into(),
            dir: dir.clone(),
        };
        let files = [("moat.ko", 0o644, b"KO".to_vec())];
        let extras = Extras {
            modules: Some(&m),
            probe: Some(b"PROBE"),
            files: &files,
        };
        let a = initramfs(b"BB", None, &extras).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let text = holds(
            &a,
            &[
                "lib/modules/6.1.0-57-arm64/kernel/drivers/virtio\0",
                "lib/modules/6.1.0-57-arm64/kernel/drivers/virtio/a.ko\0",
                "lib/modules/6.1.0-57-arm64/modules.dep\0",
                "etc/moat-modules\0",
                "bin/moat-probe\0",
                "moat.ko\0",
                "KO-A",
                "PROBE",
            ],
        );
        let order = "/lib/modules/6.1.0-57-arm64/kernel/drivers/virtio/a.ko\n\
                     /lib/modules/6.1.0-57-arm64/kernel/drivers/virtio/b.ko\n";
        assert!(text.contains(order), "load order");
        assert!(init_script().contains("insmod"));
    }

    #[test]
    fn initramfs_holds_init_console_and_commands() {
        let a = initramfs(b"BB", Some("nproc"), &Extras::default()).unwrap();
        let text = holds(
            &a,
            &[
                "init\0",
                "dev/console\0",
                "bin/busybox\0",
                "bin/sh\0",
                "etc/moat-commands\0",
                "TRAILER!!!\0",
            ],
        );
        assert!(text.contains("nproc\n"));
        let none = initramfs(b"BB", None, &Extras::default()).unwrap();
        assert!(!String::from_utf8_lossy(&none).contains("moat-commands\0"));
    }
}
