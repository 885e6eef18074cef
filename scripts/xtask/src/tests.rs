//! `cargo xtask test` and `cargo xtask bench`.
//!
//! Integration tests boot real images under QEMU and match the serial console
//! against explicit pass and fail patterns with a timeout; a run that ends in
//! silence, times out, or exits with an unexpected status fails. Every run's
//! console is kept in `target/test-logs/<name>.log`.
//!
//! The Linux cases boot Debian's arm64 kernel under Moat with a busybox
//! initramfs whose `/init` runs the case's shell commands (see `linux.rs`),
//! and check the commands' output line by line.

use crate::MachineArgs;
use crate::boards::{self, Board};
use crate::cpu_models;
use crate::debian::{self, Assets};
use crate::fuzz_host;
use crate::image::{self, Built, ImageSpec};
use crate::kernels::{self, Kernel};
use crate::linux;
use crate::linux_vm;
use crate::qemu::{self, AfterPass, Harness, OnReset, Verdict};
use crate::synthetic_dt::{self, Parts};
use crate::tools::{self, cargo, run};
use anyhow::{Context, Result, bail};
use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

/// The SME streaming-mode attack's lines, on any CPU with SME.
const ATTACK_SME_PASS: &[&str] = &[
    "vector lengths: SVE",
    "test-host: ok   attack sme streaming: VCPU_RUN from streaming mode with ZA on (SMSTART), streaming vector length",
    "test-host: ok   attack sme streaming: after VCPU_RUN from streaming mode with ZA on (SMSTART) the host's state is intact: SVCR 0x3, 0 Z bytes, 0 P bytes and 0 ZA bytes changed",
    "test-host: ok   attack sme streaming: VCPU_RUN from ZA on outside streaming mode (SMSTART ZA)",
    "test-host: ok   attack sme streaming: after VCPU_RUN from ZA on outside streaming mode (SMSTART ZA) the host's state is intact: SVCR 0x2, 0 Z bytes, 0 P bytes and 0 ZA bytes changed",
    "test-host: ok   attack sme streaming: out of streaming mode the host runs the VM, which finds its vector registers intact and powers off",
    "test-host: ok   attack sme streaming: the reclaimed pages read as zero",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after the SME streaming-mode VCPU_RUN attempts (0)",
];

/// The SMMU's DMA attack: a device behind the SMMU the core owns writes
/// into a host page, a page donated to a VM, the hypervisor's memory, and
/// a host page again.
const ATTACK_DMA_SMMU_PASS: &[&str] = &[
    "withheld from the host: 0x9050000..0x9070000 (the SMMUv3, which the core programs)",
    "smmu: SMMUv3 at 0x9050000 owned by the core: streams 0x0..0x1000 translate through the host's stage-2",
    "smmu: streams from 0x1000 up have no entry",
    "test-host: ok   dma: virtio-rng-pci at 00:",
    "test-host: ok   dma: into a host page: the device answered (true) and wrote",
    "test-host: ok   dma: into a page the host is about to donate: the device answered (true) and wrote",
    "smmu: fault F_TRANSLATION (0x10) stream ",
    "test-host: ok   dma: a DMA into the page just donated to a VM at ",
    "test-host: ok   dma: the VM finds 0 non-zero words in its page: the device's write never landed",
    "test-host: ok   dma: a DMA into the hypervisor's carve-out at ",
    "test-host: ok   dma: after the refused DMAs, into a host page again: the device answered (true) and wrote",
    "SMMU stream(s) checked",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after the DMA attacks (0)",
];

/// DMA-capable devices without an SMMU the image does not name: listed,
/// withheld, and aborting when the host touches them.
const ATTACK_DMA_WITHHELD_PASS: &[&str] = &[
    "device fw-cfg@9020000 at 0x9020000: DMA-capable without an SMMU: WITHHELD from the host (the image does not name it)",
    "device virtio_mmio@a000000 at 0xa000000 and 31 more like it: DMA-capable without an SMMU: WITHHELD from the host",
    "device pcie@10000000 at 0x4010000000: DMA-capable without an SMMU: WITHHELD from the host",
    "device pl011@9000000 at 0x9000000: no bus mastering: given to the host",
    "withheld from the host: 0x9020000..0x9021000 (DMA-capable devices without an SMMU)",
    "withheld from the host: 0xa000000..0xa004000 (DMA-capable devices without an SMMU)",
    "test-host: ok   dma: a read of qemu,fw-cfg-mmio at 0x9020000: synchronous external abort",
    "test-host: ok   dma: a read of virtio,mmio at 0xa000000: synchronous external abort",
    "test-host: ok   dma: a read of pci-host-ecam-generic at 0x4010000000: synchronous external abort",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after touching the withheld devices (0)",
];

/// Lines that always mean failure, whatever the test.
const ALWAYS_FAIL: &[&str] = &["PANIC", "FATAL: exception at EL2", "test-host: FAIL"];

fn machine(smp: u32, gic: &str) -> MachineArgs {
    MachineArgs {
        board: Board::Virt,
        no_highmem_mmio: false,
        smp,
        mem: "1G".into(),
        gic: gic.into(),
        no_mte: false,
        cpu: "max".into(),
        icount: false,
        timeout: Some(60),
        smmu: false,
        disk: None,
    }
}

/// [`machine`] with an SMMUv3 (stage 2) in front of the PCIe root complex.
fn machine_with_smmu(smp: u32, gic: &str) -> MachineArgs {
    MachineArgs {
        smmu: true,
        ..machine(smp, gic)
    }
}

/// Where a test's host payload comes from.
enum Payload {
    TestHost,
    /// The test host, with the services of this manifest instead of the
    /// demo image's.
    TestHostWith {
        manifest: &'static str,
    },
    External,
    /// Debian's Linux with an initramfs running these shell commands.
    Linux {
        commands: &'static str,
    },
}

/// Which device tree the core boots with.
enum Tree {
    Firmware,
    Synthetic(Parts),
    Truncated,
}

/// A check of the finished run's console beyond the patterns.
type Check = Box<dyn Fn(&str) -> Result<(), String>>;

struct Case {
    name: &'static str,
    host: Payload,
    /// The host's command line (for Linux: added to the default one).
    bootargs: Option<&'static str>,
    tree: Tree,
    machine: MachineArgs,
    pass: Vec<&'static str>,
    fail: Vec<&'static str>,
    /// QEMU's exit status once the pass patterns are seen; `None`: QEMU is
    /// stopped as soon as they are (a machine that reboots never exits).
    exit_code: Option<i32>,
    on_reset: OnReset,
    check: Option<Check>,
    timeout: u64,
    /// For Linux: the kernel booted.
    kernel: Kernel,
    /// For Linux: also boot the same kernel and initramfs on bare QEMU
    /// (no EL2) and require the feature probe's report to be the same.
    bare_reference: Option<BareReference>,
}

/// How the bare-QEMU reference boot of a Linux case is set up.
#[derive(Clone, Copy, Debug)]
struct BareReference {
    /// QEMU's machine without MTE (`mte=off`): what a host whose MTE
    /// policy is off must look like.
    without_mte: bool,
}

fn host_boot(name: &'static str, smp: u32, gic: &str, extra_pass: &[&'static str]) -> Case {
    let mut pass = vec![
        "entering the host",
        "test-host: ok   running at EL1",
        "test-host: PASS",
    ];
    pass.extend_from_slice(extra_pass);
    Case {
        name,
        host: Payload::TestHost,
        bootargs: None,
        tree: Tree::Firmware,
        machine: machine(smp, gic),
        pass,
        fail: vec!["boot failed"],
        exit_code: Some(0),
        on_reset: OnReset::Exit,
        check: None,
        timeout: 60,
        kernel: Kernel::Default,
        bare_reference: None,
    }
}

/// The random hostile host (`images/test-host/src/fuzz.rs`) on a fixed
/// seed: `steps` steps in all over `smp` CPUs, no violation, the checker
/// clean at the end. `cargo xtask fuzz-host` runs any seed and shrinks a
/// failure.
fn fuzz_host_case(name: &'static str, bootargs: &'static str, smp: u32, steps: u64) -> Case {
    // host_boot already waits for the PASS line.
    let mut case = host_boot(name, smp, "v3", &fuzz_host::PASS[..2]);
    case.bootargs = Some(bootargs);
    case.fail.extend_from_slice(fuzz_host::FAIL);
    case.timeout = fuzz_host::timeout_for(steps);
    case
}

fn bad_tree(name: &'static str, tree: Tree, message: &'static str) -> Case {
    Case {
        name,
        host: Payload::TestHost,
        bootargs: None,
        tree,
        machine: machine(1, "v3"),
        pass: vec![message],
        fail: vec!["entering the host"],
        exit_code: Some(1),
        on_reset: OnReset::Exit,
        check: None,
        timeout: 30,
        kernel: Kernel::Default,
        bare_reference: None,
    }
}

