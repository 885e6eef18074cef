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
//! The kernel and busybox come from Debian's archive through apt and are kept
//! in a cache outside the work tree (`${XDG_CACHE_HOME:-$HOME/.cache}/moat/debian`),
//! so a fresh clone does not download them again. A manifest in the cache
//! records each package's version and the SHA256 apt published for its
//! `.deb`; every use checks the `.deb`s against it, and a cache that fails the
//! check is fetched again. While the cache is complete nothing touches the
//! network.

use crate::MachineArgs;
use crate::boards::{self, Board};
use crate::cpio;
use crate::image::{self, ImageSpec};
use crate::kernels::{self, Kernel};
use crate::linux_vm;
use crate::modules::{self, Modules};
use crate::probe;
use crate::qemu::{self, AfterPass, Harness, Verdict};
use crate::tools;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
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

/// The metapackage whose dependency names the kernel to use.
const KERNEL_METAPACKAGE: &str = "linux-image-arm64";
/// Kernels of this series are accepted from the metapackage's dependencies.
const KERNEL_SERIES: &str = "linux-image-6.1.0-";
const BUSYBOX_PACKAGE: &str = "busybox-static";
const MANIFEST: &str = "manifest";

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
            out.push(line.to_string());
        }
    }
    out
}

/// The Debian files a Linux run needs, checked against the manifest.
#[derive(Clone, Debug)]
pub struct Assets {
    /// The kernel's raw arm64 Image (Debian's `vmlinuz` is not compressed).
    pub kernel: PathBuf,
    pub busybox: PathBuf,
    /// "package version" of each.
    pub kernel_package: String,
    pub busybox_package: String,
    /// The verified `.deb` the kernel came from, whose modules a run packs
    /// into its initramfs (none for a bare Image).
    pub kernel_deb: Option<PathBuf>,
}

/// Where the Debian packages are kept across clones of the repository.
pub fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?,
        )
        .join(".cache"),
    };
    Ok(base.join("moat/debian"))
}

/// One package in the cache.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    /// "kernel" or "busybox".
    role: String,
    package: String,
    version: String,
    /// The `.deb`'s SHA256 as apt published it.
    sha256: String,
    /// The `.deb`'s file name in the cache.
    deb: String,
    /// The file extracted from it (the Image, or busybox).
    extracted: String,
    extracted_sha256: String,
}

const ROLES: [&str; 2] = ["kernel", "busybox"];

fn parse_manifest(text: &str) -> Option<Vec<Entry>> {
    let mut entries = Vec::new();
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let [
            role,
            package,
            version,
            sha256,
            deb,
            extracted,
            extracted_sha256,
        ] = f[..]
        else {
            return None;
        };
        entries.push(Entry {
            role: role.into(),
            package: package.into(),
            version: version.into(),
            sha256: sha256.into(),
            deb: deb.into(),
            extracted: extracted.into(),
            extracted_sha256: extracted_sha256.into(),
        });
    }
    let complete = ROLES
        .iter()
        .all(|r| entries.iter().filter(|e| e.role == *r).count() == 1);
    (complete && entries.len() == ROLES.len()).then_some(entries)
}

fn format_manifest(entries: &[Entry]) -> String {
    let mut s = String::from(
        "# Debian packages for `cargo xtask run linux`, written by the xtask.\n\
         # role package version deb-sha256(as apt published it) deb extracted extracted-sha256\n",
    );
    for e in entries {
        s.push_str(&format!(
            "{} {} {} {} {} {} {}\n",
            e.role, e.package, e.version, e.sha256, e.deb, e.extracted, e.extracted_sha256
        ));
    }
    s
}

pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

pub(crate) fn file_matches(path: &Path, sha256: &str) -> bool {
    path.is_file() && sha256_file(path).is_ok_and(|h| h == sha256)
}

/// The `.deb` name apt-get download gives a package (an epoch's colon is
/// written `%3a`).
pub(crate) fn deb_file_name(package: &str, version: &str) -> String {
    format!("{package}_{}_arm64.deb", version.replace(':', "%3a"))
}

