//! `ricochet bench`: a load generator with latency histograms that verifies every reply.
//!
//! Closed loop (default): each connection keeps `--depth` requests in flight. Open loop (`--rate`):
//! requests are scheduled at a constant rate and each latency is measured from the request's intended
//! send time, so a stalled server shows up in the percentiles instead of slowing the client down
//! (no coordinated omission, as in wrk2).
//!
//! A request unanswered within `--timeout` is lost (datagrams) or unanswered (streams: the server
//! may still have applied it); a reply that comes after its request timed out is late: counted,
//! never timed. `Pending` holds the matching policy and its one inexact case (counter replies,
//! which carry no request id, over UDP at depth > 1).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use serde::Serialize;

use crate::core::Protocol;
use crate::spec::{duration_in, CpuId, CpuList, ListenSpec, Transport};
use crate::sys;
use crate::wire::{CounterRepr, SockperfHeader, FRAME_LEN};

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

const DAY: Duration = Duration::from_secs(86_400);
/// `--duration` and `--hold` bounds: long runs are fine, an accidental year is not.
const MIN_DURATION: Duration = Duration::from_millis(1);
const MAX_DURATION: Duration = Duration::from_secs(7 * 86_400);
const MAX_WARMUP: Duration = DAY;
/// `--timeout` bounds. The latency histogram covers up to `MAX_TIMEOUT`: a reply is only timed
/// when it came within the timeout.
const MIN_TIMEOUT: Duration = Duration::from_millis(1);
const MAX_TIMEOUT: Duration = Duration::from_secs(3_600);
/// `--rate` bounds in requests per second over all connections.
const MIN_RATE: f64 = 0.01;
const MAX_RATE: f64 = 1e9;

