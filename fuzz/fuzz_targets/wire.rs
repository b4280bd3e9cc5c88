//! Fuzz target `wire`: the 16-byte counter frame, the sockperf header, the core and the stream decoder on arbitrary splits (body in ricochet::fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ricochet::fuzzing::wire(data));
