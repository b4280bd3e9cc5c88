//! Fuzz target `http`: the HTTP request parser and the router, requests back to back (body in ricochet::fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ricochet::fuzzing::http(data));
