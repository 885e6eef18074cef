//! `cargo xtask`: build, run, test and benchmark Moat.
//!
//! * `cargo xtask run` boots the default demo image under QEMU.
//! * `cargo xtask run --host FILE ...` boots any arm64 payload as the host.
//! * `cargo xtask run linux [--cmd '...']` boots Debian's arm64 Linux as the
//!   host with a busybox initramfs (see `linux.rs`).
//! * `cargo xtask test` runs every unit test, the QEMU integration tests and
//!   the book build.
//! * `cargo xtask fuzz-host` runs the random hostile host (see `fuzz_host.rs`).
//! * `cargo xtask bench` reports exact instruction counts under QEMU's icount.
//!
//! Missing tools (QEMU >= 9, mdbook) are installed on Debian when running as
//! root; elsewhere the exact command to run is printed.

mod abi_reference;
mod boards;
mod checkpatch;
mod coverage;
mod cpio;
mod cpu_models;
mod debian;
mod disk;
mod fuzz;
mod fuzz_host;
mod fvp;
mod image;
mod kernels;
mod linux;
mod linux_vm;
mod modules;
mod probe;
mod qemu;
mod sdcard;
mod size;
mod soak;
mod synthetic_dt;
mod tests;

use xtask::{manifest, tools};

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run, test and benchmark Moat")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by everything that boots an image.
#[derive(clap::Args, Clone, Debug)]
pub struct MachineArgs {
    /// The board: QEMU `virt`, a Raspberry Pi 4 (QEMU `raspi4b`; four
    /// CPUs and 2 GiB, whatever --smp and --mem say) or Arm's FVP.
    #[arg(long, value_enum, default_value_t = boards::Board::Virt)]
    pub board: boards::Board,
    /// Number of CPUs.
    #[arg(long, default_value_t = 1)]
    pub smp: u32,
    /// Guest RAM size, as QEMU's -m takes it.
    #[arg(long, default_value = "1G")]
    pub mem: String,
    /// Interrupt controller version.
    #[arg(long, value_parser = ["v2", "v3"], default_value = "v3")]
    pub gic: String,
    /// Run QEMU without MTE (mte=on is the default: MTE is what Moat polices).
    #[arg(long)]
    pub no_mte: bool,
    /// No 64-bit PCIe memory window above 512 GiB on `virt`
    /// (`highmem-mmio=off`): for CPUs with fewer than 44 PA bits, which
    /// Moat gives 39 IPA bits (the window would be withheld from the host).
    #[arg(long)]
    pub no_highmem_mmio: bool,
    /// QEMU's CPU model and properties (e.g. `max,sve-max-vq=1`).
    #[arg(long, default_value = "max")]
    pub cpu: String,
    /// One instruction per nanosecond of virtual time (`-icount
    /// shift=0,sleep=off`): exact, repeatable instruction counts, and the
    /// only mode in which QEMU's PMU counts retired instructions.
    #[arg(long)]
    pub icount: bool,
    /// Seconds before the run is stopped [default: 60; 3600 for a Linux
    /// shell; 900 for commands that boot the Linux guest].
    #[arg(long)]
    pub timeout: Option<u64>,
    /// Put an SMMUv3 with stage-2 translation in front of the PCIe root
    /// complex (`-M virt,iommu=smmuv3`, `arm-smmuv3.stage=2`); Moat takes
    /// it and sends every PCIe device's DMA through the host's stage-2.
    #[arg(long)]
    pub smmu: bool,
    /// Attach this raw disk image as a virtio-blk PCI device (made, a
    /// 16 MiB FAT volume holding `hello.txt`, if the file does not exist).
    #[arg(long)]
    pub disk: Option<PathBuf>,
}

impl MachineArgs {
    /// The run's time limit in seconds.
    pub fn timeout(&self) -> u64 {
        self.timeout.unwrap_or(60)
    }
}

