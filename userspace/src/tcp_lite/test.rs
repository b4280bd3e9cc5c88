//! TCP-lite's state machine, segment by segment: every case of its contract, sans-IO.

use super::*;
use crate::core::LocalCounter;
use crate::wire::CounterRepr;

const LIMITS: TcpLimits = TcpLimits {
    max_conns: 4,
    idle_timeout: 30,
    max_mss: 1456,
};

/// A server table, its statistics and counter, and one client flow with its own sequence numbers.
struct Lab {
    tcp: TcpLite,
    stats: WorkerStats,
    counter: LocalCounter,
    now: u32,
}

/// What the server sent, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    seq: u32,
    ack: u32,
    flags: u8,
    window: u16,
    mss: Option<u16>,
    payload: Vec<u8>,
}

struct Client {
    flow: Flow,
    /// The next sequence number the client sends.
    seq: u32,
    /// What the client acknowledges (the server's next byte).
    ack: u32,
    window: u16,
}

fn flow(port: u16) -> Flow {
    lab_flow(port)
}

fn frame(value: u64) -> [u8; 16] {
    CounterRepr { value }.to_bytes()
}

fn value(reply: &[u8]) -> u64 {
    CounterRepr::parse_bytes(reply).unwrap().value
}

impl Lab {
    fn new() -> Lab {
        Lab {
            tcp: TcpLite::new(LIMITS, Cookies::new(*b"test-cookie-key!")),
            stats: WorkerStats::default(),
            counter: LocalCounter::new(0),
            now: 1000,
        }
    }

    fn send(
        &mut self,
        flow: Flow,
        seq: u32,
        ack: u32,
        flags: u8,
        window: u16,
        payload: &[u8],
    ) -> Option<Sent> {
        let seg = Segment {
            flow,
            seq,
            ack,
            flags,
            window,
            mss: (flags & SYN != 0).then_some(1460),
            payload,
        };
        let out = self.tcp.on_segment(
            &seg,
            Protocol::Counter,
            self.now,
            &self.stats,
            &self.counter,
        )?;
        Some(Sent {
            seq: out.seq,
            ack: out.ack,
            flags: out.flags,
            window: out.window,
            mss: out.mss,
            payload: out.payload.to_vec(),
        })
    }

    /// A completed handshake (SYN, SYN-ACK, third ACK) on `port`.
    fn connect(&mut self, port: u16) -> Client {
        let flow = flow(port);
        let syn_ack = self.send(flow, 5000, 0, SYN, 64240, &[]).expect("SYN-ACK");
        assert_eq!(syn_ack.flags, SYN | ACK);
        assert_eq!(syn_ack.ack, 5001);
        let client = Client {
            flow,
            seq: 5001,
            ack: syn_ack.seq.wrapping_add(1),
            window: 64240,
        };
        assert_eq!(
            self.send(flow, client.seq, client.ack, ACK, 64240, &[]),
            None,
            "an ACK is not answered"
        );
        client
    }

    /// The client sends `payload` at its next sequence number and takes whatever comes back.
    fn request(&mut self, c: &mut Client, payload: &[u8]) -> Option<Sent> {
        let sent = self.send(c.flow, c.seq, c.ack, ACK | PSH, c.window, payload);
        c.seq = c.seq.wrapping_add(payload.len() as u32);
        if let Some(s) = sent.as_ref().filter(|s| s.flags & RST == 0) {
            c.ack = s.seq.wrapping_add(s.payload.len() as u32);
        }
        sent
    }
}

