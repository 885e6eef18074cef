//! See `Cargo.toml`: the whole program is `payload.S`.
#![no_std]
#![no_main]

core::arch::global_asm!(include_str!("payload.S"));

#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}
