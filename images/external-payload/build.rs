fn main() {
    println!("cargo:rerun-if-changed=src/payload.S");
    println!("cargo:rerun-if-changed=linker.ld");
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
}
