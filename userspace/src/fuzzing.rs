//! Fuzz target bodies: each takes arbitrary bytes, runs one of ricochet's parsers the way ricochet
//! runs it, and panics only when an invariant breaks. The cargo-fuzz targets in `fuzz/` are one-line
//! calls into this module, and `tests/fuzz_regressions.rs` replays every saved input through the
//! same functions, so a crash input saved under `fuzz/regressions/TARGET/` is a regression test.
//!
//! Not part of ricochet's interface; allocation here is fine (nothing runs on a packet path).
#![doc(hidden)]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use crate::afxdp;
use crate::afxdp::frame::{Listeners, UdpFrame, Verdict};
use crate::core::{classify, Batch, Classified, Counter, LocalCounter, Protocol, StreamDecoder};
use crate::http::request::{self, Parse};
use crate::http::routes::{self, Access, Request, Routed};
use crate::http::state::AppState;
use crate::spec::{format_duration, parse_duration, CpuList, ListenSpec};
use crate::stats::WorkerStats;
use crate::wire::{value_hash, CounterRepr, SockperfHeader, FRAME_LEN, SOCKPERF_HEADER_LEN};

/// A fuzz target's body: arbitrary bytes in, a panic when an invariant breaks.
pub type Target = fn(&[u8]);

/// Every target by name: the directory names under `fuzz/corpus/` and `fuzz/regressions/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("wire", wire),
    ("frame", frame),
    ("http", http),
    ("profile", profile),
    ("spec", spec),
    ("tcp_lite", tcp_lite),
];

const PROTOCOLS: [Protocol; 3] = [Protocol::Counter, Protocol::Echo, Protocol::Sockperf];

/// The 16-byte counter frame, the sockperf header and the core: datagram verification and replies,
/// and the stream decoder on arbitrary splits of the same bytes.
pub fn wire(data: &[u8]) {
    if let Ok(repr) = CounterRepr::parse_bytes(data) {
        assert_eq!(data.len(), FRAME_LEN);
        assert_eq!(&repr.to_bytes()[..], data, "emit(parse(x)) == x");
        assert_eq!(
            u64::from_be_bytes(data[8..].try_into().unwrap()),
            value_hash(repr.value)
        );
    }
    if let Ok(header) = SockperfHeader::new_checked(data) {
        assert!(data.len() >= SOCKPERF_HEADER_LEN);
        let mut pong = data.to_vec();
        SockperfHeader::new_checked(&mut pong[..])
            .unwrap()
            .make_pong();
        assert_eq!(u16::from_be_bytes([pong[8], pong[9]]), header.flags() & !1);
        assert_eq!((&pong[..8], &pong[10..]), (&data[..8], &data[10..]));
    }
    for protocol in PROTOCOLS {
        datagram(protocol, data);
    }
    // The first byte picks the protocol and seeds the split sizes; the rest is the stream.
    if let Some((&seed, stream)) = data.split_first() {
        let protocol = PROTOCOLS[usize::from(seed) % 3];
        let whole = decode_stream(protocol, stream, &[stream.len()]);
        let sizes = split_sizes(seed, stream.len());
        assert_eq!(
            decode_stream(protocol, stream, &sizes),
            whole,
            "{protocol} frames split as {sizes:?} decode as if read at once"
        );
    }
}

/// One datagram through the core, as the kernel path answers it: a reply only for a valid
/// request, never longer than the request, and a counter reply that is a valid frame.
fn datagram(protocol: Protocol, data: &[u8]) {
    let stats = WorkerStats::default();
    let counter = LocalCounter::new(0);
    let mut batch = Batch::new(&stats);
    let classified = classify(protocol, data);
    let ticket = batch.admit(protocol, data);
    assert_eq!(ticket.is_reply(), classified.is_ok());
    let commit = batch.commit(&counter);
    let mut out = vec![0u8; data.len().max(FRAME_LEN)];
    let n = commit.write_reply(ticket, data, &mut out);
    assert!(n <= data.len(), "a reply is never longer than its request");
    if let Ok(Classified::Counter(increment)) = classified {
        let reply = CounterRepr::parse_bytes(&out[..n]).expect("a counter reply is a valid frame");
        assert_eq!(reply.value, increment);
        assert_eq!(counter.load(), increment);
    }
    let mut in_place = data.to_vec();
    let m = commit.write_reply_in_place(ticket, &mut in_place);
    assert_eq!(
        (m, &in_place[..m]),
        (n, &out[..n]),
        "both reply paths agree"
    );
}

