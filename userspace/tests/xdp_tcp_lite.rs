//! TCP-lite inside the responder (xdp mode) under BPF_PROG_TEST_RUN, against the Rust TCP-lite of
//! the AF_XDP workers as its reference: the same segments go to both, and every answer must be the
//! same segment (sequence and acknowledgement numbers, flags, window, MSS option, payload), with
//! checksums that etherparse verifies independently, and the same counter afterwards.
//!
//! Scripted cases cover the handshake, split and pipelined frames, retransmission, out of order,
//! zero window, FIN, RST, keepalive, invalid frames, table full and a SYN flood; a seeded random
//! walk then mixes them over several flows.

mod common;

use std::net::SocketAddr;

use etherparse::{PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
use ricochet::core::{LocalCounter, Protocol};
use ricochet::stats::WorkerStats;
use ricochet::tcp_lite::{
    Cookies, Flow, Outgoing, Segment, TcpLimits, TcpLite, ACK, FIN, PSH, RST, SYN,
};
use ricochet::xdp::action::{DROP, PASS, TX};
use ricochet::xdp::maps::XdpStat;
use ricochet::xdp::{ResponderTcp, XdpProgram};

const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const SERVER: [u8; 4] = [198, 18, 0, 1];
const CLIENT: [u8; 4] = [198, 18, 0, 2];
const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const SECRET: [u8; 16] = *b"ricochet-tcp-key";
const MAX_MSS: u16 = 1440;

/// The seconds of the program's clock (bpf_ktime_get_coarse_ns: CLOCK_MONOTONIC_COARSE).
fn now() -> u32 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE).unwrap();
    t.tv_sec() as u32
}

/// The responder with TCP listeners for each protocol, and the Rust model beside it.
struct Pair {
    prog: XdpProgram,
    model: TcpLite,
    stats: WorkerStats,
    counter: LocalCounter,
    program_counter: ricochet::xdp::counter::MappedCounter,
}

fn listeners() -> Vec<(SocketAddr, Protocol)> {
    [
        ("198.18.0.1:7777", Protocol::Counter),
        ("198.18.0.1:7000", Protocol::Echo),
        ("198.18.0.1:11111", Protocol::Sockperf),
        ("[2001:db8::1]:7777", Protocol::Counter),
    ]
    .iter()
    .map(|(a, p)| (a.parse().unwrap(), *p))
    .collect()
}

fn pair(max_conns: u32) -> Option<Pair> {
    if !common::require_root("loading XDP programs") {
        return None;
    }
    let tcp = ResponderTcp {
        listeners: listeners(),
        max_conns,
        idle_timeout_secs: 120,
        max_mss: MAX_MSS,
        secret: SECRET,
    };
    let prog = XdpProgram::load_responder(&[], &tcp).expect("the responder passes the verifier");
    let limits = TcpLimits {
        max_conns: max_conns as usize,
        idle_timeout: 120,
        max_mss: MAX_MSS,
    };
    let program_counter = prog.counter().unwrap();
    Some(Pair {
        prog,
        model: TcpLite::new(limits, Cookies::new(SECRET)),
        stats: WorkerStats::default(),
        counter: LocalCounter::new(0),
        program_counter,
    })
}

/// A client segment, as the model takes it and as a frame.
#[derive(Clone, Debug)]
struct Seg {
    port: u16,
    server_port: u16,
    ipv6: bool,
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: Vec<u8>,
}

impl Seg {
    fn flow(&self) -> Flow {
        let (mut client, mut server) = ([0u8; 16], [0u8; 16]);
        if self.ipv6 {
            client = CLIENT6;
            server = SERVER6;
        } else {
            client[..4].copy_from_slice(&CLIENT);
            server[..4].copy_from_slice(&SERVER);
        }
        Flow {
            client,
            server,
            client_port: self.port,
            server_port: self.server_port,
            ipv6: self.ipv6,
        }
    }

