//! Sans-IO failure handling for the shipper: a circuit breaker per target and an exponential
//! backoff with jitter between rounds that reached no target. Time and randomness come in as
//! arguments, so the tests drive them.

use std::time::{Duration, Instant};

/// Where a target's breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests go through.
    Closed,
    /// Too many consecutive failures: the target is skipped until the pause is over.
    Open,
    /// The pause is over: one attempt decides between closed and open again.
    HalfOpen,
}

impl BreakerState {
    /// The metric's value: 0 closed, 1 half-open, 2 open.
    pub fn code(self) -> u8 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::HalfOpen => 1,
            BreakerState::Open => 2,
        }
    }

    pub fn from_code(code: u8) -> BreakerState {
        match code {
            0 => BreakerState::Closed,
            1 => BreakerState::HalfOpen,
            _ => BreakerState::Open,
        }
    }
}

/// Opens after `threshold` consecutive failures; after `pause` lets one probe through.
#[derive(Debug, Clone)]
pub struct Breaker {
    threshold: u32,
    pause: Duration,
    failures: u32,
    state: BreakerState,
    reopen_at: Option<Instant>,
}

impl Breaker {
    pub fn new(threshold: u32, pause: Duration) -> Breaker {
        Breaker {
            threshold: threshold.max(1),
            pause,
            failures: 0,
            state: BreakerState::Closed,
            reopen_at: None,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// Whether an attempt may go to the target now; an open breaker whose pause is over turns
    /// half-open and lets this one attempt through.
    pub fn allows(&mut self, now: Instant) -> bool {
        match self.state {
            BreakerState::Closed | BreakerState::HalfOpen => true,
            BreakerState::Open if self.reopen_at.is_some_and(|at| now >= at) => {
                self.state = BreakerState::HalfOpen;
                true
            }
            BreakerState::Open => false,
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.state = BreakerState::Closed;
        self.reopen_at = None;
    }

    /// Counts a failure; `jitter` in [0, 1) stretches the pause by up to half, so that instances
    /// that failed together do not probe together.
    pub fn failure(&mut self, now: Instant, jitter: f64) {
        self.failures = self.failures.saturating_add(1);
        if self.state == BreakerState::HalfOpen || self.failures >= self.threshold {
            self.state = BreakerState::Open;
            self.reopen_at = Some(now + self.pause.mul_f64(1.0 + jitter.clamp(0.0, 1.0) / 2.0));
        }
    }
}

/// Exponential backoff with "equal jitter": the n-th wait is between half and all of
/// `min(max, base * 2^n)`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max: max.max(base),
            attempt: 0,
        }
    }

    /// The next wait; `jitter` in [0, 1).
    pub fn next(&mut self, jitter: f64) -> Duration {
        let step = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        step / 2 + (step / 2).mul_f64(jitter.clamp(0.0, 1.0))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A number in [0, 1) from the clock and a per-call sequence, hashed: enough to spread retries,
/// not meant for anything secret.
pub fn jitter() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seed =
        nanos ^ SEQ.fetch_add(1, Ordering::Relaxed).rotate_left(32) ^ u64::from(std::process::id());
    let hash = xxhash_rust::xxh64::xxh64(&seed.to_le_bytes(), 0);
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn the_breaker_opens_after_the_threshold_and_probes_once_after_the_pause() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(10));
        for _ in 0..2 {
            assert!(b.allows(t0));
            b.failure(t0, 0.0);
            assert_eq!(b.state(), BreakerState::Closed);
        }
        b.failure(t0, 0.0);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allows(t0 + Duration::from_secs(9)));
        assert!(b.allows(t0 + Duration::from_secs(10)));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        // A failed probe opens it again at once, for another pause (stretched by the jitter).
        b.failure(t0 + Duration::from_secs(10), 1.0);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allows(t0 + Duration::from_secs(24)));
        assert!(b.allows(t0 + Duration::from_secs(25)));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        // Successes reset the count: two more failures do not open it.
        b.failure(t0, 0.0);
        b.failure(t0, 0.0);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_inside_each_step() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let low: Vec<u128> = (0..6).map(|_| b.next(0.0).as_millis()).collect();
        assert_eq!(low, [50, 100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next(0.999_999).as_millis(), 99);
        for _ in 0..1000 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j));
        }
    }
}
