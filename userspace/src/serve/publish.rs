//! The third step of `serve`: what the endpoints see (the workers' statistics records, the XDP
//! program's counters, readiness, the resolved configuration and what actually started) and the
//! HTTP server that shows it. The endpoints read records; they never reach into a datapath.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::config::{Config, HttpPlan};
use super::datapaths::{Bypass, Datapaths};
use super::state::StateView;
use crate::fleet::FleetStatus;
use crate::http::{
    Access, AppState, HistoryView, HttpBound, HttpConfig, HttpListen, HttpServer, WorkerView,
};
use crate::privilege::Dropped;
use crate::spec::{PollMode, XdpAttachMode, ZeroCopy};
use crate::xdp::AttachedMode;

/// What the datapaths started as, where that can differ from what was asked for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StartedAs {
    pub kernel_poll: PollMode,
    pub afxdp_poll: Option<PollMode>,
    pub xdp_mode: Option<AttachedMode>,
    pub zero_copy: Option<bool>,
    pub fallbacks: Vec<Fallback>,
    /// What the process kept after set-up.
    pub privileges: Dropped,
    /// The state directory and what the counter resumed from (`--state-dir`).
    pub counter_state: Option<StateView>,
}

/// A degraded mode the kernel or the driver chose for us (probe, then degrade visibly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Native XDP was refused; the program runs in the generic receive path.
    XdpGeneric,
    /// Zero-copy was refused; the AF_XDP sockets copy.
    CopyMode,
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Fallback::XdpGeneric => "xdp native -> generic mode",
            Fallback::CopyMode => "zero-copy -> copy mode",
        })
    }
}

impl serde::Serialize for Fallback {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl StartedAs {
    pub fn of(
        config: &Config,
        paths: &Datapaths,
        privileges: &Dropped,
        counter_state: Option<StateView>,
    ) -> StartedAs {
        let asked = config.bypass.as_ref();
        let xdp_asked = asked.map_or(XdpAttachMode::Auto, |b| b.xdp_mode);
        let zero_copy_asked = asked
            .and_then(|b| b.afxdp.as_ref())
            .map_or(ZeroCopy::Auto, |a| a.socket.zero_copy);
        let (xdp_mode, zero_copy) = match &paths.bypass {
            Bypass::None => (None, None),
            Bypass::Afxdp(dp) => (Some(dp.attached), Some(dp.zero_copy)),
            Bypass::Xdp(_, attached) => (Some(*attached), None),
        };
        let mut fallbacks = Vec::new();
        if xdp_mode == Some(AttachedMode::Generic) && xdp_asked != XdpAttachMode::Generic {
            fallbacks.push(Fallback::XdpGeneric);
        }
        if zero_copy == Some(false) && zero_copy_asked == ZeroCopy::Auto {
            fallbacks.push(Fallback::CopyMode);
        }
        StartedAs {
            kernel_poll: config.kernel.poll,
            afxdp_poll: asked.and_then(|b| b.afxdp.as_ref()).map(|a| a.socket.poll),
            xdp_mode,
            zero_copy,
            fallbacks,
            privileges: privileges.clone(),
            counter_state,
        }
    }
}

/// The endpoints' view of the running datapaths.
pub fn app_state(
    config: &Config,
    paths: &Datapaths,
    privileges: &Dropped,
    counter_state: Option<StateView>,
    history: Option<HistoryView>,
    fleet: Option<Arc<FleetStatus>>,
) -> Arc<AppState> {
    let mut config_json = serde_json::to_value(config).expect("the configuration serialises");
    config_json["listen"] = serde_json::to_value(&paths.bound).expect("listen specs serialise");
    let mut state = AppState::new(config.mode.as_str(), config_json, paths.counter.clone());
    state.started_as =
        serde_json::to_value(StartedAs::of(config, paths, privileges, counter_state))
            .expect("the start-up facts serialise");
    state.workers = worker_views(paths);
    state.xdp_stats = paths.program().map(|p| Box::new(p.stats_reader()) as _);
    state.history = history;
    state.fleet = fleet;
    let readiness = &state.readiness;
    readiness
        .workers_expected
        .store(paths.started(), Ordering::Relaxed);
    readiness
        .workers_running
        .store(paths.running(), Ordering::Relaxed);
    let has_program = paths.program().is_some();
    readiness.xdp_expected.store(has_program, Ordering::Relaxed);
    readiness.xdp_attached.store(has_program, Ordering::Relaxed);
    if let Some(plan) = &config.http {
        state.http_conns.pending.set_limit(plan.max_pending);
    }
    Arc::new(state)
}

fn worker_views(paths: &Datapaths) -> Vec<WorkerView> {
    let kernel = paths.kernel.iter().enumerate().map(|(i, w)| WorkerView {
        datapath: "kernel",
        id: i as u32,
        cpu: w.cpu,
        stats: w.stats.clone(),
        xsk: None,
    });
    let afxdp = paths.afxdp_workers().map(|w| WorkerView {
        datapath: "afxdp",
        id: w.queue,
        cpu: w.cpu,
        stats: w.stats.clone(),
        xsk: Some(w.xsk.clone()),
    });
    kernel.chain(afxdp).collect()
}

/// Binds the HTTP endpoints (their workers, started later, run on the housekeeping CPUs).
pub fn bind_http(config: &Config, plan: &HttpPlan) -> Result<HttpBound> {
    let http = HttpConfig {
        access: Access {
            token: plan.token.clone(),
        },
        listen: plan.listen.clone(),
        rate_limit: plan.rate_limit,
        workers: plan.workers,
        cpus: config.placement.housekeeping.clone(),
        header_timeout: plan.header_timeout.0,
        idle_timeout: plan.idle_timeout.0,
    };
    HttpServer::bind(http)
}

/// Sets the `--http unix://` socket file's mode and group (`--http-socket-mode`, `--http-socket-group`).
pub fn secure_http_socket(plan: &HttpPlan, bound: &HttpListen) -> Result<()> {
    let HttpListen::Unix(path) = bound else {
        return Ok(());
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(plan.socket_mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    if let Some(name) = &plan.socket_group {
        let group = nix::unistd::Group::from_name(name)
            .with_context(|| format!("cannot look up group '{name}'"))?
            .with_context(|| format!("--http-socket-group: no group named '{name}'"))?;
        std::os::unix::fs::lchown(path, None, Some(group.gid.as_raw()))
            .with_context(|| format!("cannot give {} to group {name}", path.display()))?;
    }
    Ok(())
}
