#![no_main]
//! libFuzzer entry for [`meshid_fuzz::csr`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid_fuzz::csr(data));
