//! The shipper thread: sends the records waiting in the history store to the first target that
//! takes them, oldest first, and marks them shipped only once the target committed them.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::breaker::{jitter, Backoff, BreakerState};
use super::schema;
use super::target::{Target, TargetUrl};
use crate::history::{self, History};
use crate::stats::{Field, FieldKind};

/// Records per upsert.
pub const BATCH: usize = 3600;
/// How often every target's health is checked.
const HEALTH_EVERY: Duration = Duration::from_secs(5);
/// How often old partitions are dropped.
const RETENTION_EVERY: Duration = Duration::from_secs(3600);
/// The longest a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What `--fleet` and its companions ask for.
#[derive(Debug, Clone)]
pub struct FleetPlan {
    /// The primary first, then the fallbacks.
    pub targets: Vec<TargetUrl>,
    pub instance: String,
    pub interval: Duration,
    /// Per-second partitions older than this are dropped.
    pub retention: Duration,
    /// Per-minute partitions older than this are dropped.
    pub rollup_retention: Duration,
    /// How long a stop may spend shipping what waits.
    pub stop_deadline: Duration,
}

/// One target as the endpoints see it.
#[derive(Debug)]
pub struct TargetStatus {
    pub label: String,
    pub up: AtomicBool,
    breaker: AtomicU8,
}

impl TargetStatus {
    pub fn breaker(&self) -> BreakerState {
        BreakerState::from_code(self.breaker.load(Ordering::Relaxed))
    }
}

/// The shipper's state for `/metrics` and `/stats`, written by the shipper thread only.
#[derive(Debug)]
pub struct FleetStatus {
    pub instance: String,
    pub targets: Vec<TargetStatus>,
    /// Records in the history store not yet acknowledged by a target.
    pub waiting: AtomicU64,
    /// Age of the oldest waiting record, in seconds (0 when nothing waits).
    pub lag_seconds: AtomicU64,
    /// Records acknowledged since start.
    pub shipped: AtomicU64,
    /// Ship attempts and health checks that failed since start.
    pub failures: AtomicU64,
    pub last_error: Mutex<Option<String>>,
}

