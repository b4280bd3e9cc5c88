//! `ricochet serve`: checks the configuration, starts the datapath, waits for SIGINT/SIGTERM, prints
//! the final counter and per-worker totals.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;

use crate::afxdp::{self, SocketParams};
use crate::core::{Counter, LocalCounter, Protocol};
use crate::http::{Access, AppState, HttpConfig, HttpListen, HttpServer, WorkerView};
use crate::kernel::{self, Scheduling, WorkerConfig};
use crate::spec::{
    duration_in, CpuId, CpuList, ListenSpec, PollMode, Transport, XdpAttachMode, ZeroCopy,
};
use crate::stats::StatsSnapshot;
use crate::sys;
use crate::xdp::maps::XdpStat;
use crate::xdp::{AttachedMode, ProgramKind, XdpProgram};

/// The datapath beside the kernel path, if any.
enum Bypass {
    None,
    Afxdp(afxdp::AfXdpDatapath),
    Xdp(XdpProgram, AttachedMode),
}

/// Which datapath answers requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Ordinary sockets (UDP, TCP, Unix) served by pinned worker threads.
    Kernel,
    /// An XDP program steers UDP listener frames into AF_XDP sockets; pinned workers answer in UMEM.
    /// The kernel path keeps serving loopback, TCP, Unix and queues without a socket.
    Afxdp,
    /// The XDP program verifies, counts and answers UDP listener frames itself (XDP_TX); the kernel
    /// path serves the rest, on the same counter.
    Xdp,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Datapath that answers requests.
    #[arg(long, value_enum, default_value = "kernel")]
    pub mode: Mode,

    /// Where to listen: [PROTO+]TRANSPORT://ADDR with PROTO counter (default), echo or sockperf and
    /// TRANSPORT udp, tcp or unix; repeat for more listeners. Port 0 picks a free port (the start-up
    /// lines print it). Examples: udp://0.0.0.0:7777, tcp://0.0.0.0:7777, unix:///run/ricochet.sock,
    /// sockperf+udp://0.0.0.0:11111.
    #[arg(long = "listen", value_name = "SPEC", required = true)]
    pub listen: Vec<ListenSpec>,

    /// CPUs to run one pinned worker each on, in the kernel's list format (0-3,6). Default: every CPU
    /// this process may use.
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<CpuList>,

    /// How workers wait: spin busy-polls non-blocking sockets (lowest latency, a full core per
    /// worker), block sleeps in epoll (efficient). Default: block in kernel mode.
    #[arg(long, value_enum)]
    pub poll: Option<PollMode>,

    /// Run workers under SCHED_FIFO at this priority (1-99); needs root or CAP_SYS_NICE.
    #[arg(long, value_name = "PRIO", value_parser = clap::value_parser!(i32).range(1..=99))]
    pub sched_fifo: Option<i32>,

    /// Lock all memory (mlockall) so the datapath never takes a page fault from swap.
    #[arg(long)]
    pub mlock: bool,

    /// Datagrams received and answered per batch (recvmmsg/sendmmsg and one counter add).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch: u16,

    /// Largest datagram accepted, in bytes; longer ones are dropped and counted as oversize.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u16).range(64..))]
    pub max_datagram: u16,

    /// Network interface for the afxdp and xdp modes.
    #[arg(long, value_name = "IF")]
    pub iface: Option<String>,

    /// RX queues to open an AF_XDP socket on (0-3,6); default every queue of the interface.
    #[arg(long, value_name = "LIST")]
    pub queues: Option<CpuList>,

    /// Where the XDP program runs: native (driver), generic (kernel), or auto (native, then generic;
    /// the default).
    #[arg(long, value_enum)]
    pub xdp_mode: Option<XdpAttachMode>,

    /// AF_XDP zero-copy: on, off, or auto (try zero-copy, fall back to copy mode; the default).
    #[arg(long, value_enum)]
    pub zero_copy: Option<ZeroCopy>,

    /// UMEM frame size in bytes (2048 or 4096; default 2048).
    #[arg(long, value_parser = parse_frame_size)]
    pub frame_size: Option<u32>,

    /// UMEM frames per AF_XDP socket (default 4096).
    #[arg(long, value_parser = clap::value_parser!(u32).range(64..=1 << 20))]
    pub frame_count: Option<u32>,

    /// Entries in each AF_XDP ring (fill, completion, RX, TX); a power of two (default 1024).
    #[arg(long, value_parser = parse_ring_size)]
    pub ring_size: Option<u32>,

    /// Put the UMEM on huge pages (reserve them first: /proc/sys/vm/nr_hugepages).
    #[arg(long)]
    pub huge_pages: bool,

    /// SO_BUSY_POLL microseconds (with SO_PREFER_BUSY_POLL) on the AF_XDP sockets; effective on
    /// real NICs, accepted but without effect on veth.
    #[arg(long, value_name = "USECS")]
    pub busy_poll: Option<u32>,

    /// SO_BUSY_POLL_BUDGET: packets per busy poll (needs --busy-poll).
    #[arg(long, value_name = "N", requires = "busy_poll")]
    pub busy_poll_budget: Option<u32>,

    /// Replace an XDP program someone else attached to the interface.
    #[arg(long)]
    pub force: bool,

    /// A hardware profile (hw-profiles/*.toml): interface, queues, worker CPUs, XDP and zero-copy modes,
    /// UMEM sizes and busy polling come from it; flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<std::path::PathBuf>,

    /// Address of the HTTP endpoints (health, metrics, counter API, profiling, dashboard):
    /// HOST:PORT, unix:///PATH, or off.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9100")]
    pub http: String,

    /// Bearer token for POST /counter and /debug/pprof/*; required when --http is not loopback.
    #[arg(
        long,
        env = "RICOCHET_HTTP_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    pub http_token: Option<String>,

    /// HTTP requests per second allowed per source address (429 beyond); 0 turns the limit off.
    #[arg(long, value_name = "N", default_value_t = 1_000_000)]
    pub http_rate_limit: u32,

    /// Time a client has to send a request's line and headers once it started (slowloris), e.g. 10s.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = duration_in(Duration::from_millis(100), Duration::from_secs(3600)))]
    pub http_header_timeout: Duration,

    /// Time an idle keep-alive connection is kept open, e.g. 60s.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration_in(Duration::from_secs(1), Duration::from_secs(86_400)))]
    pub http_idle_timeout: Duration,

    /// Most bytes that partial HTTP requests (line, headers, body still arriving) may hold in memory
    /// together, across all connections; a request that would exceed it gets 503 and its connection
    /// closes.
    #[arg(long, value_name = "BYTES", default_value_t = 16 << 20, value_parser = clap::value_parser!(u64).range(65536..=1 << 32))]
    pub http_max_pending: u64,

    /// HTTP worker threads; default one per housekeeping CPU (CPUs not in --cpus), else one per CPU.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=64))]
    pub http_workers: Option<u16>,
}

