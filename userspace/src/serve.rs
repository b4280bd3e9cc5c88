//! `ricochet serve`: checks the configuration, starts the datapath, waits for SIGINT/SIGTERM, prints
//! the final counter and per-worker totals.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::core::{Counter, LocalCounter};
use crate::kernel::{self, PollMode, Scheduling, WorkerConfig};
use crate::spec::{CpuId, CpuList, ListenSpec};
use crate::stats::StatsSnapshot;
use crate::sys;

/// Which datapath answers requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Ordinary sockets (UDP, TCP, Unix) served by pinned worker threads.
    Kernel,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Datapath that answers requests.
    #[arg(long, value_enum, default_value = "kernel")]
    pub mode: Mode,

    /// Where to listen: [PROTO+]TRANSPORT://ADDR with PROTO counter (default), echo or sockperf and
    /// TRANSPORT udp, tcp or unix; repeat for more listeners. Port 0 picks a free port (the start-up
    /// lines print it). Examples: udp://0.0.0.0:7777, tcp://0.0.0.0:7777, unix:///run/ricochet.sock,
    /// sockperf+udp://0.0.0.0:11111.
    #[arg(long = "listen", value_name = "SPEC", required = true)]
    pub listen: Vec<ListenSpec>,

    /// CPUs to run one pinned worker each on, in the kernel's list format (0-3,6). Default: every CPU
    /// this process may use.
    #[arg(long, value_name = "LIST")]
    pub cpus: Option<CpuList>,

    /// How workers wait: spin busy-polls non-blocking sockets (lowest latency, a full core per
    /// worker), block sleeps in epoll (efficient). Default: block in kernel mode.
    #[arg(long, value_enum)]
    pub poll: Option<PollMode>,

    /// Run workers under SCHED_FIFO at this priority (1-99); needs root or CAP_SYS_NICE.
    #[arg(long, value_name = "PRIO", value_parser = clap::value_parser!(i32).range(1..=99))]
    pub sched_fifo: Option<i32>,

    /// Lock all memory (mlockall) so the datapath never takes a page fault from swap.
    #[arg(long)]
    pub mlock: bool,

    /// Datagrams received and answered per batch (recvmmsg/sendmmsg and one counter add).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub batch: u16,

    /// Largest datagram accepted, in bytes; longer ones are dropped and counted as oversize.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u16).range(64..))]
    pub max_datagram: u16,
}

/// Resolves `--cpus` against the CPUs this process may use.
pub fn resolve_cpus(requested: Option<&CpuList>) -> Result<Vec<CpuId>> {
    let allowed = sys::allowed_cpus().context("cannot read this process's CPU affinity")?;
    let Some(requested) = requested else {
        return Ok(allowed);
    };
    let allowed_list = CpuList(allowed.clone()).to_string();
    for cpu in &requested.0 {
        if !allowed.contains(cpu) {
            bail!("CPU {cpu} is not allowed for this process (allowed: {allowed_list}): pick --cpus from those");
        }
    }
    Ok(requested.0.clone())
}

pub fn run(args: ServeArgs) -> Result<()> {
    let cpus = resolve_cpus(args.cpus.as_ref())?;
    if args.mlock {
        sys::lock_all_memory().context(
            "--mlock failed: mlockall needs root, CAP_IPC_LOCK or a large enough 'ulimit -l'",
        )?;
    }
    // Raise the descriptor limit for many stream connections; keep going if the hard limit is low.
    let _ = sys::raise_fd_limit();
    sys::block_stop_signals().context("cannot block SIGINT/SIGTERM")?;

    let poll = args.poll.unwrap_or(PollMode::Block);
    let config = WorkerConfig {
        poll,
        batch: args.batch as usize,
        max_datagram: args.max_datagram as usize,
    };
    let counter: Arc<dyn Counter> = Arc::new(LocalCounter::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let scheduling = Scheduling {
        fifo_priority: args.sched_fifo,
    };
    let (workers, bound) = kernel::start(
        &args.listen,
        &cpus,
        config,
        scheduling,
        counter.clone(),
        stop.clone(),
    )?;

    let mut out = std::io::stdout().lock();
    for spec in &bound {
        writeln!(out, "listening {spec}")?;
    }
    writeln!(
        out,
        "ready mode=kernel workers={} cpus={} poll={}",
        workers.len(),
        CpuList(cpus.clone()),
        match poll {
            PollMode::Spin => "spin",
            PollMode::Block => "block",
        }
    )?;
    out.flush()?;
    drop(out);

    let mut failure = None;
    loop {
        if let Some(signal) = sys::wait_for_stop_signal(Duration::from_millis(200)) {
            tracing::info!("signal {signal} received, stopping");
            break;
        }
        if workers.iter().any(|w| w.handle.is_finished()) {
            failure = Some("a worker stopped unexpectedly");
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for worker in &workers {
        let _ = worker.wake.write(1);
    }

    let mut errors = Vec::new();
    let mut total = StatsSnapshot::default();
    let mut lines = Vec::new();
    for (index, worker) in workers.into_iter().enumerate() {
        match worker.handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => errors.push(format!("{e:#}")),
            Err(_) => errors.push(format!("worker {index} panicked")),
        }
        let snapshot = worker.stats.snapshot();
        total.merge(&snapshot);
        lines.push(format!("worker {index} cpu={} {snapshot}", worker.cpu));
    }
    let mut out = std::io::stdout().lock();
    writeln!(out, "final counter={}", counter.load())?;
    for line in lines {
        writeln!(out, "{line}")?;
    }
    writeln!(out, "total {total}")?;
    out.flush()?;
    if !errors.is_empty() || failure.is_some() {
        bail!(
            "{}: {}",
            failure.unwrap_or("a worker failed"),
            errors.join("; ")
        );
    }
    Ok(())
}