#[test]
fn a_handshake_leaves_no_state_until_the_cookie_comes_back() {
    let mut lab = Lab::new();
    let flow = flow(40000);
    let syn_ack = lab.send(flow, 5000, 0, SYN, 64240, &[]).unwrap();
    assert_eq!(
        syn_ack.mss,
        Some(1456),
        "a multiple of 16 under the client's 1460"
    );
    assert_eq!(syn_ack.window, conn::MAX_WINDOW);
    assert!(lab.tcp.is_empty(), "a SYN creates no state");
    // A retransmitted SYN gets the same SYN-ACK.
    assert_eq!(
        lab.send(flow, 5000, 0, SYN, 64240, &[]),
        Some(syn_ack.clone())
    );
    assert!(lab.tcp.is_empty());
    // A third ACK with a wrong cookie: refused with RST, counted, no state.
    let refused = lab
        .send(flow, 5001, syn_ack.seq.wrapping_add(2), ACK, 64240, &[])
        .unwrap();
    assert_eq!(
        (refused.flags, refused.seq),
        (RST, syn_ack.seq.wrapping_add(2))
    );
    assert_eq!(lab.stats.tcp.cookie_failures.get(), 1);
    assert!(lab.tcp.is_empty());
    // The right one creates the connection.
    assert_eq!(
        lab.send(flow, 5001, syn_ack.seq.wrapping_add(1), ACK, 64240, &[]),
        None
    );
    assert_eq!(lab.tcp.len(), 1);
    assert_eq!(lab.stats.tcp.handshakes.get(), 1);
    assert_eq!(lab.stats.conns_opened.get(), 1);
}

#[test]
fn a_syn_flood_creates_no_state() {
    let mut lab = Lab::new();
    for i in 0..10_000u32 {
        let reply = lab.send(
            flow(1024 + (i % 60000) as u16),
            i.wrapping_mul(7919),
            0,
            SYN,
            1024,
            &[],
        );
        assert_eq!(reply.unwrap().flags, SYN | ACK);
    }
    assert!(lab.tcp.is_empty());
    assert_eq!(lab.stats.snapshot().requests, 0);
}

#[test]
fn the_first_data_segment_completes_a_handshake_whose_ack_was_lost() {
    let mut lab = Lab::new();
    let flow = flow(40000);
    let syn_ack = lab.send(flow, 9, 0, SYN, 64240, &[]).unwrap();
    let reply = lab
        .send(
            flow,
            10,
            syn_ack.seq.wrapping_add(1),
            ACK | PSH,
            64240,
            &frame(5),
        )
        .unwrap();
    assert_eq!(value(&reply.payload), 5);
    assert_eq!(reply.ack, 26);
    assert_eq!(reply.seq, syn_ack.seq.wrapping_add(1));
}

#[test]
fn frames_split_at_every_byte_and_pipelined_are_answered_in_order() {
    let mut lab = Lab::new();
    let mut c = lab.connect(40000);
    let stream: Vec<u8> = (1..=8).flat_map(frame).collect();
    let mut replies = Vec::new();
    // Segments of 1, 2, 3, ... bytes: frames split at every offset.
    let mut at = 0;
    let mut size = 1;
    while at < stream.len() {
        let end = (at + size).min(stream.len());
        let sent = lab
            .request(&mut c, &stream[at..end])
            .expect("every data segment is acknowledged");
        assert_eq!(sent.ack, c.seq, "everything received is acknowledged");
        replies.extend_from_slice(&sent.payload);
        // The client acknowledges what it got, so the next segment carries only new replies.
        let got = sent.seq.wrapping_add(sent.payload.len() as u32);
        assert_eq!(lab.send(c.flow, c.seq, got, ACK, c.window, &[]), None);
        c.ack = got;
        at = end;
        size += 1;
    }
    let values: Vec<u64> = replies.chunks(16).map(value).collect();
    assert_eq!(values, vec![1, 3, 6, 10, 15, 21, 28, 36]);
    assert_eq!(lab.counter.load(), 36);
    assert_eq!(lab.stats.replies.get(), 8);
}

#[test]
fn a_retransmitted_request_is_never_counted_twice_and_gets_the_same_reply() {
    let mut lab = Lab::new();
    let mut c = lab.connect(40000);
    let first = lab.request(&mut c, &frame(7)).unwrap();
    // The reply was lost: the client retransmits the same bytes.
    let again = lab
        .send(
            c.flow,
            c.seq - 16,
            first.seq,
            ACK | PSH,
            c.window,
            &frame(7),
        )
        .unwrap();
    assert_eq!(again, first, "the same segment again");
    assert_eq!(lab.counter.load(), 7);
    assert_eq!(lab.stats.requests.get(), 1);
    assert_eq!(lab.stats.tcp.retransmitted.get(), 1);
    // A retransmission that also carries a new frame: only the new frame is counted.
    let both: Vec<u8> = [frame(7), frame(3)].concat();
    let sent = lab
        .send(c.flow, c.seq - 16, first.seq, ACK | PSH, c.window, &both)
        .unwrap();
    assert_eq!(
        sent.payload.len(),
        32,
        "the unacknowledged reply and the new one"
    );
    assert_eq!(
        (value(&sent.payload[..16]), value(&sent.payload[16..])),
        (7, 10)
    );
    assert_eq!(lab.counter.load(), 10);
    assert_eq!(lab.stats.requests.get(), 2);
}