fn parse_frame_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n @ (2048 | 4096)) => Ok(n),
        _ => Err(format!("frame size '{s}' is not 2048 or 4096")),
    }
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n.is_power_of_two() && (64..=16384).contains(&n) => Ok(n),
        _ => Err(format!(
            "ring size '{s}' is not a power of two between 64 and 16384"
        )),
    }
}

/// Resolves `--cpus` against the CPUs this process may use.
pub fn resolve_cpus(requested: Option<&CpuList>) -> Result<Vec<CpuId>> {
    let allowed = sys::allowed_cpus().context("cannot read this process's CPU affinity")?;
    let Some(requested) = requested else {
        return Ok(allowed);
    };
    let allowed_list = CpuList(allowed.clone()).to_string();
    for cpu in &requested.0 {
        if !allowed.contains(cpu) {
            bail!("CPU {cpu} is not allowed for this process (allowed: {allowed_list}): pick --cpus from those");
        }
    }
    Ok(requested.0.clone())
}

/// The configuration as given, for /stats.
fn config_json(args: &ServeArgs, cpus: &[CpuId], bound: &[ListenSpec]) -> serde_json::Value {
    serde_json::json!({
        "mode": mode_name(args.mode),
        "listen": bound.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        "cpus": cpus.iter().map(|c| c.0).collect::<Vec<_>>(),
        "poll": args.poll.map(poll_name),
        "batch": args.batch,
        "max_datagram": args.max_datagram,
        "iface": args.iface,
        "queues": args.queues.as_ref().map(|q| q.to_string()),
        "xdp_mode": format!("{:?}", args.xdp_mode.unwrap_or(XdpAttachMode::Auto)).to_lowercase(),
        "zero_copy": format!("{:?}", args.zero_copy.unwrap_or(ZeroCopy::Auto)).to_lowercase(),
        "profile": args.profile.as_ref().map(|p| p.display().to_string()),
        "frame_size": args.frame_size,
        "frame_count": args.frame_count,
        "ring_size": args.ring_size,
        "busy_poll_usecs": args.busy_poll,
        "busy_poll_budget": args.busy_poll_budget,
        "http": args.http,
        "http_rate_limit": args.http_rate_limit,
        "sched_fifo": args.sched_fifo,
        "mlock": args.mlock,
    })
}

