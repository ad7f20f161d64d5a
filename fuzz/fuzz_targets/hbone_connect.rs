#![no_main]
//! libFuzzer entry for [`meshid_fuzz::hbone_connect`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid_fuzz::hbone_connect(data));