/// Parses `--rate`: requests per second in total, `MIN_RATE..=MAX_RATE`.
fn parse_rate(text: &str) -> Result<f64, String> {
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
    /// Counter replies not strictly greater than the previous one on the same connection.
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
    fn new(
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
    fn verdict(&self) -> Result<()> {
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

pub fn new_histogram() -> Histogram<u64> {
    // 1 ns to the longest timeout at 3 significant digits: a reply is timed only when it came
    // within the timeout, so every latency fits.
    Histogram::new_with_bounds(1, MAX_TIMEOUT.as_nanos() as u64, 3).expect("valid histogram bounds")
}

/// What a run is asked to do, shared by its threads.
#[derive(Debug, Clone)]
struct Plan {
    target: ListenSpec,
    /// Connections over all threads.
    connections: usize,
    depth: usize,
    increment: u64,
    message_size: usize,
    timeout: Duration,
    spin: bool,
    warmup: Duration,
    /// End of sending, measured from start, for duration runs.
    send_for: Option<Duration>,
    /// Requests per connection for count runs (after warm-up).
    requests_per_conn: Option<Vec<u64>>,
    /// Interval between requests of one connection in open loop.
    interval: Option<Duration>,
}

impl Plan {
    fn new(args: &BenchArgs, n_conns: usize) -> Result<Plan> {
        let requests_per_conn = args.requests.map(|total| {
            (0..n_conns as u64)
                .map(|i| total / n_conns as u64 + u64::from(i < total % n_conns as u64))
                .collect::<Vec<u64>>()
        });
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
            requests_per_conn,
            interval,
        })
    }
}

#[derive(Debug, Default)]
struct ThreadResult {
    sent: u64,
    received: u64,
    lost: u64,
    unanswered: u64,
    late: u64,
    invalid: u64,
    non_increasing: u64,
    values: Vec<u64>,
    last_value: Option<u64>,
}

impl ThreadResult {
    fn add(&mut self, other: ThreadResult) {
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

pub fn run(args: BenchArgs) -> Result<()> {
    let _ = sys::raise_fd_limit();
    let cpus: Vec<Option<CpuId>> = match &args.cpus {
        Some(list) => CpuList::resolve(Some(list), &sys::allowed_cpus()?)
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .map(Some)
            .collect(),
        None => vec![None],
    };
    let conns = open_connections(&args).context("cannot connect")?;
    if let Some(hold) = args.hold {
        return hold_idle(conns, hold, args.json);
    }
    let threads = cpus.len().min(conns.len()).max(1);
    let plan = Plan::new(&args, conns.len())?;
    let bar = progress_bar(&args, plan.send_for);
    let start = Instant::now() + Duration::from_millis(20);
    let (total, hist) = run_clients(&plan, conns, cpus, start, &bar)?;
    let measured = plan
        .send_for
        .map(|d| d - args.warmup)
        .unwrap_or_else(|| start.elapsed().saturating_sub(args.warmup));
    let report = BenchReport::new(&args, &plan, threads, total, &hist, measured);
    if let Some(path) = &args.hgrm {
        let mut file =
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        write_hgrm(&hist, &mut file)?;
    }
    // The report comes first, whatever the verdict: scripts parse it.
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    report.verdict()
}

/// Runs one client thread per CPU (connections spread over them) and merges their results.
fn run_clients(
    plan: &Plan,
    conns: Vec<Conn>,
    cpus: Vec<Option<CpuId>>,
    start: Instant,
    bar: &indicatif::ProgressBar,
) -> Result<(ThreadResult, Histogram<u64>)> {
    let threads = cpus.len().min(conns.len()).max(1);
    let mut buckets: Vec<Vec<(usize, Conn)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, conn) in conns.into_iter().enumerate() {
        buckets[i % threads].push((i, conn));
    }
    let progress = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for (bucket, cpu) in buckets.into_iter().zip(cpus) {
        let plan = plan.clone();
        let progress = progress.clone();
        handles.push(std::thread::spawn(
            move || -> Result<(ThreadResult, Histogram<u64>)> {
                if let Some(cpu) = cpu {
                    sys::pin_current_thread(cpu)
                        .with_context(|| format!("cannot pin client thread to CPU {cpu}"))?;
                }
                run_thread(&plan, bucket, start, &progress)
            },
        ));
    }
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        bar.set_position(progress.load(Ordering::Relaxed));
    }
    bar.finish_and_clear();
    let mut hist = new_histogram();
    let mut total = ThreadResult::default();
    for handle in handles {
        let (result, thread_hist) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        hist.add(&thread_hist)
            .map_err(|e| anyhow::anyhow!("cannot merge latency histograms: {e:?}"))?;
        total.add(result);
    }
    Ok((total, hist))
}

fn progress_bar(args: &BenchArgs, send_for: Option<Duration>) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if args.json || !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match args.requests {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let secs = send_for.map(|d| d.as_secs()).unwrap_or(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {{elapsed}}/{secs}s {{pos}} replies {{per_sec}}"
        ))
        .expect("valid template"),
    );
    bar
}

fn print_text(r: &BenchReport) {
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

/// One client connection.
enum Conn {
    Udp(UdpSocket),
    Stream(File),
}

impl Conn {
    fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Conn::Udp(s) => s.as_fd(),
            Conn::Stream(f) => f.as_fd(),
        }
    }

    /// Makes reads block for at most `timeout` (writes block too; requests are small).
    fn set_blocking_with_timeout(&self, timeout: Duration) -> Result<()> {
        use nix::fcntl::{fcntl, FcntlArg, OFlag};
        let fd = self.fd();
        let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
        fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags - OFlag::O_NONBLOCK))?;
        let tv = nix::sys::time::TimeVal::new(0, timeout.as_micros() as _);
        nix::sys::socket::setsockopt(&fd, nix::sys::socket::sockopt::ReceiveTimeout, &tv)?;
        Ok(())
    }

    fn is_stream(&self) -> bool {
        matches!(self, Conn::Stream(_))
    }
}