/// What `cargo xtask run` boots instead of the demo host.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum RunTarget {
    /// Debian's arm64 Linux with a busybox initramfs (fetched once with apt
    /// and cached); a shell on the console, or the commands given with --cmd.
    Linux,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Build the core and the demo payloads.
    Build,
    /// Boot an image under QEMU (the demo test host unless --host or `linux` is given).
    Run {
        /// `linux`: boot Debian's arm64 Linux as the host.
        #[arg(value_enum)]
        target: Option<RunTarget>,
        /// With `linux`: shell commands to run instead of an interactive
        /// shell; the run exits with their exit status.
        #[arg(long, requires = "target")]
        cmd: Option<String>,
        /// The host payload: an arm64 Linux Image or a raw binary.
        #[arg(long)]
        host: Option<PathBuf>,
        /// An initial ramdisk for the host.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// The host's command line (replaces /chosen/bootargs; with `linux`,
        /// added to the defaults).
        #[arg(long)]
        append: Option<String>,
        /// A device tree to boot with instead of the firmware's.
        #[arg(long)]
        dtb: Option<PathBuf>,
        /// With `linux`: boot this arm64 Linux Image instead of Debian
        /// bookworm's kernel (no modules are packed).
        #[arg(long, requires = "target", conflicts_with = "kernel_package")]
        kernel: Option<PathBuf>,
        /// With `linux`: boot this Debian arm64 kernel package, fetched with
        /// apt into its own cache folder (`*` matches any text; the newest
        /// match wins), e.g. 'linux-image-6.12.*+deb12-arm64-unsigned'.
        #[arg(long, requires = "target")]
        kernel_package: Option<String>,
        /// Start QEMU's gdbstub halted and print the gdb command line.
        #[arg(long)]
        gdb: bool,
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// Write the files a board boots Moat from (the Raspberry Pi 4's boot
    /// partition: the Moat image with Linux, config.txt, the device tree).
    Image {
        #[arg(long, value_enum)]
        board: boards::Board,
        /// The folder to write them to (created if missing).
        out: PathBuf,
    },
    /// Run every test: unit tests, QEMU integration tests, the book.
    Test {
        /// Only run integration tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Skip the host unit tests, lints and the book.
        #[arg(long)]
        integration_only: bool,
        /// The CPU models of the CPU-model cases (Linux boot and a protected
        /// VM on QEMU virt with each): `all`, `default` (cortex-a57,
        /// neoverse-n1, a64fx) or a comma-separated list.
        #[arg(long)]
        cpus: Option<String>,
    },
    /// Line coverage of the core (`kernel/src`) by its host tests.
    Coverage {
        /// Print every file's figure too, not only each folder's.
        #[arg(long)]
        files: bool,
    },
    /// Write the book's ABI reference from the `abi` crate.
    AbiReference,
    /// Print the core's size: its flat binary against the budget, each
    /// section, and the largest functions.
    Size,
    /// Fuzz the parsers of hostile input (cargo-fuzz on nightly), one target
    /// at a time, and report executions and crashes per target.
    Fuzz {
        /// Only this target (a binary of fuzz/Cargo.toml).
        #[arg(long)]
        target: Option<String>,
        /// Seconds of fuzzing per target.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Stop a target after this many executions instead (the seconds
        /// still bound the run): `--runs 10000000 --seconds 7200`.
        #[arg(long)]
        runs: Option<u64>,
    },
    /// Linux on 4 CPUs running protected VMs in a loop under memory
    /// pressure for M minutes; fails on a warning, a checker failure or a
    /// leak (console in target/soak/console.log).
    Soak {
        /// Minutes of VM cycles (the boot and the final checks come on top).
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Run the random hostile host: seeded random sequences of every host
    /// hypercall from every CPU, checked against the host's model and the
    /// core's consistency checker; a violation is shrunk to the shortest
    /// failing prefix.
    FuzzHost {
        /// The generator's seed (decimal or 0x-prefixed hex).
        #[arg(long, value_parser = parse_u64, default_value = "1")]
        seed: u64,
        /// Steps in all, shared out evenly between the CPUs.
        #[arg(long, default_value_t = 20_000)]
        steps: u64,
        /// Number of CPUs.
        #[arg(long, default_value_t = 4)]
        smp: u32,
        /// Run the core's consistency checker every this many steps.
        #[arg(long, default_value_t = 64)]
        check_every: u64,
        /// SMP stress: only donations, shares, reclaims and runs, inside
        /// the CPUs' regions, two VMs per CPU (eight on four CPUs); the
        /// operations per second are reported.
        #[arg(long)]
        stress: bool,
        /// Do not re-run shorter prefixes after a violation.
        #[arg(long)]
        no_shrink: bool,
        /// Kill the ledger every this many of CPU 0's steps (a
        /// `LEDGER_RESTART`): the core rebuilds it while the run goes on.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        restart_ledger_every: Option<u64>,
    },
    /// Measure exact instruction counts and write target/bench.json.
    Bench {
        /// Also count the emulator's own instructions for the three Linux
        /// boots (under Valgrind, with icount: noise-free, about five
        /// minutes more).
        #[arg(long)]
        emulator_cost: bool,
        /// Only the Linux guest's boot (`linux_guest_boot_instructions`):
        /// a few minutes instead of the whole set.
        #[arg(long)]
        only_linux_guest: bool,
        /// Only the core's own figures (null_hvc, service_call,
        /// mte_sysreg_undef, the VM donate/reclaim/exit figures) and
        /// core_bytes, from the one benchmark boot: about a minute instead
        /// of the whole set. Merged into an existing target/bench.json.
        #[arg(long, conflicts_with = "only_linux_guest")]
        only_core: bool,
    },
}

/// A number in decimal or, with `0x`, hexadecimal.
fn parse_u64(s: &str) -> Result<u64, String> {
    match s.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => s.parse(),
    }
    .map_err(|e| e.to_string())
}

