//! What `ricochet bench` reports: the summary of a run (text or JSON), its verdict, latency
//! percentiles and the HdrHistogram percentile distribution (`--hgrm`).

use std::io::{self, Write};
use std::time::Duration;

use anyhow::{bail, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use super::args::{BenchArgs, MAX_TIMEOUT};
use super::plan::Plan;
use super::recorder::ThreadResult;
use crate::core::Protocol;

/// The JSON result (docs/bench-json.md).
#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub config: ReportConfig,
    pub sent: u64,
    pub received: u64,
    /// Datagram requests unanswered within the timeout.
    pub lost: u64,
    /// Stream requests unanswered within the timeout: the server may still have applied them.
    pub unanswered: u64,
    /// Replies that came after their request timed out (counted in `lost` or `unanswered`).
    pub late: u64,
    /// Replies that are not a valid answer to the request (bad hash, wrong sequence or flags).
    pub invalid_replies: u64,
    /// Counter replies not strictly greater than the previous one on the same connection (with
    /// `--increment 0`: smaller than it).
    pub non_increasing: u64,
    /// Counter reply values seen more than once across all connections of this run.
    pub duplicate_values: u64,
    pub duration_s: f64,
    pub throughput_rps: f64,
    /// None when nothing was answered: there is no latency to report.
    pub latency_ns: Option<LatencySummary>,
    /// Last counter value seen (counter protocol), for cross-checks.
    pub last_counter_value: Option<u64>,
}

/// What the run was asked to do, as the flags said it (`BenchReport::config`).
#[derive(Debug, Clone, Serialize)]
pub struct ReportConfig {
    pub target: String,
    pub protocol: Protocol,
    pub transport: &'static str,
    pub connections: u32,
    pub depth: u32,
    pub rate_rps: Option<f64>,
    pub duration_s: Option<f64>,
    pub requests: Option<u64>,
    pub warmup_s: f64,
    pub increment: u64,
    pub message_size: u16,
    pub threads: usize,
    pub spin: bool,
    pub timeout_s: f64,
}

impl BenchReport {
    pub(super) fn new(
        args: &BenchArgs,
        plan: &Plan,
        threads: usize,
        total: ThreadResult,
        hist: &Histogram<u64>,
        measured: Duration,
    ) -> BenchReport {
        let duration_s = measured.as_secs_f64().max(1e-9);
        BenchReport {
            config: ReportConfig {
                target: args.target.to_string(),
                protocol: args.target.protocol,
                transport: args.target.transport.scheme(),
                connections: args.connections,
                depth: args.depth,
                rate_rps: args.rate,
                duration_s: args.duration.map(|d| d.as_secs_f64()),
                requests: args.requests,
                warmup_s: args.warmup.as_secs_f64(),
                increment: args.increment,
                message_size: plan.message_size as u16,
                threads,
                spin: args.spin,
                timeout_s: args.timeout.as_secs_f64(),
            },
            sent: total.sent,
            received: total.received,
            lost: total.lost,
            unanswered: total.unanswered,
            late: total.late,
            invalid_replies: total.invalid,
            non_increasing: total.non_increasing,
            duplicate_values: if args.increment == 0 {
                0
            } else {
                count_duplicates(total.values)
            },
            duration_s,
            throughput_rps: total.received as f64 / duration_s,
            latency_ns: (!hist.is_empty()).then(|| LatencySummary::from_histogram(hist)),
            last_counter_value: total.last_value,
        }
    }

    /// Err when the run must not be trusted: wrong answers, or too few answers to describe the
    /// server (none, or fewer than half of the measured requests).
    pub(super) fn verdict(&self) -> Result<()> {
        let mut problems = Vec::new();
        if self.invalid_replies > 0 || self.non_increasing > 0 || self.duplicate_values > 0 {
            problems.push(format!(
                "{} invalid replies, {} non-increasing counter values, {} duplicate values",
                self.invalid_replies, self.non_increasing, self.duplicate_values
            ));
        }
        if self.sent == 0 {
            problems.push("no request was sent after the warm-up: lengthen --duration".into());
        } else if self.received == 0 {
            problems.push(format!(
                "none of the {} requests was answered, so there is no latency to report: check \
                 that a server listens on {} and speaks {}",
                self.sent, self.config.target, self.config.protocol
            ));
        } else if self.received.saturating_mul(2) < self.sent {
            problems.push(format!(
                "only {} of {} requests were answered ({} lost, {} unanswered), too few to describe \
                 the server: check the path, the server's load and --timeout",
                self.received, self.sent, self.lost, self.unanswered
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            bail!("{}", problems.join("; "))
        }
    }
}

/// Values seen more than once; sorts `values`.
fn count_duplicates(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    values.windows(2).filter(|w| w[0] == w[1]).count() as u64
}

/// Round-trip latencies in nanoseconds, from the histogram of timed replies.
#[derive(Debug, Clone, Serialize, Default)]
pub struct LatencySummary {
    pub count: u64,
    pub min: u64,
    pub mean: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p99_9: u64,
    pub p99_99: u64,
    pub max: u64,
    /// Fraction of the replies faster than 1 ms.
    pub share_under_1ms: f64,
}

impl LatencySummary {
    pub fn from_histogram(h: &Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p99_9: h.value_at_quantile(0.999),
            p99_99: h.value_at_quantile(0.9999),
            max: h.max(),
            share_under_1ms: h.count_between(0, 1_000_000) as f64 / h.len() as f64,
        }
    }
}

/// Writes the HdrHistogram percentile distribution text (values in microseconds).
pub fn write_hgrm(h: &Histogram<u64>, out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "{:>12} {:>14} {:>10} {:>14}\n",
        "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
    )?;
    let mut total = 0u64;
    for v in h.iter_quantiles(5) {
        total += v.count_since_last_iteration();
        let q = v.quantile_iterated_to();
        let inverse = if q < 1.0 {
            format!("{:14.2}", 1.0 / (1.0 - q))
        } else {
            format!("{:>14}", "inf")
        };
        writeln!(
            out,
            "{:12.3} {:14.12} {:10} {}",
            v.value_iterated_to() as f64 / 1e3,
            q,
            total,
            inverse
        )?;
    }
    let (mean, stdev, max) = if h.is_empty() {
        (0.0, 0.0, 0.0)
    } else {
        (h.mean() / 1e3, h.stdev() / 1e3, h.max() as f64 / 1e3)
    };
    writeln!(
        out,
        "#[Mean    = {mean:12.3}, StdDeviation   = {stdev:12.3}]"
    )?;
    writeln!(
        out,
        "#[Max     = {max:12.3}, Total count    = {:12}]",
        h.len()
    )?;
    writeln!(
        out,
        "#[Buckets = {:12}, SubBuckets     = {:12}]",
        h.buckets(),
        h.distinct_values()
    )?;
    Ok(())
}

