//! What the Linux host needs to run protected VMs: `moat.ko`, `moat-vmm` and
//! the guest, put into its initramfs.
//!
//! `moat.ko` (`images/linux-module`) is built against Debian's headers for
//! the exact kernel [`crate::linux`] boots: `linux-headers-<abi>-arm64`
//! (arm64), `linux-headers-<abi>-common` (all) and `linux-kbuild-<series>`
//! (the host tools, amd64), all of the kernel's version. Their `.deb`s are
//! kept in the Debian cache (`headers/` beside the kernel), recorded in a
//! manifest of their own with the SHA256 apt published, and checked on every
//! use like the kernel's. They are extracted under `target/`, where the
//! arm64 headers' Makefile is pointed at the extracted common tree (it names
//! it by its absolute `/usr/src` path). `moat-vmm` (`images/vmm`) is a static
//! musl binary of the workspace.

use crate::debian::{self, Assets};
use crate::image;
use crate::tools;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The VMM's target (listed in rust-toolchain.toml).
pub const VMM_TARGET: &str = "aarch64-unknown-linux-musl";

/// Where the pieces go in the initramfs.
pub const MODULE_PATH: &str = "moat.ko";
pub const VMM_PATH: &str = "bin/moat-vmm";
pub const GUEST_PATH: &str = "guest.bin";
/// The test build of the module (test images only).
pub const TEST_MODULE_PATH: &str = "moat-test.ko";
/// The Linux guest: Debian's kernel Image (the host's own) and the guest's
/// initramfs, put in the host's initramfs only for runs that use them.
pub const LINUX_GUEST_KERNEL_PATH: &str = "guest/Image";
pub const LINUX_GUEST_INITRD_PATH: &str = "guest/initrd";
/// The command that boots the Linux guest from the host's shell.
pub const START_LINUX_VM: &str =
    "insmod /moat.ko && moat-vmm run --kernel /guest/Image --initrd /guest/initrd";

/// The command that starts a VM from the initramfs's shell.
pub const START_VM: &str = "insmod /moat.ko && moat-vmm run /guest.bin";

/// The built pieces.
#[derive(Clone, Debug)]
pub struct Pieces {
    pub module: PathBuf,
    pub vmm: PathBuf,
    pub guest: PathBuf,
    /// `moat.ko` with `MOAT_TEST_HOOKS`: for test images only.
    pub test_module: Option<PathBuf>,
    /// The Linux guest's kernel Image and initramfs.
    pub linux_guest: (PathBuf, PathBuf),
}

impl Pieces {
    /// (path in the initramfs, mode, file) of each piece.
    pub fn files(&self) -> Vec<(&'static str, u32, &Path)> {
        let mut files = vec![
            (MODULE_PATH, 0o644, self.module.as_path()),
            (VMM_PATH, 0o755, self.vmm.as_path()),
            (GUEST_PATH, 0o644, self.guest.as_path()),
        ];
        if let Some(test_module) = &self.test_module {
            files.push((TEST_MODULE_PATH, 0o644, test_module.as_path()));
        }
        files
    }

