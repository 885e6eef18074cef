//! `cargo xtask coverage`: how much of the core the host tests execute.
//!
//! The core's unit tests run on the development machine: those of the pure
//! library (`--lib`) and those of the `moat` binary (`--bins`), which build
//! the layers that run without the machine over a host stand-in for `arch`.
//! This builds both with LLVM's source-based coverage (`-C
//! instrument-coverage`, from the toolchain's `llvm-tools`: no extra cargo
//! plugin), runs them, merges their profiles and counts the lines of
//! `kernel/src` they execute. Files the host tests do not build at all
//! (the rest of the EL2 layers, which only run under QEMU), and items of
//! built files that exist on the target only (`#[cfg(target_os =
//! "none")]`), count as uncovered, line for line, so the figure is of the
//! whole core rather than of the part that happens to be testable.

use crate::tools::{self, cargo, llvm_tool, run};
use anyhow::{Context, Result, bail};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Lines executed and lines that could be, per file of `kernel/src`.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Lines {
    pub covered: u64,
    pub total: u64,
}

impl Lines {
    fn percent(self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            100.0 * self.covered as f64 / self.total as f64
        }
    }
}

/// Runs the core's host tests under coverage and prints the figure per
/// folder (and per file with `files`); returns the whole core's line
/// coverage in percent.
pub fn report(files_too: bool) -> Result<f64> {
    let dir = tools::target_dir().join("coverage");
    let profiles = dir.join("profiles");
    if profiles.exists() {
        std::fs::remove_dir_all(&profiles)?;
    }
    std::fs::create_dir_all(&profiles)?;
    let instrumented = |c: &mut Command| {
        c.env("RUSTFLAGS", "-C instrument-coverage")
            .env("CARGO_TARGET_DIR", &dir)
            .env(
                "LLVM_PROFILE_FILE",
                profiles.join("kernel-%p-%m.profraw").as_os_str(),
            );
    };
    let mut test = cargo();
    test.args([
        "test",
        "--quiet",
        "--package",
        "moat-kernel",
        "--lib",
        "--bins",
    ]);
    instrumented(&mut test);
    run(&mut test).context("the core's host tests under coverage")?;
    let binaries = test_binaries(&instrumented)?;

    let merged = dir.join("kernel.profdata");
    let mut merge = Command::new(llvm_tool("llvm-profdata")?);
    merge.args(["merge", "-sparse", "-o"]).arg(&merged);
    for entry in std::fs::read_dir(&profiles)? {
        merge.arg(entry?.path());
    }
    run(&mut merge).context("merging the coverage profiles")?;

    let mut export = Command::new(llvm_tool("llvm-cov")?);
    export
        .args(["export", "--format=lcov", "--instr-profile"])
        .arg(&merged);
    for (i, b) in binaries.iter().enumerate() {
        if i > 0 {
            export.arg("--object");
        }
        export.arg(b);
    }
    let out = export.output().context("running llvm-cov export")?;
    if !out.status.success() {
        bail!(
            "llvm-cov export failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let lcov = String::from_utf8_lossy(&out.stdout);
    let kernel_src = tools::root().join("kernel/src");
    let mut files = measured_files(&lcov, &kernel_src, &|path| {
        std::fs::read_to_string(path).unwrap_or_default()
    });
    for path in rust_files(&kernel_src)? {
        let rel = relative(&path, &kernel_src);
        let text = std::fs::read_to_string(&path)?;
        match files.entry(rel) {
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(Lines {
                    covered: 0,
                    total: code_lines(&text),
                });
            }
            std::collections::btree_map::Entry::Occupied(mut slot) => {
                slot.get_mut().total += target_only_lines(&text);
            }
        }
    }

    let folder_of = |rel: &str| match rel.rsplit_once('/') {
        Some((dir, _)) => format!("kernel/src/{dir}/"),
        None => "kernel/src/ (top level)".to_string(),
    };
    let mut by_folder: BTreeMap<String, Lines> = BTreeMap::new();
    for (rel, lines) in &files {
        let f = by_folder.entry(folder_of(rel)).or_default();
        f.covered += lines.covered;
        f.total += lines.total;
    }
    let whole = files.values().fold(Lines::default(), |a, l| Lines {
        covered: a.covered + l.covered,
        total: a.total + l.total,
    });
    println!("coverage of kernel/src by host tests (lines):");
    for (folder, l) in &by_folder {
        println!(
            "  {folder:<28} {:>5.1}%  ({} of {})",
            l.percent(),
            l.covered,
            l.total
        );
        if files_too {
            for (rel, l) in files.iter().filter(|(rel, _)| folder_of(rel) == *folder) {
                println!(
                    "    {rel:<28} {:>5.1}%  ({} of {})",
                    l.percent(),
                    l.covered,
                    l.total
                );
            }
        }
    }
    println!(
        "kernel_line_coverage: {:.1}% ({} of {} lines; files the host tests do not build count as uncovered)",
        whole.percent(),
        whole.covered,
        whole.total
    );
    Ok(whole.percent())
}

/// The test executables cargo built for the instrumented run.
fn test_binaries(instrumented: &dyn Fn(&mut Command)) -> Result<Vec<PathBuf>> {
    let mut c = cargo();
    c.args([
        "test",
        "--package",
        "moat-kernel",
        "--lib",
        "--bins",
        "--no-run",
        "--message-format=json",
    ]);
    instrumented(&mut c);
    let out = c.output().context("listing the test binaries")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed");
    }
    let binaries: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v.get("executable")?.as_str().map(PathBuf::from))
        .collect();
    if binaries.is_empty() {
        bail!("cargo built no test binary for moat-kernel");
    }
    if binaries.len() < 2 {
        bail!("expected the library's and the moat binary's test executables");
    }
    Ok(binaries)
}