/// An empty latency histogram (nanoseconds) that holds every latency a run can time.
pub fn new_histogram() -> Histogram<u64> {
    // 1 ns to the longest timeout at 3 significant digits: a reply is timed only when it came
    // within the timeout, so every latency fits.
    Histogram::new_with_bounds(1, MAX_TIMEOUT.as_nanos() as u64, 3).expect("valid histogram bounds")
}

/// Prints the report as text, one line per aspect.
pub(super) fn print_text(r: &BenchReport) {
    println!("target        {}", r.config.target);
    println!(
        "load          {} connections x depth {}{}",
        r.config.connections,
        r.config.depth,
        r.config
            .rate_rps
            .map(|x| format!(", open loop at {x} req/s"))
            .unwrap_or_default()
    );
    // Datagrams are lost; a stream request the client gave up on may still have been applied.
    let (gave_up, n_gave_up) = if r.config.transport == "udp" {
        ("lost", r.lost)
    } else {
        ("unanswered", r.unanswered)
    };
    println!(
        "requests      sent {} received {} {gave_up} {n_gave_up} late {} invalid {}",
        r.sent, r.received, r.late, r.invalid_replies
    );
    if r.unanswered > 0 {
        println!(
            "unanswered    {}: the server may still have applied them",
            r.unanswered
        );
    }
    println!(
        "throughput    {:.0} req/s over {:.2} s",
        r.throughput_rps, r.duration_s
    );
    let Some(l) = &r.latency_ns else {
        println!("latency       none: no request was answered");
        return print_counter(r);
    };
    let us = |ns: u64| ns as f64 / 1e3;
    println!(
        "latency (us)  min {:.1} p50 {:.1} p90 {:.1} p99 {:.1} p99.9 {:.1} p99.99 {:.1} max {:.1} mean {:.1}",
        us(l.min),
        us(l.p50),
        us(l.p90),
        us(l.p99),
        us(l.p99_9),
        us(l.p99_99),
        us(l.max),
        l.mean / 1e3
    );
    println!("under 1 ms    {:.4}%", l.share_under_1ms * 100.0);
    print_counter(r);
}

fn print_counter(r: &BenchReport) {
    if let Some(v) = r.last_counter_value {
        println!("counter       last value {v}");
    }
}

#[cfg(test)]
mod test {
    use super::*;

    #[test]
    fn the_histogram_holds_the_longest_timeout() {
        let mut h = new_histogram();
        h.record(MAX_TIMEOUT.as_nanos() as u64).unwrap();
        assert!(h.max() >= MAX_TIMEOUT.as_nanos() as u64);
    }

    #[test]
    fn hgrm_has_percentiles_and_footer() {
        let mut h = new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 1000).unwrap();
        }
        let mut out = Vec::new();
        write_hgrm(&h, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("       Value     Percentile"));
        assert!(text.contains("#[Max     ="));
        let last_data = text
            .lines()
            .rfind(|l| !l.starts_with('#') && !l.trim().is_empty())
            .unwrap();
        let cols: Vec<&str> = last_data.split_whitespace().collect();
        assert_eq!(cols[2], "1000");
    }

    #[test]
    fn summary_percentiles() {
        let mut h = new_histogram();
        for v in 1..=100u64 {
            h.record(v * 10_000).unwrap();
        }
        let s = LatencySummary::from_histogram(&h);
        assert_eq!(s.count, 100);
        assert!((s.p50 as i64 - 500_000).abs() < 1000);
        assert_eq!(s.share_under_1ms, 1.0);
    }
}
