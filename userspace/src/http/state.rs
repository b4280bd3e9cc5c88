//! What the HTTP endpoints read: the datapaths' per-worker records, the global counter, readiness,
//! and the HTTP server's own metrics. Everything here is read without locks on the packet path.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter as PromCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

use crate::core::Counter;
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

/// Bytes buffered by partial HTTP requests, counted against one process-wide limit.
#[derive(Debug)]
pub struct PendingBudget {
    limit: AtomicU64,
    used: AtomicU64,
}

impl PendingBudget {
    /// The default limit: 16 MiB of partial requests (about 230 of the largest, 72 KiB each).
    pub const DEFAULT_LIMIT: u64 = 16 << 20;

    pub fn new(limit: u64) -> PendingBudget {
        PendingBudget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
        }
    }

    /// Sets the limit (the server does it once, at start).
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Relaxed);
    }

    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Charges `n` more bytes if the total stays within the limit; false (nothing charged) if not.
    pub fn try_charge(&self, n: u64) -> bool {
        let limit = self.limit();
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(n).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    /// Charges `n` bytes whatever the limit (memory the allocator already handed out).
    pub fn force_charge(&self, n: u64) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    /// Gives back `n` bytes charged earlier.
    pub fn release(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                Some(used.saturating_sub(n))
            });
    }
}

/// The HTTP server's connection-level statistics and its budget of partial-request bytes.
#[derive(Debug)]
pub struct HttpConnStats {
    /// Connections accepted and closed at once because the process was out of file descriptors.
    pub refused: AtomicU64,
    /// Requests answered 503 because partial requests held the whole pending budget.
    pub over_budget: AtomicU64,
    pub pending: PendingBudget,
}

impl Default for HttpConnStats {
    fn default() -> HttpConnStats {
        HttpConnStats {
            refused: AtomicU64::new(0),
            over_budget: AtomicU64::new(0),
            pending: PendingBudget::new(PendingBudget::DEFAULT_LIMIT),
        }
    }
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
    /// Mode details and fallbacks taken, e.g. `xdp=generic`, `zero_copy=off`.
    pub details: Mutex<Vec<(String, String)>>,
    /// The configuration as given, for /stats.
    pub config: serde_json::Value,
    pub counter: Arc<dyn Counter>,
    pub workers: Mutex<Vec<WorkerView>>,
    pub xdp_stats: Mutex<Option<XdpStatsReader>>,
    pub readiness: Readiness,
    pub http: HttpMetrics,
    /// Statistics of counter updates made over HTTP (POST /counter).
    pub http_counter_stats: WorkerStats,
    /// The HTTP server's connection statistics and pending-bytes budget.
    pub http_conns: HttpConnStats,
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
            details: Mutex::new(Vec::new()),
            config,
            counter,
            workers: Mutex::new(Vec::new()),
            xdp_stats: Mutex::new(None),
            readiness: Readiness::default(),
            http: HttpMetrics::default(),
            http_counter_stats: WorkerStats::default(),
            http_conns: HttpConnStats::default(),
        }
    }
}