    /// The Linux guest's files, for a host initramfs whose commands boot it
    /// (or that starts a shell): 35 MiB that other runs do without.
    pub fn linux_guest_files(&self) -> [(&'static str, u32, &Path); 2] {
        [
            (LINUX_GUEST_KERNEL_PATH, 0o644, self.linux_guest.0.as_path()),
            (LINUX_GUEST_INITRD_PATH, 0o644, self.linux_guest.1.as_path()),
        ]
    }

    /// Whether an initramfs running `commands` (`None`: a shell) needs
    /// the Linux guest.
    pub fn wants_linux_guest(commands: Option<&str>) -> bool {
        commands.is_none_or(|c| c.contains("/guest/"))
    }
}

/// The kernel's ABI name (`6.1.0-57`) and package version (`6.1.192-3`),
/// from "linux-image-6.1.0-57-arm64-unsigned 6.1.192-3".
fn kernel_abi(kernel_package: &str) -> Option<(String, String)> {
    let (package, version) = kernel_package.split_once(' ')?;
    let abi = package
        .strip_prefix("linux-image-")?
        .strip_suffix("-arm64-unsigned")?;
    Some((abi.to_string(), version.trim().to_string()))
}

/// The three header packages for a kernel: (package, architecture).
fn header_packages(abi: &str) -> Option<[(String, &'static str); 3]> {
    let mut parts = abi.split('.');
    let series = format!("{}.{}", parts.next()?, parts.next()?);
    Some([
        (format!("linux-headers-{abi}-arm64"), "arm64"),
        (format!("linux-headers-{abi}-common"), "all"),
        (format!("linux-kbuild-{series}"), "amd64"),
    ])
}

/// One line of the headers manifest: the `.deb` and its SHA256.
fn manifest_line(deb: &str, sha256: &str) -> String {
    format!("{deb} {sha256}\n")
}

/// The header `.deb`s, from the cache or downloaded and checked against
/// apt's SHA256.
fn ensure_headers(abi: &str, version: &str) -> Result<Vec<PathBuf>> {
    let dir = debian::cache_dir()?.join("headers");
    let manifest = dir.join(format!("manifest-{abi}-{version}"));
    let packages = header_packages(abi).context("malformed kernel ABI")?;
    if let Ok(text) = std::fs::read_to_string(&manifest) {
        let debs: Vec<(PathBuf, String)> = text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(d, h)| (dir.join(d), h.trim().to_string()))
            .collect();
        if debs.len() == packages.len() && debs.iter().all(|(d, h)| debian::file_matches(d, h)) {
            return Ok(debs.into_iter().map(|(d, _)| d).collect());
        }
        eprintln!("xtask: the cached kernel headers do not match their manifest; fetching again");
    }
    std::fs::create_dir_all(&dir)?;
    let mut text = String::new();
    let mut paths = Vec::new();
    for (package, arch) in packages {
        let spec = format!("{package}:{arch}={version}");
        let shown = debian::output(Command::new("apt-cache").args([
            "show",
            "--no-all-versions",
            &spec,
        ]))
        .with_context(|| {
            format!(
                "apt-cache show {spec} (is `dpkg --add-architecture arm64` done and apt updated?)"
            )
        })?;
        let stanza = debian::stanzas(&shown)
            .into_iter()
            .next()
            .with_context(|| format!("apt-cache show {spec}: no package"))?;
        let sha = stanza
            .get("SHA256")
            .filter(|h| h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()))
            .with_context(|| format!("apt-cache show {spec}: no well-formed SHA256"))?
            .to_ascii_lowercase();
        let deb = format!("{package}_{}_{arch}.deb", version.replace(':', "%3a"));
        let path = dir.join(&deb);
        if !debian::file_matches(&path, &sha) {
            debian::download_spec(&dir, &spec, &path, tools::is_root())?;
            if !debian::file_matches(&path, &sha) {
                let _ = std::fs::remove_file(&path);
                bail!("{deb} does not match the SHA256 apt published ({sha})");
            }
            eprintln!("xtask: cached {package} {version} (SHA256 {sha} verified)");
        }
        text.push_str(&manifest_line(&deb, &sha));
        paths.push(path);
    }
    std::fs::write(&manifest, text)?;
    Ok(paths)
}

/// The headers extracted under `target/`; returns the arm64 headers tree
/// (the `make -C` directory).
fn extract_headers(abi: &str, debs: &[PathBuf]) -> Result<PathBuf> {
    let base = tools::target_dir().join("linux-module").join(abi);
    let root = base.join("root");
    let stamp = base.join("extracted");
    let want: String = debs.iter().map(|d| format!("{}\n", d.display())).collect();
    let tree = root.join(format!("usr/src/linux-headers-{abi}-arm64"));
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) && tree.is_dir() {
        return Ok(tree);
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    for deb in debs {
        tools::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
    }
    // The arm64 tree includes the common tree by its installed path.
    let makefile = tree.join("Makefile");
    let text = std::fs::read_to_string(&makefile)
        .with_context(|| format!("reading {}", makefile.display()))?;
    let installed = format!("/usr/src/linux-headers-{abi}-common/");
    if !text.contains(&installed) {
        bail!("{} does not include {installed}", makefile.display());
    }
    let extracted = format!("{}/usr/src/linux-headers-{abi}-common/", root.display());
    std::fs::write(&makefile, text.replace(&installed, &extracted))?;
    std::fs::write(&stamp, want)?;
    Ok(tree)
}

