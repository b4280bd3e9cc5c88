//! Fuzz target `tcp_lite`: TCP-lite's state machine on arbitrary segment sequences (body in ricochet::fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ricochet::fuzzing::tcp_lite(data));
