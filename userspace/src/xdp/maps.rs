//! Map records shared with the XDP program, mirroring `ebpf/ricochet.h` byte for byte.
//!
//! A test parses the header and compares it with these definitions, so they cannot drift apart.
#![allow(unsafe_code)]

use std::net::{IpAddr, SocketAddr};

use crate::core::Protocol;

/// `struct listener_key`: destination address and port as they appear on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct ListenerKey {
    pub family: u8,
    /// The IP protocol number of the listener's transport: 17 (UDP) or 6 (TCP).
    pub transport: u8,
    /// Network byte order.
    pub port_be: u16,
    pub addr: [u8; 16],
}

/// `struct listener_value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct ListenerValue {
    pub protocol: u8,
    pub pad: [u8; 3],
}

// SAFETY: both are repr(C) structs of integers with no padding holes the kernel could not fill
// (explicit pad fields), so any byte pattern is a valid value.
unsafe impl aya::Pod for ListenerKey {}
// SAFETY: as above.
unsafe impl aya::Pod for ListenerValue {}

impl ListenerKey {
    /// The key for a UDP listener; an unspecified address (0.0.0.0 or ::) is the wildcard.
    pub fn new(addr: SocketAddr) -> ListenerKey {
        ListenerKey::with_transport(addr, TRANSPORT_UDP)
    }

    /// The key for a TCP listener (steered to TCP-lite in afxdp mode).
    pub fn tcp(addr: SocketAddr) -> ListenerKey {
        ListenerKey::with_transport(addr, TRANSPORT_TCP)
    }

    fn with_transport(addr: SocketAddr, transport: u8) -> ListenerKey {
        let mut bytes = [0u8; 16];
        let family = match addr.ip() {
            IpAddr::V4(v4) => {
                bytes[..4].copy_from_slice(&v4.octets());
                4
            }
            IpAddr::V6(v6) => {
                bytes.copy_from_slice(&v6.octets());
                6
            }
        };
        ListenerKey {
            family,
            transport,
            port_be: addr.port().to_be(),
            addr: bytes,
        }
    }
}

/// `listener_key.transport` of a UDP and a TCP listener (their IP protocol numbers).
pub const TRANSPORT_UDP: u8 = 17;
pub const TRANSPORT_TCP: u8 = 6;

/// The protocol number the XDP program uses (`PROTO_*` in ricochet.h).
pub const fn protocol_id(protocol: Protocol) -> u8 {
    match protocol {
        Protocol::Counter => 0,
        Protocol::Echo => 1,
        Protocol::Sockperf => 2,
    }
}

impl ListenerValue {
    pub fn new(protocol: Protocol) -> ListenerValue {
        ListenerValue {
            protocol: protocol_id(protocol),
            pad: [0; 3],
        }
    }
}

/// The longest UDP datagram, header included, the responder answers itself
/// (`RESPONDER_MAX_UDP_LEN` in ricochet.h); it passes longer ones to the kernel.
pub const RESPONDER_MAX_UDP_LEN: usize = 4096;

/// Slots of the per-CPU `xdp_stats` array (`enum xdp_stat` in ricochet.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum XdpStat {
    Steered = 0,
    NoSocket = 1,
    Passed = 2,
    DropWrongLength = 3,
    DropTooShort = 4,
    DropTruncated = 5,
    DropFragment = 6,
    Tx = 7,
    DropBadHash = 8,
    DropZeroSourcePort = 9,
    PassedTooLong = 10,
    TcpReplies = 11,
    TcpSegmentsTx = 12,
    TcpHandshakes = 13,
    TcpClosed = 14,
    TcpCookieFailures = 15,
    TcpRetransmitted = 16,
    TcpOutOfOrder = 17,
    TcpResetsSent = 18,
    TcpTableFull = 19,
    TcpIdleClosed = 20,
    TcpRejected = 21,
}

