#![no_main]
//! libFuzzer entry for [`meshid_fuzz::sds_request`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid_fuzz::sds_request(data));
