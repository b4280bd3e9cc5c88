//! Differential test of the XDP programs against the Rust reference: generated and mutated frames go
//! through `ricochet_steer` and `ricochet_respond` (BPF_PROG_TEST_RUN) and through the Rust frame view
//! (`afxdp::frame::classify`, the rules the AF_XDP worker applies) followed by the sans-IO core. The
//! verdict, the one statistic that moved and the output bytes must agree exactly, frame by frame; every
//! reply's UDP checksum is also checked with etherparse, independently of both.
//!
//! The generator is a seeded xorshift, so a failure names a frame that the same seed reproduces.

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use common::Rng;
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use ricochet::afxdp::frame::{classify, Listeners, Verdict};
use ricochet::core::{Batch, Counter, LocalCounter, Protocol};
use ricochet::stats::{DropReason, WorkerStats};
use ricochet::wire::{value_hash, CounterRepr};
use ricochet::xdp::action;
use ricochet::xdp::maps::{XdpStat, RESPONDER_MAX_UDP_LEN};
use ricochet::xdp::{ProgramKind, XdpProgram};

/// The longest frame BPF_PROG_TEST_RUN hands whole to a program without multi-buffer support: a page
/// less the XDP headroom (256) and the room for `struct skb_shared_info` (320). Native XDP on veth has
/// the same bound; longer test frames would be cut into fragments the program does not see.
const MAX_TEST_FRAME: usize = 4096 - 256 - 320;
/// BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header.
const MIN_TEST_FRAME: usize = 14;

const SERVER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const OTHER4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 9);
const CLIENT4: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);
/// Ports with a listener on some address, and two without.
const PORTS: [u16; 6] = [7777, 7000, 11111, 9000, 7778, 53];

/// Exact and wildcard listeners of both families, and a port where the exact address beats the
/// wildcard with another protocol.
fn listeners() -> Vec<(SocketAddr, Protocol)> {
    [
        ("198.18.0.1:7777", Protocol::Counter),
        ("198.18.0.1:7000", Protocol::Echo),
        ("198.18.0.1:11111", Protocol::Sockperf),
        ("0.0.0.0:9000", Protocol::Echo),
        ("198.18.0.1:9000", Protocol::Counter),
        ("[2001:db8::1]:7777", Protocol::Counter),
        ("[2001:db8::1]:7000", Protocol::Echo),
        ("[::]:11111", Protocol::Sockperf),
    ]
    .iter()
    .map(|(addr, protocol)| (addr.parse().unwrap(), *protocol))
    .collect()
}

/// What one program did with one frame.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    verdict: u32,
    stat: XdpStat,
    out: Vec<u8>,
}

fn stat_for(reason: DropReason) -> XdpStat {
    XdpStat::ALL
        .into_iter()
        .find(|s| s.drop_reason() == Some(reason))
        .unwrap_or_else(|| panic!("no XDP statistic counts {reason}"))
}

/// Both programs, the Rust reference (frame view, core, counter) and what has been seen so far.
struct Harness {
    steer: XdpProgram,
    respond: XdpProgram,
    steer_stats: [u64; XdpStat::COUNT],
    respond_stats: [u64; XdpStat::COUNT],
    listeners: Listeners,
    core_stats: WorkerStats,
    counter: LocalCounter,
    out: Vec<u8>,
    /// How often each statistic moved, per program (steer, respond): the coverage check.
    seen: [[u64; XdpStat::COUNT]; 2],
    frames: u64,
}

impl Harness {
    fn new() -> Option<Harness> {
        if !common::require_root("loading XDP programs") {
            return None;
        }
        let listeners = listeners();
        let steer =
            XdpProgram::load(ProgramKind::Steer, &listeners).expect("the steering program loads");
        let respond =
            XdpProgram::load(ProgramKind::Respond, &listeners).expect("the responder loads");
        Some(Harness {
            steer_stats: steer.stats().unwrap(),
            respond_stats: respond.stats().unwrap(),
            steer,
            respond,
            listeners: Listeners::new(&listeners),
            core_stats: WorkerStats::default(),
            counter: LocalCounter::new(0),
            out: vec![0; 4096],
            seen: [[0; XdpStat::COUNT]; 2],
            frames: 0,
        })
    }

