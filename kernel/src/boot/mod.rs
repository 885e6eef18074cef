//! Boot: from the firmware's hand-off to the host's first instruction.
//!
//! The order matters, because the boot package lies in the core's own
//! memory, and host payloads may be used where the package holds them: read
//! the package and the device tree, plan the layout, switch to the final EL2
//! map, write the host's device tree and copy out what is not used in place,
//! hand the heap that is clear of the package to the allocator, and the rest
//! only once the package is consumed; then build the host's stage-2.

use crate::arch::cache::{clean_dcache_to_poc, complete_cache_maintenance, dcache_line};
use crate::arch::mmu;
use crate::arch::sysreg::{self, HostEl2Config};
use crate::base::console;
use crate::base::cpu::{self, PowerState};
use crate::base::heap;
use crate::base::panic;
use crate::base::state::{MACHINE, Machine, machine};
use alloc::vec::Vec;
use core::fmt::Display;
use moat_kernel::el2config;
use moat_kernel::layout::{self, LayoutInput};
use moat_kernel::regs::GuestRegs;
use moat_kernel::s2plan;
use moat_package::{FLAG_BENCHMARK, FLAG_SEMIHOSTING_EXIT, Package, PackageHeader};
use moat_platform::dt::{self, Conduit, Gic, Platform, Range};
use moat_platform::firmware::FirmwareConduit;
use moat_platform::hostdt::{self, HostDtEdits};
use moat_platform::quirks::{self, SystemControl};

/// Bytes of heap the carve-out reserves besides the core's image, before the
/// host's stage-2 tables ([`HEAP_PER_GIB`]).
const HEAP_BASE_SIZE: u64 = 16 << 20;
/// Heap per GiB of RAM: the host's stage-2 maps RAM with 4 KiB pages (one
/// 4 KiB table per 2 MiB).
const HEAP_PER_GIB: u64 = 2 << 20;
/// The host's VMID.
const HOST_VMID: u16 = 0;

unsafe extern "C" {
    fn resume_partition(frame: *mut GuestRegs) -> !;
}

fn fatal(what: &str, err: impl Display) -> ! {
    console::print_fatal(format_args!("boot failed: {what}: {err}"));
    panic::stop(1)
}

/// # Safety
/// `addr..addr+len` must be readable memory mapped in the current EL2 map.
unsafe fn bytes<'a>(addr: u64, len: u64) -> &'a [u8] {
    // SAFETY: forwarded from the caller.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) }
}

/// Reads the boot package right after the core's image.
fn find_package(image_end: u64) -> Package<'static> {
    // SAFETY: the package header follows the image in the same 1 GiB normal
    // block of the early map (the image builder pads the core to its end).
    let header = unsafe { bytes(image_end, size_of::<PackageHeader>() as u64) };
    let total = match zerocopy::FromBytes::read_from_bytes(header) {
        Ok(h) => {
            let h: PackageHeader = h;
            h.total_size.get()
        }
        Err(_) => 0,
    };
    // Refuse absurd sizes before mapping them as a slice.
    let total = total.min(1 << 30);
    // SAFETY: as above; the package was loaded with the image.
    let raw = unsafe { bytes(image_end, total.max(size_of::<PackageHeader>() as u64)) };
    Package::parse(raw).unwrap_or_else(|e| fatal("boot package", e))
}

/// The firmware's device tree at `addr`, bounded by its header.
fn firmware_dtb(addr: u64) -> &'static [u8] {
    if addr == 0 || !addr.is_multiple_of(8) {
        fatal(
            "device tree",
            "the firmware passed no device tree address in x0",
        );
    }
    // SAFETY: the early map covers the device tree's 1 GiB block as normal memory.
    let head = unsafe { bytes(addr, 8) };
    let total = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as u64;
    // SAFETY: as above; `discover` checks the header again and refuses a tree
    // whose size is larger than this slice.
    unsafe { bytes(addr, total.clamp(8, 2 << 20)) }
}

