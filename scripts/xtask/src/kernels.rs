//! Host kernels of the user's choosing: any arm64 Image (`--kernel`), or a
//! Debian kernel package fetched by name (`--kernel-package`).
//!
//! The default kernel (bookworm's 6.1) and busybox keep their cache and
//! manifest (`linux.rs`); a package named here gets a folder of its own
//! under it, `kernels/<package>/`, with a manifest of the same kind: the
//! `.deb`'s version and the SHA256 apt published, and the Image extracted
//! from it with its own SHA256. Every use checks both; a folder that fails
//! the check is fetched again. A name may hold `*` (for instance
//! `linux-image-6.12.*+deb12-arm64-unsigned`): the newest version apt knows
//! among the matching arm64 packages is used.

use crate::debian::{self, Assets};
use crate::tools;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Which kernel a Linux run boots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// Debian bookworm's arm64 kernel (the shared cache).
    #[default]
    Default,
    /// An arm64 Linux Image file; no modules.
    Image(PathBuf),
    /// A Debian arm64 kernel package, by name (`*` matches any text).
    Package(String),
}

/// The files a Linux run needs for `kernel`: the kernel Image, the `.deb`
/// it came from (for its modules), and busybox from the default cache.
pub fn assets(kernel: &Kernel) -> Result<Assets> {
    let base = debian::ensure_assets()?;
    match kernel {
        Kernel::Default => Ok(base),
        Kernel::Image(path) => {
            let head =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            if !debian::is_arm64_image(&head) {
                bail!(
                    "{} is not an arm64 Linux Image (no ARM\\x64 magic at byte 56; a compressed vmlinuz must be unpacked first)",
                    path.display()
                );
            }
            Ok(Assets {
                kernel: path.clone(),
                kernel_package: format!("Image {}", path.display()),
                kernel_deb: None,
                ..base
            })
        }
        Kernel::Package(name) => {
            let k = package(name)?;
            Ok(Assets {
                kernel: k.image,
                kernel_package: format!("{} {}", k.package, k.version),
                kernel_deb: Some(k.deb),
                ..base
            })
        }
    }
}

/// A kernel package in its cache folder.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Cached {
    package: String,
    version: String,
    sha256: String,
    deb: PathBuf,
    image: PathBuf,
    image_sha256: String,
}

const MANIFEST: &str = "manifest";

fn parse_manifest(dir: &Path, text: &str) -> Option<Cached> {
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let [package, version, sha256, deb, image, image_sha256] = f[..] else {
        return None;
    };
    Some(Cached {
        package: package.into(),
        version: version.into(),
        sha256: sha256.into(),
        deb: dir.join(deb),
        image: dir.join(image),
        image_sha256: image_sha256.into(),
    })
}

fn format_manifest(c: &Cached) -> String {
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    format!(
        "# A Debian kernel package for `cargo xtask run linux --kernel-package`, written by the xtask.\n\
         # package version deb-sha256(as apt published it) deb image image-sha256\n\
         {} {} {} {} {} {}\n",
        c.package,
        c.version,
        c.sha256,
        name(&c.deb),
        name(&c.image),
        c.image_sha256
    )
}

/// The folder of one package.
fn folder(package: &str) -> Result<PathBuf> {
    if package.is_empty() || package.contains(['/', '*']) || package.starts_with('.') {
        bail!("{package:?} is not a package name");
    }
    Ok(debian::cache_dir()?.join("kernels").join(package))
}

/// The cached package in `dir`, if its files match its manifest.
fn cached(dir: &Path) -> Option<Cached> {
    let c = parse_manifest(dir, &std::fs::read_to_string(dir.join(MANIFEST)).ok()?)?;
    (debian::file_matches(&c.deb, &c.sha256) && debian::file_matches(&c.image, &c.image_sha256))
        .then_some(c)
}

/// Whether `name` matches `pattern`, where `*` matches any text.
pub fn glob_matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// What apt offers for `name` on arm64: the newest matching package's
/// name, version and `.deb` SHA256. `None` if apt knows none.
fn resolve(name: &str) -> Result<Option<(String, String, String)>> {
    let names: Vec<String> = if name.contains('*') {
        let prefix = name.split('*').next().unwrap_or("");
        let listed = debian::output(Command::new("apt-cache").args(["pkgnames", prefix]))?;
        listed
            .lines()
            .map(str::trim)
            .filter(|n| glob_matches(name, n))
            .map(str::to_string)
            .collect()
    } else {
        vec![name.to_string()]
    };
    let mut best: Option<(String, String, String)> = None;
    for n in names {
        let Ok(text) = debian::output(Command::new("apt-cache").args([
            "show",
            "--no-all-versions",
            &format!("{n}:arm64"),
        ])) else {
            continue;
        };
        let Some(s) = debian::stanzas(&text).into_iter().next() else {
            continue;
        };
        let (Some(package), Some(version), Some(sha)) =
            (s.get("Package"), s.get("Version"), s.get("SHA256"))
        else {
            continue;
        };
        if sha.len() != 64 || !sha.chars().all(|c| c.is_ascii_hexdigit()) {
            continue;
        }
        if best
            .as_ref()
            .is_none_or(|(_, v, _)| debian::newer(version, v))
        {
            best = Some((package.clone(), version.clone(), sha.to_ascii_lowercase()));
        }
    }
    Ok(best)
}

