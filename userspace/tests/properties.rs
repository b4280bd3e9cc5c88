//! Property tests of the sans-IO core: no panic on arbitrary bytes, replies never longer than their
//! requests, emit/parse round-trips, and stream framing independent of how reads split the bytes.

use proptest::prelude::*;
use ricochet::core::{Batch, Counter, LocalCounter, Protocol, StreamDecoder, Ticket};
use ricochet::stats::{DropReason, WorkerStats};
use ricochet::wire::{CounterRepr, Frame};

fn protocol() -> impl Strategy<Value = Protocol> {
    prop_oneof![
        Just(Protocol::Counter),
        Just(Protocol::Echo),
        Just(Protocol::Sockperf)
    ]
}

proptest! {
    #[test]
    fn datagram_never_panics_and_never_amplifies(protocol in protocol(), bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        let mut batch = Batch::new(&stats);
        let ticket = batch.admit(protocol, &bytes);
        let commit = batch.commit(&counter);
        let mut out = vec![0u8; bytes.len().max(16)];
        let n = commit.write_reply(ticket, &bytes, &mut out);
        prop_assert!(n <= bytes.len());
        let mut in_place = bytes.clone();
        prop_assert_eq!(commit.write_reply_in_place(ticket, &mut in_place), n);
        if let Ticket::Drop(_) = ticket {
            prop_assert_eq!(n, 0);
            prop_assert_eq!(counter.load(), 0);
        }
    }

    #[test]
    fn any_single_bit_flip_of_a_valid_frame_is_rejected(value in any::<u64>(), bit in 0usize..128) {
        // The hash covers the value: a changed value or a changed hash must never be taken for a
        // request, and must leave the counter alone. (A flip in the value could in theory land on
        // another value with the same hash: probability 2^-64 per case.)
        let mut bytes = CounterRepr { value }.to_bytes();
        bytes[bit / 8] ^= 1 << (bit % 8);
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        let mut batch = Batch::new(&stats);
        let ticket = batch.admit(Protocol::Counter, &bytes);
        batch.commit(&counter);
        prop_assert_eq!(ticket, Ticket::Drop(DropReason::BadHash));
        prop_assert_eq!(counter.load(), 0);
        prop_assert_eq!(stats.drops(DropReason::BadHash), 1);
    }

    #[test]
    fn admit_agrees_with_an_independent_check(bytes in any::<[u8; 16]>(), make_valid in any::<bool>()) {
        // The reference: the value's decimal string from std's formatter, hashed with xxh64 seed 0.
        let mut bytes = bytes;
        let value = u64::from_be_bytes(bytes[..8].try_into().unwrap());
        let reference = xxhash_rust::xxh64::xxh64(value.to_string().as_bytes(), 0);
        if make_valid {
            bytes[8..].copy_from_slice(&reference.to_be_bytes());
        }
        let valid = u64::from_be_bytes(bytes[8..].try_into().unwrap()) == reference;
        let stats = WorkerStats::default();
        let mut batch = Batch::new(&stats);
        let ticket = batch.admit(Protocol::Counter, &bytes);
        let expected = if valid { Ticket::Counter { prefix: value } } else { Ticket::Drop(DropReason::BadHash) };
        prop_assert_eq!(ticket, expected);
    }

    #[test]
    fn emit_parse_round_trip(value in any::<u64>()) {
        let bytes = CounterRepr { value }.to_bytes();
        prop_assert_eq!(CounterRepr::parse_bytes(&bytes), Ok(CounterRepr { value }));
        prop_assert_eq!(Frame::new_checked(&bytes[..]).unwrap().value(), value);
    }

    #[test]
    fn stream_never_panics_on_arbitrary_reads(protocol in protocol(), reads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..20)) {
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        let mut decoder = StreamDecoder::default();
        let mut total_in = 0;
        let mut total_out = 0;
        for read in &reads {
            let mut out = vec![0u8; read.len() + 16];
            let o = decoder.feed(protocol, read, &mut out, &stats, &counter);
            total_in += read.len();
            total_out += o.reply_len;
            prop_assert!(total_out <= total_in, "amplified: {} > {}", total_out, total_in);
            if o.error.is_some() {
                break;
            }
        }
    }

    #[test]
    fn stream_counter_independent_of_splits(increments in proptest::collection::vec(0u64..1000, 1..30), cuts in proptest::collection::vec(1usize..40, 1..40)) {
        let mut input = Vec::new();
        for &v in &increments {
            input.extend_from_slice(&CounterRepr { value: v }.to_bytes());
        }
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        let mut decoder = StreamDecoder::default();
        let mut replies = Vec::new();
        let mut rest = &input[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].min(rest.len());
            i += 1;
            let mut out = vec![0u8; n + 16];
            let o = decoder.feed(Protocol::Counter, &rest[..n], &mut out, &stats, &counter);
            prop_assert_eq!(o.error, None);
            replies.extend_from_slice(&out[..o.reply_len]);
            rest = &rest[n..];
        }
        let mut sum = 0u64;
        let expected: Vec<u8> = increments.iter().flat_map(|&v| { sum += v; CounterRepr { value: sum }.to_bytes() }).collect();
        prop_assert_eq!(replies, expected);
        prop_assert_eq!(counter.load(), sum);
    }
}
