//! What the HTTP endpoints read: the datapaths' per-worker records, the global counter, readiness,
//! and the HTTP server's own metrics. Everything here is read without locks on the packet path.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use super::pending::PendingBudget;
use crate::core::Counter;
use crate::fleet::FleetStatus;
use crate::history::History;
use crate::spec::CpuId;
use crate::stats::{Field, FieldKind, WorkerStats};

pub use crate::stats::XskLive;

/// One packet worker as the endpoints see it.
pub struct WorkerView {
    /// `kernel` or `afxdp`.
    pub datapath: &'static str,
    /// The worker index (kernel) or RX queue (afxdp).
    pub id: u32,
    pub cpu: CpuId,
    pub stats: Arc<WorkerStats>,
    pub xsk: Option<Arc<XskLive>>,
}

/// Readiness: every packet worker running and the XDP program (if any) attached.
#[derive(Debug, Default)]
pub struct Readiness {
    pub workers_expected: AtomicUsize,
    pub workers_running: AtomicUsize,
    pub xdp_expected: AtomicBool,
    pub xdp_attached: AtomicBool,
    pub stopping: AtomicBool,
}

impl Readiness {
    /// None when ready, otherwise why not.
    pub fn reason(&self) -> Option<String> {
        if self.stopping.load(Ordering::Relaxed) {
            return Some("shutting down".into());
        }
        let expected = self.workers_expected.load(Ordering::Relaxed);
        let running = self.workers_running.load(Ordering::Relaxed);
        if running < expected {
            return Some(format!("{running} of {expected} packet workers running"));
        }
        if self.xdp_expected.load(Ordering::Relaxed) && !self.xdp_attached.load(Ordering::Relaxed) {
            return Some("the XDP program is not attached".into());
        }
        None
    }
}

/// Reads the XDP program's per-CPU counters (summed), when a program is loaded.
pub type XdpStatsReader = Box<dyn Fn() -> Option<Vec<(&'static str, u64)>> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteStatus {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: &'static str,
    /// The HTTP worker, so that workers never contend for one histogram's lock.
    pub worker: u32,
}

/// The HTTP server's own metrics, shared by its workers.
pub struct HttpMetrics {
    pub requests: Family<RouteStatus, PromCounter>,
    pub latency: Family<RouteLabel, Histogram>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            requests: Family::default(),
            // 10 µs .. ~5 s.
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_01, 2.5, 15))
            }),
        }
    }
}

/// The HTTP server's connection-level statistics and its budget of partial-request bytes.
#[derive(Debug, Default)]
pub struct HttpConnStats {
    /// Connections accepted and closed at once because the process was out of file descriptors.
    pub refused: AtomicU64,
    /// Requests answered 503 because partial requests held the whole pending budget.
    pub over_budget: AtomicU64,
    pub pending: PendingBudget,
}

impl HttpConnStats {
    /// Every statistic, described once for /metrics and /stats.
    pub fn fields(&self) -> [Field; 4] {
        let field = |name, help, kind, value| Field {
            name,
            help,
            kind,
            value,
        };
        [
            field(
                "http_conns_refused",
                "HTTP connections accepted and closed at once because the process was out of file descriptors",
                FieldKind::Counter,
                self.refused.load(Ordering::Relaxed),
            ),
            field(
                "http_pending_rejected",
                "HTTP requests answered 503 because partial requests held the whole pending budget",
                FieldKind::Counter,
                self.over_budget.load(Ordering::Relaxed),
            ),
            field(
                "http_pending_bytes",
                "Bytes buffered by partial HTTP requests now",
                FieldKind::Gauge,
                self.pending.used(),
            ),
            field(
                "http_pending_limit_bytes",
                "Most bytes partial HTTP requests may buffer together (--http-max-pending)",
                FieldKind::Gauge,
                self.pending.limit(),
            ),
        ]
    }
}

/// Everything the endpoints need.
pub struct AppState {
    pub started: Instant,
    pub mode: &'static str,
    /// The resolved configuration, for /stats.
    pub config: serde_json::Value,
    /// What the datapaths started as: modes in effect and fallbacks taken, for /stats.
    pub started_as: serde_json::Value,
    pub counter: Arc<dyn Counter>,
    /// Every packet worker; set once, before the endpoints start.
    pub workers: Vec<WorkerView>,
    pub xdp_stats: Option<XdpStatsReader>,
    pub readiness: Readiness,
    pub http: HttpMetrics,
    /// Statistics of counter updates made over HTTP (POST /counter).
    pub http_counter_stats: WorkerStats,
    /// The HTTP server's connection statistics and pending-bytes budget.
    pub http_conns: HttpConnStats,
    /// The per-second history for GET /summary (`--state-dir`).
    pub history: Option<HistoryView>,
    /// The fleet shipper's state (`--fleet`).
    pub fleet: Option<Arc<FleetStatus>>,
}

/// GET /summary's own connection to the history store.
pub struct HistoryView {
    pub instance: String,
    pub store: Mutex<History>,
    /// Records the store refused (each kept and added to the next second's), counted by the recorder.
    pub write_failures: Arc<AtomicU64>,
}

impl AppState {
    pub fn new(
        mode: &'static str,
        config: serde_json::Value,
        counter: Arc<dyn Counter>,
    ) -> AppState {
        AppState {
            started: Instant::now(),
            mode,
            config,
            started_as: serde_json::Value::Null,
            counter,
            workers: Vec::new(),
            xdp_stats: None,
            readiness: Readiness::default(),
            http: HttpMetrics::default(),
            http_counter_stats: WorkerStats::default(),
            http_conns: HttpConnStats::default(),
            history: None,
            fleet: None,
        }
    }
}
