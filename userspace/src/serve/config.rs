//! The first step of `serve`: the command line, the hardware profile and what the machine says
//! (allowed CPUs, RX queues, interface addresses) resolved into one checked [`Config`]. Every later
//! step reads only this; `/stats` shows it as `config`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::args::{Mode, ServeArgs};
use super::settings::{Setting, Settings};
use crate::afxdp::{SocketParams, TcpSettings};
use crate::core::Protocol;
use crate::fleet::{FleetPlan, TargetUrl};
use crate::http::HttpListen;
use crate::iface;
use crate::kernel::{Scheduling, WorkerConfig};
use crate::spec::{
    format_duration, CpuId, CpuList, ListenSpec, PollMode, Transport, XdpAttachMode,
};
use crate::sys;

/// Everything `serve` needs, resolved and checked before anything starts.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub mode: Mode,
    /// The listeners as given (port 0 unresolved; `/stats` shows the bound ones).
    pub listen: Vec<ListenSpec>,
    /// The datapath's CPUs: `--cpus`, checked against this process's affinity.
    pub cpus: Vec<CpuId>,
    pub placement: Placement,
    /// The kernel workers' tuning.
    pub kernel: WorkerConfig,
    /// The XDP part of the afxdp and xdp modes.
    pub bypass: Option<BypassConfig>,
    pub http: Option<HttpPlan>,
    pub mlock: bool,
    pub profile: Option<PathBuf>,
    /// The user to switch to after set-up.
    pub user: Option<String>,
    /// `--state-dir`: where the counter is kept durable, and how often it is snapshotted.
    pub state: Option<StatePlan>,
    /// `--fleet`: where the per-second history is shipped.
    pub fleet: Option<FleetConfig>,
    /// This instance's name in /summary and the fleet.
    pub instance: String,
    /// Every setting with its value and where it came from (flag, environment, file, default).
    pub settings: Vec<Setting>,
}

/// The durable counter's directory and snapshot period.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StatePlan {
    pub dir: PathBuf,
    /// Where xdp mode pins the counter map.
    pub bpffs: PathBuf,
    #[serde(serialize_with = "as_text")]
    pub sync_interval: DurationText,
    /// How long the per-second history is kept.
    #[serde(serialize_with = "as_text")]
    pub history_retention: DurationText,
}

/// The fleet shipper's plan; `/stats` shows the targets without their passwords.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FleetConfig {
    #[serde(skip)]
    pub plan: FleetPlan,
    pub targets: Vec<String>,
}

/// The interface, the XDP program's attachment and, in afxdp mode, the sockets.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BypassConfig {
    pub iface: String,
    pub xdp_mode: XdpAttachMode,
    /// Replace an XDP program someone else attached.
    pub force: bool,
    /// The UDP listeners the XDP program matches.
    pub udp_listeners: Vec<(SocketAddr, Protocol)>,
    /// The TCP listeners answered by TCP-lite: in the AF_XDP workers (afxdp) or in the XDP
    /// program (xdp).
    pub tcp_listeners: Vec<(SocketAddr, Protocol)>,
    pub tcp: TcpSettings,
    pub afxdp: Option<AfxdpConfig>,
}

/// One AF_XDP socket and worker per queue.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AfxdpConfig {
    pub queues: Vec<u32>,
    /// Every queue's socket is made alike.
    pub socket: SocketParams,
}

/// The HTTP endpoints. The token is never serialised.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HttpPlan {
    #[serde(serialize_with = "as_text")]
    pub listen: HttpListen,
    #[serde(skip)]
    pub token: Option<String>,
    pub token_required: bool,
    pub rate_limit: u32,
    pub workers: usize,
    #[serde(serialize_with = "as_text")]
    pub header_timeout: DurationText,
    #[serde(serialize_with = "as_text")]
    pub idle_timeout: DurationText,
    pub max_pending: u64,
    /// The unix:// socket file's mode and group.
    pub socket_mode: u32,
    pub socket_group: Option<String>,
}

/// A duration shown the way flags take it (`10s`).
#[derive(Debug, Clone, Copy)]
pub struct DurationText(pub Duration);

impl std::fmt::Display for DurationText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::spec::format_duration(self.0))
    }
}

