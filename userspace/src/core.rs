//! The sans-IO core shared by every datapath: verify requests, apply a batch to the global counter
//! with one atomic add, write replies into caller-provided buffers, count everything.
//!
//! Nothing here makes a syscall, reads a clock or allocates. A datapath receives a batch of requests,
//! calls [`Batch::admit`] on each (which verifies and counts), then [`Batch::commit`] once (one
//! `fetch_add` of the batch's sum on the global counter), then [`Commit::write_reply`] for each admitted
//! request. Replies carry prefix sums: the value after each request's own increment, so every reply
//! equals the sum of all increments applied up to and including that request.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::stats::{DropReason, WorkerStats};
use crate::wire::{CounterRepr, Frame, SockperfHeader, WireError, FRAME_LEN, SOCKPERF_HEADER_LEN};

/// The request/reply protocol a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// 16-byte verified increments applied to the global counter.
    #[default]
    Counter,
    /// The reply is the request unchanged.
    Echo,
    /// sockperf ping-pong reflector: the reply clears flag bit 0x0001 at offset 8.
    Sockperf,
}

impl Protocol {
    pub const fn as_str(self) -> &'static str {
        match self {
            Protocol::Counter => "counter",
            Protocol::Echo => "echo",
            Protocol::Sockperf => "sockperf",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Protocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "counter" => Ok(Protocol::Counter),
            "echo" => Ok(Protocol::Echo),
            "sockperf" => Ok(Protocol::Sockperf),
            other => Err(format!(
                "unknown protocol '{other}': use counter, echo or sockperf"
            )),
        }
    }
}

impl From<WireError> for DropReason {
    fn from(e: WireError) -> DropReason {
        match e {
            WireError::WrongLength(_) => DropReason::WrongLength,
            WireError::BadHash => DropReason::BadHash,
            WireError::TooShort(_) => DropReason::TooShort,
        }
    }
}

/// The one global u64 counter, wherever it lives (process memory now, a BPF map mapped into the
/// process for the in-kernel XDP datapath). Adds wrap modulo 2^64.
pub trait Counter: Send + Sync {
    /// Adds `delta` atomically and returns the value before the add.
    fn fetch_add(&self, delta: u64) -> u64;
    /// The current value.
    fn load(&self) -> u64;
}

/// A counter in process memory, alone on its cache line.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct LocalCounter(AtomicU64);

impl LocalCounter {
    pub const fn new(value: u64) -> LocalCounter {
        LocalCounter(AtomicU64::new(value))
    }
}

impl Counter for LocalCounter {
    #[inline]
    fn fetch_add(&self, delta: u64) -> u64 {
        // fetch_add on AtomicU64 wraps on overflow, as the protocol requires.
        self.0.fetch_add(delta, Ordering::AcqRel)
    }

    #[inline]
    fn load(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }
}

/// What to do with one admitted request once the batch is committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ticket {
    /// A valid counter request; `prefix` is the batch's running sum including this increment.
    Counter { prefix: u64 },
    /// Reflect the request unchanged.
    Echo,
    /// Reflect the request with the sockperf reply-request flag cleared.
    Sockperf,
    /// Invalid: never answered, already counted under this reason.
    Drop(DropReason),
}

impl Ticket {
    pub fn is_reply(self) -> bool {
        !matches!(self, Ticket::Drop(_))
    }
}

/// Checks one request of `protocol` without side effects.
pub fn classify(protocol: Protocol, request: &[u8]) -> Result<Classified, DropReason> {
    match protocol {
        Protocol::Counter => Ok(Classified::Counter(
            CounterRepr::parse_bytes(request)?.value,
        )),
        Protocol::Echo => Ok(Classified::Echo),
        Protocol::Sockperf => {
            SockperfHeader::new_checked(request)?;
            Ok(Classified::Sockperf)
        }
    }
}

/// A request that passed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Classified {
    Counter(u64),
    Echo,
    Sockperf,
}

/// Accumulates one batch of requests for one worker.
pub struct Batch<'s> {
    stats: &'s WorkerStats,
    sum: u64,
    n_counter: u32,
}

