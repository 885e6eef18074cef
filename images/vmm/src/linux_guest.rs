//! `moat-vmm run --kernel IMAGE --initrd INITRD`: a Linux kernel as a
//! protected VM, all of its memory private.
//!
//! The kernel, its initramfs and its device tree are loaded into donated
//! memory before the first run (after it, the host can write nothing into
//! the VM), and the guest needs no shared memory at all: its console is a
//! PL011 emulated from MMIO exits, its interrupt controller a GICv3 whose
//! CPU interface is the core's virtual one (`VmFlags::VGIC`) and whose
//! distributor and redistributors are emulated here ([`crate::gicv3`]), and
//! its timer the architecture's virtual timer, which the core delivers as
//! PPI 27. The arm64 boot protocol is followed: the Image at a 2 MiB
//! aligned base plus its `text_offset`, x0 = the device tree's address,
//! MMU and caches off, interrupts masked. The VM starts at a four-word
//! trampoline the VMM loads, which sets x0 and branches to the Image (the
//! core starts every VM with x0..x30 zero).
//!
//! Device map (IPAs):
//!
//! | IPA | what |
//! |---|---|
//! | 0x0800_0000 | GICv3 distributor, 64 KiB |
//! | 0x080a_0000 | GICv3 redistributors, 128 KiB per vCPU |
//! | 0x0900_0000 | PL011 (`arm,sbsa-uart`), SPI 1 (INTID 33) |
//! | 0x4000_0000 | RAM (`--mem`): Image at the start, initramfs, then the device tree and trampoline in the last 2 MiB |

use crate::device::{self, Device, Kick};
use crate::gicv3::{self, Gic};
use crate::pl011::{self, Pl011};
use moat_abi::vm::{ExitReason, Injection, MmioAccess, MmioAnswer, VmFlags};
use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Condvar, Mutex, mpsc};
use std::time::Duration;
use vm_fdt::FdtWriter;

/// Where RAM starts.
pub const RAM_BASE: u64 = 0x4000_0000;
/// The UART.
pub const UART_BASE: u64 = 0x0900_0000;
/// The UART's SPI (INTID 32 + 1).
pub const UART_SPI: u32 = 1;
/// The arm64 Image header's magic ("ARM\x64" at byte 56).
const IMAGE_MAGIC: u32 = 0x644d_5241;
const PAGE: u64 = 4096;

/// The Image header fields the loader needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageHeader {
    pub text_offset: u64,
    pub image_size: u64,
}

/// Parses an arm64 Image's header.
pub fn parse_image(image: &[u8]) -> Result<ImageHeader, String> {
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(image.get(at..at + 8)?.try_into().ok()?))
    };
    let magic = image
        .get(56..60)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    if magic != Some(IMAGE_MAGIC) {
        return Err("not an arm64 Image (no ARM\\x64 magic at byte 56)".into());
    }
    let text_offset = word(8).ok_or("short header")?;
    let mut image_size = word(16).ok_or("short header")?;
    if image_size == 0 {
        // Kernels before 3.17: the size is unknown; the file is a lower bound.
        image_size = image.len() as u64;
    }
    Ok(ImageHeader {
        text_offset,
        image_size,
    })
}

/// Where everything goes in the VM's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub kernel: u64,
    pub initrd: u64,
    pub initrd_end: u64,
    pub fdt: u64,
    pub trampoline: u64,
}

/// Places the Image, the initramfs and the device tree in `mem` bytes.
pub fn layout(header: ImageHeader, initrd_len: u64, mem: u64) -> Result<Layout, String> {
    let kernel = RAM_BASE + header.text_offset;
    let kernel_end = kernel
        .checked_add(header.image_size)
        .ok_or("image size overflows")?;
    let ram_end = RAM_BASE + mem;
    // The device tree in its own 2 MiB block at the end, the trampoline in
    // its last page.
    let fdt = ram_end
        .checked_sub(2 << 20)
        .filter(|f| *f >= kernel_end)
        .ok_or("not enough memory for the kernel")?;
    let trampoline = ram_end - PAGE;
    let initrd_end = fdt;
    let initrd = initrd_end
        .checked_sub(initrd_len.next_multiple_of(PAGE))
        .filter(|i| *i >= kernel_end.next_multiple_of(PAGE))
        .ok_or("not enough memory for the kernel and the initramfs")?;
    Ok(Layout {
        kernel,
        initrd,
        initrd_end: initrd + initrd_len,
        fdt,
        trampoline,
    })
}