    fn frame(&self) -> Vec<u8> {
        let eth = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC);
        let ip = if self.ipv6 {
            eth.ipv6(CLIENT6, SERVER6, 64)
        } else {
            eth.ipv4(CLIENT, SERVER, 64)
        };
        let mut tcp = ip.tcp(self.port, self.server_port, self.seq, self.window);
        if self.flags & SYN != 0 {
            tcp = tcp.syn();
        }
        if self.flags & ACK != 0 {
            tcp = tcp.ack(self.ack);
        }
        if self.flags & FIN != 0 {
            tcp = tcp.fin();
        }
        if self.flags & RST != 0 {
            tcp = tcp.rst();
        }
        if self.flags & PSH != 0 {
            tcp = tcp.psh();
        }
        if let Some(mss) = self.mss {
            tcp = tcp
                .options(&[TcpOptionElement::MaximumSegmentSize(mss)])
                .unwrap();
        }
        let mut out = Vec::new();
        tcp.write(&mut out, &self.payload).unwrap();
        out
    }
}

/// An answer, as both sides describe it.
#[derive(Debug, PartialEq, Eq)]
struct Answer {
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: Vec<u8>,
}

impl From<Outgoing<'_>> for Answer {
    fn from(o: Outgoing<'_>) -> Answer {
        Answer {
            seq: o.seq,
            ack: if o.flags & ACK != 0 { o.ack } else { 0 },
            flags: o.flags,
            window: o.window,
            mss: o.mss,
            payload: o.payload.to_vec(),
        }
    }
}

/// Parses the program's output frame: addressed back to the client, every checksum right.
fn parse_answer(seg: &Seg, frame: &[u8]) -> Answer {
    let packet = SlicedPacket::from_ethernet(frame).expect("the answer parses");
    let eth = packet.link.as_ref().unwrap();
    let eth = match eth {
        etherparse::LinkSlice::Ethernet2(e) => e,
        other => panic!("not Ethernet: {other:?}"),
    };
    assert_eq!((eth.source(), eth.destination()), (SERVER_MAC, CLIENT_MAC));
    let Some(TransportSlice::Tcp(tcp)) = &packet.transport else {
        panic!("the answer is not TCP")
    };
    assert_eq!(
        (tcp.source_port(), tcp.destination_port()),
        (seg.server_port, seg.port)
    );
    let expected = match &packet.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => {
            let h = ip.header();
            assert_eq!((h.source(), h.destination()), (SERVER, CLIENT));
            let header = h.to_header();
            assert_eq!(header.header_checksum, header.calc_header_checksum());
            assert_eq!(
                frame.len(),
                14 + usize::from(header.total_len),
                "no trailing bytes"
            );
            tcp.to_header()
                .calc_checksum_ipv4(&header, tcp.payload())
                .unwrap()
        }
        Some(etherparse::NetSlice::Ipv6(ip)) => {
            let h = ip.header();
            assert_eq!((h.source(), h.destination()), (SERVER6, CLIENT6));
            tcp.to_header()
                .calc_checksum_ipv6(&h.to_header(), tcp.payload())
                .unwrap()
        }
        other => panic!("not IP: {other:?}"),
    };
    assert_eq!(tcp.checksum(), expected, "TCP checksum");
    let mss = tcp.options_iterator().find_map(|o| match o {
        Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
        _ => None,
    });
    let flags = u8::from(tcp.fin())
        | u8::from(tcp.syn()) << 1
        | u8::from(tcp.rst()) << 2
        | u8::from(tcp.psh()) << 3
        | u8::from(tcp.ack()) << 4;
    Answer {
        seq: tcp.sequence_number(),
        ack: tcp.acknowledgment_number(),
        flags,
        window: tcp.window_size(),
        mss,
        payload: tcp.payload().to_vec(),
    }
}

impl Pair {
    /// Sends one segment to both; asserts they answer alike and returns the answer.
    fn send(&mut self, seg: &Seg) -> Option<Answer> {
        let protocol = listeners()
            .iter()
            .find(|(a, _)| a.port() == seg.server_port)
            .unwrap()
            .1;
        let payload = seg.payload.clone();
        let model_seg = Segment {
            flow: seg.flow(),
            seq: seg.seq,
            ack: seg.ack,
            flags: seg.flags,
            window: seg.window,
            mss: seg.mss,
            payload: &payload,
        };
        let t = now();
        let expected = self
            .model
            .on_segment(&model_seg, protocol, t, &self.stats, &self.counter)
            .map(Answer::from);
        let mut out = vec![0u8; 4096];
        let (verdict, len) = self.prog.test_run(&seg.frame(), &mut out).unwrap();
        let got = match verdict {
            TX => Some(parse_answer(seg, &out[..len])),
            DROP => None,
            other => panic!("verdict {other} for {seg:?}"),
        };
        if now() / 64 != t / 64 {
            // A cookie slot ended between the two: the SYN-ACKs may differ, by design.
            return got;
        }
        assert_eq!(got, expected, "the program and the model differ on {seg:?}");
        assert_eq!(
            ricochet::core::Counter::load(&self.program_counter),
            ricochet::core::Counter::load(&self.counter),
            "the counters differ after {seg:?}"
        );
        got
    }