/// Chunk sizes from 1 to 40 bytes covering `len`, from a small xorshift seeded by `seed`.
fn split_sizes(seed: u8, len: usize) -> Vec<usize> {
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    let mut sizes = Vec::new();
    let mut covered = 0;
    while covered < len {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let size = (state % 40 + 1) as usize;
        sizes.push(size.min(len - covered));
        covered += size;
    }
    sizes
}

/// Replies, the number of requests answered and the error that closed the stream, with the
/// stream read in chunks of `sizes` bytes.
fn decode_stream(
    protocol: Protocol,
    stream: &[u8],
    sizes: &[usize],
) -> (Vec<u8>, u32, Option<crate::stats::DropReason>) {
    let stats = WorkerStats::default();
    let counter = LocalCounter::new(0);
    let mut decoder = StreamDecoder::default();
    let mut replies = Vec::new();
    let mut answered = 0;
    let mut rest = stream;
    for &size in sizes {
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        rest = tail;
        let mut out = vec![0u8; chunk.len() + FRAME_LEN];
        let output = decoder.feed(protocol, chunk, &mut out, &stats, &counter);
        assert!(output.reply_len <= chunk.len() + FRAME_LEN);
        replies.extend_from_slice(&out[..output.reply_len]);
        // Echo answers each read as one reply, so only the bytes must not depend on the split.
        if protocol != Protocol::Echo {
            answered += output.replies;
        }
        if output.error.is_some() {
            return (replies, answered, output.error);
        }
    }
    assert!(
        replies.len() <= stream.len(),
        "replies are never longer than the requests"
    );
    (replies, answered, None)
}

/// Listeners on every address of both families: counter on 7777, echo on 7000, sockperf on 11111
/// (the ports of the seed frames).
fn listeners() -> &'static Listeners {
    static LISTENERS: OnceLock<Listeners> = OnceLock::new();
    LISTENERS.get_or_init(|| {
        let mut entries = Vec::new();
        for ip in ["0.0.0.0", "::"] {
            let ip: IpAddr = ip.parse().unwrap();
            for (port, protocol) in [(7777, Protocol::Counter), (7000, Protocol::Echo)] {
                entries.push((SocketAddr::new(ip, port), protocol));
            }
            entries.push((SocketAddr::new(ip, 11111), Protocol::Sockperf));
        }
        Listeners::new(&entries)
    })
}

/// The Ethernet/VLAN/IPv4/IPv6/UDP frame view the AF_XDP worker uses: classify the frame as the XDP
/// programs do, answer a request through the core and turn the frame into its reply in place. The
/// reply is never longer than the frame, swaps the ports, carries exactly the reply payload, and its
/// UDP checksum is the one etherparse computes independently.
pub fn frame(data: &[u8]) {
    let Verdict::Request {
        frame: located,
        protocol,
    } = afxdp::frame::classify(data, listeners())
    else {
        return;
    };
    let payload = located.payload_offset..located.payload_offset + located.payload_len;
    assert!(
        payload.end <= data.len(),
        "the payload lies inside the frame"
    );
    assert_eq!(located.check(data, protocol), Ok(()));
    assert_eq!(
        located.payload_len + 8,
        located.udp_len(),
        "the whole datagram"
    );
    let source = located
        .source_port(data)
        .expect("a located frame has ports");
    let (_, destination) = located.destination(data).expect("and addresses");
    assert_ne!(source, 0, "port 0 is never answered");
    let stats = WorkerStats::default();
    let mut batch = Batch::new(&stats);
    let ticket = batch.admit(protocol, &data[payload.clone()]);
    let commit = batch.commit(&LocalCounter::new(0));
    if !ticket.is_reply() {
        return;
    }
    let mut reply = data.to_vec();
    let reply_len = commit.write_reply_in_place(ticket, &mut reply[payload.clone()]);
    let frame_len = located.into_reply(&mut reply, reply_len);
    assert!(
        frame_len <= data.len(),
        "a reply is never longer than its frame"
    );
    let reply = &reply[..frame_len];
    let again = UdpFrame::locate(reply).expect("the reply is a UDP frame");
    assert_eq!(again.source_port(reply), Some(destination));
    assert_eq!(again.destination(reply).map(|(_, port)| port), Some(source));
    assert_eq!(
        &reply[again.payload_offset..][..again.payload_len],
        &reply[payload]
    );
    assert_eq!(udp_checksum(reply), Some(etherparse_checksum(reply)));
}

