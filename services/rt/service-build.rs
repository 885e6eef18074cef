//! The build script of every service crate under `services/` (each names it
//! with `build = "../rt/service-build.rs"`): links the service at the fixed
//! service IPA with the runtime's linker script.
fn main() {
    println!("cargo:rerun-if-changed=../rt/linker.ld");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("none") {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/../rt/linker.ld");
}
