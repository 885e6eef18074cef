//! `cargo xtask soak --minutes M`: Linux as the host on four CPUs, creating,
//! running and destroying protected VMs in a loop for M minutes while a
//! busybox loop keeps the host's memory under pressure.
//!
//! It fails on any sign of trouble on the console (the kernel's, the core's
//! or the VMM's), on a failed consistency check, and on a leak: the host's
//! free pages after the loop (pressure stopped, caches dropped) must be
//! within [`LEAK_SLACK_PAGES`] of the count before it. The console is
//! streamed to `target/soak/console.log` as it comes and only figures are
//! kept in memory, so a run of hours costs no more memory than one of
//! minutes.

use crate::debian;
use crate::linux::{self, FAIL_PATTERNS};
use crate::{MachineArgs, image, linux_vm, qemu, tools};
use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Pages the host's free count may end below where it started: what the
/// kernel's own caches and slabs move by under the pressure loop, with
/// room. One VM's 16 MiB is 4096 pages, so a VM that is never given back
/// is caught, and so is a page lost every few cycles.
const LEAK_SLACK_PAGES: i64 = 512;

/// Lines that fail the soak besides the Linux cases' own: the VMM's
/// failures, the core's refusals, the checker's mismatches and the soak
/// script's own reports.
const SOAK_FAIL_PATTERNS: &[&str] = &[
    "moat-vmm: guest crashed",
    "moat-vmm: VM",
    "moat-vmm: opening",
    "MISMATCH",
    "refused:",
    "refused from now on",
    "SError",
    "Out of memory",
    "soak: FAILED",
];

/// The shell commands of the run: `seconds` of VM cycles, three VMs at a
/// time pinned to CPUs 1 to 3, beside a loop on CPU 0 that allocates and
/// touches 192 MiB again and again. The loop is asked to stop and waited
/// for (its last `dd` included) before the free pages are counted again.
fn commands(seconds: u64) -> String {
    format!(
        "\
insmod /moat.ko || exit 1
echo warm-up | moat-vmm run --mem 16M /guest.bin > /dev/null || exit 2
free_pages() {{
    sync
    echo 3 > /proc/sys/vm/drop_caches
    t=0
    while read -r a b c; do
        case \"$a $b\" in
        'pages free') t=$((t + c)) ;;
        count:*) t=$((t + b)) ;;
        esac
    done < /proc/zoneinfo
    echo $t
}}
before=$(free_pages)
echo \"soak: free pages before $before\"
rm -f /soak-stop
taskset -c 0 sh -c 'while [ ! -e /soak-stop ]; do dd if=/dev/zero of=/dev/null bs=192M count=2 2> /dev/null; done' &
pressure=$!
end=$(( $(date +%s) + {seconds} ))
n=0
while [ $(date +%s) -lt $end ]; do
    for c in 1 2 3; do
        echo $n | taskset -c $c moat-vmm run --mem 16M /guest.bin > /dev/null || echo \"soak: FAILED: VM on CPU $c\" &
        eval p$c=$!
    done
    wait $p1 $p2 $p3
    n=$((n + 3))
    if [ $((n % 30)) -eq 0 ]; then
        echo \"soak: cycles $n\"
    fi
    if [ $((n % 300)) -eq 0 ]; then
        moat-vmm check > /dev/null || echo \"soak: FAILED: consistency check after $n cycles\"
    fi
done
touch /soak-stop
wait $pressure
after=$(free_pages)
echo \"soak: cycles $n done, free pages before $before after $after\"
moat-vmm check"
    )
}

/// What the console said, as it streamed past.
#[derive(Debug, Default)]
struct Figures {
    cycles: u64,
    before: Option<i64>,
    after: Option<i64>,
    exit_status: Option<i32>,
    checker_agrees: bool,
    /// The first lines that matched a fail pattern (a few are enough).
    troubles: Vec<String>,
    lines: u64,
}

impl Figures {
    fn read(&mut self, line: &str) {
        self.lines += 1;
        if let Some(n) = line.split("soak: cycles ").nth(1) {
            if let Some(n) = n.split_whitespace().next().and_then(|n| n.parse().ok()) {
                self.cycles = n;
            }
            if let Some(rest) = n.split("free pages before ").nth(1) {
                let mut it = rest.split(" after ");
                self.before = it.next().and_then(|v| v.trim().parse().ok());
                self.after = it.next().and_then(|v| v.trim().parse().ok());
            }
        } else if let Some(n) = line.split("soak: free pages before ").nth(1) {
            self.before = n.trim().parse().ok();
        }
        if let Some(s) = line.split(linux::MARKER_STATUS).nth(1) {
            self.exit_status = s.trim().parse().ok();
        }
        if line.contains("the ledger and the host's stage-2 agree") {
            self.checker_agrees = true;
        }
        if FAIL_PATTERNS
            .iter()
            .chain(SOAK_FAIL_PATTERNS)
            .any(|p| line.contains(p))
            && self.troubles.len() < 20
        {
            self.troubles.push(line.to_string());
        }
    }
}

