//! The kernel's own modules in the initramfs.
//!
//! Debian builds drivers a Linux run needs as modules (bookworm's 6.1 has
//! virtio_pci and virtio-rng as `=m`), and a package's `modules.dep` is
//! written by depmod at install time, so it is not in the `.deb`. The xtask
//! takes the modules a run wants from the same `.deb` as the kernel, with
//! every module they depend on (each module's `.modinfo` `depends=`),
//! leaves out those the kernel has built in (`modules.builtin`), unpacks
//! compressed ones, and writes them with a `modules.dep` and a load order
//! that `/init` follows with `insmod`. The selection is kept in
//! `target/linux-modules/<deb>/`, so the `.deb` is unpacked once.

use crate::tools;
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The modules every Linux run wants, where the kernel has them as modules:
/// the virtio PCI transport and the virtio entropy source QEMU's
/// `virtio-rng-pci` needs, and for `--disk` the virtio block driver and
/// the FAT file system with the code page and character sets it mounts
/// with.
pub const WANTED: &[&str] = &[
    "virtio_pci",
    "virtio_rng",
    "virtio_blk",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
];

/// Modules for an initramfs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Modules {
    /// The kernel release (`/lib/modules/<release>`).
    pub release: String,
    /// Paths under `/lib/modules/<release>/`, dependencies first.
    pub load_order: Vec<String>,
    /// The `modules.dep` for them.
    pub dep: String,
    /// Where the unpacked files are.
    pub dir: PathBuf,
}

impl Modules {
    /// The bytes of the module at `path` (one of `load_order`).
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let file = self.dir.join("files").join(path);
        std::fs::read(&file).with_context(|| format!("reading {}", file.display()))
    }
}

/// A module's name as the kernel spells it: the file name without `.ko`
/// and compression suffix, `-` as `_`.
pub fn module_name(file: &str) -> Option<String> {
    let base = file.rsplit('/').next()?;
    let stem = base
        .strip_suffix(".ko")
        .or_else(|| base.strip_suffix(".ko.xz"))
        .or_else(|| base.strip_suffix(".ko.zst"))
        .or_else(|| base.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

/// The `depends=` list of a module's `.modinfo`.
pub fn depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"depends=";
    let mut at = 0;
    while let Some(found) = ko[at..].windows(KEY.len()).position(|w| w == KEY) {
        let start = at + found;
        if start == 0 || ko[start - 1] == 0 {
            let value = &ko[start + KEY.len()..];
            let end = value.iter().position(|b| *b == 0).unwrap_or(value.len());
            return String::from_utf8_lossy(&value[..end])
                .split(',')
                .filter(|d| !d.is_empty())
                .map(|d| d.replace('-', "_"))
                .collect();
        }
        at = start + 1;
    }
    Vec::new()
}

/// The modules of `wanted` that `available` (name -> path) has, each after
/// the modules it depends on (`deps`), none twice. Names in `builtin` need
/// nothing; names in neither are left out and returned separately.
pub fn load_order(
    wanted: &[&str],
    available: &BTreeMap<String, String>,
    builtin: &BTreeSet<String>,
    deps: &dyn Fn(&str) -> Result<Vec<String>>,
) -> Result<(Vec<String>, Vec<String>)> {
    fn visit(
        name: &str,
        available: &BTreeMap<String, String>,
        builtin: &BTreeSet<String>,
        deps: &dyn Fn(&str) -> Result<Vec<String>>,
        order: &mut Vec<String>,
        missing: &mut Vec<String>,
        depth: usize,
    ) -> Result<()> {
        if builtin.contains(name) || order.iter().any(|n| n == name) {
            return Ok(());
        }
        if depth > 32 {
            bail!("module dependencies nest deeper than 32 at {name}");
        }
        if !available.contains_key(name) {
            missing.push(name.to_string());
            return Ok(());
        }
        for d in deps(name)? {
            visit(&d, available, builtin, deps, order, missing, depth + 1)?;
        }
        if !order.iter().any(|n| n == name) {
            order.push(name.to_string());
        }
        Ok(())
    }
    let (mut order, mut missing) = (Vec::new(), Vec::new());
    for name in wanted {
        visit(
            &name.replace('-', "_"),
            available,
            builtin,
            deps,
            &mut order,
            &mut missing,
            0,
        )?;
    }
    Ok((order, missing))
}

/// The contents of a module file: unpacked if compressed.
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        "xz"
    } else if name.ends_with(".zst") {
        "zstd"
    } else if name.ends_with(".gz") {
        "gzip"
    } else {
        return std::fs::read(path).with_context(|| format!("reading {}", path.display()));
    };
    let out = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .output()
        .with_context(|| format!("starting {tool} to unpack {}", path.display()))?;
    if !out.status.success() {
        bail!("{tool} -dc {} failed", path.display());
    }
    Ok(out.stdout)
}