    /// Runs one frame through one program; returns what it did (exactly one statistic must move).
    fn run(&mut self, kind: ProgramKind, frame: &[u8]) -> Outcome {
        let (prog, last) = match kind {
            ProgramKind::Steer => (&mut self.steer, &mut self.steer_stats),
            ProgramKind::Respond => (&mut self.respond, &mut self.respond_stats),
        };
        let (verdict, len) = prog.test_run(frame, &mut self.out).unwrap();
        let now = prog.stats().unwrap();
        let moved: Vec<XdpStat> = XdpStat::ALL
            .into_iter()
            .filter(|s| now[*s as usize] != last[*s as usize])
            .collect();
        assert!(
            moved.len() == 1 && now[moved[0] as usize] == last[moved[0] as usize] + 1,
            "{kind:?}: exactly one statistic moves by one per frame, got {moved:?} for {}",
            hex(frame)
        );
        *last = now;
        self.seen[kind as usize][moved[0] as usize] += 1;
        Outcome {
            verdict,
            stat: moved[0],
            out: self.out[..len].to_vec(),
        }
    }

    /// What the steering program must do, by the reference.
    fn expected_steer(&self, verdict: &Verdict, frame: &[u8]) -> Outcome {
        let (verdict, stat) = match verdict {
            Verdict::Pass => (action::PASS, XdpStat::Passed),
            Verdict::Drop(reason) => (action::DROP, stat_for(*reason)),
            // No AF_XDP socket in the test run: the redirect falls back to the kernel.
            Verdict::Request { .. } => (action::PASS, XdpStat::NoSocket),
        };
        Outcome {
            verdict,
            stat,
            out: frame.to_vec(),
        }
    }

    /// What the responder must do, by the reference: the frame view, then the sans-IO core.
    fn expected_respond(&self, verdict: &Verdict, frame: &[u8]) -> Outcome {
        let untouched = |verdict, stat| Outcome {
            verdict,
            stat,
            out: frame.to_vec(),
        };
        let (udp, protocol) = match *verdict {
            Verdict::Pass => return untouched(action::PASS, XdpStat::Passed),
            Verdict::Drop(reason) => return untouched(action::DROP, stat_for(reason)),
            Verdict::Request { frame, protocol } => (frame, protocol),
        };
        if udp.udp_len() > RESPONDER_MAX_UDP_LEN {
            return untouched(action::PASS, XdpStat::PassedTooLong);
        }
        let mut reply = frame.to_vec();
        let payload = udp.payload_offset..udp.payload_offset + udp.payload_len;
        let mut batch = Batch::new(&self.core_stats);
        let ticket = batch.admit(protocol, &reply[payload.clone()]);
        let commit = batch.commit(&self.counter);
        if let ricochet::core::Ticket::Drop(reason) = ticket {
            return untouched(action::DROP, stat_for(reason));
        }
        let reply_len = commit.write_reply_in_place(ticket, &mut reply[payload]);
        let len = udp.into_reply(&mut reply, reply_len);
        reply.truncate(len);
        Outcome {
            verdict: action::TX,
            stat: XdpStat::Tx,
            out: reply,
        }
    }

    /// One frame through both programs and the reference: everything must agree.
    fn check(&mut self, frame: &[u8]) {
        assert!(
            (MIN_TEST_FRAME..=MAX_TEST_FRAME).contains(&frame.len()),
            "the generator made a frame of {} bytes",
            frame.len()
        );
        self.frames += 1;
        let verdict = classify(frame, &self.listeners);
        let expected = self.expected_steer(&verdict, frame);
        let got = self.run(ProgramKind::Steer, frame);
        assert_eq!(
            got,
            expected,
            "steer, reference {verdict:?}, frame {}",
            hex(frame)
        );
        let expected = self.expected_respond(&verdict, frame);
        let got = self.run(ProgramKind::Respond, frame);
        assert_eq!(
            got,
            expected,
            "respond, reference {verdict:?}, frame {}",
            hex(frame)
        );
        if got.verdict == action::TX {
            assert_checksum_is_valid(&got.out);
        }
    }
}

