//! The Moat test host: a bare-metal EL1 program booted as the host.
//!
//! It checks, from the host's side, what the core promises: that it runs at
//! EL1 under the core, what the ID registers say, that SMCCC and PSCI answer
//! through the core, that its own memory works and the hypervisor's memory
//! answers with a synchronous external abort it can handle, that secondary
//! CPUs come up through the PSCI relay, and that SYSTEM_OFF ends the machine.
//! It also runs protected VMs with the guest it carries (`images/guest`) and
//! plays a hostile host against them (see `src/vm.rs`).
//! Each check prints one `test-host:` line; the last line is either
//! `test-host: PASS (N checks)` or `test-host: FAIL (...)`.
//!
//! With `moat.bench` on its command line it also measures the null
//! hypercall with the PMU's instruction counter and prints `bench: ...`
//! lines for `cargo xtask bench`.
#![cfg_attr(target_os = "none", no_std, no_main)]
#![deny(unsafe_op_in_unsafe_fn)]

#[cfg(target_os = "none")]
mod host;

#[cfg(not(target_os = "none"))]
fn main() {}