    fn stat(&self, stat: XdpStat) -> u64 {
        self.prog.stats().unwrap()[stat as usize]
    }
}

/// One client connection's sequence space.
struct Client {
    port: u16,
    server_port: u16,
    ipv6: bool,
    isn: u32,
    /// Next byte the client sends, and the server's next byte it expects.
    snd_nxt: u32,
    rcv_nxt: u32,
    window: u16,
}

impl Client {
    fn new(port: u16, server_port: u16, isn: u32) -> Client {
        Client {
            port,
            server_port,
            ipv6: false,
            isn,
            snd_nxt: isn.wrapping_add(1),
            rcv_nxt: 0,
            window: 64240,
        }
    }

    fn seg(&self, flags: u8, seq: u32, payload: &[u8]) -> Seg {
        Seg {
            port: self.port,
            server_port: self.server_port,
            ipv6: self.ipv6,
            seq,
            ack: self.rcv_nxt,
            flags,
            window: self.window,
            mss: None,
            payload: payload.to_vec(),
        }
    }

    fn syn(&self, mss: Option<u16>) -> Seg {
        let mut s = self.seg(SYN, self.isn, &[]);
        s.ack = 0;
        s.mss = mss;
        s
    }

    /// SYN, SYN-ACK, ACK.
    fn connect(&mut self, pair: &mut Pair, mss: Option<u16>) {
        let syn_ack = pair.send(&self.syn(mss)).expect("SYN-ACK");
        assert_eq!(syn_ack.flags, SYN | ACK);
        assert_eq!(syn_ack.ack, self.isn.wrapping_add(1));
        self.rcv_nxt = syn_ack.seq.wrapping_add(1);
        assert_eq!(pair.send(&self.seg(ACK, self.snd_nxt, &[])), None);
    }

    /// Sends data at snd_nxt and takes in the answer's bytes.
    fn data(&mut self, pair: &mut Pair, payload: &[u8]) -> Option<Answer> {
        let seg = self.seg(ACK | PSH, self.snd_nxt, payload);
        self.snd_nxt = self.snd_nxt.wrapping_add(payload.len() as u32);
        let answer = pair.send(&seg);
        if let Some(a) = &answer {
            self.take(a);
        }
        answer
    }

    /// Takes an answer's in-order bytes (as a client acknowledging them would).
    fn take(&mut self, a: &Answer) {
        if a.seq == self.rcv_nxt {
            let fin = u32::from(a.flags & FIN != 0);
            self.rcv_nxt = a.seq.wrapping_add(a.payload.len() as u32).wrapping_add(fin);
        }
    }
}

fn frame(value: u64) -> Vec<u8> {
    common::frame(value).to_vec()
}

#[test]
fn handshake_and_counter_frames_match_the_model() {
    let Some(mut pair) = pair(64) else { return };
    let mut c = Client::new(61000, 7777, 1000);
    c.connect(&mut pair, Some(1460));
    let a = c.data(&mut pair, &frame(5)).unwrap();
    assert_eq!(common::parse_reply(&a.payload), 5);
    // Pipelined frames in one segment, then a frame split at every byte.
    let mut pipelined = Vec::new();
    for v in 1..=10 {
        pipelined.extend(frame(v));
    }
    let a = c.data(&mut pair, &pipelined).unwrap();
    assert_eq!(a.payload.len(), 160);
    for cut in 1..16 {
        let f = frame(100 + cut as u64);
        c.data(&mut pair, &f[..cut]);
        c.data(&mut pair, &f[cut..]).unwrap();
    }
    assert_eq!(pair.stat(XdpStat::TcpHandshakes), 1);
    assert_eq!(pair.stat(XdpStat::TcpReplies), 26);
}

