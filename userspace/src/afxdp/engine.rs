//! The AF_XDP datapath's frame engine, sans-IO: frames in, replies written in place, nothing else.
//!
//! Per batch the worker calls [`FrameEngine::admit`] for every received frame (parsed once into a
//! checked view, its listener found, its payload handed to the core), commits the core's batch (one
//! counter add), then calls [`FrameEngine::answer`] for every frame the core answered, which writes
//! the reply payload and turns the frame into its reply in place. The transport of a frame is an
//! enum ([`Located`]): UDP today; TCP-lite joins as a second variant with its own view and its own
//! connection state, and the worker loop does not change.

use super::frame::{classify_located, Listeners, UdpFrame, Verdict};
use crate::core::{Batch, Commit, Ticket};
use crate::stats::DropReason;

/// Where a request's transport header and payload are in its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Located {
    Udp(UdpFrame),
}

/// A frame turned into its reply: how long the frame now is and how many payload bytes it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub frame_len: usize,
    pub payload_len: usize,
}

/// Classifies frames and answers them, for one worker.
#[derive(Debug, Clone)]
pub struct FrameEngine {
    listeners: Listeners,
}

impl FrameEngine {
    pub fn new(listeners: Listeners) -> FrameEngine {
        FrameEngine { listeners }
    }

    /// Takes one RX descriptor to exactly one counted outcome: admitted to the core (answered or
    /// dropped by it), or rejected before it for a reason of its own. The frame is classified by the
    /// steering program's rules, so the worker drops for the reasons the program would; a frame the
    /// program would not have steered here is `malformed`. `frame` is None when the descriptor
    /// points outside the UMEM.
    pub fn admit(&self, batch: &mut Batch, frame: Option<&[u8]>) -> (Ticket, Option<Located>) {
        let Some(frame) = frame else {
            // A descriptor outside the UMEM: no bytes can be read, none are counted.
            return (batch.reject(DropReason::BadDescriptor, 0), None);
        };
        // rx_bytes counts payload bytes on every datapath: what the frame holds of the UDP payload,
        // none for a frame that is not a datagram for a listener.
        match classify_located(frame, &self.listeners) {
            (_, Verdict::Pass) => (batch.reject(DropReason::Malformed, 0), None),
            (udp, Verdict::Drop(reason)) => {
                let payload = udp.map_or(0, |udp| udp.payload_len);
                (batch.reject(reason, payload), None)
            }
            (
                _,
                Verdict::Request {
                    frame: udp,
                    protocol,
                },
            ) => {
                let payload = &frame[udp.payload_offset..udp.payload_offset + udp.payload_len];
                (batch.admit(protocol, payload), Some(Located::Udp(udp)))
            }
        }
    }

    /// Writes the core's reply for `ticket` and turns `frame` into the reply frame in place. None
    /// when the core answers nothing (the frame goes back to the fill ring).
    pub fn answer(
        commit: &Commit,
        ticket: Ticket,
        located: Option<Located>,
        frame: &mut [u8],
    ) -> Option<Reply> {
        let Located::Udp(udp) = located?;
        if !ticket.is_reply() {
            return None;
        }
        let payload = frame.get_mut(udp.payload_offset..udp.payload_offset + udp.payload_len)?;
        let payload_len = commit.write_reply_in_place(ticket, payload);
        let frame_len = udp.into_reply(frame, payload_len);
        (frame_len > 0).then_some(Reply {
            frame_len,
            payload_len,
        })
    }
}

#[cfg(test)]
mod test {
    use super::*;
    use crate::core::{LocalCounter, Protocol};
    use crate::stats::WorkerStats;
    use crate::wire::CounterRepr;
    use etherparse::PacketBuilder;

    fn udp_frame(source_port: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
            .udp(source_port, 7777)
            .write(&mut out, payload)
            .unwrap();
        out
    }

    fn engine() -> FrameEngine {
        FrameEngine::new(Listeners::new(&[(
            "198.18.0.1:7777".parse().unwrap(),
            Protocol::Counter,
        )]))
    }

    #[test]
    fn every_descriptor_ends_in_exactly_one_counted_outcome() {
        let valid = CounterRepr { value: 4 }.to_bytes();
        let mut tcp = Vec::new();
        PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ipv4([198, 18, 0, 2], [198, 18, 0, 1], 64)
            .tcp(40000, 7777, 1, 1000)
            .write(&mut tcp, &valid)
            .unwrap();
        let cases: Vec<(Option<Vec<u8>>, Option<DropReason>)> = vec![
            (Some(udp_frame(40000, &valid)), None),
            (None, Some(DropReason::BadDescriptor)),
            (Some(tcp), Some(DropReason::Malformed)),
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
        let engine = engine();
        let stats = WorkerStats::default();
        let mut batch = Batch::new(&stats);
        for (i, (frame, expected)) in cases.iter().enumerate() {
            let before = stats.snapshot();
            let (ticket, located) = engine.admit(&mut batch, frame.as_deref());
            let after = stats.snapshot();
            assert_eq!(after.requests, before.requests + 1, "case {i}: one request");
            assert_eq!(
                after.total_drops() - before.total_drops(),
                u64::from(expected.is_some()),
                "case {i}: at most one drop"
            );
            match expected {
                Some(reason) => {
                    assert_eq!(ticket, Ticket::Drop(*reason), "case {i}");
                    assert_eq!(after.drops(*reason), before.drops(*reason) + 1, "case {i}");
                    assert!(!ticket.is_reply(), "case {i}: a drop is never answered");
                }
                None => assert!(ticket.is_reply() && located.is_some(), "case {i}"),
            }
        }
    }

    #[test]
    fn an_answered_request_becomes_its_reply_in_place() {
        let engine = engine();
        let stats = WorkerStats::default();
        let request = CounterRepr { value: 5 }.to_bytes();
        let mut frame = udp_frame(40000, &request);
        let mut batch = Batch::new(&stats);
        let (ticket, located) = engine.admit(&mut batch, Some(&frame));
        let commit = batch.commit(&LocalCounter::new(10));
        let reply = FrameEngine::answer(&commit, ticket, located, &mut frame).unwrap();
        assert_eq!(reply.frame_len, frame.len());
        assert_eq!(reply.payload_len, 16);
        let parsed = etherparse::SlicedPacket::from_ethernet(&frame).unwrap();
        let Some(etherparse::TransportSlice::Udp(udp)) = parsed.transport else {
            panic!("not UDP");
        };
        assert_eq!((udp.source_port(), udp.destination_port()), (7777, 40000));
        assert_eq!(CounterRepr::parse_bytes(udp.payload()).unwrap().value, 15);
    }

    #[test]
    fn a_dropped_request_is_not_answered() {
        let engine = engine();
        let stats = WorkerStats::default();
        let mut frame = udp_frame(40000, b"aaaaaaaaaaaaaaaa");
        let mut batch = Batch::new(&stats);
        let (ticket, located) = engine.admit(&mut batch, Some(&frame));
        let commit = batch.commit(&LocalCounter::new(0));
        assert_eq!(
            FrameEngine::answer(&commit, ticket, located, &mut frame),
            None
        );
    }
}