#[test]
fn a_lost_reply_rides_on_the_next_segment() {
    let mut lab = Lab::new();
    let mut c = lab.connect(40000);
    let server_start = c.ack;
    lab.request(&mut c, &frame(1)).unwrap();
    // That reply was lost: the client still acknowledges only the start.
    c.ack = server_start;
    let sent = lab.request(&mut c, &frame(2)).unwrap();
    assert_eq!(sent.seq, server_start);
    let values: Vec<u64> = sent.payload.chunks(16).map(value).collect();
    assert_eq!(values, vec![1, 3]);
    // A duplicate ACK (nothing new acknowledged while replies wait) gets them again.
    let dup = lab
        .send(c.flow, c.seq, server_start, ACK, c.window, &[])
        .unwrap();
    assert_eq!(dup.payload, sent.payload);
}

#[test]
fn out_of_order_segments_never_reach_the_core() {
    let mut lab = Lab::new();
    let mut c = lab.connect(40000);
    let ahead = lab
        .send(c.flow, c.seq + 16, c.ack, ACK | PSH, c.window, &frame(2))
        .unwrap();
    assert_eq!(ahead.ack, c.seq, "a duplicate ACK for the missing byte");
    assert!(ahead.payload.is_empty());
    assert_eq!(lab.stats.tcp.out_of_order.get(), 1);
    assert_eq!(lab.stats.requests.get(), 0);
    let first = lab.request(&mut c, &frame(1)).unwrap();
    assert_eq!(value(&first.payload), 1);
    let second = lab.request(&mut c, &frame(2)).unwrap();
    assert_eq!(value(&second.payload[second.payload.len() - 16..]), 3);
    assert_eq!(lab.counter.load(), 3);
}

#[test]
fn a_zero_window_holds_the_replies_until_it_opens() {
    let mut lab = Lab::new();
    let mut c = lab.connect(40000);
    c.window = 0;
    let held = lab.request(&mut c, &frame(4)).unwrap();
    assert!(held.payload.is_empty(), "no reply byte into a zero window");
    assert_eq!(lab.counter.load(), 4, "the request is counted");
    // Its reply is held, so the request is not acknowledged: the client's retransmission timer
    // will ask again. The window's right edge still accounts for the held reply.
    assert_eq!(held.ack, c.seq.wrapping_sub(16));
    assert_eq!(
        held.ack.wrapping_add(u32::from(held.window)),
        c.seq.wrapping_add(u32::from(conn::MAX_WINDOW) - 16)
    );
    // The retransmitted request into the still-closed window: same answer, counted once.
    let again = lab
        .send(
            c.flow,
            c.seq.wrapping_sub(16),
            c.ack,
            ACK | PSH,
            0,
            &frame(4),
        )
        .unwrap();
    assert!(again.payload.is_empty());
    assert_eq!((again.ack, lab.counter.load()), (held.ack, 4));
    // A window update opens it: the reply goes out, and the request is acknowledged.
    let sent = lab.send(c.flow, c.seq, c.ack, ACK, 1000, &[]).unwrap();
    assert_eq!(value(&sent.payload), 4);
    assert_eq!(sent.ack, c.seq);
}

#[test]
fn the_window_bounds_what_is_taken_and_what_waits() {
    let mut lab = Lab::new();
    let mut c = lab.connect(40000);
    c.window = 0;
    // 64 frames offered while no reply is acknowledged: only the advertised window is taken.
    let stream: Vec<u8> = (0..64).flat_map(|_| frame(1)).collect();
    let sent = lab.request(&mut c, &stream).unwrap();
    let taken = usize::from(conn::MAX_WINDOW);
    let start = c.seq - stream.len() as u32;
    assert_eq!(lab.counter.load(), taken as u64 / 16);
    // Every reply waits for the window, so no request is acknowledged yet, and the window's right
    // edge is where the taken bytes end: the buffer is full.
    assert_eq!(sent.ack, start);
    assert_eq!(
        sent.ack.wrapping_add(u32::from(sent.window)),
        start.wrapping_add(taken as u32)
    );
}

