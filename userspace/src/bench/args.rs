//! `ricochet bench`'s command line: flags, their ranges and their parsing.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::spec::{duration_in, CpuList, ListenSpec};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Target: [PROTO+]TRANSPORT://ADDR, the same form as serve's --listen (udp://198.18.0.1:7777,
    /// sockperf+udp://127.0.0.1:11111, tcp://127.0.0.1:7777, unix:///run/ricochet.sock).
    #[arg(value_name = "SPEC")]
    pub target: ListenSpec,

    /// Sockets (UDP) or connections (TCP, Unix) to use.
    #[arg(long, short = 'c', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: u32,

    /// Requests in flight per connection; 1 is ping-pong.
    #[arg(long, short = 'd', default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub depth: u32,

    /// How long to send (after the warm-up), e.g. 10s, 500ms, 2m; 1ms to 7d.
    #[arg(long, value_parser = duration_in(MIN_DURATION, MAX_DURATION))]
    pub duration: Option<Duration>,

    /// Total requests to send (after the warm-up) instead of a duration.
    #[arg(long, conflicts_with = "duration", value_parser = clap::value_parser!(u64).range(1..))]
    pub requests: Option<u64>,

    /// Open loop at this many requests per second in total (0.01 to 1e9), latency measured from
    /// intended send times.
    #[arg(long, value_name = "PER_SECOND", value_parser = parse_rate)]
    pub rate: Option<f64>,

    /// Load sent before measuring, e.g. 1s (at most 1d); its replies are verified but not counted.
    #[arg(long, default_value = "0s", value_parser = duration_in(Duration::ZERO, MAX_WARMUP))]
    pub warmup: Duration,

    /// The increment each counter request carries.
    #[arg(long, default_value_t = 1)]
    pub increment: u64,

    /// Payload size in bytes for echo and sockperf requests (counter requests are 16 bytes).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(14..=65000))]
    pub message_size: u16,

    /// CPUs to run one pinned client thread each on; connections are spread over them.
    /// Default: one unpinned thread.
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<CpuList>,

    /// A request unanswered after this long counts as lost (datagrams, never retried) or
    /// unanswered (streams); a reply that comes later counts as late. 1ms to 1h.
    #[arg(long, default_value = "1s", value_parser = duration_in(MIN_TIMEOUT, MAX_TIMEOUT))]
    pub timeout: Duration,

    /// Busy-poll for replies instead of sleeping in epoll (lowest client-side latency).
    #[arg(long)]
    pub spin: bool,

    /// Print the result as JSON (schema in docs/bench-json.md) instead of text.
    #[arg(long)]
    pub json: bool,

    /// Write the latency distribution in HdrHistogram percentile format (values in microseconds).
    #[arg(long, value_name = "FILE")]
    pub hgrm: Option<PathBuf>,

    /// Open the connections, send nothing, hold them this long (at most 7d), then close (memory
    /// benchmarks).
    #[arg(long, value_parser = duration_in(Duration::ZERO, MAX_DURATION), value_name = "DURATION")]
    pub hold: Option<Duration>,

    /// Source addresses to spread connections over (comma-separated), to exceed one address's
    /// ephemeral ports, e.g. 127.0.0.2,127.0.0.3.
    #[arg(long, value_delimiter = ',', value_name = "IPS")]
    pub sources: Vec<IpAddr>,
}

pub(super) const DAY: Duration = Duration::from_secs(86_400);
/// `--duration` and `--hold` bounds: long runs are fine, an accidental year is not.
pub(super) const MIN_DURATION: Duration = Duration::from_millis(1);
pub(super) const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);
pub(super) const MAX_WARMUP: Duration = DAY;
/// `--timeout` bounds. The latency histogram covers up to `MAX_TIMEOUT`: a reply is only timed
/// when it came within the timeout.
pub(super) const MIN_TIMEOUT: Duration = Duration::from_millis(1);
pub(super) const MAX_TIMEOUT: Duration = Duration::from_secs(3_600);
/// `--rate` bounds in requests per second over all connections.
pub(super) const MIN_RATE: f64 = 0.01;
pub(super) const MAX_RATE: f64 = 1e9;

/// Parses `--rate`: requests per second in total, `MIN_RATE..=MAX_RATE`.
pub(super) fn parse_rate(text: &str) -> Result<f64, String> {
    let rate: f64 = text.trim().parse().map_err(|_| {
        format!("'{text}' is not a number of requests per second: write e.g. 50000 or 2.5e5")
    })?;
    if !(MIN_RATE..=MAX_RATE).contains(&rate) {
        return Err(format!(
            "must be between {MIN_RATE} and {MAX_RATE} requests per second: got {text}"
        ));
    }
    Ok(rate)
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn rates_outside_the_range_are_refused() {
        assert_eq!(parse_rate("50000"), Ok(50_000.0));
        assert_eq!(parse_rate("0.01"), Ok(0.01));
        assert_eq!(parse_rate("1e9"), Ok(1e9));
        for bad in ["1e-300", "0", "-5", "1.1e9", "inf", "NaN", "fast", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }
}
