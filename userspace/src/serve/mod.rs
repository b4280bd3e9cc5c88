//! `ricochet serve` as a pipeline, one step per module:
//!
//! 1. [`config`]: resolve the flags, the profile and the machine's facts into one checked [`Config`];
//! 2. [`datapaths`]: start the kernel workers and the bypass part under one owner;
//! 3. [`publish`]: give the endpoints their views and start the HTTP server;
//! 4. supervise (here): wait for signals and watch the workers;
//! 5. shut down and print the final [`report`].

mod args;
mod config;
mod datapaths;
mod history;
mod publish;
mod report;
pub mod settings;
mod state;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use nix::sys::signal::Signal;
use sd_notify::NotifyState;

use crate::fleet::{FleetStatus, Shipper};
use crate::http::{AppState, HistoryView, HttpBound, HttpListen, HttpServer};
use crate::privilege::{self, Dropped, Lockdown};
use crate::spec::Transport;
use crate::sys;
pub use args::{Mode, ServeArgs};
pub use config::Config;
use datapaths::Datapaths;
use history::HistoryStore;
pub use settings::Settings;
use state::CounterState;

pub fn run(settings: Settings) -> Result<()> {
    if settings.args.print_config {
        return Ok(report::print(&settings.to_toml())?);
    }
    let config = Config::resolve(settings)?;
    let set_up = set_up(&config)?;
    serve(&config, set_up)
}

/// What set-up leaves for serving.
struct SetUp {
    paths: Datapaths,
    http: Option<HttpBound>,
    dropped: Dropped,
    counter_state: Option<CounterState>,
    history: Option<HistoryStore>,
}

/// Everything that needs privileges: the state directory, the datapaths and the HTTP listener.
/// Then every thread drops them: the packet workers already did after their own set-up, the main
/// thread does here, and the threads started next inherit that.
fn set_up(config: &Config) -> Result<SetUp> {
    let lockdown = Lockdown::plan(config.user.as_deref(), config.mlock)?;
    if let Some(bypass) = &config.bypass {
        privilege::check_bypass_kernel(bypass.afxdp.is_none())?;
    }
    prepare_process(config)?;
    let counter_state = match &config.state {
        Some(plan) => Some(CounterState::open(plan, config.mode)?),
        None => None,
    };
    let history = match &counter_state {
        Some(state) => Some(HistoryStore::open(
            state.dir.path(),
            state.recovery.value,
            config.fleet.is_some(),
        )?),
        None => None,
    };
    let paths = Datapaths::start(config, &lockdown, counter_state.as_ref())?;
    let http = match &config.http {
        Some(plan) => Some(publish::bind_http(config, plan)?),
        None => None,
    };
    let sockets = paths.bound.iter().filter_map(|spec| match &spec.transport {
        Transport::Unix(path) => Some(path.to_path_buf()),
        _ => None,
    });
    let http_socket = http.as_ref().and_then(|h| match &h.bound {
        HttpListen::Unix(path) => Some(path.to_path_buf()),
        HttpListen::Tcp(_) => None,
    });
    let owned: Vec<_> = sockets.chain(http_socket).collect();
    lockdown.hand_over(owned.iter().map(|p| p.as_path()))?;
    if let (Some(plan), Some(bound)) = (&config.http, &http) {
        publish::secure_http_socket(plan, &bound.bound)?;
    }
    if let Some(state) = &counter_state {
        state.hand_over(lockdown.user_ids())?;
    }
    if let Some(history) = &history {
        history.hand_over(lockdown.user_ids())?;
    }
    let dropped = lockdown
        .finish()
        .context("cannot drop privileges after set-up")?;
    tracing::info!("{dropped}");
    if dropped.uid == 0 {
        tracing::warn!("still uid 0 (with no capability): root's files stay writable to this process; pass --user NAME, or run it from the systemd unit, which gives it its own user");
    }
    Ok(SetUp {
        paths,
        http,
        dropped,
        counter_state,
        history,
    })
}