fn cases(models: &[cpu_models::Model]) -> Vec<Case> {
    let mut cases = vec![
        host_boot("boot_gicv3", 1, "v3", &["GICv3"]),
        host_boot(
            "ledger_agrees_with_the_host_stage2",
            1,
            "v3",
            &[
                "service ledger ready",
                // Three extents (host, hypervisor, host), or five when the
                // host payload is placed in place inside the carve-out's
                // gap, as the test host now is at its size.
                "memory ledger: ",
                "consistency: the ledger and the stage-2 tables agree",
                "test-host: ok   the ledger and the host's stage-2 agree after every check",
            ],
        ),
        host_boot(
            "boot_gicv2_two_cpus",
            2,
            "v2",
            &["GICv2", "test-host: CPU 1 online at EL1"],
        ),
        host_boot(
            "boot_four_cpus_through_psci_relay",
            4,
            "v3",
            &[
                "test-host: CPU 3 online at EL1",
                "test-host: ok   3 secondary CPU(s) ran at EL1",
            ],
        ),
        host_boot(
            "host_touching_hypervisor_memory_gets_an_abort",
            1,
            "v3",
            &[
                "synchronous external abort injected",
                "test-host: ok   read of hypervisor memory",
                "test-host: ok   write of hypervisor memory",
                "test-host: ok   instruction fetch from hypervisor memory",
            ],
        ),
        host_boot(
            "system_off_ends_qemu_with_status_0",
            1,
            "v3",
            &["host CPU 0 asked for SYSTEM_OFF", "test-host: powering off"],
        ),
        bad_tree(
            "bad_dt_truncated",
            Tree::Truncated,
            "boot failed: device tree: device tree is truncated",
        ),
        bad_tree(
            "bad_dt_without_memory",
            Tree::Synthetic(Parts {
                memory: false,
                uart: true,
                gic: true,
            }),
            "boot failed: device tree: device tree has no memory node",
        ),
        bad_tree(
            "bad_dt_without_uart",
            Tree::Synthetic(Parts {
                memory: true,
                uart: false,
                gic: true,
            }),
            "boot failed: device tree: device tree has no PL011 UART",
        ),
        bad_tree(
            "bad_dt_without_gic",
            Tree::Synthetic(Parts {
                memory: true,
                uart: true,
                gic: false,
            }),
            "boot failed: device tree: device tree has no GICv2 or GICv3",
        ),
        Case {
            name: "external_raw_payload_sees_its_bootargs",
            host: Payload::External,
            bootargs: Some("x=1 moat.test=external"),
            tree: Tree::Firmware,
            machine: machine(1, "v3"),
            pass: vec![
                "raw binary",
                "external payload: bootargs=x=1 moat.test=external",
            ],
            fail: vec!["boot failed"],
            exit_code: Some(0),
            on_reset: OnReset::Exit,
            check: None,
            timeout: 30,
            kernel: Kernel::Default,
            bare_reference: None,
        },
        // The host's NULL is answered in the core's vector; its neighbours
        // (other immediates, SMC, other function ids, a VM's NULL) take the
        // full path, and every answer is the full path's.
        host_boot(
            "host_null_hvc_fast_path_answers_as_the_full_path",
            1,
            "v3",
            &[
                "test-host: ok   null hypercall: x0 = 0, x1..x17 as they were",
                "test-host: ok   null hypercall with x0's upper half set: x0 = 0, x1..x17 kept",
                "test-host: ok   null hypercall with immediate 1 is NOT_SUPPORTED",
                "test-host: ok   null hypercall with immediate 0xffff is NOT_SUPPORTED",
                "test-host: ok   null call through SMC: x0 = 0, x1..x17 kept",
                "test-host: ok   the call after NULL (ABI_VERSION) is answered as ABI_VERSION",
                "test-host: ok   function id 0x86000000 is not NULL: NOT_SUPPORTED",
                "the core answered the guest's NULL hypercall with 0",
            ],
        ),
        host_boot(
            "services_answer_and_failures_are_contained",
            1,
            "v3",
            &[
                "service trace ready",
                "test-host: ok   trace service answers ping",
                "test-host: ok   trace counted the traps it observes",
                "service faulty-exception failed: reported an exception",
                "service faulty-malformed failed: answered with a malformed reply",
                "service faulty-spin failed: ran past its budget",
                "service faulty-snoop failed: touched memory outside its partition",
                "test-host: ok   faulty-snoop stays failed",
                "service faulty-remap failed: trapped to the core",
                "test-host: ok   faulty-remap stays failed",
                "test-host: ok   the trace service still answers after the others failed",
            ],
        ),
        Case {
            bootargs: Some("arm64.nomte"),
            ..host_boot("mte_policy_off_by_arm64_nomte", 1, "v3", MTE_OFF_PASS)
        },
        Case {
            bootargs: Some("moat.host_mte=off"),
            ..host_boot("mte_policy_off_by_moat_host_mte_off", 1, "v3", MTE_OFF_PASS)
        },
        Case {
            bootargs: Some("arm64.nomte moat.host_mte=on"),
            ..host_boot(
                "mte_policy_on",
                1,
                "v3",
                &[
                    "host MTE on (moat.host_mte=on)",
                    "test-host: ok   ID_AA64PFR1_EL1.MTE = 3",
                    "test-host: ok   GCR_EL1 written and read back without a trap",
                    "test-host: ok   STG then LDG on our own memory: tag 5 reads back 5",
                ],
            )
        },
        host_boot(
            "vm_demo_guest_runs_and_talks_to_the_host",
            1,
            "v3",
            VM_DEMO_PASS,
        ),
        host_boot(
            "vm_vector_registers_are_each_partitions_own",
            1,
            "v3",
            &[
                "test-host: ok   vm vectors: the guest filled its 32 vector registers and exited",
                "test-host: ok   vm vectors: the host's V1, V8, V15 and V30 survived the guest's run (0 changed)",
                "test-host: ok   vm vectors: the host's Z0 and Z31 survived the guest's run at its full vector length (0 bytes changed)",
                "test-host: ok   vm vectors: the guest's 32 vector registers survived the host's run (0 changed)",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after the vector-register probe (0)",
            ],
        ),
        Case {
            // 128-bit SVE, streaming vector lengths up to 2048 bits: a
            // host Z register in streaming mode is 16 times an SVE one.
            machine: MachineArgs {
                cpu: "max,sve-max-vq=1".into(),
                ..machine(1, "v3")
            },
            ..host_boot("attack_sme_streaming_vcpu_run", 1, "v3", ATTACK_SME_PASS)
        },
        host_boot(
            "attack_sme_streaming_vcpu_run_cpu_max",
            1,
            "v3",
            ATTACK_SME_PASS,
        ),
        Case {
            // QEMU's PMU counts retired instructions only under -icount.
            machine: MachineArgs {
                icount: true,
                ..machine(1, "v3")
            },
            ..host_boot(
                "attack_host_pmu_counts_guest",
                1,
                "v3",
                &[
                    "test-host: ok   attack pmu: the host's EL1 instruction counter counts its own 1000000-iteration loop",
                    "test-host: ok   attack pmu: the guest spun 1000000 iterations (2000000 instructions) while the host's EL1 counter ran: it counted",
                    "test-host: ok   attack pmu: after the run the host's counter counts its own loop again",
                    "test-host: ok   attack pmu: the guest powered off",
                    "test-host: ok   attack pmu: the reclaimed pages read as zero",
                    "test-host: ok   vm: the ledger and the host's stage-2 agree after the host's PMU counted across a VM run (0)",
                ],
            )
        },
        host_boot(
            "attack_host_breakpoint_in_guest",
            1,
            "v3",
            &[
                "test-host: ok   attack breakpoint: the host's hardware breakpoint fires on its own instruction (1 exception, ESR_EL1 0xc6000022)",
                "test-host: ok   attack breakpoint: with the host's breakpoint on guest instruction",
                "the guest ran through both undisturbed: 0 exceptions",
                "test-host: ok   attack breakpoint: the host took no debug exception from inside the VM",
                "test-host: ok   attack breakpoint: after the run the host's MDSCR_EL1 is its own",
                "test-host: ok   attack breakpoint: ... and its breakpoint still fires on its own instruction (1 exception, ESR_EL1 0xc6000022)",
                "test-host: ok   attack breakpoint: the guest powered off",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after the host's breakpoint and watchpoint on guest addresses (0)",
            ],
        ),
        host_boot(
            "attack_guest_keeps_its_cpu",
            1,
            "v3",
            &[
                "test-host: ok   attack guest keeps cpu (host on its virtual timer): VCPU_RUN of a spinning guest",
                "test-host: ok   attack guest keeps cpu (host on its virtual timer): then the host took INTID 27",
                "test-host: ok   attack guest keeps cpu (host on its physical timer): VCPU_RUN of a spinning guest",
                "test-host: ok   attack guest keeps cpu (host on its physical timer): then the host took INTID 30",
                "test-host: ok   attack guest keeps cpu (host with no timer armed): VCPU_RUN of a spinning guest",
                "test-host: ok   attack guest keeps cpu (host with no timer armed): then the host took INTID 1023",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after a spinning guest was stopped by the host's timer (0)",
            ],
        ),
        host_boot(
            "attack_interrupt_priority_during_transaction",
            1,
            "v3",
            &[
                "test-host: ok   attack interrupt during transaction: with SGI 8 pending at priority 0x20: VM_CREATE 0, VM_DONATE 0 and 0, VM_DESTROY 0, VM_RECLAIM 0 and 0",
                "test-host: ok   attack interrupt during transaction: the host's SGI (priority 0x20) was still pending afterwards and taken (INTID 8)",
                "test-host: ok   attack interrupt during transaction: with SGI 8 pending at priority 0x0: VM_CREATE 0, VM_DONATE 0 and 0, VM_DESTROY 0, VM_RECLAIM 0 and 0",
                "test-host: ok   attack interrupt during transaction: the host's SGI (priority 0x0) was still pending afterwards and taken (INTID 8)",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after memory transactions made with a high-priority host interrupt pending (0)",
            ],
        ),
        host_boot(
            "vm_guest_cannot_reach_outside_its_memory",
            1,
            "v3",
            &[
                "test-host: ok   vm demo: guest sharing IPA 0x40010000, outside its memory, is refused",
                "test-host: ok   vm demo: guest read of IPA 0x9000000 outside its memory: MMIO exit (IPA 0x9000000, 8 bytes, write false)",
                "test-host: ok   vm demo: guest 4-byte write of 0xcafef00d to IPA 0x9000010: MMIO exit",
                "test-host: ok   vm demo: the value the host answered the MMIO read with reached the guest (0x1122334455667788)",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after the demo (0)",
            ],
        ),
        host_boot(
            "vm_host_cannot_touch_donated_memory",
            1,
            "v3",
            &[
                "test-host: ok   vm demo: host read of the guest's page at",
                "test-host: ok   vm hostile: host read of donated page",
                "test-host: ok   vm hostile: host write of donated page",
                "test-host: ok   vm hostile: host STG on donated page",
                "test-host: ok   vm hostile: host LDG on donated page",
                "test-host: ok   vm hostile: host DC GVA on donated page",
                "test-host: ok   vm hostile: host DC GZVA on donated page",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after the host's accesses to the VM's pages were refused (0)",
                "test-host: ok   vm hostile access: the reclaimed pages read as zero",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after the host touched donated memory (0)",
            ],
        ),
        Case {
            bootargs: Some("arm64.nomte"),
            ..host_boot(
                "vm_host_without_mte_policy_still_cannot_touch_donated_memory",
                1,
                "v3",
                &[
                    "test-host: vm mte: skipping the MTE VM: the host's MTE policy is off",
                    "test-host: vm hostile: skipping STG, LDG, DC GVA and DC GZVA on a donated page: the host's MTE policy is off",
                    "test-host: ok   vm hostile: host read of donated page",
                    "test-host: ok   vm hostile: host write of donated page",
                    "test-host: ok   vm demo: guest powered off with PSCI SYSTEM_OFF",
                    "test-host: ok   vm: the ledger and the host's stage-2 agree after the host touched donated memory (0)",
                ],
            )
        },
        host_boot(
            "vm_refused_donations_reclaims_and_shares",
            1,
            "v3",
            &[
                "test-host: ok   vm refusals: two VMs created",
                "test-host: ok   vm refusals: VM_CREATE with an unknown flag: InvalidParameters",
                "test-host: ok   vm refusals: donate 4 pages at",
                "test-host: ok   vm refusals: donate the same pages again to the same VM: Denied",
                "test-host: ok   vm refusals: donate one of them to another VM: Denied",
                "test-host: ok   vm refusals: donate hypervisor memory at",
                "test-host: ok   vm refusals: donate a range that overflows (0xfffffffffffff000, 2 pages): InvalidParameters",
                "test-host: ok   vm refusals: donate a range running past the end of RAM",
                "test-host: ok   vm refusals: donate an unaligned PA",
                "test-host: ok   vm refusals: donate zero pages: InvalidParameters",
                "test-host: ok   vm refusals: reclaim from a VM that is alive: Denied",
                "test-host: ok   vm refusals: unshare a page never shared with the hypervisor: Denied",
                "test-host: ok   vm refusals: donate a page shared with the hypervisor: Denied",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after the refusals, with a VM holding pages (0)",
                "test-host: ok   vm refusals: reclaim a page never donated, from a destroyed VM: Denied",
                "test-host: ok   vm refusals: reclaim the pages actually donated: 0",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after the refused donations, reclaims and shares (0)",
            ],
        ),
        host_boot(
            "vm_lifecycle_refusals",
            1,
            "v3",
            &[
                "test-host: ok   vm lifecycle: the guest ran and powered off",
                "test-host: ok   vm lifecycle: VM_LOAD after the VM has run: Denied",
                "test-host: ok   vm lifecycle: reclaim from a VM that is off but not destroyed: Denied",
                "test-host: ok   vm lifecycle: VCPU_RUN on a destroyed VM",
                "test-host: ok   vm lifecycle: reclaim after destroy = 0",
                "test-host: ok   vm lifecycle: VCPU_RUN on an unknown handle",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after running VMs that are gone (0)",
            ],
        ),
        host_boot(
            "vm_mte_tags_scrubbed_on_donation",
            1,
            "v3",
            &[
                "test-host: ok   vm mte demo: VM_CREATE(entry 0x40000000, flags 0x1) = 0",
                "test-host: ok   vm mte demo: the host tagged the page it is about to donate (tag 10 reads back 10)",
                "test-host: ok   vm mte demo: the page the host tagged 10 before donation reads tag 0 in the guest",
                "test-host: ok   vm mte demo: the guest's own tags work (tag 3 stored, 3 read back)",
                "test-host: ok   vm mte demo: guest powered off with PSCI SYSTEM_OFF",
                "test-host: ok   vm mte demo: the reclaimed pages read as zero",
                "test-host: ok   vm mte demo: the reclaimed pages' tags read as 0",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after the MTE demo (0)",
            ],
        ),
        host_boot("vm_mte_off_guest_sees_no_mte", 1, "v3", VM_MTE_OFF_PASS),
        Case {
            bootargs: Some("arm64.nomte"),
            ..host_boot(
                "vm_mte_off_guest_sees_no_mte_with_host_mte_policy_off",
                1,
                "v3",
                VM_MTE_OFF_PASS,
            )
        },
        host_boot(
            "vm_mte_on_guest_registers_switched_with_the_vcpu",
            1,
            "v3",
            &[
                "test-host: ok   vm mte on: VM_CREATE(entry 0x40000000, flags 0x1) = 0",
                "test-host: ok   vm mte on: ID_AA64PFR1_EL1.MTE = 3 in the guest (the host's: 3): MTE with tag storage",
                "test-host: ok   vm mte on: no SME in the guest: ID_AA64PFR1_EL1.SME = 0, ID_AA64SMFR0_EL1 = 0x0",
                "test-host: ok   vm mte on: no SVE in the guest: ID_AA64PFR0_EL1.SVE = 0",
                "test-host: ok   vm mte on: no pointer authentication in the guest: ID_AA64ISAR1_EL1 APA 0 API 0 GPA 0 GPI 0",
                "test-host: ok   vm mte on: mrs tpidr2_el0 in the guest: Undefined Instruction, the host's register is out of reach (1 exception(s), ESR_EL1 0x2000000,",
                "test-host: ok   vm mte on: mrs gcr_el1 in the guest: no exception (0 taken; access 0)",
                "test-host: ok   vm mte on: msr gcr_el1 in the guest: no exception (0 taken; access 1)",
                "test-host: ok   vm mte on: mrs rgsr_el1 in the guest: no exception (0 taken; access 2)",
                "test-host: ok   vm mte on: msr rgsr_el1 in the guest: no exception (0 taken; access 3)",
                "test-host: ok   vm mte on: mrs tfsr_el1 in the guest: no exception (0 taken; access 4)",
                "test-host: ok   vm mte on: msr tfsr_el1 in the guest: no exception (0 taken; access 5)",
                "test-host: ok   vm mte on: mrs tfsre0_el1 in the guest: no exception (0 taken; access 6)",
                "test-host: ok   vm mte on: msr tfsre0_el1 in the guest: no exception (0 taken; access 7)",
                "test-host: ok   vm mte on: mrs gmid_el1 in the guest: no exception (0 taken; access 8)",
                "test-host: ok   vm mte on: the guest counted 0 exception(s) over its 9 MTE register accesses (expected 0)",
                "test-host: ok   vm mte on: STG of tag 11 then LDG on the guest's own memory: tag reads 11 (0 exceptions)",
                "test-host: ok   vm mte on: the guest wrote GCR_EL1, RGSR_EL1, TFSR_EL1, TFSRE0_EL1 = [0x5a5a, 0xabcd03, 0x1, 0x1] and read back [0x5a5a, 0xabcd03, 0x1, 0x1]",
                "test-host: ok   vm mte on: after the guest's exit the host's GCR_EL1, RGSR_EL1, TFSR_EL1, TFSRE0_EL1 are its own again",
                "test-host: ok   vm mte on: the host set its own values ([0xff, 0x123405, 0x2, 0x0]) and ran the VM again: the guest reads its own GCR_EL1, RGSR_EL1, TFSR_EL1, TFSRE0_EL1 back ([0x5a5a, 0xabcd03, 0x1, 0x1], expected [0x5a5a, 0xabcd03, 0x1, 0x1])",
                "test-host: ok   vm mte on: back in the host, its GCR_EL1, RGSR_EL1, TFSR_EL1, TFSRE0_EL1 are still its own ([0xff, 0x123405, 0x2, 0x0], expected [0xff, 0x123405, 0x2, 0x0])",
                "test-host: ok   vm mte on: the guest powered off (Shutdown exit, x2 = 0)",
                "test-host: ok   vm mte on: the reclaimed pages read as zero (0 non-zero words)",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after the MTE-on VM's probes (0)",
            ],
        ),
        host_boot(
            "vm_reclaim_of_pages_still_shared_after_destroy",
            1,
            "v3",
            &[
                "test-host: ok   vm shared at exit: the guest shared its page at IPA",
                "test-host: ok   vm shared at exit: the host reads the guest's words in the shared page at PA",
                "test-host: ok   vm shared at exit: the guest powered off without ending its share",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after a VM powered off with a page still shared with the host (0)",
                "test-host: ok   vm shared at exit: VM_DESTROY = 0",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after destroying a VM with a page still shared with the host (0)",
                "test-host: ok   vm shared at exit: VM_RECLAIM of all 16 pages at",
                "test-host: ok   vm shared at exit: the formerly shared page at PA",
                "test-host: ok   vm shared at exit: the host writes and reads back the formerly shared page: it is the host's again (0 write aborts, 0 words differ, 0 read aborts)",
                "test-host: ok   vm shared at exit: all 16 reclaimed pages are the host's and read as zero (0 non-zero words, 0 aborts)",
                "test-host: ok   vm shared at exit: with its last page reclaimed the VM is gone: VCPU_RUN on its handle = InvalidParameters",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after a destroyed VM's pages were reclaimed, one still shared (0)",
            ],
        ),
        host_boot(
            "vm_two_cpus_running_vm_and_racing_donations",
            2,
            "v3",
            &[
                "test-host: vm: CPU 1 serving calls for the boot CPU",
                "test-host: ok   vm running: the guest is counting on CPU 1",
                "test-host: ok   vm running: reclaim from a VM running on CPU 1: Denied",
                "test-host: ok   vm running: destroy a VM running on CPU 1: Busy",
                "test-host: ok   vm running: VCPU_RUN of a vCPU running on CPU 1 is refused",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after the refusals, with the VM running on another CPU (0)",
                "test-host: ok   vm running: the guest kept running through all that",
                "test-host: ok   vm running: an interrupt for the host (SGI 8 to CPU 1) ended VCPU_RUN with an Interrupt exit",
                "test-host: ok   vm running: the host on CPU 1 then took the interrupt (INTID Some(8))",
                "test-host: ok   vm running: VCPU_RUN again on CPU 1: the guest counts on where it was",
                "test-host: ok   vm running: told to stop, the guest unshared its page and powered off on CPU 1",
                "test-host: ok   vm running: the reclaimed pages read as zero",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after a VM running on another CPU (0)",
                "test-host: ok   vm race: two CPUs donating overlapping ranges at once: one succeeded and the other was Denied in 16 of 16 rounds",
                "test-host: ok   vm: the ledger and the host's stage-2 agree after two CPUs racing for the same pages (0)",
                "test-host: ok   vm: CPU 1 stopped serving and is off",
            ],
        ),
        Case {
            host: Payload::TestHostWith {
                manifest: ROGUE_LEDGER_MANIFEST,
            },
            bootargs: Some("moat.rogue_ledger"),
            check: Some(Box::new(check_rogue_refusals)),
            ..host_boot("core_refuses_a_lying_ledger", 1, "v3", ROGUE_LEDGER_PASS)
        },
        fuzz_host_case(
            "random_hostile_host_one_cpu",
            "moat.fuzz=0x5eed0001,8000,64",
            1,
            8000,
        ),
        fuzz_host_case(
            "random_hostile_host_two_cpus",
            "moat.fuzz=0x5eed0002,6000,64",
            2,
            6000,
        ),
        fuzz_host_case(
            "random_hostile_host_four_cpus",
            "moat.fuzz=0x5eed0004,6000,64",
            4,
            6000,
        ),
        // The ledger killed and restarted every 250 of CPU 0's steps while
        // four CPUs share, donate, run and reclaim: each restart is rebuilt
        // from the core's records and checked, calls meanwhile answer Retry
        // and are issued again, and the run ends clean.
        Case {
            pass: vec![
                "entering the host",
                "ledger: restarted and rebuilt from the core's records (restart 1)",
                "ledger: restarted and rebuilt from the core's records (restart 2)",
                "test-host: ok   fuzz: the ledger was killed and came back during the run",
                fuzz_host::PASS[0],
                fuzz_host::PASS[1],
                "test-host: PASS",
            ],
            fail: [fuzz_host::FAIL, LEDGER_RESTART_FAIL].concat(),
            ..fuzz_host_case(
                "random_hostile_host_ledger_restarts",
                "moat.fuzz=0x5eed1ed9,3000,64 moat.fuzz_restart=250",
                4,
                3000,
            )
        },
        // The same with a ledger that faults on every tenth reclaim it
        // prepares (`services/crashing-ledger`): each fault restarts it.
        Case {
            host: Payload::TestHostWith {
                manifest: CRASHING_LEDGER_MANIFEST,
            },
            pass: vec![
                "entering the host",
                "service crashing-ledger failed: ",
                "; it will be restarted",
                "ledger: restarted and rebuilt from the core's records (restart 1)",
                "ledger: restarted and rebuilt from the core's records (restart 2)",
                fuzz_host::PASS[0],
                fuzz_host::PASS[1],
                "test-host: PASS",
            ],
            fail: [fuzz_host::FAIL, LEDGER_RESTART_FAIL].concat(),
            ..fuzz_host_case(
                "random_hostile_host_ledger_crashes",
                "moat.fuzz=0x5eedc4a5,3000,64",
                4,
                3000,
            )
        },
        fuzz_host_case(
            "smp_stress_four_cpus_eight_vms",
            "moat.fuzz=0x57e55,4000,64,stress",
            4,
            4000,
        ),
        Case {
            bootargs: Some("moat.attack=boundary_arguments"),
            ..host_boot("attack_boundary_arguments", 1, "v3", ATTACK_BOUNDARY_PASS)
        },
        Case {
            bootargs: Some("moat.attack=dma_smmu"),
            machine: machine_with_smmu(1, "v3"),
            ..host_boot("attack_dma_through_the_smmu", 1, "v3", ATTACK_DMA_SMMU_PASS)
        },
        Case {
            bootargs: Some("moat.attack=dma_withheld"),
            ..host_boot(
                "attack_dma_devices_without_an_smmu_are_withheld",
                1,
                "v3",
                ATTACK_DMA_WITHHELD_PASS,
            )
        },
        Case {
            bootargs: Some("moat.attack=table_exhaustion"),
            timeout: 300,
            ..host_boot("attack_table_heap_exhaustion", 1, "v3", ATTACK_TABLES_PASS)
        },
        its_attack(
            "attack_its_device_table",
            "moat.attack=its_device_table",
            ATTACK_ITS_DEVICE_TABLE_PASS,
        ),
        its_attack("attack_its_itt", "moat.attack=its_itt", ATTACK_ITS_ITT_PASS),
        its_attack(
            "attack_its_command_queue",
            "moat.attack=its_command_queue",
            ATTACK_ITS_COMMAND_QUEUE_PASS,
        ),
        its_attack(
            "attack_lpi_pending_table",
            "moat.attack=lpi_pending_table",
            ATTACK_LPI_TABLES_PASS,
        ),
        linux_disk_behind_the_smmu(),
        host_fidelity(
            "linux_6_1_host_sees_what_bare_qemu_shows",
            Kernel::Default,
            None,
        ),
        host_fidelity(
            "linux_6_1_mte_off_host_sees_a_machine_without_mte",
            Kernel::Default,
            Some("moat.host_mte=off"),
        ),
        host_fidelity(
            "linux_6_12_host_sees_what_bare_qemu_shows",
            Kernel::Package(NEWER_KERNEL.into()),
            None,
        ),
        host_fidelity(
            "linux_6_12_mte_off_host_sees_a_machine_without_mte",
            Kernel::Package(NEWER_KERNEL.into()),
            Some("moat.host_mte=off"),
        ),
        linux_mte("linux_mte_off_by_arm64_nomte", Some("arm64.nomte"), "0"),
        linux_mte(
            "linux_mte_off_by_moat_host_mte_off",
            Some("moat.host_mte=off"),
            "0",
        ),
        linux_mte("linux_mte_on", None, "1"),
        Case {
            // Four CPUs read their ID registers at once: the policy service
            // must serve them in turn, never answer one of them "busy".
            bootargs: Some("moat.host_mte=off"),
            check: Some(expect_lines(vec!["4".into(), "0".into()])),
            ..linux_case(
                "linux_mte_off_on_four_cpus",
                4,
                "v3",
                "nproc; grep -c ' mte' /proc/cpuinfo || true",
            )
        },
        linux_boot("linux_one_cpu_gicv3", 1, "v3", &["GICv3"]),
        linux_boot(
            "linux_four_cpus_gicv3",
            4,
            "v3",
            &["GICv3", "smp: Brought up 1 node, 4 CPUs"],
        ),
        linux_boot(
            "linux_two_cpus_gicv2",
            2,
            "v2",
            &["GICv2", "smp: Brought up 1 node, 2 CPUs"],
        ),
        Case {
            check: Some(Box::new(check_sleep_one_second)),
            // Busybox's date has no %N; /proc/uptime counts in hundredths.
            ..linux_case(
                "linux_sleep_1_takes_one_second",
                1,
                "v3",
                "cat /proc/uptime; sleep 1; cat /proc/uptime",
            )
        },
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                "moat-linux: exit status 0",
                "synchronous external abort injected",
                "still running",
            ],
            check: Some(Box::new(check_hypervisor_hidden)),
            ..linux_case(
                "linux_host_cannot_see_the_hypervisor",
                1,
                "v3",
                HIDDEN_HYPERVISOR_COMMANDS,
            )
        },
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                "powering off now",
                "asked for SYSTEM_OFF",
            ],
            fail: [linux::FAIL_PATTERNS, &["not reached"]].concat(),
            check: Some(Box::new(|console: &str| {
                match linux::exit_status(console) {
                    None => Ok(()),
                    Some(s) => Err(format!(
                        "/init reported status {s}: the commands' poweroff did not end the machine"
                    )),
                }
            })),
            ..linux_case(
                "linux_poweroff_ends_qemu_with_status_0",
                1,
                "v3",
                "echo powering off now; poweroff -f; sleep 5; echo not reached",
            )
        },
        on_rpi4(Case {
            bootargs: Some("test-host.cpu_without_mte"),
            pass: [
                &["test-host: PASS", "test-host: ok   3 secondary CPU(s) ran at EL1"],
                RPI4_BOOT_PASS,
                VM_DEMO_PASS,
                &["the BCM2835 watchdog at 0xfe100000 resets the SoC into the firmware's halt partition"],
            ]
            .concat(),
            ..host_boot("rpi4_test_host_and_protected_vm", 4, "v2", &[])
        }),
        on_rpi4(Case {
            pass: [
                RPI4_BOOT_PASS,
                &[
                    "smp: Brought up 1 node, 4 CPUs",
                    "psci: PSCIv1.0 detected in firmware.",
                    "moat-linux: exit status 0",
                    "the BCM2835 watchdog at 0xfe100000 resets the SoC into the firmware's halt partition",
                ],
            ]
            .concat(),
            check: Some(expect_lines(vec![
                "4".into(),
                "Raspberry Pi 4 Model B".into(),
                "3".into(),
                "4".into(),
            ])),
            ..linux_case("rpi4_linux_four_cpus", 4, "v2", RPI4_LINUX_COMMANDS)
        }),
        on_rpi4(linux_protected_vm(
            "rpi4_linux_protected_vm_from_userspace",
            "v2",
            "insmod /moat.ko && echo 'a line from the host' | moat-vmm run /guest.bin",
            "guest heard: a line from the host",
        )),
        on_rpi4(Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                "rebooting now",
                "host CPU 0 asked for SYSTEM_RESET; the BCM2835 watchdog at 0xfe100000 resets the SoC",
            ],
            fail: [linux::FAIL_PATTERNS, &["not reached"]].concat(),
            ..linux_case(
                "rpi4_linux_reboot_resets_through_the_watchdog",
                4,
                "v2",
                "echo rebooting now; reboot -f; sleep 5; echo not reached",
            )
        }),
        linux_protected_vm(
            "linux_protected_vm_from_userspace",
            "v3",
            "insmod /moat.ko && echo 'a line from the host' | moat-vmm run /guest.bin",
            "guest heard: a line from the host",
        ),
        // The command `cargo xtask run linux` suggests, as it is: its input
        // is empty, and the guest reads the end of it.
        linux_protected_vm(
            "linux_protected_vm_from_userspace_gicv2",
            "v2",
            linux_vm::START_VM,
            "guest heard: ",
        ),
        // The core's MTE policy grants MTE to a VM that asks, on a CPU with
        // it: the guest maps its memory Tagged.
        {
            let mut case = linux_protected_vm(
                "linux_protected_vm_with_mte",
                "v3",
                "insmod /moat.ko && echo tagged | moat-vmm run --mte /guest.bin",
                "guest heard: tagged",
            );
            case.pass.push("VMID 64, MTE on");
            case
        },
        // A virtual GIC: the guest's timer arrives as PPI 27, an SPI the
        // VMM injects (level: its EOI comes back as an Eoi exit) and an SGI
        // the guest sends itself arrive through the list registers, and a
        // fired timer the guest leaves pending does not end every run.
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                "vgic probe: timer interrupt 27 after",
                "acknowledged after: 27",
                "vgic probe: the guest deactivated [40]",
                "vgic probe: injected SPI acknowledged as 40, own SGI as 5",
                "vgic probe: passed",
                "moat-vmm: the ledger and the host's stage-2 agree",
                "moat-linux: exit status 0",
            ],
            fail: [
                linux::FAIL_PATTERNS,
                &["vgic probe: FAILED", "moat-vmm: probe-vgic"],
            ]
            .concat(),
            ..linux_case(
                "linux_protected_vm_virtual_gic_delivers_timer_spi_and_sgi",
                1,
                "v3",
                "insmod /moat.ko && moat-vmm probe-vgic /guest.bin && moat-vmm check",
            )
        },
        // The two vCPUs of one VM run on two CPUs at the same time: one
        // sees the other's flag change within one uninterrupted run, which
        // vCPUs that take turns cannot.
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                "'s flag go from",
                "within one uninterrupted run: the two ran at the same time",
                "parallel probe: passed",
                "moat-vmm: the ledger and the host's stage-2 agree",
                "moat-linux: exit status 0",
            ],
            fail: [
                linux::FAIL_PATTERNS,
                &["parallel probe: FAILED", "moat-vmm: probe-parallel"],
            ]
            .concat(),
            ..linux_case(
                "linux_protected_vm_vgic_two_vcpus_run_at_the_same_time",
                2,
                "v3",
                "insmod /moat.ko && moat-vmm probe-parallel /guest.bin && moat-vmm check",
            )
        },
        // The pKVM guest ABI, as a kernel's pKVM guest driver uses it.
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                "pkvm probe: UID is KVM's: true, features 0x1d, granule 4096",
                "pkvm probe: share 0, again -3, unshare 0, again -3, unbacked IPA -3",
                "pkvm probe: passed",
                "moat-vmm: the ledger and the host's stage-2 agree",
                "moat-linux: exit status 0",
            ],
            fail: [
                linux::FAIL_PATTERNS,
                &["pkvm probe: FAILED", "moat-vmm: probe-pkvm"],
            ]
            .concat(),
            ..linux_case(
                "linux_protected_vm_pkvm_guest_abi",
                1,
                "v3",
                "insmod /moat.ko && moat-vmm probe-pkvm /guest.bin && moat-vmm check",
            )
        },
        // Without a virtual GIC the guest's fired timer must not end every
        // run either (its physical PPI is the guest's during the run), on
        // either GIC.
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                "acknowledged after: 0",
                "vgic probe: passed",
                "moat-linux: exit status 0",
            ],
            fail: [
                linux::FAIL_PATTERNS,
                &["vgic probe: FAILED", "moat-vmm: probe-vgic"],
            ]
            .concat(),
            ..linux_case(
                "linux_protected_vm_fired_timer_does_not_end_every_run_gicv2",
                1,
                "v2",
                "insmod /moat.ko && moat-vmm probe-vgic --no-vgic /guest.bin",
            )
        },
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                "crashing on purpose",
                "moat-vmm: guest crashed: the guest reported an exception: ESR_EL1 0x2000000",
                "vmm status 2",
                "guest heard: after the crash",
                "moat-vmm: the ledger and the host's stage-2 agree",
                "moat-linux: exit status 0",
            ],
            ..linux_case(
                "linux_protected_vm_guest_crash_ends_the_vmm_with_status_2",
                2,
                "v3",
                "insmod /moat.ko || exit 1\n\
                 echo crash | moat-vmm run /guest.bin\n\
                 echo \"vmm status $?\"\n\
                 echo 'after the crash' | moat-vmm run /guest.bin && moat-vmm check",
            )
        },
        Case {
            // Two boots of the core and two of the shell: the second boot
            // after the reset reached the shell. It would reboot for ever,
            // so the harness stops QEMU there.
            pass: vec![
                "asked for SYSTEM_RESET",
                "EL2 core starting",
                "EL2 core starting",
                linux::MARKER_COMMANDS,
                linux::MARKER_COMMANDS,
            ],
            exit_code: None,
            on_reset: OnReset::Reboot,
            ..linux_case("linux_reboot_boots_again", 1, "v3", "reboot -f")
        },
    ];
    cases.extend(linux_vm_hostile_cases("v3"));
    cases.extend(linux_guest_cases());
    cases.extend(linux_vm_hostile_cases("v2"));
    cases.extend(models.iter().map(cpu_model_case));
    cases
}