/// The trampoline: x0 = the device tree, then a branch to the kernel.
pub fn trampoline(fdt: u64, kernel: u64) -> [u8; 32] {
    let words: [u32; 4] = [
        0x5800_0080, // ldr x0, #16
        0x5800_00a4, // ldr x4, #20 (from +4: the word at +24)
        0xd61f_0080, // br x4
        0xd503_201f, // nop (aligns the literals)
    ];
    let mut out = [0u8; 32];
    for (i, w) in words.iter().enumerate() {
        out[4 * i..4 * i + 4].copy_from_slice(&w.to_le_bytes());
    }
    out[16..24].copy_from_slice(&fdt.to_le_bytes());
    out[24..32].copy_from_slice(&kernel.to_le_bytes());
    out
}

/// The guest's device tree.
pub fn device_tree(
    cpus: usize,
    mem: u64,
    layout: &Layout,
    bootargs: &str,
    cmd: Option<&str>,
    gicr_size: u64,
) -> Result<Vec<u8>, vm_fdt::Error> {
    const GIC_PHANDLE: u32 = 1;
    // GIC interrupt specifiers: type (0 SPI, 1 PPI), number, flags.
    const LEVEL_HIGH: u32 = 4;
    let mut f = FdtWriter::new()?;
    let root = f.begin_node("")?;
    f.property_string("compatible", "moat,protected-vm")?;
    f.property_u32("#address-cells", 2)?;
    f.property_u32("#size-cells", 2)?;
    f.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let chosen = f.begin_node("chosen")?;
    f.property_string("bootargs", bootargs)?;
    f.property_string("stdout-path", &format!("/uart@{UART_BASE:x}"))?;
    f.property_u64("linux,initrd-start", layout.initrd)?;
    f.property_u64("linux,initrd-end", layout.initrd_end)?;
    if let Some(cmd) = cmd {
        f.property_string("moat,cmd", cmd)?;
    }
    f.end_node(chosen)?;

    let memory = f.begin_node(&format!("memory@{RAM_BASE:x}"))?;
    f.property_string("device_type", "memory")?;
    f.property_array_u64("reg", &[RAM_BASE, mem])?;
    f.end_node(memory)?;

    let cpus_node = f.begin_node("cpus")?;
    f.property_u32("#address-cells", 1)?;
    f.property_u32("#size-cells", 0)?;
    for i in 0..cpus {
        let cpu = f.begin_node(&format!("cpu@{i}"))?;
        f.property_string("device_type", "cpu")?;
        f.property_string("compatible", "arm,armv8")?;
        f.property_u32("reg", i as u32)?;
        f.property_string("enable-method", "psci")?;
        f.end_node(cpu)?;
    }
    f.end_node(cpus_node)?;

    let psci = f.begin_node("psci")?;
    f.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    f.property_string("method", "hvc")?;
    f.end_node(psci)?;

    let gic = f.begin_node(&format!("interrupt-controller@{:x}", gicv3::GICD_BASE))?;
    f.property_string("compatible", "arm,gic-v3")?;
    f.property_u32("#interrupt-cells", 3)?;
    f.property_null("interrupt-controller")?;
    f.property_u32("#redistributor-regions", 1)?;
    f.property_array_u64(
        "reg",
        &[
            gicv3::GICD_BASE,
            gicv3::GICD_SIZE,
            gicv3::GICR_BASE,
            gicr_size,
        ],
    )?;
    f.property_phandle(GIC_PHANDLE)?;
    f.end_node(gic)?;

    let timer = f.begin_node("timer")?;
    f.property_string("compatible", "arm,armv8-timer")?;
    f.property_array_u32(
        "interrupts",
        &[
            1, 13, LEVEL_HIGH, // secure physical
            1, 14, LEVEL_HIGH, // non-secure physical
            1, 11, LEVEL_HIGH, // virtual: INTID 27
            1, 10, LEVEL_HIGH, // hypervisor
        ],
    )?;
    f.property_null("always-on")?;
    f.end_node(timer)?;

    let uart = f.begin_node(&format!("uart@{UART_BASE:x}"))?;
    f.property_string("compatible", "arm,sbsa-uart")?;
    f.property_array_u64("reg", &[UART_BASE, pl011::SIZE])?;
    f.property_array_u32("interrupts", &[0, UART_SPI, LEVEL_HIGH])?;
    f.property_u32("current-speed", 115_200)?;
    f.end_node(uart)?;

    f.end_node(root)?;
    f.finish()
}

