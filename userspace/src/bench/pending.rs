//! Matching replies to requests, sans-IO: the requests in flight on one connection (`Pending`), the
//! timeouts and the late window, and the `Recorder` that times, verifies and counts every reply.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use super::{Plan, ThreadResult};
use crate::core::Protocol;
use crate::wire::{CounterRepr, SockperfHeader};

/// How long a datagram request that timed out is remembered, in timeouts: a reply that comes
/// within this window after the timeout counts as late; a later one is not recognised (invalid for
/// echo and sockperf; for counter requests the retired socket is closed by then). Stream replies
/// always come, in order, so stream requests are remembered until their reply comes.
pub(super) const LATE_WINDOW_TIMEOUTS: u32 = 2;

/// Where a reply belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Attribution {
    /// It answers the request in flight that was sent (or meant to be sent) at this instant.
    Answers(Instant),
    /// Its request timed out before it came; `measured` when that request was sent after the
    /// warm-up.
    Late { measured: bool },
    /// No request explains it: a duplicate, or later than the late window.
    Unexpected,
}

/// A request whose reply did not come in time, remembered so that its reply counts as late.
#[derive(Debug, Clone, Copy)]
pub(super) struct TimedOut {
    pub(super) seq: u64,
    pub(super) measured: bool,
    /// None on streams: their replies always come.
    pub(super) forget_at: Option<Instant>,
}

/// The requests of one socket that wait for a reply, and those that timed out. Sans-IO: the
/// client's matching policy, tested without sockets.
///
/// Echo and sockperf replies carry the request's sequence number and are matched exactly. Counter
/// replies carry no request id, so they are matched in order: exact on streams (replies come in
/// order, late ones first) and on datagrams at depth 1 (a timed-out counter request moves its
/// connection to a fresh socket, see `Flow::move_to_fresh_socket`). At depth > 1 on datagrams a
/// lost reply shifts the match by one request until the run ends (the latencies of the following
/// replies are then measured from the previous request's send time); the counts stay exact.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Intended send times and sequence numbers, oldest first.
    pub(super) in_flight: VecDeque<(Instant, u64)>,
    /// Oldest first: sequence numbers and forget times increase.
    pub(super) timed_out: VecDeque<TimedOut>,
}

impl Pending {
    pub(super) fn with_capacity(depth: usize) -> Pending {
        Pending {
            in_flight: VecDeque::with_capacity(depth),
            timed_out: VecDeque::new(),
        }
    }

    pub(super) fn push(&mut self, sent_at: Instant, seq: u64) {
        self.in_flight.push_back((sent_at, seq));
    }

    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Some request timed out and nothing else is in flight.
    pub(super) fn only_timed_out(&self) -> bool {
        self.in_flight.is_empty() && !self.timed_out.is_empty()
    }

    pub(super) fn awaits_replies(&self) -> bool {
        !(self.in_flight.is_empty() && self.timed_out.is_empty())
    }

    /// Moves the requests in flight for `timeout` or longer to the timed-out ones, remembered for
    /// `remember` (None: until their reply comes), and forgets those past their window. Returns how
    /// many of the newly timed-out requests were sent after `warmup_end`.
    pub(super) fn expire(
        &mut self,
        now: Instant,
        timeout: Duration,
        remember: Option<Duration>,
        warmup_end: Instant,
    ) -> u64 {
        let mut measured = 0;
        while let Some(&(sent_at, seq)) = self.in_flight.front() {
            if now.saturating_duration_since(sent_at) < timeout {
                break;
            }
            self.in_flight.pop_front();
            let is_measured = sent_at >= warmup_end;
            measured += u64::from(is_measured);
            self.timed_out.push_back(TimedOut {
                seq,
                measured: is_measured,
                forget_at: remember.and_then(|window| now.checked_add(window)),
            });
        }
        while self
            .timed_out
            .front()
            .is_some_and(|t| t.forget_at.is_some_and(|at| at <= now))
        {
            self.timed_out.pop_front();
        }
        measured
    }

    /// Attributes a reply that carries its request's sequence number (echo, sockperf).
    pub(super) fn by_sequence(&mut self, seq: u64) -> Attribution {
        if let Some(pos) = self.in_flight.iter().position(|&(_, s)| s == seq) {
            if let Some((sent_at, _)) = self.in_flight.remove(pos) {
                return Attribution::Answers(sent_at);
            }
        }
        match self.timed_out.binary_search_by_key(&seq, |t| t.seq) {
            Ok(pos) => self.late(pos),
            Err(_) => Attribution::Unexpected,
        }
    }