/// Every host hypercall with boundary arguments (`moat.attack=boundary_arguments`).
/// A host aiming the GICv3 ITS or the redistributors' LPI tables at memory
/// it does not own (`moat.attack=NAME`, `images/test-host/src/its_attacks.rs`).
fn its_attack(name: &'static str, bootargs: &'static str, pass: &[&'static str]) -> Case {
    let mut case = host_boot(name, 1, "v3", pass);
    case.bootargs = Some(bootargs);
    case.pass.extend_from_slice(ITS_ATTACK_PASS);
    // ("test-host: FAIL" fails every case already.)
    case.fail.push("MISMATCH");
    case
}

/// Every ITS case: the honest flow works after the attack, the core answers
/// and the ledger agrees with the host's stage-2.
const ITS_ATTACK_PASS: &[&str] = &[
    "test-host: ok   its: the core still answers after ",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after ",
];

const ATTACK_ITS_DEVICE_TABLE_PASS: &[&str] = &[
    "test-host: ok   its: LPIs on with the host's own property and pending tables",
    "test-host: ok   its: GITS_BASER with the device table at the VM's page ",
    "test-host: ok   its: MAPD with the device table at a VM's page never lands",
    "test-host: ok   its: with tables in the host's own memory, MAPD, MAPTI and INT deliver LPI 8193",
    "test-host: ok   its: the host reads its device table while the ITS uses it: synchronous external abort",
];

const ATTACK_ITS_ITT_PASS: &[&str] = &[
    "test-host: ok   its: MAPD with the ITT at a VM's page ",
    "test-host: ok   its: MAPD with the ITT at the hypervisor's memory ",
    "test-host: ok   its: VM_DONATE of the ITS's device table refused (Denied",
    "test-host: ok   its: with tables in the host's own memory, MAPD, MAPTI and INT deliver LPI 8193",
];

const ATTACK_ITS_COMMAND_QUEUE_PASS: &[&str] = &[
    "test-host: ok   its: GITS_CBASER at the VM's page ",
    "test-host: ok   its: VM_DONATE of the command queue in use refused (Denied",
    "test-host: ok   its: the queue still works after the refused donation",
    "test-host: ok   its: with tables in the host's own memory, MAPD, MAPTI and INT deliver LPI 8193",
];

const ATTACK_LPI_TABLES_PASS: &[&str] = &[
    "test-host: ok   its: GICR_PENDBASER at the VM's page ",
    "test-host: ok   its: GICR_PROPBASER at the VM's page ",
    "test-host: ok   its: with the host's own tables LPIs come on and LPI 8193 is delivered",
    "test-host: ok   its: the host reads its pending table while the redistributor uses it: synchronous external abort",
];

const ATTACK_BOUNDARY_PASS: &[&str] = &[
    "test-host: ok   boundary: the fixture: ",
    "test-host: ok   boundary: HOST_SHARE_HYP with PA = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: HOST_SHARE_HYP with pages = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: HOST_UNSHARE_HYP with PA = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: HOST_UNSHARE_HYP with pages = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_CREATE with entry IPA = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_DONATE with PA = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_DONATE with pages = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_DONATE with IPA = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_LOAD with destination IPA = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_LOAD with source PA = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_LOAD with bytes = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_LOAD with source PA (0x800 bytes) = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_RECLAIM with PA = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_RECLAIM with pages = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VCPU_RUN with r0 = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: VM_DESTROY with unused x2 = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: GUEST_SHARE_HOST with IPA = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: GUEST_SHARE_HOST with pages = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: GUEST_UNSHARE_HOST with IPA = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: GUEST_UNSHARE_HOST with pages = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: NULL with x1 = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: ABI_VERSION with x1 = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: CHECK_CONSISTENCY with x1 = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: SVC_REPLY_WAIT with x1 = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: SVC_LOG with length = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: SVC_FAULT with FAR = 0, 1, page-1, 2^48, 2^64-page, u64::MAX: ",
    "test-host: ok   boundary: 156 calls, the core still answers (NULL = 0), every legal call undone",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after every hypercall with boundary arguments (0)",
    "test-host: ok   boundary: the fixture taken back (destroy 0, 0 failed reclaims or unshares, 8 of 8 pages of the destroyed VM reclaimed)",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after the boundary fixture was taken back (0)",
];

/// Stage-2 table memory run out (`moat.attack=table_exhaustion`).
const ATTACK_TABLES_PASS: &[&str] = &[
    "test-host: ok   tables: after ",
    "(expected NoMemory); the refused pages are still the host's: true",
    "test-host: ok   tables: donate a whole 2 MiB at ",
    "test-host: ok   tables: the core still answers (NULL = 0)",
    "test-host: ok   tables: with the heap out, the host takes its whole 2 MiB back: 0",
    "donations reclaimed (0 failures)",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after the stage-2 table memory ran out and was given back (0)",
    "test-host: ok   tables: a new VM gets a straddling donation again (create 0, donate 0, destroy 0, reclaim 0)",
];
/// What `moat-vmm` prints when the VM or the VMM failed.
const VMM_FAIL_PATTERNS: &[&str] = &[
    "moat-vmm: guest crashed",
    "moat-vmm: VM",
    "moat-vmm: opening",
];

/// How many free pages a case with 16 MiB of VM memory (4096 pages) may end
/// with fewer than it started: what the kernel's own state moves by (up to
/// about 40 pages measured), with room.
const LOOSE_PAGES: i64 = 256;

/// The hostile cases of protected VMs under Linux, on `gic` ("v3" or
/// "v2"): memory given back, a killed VMM, two VMs at once, 100 lives, bad
/// ioctl arguments, and a donated page mapped into a process.
fn linux_vm_hostile_cases(gic: &'static str) -> Vec<Case> {
    let name = |v3: &'static str, v2: &'static str| if gic == "v2" { v2 } else { v3 };
    vec![
        linux_vm_memory_case(
            name(
                "linux_protected_vm_gives_its_memory_back",
                "linux_protected_vm_gives_its_memory_back_gicv2",
            ),
            VM_MEMFREE_COMMANDS,
            &["guest heard: memory check"],
            LOOSE_PAGES,
            gic,
        ),
        linux_vm_memory_case(
            name(
                "linux_protected_vm_killed_vmm_frees_the_vm",
                "linux_protected_vm_killed_vmm_frees_the_vm_gicv2",
            ),
            VM_KILL_COMMANDS,
            &[
                "type a line:",
                "rmmod refused while the VM lives",
                "killed: status 137",
                "module unloaded after the VM",
            ],
            LOOSE_PAGES,
            gic,
        ),
        linux_vm_memory_case(
            name(
                "linux_protected_vms_on_two_cpus_at_once",
                "linux_protected_vms_on_two_cpus_at_once_gicv2",
            ),
            VM_PAIR_COMMANDS,
            &[
                "both VMs alive",
                "first: guest heard: one",
                "second: guest heard: two",
            ],
            LOOSE_PAGES,
            gic,
        ),
        Case {
            fail: [
                linux::FAIL_PATTERNS,
                VMM_FAIL_PATTERNS,
                &[
                    "unloaded under a live VM",
                    "restart case: FAILED",
                    "ledger: rebuilding,",
                    "ledger: the rebuilt ledger disagrees",
                    "ledger: the restarted ledger did not start",
                    "LEDGER_RESTART:",
                ],
            ]
            .concat(),
            timeout: 600,
            ..linux_vm_memory_case(
                name(
                    "linux_ledger_restarts_under_running_vms",
                    "linux_ledger_restarts_under_running_vms_gicv2",
                ),
                VM_RESTART_COMMANDS,
                &[
                    "moat-vmm: the memory ledger was restarted and rebuilt",
                    "ledger: restarted and rebuilt from the core's records (restart 1)",
                    "alive: guest heard: after the restart",
                    "restart case: 20 lives done",
                ],
                LOOSE_PAGES,
                gic,
            )
        },
        Case {
            timeout: 600,
            ..linux_vm_memory_case(
                name(
                    "linux_protected_vm_100_lives_leak_nothing",
                    "linux_protected_vm_100_lives_leak_nothing_gicv2",
                ),
                VM_CYCLE_COMMANDS,
                &["100 VMs ran"],
                64,
                gic,
            )
        },
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                "moat-vmm: probes: 28 as expected, 0 not",
                "moat-vmm: the ledger and the host's stage-2 agree",
                "moat-linux: exit status 0",
            ],
            fail: [
                linux::FAIL_PATTERNS,
                VMM_FAIL_PATTERNS,
                &["NOT AS EXPECTED"],
            ]
            .concat(),
            ..linux_case(
                name(
                    "linux_protected_vm_bad_ioctl_arguments_refused",
                    "linux_protected_vm_bad_ioctl_arguments_refused_gicv2",
                ),
                2,
                gic,
                "insmod /moat.ko && moat-vmm probe-errors /guest.bin && moat-vmm check",
            )
        },
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                "moat-vmm: reading the page donated to the VM",
                "synchronous external abort injected",
                "rogue read: status 135",
                "moat-vmm: the ledger and the host's stage-2 agree",
                "moat-linux: exit status 0",
            ],
            fail: [
                linux::FAIL_PATTERNS,
                VMM_FAIL_PATTERNS,
                &[
                    "moat-vmm: read the VM's page",
                    "moat-vmm: reading the donated page:",
                ],
            ]
            .concat(),
            ..linux_case(
                name(
                    "linux_protected_vm_page_mapped_into_a_process_aborts",
                    "linux_protected_vm_page_mapped_into_a_process_aborts_gicv2",
                ),
                2,
                gic,
                VM_ROGUE_MAP_COMMANDS,
            )
        },
    ]
}

