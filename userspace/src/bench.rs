//! `ricochet bench`: a load generator with latency histograms that verifies every reply.
//!
//! Closed loop (default): each connection keeps `--depth` requests in flight. Open loop (`--rate`):
//! requests are scheduled at a constant rate and each latency is measured from the request's intended
//! send time, so a stalled server shows up in the percentiles instead of slowing the client down
//! (no coordinated omission, as in wrk2). Replies are matched to requests in order per connection;
//! sockperf and echo replies carry the request's sequence number, so a lost datagram is recognised.

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
use crate::wire::{CounterRepr, SockperfHeader, FRAME_LEN, SOCKPERF_HEADER_LEN};

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

pub use crate::spec::parse_duration;

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
    pub lost: u64,
    /// Replies that are not a valid answer to the request (bad hash, wrong sequence or flags).
    pub invalid_replies: u64,
    /// Counter replies not strictly greater than the previous one on the same connection.
    pub non_increasing: u64,
    /// Counter reply values seen more than once across all connections of this run.
    pub duplicate_values: u64,
    pub duration_s: f64,
    pub throughput_rps: f64,
    pub latency_ns: LatencySummary,
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
    // 1 ns to 100 s at 3 significant digits.
    Histogram::new_with_bounds(1, 100_000_000_000, 3).expect("valid histogram bounds")
}

/// What a run is asked to do, shared by its threads.
#[derive(Debug, Clone)]
struct Plan {
    target: ListenSpec,
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

#[derive(Debug, Default)]
struct ThreadResult {
    sent: u64,
    received: u64,
    lost: u64,
    invalid: u64,
    non_increasing: u64,
    values: Vec<u64>,
    last_value: Option<u64>,
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.target.protocol != Protocol::Counter && args.message_size < SOCKPERF_HEADER_LEN as u16 {
        bail!("--message-size must be at least 14");
    }
    let _ = sys::raise_fd_limit();
    let cpus: Vec<Option<CpuId>> = match &args.cpus {
        Some(list) => crate::serve::resolve_cpus(Some(list))?
            .into_iter()
            .map(Some)
            .collect(),
        None => vec![None],
    };
    let threads = cpus.len().min(args.connections as usize).max(1);

    let conns = open_connections(&args).context("cannot connect")?;
    if let Some(hold) = args.hold {
        return hold_idle(conns, hold, args.json);
    }

    let n_conns = conns.len();
    let requests_per_conn = args.requests.map(|total| {
        (0..n_conns as u64)
            .map(|i| total / n_conns as u64 + u64::from(i < total % n_conns as u64))
            .collect::<Vec<u64>>()
    });
    let send_for = match (args.duration, args.requests) {
        (Some(d), _) => Some(args.warmup + d),
        (None, Some(_)) => None,
        (None, None) => Some(args.warmup + Duration::from_secs(10)),
    };
    let interval = args
        .rate
        .map(|rate| Duration::from_secs_f64(n_conns as f64 / rate));
    let plan = Plan {
        target: args.target.clone(),
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
    };

