//! Links the core at its load address with its own linker script. The load
//! address is a property of the board (QEMU virt loads an arm64 Image at
//! RAM base + 2 MiB) and can be overridden with MOAT_LOAD_ADDRESS.
fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=src/arch/entry.S");
    println!("cargo:rerun-if-changed=src/arch/vectors.S");
    println!("cargo:rerun-if-env-changed=MOAT_LOAD_ADDRESS");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("none") {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let load = std::env::var("MOAT_LOAD_ADDRESS").unwrap_or_else(|_| "0x40200000".into());
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    println!("cargo:rustc-link-arg-bins=--defsym=MOAT_LOAD_ADDRESS={load}");
}