/// `commands` (see [`vm_prelude`]) on Linux with two CPUs: they print the
/// `expected` lines, the free pages come back after the VMs to within
/// `slack` pages ([`check_memfree_restored`]) and the core's checker is
/// clean at the end.
fn linux_vm_memory_case(
    name: &'static str,
    commands: &'static str,
    expected: &[&'static str],
    slack: i64,
    gic: &'static str,
) -> Case {
    let unexpected = ["unloaded under a live VM"];
    let mut pass = vec![linux::MARKER_COMMANDS];
    pass.extend_from_slice(expected);
    pass.extend([
        "moat-vmm: the ledger and the host's stage-2 agree",
        "moat-linux: exit status 0",
    ]);
    Case {
        pass,
        fail: [linux::FAIL_PATTERNS, VMM_FAIL_PATTERNS, &unexpected].concat(),
        check: Some(Box::new(move |console: &str| {
            check_memfree_restored(console, slack)
        })),
        ..linux_case(name, 2, gic, commands)
    }
}

/// Linux under Moat on two CPUs of `model` (QEMU `virt`, GICv3, MTE only
/// where the model has it), and a protected VM run from its userspace.
fn cpu_model_case(model: &cpu_models::Model) -> Case {
    let heard = "guest heard: a line from the host";
    let mut case = linux_protected_vm(
        model.case,
        "v3",
        "nproc; insmod /moat.ko && echo 'a line from the host' | moat-vmm run /guest.bin",
        heard,
    );
    case.machine.cpu = model.name.into();
    case.machine.no_mte = !model.mte;
    case.machine.no_highmem_mmio = model.pa_bits < 44;
    case.pass.push("host features the EL2 controls give:");
    case.pass.push("smp: Brought up 1 node, 2 CPUs");
    case.check = Some(Box::new(move |console: &str| {
        let out = linux::command_output(console);
        if out.first().map(String::as_str) == Some("2") && out.iter().any(|l| l == heard) {
            Ok(())
        } else {
            Err(format!("expected nproc 2 then {heard:?}, got {out:?}"))
        }
    }));
    case
}

/// `case` on the Raspberry Pi 4 under QEMU's `raspi4b` (four Cortex-A72,
/// 2 GiB, its own device tree): a GIC-400, no PSCI firmware, secondaries on
/// the firmware's spin table, no MTE, SVE or PAuth.
fn on_rpi4(mut case: Case) -> Case {
    case.machine.board = Board::Rpi4;
    case.machine.smp = boards::RPI4_CPUS;
    case.machine.mem = boards::RPI4_MEMORY.into();
    case.machine.gic = "v2".into();
    case.machine.cpu = "cortex-a72".into();
    // Four emulated CPUs on a shared machine: the boots take longer.
    case.timeout = case.timeout.max(300);
    case
}

/// What every boot on the Pi 4 shows: the board from its tree, the core's
/// own CPU power, the secondaries released from the spin table.
const RPI4_BOOT_PASS: &[&str] = &[
    "platform \"Raspberry Pi 4 Model B\" (raspberrypi,4-model-b, device tree from firmware): 4 CPU(s), GICv2, PSCI absent",
    "no PSCI firmware: the core starts CPUs itself (releasing them from the firmware's spin table) and answers the host's PSCI; SYSTEM_OFF/RESET through the BCM2835 watchdog",
    "withheld from the host: 0xff844000..0xff846000 (the GICv2 hypervisor interface)",
    "host MTE policy: no MTE in hardware",
    "3 secondary CPU(s) left the firmware's spin table and wait in the core for the host's CPU_ON",
];

/// The Pi 4's Linux commands: CPUs, the board's model, CPU 3 taken offline
/// (PSCI CPU_OFF, AFFINITY_INFO) and back (CPU_ON from the core's wait).
const RPI4_LINUX_COMMANDS: &str = "nproc; tr -d '\\0' < /proc/device-tree/model; echo; \
echo 0 > /sys/devices/system/cpu/cpu3/online; nproc; \
echo 1 > /sys/devices/system/cpu/cpu3/online; nproc";

/// `moat.ko` and `moat-vmm` under Linux on two CPUs running `commands`: the
/// guest's greeting and what it `heard` on the VMM's standard input come
/// back through the emulated PL011, and the VMM's exit status (the
/// commands') is 0.
fn linux_protected_vm(
    name: &'static str,
    gic: &str,
    commands: &'static str,
    heard: &'static str,
) -> Case {
    Case {
        pass: vec![
            linux::MARKER_COMMANDS,
            "Hello from a Moat protected VM",
            heard,
            "moat-linux: exit status 0",
            "asked for SYSTEM_OFF",
        ],
        fail: [linux::FAIL_PATTERNS, VMM_FAIL_PATTERNS].concat(),
        check: Some(Box::new(move |console: &str| {
            let out = linux::command_output(console);
            if out.iter().any(|l| l == heard) {
                Ok(())
            } else {
                Err(format!("no line {heard:?} in {out:?}"))
            }
        })),
        ..linux_case(name, 2, gic, commands)
    }
}

/// Loads the module, runs a first VM to warm up what a VMM's first run
/// allocates for good (slabs, the module's own data), and defines
/// `free_pages`: the zones' free pages plus the pages waiting on the per-CPU
/// free lists (`/proc/zoneinfo`), after dropping the clean caches. MemFree
/// alone leaves the per-CPU lists out, which hold up to a few MiB of freed
/// blocks, order 9 among them.
macro_rules! vm_prelude {
    () => {
        "\
insmod /moat.ko || exit 1
echo warm-up | moat-vmm run /guest.bin > /dev/null || exit 2
free_pages() {
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
}
"
    };
}

/// Free pages around a VM with 16 MiB of memory: read, VM run to its end,
/// read again; then the core's consistency check.
const VM_MEMFREE_COMMANDS: &str = concat!(
    vm_prelude!(),
    "\
before=$(free_pages)
echo 'memory check' | moat-vmm run --mem 16M /guest.bin || exit 2
after=$(free_pages)
echo \"free pages before $before after $after\"
moat-vmm check"
);

/// A VMM killed with SIGKILL while its VM runs (the guest waits for a line
/// that never comes: the shell holds the VMM's input open); the module
/// refuses to unload before, and unloads after: the module's release destroys the VM and reclaims its
/// 16 MiB, and the core's tables still agree.
const VM_KILL_COMMANDS: &str = concat!(
    vm_prelude!(),
    "\
before=$(free_pages)
mkfifo /tmp/in
moat-vmm run --mem 16M /guest.bin < /tmp/in > /tmp/out &
vmm=$!
exec 3> /tmp/in
n=0
until grep -q 'type a line' /tmp/out; do n=$((n + 1)); [ $n -lt 600 ] || exit 3; sleep 0.1; done
cat /tmp/out; echo
if rmmod moat; then echo 'unloaded under a live VM'; else echo 'rmmod refused while the VM lives'; fi
kill -9 $vmm
wait $vmm
echo \"killed: status $?\"
after=$(free_pages)
echo \"free pages before $before after $after\"
moat-vmm check || exit 4
rmmod moat && echo 'module unloaded after the VM'"
);

/// Two VMs alive at once, one per CPU: each VMM's input ends only after
/// both have greeted.
const VM_PAIR_COMMANDS: &str = concat!(
    vm_prelude!(),
    "\
before=$(free_pages)
mkfifo /tmp/in1 /tmp/in2
taskset 1 moat-vmm run --mem 8M /guest.bin < /tmp/in1 > /tmp/out1 & a=$!
taskset 2 moat-vmm run --mem 8M /guest.bin < /tmp/in2 > /tmp/out2 & b=$!
exec 3> /tmp/in1 4> /tmp/in2
n=0
until grep -q 'type a line' /tmp/out1 && grep -q 'type a line' /tmp/out2; do
    n=$((n + 1)); [ $n -lt 600 ] || exit 3; sleep 0.1
done
echo 'both VMs alive'
echo one >&3; echo two >&4; exec 3>&- 4>&-
wait $a || exit 4
wait $b || exit 5
while read -r l; do echo \"first: $l\"; done < /tmp/out1
while read -r l; do echo \"second: $l\"; done < /tmp/out2
after=$(free_pages)
echo \"free pages before $before after $after\"
moat-vmm check"
);

/// The memory ledger restarted from Linux (`moat-vmm restart-ledger`): with
/// no VM, with a VM alive and holding its memory (the rebuild replays it),
/// and ten times while VMs are created, run and destroyed on the other CPU
/// (their memory calls meet a ledger that is down and are retried by the
/// module). Every VM must run to its end, its memory must come back and
/// the checker must agree at the end.
const VM_RESTART_COMMANDS: &str = concat!(
    vm_prelude!(),
    "\
restart() {
    moat-vmm restart-ledger
    s=$?
    [ $s -eq 0 ] || [ $s -eq 75 ] || echo \"restart case: FAILED: restart-ledger status $s\"
}
before=$(free_pages)
restart
mkfifo /tmp/in1
taskset 2 moat-vmm run --mem 8M /guest.bin < /tmp/in1 > /tmp/out1 & a=$!
exec 3> /tmp/in1
n=0
until grep -q 'type a line' /tmp/out1; do
    n=$((n + 1)); [ $n -lt 600 ] || exit 3; sleep 0.1
done
restart
echo 'after the restart' >&3; exec 3>&-
wait $a || echo \"restart case: FAILED: the VM alive across the restart\"
while read -r l; do echo \"alive: $l\"; done < /tmp/out1
(
    i=0
    while [ $i -lt 20 ]; do
        echo $i | taskset 2 moat-vmm run /guest.bin > /dev/null || echo \"restart case: FAILED: VM $i\"
        i=$((i + 1))
    done
    echo \"restart case: $i lives done\"
) & lives=$!
r=0
while [ $r -lt 10 ]; do
    restart > /dev/null
    r=$((r + 1))
    sleep 0.3
done
wait $lives
restart
after=$(free_pages)
echo \"free pages before $before after $after\"
moat-vmm check"
);

/// The test build of the module maps a page donated to a VM into a
/// process, as a rogue module could; the process's read must abort (SIGBUS,
/// status 135), and the VM still goes away cleanly with its process.
const VM_ROGUE_MAP_COMMANDS: &str = "\
insmod /moat-test.ko || exit 1
moat-vmm read-donated
echo \"rogue read: status $?\"
moat-vmm check";

/// Debian's kernel (the host's own) as a protected VM: it boots to its
/// busybox `/init`, runs the commands and powers off; the timer ticked
/// through the virtual GIC (a non-zero count for INTID 27 in the guest's
/// /proc/interrupts). Created without MTE, it sees none (no `mte` in any
/// CPU's features).
const LINUX_GUEST_COMMANDS: &str = "insmod /moat.ko && moat-vmm run --kernel /guest/Image \
     --initrd /guest/initrd --cpus 2 --cmd \"nproc; uname -r; cat /proc/interrupts | head; \
     echo mte-cpus=\\$(grep -c mte /proc/cpuinfo)\" && moat-vmm check";

/// A Linux guest with MTE (granted by the MTE policy: the hardware has it)
/// lists `mte` once per vCPU; its read through /dev/mem of an address where
/// moat-vmm has no device takes an external abort: SIGBUS (status 135)
/// rather than a 0 read.
const LINUX_GUEST_MTE_ABORT_COMMANDS: &str = "insmod /moat.ko && moat-vmm run --kernel \
     /guest/Image --initrd /guest/initrd --cpus 2 --mte --cmd 'echo mte-cpus=$(grep -c mte \
     /proc/cpuinfo); devmem 0x0a000000 32; echo devmem-status=$?' && moat-vmm check";

/// A Linux guest mid-boot whose VMM is killed: everything comes back.
const LINUX_GUEST_KILL_COMMANDS: &str = concat!(
    vm_prelude!(),
    "\
before=$(free_pages)
moat-vmm run --kernel /guest/Image --initrd /guest/initrd --append console=ttyAMA0 \
    --cmd 'echo not reached' > /tmp/out 2>&1 &
vmm=$!
n=0
until grep -q 'Memory:' /tmp/out; do n=$((n + 1)); [ $n -lt 3000 ] || exit 3; sleep 0.1; done
echo 'the Linux guest is booting'
kill -9 $vmm
wait $vmm
echo \"killed: status $?\"
grep -q 'moat-guest: init started' /tmp/out && echo 'the guest had finished booting'
after=$(free_pages)
echo \"free pages before $before after $after\"
moat-vmm check || exit 4
rmmod moat && echo 'module unloaded after the VM'"
);

/// A booted Linux guest whose VMM maps one of its pages (through the
/// module's test build) and reads it.
const LINUX_GUEST_ROGUE_MAP_COMMANDS: &str = "\
insmod /moat-test.ko || exit 1
moat-vmm run --kernel /guest/Image --initrd /guest/initrd --read-own-memory-at-init
echo \"rogue read: status $?\"
moat-vmm check";

