//! A null hypervisor for the Linux boot benchmark.
//!
//! Firmware (here QEMU's `-kernel` loader) enters it at EL2 as it would enter
//! Linux. It programs EL2 so that nothing the host does traps and there is no
//! stage-2 translation, then enters the real kernel at EL1 with the firmware's
//! device tree. A boot through it costs exactly what the emulator charges for
//! having EL2 at all; `cargo xtask bench` sets that beside a boot under Moat
//! to separate Moat's own cost from the emulator's. The whole program is
//! `stub.S`; the kernel's load address is the word at offset 0x40.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
core::arch::global_asm!(include_str!("stub.S"));

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[cfg(not(target_os = "none"))]
fn main() {
    // The stub only runs at EL2; on the development machine this binary
    // exists so the workspace builds as one.
}
