//! The AF_XDP datapath's frame engine, sans-IO: frames in, replies written in place, nothing else.
//!
//! Per batch the worker calls [`FrameEngine::admit`] for every received frame (parsed once into a
//! checked view, its listener found), commits the core's batch (one counter add), then calls
//! [`FrameEngine::answer`] for every frame, which turns an answered one into its reply in place.
//! What a frame became is an enum ([`Admitted`]): a UDP request for the core, a rejection, or a TCP
//! segment that TCP-lite (one connection table per worker) has already answered in place.

use std::time::Instant;

use super::frame::{classify_located, Listeners, UdpFrame, Verdict};
use super::segment::TcpFrame;
use crate::core::{Batch, Commit, Counter, Ticket};
use crate::stats::{DropReason, WorkerStats};
use crate::tcp_lite::{Cookies, TcpLimits, TcpLite};

/// What became of one received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admitted {
    /// A UDP request the core admitted (answered or dropped by it once the batch commits).
    Udp(Ticket, UdpFrame),
    /// Rejected before the core, counted under its reason.
    Rejected(DropReason),
    /// A TCP segment for a TCP listener, handled by TCP-lite: its answer, already in the frame.
    Tcp(Option<Reply>),
}

/// A frame turned into its reply: how long the frame now is, and what the worker counts when it
/// is sent (TCP-lite counts its replies and their bytes as it produces them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub frame_len: usize,
    pub payload_len: usize,
    pub replies: u8,
}

/// Classifies frames and answers them, for one worker.
#[derive(Debug)]
pub struct FrameEngine {
    listeners: Listeners,
    tcp: TcpLite,
    /// The datapath's clock for TCP-lite (cookie slots, idle timeout), shared by its workers.
    epoch: Instant,
}

impl FrameEngine {
    pub fn new(
        listeners: Listeners,
        limits: TcpLimits,
        cookies: Cookies,
        epoch: Instant,
    ) -> FrameEngine {
        FrameEngine {
            listeners,
            tcp: TcpLite::new(limits, cookies),
            epoch,
        }
    }

    /// Seconds since the datapath started: TCP-lite's clock, read once per batch.
    pub fn now(&self) -> u32 {
        self.epoch.elapsed().as_secs() as u32
    }

    /// TCP-lite connections open in this worker.
    pub fn tcp_connections(&self) -> usize {
        self.tcp.len()
    }

    /// Forgets TCP-lite connections idle past the timeout.
    pub fn expire(&mut self, now: u32, stats: &WorkerStats) {
        self.tcp.expire(now, stats);
    }

    /// Takes one RX descriptor to exactly one outcome. `frame` is its UMEM frame from the
    /// descriptor's address to the frame's end (None when the descriptor points outside the UMEM)
    /// and `len` the received length. A UDP frame is classified by the steering program's rules,
    /// so the worker drops for the reasons the program would; a TCP segment for a TCP listener goes
    /// to TCP-lite, which answers it in place at once; anything else is `malformed`.
    pub fn admit(
        &mut self,
        batch: &mut Batch,
        frame: Option<&mut [u8]>,
        len: usize,
        counter: &dyn Counter,
        now: u32,
    ) -> Admitted {
        let Some(frame) = frame.filter(|f| f.len() >= len) else {
            // A descriptor outside the UMEM: no bytes can be read, none are counted.
            batch.reject(DropReason::BadDescriptor, 0);
            return Admitted::Rejected(DropReason::BadDescriptor);
        };
        if let Some(tcp) = TcpFrame::locate(&frame[..len]) {
            if let Some(protocol) = self.listeners.find(tcp.destination(frame)) {
                let stats = batch.stats();
                let seg = tcp.segment(&frame[..len]);
                let reply = self
                    .tcp
                    .on_segment(&seg, protocol, now, stats, counter)
                    .and_then(|answer| tcp.write_answer(frame, &answer));
                return Admitted::Tcp(reply.map(|frame_len| Reply {
                    frame_len,
                    payload_len: 0,
                    replies: 0,
                }));
            }
        }
        Self::admit_udp(&self.listeners, batch, &frame[..len])
    }