/// The guest's two vCPUs: `nproc` said 2, and its /proc/interrupts shows
/// timer interrupts (INTID 27) on both and IPIs between them.
fn check_guest_smp(console: &str) -> Result<(), String> {
    let lines: Vec<&str> = console.lines().map(str::trim_end).collect();
    let start = lines
        .iter()
        .position(|l| *l == linux_vm::GUEST_MARKER_COMMANDS)
        .ok_or("the guest never ran its commands")?;
    if lines.get(start + 1) != Some(&"2") {
        return Err(format!("nproc printed {:?}, not 2", lines.get(start + 1)));
    }
    let counts = |l: &str| -> Vec<u64> {
        l.split_whitespace()
            .skip(1)
            .take(2)
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    let timer = lines[start..]
        .iter()
        .find(|l| l.contains("GICv3  27 Level") && l.contains("arch_timer"))
        .map(|l| counts(l))
        .ok_or("no arch_timer line for INTID 27 in the guest's /proc/interrupts")?;
    let ipis: u64 = lines[start..]
        .iter()
        .filter(|l| l.trim_start().starts_with("IPI"))
        .map(|l| counts(l).iter().sum::<u64>())
        .sum();
    println!("    guest timer interrupts per vCPU: {timer:?}; IPIs: {ipis}");
    if timer.len() != 2 || timer.contains(&0) {
        return Err(format!(
            "timer interrupts per vCPU {timer:?}: not both ticking"
        ));
    }
    if ipis == 0 {
        return Err("no IPI between the guest's vCPUs".into());
    }
    Ok(())
}

/// The Linux guest's cases (GICv3 only: the virtual GIC needs it).
fn linux_guest_cases() -> Vec<Case> {
    const GUEST_FAIL: &[&str] = &[
        "moat-vmm: guest crashed",
        "moat-vmm: VM",
        "moat-vmm: opening",
        "moat-vmm: VCPU_RUN",
        "moat-vmm: building",
        "moat-vmm: reading",
    ];
    vec![
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                linux_vm::GUEST_MARKER_INIT,
                linux_vm::GUEST_MARKER_COMMANDS,
                "6.1.0-",
                "arch_timer",
                "mte-cpus=0",
                "moat-guest: exit status 0",
                "moat-vmm: the ledger and the host's stage-2 agree",
                "moat-linux: exit status 0",
            ],
            fail: [
                linux::FAIL_PATTERNS,
                GUEST_FAIL,
                &["moat-guest: exit status 1"],
            ]
            .concat(),
            check: Some(Box::new(check_guest_smp)),
            timeout: 900,
            ..linux_case(
                "linux_guest_debian_kernel_boots_as_protected_vm_on_two_vcpus",
                2,
                "v3",
                LINUX_GUEST_COMMANDS,
            )
        },
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                linux_vm::GUEST_MARKER_COMMANDS,
                "mte-cpus=2",
                "moat-vmm: read of 4 bytes at 0xa000000: no device there, external abort",
                "devmem-status=135",
                "moat-guest: exit status 0",
                "moat-vmm: the ledger and the host's stage-2 agree",
                "moat-linux: exit status 0",
            ],
            fail: [
                linux::FAIL_PATTERNS,
                GUEST_FAIL,
                &[
                    "moat-guest: exit status 1",
                    "mte-cpus=0",
                    "mte-cpus=1",
                    "devmem-status=0",
                ],
            ]
            .concat(),
            timeout: 900,
            ..linux_case(
                "linux_guest_with_mte_and_an_abort_where_no_device_is",
                2,
                "v3",
                LINUX_GUEST_MTE_ABORT_COMMANDS,
            )
        },
        Case {
            timeout: 900,
            fail: [
                linux::FAIL_PATTERNS,
                GUEST_FAIL,
                &[
                    "unloaded under a live VM",
                    "the guest had finished booting",
                    "not reached",
                ],
            ]
            .concat(),
            ..linux_vm_memory_case(
                "linux_guest_killed_vmm_mid_boot_frees_everything",
                LINUX_GUEST_KILL_COMMANDS,
                &[
                    "the Linux guest is booting",
                    "killed: status 137",
                    "module unloaded after the VM",
                ],
                LOOSE_PAGES,
                "v3",
            )
        },
        Case {
            pass: vec![
                linux::MARKER_COMMANDS,
                linux_vm::GUEST_MARKER_INIT,
                "moat-vmm: reading the Linux guest's first page",
                "synchronous external abort injected",
                "rogue read: status 135",
                "moat-vmm: the ledger and the host's stage-2 agree",
                "moat-linux: exit status 0",
            ],
            fail: [
                linux::FAIL_PATTERNS,
                &GUEST_FAIL[..1],
                &["moat-vmm: read the Linux guest's page"],
            ]
            .concat(),
            timeout: 900,
            ..linux_case(
                "linux_guest_page_mapped_into_a_process_aborts",
                2,
                "v3",
                LINUX_GUEST_ROGUE_MAP_COMMANDS,
            )
        },
    ]
}

/// One hundred VMs created, run to their end and destroyed, one after
/// another, after twenty more that let the kernel's caches for processes
/// grow to their size: a page kept per VM would show as 100.
const VM_CYCLE_COMMANDS: &str = concat!(
    vm_prelude!(),
    "\
lives() {
    i=0
    while [ $i -lt $1 ]; do
        echo $i | moat-vmm run /guest.bin > /dev/null || exit 2
        i=$((i + 1))
    done
}
lives 20
before=$(free_pages)
lives 100
echo \"$i VMs ran\"
after=$(free_pages)
echo \"free pages before $before after $after\"
moat-vmm check"
);

/// The VMs' memory came back: the free pages after the VMs are within
/// `slack` pages of the count before them (a VM's 16 MiB is 4096 pages; a
/// page lost in each of a hundred VMs, 100).
fn check_memfree_restored(console: &str, slack: i64) -> Result<(), String> {
    let out = linux::command_output(console);
    let line = out
        .iter()
        .find_map(|l| l.strip_prefix("free pages before "))
        .ok_or_else(|| format!("no free-pages line in {out:?}"))?;
    let nums: Vec<i64> = line
        .split(" after ")
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    let [before, after] = nums[..] else {
        return Err(format!("malformed free-pages line {line:?}"));
    };
    let lost = before - after;
    println!("    free pages before the VMs {before}, after {after} ({lost} fewer)");
    if lost.abs() <= slack {
        Ok(())
    } else {
        Err(format!("{lost} fewer free pages after the VMs than before"))
    }
}

/// The image whose ledger crashes: `services/crashing-ledger` in the ledger's place.
const CRASHING_LEDGER_MANIFEST: &str = "images/crashing-ledger.toml";

/// The image whose ledger lies: `services/rogue-ledger` in the ledger's place.
const ROGUE_LEDGER_MANIFEST: &str = "images/rogue-ledger.toml";

const ROGUE_LEDGER_PASS: &[&str] = &[
    "service rogue-ledger ready",
    "test-host: ok   rogue ledger: VM_CREATE = 0",
    "test-host: ok   rogue ledger: donating 1 page(s), answered with the host keeps its mapping: Denied",
    "test-host: ok   rogue ledger: donating 2 page(s), answered with no scrub: Denied",
    "test-host: ok   rogue ledger: donating 3 page(s), answered with one page past the request: Denied",
    "test-host: ok   rogue ledger: donating 4 page(s), answered with the hypervisor's pages instead: Denied",
    "test-host: ok   rogue ledger: donating 5 page(s), answered with the answer to a donation to another VM: Denied",
    "test-host: ok   rogue ledger: donating 6 page(s), answered with mapped for the host instead: Denied",
    "test-host: ok   rogue ledger: donating 7 page(s), answered with mapped for another VM: Denied",
    "test-host: ok   rogue ledger: donating 9 page(s), answered with a write-only mapping: Denied",
    "test-host: ok   rogue ledger: donating 10 page(s), answered with the map before the unmap: Denied",
    "test-host: ok   rogue ledger: donating 11 page(s), answered with the host's mapping removed from one page only: Denied",
    "test-host: ok   rogue ledger: sharing 1 page with the hypervisor, answered with an executable mapping: Denied",
    "test-host: ok   rogue ledger: the host's 12 pages at",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after a lying ledger's donation was refused (0)",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after a lying ledger's share was refused (0)",
    "test-host: ok   rogue ledger: sharing 2 pages with the hypervisor, the ledger's commit refused: Denied",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after a lying ledger refused its own commit (0)",
    "test-host: ok   rogue ledger: donations the ledger accepts though they are not the host's RAM to give",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after a lying ledger's forged donations were refused (0)",
    "test-host: ok   rogue ledger: an honest donation of 8 pages at",
    "test-host: ok   rogue ledger: host read of a page it donated: synchronous external abort",
    "test-host: ok   rogue ledger: VM_LOAD into a second VM from a frame the first VM owns, which the ledger calls the host's: Denied",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after a lying ledger's VM_LOAD source was refused (0)",
    "test-host: ok   rogue ledger: the second VM destroyed (0) and its pages reclaimed (0), zeroed (0 non-zero words, 0 aborts)",
    "test-host: ok   rogue ledger: donating 12 pages of which the VM owns 8, approved by the ledger: Denied",
    "test-host: ok   rogue ledger: VM_DESTROY = 0, VM_RECLAIM of the 8 pages = 0",
    "test-host: ok   rogue ledger: the reclaimed pages read as zero (0 non-zero words, 0 aborts)",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after a reclaim through a lying ledger (0)",
    "test-host: ok   vm demo: guest powered off with PSCI SYSTEM_OFF",
    "test-host: ok   vm demo: the reclaimed pages read as zero",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after the demo, with a lying ledger (0)",
];

/// The core's refusals of the rogue ledger's transactions, in order: the
/// request's operation and page count, and the rule its answer broke.
const ROGUE_REFUSALS: &[(u32, u64, &str)] = &[
    (3, 1, "a transaction of a shape its request does not allow"),
    (3, 2, "frames change owner without being scrubbed"),
    (3, 3, "a change outside the requested frames"),
    (3, 4, "a change outside the requested frames"),
    (3, 5, "the transaction answers another request"),
    (3, 6, "a transaction of a shape its request does not allow"),
    (3, 7, "a change for a party the request does not name"),
    (3, 9, "a mapping with permissions the core does not give"),
    (3, 10, "an unmap after a map"),
    (3, 11, "a change of only part of the requested frames"),
    (1, 1, "a transaction of a shape its request does not allow"),
    (3, 1, "a change of the hypervisor's own memory"),
    (3, 2, "a change of frames that are not RAM"),
    (3, 12, "the host does not own those frames"),
];

/// The core logged exactly the refusals [`ROGUE_REFUSALS`] lists, in order,
/// and no other.
fn check_rogue_refusals(console: &str) -> Result<(), String> {
    const REFUSAL: &str = "memory: the ledger's transaction for ";
    let got: Vec<&str> = console.lines().filter(|l| l.contains(REFUSAL)).collect();
    if got.len() != ROGUE_REFUSALS.len() {
        return Err(format!(
            "{} refusals logged, expected {}: {got:#?}",
            got.len(),
            ROGUE_REFUSALS.len()
        ));
    }
    for (line, (op, count, why)) in got.iter().zip(ROGUE_REFUSALS) {
        let request = format!("{REFUSAL}LedgerRequest {{ op: {op}, party: ");
        let tail = format!(", count: {count} }} }} refused: {why}");
        if !line.contains(&request) || !line.ends_with(&tail) {
            return Err(format!(
                "refusal {line:?}, expected op {op}, {count} page(s), refused: {why}"
            ));
        }
    }
    Ok(())
}

/// Linux under Moat running `commands`, which must end with status 0.
fn linux_case(name: &'static str, smp: u32, gic: &str, commands: &'static str) -> Case {
    Case {
        name,
        host: Payload::Linux { commands },
        bootargs: None,
        tree: Tree::Firmware,
        machine: machine(smp, gic),
        pass: vec![
            linux::MARKER_COMMANDS,
            "moat-linux: exit status 0",
            "asked for SYSTEM_OFF",
        ],
        fail: linux::FAIL_PATTERNS.to_vec(),
        exit_code: Some(0),
        on_reset: OnReset::Exit,
        check: None,
        timeout: 180,
        kernel: Kernel::Default,
        bare_reference: None,
    }
}

/// The newer kernel the fidelity cases boot besides bookworm's 6.1: the
/// newest 6.12 Debian builds for bookworm (bookworm-backports and the
/// bookworm updates), fetched into its own cache folder.
const NEWER_KERNEL: &str = "linux-image-6.12.*+deb12-arm64-unsigned";

/// What the fidelity cases run: the feature probe, 16 bytes from the
/// virtio-rng on PCIe (its driver a module on 6.1, its BAR in the PCIe
/// host bridge's 64-bit window), and the interrupts the GICv3 ITS
/// delivers (the virtio-rng's MSI-X vectors, through the ITS the core
/// emulates).
const FIDELITY_COMMANDS: &str =
    "moat-probe; head -c 16 /dev/hwrng | od -x; grep ITS /proc/interrupts";

/// Linux (`kernel`) under Moat on 2 CPUs with GICv3 and a virtio-rng on
/// PCIe: the feature probe finds every advertised feature working, the
/// entropy source gives bytes, and the probe's report is the one the same
/// kernel gives on bare QEMU — without MTE there when the host's MTE
/// policy is off (`append` holds `moat.host_mte=off`).
fn host_fidelity(name: &'static str, kernel: Kernel, append: Option<&'static str>) -> Case {
    let without_mte = append.is_some_and(|a| a.contains("moat.host_mte=off"));
    Case {
        bootargs: append,
        kernel,
        bare_reference: Some(BareReference { without_mte }),
        check: Some(Box::new(move |console| {
            check_probe_and_hwrng(console, without_mte)
        })),
        timeout: 300,
        pass: vec![
            linux::MARKER_COMMANDS,
            "probe: faults in advertised features: 0",
            // `grep ITS /proc/interrupts`: the chip name of an ITS vector.
            " ITS-",
            "moat-linux: exit status 0",
            "asked for SYSTEM_OFF",
        ],
        fail: [
            linux::FAIL_PATTERNS,
            &["faulted\r", "denied", "probe: cannot"],
        ]
        .concat(),
        ..linux_case(name, 2, "v3", FIDELITY_COMMANDS)
    }
}

/// The probe's lines, in order.
fn probe_report(console: &str) -> Vec<String> {
    linux::command_output(console)
        .into_iter()
        .filter(|l| l.starts_with("probe: "))
        .collect()
}

/// The probe ran, found nothing advertised but broken, and MTE is
/// advertised exactly when it should be; `od` printed 16 bytes.
fn check_probe_and_hwrng(console: &str, without_mte: bool) -> Result<(), String> {
    let report = probe_report(console);
    if report.len() < 3 {
        return Err(format!("no probe report: {report:?}"));
    }
    if let Some(bad) = report.iter().find(|l| l.ends_with(" faulted")) {
        return Err(format!("an advertised feature does not work: {bad}"));
    }
    let mte = if without_mte {
        "probe: mte missing"
    } else {
        "probe: mte ok"
    };
    if !report.iter().any(|l| l == mte) {
        return Err(format!("expected {mte:?} in {report:?}"));
    }
    // od -x: "0000000 bc16 ab47 da5b 26e5 bbbf fa25 c922 373e", then "0000020".
    let out = linux::command_output(console);
    let bytes = out.iter().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.len() == 9
            && words[0] == "0000000"
            && words[1..]
                .iter()
                .all(|w| w.len() == 4 && w.chars().all(|c| c.is_ascii_hexdigit()))
    });
    if !bytes || !out.iter().any(|l| l == "0000020") {
        return Err(format!("no 16 bytes from /dev/hwrng: {out:?}"));
    }
    // "  13:   1   0   ITS-MSI 16384 Edge      virtio0-config": an MSI the
    // ITS translated, counted at least once on some CPU.
    let delivered = out.iter().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.iter().any(|w| w.starts_with("ITS-"))
            && words
                .iter()
                .skip(1)
                .take_while(|w| w.chars().all(|c| c.is_ascii_digit()))
                .any(|w| *w != "0")
    });
    if !delivered {
        return Err(format!("no interrupt delivered through the ITS: {out:?}"));
    }
    Ok(())
}

/// Boots `kernel` with `initrd` on bare QEMU (no EL2, so no hypervisor)
/// and returns the feature probe's report.
fn bare_probe_report(
    case: &Case,
    reference: BareReference,
    kernel: &std::path::Path,
    initrd: &std::path::Path,
) -> Result<Vec<String>, String> {
    let mut m = case.machine.clone();
    m.no_mte = reference.without_mte;
    let cmd = qemu::linux_direct_command(kernel, initrd, &linux::bootargs(case.bootargs), &m);
    let fail = [linux::FAIL_PATTERNS, ALWAYS_FAIL].concat();
    let harness = Harness {
        pass: &[linux::MARKER_STATUS],
        fail: &fail,
        timeout: Duration::from_secs(case.timeout),
        after_pass: AfterPass::WaitForExit,
        echo: false,
    };
    let out = qemu::run_harnessed(cmd, &harness).map_err(|e| format!("bare QEMU: {e:#}"))?;
    let log = tools::target_dir()
        .join("test-logs")
        .join(format!("{}.bare.log", case.name));
    let _ = std::fs::write(log, &out.console);
    match out.verdict {
        Verdict::Passed => Ok(probe_report(&out.console)),
        other => Err(format!(
            "the bare-QEMU reference boot did not finish: {other:?}"
        )),
    }
}

/// The protected-VM demo, start to finish.
const VM_DEMO_PASS: &[&str] = &[
    "test-host: ok   vm demo: VM_CREATE(entry 0x40000000, flags 0x0) = 0",
    "test-host: ok   vm demo: VM_DONATE of 16 pages at",
    "test-host: ok   vm demo: guest image",
    "test-host: vm: guest said hello",
    "test-host: ok   vm demo: guest said hello with the value it computed in its memory",
    "test-host: ok   vm demo: guest shared its page at IPA",
    "test-host: vm: message through shared page: \"greetings from the protected VM, number ",
    "test-host: ok   vm demo: host read the guest's message at PA",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after the guest shared a page with the host (0)",
    "test-host: ok   vm demo: guest read the host's reply in the shared page",
    "test-host: ok   vm demo: guest ended its share (GUEST_UNSHARE_HOST = 0)",
    "test-host: ok   vm demo: guest read of IPA 0xa000008 with no device: MMIO exit",
    "test-host: ok   vm demo: an MMIO answer with an unknown bit is refused (InvalidParameters",
    "test-host: ok   vm demo: the host's abort answer reached the guest's handler as a synchronous external abort on the load (exceptions 1, ESR_EL1 0x96000010, FAR_EL1 0xa000008, ELR_EL1 0x0 past the load, register 0x5eed0bad;",
    "test-host: ok   vm demo: guest WFI: Wfi exit, running it again",
    "test-host: ok   vm demo: guest powered off with PSCI SYSTEM_OFF: Shutdown exit (x2 = 0)",
    "test-host: ok   vm demo: VM_DESTROY = 0",
    "test-host: ok   vm demo: VM_RECLAIM of 16 pages at",
    "test-host: ok   vm demo: the reclaimed pages read as zero",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after the demo (0)",
];

