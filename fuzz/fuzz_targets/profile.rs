//! Fuzz target `profile`: the hardware profile TOML and the IRQ names hw matches (body in ricochet::fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ricochet::fuzzing::profile(data));
