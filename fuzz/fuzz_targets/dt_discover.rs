//! libFuzzer entry point of the `dt_discover` target; its body is in the harness.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| (moat_fuzz::target("dt_discover")
    .expect("a harness target")
    .run)(data));