fn as_text<T: std::fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Config {
    /// Resolves the command line (with its profile) against this machine.
    pub fn resolve(settings: Settings) -> Result<Config> {
        let args = apply_profile(settings.args)?;
        if args.listen.is_empty() {
            bail!("no listener: give --listen SPEC, RICOCHET_LISTEN or 'listen = [...]' in the --config file");
        }
        let allowed = sys::allowed_cpus().context("cannot read this process's CPU affinity")?;
        let cpus = CpuList::resolve(args.cpus.as_ref(), &allowed).map_err(anyhow::Error::msg)?;
        let placement = Placement::plan(args.mode, &cpus, &allowed, args.sched_fifo);
        let http = resolve_http(&args, &cpus, &placement)?;
        let bypass = resolve_bypass(&args, placement.afxdp_fifo)?;
        let instance = resolve_instance(&args)?;
        let fleet = resolve_fleet(&args, &instance)?;
        Ok(Config {
            mode: args.mode,
            kernel: WorkerConfig {
                poll: if args.mode == Mode::Kernel {
                    args.poll.unwrap_or(PollMode::Block)
                } else {
                    // In the bypass modes the kernel path is the fallback: it sleeps until needed.
                    PollMode::Block
                },
                batch: usize::from(args.batch),
                max_datagram: usize::from(args.max_datagram),
            },
            listen: args.listen,
            cpus,
            placement,
            bypass,
            http,
            mlock: args.mlock,
            profile: args.profile,
            user: args.user,
            fleet,
            instance,
            state: args.state_dir.map(|dir| StatePlan {
                dir,
                bpffs: args.bpffs,
                sync_interval: DurationText(args.sync_interval),
                history_retention: DurationText(args.history_retention),
            }),
            settings: settings.table,
        })
    }
}

/// `--instance`, or the host name.
fn resolve_instance(args: &ServeArgs) -> Result<String> {
    let instance = match &args.instance {
        Some(name) => name.clone(),
        None => nix::unistd::gethostname()
            .context("cannot read the host name: give --instance NAME")?
            .to_string_lossy()
            .into_owned(),
    };
    if instance.is_empty() || instance.len() > 200 || instance.chars().any(char::is_control) {
        bail!("--instance '{instance}' must be 1 to 200 printable characters");
    }
    Ok(instance)
}

/// `--fleet` and its companions; None without a --fleet URL.
fn resolve_fleet(args: &ServeArgs, instance: &str) -> Result<Option<FleetConfig>> {
    if args.fleet.is_empty() {
        return Ok(None);
    }
    if args.state_dir.is_none() {
        bail!("--fleet needs --state-dir: records wait there while no database answers");
    }
    if args.fleet_rollup_retention < args.fleet_retention {
        bail!("--fleet-rollup-retention ({}) is shorter than --fleet-retention ({}): long summaries read the rollup, so keep it at least as long", format_duration(args.fleet_rollup_retention), format_duration(args.fleet_retention));
    }
    let targets = args
        .fleet
        .iter()
        .enumerate()
        .map(|(i, url)| {
            // The URL is not repeated: it may hold a password.
            TargetUrl::parse(url).map_err(|e| anyhow::anyhow!("--fleet #{}: {e}", i + 1))
        })
        .collect::<Result<Vec<_>>>()?;
    let plan = FleetPlan {
        targets,
        instance: instance.to_string(),
        interval: args.fleet_interval,
        retention: args.fleet_retention,
        rollup_retention: args.fleet_rollup_retention,
        stop_deadline: args.fleet_stop_deadline,
    };
    Ok(Some(FleetConfig {
        targets: plan.targets.iter().map(|t| t.label.clone()).collect(),
        plan,
    }))
}

/// `--http`, its token and the number of HTTP workers.
fn resolve_http(
    args: &ServeArgs,
    cpus: &[CpuId],
    placement: &Placement,
) -> Result<Option<HttpPlan>> {
    if args.http_token.as_deref().is_some_and(str::is_empty) {
        bail!("--http-token (or RICOCHET_HTTP_TOKEN) is empty: set a real secret, or leave it unset on a loopback --http");
    }
    if args.http == "off" {
        return Ok(None);
    }
    let listen: HttpListen = args.http.parse().map_err(anyhow::Error::msg)?;
    if !listen.is_local() && args.http_token.is_none() {
        bail!("--http {} is reachable from other hosts: set a bearer token with --http-token or RICOCHET_HTTP_TOKEN (or listen on 127.0.0.1)", args.http);
    }
    let default_workers = if placement.housekeeping.is_empty() {
        cpus.len()
    } else {
        placement.housekeeping.len()
    };
    Ok(Some(HttpPlan {
        token_required: args.http_token.is_some(),
        token: args.http_token.clone(),
        listen,
        rate_limit: args.http_rate_limit,
        workers: args.http_workers.map_or(default_workers, usize::from),
        header_timeout: DurationText(args.http_header_timeout),
        idle_timeout: DurationText(args.http_idle_timeout),
        max_pending: args.http_max_pending,
        socket_mode: args.http_socket_mode,
        socket_group: args.http_socket_group.clone(),
    }))
}