/// What `run` needs.
pub struct Options<'a> {
    pub kernel: &'a [u8],
    pub initrd: &'a [u8],
    pub mem: u64,
    pub cpus: usize,
    pub cmd: Option<&'a str>,
    pub bootargs: &'a str,
    /// Ask for MTE (`VmFlags::MTE`); the core's MTE policy decides, and
    /// the guest's ID registers show MTE only if it was granted.
    pub mte: bool,
    /// Tests only (with the module's test build): once the guest prints
    /// [`INIT_MARKER`], map the VM's first page into this process and read
    /// it, as a rogue host process would. The read must kill the VMM.
    pub read_own_memory_at_init: bool,
}

/// On the guest's command line: the boot benchmark (the VMM prints the
/// counter at VM creation; the guest's `/init` prints it at its start).
pub const BENCH_ARG: &str = "moat.bench";

/// The Linux guest's first line from userspace (its `/init`'s).
pub const INIT_MARKER: &[u8] = b"moat-guest: init started";

/// How the guest ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    Off,
    Reset,
    Crashed(String),
}

/// PSCI function ids the VMM serves (the core serves the version, the
/// features and SYSTEM_OFF/RESET itself).
const PSCI_MIGRATE_INFO_TYPE: u32 = 0x8400_0006;

/// The VM's devices and each vCPU's pending interrupts, shared by the vCPU
/// threads (one lock: every exit's work is a few register updates).
struct Machine {
    uart: Pl011,
    gic: Gic,
    out: io::Stdout,
    /// Interrupts to inject into each vCPU, oldest first.
    queued: Vec<VecDeque<Injection>>,
    /// The UART's level interrupt was injected and the guest has not
    /// deactivated it yet (the core reports that with an `Eoi` exit):
    /// until then it is not injected again, and after it, again only if
    /// the line is still up.
    uart_in_flight: bool,
    /// The console line being written, and whether [`INIT_MARKER`] was seen.
    line: Vec<u8>,
    saw_init: bool,
    /// How the guest ended, once it has: every vCPU thread then stops.
    ended: Option<End>,
    /// Each vCPU's thread, while it lives, to kick it out of a run.
    kicks: Vec<Option<Kick>>,
    /// Whether each vCPU's thread is in (or about to enter) `VCPU_RUN`:
    /// then an interrupt queued for it needs a kick, not only a wake-up.
    in_run: Vec<bool>,
}

/// The machine and a wake-up per vCPU (an injection queued for it, input
/// arrived, the guest ended, or CPU_ON started it).
struct Shared {
    machine: Mutex<Machine>,
    wake: Vec<Condvar>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        self.machine.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_all(&self) {
        for c in &self.wake {
            c.notify_all();
        }
    }

    fn end(&self, end: End) {
        let mut m = self.lock();
        if m.ended.is_none() {
            m.ended = Some(end);
        }
        drop(m);
        self.wake_all();
    }

