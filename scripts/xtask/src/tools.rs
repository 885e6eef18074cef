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

/// Builds `images/<name>`, a cargo project of its own outside the
/// workspace, in release mode for `target`, into `target/<name>/`; returns
/// the path of its binary `name`.
pub fn build_outside_workspace(name: &str, target: &str) -> Result<PathBuf> {
    let target_dir = target_dir().join(name);
    run(cargo()
        .current_dir(root().join("images").join(name))
        .args(["build", "--release", "--target", target, "--target-dir"])
        .arg(&target_dir))?;
    Ok(target_dir.join(target).join("release").join(name))
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

/// The rustup targets and components `rust-toolchain.toml` lists.
fn pinned_toolchain() -> Result<(String, Vec<String>, Vec<String>)> {
    #[derive(serde::Deserialize)]
    struct File {
        toolchain: Toolchain,
    }
    #[derive(serde::Deserialize)]
    struct Toolchain {
        channel: String,
        #[serde(default)]
        components: Vec<String>,
        #[serde(default)]
        targets: Vec<String>,
    }
    let path = root().join("rust-toolchain.toml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let file: File =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok((
        file.toolchain.channel,
        file.toolchain.targets,
        file.toolchain.components,
    ))
}

/// What `rustup <what> list --installed` prints for the pinned toolchain,
/// one name a line.
fn rustup_installed(what: &str, channel: &str) -> Result<Vec<String>> {
    let out = Command::new("rustup")
        .args([what, "list", "--installed", "--toolchain", channel])
        .current_dir(root())
        .output()
        .context("starting rustup")?;
    if !out.status.success() {
        bail!(
            "rustup {what} list failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_string())
        .collect())
}

/// The pinned toolchain's sysroot, as its `rustc` reports it.
fn sysroot() -> Result<PathBuf> {
    let out = Command::new("rustc")
        .args(["--print", "sysroot"])
        .current_dir(root())
        .output()
        .context("starting rustc")?;
    if !out.status.success() {
        bail!(
            "rustc --print sysroot failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// Makes sure the targets and components `rust-toolchain.toml` lists are
/// installed before anything is built: rustup can be set not to fetch them
/// by itself, and without them the aarch64 builds fail with "can't find
/// crate for `core`". Installs them with rustup, or says the command.
pub fn ensure_toolchain() -> Result<()> {
    let (channel, targets, components) = pinned_toolchain()?;
    let fix = format!(
        "rustup toolchain install {channel} --profile minimal --component {} --target {}",
        components.join(","),
        targets.join(",")
    );
    if Command::new("rustup").arg("--version").output().is_err() {
        // A toolchain without rustup: check the sysroot for the targets.
        let lib = sysroot()?.join("lib/rustlib");
        let missing: Vec<_> = targets.iter().filter(|t| !lib.join(t).exists()).collect();
        if missing.is_empty() {
            return Ok(());
        }
        bail!(
            "the Rust toolchain lacks the targets {missing:?} and rustup is not installed; \
             install rustup and run:\n  {fix}"
        );
    }
    let installed_targets = rustup_installed("target", &channel)?;
    let installed_components = rustup_installed("component", &channel)?;
    let missing_targets: Vec<&String> = targets
        .iter()
        .filter(|t| !installed_targets.contains(t))
        .collect();
    // Components are listed with the host triple appended
    // (`llvm-tools-x86_64-unknown-linux-gnu`).
    let missing_components: Vec<&String> = components
        .iter()
        .filter(|c| {
            !installed_components
                .iter()
                .any(|i| i == *c || i.starts_with(&format!("{c}-")))
        })
        .collect();
    if missing_targets.is_empty() && missing_components.is_empty() {
        // rustup's record and the sysroot can disagree (a half-removed or
        // hand-copied toolchain): the build needs the files.
        let lib = sysroot()?.join("lib/rustlib");
        if let Some(gone) = targets.iter().find(|t| !lib.join(t).join("lib").is_dir()) {
            bail!(
                "rustup lists the target {gone} as installed but {} has no files for it; \
                 reinstall it: rustup target remove {gone} --toolchain {channel} && \
                 rustup target add {gone} --toolchain {channel}",
                lib.display()
            );
        }
        return Ok(());
    }
    let mut what: Vec<String> = missing_targets.iter().map(|t| t.to_string()).collect();
    what.extend(missing_components.iter().map(|c| c.to_string()));
    eprintln!(
        "xtask: adding {} to Rust {channel} (rust-toolchain.toml lists them)",
        what.join(", ")
    );
    let rustup = |args: &[&str]| {
        Command::new("rustup")
            .args(args)
            .args(["--toolchain", &channel])
            // A download that fails is rustup's few lines, not its stack.
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .current_dir(root())
            .status()
            .context("starting rustup")
    };
    let mut status = std::process::ExitStatus::default();
    if !missing_targets.is_empty() {
        let mut args = vec!["target", "add"];
        args.extend(missing_targets.iter().map(|t| t.as_str()));
        status = rustup(&args)?;
    }
    if status.success() && !missing_components.is_empty() {
        let mut args = vec!["component", "add"];
        args.extend(missing_components.iter().map(|c| c.as_str()));
        status = rustup(&args)?;
    }
    if !status.success() {
        bail!("rustup could not install the pinned toolchain's parts ({status}); run:\n  {fix}");
    }
    Ok(())
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

const BACKPORTS_LIST: &str = "/etc/apt/sources.list.d/moat-bookworm-backports.list";
const BACKPORTS_LINE: &str = "deb http://deb.debian.org/debian bookworm-backports main";

/// Whether some apt source already names bookworm-backports (one-line
/// `.list` files or deb822 `.sources` files).
fn backports_configured() -> bool {
    let mut files = vec![PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
    }
    files.iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|text| {
            text.lines()
                .map(str::trim)
                .filter(|l| !l.starts_with('#'))
                .any(|l| l.contains("bookworm-backports"))
        })
    })
}

/// Adds the bookworm-backports apt source, as root, unless some source
/// names it already. Returns whether it was added.
pub fn ensure_backports_source() -> Result<bool> {
    if backports_configured() || !is_root() {
        return Ok(false);
    }
    // A file of the user's by that name is never overwritten.
    use std::io::Write;
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(BACKPORTS_LIST)
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
            "{BACKPORTS_LIST} exists but names no bookworm-backports source; \
             add `{BACKPORTS_LINE}` to an apt sources file and run again"
        ),
        Err(e) => return Err(e).with_context(|| format!("creating {BACKPORTS_LIST}")),
    };
    eprintln!("xtask: adding {BACKPORTS_LIST} ({BACKPORTS_LINE})");
    file.write_all(format!("{BACKPORTS_LINE}\n").as_bytes())
        .with_context(|| format!("writing {BACKPORTS_LIST}"))?;
    Ok(true)
}