impl FleetStatus {
    pub fn new(plan: &FleetPlan) -> FleetStatus {
        FleetStatus {
            instance: plan.instance.clone(),
            targets: plan
                .targets
                .iter()
                .map(|t| TargetStatus {
                    label: t.label.clone(),
                    up: AtomicBool::new(false),
                    breaker: AtomicU8::new(BreakerState::Closed.code()),
                })
                .collect(),
            waiting: AtomicU64::new(0),
            lag_seconds: AtomicU64::new(0),
            shipped: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    /// The shipper's statistics, described once for `/metrics`.
    pub fn fields(&self) -> [Field; 4] {
        let field = |name, help, kind, value: &AtomicU64| Field {
            name,
            help,
            kind,
            value: value.load(Ordering::Relaxed),
        };
        [
            field(
                "fleet_lag_seconds",
                "Age of the oldest record waiting to be shipped (0 when none waits)",
                FieldKind::Gauge,
                &self.lag_seconds,
            ),
            field(
                "fleet_waiting_records",
                "Per-second records in the history store not yet acknowledged by a fleet target",
                FieldKind::Gauge,
                &self.waiting,
            ),
            field(
                "fleet_shipped_records",
                "Per-second records acknowledged by a fleet target since start",
                FieldKind::Counter,
                &self.shipped,
            ),
            field(
                "fleet_failures",
                "Fleet batches and health checks that failed since start",
                FieldKind::Counter,
                &self.failures,
            ),
        ]
    }

    /// The same as JSON, for `/stats`.
    pub fn to_json(&self) -> serde_json::Value {
        let targets: Vec<serde_json::Value> = self
            .targets
            .iter()
            .map(|t| {
                serde_json::json!({
                    "target": t.label,
                    "up": t.up.load(Ordering::Relaxed),
                    "breaker": t.breaker(),
                })
            })
            .collect();
        serde_json::json!({
            "instance": self.instance,
            "targets": targets,
            "waiting": self.waiting.load(Ordering::Relaxed),
            "lag_seconds": self.lag_seconds.load(Ordering::Relaxed),
            "shipped": self.shipped.load(Ordering::Relaxed),
            "failures": self.failures.load(Ordering::Relaxed),
            "last_error": *self.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }
}

/// The running shipper.
pub struct Shipper {
    stop: Arc<AtomicBool>,
    done: mpsc::Receiver<u64>,
    handle: JoinHandle<()>,
    deadline: Duration,
}

impl Shipper {
    /// Starts shipping from `history`, a connection of its own to the store.
    pub fn start(plan: FleetPlan, history: History, status: Arc<FleetStatus>) -> Result<Shipper> {
        if plan.targets.is_empty() {
            bail!("the fleet shipper needs at least one --fleet URL");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (tell, done) = mpsc::channel();
        let deadline = plan.stop_deadline;
        let owner = history.owner()?;
        let mut worker = Worker {
            targets: plan
                .targets
                .iter()
                .map(|url| Target::new(url.clone(), &plan.instance, owner))
                .collect(),
            history,
            status,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
            plan,
            last_error: None,
        };
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("fleet-ship".into())
            .spawn(move || {
                let waiting = worker.run(&flag);
                let _ = tell.send(waiting);
            })
            .context("cannot start the fleet shipper thread")?;
        Ok(Shipper {
            stop,
            done,
            handle,
            deadline,
        })
    }

    /// Ships what waits, for at most the stop deadline (plus one connection timeout); returns how
    /// many records are left for the next start, or None when the thread did not say.
    pub fn finish(self) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
        // The thread keeps its own deadline; this one only covers a connection stuck past it.
        match self.done.recv_timeout(self.deadline + CONNECT_TIMEOUT) {
            Ok(waiting) => Some(waiting),
            Err(mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!("the fleet shipper did not finish within its stop deadline; what waits ships at the next start");
                None
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                tracing::error!(
                    "the fleet shipper thread died; what waits ships at the next start"
                );
                None
            }
        }
    }
}

/// The outcome of one round.
enum Round {
    Idle,
    Shipped(usize),
    /// Records wait, but every target's breaker is open.
    Blocked,
}

struct Worker {
    targets: Vec<Target>,
    history: History,
    status: Arc<FleetStatus>,
    backoff: Backoff,
    plan: FleetPlan,
    last_error: Option<String>,
}

impl Worker {
    /// Ships until stopped and then until nothing waits or the deadline passes; returns what waits.
    fn run(&mut self, stop: &AtomicBool) -> u64 {
        let mut stop_by: Option<Instant> = None;
        let (mut next_health, mut next_retention) = (Instant::now(), Instant::now());
        loop {
            let now = Instant::now();
            if stop_by.is_none() && stop.load(Ordering::Relaxed) {
                stop_by = Some(now + self.plan.stop_deadline);
            }
            if stop_by.is_some_and(|by| now >= by) {
                break;
            }
            if stop_by.is_none() && now >= next_health {
                self.health_checks();
                next_health = now + HEALTH_EVERY;
            }
            if stop_by.is_none() && now >= next_retention && self.retention() {
                next_retention = now + RETENTION_EVERY;
            }
            let timeout = stop_by.map_or(CONNECT_TIMEOUT, |by| {
                by.saturating_duration_since(now).min(CONNECT_TIMEOUT)
            });
            let wait = match self.round(timeout) {
                Ok(Round::Shipped(n)) if n == BATCH => Duration::ZERO,
                // Stopping: done once nothing waits, or when no target may be tried.
                Ok(Round::Blocked) if stop_by.is_some() => break,
                Ok(_) if stop_by.is_some() && self.publish_backlog() == 0 => break,
                Ok(_) => {
                    self.backoff.reset();
                    self.plan.interval
                }
                Err(e) => {
                    self.failed(&e);
                    self.backoff.next(jitter())
                }
            };
            self.publish_backlog();
            if !wait.is_zero() {
                let left = stop_by.map_or(wait, |by| by.saturating_duration_since(Instant::now()));
                std::thread::park_timeout(wait.min(left));
            }
        }
        self.publish_backlog()
    }

    /// Ships one batch to the first target that takes it, primary first.
    fn round(&mut self, timeout: Duration) -> Result<Round> {
        let batch = self.history.waiting(BATCH)?;
        if batch.is_empty() {
            return Ok(Round::Idle);
        }
        let mut errors = Vec::new();
        for index in 0..self.targets.len() {
            let target = &mut self.targets[index];
            if !target.breaker.allows(Instant::now()) {
                continue;
            }
            let result = target.ship(&batch, timeout);
            self.settle(index, &result);
            match result {
                Ok(()) => {
                    self.history.mark_shipped(&batch)?;
                    self.status
                        .shipped
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                    return Ok(Round::Shipped(batch.len()));
                }
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if errors.is_empty() {
            return Ok(Round::Blocked);
        }
        bail!("no target took the batch: {}", errors.join("; "))
    }

    /// Records a target's success or failure in its breaker and status.
    fn settle(&mut self, index: usize, result: &Result<()>) {
        let target = &mut self.targets[index];
        match result {
            Ok(()) => target.breaker.success(),
            Err(_) => {
                target.breaker.failure(Instant::now(), jitter());
                self.status.failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        let status = &self.status.targets[index];
        status.up.store(result.is_ok(), Ordering::Relaxed);
        status
            .breaker
            .store(target.breaker.state().code(), Ordering::Relaxed);
    }

    /// Checks every target the breaker lets through; the breakers then steer the rounds.
    fn health_checks(&mut self) {
        for index in 0..self.targets.len() {
            let target = &mut self.targets[index];
            if !target.breaker.allows(Instant::now()) {
                continue;
            }
            let result = target.check(CONNECT_TIMEOUT);
            if let Err(e) = &result {
                self.failed(e);
            }
            self.settle(index, &result);
        }
    }

    /// Drops old partitions through the first target that is up. True when done.
    fn retention(&mut self) -> bool {
        let now = history::unix_now();
        let seconds_before = now - self.plan.retention.as_secs() as i64;
        let minutes_before = now - self.plan.rollup_retention.as_secs() as i64;
        for index in 0..self.targets.len() {
            if !self.status.targets[index].up.load(Ordering::Relaxed) {
                continue;
            }
            let target = &mut self.targets[index];
            let result = target.client(CONNECT_TIMEOUT).and_then(|client| {
                let mut dropped =
                    schema::drop_partitions_before(client, "ricochet_seconds", seconds_before)?;
                dropped.extend(schema::drop_partitions_before(
                    client,
                    "ricochet_minutes",
                    minutes_before,
                )?);
                Ok(dropped)
            });
            match result {
                Ok(dropped) if !dropped.is_empty() => {
                    tracing::info!("fleet retention dropped {}", dropped.join(", "));
                }
                Ok(_) => {}
                Err(e) => self.failed(&e),
            }
            return true;
        }
        false
    }

    /// Logs a failure once per distinct message (no log flood while a database is down).
    fn failed(&mut self, e: &anyhow::Error) {
        let message = format!("{e:#}");
        if self.last_error.as_deref() != Some(&message) {
            tracing::warn!("fleet: {message}; records wait in the history store");
        }
        *self
            .status
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(message.clone());
        self.last_error = Some(message);
    }

    /// Publishes how many records wait and how old the oldest is; returns the count.
    fn publish_backlog(&mut self) -> u64 {
        let Ok((waiting, oldest)) = self.history.backlog() else {
            return self.status.waiting.load(Ordering::Relaxed);
        };
        let lag = oldest.map_or(0, |s| (history::unix_now() - s).max(0) as u64);
        self.status.waiting.store(waiting, Ordering::Relaxed);
        self.status.lag_seconds.store(lag, Ordering::Relaxed);
        waiting
    }
}
