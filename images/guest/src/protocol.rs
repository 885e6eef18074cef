//! What the guest and the test host say to each other.
//!
//! The guest reaches the host only through hypercalls the core does not
//! serve: each becomes an `ExitReason::Hvc` exit whose x2..x7 are the
//! guest's x0..x5, and the host's answer (r0..r3 of its next `VCPU_RUN`)
//! comes back in the guest's x0..x3. The function ids below are in the
//! vendor-hypervisor range, below anything the core serves. The test host
//! includes this file too, so both sides use the same numbers; each side
//! uses part of it.
#![allow(dead_code)]

use moat_abi::hypercall::id;

/// Guest: what should I do? Made at entry, MMU off. Answer: r0 = a `MODE_*`,
/// r1 = `FLAG_*` bits.
pub const CONFIG: u32 = id(0x800);
/// Guest: hello; x1 = [`hello_value`] as the guest computed it in its memory,
/// x2 = what the core answered the guest's `NULL` hypercall.
pub const HELLO: u32 = id(0x801);
/// Guest: my page at IPA x1 is shared with you (x2 = `GUEST_SHARE_HOST`'s
/// result) and holds a message of x3 bytes. Answer: r0 = 0 once the host
/// has written its reply at [`REPLY_OFFSET`], r1 = the reply's length.
pub const SHARED: u32 = id(0x802);
/// Guest: I read your reply: x1 = [`fnv1a`] of its bytes, x2 = its length.
pub const REPLY_SEEN: u32 = id(0x803);
/// Guest: sharing IPA x2, which I do not own, returned x1.
pub const SHARE_FOREIGN: u32 = id(0x804);
/// Guest: `GUEST_UNSHARE_HOST` of IPA x2 returned x1.
pub const UNSHARED: u32 = id(0x805);
/// Guest: my read of [`MMIO_READ_IPA`] loaded x1.
pub const MMIO_VALUE: u32 = id(0x806);
/// Guest: my read of [`MMIO_ABORT_IPA`], into a register that held
/// [`MMIO_KEPT`], took x1 synchronous exceptions at VBAR_EL1 + 0x200, the
/// last with ESR_EL1 x2, FAR_EL1 x3 and ELR_EL1 x4 bytes past the load (0:
/// the load itself); the register holds x5 after it.
pub const MMIO_ABORTED: u32 = id(0x827);
/// Guest: the tag of [`TAG_PAGE_IPA`]'s first granule is x1; a tag I stored
/// in my own memory reads back as x2.
pub const TAGS: u32 = id(0x807);
/// Guest (spin mode): page x1 is shared (x2 = the share's result); I now
/// count in its first word until its second word is [`STOP`].
pub const SPINNING: u32 = id(0x808);
/// Guest (ping mode): round trip x1. Answer r0 = [`STOP`] ends the loop.
pub const PING: u32 = id(0x809);
/// Guest: I took an exception I cannot handle: x1 = ESR_EL1, x2 = ELR_EL1,
/// x3 = FAR_EL1, x4 = the vector's offset from VBAR_EL1 (x1 = 0: a panic).
/// The guest powers off next.
pub const FAULT: u32 = id(0x80f);
/// Guest (MTE probe): my ID registers read x1 = ID_AA64PFR0_EL1, x2 =
/// ID_AA64PFR1_EL1, x3 = ID_AA64PFR2_EL1, x4 = ID_AA64ISAR1_EL1, x5 =
/// ID_AA64ISAR2_EL1.
pub const ID_REGS: u32 = id(0x80a);
/// Guest (MTE probe): and x1 = ID_AA64ZFR0_EL1, x2 = ID_AA64SMFR0_EL1,
/// x3 = ID_AA64DFR0_EL1.
pub const ID_REGS_MORE: u32 = id(0x80b);
/// Guest (MTE probe): access x1 of [`MTE_ACCESSES`] took x2 synchronous
/// exceptions at VBAR_EL1 + 0x200 (the last with ESR_EL1 x3 and ELR_EL1
/// x4); the instruction is at x5. The handler skipped the instruction.
pub const MTE_ACCESS: u32 = id(0x80c);
/// Guest (MTE probe): the accesses of [`MTE_ACCESSES`] took x1 exceptions
/// in all.
pub const MTE_ACCESSES_DONE: u32 = id(0x80d);
/// Guest (MTE probe): STG of tag [`PROBE_TAG`] to a granule of mine, then
/// LDG of it, read tag x1; the two took x2 exceptions.
pub const TAG_PROBE: u32 = id(0x80e);
/// Guest (MTE probe, MTE-on VM): I wrote [`GUEST_MTE_REGS`]; read back at
/// once, GCR_EL1, RGSR_EL1, TFSR_EL1 and TFSRE0_EL1 are x1..x4. Answer once
/// the host has set its own values in its registers.
pub const MTE_REGS_SET: u32 = id(0x810);
/// Guest (MTE probe, MTE-on VM): read again after the host ran, the same
/// registers are x1..x4.
pub const MTE_REGS_AGAIN: u32 = id(0x811);
/// Guest (MTE probe): access x1 of [`HOST_STATE_ACCESSES`] took x2
/// synchronous exceptions at VBAR_EL1 + 0x200 (the last with ESR_EL1 x3
/// and ELR_EL1 x4); the instruction is at x5.
pub const HOST_STATE_ACCESS: u32 = id(0x815);
/// Guest (shared at exit): my page at IPA x1 is shared with you (x2 =
/// `GUEST_SHARE_HOST`'s result) and holds [`pattern`] words; I power off
/// next without ending the share.
pub const LEFT_SHARED: u32 = id(0x812);