/// Checks a reply's UDP checksum with etherparse, which shares no code with either side.
fn assert_checksum_is_valid(reply: &[u8]) {
    let packet = SlicedPacket::from_ethernet(reply)
        .unwrap_or_else(|e| panic!("etherparse cannot parse the reply ({e}): {}", hex(reply)));
    let Some(TransportSlice::Udp(udp)) = &packet.transport else {
        panic!("the reply is not UDP: {}", hex(reply));
    };
    let header = udp.to_header();
    let expected = match &packet.net {
        Some(NetSlice::Ipv4(ip)) => {
            header.calc_checksum_ipv4(&ip.header().to_header(), udp.payload())
        }
        Some(NetSlice::Ipv6(ip)) => {
            header.calc_checksum_ipv6(&ip.header().to_header(), udp.payload())
        }
        _ => panic!("the reply is not IP: {}", hex(reply)),
    }
    .unwrap();
    assert_eq!(udp.checksum(), expected, "UDP checksum of {}", hex(reply));
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A frame as built, with where its headers are, for the mutations.
struct Built {
    bytes: Vec<u8>,
    ip_offset: usize,
    udp_offset: usize,
    ipv6: bool,
}

/// The deterministic frame generator.
struct Gen {
    rng: Rng,
}

impl Gen {
    fn below(&mut self, n: usize) -> usize {
        self.rng.below(n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.rng.below(100) < percent
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.rng.next() as u8).collect()
    }

    /// A value with `digits` decimal digits (1..=20), uniformly placed in that range.
    fn value_with_digits(&mut self, digits: u32) -> u64 {
        let low = if digits == 1 {
            0
        } else {
            10u64.pow(digits - 1)
        };
        let high = 10u64.checked_pow(digits).map_or(u64::MAX, |h| h - 1);
        low + self.rng.next() % (high - low).saturating_add(1).max(1)
    }

    fn counter_payload(&mut self) -> Vec<u8> {
        let digits = 1 + self.below(20) as u32;
        let value = self.value_with_digits(digits);
        let mut frame = CounterRepr { value }.to_bytes().to_vec();
        if self.chance(25) {
            let bit = self.below(128);
            frame[bit / 8] ^= 1 << (bit % 8);
        }
        frame
    }

    fn echo_payload(&mut self, ipv6: bool) -> Vec<u8> {
        let room = MAX_TEST_FRAME - 14 - 8 - if ipv6 { 48 } else { 28 };
        let len = match self.below(10) {
            0..=4 => self.below(64),
            5..=8 => self.below(1500),
            _ => self.below(room + 1),
        };
        self.bytes(len)
    }

    fn sockperf_payload(&mut self) -> Vec<u8> {
        let len = if self.chance(70) {
            14 + self.below(50)
        } else {
            self.below(20)
        };
        let mut payload = self.bytes(len);
        if len > 9 && self.chance(50) {
            payload[9] |= 1;
        }
        payload
    }

    /// A payload for `port`: most often of the protocol listening there, otherwise of any kind.
    fn payload(&mut self, port: u16, ipv6: bool) -> Vec<u8> {
        let kind = if self.chance(60) {
            match port {
                7777 | 9000 => 0,
                7000 => 1,
                11111 => 2,
                _ => self.below(4),
            }
        } else {
            self.below(4)
        };
        match kind {
            0 => self.counter_payload(),
            1 => self.echo_payload(ipv6),
            2 => self.sockperf_payload(),
            _ => {
                let len = self.below(40);
                self.bytes(len)
            }
        }
    }

    /// A well-formed UDP request frame: random VLAN stack, family, addresses, ports and payload.
    fn request(&mut self) -> Built {
        let ipv6 = self.chance(35);
        let tags = [0, 0, 0, 1, 2][self.below(5)];
        let port = if self.chance(90) {
            PORTS[self.below(PORTS.len())]
        } else {
            self.rng.next() as u16
        };
        let to_server = self.chance(85);
        let source_port = if self.chance(3) {
            0
        } else {
            1 + self.below(65535) as u16
        };
        let payload = self.payload(port, ipv6);
        let tpids: Vec<u16> = (0..tags).map(|_| [0x8100, 0x88a8][self.below(2)]).collect();
        build(&tpids, ipv6, to_server, source_port, port, &payload)
    }
}

/// Serialises a UDP frame (IPv4 without options, or IPv6) behind the given VLAN tags.
fn build(
    tpids: &[u16],
    ipv6: bool,
    to_server: bool,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Built {
    let mut f = vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];
    for (i, tpid) in tpids.iter().enumerate() {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&(100 + i as u16).to_be_bytes());
    }
    f.extend_from_slice(&(if ipv6 { 0x86ddu16 } else { 0x0800 }).to_be_bytes());
    let ip_offset = f.len();
    let udp_len = (8 + payload.len()) as u16;
    if ipv6 {
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&udp_len.to_be_bytes());
        f.extend_from_slice(&[17, 64]);
        f.extend_from_slice(&CLIENT6.octets());
        f.extend_from_slice(&if to_server { SERVER6 } else { OTHER6 }.octets());
    } else {
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&(20 + udp_len).to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 17, 0, 0]);
        f.extend_from_slice(&CLIENT4.octets());
        f.extend_from_slice(&if to_server { SERVER4 } else { OTHER4 }.octets());
        let checksum = etherparse::Ipv4HeaderSlice::from_slice(&f[ip_offset..])
            .unwrap()
            .to_header()
            .calc_header_checksum();
        f[ip_offset + 10..ip_offset + 12].copy_from_slice(&checksum.to_be_bytes());
    }
    let udp_offset = f.len();
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    // What veth leaves in a request: anything; the programs never read it.
    f.extend_from_slice(&[0xab, 0xcd]);
    f.extend_from_slice(payload);
    Built {
        bytes: f,
        ip_offset,
        udp_offset,
        ipv6,
    }
}

