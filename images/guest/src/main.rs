//! The protected-VM guest the test host runs.
//!
//! A small bare-metal program for a Moat protected VM. The VM starts at
//! EL1h at its entry IPA (`BASE_IPA` in `src/protocol.rs`) with the MMU off, no device
//! tree, no console and no interrupts; its memory is the pages the host
//! donated. It talks to the host only through hypercalls: the calls the core
//! serves (`GUEST_SHARE_HOST`, `GUEST_UNSHARE_HOST`, PSCI `SYSTEM_OFF`) and
//! calls the core passes to the host as exits (see `src/protocol.rs`, which
//! the test host shares).
//!
//! In its demo mode the guest says hello with a value it computed in its own
//! memory, shares a page with the host and exchanges messages through it,
//! tries to share a page it does not own, unshares its page, reads and writes
//! an address outside its memory (MMIO exits the host answers), reads the
//! allocation tag of a page the host tagged before donating it (MTE VMs
//! only), waits for an interrupt once and powers off. Other modes spin on a
//! shared page or loop on a hypercall, for the host's concurrency cases and
//! benchmarks; probe what the VM sees of MTE and of the features it lacks
//! (ID registers, the MTE system registers, whose Undefined Instruction
//! exceptions the guest catches at VBAR_EL1 + 0x200 and counts, tags on its
//! own memory, MTE registers kept across an exit); or power off with a page
//! still shared with the host. In console mode, run by `moat-vmm` under
//! Linux, it talks through the PL011 the VMM emulates from MMIO exits: a
//! greeting, one line read and echoed, power off.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(target_os = "none")]
mod guest;
#[cfg(target_os = "none")]
mod protocol;

#[cfg(not(target_os = "none"))]
fn main() {}