/// Guest (vector probe): V0..V31 hold [`vector_byte`]`(i)` in every byte;
/// answer once the host has used its own vector registers.
pub const VECTORS_SET: u32 = id(0x813);
/// Guest (vector probe): x1 = how many of V0..V31 did not keep their value
/// across the exit.
pub const VECTORS_CHECKED: u32 = id(0x814);

/// Guest (counted spin): ready; answer r0 = the iterations to spin.
pub const SPIN_READY: u32 = id(0x815);
/// Guest (counted spin): I spun x1 iterations of a two-instruction loop.
pub const SPUN: u32 = id(0x816);
/// Guest (debug probe): x1 = the address of an instruction I will execute,
/// x2 = the address of a word I will write and read, once you answer.
pub const DEBUG_TARGETS: u32 = id(0x817);
/// Guest (debug probe): with debug exceptions unmasked (PSTATE.D clear) I
/// executed the instruction and wrote and read the word: x1 exceptions
/// reached my vector (the last with ESR_EL1 x2, ELR_EL1 x3), the word read
/// back x4.
pub const DEBUG_DONE: u32 = id(0x818);

/// Guest (peek): x1 of the words of the page at [`TAG_PAGE_IPA`] are not
/// zero (a page the host's devices were told to write into).
pub const PEEKED: u32 = id(0x819);

/// Guest (interrupt probe): my virtual timer's interrupt arrived: x1 = the
/// INTID my CPU interface acknowledged (0 if none came), x2 = WFIs waited.
pub const VGIC_TIMER: u32 = id(0x820);
/// Guest (interrupt probe): my timer has fired and is unmasked; I now spin
/// x1 iterations without taking its interrupt. Count your Interrupt exits
/// until [`VGIC_SPUN`].
pub const VGIC_SPINNING: u32 = id(0x821);
/// Guest (interrupt probe): done spinning; x1 = the INTID acknowledged
/// afterwards (with a virtual GIC; 0 without).
pub const VGIC_SPUN: u32 = id(0x822);
/// Guest (interrupt probe): please make INTID x1 pending for me.
pub const VGIC_RAISE: u32 = id(0x823);
/// Guest (interrupt probe): after [`VGIC_RAISE`], x1 = the INTID I
/// acknowledged; after my SGI (INTID [`PROBE_SGI`] to myself), x2 = the
/// INTID acknowledged then.
pub const VGIC_DONE: u32 = id(0x824);
/// The SPI the interrupt probe asks for, and the SGI it sends itself.
pub const PROBE_SPI: u64 = 40;
pub const PROBE_SGI: u64 = 5;
/// Iterations of the interrupt probe's spin with a fired timer.
pub const PROBE_SPIN: u64 = 20_000_000;

