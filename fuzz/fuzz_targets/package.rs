//! libFuzzer entry point of the `package` target; its body is in the harness.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| (moat_fuzz::target("package")
    .expect("a harness target")
    .run)(data));