/// The manifest of the default image.
pub const DEMO_MANIFEST: &str = "images/demo.toml";

fn main() {
    let cli = Cli::parse();
    // Errors a user can cause end in one readable message and the fix,
    // never a backtrace (anyhow's Debug form would print one whenever
    // RUST_BACKTRACE is set).
    if let Err(e) = tools::ensure_toolchain().and_then(|()| dispatch(cli)) {
        eprintln!("xtask: error: {e:#}");
        std::process::exit(1);
    }
}

/// Fails with the flag and the path when a file the user named cannot be
/// read, before anything is built: a mistyped path costs a line, not a
/// build and a bare "No such file or directory".
fn check_given_files(files: &[(&str, &Option<PathBuf>)]) -> Result<()> {
    for (flag, path) in files {
        if let Some(path) = path
            && let Err(e) = std::fs::File::open(path)
        {
            anyhow::bail!(
                "{flag} {}: {e} (give the path of an existing file)",
                path.display()
            );
        }
    }
    Ok(())
}

fn dispatch(cli: Cli) -> Result<()> {
    if let Command::Run {
        host,
        initrd,
        dtb,
        kernel,
        ..
    } = &cli.command
    {
        check_given_files(&[
            ("--host", host),
            ("--initrd", initrd),
            ("--dtb", dtb),
            ("--kernel", kernel),
        ])?;
    }
    match cli.command {
        Command::Build => {
            let images = image::build_all()?;
            println!("core:      {}", images.core.display());
            println!("test host: {}", images.test_host.display());
            Ok(())
        }
        Command::Run {
            target: Some(RunTarget::Linux),
            cmd,
            host,
            initrd,
            append,
            dtb,
            gdb,
            kernel,
            kernel_package,
            mut machine,
        } => {
            if host.is_some() || initrd.is_some() || dtb.is_some() || gdb {
                anyhow::bail!(
                    "`run linux` takes no --host, --initrd, --dtb or --gdb: it builds its own image"
                );
            }
            if cmd.is_none() {
                machine.timeout.get_or_insert(3600);
            }
            // A Linux guest booting inside Linux under Moat, all emulated:
            // minutes, not seconds.
            if cmd
                .as_deref()
                .is_some_and(|c| c.contains(linux_vm::LINUX_GUEST_KERNEL_PATH))
            {
                machine.timeout.get_or_insert(900);
            }
            if let Some(d) = &machine.disk {
                disk::ensure(d)?;
            }
            let kernel = match (kernel, kernel_package) {
                (Some(image), _) => kernels::Kernel::Image(image),
                (None, Some(package)) => kernels::Kernel::Package(package),
                (None, None) => kernels::Kernel::Default,
            };
            std::process::exit(linux::run(
                cmd.as_deref(),
                append.as_deref(),
                &machine,
                &kernel,
            )?);
        }
        Command::Run {
            target: None,
            cmd: _,
            host,
            initrd,
            append,
            dtb,
            gdb,
            kernel: _,
            kernel_package: _,
            machine,
        } => {
            if machine.board == boards::Board::Fvp {
                if host.is_some() || initrd.is_some() || dtb.is_some() || gdb {
                    anyhow::bail!("run --board fvp boots the demo image only");
                }
                std::process::exit(fvp::run(machine.smp)?);
            }
            tools::ensure_qemu()?;
            boards::prepare(machine.board)?;
            if let Some(d) = &machine.disk {
                disk::ensure(d)?;
            }
            let built = image::build_for(machine.board)?;
            let default_demo = host.is_none();
            let spec = image::ImageSpec {
                host: host.unwrap_or_else(|| built.test_host.clone()),
                initrd,
                bootargs: append,
                dtb,
                semihosting_exit: true,
                ..Default::default()
            };
            // The demo image is what images/demo.toml declares: its host and services.
            let mut spec = spec;
            let services = if default_demo {
                let (manifest, set) = image::services_from(Path::new(DEMO_MANIFEST))?;
                spec.host = manifest.host_path(&built.test_host);
                Some(set)
            } else {
                None
            };
            let dtb_bytes = spec.dtb.as_deref().map(std::fs::read).transpose()?;
            let img = image::pack_image(&built.core, &spec, dtb_bytes, services.as_ref(), "run")?;
            let code = qemu::run_interactive(&img, &machine, gdb, &built)?;
            if default_demo {
                println!(
                    "\nxtask: the demo host ran under Moat and powered the machine off (QEMU status {code})."
                );
            }
            std::process::exit(code);
        }
        Command::Test {
            filter,
            integration_only,
            cpus,
        } => tests::run_all(filter.as_deref(), integration_only, cpus.as_deref()),
        Command::Size => size::report(),
        Command::AbiReference => abi_reference::write(),
        Command::Coverage { files } => coverage::report(files).map(|_| ()),
        Command::Image { board, out } => {
            for file in sdcard::write(board, &out)? {
                println!("wrote {}", file.display());
            }
            println!(
                "xtask: copy these to the FAT boot partition beside the Raspberry Pi firmware (start4.elf, fixup4.dat, overlays/disable-bt.dtbo); see the book's \"Raspberry Pi 4\" chapter"
            );
            Ok(())
        }
        Command::FuzzHost {
            seed,
            steps,
            smp,
            check_every,
            stress,
            no_shrink,
            restart_ledger_every,
        } => fuzz_host::fuzz_host(
            fuzz_host::Run {
                seed,
                steps,
                smp,
                check_every: check_every.max(1),
                stress,
                restart_ledger_every,
            },
            !no_shrink,
        ),
        Command::Fuzz {
            target,
            seconds,
            runs,
        } => fuzz::fuzz(target.as_deref(), seconds, runs),
        Command::Soak { minutes } => soak::soak(minutes),
        Command::Bench {
            emulator_cost,
            only_linux_guest,
            only_core,
        } => tests::bench(emulator_cost, only_linux_guest, only_core),
    }
}