/// The kernel package `name`: from its cache folder when a plain name is
/// cached and intact, otherwise resolved with apt (adding bookworm-backports
/// and updating the package lists, as root, when apt knows no match) and
/// downloaded.
fn package(name: &str) -> Result<Cached> {
    if !name.contains('*')
        && let Some(c) = cached(&folder(name)?)
    {
        return Ok(c);
    }
    let mut found = resolve(name)?;
    if found.is_none() && tools::is_root() {
        tools::ensure_backports_source()?;
        eprintln!(
            "xtask: apt-get update (apt knows no arm64 package {name}); apt's output goes to target/apt.log"
        );
        tools::run_apt_logged(Command::new("apt-get").arg("update"))?;
        found = resolve(name)?;
    }
    let Some((package, version, sha256)) = found else {
        bail!(
            "apt knows no arm64 package {name}. As root on Debian 12:\n  \
             dpkg --add-architecture arm64; echo 'deb http://deb.debian.org/debian bookworm-backports main' \
             > /etc/apt/sources.list.d/moat-bookworm-backports.list; apt-get update\n\
             (`apt-cache pkgnames linux-image-` lists the kernels apt knows)"
        );
    };
    let dir = folder(&package)?;
    if let Some(c) = cached(&dir).filter(|c| c.version == version && c.sha256 == sha256) {
        return Ok(c);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let deb = dir.join(debian::deb_file_name(&package, &version));
    if !debian::file_matches(&deb, &sha256) {
        debian::download(&dir, &package, &version, &deb, tools::is_root())?;
        if !debian::file_matches(&deb, &sha256) {
            let _ = std::fs::remove_file(&deb);
            bail!(
                "{} does not match the SHA256 apt published ({sha256})",
                deb.display()
            );
        }
    }
    let image = dir.join(format!("Image-{}", version.replace(':', "%3a")));
    debian::extract(&deb, "kernel", &image)?;
    let c = Cached {
        package,
        version,
        sha256,
        deb,
        image_sha256: debian::sha256_file(&image)?,
        image,
    };
    let manifest = dir.join(MANIFEST);
    std::fs::write(manifest.with_extension("partial"), format_manifest(&c))?;
    std::fs::rename(manifest.with_extension("partial"), &manifest)?;
    // Older versions of this package in the folder are no longer named.
    if let Ok(listing) = std::fs::read_dir(&dir) {
        for path in listing.filter_map(|e| e.ok().map(|e| e.path())) {
            if path.is_file() && path != c.deb && path != c.image && path != manifest {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    eprintln!(
        "xtask: cached {} {} (SHA256 {} verified) in {}",
        c.package,
        c.version,
        c.sha256,
        dir.display()
    );
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let p = "linux-image-6.12.*+deb12-arm64-unsigned";
        assert!(glob_matches(p, "linux-image-6.12.95+deb12-arm64-unsigned"));
        assert!(glob_matches(p, "linux-image-6.12.118+deb12-arm64-unsigned"));
        assert!(!glob_matches(
            p,
            "linux-image-6.12.95+deb12-rt-arm64-unsigned"
        ));
        assert!(!glob_matches(
            p,
            "linux-image-6.12.95+deb12-arm64-16k-unsigned"
        ));
        assert!(!glob_matches(p, "linux-image-6.1.0-57-arm64-unsigned"));
        assert!(glob_matches("a", "a"));
        assert!(!glob_matches("a", "ab"));
        assert!(glob_matches("a*", "ab"));
        assert!(glob_matches("*b*d", "abcd"));
        assert!(!glob_matches("a*b*b", "ab"));
    }

    #[test]
    fn manifest_round_trip() {
        let dir = Path::new("/cache/kernels/k");
        let c = Cached {
            package: "k".into(),
            version: "1:6.12-1".into(),
            sha256: "ab".repeat(32),
            deb: dir.join("k_1%3a6.12-1_arm64.deb"),
            image: dir.join("Image-1%3a6.12-1"),
            image_sha256: "cd".repeat(32),
        };
        assert_eq!(parse_manifest(dir, &format_manifest(&c)), Some(c));
        assert_eq!(parse_manifest(dir, "k 1 ab deb\n"), None);
    }

    #[test]
    fn package_names_cannot_leave_the_cache() {
        assert!(folder("../x").is_err());
        assert!(folder("a/b").is_err());
        assert!(folder("linux-image-6.12.*").is_err());
        assert!(folder("").is_err());
    }
}