    /// Waits up to `wait` for a wake-up of vCPU `index`, unless it already
    /// has something to do.
    fn idle(&self, index: usize, wait: Duration) {
        let m = self.lock();
        if m.ended.is_some() || !m.queued[index].is_empty() || m.uart.has_input() {
            return;
        }
        let _ = self.wake[index].wait_timeout(m, wait);
    }
}

impl Machine {
    /// Emulates one access: `Some(value read)` (0 for a write), or `None`
    /// where no device is, which the guest takes as an external abort.
    fn mmio(&mut self, ipa: u64, access: MmioAccess, value: u64) -> Option<u64> {
        if let Some(v) = self.gic.mmio(ipa, access.is_write(), access.size(), value) {
            return Some(v);
        }
        if let Some(offset) = ipa.checked_sub(UART_BASE).filter(|o| *o < pl011::SIZE) {
            if access.is_write() {
                if let Some(byte) = self.uart.write(offset, value) {
                    let _ = self.out.write_all(&[byte]);
                    if byte == b'\n' {
                        let _ = self.out.flush();
                        self.saw_init |= self.line.trim_ascii_end() == INIT_MARKER;
                        self.line.clear();
                    } else if self.line.len() < 256 {
                        self.line.push(byte);
                    }
                }
                return Some(0);
            }
            return Some(u64::from(self.uart.read(offset)));
        }
        eprintln!(
            "moat-vmm: {} of {} bytes at {ipa:#x}: no device there, external abort",
            if access.is_write() { "write" } else { "read" },
            access.size()
        );
        None
    }

    /// The injections for vCPU `index`'s next run: the UART's line if it is
    /// up and its last injection was deactivated (to the vCPU it is routed
    /// to), SPIs the guest made pending, then whatever is queued.
    fn injections(&mut self, index: usize) -> [u64; 2] {
        let uart = 32 + UART_SPI;
        let target = self.gic.spi_target(uart);
        if self.uart.interrupt_line()
            && !self.uart_in_flight
            && let Some(p) = self.gic.deliverable(target, uart)
            && let Some(q) = self.queued.get_mut(target)
        {
            q.push_back(Injection::level(uart, p));
            self.uart_in_flight = true;
        }
        for intid in self.gic.take_soft_pending() {
            let target = self.gic.spi_target(intid);
            if let (Some(p), Some(q)) = (
                self.gic.deliverable(target, intid),
                self.queued.get_mut(target),
            ) {
                q.push_back(Injection::new(intid, p));
            }
        }
        let mut out = [0; 2];
        for slot in &mut out {
            match self.queued[index].pop_front() {
                Some(i) => *slot = i.0,
                None => break,
            }
        }
        out
    }

    /// Injections a run did not take (the vCPU was off) go back first.
    fn requeue(&mut self, index: usize, inject: [u64; 2]) {
        for word in inject.into_iter().rev().filter(|w| *w != 0) {
            self.queued[index].push_front(Injection(word));
        }
    }

    /// Ends vCPU `index`'s run if it is in one (the vCPUs run in parallel:
    /// it would otherwise take what was queued for it only when its run
    /// ends by itself), and wakes it if it waits.
    fn kick(&self, shared: &Shared, index: usize) {
        if self.in_run.get(index) == Some(&true)
            && let Some(Some(k)) = self.kicks.get(index)
        {
            k.send();
        }
        if let Some(c) = shared.wake.get(index) {
            c.notify_all();
        }
    }