    let progress = Arc::new(AtomicU64::new(0));
    let bar = progress_bar(&args, send_for);
    let start = Instant::now() + Duration::from_millis(20);
    let mut buckets: Vec<Vec<(usize, Conn)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, conn) in conns.into_iter().enumerate() {
        buckets[i % threads].push((i, conn));
    }
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
        let (r, h) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        hist.add(&h).expect("same histogram bounds");
        total.sent += r.sent;
        total.received += r.received;
        total.lost += r.lost;
        total.invalid += r.invalid;
        total.non_increasing += r.non_increasing;
        total.values.extend(r.values);
        total.last_value = total.last_value.max(r.last_value);
    }
    total.values.sort_unstable();
    let duplicate_values = total.values.windows(2).filter(|w| w[0] == w[1]).count() as u64;
    let measured = send_for
        .map(|d| d - args.warmup)
        .unwrap_or_else(|| start.elapsed().saturating_sub(args.warmup));
    let duration_s = measured.as_secs_f64().max(1e-9);

    let report = BenchReport {
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
        invalid_replies: total.invalid,
        non_increasing: total.non_increasing,
        duplicate_values: if args.increment == 0 {
            0
        } else {
            duplicate_values
        },
        duration_s,
        throughput_rps: total.received as f64 / duration_s,
        latency_ns: LatencySummary::from_histogram(&hist),
        last_counter_value: total.last_value,
    };
    if let Some(path) = &args.hgrm {
        let mut file =
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        write_hgrm(&hist, &mut file)?;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    if report.invalid_replies > 0 || report.non_increasing > 0 || report.duplicate_values > 0 {
        bail!(
            "{} invalid replies, {} non-increasing counter values, {} duplicate values",
            report.invalid_replies,
            report.non_increasing,
            report.duplicate_values
        );
    }
    Ok(())
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
    let l = &r.latency_ns;
    let us = |ns: u64| ns as f64 / 1e3;
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
    println!(
        "requests      sent {} received {} lost {} invalid {}",
        r.sent, r.received, r.lost, r.invalid_replies
    );
    println!(
        "throughput    {:.0} req/s over {:.2} s",
        r.throughput_rps, r.duration_s
    );
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

    fn is_datagram(&self) -> bool {
        matches!(self, Conn::Udp(_))
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
                let s = UdpSocket::bind(local)
                    .with_context(|| format!("cannot bind a UDP socket on {local}"))?;
                s.connect(addr)
                    .with_context(|| format!("cannot connect UDP to {addr}"))?;
                s.set_nonblocking(true)?;
                Conn::Udp(s)
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

/// What one client thread measures; requests sent before `warmup_end` are verified, not counted.
struct Recorder {
    hist: Histogram<u64>,
    result: ThreadResult,
    warmup_end: Instant,
    /// Keep every counter reply value to find duplicates across connections.
    collect_values: bool,
}

/// The client side of one connection during a run.
struct Flow {
    conn: Conn,
    /// Intended send times (and sequence numbers) of requests in flight, oldest first.
    in_flight: VecDeque<(Instant, u64)>,
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

fn run_thread(
    plan: &Plan,
    conns: Vec<(usize, Conn)>,
    start: Instant,
    progress: &AtomicU64,
) -> Result<(ThreadResult, Histogram<u64>)> {
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
        // Spread open-loop connections evenly over one interval.
        let offset = plan
            .interval
            .map(|iv| {
                iv.mul_f64(
                    global_index as f64
                        / plan
                            .requests_per_conn
                            .as_ref()
                            .map(|v| v.len())
                            .unwrap_or(1)
                            .max(1) as f64,
                )
            })
            .unwrap_or_default();
        flows.push(Flow {
            conn,
            in_flight: VecDeque::with_capacity(plan.depth),
            next_seq: 1,
            budget: plan.requests_per_conn.as_ref().map(|v| v[global_index]),
            next_send: start + offset,
            partial: Vec::new(),
            unsent: Vec::new(),
            last_value: None,
        });
    }
    let counter_request = CounterRepr {
        value: plan.increment,
    }
    .to_bytes();
    let mut request = vec![0u8; plan.message_size];
    let mut recv_buf = vec![0u8; 65536];
    let mut events = vec![EpollEvent::empty(); 256];
    let warmup_end = start + plan.warmup;
    let send_end = plan.send_for.map(|d| start + d);
    let mut rec = Recorder {
        hist: new_histogram(),
        result: ThreadResult::default(),
        warmup_end,
        collect_values: plan.target.protocol == Protocol::Counter && plan.increment != 0,
    };
    // One closed-loop connection: receive on the socket itself (blocking with a short timeout, or
    // non-blocking when spinning) instead of through epoll: one syscall less per request.
    let direct = flows.len() == 1 && plan.interval.is_none();
    if direct && !plan.spin {
        flows[0]
            .conn
            .set_blocking_with_timeout(Duration::from_millis(10))?;
    }
    while Instant::now() < start {
        std::hint::spin_loop();
    }

    loop {
        let now = Instant::now();
        let sending = send_end.is_none_or(|end| now < end);
        // Send what is due.
        let mut all_done = true;
        for flow in flows.iter_mut() {
            let budget_left = flow.budget.is_none_or(|b| b > 0);
            if sending && budget_left {
                all_done = false;
            }
            while sending
                && flow.budget.is_none_or(|b| b > 0)
                && flow.in_flight.len() < plan.depth
                && (plan.interval.is_none() || flow.next_send <= now)
            {
                let seq = flow.next_seq;
                flow.next_seq += 1;
                let payload: &[u8] = match plan.target.protocol {
                    Protocol::Counter => &counter_request,
                    Protocol::Echo | Protocol::Sockperf => {
                        fill_message(&mut request, plan.target.protocol, seq);
                        &request
                    }
                };
                let intended = match plan.interval {
                    Some(iv) => {
                        let t = flow.next_send;
                        flow.next_send += iv;
                        t
                    }
                    None => Instant::now(),
                };
                if !send_request(flow, payload)? {
                    break;
                }
                if intended >= warmup_end {
                    rec.result.sent += 1;
                    if let Some(b) = flow.budget.as_mut() {
                        *b -= 1;
                    }
                }
                flow.in_flight.push_back((intended, seq));
            }
            if !flow.in_flight.is_empty() || !flow.unsent.is_empty() {
                all_done = false;
            }
        }
        if all_done {
            break;
        }

        if direct {
            let flow = &mut flows[0];
            receive_replies(plan, flow, &mut recv_buf, &mut rec, !plan.spin)?;
            expire(plan, &mut flows, &mut rec);
            progress.store(rec.result.received, Ordering::Relaxed);
            continue;
        }
        // Wait for replies, no longer than the next scheduled send or timeout check.
        let timeout = if plan.spin {
            EpollTimeout::ZERO
        } else if plan.interval.is_some() {
            // epoll's timeout has millisecond resolution; sub-millisecond waits until the next
            // scheduled send go through a timerfd, so the open-loop client sleeps instead of spinning.
            let next = flows.iter().map(|f| f.next_send).min().unwrap_or(now);
            let wait = next
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(10));
            if wait.is_zero() {
                EpollTimeout::ZERO
            } else {
                timer.set(
                    Expiration::OneShot(TimeSpec::from_duration(wait)),
                    TimerSetTimeFlags::empty(),
                )?;
                EpollTimeout::from(20u16)
            }
        } else {
            EpollTimeout::from(10u16)
        };
        let n = match epoll.wait(&mut events, timeout) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => return Err(e.into()),
        };
        for event in &events[..n] {
            if event.data() == TIMER_TOKEN {
                let _ = timer.wait();
                continue;
            }
            let flow = &mut flows[event.data() as usize];
            receive_replies(plan, flow, &mut recv_buf, &mut rec, false)?;
        }
        expire(plan, &mut flows, &mut rec);
        progress.store(rec.result.received, Ordering::Relaxed);
    }
    rec.result.last_value = flows.iter().filter_map(|f| f.last_value).max();
    Ok((rec.result, rec.hist))
}

