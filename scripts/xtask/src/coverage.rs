//! `cargo xtask coverage`: how much of the core the host tests execute.
//!
//! The core's unit tests run on the development machine; this builds them
//! with LLVM's source-based coverage (`-C instrument-coverage`, from the
//! toolchain's `llvm-tools`: no extra cargo plugin), runs them, and counts
//! the lines of `kernel/src` they execute. Files the host tests do not
//! build at all (the EL2 layer, which only runs under QEMU) count as
//! uncovered, line for line, so the figure is of the whole core rather
//! than of the part that happens to be testable.

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

/// Runs the core's host tests under coverage and prints the figure;
/// returns the whole core's line coverage in percent.
pub fn report() -> Result<f64> {
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
    test.args(["test", "--quiet", "--package", "moat-kernel", "--lib"]);
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
        .args(["export", "--summary-only", "--instr-profile"])
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
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let kernel_src = tools::root().join("kernel/src");
    let mut files = measured_files(&json, &kernel_src);
    for path in rust_files(&kernel_src)? {
        let rel = relative(&path, &kernel_src);
        if let std::collections::btree_map::Entry::Vacant(slot) = files.entry(rel) {
            let text = std::fs::read_to_string(&path)?;
            slot.insert(Lines {
                covered: 0,
                total: code_lines(&text),
            });
        }
    }

    let mut by_folder: BTreeMap<String, Lines> = BTreeMap::new();
    for (rel, lines) in &files {
        let folder = match rel.rsplit_once('/') {
            Some((dir, _)) => format!("kernel/src/{dir}/"),
            None => "kernel/src/ (top level)".to_string(),
        };
        let f = by_folder.entry(folder).or_default();
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
    Ok(binaries)
}

/// Per-file line figures for the files under `root` in llvm-cov's export.
fn measured_files(json: &serde_json::Value, root: &Path) -> BTreeMap<String, Lines> {
    let mut out = BTreeMap::new();
    let files = json
        .pointer("/data/0/files")
        .and_then(|f| f.as_array())
        .cloned()
        .unwrap_or_default();
    for f in files {
        let Some(name) = f.get("filename").and_then(|n| n.as_str()) else {
            continue;
        };
        let path = Path::new(name);
        if !path.starts_with(root) {
            continue;
        }
        let lines = f.pointer("/summary/lines");
        let get = |k: &str| {
            lines
                .and_then(|l| l.get(k))
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        };
        out.insert(
            relative(path, root),
            Lines {
                covered: get("covered"),
                total: get("count"),
            },
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_lines_skip_comments_blanks_braces_and_tests() {
        let text = "//! doc\n\nfn a() {\n    // why\n    b();\n}\n#[cfg(test)]\nmod tests {\n    fn c() {}\n}\n";
        assert_eq!(code_lines(text), 2);
    }

    #[test]
    fn llvm_cov_export_is_read_per_file_under_the_root() {
        let json = serde_json::json!({
            "data": [{ "files": [
                { "filename": "/w/kernel/src/esr.rs", "summary": { "lines": { "count": 10, "covered": 7 } } },
                { "filename": "/w/abi/src/lib.rs", "summary": { "lines": { "count": 5, "covered": 5 } } }
            ]}]
        });
        let files = measured_files(&json, Path::new("/w/kernel/src"));
        assert_eq!(files.len(), 1);
        assert_eq!(
            files["esr.rs"],
            Lines {
                covered: 7,
                total: 10
            }
        );
    }
}