/// The XDP mode tried first (auto tries native).
fn requested_xdp_mode(args: &ServeArgs) -> Option<&'static str> {
    match (args.mode, args.xdp_mode.unwrap_or(XdpAttachMode::Auto)) {
        (Mode::Kernel, _) => None,
        (_, XdpAttachMode::Native | XdpAttachMode::Auto) => Some("native"),
        (_, XdpAttachMode::Generic) => Some("generic"),
    }
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Kernel => "kernel",
        Mode::Afxdp => "afxdp",
        Mode::Xdp => "xdp",
    }
}

fn poll_name(poll: PollMode) -> &'static str {
    match poll {
        PollMode::Spin => "spin",
        PollMode::Block => "block",
    }
}

/// The SIGHUP report: the counter and every packet worker's totals so far, each line prefixed
/// `status`. The packet path is not disturbed: the records are read without locks.
fn print_status(counter: &dyn Counter, workers: &[kernel::KernelWorker], bypass: &Bypass) {
    let mut total = StatsSnapshot::default();
    let mut text = format!("status counter={}\n", counter.load());
    for (index, worker) in workers.iter().enumerate() {
        let snapshot = worker.stats.snapshot();
        total.merge(&snapshot);
        text.push_str(&format!(
            "status worker {index} cpu={} {snapshot}\n",
            worker.cpu
        ));
    }
    if let Bypass::Afxdp(dp) = bypass {
        for worker in &dp.workers {
            let snapshot = worker.stats.snapshot();
            total.merge(&snapshot);
            text.push_str(&format!(
                "status afxdp queue={} cpu={} {snapshot}\n",
                worker.queue, worker.cpu
            ));
        }
    }
    text.push_str(&format!("status total {total}\n"));
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Where each kind of worker runs and which ones run under SCHED_FIFO.
///
/// `--cpus` names the datapath's CPUs. In afxdp mode the AF_XDP workers spin there, so the kernel
/// fallback workers go to the housekeeping CPUs (those the process may use that are not in `--cpus`)
/// when there are any: a fallback worker never competes with a spinning worker for its core.
/// `--sched-fifo` applies to the datapath workers: the kernel workers in kernel and xdp mode (in xdp
/// mode they are the only packet workers in userspace), the AF_XDP workers in afxdp mode, never the
/// fallback, which could otherwise preempt an AF_XDP worker on its core.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Placement {
    kernel_cpus: Vec<CpuId>,
    kernel_scheduling: Scheduling,
    afxdp_fifo: Option<i32>,
    /// Allowed CPUs not in `--cpus`: the HTTP threads (and the afxdp fallback) run there.
    housekeeping: Vec<CpuId>,
}