/// Per-file line figures for the files under `root` in llvm-cov's lcov
/// export (`SF:` names a file, `DA:line,count` is one line of code). Lines
/// of a file's `#[cfg(test)]` module (from its first `#[cfg(test)]` on, the
/// module at the end of the file, read with `source`) are the tests
/// themselves and are left out, as [`code_lines`] leaves them out of the
/// files not built; files outside `root` (the host stand-ins beside it,
/// reached as `src/../fake/`) are left out too.
fn measured_files(
    lcov: &str,
    root: &Path,
    source: &dyn Fn(&Path) -> String,
) -> BTreeMap<String, Lines> {
    let mut out: BTreeMap<String, Lines> = BTreeMap::new();
    let mut current: Option<(String, u64)> = None;
    for line in lcov.lines() {
        if let Some(name) = line.strip_prefix("SF:") {
            let path = Path::new(name);
            let inside = path.starts_with(root)
                && !path
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir));
            current = inside.then(|| {
                let tests_from = source(path)
                    .lines()
                    .position(|l| l.trim() == "#[cfg(test)]")
                    .map_or(u64::MAX, |i| i as u64 + 1);
                (relative(path, root), tests_from)
            });
        } else if let Some(da) = line.strip_prefix("DA:")
            && let Some((rel, tests_from)) = &current
        {
            let mut fields = da.split(',');
            let number = fields.next().and_then(|n| n.parse::<u64>().ok());
            let count = fields.next().and_then(|n| n.parse::<u64>().ok());
            if let (Some(number), Some(count)) = (number, count)
                && number < *tests_from
            {
                let l = out.entry(rel.clone()).or_default();
                l.total += 1;
                l.covered += u64::from(count > 0);
            }
        } else if line == "end_of_record" {
            current = None;
        }
    }
    out
}

fn relative(path: &Path, root: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

/// Every `.rs` file under `dir`.
fn rust_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(out)
}

/// Lines of a file that hold code: not blank, not comments, not in a
/// `#[cfg(test)]` module at the end of the file. A rough count, used only
/// for files the host tests do not build, where llvm-cov has no figure.
fn code_lines(text: &str) -> u64 {
    let body = text.split("#[cfg(test)]").next().unwrap_or(text);
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("//") && *l != "}" && *l != "{")
        .count() as u64
}

/// Lines of a built file's items that exist on the target only: those
/// under `#[cfg(target_os = "none")]`, which the host build leaves out, so
/// llvm-cov does not count them. The item runs from the attribute to the
/// end of its braces (or to its `;`). The same rough count as
/// [`code_lines`].
fn target_only_lines(text: &str) -> u64 {
    const ATTRIBUTE: &str = "#[cfg(target_os = \"none\")]";
    let body = text.split("#[cfg(test)]").next().unwrap_or(text);
    let is_code = |l: &str| !l.is_empty() && !l.starts_with("//") && l != "}" && l != "{";
    let mut count = 0u64;
    let mut lines = body.lines().map(str::trim);
    while let Some(line) = lines.next() {
        if line != ATTRIBUTE {
            continue;
        }
        let mut depth = 0i64;
        let mut opened = false;
        for l in lines.by_ref() {
            if is_code(l) {
                count += 1;
            }
            depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
            opened |= l.contains('{');
            let ends = if opened { depth <= 0 } else { l.ends_with(';') };
            if ends {
                break;
            }
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_lines_skip_comments_blanks_braces_and_tests() {
        let text = "//! doc\n\nfn a() {\n    // why\n    b();\n}\n#[cfg(test)]\nmod tests {\n    fn c() {}\n}\n";
        assert_eq!(code_lines(text), 2);
    }

    #[test]
    fn target_only_items_are_counted_to_their_end() {
        let text = "use a;\n#[cfg(target_os = \"none\")]\nuse b;\nfn host() {}\n\
                    #[cfg(target_os = \"none\")]\n/// doc\n#[attr]\nfn target() {\n    \
                    if x {\n        y();\n    }\n}\nfn after() {}\n";
        // `use b;`; `#[attr]`, `fn target() {`, `if x {`, `y();`.
        assert_eq!(target_only_lines(text), 5);
        assert_eq!(target_only_lines("fn a() {}\n"), 0);
    }

    #[test]
    fn llvm_cov_export_is_read_per_file_under_the_root_without_tests() {
        let lcov = "SF:/w/kernel/src/esr.rs\nDA:1,3\nDA:2,0\nDA:3,1\nDA:5,9\nend_of_record\n\
                    SF:/w/abi/src/lib.rs\nDA:1,1\nend_of_record\n\
                    SF:/w/kernel/src/../fake/arch.rs\nDA:1,1\nend_of_record\n";
        // esr.rs's tests start at line 4.
        let source = |p: &Path| {
            assert!(p.ends_with("esr.rs"), "{p:?}");
            "fn a() {\n    b();\n}\n#[cfg(test)]\nmod tests {}\n".to_string()
        };
        let files = measured_files(lcov, Path::new("/w/kernel/src"), &source);
        assert_eq!(files.len(), 1);
        assert_eq!(
            files["esr.rs"],
            Lines {
                covered: 2,
                total: 3
            }
        );
    }
}
