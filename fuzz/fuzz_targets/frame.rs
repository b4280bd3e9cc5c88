//! Fuzz target `frame`: the Ethernet/VLAN/IPv4/IPv6/UDP frame view of the AF_XDP worker, and the reply it builds in place (body in ricochet::fuzzing).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ricochet::fuzzing::frame(data));
