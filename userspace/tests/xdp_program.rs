//! The XDP steering program on crafted frames through BPF_PROG_TEST_RUN: no interface needed.
//!
//! With no AF_XDP socket in the XSKMAP the program's redirect falls back to XDP_PASS, so a frame it
//! would steer shows up as PASS with the `no_socket` counter moved, while a frame for the kernel moves
//! `passed` and an impossible request is XDP_DROP with its reason counted.

mod common;

use etherparse::{PacketBuilder, VlanId};
use ricochet::core::Protocol;
use ricochet::xdp::action::{DROP, PASS};
use ricochet::xdp::maps::XdpStat;
use ricochet::xdp::{ProgramKind, XdpProgram};

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const SERVER: [u8; 4] = [198, 18, 0, 1];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn program() -> Option<XdpProgram> {
    if !common::require_root("loading XDP programs") {
        return None;
    }
    let listeners = vec![
        ("198.18.0.1:7777".parse().unwrap(), Protocol::Counter),
        ("198.18.0.1:7000".parse().unwrap(), Protocol::Echo),
        ("0.0.0.0:11111".parse().unwrap(), Protocol::Sockperf),
        ("[2001:db8::1]:7777".parse().unwrap(), Protocol::Counter),
    ];
    Some(
        XdpProgram::load(ProgramKind::Steer, &listeners)
            .expect("the program loads and passes the verifier"),
    )
}

fn udp4(port: u16, payload: &[u8]) -> Vec<u8> {
    udp4_from(40000, port, payload)
}

fn udp4_from(source_port: u16, port: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(CLIENT, SERVER, 64)
        .udp(source_port, port)
        .write(&mut out, payload)
        .unwrap();
    out
}

/// Runs one frame; returns the verdict and which counter moved (exactly one must).
fn run(prog: &mut XdpProgram, frame: &[u8]) -> (u32, XdpStat) {
    let before = prog.stats().unwrap();
    let mut out = vec![0u8; frame.len() + 256];
    let (verdict, _) = prog.test_run(frame, &mut out).unwrap();
    let after = prog.stats().unwrap();
    let moved: Vec<XdpStat> = XdpStat::ALL
        .into_iter()
        .filter(|s| after[*s as usize] != before[*s as usize])
        .collect();
    assert_eq!(
        moved.len(),
        1,
        "exactly one counter moves per frame, got {moved:?}"
    );
    assert_eq!(after[moved[0] as usize] - before[moved[0] as usize], 1);
    (verdict, moved[0])
}

#[test]
fn valid_requests_are_steered() {
    let Some(mut prog) = program() else { return };
    let counter = ricochet::wire::CounterRepr { value: 1 }.to_bytes();
    assert_eq!(
        run(&mut prog, &udp4(7777, &counter)),
        (PASS, XdpStat::NoSocket)
    );
    assert_eq!(
        run(&mut prog, &udp4(7000, b"any stimulus at all")),
        (PASS, XdpStat::NoSocket)
    );
    assert_eq!(run(&mut prog, &udp4(7000, b"")), (PASS, XdpStat::NoSocket));
    assert_eq!(
        run(&mut prog, &udp4(11111, &[0u8; 14])),
        (PASS, XdpStat::NoSocket)
    );
    assert_eq!(
        run(&mut prog, &udp4(11111, &[0u8; 1000])),
        (PASS, XdpStat::NoSocket)
    );
    // The hash is checked in userspace: 16 arbitrary bytes still go up (and are dropped there).
    assert_eq!(
        run(&mut prog, &udp4(7777, b"aaaaaaaaaaaaaaaa")),
        (PASS, XdpStat::NoSocket)
    );
}

#[test]
fn impossible_lengths_are_dropped_by_reason() {
    let Some(mut prog) = program() else { return };
    for len in (0..=40).filter(|&l| l != 16) {
        assert_eq!(
            run(&mut prog, &udp4(7777, &vec![0u8; len])),
            (DROP, XdpStat::DropWrongLength),
            "counter payload of {len}"
        );
    }
    for len in 0..14 {
        assert_eq!(
            run(&mut prog, &udp4(11111, &vec![0u8; len])),
            (DROP, XdpStat::DropTooShort),
            "sockperf payload of {len}"
        );
    }
}

