//! Debian's arm64 kernel and busybox, fetched with apt and cached.
//!
//! The Linux runs (`linux.rs`), the other kernels (`kernels.rs`), the
//! headers `moat.ko` is built against (`linux_vm.rs`) and checkpatch
//! (`checkpatch.rs`) all take their files from Debian's archive through the
//! helpers here. The packages are kept in a cache outside the work tree
//! (`${XDG_CACHE_HOME:-$HOME/.cache}/moat/debian`), so a fresh clone does not
//! download them again. A manifest in the cache records each package's
//! version and the SHA256 apt published for its `.deb`; every use checks the
//! `.deb`s against it, and a cache that fails the check is fetched again.
//! While the cache is complete nothing touches the network.
//!
//! This module sits below every module that boots or builds something: it
//! uses only `tools`.

use crate::tools;
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The metapackage whose dependency names the kernel to use.
const KERNEL_METAPACKAGE: &str = "linux-image-arm64";
/// Kernels of this series are accepted from the metapackage's dependencies.
const KERNEL_SERIES: &str = "linux-image-6.1.0-";
const BUSYBOX_PACKAGE: &str = "busybox-static";
const MANIFEST: &str = "manifest";

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
        eprintln!(
            "xtask: apt-get update (the Debian package cache is incomplete); apt's output goes to target/apt.log"
        );
        tools::run_apt_logged(Command::new("apt-get").arg("update"))?;
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
    tools::run_apt_logged(cmd.arg(spec))?;
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