/// Copies `src` to physical `dst` and cleans it to PoC.
///
/// A payload the host cannot use in place may be tens of megabytes (a Linux
/// Image is 33 MiB), so the bulk is moved a 64-byte line at a time and each
/// line is cleaned as it is written: one pass over the data instead of a copy
/// and a second cleaning pass.
fn place(dst: u64, src: &[u8]) {
    const LINE: usize = 64;
    let aligned = dst.is_multiple_of(8) && (src.as_ptr() as usize).is_multiple_of(8);
    // Cleaning once per 64 bytes covers every line only if lines are no smaller.
    let bulk = if aligned && dcache_line() >= LINE as u64 {
        src.len() / LINE * LINE
    } else {
        0
    };
    let (head, tail) = src.split_at(bulk);
    for (i, line) in head.chunks_exact(LINE).enumerate() {
        let at = dst + (i * LINE) as u64;
        // SAFETY: `line` is 64 readable bytes of the package, 8-byte aligned
        // (checked above); `[u64; 8]` is valid for any bits.
        let words: [u64; 8] = unsafe { core::ptr::read(line.as_ptr().cast::<[u64; 8]>()) };
        // SAFETY: `at..at+64` is host RAM chosen by the layout plan (inside a
        // RAM bank mapped read/write in the core's final map, disjoint from
        // the core, the package, the firmware tree and every reserved
        // region), 8-byte aligned; cleaning a line by VA has no memory effect
        // beyond making the write visible at the point of coherency.
        unsafe {
            core::ptr::write(at as *mut [u64; 8], words);
            core::arch::asm!("dc cvac, {}", in(reg) at, options(nostack, preserves_flags));
        }
    }
    if !tail.is_empty() {
        let at = dst + bulk as u64;
        // SAFETY: as above, for the unaligned remainder; `copy` tolerates
        // overlap in any case.
        unsafe { core::ptr::copy(tail.as_ptr(), at as *mut u8, tail.len()) };
        clean_dcache_to_poc(at, tail.len() as u64);
    } else {
        complete_cache_maintenance();
    }
}

fn mib(bytes: u64) -> u64 {
    bytes >> 20
}