/// Builds `moat.ko` against `headers`, in a copy of its sources under
/// `target/` (kbuild writes beside the sources); with `test_hooks`, the
/// test-only build.
fn build_module(abi: &str, headers: &Path, test_hooks: bool) -> Result<PathBuf> {
    tools::ensure_cross_gcc()?;
    let src = tools::root().join("images/linux-module");
    let build = tools::target_dir()
        .join("linux-module")
        .join(abi)
        .join(if test_hooks { "build-test" } else { "build" });
    std::fs::create_dir_all(&build)?;
    for name in ["moat.c", "moat_uapi.h", "Kbuild"] {
        let from = src.join(name);
        let to = build.join(name);
        let bytes = std::fs::read(&from).with_context(|| format!("reading {}", from.display()))?;
        // Unchanged sources keep their time stamps, so kbuild rebuilds nothing.
        if std::fs::read(&to).ok().as_deref() != Some(bytes.as_slice()) {
            std::fs::write(&to, bytes)?;
        }
    }
    let out = Command::new("make")
        .arg("-C")
        .arg(headers)
        .arg(format!("M={}", build.display()))
        .args(["ARCH=arm64", "CROSS_COMPILE=aarch64-linux-gnu-", "modules"])
        .args(test_hooks.then_some("MOAT_TEST_HOOKS=y"))
        .output()
        .context("starting make")?;
    if !out.status.success() {
        bail!(
            "building moat.ko failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    if let Some(w) = stderr.lines().find(|l| l.contains("warning:")) {
        bail!("moat.ko built with a warning: {w}\n{stderr}");
    }
    Ok(build.join("moat.ko"))
}

/// Builds `moat-vmm` (release, static) and strips it for the initramfs.
fn build_vmm() -> Result<PathBuf> {
    tools::run(tools::cargo().args([
        "build",
        "--release",
        "--package",
        "moat-vmm",
        "--target",
        VMM_TARGET,
    ]))?;
    let elf = tools::target_dir()
        .join(VMM_TARGET)
        .join("release/moat-vmm");
    let out = tools::target_dir().join("images/moat-vmm");
    tools::run(
        Command::new(tools::llvm_tool("rust-objcopy")?)
            .arg("--strip-all")
            .arg(&elf)
            .arg(&out),
    )?;
    Ok(out)
}

/// Builds the pieces for the kernel of `assets`; `built` is the image build
/// that made the guest. `for_tests` adds the test build of the module, and
/// checks the module's sources with the kernel's `checkpatch.pl` first.
pub fn build(assets: &Assets, built: &image::Built, for_tests: bool) -> Result<Pieces> {
    let (abi, version) = kernel_abi(&assets.kernel_package)
        .with_context(|| format!("unexpected kernel package {:?}", assets.kernel_package))?;
    let debs = ensure_headers(&abi, &version)?;
    let headers = extract_headers(&abi, &debs)?;
    if for_tests {
        // The module as a kernel maintainer would take it.
        let mut parts = abi.split('.');
        let series = format!(
            "{}.{}",
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default()
        );
        crate::checkpatch::check_module(&series)?;
    }
    Ok(Pieces {
        module: build_module(&abi, &headers, false)?,
        vmm: build_vmm()?,
        guest: built.guest.clone(),
        test_module: if for_tests {
            Some(build_module(&abi, &headers, true)?)
        } else {
            None
        },
        linux_guest: (
            assets.kernel.clone(),
            write_linux_guest_initramfs(assets, None)?,
        ),
    })
}

/// The `/init` of the Linux guest: mounts, runs the commands the VMM put
/// in its device tree (`/chosen/moat,cmd`) between two markers and powers
/// the VM off, or starts a shell on the console if there are none.
pub fn linux_guest_init() -> String {
    format!(
        r#"#!/bin/sh
# PID 1 of the Linux guest moat-vmm boots.
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "{GUEST_MARKER_INIT}"
# The boot benchmark: the counter now, from the guest's own userspace.
if grep -q moat.bench /proc/cmdline; then
    /bin/moat-vmm counter
    poweroff -f
fi
cmd=/sys/firmware/devicetree/base/chosen/moat,cmd
if [ -f "$cmd" ]; then
    echo "{GUEST_MARKER_COMMANDS}"
    sh -c "$(cat "$cmd")" < /dev/null
    echo "{GUEST_MARKER_STATUS}$?"
    poweroff -f
fi
setsid cttyhack sh
poweroff -f
"#
    )
}

/// The Linux guest's first line from userspace.
pub const GUEST_MARKER_INIT: &str = "moat-guest: init started";
/// Printed before the guest runs the `--cmd` commands.
pub const GUEST_MARKER_COMMANDS: &str = "moat-guest: running commands";
/// Followed by the commands' exit status.
pub const GUEST_MARKER_STATUS: &str = "moat-guest: exit status ";

/// The Linux guest's initramfs: busybox and its `/init`; for the boot
/// benchmark, `moat-vmm` too (whose `counter` reads the counter).
pub fn write_linux_guest_initramfs(assets: &Assets, vmm: Option<&Path>) -> Result<PathBuf> {
    let busybox = std::fs::read(&assets.busybox)
        .with_context(|| format!("reading {}", assets.busybox.display()))?;
    let mut w = crate::cpio::Writer::new();
    for dir in [
        "bin", "sbin", "usr", "usr/bin", "usr/sbin", "proc", "sys", "tmp",
    ] {
        w.dir(dir, 0o755);
    }
    w.dir("dev", 0o755).char_device("dev/console", 0o600, 5, 1);
    w.file("bin/busybox", 0o755, &busybox)
        .symlink("bin/sh", "busybox");
    w.file("init", 0o755, linux_guest_init().as_bytes());
    let name = if let Some(vmm) = vmm {
        let bytes = std::fs::read(vmm).with_context(|| format!("reading {}", vmm.display()))?;
        w.file("bin/moat-vmm", 0o755, &bytes);
        "linux-guest-bench.cpio"
    } else {
        "linux-guest.cpio"
    };
    let path = tools::target_dir().join("images").join(name);
    std::fs::create_dir_all(path.parent().expect("has a parent"))?;
    std::fs::write(&path, w.finish())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `#define NAME value` lines of the module's source and its uapi
    /// header.
    fn module_defines() -> Vec<(String, i64)> {
        let src = ["moat.c", "moat_uapi.h"]
            .map(|f| {
                std::fs::read_to_string(tools::root().join("images/linux-module").join(f))
                    .expect("the module's source")
            })
            .concat();
        src.lines()
            .filter_map(|l| {
                let mut f = l.strip_prefix("#define ")?.split_whitespace();
                let (name, value) = (f.next()?, f.next()?);
                let v = match value.strip_prefix("0x") {
                    Some(hex) => i64::from_str_radix(hex, 16).ok()?,
                    None => value.parse().ok()?,
                };
                Some((name.to_string(), v))
            })
            .collect()
    }

    #[test]
    fn module_speaks_the_abi() {
        use moat_abi::{Error, hypercall, vm};
        let defines = module_defines();
        let get = |name: &str| {
            defines
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("moat.c defines no {name}"))
                .1
        };
        for (name, id) in [
            ("MOAT_CHECK_CONSISTENCY", hypercall::CHECK_CONSISTENCY),
            ("MOAT_LEDGER_RESTART", hypercall::LEDGER_RESTART),
            ("MOAT_HOST_SHARE_HYP", vm::HOST_SHARE_HYP),
            ("MOAT_HOST_UNSHARE_HYP", vm::HOST_UNSHARE_HYP),
            ("MOAT_VM_CREATE", vm::VM_CREATE),
            ("MOAT_VM_DONATE", vm::VM_DONATE),
            ("MOAT_VM_LOAD", vm::VM_LOAD),
            ("MOAT_VCPU_RUN", vm::VCPU_RUN),
            ("MOAT_VM_DESTROY", vm::VM_DESTROY),
            ("MOAT_VM_RECLAIM", vm::VM_RECLAIM),
        ] {
            assert_eq!(get(name), i64::from(id), "{name}");
        }
        let errors = [
            ("MOAT_NOT_SUPPORTED", Error::NotSupported),
            ("MOAT_INVALID_PARAMETERS", Error::InvalidParameters),
            ("MOAT_DENIED", Error::Denied),
            ("MOAT_NO_MEMORY", Error::NoMemory),
            ("MOAT_BUSY", Error::Busy),
            ("MOAT_SERVICE_FAILED", Error::ServiceFailed),
            ("MOAT_VERSION_MISMATCH", Error::VersionMismatch),
            ("MOAT_INTERRUPTED", Error::Interrupted),
            ("MOAT_RETRY", Error::Retry),
        ];
        // Every error the core can answer has its constant in the module.
        assert_eq!(errors.len(), Error::ALL.len());
        for (name, e) in errors {
            assert_eq!(get(name), e.code(), "{name}");
        }
        assert_eq!(
            get("MOAT_MMIO_ABORT"),
            vm::MmioAnswer::ABORT as i64,
            "MOAT_MMIO_ABORT"
        );
    }

    #[test]
    fn header_packages_of_the_kernel() {
        let (abi, version) = kernel_abi("linux-image-6.1.0-57-arm64-unsigned 6.1.192-3").unwrap();
        assert_eq!((abi.as_str(), version.as_str()), ("6.1.0-57", "6.1.192-3"));
        let p = header_packages(&abi).unwrap();
        assert_eq!(p[0], ("linux-headers-6.1.0-57-arm64".into(), "arm64"));
        assert_eq!(p[1], ("linux-headers-6.1.0-57-common".into(), "all"));
        assert_eq!(p[2], ("linux-kbuild-6.1".into(), "amd64"));
        assert_eq!(kernel_abi("busybox 1.0"), None);
    }
}
