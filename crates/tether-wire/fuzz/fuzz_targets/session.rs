#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tether_wire_fuzz::session_body(data));