/// Where apt's output goes while the xtask installs something: shown only
/// when the install fails.
fn apt_log() -> PathBuf {
    target_dir().join("apt.log")
}

/// Runs an apt command with its output appended to `target/apt.log`
/// instead of the terminal; the log is printed only if the command fails.
pub fn run_apt_logged(cmd: &mut Command) -> Result<()> {
    use std::io::Write;
    let log = apt_log();
    std::fs::create_dir_all(target_dir())?;
    let out = cmd
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut text = format!("$ {cmd:?}\n").into_bytes();
    text.extend_from_slice(&out.stdout);
    text.extend_from_slice(&out.stderr);
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .and_then(|mut f| f.write_all(&text))
        .with_context(|| format!("writing {}", log.display()))?;
    if !out.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&text));
        bail!(
            "{cmd:?} failed with {} (its output is above and in {})",
            out.status,
            log.display()
        );
    }
    Ok(())
}

/// Runs the shell `commands` that install `what` (saying `why` in one
/// line), if this is Debian 12 and we are root; returns whether it ran them
/// (elsewhere the caller prints them for the user to run). Their output goes
/// to `target/apt.log`, printed only if they fail.
fn install_on_debian(what: &str, why: &str, commands: &str) -> Result<bool> {
    if !(is_root() && is_debian_bookworm()) {
        return Ok(false);
    }
    eprintln!("xtask: installing {what} ({why}); apt's output goes to target/apt.log");
    run_apt_logged(Command::new("sh").args(["-c", commands]))
        .with_context(|| format!("installing {what} failed; the commands were:\n  {commands}"))?;
    Ok(true)
}

/// Where QEMU finds the option ROM of its default network card
/// (virtio-net-pci), without which `-M virt` refuses to start.
const NIC_ROMS: [&str; 2] = [
    "/usr/share/qemu/efi-virtio.rom",
    "/usr/lib/ipxe/qemu/efi-virtio.rom",
];

fn nic_rom_present() -> bool {
    NIC_ROMS.iter().any(|p| Path::new(p).exists())
}

