//! What a run is asked to do, resolved from the flags once: message size, per-connection request
//! budgets, the end of sending and the open-loop interval.

use std::time::Duration;

use anyhow::{Context, Result};

use super::args::BenchArgs;
use crate::core::Protocol;
use crate::spec::ListenSpec;
use crate::wire::FRAME_LEN;

/// What a run is asked to do, shared by its threads.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub(super) target: ListenSpec,
    /// Connections over all threads.
    pub(super) connections: usize,
    pub(super) depth: usize,
    pub(super) increment: u64,
    /// Request (and reply) size in bytes: 16 for counter requests, `--message-size` otherwise.
    pub(super) message_size: usize,
    pub(super) timeout: Duration,
    pub(super) spin: bool,
    pub(super) warmup: Duration,
    /// End of sending, measured from the start (warm-up included); None for count runs.
    pub(super) send_for: Option<Duration>,
    /// Requests per connection for count runs (after warm-up).
    pub(super) requests_per_conn: Option<Vec<u64>>,
    /// Interval between requests of one connection in open loop.
    pub(super) interval: Option<Duration>,
}

impl Plan {
    pub(super) fn new(args: &BenchArgs, n_conns: usize) -> Result<Plan> {
        // The flags' ranges keep these sums far from overflowing (at most 8 days).
        let send_for = match (args.duration, args.requests) {
            (Some(d), _) => Some(args.warmup + d),
            (None, Some(_)) => None,
            (None, None) => Some(args.warmup + Duration::from_secs(10)),
        };
        let interval = match args.rate {
            Some(rate) => Some(
                Duration::try_from_secs_f64(n_conns as f64 / rate)
                    .with_context(|| format!("--rate {rate} over {n_conns} connections"))?,
            ),
            None => None,
        };
        Ok(Plan {
            target: args.target.clone(),
            connections: n_conns,
            depth: args.depth as usize,
            increment: args.increment,
            message_size: if args.target.protocol == Protocol::Counter {
                FRAME_LEN
            } else {
                args.message_size as usize
            },
            timeout: args.timeout,
            spin: args.spin,
            warmup: args.warmup,
            send_for,
            requests_per_conn: args.requests.map(|total| split_evenly(total, n_conns)),
            interval,
        })
    }
}

/// `total` requests over `n_conns` connections, the first ones taking one more when it does not
/// divide evenly.
fn split_evenly(total: u64, n_conns: usize) -> Vec<u64> {
    let n = n_conns as u64;
    (0..n)
        .map(|i| total / n + u64::from(i < total % n))
        .collect()
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn count_runs_split_requests_evenly_over_connections() {
        assert_eq!(split_evenly(10, 3), vec![4, 3, 3]);
        assert_eq!(split_evenly(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split_evenly(1_000_001, 1), vec![1_000_001]);
    }
}