#[test]
fn other_traffic_passes_to_the_kernel() {
    let Some(mut prog) = program() else { return };
    // Another port, another address.
    assert_eq!(
        run(&mut prog, &udp4(7778, &[0u8; 16])),
        (PASS, XdpStat::Passed)
    );
    let mut other_addr = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(CLIENT, [198, 18, 0, 9], 64)
        .udp(40000, 7777)
        .write(&mut other_addr, &[0u8; 16])
        .unwrap();
    assert_eq!(run(&mut prog, &other_addr), (PASS, XdpStat::Passed));
    // TCP and ICMP to the listener's port and address.
    let mut tcp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(CLIENT, SERVER, 64)
        .tcp(40000, 7777, 1, 1000)
        .write(&mut tcp, b"x")
        .unwrap();
    assert_eq!(run(&mut prog, &tcp), (PASS, XdpStat::Passed));
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv4(CLIENT, SERVER, 64)
        .icmpv4_echo_request(1, 1)
        .write(&mut icmp, b"ping")
        .unwrap();
    assert_eq!(run(&mut prog, &icmp), (PASS, XdpStat::Passed));
    // ARP (EtherType 0x0806) and an unknown EtherType.
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06]);
    arp.extend_from_slice(&[0u8; 28]);
    assert_eq!(run(&mut prog, &arp), (PASS, XdpStat::Passed));
    let mut unknown = arp.clone();
    unknown[12..14].copy_from_slice(&[0x88, 0xb5]);
    assert_eq!(run(&mut prog, &unknown), (PASS, XdpStat::Passed));
}

/// Sets the IPv4 flags/fragment field and fixes the header checksum.
fn with_frag(mut frame: Vec<u8>, frag: u16) -> Vec<u8> {
    frame[14 + 6..14 + 8].copy_from_slice(&frag.to_be_bytes());
    frame[14 + 10..14 + 12].fill(0);
    let h = etherparse::Ipv4HeaderSlice::from_slice(&frame[14..34])
        .unwrap()
        .to_header();
    frame[14 + 10..14 + 12].copy_from_slice(&h.calc_header_checksum().to_be_bytes());
    frame
}

#[test]
fn fragments_and_options() {
    let Some(mut prog) = program() else { return };
    let request = udp4(7777, &ricochet::wire::CounterRepr { value: 1 }.to_bytes());
    // First fragment (MF set, offset 0) for a listener: dropped; later fragments: the kernel's.
    assert_eq!(
        run(&mut prog, &with_frag(request.clone(), 0x2000)),
        (DROP, XdpStat::DropFragment)
    );
    assert_eq!(
        run(&mut prog, &with_frag(request.clone(), 0x0010)),
        (PASS, XdpStat::Passed)
    );
    // Don't-fragment alone is fine.
    assert_eq!(
        run(&mut prog, &with_frag(request.clone(), 0x4000)),
        (PASS, XdpStat::NoSocket)
    );
    // IPv4 options: for the kernel.
    let mut with_options = Vec::new();
    let mut ip =
        etherparse::Ipv4Header::new(24, 64, etherparse::IpNumber::UDP, CLIENT, SERVER).unwrap();
    ip.options = [1u8, 1, 1, 0][..].try_into().unwrap();
    ip.total_len = (ip.header_len() + 24) as u16;
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ip(etherparse::IpHeaders::Ipv4(ip, Default::default()))
        .udp(40000, 7777)
        .write(
            &mut with_options,
            &ricochet::wire::CounterRepr { value: 1 }.to_bytes(),
        )
        .unwrap();
    assert_eq!(run(&mut prog, &with_options), (PASS, XdpStat::Passed));
}