    /// An SGI vCPU `from` sent: ICC_SGI1R_EL1's INTID (27:24), Aff1
    /// (23:16, must be 0: one cluster), target list (15:0), or IRM (40:
    /// every other vCPU). Returns the vCPUs to wake.
    fn sgi(&mut self, from: usize, value: u64) -> Vec<usize> {
        let intid = ((value >> 24) & 0xf) as u32;
        let vcpus = self.queued.len();
        let targets: Vec<usize> = if value & (1 << 40) != 0 {
            (0..vcpus).filter(|t| *t != from).collect()
        } else if (value >> 16) & 0xff != 0 || (value >> 32) & 0xff != 0 {
            Vec::new()
        } else {
            (0..vcpus.min(16))
                .filter(|t| value & (1 << t) != 0)
                .collect()
        };
        let mut woken = Vec::new();
        for t in targets {
            if let Some(p) = self.gic.deliverable(t, intid) {
                let inj = Injection::new(intid, p);
                if !self.queued[t].contains(&inj) {
                    self.queued[t].push_back(inj);
                }
                woken.push(t);
            }
        }
        woken
    }
}

/// Forwards standard input to the UART, waking the vCPUs.
fn forward_input(shared: &Shared, input: mpsc::Receiver<Option<u8>>) {
    // No break at the end of input: Linux would take a break followed by a
    // character for a magic SysRq.
    while let Ok(Some(b)) = input.recv() {
        let mut m = shared.lock();
        if m.ended.is_some() {
            return;
        }
        m.uart.receive(b);
        drop(m);
        shared.wake_all();
    }
}

/// Loads and runs the guest until it powers off.
pub fn run(options: &Options, input: mpsc::Receiver<Option<u8>>) -> Result<End, String> {
    if options.cpus == 0 || options.cpus as u64 > moat_abi::vm::MAX_VCPUS {
        return Err(format!(
            "--cpus {}: between 1 and {}",
            options.cpus,
            moat_abi::vm::MAX_VCPUS
        ));
    }
    let header = parse_image(options.kernel)?;
    let layout = layout(header, options.initrd.len() as u64, options.mem)?;
    let gic = Gic::new(options.cpus);
    let fdt = device_tree(
        options.cpus,
        options.mem,
        &layout,
        options.bootargs,
        options.cmd,
        gic.gicr_size(),
    )
    .map_err(|e| format!("building the device tree: {e}"))?;
    let dev = Device::open().map_err(|e| {
        format!(
            "opening {}: {e} (is moat.ko loaded? `insmod moat.ko`)",
            device::PATH
        )
    })?;
    if options.bootargs.split_whitespace().any(|a| a == BENCH_ARG) {
        // The boot benchmark's start: just before the VM exists.
        println!("moat-vmm: VM_CREATE at counter {}", device::counter().0);
    }
    let flags = VmFlags::VGIC | if options.mte { VmFlags::MTE } else { 0 };
    dev.create_with_vcpus(layout.trampoline, flags, options.cpus as u64)
        .map_err(|e| format!("VM_CREATE: {e}"))?;
    dev.donate(RAM_BASE, options.mem)
        .map_err(|e| format!("VM_DONATE of {} bytes: {e}", options.mem))?;
    for (what, at, bytes) in [
        ("the kernel", layout.kernel, options.kernel),
        ("the initramfs", layout.initrd, options.initrd),
        ("the device tree", layout.fdt, fdt.as_slice()),
        (
            "the trampoline",
            layout.trampoline,
            &trampoline(layout.fdt, layout.kernel)[..],
        ),
    ] {
        if !bytes.is_empty() {
            dev.load(at, bytes)
                .map_err(|e| format!("VM_LOAD of {what}: {e}"))?;
        }
    }
    let shared = Shared {
        machine: Mutex::new(Machine {
            uart: Pl011::new(),
            gic,
            out: io::stdout(),
            queued: vec![VecDeque::new(); options.cpus],
            uart_in_flight: false,
            line: Vec::new(),
            saw_init: false,
            ended: None,
            kicks: vec![None; options.cpus],
            in_run: vec![false; options.cpus],
        }),
        wake: (0..options.cpus).map(|_| Condvar::new()).collect(),
    };
    Kick::install().map_err(|e| format!("installing the kick's signal handler: {e}"))?;
    let rogue = options.read_own_memory_at_init;
    let failure = std::thread::scope(|scope| {
        let shared = &shared;
        let dev = &dev;
        // The input thread is not joined: it may wait on standard input
        // for ever, and ends with the process.
        std::thread::Builder::new()
            .name("input".into())
            .spawn_scoped(scope, move || forward_input(shared, input))
            .ok();
        let threads: Vec<_> = (1..options.cpus)
            .map(|index| scope.spawn(move || vcpu_loop(dev, shared, index, false)))
            .collect();
        let mut failure = vcpu_loop(dev, shared, 0, rogue).err();
        shared.end(End::Off);
        for t in threads {
            if let Ok(Err(e)) = t.join() {
                failure.get_or_insert(e);
            }
        }
        failure
    });
    let mut m = shared.lock();
    let _ = m.out.flush();
    if let Some(e) = failure {
        return Err(format!("VCPU_RUN: {e}"));
    }
    Ok(m.ended.take().unwrap_or(End::Off))
}