/// The files the cache's manifest names, after checking every one. A
/// damaged extracted file is extracted again from its verified `.deb`.
fn cached_assets(dir: &Path) -> Option<Assets> {
    let entries = parse_manifest(&std::fs::read_to_string(dir.join(MANIFEST)).ok()?)?;
    for e in &entries {
        if !file_matches(&dir.join(&e.deb), &e.sha256) {
            eprintln!(
                "xtask: {} in the cache does not match its SHA256; fetching it again",
                e.deb
            );
            return None;
        }
        let extracted = dir.join(&e.extracted);
        if !file_matches(&extracted, &e.extracted_sha256) {
            eprintln!("xtask: re-extracting {} from {}", e.extracted, e.deb);
            match extract(&dir.join(&e.deb), &e.role, &extracted) {
                Ok(()) if file_matches(&extracted, &e.extracted_sha256) => {}
                _ => return None,
            }
        }
    }
    Some(assets_from(dir, &entries))
}

fn assets_from(dir: &Path, entries: &[Entry]) -> Assets {
    let get = |role: &str| {
        entries
            .iter()
            .find(|e| e.role == role)
            .expect("manifest has every role")
    };
    let (k, b) = (get("kernel"), get("busybox"));
    Assets {
        kernel: dir.join(&k.extracted),
        busybox: dir.join(&b.extracted),
        kernel_package: format!("{} {}", k.package, k.version),
        busybox_package: format!("{} {}", b.package, b.version),
        kernel_deb: Some(dir.join(&k.deb)),
    }
}

/// The Debian kernel and busybox, from the cache or fetched with apt.
pub fn ensure_assets() -> Result<Assets> {
    let dir = cache_dir()?;
    if let Some(assets) = cached_assets(&dir) {
        return Ok(assets);
    }
    fetch(&dir).map_err(|e| {
        anyhow::anyhow!(
            "{e:#}\n\nxtask: could not fetch Debian's arm64 kernel and busybox. On Debian 12, as root:\n{}\
             then run the xtask again: it checks the files against apt's SHA256 and writes its manifest.",
            manual_commands(&dir)
        )
    })
}

fn manual_commands(dir: &Path) -> String {
    format!(
        "  dpkg --add-architecture arm64 && apt-get update\n  \
         mkdir -p {dir} && cd {dir} && apt-get download busybox-static:arm64 \\\n    \
         \"$(apt-cache show --no-all-versions linux-image-arm64:arm64 | sed -n 's/^Depends: .*\\(linux-image-6\\.1\\.0-[0-9]*-arm64\\) (= \\([^)]*\\)).*/\\1-unsigned:arm64=\\2/p')\"\n",
        dir = dir.display()
    )
}

pub fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The control-file stanzas `apt-cache show` prints, one map each (only the
/// first line of every field).
pub(crate) fn stanzas(text: &str) -> Vec<HashMap<String, String>> {
    text.split("\n\n")
        .map(|block| {
            block
                .lines()
                .filter(|l| !l.starts_with(' '))
                .filter_map(|l| l.split_once(':'))
                .map(|(k, v)| (k.to_string(), v.trim().to_string()))
                .collect::<HashMap<_, _>>()
        })
        .filter(|m| m.contains_key("Package"))
        .collect()
}

/// The `linux-image-6.1.0-N-arm64 (= VERSION)` a metapackage depends on.
fn kernel_dependency(depends: &str) -> Option<(String, String)> {
    depends.split(',').map(str::trim).find_map(|dep| {
        let (name, rest) = dep.split_once(' ')?;
        let abi = name.strip_prefix(KERNEL_SERIES)?.strip_suffix("-arm64")?;
        if abi.is_empty() || !abi.chars().all(|c| c.is_ascii_digit()) {
            return None;
        }
        let version = rest.trim().strip_prefix("(=")?.strip_suffix(')')?.trim();
        Some((name.to_string(), version.to_string()))
    })
}

/// `a` is a later Debian version than `b`.
pub(crate) fn newer(a: &str, b: &str) -> bool {
    Command::new("dpkg")
        .args(["--compare-versions", a, "gt", b])
        .status()
        .is_ok_and(|s| s.success())
}

/// A package to have in the cache, as apt describes it.
struct Wanted {
    role: String,
    package: String,
    version: String,
    /// The `.deb`'s SHA256 from the package index.
    sha256: String,
}

/// What to download: the unsigned build of the 6.1 kernel the newest
/// `linux-image-arm64` of the configured suites depends on, and the candidate
/// `busybox-static`. The same package lists always give the same choice.
fn resolve() -> Result<Vec<Wanted>> {
    let meta =
        output(Command::new("apt-cache").args(["show", &format!("{KERNEL_METAPACKAGE}:arm64")]))?;
    let mut best: Option<(String, String, String)> = None;
    for s in stanzas(&meta) {
        let (Some(version), Some(depends)) = (s.get("Version"), s.get("Depends")) else {
            continue;
        };
        let Some((image, image_version)) = kernel_dependency(depends) else {
            continue;
        };
        if best.as_ref().is_none_or(|(v, _, _)| newer(version, v)) {
            best = Some((version.clone(), image, image_version));
        }
    }
    let (_, image, image_version) = best.with_context(|| {
        format!("apt knows no {KERNEL_METAPACKAGE}:arm64 that depends on a 6.1 kernel")
    })?;
    let specs = [
        ("kernel", format!("{image}-unsigned:arm64={image_version}")),
        ("busybox", format!("{BUSYBOX_PACKAGE}:arm64")),
    ];
    let mut out = Vec::new();
    for (role, spec) in specs {
        let text = output(Command::new("apt-cache").args(["show", "--no-all-versions", &spec]))?;
        let s = stanzas(&text)
            .into_iter()
            .next()
            .with_context(|| format!("apt-cache show {spec}: no package"))?;
        let field = |k: &str| {
            s.get(k)
                .cloned()
                .with_context(|| format!("apt-cache show {spec}: no {k} field"))
        };
        let sha = field("SHA256")?;
        if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("apt-cache show {spec}: malformed SHA256 {sha:?}");
        }
        out.push(Wanted {
            role: role.to_string(),
            package: field("Package")?,
            version: field("Version")?,
            sha256: sha.to_ascii_lowercase(),
        });
    }
    Ok(out)
}