/// Guest (pKVM probe): x1 = 1 if the vendor-hypervisor UID is KVM's, x2 =
/// the KVM features bitmap, x3 = HYP_MEMINFO's granule.
pub const PKVM_IDS: u32 = id(0x825);
/// Guest (pKVM probe): MEM_SHARE of my shared page gave x1, again x2;
/// MEM_UNSHARE x3, again x4; MEM_SHARE of an IPA I do not have x5.
pub const PKVM_SHARES: u32 = id(0x826);
/// An IPA no guest of the VMM has memory at.
pub const UNBACKED_IPA: u64 = 0x7000_0000;
/// Guest (chaos mode): my seed? Answer r0 = the seed.
pub const CHAOS_SEED: u32 = id(0x830);
/// Guest (chaos mode): I did action x1 (a `CHAOS_*` action) on IPA x2; the
/// call it made returned x3 (for a read: the value read); before it, the
/// window pages I had shared were the bits of x4. Answer r0 = [`STOP`] to
/// power off, anything else to go on.
pub const CHAOS_DID: u32 = id(0x831);
/// Guest (parallel probe), vCPU x1: attempt x2 starts now (I set my flag
/// to x2 once you answer, then wait for the other vCPU's). Answer r0 =
/// [`STOP`] ends the probe.
pub const PARALLEL_READY: u32 = id(0x832);
/// Guest (parallel probe), vCPU x1: attempt x2 ended: the other vCPU's
/// flag read x5 just after I set mine, and x3 when I stopped spinning (at
/// x2 or above, or after [`PARALLEL_SPIN`] iterations: x4 = the iterations
/// of a loop that makes no exit). Answer r0 = [`STOP`] ends the probe.
pub const PARALLEL_DONE: u32 = id(0x833);
/// Guest (parallel probe), vCPU 0: starting vCPU 1 (PSCI CPU_ON) answered
/// x1; the probe is over, vCPU 1 reported off (x2 = 1) or not.
pub const PARALLEL_END: u32 = id(0x834);

/// Chaos actions.
pub const CHAOS_SHARE: u64 = 0;
pub const CHAOS_UNSHARE: u64 = 1;
/// Share two pages from the window's last page: past the window.
pub const CHAOS_SHARE_STRADDLE: u64 = 2;
pub const CHAOS_READ: u64 = 3;
pub const CHAOS_WRITE: u64 = 4;
pub const CHAOS_SPIN: u64 = 5;
pub const CHAOS_WFI: u64 = 6;
/// Share a page far outside the VM's memory.
pub const CHAOS_SHARE_FOREIGN: u64 = 7;
pub const CHAOS_ACTIONS: u64 = 8;
/// The chaos window: pages past the guest's own 16 that the host may or may
/// not have donated (a page it did not is an MMIO exit when touched).
pub const CHAOS_WINDOW_IPA: u64 = BASE_IPA + PAGES * PAGE_SIZE;
pub const CHAOS_WINDOW_PAGES: u64 = 4;
/// The IPA the guest tries to share with [`CHAOS_SHARE_FOREIGN`].
pub const CHAOS_FOREIGN_IPA: u64 = 0x7000_0000;

/// The word the guest writes at the start of a window page it just shared:
/// what the host may read there while the share lasts.
pub const fn chaos_mark(ipa: u64) -> u64 {
    ipa ^ 0x6368_616f_7300_0000
}