#[test]
fn fin_is_acknowledged_and_answered_with_fin_after_the_replies() {
    let mut lab = Lab::new();
    let c = lab.connect(40000);
    let reply_start = c.ack;
    let sent = lab
        .send(c.flow, c.seq, c.ack, ACK | PSH | FIN, c.window, &frame(3))
        .unwrap();
    assert_eq!(sent.flags & FIN, FIN);
    assert_eq!(value(&sent.payload), 3);
    assert_eq!(sent.ack, c.seq + 17, "data and FIN acknowledged");
    // The client acknowledges the replies and the FIN: the connection is gone.
    assert_eq!(
        lab.send(c.flow, c.seq + 17, reply_start + 17, ACK, c.window, &[]),
        None
    );
    assert!(lab.tcp.is_empty());
    assert_eq!(lab.stats.conns_closed.get(), 1);
}

#[test]
fn a_stream_ending_mid_frame_counts_as_the_kernel_path_does() {
    let mut lab = Lab::new();
    let c = lab.connect(40000);
    let sent = lab
        .send(c.flow, c.seq, c.ack, ACK | FIN, c.window, &frame(3)[..5])
        .unwrap();
    assert_eq!(sent.flags & FIN, FIN);
    assert_eq!(lab.stats.drops(crate::stats::DropReason::WrongLength), 1);
    assert_eq!(lab.counter.load(), 0);
}

#[test]
fn rst_forgets_only_at_the_expected_sequence_number() {
    let mut lab = Lab::new();
    let mut c = lab.connect(40000);
    lab.request(&mut c, &frame(1)).unwrap();
    // In the window but not exact: a challenge ACK, the connection stays.
    let challenge = lab.send(c.flow, c.seq + 5, 0, RST, 0, &[]).unwrap();
    assert_eq!(challenge.ack, c.seq);
    // Outside the window: ignored.
    assert_eq!(lab.send(c.flow, c.seq + 100_000, 0, RST, 0, &[]), None);
    assert_eq!(lab.tcp.len(), 1);
    // A SYN on a known flow: challenge ACK too.
    let challenge = lab.send(c.flow, 77, 0, SYN, 1000, &[]).unwrap();
    assert_eq!((challenge.flags & (SYN | ACK), challenge.ack), (ACK, c.seq));
    assert_eq!(lab.send(c.flow, c.seq, 0, RST, 0, &[]), None);
    assert!(lab.tcp.is_empty());
    // Data on the forgotten flow: never reaches the core; RST tells the client.
    let refused = lab
        .send(c.flow, c.seq, c.ack, ACK | PSH, c.window, &frame(1))
        .unwrap();
    assert_eq!(refused.flags, RST);
    assert!(refused.payload.is_empty());
    assert_eq!(lab.stats.requests.get(), 1);
    assert_eq!(lab.stats.tcp.cookie_failures.get(), 1);
}

#[test]
fn keepalive_probes_are_answered() {
    let mut lab = Lab::new();
    let c = lab.connect(40000);
    let probe = lab
        .send(c.flow, c.seq - 1, c.ack, ACK, c.window, &[])
        .unwrap();
    assert_eq!((probe.seq, probe.ack), (c.ack, c.seq));
    assert_eq!(lab.stats.tcp.retransmitted.get(), 0);
}

