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
use crate::privilege::Lockdown;
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

/// Binds every listener once per worker and starts one pinned worker per CPU; returns once every
/// worker is placed and has dropped its privileges (or stops them all on the first failure).
/// Returns the workers and the addresses actually bound.
pub fn start(
    specs: &[ListenSpec],
    cpus: &[CpuId],
    config: WorkerConfig,
    scheduling: Scheduling,
    counter: Arc<dyn Counter>,
    stop: Arc<AtomicBool>,
    lockdown: &Lockdown,
) -> Result<(Vec<KernelWorker>, Vec<ListenSpec>)> {
    let BoundListeners { per_worker, bound } = bind_all(specs, cpus.len())?;
    let mut workers = Starting(Vec::with_capacity(cpus.len()), stop.clone());
    let (ready, placed) = std::sync::mpsc::channel();
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
        let (ready, lockdown) = (ready.clone(), lockdown.clone());
        let handle = std::thread::Builder::new()
            .name(format!("kernel-{index}"))
            .spawn(move || -> Result<()> {
                let set_up = place(index, cpu, scheduling).and_then(|()| lockdown.enter());
                let failed = set_up.as_ref().err().map(|e| format!("{e:#}"));
                let _ = ready.send(set_up);
                // A worker that dies before this line drops its sender too: start-up never waits
                // for a message that cannot come.
                drop(ready);
                match failed {
                    Some(e) => Err(anyhow::anyhow!(e)),
                    None => worker
                        .run()
                        .with_context(|| format!("worker {index} on CPU {cpu} failed")),
                }
            })
            .context("cannot spawn a worker thread")?;
        workers.0.push(KernelWorker {
            cpu,
            stats,
            wake,
            handle,
        });
    }
    drop(ready);
    for _ in 0..workers.0.len() {
        placed
            .recv()
            .context("a kernel worker died during start-up")??;
    }
    Ok((std::mem::take(&mut workers.0), bound))
}

/// Pins a worker and, with `--sched-fifo`, switches it to SCHED_FIFO.
fn place(index: usize, cpu: CpuId, scheduling: Scheduling) -> Result<()> {
    sys::pin_current_thread(cpu)
        .with_context(|| format!("cannot pin worker {index} to CPU {cpu}"))?;
    if let Some(priority) = scheduling.fifo_priority {
        sys::set_fifo_priority(priority).with_context(|| {
            format!("cannot switch worker {index} to SCHED_FIFO priority {priority} (needs root or CAP_SYS_NICE)")
        })?;
    }
    Ok(())
}

/// Workers of a start-up in progress; dropped before it finishes (an error), it stops and joins them.
struct Starting(Vec<KernelWorker>, Arc<AtomicBool>);

impl Drop for Starting {
    fn drop(&mut self) {
        if self.0.is_empty() {
            return;
        }
        self.1.store(true, std::sync::atomic::Ordering::Relaxed);
        for worker in self.0.drain(..) {
            let _ = worker.wake.write(1);
            let _ = worker.handle.join();
        }
    }
}