impl XdpStat {
    pub const ALL: [XdpStat; 22] = [
        XdpStat::Steered,
        XdpStat::NoSocket,
        XdpStat::Passed,
        XdpStat::DropWrongLength,
        XdpStat::DropTooShort,
        XdpStat::DropTruncated,
        XdpStat::DropFragment,
        XdpStat::Tx,
        XdpStat::DropBadHash,
        XdpStat::DropZeroSourcePort,
        XdpStat::PassedTooLong,
        XdpStat::TcpReplies,
        XdpStat::TcpSegmentsTx,
        XdpStat::TcpHandshakes,
        XdpStat::TcpClosed,
        XdpStat::TcpCookieFailures,
        XdpStat::TcpRetransmitted,
        XdpStat::TcpOutOfOrder,
        XdpStat::TcpResetsSent,
        XdpStat::TcpTableFull,
        XdpStat::TcpIdleClosed,
        XdpStat::TcpRejected,
    ];
    pub const COUNT: usize = Self::ALL.len();

    /// The name in ricochet.h without its `STAT_` prefix, lowercased: used in output and metrics.
    pub const fn as_str(self) -> &'static str {
        match self {
            XdpStat::Steered => "steered",
            XdpStat::NoSocket => "no_socket",
            XdpStat::Passed => "passed",
            XdpStat::DropWrongLength => "drop_wrong_length",
            XdpStat::DropTooShort => "drop_too_short",
            XdpStat::DropTruncated => "drop_truncated",
            XdpStat::DropFragment => "drop_fragment",
            XdpStat::Tx => "tx",
            XdpStat::DropBadHash => "drop_bad_hash",
            XdpStat::DropZeroSourcePort => "drop_zero_source_port",
            XdpStat::PassedTooLong => "passed_too_long",
            XdpStat::TcpReplies => "tcp_replies",
            XdpStat::TcpSegmentsTx => "tcp_segments_tx",
            XdpStat::TcpHandshakes => "tcp_handshakes",
            XdpStat::TcpClosed => "tcp_closed",
            XdpStat::TcpCookieFailures => "tcp_cookie_failures",
            XdpStat::TcpRetransmitted => "tcp_retransmitted",
            XdpStat::TcpOutOfOrder => "tcp_out_of_order",
            XdpStat::TcpResetsSent => "tcp_resets_sent",
            XdpStat::TcpTableFull => "tcp_table_full",
            XdpStat::TcpIdleClosed => "tcp_idle_closed",
            XdpStat::TcpRejected => "tcp_rejected",
        }
    }

    /// The core drop reason this statistic counts, if it is a drop.
    pub const fn drop_reason(self) -> Option<crate::stats::DropReason> {
        use crate::stats::DropReason;
        match self {
            XdpStat::DropWrongLength => Some(DropReason::WrongLength),
            XdpStat::DropTooShort => Some(DropReason::TooShort),
            XdpStat::DropTruncated => Some(DropReason::Truncated),
            XdpStat::DropFragment => Some(DropReason::Fragment),
            XdpStat::DropBadHash => Some(DropReason::BadHash),
            XdpStat::DropZeroSourcePort => Some(DropReason::ZeroSourcePort),
            _ => None,
        }
    }
}

/// `struct tcp_flow`: the key of the responder's TCP-lite connection table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct TcpFlowKey {
    pub client: [u8; 16],
    pub server: [u8; 16],
    /// Host byte order.
    pub client_port: u16,
    pub server_port: u16,
    pub ipv6: u8,
    pub pad: [u8; 3],
}

/// `struct tcp_settings`: the cookie secret and the limits, set at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(C)]
pub struct TcpProgramSettings {
    pub k0: u64,
    pub k1: u64,
    pub idle_timeout: u32,
    pub max_mss: u16,
    pub pad: u16,
}

/// `struct tcp_conn`, opaque: userspace only counts and deletes entries.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct TcpConnRecord(pub [u8; TCP_CONN_SIZE]);

/// The size of `struct tcp_conn`: 40 bytes of state, a 32-byte carry and the reply ring.
pub const TCP_CONN_SIZE: usize = 40 + 32 + 2 * TCP_OUT_CAP;
/// `TCP_OUT_CAP` in ricochet.h: reply bytes a connection keeps until acknowledged.
pub const TCP_OUT_CAP: usize = 1024;

// SAFETY: repr(C) structs of integers and byte arrays with explicit padding: any byte pattern is a
// valid value, and the kernel fills every byte.
unsafe impl aya::Pod for TcpFlowKey {}
// SAFETY: as above.
unsafe impl aya::Pod for TcpProgramSettings {}
// SAFETY: a byte array.
unsafe impl aya::Pod for TcpConnRecord {}

#[cfg(test)]
mod test {
    use super::*;

    const HEADER: &str = include_str!("../../../ebpf/ricochet.h");