#[test]
fn an_invalid_frame_answers_what_came_before_then_closes() {
    let mut lab = Lab::new();
    let mut c = lab.connect(40000);
    let mut bad = frame(9);
    bad[15] ^= 1;
    let stream = [frame(1), frame(2), bad, frame(4)].concat();
    let sent = lab.request(&mut c, &stream).unwrap();
    let values: Vec<u64> = sent.payload.chunks(16).map(value).collect();
    assert_eq!(values, vec![1, 3]);
    assert_eq!(sent.flags & FIN, FIN, "closed after the replies");
    assert_eq!(lab.stats.drops(crate::stats::DropReason::BadHash), 1);
    assert_eq!(lab.stats.conns_rejected.get(), 1);
    // More data: RST, and the connection is gone.
    let reset = lab.request(&mut c, &frame(5)).unwrap();
    assert_eq!(reset.flags, RST);
    assert!(lab.tcp.is_empty());
    assert_eq!(lab.counter.load(), 3);
}

#[test]
fn a_full_table_refuses_new_handshakes_and_keeps_the_others() {
    let mut lab = Lab::new();
    let mut clients: Vec<Client> = (0..4).map(|i| lab.connect(40000 + i)).collect();
    let flow = flow(50000);
    let syn_ack = lab.send(flow, 1, 0, SYN, 1000, &[]).unwrap();
    let refused = lab
        .send(flow, 2, syn_ack.seq.wrapping_add(1), ACK, 1000, &[])
        .unwrap();
    assert_eq!(refused.flags, RST);
    assert_eq!(lab.stats.tcp.table_full.get(), 1);
    for c in &mut clients {
        assert!(value(&lab.request(c, &frame(1)).unwrap().payload) > 0);
    }
    assert_eq!(lab.counter.load(), 4);
}

#[test]
fn idle_connections_are_forgotten() {
    let mut lab = Lab::new();
    let _a = lab.connect(40000);
    lab.now += 20;
    let mut b = lab.connect(40001);
    lab.now += 15;
    lab.request(&mut b, &frame(1)).unwrap();
    lab.tcp.expire(lab.now, &lab.stats);
    assert_eq!(lab.tcp.len(), 1, "only the silent one goes");
    assert_eq!(lab.stats.tcp.idle_closed.get(), 1);
    assert_eq!(lab.stats.conns_closed.get(), 1);
}

#[test]
fn a_connection_the_server_closed_is_forgotten_after_the_clients_fin() {
    let mut lab = Lab::new();
    let mut c = lab.connect(40000);
    let mut bad = frame(9);
    bad[15] ^= 1;
    let closing = lab.request(&mut c, &bad).unwrap();
    assert_eq!(closing.flags & FIN, FIN);
    // The client acknowledges the server's FIN, then sends its own (Linux may join the two).
    let fin_acked = closing.seq.wrapping_add(1);
    assert_eq!(lab.send(c.flow, c.seq, fin_acked, ACK, c.window, &[]), None);
    let last = lab
        .send(c.flow, c.seq, fin_acked, ACK | FIN, c.window, &[])
        .unwrap();
    assert_eq!((last.flags, last.ack), (ACK, c.seq + 1));
    assert!(
        lab.tcp.is_empty(),
        "forgotten at once, not after the idle timeout"
    );
    assert_eq!(lab.stats.conns_closed.get(), 1);
}

#[test]
fn the_window_never_exceeds_one_client_segment_nor_shrinks() {
    let mut lab = Lab::new();
    let flow = flow(40000);
    let syn = Segment {
        flow,
        seq: 1,
        ack: 0,
        flags: SYN,
        window: 65535,
        mss: Some(536),
        payload: &[],
    };
    let counter = LocalCounter::new(0);
    let syn_ack = lab
        .tcp
        .on_segment(&syn, Protocol::Counter, lab.now, &lab.stats, &counter)
        .unwrap();
    assert_eq!(syn_ack.mss, Some(528));
    let cookie = syn_ack.seq;
    let mut c = Client {
        flow,
        seq: 2,
        ack: cookie.wrapping_add(1),
        window: 65535,
    };
    // Every reply waiting fits in one of the client's segments.
    let first = lab.request(&mut c, &frame(1)[..8]).unwrap();
    assert_eq!(usize::from(first.window), 528 - 16 - 8);
    // The right edge stays put while the carried half frame is answered.
    let edge = |s: &Sent| s.ack.wrapping_add(u32::from(s.window));
    let second = lab.request(&mut c, &frame(1)[8..]).unwrap();
    assert_eq!(edge(&second), edge(&first));
    assert_eq!(second.payload.len(), 16);
}