    /// Attributes a reply without a request id (counter), in order. On a stream the replies to
    /// timed-out requests come first; on datagrams a reply goes to the oldest request in flight,
    /// and is late only when nothing is in flight.
    pub(super) fn in_order(&mut self, stream: bool) -> Attribution {
        if stream && !self.timed_out.is_empty() {
            return self.late(0);
        }
        match self.in_flight.pop_front() {
            Some((sent_at, _)) => Attribution::Answers(sent_at),
            None if !self.timed_out.is_empty() => self.late(0),
            None => Attribution::Unexpected,
        }
    }

    pub(super) fn late(&mut self, pos: usize) -> Attribution {
        match self.timed_out.remove(pos) {
            Some(t) => Attribution::Late {
                measured: t.measured,
            },
            None => Attribution::Unexpected,
        }
    }
}

/// A reply's bytes: a valid answer (with the counter's value for counter replies), or not.
pub(super) enum Content {
    Valid(Option<u64>),
    Invalid,
}

/// What one client thread measures; requests sent before `warmup_end` are verified, not counted.
pub(super) struct Recorder<'a> {
    pub(super) plan: &'a Plan,
    pub(super) hist: Histogram<u64>,
    pub(super) result: ThreadResult,
    pub(super) warmup_end: Instant,
    /// Keep every counter reply value to find duplicates across connections.
    pub(super) collect_values: bool,
}

