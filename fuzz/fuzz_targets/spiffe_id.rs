#![no_main]
//! libFuzzer entry for [`meshid_fuzz::spiffe_id`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid_fuzz::spiffe_id(data));