    fn admit_udp(listeners: &Listeners, batch: &mut Batch, frame: &[u8]) -> Admitted {
        // rx_bytes counts payload bytes on every datapath: what the frame holds of the UDP payload,
        // none for a frame that is not a datagram for a listener.
        match classify_located(frame, listeners) {
            (_, Verdict::Pass) => {
                batch.reject(DropReason::Malformed, 0);
                Admitted::Rejected(DropReason::Malformed)
            }
            (udp, Verdict::Drop(reason)) => {
                batch.reject(reason, udp.map_or(0, |udp| udp.payload_len));
                Admitted::Rejected(reason)
            }
            (
                _,
                Verdict::Request {
                    frame: udp,
                    protocol,
                },
            ) => {
                let payload = &frame[udp.payload_offset..udp.payload_offset + udp.payload_len];
                Admitted::Udp(batch.admit(protocol, payload), udp)
            }
        }
    }

    /// The reply `frame` (received `len` bytes, then the rest of its UMEM frame) carries once the
    /// batch is committed: a UDP request's is written now, in place; TCP-lite's already is. None
    /// when nothing is answered (the frame goes back to the fill ring).
    pub fn answer(
        commit: &Commit,
        admitted: Admitted,
        frame: &mut [u8],
        len: usize,
    ) -> Option<Reply> {
        let (ticket, udp) = match admitted {
            Admitted::Udp(ticket, udp) => (ticket, udp),
            Admitted::Tcp(reply) => return reply,
            Admitted::Rejected(_) => return None,
        };
        if !ticket.is_reply() {
            return None;
        }
        let frame = frame.get_mut(..len)?;
        let payload = frame.get_mut(udp.payload_offset..udp.payload_offset + udp.payload_len)?;
        let payload_len = commit.write_reply_in_place(ticket, payload);
        let frame_len = udp.into_reply(frame, payload_len);
        (frame_len > 0).then_some(Reply {
            frame_len,
            payload_len,
            replies: 1,
        })
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::core::{LocalCounter, Protocol};
    use crate::stats::WorkerStats;
    use crate::tcp_lite::{ACK, PSH, SYN};
    use crate::wire::CounterRepr;
    use etherparse::{PacketBuilder, SlicedPacket, TransportSlice};

    const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const SERVER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn udp_frame(source_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
            .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
            .udp(source_port, 7777)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    fn tcp_frame(port: u16, seq: u32, ack: u32, flags: u8, payload: &[u8]) -> Vec<u8> {
        let mut builder = PacketBuilder::ethernet2(CLIENT_MAC, SERVER_MAC)
            .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
            .tcp(40000, port, seq, 64240);
        if flags & SYN != 0 {
            builder = builder.syn();
        }
        if flags & ACK != 0 {
            builder = builder.ack(ack);
        }
        if flags & PSH != 0 {
            builder = builder.psh();
        }
        let mut out = Vec::new();
        builder.write(&mut out, payload).unwrap();
        out
    }

    fn engine() -> FrameEngine {
        let listeners = Listeners::with_tcp(
            &[("198.18.0.1:7777".parse().unwrap(), Protocol::Counter)],
            &[("198.18.0.1:7778".parse().unwrap(), Protocol::Counter)],
        );
        let limits = TcpLimits {
            max_conns: 16,
            idle_timeout: 30,
            max_mss: 1456,
        };
        FrameEngine::new(listeners, limits, Cookies::new([7; 16]), Instant::now())
    }

    /// Admits `frame` (with room to grow) and commits at once; returns the outcome and the reply.
    fn exchange(
        engine: &mut FrameEngine,
        stats: &WorkerStats,
        counter: &LocalCounter,
        frame: &[u8],
    ) -> (Admitted, Option<Vec<u8>>) {
        let mut buf = frame.to_vec();
        buf.resize(2048, 0);
        let mut batch = Batch::new(stats);
        let admitted = engine.admit(&mut batch, Some(&mut buf), frame.len(), counter, 100);
        let commit = batch.commit(counter);
        let reply = FrameEngine::answer(&commit, admitted, &mut buf, frame.len());
        (admitted, reply.map(|r| buf[..r.frame_len].to_vec()))
    }

    #[test]
    fn every_descriptor_ends_in_exactly_one_counted_outcome() {
        let valid = CounterRepr { value: 4 }.to_bytes();
        let cases: Vec<(Option<Vec<u8>>, Option<DropReason>)> = vec![
            (Some(udp_frame(40000, &valid)), None),
            (None, Some(DropReason::BadDescriptor)),
            // TCP for a port with only a UDP listener: not a segment TCP-lite takes.
            (
                Some(tcp_frame(7777, 1, 0, ACK, &valid)),
                Some(DropReason::Malformed),
            ),
            (Some(vec![0u8; 10]), Some(DropReason::Malformed)),
            (Some(udp_frame(0, &valid)), Some(DropReason::ZeroSourcePort)),
            (
                Some(udp_frame(40000, &valid[..15])),
                Some(DropReason::WrongLength),
            ),
            (
                Some(udp_frame(40000, b"aaaaaaaaaaaaaaaa")),
                Some(DropReason::BadHash),
            ),
        ];
        let mut engine = engine();
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        let mut batch = Batch::new(&stats);
        for (i, (frame, expected)) in cases.iter().enumerate() {
            let before = stats.snapshot();
            let mut buf = frame.clone().unwrap_or_default();
            let len = buf.len();
            let slot = frame.is_some().then_some(&mut buf[..]);
            let admitted = engine.admit(&mut batch, slot, len, &counter, 0);
            let after = stats.snapshot();
            assert_eq!(after.requests, before.requests + 1, "case {i}: one request");
            assert_eq!(
                after.total_drops() - before.total_drops(),
                u64::from(expected.is_some()),
                "case {i}: at most one drop"
            );
            match expected {
                Some(reason) => {
                    let dropped = match admitted {
                        Admitted::Rejected(r) => r,
                        Admitted::Udp(Ticket::Drop(r), _) => r,
                        other => panic!("case {i}: {other:?}"),
                    };
                    assert_eq!(dropped, *reason, "case {i}");
                    assert_eq!(after.drops(*reason), before.drops(*reason) + 1, "case {i}");
                }
                None => assert!(
                    matches!(admitted, Admitted::Udp(t, _) if t.is_reply()),
                    "case {i}"
                ),
            }
        }
    }

    #[test]
    fn an_answered_request_becomes_its_reply_in_place() {
        let mut engine = engine();
        let stats = WorkerStats::default();
        let request = CounterRepr { value: 5 }.to_bytes();
        let frame = udp_frame(40000, &request);
        let (_, reply) = exchange(&mut engine, &stats, &LocalCounter::new(10), &frame);
        let reply = reply.unwrap();
        assert_eq!(reply.len(), frame.len());
        let parsed = SlicedPacket::from_ethernet(&reply).unwrap();
        let Some(TransportSlice::Udp(udp)) = parsed.transport else {
            panic!("not UDP");
        };
        assert_eq!((udp.source_port(), udp.destination_port()), (7777, 40000));
        assert_eq!(CounterRepr::parse_bytes(udp.payload()).unwrap().value, 15);
    }

    #[test]
    fn a_dropped_request_is_not_answered() {
        let mut engine = engine();
        let stats = WorkerStats::default();
        let frame = udp_frame(40000, b"aaaaaaaaaaaaaaaa");
        let (_, reply) = exchange(&mut engine, &stats, &LocalCounter::new(0), &frame);
        assert_eq!(reply, None);
    }

    #[test]
    fn tcp_segments_are_answered_by_tcp_lite_in_place() {
        let mut engine = engine();
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        let syn = tcp_frame(7778, 1000, 0, SYN, &[]);
        let (_, syn_ack) = exchange(&mut engine, &stats, &counter, &syn);
        let syn_ack = syn_ack.expect("a SYN-ACK");
        let parsed = SlicedPacket::from_ethernet(&syn_ack).unwrap();
        let Some(TransportSlice::Tcp(t)) = parsed.transport else {
            panic!("not TCP");
        };
        assert!(t.syn() && t.ack());
        assert_eq!(t.acknowledgment_number(), 1001);
        let cookie = t.sequence_number();
        assert_eq!(stats.snapshot().requests, 0, "a handshake is not a request");
        let request = CounterRepr { value: 6 }.to_bytes();
        let data = tcp_frame(7778, 1001, cookie.wrapping_add(1), ACK | PSH, &request);
        let (admitted, reply) = exchange(&mut engine, &stats, &counter, &data);
        assert!(matches!(admitted, Admitted::Tcp(Some(r)) if r.replies == 0));
        let reply = reply.unwrap();
        let parsed = SlicedPacket::from_ethernet(&reply).unwrap();
        let Some(TransportSlice::Tcp(t)) = parsed.transport else {
            panic!("not TCP");
        };
        assert_eq!(t.acknowledgment_number(), 1017);
        assert_eq!(CounterRepr::parse_bytes(t.payload()).unwrap().value, 6);
        let s = stats.snapshot();
        assert_eq!((s.requests, s.replies, s.tcp.handshakes), (1, 1, 1));
        assert_eq!(engine.tcp_connections(), 1);
    }
}
