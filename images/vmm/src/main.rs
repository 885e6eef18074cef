//! `moat-vmm`: runs a protected VM from Linux, Moat's host.
//!
//! The VMM opens `/dev/moat` (the `moat.ko` module), creates one protected
//! VM, has the module donate kernel memory to it, loads a raw image at the
//! start of that memory and runs its single vCPU, answering exits until the
//! guest powers off or crashes. Every decision about the VM's memory is the
//! core's: this program only asks, and the guest's memory is never mapped
//! into it. The VM ends with the device file: when the VMM exits or is
//! killed, the module destroys the VM and takes its memory back.

#![deny(unsafe_code)]

use clap::{Parser, Subcommand};
use moat_abi::Error;
use moat_abi::vm::{ExitReason, MmioAccess, MmioAnswer, VmFlags};
use std::io::{Read, Write};
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

mod bench;
mod device;
mod gicv3;
mod linux_guest;
mod parallel_probe;
mod pkvm_probe;
mod pl011;
mod probe;
#[path = "../../guest/src/protocol.rs"]
mod protocol;
mod vgic_probe;

use device::Device;
use pl011::Pl011;
use protocol as p;

/// Exit statuses of `moat-vmm run`.
const STATUS_OFF: u8 = 0;
const STATUS_VMM_FAILED: u8 = 1;
const STATUS_CRASHED: u8 = 2;
const STATUS_RESET: u8 = 3;

const HELP: &str = "\
Guest device map (IPAs):
  0x4000_0000  RAM: --mem bytes donated by moat.ko; the image is loaded here
               and the vCPU starts here (EL1h, MMU off)
  0x0900_0000  PL011 UART (4 KiB window): writes to DR go to stdout, stdin
               is read from DR (FR.RXFE while none is waiting; a break, DR
               bit 10, once stdin ends); no interrupts
Any other access outside RAM reads 0 and ignores writes (logged on stderr).

Hypercalls answered (an HVC the core passes on): the Moat guest's CONFIG
(0xc6000800) with its console mode; FAULT (0xc600080f) ends the run as a
crash; anything else returns NOT_SUPPORTED.

Exit status: 0 the guest called PSCI SYSTEM_OFF; 1 the VMM failed (no
/dev/moat, a refused call); 2 the guest crashed; 3 the guest called PSCI
SYSTEM_RESET (not restarted).";

