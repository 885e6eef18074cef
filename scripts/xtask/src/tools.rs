//! Finding and installing the tools the build and the tests need.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root exists")
}

/// `target/` under the workspace.
pub fn target_dir() -> PathBuf {
    root().join("target")
}

/// Runs a command, failing with its command line if it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// A `cargo` command from the toolchain running us.
pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

/// The llvm-tools binary `name` (rust-objcopy, llvm-nm, ...) of the pinned toolchain.
pub fn llvm_tool(name: &str) -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(root())
        .output()?;
    let sysroot = String::from_utf8(out.stdout)?.trim().to_string();
    let out = Command::new("rustc")
        .args(["-vV"])
        .current_dir(root())
        .output()?;
    let host = String::from_utf8(out.stdout)?
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .context("rustc -vV names no host")?;
    let path = Path::new(&sysroot)
        .join("lib/rustlib")
        .join(host)
        .join("bin")
        .join(name);
    if !path.exists() {
        bail!(
            "{} not found: run `rustup component add llvm-tools` (rust-toolchain.toml lists it)",
            path.display()
        );
    }
    Ok(path)
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

fn is_debian_bookworm() -> bool {
    std::fs::read_to_string("/etc/os-release")
        .map(|s| s.contains("VERSION_CODENAME=bookworm"))
        .unwrap_or(false)
}

/// The major version of `qemu-system-aarch64`, if installed.
fn qemu_major() -> Option<u32> {
    let out = Command::new("qemu-system-aarch64")
        .arg("--version")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let v = text
        .split_whitespace()
        .skip_while(|w| *w != "version")
        .nth(1)?;
    v.split('.').next()?.parse().ok()
}

const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/bookworm-backports.list";
const BACKPORTS_LINE: &str = "deb http://deb.debian.org/debian bookworm-backports main";

/// Runs the shell `commands` that install `what`, if this is Debian 12 and
/// we are root; returns whether it ran them (elsewhere the caller prints
/// them for the user to run).
fn install_on_debian(what: &str, commands: &str) -> Result<bool> {
    if !(is_root() && is_debian_bookworm()) {
        return Ok(false);
    }
    eprintln!("xtask: installing {what}");
    run(Command::new("sh")
        .args(["-c", commands])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    Ok(true)
}

/// QEMU 9 or newer (10 from bookworm-backports on Debian 12).
pub fn ensure_qemu() -> Result<()> {
    if qemu_major().is_some_and(|v| v >= 9) {
        return Ok(());
    }
    let commands = format!(
        "echo '{BACKPORTS_LINE}' > {BACKPORTS_LIST} && apt-get update && \
         apt-get install -y -t bookworm-backports qemu-system-arm"
    );
    if install_on_debian("QEMU from bookworm-backports", &commands)? {
        if qemu_major().is_some_and(|v| v >= 9) {
            return Ok(());
        }
        bail!("QEMU is still older than 9 after installing from bookworm-backports");
    }
    bail!(
        "Moat needs qemu-system-aarch64 9 or newer (found {:?}). On Debian 12, as root:\n  {commands}\n\
         Elsewhere, install QEMU >= 9 with your package manager.",
        qemu_major()
    )
}

/// Valgrind (for `cargo xtask bench --emulator-cost`), installed from
/// Debian if missing.
pub fn ensure_valgrind() -> Result<()> {
    let present = || {
        Command::new("valgrind")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if present() {
        return Ok(());
    }
    let commands = "apt-get install -y valgrind";
    if install_on_debian("valgrind", commands)? && present() {
        return Ok(());
    }
    bail!(
        "counting the emulator's instructions needs valgrind. On Debian, as root:\n  {commands}\n\
         Elsewhere, install valgrind with your package manager."
    )
}

/// mdbook, installed with cargo if missing.
pub fn ensure_mdbook() -> Result<PathBuf> {
    if let Ok(out) = Command::new("mdbook").arg("--version").output()
        && out.status.success()
    {
        return Ok(PathBuf::from("mdbook"));
    }
    let cargo_bin = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cargo"))
        .join("bin/mdbook");
    if cargo_bin.exists() {
        return Ok(cargo_bin);
    }
    eprintln!("xtask: installing mdbook (cargo install mdbook --locked; about two minutes)");
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())).args([
            "install",
            "mdbook",
            "--locked",
            "--version",
            "0.5.4",
        ]),
    )?;
    Ok(cargo_bin)
}