    fn define(name: &str) -> u64 {
        HEADER
            .lines()
            .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} not in ricochet.h"))
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    }

    #[test]
    fn stats_match_the_header() {
        for stat in XdpStat::ALL {
            let name = format!("STAT_{}", stat.as_str().to_uppercase());
            let line = HEADER
                .lines()
                .find(|l| l.trim_start().starts_with(&format!("{name} =")))
                .unwrap_or_else(|| panic!("{name} missing from ricochet.h"));
            let value: usize = line
                .split('=')
                .nth(1)
                .unwrap()
                .split(',')
                .next()
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(value, stat as usize, "{name}");
        }
        let count = HEADER.lines().find(|l| l.contains("STAT_COUNT =")).unwrap();
        assert!(count.contains(&format!("= {},", XdpStat::COUNT)), "{count}");
    }

    #[test]
    fn drop_statistics_are_named_after_their_reason() {
        for stat in XdpStat::ALL {
            match stat.drop_reason() {
                Some(reason) => assert_eq!(stat.as_str(), format!("drop_{}", reason.as_str())),
                None => assert!(!stat.as_str().starts_with("drop_"), "{stat:?}"),
            }
        }
    }

    #[test]
    fn limits_match_the_header() {
        assert_eq!(
            define("RESPONDER_MAX_UDP_LEN"),
            RESPONDER_MAX_UDP_LEN as u64
        );
        assert_eq!(define("TCP_OUT_CAP"), TCP_OUT_CAP as u64);
    }

    #[test]
    fn tcp_records_match_the_header() {
        assert!(HEADER.contains(
            "\t__u16 client_port;\n\t__u16 server_port;\n\t__u8 ipv6;\n\t__u8 pad[3];\n};"
        ));
        assert_eq!(std::mem::size_of::<TcpFlowKey>(), 40);
        assert!(HEADER.contains("\t__u32 idle_timeout;\n\t__u16 max_mss;\n\t__u16 pad;\n};"));
        assert_eq!(std::mem::size_of::<TcpProgramSettings>(), 24);
        // struct tcp_conn: six u32, three u16, three u8, pad[3], a u32, carry[32], out[2 * cap].
        let conn = &HEADER[HEADER.find("struct tcp_conn {").unwrap()..];
        let conn = &conn[..conn.find("};").unwrap()];
        let fields: Vec<&str> = conn
            .lines()
            .skip(1)
            .filter_map(|l| l.trim().split(';').next())
            .filter(|f| !f.is_empty())
            .collect();
        let size: usize = fields
            .iter()
            .map(|f| {
                let width = match f.split_whitespace().next().unwrap() {
                    "__u32" => 4,
                    "__u16" => 2,
                    "__u8" => 1,
                    other => panic!("unexpected type {other}"),
                };
                let count = match f.split_once('[') {
                    Some((_, n)) => match n.trim_end_matches(']') {
                        "2 * TCP_OUT_CAP" => 2 * TCP_OUT_CAP,
                        n => n.parse().unwrap(),
                    },
                    None => 1,
                };
                width * count
            })
            .sum();
        assert_eq!(size, TCP_CONN_SIZE);
    }

    #[test]
    fn protocols_match_the_header() {
        assert_eq!(
            define("PROTO_COUNTER"),
            protocol_id(Protocol::Counter) as u64
        );
        assert_eq!(define("PROTO_ECHO"), protocol_id(Protocol::Echo) as u64);
        assert_eq!(
            define("PROTO_SOCKPERF"),
            protocol_id(Protocol::Sockperf) as u64
        );
    }

    #[test]
    fn key_layout_matches_the_header() {
        // struct listener_key { u8 family; u8 transport; be16 port; u8 addr[16]; } = 20 bytes.
        assert!(
            HEADER.contains("__u8 family;\n\t__u8 transport;\n\t__be16 port;\n\t__u8 addr[16];")
        );
        assert_eq!(std::mem::size_of::<ListenerKey>(), 20);
        assert_eq!(std::mem::size_of::<ListenerValue>(), 4);
        let key = ListenerKey::new("198.18.0.1:7777".parse().unwrap());
        assert_eq!(key.family, 4);
        assert_eq!(key.port_be, 7777u16.to_be());
        assert_eq!(&key.addr[..5], &[198, 18, 0, 1, 0]);
    }
}