#[derive(Parser)]
#[command(name = "moat-vmm", version, about = "Runs a Moat protected VM from Linux", after_help = HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a protected VM, load GUEST into it and run it; or, with
    /// --kernel, boot a Linux kernel Image in it.
    Run {
        /// A raw binary image, entered at its first byte.
        #[arg(required_unless_present = "kernel")]
        guest: Option<std::path::PathBuf>,
        /// The VM's memory: bytes, or with a K, M or G suffix (default 1M,
        /// 256M with --kernel).
        #[arg(long, value_parser = parse_size)]
        mem: Option<u64>,
        /// Create the VM with MTE (the core's MTE policy decides).
        #[arg(long)]
        mte: bool,
        /// An arm64 Linux Image to boot (its memory all private: console,
        /// interrupt controller and timer are emulated or virtual).
        #[arg(long, conflicts_with = "guest")]
        kernel: Option<std::path::PathBuf>,
        /// The initramfs for --kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<std::path::PathBuf>,
        /// vCPUs for --kernel.
        #[arg(long, default_value_t = 1, requires = "kernel")]
        cpus: usize,
        /// Commands the guest's /init runs (given to it in its device tree
        /// as /chosen/moat,cmd) before it powers off.
        #[arg(long, requires = "kernel")]
        cmd: Option<String>,
        /// The kernel command line for --kernel.
        #[arg(long, default_value = "console=ttyAMA0 quiet", requires = "kernel")]
        append: String,
        /// Tests only, with the test build of moat.ko: once the Linux
        /// guest's /init runs, map its first page into this process and
        /// read it (which must end this process with SIGBUS).
        #[arg(long, hide = true, requires = "kernel")]
        read_own_memory_at_init: bool,
    },
    /// Ask the core whether its memory ledger and the host's stage-2 agree
    /// (CHECK_CONSISTENCY); exit status 0 if they do.
    Check,
    /// Restart the core's memory ledger (an operator's upgrade, or a test):
    /// the core rebuilds it from its own records; exit status 0 once it is
    /// back, 75 (EX_TEMPFAIL) if a VM is running and the rebuild waits for
    /// the first host call made with none running.
    RestartLedger,
    /// Tests only, with the test build of moat.ko: create a VM, give it
    /// one page, map that page into this process and read it. The read must
    /// end this process with SIGBUS.
    #[command(hide = true)]
    ReadDonated,
    /// Tests only: hostile arguments to every ioctl, each refused with its
    /// errno; GUEST is loaded to run a VM to its end. Exit status 0 if every
    /// probe came out as expected.
    #[command(hide = true)]
    ProbeErrors { guest: std::path::PathBuf },
    /// Tests only: GUEST (the Moat guest) in its interrupt probe, with a
    /// virtual GIC (or, with --no-vgic, without: only the fired-timer
    /// spin). Exit status 0 if every interrupt arrived as expected.
    #[command(hide = true)]
    ProbeVgic {
        guest: std::path::PathBuf,
        #[arg(long)]
        no_vgic: bool,
    },
    /// Tests only: GUEST (the Moat guest) in its parallel probe, a VM with
    /// two vCPUs. Exit status 0 if the two ran at the same time.
    #[command(hide = true)]
    ProbeParallel { guest: std::path::PathBuf },
    /// Measures: prints the generic counter and its frequency (for the
    /// Linux guest boot benchmark, from inside the guest).
    #[command(hide = true)]
    Counter,
    /// Tests only: GUEST (the Moat guest) in its pKVM probe. Exit status
    /// 0 if the core answered the pKVM guest ABI as expected.
    #[command(hide = true)]
    ProbePkvm { guest: std::path::PathBuf },
    /// Measures: GUEST (the Moat guest) in its ping mode, COUNT exits to
    /// this process and back, timed with the virtual counter.
    #[command(hide = true)]
    BenchExits {
        guest: std::path::PathBuf,
        #[arg(long, default_value_t = 10_000)]
        count: u64,
    },
    /// Measures, for comparison: COUNT MMIO exits of a minimal Linux KVM
    /// guest to this process and back (needs /dev/kvm), timed with the
    /// virtual counter.
    #[command(hide = true)]
    BenchKvm {
        #[arg(long, default_value_t = 10_000)]
        count: u64,
    },
}

fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let n: u64 = digits.parse().map_err(|e| format!("{text:?}: {e}"))?;
    let bytes = n
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))?;
    if bytes == 0 || bytes % p::PAGE_SIZE != 0 {
        return Err(format!("{text:?} is not a positive multiple of 4 KiB"));
    }
    Ok(bytes)
}

/// What ended the guest.
#[derive(Debug, PartialEq, Eq)]
enum End {
    Off,
    Reset,
    Crashed(String),
}

/// Standard input, read on a thread of its own: `Some(byte)`, then `None`
/// once it ends.
fn spawn_input() -> mpsc::Receiver<Option<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = [0u8; 64];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(n) => {
                    for &b in &buf[..n] {
                        if tx.send(Some(b)).is_err() {
                            return;
                        }
                    }
                }
            }
        }
    });
    rx
}

/// The VM's devices and the answers the guest is owed.
struct Machine {
    uart: Pl011,
    input: mpsc::Receiver<Option<u8>>,
    input_ended: bool,
    out: std::io::Stdout,
    config: [u64; 2],
}

impl Machine {
    fn take_input(&mut self, wait: Option<Duration>) {
        if self.input_ended {
            return;
        }
        let first = match wait {
            Some(d) => self.input.recv_timeout(d).ok(),
            None => self.input.try_recv().ok(),
        };
        for item in first.into_iter().chain(self.input.try_iter()) {
            match item {
                Some(b) => self.uart.receive(b),
                None => {
                    self.uart.receive_break();
                    self.input_ended = true;
                    break;
                }
            }
        }
    }