/// The interface and XDP settings of the bypass modes; None in kernel mode.
fn resolve_bypass(args: &ServeArgs, afxdp_fifo: Option<i32>) -> Result<Option<BypassConfig>> {
    let mode = args.mode;
    let iface = match (mode, &args.iface) {
        (Mode::Kernel, None) => return Ok(None),
        (Mode::Kernel, Some(_)) => bail!(
            "--iface applies to --mode afxdp and xdp only: drop it, or pick one of those modes"
        ),
        (_, None) => bail!("--mode {mode} needs --iface IF: the interface to serve"),
        (_, Some(iface)) => iface.clone(),
    };
    let udp_listeners = listeners_of(args, |t| match t {
        Transport::Udp(addr) => Some(*addr),
        _ => None,
    });
    // TCP-lite runs in the AF_XDP workers (afxdp) or in the XDP program (xdp).
    let tcp_listeners = listeners_of(args, |t| match t {
        Transport::Tcp(addr) => Some(*addr),
        _ => None,
    });
    if udp_listeners.is_empty() && tcp_listeners.is_empty() {
        bail!("--mode {mode} serves UDP and TCP listeners: add --listen udp://ADDR:PORT or tcp://ADDR:PORT");
    }
    let steered = || {
        udp_listeners
            .iter()
            .chain(&tcp_listeners)
            .map(|(addr, _)| *addr)
    };
    if steered().any(|addr| addr.port() == 0) {
        bail!("--mode {mode} needs fixed ports (the XDP program matches them): replace port 0");
    }
    // Fails with "no interface named" first when there is no such interface.
    let n_queues = iface::rx_queue_count(&iface)?;
    iface::check_listener_addresses(&iface, steered())?;
    let afxdp = match mode {
        Mode::Afxdp => Some(resolve_afxdp(args, &iface, n_queues, afxdp_fifo)?),
        _ => None,
    };
    let tcp = TcpSettings {
        max_conns: args.tcp_max_conns,
        idle_timeout_secs: args.tcp_idle_timeout.as_secs() as u32,
    };
    Ok(Some(BypassConfig {
        iface,
        xdp_mode: args.xdp_mode.unwrap_or_default(),
        force: args.force,
        udp_listeners,
        tcp_listeners,
        tcp,
        afxdp,
    }))
}

/// The AF_XDP queues and socket sizes; `--queues` is checked against the interface's `n_queues`.
/// The workers run under SCHED_FIFO at `fifo_priority` when asked (see [`Placement`]).
fn resolve_afxdp(
    args: &ServeArgs,
    iface: &str,
    n_queues: u32,
    fifo_priority: Option<i32>,
) -> Result<AfxdpConfig> {
    let queues: Vec<u32> = match &args.queues {
        Some(list) => list.0.iter().map(|q| q.0 as u32).collect(),
        None => (0..n_queues).collect(),
    };
    if let Some(q) = queues.iter().find(|&&q| q >= n_queues) {
        bail!(
            "{iface} has {n_queues} RX queues (0-{}): queue {q} does not exist",
            n_queues.saturating_sub(1)
        );
    }
    let socket = SocketParams {
        iface: iface.to_string(),
        // AF_XDP workers spin unless told otherwise: that is what the mode is for.
        poll: args.poll.unwrap_or(PollMode::Spin),
        frame_size: args.frame_size.unwrap_or(2048),
        frame_count: args.frame_count.unwrap_or(4096),
        ring_size: args.ring_size.unwrap_or(1024),
        zero_copy: args.zero_copy.unwrap_or_default(),
        huge_pages: args.huge_pages,
        busy_poll_usecs: args.busy_poll,
        busy_poll_budget: args.busy_poll_budget,
        batch: u32::from(args.batch),
        fifo_priority,
    };
    Ok(AfxdpConfig { queues, socket })
}

/// The listeners of one transport, with their protocols.
fn listeners_of(
    args: &ServeArgs,
    pick: impl Fn(&Transport) -> Option<SocketAddr>,
) -> Vec<(SocketAddr, Protocol)> {
    args.listen
        .iter()
        .filter_map(|spec| Some((pick(&spec.transport)?, spec.protocol)))
        .collect()
}

/// Where each kind of worker runs and which ones run under SCHED_FIFO.
///
/// `--cpus` names the datapath's CPUs. In afxdp mode the AF_XDP workers spin there, so the kernel
/// fallback workers go to the housekeeping CPUs (those the process may use that are not in `--cpus`)
/// when there are any: a fallback worker never competes with a spinning worker for its core.
/// `--sched-fifo` applies to the datapath workers: the kernel workers in kernel and xdp mode (in xdp
/// mode they are the only packet workers in userspace), the AF_XDP workers in afxdp mode, never the
/// fallback, which could otherwise preempt an AF_XDP worker on its core.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Placement {
    pub kernel_cpus: Vec<CpuId>,
    pub kernel_scheduling: Scheduling,
    pub afxdp_fifo: Option<i32>,
    /// Allowed CPUs not in `--cpus`: the HTTP threads (and the afxdp fallback) run there.
    pub housekeeping: Vec<CpuId>,
}

impl Placement {
    pub fn plan(mode: Mode, cpus: &[CpuId], allowed: &[CpuId], fifo: Option<i32>) -> Placement {
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
        let queues = p.queue_ids().into_iter().map(|q| CpuId(q as usize));
        args.queues = Some(CpuList(queues.collect()));
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
