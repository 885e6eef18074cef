//! `cargo xtask fuzz`: coverage-guided fuzzing of Moat's parsers of hostile
//! input with cargo-fuzz (libFuzzer), one target at a time.
//!
//! The targets are the binaries of the `fuzz/` crate, whose bodies are the
//! `moat-fuzz` harness (`fuzz/harness`). Fuzzing needs a nightly toolchain
//! for the coverage instrumentation; nothing else in Moat does, and the
//! stored corpus is replayed on the pinned stable toolchain by `cargo xtask
//! test`. New inputs a run finds go to `target/fuzz/corpus/<target>/`, not
//! into the repository; a failing input goes to `fuzz/artifacts/<target>/`
//! (ignored by git) and, once the bug is fixed, belongs in
//! `fuzz/regressions/<target>/`.

use crate::tools::{root, target_dir};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The names of the fuzz targets, from `fuzz/Cargo.toml`'s `[[bin]]`s.
fn targets() -> Result<Vec<String>> {
    let text = std::fs::read_to_string(root().join("fuzz/Cargo.toml"))?;
    let manifest: toml::Table = toml::from_str(&text)?;
    let bins = manifest
        .get("bin")
        .and_then(|b| b.as_array())
        .context("fuzz/Cargo.toml lists no [[bin]] targets")?;
    Ok(bins
        .iter()
        .filter_map(|b| b.get("name")?.as_str().map(str::to_string))
        .collect())
}

/// Whether `cargo +nightly fuzz` runs; installs cargo-fuzz if it is
/// missing, or says how.
fn ensure_cargo_fuzz() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !nightly.is_ok_and(|s| s.success()) {
        bail!(
            "fuzzing needs a nightly toolchain (for the coverage instrumentation only); run:\n  \
             rustup toolchain install nightly --profile minimal"
        );
    }
    let present = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    println!("xtask: installing cargo-fuzz: cargo install cargo-fuzz --locked");
    let installed = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .current_dir(std::env::temp_dir())
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        bail!(
            "cargo-fuzz is missing and could not be installed; run:\n  cargo install cargo-fuzz --locked"
        );
    }
    Ok(())
}

/// What one target's run came to.
#[derive(Debug, Default)]
struct Outcome {
    executions: u64,
    per_second: u64,
    corpus: u64,
    /// The failing input libFuzzer wrote, if it found one.
    artifact: Option<String>,
    /// The run did not end as libFuzzer ends a clean run.
    failed: bool,
}

/// Runs `target` for `seconds` of fuzzing and reads libFuzzer's figures
/// from its output, which is also written to `target/fuzz/<target>.log`.
fn run_target(target: &str, seconds: u64, runs: Option<u64>) -> Result<Outcome> {
    let work = target_dir().join("fuzz");
    let corpus = work.join("corpus").join(target);
    std::fs::create_dir_all(&corpus)?;
    let log_path = work.join(format!("{target}.log"));
    let mut log = std::fs::File::create(&log_path)?;
    // One libFuzzer process, in the foreground (libFuzzer's `-jobs=N`
    // would fork workers that log to files of their own). Debug
    // assertions on: overflow checks turn a wrapped address into a
    // crash. No sanitizer: the code under test has no `unsafe` on these
    // paths, so AddressSanitizer would only halve the executions.
    // rustup's `cargo` (not the pinned one running the xtask), for `+nightly`.
    let mut child = Command::new("cargo")
        .current_dir(root())
        .env_remove("CARGO")
        .args([
            "+nightly",
            "fuzz",
            "run",
            "--sanitizer",
            "none",
            "--debug-assertions",
        ])
        .arg("--target-dir")
        .arg(&work)
        .arg(target)
        // New inputs go to the first folder; the stored seeds are read.
        .arg(&corpus)
        .arg(root().join("fuzz/corpus").join(target))
        .arg("--")
        .arg(format!("-max_total_time={seconds}"))
        .args(runs.map(|n| format!("-runs={n}")))
        .args(["-timeout=10", "-rss_limit_mb=2048"])
        .arg("-print_final_stats=1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting cargo fuzz")?;
    // libFuzzer reports on stderr; cargo fuzz's own lines come on stdout.
    let stdout = child.stdout.take().context("piped stdout")?;
    let out_thread = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut outcome = Outcome::default();
    let stderr = child.stderr.take().context("piped stderr")?;
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        use std::io::Write;
        writeln!(log, "{line}")?;
        let stat = |key: &str| {
            line.strip_prefix(key)
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let Some(n) = stat("stat::number_of_executed_units:") {
            outcome.executions = n;
        } else if let Some(n) = stat("stat::average_exec_per_sec:") {
            outcome.per_second = n;
        } else if let Some(path) = line
            .split("Test unit written to ")
            .nth(1)
            .map(|p| p.trim().to_string())
        {
            outcome.artifact = Some(path);
        } else if line.contains("panicked at") || line.starts_with("==") {
            println!("  {target}: {line}");
        }
        if let Some(rest) = line.split(" corp: ").nth(1)
            && let Some(n) = rest.split('/').next().and_then(|n| n.parse().ok())
        {
            outcome.corpus = n;
        }
    }
    for line in out_thread.join().unwrap_or_default() {
        use std::io::Write;
        writeln!(log, "{line}")?;
    }
    let status = child.wait()?;
    outcome.failed = !status.success() || outcome.artifact.is_some();
    Ok(outcome)
}

/// `cargo xtask fuzz [--target T] [--seconds S]`.
pub fn fuzz(only: Option<&str>, seconds: u64, runs: Option<u64>) -> Result<()> {
    let all = targets()?;
    let chosen: Vec<&String> = match only {
        Some(name) => {
            let t = all
                .iter()
                .find(|t| *t == name)
                .with_context(|| format!("no fuzz target {name:?}; the targets are {all:?}"))?;
            vec![t]
        }
        None => all.iter().collect(),
    };
    ensure_cargo_fuzz()?;
    let until = match runs {
        Some(n) => format!("{n} executions or {seconds} s"),
        None => format!("{seconds} s"),
    };
    println!(
        "xtask: fuzzing {} target(s) for {until} each, one at a time",
        chosen.len()
    );
    let mut failed = Vec::new();
    let mut report = Vec::new();
    for target in chosen {
        println!("xtask: fuzz {target} ...");
        let o = run_target(target, seconds, runs)?;
        let crashes = usize::from(o.failed);
        report.push(format!(
            "{target:<16} {:>12} executions {:>8}/s  corpus {:>5}  crashes {crashes}{}",
            o.executions,
            o.per_second,
            o.corpus,
            o.artifact
                .as_deref()
                .map(|a| format!("  ({a})"))
                .unwrap_or_default()
        ));
        if o.failed {
            failed.push(target.clone());
        }
    }
    println!("xtask: fuzz results");
    for line in &report {
        println!("  {line}");
    }
    if !failed.is_empty() {
        bail!(
            "fuzz targets failed: {} (reproduce with `cargo +nightly fuzz run -s none -a <target> <artifact>`; \
             logs in target/fuzz/<target>.log)",
            failed.join(", ")
        );
    }
    Ok(())
}