/// Every module file under `root` (a `/lib/modules/<release>`), by name.
fn index(root: &Path) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.join("kernel")];
    while let Some(dir) = stack.pop() {
        let Ok(listing) = std::fs::read_dir(&dir) else {
            continue;
        };
        for path in listing.filter_map(|e| e.ok().map(|e| e.path())) {
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.to_str().and_then(module_name)
                && let Ok(rel) = path.strip_prefix(root)
            {
                out.insert(name, rel.to_string_lossy().into_owned());
            }
        }
    }
    Ok(out)
}

/// The path a module is written to in the initramfs: compression suffix
/// dropped (the files are unpacked).
fn unpacked_path(rel: &str) -> String {
    for suffix in [".xz", ".zst", ".gz"] {
        if let Some(p) = rel.strip_suffix(suffix) {
            return p.to_string();
        }
    }
    rel.to_string()
}

/// The modules [`WANTED`] from the kernel package `deb`, with their
/// dependencies; unpacked on first use into `target/linux-modules/`.
pub fn from_deb(deb: &Path) -> Result<Modules> {
    let stem = deb
        .file_stem()
        .context("a .deb path without a file name")?
        .to_string_lossy()
        .into_owned();
    let dir = tools::target_dir().join("linux-modules").join(&stem);
    if let Some(m) = read_selection(&dir) {
        return Ok(m);
    }
    let _ = std::fs::remove_dir_all(&dir);
    let unpack = dir.with_extension("unpack");
    let _ = std::fs::remove_dir_all(&unpack);
    std::fs::create_dir_all(&unpack)?;
    tools::run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&unpack))?;
    let root = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|base| std::fs::read_dir(unpack.join(base)).ok())
        .flat_map(|l| l.filter_map(|e| e.ok().map(|e| e.path())))
        .find(|p| p.is_dir())
        .with_context(|| format!("{} has no /lib/modules/<release>", deb.display()))?;
    let release = root
        .file_name()
        .context("modules folder without a name")?
        .to_string_lossy()
        .into_owned();
    let available = index(&root)?;
    let builtin: BTreeSet<String> = std::fs::read_to_string(root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(module_name)
        .collect();
    let deps = |name: &str| -> Result<Vec<String>> {
        let rel = &available[name];
        Ok(depends(&module_bytes(&root.join(rel))?))
    };
    let (order, missing) = load_order(WANTED, &available, &builtin, &deps)?;
    if !missing.is_empty() {
        eprintln!(
            "xtask: {} has no module {} (not built in either): left out",
            deb.display(),
            missing.join(", ")
        );
    }
    let files = dir.join("files");
    let mut dep = String::new();
    let mut paths = Vec::new();
    for name in &order {
        let rel = &available[name];
        let out = unpacked_path(rel);
        let target = files.join(&out);
        std::fs::create_dir_all(target.parent().context("module path without a folder")?)?;
        std::fs::write(&target, module_bytes(&root.join(rel))?)?;
        let own: Vec<String> = deps(name)?
            .iter()
            .filter(|d| available.contains_key(*d) && !builtin.contains(*d))
            .map(|d| unpacked_path(&available[d]))
            .collect();
        dep.push_str(&format!("{out}: {}\n", own.join(" ")));
        paths.push(out);
    }
    std::fs::write(dir.join("modules.dep"), &dep)?;
    std::fs::write(dir.join("release"), &release)?;
    std::fs::write(dir.join("wanted"), WANTED.join(" "))?;
    std::fs::write(dir.join("load-order"), paths.join("\n"))?;
    std::fs::remove_dir_all(&unpack)?;
    Ok(Modules {
        release,
        load_order: paths,
        dep,
        dir,
    })
}