/// Serves until stopped, then shuts down in order and reports.
fn serve(config: &Config, set_up: SetUp) -> Result<()> {
    let SetUp {
        paths,
        http,
        dropped,
        counter_state,
        history,
    } = set_up;
    let (state, keepers) = publish_and_keep(config, &paths, &dropped, counter_state, history)?;
    let http = match http {
        Some(bound) => Some(bound.serve(state.clone())?),
        None => None,
    };
    report::print(&report::ready_text(config, &paths, http.as_ref()))?;
    notify_service_manager(&[NotifyState::Ready, NotifyState::Status("serving")]);
    let ending = supervise(&paths, &state, http.as_ref());
    notify_service_manager(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    // Shutdown: the endpoints first (they finish requests in flight), then the datapaths, then the
    // final value is made durable, recorded and shipped.
    state.readiness.stopping.store(true, Ordering::Relaxed);
    if let Some(server) = http {
        server.shutdown();
    }
    drop(state);
    let mut report = paths.finish();
    keepers.finish(report.final_counter, &mut report.errors);
    report::print(&report.render(""))?;
    match (ending, report.errors.is_empty()) {
        (Ending::Signal, true) => Ok(()),
        (ending, _) => bail!("{}: {}", ending.failure(), report.errors.join("; ")),
    }
}

/// The endpoints' state, and the threads that keep the counter and its history: the snapshot
/// syncer, the history recorder and the fleet shipper.
fn publish_and_keep(
    config: &Config,
    paths: &Datapaths,
    dropped: &Dropped,
    counter_state: Option<CounterState>,
    mut history: Option<HistoryStore>,
) -> Result<(Arc<AppState>, Keepers)> {
    let plan = config.state.as_ref();
    let interval = plan.map_or(Duration::ZERO, |s| s.sync_interval.0);
    let view = counter_state.as_ref().map(|s| s.view(interval));
    let fleet = config
        .fleet
        .as_ref()
        .map(|f| Arc::new(FleetStatus::new(&f.plan)));
    let history_view = history.as_mut().and_then(|h| h.view.take());
    let write_failures = Arc::new(AtomicU64::new(0));
    let history_view = history_view.map(|store| HistoryView {
        instance: config.instance.clone(),
        store: Mutex::new(store),
        write_failures: write_failures.clone(),
    });
    let shipper_store = history.as_mut().and_then(|h| h.shipper.take());
    let state = publish::app_state(config, paths, dropped, view, history_view, fleet.clone());
    let mut keepers = Keepers::default();
    if let Some(s) = counter_state {
        keepers.syncer = Some(s.start_syncer(paths.counter.clone(), interval)?);
    }
    if let (Some(store), Some(plan)) = (history, plan) {
        let read = history::reading_source(paths, &state);
        let retention = plan.history_retention.0;
        let keep_waiting = fleet.is_some();
        keepers.recording = Some(store.start(read, retention, keep_waiting, write_failures)?);
    }
    if let (Some(f), Some(status), Some(store)) = (&config.fleet, fleet, shipper_store) {
        keepers.shipper = Some(Shipper::start(f.plan.clone(), store, status)?);
    }
    Ok((state, keepers))
}

/// The threads that outlive the datapaths by a little: each finishes after them, in order.
#[derive(Default)]
struct Keepers {
    syncer: Option<state::Syncer>,
    recording: Option<history::Recording>,
    shipper: Option<Shipper>,
}

impl Keepers {
    /// The final snapshot, then the last history record, then the shipper's last batches.
    fn finish(self, final_counter: u64, errors: &mut Vec<String>) {
        if let Some(Err(e)) = self.syncer.map(|s| s.finish(final_counter)) {
            errors.push(format!("{e:#}"));
        }
        if let Some(Err(e)) = self.recording.map(history::Recording::finish) {
            errors.push(format!("{e:#}"));
        }
        match self.shipper.and_then(Shipper::finish) {
            Some(0) => tracing::info!("fleet: every record shipped"),
            Some(n) => tracing::warn!(
                "fleet: {n} records wait in the history store; they ship at the next start"
            ),
            None => {}
        }
    }
}

/// Tells systemd (`Type=notify`, through `$NOTIFY_SOCKET`) where start-up or shutdown stands; without
/// a service manager this does nothing.
fn notify_service_manager(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!("cannot notify the service manager: {e}");
    }
}

/// Process-wide set-up before any worker starts.
fn prepare_process(config: &Config) -> Result<()> {
    if config.mlock {
        sys::lock_all_memory().context(
            "--mlock failed: mlockall needs root, CAP_IPC_LOCK or a large enough 'ulimit -l'",
        )?;
    }
    // Raise the descriptor limit for many stream connections; keep going if the hard limit is low.
    let _ = sys::raise_fd_limit();
    sys::block_handled_signals().context("cannot block SIGINT, SIGTERM, SIGQUIT and SIGHUP")
}

/// Why serving ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// SIGINT, SIGTERM or SIGQUIT: a graceful stop.
    Signal,
    PacketWorkerStopped,
    HttpWorkerStopped,
}

impl Ending {
    fn failure(self) -> &'static str {
        match self {
            Ending::Signal => "a worker failed",
            Ending::PacketWorkerStopped => "a worker stopped unexpectedly",
            Ending::HttpWorkerStopped => "an HTTP worker stopped unexpectedly",
        }
    }
}

/// Serves until a stop signal or a dead worker. SIGHUP prints a status report and keeps serving
/// (the configuration is not reloaded: set-up happens once, before privileges are dropped).
fn supervise(paths: &Datapaths, state: &AppState, http: Option<&HttpServer>) -> Ending {
    let mut last_expiry = std::time::Instant::now();
    loop {
        if last_expiry.elapsed() >= Duration::from_secs(1) {
            paths.expire_tcp();
            last_expiry = std::time::Instant::now();
        }
        match sys::wait_for_signal(Duration::from_millis(200)) {
            Some(Signal::SIGHUP) => {
                let _ = report::print(&paths.status().render("status"));
            }
            Some(signal) => {
                tracing::info!("{signal} received, stopping");
                return Ending::Signal;
            }
            None => {}
        }
        let running = paths.running();
        let readiness = &state.readiness;
        readiness.workers_running.store(running, Ordering::Relaxed);
        if running < paths.started() {
            return Ending::PacketWorkerStopped;
        }
        // A dead HTTP thread takes the process down rather than leaving it alive and looking
        // healthy; a supervisor (systemd's Restart=on-failure) starts it again.
        if http.is_some_and(HttpServer::any_worker_finished) {
            return Ending::HttpWorkerStopped;
        }
    }
}