/// A VM created without MTE, on a CPU with MTE: it sees none, whatever the
/// host's MTE policy.
const VM_MTE_OFF_PASS: &[&str] = &[
    "test-host: ok   vm mte off: VM_CREATE(entry 0x40000000, flags 0x0) = 0",
    "test-host: ok   vm mte off: the guest's ID registers report no MTE: ID_AA64PFR1_EL1.MTE = 0, MTE_frac = 0, MTEX = 0; ID_AA64PFR2_EL1 MTE fields 0x0",
    "test-host: ok   vm mte off: no SME in the guest: ID_AA64PFR1_EL1.SME = 0, ID_AA64SMFR0_EL1 = 0x0",
    "test-host: ok   vm mte off: no SVE in the guest: ID_AA64PFR0_EL1.SVE = 0",
    "test-host: ok   vm mte off: no MPAM or AMU in the guest: ID_AA64PFR0_EL1.MPAM = 0, AMU = 0",
    "test-host: ok   vm mte off: no pointer authentication in the guest: ID_AA64ISAR1_EL1 APA 0 API 0 GPA 0 GPI 0",
    "test-host: ok   vm mte off: no PMU or SPE in the guest: ID_AA64DFR0_EL1.PMUVer = 0, PMSVer = 0",
    "test-host: ok   vm mte off: the guest's other features are the host's",
    "test-host: ok   vm mte off: mrs gcr_el1 in the guest: Undefined Instruction at VBAR_EL1 + 0x200 (1 exception(s), ESR_EL1 0x2000000,",
    "test-host: ok   vm mte off: msr gcr_el1 in the guest: Undefined Instruction at VBAR_EL1 + 0x200 (1 exception(s), ESR_EL1 0x2000000,",
    "test-host: ok   vm mte off: mrs rgsr_el1 in the guest: Undefined Instruction at VBAR_EL1 + 0x200 (1 exception(s), ESR_EL1 0x2000000,",
    "test-host: ok   vm mte off: msr rgsr_el1 in the guest: Undefined Instruction at VBAR_EL1 + 0x200 (1 exception(s), ESR_EL1 0x2000000,",
    "test-host: ok   vm mte off: mrs tfsr_el1 in the guest: Undefined Instruction at VBAR_EL1 + 0x200 (1 exception(s), ESR_EL1 0x2000000,",
    "test-host: ok   vm mte off: msr tfsr_el1 in the guest: Undefined Instruction at VBAR_EL1 + 0x200 (1 exception(s), ESR_EL1 0x2000000,",
    "test-host: ok   vm mte off: mrs tfsre0_el1 in the guest: Undefined Instruction at VBAR_EL1 + 0x200 (1 exception(s), ESR_EL1 0x2000000,",
    "test-host: ok   vm mte off: msr tfsre0_el1 in the guest: Undefined Instruction at VBAR_EL1 + 0x200 (1 exception(s), ESR_EL1 0x2000000,",
    "test-host: ok   vm mte off: mrs gmid_el1 in the guest: Undefined Instruction at VBAR_EL1 + 0x200 (1 exception(s), ESR_EL1 0x2000000,",
    "test-host: ok   vm mte off: the guest counted 9 exception(s) over its 9 MTE register accesses (expected 9)",
    "test-host: ok   vm mte off: mrs tpidr2_el0 in the guest: Undefined Instruction, the host's register is out of reach (1 exception(s), ESR_EL1 0x2000000,",
    "test-host: ok   vm mte off: STG of tag 11 then LDG on the guest's own memory, mapped Tagged with SCTLR_EL1.ATA set: tag reads 0 (0 exceptions;",
    "test-host: ok   vm mte off: the guest powered off (Shutdown exit, x2 = 0)",
    "test-host: ok   vm mte off: the reclaimed pages read as zero (0 non-zero words)",
    "test-host: ok   vm: the ledger and the host's stage-2 agree after the MTE-off VM's probes (0)",
];

/// What every MTE-off test-host run must show.
const MTE_OFF_PASS: &[&str] = &[
    "host MTE policy: off",
    "test-host: ok   ID_AA64PFR1_EL1 reports no MTE",
    "test-host: ok   ID_AA64PFR2_EL1 reports no MTE extensions",
    "test-host: ok   mrs gcr_el1: Undefined Instruction",
    "test-host: ok   msr gcr_el1: Undefined Instruction",
    "test-host: ok   mrs rgsr_el1: Undefined Instruction",
    "test-host: ok   msr rgsr_el1: Undefined Instruction",
    "test-host: ok   mrs tfsr_el1: Undefined Instruction",
    "test-host: ok   msr tfsr_el1: Undefined Instruction",
    "test-host: ok   mrs tfsre0_el1: Undefined Instruction",
    "test-host: ok   msr tfsre0_el1: Undefined Instruction",
    "test-host: ok   mrs gmid_el1: Undefined Instruction",
    "test-host: ok   STG then LDG on our own memory: tag reads 0",
];

/// Linux on QEMU with MTE: `grep -c ' mte' /proc/cpuinfo` prints `expected`.
fn linux_mte(name: &'static str, append: Option<&'static str>, expected: &str) -> Case {
    let mut case = linux_case(name, 1, "v3", "grep -c ' mte' /proc/cpuinfo || true");
    case.bootargs = append;
    case.check = Some(expect_lines(vec![expected.to_string()]));
    case
}

/// What the disk case runs: read the disk's file, write one, read it back
/// from the disk (unmounted between, so nothing comes from the page
/// cache), and show that the disk's interrupts are MSI-X through the ITS.
const DISK_COMMANDS: &str = "mkdir -p /mnt && mount -t vfat /dev/vda /mnt && cat /mnt/hello.txt \
    && echo written-through-the-smmu > /mnt/new.txt && umount /mnt \
    && mount -t vfat /dev/vda /mnt && cat /mnt/new.txt && umount /mnt \
    && grep ITS-MSI /proc/interrupts | grep -q virtio && echo virtio-msix-through-the-its";

/// Linux on 2 CPUs with a virtio-blk disk and a virtio-rng behind the SMMU
/// the core owns: the disk works (its DMA through the host's stage-2), its
/// interrupts are MSI-X through the ITS, and the SMMU records no fault.
fn linux_disk_behind_the_smmu() -> Case {
    let mut case = linux_case("linux_disk_behind_the_smmu", 2, "v3", DISK_COMMANDS);
    case.machine = MachineArgs {
        disk: Some(tools::target_dir().join("test-disk.img")),
        ..machine_with_smmu(2, "v3")
    };
    case.pass.extend_from_slice(&[
        "smmu: SMMUv3 at 0x9050000 owned by the core",
        "DMA behind the SMMU the core owns: given to the host",
    ]);
    case.fail.push("smmu: fault");
    case.check = Some(expect_lines(vec![
        crate::disk::FILE_TEXT.trim_end().to_string(),
        "written-through-the-smmu".into(),
        "virtio-msix-through-the-its".into(),
    ]));
    case
}

/// Linux boots on `smp` CPUs and sees all of them.
fn linux_boot(name: &'static str, smp: u32, gic: &str, extra_pass: &[&'static str]) -> Case {
    let mut case = linux_case(
        name,
        smp,
        gic,
        "nproc; uname -m; grep -c processor /proc/cpuinfo",
    );
    case.pass.extend_from_slice(extra_pass);
    let n = smp.to_string();
    case.check = Some(expect_lines(vec![n.clone(), "aarch64".into(), n]));
    case
}

/// The commands print exactly `expected`.
fn expect_lines(expected: Vec<String>) -> Check {
    Box::new(move |console| {
        let got = linux::command_output(console);
        if got == expected {
            Ok(())
        } else {
            Err(format!(
                "the commands printed {got:?}, expected {expected:?}"
            ))
        }
    })
}

/// `sleep 1` took 0.9 to 1.5 seconds of the guest's own clock.
fn check_sleep_one_second(console: &str) -> Result<(), String> {
    let out = linux::command_output(console);
    // "12.34 10.56": seconds since boot, then seconds idle.
    let times: Vec<f64> = out
        .iter()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let [before, after] = times[..] else {
        return Err(format!("expected two timestamps, got {out:?}"));
    };
    let elapsed = after - before;
    if (0.9..=1.5).contains(&elapsed) {
        println!("    sleep 1 took {elapsed:.3} s in the guest");
        Ok(())
    } else {
        Err(format!("sleep 1 took {elapsed:.3} s in the guest"))
    }
}

/// Finds the carve-out the way a host program could (the core names its
/// `/reserved-memory` node `moat@<base>`), shows the memory map, and reads the
/// carve-out's first word through /dev/mem twice: with `devmem`, which maps it
/// and takes the core's synchronous external abort (SIGBUS, status 135), and
/// with `dd`, whose read() the kernel itself refuses for memory outside its
/// linear map. Then one more command must still run.
const HIDDEN_HYPERVISOR_COMMANDS: &str = "\
node=$(ls /proc/device-tree/reserved-memory | grep -m 1 '^moat@')
base=${node#moat@}
echo \"carve-out node: $node\"
cat /proc/iomem
devmem 0x$base 32
echo \"devmem status: $?\"
dd if=/dev/mem of=/dev/null bs=4096 skip=$((0x$base / 4096)) count=1
echo \"dd status: $?\"
echo still running";

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// The guest found the carve-out the core logged; /proc/iomem lists it as
/// `reserved` and no System RAM overlaps it; both reads failed.
fn check_hypervisor_hidden(console: &str) -> Result<(), String> {
    // "moat: carve-out 0x7e000000..0x80000000 (32 MiB: ...)"
    let (start, end) = console
        .lines()
        .find_map(|l| {
            l.strip_prefix("moat: carve-out ")?
                .split_once(' ')?
                .0
                .split_once("..")
        })
        .and_then(|(a, b)| Some((hex(a)?, hex(b)?)))
        .ok_or("the core logged no carve-out")?;
    let out = linux::command_output(console);
    let node = out
        .iter()
        .find_map(|l| l.strip_prefix("carve-out node: "))
        .ok_or("no carve-out node found")?;
    let base = node
        .strip_prefix("moat@")
        .and_then(hex)
        .ok_or(format!("odd node name {node:?}"))?;
    if base != start {
        return Err(format!(
            "the guest's moat@ node says {base:#x}, the core's carve-out starts at {start:#x}"
        ));
    }
    // Top-level /proc/iomem lines: "40000000-7dffffff : System RAM".
    let resources: Vec<(u64, u64, &str)> = out
        .iter()
        .filter(|l| !l.starts_with(' '))
        .filter_map(|l| {
            let (range, name) = l.split_once(" : ")?;
            let (a, b) = range.split_once('-')?;
            Some((hex(a)?, hex(b)?, name.trim()))
        })
        .collect();
    if !resources.contains(&(start, end - 1, "reserved")) {
        return Err(format!(
            "/proc/iomem has no \"reserved\" {start:x}-{:x}: {resources:x?}",
            end - 1
        ));
    }
    if let Some(r) = resources
        .iter()
        .find(|(a, b, n)| *n == "System RAM" && *a < end && *b >= start)
    {
        return Err(format!(
            "System RAM {:x}-{:x} overlaps the carve-out",
            r.0, r.1
        ));
    }
    for (what, want) in [("devmem status: ", Some(135)), ("dd status: ", None)] {
        let status: i32 = out
            .iter()
            .find_map(|l| l.strip_prefix(what)?.parse().ok())
            .ok_or(format!("no \"{what}\" line"))?;
        match want {
            Some(w) if status != w => return Err(format!("{what}{status}, expected {w} (SIGBUS)")),
            None if status == 0 => return Err(format!("{what}0: reading the carve-out succeeded")),
            _ => {}
        }
    }
    Ok(())
}

/// Builds the payload in `images/external-payload`, a cargo project of its
/// own outside the workspace, to a raw binary.
pub fn build_external_payload() -> Result<PathBuf> {
    let elf = tools::build_outside_workspace("external-payload", image::PAYLOAD_TARGET)?;
    let bin = tools::target_dir().join("images/external-payload.bin");
    image::objcopy(&elf, &bin)?;
    Ok(bin)
}

/// The service sets the integration images carry.
struct Services {
    /// images/demo.toml: with the test host.
    demo: image::ServiceSet,
    /// images/linux.toml: with Linux.
    linux: image::ServiceSet,
    /// The other manifests the selected cases name, built.
    others: Vec<(&'static str, image::ServiceSet)>,
}

/// The image a case boots, and for Linux the initramfs in it.
fn image_for(
    case: &Case,
    built: &Built,
    core: &std::path::Path,
    external: &Option<PathBuf>,
    assets: &HashMap<Kernel, Assets>,
    vm_pieces: Option<&linux_vm::Pieces>,
    services: &Services,
) -> Result<(PathBuf, Option<PathBuf>)> {
    let mut initramfs = None;
    // A case's disk starts as a fresh image every run (the case writes to it).
    if let Some(d) = &case.machine.disk {
        crate::disk::make(d)?;
    }
    let spec = match case.host {
        Payload::Linux { commands } => {
            let assets = assets
                .get(&case.kernel)
                .context("Linux assets not fetched")?;
            // The module is built for the default kernel only.
            let vm = vm_pieces.filter(|_| case.kernel == Kernel::Default);
            let initrd =
                linux::write_initramfs(assets, vm, Some(commands), &format!("test-{}", case.name))?;
            initramfs = Some(initrd.clone());
            let append = boards::linux_append(case.machine.board, case.bootargs);
            linux::image_spec(assets, &initrd, append.as_deref(), &services.linux)
        }
        Payload::TestHost | Payload::TestHostWith { .. } | Payload::External => ImageSpec {
            host: match case.host {
                Payload::External => external.clone().context("external payload not built")?,
                _ => built.test_host.clone(),
            },
            initrd: None,
            bootargs: case.bootargs.map(str::to_string),
            dtb: None,
            semihosting_exit: true,
            // The test host runs with the demo image's services, or with
            // those of the manifest its case names; the external payload, as
            // any foreign host, with none.
            services: match case.host {
                Payload::TestHost => Some(services.demo.clone()),
                Payload::TestHostWith { manifest } => Some(
                    services
                        .others
                        .iter()
                        .find(|(m, _)| *m == manifest)
                        .context("services not built")?
                        .1
                        .clone(),
                ),
                _ => None,
            },
            ..Default::default()
        },
    };
    let dtb = match &case.tree {
        Tree::Firmware => None,
        Tree::Synthetic(parts) => Some(synthetic_dt::virt_tree(parts)?),
        Tree::Truncated => Some(
            synthetic_dt::virt_tree(&Parts {
                memory: true,
                uart: true,
                gic: true,
            })?[..96]
                .to_vec(),
        ),
    };
    let image = image::pack_with_dtb_bytes(core, &spec, dtb, &format!("test-{}", case.name))?;
    Ok((image, initramfs))
}

/// Runs the integration tests; returns (passed, failed names).
fn integration(filter: Option<&str>, models: &[cpu_models::Model]) -> Result<(u32, Vec<String>)> {
    tools::ensure_qemu()?;
    let built = image::build_all()?;
    let external = Some(build_external_payload()?);
    let logs = tools::target_dir().join("test-logs");
    std::fs::create_dir_all(&logs)?;
    let selected: Vec<Case> = cases(models)
        .into_iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f)))
        .collect();
    let mut assets: HashMap<Kernel, Assets> = HashMap::new();
    for case in &selected {
        if matches!(case.host, Payload::Linux { .. }) && !assets.contains_key(&case.kernel) {
            let a = kernels::assets(&case.kernel)?;
            println!(
                "xtask: Linux cases boot Debian {} with {}",
                a.kernel_package, a.busybox_package
            );
            assets.insert(case.kernel.clone(), a);
        }
    }
    let vm_pieces = match assets.get(&Kernel::Default) {
        Some(default) => Some(linux_vm::build(default, &built, true)?),
        None => None,
    };
    let mut services = Services {
        demo: image::services_from(std::path::Path::new(crate::DEMO_MANIFEST))?.1,
        linux: linux::services()?,
        others: Vec::new(),
    };
    for case in &selected {
        if let Payload::TestHostWith { manifest } = case.host
            && !services.others.iter().any(|(m, _)| *m == manifest)
        {
            let set = image::services_from(std::path::Path::new(manifest))?.1;
            services.others.push((manifest, set));
        }
    }
    // The core linked for each board the selected cases boot on.
    let mut cores: HashMap<Board, PathBuf> = HashMap::new();
    cores.insert(Board::Virt, built.core.clone());
    for case in &selected {
        let board = case.machine.board;
        if let std::collections::hash_map::Entry::Vacant(slot) = cores.entry(board) {
            boards::prepare(board)?;
            slot.insert(image::build_for(board)?.core);
        }
    }
    let mut passed = 0;
    let mut failed = Vec::new();
    for case in selected {
        let (img, initramfs) = image_for(
            &case,
            &built,
            &cores[&case.machine.board],
            &external,
            &assets,
            vm_pieces.as_ref(),
            &services,
        )?;
        let cmd = qemu::command_on_reset(&img, &case.machine, &[], case.on_reset);
        let mut fail = case.fail.clone();
        fail.extend_from_slice(ALWAYS_FAIL);
        let harness = Harness {
            pass: &case.pass,
            fail: &fail,
            timeout: Duration::from_secs(case.timeout),
            after_pass: if case.exit_code.is_some() {
                AfterPass::WaitForExit
            } else {
                AfterPass::Stop
            },
            echo: false,
        };
        let out = qemu::run_harnessed(cmd, &harness)?;
        std::fs::write(logs.join(format!("{}.log", case.name)), &out.console)?;
        let problem = match (&out.verdict, out.exit_code) {
            (Verdict::Passed, _) if case.exit_code.is_none() => None,
            (Verdict::Passed, code) if code == case.exit_code => None,
            (Verdict::Passed, code) => Some(format!(
                "QEMU exit status {code:?}, expected {:?}",
                case.exit_code
            )),
            (Verdict::Failed(line), _) => Some(format!("fail pattern: {line}")),
            (Verdict::Exited(code), _) => Some(format!(
                "QEMU exited ({code:?}) before every pass pattern appeared; missing: {:?}",
                case.pass
                    .iter()
                    .filter(|p| !out.console.contains(*p))
                    .collect::<Vec<_>>()
            )),
            (Verdict::TimedOut, _) => Some(format!(
                "timed out after {} s; missing: {:?}",
                case.timeout,
                case.pass
                    .iter()
                    .filter(|p| !out.console.contains(*p))
                    .collect::<Vec<_>>()
            )),
        };
        let problem = problem.or_else(|| {
            case.check
                .as_ref()
                .and_then(|check| check(&out.console).err())
        });
        let problem = problem.or_else(|| {
            let reference = case.bare_reference?;
            let kernel = &assets.get(&case.kernel)?.kernel;
            let initrd = initramfs.as_deref()?;
            let under_moat = probe_report(&out.console);
            match bare_probe_report(&case, reference, kernel, initrd) {
                Err(e) => Some(e),
                Ok(bare) if bare == under_moat => None,
                Ok(bare) => Some(format!(
                    "the probe under Moat reported {under_moat:?}, on bare QEMU {bare:?}"
                )),
            }
        });
        match problem {
            None => {
                passed += 1;
                println!(
                    "test integration::{} ... ok ({:.1} s)",
                    case.name, out.seconds
                );
            }
            Some(why) => {
                println!("test integration::{} ... FAILED ({why})", case.name);
                println!(
                    "---- console ({}) ----",
                    logs.join(format!("{}.log", case.name)).display()
                );
                for line in out
                    .console
                    .lines()
                    .rev()
                    .take(25)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                {
                    println!("  | {line}");
                }
                failed.push(case.name.to_string());
            }
        }
    }
    Ok((passed, failed))
}

