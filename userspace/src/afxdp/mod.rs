//! The AF_XDP datapath: the XDP program steers frames for the UDP listeners into one AF_XDP socket
//! per RX queue; a pinned worker per queue answers them in UMEM with the shared core.

pub mod frame;
mod umem;
pub mod worker;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{anyhow, bail, Context, Result};

pub use worker::SocketParams;

use crate::core::{Counter, Protocol};
use crate::iface;
use crate::spec::CpuId;
use crate::spec::XdpAttachMode;
use crate::stats::{WorkerStats, XskStats};
use crate::sys;
use crate::xdp::{AttachedMode, ProgramKind, XdpProgram};

/// A running AF_XDP worker.
pub struct AfXdpWorker {
    pub queue: u32,
    pub cpu: CpuId,
    pub stats: Arc<WorkerStats>,
    pub xsk: Arc<crate::stats::XskLive>,
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

/// Loads and attaches the steering program, then starts one worker per queue, mapped to `cpus`
/// queue by queue.
#[allow(clippy::too_many_arguments)]
pub fn start(
    params: &SocketParams,
    listeners: &[(SocketAddr, Protocol)],
    queues: &[u32],
    cpus: &[CpuId],
    xdp_mode: XdpAttachMode,
    force: bool,
    counter: Arc<dyn Counter>,
    stop: Arc<AtomicBool>,
) -> Result<AfXdpDatapath> {
    let iface = params.iface.as_str();
    let n_queues = iface::rx_queue_count(iface)?;
    for &q in queues {
        if q >= n_queues {
            bail!(
                "{iface} has {n_queues} RX queues (0-{}): queue {q} does not exist",
                n_queues.saturating_sub(1)
            );
        }
    }
    iface::check_listener_addresses(iface, listeners.iter().map(|(addr, _)| *addr))?;
    let mut program = XdpProgram::load(ProgramKind::Steer, listeners)?;
    let attached = program.attach(iface, xdp_mode, force)?;
    let table = Arc::new(frame::Listeners::new(listeners));

    let mut workers = Vec::new();
    let mut zero_copy = true;
    for (i, &queue) in queues.iter().enumerate() {
        let cpu = cpus[i % cpus.len()];
        let stats = Arc::new(WorkerStats::default());
        let xsk = Arc::new(crate::stats::XskLive::default());
        let live = xsk.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (params, table, stats2, counter, stop) = (
            params.clone(),
            table.clone(),
            stats.clone(),
            counter.clone(),
            stop.clone(),
        );
        let handle = std::thread::Builder::new()
            .name(format!("afxdp-q{queue}"))
            .spawn(move || -> Result<XskStats> {
                if let Err(e) = place_thread(queue, cpu, params.fifo_priority) {
                    // Start-up waits for this message: say why instead of dying silently.
                    let message = format!("{e:#}");
                    let _ = tx.send(Err(e));
                    return Err(anyhow!(message));
                }
                worker::run(params, queue, table, stats2, counter, stop, tx, live)
            })
            .context("cannot spawn an AF_XDP worker")?;
        let started = rx
            .recv()
            .map_err(|_| anyhow!("the queue {queue} worker died during start-up"))?
            .with_context(|| format!("queue {queue}"))?;
        zero_copy &= started.zero_copy;
        program.register_socket(queue, Fd(started.fd))?;
        workers.push(AfXdpWorker {
            queue,
            cpu,
            stats,
            xsk,
            handle,
        });
    }
    Ok(AfXdpDatapath {
        program,
        workers,
        attached,
        zero_copy,
    })
}