/// Modes (the answer to [`CONFIG`]).
pub const MODE_DEMO: u64 = 0;
pub const MODE_SPIN: u64 = 1;
pub const MODE_PING: u64 = 2;
/// Power off at once.
pub const MODE_OFF: u64 = 3;
/// Read the ID registers, try the MTE system registers and tag instructions
/// and report what happened; in an MTE-on VM, also keep values in the MTE
/// registers across an exit.
pub const MODE_MTE_PROBE: u64 = 4;
/// Share a page, fill it, and power off without ending the share.
pub const MODE_SHARED_AT_EXIT: u64 = 5;
/// Fill V0..V31, exit, and check they survived the host's run.
pub const MODE_VECTORS: u64 = 6;
/// Spin a number of iterations the host chooses, between two exits.
pub const MODE_SPIN_COUNT: u64 = 7;
/// Report an instruction and a word, then execute and touch them with debug
/// exceptions unmasked, counting the exceptions taken.
pub const MODE_DEBUG_PROBE: u64 = 8;
/// Talk through the PL011 the VMM emulates at [`CONSOLE_IPA`]: print
/// [`CONSOLE_GREETING`], read a line, echo it and power off (crash, for
/// [`CONSOLE_CRASH`]).
pub const MODE_CONSOLE: u64 = 9;
/// Count the non-zero words of [`TAG_PAGE_IPA`], report them and power off.
pub const MODE_PEEK: u64 = 10;
/// Interrupt probe: take the virtual timer's interrupt, spin with a fired
/// timer, take an injected SPI and an SGI sent to itself ([`FLAG_VGIC`];
/// without it, only the spin).
pub const MODE_VGIC_PROBE: u64 = 11;

/// pKVM probe: the pKVM guest ABI's discovery and share calls.
pub const MODE_PKVM_PROBE: u64 = 12;

/// Share, unshare, read and write pages of the chaos window, and spin and
/// wait, in an order drawn from a seed the host gives ([`CHAOS_SEED`]),
/// reporting each action ([`CHAOS_DID`]) until the host answers [`STOP`].
pub const MODE_CHAOS: u64 = 13;
/// Parallel probe (a VM with two vCPUs and a virtual GIC): vCPU 0 starts
/// vCPU 1 with PSCI CPU_ON; then, attempt after attempt, each vCPU sets its
/// flag in its memory to the attempt's number and spins until the other's
/// reaches it ([`PARALLEL_READY`], [`PARALLEL_DONE`]). A vCPU can see the
/// other's flag change within one uninterrupted run of its own only if the
/// other runs at the same time.
pub const MODE_PARALLEL: u64 = 14;
/// Most iterations a parallel-probe vCPU spins for the other's flag.
pub const PARALLEL_SPIN: u64 = 1 << 22;
/// Attempts the host allows the parallel probe.
pub const PARALLEL_ATTEMPTS: u64 = 1000;
/// What the debug probe writes to its word.
pub const DEBUG_WORD_VALUE: u64 = 0xdeb0_0001;
/// The VM was created with MTE: the guest maps its memory Tagged and tests tags.
pub const FLAG_MTE: u64 = 1;
/// The VM has a virtual GIC (interrupt probe).
pub const FLAG_VGIC: u64 = 4;
/// The VM was created without MTE, but the guest maps its memory Tagged and
/// sets SCTLR_EL1.ATA anyway, as if it had MTE.
pub const FLAG_TRY_TAGS: u64 = 2;

/// The MTE system-register accesses the MTE probe makes, in order (MSRs
/// write zero).
pub const MTE_ACCESSES: [&str; 9] = [
    "mrs gcr_el1",
    "msr gcr_el1",
    "mrs rgsr_el1",
    "msr rgsr_el1",
    "mrs tfsr_el1",
    "msr tfsr_el1",
    "mrs tfsre0_el1",
    "msr tfsre0_el1",
    "mrs gmid_el1",
];
/// Accesses to EL0/EL1 registers the host may use and a VM is not given,
/// which stay live in the CPU while a VM runs (the core does not switch
/// them): each must be UNDEFINED in the VM. TPIDR2_EL0 is SME's, opened to
/// the host by a negative fine-grained trap bit.
pub const HOST_STATE_ACCESSES: [&str; 1] = ["mrs tpidr2_el0"];
/// The tag the MTE probe stores in its own memory.
pub const PROBE_TAG: u64 = 0xb;
/// What an MTE-on VM's guest writes to GCR_EL1 (Exclude 0x5a5a, RRND 0),
/// RGSR_EL1 (SEED 0xabcd, TAG 3), TFSR_EL1 (TF0) and TFSRE0_EL1 (TF0).
pub const GUEST_MTE_REGS: [u64; 4] = [0x5a5a, 0xab_cd03, 0b01, 0b1];

