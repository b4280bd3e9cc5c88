//! Fuzz target `spec`: listen SPECs and CPU lists (body in ricochet::fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ricochet::fuzzing::spec(data));
