//! `ricochet serve`'s command line, exactly as given: flags only, nothing resolved or probed (see
//! [`super::config`] for that).

use std::path::PathBuf;
use std::time::Duration;

use crate::spec::{duration_in, mode_word, CpuList, ListenSpec, PollMode, XdpAttachMode, ZeroCopy};

mode_word! {
    /// Which datapath answers requests.
    Mode {
        /// Ordinary sockets (UDP, TCP, Unix) served by pinned worker threads.
        Kernel => "kernel",
        /// An XDP program steers UDP listener frames into AF_XDP sockets; pinned workers answer in
        /// UMEM. The kernel path keeps serving loopback, TCP, Unix and queues without a socket.
        Afxdp => "afxdp",
        /// The XDP program verifies, counts and answers UDP listener frames itself (XDP_TX); the
        /// kernel path serves the rest, on the same counter.
        Xdp => "xdp",
    }
}

/// Every flag also reads `RICOCHET_<NAME>` (`--max-datagram`: `RICOCHET_MAX_DATAGRAM`) and a key of
/// the `--config` file named like the flag (`max-datagram = 2048`); see [`super::settings`]. Switches
/// take an optional value (`--mlock`, `--mlock=false`) so that a flag can undo the file.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// A TOML file of settings, one key per flag (its long name: `listen = ["udp://0.0.0.0:7777"]`,
    /// `max-datagram = 2048`). Flags and RICOCHET_* environment variables override it.
    #[arg(long, value_name = "FILE.toml")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration (flags, environment, file and defaults merged) as TOML, with
    /// where each value came from, and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Datapath that answers requests.
    #[arg(long, value_enum, default_value = "kernel")]
    pub mode: Mode,

    /// Where to listen: [PROTO+]TRANSPORT://ADDR with PROTO counter (default), echo or sockperf and
    /// TRANSPORT udp, tcp or unix; repeat for more listeners. Port 0 picks a free port (the start-up
    /// lines print it). Examples: udp://0.0.0.0:7777, tcp://0.0.0.0:7777, unix:///run/ricochet.sock,
    /// sockperf+udp://0.0.0.0:11111.
    /// Also `listen = [...]` in the file; RICOCHET_LISTEN takes a comma-separated list (so a SPEC
    /// cannot contain a comma).
    #[arg(long = "listen", value_name = "SPEC", value_delimiter = ',')]
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
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set, value_name = "BOOL")]
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

    /// TCP-lite: most connections each AF_XDP worker keeps (afxdp, about 1.2 KiB each, reserved at
    /// start) or the XDP program keeps (xdp, about 2.2 KiB each, allocated as they come); a
    /// handshake beyond that is refused with RST and counted.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    pub tcp_max_conns: u32,

    /// TCP-lite (afxdp and xdp): a connection without a segment for this long is forgotten, e.g. 60s.
    #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = duration_in(Duration::from_secs(1), Duration::from_secs(86_400)))]
    pub tcp_idle_timeout: Duration,

    /// UMEM frames per AF_XDP socket (default 4096).
    #[arg(long, value_parser = clap::value_parser!(u32).range(64..=1 << 20))]
    pub frame_count: Option<u32>,

    /// Entries in each AF_XDP ring (fill, completion, RX, TX); a power of two (default 1024).
    #[arg(long, value_parser = parse_ring_size)]
    pub ring_size: Option<u32>,

    /// Put the UMEM on huge pages (reserve them first: /proc/sys/vm/nr_hugepages).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set, value_name = "BOOL")]
    pub huge_pages: bool,

    /// SO_BUSY_POLL microseconds (with SO_PREFER_BUSY_POLL) on the AF_XDP sockets; effective on
    /// real NICs, accepted but without effect on veth.
    #[arg(long, value_name = "USECS")]
    pub busy_poll: Option<u32>,

    /// SO_BUSY_POLL_BUDGET: packets per busy poll (needs --busy-poll).
    #[arg(long, value_name = "N", requires = "busy_poll")]
    pub busy_poll_budget: Option<u32>,

    /// Replace an XDP program someone else attached to the interface.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set, value_name = "BOOL")]
    pub force: bool,

    /// A hardware profile (hw-profiles/*.toml): interface, queues, worker CPUs, XDP and zero-copy modes,
    /// UMEM sizes and busy polling come from it; flags given on the command line win.
    #[arg(long, value_name = "FILE")]
    pub profile: Option<PathBuf>,

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

    /// Keep the counter durable in this directory: it survives a crash of the process exactly and
    /// of the machine up to --sync-interval (see the README). Without it the counter starts at 0.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// How often the counter is snapshotted (with fsync) into --state-dir, e.g. 100ms.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = duration_in(Duration::from_millis(1), Duration::from_secs(60)))]
    pub sync_interval: Duration,

    /// The bpffs where xdp mode pins the counter map with --state-dir (mounted if it is the default
    /// and nothing is mounted there). The pin must outlive the process: under `ip netns exec`, which
    /// remounts /sys, give a bpffs of the host.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// How long the per-second history in --state-dir is kept, e.g. 7d. Records still waiting for
    /// the fleet are kept until shipped.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = duration_in(Duration::from_secs(3600), Duration::from_secs(3650 * 86_400)))]
    pub history_retention: Duration,

    /// Ship the per-second history to this PostgreSQL database
    /// (postgresql://USER[:PASSWORD]@HOST[:PORT]/DBNAME); repeat for fallbacks, the first is the
    /// primary. Needs --state-dir, where records wait while no database answers.
    /// Checked at start-up without repeating it in errors (it may hold a password).
    #[arg(long, value_name = "URL", hide_env_values = true)]
    pub fleet: Vec<String>,

    /// This instance's name in the fleet and in /summary. Default: the host name.
    #[arg(long, value_name = "NAME")]
    pub instance: Option<String>,

    /// How often waiting records are shipped, e.g. 1s.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration_in(Duration::from_millis(100), Duration::from_secs(3600)))]
    pub fleet_interval: Duration,

    /// Per-second rows older than this are dropped from the fleet database, a day partition at a
    /// time, e.g. 7d.
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = duration_in(Duration::from_secs(86_400), Duration::from_secs(3650 * 86_400)))]
    pub fleet_retention: Duration,

    /// Per-minute rollup rows older than this are dropped, a month partition at a time, e.g. 400d.
    #[arg(long, value_name = "DURATION", default_value = "400d", value_parser = duration_in(Duration::from_secs(86_400), Duration::from_secs(36_500 * 86_400)))]
    pub fleet_rollup_retention: Duration,

    /// On a stop, how long the shipper may spend sending what waits; the rest ships at the next
    /// start.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration_in(Duration::ZERO, Duration::from_secs(600)))]
    pub fleet_stop_deadline: Duration,

    /// Permissions of the --http unix:// socket file, in octal (connecting needs write permission).
    #[arg(long, value_name = "MODE", default_value = "0660", value_parser = parse_socket_mode)]
    pub http_socket_mode: u32,

    /// Group of the --http unix:// socket file (a reverse proxy's group, say www-data).
    #[arg(long, value_name = "GROUP")]
    pub http_socket_group: Option<String>,

    /// Once set up, switch to this user (and its group); the capabilities set-up needed are dropped
    /// with or without it. Needs root.
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,
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

fn parse_socket_mode(s: &str) -> Result<u32, String> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(mode) if mode <= 0o777 => Ok(mode),
        _ => Err(format!("'{s}' is not an octal file mode such as 0660")),
    }
}
