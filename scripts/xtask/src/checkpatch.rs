//! The Linux kernel's own style check (`scripts/checkpatch.pl`) over
//! `moat.ko`'s sources, so the module stays as a kernel maintainer would
//! take it.
//!
//! The script comes from Debian's `linux-source-<series>` package of the
//! kernel series the module is built for: the `.deb` is downloaded with apt
//! into the cache and checked against apt's SHA256, and the script with the
//! two word lists it reads is taken out of the source tarball once and kept
//! beside it.

use crate::debian;
use crate::tools;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The module's sources, relative to the workspace.
const SOURCES: [&str; 2] = [
    "images/linux-module/moat.c",
    "images/linux-module/moat_uapi.h",
];

/// What checkpatch reads besides itself.
const SCRIPT_FILES: [&str; 3] = [
    "scripts/checkpatch.pl",
    "scripts/spelling.txt",
    "scripts/const_structs.checkpatch",
];

/// `checkpatch.pl` for kernel series `series` (`6.1`), fetched once.
fn script(series: &str) -> Result<PathBuf> {
    let package = format!("linux-source-{series}");
    let shown =
        debian::output(Command::new("apt-cache").args(["show", "--no-all-versions", &package]))
            .with_context(|| format!("apt-cache show {package}"))?;
    let stanza = debian::stanzas(&shown)
        .into_iter()
        .next()
        .with_context(|| format!("apt-cache show {package}: no package"))?;
    let field = |k: &str| {
        stanza
            .get(k)
            .cloned()
            .with_context(|| format!("apt-cache show {package}: no {k}"))
    };
    let version = field("Version")?;
    let sha = field("SHA256")?.to_ascii_lowercase();
    let dir = debian::cache_dir()?
        .join("checkpatch")
        .join(version.replace(':', "%3a"));
    let checkpatch = dir.join(SCRIPT_FILES[0]);
    if SCRIPT_FILES.iter().all(|f| dir.join(f).is_file()) {
        return Ok(checkpatch);
    }
    std::fs::create_dir_all(&dir)?;
    let deb = dir.join(format!("{package}.deb"));
    if !debian::file_matches(&deb, &sha) {
        eprintln!(
            "xtask: fetching {package} {version} once for the kernel's checkpatch.pl (about 140 MB)"
        );
        debian::download_spec(
            &dir,
            &format!("{package}={version}"),
            &deb,
            tools::is_root(),
        )?;
        if !debian::file_matches(&deb, &sha) {
            let _ = std::fs::remove_file(&deb);
            bail!("{package} {version} does not match the SHA256 apt published ({sha})");
        }
    }
    let unpacked = dir.join("deb");
    let _ = std::fs::remove_dir_all(&unpacked);
    tools::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let tarball = unpacked
        .join("usr/src")
        .join(format!("linux-source-{series}.tar.xz"));
    let top = format!("linux-source-{series}");
    // `tar -J` runs `xz`, which a minimal Debian root lacks.
    tools::ensure_xz()?;
    let mut tar = Command::new("tar");
    tar.arg("-xJf")
        .arg(&tarball)
        .arg("-C")
        .arg(&dir)
        .arg("--strip-components=1");
    for f in SCRIPT_FILES {
        tar.arg(format!("{top}/{f}"));
    }
    tools::run(&mut tar)?;
    std::fs::remove_dir_all(&unpacked)?;
    std::fs::remove_file(&deb)?;
    Ok(checkpatch)
}

/// Runs checkpatch (`--strict`, files rather than a patch) over the module's
/// sources; fails on any error, warning or check it reports.
pub fn check_module(series: &str) -> Result<()> {
    let script = script(series)?;
    tools::ensure_perl()?;
    let root = tools::root();
    let out = Command::new("perl")
        .arg(&script)
        .args(["--no-tree", "--strict", "--terse", "--show-types", "-f"])
        .args(SOURCES.iter().map(|s| root.join(s)))
        .output()
        .context("starting perl (checkpatch.pl is a Perl script)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let findings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(": ERROR:") || l.contains(": WARNING:") || l.contains(": CHECK:"))
        .collect();
    if !findings.is_empty() || !out.status.success() {
        bail!(
            "checkpatch.pl ({}) finds style problems in moat.ko's sources:\n{}",
            Path::new(&script).display(),
            if findings.is_empty() {
                format!("{text}{}", String::from_utf8_lossy(&out.stderr))
            } else {
                findings.join("\n")
            }
        );
    }
    println!("xtask: checkpatch.pl --strict: moat.ko's sources are clean");
    Ok(())
}