#[test]
fn echo_sockperf_and_ipv6_match_the_model() {
    let Some(mut pair) = pair(64) else { return };
    let mut echo = Client::new(61001, 7000, 7);
    echo.connect(&mut pair, Some(1460));
    let a = echo.data(&mut pair, b"hello, ricochet").unwrap();
    assert_eq!(a.payload, b"hello, ricochet");
    // sockperf: a header split across segments, then a message with a body.
    let mut sp = Client::new(61002, 11111, u32::MAX - 3);
    sp.connect(&mut pair, None);
    let mut msg = [0u8; 20];
    msg[8..10].copy_from_slice(&1u16.to_be_bytes());
    msg[10..14].copy_from_slice(&20u32.to_be_bytes());
    sp.data(&mut pair, &msg[..5]);
    let a = sp.data(&mut pair, &msg[5..]).unwrap();
    assert_eq!(a.payload.len(), 20);
    assert_eq!(a.payload[9] & 1, 0, "the reply-request flag is cleared");
    let mut v6 = Client::new(61003, 7777, 99);
    v6.ipv6 = true;
    v6.connect(&mut pair, Some(1440));
    assert_eq!(
        common::parse_reply(&v6.data(&mut pair, &frame(3)).unwrap().payload),
        3
    );
}

#[test]
fn retransmission_loss_and_order_match_the_model() {
    let Some(mut pair) = pair(64) else { return };
    let mut c = Client::new(61010, 7777, 5000);
    c.connect(&mut pair, Some(1460));
    // A request whose answer is lost: the retransmission gets the same bytes, counted once.
    let seq = c.snd_nxt;
    let first = pair.send(&c.seg(ACK | PSH, seq, &frame(7))).unwrap();
    c.snd_nxt = c.snd_nxt.wrapping_add(16);
    let again = pair.send(&c.seg(ACK | PSH, seq, &frame(7))).unwrap();
    assert_eq!(first.payload, again.payload);
    assert_eq!(pair.stat(XdpStat::TcpRetransmitted), 1);
    // A lost answer rides on the next one: two frames' replies in one segment.
    let a = c.data(&mut pair, &frame(1)).unwrap();
    assert_eq!(a.payload.len(), 32);
    c.take(&a);
    // Out of order: a gap is answered with a duplicate ACK, and the core never sees it.
    let gap = c.seg(ACK | PSH, c.snd_nxt.wrapping_add(16), &frame(2));
    let dup = pair.send(&gap).unwrap();
    assert!(dup.payload.is_empty());
    assert_eq!(pair.stat(XdpStat::TcpOutOfOrder), 1);
    // Keepalive probe: one byte before rcv_nxt.
    let probe = c.seg(ACK, c.snd_nxt.wrapping_sub(1), &[]);
    assert!(pair.send(&probe).is_some());
    // A zero window holds replies; the request is still acknowledged and counted.
    c.window = 0;
    let held = c.data(&mut pair, &frame(4)).unwrap();
    assert!(held.payload.is_empty());
    c.window = 64240;
    let released = pair.send(&c.seg(ACK, c.snd_nxt, &[])).unwrap();
    assert_eq!(released.payload.len(), 16);
}

