//! libFuzzer entry point of the `hostdt_rewrite` target; its body is in the harness.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| (moat_fuzz::target("hostdt_rewrite")
    .expect("a harness target")
    .run)(data));