/// Ends the spin and ping loops.
pub const STOP: u64 = 0x5709_5709;

/// Where the guest's memory starts (its entry point) and how many pages it has.
pub const BASE_IPA: u64 = 0x4000_0000;
pub const PAGES: u64 = 16;
pub const PAGE_SIZE: u64 = 4096;
/// The page the guest's image leaves free; the host tags it before donation.
pub const TAG_PAGE_IPA: u64 = BASE_IPA + (PAGES - 1) * PAGE_SIZE;
/// Just past the guest's memory: it tries to share this page.
pub const FOREIGN_IPA: u64 = BASE_IPA + PAGES * PAGE_SIZE;
/// Outside the guest's stage-2: a read here becomes an MMIO exit.
pub const MMIO_READ_IPA: u64 = 0x0900_0000;
/// An address with no device: the guest reads it with its handler armed,
/// and the host answers with `MmioAnswer::ABORT`.
pub const MMIO_ABORT_IPA: u64 = 0x0a00_0008;
/// What the aborted load's target register holds before and after.
pub const MMIO_KEPT: u64 = 0x5eed_0bad;
/// A 4-byte write of [`MMIO_WRITE_VALUE`] here, after the read.
pub const MMIO_WRITE_IPA: u64 = 0x0900_0010;
pub const MMIO_WRITE_VALUE: u64 = 0xcafe_f00d;

/// The PL011 `moat-vmm` emulates from MMIO exits (outside the guest's
/// memory, so every access is an exit).
pub const CONSOLE_IPA: u64 = 0x0900_0000;
/// The first line the console mode prints.
pub const CONSOLE_GREETING: &str = "Hello from a Moat protected VM";
/// The line that makes the console mode crash (an undefined instruction,
/// reported to the VMM as a [`FAULT`]), for the VMM's crash handling.
pub const CONSOLE_CRASH: &[u8] = b"crash";
/// PL011 registers and flags the console mode uses.
pub const PL011_DR: u64 = 0x000;
pub const PL011_FR: u64 = 0x018;
/// FR: the receive FIFO is empty.
pub const PL011_FR_RXFE: u32 = 1 << 4;
/// DR, read: a break was received (the VMM's end of input).
pub const PL011_DR_BE: u32 = 1 << 10;

/// The message the guest writes at the start of its shared page, followed by
/// the decimal [`message_number`].
pub const MESSAGE_PREFIX: &[u8] = b"greetings from the protected VM, number ";
/// Where in the shared page the host writes its reply.
pub const REPLY_OFFSET: usize = 2048;

/// Words the guest writes to its memory and hashes for [`HELLO`].
pub const HELLO_WORDS: usize = 512;

/// Word `i` of the hello pattern.
pub const fn pattern(i: u64) -> u64 {
    let mut x = i.wrapping_add(1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^ (x >> 32)
}

/// FNV-1a, one byte at a time, continuing from `hash`.
pub const fn fnv1a_from(mut hash: u64, bytes: &[u8]) -> u64 {
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
        i += 1;
    }
    hash
}

/// FNV-1a of `bytes`.
pub const fn fnv1a(bytes: &[u8]) -> u64 {
    fnv1a_from(0xcbf2_9ce4_8422_2325, bytes)
}

/// What the guest reports in [`HELLO`]: FNV-1a of the pattern's words,
/// little-endian.
pub const fn hello_value() -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < HELLO_WORDS as u64 {
        hash = fnv1a_from(hash, &pattern(i).to_le_bytes());
        i += 1;
    }
    hash
}

/// The number in the guest's message.
pub const fn message_number() -> u64 {
    hello_value() % 1_000_000_007
}

/// The byte the vector probe puts in every lane of V`i`.
pub const fn vector_byte(i: usize) -> u8 {
    0x40 + i as u8
}
