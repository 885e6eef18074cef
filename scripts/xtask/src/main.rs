//! `cargo xtask`: build, run, test and benchmark Moat.
//!
//! * `cargo xtask run` boots the default demo image under QEMU.
//! * `cargo xtask run --host FILE ...` boots any arm64 payload as the host.
//! * `cargo xtask test` runs every unit test, the QEMU integration tests and
//!   the book build.
//! * `cargo xtask bench` reports exact instruction counts under QEMU's icount.
//!
//! Missing tools (QEMU >= 9, mdbook) are installed on Debian when running as
//! root; elsewhere the exact command to run is printed.

mod image;
mod qemu;
mod synthetic_dt;
mod tests;
mod tools;

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run, test and benchmark Moat")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by everything that boots an image.
#[derive(clap::Args, Clone, Debug)]
pub struct MachineArgs {
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
    /// Seconds before the run is stopped.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Build the core and the demo payloads.
    Build,
    /// Boot an image under QEMU (the demo test host unless --host is given).
    Run {
        /// The host payload: an arm64 Linux Image or a raw binary.
        #[arg(long)]
        host: Option<PathBuf>,
        /// An initial ramdisk for the host.
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// The host's command line (replaces /chosen/bootargs).
        #[arg(long)]
        append: Option<String>,
        /// A device tree to boot with instead of the firmware's.
        #[arg(long)]
        dtb: Option<PathBuf>,
        /// Start QEMU's gdbstub halted and print the gdb command line.
        #[arg(long)]
        gdb: bool,
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// Run every test: unit tests, QEMU integration tests, the book.
    Test {
        /// Only run integration tests whose name contains this.
        #[arg(long)]
        filter: Option<String>,
        /// Skip the host unit tests, lints and the book.
        #[arg(long)]
        integration_only: bool,
    },
    /// Measure exact instruction counts and write target/bench.json.
    Bench,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Build => {
            let images = image::build_all()?;
            println!("core:      {}", images.core.display());
            println!("test host: {}", images.test_host.display());
            Ok(())
        }
        Command::Run { host, initrd, append, dtb, gdb, machine } => {
            tools::ensure_qemu()?;
            let built = image::build_all()?;
            let default_demo = host.is_none();
            let spec = image::ImageSpec {
                host: host.unwrap_or_else(|| built.test_host.clone()),
                initrd,
                bootargs: append,
                dtb,
                semihosting_exit: true,
            };
            let img = image::pack(&built.core, &spec, "run")?;
            let code = qemu::run_interactive(&img, &machine, gdb, &built)?;
            if default_demo {
                println!("\nxtask: the demo host ran under Moat and powered the machine off (QEMU status {code}).");
            }
            std::process::exit(code);
        }
        Command::Test { filter, integration_only } => tests::run_all(filter.as_deref(), integration_only),
        Command::Bench => tests::bench(),
    }
}