impl<'s> Batch<'s> {
    pub fn new(stats: &'s WorkerStats) -> Batch<'s> {
        Batch {
            stats,
            sum: 0,
            n_counter: 0,
        }
    }

    /// The statistics the batch counts into.
    pub fn stats(&self) -> &'s WorkerStats {
        self.stats
    }

    /// Verifies one request and counts it. Invalid requests are counted by reason and never answered.
    #[inline]
    pub fn admit(&mut self, protocol: Protocol, request: &[u8]) -> Ticket {
        self.stats.requests.add(1);
        self.stats.rx_bytes.add(request.len() as u64);
        match classify(protocol, request) {
            Ok(classified) => self.admit_classified(classified),
            Err(reason) => {
                self.stats.count_drop(reason);
                Ticket::Drop(reason)
            }
        }
    }

    /// Counts a request that failed before the core could see its payload (a datagram the kernel
    /// cut, a frame that is not a datagram for a listener, a descriptor outside the UMEM): one request
    /// of `len` bytes, dropped for `reason`, never answered. Every datapath counts such rejections here,
    /// so a request ends in exactly one counted outcome.
    #[inline]
    pub fn reject(&mut self, reason: DropReason, len: usize) -> Ticket {
        self.stats.requests.add(1);
        self.stats.rx_bytes.add(len as u64);
        self.stats.count_drop(reason);
        Ticket::Drop(reason)
    }

    /// Adds an already verified request to the batch (stream decoders verify while framing).
    #[inline]
    pub fn admit_classified(&mut self, classified: Classified) -> Ticket {
        match classified {
            Classified::Counter(increment) => {
                self.sum = self.sum.wrapping_add(increment);
                self.n_counter += 1;
                Ticket::Counter { prefix: self.sum }
            }
            Classified::Echo => Ticket::Echo,
            Classified::Sockperf => Ticket::Sockperf,
        }
    }

    /// Applies the batch to the global counter: one atomic add of the batch's sum (a plain load when
    /// the batch holds only reads), then resets the batch for reuse.
    #[inline]
    pub fn commit(&mut self, counter: &dyn Counter) -> Commit {
        let base = if self.n_counter == 0 {
            0
        } else if self.sum == 0 {
            counter.load()
        } else {
            counter.fetch_add(self.sum)
        };
        self.sum = 0;
        self.n_counter = 0;
        Commit { base }
    }
}

/// A committed batch: turns tickets into replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    base: u64,
}

impl Commit {
    /// The counter value a counter ticket's reply carries.
    #[inline]
    pub fn value(&self, prefix: u64) -> u64 {
        self.base.wrapping_add(prefix)
    }

    /// Writes the reply for `ticket` into `out`, which must be at least as long as `request`.
    /// Returns the reply length, never more than the request length (0 for a drop).
    #[inline]
    pub fn write_reply(&self, ticket: Ticket, request: &[u8], out: &mut [u8]) -> usize {
        match ticket {
            Ticket::Drop(_) => 0,
            Ticket::Counter { prefix } => {
                let reply = CounterRepr {
                    value: self.value(prefix),
                };
                reply.emit(&mut Frame::new_unchecked(&mut out[..FRAME_LEN]));
                FRAME_LEN
            }
            Ticket::Echo | Ticket::Sockperf => {
                let out = &mut out[..request.len()];
                out.copy_from_slice(request);
                if ticket == Ticket::Sockperf {
                    pong_in_place(out);
                }
                request.len()
            }
        }
    }

    /// Turns the request in `buf` into its reply in place (AF_XDP replies inside the received frame).
    /// Returns the reply length, never more than `buf.len()` (0 for a drop).
    #[inline]
    pub fn write_reply_in_place(&self, ticket: Ticket, buf: &mut [u8]) -> usize {
        match ticket {
            Ticket::Drop(_) => 0,
            Ticket::Counter { prefix } => {
                let reply = CounterRepr {
                    value: self.value(prefix),
                };
                reply.emit(&mut Frame::new_unchecked(&mut buf[..FRAME_LEN]));
                FRAME_LEN
            }
            Ticket::Echo => buf.len(),
            Ticket::Sockperf => {
                pong_in_place(buf);
                buf.len()
            }
        }
    }
}

fn pong_in_place(buf: &mut [u8]) {
    if let Ok(mut header) = SockperfHeader::new_checked(buf) {
        header.make_pong();
    }
}

