//! `ricochet bench`: a load generator with latency histograms that verifies every reply.
//!
//! Closed loop (default): each connection keeps `--depth` requests in flight. Open loop (`--rate`):
//! requests are scheduled at a constant rate and each latency is measured from the request's intended
//! send time, so a stalled server shows up in the percentiles instead of slowing the client down
//! (no coordinated omission, as in wrk2).
//!
//! A request unanswered within `--timeout` is lost (datagrams) or unanswered (streams: the server
//! may still have applied it); a reply that comes after its request timed out is late: counted,
//! never timed. `Pending` holds the matching policy and its one inexact case (counter replies,
//! which carry no request id, over UDP at depth > 1).
//!
//! The parts, in the order a run uses them: `args` (flags) -> `plan` (what the run is asked to
//! do) -> `conn` (opening the sockets) -> `client` (one thread's loop) over `flow`s (one
//! connection each), with `pending` and `recorder` matching, verifying and counting replies
//! without I/O -> `report` (summary, verdict, percentiles, hgrm). This file starts the threads and
//! merges their results.

mod args;
mod client;
mod conn;
mod flow;
mod pending;
mod plan;
mod recorder;
mod report;

use std::fs::File;
use std::io::{self, IsTerminal};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

use crate::spec::{CpuId, CpuList};
use crate::sys;

pub use args::BenchArgs;
use client::run_thread;
use conn::{hold_idle, open_connections, Conn};
use plan::Plan;
use recorder::ThreadResult;
use report::print_text;
pub use report::{new_histogram, write_hgrm, BenchReport, LatencySummary, ReportConfig};

/// Runs `ricochet bench`: opens the connections, runs the client threads, prints the report (text
/// or JSON) and returns the verdict (Err when the run must not be trusted).
pub fn run(args: BenchArgs) -> Result<()> {
    let _ = sys::raise_fd_limit();
    let cpus: Vec<Option<CpuId>> = match &args.cpus {
        Some(list) => CpuList::resolve(Some(list), &sys::allowed_cpus()?)
            .map_err(anyhow::Error::msg)?
            .into_iter()
            .map(Some)
            .collect(),
        None => vec![None],
    };
    let conns = open_connections(&args).context("cannot connect")?;
    if let Some(hold) = args.hold {
        return hold_idle(conns, hold, args.json);
    }
    let threads = cpus.len().min(conns.len()).max(1);
    let plan = Plan::new(&args, conns.len())?;
    let bar = progress_bar(&args, plan.send_for);
    let start = Instant::now() + Duration::from_millis(20);
    let (total, hist) = run_clients(&plan, conns, cpus, start, &bar)?;
    let measured = plan
        .send_for
        .map(|d| d - args.warmup)
        .unwrap_or_else(|| start.elapsed().saturating_sub(args.warmup));
    let report = BenchReport::new(&args, &plan, threads, total, &hist, measured);
    if let Some(path) = &args.hgrm {
        let mut file =
            File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
        write_hgrm(&hist, &mut file)?;
    }
    // The report comes first, whatever the verdict: scripts parse it.
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&report);
    }
    report.verdict()
}

/// Runs one client thread per CPU (connections spread over them) and merges their results.
fn run_clients(
    plan: &Plan,
    conns: Vec<Conn>,
    cpus: Vec<Option<CpuId>>,
    start: Instant,
    bar: &indicatif::ProgressBar,
) -> Result<(ThreadResult, Histogram<u64>)> {
    let threads = cpus.len().min(conns.len()).max(1);
    let mut buckets: Vec<Vec<(usize, Conn)>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, conn) in conns.into_iter().enumerate() {
        buckets[i % threads].push((i, conn));
    }
    let progress = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for (bucket, cpu) in buckets.into_iter().zip(cpus) {
        let plan = plan.clone();
        let progress = progress.clone();
        handles.push(std::thread::spawn(
            move || -> Result<(ThreadResult, Histogram<u64>)> {
                if let Some(cpu) = cpu {
                    sys::pin_current_thread(cpu)
                        .with_context(|| format!("cannot pin client thread to CPU {cpu}"))?;
                }
                run_thread(&plan, bucket, start, &progress)
            },
        ));
    }
    while handles.iter().any(|h| !h.is_finished()) {
        std::thread::sleep(Duration::from_millis(100));
        bar.set_position(progress.load(Ordering::Relaxed));
    }
    bar.finish_and_clear();
    let mut hist = new_histogram();
    let mut total = ThreadResult::default();
    for handle in handles {
        let (result, thread_hist) = handle
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        hist.add(&thread_hist)
            .map_err(|e| anyhow::anyhow!("cannot merge latency histograms: {e:?}"))?;
        total.add(result);
    }
    Ok((total, hist))
}

/// A progress bar on a terminal (replies so far), hidden for JSON output or when stderr is not a
/// terminal.
fn progress_bar(args: &BenchArgs, send_for: Option<Duration>) -> indicatif::ProgressBar {
    if args.json || !io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match args.requests {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let secs = send_for.map(|d| d.as_secs()).unwrap_or(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {{elapsed}}/{secs}s {{pos}} replies {{per_sec}}"
        ))
        .expect("valid template"),
    );
    bar
}