impl Recorder<'_> {
    /// Expires the requests of one socket past the timeout: datagrams are lost, stream requests
    /// unanswered (the server may still apply them).
    pub(super) fn expire(&mut self, pending: &mut Pending, now: Instant) {
        let stream = self.plan.target.transport.is_stream();
        let remember = (!stream).then(|| self.plan.timeout.saturating_mul(LATE_WINDOW_TIMEOUTS));
        let measured = pending.expire(now, self.plan.timeout, remember, self.warmup_end);
        if stream {
            self.result.unanswered += measured;
        } else {
            self.result.lost += measured;
        }
    }

    /// Judges one reply. Requests past the timeout are expired first, so a reply that comes after
    /// its request's timeout is late: never timed, never taken for the answer to a newer request.
    pub(super) fn on_reply(
        &mut self,
        pending: &mut Pending,
        last_value: &mut Option<u64>,
        reply: &[u8],
    ) {
        let now = Instant::now();
        self.expire(pending, now);
        let (attribution, content) = match self.plan.target.protocol {
            Protocol::Counter => (
                pending.in_order(self.plan.target.transport.is_stream()),
                match CounterRepr::parse_bytes(reply) {
                    Ok(repr) => Content::Valid(Some(repr.value)),
                    Err(_) => Content::Invalid,
                },
            ),
            Protocol::Echo | Protocol::Sockperf => {
                let Ok(header) = SockperfHeader::new_checked(reply) else {
                    self.result.invalid += 1;
                    return;
                };
                (
                    pending.by_sequence(header.sequence()),
                    self.check_message(reply, &header),
                )
            }
        };
        let value = match content {
            Content::Valid(value) => value,
            Content::Invalid => {
                self.result.invalid += 1;
                return;
            }
        };
        match attribution {
            Attribution::Answers(sent_at) => self.answered(now, sent_at, value, last_value),
            Attribution::Late { measured } => self.late(measured, value),
            Attribution::Unexpected => self.result.invalid += 1,
        }
    }

    /// An echo or sockperf reply is the request as `fill_message` built it (sockperf: with the
    /// reply-request flag cleared).
    pub(super) fn check_message(&self, reply: &[u8], header: &SockperfHeader<&[u8]>) -> Content {
        let valid = reply.len() == self.plan.message_size
            && match self.plan.target.protocol {
                Protocol::Sockperf => header.flags() & crate::wire::SOCKPERF_PONG_REQUEST_FLAG == 0,
                // fill_message: the sequence number, six 0xab bytes, zero padding.
                _ => reply[8..14].iter().all(|&b| b == 0xab) && reply[14..].iter().all(|&b| b == 0),
            };
        if valid {
            Content::Valid(None)
        } else {
            Content::Invalid
        }
    }

    pub(super) fn answered(
        &mut self,
        now: Instant,
        sent_at: Instant,
        value: Option<u64>,
        last_value: &mut Option<u64>,
    ) {
        if let Some(value) = value {
            let increasing = match *last_value {
                None => true,
                Some(prev) if self.plan.increment == 0 => value >= prev,
                Some(prev) => value > prev,
            };
            if !increasing {
                self.result.non_increasing += 1;
            }
            *last_value = Some(value);
        }
        if sent_at < self.warmup_end {
            return;
        }
        self.keep_value(value);
        self.result.received += 1;
        // Below the timeout, so below the histogram's top and u64::MAX nanoseconds.
        let latency = u64::try_from(now.saturating_duration_since(sent_at).as_nanos());
        self.hist
            .saturating_record(latency.unwrap_or(u64::MAX).max(1));
    }

    /// A late reply is counted, not timed; its value still joins the duplicate check (it was
    /// handed out by the server), but not the per-connection order (later replies overtook it).
    pub(super) fn late(&mut self, measured: bool, value: Option<u64>) {
        if measured {
            self.result.late += 1;
            self.keep_value(value);
        }
    }

    pub(super) fn keep_value(&mut self, value: Option<u64>) {
        if let (true, Some(value)) = (self.collect_values, value) {
            self.result.values.push(value);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(100);
    const WINDOW: Option<Duration> = Some(Duration::from_millis(200));

    /// Requests 1..=n sent 1 ms apart from `t0`.
    fn sent(t0: Instant, n: u64) -> Pending {
        let mut pending = Pending::default();
        for seq in 1..=n {
            pending.push(t0 + Duration::from_millis(seq), seq);
        }
        pending
    }

    fn ms(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn sequenced_replies_match_exactly_and_late_ones_are_late_once() {
        let t0 = Instant::now();
        let mut pending = sent(t0, 4);
        // Request 1 times out; 2 is answered out of order; 1's reply then comes late, once.
        assert_eq!(pending.expire(ms(t0, 101), TIMEOUT, WINDOW, t0), 1);
        assert_eq!(pending.by_sequence(3), Attribution::Answers(ms(t0, 3)));
        assert_eq!(pending.by_sequence(1), Attribution::Late { measured: true });
        assert_eq!(pending.by_sequence(1), Attribution::Unexpected);
        assert_eq!(pending.by_sequence(3), Attribution::Unexpected);
        assert_eq!(pending.by_sequence(99), Attribution::Unexpected);
        assert_eq!(pending.in_flight(), 2);
    }

    #[test]
    fn timed_out_requests_are_forgotten_after_the_window() {
        let t0 = Instant::now();
        let mut pending = sent(t0, 2);
        assert_eq!(pending.expire(ms(t0, 150), TIMEOUT, WINDOW, t0), 2);
        assert!(pending.awaits_replies());
        assert_eq!(pending.expire(ms(t0, 349), TIMEOUT, WINDOW, t0), 0);
        assert!(pending.awaits_replies());
        assert_eq!(pending.expire(ms(t0, 350), TIMEOUT, WINDOW, t0), 0);
        assert!(!pending.awaits_replies());
        assert_eq!(pending.by_sequence(1), Attribution::Unexpected);
    }

    #[test]
    fn warm_up_requests_are_neither_lost_nor_late() {
        let t0 = Instant::now();
        let mut pending = sent(t0, 3);
        // The warm-up ends after request 2 was sent.
        assert_eq!(pending.expire(ms(t0, 200), TIMEOUT, WINDOW, ms(t0, 3)), 1);
        assert_eq!(
            pending.by_sequence(2),
            Attribution::Late { measured: false }
        );
        assert_eq!(pending.by_sequence(3), Attribution::Late { measured: true });
    }

    #[test]
    fn counter_replies_on_a_stream_answer_timed_out_requests_first() {
        let t0 = Instant::now();
        let mut pending = sent(t0, 1);
        assert_eq!(pending.expire(ms(t0, 101), TIMEOUT, None, t0), 1);
        pending.push(ms(t0, 102), 2);
        // Stream replies come in order: the first one is the late answer to request 1.
        assert_eq!(pending.in_order(true), Attribution::Late { measured: true });
        assert_eq!(pending.in_order(true), Attribution::Answers(ms(t0, 102)));
        assert_eq!(pending.in_order(true), Attribution::Unexpected);
        // Streams remember timed-out requests until their reply comes.
        pending.push(ms(t0, 103), 3);
        assert_eq!(pending.expire(ms(t0, 100_000), TIMEOUT, None, t0), 1);
        assert_eq!(pending.in_order(true), Attribution::Late { measured: true });
    }

    #[test]
    fn counter_datagrams_are_late_only_with_nothing_in_flight() {
        let t0 = Instant::now();
        let mut pending = sent(t0, 1);
        assert_eq!(pending.expire(ms(t0, 101), TIMEOUT, WINDOW, t0), 1);
        assert!(pending.only_timed_out());
        assert_eq!(
            pending.in_order(false),
            Attribution::Late { measured: true }
        );
        assert_eq!(pending.in_order(false), Attribution::Unexpected);
        // With a newer request in flight a reply without an id goes to it: this is why a
        // timed-out counter flow moves to a fresh socket before sending again.
        let mut pending = sent(t0, 1);
        pending.expire(ms(t0, 101), TIMEOUT, WINDOW, t0);
        pending.push(ms(t0, 102), 2);
        assert!(!pending.only_timed_out());
        assert_eq!(pending.in_order(false), Attribution::Answers(ms(t0, 102)));
        assert_eq!(
            pending.in_order(false),
            Attribution::Late { measured: true }
        );
    }
}