/// The ways a frame is damaged or made unusual; each is applied to the serialised bytes.
#[derive(Debug, Clone, Copy)]
enum Mutation {
    Truncate,
    IpLength,
    UdpLength,
    Ipv4HeaderLength,
    Fragment,
    Version,
    NextProtocol,
    EtherType,
    SourcePortZero,
    FlipBytes,
    TrailingBytes,
    RandomBytes,
}

impl Mutation {
    const ALL: [Mutation; 12] = [
        Mutation::Truncate,
        Mutation::IpLength,
        Mutation::UdpLength,
        Mutation::Ipv4HeaderLength,
        Mutation::Fragment,
        Mutation::Version,
        Mutation::NextProtocol,
        Mutation::EtherType,
        Mutation::SourcePortZero,
        Mutation::FlipBytes,
        Mutation::TrailingBytes,
        Mutation::RandomBytes,
    ];
}

/// A 16-bit length field moved by a little (the off-by-ones that matter) or set to anything.
fn lie(g: &mut Gen, field: &mut [u8]) {
    let value = u16::from_be_bytes([field[0], field[1]]);
    let value = if g.chance(70) {
        value.wrapping_add(g.below(17) as u16).wrapping_sub(8)
    } else {
        g.rng.next() as u16
    };
    field.copy_from_slice(&value.to_be_bytes());
}

/// Overwrites `bytes[at..]` with `value` when the frame still has those bytes.
fn set(bytes: &mut [u8], at: usize, value: &[u8]) {
    if let Some(field) = bytes.get_mut(at..at + value.len()) {
        field.copy_from_slice(value);
    }
}

