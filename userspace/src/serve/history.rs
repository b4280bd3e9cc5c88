//! `--state-dir`'s per-second history while serving (see [`crate::history`]): the store is opened
//! with the state directory, before privileges drop; a recorder thread appends one record per
//! second from lock-free reads of the statistics records and the counter; the fleet shipper (with
//! `--fleet`) has a thread of its own. Neither is on the packet path.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use super::datapaths::Datapaths;
use crate::history::{History, Reading, Recorder, Second};
use crate::http::AppState;
use crate::stats::{StatsSnapshot, WorkerStats};
use crate::xdp::InKernelTotals;

/// How often the recorder deletes records past the retention.
const PRUNE_EVERY: u32 = 3600;

/// The store, opened, and the counter value the next record counts from.
pub struct HistoryStore {
    history: History,
    baseline: u64,
    /// GET /summary's own connection (taken when the endpoints are set up).
    pub view: Option<History>,
    /// The fleet shipper's own connection, with `--fleet`.
    pub shipper: Option<History>,
}

impl HistoryStore {
    /// Opens the store in `dir`. `resumed` is the counter this process started from: the next
    /// record counts from the store's last counter value, which is where the history left off, or
    /// from `resumed` when the store is new (or, damaged, claims more than the counter holds).
    /// Every connection is opened here, during set-up: the path may not be reachable once
    /// privileges are dropped.
    pub fn open(dir: &Path, resumed: u64, fleet: bool) -> Result<HistoryStore> {
        let history = History::open(dir)?;
        let baseline = match history.last_counter()? {
            Some(last) => {
                if last > resumed {
                    tracing::warn!("the counter resumed at {resumed}, below the {last} the history recorded last (a machine crash lost increments): the values up to {last} are not counted again");
                }
                last
            }
            None => {
                history.set_start(resumed)?;
                resumed
            }
        };
        Ok(HistoryStore {
            history,
            baseline,
            view: Some(History::open(dir)?),
            shipper: if fleet {
                Some(History::open(dir)?)
            } else {
                None
            },
        })
    }

    /// With `--user`: the store's files become that user's.
    pub fn hand_over(&self, ids: Option<(u32, u32)>) -> Result<()> {
        match ids {
            Some((uid, gid)) => self.history.hand_over(uid, gid),
            None => Ok(()),
        }
    }

    /// Starts the recorder. `keep_waiting`: retention spares records the fleet has not taken.
    pub fn start(
        self,
        read: ReadFn,
        retention: Duration,
        keep_waiting: bool,
        write_failures: Arc<AtomicU64>,
    ) -> Result<Recording> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let mut thread = RecorderThread {
            history: self.history,
            recorder: Recorder::new(Reading {
                counter: self.baseline,
                ..Reading::default()
            }),
            carry: None,
            read,
            retention: retention.as_secs() as i64,
            keep_waiting,
            failing: false,
            write_failures,
        };
        let handle = std::thread::Builder::new()
            .name("history".into())
            .spawn(move || thread.run(&flag))
            .context("cannot start the history recorder thread")?;
        Ok(Recording { stop, handle })
    }
}

/// Reads the process's cumulative totals.
pub type ReadFn = Box<dyn Fn() -> Reading + Send>;

/// The readings of a running `serve`: every packet worker's record, POST /counter's, the XDP
/// program's own counts and the counter, all read without locks.
pub fn reading_source(paths: &Datapaths, state: &Arc<AppState>) -> ReadFn {
    let mut records: Vec<Arc<WorkerStats>> = paths.kernel.iter().map(|w| w.stats.clone()).collect();
    records.extend(paths.afxdp_workers().map(|w| w.stats.clone()));
    let xdp: Option<Box<dyn Fn() -> Option<InKernelTotals> + Send>> =
        paths.program().map(|p| Box::new(p.totals_reader()) as _);
    let counter = paths.counter.clone();
    let state = state.clone();
    Box::new(move || {
        let mut total = StatsSnapshot::default();
        for record in &records {
            total.merge(&record.snapshot());
        }
        total.merge(&state.http_counter_stats.snapshot());
        if let Some((replies, drops)) = xdp.as_ref().and_then(|read| read()) {
            total.add_in_kernel(replies, &drops);
        }
        Reading {
            counter: counter.load(),
            requests: total.requests,
            replies: total.replies,
            drops: total.drops,
        }
    })
}

/// The running recorder.
pub struct Recording {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Result<()>>,
}

impl Recording {
    /// Stops the recorder after a last record (the part of the current second served so far).
    /// Call it once the datapaths have stopped, so that the last record holds the final counter.
    pub fn finish(self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
        self.handle
            .join()
            .map_err(|_| anyhow::anyhow!("the history recorder panicked"))?
    }
}

struct RecorderThread {
    history: History,
    recorder: Recorder,
    /// A record the store refused, added to the next one so that no increment is lost.
    carry: Option<Second>,
    read: ReadFn,
    retention: i64,
    keep_waiting: bool,
    failing: bool,
    write_failures: Arc<AtomicU64>,
}

impl RecorderThread {
    fn run(&mut self, stop: &AtomicBool) -> Result<()> {
        // At start too, so that a service restarted more often than hourly still prunes.
        self.prune(clock().0);
        let mut recorded = 0u32;
        loop {
            let (now, to_next) = clock();
            if stop.load(Ordering::Relaxed) {
                // The final record: the current second up to now.
                return self
                    .record(now)
                    .context("cannot write the last history record");
            }
            std::thread::park_timeout(to_next);
            let (after, _) = clock();
            if after > now && !stop.load(Ordering::Relaxed) {
                // A new second began: record the one that ended (a late wake-up records the
                // seconds it missed as one).
                let _ = self.record(after - 1);
                recorded += 1;
                if recorded.is_multiple_of(PRUNE_EVERY) {
                    self.prune(after);
                }
            }
        }
    }

    /// Records `second` from a fresh reading; logs the first failure of a run of them.
    fn record(&mut self, second: i64) -> Result<()> {
        let mut record = self.recorder.record(second, (self.read)());
        if let Some(carried) = self.carry.take() {
            record.merge(&carried);
        }
        match self.history.append(&record, self.recorder.counter()) {
            Ok(()) => {
                self.failing = false;
                Ok(())
            }
            Err(e) => {
                if !self.failing {
                    tracing::error!(
                        "cannot write to the history store (kept for the next second): {e:#}"
                    );
                }
                self.failing = true;
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                self.carry = Some(record);
                Err(e)
            }
        }
    }

    fn prune(&mut self, now: i64) {
        match self.history.prune(now - self.retention, self.keep_waiting) {
            Ok(0) => {}
            Ok(n) => tracing::info!("history: {n} records past the retention deleted"),
            Err(e) => tracing::warn!("cannot prune the history store: {e:#}"),
        }
    }
}

/// The current Unix second and the time to the next one.
fn clock() -> (i64, Duration) {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let to_next = Duration::from_secs(1) - Duration::from_nanos(u64::from(since.subsec_nanos()));
    (since.as_secs() as i64, to_next)
}