    /// The answer (r0) to an MMIO exit.
    /// Emulates one access: `Some(value read)` (0 for a write), or `None`
    /// where no device is, which the guest takes as an external abort.
    fn mmio(&mut self, ipa: u64, access: MmioAccess, value: u64) -> Option<u64> {
        let Some(offset) = ipa.checked_sub(p::CONSOLE_IPA).filter(|o| *o < pl011::SIZE) else {
            eprintln!(
                "moat-vmm: {} of {} bytes at {ipa:#x}: no device there, external abort",
                if access.is_write() { "write" } else { "read" },
                access.size()
            );
            return None;
        };
        if access.is_write() {
            if let Some(byte) = self.uart.write(offset, value) {
                let _ = self.out.write_all(&[byte]);
                if byte == b'\n' {
                    let _ = self.out.flush();
                }
            }
            Some(0)
        } else {
            if !self.uart.has_input() {
                self.take_input(None);
            }
            Some(u64::from(self.uart.read(offset)))
        }
    }

    /// The answer (r0..r3) to a guest's HVC; `Err` ends the run.
    fn hvc(&mut self, regs: &[u64; 6]) -> Result<[u64; 4], End> {
        let function = regs[0] as u32;
        match function {
            p::CONFIG => Ok([self.config[0], self.config[1], 0, 0]),
            p::FAULT => Err(End::Crashed(format!(
                "the guest reported an exception: ESR_EL1 {:#x}, ELR_EL1 {:#x}, FAR_EL1 {:#x}, vector +{:#x}",
                regs[1], regs[2], regs[3], regs[4]
            ))),
            _ => Ok([Error::NotSupported.to_x0(), 0, 0, 0]),
        }
    }
}

/// Runs the vCPU until the guest ends. One exit at a time: the answer to
/// each goes in with the next `VCPU_RUN`.
fn run_loop(dev: &Device, machine: &mut Machine) -> std::io::Result<End> {
    let mut answer = [0u64; 4];
    loop {
        let regs = dev.run(answer)?;
        answer = [0; 4];
        let detail = [regs[1], regs[2], regs[3], regs[4], regs[5], regs[6]];
        match ExitReason::from_u64(regs[0]) {
            Some(ExitReason::Hvc) => match machine.hvc(&detail) {
                Ok(a) => answer = a,
                Err(end) => return Ok(end),
            },
            Some(ExitReason::Mmio) => {
                match machine.mmio(detail[0], MmioAccess(detail[1]), detail[2]) {
                    Some(value) => answer[0] = value,
                    None => answer[1] = MmioAnswer::ABORT,
                }
            }
            Some(ExitReason::Wfi) => {
                // No interrupt can wake the guest but input: wait a little
                // for some, then run it again.
                let _ = machine.out.flush();
                if !machine.uart.has_input() {
                    machine.take_input(Some(Duration::from_millis(20)));
                }
            }
            // The core ended the run for an interrupt of ours (or its 10 ms
            // slice): Linux has taken it; run again.
            Some(ExitReason::Interrupt) => {}
            Some(ExitReason::Shutdown) => {
                return Ok(if detail[0] == 1 { End::Reset } else { End::Off });
            }
            Some(ExitReason::Crashed) => {
                return Ok(End::Crashed(format!(
                    "the core stopped the VM (ESR_EL2 {:#x})",
                    detail[0]
                )));
            }
            Some(ExitReason::Sgi | ExitReason::VcpuPower | ExitReason::Eoi) => {
                return Ok(End::Crashed(format!(
                    "exit {} from a VM with one vCPU and no virtual GIC",
                    regs[0]
                )));
            }
            None => {
                return Ok(End::Crashed(format!("unknown exit {:#x}", regs[0])));
            }
        }
    }
}

fn run(guest: &std::path::Path, mem: u64, mte: bool) -> Result<End, String> {
    let image = std::fs::read(guest).map_err(|e| format!("reading {}: {e}", guest.display()))?;
    if image.is_empty() || image.len() as u64 > mem {
        return Err(format!(
            "{} is {} bytes: it must fit in the VM's {mem} bytes",
            guest.display(),
            image.len()
        ));
    }
    let dev = Device::open().map_err(|e| {
        format!(
            "opening {}: {e} (is moat.ko loaded? `insmod moat.ko`)",
            device::PATH
        )
    })?;
    let flags = if mte { VmFlags::MTE } else { 0 };
    dev.create(p::BASE_IPA, flags)
        .map_err(|e| format!("VM_CREATE: {e}"))?;
    dev.donate(p::BASE_IPA, mem)
        .map_err(|e| format!("VM_DONATE of {mem} bytes: {e}"))?;
    dev.load(p::BASE_IPA, &image)
        .map_err(|e| format!("VM_LOAD: {e}"))?;
    let mut machine = Machine {
        uart: Pl011::new(),
        input: spawn_input(),
        input_ended: false,
        out: std::io::stdout(),
        config: [p::MODE_CONSOLE, if mte { p::FLAG_MTE } else { 0 }],
    };
    let end = run_loop(&dev, &mut machine).map_err(|e| format!("VCPU_RUN: {e}"));
    let _ = machine.out.flush();
    end
}

