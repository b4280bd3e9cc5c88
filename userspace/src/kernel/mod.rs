//! The kernel-socket datapath: UDP, TCP and Unix listeners served by pinned worker threads.
//!
//! It is the whole server in `--mode kernel` and the fallback path (loopback clients, TCP, Unix,
//! queues without an AF_XDP socket) in the bypass modes.

mod sockets;
mod worker;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result};
use nix::sys::eventfd::{EfdFlags, EventFd};

pub use sockets::{bind_all, BoundListeners};
pub use worker::WorkerConfig;

use crate::core::Counter;
use crate::spec::{CpuId, ListenSpec};
use crate::stats::WorkerStats;
use crate::sys;

/// A running kernel worker.
pub struct KernelWorker {
    pub cpu: CpuId,
    pub stats: Arc<WorkerStats>,
    pub wake: Arc<EventFd>,
    pub handle: JoinHandle<Result<()>>,
}

/// Scheduling options applied inside each worker thread.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Scheduling {
    pub fifo_priority: Option<i32>,
}

/// Binds every listener once per worker and starts one pinned worker per CPU.
/// Returns the workers and the addresses actually bound.
pub fn start(
    specs: &[ListenSpec],
    cpus: &[CpuId],
    config: WorkerConfig,
    scheduling: Scheduling,
    counter: Arc<dyn Counter>,
    stop: Arc<AtomicBool>,
) -> Result<(Vec<KernelWorker>, Vec<ListenSpec>)> {
    let BoundListeners { per_worker, bound } = bind_all(specs, cpus.len())?;
    let mut workers = Vec::with_capacity(cpus.len());
    for (index, (sockets, &cpu)) in per_worker.into_iter().zip(cpus).enumerate() {
        let stats = Arc::new(WorkerStats::default());
        let wake = Arc::new(EventFd::from_flags(
            EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK,
        )?);
        let worker = worker::Worker::new(
            sockets,
            stats.clone(),
            counter.clone(),
            config,
            stop.clone(),
            wake.clone(),
        );
        let handle = std::thread::Builder::new()
            .name(format!("kernel-{index}"))
            .spawn(move || -> Result<()> {
                sys::pin_current_thread(cpu).with_context(|| format!("cannot pin worker {index} to CPU {cpu}"))?;
                if let Some(priority) = scheduling.fifo_priority {
                    sys::set_fifo_priority(priority).with_context(|| {
                        format!("cannot switch worker {index} to SCHED_FIFO priority {priority} (needs root or CAP_SYS_NICE)")
                    })?;
                }
                worker.run().with_context(|| format!("worker {index} on CPU {cpu} failed"))
            })
            .context("cannot spawn a worker thread")?;
        workers.push(KernelWorker {
            cpu,
            stats,
            wake,
            handle,
        });
    }
    Ok((workers, bound))
}
