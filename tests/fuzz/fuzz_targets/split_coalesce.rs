#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tunfwd::fuzz::split_coalesce(data));