fn unit_tests_and_lints() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))
        .context("cargo fmt --check: run `cargo fmt --all`")?;
    run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "moat-test-host",
        "--all-features",
    ]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "moat-test-host",
        "--all-targets",
        "--all-features",
        "--",
        "-D",
        "warnings",
    ]))?;
    // What runs at EL2 and in service partitions, for its own target.
    run(cargo().args([
        "clippy",
        "--package",
        "moat-kernel",
        "--package",
        "moat-rt",
        "--package",
        "moat-service-trace",
        "--package",
        "moat-service-faulty",
        "--package",
        "moat-service-mte",
        "--package",
        "moat-ledger",
        "--package",
        "moat-service-rogue-ledger",
        "--package",
        "moat-service-crashing-ledger",
        "--target",
        image::CORE_TARGET,
        "--",
        "-D",
        "warnings",
    ]))?;
    run(cargo().args([
        "clippy",
        "--package",
        "moat-test-host",
        "--package",
        "moat-guest",
        "--package",
        "moat-el2-stub",
        "--target",
        image::PAYLOAD_TARGET,
        "--",
        "-D",
        "warnings",
    ]))?;
    // The feature probe, a project of its own for aarch64 Linux.
    let probe_dir = tools::root().join("images/probe");
    run(cargo()
        .current_dir(&probe_dir)
        .args(["fmt", "--", "--check"]))
    .context("cargo fmt --check in images/probe: run `cargo fmt` there")?;
    run(cargo()
        .current_dir(&probe_dir)
        .args([
            "clippy",
            "--release",
            "--target",
            crate::probe::TARGET,
            "--target-dir",
        ])
        .arg(tools::target_dir().join("probe"))
        .args(["--", "-D", "warnings"]))?;
    // The VMM, for the Linux target it runs on.
    run(cargo().args([
        "clippy",
        "--package",
        "moat-vmm",
        "--target",
        linux_vm::VMM_TARGET,
        "--",
        "-D",
        "warnings",
    ]))?;
    Ok(())
}

fn book() -> Result<()> {
    let mdbook = tools::ensure_mdbook()?;
    run(std::process::Command::new(mdbook)
        .arg("build")
        .arg(tools::root().join("book")))
}

pub fn run_all(filter: Option<&str>, integration_only: bool, cpus: Option<&str>) -> Result<()> {
    let models = cpu_models::select(cpus)?;
    if !integration_only && filter.is_none() {
        unit_tests_and_lints()?;
        crate::coverage::report(false)?;
        book()?;
        let fvp = crate::fvp::build_image()?;
        let sd = tools::target_dir().join("rpi4-boot");
        crate::sdcard::write(Board::Rpi4, &sd)?;
        println!(
            "xtask: unit tests, lints and the book passed; the FVP's image builds ({}); the Pi 4's boot files are written and checked ({})",
            fvp.display(),
            sd.display()
        );
    }
    let (passed, failed) = integration(filter, &models)?;
    println!("integration: {passed} passed, {} failed", failed.len());
    if !failed.is_empty() {
        bail!("integration tests failed: {}", failed.join(", "));
    }
    Ok(())
}

/// Extracts `key=N` from a `bench:` line.
fn bench_value(console: &str, key: &str) -> Option<u64> {
    console
        .lines()
        .filter(|l| l.contains("bench:"))
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| {
            w.strip_prefix(&format!("{key}="))
                .and_then(|v| v.parse().ok())
        })
}

/// How long a benchmark boot may take before it counts as hung. The
/// figures are instruction counts under icount, which do not depend on the
/// machine's load, but the wall-clock time of an icount run does (the 1 GiB
/// donation alone takes a minute on a busy two-core machine): this only
/// catches a hang.
const BENCH_TIMEOUT: Duration = Duration::from_secs(900);

/// Runs the benchmark image `img` on `machine`; its console, also kept in
/// `target/<log>`.
fn bench_console(img: &std::path::Path, machine: &MachineArgs, log: &str) -> Result<String> {
    let cmd = qemu::command(img, machine, &[]);
    let harness = Harness {
        pass: &["bench: donate_total_512=", "test-host: PASS"],
        fail: ALWAYS_FAIL,
        timeout: BENCH_TIMEOUT,
        after_pass: AfterPass::WaitForExit,
        echo: false,
    };
    let out = qemu::run_harnessed(cmd, &harness)?;
    std::fs::write(tools::target_dir().join(log), &out.console)?;
    if out.verdict != Verdict::Passed {
        bail!(
            "benchmark run failed ({:?}); console in target/{log}",
            out.verdict
        );
    }
    Ok(out.console)
}

pub fn bench(emulator_cost: bool, only_linux_guest: bool, only_core: bool) -> Result<()> {
    tools::ensure_qemu()?;
    let built = image::build_all()?;
    if only_linux_guest {
        let (moat, direct) = linux_guest_boot_instructions(&built)?;
        println!(
            "linux_guest_boot_instructions: {moat} under Moat / {direct} booted directly = {:.3}",
            moat as f64 / direct as f64
        );
        return Ok(());
    }
    // The demo image, with the MTE policy off so the UNDEF path can be timed.
    let (_, demo) = image::services_from(std::path::Path::new(crate::DEMO_MANIFEST))?;
    let spec = ImageSpec {
        host: built.test_host.clone(),
        initrd: None,
        bootargs: Some("moat.bench moat.host_mte=off".into()),
        dtb: None,
        semihosting_exit: true,
        services: Some(demo),
        benchmark: true,
    };
    let img = image::pack(&built.core, &spec, "bench")?;
    // 2 GiB of RAM: room for the host to donate a 1 GiB range to a VM.
    let bench_machine = MachineArgs {
        mem: "2G".into(),
        icount: true,
        ..machine(1, "v3")
    };
    let cmd = qemu::command(&img, &bench_machine, &[]);
    let harness = Harness {
        pass: &[
            "bench: null_hvc=",
            "bench: service_call=",
            "bench: mte_sysreg_undef=",
            "test-host: PASS",
        ],
        fail: ALWAYS_FAIL,
        timeout: BENCH_TIMEOUT,
        after_pass: AfterPass::WaitForExit,
        echo: false,
    };
    let out = qemu::run_harnessed(cmd, &harness)?;
    std::fs::write(tools::target_dir().join("bench.log"), &out.console)?;
    if out.verdict != Verdict::Passed {
        bail!(
            "benchmark run failed ({:?}); console in target/bench.log",
            out.verdict
        );
    }
    let figure = |key: &str| {
        bench_value(&out.console, key).with_context(|| format!("no {key} figure in the console"))
    };
    let null_hvc = figure("null_hvc")?;
    let service_call = figure("service_call")?;
    let service_call_el2 = figure("service_call_el2")?;
    let mte_sysreg_undef = figure("mte_sysreg_undef")?;
    println!("null_hvc: {null_hvc} instructions per round trip (host HVC -> core -> host)");
    println!(
        "service_call: {service_call} instructions (host hypercall -> service -> reply -> host, empty message; {service_call_el2} of them at EL2)"
    );
    println!(
        "mte_sysreg_undef: {mte_sysreg_undef} instructions from the host's mrs gcr_el1 to its UNDEF vector"
    );
    // Protected VMs: per-page costs of giving a range to a VM and taking it
    // back (zeroing, tag scrub and cleaning included), and a guest exit's
    // round trip through the host. Every one must have been measured.
    let mut vm_figures = serde_json::Map::new();
    for key in VM_BENCH_KEYS {
        let v = figure(key)?;
        println!("{key}: {v} instructions{}", vm_bench_unit(key));
        vm_figures.insert(key.to_string(), serde_json::json!(v));
    }
    // The 1 GiB figures under the names the design uses for them.
    for (alias, key) in [
        ("donate_1g_per_page", "donate_page_262144"),
        ("reclaim_1g_per_page", "reclaim_page_262144"),
    ] {
        let v = vm_figures.get(key).cloned().unwrap_or_default();
        vm_figures.insert(alias.to_string(), v);
    }
    let core_bytes = std::fs::metadata(&built.core)?.len();
    if only_core {
        println!("core_bytes: {core_bytes}");
        // The other figures of an earlier full run stay as they were.
        let path = tools::target_dir().join("bench.json");
        let mut json = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .filter(serde_json::Value::is_object)
            .unwrap_or_else(|| serde_json::json!({}));
        if let Some(map) = json.as_object_mut() {
            map.extend(vm_figures);
            map.extend([
                ("null_hvc".to_string(), null_hvc.into()),
                ("service_call".to_string(), service_call.into()),
                ("service_call_el2".to_string(), service_call_el2.into()),
                ("mte_sysreg_undef".to_string(), mte_sysreg_undef.into()),
                ("core_bytes".to_string(), core_bytes.into()),
            ]);
        }
        std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
        println!("xtask: updated the core's figures in {}", path.display());
        return Ok(());
    }

    // Keeping the SMMU in step: the same 512-page donation on a machine
    // whose SMMU the core owns, less the donation without one, per page.
    let smmu_console = bench_console(
        &img,
        &MachineArgs {
            smmu: true,
            ..bench_machine.clone()
        },
        "bench-smmu.log",
    )?;
    let without = figure("donate_total_512")?;
    let with = bench_value(&smmu_console, "donate_total_512")
        .context("no donate_total_512 figure in the SMMU run's console")?;
    let smmu_sync_per_page = (with as f64 - without as f64) / 512.0;
    println!(
        "smmu_sync_per_page: {smmu_sync_per_page:.2} instructions per page of a 512-page donation for the SMMU's invalidation ({with} with the SMMU, {without} without)"
    );

    let vmm_exit_roundtrip = vmm_exit_roundtrip(&built)?;
    println!(
        "vmm_exit_roundtrip: {vmm_exit_roundtrip} instructions per round trip (guest hvc -> core -> moat.ko -> moat-vmm in Linux userspace -> MOAT_RUN -> guest)"
    );

    let kvm_exit_roundtrip = kvm_exit_roundtrip(&built)?;
    println!(
        "kvm_exit_roundtrip: {kvm_exit_roundtrip} instructions per round trip (guest MMIO store -> Linux KVM at EL2 (VHE) -> moat-vmm bench-kvm in userspace -> KVM_RUN -> guest; no Moat)"
    );

    let guest_boot = linux_guest_boot_instructions(&built)?;
    println!(
        "linux_guest_boot_instructions: {} under Moat (VM creation to the guest's first userspace line, 1 vCPU) / {} booted directly = {:.3}",
        guest_boot.0,
        guest_boot.1,
        guest_boot.0 as f64 / guest_boot.1 as f64
    );

    let boot_instructions = linux_boot_instructions(&built)?;
    println!(
        "linux_boot_instructions_ratio: {:.4} ({} instructions under Moat, {} directly at EL1, reset to /init's first command, 1 CPU, icount)",
        boot_instructions.ratio(),
        boot_instructions.moat,
        boot_instructions.direct
    );

    let boots = LinuxBoots::prepare(&built)?;
    let boot = linux_boot_times(&boots)?;
    let mut json = serde_json::json!({
        "linux_guest_boot_instructions": guest_boot.0,
        "linux_guest_boot_direct_instructions": guest_boot.1,
        "linux_guest_boot_ratio": round3(guest_boot.0 as f64 / guest_boot.1 as f64),
        "vmm_exit_roundtrip": vmm_exit_roundtrip,
        "kvm_exit_roundtrip": kvm_exit_roundtrip,
        "null_hvc": null_hvc,
        "service_call": service_call,
        "service_call_el2": service_call_el2,
        "mte_sysreg_undef": mte_sysreg_undef,
        "linux_boot_instructions_ratio": (boot_instructions.ratio() * 10_000.0).round() / 10_000.0,
        "linux_boot_instructions_moat": boot_instructions.moat,
        "linux_boot_instructions_direct": boot_instructions.direct,
        "core_bytes": core_bytes,
        "linux_boot_ratio": round3(boot.ratio),
        "linux_boot_moat_seconds": round3(boot.moat),
        "linux_boot_direct_seconds": round3(boot.direct),
        "linux_boot_el2_stub_seconds": round3(boot.el2_stub),
        "linux_boot_el2_stub_ratio": round3(boot.el2_stub_ratio),
        "linux_boot_moat_over_el2_stub": round3(boot.moat_over_el2_stub),
        "smmu_sync_per_page": round3(smmu_sync_per_page),
    });
    if let Some(map) = json.as_object_mut() {
        map.extend(vm_figures);
        if emulator_cost {
            let [moat, direct, stub] = emulator_instructions(&boots)?;
            let ratio = |a: u64, b: u64| round3(a as f64 / b as f64);
            println!(
                "linux_boot_emulator_ratio: {:.3} (QEMU's instructions under Moat / direct); null hypervisor / direct {:.3}; Moat / null hypervisor {:.3}",
                ratio(moat, direct),
                ratio(stub, direct),
                ratio(moat, stub)
            );
            map.extend([
                (
                    "linux_boot_emulator_instructions_moat".to_string(),
                    moat.into(),
                ),
                (
                    "linux_boot_emulator_instructions_direct".to_string(),
                    direct.into(),
                ),
                (
                    "linux_boot_emulator_instructions_el2_stub".to_string(),
                    stub.into(),
                ),
                (
                    "linux_boot_emulator_ratio".to_string(),
                    ratio(moat, direct).into(),
                ),
                (
                    "linux_boot_emulator_el2_stub_ratio".to_string(),
                    ratio(stub, direct).into(),
                ),
            ]);
        } else {
            println!(
                "xtask: wall time moves with this machine's load; `cargo xtask bench --emulator-cost` also counts QEMU's own instructions for the three boots, which barely do"
            );
        }
    }
    let path = tools::target_dir().join("bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&json)? + "\n")?;
    println!("xtask: wrote {}", path.display());
    Ok(())
}

/// Round trips `moat-vmm bench-exits` times.
const VMM_BENCH_EXITS: u64 = 20_000;

/// Instructions per exit from a protected VM to `moat-vmm` in the Linux
/// host's userspace and back: Debian's kernel under Moat, one CPU, icount
/// (a nanosecond of the 1 GHz counter is an instruction), the VMM timing
/// [`VMM_BENCH_EXITS`] `Hvc` exits of the guest's ping mode with the
/// virtual counter.
fn vmm_exit_roundtrip(built: &Built) -> Result<u64> {
    let assets = debian::ensure_assets()?;
    let vm = linux_vm::build(&assets, built, false)?;
    let commands = format!(
        "insmod /{} && moat-vmm bench-exits /{} --count {VMM_BENCH_EXITS}",
        linux_vm::MODULE_PATH,
        linux_vm::GUEST_PATH
    );
    let initrd = linux::write_initramfs(&assets, Some(&vm), Some(&commands), "bench-vmm")?;
    let spec = linux::image_spec(&assets, &initrd, None, &linux::services()?);
    let img = image::pack(&built.core, &spec, "bench-vmm")?;
    let cmd = qemu::command(&img, &bench_linux_machine(), &[]);
    let (_, figure) = exit_bench(cmd, "bench-vmm", "HVC exits to this process and back: ")?;
    Ok(figure)
}

/// The counter figure after `marker` on the console, in nanoseconds (under
/// icount, instructions), given the frequency on the same line.
fn counter_ns(console: &str, marker: &str) -> Option<u64> {
    console.lines().find_map(|l| {
        let rest = l.split_once(marker)?.1;
        let mut words = rest.split_whitespace();
        let ticks: u64 = words.next()?.parse().ok()?;
        let freq: u64 = match (words.next(), words.next()) {
            (Some("frequency"), Some(f)) => f.parse().ok()?,
            _ => 1_000_000_000,
        };
        u64::try_from(u128::from(ticks) * 1_000_000_000 / u128::from(freq.max(1))).ok()
    })
}

/// Instructions from a Linux guest's creation to its first userspace line:
/// Debian's kernel and the guest's initramfs as a protected VM (one vCPU)
/// under Linux under Moat, against the same kernel and initramfs booted
/// directly by QEMU, both on one CPU under icount. The guest's `/init`
/// reads the counter itself (`moat-vmm counter`); the VMM reads it just
/// before `VM_CREATE`. Returns (under Moat, direct).
fn linux_guest_boot_instructions(built: &Built) -> Result<(u64, u64)> {
    let assets = debian::ensure_assets()?;
    let mut vm = linux_vm::build(&assets, built, false)?;
    let bench_initrd = linux_vm::write_linux_guest_initramfs(&assets, Some(&vm.vmm))?;
    vm.linux_guest.1 = bench_initrd.clone();
    let append = "console=ttyAMA0 quiet moat.bench";
    let commands = format!(
        "insmod /moat.ko && moat-vmm run --kernel /guest/Image --initrd /guest/initrd --append '{append}'"
    );
    let initrd = linux::write_initramfs(&assets, Some(&vm), Some(&commands), "bench-guest")?;
    let spec = linux::image_spec(&assets, &initrd, None, &linux::services()?);
    let img = image::pack(&built.core, &spec, "bench-guest")?;
    let cmd = qemu::command(&img, &bench_linux_machine(), &[]);
    let (console, _) = exit_bench(cmd, "bench-guest", "moat-vmm: counter ")?;
    let start = counter_ns(&console, "moat-vmm: VM_CREATE at counter ")
        .context("no VM_CREATE counter; console in target/bench-guest.log")?;
    let end = counter_ns(&console, "moat-vmm: counter ")
        .context("no guest counter; console in target/bench-guest.log")?;
    let under_moat = end
        .checked_sub(start)
        .context("the guest's counter is before the VM's creation")?;
    let direct_cmd = qemu::linux_direct_command(
        &assets.kernel,
        &bench_initrd,
        append,
        &bench_linux_machine(),
    );
    let harness = Harness {
        pass: &["moat-vmm: counter "],
        fail: linux::FAIL_PATTERNS,
        timeout: Duration::from_secs(900),
        after_pass: AfterPass::WaitForExit,
        echo: false,
    };
    let out = qemu::run_harnessed(direct_cmd, &harness)?;
    std::fs::write(
        tools::target_dir().join("bench-guest-direct.log"),
        &out.console,
    )?;
    let direct = counter_ns(&out.console, "moat-vmm: counter ")
        .context("no counter from the direct boot; console in target/bench-guest-direct.log")?;
    Ok((under_moat, direct))
}

/// Instructions from reset to the first command of `/init`, under Moat
/// and with the same kernel and initramfs booted directly at EL1.
struct BootInstructions {
    moat: u64,
    direct: u64,
}

impl BootInstructions {
    fn ratio(&self) -> f64 {
        self.moat as f64 / self.direct as f64
    }
}

/// Boots Debian's kernel twice under `-icount shift=0,sleep=off` on one
/// CPU — under Moat (its boot included) and directly on QEMU at EL1 — with
/// an initramfs whose `/init` reads the virtual counter first. QEMU 10's
/// counter runs at 1 GHz, so with icount one tick is one instruction: the
/// figures do not depend on how busy this machine is.
fn linux_boot_instructions(built: &Built) -> Result<BootInstructions> {
    let assets = debian::ensure_assets()?;
    let initrd = linux::write_initramfs_with(
        &assets,
        None,
        Some("true"),
        "bench-boot-instructions",
        vec![(linux::BOOT_COUNTER_FLAG, 0o644, Vec::new())],
    )?;
    let spec = linux::image_spec(&assets, &initrd, None, &linux::services()?);
    let img = image::pack(&built.core, &spec, "bench-boot-instructions")?;
    let m = bench_linux_machine();
    let harness = Harness {
        pass: &[linux::MARKER_INIT],
        fail: linux::FAIL_PATTERNS,
        timeout: Duration::from_secs(300),
        after_pass: AfterPass::Stop,
        echo: false,
    };
    let count = |label: &str, cmd: std::process::Command| -> Result<u64> {
        let out = qemu::run_harnessed(cmd, &harness)?;
        let log = tools::target_dir().join(format!("bench-boot-instructions-{label}.log"));
        std::fs::write(&log, &out.console)?;
        if out.verdict != Verdict::Passed {
            bail!(
                "Linux boot ({label}) failed: {:?}; console in {}",
                out.verdict,
                log.display()
            );
        }
        out.console
            .lines()
            .find_map(|l| l.trim().strip_prefix("probe: counter="))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("no `probe: counter=` line; console in {}", log.display()))
    };
    let moat = count("moat", qemu::command(&img, &m, &[]))?;
    let direct = count(
        "direct",
        qemu::linux_direct_command(&assets.kernel, &initrd, &linux::bootargs(None), &m),
    )?;
    Ok(BootInstructions { moat, direct })
}

