#![no_main]
//! libFuzzer entry for [`meshid_fuzz::registry`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid_fuzz::registry(data));