/// The epoll token of the open-loop pacing timer (flows use their index).
const TIMER_TOKEN: u64 = u64::MAX;

/// Counts requests in flight for longer than the timeout as lost.
fn expire(plan: &Plan, flows: &mut [Flow], rec: &mut Recorder) {
    let now = Instant::now();
    for flow in flows.iter_mut() {
        while let Some(&(sent_at, _)) = flow.in_flight.front() {
            if now.duration_since(sent_at) < plan.timeout {
                break;
            }
            flow.in_flight.pop_front();
            if sent_at >= rec.warmup_end {
                rec.result.lost += 1;
            }
        }
        if !flow.conn.is_datagram() && flow.in_flight.is_empty() && !flow.partial.is_empty() {
            // A stream reply can only be partial while a request is in flight.
            flow.partial.clear();
        }
    }
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

fn receive_replies(
    plan: &Plan,
    flow: &mut Flow,
    buf: &mut [u8],
    rec: &mut Recorder,
    once: bool,
) -> Result<()> {
    let reply_len = plan.message_size;
    let mut reads = 0;
    // Stop as soon as nothing more is expected, or after one read on a blocking socket, so the
    // caller can send the next request without a wasted syscall.
    while !(flow.in_flight.is_empty() || (once && reads > 0)) {
        reads += 1;
        match &mut flow.conn {
            Conn::Udp(s) => match s.recv(buf) {
                Ok(n) => {
                    let reply = &buf[..n];
                    on_reply(
                        plan,
                        (&mut flow.in_flight, &mut flow.last_value),
                        reply,
                        rec,
                    );
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Ok(()),
                Err(e) => return Err(e).context("receive failed"),
            },
            Conn::Stream(f) => {
                let n = match f.read(buf) {
                    Ok(0) => bail!("the server closed a connection"),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                    Err(e) => return Err(e).context("connection read failed"),
                };
                flow.partial.extend_from_slice(&buf[..n]);
                let whole = flow.partial.len() / reply_len * reply_len;
                for reply in flow.partial[..whole].chunks_exact(reply_len) {
                    on_reply(
                        plan,
                        (&mut flow.in_flight, &mut flow.last_value),
                        reply,
                        rec,
                    );
                }
                flow.partial.drain(..whole);
            }
        }
    }
    Ok(())
}

fn on_reply(
    plan: &Plan,
    (in_flight, last_value): (&mut VecDeque<(Instant, u64)>, &mut Option<u64>),
    reply: &[u8],
    rec: &mut Recorder,
) {
    let now = Instant::now();
    let matched = match plan.target.protocol {
        Protocol::Counter => {
            let Some(front) = in_flight.pop_front() else {
                rec.result.invalid += 1;
                return;
            };
            match CounterRepr::parse_bytes(reply) {
                Ok(repr) => {
                    let ok = match *last_value {
                        None => true,
                        Some(prev) if plan.increment == 0 => repr.value >= prev,
                        Some(prev) => repr.value > prev,
                    };
                    if !ok {
                        rec.result.non_increasing += 1;
                    }
                    *last_value = Some(repr.value);
                    if rec.collect_values && front.0 >= rec.warmup_end {
                        rec.result.values.push(repr.value);
                    }
                    Some(front)
                }
                Err(_) => {
                    rec.result.invalid += 1;
                    None
                }
            }
        }
        Protocol::Echo | Protocol::Sockperf => {
            let Ok(header) = SockperfHeader::new_checked(reply) else {
                rec.result.invalid += 1;
                return;
            };
            let seq = header.sequence();
            // Requests older than this reply's were lost (datagrams) and are expired by timeout.
            let Some(pos) = in_flight.iter().position(|&(_, s)| s == seq) else {
                rec.result.invalid += 1;
                return;
            };
            let front = in_flight.remove(pos).expect("position is in range");
            let valid = reply.len() == plan.message_size
                && match plan.target.protocol {
                    Protocol::Sockperf => {
                        header.flags() & crate::wire::SOCKPERF_PONG_REQUEST_FLAG == 0
                    }
                    // fill_message: the sequence number, six 0xab bytes, zero padding.
                    _ => {
                        reply[8..14].iter().all(|&b| b == 0xab)
                            && reply[14..].iter().all(|&b| b == 0)
                    }
                };
            if valid {
                Some(front)
            } else {
                rec.result.invalid += 1;
                None
            }
        }
    };
    if let Some((sent_at, _)) = matched {
        if sent_at >= rec.warmup_end {
            rec.result.received += 1;
            rec.hist
                .saturating_record(now.duration_since(sent_at).as_nanos().max(1) as u64);
        }
    }
}

#[cfg(test)]
mod test {
    use super::*;

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
