//! `--state-dir`: the durable counter of a running `serve` (see [`crate::durable`]). Opened before
//! the datapaths start, so that they start from the recovered value; a syncer thread snapshots the
//! counter every `--sync-interval` while serving; the orderly stop writes the final snapshot.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::args::Mode;
use super::config::StatePlan;
use crate::core::Counter;
use crate::durable::{self, Recovery, SnapshotWriter, StateDir};

/// The state directory and what start-up found in it.
pub struct CounterState {
    pub dir: StateDir,
    pub recovery: Recovery,
    /// The live counter's file (kernel and afxdp modes).
    pub live_file: Option<File>,
    /// Where the counter map is pinned (xdp mode).
    pub pin: Option<PathBuf>,
    writer: SnapshotWriter,
}

/// What `/stats` shows under `started_as.counter_state`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StateView {
    pub dir: PathBuf,
    pub sync_interval_ms: u64,
    pub recovery: Recovery,
}

impl CounterState {
    /// Opens and locks the directory and reads the live record and the snapshots.
    pub fn open(plan: &StatePlan, mode: Mode) -> Result<CounterState> {
        let dir = StateDir::open(&plan.dir)?;
        let (live_file, pin, live) = if mode == Mode::Xdp {
            durable::ensure_bpffs(&plan.bpffs)?;
            let pin = dir.pin_path(&plan.bpffs);
            let live = crate::xdp::read_pinned_counter(&pin)?;
            (None, Some(pin), live)
        } else {
            let (file, live) = dir.live_file()?;
            (Some(file), None, live)
        };
        let read = dir.read_snapshots()?;
        if read.damaged {
            let file = dir.path().join("counter.snap");
            match live {
                Some(_) => tracing::warn!("{} holds no whole snapshot; the live record stands", file.display()),
                None => bail!("{} holds no whole snapshot and there is no live record: the counter's last value is unknown. Move the directory away only if repeating values already handed out is acceptable", file.display()),
            }
        }
        let recovery = Recovery::decide(live, read.newest);
        tracing::info!("{}: {}", dir.path().display(), recovery.describe());
        // The value resumed from is durable before anything is served: were this run to lose its
        // live record too (a power loss while idle), the next start would not fall back below it.
        let mut writer = dir.writer(read.newest)?;
        writer
            .write(recovery.value, false)
            .context("cannot write the recovered counter's snapshot")?;
        Ok(CounterState {
            dir,
            recovery,
            live_file,
            pin,
            writer,
        })
    }

    /// With `--user`: the state directory and its files become that user's.
    pub fn hand_over(&self, ids: Option<(u32, u32)>) -> Result<()> {
        match ids {
            Some((uid, gid)) => self.dir.hand_over(uid, gid, self.live_file.as_ref()),
            None => Ok(()),
        }
    }

    /// Brings a freshly created counter up to the recovered value.
    pub fn seed(&self, counter: &dyn Counter) {
        let now = counter.load();
        if self.recovery.value > now {
            counter.fetch_add(self.recovery.value - now);
        }
    }

    pub fn view(&self, sync_interval: Duration) -> StateView {
        StateView {
            dir: self.dir.path().to_path_buf(),
            sync_interval_ms: sync_interval.as_millis() as u64,
            recovery: self.recovery,
        }
    }

    /// Starts the thread that snapshots `counter` every `interval` (never on the packet path).
    pub fn start_syncer(self, counter: Arc<dyn Counter>, interval: Duration) -> Result<Syncer> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let mut writer = self.writer;
        let mut last = counter.load();
        let handle = std::thread::Builder::new()
            .name("counter-sync".into())
            .spawn(move || {
                let mut failing = false;
                while !flag.load(Ordering::Relaxed) {
                    std::thread::park_timeout(interval);
                    let value = counter.load();
                    if value == last {
                        continue;
                    }
                    match writer.write(value, false) {
                        Ok(_) => (last, failing) = (value, false),
                        Err(e) if !failing => {
                            failing = true;
                            tracing::error!("cannot write a counter snapshot: {e}");
                        }
                        Err(_) => {}
                    }
                }
                writer
            })
            .context("cannot start the counter syncer thread")?;
        Ok(Syncer {
            stop,
            handle,
            live_file: self.live_file,
            _dir: self.dir,
        })
    }
}

/// The running syncer.
pub struct Syncer {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<SnapshotWriter>,
    live_file: Option<File>,
    /// Holds the directory's lock until the final snapshot is written.
    _dir: StateDir,
}

impl Syncer {
    /// Stops the thread and makes `final_value` durable: the live file and a clean snapshot.
    pub fn finish(self, final_value: u64) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.thread().unpark();
        let mut writer = self
            .handle
            .join()
            .map_err(|_| anyhow::anyhow!("the counter syncer panicked"))?;
        if let Some(file) = &self.live_file {
            file.sync_data()
                .context("cannot sync the live counter file")?;
        }
        writer
            .write(final_value, true)
            .context("cannot write the final counter snapshot")?;
        tracing::info!("counter {final_value} synced to the state directory");
        Ok(())
    }
}