fn open_connections(args: &BenchArgs) -> Result<Vec<Conn>> {
    let mut conns = Vec::with_capacity(args.connections as usize);
    for i in 0..args.connections as usize {
        let source = (!args.sources.is_empty()).then(|| args.sources[i % args.sources.len()]);
        let conn = match &args.target.transport {
            Transport::Udp(addr) => {
                let local: SocketAddr = match (source, addr) {
                    (Some(ip), _) => SocketAddr::new(ip, 0),
                    (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().expect("literal"),
                    (None, SocketAddr::V6(_)) => "[::]:0".parse().expect("literal"),
                };
                Conn::Udp(udp_connect(local, *addr).with_context(|| {
                    format!("cannot open a UDP socket on {local} towards {addr}")
                })?)
            }
            Transport::Tcp(addr) => {
                let stream = match source {
                    None => TcpStream::connect(addr)
                        .with_context(|| format!("cannot connect to {addr} (connection {i})"))?,
                    Some(ip) => connect_tcp_from(ip, *addr).with_context(|| {
                        format!("cannot connect to {addr} from {ip} (connection {i})")
                    })?,
                };
                stream.set_nodelay(true)?;
                stream.set_nonblocking(true)?;
                Conn::Stream(File::from(std::os::fd::OwnedFd::from(stream)))
            }
            Transport::Unix(path) => {
                let stream = UnixStream::connect(path)
                    .with_context(|| format!("cannot connect to {}", path.display()))?;
                stream.set_nonblocking(true)?;
                Conn::Stream(File::from(std::os::fd::OwnedFd::from(stream)))
            }
        };
        conns.push(conn);
    }
    Ok(conns)
}

/// A non-blocking UDP socket bound to `local` and connected to `target`.
fn udp_connect(local: SocketAddr, target: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(local)?;
    socket.connect(target)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A socket like `old`, from the same address and to the same peer, with a new source port.
fn fresh_udp_socket(old: &UdpSocket) -> io::Result<UdpSocket> {
    udp_connect(SocketAddr::new(old.local_addr()?.ip(), 0), old.peer_addr()?)
}

fn connect_tcp_from(source: IpAddr, target: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    // Let connect() pick the source port, so ports are unique per 4-tuple rather than per address.
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.connect(&target.into())?;
    Ok(socket.into())
}

fn hold_idle(conns: Vec<Conn>, hold: Duration, json: bool) -> Result<()> {
    let n = conns.len();
    if json {
        println!(
            "{{\"held_connections\": {n}, \"hold_s\": {}}}",
            hold.as_secs_f64()
        );
    } else {
        println!(
            "holding {n} idle connections for {:.1} s",
            hold.as_secs_f64()
        );
    }
    io::stdout().flush()?;
    std::thread::sleep(hold);
    drop(conns);
    Ok(())
}

/// How long a datagram request that timed out is remembered, in timeouts: a reply that comes
/// within this window after the timeout counts as late; a later one is not recognised (invalid for
/// echo and sockperf; for counter requests the retired socket is closed by then). Stream replies
/// always come, in order, so stream requests are remembered until their reply comes.
const LATE_WINDOW_TIMEOUTS: u32 = 2;

/// Where a reply belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Attribution {
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
struct Pending {
    /// Intended send times and sequence numbers, oldest first.
    in_flight: VecDeque<(Instant, u64)>,
    /// Oldest first: sequence numbers and forget times increase.
    timed_out: VecDeque<TimedOut>,
}

impl Pending {
    fn with_capacity(depth: usize) -> Pending {
        Pending {
            in_flight: VecDeque::with_capacity(depth),
            timed_out: VecDeque::new(),
        }
    }

    fn push(&mut self, sent_at: Instant, seq: u64) {
        self.in_flight.push_back((sent_at, seq));
    }

    fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Some request timed out and nothing else is in flight.
    fn only_timed_out(&self) -> bool {
        self.in_flight.is_empty() && !self.timed_out.is_empty()
    }

    fn awaits_replies(&self) -> bool {
        !(self.in_flight.is_empty() && self.timed_out.is_empty())
    }

    /// Moves the requests in flight for `timeout` or longer to the timed-out ones, remembered for
    /// `remember` (None: until their reply comes), and forgets those past their window. Returns how
    /// many of the newly timed-out requests were sent after `warmup_end`.
    fn expire(
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
    fn by_sequence(&mut self, seq: u64) -> Attribution {
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
    fn in_order(&mut self, stream: bool) -> Attribution {
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

/// A reply's bytes: a valid answer (with the counter's value for counter replies), or not.
enum Content {
    Valid(Option<u64>),
    Invalid,
}

/// What one client thread measures; requests sent before `warmup_end` are verified, not counted.
struct Recorder<'a> {
    plan: &'a Plan,
    hist: Histogram<u64>,
    result: ThreadResult,
    warmup_end: Instant,
    /// Keep every counter reply value to find duplicates across connections.
    collect_values: bool,
}

impl Recorder<'_> {
    /// Expires the requests of one socket past the timeout: datagrams are lost, stream requests
    /// unanswered (the server may still apply them).
    fn expire(&mut self, pending: &mut Pending, now: Instant) {
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
    fn on_reply(&mut self, pending: &mut Pending, last_value: &mut Option<u64>, reply: &[u8]) {
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

/// The client side of one connection during a run.
struct Flow {
    conn: Conn,
    pending: Pending,
    /// Counter over UDP: sockets left after a timeout, read only to count late replies.
    retired: Vec<Retired>,
    next_seq: u64,
    /// Requests still to send in a count run.
    budget: Option<u64>,
    next_send: Instant,
    /// Stream transports: bytes of a partial reply.
    partial: Vec<u8>,
    /// Stream transports: request bytes the socket did not take yet.
    unsent: Vec<u8>,
    last_value: Option<u64>,
}

/// A socket a flow moved away from, kept open until the late replies it waits for come or are
/// forgotten.
struct Retired {
    socket: UdpSocket,
    pending: Pending,
}

impl Flow {
    /// Connection `global_index` of the run's `plan.connections`.
    fn new(plan: &Plan, conn: Conn, global_index: usize, start: Instant) -> Flow {
        // Spread open-loop connections evenly over one interval.
        let offset = plan
            .interval
            .map(|iv| iv.mul_f64(global_index as f64 / plan.connections.max(1) as f64))
            .unwrap_or_default();
        Flow {
            conn,
            pending: Pending::with_capacity(plan.depth),
            retired: Vec::new(),
            next_seq: 1,
            budget: plan.requests_per_conn.as_ref().map(|v| v[global_index]),
            next_send: start + offset,
            partial: Vec::new(),
            unsent: Vec::new(),
            last_value: None,
        }
    }

    /// Counter requests over UDP, after a timeout with nothing else in flight: sends from a fresh
    /// socket (a new source port) from now on, so a late reply can never be taken for the answer
    /// to a newer request. The old socket is read only to count late replies, and closed once they
    /// came or were forgotten (`LATE_WINDOW_TIMEOUTS` after the timeout).
    fn move_to_fresh_socket(&mut self, epoll: &Epoll, token: u64, blocking: bool) -> Result<()> {
        let Conn::Udp(old) = &self.conn else {
            return Ok(());
        };
        // Out of descriptors or ports: keep the socket; late replies are then matched in order.
        let Ok(fresh) = fresh_udp_socket(old) else {
            return Ok(());
        };
        let fresh = Conn::Udp(fresh);
        if blocking {
            fresh.set_blocking_with_timeout(DIRECT_READ_TIMEOUT)?;
        }
        epoll.add(fresh.fd(), EpollEvent::new(EpollFlags::EPOLLIN, token))?;
        if let Conn::Udp(old) = std::mem::replace(&mut self.conn, fresh) {
            epoll.delete(old.as_fd())?;
            old.set_nonblocking(true)?;
            let pending = std::mem::take(&mut self.pending);
            self.pending.in_flight.reserve(pending.in_flight.capacity());
            self.retired.push(Retired {
                socket: old,
                pending,
            });
        }
        Ok(())
    }

    /// Counts the late replies waiting on retired sockets, and closes the sockets that wait for
    /// nothing more.
    fn read_retired(&mut self, buf: &mut [u8], rec: &mut Recorder, now: Instant) -> Result<()> {
        for retired in &mut self.retired {
            loop {
                match retired.socket.recv(buf) {
                    Ok(n) => rec.on_reply(&mut retired.pending, &mut None, &buf[..n]),
                    Err(e) if is_transient(&e) => break,
                    Err(e) => return Err(e).context("receive failed"),
                }
            }
            rec.expire(&mut retired.pending, now);
        }
        self.retired.retain(|r| r.pending.awaits_replies());
        Ok(())
    }
}

/// A receive that found nothing, or an ICMP error for an earlier datagram (nobody listening).
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::ConnectionRefused
    )
}

/// The epoll token of the open-loop pacing timer (flows use their index).
const TIMER_TOKEN: u64 = u64::MAX;
/// The receive timeout of a single closed-loop connection read directly (not through epoll).
const DIRECT_READ_TIMEOUT: Duration = Duration::from_millis(10);
/// How often retired sockets are read. Late replies are counted, not timed, so this only bounds
/// how long they wait in the socket.
const RETIRED_READ_INTERVAL: Duration = Duration::from_millis(1);

/// The request bytes: one counter frame, or an echo/sockperf message rewritten per request.
struct Requests {
    counter: [u8; FRAME_LEN],
    message: Vec<u8>,
}

impl Requests {
    fn payload(&mut self, protocol: Protocol, seq: u64) -> &[u8] {
        match protocol {
            Protocol::Counter => &self.counter,
            Protocol::Echo | Protocol::Sockperf => {
                fill_message(&mut self.message, protocol, seq);
                &self.message
            }
        }
    }
}

/// One client thread: its flows, its epoll set and what it measured.
struct Client<'a> {
    plan: &'a Plan,
    flows: Vec<Flow>,
    rec: Recorder<'a>,
    epoll: Epoll,
    /// Wakes the open-loop client for sub-millisecond waits (epoll counts in milliseconds).
    timer: TimerFd,
    /// One closed-loop connection: receive on the socket itself (blocking with a short timeout,
    /// or non-blocking when spinning) instead of through epoll: one syscall less per request.
    direct: bool,
    send_end: Option<Instant>,
    requests: Requests,
    recv_buf: Vec<u8>,
    events: Vec<EpollEvent>,
    next_retired_read: Instant,
}

fn run_thread(
    plan: &Plan,
    conns: Vec<(usize, Conn)>,
    start: Instant,
    progress: &AtomicU64,
) -> Result<(ThreadResult, Histogram<u64>)> {
    let mut client = Client::new(plan, conns, start)?;
    while Instant::now() < start {
        std::hint::spin_loop();
    }
    loop {
        let now = Instant::now();
        if client.send_due(now)? {
            break;
        }
        client.receive(now)?;
        client.housekeeping()?;
        progress.store(client.rec.result.received, Ordering::Relaxed);
    }
    let mut result = client.rec.result;
    result.last_value = client.flows.iter().filter_map(|f| f.last_value).max();
    Ok((result, client.rec.hist))
}

impl<'a> Client<'a> {
    fn new(plan: &'a Plan, conns: Vec<(usize, Conn)>, start: Instant) -> Result<Client<'a>> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        epoll.add(
            timer.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, TIMER_TOKEN),
        )?;
        let mut flows: Vec<Flow> = Vec::with_capacity(conns.len());
        for (k, (global_index, conn)) in conns.into_iter().enumerate() {
            epoll.add(conn.fd(), EpollEvent::new(EpollFlags::EPOLLIN, k as u64))?;
            flows.push(Flow::new(plan, conn, global_index, start));
        }
        let direct = flows.len() == 1 && plan.interval.is_none();
        if direct && !plan.spin {
            flows[0]
                .conn
                .set_blocking_with_timeout(DIRECT_READ_TIMEOUT)?;
        }
        let rec = Recorder {
            plan,
            hist: new_histogram(),
            result: ThreadResult::default(),
            warmup_end: start + plan.warmup,
            collect_values: plan.target.protocol == Protocol::Counter && plan.increment != 0,
        };
        Ok(Client {
            plan,
            flows,
            rec,
            epoll,
            timer,
            direct,
            send_end: plan.send_for.map(|d| start + d),
            requests: Requests {
                counter: CounterRepr {
                    value: plan.increment,
                }
                .to_bytes(),
                message: vec![0u8; plan.message_size],
            },
            recv_buf: vec![0u8; 65536],
            events: vec![EpollEvent::empty(); 256],
            next_retired_read: start,
        })
    }

    /// Sends what is due on every flow; true when the run is over (nothing left to send, nothing
    /// in flight).
    fn send_due(&mut self, now: Instant) -> Result<bool> {
        let sending = self.send_end.is_none_or(|end| now < end);
        let mut done = true;
        for flow in &mut self.flows {
            if sending && flow.budget.is_none_or(|b| b > 0) {
                done = false;
                send_flow(self.plan, flow, &mut self.requests, &mut self.rec, now)?;
            }
            if flow.pending.in_flight() > 0 || !flow.unsent.is_empty() {
                done = false;
            }
        }
        Ok(done)
    }

    /// Waits for replies, no longer than the next scheduled send or timeout check, and reads them.
    fn receive(&mut self, now: Instant) -> Result<()> {
        if self.direct {
            let once = !self.plan.spin;
            return receive_replies(&mut self.flows[0], &mut self.recv_buf, &mut self.rec, once);
        }
        let timeout = self.wait_timeout(now)?;
        let n = match self.epoll.wait(&mut self.events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for event in &self.events[..n] {
            if event.data() == TIMER_TOKEN {
                let _ = self.timer.wait();
                continue;
            }
            let flow = &mut self.flows[event.data() as usize];
            receive_replies(flow, &mut self.recv_buf, &mut self.rec, false)?;
        }
        Ok(())
    }

    fn wait_timeout(&self, now: Instant) -> Result<EpollTimeout> {
        if self.plan.spin {
            return Ok(EpollTimeout::ZERO);
        }
        if self.plan.interval.is_none() {
            return Ok(EpollTimeout::from(10u16));
        }
        // epoll's timeout has millisecond resolution; sub-millisecond waits until the next
        // scheduled send go through a timerfd, so the open-loop client sleeps instead of spinning.
        let next = self.flows.iter().map(|f| f.next_send).min().unwrap_or(now);
        let wait = next
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(10));
        if wait.is_zero() {
            return Ok(EpollTimeout::ZERO);
        }
        self.timer.set(
            Expiration::OneShot(TimeSpec::from_duration(wait)),
            TimerSetTimeFlags::empty(),
        )?;
        Ok(EpollTimeout::from(20u16))
    }

    /// Expires requests past the timeout, moves counter flows to fresh sockets after a timeout,
    /// and counts late replies on retired sockets.
    fn housekeeping(&mut self) -> Result<()> {
        let now = Instant::now();
        let fresh_after_timeout = self.plan.target.protocol == Protocol::Counter
            && !self.plan.target.transport.is_stream();
        let blocking = self.direct && !self.plan.spin;
        let read_retired = now >= self.next_retired_read;
        if read_retired {
            self.next_retired_read = now + RETIRED_READ_INTERVAL;
        }
        for (token, flow) in self.flows.iter_mut().enumerate() {
            self.rec.expire(&mut flow.pending, now);
            if flow.conn.is_stream() && !flow.pending.awaits_replies() {
                // A stream reply can only be partial while a reply is awaited.
                flow.partial.clear();
            }
            if fresh_after_timeout && flow.pending.only_timed_out() {
                flow.move_to_fresh_socket(&self.epoll, token as u64, blocking)?;
            }
            if read_retired && !flow.retired.is_empty() {
                flow.read_retired(&mut self.recv_buf, &mut self.rec, now)?;
            }
        }
        Ok(())
    }
}

/// Sends the requests due on one flow: up to the depth, within the budget, and in open loop only
/// those whose scheduled time has come.
fn send_flow(
    plan: &Plan,
    flow: &mut Flow,
    requests: &mut Requests,
    rec: &mut Recorder,
    now: Instant,
) -> Result<()> {
    while flow.budget.is_none_or(|b| b > 0)
        && flow.pending.in_flight() < plan.depth
        && (plan.interval.is_none() || flow.next_send <= now)
    {
        let seq = flow.next_seq;
        let intended = match plan.interval {
            Some(_) => flow.next_send,
            None => Instant::now(),
        };
        if !send_request(flow, requests.payload(plan.target.protocol, seq))? {
            // The socket is full: the same request, with the same intended time, goes next turn.
            break;
        }
        flow.next_seq += 1;
        if let Some(interval) = plan.interval {
            // next_send <= now here, so this stays one interval ahead of the clock.
            flow.next_send += interval;
        }
        if intended >= rec.warmup_end {
            rec.result.sent += 1;
            if let Some(b) = flow.budget.as_mut() {
                *b -= 1;
            }
        }
        flow.pending.push(intended, seq);
    }
    Ok(())
}

/// Builds an echo or sockperf request carrying `seq`.
fn fill_message(buf: &mut [u8], protocol: Protocol, seq: u64) {
    buf[0..8].copy_from_slice(&seq.to_be_bytes());
    if protocol == Protocol::Sockperf {
        // flags as sockperf 3.7 sends them: 0x0002 (a client message) | 0x0001 (asks for a reply);
        // sockperf's own server ignores messages without both. Length: the whole message.
        buf[8..10].copy_from_slice(&0x0003u16.to_be_bytes());
        let len = buf.len() as u32;
        buf[10..14].copy_from_slice(&len.to_be_bytes());
    } else {
        buf[8..14].fill(0xab);
    }
}

/// Sends one request; false when the socket is full (try again later).
fn send_request(flow: &mut Flow, payload: &[u8]) -> Result<bool> {
    match &mut flow.conn {
        Conn::Udp(s) => match s.send(payload) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // An ICMP error from an earlier datagram (nobody listening): the request is lost.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(true),
            Err(e) => Err(e).context("send failed"),
        },
        Conn::Stream(f) => {
            if !flow.unsent.is_empty() {
                let n = write_some(f, &flow.unsent)?;
                flow.unsent.drain(..n);
                if !flow.unsent.is_empty() {
                    return Ok(false);
                }
            }
            let n = write_some(f, payload)?;
            flow.unsent.extend_from_slice(&payload[n..]);
            Ok(true)
        }
    }
}

fn write_some(f: &mut File, bytes: &[u8]) -> Result<usize> {
    match f.write(bytes) {
        Ok(n) => Ok(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
        Err(e) => Err(e).context("connection write failed (did the server close it?)"),
    }
}

/// Reads a flow's replies. Through epoll or when spinning it reads at least once (a reply may be
/// late or unexpected: it must leave the socket), then while requests are in flight. `once`, on a
/// blocking socket, reads once and only when a reply is awaited, so the caller can send the next
/// request without a wasted syscall.
fn receive_replies(flow: &mut Flow, buf: &mut [u8], rec: &mut Recorder, once: bool) -> Result<()> {
    let mut reads = 0;
    loop {
        let expecting = flow.pending.in_flight() > 0;
        let more = if once {
            reads == 0 && expecting
        } else {
            reads == 0 || expecting
        };
        if !more {
            return Ok(());
        }
        reads += 1;
        let n = match &mut flow.conn {
            Conn::Udp(s) => s.recv(buf),
            Conn::Stream(f) => f.read(buf),
        };
        let n = match n {
            Ok(0) if flow.conn.is_stream() => bail!("the server closed a connection"),
            Ok(n) => n,
            Err(e) if is_transient(&e) => return Ok(()),
            Err(e) => return Err(e).context("receive failed"),
        };
        if !flow.conn.is_stream() {
            rec.on_reply(&mut flow.pending, &mut flow.last_value, &buf[..n]);
            continue;
        }
        flow.partial.extend_from_slice(&buf[..n]);
        let reply_len = rec.plan.message_size;
        let whole = flow.partial.len() / reply_len * reply_len;
        for reply in flow.partial[..whole].chunks_exact(reply_len) {
            rec.on_reply(&mut flow.pending, &mut flow.last_value, reply);
        }
        flow.partial.drain(..whole);
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

    #[test]
    fn rates_outside_the_range_are_refused() {
        assert_eq!(parse_rate("50000"), Ok(50_000.0));
        assert_eq!(parse_rate("0.01"), Ok(0.01));
        assert_eq!(parse_rate("1e9"), Ok(1e9));
        for bad in ["1e-300", "0", "-5", "1.1e9", "inf", "NaN", "fast", ""] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

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