impl Gen {
    /// Applies one mutation; one that would touch bytes a truncation already removed does nothing.
    fn mutate(&mut self, b: &mut Built, mutation: Mutation) {
        let (ip, udp) = (b.ip_offset, b.udp_offset);
        let len = b.bytes.len();
        match mutation {
            Mutation::Truncate => {
                let keep = MIN_TEST_FRAME + self.below(len - MIN_TEST_FRAME + 1);
                b.bytes.truncate(keep);
            }
            Mutation::IpLength => {
                let at = if b.ipv6 { ip + 4 } else { ip + 2 };
                if let Some(field) = b.bytes.get_mut(at..at + 2) {
                    lie(self, field);
                }
            }
            Mutation::UdpLength => {
                if let Some(field) = b.bytes.get_mut(udp + 4..udp + 6) {
                    lie(self, field);
                }
            }
            Mutation::Ipv4HeaderLength if !b.ipv6 && udp <= len => self.ipv4_options(b),
            Mutation::Fragment if !b.ipv6 => {
                let field: u16 = match self.below(4) {
                    0 => 0x2000,                                   // first fragment
                    1 => 0x2000 | (1 + self.below(0x1fff) as u16), // a middle one
                    2 => 1 + self.below(0x1fff) as u16,            // the last one
                    _ => 0x4000,                                   // don't fragment
                };
                set(&mut b.bytes, ip + 6, &field.to_be_bytes());
            }
            Mutation::Version => {
                let version = (self.below(16) as u8) << 4;
                if let Some(byte) = b.bytes.get_mut(ip) {
                    *byte = version | (*byte & 0x0f);
                }
            }
            Mutation::NextProtocol => {
                let at = if b.ipv6 { ip + 6 } else { ip + 9 };
                set(
                    &mut b.bytes,
                    at,
                    &[[0, 1, 6, 17, 43, 44, 58, 255][self.below(8)]],
                );
            }
            Mutation::EtherType => {
                let ethertype: u16 =
                    [0x0800, 0x86dd, 0x8100, 0x88a8, 0x0806, 0x9100][self.below(6)];
                set(&mut b.bytes, ip - 2, &ethertype.to_be_bytes());
            }
            Mutation::SourcePortZero => set(&mut b.bytes, udp, &[0, 0]),
            Mutation::FlipBytes => {
                for _ in 0..1 + self.below(4) {
                    let at = self.below(len);
                    b.bytes[at] ^= 1 << self.below(8);
                }
            }
            Mutation::TrailingBytes | Mutation::RandomBytes => self.append(b, mutation),
            Mutation::Ipv4HeaderLength | Mutation::Fragment => {}
        }
        b.bytes.truncate(MAX_TEST_FRAME);
    }

    /// Any IPv4 header length; above 5, sometimes with that many option bytes really inserted.
    fn ipv4_options(&mut self, b: &mut Built) {
        let ihl = self.below(16) as u8;
        b.bytes[b.ip_offset] = 0x40 | ihl;
        if ihl > 5 && self.chance(50) {
            let options = self.bytes(4 * (usize::from(ihl) - 5));
            let n = options.len();
            b.bytes.splice(b.udp_offset..b.udp_offset, options);
            b.udp_offset += n;
        }
    }

    /// Trailing bytes after the datagram, or random bytes behind a valid prefix of any length.
    fn append(&mut self, b: &mut Built, mutation: Mutation) {
        let len = b.bytes.len();
        let keep = match mutation {
            Mutation::TrailingBytes => len,
            _ => self.below(len + 1),
        };
        let total = MIN_TEST_FRAME
            .max(keep + self.below(200))
            .min(MAX_TEST_FRAME);
        b.bytes.truncate(keep);
        let tail = self.bytes(total - keep);
        b.bytes.extend_from_slice(&tail);
    }

    /// A request with no, one or two (rarely three) mutations.
    fn frame(&mut self) -> Vec<u8> {
        let mut built = self.request();
        let n = [0, 0, 1, 1, 1, 2, 2, 3][self.below(8)];
        for _ in 0..n {
            let mutation = Mutation::ALL[self.below(Mutation::ALL.len())];
            self.mutate(&mut built, mutation);
        }
        built.bytes
    }
}

/// A frame of `len` random bytes: almost always the kernel's.
fn noise(g: &mut Gen) -> Vec<u8> {
    let len = MIN_TEST_FRAME + g.below(300);
    g.bytes(len)
}

const FRAMES: u64 = 100_000;