#[unsafe(no_mangle)]
extern "C" fn primary_main(fdt_addr: u64) -> ! {
    heap::init_early();
    let image = mmu::image_sections();
    let package = find_package(image.end);
    let package_flags = package.flags;
    if package.flags & FLAG_SEMIHOSTING_EXIT != 0 {
        crate::arch::semihosting::allow_semihosting_exit();
    }
    let (dtb, dtb_source) = match package.device_tree {
        Some(t) => (t, "boot package"),
        None => (firmware_dtb(fdt_addr), "firmware"),
    };
    // The console is the board's, from its tree, from the very first line:
    // no board's UART address is built in. Without a usable PL011 the core
    // has no console; under QEMU its lines (the reason the boot fails) go
    // out through semihosting instead.
    if let Some(uart) = dt::console_uart(dtb) {
        // SAFETY: the early map makes every 1 GiB block other than the
        // core's and the device tree's device memory, and a UART is in
        // neither (RAM holds no MMIO); the final map maps the same UART as
        // device memory, since discovery picks the same one.
        unsafe { console::init(uart.regs.base as usize) };
    }
    crate::log!(
        "Moat {} EL2 core starting (boot CPU MPIDR {:#x})",
        moat_kernel::VERSION,
        sysreg::mpidr()
    );
    let platform = dt::discover(dtb).unwrap_or_else(|e| fatal("device tree", e));
    let smmu = moat_platform::iommu::find_smmu_v3(dtb).unwrap_or_else(|e| fatal("device tree", e));
    crate::log!(
        "platform \"{}\" ({}, device tree from {dtb_source}): {} CPU(s), GICv{}, PSCI {}",
        platform.model,
        platform.compatible,
        platform.cpus.len(),
        platform.gic.version(),
        match platform.psci.map(|p| p.conduit) {
            Some(Conduit::Smc) => "via SMC",
            Some(Conduit::Hvc) => "via HVC (unreachable from EL2)",
            None => "absent",
        }
    );
    for bank in &platform.memory {
        crate::log!(
            "RAM {:#x}..{:#x} ({} MiB)",
            bank.base,
            bank.end(),
            mib(bank.size)
        );
    }

    // Plan where everything goes.
    let host_info = layout::host_image_info(package.host_image);
    let firmware_dtb_range = if package.device_tree.is_some() {
        Range::new(fdt_addr.max(1), 1).unwrap_or_default()
    } else {
        Range::new(fdt_addr, dtb.len() as u64).unwrap_or_default()
    };
    let image_range = Range::new(image.start, image.end - image.start).unwrap_or_default();
    let package_range = Range::new(image.end, package.total_size).unwrap_or_default();
    let loaded_at = |bytes: &[u8]| Range::new(bytes.as_ptr() as u64, bytes.len() as u64);
    let plan = layout::plan(&LayoutInput {
        memory: &platform.memory,
        reserved: &platform.reserved,
        image: image_range,
        heap_size: HEAP_BASE_SIZE
            + HEAP_PER_GIB
                * platform
                    .memory
                    .iter()
                    .map(|b| b.size.div_ceil(1 << 30))
                    .sum::<u64>(),
        package: package_range,
        firmware_dtb: firmware_dtb_range,
        host_image: host_info,
        host_image_at: package.host_image.as_ptr() as u64,
        initrd: package.host_initrd.and_then(loaded_at),
    })
    .unwrap_or_else(|e| fatal("memory layout", e));
    log_carve_out(&plan, image_range.size);

    // The core's final stage-1 map.
    let its_frames = dt::gic_its(dtb).unwrap_or_else(|e| fatal("device tree (GICv3 ITS)", e));
    let mut core_mmio: heapless::Vec<Range, { 8 + dt::MAX_ITS }> = heapless::Vec::new();
    let _ = core_mmio.push(platform.uart.regs);
    match &platform.gic {
        Gic::V2 {
            distributor,
            cpu_interface,
            ..
        } => {
            let _ = core_mmio.push(*distributor);
            let _ = core_mmio.push(*cpu_interface);
        }
        Gic::V3 {
            distributor,
            redistributors,
        } => {
            let _ = core_mmio.push(*distributor);
            for r in redistributors {
                let _ = core_mmio.push(*r);
            }
            // Each ITS's control frame (its translation frame is the host's).
            for its in &its_frames {
                let _ =
                    core_mmio.push(Range::new(its.base, its.size.min(0x1_0000)).unwrap_or(*its));
            }
        }
    }
    if let Some(smmu) = &smmu {
        let _ = core_mmio.push(smmu.regs);
    }
    // Without PSCI firmware the core ends the machine itself, through the
    // board's quirk (the BCM2835 watchdog on a Raspberry Pi 4).
    let firmware = FirmwareConduit::new(platform.psci.map(|p| p.conduit));
    let core_powers_cpus =
        crate::partition::power::core_managed(&platform, firmware.is_available());
    let spin_table = crate::partition::power::has_spin_table(&platform);
    if core_powers_cpus {
        let control = quirks::system_control(dtb);
        if let SystemControl::Bcm2835Watchdog { pm } = control {
            let _ = core_mmio.push(pm);
        }
        crate::partition::power::set_system_control(control);
        crate::log!(
            "no PSCI firmware: the core starts CPUs itself{} and answers the host's PSCI; SYSTEM_OFF/RESET {}",
            if spin_table {
                " (releasing them from the firmware's spin table)"
            } else {
                ""
            },
            match control {
                SystemControl::Bcm2835Watchdog { .. } => "through the BCM2835 watchdog",
                SystemControl::None => "stop the CPUs (no known reset)",
            }
        );
    }
    mmu::switch_to_final_map(&platform.memory, &core_mmio, sysreg::cpu_features().mte)
        .unwrap_or_else(|e| fatal("EL2 page tables", e));
    let (its_count, redistributor_count) = crate::device::its::init(&platform.gic, &its_frames);
    if its_count + redistributor_count > 0 {
        crate::log!(
            "GICv3: {its_count} ITS(s) and {redistributor_count} redistributor(s): their table registers emulated, the command queue checked and shadowed"
        );
    }

    // Every device accounted for: DMA-capable devices without an SMMU are
    // withheld unless the image names them.
    let withheld_devices =
        crate::device::inventory::decide(dtb, smmu.as_ref(), package.unprotected_dma.unwrap_or(""))
            .unwrap_or_else(|e| fatal("device tree", e));

    // The host's device tree: the carve-out reserved, PSCI through the core.
    let edits = HostDtEdits {
        reserve_no_map: plan.carve_out.as_slice(),
        bootargs: package.host_bootargs,
        initrd: plan.host_initrd,
        psci_conduit: (platform.psci.is_some() || core_powers_cpus).then_some(Conduit::Hvc),
        cpus_via_psci: core_powers_cpus && spin_table,
        hide_smmu_v3: smmu.is_some(),
        disable_nodes: &withheld_devices.names,
    };
    let host_dtb: Vec<u8> = hostdt::rewrite_for_host(dtb, &edits)
        .unwrap_or_else(|e| fatal("host device tree", format_args!("{e:?}")));
    if host_dtb.len() as u64 > plan.host_dtb.size {
        fatal("host device tree", "larger than 2 MiB");
    }

    // Payloads out of the package, unless the host uses them where they lie:
    // the firmware that loaded the file cleaned it to the point of coherency
    // (as it must for any Image it boots), and the core never writes there.
    if !plan.host_image_in_place {
        place(plan.host_image.base, package.host_image);
    }
    if let (Some(dst), Some(initrd), false) = (
        plan.host_initrd,
        package.host_initrd,
        plan.host_initrd_in_place,
    ) {
        place(dst.base, initrd);
    }
    place(plan.host_dtb.base, &host_dtb);
    let placed = |in_place: bool| if in_place { "in place at" } else { "at" };
    crate::log!(
        "host image ({}, {} KiB) {} {:#x}; device tree ({} bytes) at {:#x}{}",
        if host_info.has_header {
            "arm64 Image"
        } else {
            "raw binary"
        },
        package.host_image.len() >> 10,
        placed(plan.host_image_in_place),
        plan.host_image.base,
        host_dtb.len(),
        plan.host_dtb.base,
        match plan.host_initrd {
            Some(r) => alloc::format!(
                "; initrd ({} KiB) {} {:#x}",
                r.size >> 10,
                placed(plan.host_initrd_in_place),
                r.base
            ),
            None => alloc::string::String::new(),
        }
    );
    if let Some(args) = package.host_bootargs {
        crate::log!("host command line: \"{args}\"");
    }
    drop(host_dtb);

    // The heap that does not lie under the package can be used already; the
    // services are copied out of the package into it.
    let mut heap_later: heapless::Vec<Range, 2> = heapless::Vec::new();
    for range in plan.heap.as_slice() {
        let split = layout::heap_around_package(*range, package_range);
        for piece in split.now.as_slice() {
            // SAFETY: the piece is inside the carve-out's heap, mapped
            // read/write, and disjoint from the package that is still being
            // read and from every host payload.
            unsafe { heap::add_region(piece.base as usize, piece.size as usize) };
        }
        if let Some(under) = split.later {
            let _ = heap_later.push(under);
        }
    }
    let hw_id = sysreg::id_regs();
    let features = hw_id.cpu_features();
    let device_top = platform.devices_top().max(platform.uart.regs.end());
    let ram_top = platform.memory.iter().map(Range::end).max().unwrap_or(0);
    let ipa_bits = el2config::ipa_bits(&features, device_top.max(ram_top));
    let (vtcr, start_level) = el2config::vtcr(ipa_bits, features.pa_range);
    let services = crate::partition::service::package_services(&package);
    let created = crate::partition::service::create_all(&services, start_level)
        .unwrap_or_else(|e| fatal("service routing", e));
    // The transaction engine calls the ledger through the partition layer.
    crate::memory::set_ledger(&crate::partition::service::LEDGER);

    // The command line outlives the package (the MTE policy reads it, and
    // must know when there is more than it was given).
    let full_command_line = package
        .host_bootargs
        .or(platform.chosen.bootargs)
        .unwrap_or("");
    let host_command_line_total = full_command_line.len();
    let mut host_command_line: heapless::String<{ moat_abi::services::MTE_CMDLINE_BYTES }> =
        heapless::String::new();
    for c in full_command_line.chars() {
        if host_command_line.push(c).is_err() {
            break;
        }
    }

    // The package is consumed: keep what the core needs, forget borrowed strings.
    let platform: Platform<'static> = Platform {
        model: "",
        compatible: "",
        chosen: dt::Chosen::default(),
        memory: platform.memory,
        reserved: platform.reserved,
        cpus: platform.cpus,
        uart: platform.uart,
        gic: platform.gic,
        psci: platform.psci,
        devices: platform.devices,
    };
    for under in heap_later {
        // SAFETY: the rest of the heap (under the package) is in the
        // carve-out, mapped read/write, and nothing reads the package any more.
        unsafe { heap::add_region(under.base as usize, under.size as usize) };
    }

    // The host's stage-2: the RAM and device windows the device tree
    // describes, less what the core keeps. Everything withheld is logged.
    let mut withheld: Vec<(Range, &str)> = Vec::new();
    for range in plan.carve_out.as_slice() {
        withheld.push((*range, "the hypervisor's memory"));
    }
    if let Gic::V2 {
        hyp_interface: Some(gich),
        ..
    } = &platform.gic
    {
        withheld.push((*gich, "the GICv2 hypervisor interface"));
    }
    for page in crate::device::its::withheld() {
        withheld.push((page, "a GICv3 ITS or LPI register page, emulated"));
    }
    if let Some(smmu) = &smmu {
        withheld.push((smmu.regs, "the SMMUv3, which the core programs"));
    }
    let device_pages = s2plan::whole_pages(&withheld_devices.windows)
        .unwrap_or_else(|e| fatal("withheld devices", format_args!("{e:?}")));
    for range in device_pages {
        withheld.push((range, "DMA-capable devices without an SMMU"));
    }
    let withheld_ranges: Vec<Range> = withheld.iter().map(|(r, _)| *r).collect();
    let host_plan = s2plan::host_regions(
        &platform.memory,
        &platform.devices,
        &withheld_ranges,
        1u64 << ipa_bits,
    )
    .unwrap_or_else(|e| fatal("host stage-2 plan", format_args!("{e:?}")));
    let regions = &host_plan.regions;
    let host_stage2 = crate::memory::stage2::StageTwo::identity(start_level, HOST_VMID, regions)
        .unwrap_or_else(|e| fatal("host stage-2", e))
        .activate();
    let vttbr = host_stage2.vttbr();
    crate::memory::stage2::HOST.call_once(|| spin::Mutex::new(host_stage2));
    crate::log!(
        "host stage-2: {} regions, {}-bit IPA (CPU: {}-bit PA; highest described address {:#x}), VMID {HOST_VMID}; heap {} KiB used of {} MiB",
        regions.len(),
        ipa_bits,
        features.pa_bits(),
        device_top.max(ram_top) - 1,
        heap::used_bytes() >> 10,
        heap::total_bytes() >> 20
    );
    crate::log!(
        "host devices: {} window(s) from the device tree (reg and bus ranges), mapped as device memory",
        platform.devices.len()
    );
    for (range, what) in &withheld {
        crate::log!(
            "withheld from the host: {:#x}..{:#x} ({what})",
            range.base,
            range.end()
        );
    }
    if let Some(beyond) = host_plan.beyond_ipa {
        crate::log!(
            "withheld from the host: {:#x}..{:#x} (beyond the {ipa_bits}-bit IPA space the CPU allows)",
            beyond.base,
            beyond.end()
        );
    }

    if let Some(desc) = &smmu {
        crate::memory::smmu::boot(desc, vtcr, vttbr, ipa_bits);
    }

    // Until the MTE policy decides, the host is told what the hardware has.
    let pmcr_n = sysreg::pmu_counters(&features);
    let count_el2 = package_flags & FLAG_BENCHMARK != 0;
    let host_controls = el2config::host_controls(&hw_id, &hw_id, pmcr_n, count_el2);
    let host_el2 = HostEl2Config::new(&host_controls, vtcr, vttbr);
    log_host_features(&hw_id, &host_controls);
    let machine = MACHINE.call_once(|| Machine {
        firmware,
        core_powers_cpus,
        platform,
        cpu: features,
        vm_hcrx: [false, true].map(|mte| el2config::vm_controls(&hw_id, mte).hcrx),
        host_el2,
        carve_out: plan.carve_out,
        stage2_start_level: start_level,
        ipa_bits,
    });

    let boot_affinity = moat_kernel::psci::mpidr_affinity(sysreg::mpidr());
    let index = machine.cpu_index_of(boot_affinity).unwrap_or(0);
    let Some(boot_cpu) = cpu::get(index) else {
        fatal("CPU", "boot CPU index out of range")
    };
    prepare_cpu(boot_cpu);
    if created > 0 {
        crate::partition::service::start_all(boot_cpu);
    }
    // The memory ledger, if the image has one: built from this machine's
    // RAM and the hypervisor's memory.
    match crate::partition::service::ledger_boot(
        boot_cpu,
        &machine.platform.memory,
        machine.carve_out.as_slice(),
    ) {
        None => crate::log!("no memory ledger service in this image"),
        Some(Ok((extents, bytes))) => {
            // The consistency checker is a debugging aid the host invokes
            // (CHECK_CONSISTENCY); walking every page of the host's stage-2
            // at each boot would cost tens of milliseconds.
            crate::log!("memory ledger: {extents} extent(s), {bytes} bytes of state");
        }
        Some(Err(e)) => fatal(
            "memory ledger",
            format_args!("the ledger service did not answer ({e:?})"),
        ),
    }
    // The host's MTE policy, if the image has a policy service.
    let hardware_mte = sysreg::mte_level();
    match crate::partition::service::host_mte_policy(
        boot_cpu,
        hardware_mte,
        &host_command_line,
        host_command_line_total,
    ) {
        None => crate::log!("no MTE policy service: the host gets MTE as the hardware offers it"),
        Some(Ok(host_mte)) => {
            let view = el2config::host_view(&hw_id, host_mte);
            let hcr = el2config::host_controls(&hw_id, &view, pmcr_n, count_el2).hcr;
            machine
                .host_el2
                .hcr
                .store(hcr, core::sync::atomic::Ordering::Relaxed);
            crate::log!(
                "host MTE policy: {} (HCR_EL2 {hcr:#x})",
                match (features.mte, host_mte) {
                    (false, _) => "no MTE in hardware",
                    (true, true) => "on: the host uses MTE directly",
                    (true, false) =>
                        "off: tag access disabled, MTE registers and GMID_EL1 trapped, ID registers edited",
                }
            );
        }
        Some(Err(e)) => fatal(
            "MTE policy",
            format_args!("the policy service did not answer ({e:?})"),
        ),
    }
    if core_powers_cpus {
        match crate::partition::power::release_secondaries(index) {
            Ok(0) => {}
            Ok(n) => crate::log!(
                "{n} secondary CPU(s) left the firmware's spin table and wait in the core for the host's CPU_ON"
            ),
            Err(e) => fatal("secondary CPUs", e),
        }
    }
    crate::log!(
        "entering the host at {:#x} on CPU {index} (EL1h, x0 = device tree)",
        plan.host_image.base
    );
    enter_host(index, plan.host_image.base, plan.host_dtb.base)
}

