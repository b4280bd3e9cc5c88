//! The AF_XDP datapath: the XDP program steers frames for the UDP listeners, and segments for the TCP
//! listeners, into one AF_XDP socket per RX queue; a pinned worker per queue answers them in UMEM
//! with the shared core (TCP through its own TCP-lite connection table).

pub mod engine;
mod flusher;
pub mod frame;
mod ledger;
pub mod segment;
mod umem;
pub mod worker;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};

pub use worker::SocketParams;

use engine::FrameEngine;
use worker::WorkerContext;

use crate::core::{Counter, Protocol};
use crate::privilege::Lockdown;
use crate::spec::CpuId;
use crate::spec::XdpAttachMode;
use crate::stats::{WorkerStats, XskLive, XskStats};
use crate::sys;
use crate::tcp_lite::{Cookies, TcpLimits};
use crate::xdp::{AttachedMode, ProgramKind, XdpProgram};

/// A running AF_XDP worker.
pub struct AfXdpWorker {
    pub queue: u32,
    pub cpu: CpuId,
    pub stats: Arc<WorkerStats>,
    pub xsk: Arc<XskLive>,
    pub handle: JoinHandle<Result<XskStats>>,
}

/// The attached program and its workers. Dropping it detaches the program (its BPF link closes).
pub struct AfXdpDatapath {
    pub program: XdpProgram,
    pub workers: Vec<AfXdpWorker>,
    pub attached: AttachedMode,
    pub zero_copy: bool,
}

struct Fd(RawFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Pins the calling AF_XDP worker to its CPU and, with `--sched-fifo`, switches it to SCHED_FIFO.
fn place_thread(queue: u32, cpu: CpuId, fifo_priority: Option<i32>) -> Result<()> {
    sys::pin_current_thread(cpu)
        .with_context(|| format!("cannot pin the queue {queue} worker to CPU {cpu}"))?;
    if let Some(priority) = fifo_priority {
        sys::set_fifo_priority(priority).with_context(|| {
            format!("cannot switch the queue {queue} worker to SCHED_FIFO priority {priority} (needs root or CAP_SYS_NICE)")
        })?;
    }
    Ok(())
}

/// What the AF_XDP datapath serves: its sockets, the UDP and TCP listeners the program steers, the
/// queues (checked against the interface by the caller) and the CPUs, mapped queue by queue.
pub struct AfxdpPlan<'a> {
    pub params: &'a SocketParams,
    pub listeners: &'a [(SocketAddr, Protocol)],
    pub tcp_listeners: &'a [(SocketAddr, Protocol)],
    /// Each worker's TCP-lite table (`--tcp-max-conns`, `--tcp-idle-timeout`).
    pub tcp: TcpSettings,
    pub queues: &'a [u32],
    pub cpus: &'a [CpuId],
    pub xdp_mode: XdpAttachMode,
    /// Replace an XDP program someone else attached.
    pub force: bool,
    /// What each worker drops once its socket is open.
    pub lockdown: &'a Lockdown,
}

/// Loads and attaches the steering program, then starts one worker per queue. If a worker fails to
/// start, those already running are stopped (through `stop`) and joined before the error returns.
pub fn start(
    plan: &AfxdpPlan,
    counter: Arc<dyn Counter>,
    stop: Arc<AtomicBool>,
) -> Result<AfXdpDatapath> {
    let mut program = XdpProgram::load(ProgramKind::Steer, plan.listeners)?;
    program.add_tcp_listeners(plan.tcp_listeners)?;
    let attached = program.attach(&plan.params.iface, plan.xdp_mode, plan.force)?;
    let listeners = frame::Listeners::with_tcp(plan.listeners, plan.tcp_listeners);
    let cookies = Cookies::new(crate::tcp_lite::cookie::random_secret()?);
    let limits = plan.tcp.limits(plan.params.frame_size);
    let epoch = Instant::now();
    let mut starting = Starting {
        workers: Vec::with_capacity(plan.queues.len()),
        stop: stop.clone(),
    };
    let mut zero_copy = true;
    for (i, &queue) in plan.queues.iter().enumerate() {
        let context = WorkerContext {
            params: plan.params.clone(),
            queue,
            engine: FrameEngine::new(listeners.clone(), limits, cookies.for_worker(queue), epoch),
            stats: Arc::new(WorkerStats::default()),
            counter: counter.clone(),
            stop: stop.clone(),
            live: Arc::new(XskLive::default()),
            lockdown: plan.lockdown.clone(),
        };
        let (worker, started) = spawn_worker(context, plan.cpus[i % plan.cpus.len()])?;
        starting.workers.push(worker);
        zero_copy &= started.zero_copy;
        program.register_socket(queue, Fd(started.fd))?;
    }
    Ok(AfXdpDatapath {
        program,
        workers: std::mem::take(&mut starting.workers),
        attached,
        zero_copy,
    })
}

/// The TCP-lite limits: of each AF_XDP worker's connection table, or of the XDP program's (xdp mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TcpSettings {
    pub max_conns: u32,
    pub idle_timeout_secs: u32,
}

/// Headroom the kernel leaves before a received frame in copy mode (XDP_PACKET_HEADROOM).
const RX_HEADROOM: u32 = 256;
/// Ethernet with two VLAN tags, IPv6 and a TCP header with 40 bytes of options.
const MAX_TCP_HEADERS: u32 = 14 + 8 + 40 + 60;

impl TcpSettings {
    /// The limits for UMEM frames of `frame_size` bytes: the largest MSS offered leaves room in a
    /// frame for the headers of any segment that carries it.
    pub fn limits(&self, frame_size: u32) -> TcpLimits {
        let room = frame_size.saturating_sub(RX_HEADROOM + MAX_TCP_HEADERS);
        TcpLimits {
            max_conns: self.max_conns as usize,
            idle_timeout: self.idle_timeout_secs,
            max_mss: room.min(u32::from(u16::MAX)) as u16,
        }
    }
}

/// The workers of a start-up in progress: dropped before start-up finishes (an error), it stops
/// and joins them.
struct Starting {
    workers: Vec<AfXdpWorker>,
    stop: Arc<AtomicBool>,
}

impl Drop for Starting {
    fn drop(&mut self) {
        if self.workers.is_empty() {
            return;
        }
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers.drain(..) {
            let _ = worker.handle.join();
        }
    }
}

/// Starts one worker thread on `cpu` and waits until its socket is bound (or it failed).
fn spawn_worker(context: WorkerContext, cpu: CpuId) -> Result<(AfXdpWorker, worker::Started)> {
    let queue = context.queue;
    let (stats, xsk) = (context.stats.clone(), context.live.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = std::thread::Builder::new()
        .name(format!("afxdp-q{queue}"))
        .spawn(move || -> Result<XskStats> {
            if let Err(e) = place_thread(queue, cpu, context.params.fifo_priority) {
                // Start-up waits for this message: say why instead of dying silently.
                let message = format!("{e:#}");
                let _ = tx.send(Err(e));
                return Err(anyhow!(message));
            }
            worker::run(context, tx)
        })
        .context("cannot spawn an AF_XDP worker")?;
    let started = match rx.recv() {
        Ok(Ok(started)) => started,
        Ok(Err(e)) => return Err(e.context(format!("queue {queue}"))),
        Err(_) => bail!("the queue {queue} worker died during start-up"),
    };
    let worker = AfXdpWorker {
        queue,
        cpu,
        stats,
        xsk,
        handle,
    };
    Ok((worker, started))
}
