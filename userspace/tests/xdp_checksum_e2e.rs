//! The in-kernel responder's UDP checksums on long datagrams, end to end in a fresh veth lab, verified
//! from a capture on the client's interface (an AF_PACKET socket), never from the client's socket:
//! on veth the client's kernel does not check the checksum of what it receives, a real NIC client does.
//!
//! Regression (issue 9, item 2): echoes longer than about 1,500 bytes left `ricochet_respond` with a
//! wrong UDP checksum. Datagrams longer than the program checksums go to the kernel's socket path.

mod common;

use std::io::Read;
use std::net::UdpSocket;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};

const ECHO_PORT: u16 = 7000;
const ETH_P_ALL: u16 = 0x0003;

fn set_mtu(ns: &str, iface: &str, mtu: u32) {
    let status = Command::new("ip")
        .args([
            "-n",
            ns,
            "link",
            "set",
            "dev",
            iface,
            "mtu",
            &mtu.to_string(),
        ])
        .status()
        .expect("run ip");
    assert!(status.success(), "cannot set the MTU of {iface} to {mtu}");
}

fn start(lab: &LabNet, xdp_mode: &str) -> Server {
    let echo = format!("echo+udp://{LAB_SERVER}:{ECHO_PORT}");
    Server::start_in(
        Some(&lab.server_ns),
        &[
            "--mode",
            "xdp",
            "--iface",
            &lab.server_if,
            "--xdp-mode",
            xdp_mode,
            "--listen",
            &echo,
            "--max-datagram",
            "9000",
        ],
    )
}

/// `key=value` of the exit report's `xdp` line.
fn xdp_field(output: &str, key: &str) -> u64 {
    let line = output
        .lines()
        .find(|l| l.starts_with("xdp "))
        .unwrap_or_else(|| panic!("no xdp line in:\n{output}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        .parse()
        .unwrap()
}

/// A reply seen on the wire: its UDP payload length and whether its checksum verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Captured {
    payload_len: usize,
    checksum: u16,
    checksum_ok: bool,
}

/// The UDP datagram from the echo listener in a captured frame, if that is what it is.
fn reply_in(frame: &[u8]) -> Option<Captured> {
    let packet = SlicedPacket::from_ethernet(frame).ok()?;
    let (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) =
        (&packet.net, &packet.transport)
    else {
        return None;
    };
    if udp.source_port() != ECHO_PORT || ip.header().source() != [198, 18, 0, 1] {
        return None;
    }
    let expected = udp
        .to_header()
        .calc_checksum_ipv4(&ip.header().to_header(), udp.payload())
        .ok()?;
    Some(Captured {
        payload_len: udp.payload().len(),
        checksum: udp.checksum(),
        checksum_ok: udp.checksum() == expected,
    })
}

/// Sends one echo request of each length from the client namespace and returns each reply as
/// captured on the client's interface, with whether the client's socket then received it intact (a
/// client kernel that checks may drop a reply whose checksum is wrong).
fn echo_and_capture(lab: &LabNet, lengths: &'static [usize]) -> Vec<(Captured, bool)> {
    in_netns(&lab.client_ns, move || {
        let capture = socket2::Socket::new(
            socket2::Domain::PACKET,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(i32::from(ETH_P_ALL.to_be()))),
        )
        .expect("an AF_PACKET socket (needs root)");
        capture
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.connect(addr(ECHO_PORT)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut reply = vec![0u8; 10_000];
        lengths
            .iter()
            .map(|&len| {
                let request: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                socket.send(&request).unwrap();
                let captured = captured_reply(&capture, len);
                let delivered = socket
                    .recv(&mut reply)
                    .is_ok_and(|n| reply[..n] == request[..]);
                (captured, delivered)
            })
            .collect()
    })
    .join()
    .unwrap()
}

/// Reads the capture until the reply carrying `len` payload bytes shows up (within 5 s).
fn captured_reply(mut capture: &socket2::Socket, len: usize) -> Captured {
    let deadline = Instant::now() + TIMEOUT;
    let mut frame = vec![0u8; 65_536];
    while Instant::now() < deadline {
        let Ok(n) = capture.read(&mut frame) else {
            continue;
        };
        if let Some(reply) = reply_in(&frame[..n]).filter(|r| r.payload_len == len) {
            return reply;
        }
    }
    panic!("the reply of {len} bytes never showed up in the capture");
}

const NATIVE_LENGTHS: &[usize] = &[1472, 1473, 2000, 3000];

#[test]
fn long_echoes_leave_with_valid_checksums() {
    let Some(lab) = LabNet::create("c", 1) else {
        return;
    };
    // Native XDP on veth allows an MTU up to about 3,500.
    set_mtu(&lab.server_ns, &lab.server_if, 3100);
    set_mtu(&lab.client_ns, &lab.client_if, 3100);
    let server = start(&lab, "native");
    let captured = echo_and_capture(&lab, NATIVE_LENGTHS);
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    for (len, (reply, delivered)) in NATIVE_LENGTHS.iter().zip(&captured) {
        assert!(
            reply.checksum != 0 && reply.checksum_ok,
            "the echo of {len} bytes left with a wrong UDP checksum: {reply:?}"
        );
        assert!(
            delivered,
            "the client's socket did not get the echo of {len} bytes"
        );
    }
    assert_eq!(
        xdp_field(&output, "tx"),
        NATIVE_LENGTHS.len() as u64,
        "the XDP program answered every echo itself:\n{output}"
    );
    assert_eq!(xdp_field(&output, "passed_too_long"), 0);
}

#[test]
fn echoes_longer_than_the_program_checksums_are_answered_by_the_kernel() {
    let Some(lab) = LabNet::create("g", 1) else {
        return;
    };
    // Native XDP refuses an MTU this large: the client's XDP_PASS program goes, the responder runs
    // in generic mode, whose XDP_TX reaches a peer without a program.
    let status = Command::new("ip")
        .args([
            "-n",
            &lab.client_ns,
            "link",
            "set",
            "dev",
            &lab.client_if,
            "xdp",
            "off",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    set_mtu(&lab.server_ns, &lab.server_if, 6000);
    set_mtu(&lab.client_ns, &lab.client_if, 6000);
    let server = start(&lab, "generic");
    let captured = echo_and_capture(&lab, &[3000, 4089, 5000]);
    let (ok, output) = server.terminate();
    assert!(ok, "{output}");
    // The program answered 3,000 bytes itself; 4,089 bytes (a 4,097-byte datagram) and 5,000 went to
    // the kernel, whose veth leaves the checksum to an offload the capture does not see.
    assert!(captured[0].0.checksum_ok, "{:?}", captured[0]);
    for (len, (_, delivered)) in [3000, 4089, 5000].iter().zip(&captured) {
        assert!(
            delivered,
            "the client's socket did not get the echo of {len} bytes"
        );
    }
    assert_eq!(xdp_field(&output, "tx"), 1, "{output}");
    assert_eq!(xdp_field(&output, "passed_too_long"), 2, "{output}");
}