/// Logs the features of the table the host gets and the controls that give
/// them.
fn log_host_features(hw: &el2config::IdRegs, c: &el2config::El2Controls) {
    let mut names = alloc::string::String::new();
    for f in el2config::FEATURES.iter().filter(|f| hw.has(f)) {
        if !names.is_empty() {
            names.push_str(", ");
        }
        names.push_str(f.name);
    }
    crate::log!("host features the EL2 controls give: {names}");
    crate::log!(
        "host EL2 controls: HCR_EL2 {:#x}, HCRX_EL2 {:#x}, CPTR_EL2 {:#x}, MDCR_EL2 {:#x}, HFGRTR_EL2 {:#x}, HFGITR_EL2 {:#x}, HDFGRTR_EL2 {:#x}",
        c.hcr,
        c.hcrx,
        c.cptr,
        c.mdcr,
        c.fgt.hfgrtr,
        c.fgt.hfgitr,
        c.fgt.hdfgrtr
    );
}

/// Logs the carve-out: the core's image and the heap, in one range or two.
fn log_carve_out(plan: &layout::Layout, image_bytes: u64) {
    match plan.carve_out.as_slice() {
        [core, heap] => crate::log!(
            "carve-out {:#x}..{:#x} ({} MiB: core image {} KiB, heap {} KiB) and {:#x}..{:#x} ({} MiB: heap); host payloads in place between them",
            core.base,
            core.end(),
            mib(core.size),
            image_bytes >> 10,
            (plan.heap.size() - heap.size) >> 10,
            heap.base,
            heap.end(),
            mib(heap.size)
        ),
        _ => crate::log!(
            "carve-out {:#x}..{:#x} ({} MiB: core image {} KiB, heap {} MiB)",
            plan.carve_out.as_slice().first().map_or(0, |r| r.base),
            plan.carve_out.end(),
            mib(plan.carve_out.size()),
            image_bytes >> 10,
            mib(plan.heap.size())
        ),
    }
}