#[test]
fn vlan_tags_and_ipv6() {
    let Some(mut prog) = program() else { return };
    let payload = ricochet::wire::CounterRepr { value: 7 }.to_bytes();
    let mut single = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .single_vlan(VlanId::try_new(10).unwrap())
        .ipv4(CLIENT, SERVER, 64)
        .udp(40000, 7777)
        .write(&mut single, &payload)
        .unwrap();
    assert_eq!(run(&mut prog, &single), (PASS, XdpStat::NoSocket));
    let mut double = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .double_vlan(VlanId::try_new(10).unwrap(), VlanId::try_new(20).unwrap())
        .ipv4(CLIENT, SERVER, 64)
        .udp(40000, 7777)
        .write(&mut double, &payload)
        .unwrap();
    assert_eq!(run(&mut prog, &double), (PASS, XdpStat::NoSocket));
    let server6: [u8; 16] = "2001:db8::1"
        .parse::<std::net::Ipv6Addr>()
        .unwrap()
        .octets();
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv6(
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            server6,
            64,
        )
        .udp(40000, 7777)
        .write(&mut v6, &payload)
        .unwrap();
    assert_eq!(run(&mut prog, &v6), (PASS, XdpStat::NoSocket));
    let mut v6_short = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv6(
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            server6,
            64,
        )
        .udp(40000, 7777)
        .write(&mut v6_short, &payload[..10])
        .unwrap();
    assert_eq!(run(&mut prog, &v6_short), (DROP, XdpStat::DropWrongLength));
}

#[test]
fn truncated_frames_are_never_steered() {
    let Some(mut prog) = program() else { return };
    let full = udp4(7777, &ricochet::wire::CounterRepr { value: 1 }.to_bytes());
    // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header.
    for cut in 14..full.len() {
        let (verdict, stat) = run(&mut prog, &full[..cut]);
        assert_ne!(
            stat,
            XdpStat::NoSocket,
            "a frame cut at {cut} bytes must not reach userspace"
        );
        assert!(
            (verdict, stat) == (PASS, XdpStat::Passed)
                || (verdict, stat) == (DROP, XdpStat::DropTruncated),
            "cut at {cut}: {verdict} {stat:?}"
        );
    }
    // The IP header claims more than the frame holds: truncated, dropped.
    let mut lying = full.clone();
    lying.truncate(full.len() - 4);
    assert_eq!(run(&mut prog, &lying), (DROP, XdpStat::DropTruncated));
}

/// Regression (issue 9, item 1): a valid request from UDP source port 0 was steered to userspace. No
/// reply can be addressed to port 0, so it is dropped in XDP and counted under its own reason.
#[test]
fn source_port_zero_is_dropped() {
    let Some(mut prog) = program() else { return };
    let counter = ricochet::wire::CounterRepr { value: 1 }.to_bytes();
    for (port, payload) in [
        (7777, &counter[..]),
        (7000, &b"any stimulus"[..]),
        (11111, &[0u8; 14][..]),
    ] {
        assert_eq!(
            run(&mut prog, &udp4_from(0, port, payload)),
            (DROP, XdpStat::DropZeroSourcePort),
            "port {port}"
        );
    }
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv6(
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            SERVER6,
            64,
        )
        .udp(0, 7777)
        .write(&mut v6, &counter)
        .unwrap();
    assert_eq!(run(&mut prog, &v6), (DROP, XdpStat::DropZeroSourcePort));
    // Not for a listener: still the kernel's, whatever its source port.
    assert_eq!(
        run(&mut prog, &udp4_from(0, 7778, &counter)),
        (PASS, XdpStat::Passed)
    );
    // Source port 1 is an ordinary port.
    assert_eq!(
        run(&mut prog, &udp4_from(1, 7777, &counter)),
        (PASS, XdpStat::NoSocket)
    );
}

/// An IPv4 EtherType carrying a header whose version is not 4 (or IPv6 not 6) is not parsed as a
/// request: the kernel, which drops such packets, gets it (it used to be steered).
#[test]
fn wrong_ip_version_passes_to_the_kernel() {
    let Some(mut prog) = program() else { return };
    let counter = ricochet::wire::CounterRepr { value: 1 }.to_bytes();
    for version in [0u8, 5, 6, 15] {
        let mut frame = udp4(7777, &counter);
        frame[14] = (version << 4) | 5;
        assert_eq!(
            run(&mut prog, &frame),
            (PASS, XdpStat::Passed),
            "IPv4 version {version}"
        );
    }
    let mut v6 = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
        .ipv6(
            [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2],
            SERVER6,
            64,
        )
        .udp(40000, 7777)
        .write(&mut v6, &counter)
        .unwrap();
    v6[14] = 0x40 | (v6[14] & 0x0f);
    assert_eq!(
        run(&mut prog, &v6),
        (PASS, XdpStat::Passed),
        "IPv6 version 4"
    );
}