/// The UDP checksum field of a frame, as etherparse reads it.
fn udp_checksum(frame: &[u8]) -> Option<u16> {
    match etherparse::SlicedPacket::from_ethernet(frame)
        .ok()?
        .transport?
    {
        etherparse::TransportSlice::Udp(udp) => Some(udp.checksum()),
        _ => None,
    }
}

/// The UDP checksum etherparse computes for a frame's datagram.
fn etherparse_checksum(frame: &[u8]) -> u16 {
    let packet =
        etherparse::SlicedPacket::from_ethernet(frame).expect("etherparse reads the reply");
    let Some(etherparse::TransportSlice::Udp(udp)) = packet.transport else {
        panic!("etherparse finds the reply's UDP header");
    };
    let header = udp.to_header();
    match packet.net.expect("an IP header") {
        etherparse::NetSlice::Ipv4(ip) => header
            .calc_checksum_ipv4(&ip.header().to_header(), udp.payload())
            .unwrap(),
        etherparse::NetSlice::Ipv6(ip) => header
            .calc_checksum_ipv6(&ip.header().to_header(), udp.payload())
            .unwrap(),
        other => panic!("the reply is IP: {other:?}"),
    }
}

/// The state every HTTP input is routed against (the counter keeps what POSTs add).
fn app_state() -> &'static AppState {
    static STATE: OnceLock<AppState> = OnceLock::new();
    STATE.get_or_init(|| {
        AppState::new(
            "kernel",
            serde_json::json!({}),
            Arc::new(LocalCounter::new(0)),
        )
    })
}

/// The HTTP request path: requests parsed back to back from the front of the bytes, as a
/// pipelining client sends them, each routed on a default state.
pub fn http(data: &[u8]) {
    let state = app_state();
    let access = Access { token: None };
    let mut rest = data;
    // Each complete request takes at least one byte, so this ends; 64 bounds slow inputs.
    for _ in 0..64 {
        match request::parse(rest) {
            Parse::Partial => {
                assert!(rest.len() < request::MAX_HEAD + request::MAX_BODY);
                return;
            }
            Parse::Reject { status, .. } => {
                assert!((400..600).contains(&status), "{status}");
                return;
            }
            Parse::Complete { head, len } => {
                assert!(len > 0 && len <= rest.len());
                assert!(head.body.len() <= request::MAX_BODY);
                assert_eq!(
                    request::parse(&rest[..len]),
                    Parse::Complete { head, len },
                    "a request parses the same without what follows it"
                );
                let request = Request {
                    head,
                    local_peer: true,
                };
                check_routed(routes::route(&request, state, &access));
                rest = &rest[len..];
            }
        }
    }
}

fn check_routed(routed: Routed) {
    match routed {
        Routed::Respond(response) => {
            assert!((200..600).contains(&response.status), "{}", response.status);
            assert!(!routes::reason_phrase(response.status).is_empty());
        }
        Routed::Profile { seconds, .. } => assert!((1..=60).contains(&seconds)),
    }
}

/// The hardware profile TOML, and the /proc/interrupts names `hw` matches queues by.
pub fn profile(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = crate::hw::Profile::parse(text) {
        assert!(!p.queues.is_empty());
        assert!(p.queues.iter().all(|q| q.id < p.interface.channels));
        assert!(!p.interface.name.is_empty() && p.interface.name.len() <= 15);
    }
    // The same bytes as an IRQ name and an interface name, split at the first NUL.
    if let Some((name, iface)) = text.split_once('\0') {
        if let Some(queue) = crate::hw::irq_queue(name, iface) {
            assert!(
                !iface.is_empty() && name.contains(iface),
                "{name:?} {iface:?}"
            );
            assert!(name.ends_with(&queue.to_string()), "{name:?} {queue}");
        }
    }
}