/// Extracts the kernel Image or busybox from a `.deb` to `dest`.
pub(crate) fn extract(deb: &Path, role: &str, dest: &Path) -> Result<()> {
    let tmp = dest.with_extension("unpack");
    let _ = std::fs::remove_dir_all(&tmp);
    tools::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp))?;
    let found = if role == "kernel" {
        std::fs::read_dir(tmp.join("boot"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .with_context(|| format!("{} has no /boot/vmlinuz-*", deb.display()))?
    } else {
        tmp.join("bin/busybox")
    };
    let bytes = std::fs::read(&found).with_context(|| format!("reading {}", found.display()))?;
    if role == "kernel" && !is_arm64_image(&bytes) {
        bail!("{} is not a raw arm64 Image", found.display());
    }
    let partial = dest.with_extension("partial");
    std::fs::write(&partial, &bytes)?;
    std::fs::rename(&partial, dest)?;
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

/// Whether `bytes` start with an arm64 Linux Image header.
pub fn is_arm64_image(bytes: &[u8]) -> bool {
    bytes.get(56..60) == Some(b"ARM\x64")
}

/// Fetches what the cache lacks: `apt-get update` (as root), then
/// `apt-get download` of every package whose `.deb` is missing or damaged.
fn fetch(dir: &Path) -> Result<Assets> {
    for tool in ["apt-get", "apt-cache", "dpkg", "dpkg-deb"] {
        if !have(tool) {
            bail!("`{tool}` is not available: this is not a Debian system");
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let root = tools::is_root();
    if root {
        let foreign = output(Command::new("dpkg").arg("--print-foreign-architectures"))?;
        if !foreign.lines().any(|a| a.trim() == "arm64") {
            eprintln!(
                "xtask: dpkg --add-architecture arm64 (so that apt can download Debian's \
                 arm64 kernel and busybox packages; nothing arm64 is installed)"
            );
            tools::run(Command::new("dpkg").args(["--add-architecture", "arm64"]))?;
        }
        eprintln!("xtask: apt-get update (the Debian package cache is incomplete)");
        tools::run(
            Command::new("apt-get")
                .arg("update")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )?;
    } else {
        eprintln!("xtask: not root: using the package lists apt already has");
    }
    let mut entries = Vec::new();
    for wanted in resolve()? {
        let Wanted {
            role,
            package,
            version,
            sha256,
        } = wanted;
        let deb = deb_file_name(&package, &version);
        let path = dir.join(&deb);
        if !file_matches(&path, &sha256) {
            download(dir, &package, &version, &path, root)?;
            if !file_matches(&path, &sha256) {
                let _ = std::fs::remove_file(&path);
                bail!("{deb} does not match the SHA256 apt published ({sha256})");
            }
        }
        let stem = if role == "kernel" { "Image" } else { "busybox" };
        let extracted = format!("{stem}-{}", version.replace(':', "%3a"));
        extract(&path, &role, &dir.join(&extracted))?;
        let extracted_sha256 = sha256_file(&dir.join(&extracted))?;
        eprintln!("xtask: cached {package} {version} (SHA256 {sha256} verified)");
        entries.push(Entry {
            role,
            package,
            version,
            sha256,
            deb,
            extracted,
            extracted_sha256,
        });
    }
    let manifest = dir.join(MANIFEST);
    std::fs::write(
        manifest.with_extension("partial"),
        format_manifest(&entries),
    )?;
    std::fs::rename(manifest.with_extension("partial"), &manifest)?;
    remove_stale(dir, &entries);
    Ok(assets_from(dir, &entries))
}

pub(crate) fn download(
    dir: &Path,
    package: &str,
    version: &str,
    dest: &Path,
    root: bool,
) -> Result<()> {
    download_spec(dir, &format!("{package}:arm64={version}"), dest, root)
}

/// `apt-get download SPEC` (`package:arch=version`) into `dest`, through a
/// scratch directory in `dir`.
pub(crate) fn download_spec(dir: &Path, spec: &str, dest: &Path, root: bool) -> Result<()> {
    let partial = dir.join("partial");
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial)?;
    let mut cmd = Command::new("apt-get");
    cmd.current_dir(&partial).arg("download");
    if root {
        // apt downloads as the unprivileged `_apt` user, who cannot enter a
        // root-only home directory; the file is checked against apt's SHA256
        // below in any case.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    eprintln!("xtask: apt-get download {spec}");
    tools::run(cmd.arg(spec))?;
    let got = std::fs::read_dir(&partial)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .context("apt-get download wrote no .deb")?;
    std::fs::rename(&got, dest)?;
    std::fs::remove_dir_all(&partial)?;
    Ok(())
}

/// Deletes `.deb`s and extracted files of versions the manifest no longer names.
fn remove_stale(dir: &Path, entries: &[Entry]) {
    let keep: Vec<&str> = entries
        .iter()
        .flat_map(|e| [e.deb.as_str(), e.extracted.as_str()])
        .collect();
    let Ok(listing) = std::fs::read_dir(dir) else {
        return;
    };
    for path in listing.filter_map(|e| e.ok().map(|e| e.path())) {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let ours =
            name.ends_with(".deb") || name.starts_with("Image-") || name.starts_with("busybox-");
        if ours && path.is_file() && !keep.contains(&name) {
            let _ = std::fs::remove_file(&path);
        }
    }
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
                       aarch64\r\n[not a stamp] stays\r\n\r\n4\r\nmoat-linux: exit status 3\r\n[    3.0] later\r\n";
        assert_eq!(
            command_output(console),
            vec!["4", "aarch64", "[not a stamp] stays", "", "4"]
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

    #[test]
    fn manifest_round_trip() {
        let entries: Vec<Entry> = ROLES
            .iter()
            .map(|r| Entry {
                role: r.to_string(),
                package: format!("{r}-pkg"),
                version: "1:1.0-1".into(),
                sha256: "ab".repeat(32),
                deb: deb_file_name(&format!("{r}-pkg"), "1:1.0-1"),
                extracted: format!("{r}-file"),
                extracted_sha256: "cd".repeat(32),
            })
            .collect();
        let text = format_manifest(&entries);
        assert_eq!(parse_manifest(&text), Some(entries.clone()));
        assert_eq!(entries[0].deb, "kernel-pkg_1%3a1.0-1_arm64.deb");
        // Incomplete or malformed manifests are not trusted.
        assert_eq!(parse_manifest(&format_manifest(&entries[..1])), None);
        assert_eq!(parse_manifest(&text.replace(" kernel-file", "")), None);
        assert_eq!(
            parse_manifest(&format!("{text}{}", format_manifest(&entries[1..]))),
            None
        );
    }

    #[test]
    fn kernel_dependency_of_the_metapackage() {
        assert_eq!(
            kernel_dependency("linux-image-6.1.0-56-arm64 (= 6.1.192-2)"),
            Some(("linux-image-6.1.0-56-arm64".into(), "6.1.192-2".into()))
        );
        assert_eq!(
            kernel_dependency("linux-image-6.12.95+deb12-arm64 (= 6.12.95-1~bpo12+1)"),
            None
        );
        assert_eq!(kernel_dependency("linux-image-6.1.0-rt-arm64 (= 1)"), None);
    }

    #[test]
    fn apt_stanzas() {
        let text = "Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nVersion: 2\n";
        let s = stanzas(text);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0]["Version"], "1");
        assert_eq!(s[1]["Package"], "b");
    }

    #[test]
    fn sha256_of_a_known_file() {
        let path = std::env::temp_dir().join(format!("xtask-sha256-{}", std::process::id()));
        std::fs::write(&path, b"abc").unwrap();
        let h = sha256_file(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(
            h,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
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