/// QEMU 9 or newer (10 from bookworm-backports on Debian 12): only the
/// package that holds `qemu-system-aarch64` and the network card ROM QEMU
/// loads for `virt` (ipxe-qemu), without recommends (no GUI, audio or GL
/// stacks), and a backports source only where none exists.
pub fn ensure_qemu() -> Result<()> {
    let ready =
        || qemu_major().is_some_and(|v| v >= 9) && (!is_debian_bookworm() || nic_rom_present());
    if ready() {
        return Ok(());
    }
    let add_source = if backports_configured() {
        String::new()
    } else {
        // Never over a file of the user's (`set -C`: `>` refuses to
        // overwrite); apt then says that it knows no bookworm-backports.
        format!("(set -C; echo '{BACKPORTS_LINE}' > {BACKPORTS_LIST}) && ")
    };
    let commands = format!(
        "{add_source}apt-get update && \
         apt-get install -y --no-install-recommends -t bookworm-backports qemu-system-arm ipxe-qemu"
    );
    if install_on_debian(
        "qemu-system-arm and ipxe-qemu from bookworm-backports",
        "the integration tests boot Moat under QEMU 9 or newer",
        &commands,
    )? {
        if ready() {
            return Ok(());
        }
        bail!(
            "QEMU is still older than 9, or has no efi-virtio.rom, after installing from bookworm-backports"
        );
    }
    let found = match qemu_major() {
        Some(v) => format!("found version {v}"),
        None => "none found".to_string(),
    };
    bail!(
        "Moat needs qemu-system-aarch64 9 or newer ({found}). On Debian 12, as root:\n  {commands}\n\
         Elsewhere, install QEMU >= 9 with your package manager."
    )
}

/// Whether `program --version` runs and succeeds.
fn runs(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `program`, installed from Debian with `commands` (`what`, `why`: see
/// [`install_on_debian`]) if it does not run; `needed_for` starts the error
/// that prints the commands when it cannot be installed.
fn ensure_from_debian(
    program: &str,
    commands: &str,
    what: &str,
    why: &str,
    needed_for: &str,
) -> Result<()> {
    if runs(program) || (install_on_debian(what, why, commands)? && runs(program)) {
        return Ok(());
    }
    bail!(
        "{needed_for}. On Debian 12, as root:\n  {commands}\n\
         Elsewhere, install {what} with your package manager."
    )
}

/// Valgrind (for `cargo xtask bench --emulator-cost`), installed from
/// Debian if missing.
pub fn ensure_valgrind() -> Result<()> {
    ensure_from_debian(
        "valgrind",
        "apt-get install -y --no-install-recommends valgrind",
        "valgrind",
        "--emulator-cost counts QEMU's own instructions under it",
        "counting the emulator's instructions needs valgrind",
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

/// The cross compiler `moat.ko` is built with: Debian's
/// `gcc-aarch64-linux-gnu` (gcc 12, the compiler Debian built its arm64
/// kernel with), installed from Debian if missing.
pub fn ensure_cross_gcc() -> Result<()> {
    ensure_from_debian(
        "aarch64-linux-gnu-gcc-12",
        "apt-get install -y --no-install-recommends gcc-aarch64-linux-gnu make",
        "gcc-aarch64-linux-gnu",
        "moat.ko, the Linux host's module for protected VMs, is C built against Debian's arm64 headers",
        "building moat.ko needs Debian's arm64 cross compiler",
    )
}

/// `xz`, which `tar -J` runs to unpack Debian's kernel source tarball,
/// installed from Debian if missing.
pub fn ensure_xz() -> Result<()> {
    ensure_from_debian(
        "xz",
        "apt-get install -y --no-install-recommends xz-utils",
        "xz-utils",
        "checkpatch.pl comes out of Debian's .tar.xz kernel source",
        "unpacking Debian's kernel source needs xz",
    )
}

/// Perl with its standard modules (checkpatch.pl uses Term::ANSIColor, which
/// Debian's `perl-base` lacks), installed from Debian if missing.
pub fn ensure_perl() -> Result<()> {
    let ready = || {
        Command::new("perl")
            .args(["-MTerm::ANSIColor", "-e", "1"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let commands = "apt-get install -y --no-install-recommends perl";
    if ready()
        || (install_on_debian("perl", "checkpatch.pl is a Perl script", commands)? && ready())
    {
        return Ok(());
    }
    bail!(
        "checking moat.ko's style needs Perl with its standard modules. On Debian 12, as root:\n  \
         {commands}\nElsewhere, install Perl with your package manager."
    )
}