impl Placement {
    fn new(mode: Mode, cpus: &[CpuId], fifo: Option<i32>) -> Result<Placement> {
        let allowed = sys::allowed_cpus().context("cannot read this process's CPU affinity")?;
        Ok(Placement::plan(mode, cpus, &allowed, fifo))
    }

    fn plan(mode: Mode, cpus: &[CpuId], allowed: &[CpuId], fifo: Option<i32>) -> Placement {
        let housekeeping: Vec<CpuId> = allowed
            .iter()
            .copied()
            .filter(|c| !cpus.contains(c))
            .collect();
        let afxdp = mode == Mode::Afxdp;
        Placement {
            kernel_cpus: if afxdp && !housekeeping.is_empty() {
                housekeeping.clone()
            } else {
                cpus.to_vec()
            },
            kernel_scheduling: Scheduling {
                fifo_priority: if afxdp { None } else { fifo },
            },
            afxdp_fifo: if afxdp { fifo } else { None },
            housekeeping,
        }
    }
}

/// Fills what the command line left out from the profile.
fn apply_profile(mut args: ServeArgs) -> Result<ServeArgs> {
    let Some(path) = args.profile.clone() else {
        return Ok(args);
    };
    let p = crate::hw::Profile::load(&path)?;
    if args.mode == Mode::Kernel {
        bail!("--profile describes NIC queues for --mode afxdp or xdp: add one of those modes");
    }
    args.iface.get_or_insert(p.interface.name.clone());
    if args.queues.is_none() {
        args.queues = Some(CpuList(
            p.queue_ids()
                .into_iter()
                .map(|q| CpuId(q as usize))
                .collect(),
        ));
    }
    if args.cpus.is_none() && args.mode == Mode::Afxdp {
        // One AF_XDP worker per queue, on the queue's worker CPU (mapped queue by queue).
        args.cpus = Some(CpuList(p.worker_cpus().into_iter().map(CpuId).collect()));
    }
    args.xdp_mode.get_or_insert(p.xdp.mode);
    args.zero_copy.get_or_insert(p.xdp.zero_copy);
    args.frame_size.get_or_insert(p.umem.frame_size);
    args.frame_count.get_or_insert(p.umem.frame_count);
    args.ring_size.get_or_insert(p.umem.ring_size);
    args.huge_pages |= p.umem.huge_pages;
    if p.busy_poll.usecs > 0 && args.busy_poll.is_none() {
        args.busy_poll = Some(p.busy_poll.usecs);
        if args.busy_poll_budget.is_none() {
            args.busy_poll_budget = p.busy_poll.budget;
        }
    }
    Ok(args)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let args = apply_profile(args)?;
    let cpus = resolve_cpus(args.cpus.as_ref())?;
    let http_listen: Option<HttpListen> = match args.http.as_str() {
        "off" => None,
        other => Some(other.parse::<HttpListen>().map_err(anyhow::Error::msg)?),
    };
    if args.http_token.as_deref().is_some_and(str::is_empty) {
        bail!("--http-token (or RICOCHET_HTTP_TOKEN) is empty: set a real secret, or leave it unset on a loopback --http");
    }
    if let Some(listen) = &http_listen {
        if !listen.is_local() && args.http_token.is_none() {
            bail!("--http {} is reachable from other hosts: set a bearer token with --http-token or RICOCHET_HTTP_TOKEN (or listen on 127.0.0.1)", args.http);
        }
    }
    let udp_listeners: Vec<(std::net::SocketAddr, Protocol)> = args
        .listen
        .iter()
        .filter_map(|spec| match spec.transport {
            Transport::Udp(addr) => Some((addr, spec.protocol)),
            _ => None,
        })
        .collect();
    match (args.mode, &args.iface) {
        (Mode::Kernel, Some(_)) => bail!(
            "--iface applies to --mode afxdp and xdp only: drop it, or pick one of those modes"
        ),
        (Mode::Afxdp | Mode::Xdp, None) => bail!(
            "--mode {} needs --iface IF: the interface to serve",
            mode_name(args.mode)
        ),
        (Mode::Afxdp | Mode::Xdp, Some(_)) if udp_listeners.is_empty() => {
            bail!(
                "--mode {} serves UDP listeners: add --listen udp://ADDR:PORT",
                mode_name(args.mode)
            )
        }
        (Mode::Afxdp | Mode::Xdp, Some(_)) if udp_listeners.iter().any(|(a, _)| a.port() == 0) => {
            bail!(
                "--mode {} needs fixed UDP ports (the XDP program matches them): replace port 0",
                mode_name(args.mode)
            )
        }
        _ => {}
    }
    if args.mlock {
        sys::lock_all_memory().context(
            "--mlock failed: mlockall needs root, CAP_IPC_LOCK or a large enough 'ulimit -l'",
        )?;
    }
    // Raise the descriptor limit for many stream connections; keep going if the hard limit is low.
    let _ = sys::raise_fd_limit();
    sys::block_handled_signals().context("cannot block SIGINT, SIGTERM, SIGQUIT and SIGHUP")?;

    // afxdp workers spin by default; the kernel path blocks unless told otherwise (in afxdp mode it
    // is only the fallback, so it always blocks).
    let poll = args.poll.unwrap_or(match args.mode {
        Mode::Kernel | Mode::Xdp => PollMode::Block,
        Mode::Afxdp => PollMode::Spin,
    });
    let kernel_poll = if args.mode == Mode::Kernel {
        poll
    } else {
        PollMode::Block
    };
    let config = WorkerConfig {
        poll: kernel_poll,
        batch: args.batch as usize,
        max_datagram: args.max_datagram as usize,
    };
    // In xdp mode the counter lives in the program's BPF_F_MMAPABLE map, shared by both paths.
    let responder = match (args.mode, &args.iface) {
        (Mode::Xdp, Some(iface)) => {
            crate::iface::check_listener_addresses(iface, udp_listeners.iter().map(|(a, _)| *a))?;
            Some(XdpProgram::load(ProgramKind::Respond, &udp_listeners)?)
        }
        _ => None,
    };
    let counter: Arc<dyn Counter> = match &responder {
        Some(program) => Arc::new(program.counter()?),
        None => Arc::new(LocalCounter::new(0)),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let placement = Placement::new(args.mode, &cpus, args.sched_fifo)?;
    let (workers, bound) = kernel::start(
        &args.listen,
        &placement.kernel_cpus,
        config,
        placement.kernel_scheduling,
        counter.clone(),
        stop.clone(),
    )?;

    let stop_kernel = |workers: &[kernel::KernelWorker]| {
        stop.store(true, Ordering::Relaxed);
        for worker in workers {
            let _ = worker.wake.write(1);
        }
    };
    let bypass = match (args.mode, &args.iface, responder) {
        (Mode::Afxdp, Some(iface), _) => {
            let queues: Vec<u32> = match &args.queues {
                Some(list) => list.0.iter().map(|q| q.0 as u32).collect(),
                None => (0..crate::iface::rx_queue_count(iface)?).collect(),
            };
            let params = SocketParams {
                iface: iface.clone(),
                frame_size: args.frame_size.unwrap_or(2048),
                frame_count: args.frame_count.unwrap_or(4096),
                ring_size: args.ring_size.unwrap_or(1024),
                zero_copy: args.zero_copy.unwrap_or(ZeroCopy::Auto),
                huge_pages: args.huge_pages,
                busy_poll_usecs: args.busy_poll,
                busy_poll_budget: args.busy_poll_budget,
                poll,
                batch: args.batch as u32,
                fifo_priority: placement.afxdp_fifo,
            };
            match afxdp::start(
                &params,
                &udp_listeners,
                &queues,
                &cpus,
                args.xdp_mode.unwrap_or(XdpAttachMode::Auto),
                args.force,
                counter.clone(),
                stop.clone(),
            ) {
                Ok(datapath) => Bypass::Afxdp(datapath),
                Err(e) => {
                    stop_kernel(&workers);
                    return Err(e);
                }
            }
        }
        (Mode::Xdp, Some(iface), Some(mut program)) => {
            match program.attach(
                iface,
                args.xdp_mode.unwrap_or(XdpAttachMode::Auto),
                args.force,
            ) {
                Ok(attached) => Bypass::Xdp(program, attached),
                Err(e) => {
                    stop_kernel(&workers);
                    return Err(e);
                }
            }
        }
        _ => Bypass::None,
    };

    // The endpoints' view of the datapaths.
    let state = Arc::new(AppState::new(
        mode_name(args.mode),
        config_json(&args, &cpus, &bound),
        counter.clone(),
    ));
    {
        let mut views: Vec<WorkerView> = workers
            .iter()
            .enumerate()
            .map(|(i, w)| WorkerView {
                datapath: "kernel",
                id: i as u32,
                cpu: w.cpu,
                stats: w.stats.clone(),
                xsk: None,
            })
            .collect();
        let mut details = state.details.lock().expect("not poisoned");
        details.push(("kernel_poll".into(), poll_name(kernel_poll).into()));
        match &bypass {
            Bypass::None => {}
            Bypass::Afxdp(dp) => {
                views.extend(dp.workers.iter().map(|w| WorkerView {
                    datapath: "afxdp",
                    id: w.queue,
                    cpu: w.cpu,
                    stats: w.stats.clone(),
                    xsk: Some(w.xsk.clone()),
                }));
                details.push(("xdp_mode".into(), dp.attached.to_string()));
                details.push((
                    "zero_copy".into(),
                    if dp.zero_copy { "on" } else { "off" }.into(),
                ));
                if args.zero_copy.unwrap_or(ZeroCopy::Auto) == ZeroCopy::Auto && !dp.zero_copy {
                    details.push(("fallback".into(), "zero-copy -> copy mode".into()));
                }
                details.push(("afxdp_poll".into(), poll_name(poll).into()));
                *state.xdp_stats.lock().expect("not poisoned") =
                    Some(Box::new(dp.program.stats_reader()));
            }
            Bypass::Xdp(program, attached) => {
                details.push(("xdp_mode".into(), attached.to_string()));
                *state.xdp_stats.lock().expect("not poisoned") =
                    Some(Box::new(program.stats_reader()));
            }
        }
        if let Some(requested) = requested_xdp_mode(&args) {
            if let Some((_, actual)) = details.iter().find(|(k, _)| k == "xdp_mode") {
                if actual != requested {
                    let fallback = format!("xdp {requested} -> {actual} mode");
                    details.push(("fallback".into(), fallback));
                }
            }
        }
        state
            .readiness
            .workers_expected
            .store(views.len(), Ordering::Relaxed);
        state
            .readiness
            .workers_running
            .store(views.len(), Ordering::Relaxed);
        state
            .readiness
            .xdp_expected
            .store(!matches!(bypass, Bypass::None), Ordering::Relaxed);
        state
            .readiness
            .xdp_attached
            .store(!matches!(bypass, Bypass::None), Ordering::Relaxed);
        *state.workers.lock().expect("not poisoned") = views;
    }
    state.http_conns.pending.set_limit(args.http_max_pending);
    let http = match http_listen {
        None => None,
        Some(listen) => {
            let housekeeping = placement.housekeeping.clone();
            let n_workers =
                args.http_workers
                    .map(usize::from)
                    .unwrap_or(if housekeeping.is_empty() {
                        cpus.len()
                    } else {
                        housekeeping.len()
                    });
            let config = HttpConfig {
                access: Access {
                    token: args.http_token.clone(),
                },
                listen,
                rate_limit: args.http_rate_limit,
                workers: n_workers,
                cpus: housekeeping,
                header_timeout: args.http_header_timeout,
                idle_timeout: args.http_idle_timeout,
            };
            match HttpServer::start(config, state.clone()) {
                Ok(server) => Some(server),
                Err(e) => {
                    stop_kernel(&workers);
                    return Err(e);
                }
            }
        }
    };

    let mut out = std::io::stdout().lock();
    for spec in &bound {
        writeln!(out, "listening {spec}")?;
    }
    if let Some(server) = &http {
        writeln!(out, "http {}", server.bound)?;
    }
    match &bypass {
        Bypass::None => writeln!(
            out,
            "ready mode=kernel workers={} cpus={} poll={}",
            workers.len(),
            CpuList(cpus.clone()),
            poll_name(poll)
        )?,
        Bypass::Afxdp(dp) => {
            let queues: Vec<String> = dp
                .workers
                .iter()
                .map(|w| format!("{}@cpu{}", w.queue, w.cpu))
                .collect();
            writeln!(
                out,
                "ready mode=afxdp iface={} xdp={} zero_copy={} queues={} poll={} kernel_workers={} kernel_cpus={} kernel_poll=block",
                args.iface.as_deref().unwrap_or_default(),
                dp.attached,
                if dp.zero_copy { "on" } else { "off" },
                queues.join(","),
                poll_name(poll),
                workers.len(),
                CpuList(placement.kernel_cpus.clone()),
            )?
        }
        Bypass::Xdp(_, attached) => writeln!(
            out,
            "ready mode=xdp iface={} xdp={attached} kernel_workers={} kernel_poll={}",
            args.iface.as_deref().unwrap_or_default(),
            workers.len(),
            poll_name(kernel_poll)
        )?,
    }
    out.flush()?;
    drop(out);

    let mut failure = None;
    loop {
        match sys::wait_for_signal(Duration::from_millis(200)) {
            // SIGHUP: a status report on stdout; ricochet keeps serving (there is nothing to reload).
            Some(Signal::SIGHUP) => print_status(&*counter, &workers, &bypass),
            // SIGINT, SIGTERM, SIGQUIT: a graceful stop with the final report.
            Some(signal) => {
                tracing::info!("{signal} received, stopping");
                break;
            }
            None => {}
        }
        let bypass_died = matches!(&bypass, Bypass::Afxdp(dp) if dp.workers.iter().any(|w| w.handle.is_finished()));
        let running = workers.iter().filter(|w| !w.handle.is_finished()).count()
            + match &bypass {
                Bypass::Afxdp(dp) => dp
                    .workers
                    .iter()
                    .filter(|w| !w.handle.is_finished())
                    .count(),
                _ => 0,
            };
        state
            .readiness
            .workers_running
            .store(running, Ordering::Relaxed);
        if workers.iter().any(|w| w.handle.is_finished()) || bypass_died {
            failure = Some("a worker stopped unexpectedly");
            break;
        }
        // A dead HTTP thread takes the process down rather than leaving it alive and looking
        // healthy; a supervisor (systemd's Restart=on-failure) starts it again.
        if http.as_ref().is_some_and(HttpServer::any_worker_finished) {
            failure = Some("an HTTP worker stopped unexpectedly");
            break;
        }
    }
    // Shutdown: the endpoints first (they finish requests in flight), then the datapaths.
    state.readiness.stopping.store(true, Ordering::Relaxed);
    if let Some(server) = http {
        server.shutdown();
    }
    stop.store(true, Ordering::Relaxed);
    for worker in &workers {
        let _ = worker.wake.write(1);
    }

    let mut errors = Vec::new();
    let mut total = StatsSnapshot::default();
    let mut lines = Vec::new();
    for (index, worker) in workers.into_iter().enumerate() {
        match worker.handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push(format!("worker {index} panicked")),
        }
        let snapshot = worker.stats.snapshot();
        total.merge(&snapshot);
        lines.push(format!("worker {index} cpu={} {snapshot}", worker.cpu));
    }
    let program = match bypass {
        Bypass::None => None,
        Bypass::Afxdp(dp) => {
            for worker in dp.workers {
                let xsk = match worker.handle.join() {
                    Ok(Ok(xsk)) => xsk.to_string(),
                    Ok(Err(e)) => {
                        errors.push(format!("queue {}: {e:#}", worker.queue));
                        "xsk unavailable".to_string()
                    }
                    Err(_) => {
                        errors.push(format!("queue {} worker panicked", worker.queue));
                        "xsk unavailable".to_string()
                    }
                };
                let snapshot = worker.stats.snapshot();
                total.merge(&snapshot);
                lines.push(format!(
                    "afxdp queue={} cpu={} {snapshot} {xsk}",
                    worker.queue, worker.cpu
                ));
            }
            Some(dp.program)
        }
        Bypass::Xdp(program, _) => Some(program),
    };
    if let Some(program) = &program {
        // Requests the program answered or dropped itself count in the totals too.
        match (program.stats(), program.in_kernel_totals()) {
            (Ok(stats), Ok((replies, drops))) => {
                let fields: Vec<String> = XdpStat::ALL
                    .iter()
                    .map(|s| format!("{}={}", s.as_str(), stats[*s as usize]))
                    .collect();
                lines.push(format!("xdp {}", fields.join(" ")));
                total.add_in_kernel(replies, &drops);
            }
            (Err(e), _) | (_, Err(e)) => {
                errors.push(format!("cannot read the XDP program's statistics: {e:#}"))
            }
        }
    }
    // The final counter is read before the program goes: in xdp mode it lives in the program's map.
    let final_counter = counter.load();
    drop(state);
    drop(counter);
    // Dropping the program closes its BPF link: the interface is left as it was.
    drop(program);
    let mut out = std::io::stdout().lock();
    writeln!(out, "final counter={final_counter}")?;
    for line in lines {
        writeln!(out, "{line}")?;
    }
    writeln!(out, "total {total}")?;
    out.flush()?;
    if !errors.is_empty() || failure.is_some() {
        bail!(
            "{}: {}",
            failure.unwrap_or("a worker failed"),
            errors.join("; ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;

    fn cpus(list: &[usize]) -> Vec<CpuId> {
        list.iter().copied().map(CpuId).collect()
    }

    #[test]
    fn afxdp_fallback_goes_to_housekeeping_cpus_and_fifo_to_the_afxdp_workers() {
        let p = Placement::plan(Mode::Afxdp, &cpus(&[1]), &cpus(&[0, 1]), Some(10));
        assert_eq!(p.kernel_cpus, cpus(&[0]));
        assert_eq!(p.housekeeping, cpus(&[0]));
        assert_eq!(p.kernel_scheduling.fifo_priority, None);
        assert_eq!(p.afxdp_fifo, Some(10));
        // No housekeeping CPU left: the fallback shares the datapath CPUs, still without FIFO.
        let p = Placement::plan(Mode::Afxdp, &cpus(&[0, 1]), &cpus(&[0, 1]), Some(10));
        assert_eq!(p.kernel_cpus, cpus(&[0, 1]));
        assert_eq!(p.kernel_scheduling.fifo_priority, None);
    }

    #[test]
    fn kernel_and_xdp_workers_stay_on_their_cpus_with_fifo() {
        for mode in [Mode::Kernel, Mode::Xdp] {
            let p = Placement::plan(mode, &cpus(&[1]), &cpus(&[0, 1]), Some(5));
            assert_eq!(p.kernel_cpus, cpus(&[1]));
            assert_eq!(p.kernel_scheduling.fifo_priority, Some(5));
            assert_eq!(p.afxdp_fifo, None);
        }
    }
}