#[test]
fn fin_rst_and_invalid_frames_match_the_model() {
    let Some(mut pair) = pair(64) else { return };
    // FIN is acknowledged and answered with FIN after the last reply.
    let mut c = Client::new(61020, 7777, 1);
    c.connect(&mut pair, Some(1460));
    c.data(&mut pair, &frame(2)).unwrap();
    let fin = pair.send(&c.seg(ACK | FIN, c.snd_nxt, &[])).unwrap();
    assert!(fin.flags & FIN != 0);
    c.snd_nxt = c.snd_nxt.wrapping_add(1);
    c.take(&fin);
    assert_eq!(pair.send(&c.seg(ACK, c.snd_nxt, &[])), None);
    assert_eq!(
        pair.prog.tcp_connections().unwrap(),
        0,
        "forgotten after the last ACK"
    );
    // RST at rcv_nxt forgets; later data fails its cookie and gets RST.
    let mut r = Client::new(61021, 7777, 50);
    r.connect(&mut pair, Some(1460));
    r.data(&mut pair, &frame(1)).unwrap();
    assert_eq!(pair.send(&r.seg(RST, r.snd_nxt, &[])), None);
    let stray = r.data(&mut pair, &frame(1)).unwrap();
    assert_eq!(stray.flags, RST);
    // An invalid frame: the frames before it are answered, then FIN; more data gets RST.
    let mut bad = Client::new(61022, 7777, 70);
    bad.connect(&mut pair, Some(1460));
    let mut data = frame(1);
    data.extend(frame(2));
    data.extend([0u8; 16]);
    let a = bad.data(&mut pair, &data).unwrap();
    assert_eq!(a.payload.len(), 32);
    assert!(a.flags & FIN != 0);
    assert_eq!(bad.data(&mut pair, &frame(1)).unwrap().flags, RST);
    assert_eq!(pair.stat(XdpStat::DropBadHash), 1);
    // A stream that ends mid-frame counts wrong_length, as the kernel path does.
    let mut half = Client::new(61023, 7777, 90);
    half.connect(&mut pair, Some(1460));
    half.data(&mut pair, &frame(1)[..9]);
    assert!(pair.send(&half.seg(ACK | FIN, half.snd_nxt, &[])).is_some());
    assert_eq!(pair.stat(XdpStat::DropWrongLength), 1);
}

#[test]
fn syn_flood_strays_and_a_full_table_leave_no_state() {
    let Some(mut pair) = pair(4) else { return };
    for i in 0..2000u32 {
        let c = Client::new(1024 + (i % 60000) as u16, 7777, i.wrapping_mul(2654435761));
        let answer = pair.send(&c.syn(Some(1460))).unwrap();
        assert_eq!(answer.flags, SYN | ACK);
    }
    let mut stray = Client::new(62000, 7777, 9);
    stray.rcv_nxt = 12345;
    assert_eq!(stray.data(&mut pair, &frame(1)).unwrap().flags, RST);
    assert_eq!(pair.prog.tcp_connections().unwrap(), 0, "SYNs left state");
    assert_eq!(pair.stat(XdpStat::TcpCookieFailures), 1);
    let mut open: Vec<Client> = (0..4).map(|i| Client::new(62100 + i, 7777, 1)).collect();
    for c in &mut open {
        c.connect(&mut pair, Some(1460));
    }
    let mut fifth = Client::new(62200, 7777, 1);
    let syn_ack = pair.send(&fifth.syn(Some(1460))).unwrap();
    fifth.rcv_nxt = syn_ack.seq.wrapping_add(1);
    assert_eq!(
        pair.send(&fifth.seg(ACK, fifth.snd_nxt, &[]))
            .unwrap()
            .flags,
        RST
    );
    assert_eq!(pair.stat(XdpStat::TcpTableFull), 1);
    for c in &mut open {
        assert!(common::parse_reply(&c.data(&mut pair, &frame(1)).unwrap().payload) > 0);
    }
    assert_eq!(pair.prog.tcp_connections().unwrap(), 4);
}

#[test]
fn frames_for_other_listeners_pass_to_the_kernel() {
    let Some(mut pair) = pair(4) else { return };
    let mut other = Client::new(61000, 8080, 1).syn(None);
    other.server_port = 8080;
    let mut out = vec![0u8; 256];
    let (verdict, _) = pair.prog.test_run(&other.frame(), &mut out).unwrap();
    assert_eq!(verdict, PASS);
}

