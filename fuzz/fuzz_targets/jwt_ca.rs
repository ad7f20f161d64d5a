#![no_main]
//! libFuzzer entry for [`meshid_fuzz::jwt_ca`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid_fuzz::jwt_ca(data));