/// One CPU, GICv3, icount: the machine of the exit benchmarks.
fn bench_linux_machine() -> MachineArgs {
    MachineArgs {
        icount: true,
        ..machine(1, "v3")
    }
}

/// Runs `cmd`, a Linux boot whose `/init` runs one `moat-vmm` benchmark,
/// keeps its console in `target/<log>.log`, and returns the console and
/// the figure the VMM printed after `marker` (the commands must have ended
/// with status 0).
fn exit_bench(cmd: std::process::Command, log: &str, marker: &str) -> Result<(String, u64)> {
    let harness = Harness {
        pass: &[linux::MARKER_STATUS],
        fail: linux::FAIL_PATTERNS,
        timeout: Duration::from_secs(900),
        after_pass: AfterPass::WaitForExit,
        echo: false,
    };
    let out = qemu::run_harnessed(cmd, &harness)?;
    std::fs::write(tools::target_dir().join(format!("{log}.log")), &out.console)?;
    let figure = out
        .console
        .lines()
        .find_map(|l| {
            l.split_once(marker)?
                .1
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .filter(|_| linux::exit_status(&out.console) == Some(0))
        .with_context(|| format!("the benchmark gave no figure; console in target/{log}.log"))?;
    Ok((out.console, figure))
}

/// Instructions per exit of a minimal Linux KVM guest to `moat-vmm
/// bench-kvm` and back, for comparison with [`vmm_exit_roundtrip`]: the same
/// Debian kernel booted directly at EL2 (no Moat; KVM in VHE mode), one CPU,
/// icount, [`VMM_BENCH_EXITS`] `KVM_RUN` calls each ending in an MMIO exit.
fn kvm_exit_roundtrip(built: &Built) -> Result<u64> {
    let assets = debian::ensure_assets()?;
    let vm = linux_vm::build(&assets, built, false)?;
    let commands = format!("moat-vmm bench-kvm --count {VMM_BENCH_EXITS}");
    let initrd = linux::write_initramfs(&assets, Some(&vm), Some(&commands), "bench-kvm")?;
    let cmd = qemu::linux_direct_el2_command(
        &assets.kernel,
        &initrd,
        &linux::bootargs(None),
        &bench_linux_machine(),
    );
    let (console, figure) = exit_bench(
        cmd,
        "bench-kvm",
        "KVM MMIO exits to this process and back: ",
    )?;
    if !console.contains("VHE mode initialized successfully") {
        bail!("KVM did not start in VHE mode; console in target/bench-kvm.log");
    }
    Ok(figure)
}

/// What fails a case whose ledger is restarted mid-run, beside the random
/// host's own failures: a rebuilt ledger the checker disagrees with, a
/// refused replay, a ledger given up on or one that did not start again.
const LEDGER_RESTART_FAIL: &[&str] = &[
    "boot failed",
    "the rebuilt ledger disagrees",
    "rebuilding, ",
    "not restarted again",
    "did not start",
];

/// The test host's protected-VM figures (`bench:` lines): instructions per
/// page to donate and to reclaim ranges of 1, 512 and 262144 pages (1 GiB),
/// and per guest exit round trip.
const VM_BENCH_KEYS: [&str; 7] = [
    "donate_page_1",
    "donate_page_512",
    "donate_page_262144",
    "reclaim_page_1",
    "reclaim_page_512",
    "reclaim_page_262144",
    "vm_exit_roundtrip",
];

fn vm_bench_unit(key: &str) -> &'static str {
    if key == "vm_exit_roundtrip" {
        " per round trip (guest hvc -> core -> host sees the exit -> VCPU_RUN -> guest)"
    } else {
        " per page"
    }
}

/// Boots of Linux timed under Moat, under the null hypervisor and without
/// either, in turn. Single boots under emulation vary by tens of percent on
/// a busy machine; nine rounds, each starting with a different one of the
/// three, keep the medians' ratios steady to a few percent.
const LINUX_BOOT_RUNS: usize = 9;

/// Median Linux boot times (seconds) and their ratios.
struct BootTimes {
    moat: f64,
    direct: f64,
    el2_stub: f64,
    /// Under Moat / direct: the figure the design sets a target for.
    ratio: f64,
    /// Under the null hypervisor / direct: what the emulator charges for
    /// running the kernel below an EL2 at all.
    el2_stub_ratio: f64,
    /// Under Moat / under the null hypervisor: Moat's own share.
    moat_over_el2_stub: f64,
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The three ways the benchmark boots Linux, in [`LinuxBoots::command`]'s
/// numbering.
const LABELS: [&str; 3] = ["moat", "direct", "el2-stub"];

/// The same kernel, initramfs (its `/init` runs `true` and powers off) and
/// command line, ready to boot under Moat, directly, or through the null
/// hypervisor.
struct LinuxBoots {
    kernel_package: String,
    kernel: PathBuf,
    initrd: PathBuf,
    bootargs: String,
    moat_image: PathBuf,
    stub: PathBuf,
    kernel_at: u64,
    machine: MachineArgs,
}

impl LinuxBoots {
    fn prepare(built: &Built) -> Result<Self> {
        let assets = debian::ensure_assets()?;
        let initrd = linux::write_initramfs(&assets, None, Some("true"), "bench-linux")?;
        let spec = linux::image_spec(&assets, &initrd, None, &linux::services()?);
        let moat_image = image::pack(&built.core, &spec, "bench-linux")?;
        let (stub, kernel_at) = image::build_el2_stub()?;
        Ok(Self {
            kernel_package: assets.kernel_package.clone(),
            kernel: assets.kernel.clone(),
            initrd,
            bootargs: linux::bootargs(None),
            moat_image,
            stub,
            kernel_at,
            machine: machine(1, "v3"),
        })
    }

    /// QEMU's command line for boot `which` (an index into [`LABELS`]).
    fn command(&self, which: usize, extra: &[&str]) -> std::process::Command {
        let m = &self.machine;
        let mut c = match which {
            0 => qemu::command(&self.moat_image, m, &[]),
            1 => qemu::linux_direct_command(&self.kernel, &self.initrd, &self.bootargs, m),
            _ => qemu::linux_el2_stub_command(
                &self.stub,
                &self.kernel,
                self.kernel_at,
                &self.initrd,
                &self.bootargs,
                m,
            ),
        };
        c.args(extra);
        c
    }
}

/// The emulator's own work for each of the three boots, start to power-off:
/// host instructions QEMU executes, counted by Valgrind (cachegrind without
/// cache simulation), with `-icount shift=0,sleep=off` so the guest runs the
/// same instruction stream at the same virtual times every run. Unlike wall
/// time it does not move with the machine's load, so it tells where the
/// emulator's time goes to within a fraction of a percent.
fn emulator_instructions(boots: &LinuxBoots) -> Result<[u64; 3]> {
    tools::ensure_valgrind()?;
    println!(
        "emulator cost: QEMU's own instructions for each boot to power-off, under valgrind with icount (a few minutes)"
    );
    let logs: Vec<PathBuf> = LABELS
        .iter()
        .map(|l| tools::target_dir().join(format!("bench-linux-{l}.valgrind.log")))
        .collect();
    let start = |which: usize| -> Result<std::process::Child> {
        let qemu = boots.command(which, &["-icount", "shift=0,sleep=off"]);
        let log = std::fs::File::create(&logs[which])?;
        let mut c = std::process::Command::new("valgrind");
        c.args([
            "--tool=cachegrind",
            "--cache-sim=no",
            "--smc-check=all-non-file",
            "--cachegrind-out-file=/dev/null",
        ])
        .arg(qemu.get_program())
        .args(qemu.get_args())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        Ok(c.spawn()?)
    };
    let finish = |which: usize, mut child: std::process::Child| -> Result<u64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(30 * 60);
        loop {
            if let Some(status) = child.try_wait()? {
                let text = std::fs::read_to_string(&logs[which])?;
                let count = text
                    .lines()
                    .find_map(|l| {
                        l.split_once("I   refs:")
                            .map(|(_, n)| n.trim().replace(',', ""))
                    })
                    .and_then(|n| n.parse().ok());
                return match (status.success(), text.contains(linux::MARKER_INIT), count) {
                    (true, true, Some(n)) => Ok(n),
                    _ => bail!(
                        "the {} boot under valgrind did not run to power-off ({status}); log in {}",
                        LABELS[which],
                        logs[which].display()
                    ),
                };
            }
            if std::time::Instant::now() >= deadline {
                // Only the valgrind this function started, by its own handle.
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "the {} boot under valgrind took over 30 minutes",
                    LABELS[which]
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    // Two at a time: each keeps one host CPU busy.
    let mut counts = [0u64; 3];
    let (a, b) = (start(0)?, start(1)?);
    counts[0] = finish(0, a)?;
    let c = start(2)?;
    counts[1] = finish(1, b)?;
    counts[2] = finish(2, c)?;
    for (label, n) in LABELS.iter().zip(counts) {
        println!("  {label}: {n} host instructions");
    }
    Ok(counts)
}

/// Wall time from starting QEMU to the first command of Linux's `/init`,
/// for the same kernel, initramfs and command line booted three ways:
/// - under Moat;
/// - directly by QEMU at EL1 (`virtualization=off`: Linux runs at EL1 as it
///   does under Moat, with no EL2 to set up): the baseline;
/// - through the null hypervisor (`images/el2-stub`): EL2 present but doing
///   nothing, which isolates the emulator's price for EL2 (QEMU checks
///   HCR_EL2 on every pointer-authentication instruction and on many system
///   register accesses at EL1 once EL2 exists) from Moat's own.
///
/// Each round runs all three, starting with a different one, so a change in
/// the machine's load falls on each alike; wall time, not icount, because the
/// figure is how long a user waits for a shell.
fn linux_boot_times(boots: &LinuxBoots) -> Result<BootTimes> {
    let harness = Harness {
        pass: &[linux::MARKER_INIT],
        fail: linux::FAIL_PATTERNS,
        timeout: Duration::from_secs(120),
        after_pass: AfterPass::Stop,
        echo: false,
    };
    println!(
        "linux boot: QEMU start to /init's first command, Debian {}, 1 CPU, {} rounds of three boots",
        boots.kernel_package, LINUX_BOOT_RUNS
    );
    let mut seconds: [Vec<f64>; 3] = Default::default();
    for round in 0..LINUX_BOOT_RUNS {
        let mut this_round = [0.0; 3];
        for k in 0..LABELS.len() {
            let which = (round + k) % LABELS.len();
            let label = LABELS[which];
            let out = qemu::run_harnessed(boots.command(which, &[]), &harness)?;
            let log = tools::target_dir().join(format!("bench-linux-{label}.log"));
            std::fs::write(&log, &out.console)?;
            this_round[which] = match (out.verdict, out.passed_after) {
                (Verdict::Passed, Some(t)) => t,
                (v, _) => bail!(
                    "Linux boot ({label}) failed: {v:?}; console in {}",
                    log.display()
                ),
            };
        }
        println!(
            "  round {}: under Moat {:.3} s, direct {:.3} s, null hypervisor {:.3} s",
            round + 1,
            this_round[0],
            this_round[1],
            this_round[2]
        );
        for (all, t) in seconds.iter_mut().zip(this_round) {
            all.push(t);
        }
    }
    let [moat, direct, el2_stub] = seconds.map(median);
    let times = BootTimes {
        moat,
        direct,
        el2_stub,
        ratio: moat / direct,
        el2_stub_ratio: el2_stub / direct,
        moat_over_el2_stub: moat / el2_stub,
    };
    println!(
        "linux_boot_ratio: {:.3} (median under Moat {moat:.3} s / median direct {direct:.3} s)",
        times.ratio
    );
    println!(
        "linux_boot_el2_stub_ratio: {:.3} (null hypervisor {el2_stub:.3} s / direct: the emulator's price for EL2)",
        times.el2_stub_ratio
    );
    println!(
        "linux_boot_moat_over_el2_stub: {:.3} (Moat's own share: under Moat / null hypervisor)",
        times.moat_over_el2_stub
    );
    Ok(times)
}