/// Listen SPECs, CPU lists and durations: what parses prints back as itself.
pub fn spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if !needs_name_lookup(text) {
        if let Ok(spec) = text.parse::<ListenSpec>() {
            let printed = spec.to_string();
            assert_eq!(
                printed.parse::<ListenSpec>().as_ref(),
                Ok(&spec),
                "{printed}"
            );
        }
    }
    if let Ok(list) = text.parse::<CpuList>() {
        assert!(!list.0.is_empty());
        let printed = list.to_string();
        assert_eq!(printed.parse::<CpuList>().as_ref(), Ok(&list), "{printed}");
    }
    if let Ok(duration) = parse_duration(text) {
        let printed = format_duration(duration);
        assert_eq!(parse_duration(&printed), Ok(duration), "{printed}");
    }
}

/// Whether parsing the SPEC would resolve a host name (std's resolver, not ricochet's code): the
/// fuzzer must not send a DNS query per input.
fn needs_name_lookup(text: &str) -> bool {
    let Some((scheme, addr)) = text.split_once("://") else {
        return false;
    };
    let transport = scheme.rsplit('+').next().unwrap_or(scheme);
    matches!(transport, "udp" | "tcp")
        && addr.parse::<std::net::SocketAddr>().is_err()
        && addr.contains(':')
}

/// TCP-lite's state machine on arbitrary segment sequences. Each segment is 13 bytes of header
/// (client port, flags, a "complete the handshake" bit, seq, ack, window, payload length) and its
/// payload; with the bit set the segment first gets a SYN-ACK and then acknowledges its cookie, so
/// the fuzzer reaches established connections. Invariants: no panic, the table never exceeds its
/// limit, a segment sent never carries more than 1,024 bytes or the largest MSS, a SYN-ACK offers
/// an MSS of the table, and the core never answers more requests than it was given.
pub fn tcp_lite(data: &[u8]) {
    use crate::tcp_lite::{cookie, Cookies, Flow, Segment, TcpLimits, TcpLite, ACK, SYN};
    let limits = TcpLimits {
        max_conns: 3,
        idle_timeout: 5,
        max_mss: 1456,
    };
    let mut tcp = TcpLite::new(limits, Cookies::new([3; 16]));
    let (stats, counter) = (WorkerStats::default(), LocalCounter::new(0));
    let mut rest = data;
    let mut now = 0u32;
    while let [port, flags, control, header @ ..] = rest {
        let Some((fields, tail)) = header.split_first_chunk::<10>() else {
            break;
        };
        let len = usize::from(fields[9]).min(tail.len());
        let (payload, tail) = tail.split_at(len);
        rest = tail;
        let mut flow = Flow {
            client: [0; 16],
            server: [0; 16],
            client_port: u16::from(*port % 4),
            server_port: 7777,
            ipv6: false,
        };
        flow.client[0] = 198;
        let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        let mut seg = Segment {
            flow,
            seq: be32(&fields[0..4]),
            ack: be32(&fields[4..8]),
            flags: *flags,
            window: u16::from(fields[8]) << 4,
            mss: Some(u16::from(fields[8]) << 3),
            payload,
        };
        now += u32::from(*control >> 4);
        if control & 1 != 0 {
            let syn = Segment {
                flags: SYN,
                payload: &[],
                ..seg
            };
            let syn_ack = tcp.on_segment(&syn, Protocol::Counter, now, &stats, &counter);
            let cookie = syn_ack.expect("a SYN is answered").seq;
            seg.seq = seg.seq.wrapping_add(1);
            seg.ack = cookie.wrapping_add(1);
            seg.flags = (seg.flags | ACK) & !SYN;
        }
        let protocol = PROTOCOLS[usize::from(control >> 1) % 3];
        if let Some(out) = tcp.on_segment(&seg, protocol, now, &stats, &counter) {
            assert!(out.payload.len() <= 1024 && out.payload.len() <= usize::from(limits.max_mss));
            assert!(out.mss.is_none_or(|m| cookie::MSS_TABLE.contains(&m)));
        }
        if control & 8 != 0 {
            tcp.expire(now, &stats);
        }
        assert!(tcp.len() <= limits.max_conns);
        let s = stats.snapshot();
        assert!(s.replies <= s.requests, "more replies than requests: {s:?}");
    }
}