/// `cargo xtask soak --minutes M`.
pub fn soak(minutes: u64) -> Result<()> {
    tools::ensure_qemu()?;
    let built = image::build_all()?;
    let assets = debian::ensure_assets()?;
    let vm = linux_vm::build(&assets, &built, false)?;
    let seconds = minutes * 60;
    let initrd = linux::write_initramfs(&assets, Some(&vm), Some(&commands(seconds)), "soak")?;
    let spec = linux::image_spec(&assets, &initrd, None, &linux::services()?);
    let img = image::pack(&built.core, &spec, "soak")?;
    let machine = MachineArgs {
        board: crate::boards::Board::Virt,
        no_highmem_mmio: false,
        smmu: false,
        disk: None,
        smp: 4,
        mem: "2G".into(),
        gic: "v3".into(),
        no_mte: false,
        cpu: "max".into(),
        icount: false,
        timeout: None,
    };
    let dir = tools::target_dir().join("soak");
    std::fs::create_dir_all(&dir)?;
    let log_path = dir.join("console.log");
    let mut log = std::io::BufWriter::new(std::fs::File::create(&log_path)?);
    // The boot and the final checks take minutes on a busy machine; the
    // loop itself ends on the guest's clock, which follows the host's.
    let limit = Duration::from_secs(seconds + 1200);
    println!(
        "xtask: soak for {minutes} min on 4 CPUs; console in {}",
        log_path.display()
    );
    let mut child = qemu::command(&img, &machine, &[])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting QEMU")?;
    let pid = child.id();
    let finished = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (finished, timed_out) = (finished.clone(), timed_out.clone());
        std::thread::spawn(move || {
            let start = Instant::now();
            while !finished.load(Ordering::Relaxed) {
                if start.elapsed() > limit {
                    timed_out.store(true, Ordering::Relaxed);
                    let _ = std::process::Command::new("kill")
                        .arg(pid.to_string())
                        .status();
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let mut figures = Figures::default();
    let mut reader = BufReader::new(child.stdout.take().context("piped stdout")?);
    let mut raw = Vec::new();
    let mut reported = 0;
    while reader.read_until(b'\n', &mut raw)? > 0 {
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end();
        writeln!(log, "{line}")?;
        figures.read(line);
        if figures.cycles >= reported + 300 {
            reported = figures.cycles;
            log.flush()?;
            println!("xtask: soak: {} cycles", figures.cycles);
        }
        raw.clear();
    }
    log.flush()?;
    let status = child.wait()?;
    finished.store(true, Ordering::Relaxed);
    let _ = watchdog.join();

    println!("xtask: soak results");
    println!(
        "  cycles (VMs created, run and destroyed): {}",
        figures.cycles
    );
    println!(
        "  host free pages: before {} after {}",
        figures.before.map_or("?".into(), |v| v.to_string()),
        figures.after.map_or("?".into(), |v| v.to_string())
    );
    println!(
        "  consistency checker: {}",
        if figures.checker_agrees {
            "the ledger and the host's stage-2 agree"
        } else {
            "no agreement reported"
        }
    );
    println!(
        "  console: {} lines in {}",
        figures.lines,
        log_path.display()
    );
    for t in &figures.troubles {
        println!("  trouble: {t}");
    }
    if timed_out.load(Ordering::Relaxed) {
        bail!("the soak did not end within {} s", limit.as_secs());
    }
    if !figures.troubles.is_empty() {
        bail!("the console shows trouble (first lines above)");
    }
    if figures.exit_status != Some(0) || !status.success() {
        bail!(
            "the soak's commands ended with status {:?} (QEMU {status})",
            figures.exit_status
        );
    }
    if figures.cycles == 0 || !figures.checker_agrees {
        bail!("no VM cycle completed, or the final consistency check did not pass");
    }
    let (Some(before), Some(after)) = (figures.before, figures.after) else {
        bail!("the console has no free-page figures");
    };
    if before - after > LEAK_SLACK_PAGES {
        bail!(
            "memory not returned: {} pages fewer free after the soak than before (slack {LEAK_SLACK_PAGES})",
            before - after
        );
    }
    Ok(())
}
