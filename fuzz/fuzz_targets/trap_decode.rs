//! libFuzzer entry point of the `trap_decode` target; its body is in the harness.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| (moat_fuzz::target("trap_decode")
    .expect("a harness target")
    .run)(data));
