//! The shared protocol test vectors (computed with an independent xxHash implementation): every valid
//! frame parses and round-trips, every invalid one is rejected for its reason.

use ricochet::core::{Batch, Counter, LocalCounter, Protocol, Ticket};
use ricochet::stats::{DropReason, WorkerStats};
use ricochet::wire::{value_hash, CounterRepr, Frame, WireError};
use serde_json::Value;

fn vectors() -> Value {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/frames.json"
    ))
    .expect("tests/data/frames.json is part of the crate");
    serde_json::from_str(&text).expect("frames.json is valid JSON")
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn valid_vectors_parse_and_round_trip() {
    let v = vectors();
    let valid = v["valid"].as_array().unwrap();
    assert!(valid.len() >= 20, "expected the full vector set");
    for case in valid {
        let value: u64 = case["value"].as_str().unwrap().parse().unwrap();
        let hash = u64::from_str_radix(case["xxh64"].as_str().unwrap(), 16).unwrap();
        let frame = hex(case["frame_hex"].as_str().unwrap());
        assert_eq!(value.to_string(), case["decimal"].as_str().unwrap());
        assert_eq!(value_hash(value), hash, "hash of {value}");
        let view = Frame::new_checked(&frame[..]).unwrap();
        assert_eq!((view.value(), view.hash()), (value, hash));
        let repr = CounterRepr::parse(&view).unwrap();
        assert_eq!(repr.value, value);
        assert_eq!(repr.to_bytes().to_vec(), frame, "emit {value}");
    }
}

#[test]
fn invalid_vectors_are_rejected_for_their_reason() {
    let v = vectors();
    for case in v["invalid"].as_array().unwrap() {
        let frame = hex(case["frame_hex"].as_str().unwrap());
        let why = case["why"].as_str().unwrap();
        assert_eq!(frame.len() as u64, case["len"].as_u64().unwrap());
        let expected = if frame.len() == 16 {
            WireError::BadHash
        } else {
            WireError::WrongLength(frame.len())
        };
        assert_eq!(CounterRepr::parse_bytes(&frame), Err(expected), "{why}");

        // Through the core: counted under the matching reason, no reply, counter untouched.
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(5);
        let mut batch = Batch::new(&stats);
        let ticket = batch.admit(Protocol::Counter, &frame);
        batch.commit(&counter);
        let reason = DropReason::from(expected);
        assert_eq!(ticket, Ticket::Drop(reason), "{why}");
        assert_eq!(stats.drops(reason), 1, "{why}");
        assert_eq!(counter.load(), 5, "{why}");
    }
}

#[test]
fn replies_follow_the_reply_rule() {
    // "A reply is itself a valid frame: the counter's value after this request's increment."
    let v = vectors();
    let stats = WorkerStats::default();
    let counter = LocalCounter::new(0);
    let mut expected = 0u64;
    for case in v["valid"].as_array().unwrap() {
        let frame = hex(case["frame_hex"].as_str().unwrap());
        let increment: u64 = case["value"].as_str().unwrap().parse().unwrap();
        expected = expected.wrapping_add(increment);
        let mut batch = Batch::new(&stats);
        let ticket = batch.admit(Protocol::Counter, &frame);
        let commit = batch.commit(&counter);
        let mut reply = [0u8; 16];
        assert_eq!(commit.write_reply(ticket, &frame, &mut reply), 16);
        assert_eq!(
            CounterRepr::parse_bytes(&reply),
            Ok(CounterRepr { value: expected })
        );
    }
    assert_eq!(counter.load(), expected);
}

#[test]
fn sockperf_vector() {
    let v = vectors();
    let text = v["sockperf"].as_str().unwrap();
    // "ping 0000…9a66 (16 bytes) is answered by 0000…9a66."
    let words: Vec<&str> = text.split_whitespace().collect();
    let ping_at = words.iter().position(|w| *w == "ping").unwrap();
    let ping = hex(words[ping_at + 1]);
    let by_at = words.iter().position(|w| *w == "by").unwrap();
    let pong = hex(words[by_at + 1].trim_end_matches('.'));
    let stats = WorkerStats::default();
    let counter = LocalCounter::new(0);
    let mut batch = Batch::new(&stats);
    let ticket = batch.admit(Protocol::Sockperf, &ping);
    let commit = batch.commit(&counter);
    let mut reply = vec![0u8; ping.len()];
    let n = commit.write_reply(ticket, &ping, &mut reply);
    assert_eq!(&reply[..n], &pong[..]);
}