/// One vCPU's thread: runs it and answers its exits until the guest ends.
fn vcpu_loop(dev: &Device, shared: &Shared, index: usize, rogue_read: bool) -> io::Result<()> {
    shared.lock().kicks[index] = Some(Kick::this_thread());
    let r = run_vcpu(dev, shared, index, rogue_read);
    // No kick reaches the thread once it is gone.
    let mut m = shared.lock();
    m.kicks[index] = None;
    m.in_run[index] = false;
    r
}

fn run_vcpu(dev: &Device, shared: &Shared, index: usize, rogue_read: bool) -> io::Result<()> {
    let mut answer = [0u64; 4];
    loop {
        let inject = {
            let mut m = shared.lock();
            if m.ended.is_some() {
                return Ok(());
            }
            if rogue_read && m.saw_init {
                let _ = m.out.flush();
                drop(m);
                println!("moat-vmm: reading the Linux guest's first page");
                let word = dev.read_donated_page()?;
                println!("moat-vmm: read the Linux guest's page: {word:#x}");
                shared.end(End::Crashed("the rogue read came back".into()));
                return Ok(());
            }
            m.in_run[index] = true;
            m.injections(index)
        };
        let ran = dev.run_vcpu(index as u64, answer, inject);
        shared.lock().in_run[index] = false;
        let regs = match ran {
            Ok(regs) => regs,
            // Kicked before the vCPU was entered: nothing ran; again, with
            // the same answer and what is queued now.
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {
                shared.lock().requeue(index, inject);
                continue;
            }
            // Another vCPU powered the VM off meanwhile.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && index != 0 => return Ok(()),
            Err(e) => {
                shared.end(End::Crashed(format!("VCPU_RUN of vCPU {index}: {e}")));
                return Err(e);
            }
        };
        answer = [0; 4];
        let detail = [regs[1], regs[2], regs[3], regs[4], regs[5], regs[6]];
        match ExitReason::from_u64(regs[0]) {
            Some(ExitReason::Hvc) => {
                let function = detail[0] as u32;
                answer[0] = match function {
                    // Migration is not a thing here: "not present".
                    PSCI_MIGRATE_INFO_TYPE => 2,
                    _ => moat_abi::Error::NotSupported.to_x0(),
                };
            }
            Some(ExitReason::Mmio) => {
                match shared
                    .lock()
                    .mmio(detail[0], MmioAccess(detail[1]), detail[2])
                {
                    Some(value) => answer[0] = value,
                    None => answer[1] = MmioAnswer::ABORT,
                }
            }
            Some(ExitReason::Wfi) => {
                // Nothing pending: wait for the guest's timer, an
                // injection or input.
                let _ = io::stdout().flush();
                let wait = device::until(detail[0]).min(Duration::from_millis(100));
                shared.idle(index, wait);
            }
            Some(ExitReason::Interrupt) => {}
            Some(ExitReason::Eoi) => {
                let listed = (detail[0] as usize).min(moat_abi::vm::EOIS_PER_EXIT);
                let mut m = shared.lock();
                if detail[1..=listed].contains(&u64::from(32 + UART_SPI)) {
                    // Injected again at the next run if the line is up.
                    m.uart_in_flight = false;
                }
            }
            Some(ExitReason::Sgi) => {
                let mut m = shared.lock();
                for t in m.sgi(index, detail[0]) {
                    m.kick(shared, t);
                }
            }
            Some(ExitReason::VcpuPower) if detail[0] == moat_abi::vm::POWER_STARTED => {
                if let Some(c) = shared.wake.get(detail[1] as usize) {
                    c.notify_all();
                }
            }
            Some(ExitReason::VcpuPower) => {
                // Off: nothing ran; wait until CPU_ON (or the end).
                shared.lock().requeue(index, inject);
                shared.idle(index, Duration::from_millis(100));
            }
            Some(ExitReason::Shutdown) => {
                shared.end(if detail[0] == 1 { End::Reset } else { End::Off });
                return Ok(());
            }
            Some(ExitReason::Crashed) => {
                shared.end(End::Crashed(format!(
                    "the core stopped the VM (ESR_EL2 {:#x})",
                    detail[0]
                )));
                return Ok(());
            }
            None => {
                shared.end(End::Crashed(format!("unknown exit {:#x}", regs[0])));
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_image(text_offset: u64, image_size: u64) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        v[8..16].copy_from_slice(&text_offset.to_le_bytes());
        v[16..24].copy_from_slice(&image_size.to_le_bytes());
        v[56..60].copy_from_slice(&IMAGE_MAGIC.to_le_bytes());
        v
    }

    #[test]
    fn image_header() {
        let h = parse_image(&fake_image(0, 40 << 20)).unwrap();
        assert_eq!(h.image_size, 40 << 20);
        assert!(parse_image(&[0; 64]).is_err());
        assert!(parse_image(&[0; 10]).is_err());
    }

    #[test]
    fn layout_keeps_things_apart() {
        let h = ImageHeader {
            text_offset: 0,
            image_size: 40 << 20,
        };
        let l = layout(h, 3 << 20, 256 << 20).unwrap();
        assert_eq!(l.kernel, RAM_BASE);
        assert!(l.initrd >= RAM_BASE + (40 << 20));
        assert!(l.initrd_end <= l.fdt);
        assert_eq!(l.fdt % (2 << 20), 0);
        assert_eq!(l.trampoline, RAM_BASE + (256 << 20) - PAGE);
        assert!(layout(h, 3 << 20, 32 << 20).is_err());
        assert!(layout(h, 250 << 20, 256 << 20).is_err());
    }

    #[test]
    fn trampoline_carries_its_addresses() {
        let t = trampoline(0x4fe0_0000, 0x4000_0000);
        assert_eq!(&t[16..24], &0x4fe0_0000u64.to_le_bytes());
        assert_eq!(&t[24..32], &0x4000_0000u64.to_le_bytes());
        // LDR (literal) x0: imm19 = 4 words ahead.
        assert_eq!(u32::from_le_bytes(t[0..4].try_into().unwrap()), 0x5800_0080);
    }

    #[test]
    fn device_tree_parses() {
        let l = Layout {
            kernel: RAM_BASE,
            initrd: RAM_BASE + (64 << 20),
            initrd_end: RAM_BASE + (66 << 20),
            fdt: RAM_BASE + (254 << 20),
            trampoline: RAM_BASE + (256 << 20) - PAGE,
        };
        let dtb =
            device_tree(2, 256 << 20, &l, "console=ttyAMA0", Some("nproc"), 0x4_0000).unwrap();
        assert_eq!(&dtb[0..4], &0xd00d_feedu32.to_be_bytes());
        let text = String::from_utf8_lossy(&dtb);
        for needle in [
            "arm,gic-v3",
            "arm,armv8-timer",
            "arm,sbsa-uart",
            "psci",
            "cpu@1",
            "nproc",
        ] {
            assert!(text.contains(needle), "{needle}");
        }
    }
}