#[test]
fn programs_agree_with_the_rust_reference() {
    let Some(mut h) = Harness::new() else { return };
    let started = std::time::Instant::now();
    // Every truncation of one request per protocol, family and VLAN depth.
    for tags in 0..=2usize {
        for ipv6 in [false, true] {
            for (port, payload) in [
                (7777, CounterRepr { value: 12345 }.to_bytes().to_vec()),
                (7000, b"an echo of some length".to_vec()),
                (11111, vec![0x01; 14]),
            ] {
                let tpids = vec![0x8100; tags];
                let full = build(&tpids, ipv6, true, 40000, port, &payload).bytes;
                for cut in MIN_TEST_FRAME..=full.len() {
                    h.check(&full[..cut]);
                }
            }
        }
    }
    let mut g = Gen {
        rng: Rng::new(0x5eed_0009),
    };
    while h.frames < FRAMES {
        let frame = if g.chance(5) {
            noise(&mut g)
        } else {
            g.frame()
        };
        h.check(&frame);
    }
    eprintln!(
        "{} frames through both programs and the reference in {:?}",
        h.frames,
        started.elapsed()
    );
    assert_coverage(&h);
    let in_kernel = h.respond.counter().unwrap();
    assert_eq!(in_kernel.load(), h.counter.load(), "the counters agree");
}

/// The generator reached every outcome the programs can have under BPF_PROG_TEST_RUN (`steered` needs
/// an AF_XDP socket and `passed_too_long` a frame longer than the test run hands over).
fn assert_coverage(h: &Harness) {
    let unreachable = [XdpStat::Steered, XdpStat::PassedTooLong];
    for (kind, seen) in [
        (ProgramKind::Steer, &h.seen[0]),
        (ProgramKind::Respond, &h.seen[1]),
    ] {
        eprintln!(
            "{kind:?}: {:?}",
            XdpStat::ALL
                .iter()
                .map(|s| (s.as_str(), seen[*s as usize]))
                .collect::<Vec<_>>()
        );
        for stat in XdpStat::ALL {
            let only_other = match kind {
                ProgramKind::Steer => matches!(stat, XdpStat::Tx | XdpStat::DropBadHash),
                ProgramKind::Respond => stat == XdpStat::NoSocket,
            };
            // TCP-lite's outcomes have their own test against the Rust model (xdp_tcp_lite.rs).
            let tcp = stat.as_str().starts_with("tcp_");
            if unreachable.contains(&stat) || only_other || tcp {
                assert_eq!(seen[stat as usize], 0, "{kind:?} {stat:?}");
            } else {
                assert!(
                    seen[stat as usize] >= 100,
                    "{kind:?}: {stat:?} only {} times",
                    seen[stat as usize]
                );
            }
        }
    }
}

/// The in-kernel hash agrees with the Rust one for values of every decimal length, in requests (the
/// increment's hash is checked) and in replies (the counter's new value is hashed): the smallest,
/// the largest and random values of each length, with their hash and with hashes off by one.
#[test]
fn every_decimal_length_hashes_alike() {
    let Some(mut h) = Harness::new() else { return };
    let mut g = Gen { rng: Rng::new(20) };
    let request = |value: u64, hash: u64| {
        let mut payload = value.to_be_bytes().to_vec();
        payload.extend_from_slice(&hash.to_be_bytes());
        build(&[], false, true, 40000, 7777, &payload).bytes
    };
    for digits in 1..=20u32 {
        let low = if digits == 1 {
            0
        } else {
            10u64.pow(digits - 1)
        };
        let high = 10u64.checked_pow(digits).map_or(u64::MAX, |x| x - 1);
        for value in [
            low,
            high,
            g.value_with_digits(digits),
            g.value_with_digits(digits),
        ] {
            let hash = value_hash(value);
            for (v, hsh) in [
                (value, hash.wrapping_add(1)),
                (value, hash.wrapping_sub(1)),
                (value ^ 1, hash),
                (value, hash),
            ] {
                h.check(&request(v, hsh));
            }
            // Steer the counter to `value` so the reply carries a value of this length.
            let to_value = value.wrapping_sub(h.counter.load());
            h.check(&request(to_value, value_hash(to_value)));
            assert_eq!(h.counter.load(), value);
        }
    }
    assert!(h.seen[1][XdpStat::Tx as usize] >= 20 * 4 * 2);
    assert!(h.seen[1][XdpStat::DropBadHash as usize] >= 20 * 4 * 3);
    assert_eq!(h.respond.counter().unwrap().load(), h.counter.load());
}