fn restart_ledger() -> ExitCode {
    match Device::open().and_then(|dev| dev.restart_ledger()) {
        Ok(()) => {
            println!("moat-vmm: the memory ledger was restarted and rebuilt");
            ExitCode::SUCCESS
        }
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            println!(
                "moat-vmm: the memory ledger is stopped; a VM is running, so it is rebuilt at the first call made with none running"
            );
            ExitCode::from(75)
        }
        Err(e) => {
            eprintln!("moat-vmm: LEDGER_RESTART: {e}");
            ExitCode::from(STATUS_VMM_FAILED)
        }
    }
}

fn check() -> ExitCode {
    match Device::open().and_then(|dev| dev.check()) {
        Ok(()) => {
            println!("moat-vmm: the ledger and the host's stage-2 agree");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("moat-vmm: CHECK_CONSISTENCY: {e}");
            ExitCode::from(STATUS_VMM_FAILED)
        }
    }
}

fn bench_exits(guest: &std::path::Path, count: u64) -> ExitCode {
    let count = count.max(1);
    match std::fs::read(guest).and_then(|image| bench::run(&image, count)) {
        Ok(m) => {
            let ns = m.elapsed.as_nanos() / u128::from(count);
            println!(
                "moat-vmm: {count} HVC exits to this process and back: {ns} ns each \
                 ({} Interrupt exits among them; under -icount shift=0, ns = instructions)",
                m.interrupts
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("moat-vmm: bench-exits: {e}");
            ExitCode::from(STATUS_VMM_FAILED)
        }
    }
}

fn bench_kvm(count: u64) -> ExitCode {
    let count = count.max(1);
    match bench::run_kvm(count) {
        Ok(elapsed) => {
            let ns = elapsed.as_nanos() / u128::from(count);
            println!(
                "moat-vmm: {count} KVM MMIO exits to this process and back: {ns} ns each \
                 (under -icount shift=0, ns = instructions)"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("moat-vmm: bench-kvm: {e}");
            ExitCode::from(STATUS_VMM_FAILED)
        }
    }
}

fn probe_errors(guest: &std::path::Path) -> ExitCode {
    let result = std::fs::read(guest).and_then(|image| probe::run(&image));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(STATUS_VMM_FAILED),
        Err(e) => {
            eprintln!("moat-vmm: probes: {e}");
            ExitCode::from(STATUS_VMM_FAILED)
        }
    }
}

fn probe_vgic(guest: &std::path::Path, vgic: bool) -> ExitCode {
    match std::fs::read(guest).and_then(|image| vgic_probe::run(&image, vgic)) {
        Ok(true) => {
            println!("vgic probe: passed");
            ExitCode::SUCCESS
        }
        Ok(false) => {
            println!("vgic probe: FAILED");
            ExitCode::from(STATUS_VMM_FAILED)
        }
        Err(e) => {
            eprintln!("moat-vmm: probe-vgic: {e}");
            ExitCode::from(STATUS_VMM_FAILED)
        }
    }
}

fn read_donated() -> ExitCode {
    let result = Device::open().and_then(|dev| {
        dev.create(p::BASE_IPA, 0)?;
        dev.donate(p::BASE_IPA, p::PAGE_SIZE)?;
        println!("moat-vmm: reading the page donated to the VM");
        dev.read_donated_page()
    });
    match result {
        Ok(word) => {
            println!("moat-vmm: read the VM's page: {word:#x}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("moat-vmm: reading the donated page: {e}");
            ExitCode::from(STATUS_VMM_FAILED)
        }
    }
}

/// Reads the kernel and initramfs and boots them with `options` (whose
/// `kernel` and `initrd` are filled in here).
fn run_linux(
    kernel: &std::path::Path,
    initrd: Option<&std::path::Path>,
    options: linux_guest::Options,
) -> Result<linux_guest::End, String> {
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()));
    let kernel = read(kernel)?;
    let initrd = match initrd {
        Some(p) => read(p)?,
        None => Vec::new(),
    };
    linux_guest::run(
        &linux_guest::Options {
            kernel: &kernel,
            initrd: &initrd,
            ..options
        },
        spawn_input(),
    )
}