/// A selection written earlier, if complete.
fn read_selection(dir: &Path) -> Option<Modules> {
    // A selection made for another list of modules is made again.
    if std::fs::read_to_string(dir.join("wanted")).ok()? != WANTED.join(" ") {
        return None;
    }
    let release = std::fs::read_to_string(dir.join("release")).ok()?;
    let dep = std::fs::read_to_string(dir.join("modules.dep")).ok()?;
    let order = std::fs::read_to_string(dir.join("load-order")).ok()?;
    let load_order: Vec<String> = order
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    load_order
        .iter()
        .all(|p| dir.join("files").join(p).is_file())
        .then(|| Modules {
            release,
            load_order,
            dep,
            dir: dir.to_path_buf(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names() {
        assert_eq!(
            module_name("kernel/drivers/char/hw_random/virtio-rng.ko").as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(
            module_name("kernel/drivers/virtio/virtio_pci.ko.xz").as_deref(),
            Some("virtio_pci")
        );
        assert_eq!(module_name("modules.dep"), None);
    }

    #[test]
    fn modinfo_depends() {
        let ko = b"\x7fELF...\0license=GPL\0depends=virtio_pci_modern_dev,virtio_pci-legacy_dev\0name=virtio_pci\0";
        assert_eq!(
            depends(ko),
            vec!["virtio_pci_modern_dev", "virtio_pci_legacy_dev"]
        );
        assert_eq!(depends(b"\0depends=\0name=x\0"), Vec::<String>::new());
        // A "depends=" inside another string is not the field.
        assert_eq!(depends(b"\0description=xdepends=a\0"), Vec::<String>::new());
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let available: BTreeMap<String, String> = [
            "virtio_pci",
            "virtio_pci_modern_dev",
            "virtio_pci_legacy_dev",
            "virtio_rng",
            "rng_core",
        ]
        .iter()
        .map(|n| (n.to_string(), format!("kernel/{n}.ko")))
        .collect();
        let builtin: BTreeSet<String> = ["rng_core".to_string()].into();
        let deps = |name: &str| -> Result<Vec<String>> {
            Ok(match name {
                "virtio_pci" => vec![
                    "virtio_pci_modern_dev".into(),
                    "virtio_pci_legacy_dev".into(),
                ],
                "virtio_rng" => vec!["rng_core".into(), "virtio_pci_modern_dev".into()],
                _ => vec![],
            })
        };
        let (order, missing) = load_order(
            &["virtio_pci", "virtio-rng", "virtio_blk"],
            &available,
            &builtin,
            &deps,
        )
        .unwrap();
        assert_eq!(
            order,
            vec![
                "virtio_pci_modern_dev",
                "virtio_pci_legacy_dev",
                "virtio_pci",
                "virtio_rng"
            ]
        );
        assert_eq!(missing, vec!["virtio_blk"]);
        // Everything built in: nothing to load.
        let all: BTreeSet<String> = available.keys().cloned().collect();
        assert_eq!(
            load_order(&["virtio_pci"], &available, &all, &deps).unwrap(),
            (vec![], vec![])
        );
    }
}
