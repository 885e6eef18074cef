//! libFuzzer entry point of the `ledger_wire` target; its body is in the harness.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| (moat_fuzz::target("ledger_wire")
    .expect("a harness target")
    .run)(data));