/// A seeded random walk over several flows: each client queues frames and sends them from its
/// oldest unacknowledged byte in segments cut anywhere (so retransmissions overlap new bytes), and
/// sometimes loses an answer; windows change, probes, duplicate ACKs and segments from the future
/// mix in. Program and model must agree at every step.
#[test]
fn a_random_walk_matches_the_model() {
    let Some(mut pair) = pair(16) else { return };
    let mut rng = common::Rng::new(0x7cb1);
    let mut clients: Vec<Client> = (0..6)
        .map(|i| {
            let port = [7777, 7777, 7000, 11111, 7777, 7000][i];
            let mut c = Client::new(63000 + i as u16, port, rng.next() as u32);
            c.ipv6 = i == 4;
            c
        })
        .collect();
    let mut queues: Vec<Vec<u8>> = vec![Vec::new(); clients.len()];
    for (i, c) in clients.iter_mut().enumerate() {
        c.connect(&mut pair, Some([536, 1460, 600][i % 3]));
    }
    for _ in 0..4000 {
        let i = rng.below(clients.len() as u64) as usize;
        let (c, queue) = (&mut clients[i], &mut queues[i]);
        match rng.below(12) {
            0..=2 => {
                for _ in 0..=rng.below(4) {
                    queue.extend(match c.server_port {
                        11111 => sockperf_message(&mut rng),
                        _ => frame(rng.below(1000)),
                    });
                }
            }
            3..=7 if !queue.is_empty() => {
                // From the oldest unacknowledged byte: a cut anywhere, at most one MSS.
                let len = 1 + rng.below(queue.len().min(500) as u64) as usize;
                let seg = c.seg(ACK | PSH, c.snd_nxt, &queue[..len]);
                let answer = pair.send(&seg);
                if let Some(a) = answer.filter(|_| rng.below(5) != 0) {
                    c.take(&a);
                    let acked = a.ack.wrapping_sub(c.snd_nxt) as usize;
                    if acked <= queue.len() {
                        queue.drain(..acked);
                        c.snd_nxt = a.ack;
                    }
                }
            }
            8 => {
                if let Some(a) = pair.send(&c.seg(ACK, c.snd_nxt, &[])) {
                    c.take(&a);
                }
            }
            9 => c.window = [0, 8, 100, 64240, 64240][rng.below(5) as usize],
            10 => {
                let seg = c.seg(ACK | PSH, c.snd_nxt.wrapping_add(16), &frame(1));
                pair.send(&seg);
            }
            _ => {
                let probe = c.seg(ACK, c.snd_nxt.wrapping_sub(1), &[]);
                if let Some(a) = pair.send(&probe) {
                    c.take(&a);
                }
            }
        }
    }
    let stats = pair.prog.stats().unwrap();
    let replies = stats[XdpStat::TcpReplies as usize];
    assert!(replies > 1000, "the walk answered little: {stats:?}");
    assert!(stats[XdpStat::TcpRetransmitted as usize] > 100, "{stats:?}");
}

fn sockperf_message(rng: &mut common::Rng) -> Vec<u8> {
    let len = 14 + rng.below(40) as usize;
    let mut msg = vec![0u8; len];
    msg[..8].copy_from_slice(&rng.next().to_be_bytes());
    msg[8..10].copy_from_slice(&1u16.to_be_bytes());
    msg[10..14].copy_from_slice(&(len as u32).to_be_bytes());
    msg
}

/// A TCP checksum that computes to 0 is sent as 0 (UDP alone sends it as 0xffff, since 0 means "no
/// checksum" there). The echo payload's last word is chosen so that the answer's checksum is 0:
/// with that word zero the checksum would be c0, and adding the word c0 to the ones' complement sum
/// makes it 0xffff, whose complement is 0. parse_answer checks the field against etherparse's.
#[test]
fn a_tcp_checksum_of_zero_is_sent_as_zero() {
    let Some(mut pair) = pair(4) else { return };
    let mut c = Client::new(61050, 7000, 77);
    c.connect(&mut pair, Some(1460));
    // One exchange of the same length first: the next answer has the same window.
    let first = c.data(&mut pair, &[1, 2, 3, 4]).unwrap();
    let mut predicted = Vec::new();
    PacketBuilder::ethernet2(SERVER_MAC, CLIENT_MAC)
        .ipv4(SERVER, CLIENT, 64)
        .tcp(7000, c.port, c.rcv_nxt, first.window)
        .ack(c.snd_nxt.wrapping_add(4))
        .psh()
        .write(&mut predicted, &[1, 2, 0, 0])
        .unwrap();
    let c0 = u16::from_be_bytes([predicted[50], predicted[51]]);
    let payload = [1, 2, (c0 >> 8) as u8, c0 as u8];
    let answer = c.data(&mut pair, &payload).unwrap();
    assert_eq!(answer.payload, payload);
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(SERVER_MAC, CLIENT_MAC)
        .ipv4(SERVER, CLIENT, 64)
        .tcp(7000, c.port, answer.seq, answer.window)
        .ack(answer.ack)
        .psh()
        .write(&mut frame, &payload)
        .unwrap();
    assert_eq!(&frame[50..52], &[0, 0], "the case this test is about");
}
