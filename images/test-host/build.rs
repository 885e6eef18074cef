//! Links the test host as a position-independent executable: the core loads
//! a host at a 2 MiB boundary of its choosing, so the test host relocates
//! itself at entry (see `src/entry.S`).
//!
//! It also carries the protected-VM guest (`images/guest`) as a raw binary:
//! `cargo xtask` builds the guest first and names the binary in
//! `MOAT_GUEST_BIN`. Without it (a plain `cargo clippy`) the blob is empty
//! and the test host's VM checks fail, saying so.
fn main() {
    println!("cargo:rerun-if-changed=linker.ld");
    println!("cargo:rerun-if-changed=src/entry.S");
    println!("cargo:rerun-if-env-changed=MOAT_GUEST_BIN");
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let guest = match std::env::var("MOAT_GUEST_BIN") {
        Ok(path) if !path.is_empty() => {
            println!("cargo:rerun-if-changed={path}");
            std::fs::read(&path).unwrap_or_else(|e| panic!("reading MOAT_GUEST_BIN {path}: {e}"))
        }
        _ => Vec::new(),
    };
    std::fs::write(out.join("guest.bin"), guest).expect("writing guest.bin to OUT_DIR");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("none") {
        return;
    }
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    println!("cargo:rustc-link-arg-bins=--pie");
    println!("cargo:rustc-link-arg-bins=-znotext");
}