/// Largest sockperf message a stream connection accepts; sockperf's own limit is 65,507 bytes.
pub const MAX_SOCKPERF_STREAM_MESSAGE: u32 = 1 << 20;

/// Framing state of one stream connection (TCP or Unix): at most one partial frame carried between
/// reads. Small on purpose (24 bytes) so idle connections cost almost nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct StreamDecoder {
    carry: [u8; FRAME_LEN],
    carry_len: u8,
    /// sockperf only: payload bytes of the current message still to reflect unchanged.
    passthrough: u32,
}

/// The result of feeding one read to a [`StreamDecoder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOutput {
    /// Reply bytes written to the output buffer.
    pub reply_len: usize,
    /// Requests those bytes answer (frames for counter and sockperf, the read for echo).
    pub replies: u32,
    /// Set when an invalid frame was found, with why: replies before it are in the output, the
    /// connection must be closed after sending them.
    pub error: Option<DropReason>,
}

impl StreamDecoder {
    /// Bytes of a partial frame held since the last read (a connection closing now ends mid-frame).
    pub fn pending(&self) -> usize {
        self.carry_len as usize + self.passthrough as usize
    }

    /// Bytes of a partial frame (or sockperf header) held: the next read's replies may answer them.
    pub fn carried(&self) -> usize {
        self.carry_len as usize
    }

    /// Processes one read. `out` must hold at least `input.len() + 16` bytes. Complete counter frames
    /// are answered as one batch with one atomic add; frames split across reads of any size work.
    pub fn feed(
        &mut self,
        protocol: Protocol,
        input: &[u8],
        out: &mut [u8],
        stats: &WorkerStats,
        counter: &dyn Counter,
    ) -> StreamOutput {
        stats.rx_bytes.add(input.len() as u64);
        match protocol {
            Protocol::Counter => self.feed_counter(input, out, stats, counter),
            Protocol::Echo => {
                if !input.is_empty() {
                    stats.requests.add(1);
                    out[..input.len()].copy_from_slice(input);
                }
                StreamOutput {
                    reply_len: input.len(),
                    replies: u32::from(!input.is_empty()),
                    error: None,
                }
            }
            Protocol::Sockperf => self.feed_sockperf(input, out, stats),
        }
    }

    fn feed_counter(
        &mut self,
        input: &[u8],
        out: &mut [u8],
        stats: &WorkerStats,
        counter: &dyn Counter,
    ) -> StreamOutput {
        // First pass: verify every complete frame (the carried one first) and sum the increments,
        // stopping at the first invalid frame.
        let carry_len = self.carry_len as usize;
        let head_take = if carry_len > 0 {
            (FRAME_LEN - carry_len).min(input.len())
        } else {
            0
        };
        let mut head = self.carry;
        head[carry_len..carry_len + head_take].copy_from_slice(&input[..head_take]);
        let head_complete = carry_len > 0 && carry_len + head_take == FRAME_LEN;
        if carry_len > 0 && !head_complete {
            self.carry = head;
            self.carry_len = (carry_len + head_take) as u8;
            return StreamOutput {
                reply_len: 0,
                replies: 0,
                error: None,
            };
        }
        let body = &input[head_take..];
        let frames = body.chunks_exact(FRAME_LEN);
        let tail = frames.remainder();

        let mut batch = Batch::new(stats);
        let mut n_valid = 0usize;
        let mut error = None;
        let head_frame = head_complete.then_some(&head[..]);
        for frame in head_frame.into_iter().chain(frames) {
            stats.requests.add(1);
            match classify(Protocol::Counter, frame) {
                Ok(classified) => {
                    batch.admit_classified(classified);
                    n_valid += 1;
                }
                Err(reason) => {
                    stats.count_drop(reason);
                    error = Some(reason);
                    break;
                }
            }
        }
        let commit = batch.commit(counter);

        // Second pass: the verified frames again, now with their reply values.
        let head_frame = head_complete.then_some(&head[..]);
        let mut prefix = 0u64;
        let mut reply_len = 0;
        for frame in head_frame
            .into_iter()
            .chain(body.chunks_exact(FRAME_LEN))
            .take(n_valid)
        {
            prefix = prefix.wrapping_add(Frame::new_unchecked(frame).value());
            let ticket = Ticket::Counter { prefix };
            reply_len += commit.write_reply(ticket, frame, &mut out[reply_len..]);
        }

        if error.is_none() {
            self.carry[..tail.len()].copy_from_slice(tail);
            self.carry_len = tail.len() as u8;
        } else {
            self.carry_len = 0;
        }
        StreamOutput {
            reply_len,
            replies: n_valid as u32,
            error,
        }
    }