/// Once per CPU: find its GIC path for the service watchdog, program this
/// CPU's EL2 controls for the host.
fn prepare_cpu(slot: &cpu::PerCpu) {
    let m = machine();
    // SAFETY: only this CPU writes its own slot's GIC path, before its host runs.
    unsafe {
        // First: it opens the GIC's system registers to EL2, which the
        // priority-bit probe below reads.
        sysreg::configure_for_host(&m.cpu, &m.host_el2);
        if (*slot.gic.get()).is_none() {
            let affinity = moat_kernel::psci::mpidr_affinity(sysreg::mpidr());
            let mut access = crate::arch::gic::locate(&m.platform.gic, affinity);
            if let Some(a) = access.as_mut() {
                crate::arch::gic::prepare_cpu(&m.platform.gic, a);
                crate::arch::gic::probe_priority_bits(a);
            }
            *slot.gic.get() = access;
        }
    }
    // SAFETY: the host's controls were just programmed on this CPU and
    // SVCR cleared: SVE and SME are open to EL2, not in streaming mode.
    let (sve, sme) = unsafe { sysreg::vector_lengths(&m.cpu) };
    crate::partition::vm::record_vector_lengths(sve, sme);
}

/// Configures this CPU for the host and enters it at `entry` with `x0`.
fn enter_host(index: usize, entry: u64, x0: u64) -> ! {
    let m = machine();
    let Some(slot) = cpu::get(index) else {
        fatal("CPU", "logical index out of range")
    };
    slot.set_power(PowerState::On);
    prepare_cpu(slot);
    let frame = slot.host_frame();
    // SAFETY: this CPU owns its slot's frame; the host has not run on it yet
    // (or is re-entering through CPU_ON/resume, where its old state is gone).
    unsafe { *frame = GuestRegs::el1h_entry(entry, x0) };
    // SAFETY: the host stage-2 in `vttbr` was leaked and lives forever; we
    // are about to enter the host on this CPU.
    unsafe { sysreg::configure_for_host(&m.cpu, &m.host_el2) };
    // SAFETY: `frame` is this CPU's host frame, fully initialised above.
    unsafe { resume_partition(frame) }
}

/// Secondary CPUs: started by the PSCI relay, or resuming from a powerdown suspend.
#[unsafe(no_mangle)]
extern "C" fn secondary_main(index: u64) -> ! {
    let index = index as usize;
    let Some(slot) = cpu::get(index) else {
        panic::park()
    };
    let core_powers_cpus = MACHINE.get().is_some_and(|m| m.core_powers_cpus);
    match slot.power() {
        // Arrived from the spin table, or turned off by the host: wait in
        // the core until CPU_ON gives this CPU an entry point. A CPU_ON that
        // came before the CPU got here left its go flag set, which the wait
        // consumes at once, so no flag outlives the entry it was set for.
        PowerState::Off | PowerState::OnPending if core_powers_cpus => {
            crate::partition::power::wait_for_cpu_on(slot);
        }
        PowerState::OnPending | PowerState::Suspended => {}
        other => {
            crate::log!("CPU {index} entered the core in state {other:?}; parking it");
            panic::park()
        }
    }
    let (entry, context) = slot.host_entry();
    enter_host(index, entry, context)
}
