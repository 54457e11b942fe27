#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tunfwd::fuzz::wg_receive(data));