fn main() -> ExitCode {
    let (guest, mem, mte) = match Cli::parse().command {
        Command::Run {
            kernel: Some(kernel),
            initrd,
            mem,
            cpus,
            cmd,
            append,
            mte,
            read_own_memory_at_init,
            ..
        } => {
            let mem = mem.unwrap_or(256 << 20);
            let end = run_linux(
                &kernel,
                initrd.as_deref(),
                linux_guest::Options {
                    kernel: &[],
                    initrd: &[],
                    mem,
                    cpus,
                    cmd: cmd.as_deref(),
                    bootargs: &append,
                    mte,
                    read_own_memory_at_init,
                },
            );
            return ExitCode::from(match end {
                Ok(linux_guest::End::Off) => STATUS_OFF,
                Ok(linux_guest::End::Reset) => STATUS_RESET,
                Ok(linux_guest::End::Crashed(why)) => {
                    eprintln!("moat-vmm: guest crashed: {why}");
                    STATUS_CRASHED
                }
                Err(e) => {
                    eprintln!("moat-vmm: {e}");
                    STATUS_VMM_FAILED
                }
            });
        }
        Command::Run {
            guest: Some(guest),
            mem,
            mte,
            ..
        } => (guest, mem.unwrap_or(1 << 20), mte),
        Command::Run { .. } => {
            eprintln!("moat-vmm: run needs a GUEST or --kernel");
            return ExitCode::from(STATUS_VMM_FAILED);
        }
        Command::Check => return check(),
        Command::RestartLedger => return restart_ledger(),
        Command::ReadDonated => return read_donated(),
        Command::ProbeErrors { guest } => return probe_errors(&guest),
        Command::ProbeVgic { guest, no_vgic } => return probe_vgic(&guest, !no_vgic),
        Command::ProbeParallel { guest } => {
            return match std::fs::read(&guest).and_then(|image| parallel_probe::run(&image)) {
                Ok(true) => {
                    println!("parallel probe: passed");
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    println!("parallel probe: FAILED");
                    ExitCode::FAILURE
                }
                Err(e) => {
                    eprintln!("moat-vmm: probe-parallel: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Counter => {
            let (now, freq) = device::counter();
            println!("moat-vmm: counter {now} frequency {freq}");
            return ExitCode::SUCCESS;
        }
        Command::ProbePkvm { guest } => {
            return match std::fs::read(&guest).and_then(|image| pkvm_probe::run(&image)) {
                Ok(true) => {
                    println!("pkvm probe: passed");
                    ExitCode::SUCCESS
                }
                Ok(false) => {
                    println!("pkvm probe: FAILED");
                    ExitCode::from(STATUS_VMM_FAILED)
                }
                Err(e) => {
                    eprintln!("moat-vmm: probe-pkvm: {e}");
                    ExitCode::from(STATUS_VMM_FAILED)
                }
            };
        }
        Command::BenchExits { guest, count } => return bench_exits(&guest, count),
        Command::BenchKvm { count } => return bench_kvm(count),
    };
    let status = match run(&guest, mem, mte) {
        Ok(End::Off) => STATUS_OFF,
        Ok(End::Reset) => {
            eprintln!("moat-vmm: the guest asked for a reset; not restarting it");
            STATUS_RESET
        }
        Ok(End::Crashed(why)) => {
            eprintln!("moat-vmm: guest crashed: {why}");
            STATUS_CRASHED
        }
        Err(e) => {
            eprintln!("moat-vmm: {e}");
            STATUS_VMM_FAILED
        }
    };
    ExitCode::from(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("8192"), Ok(8192));
        assert!(parse_size("100").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999G").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn help_documents_the_device_map() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("0x0900_0000  PL011"));
        assert_eq!(p::CONSOLE_IPA, 0x0900_0000);
        assert_eq!(p::BASE_IPA, 0x4000_0000);
        assert!(help.contains(&format!("CONFIG\n({:#x})", p::CONFIG)));
        assert!(help.contains(&format!("FAULT ({:#x})", p::FAULT)));
    }
}
