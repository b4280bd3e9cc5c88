//! Matching replies to requests, sans-IO: the requests in flight on one socket (`Pending`), their
//! timeouts and the late window, and where each reply belongs (`Attribution`).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

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
struct TimedOut {
    seq: u64,
    measured: bool,
    /// None on streams: their replies always come.
    forget_at: Option<Instant>,
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
    in_flight: VecDeque<(Instant, u64)>,
    /// Oldest first: sequence numbers and forget times increase.
    timed_out: VecDeque<TimedOut>,
}

impl Pending {
    pub(super) fn with_capacity(depth: usize) -> Pending {
        Pending {
            in_flight: VecDeque::with_capacity(depth),
            timed_out: VecDeque::new(),
        }
    }

    /// An empty `Pending` that holds as many requests in flight as this one without growing.
    pub(super) fn empty_like(&self) -> Pending {
        Pending::with_capacity(self.in_flight.capacity())
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

    fn late(&mut self, pos: usize) -> Attribution {
        match self.timed_out.remove(pos) {
            Some(t) => Attribution::Late {
                measured: t.measured,
            },
            None => Attribution::Unexpected,
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
