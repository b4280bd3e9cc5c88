//! Recording a client thread's run, sans-IO: the `Recorder` verifies, times and counts every request
//! and reply of one thread (warm-up excluded) into its `ThreadResult` and latency histogram.

use std::time::Instant;

use hdrhistogram::Histogram;

use super::pending::{Attribution, Pending, LATE_WINDOW_TIMEOUTS};
use super::plan::Plan;
use super::report::new_histogram;
use crate::core::Protocol;
use crate::wire::{CounterRepr, SockperfHeader};

/// What one client thread counted: requests, answers and losses after the warm-up; invalid and
/// non-increasing replies whenever they came. The threads' results are added up.
#[derive(Debug, Default)]
pub(super) struct ThreadResult {
    pub(super) sent: u64,
    pub(super) received: u64,
    pub(super) lost: u64,
    pub(super) unanswered: u64,
    pub(super) late: u64,
    pub(super) invalid: u64,
    pub(super) non_increasing: u64,
    /// Counter reply values, kept to find duplicates across connections (empty otherwise).
    pub(super) values: Vec<u64>,
    /// The highest counter value any connection saw last.
    pub(super) last_value: Option<u64>,
}

impl ThreadResult {
    pub(super) fn add(&mut self, other: ThreadResult) {
        self.sent += other.sent;
        self.received += other.received;
        self.lost += other.lost;
        self.unanswered += other.unanswered;
        self.late += other.late;
        self.invalid += other.invalid;
        self.non_increasing += other.non_increasing;
        self.values.extend(other.values);
        self.last_value = self.last_value.max(other.last_value);
    }
}

/// A reply's bytes: a valid answer (with the counter's value for counter replies), or not.
enum Content {
    Valid(Option<u64>),
    Invalid,
}

/// What one client thread measures; requests sent before `warmup_end` are verified, not counted.
pub(super) struct Recorder<'a> {
    plan: &'a Plan,
    hist: Histogram<u64>,
    result: ThreadResult,
    warmup_end: Instant,
    /// Keep every counter reply value to find duplicates across connections.
    collect_values: bool,
}

impl<'a> Recorder<'a> {
    /// A recorder for a run that starts at `start`.
    pub(super) fn new(plan: &'a Plan, start: Instant) -> Recorder<'a> {
        Recorder {
            plan,
            hist: new_histogram(),
            result: ThreadResult::default(),
            warmup_end: start + plan.warmup,
            collect_values: plan.target.protocol == Protocol::Counter && plan.increment != 0,
        }
    }

    /// What the thread counted and its latency histogram; `last_value` is the highest value its
    /// connections saw last.
    pub(super) fn finish(self, last_value: Option<u64>) -> (ThreadResult, Histogram<u64>) {
        let mut result = self.result;
        result.last_value = last_value;
        (result, self.hist)
    }

    /// Replies received after the warm-up so far (the progress bar).
    pub(super) fn received(&self) -> u64 {
        self.result.received
    }

    /// Counts a request meant to be sent at `intended`; true when it is measured (after the warm-up).
    pub(super) fn on_sent(&mut self, intended: Instant) -> bool {
        let measured = intended >= self.warmup_end;
        self.result.sent += u64::from(measured);
        measured
    }

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
    fn check_message(&self, reply: &[u8], header: &SockperfHeader<&[u8]>) -> Content {
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

    fn answered(
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
    fn late(&mut self, measured: bool, value: Option<u64>) {
        if measured {
            self.result.late += 1;
            self.keep_value(value);
        }
    }

    fn keep_value(&mut self, value: Option<u64>) {
        if let (true, Some(value)) = (self.collect_values, value) {
            self.result.values.push(value);
        }
    }
}