    fn feed_sockperf(
        &mut self,
        mut input: &[u8],
        out: &mut [u8],
        stats: &WorkerStats,
    ) -> StreamOutput {
        let mut reply_len = 0;
        let mut replies = 0;
        while !input.is_empty() {
            if self.passthrough > 0 {
                let n = (self.passthrough as usize).min(input.len());
                out[reply_len..reply_len + n].copy_from_slice(&input[..n]);
                reply_len += n;
                input = &input[n..];
                self.passthrough -= n as u32;
                continue;
            }
            let carry_len = self.carry_len as usize;
            let take = (SOCKPERF_HEADER_LEN - carry_len).min(input.len());
            self.carry[carry_len..carry_len + take].copy_from_slice(&input[..take]);
            self.carry_len += take as u8;
            input = &input[take..];
            if (self.carry_len as usize) < SOCKPERF_HEADER_LEN {
                break;
            }
            self.carry_len = 0;
            stats.requests.add(1);
            let mut header = self.carry;
            let message_len = {
                let view = SockperfHeader::new_checked(&header[..SOCKPERF_HEADER_LEN])
                    .expect("carry holds a whole header");
                view.message_len()
            };
            if (message_len as usize) < SOCKPERF_HEADER_LEN
                || message_len > MAX_SOCKPERF_STREAM_MESSAGE
            {
                stats.count_drop(DropReason::TooShort);
                return StreamOutput {
                    reply_len,
                    replies,
                    error: Some(DropReason::TooShort),
                };
            }
            pong_in_place(&mut header[..SOCKPERF_HEADER_LEN]);
            out[reply_len..reply_len + SOCKPERF_HEADER_LEN]
                .copy_from_slice(&header[..SOCKPERF_HEADER_LEN]);
            reply_len += SOCKPERF_HEADER_LEN;
            replies += 1;
            self.passthrough = message_len - SOCKPERF_HEADER_LEN as u32;
        }
        StreamOutput {
            reply_len,
            replies,
            error: None,
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    fn frame(value: u64) -> [u8; 16] {
        CounterRepr { value }.to_bytes()
    }

    #[test]
    fn batch_hands_out_prefix_sums_with_one_add() {
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(100);
        let mut batch = Batch::new(&stats);
        let requests = [frame(1), frame(2), *b"aaaaaaaaaaaaaaaa", frame(3)];
        let tickets: Vec<Ticket> = requests
            .iter()
            .map(|r| batch.admit(Protocol::Counter, r))
            .collect();
        let commit = batch.commit(&counter);
        assert_eq!(counter.load(), 106);
        let mut out = [0u8; 16];
        let mut values = vec![];
        for (ticket, request) in tickets.iter().zip(&requests) {
            if commit.write_reply(*ticket, request, &mut out) == 16 {
                values.push(CounterRepr::parse_bytes(&out).unwrap().value);
            }
        }
        assert_eq!(values, vec![101, 103, 106]);
        assert_eq!(stats.drops(DropReason::BadHash), 1);
        assert_eq!(stats.requests.get(), 4);
    }

    #[test]
    fn zero_increment_reads_without_adding() {
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(7);
        let mut batch = Batch::new(&stats);
        let t = batch.admit(Protocol::Counter, &frame(0));
        let commit = batch.commit(&counter);
        let mut out = [0u8; 16];
        commit.write_reply(t, &frame(0), &mut out);
        assert_eq!(CounterRepr::parse_bytes(&out).unwrap().value, 7);
        assert_eq!(counter.load(), 7);
    }

    #[test]
    fn counter_wraps() {
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(u64::MAX);
        let mut batch = Batch::new(&stats);
        let t = batch.admit(Protocol::Counter, &frame(2));
        let commit = batch.commit(&counter);
        assert_eq!(counter.load(), 1);
        let mut out = [0u8; 16];
        commit.write_reply(t, &frame(2), &mut out);
        assert_eq!(CounterRepr::parse_bytes(&out).unwrap().value, 1);
    }

    #[test]
    fn sockperf_short_datagram_dropped() {
        let stats = WorkerStats::default();
        let mut batch = Batch::new(&stats);
        assert_eq!(
            batch.admit(Protocol::Sockperf, &[0u8; 13]),
            Ticket::Drop(DropReason::TooShort)
        );
        assert_eq!(stats.drops(DropReason::TooShort), 1);
    }

    #[test]
    fn in_place_matches_copying_reply() {
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        for protocol in [Protocol::Counter, Protocol::Echo, Protocol::Sockperf] {
            let request = frame(5);
            let mut batch = Batch::new(&stats);
            let t = batch.admit(protocol, &request);
            let commit = batch.commit(&counter);
            let mut copied = [0u8; 16];
            let n = commit.write_reply(t, &request, &mut copied);
            let mut in_place = request;
            let m = commit.write_reply_in_place(t, &mut in_place);
            assert_eq!((n, copied), (m, in_place), "{protocol}");
        }
    }

    #[test]
    fn stream_counter_split_at_every_byte() {
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        let mut input = Vec::new();
        for v in 1..=5u64 {
            input.extend_from_slice(&frame(v));
        }
        let mut decoder = StreamDecoder::default();
        let mut replies = Vec::new();
        let mut out = [0u8; 64];
        for byte in &input {
            let o = decoder.feed(Protocol::Counter, &[*byte], &mut out, &stats, &counter);
            assert_eq!(o.error, None);
            replies.extend_from_slice(&out[..o.reply_len]);
        }
        let values: Vec<u64> = replies
            .chunks(16)
            .map(|c| CounterRepr::parse_bytes(c).unwrap().value)
            .collect();
        assert_eq!(values, vec![1, 3, 6, 10, 15]);
        assert_eq!(decoder.pending(), 0);
    }

    #[test]
    fn stream_counter_answers_frames_before_an_invalid_one() {
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        let mut input = Vec::new();
        input.extend_from_slice(&frame(4));
        input.extend_from_slice(b"aaaaaaaaaaaaaaaa");
        input.extend_from_slice(&frame(8));
        let mut out = vec![0u8; input.len() + 16];
        let o =
            StreamDecoder::default().feed(Protocol::Counter, &input, &mut out, &stats, &counter);
        assert_eq!(o.reply_len, 16);
        assert_eq!(o.error, Some(DropReason::BadHash));
        assert_eq!(counter.load(), 4);
    }

    #[test]
    fn stream_sockperf_reflects_split_messages() {
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        let mut message = vec![0u8; 20];
        message[..14].copy_from_slice(b"\0\0\0\0\0\0\0\x01\x00\x03\x00\x00\x00\x14");
        message[14..].copy_from_slice(b"abcdef");
        let mut twice = message.clone();
        twice.extend_from_slice(&message);
        let mut decoder = StreamDecoder::default();
        let mut replies = Vec::new();
        let mut out = [0u8; 64];
        for chunk in twice.chunks(3) {
            let o = decoder.feed(Protocol::Sockperf, chunk, &mut out, &stats, &counter);
            assert_eq!(o.error, None);
            replies.extend_from_slice(&out[..o.reply_len]);
        }
        let mut expected = message.clone();
        expected[9] = 0x02;
        let mut expected_twice = expected.clone();
        expected_twice.extend_from_slice(&expected);
        assert_eq!(replies, expected_twice);
        assert_eq!(stats.requests.get(), 2);
    }

    #[test]
    fn stream_sockperf_rejects_impossible_length() {
        let stats = WorkerStats::default();
        let counter = LocalCounter::new(0);
        let header = b"\0\0\0\0\0\0\0\x01\x00\x03\x00\x00\x00\x05";
        let mut out = [0u8; 64];
        let o =
            StreamDecoder::default().feed(Protocol::Sockperf, header, &mut out, &stats, &counter);
        assert_eq!(o.error, Some(DropReason::TooShort));
        assert_eq!(o.reply_len, 0);
    }
}
