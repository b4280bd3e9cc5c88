//! The second step of `serve`: the running datapaths, owned in one place. [`Datapaths::start`]
//! starts the kernel workers and then the bypass part; if anything fails half way, the guard's
//! `Drop` stops and joins what already runs. [`Datapaths::finish`] is the orderly end, with the
//! final report.

use std::mem;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};

use super::config::{BypassConfig, Config};
use super::report::Report;
use super::state::CounterState;
use crate::afxdp::{self, AfXdpDatapath, AfxdpPlan};
use crate::core::{Counter, LocalCounter};
use crate::kernel::{self, KernelWorker};
use crate::privilege::Lockdown;
use crate::spec::ListenSpec;
use crate::xdp::counter::MappedCounter;
use crate::xdp::{AttachedMode, ResponderTcp, XdpProgram};

/// The datapath beside the kernel path, if any.
pub enum Bypass {
    None,
    Afxdp(AfXdpDatapath),
    /// The responder program and the mode it attached in.
    Xdp(XdpProgram, AttachedMode),
}

/// Every packet worker and program of a running `serve`, and the counter they share.
pub struct Datapaths {
    pub counter: Arc<dyn Counter>,
    stop: Arc<AtomicBool>,
    pub kernel: Vec<KernelWorker>,
    /// The listeners as bound (port 0 resolved).
    pub bound: Vec<ListenSpec>,
    pub bypass: Bypass,
}

impl Datapaths {
    /// Starts the kernel workers, then the bypass datapath of the mode.
    /// Every worker drops its privileges (`lockdown`) once its own set-up is done.
    /// With a state directory the counter resumes from its recovered value: in the live file's
    /// mapping (kernel and afxdp modes) or in the responder's map, pinned (xdp mode).
    pub fn start(
        config: &Config,
        lockdown: &Lockdown,
        state: Option<&CounterState>,
    ) -> Result<Datapaths> {
        // In xdp mode the counter lives in the program's BPF_F_MMAPABLE map, shared by both paths.
        let responder = match &config.bypass {
            Some(bypass) if bypass.afxdp.is_none() => Some(load_responder(bypass)?),
            _ => None,
        };
        let live_file = state.and_then(|s| s.live_file.as_ref());
        let counter: Arc<dyn Counter> = match (&responder, live_file) {
            (Some(program), _) => Arc::new(program.counter()?),
            (None, Some(file)) => {
                Arc::new(MappedCounter::map(file).context("cannot map the live counter file")?)
            }
            (None, None) => Arc::new(LocalCounter::new(0)),
        };
        if let Some(state) = state {
            state.seed(counter.as_ref());
            if let (Some(program), Some(pin)) = (&responder, &state.pin) {
                program.pin_counter(pin)?;
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let (kernel, bound) = kernel::start(
            &config.listen,
            &config.placement.kernel_cpus,
            config.kernel,
            config.placement.kernel_scheduling,
            counter.clone(),
            stop.clone(),
            lockdown,
        )?;
        let mut paths = Datapaths {
            counter,
            stop,
            kernel,
            bound,
            bypass: Bypass::None,
        };
        // A failure from here on drops `paths`, which stops and joins the kernel workers.
        paths.bypass = paths.start_bypass(config, responder, lockdown)?;
        Ok(paths)
    }

    fn start_bypass(
        &self,
        config: &Config,
        responder: Option<XdpProgram>,
        lockdown: &Lockdown,
    ) -> Result<Bypass> {
        let Some(bypass) = &config.bypass else {
            return Ok(Bypass::None);
        };
        if let Some(afxdp) = &bypass.afxdp {
            let plan = AfxdpPlan {
                params: &afxdp.socket,
                listeners: &bypass.udp_listeners,
                tcp_listeners: &bypass.tcp_listeners,
                tcp: bypass.tcp,
                queues: &afxdp.queues,
                cpus: &config.cpus,
                xdp_mode: bypass.xdp_mode,
                force: bypass.force,
                lockdown,
            };
            let datapath = afxdp::start(&plan, self.counter.clone(), self.stop.clone())?;
            return Ok(Bypass::Afxdp(datapath));
        }
        let mut program =
            responder.expect("xdp mode loads the responder before the kernel workers");
        let attached = program.attach(&bypass.iface, bypass.xdp_mode, bypass.force)?;
        Ok(Bypass::Xdp(program, attached))
    }

    /// Forgets idle TCP-lite connections in the responder's table (xdp mode; the AF_XDP workers
    /// expire their own). Called about once a second.
    pub fn expire_tcp(&self) {
        if let Bypass::Xdp(program, _) = &self.bypass {
            if let Err(e) = program.expire_tcp() {
                tracing::warn!("{e:#}");
            }
        }
    }

    /// Packet workers (kernel and AF_XDP) still running.
    pub fn running(&self) -> usize {
        let kernel = self.kernel.iter().filter(|w| !w.handle.is_finished());
        kernel.count()
            + self
                .afxdp_workers()
                .filter(|w| !w.handle.is_finished())
                .count()
    }

    /// Packet workers started.
    pub fn started(&self) -> usize {
        self.kernel.len() + self.afxdp_workers().count()
    }

    pub fn afxdp_workers(&self) -> impl Iterator<Item = &afxdp::AfXdpWorker> {
        let workers = match &self.bypass {
            Bypass::Afxdp(dp) => dp.workers.as_slice(),
            _ => &[],
        };
        workers.iter()
    }

    /// The XDP program in use, if any.
    pub fn program(&self) -> Option<&XdpProgram> {
        match &self.bypass {
            Bypass::None => None,
            Bypass::Afxdp(dp) => Some(&dp.program),
            Bypass::Xdp(program, _) => Some(program),
        }
    }

    /// The SIGHUP report: the counter and every packet worker's totals so far. The records are read
    /// without locks; the packet path is not disturbed.
    pub fn status(&self) -> Report {
        let mut report = Report::new(self.counter.load());
        for (index, worker) in self.kernel.iter().enumerate() {
            report.kernel_worker(index, worker.cpu, &worker.stats.snapshot());
        }
        for worker in self.afxdp_workers() {
            report.afxdp_worker(worker.queue, worker.cpu, &worker.stats.snapshot(), None);
        }
        report
    }

    fn signal_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in &self.kernel {
            let _ = worker.wake.write(1);
        }
    }

    /// Stops every worker, joins them and reports their totals, the XDP program's own counts and the
    /// final counter; then detaches the program.
    pub fn finish(mut self) -> Report {
        self.signal_stop();
        let mut report = join_kernel_workers(mem::take(&mut self.kernel), Report::default());
        let program = match mem::replace(&mut self.bypass, Bypass::None) {
            Bypass::None => None,
            Bypass::Afxdp(dp) => {
                report = join_afxdp_workers(dp.workers, report);
                Some(dp.program)
            }
            Bypass::Xdp(program, _) => Some(program),
        };
        if let Some(program) = &program {
            report.xdp_program(program);
        }
        // Dropping the program closes its BPF link: the interface is left as it was, and nothing
        // adds to the counter any more. In xdp mode the counter is the program's map, which this
        // process's mapping of it keeps alive.
        drop(program);
        report.final_counter = self.counter.load();
        report
    }
}

impl Drop for Datapaths {
    /// A start-up that failed half way, or an early return: stop and join whatever still runs.
    fn drop(&mut self) {
        self.signal_stop();
        let _ = join_kernel_workers(mem::take(&mut self.kernel), Report::default());
        if let Bypass::Afxdp(dp) = mem::replace(&mut self.bypass, Bypass::None) {
            let _ = join_afxdp_workers(dp.workers, Report::default());
        }
    }
}

fn join_kernel_workers(workers: Vec<KernelWorker>, mut report: Report) -> Report {
    for (index, worker) in workers.into_iter().enumerate() {
        match worker.handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => report.errors.push(format!("{e:#}")),
            Err(_) => report.errors.push(format!("worker {index} panicked")),
        }
        report.kernel_worker(index, worker.cpu, &worker.stats.snapshot());
    }
    report
}

fn join_afxdp_workers(workers: Vec<afxdp::AfXdpWorker>, mut report: Report) -> Report {
    for worker in workers {
        let xsk = match worker.handle.join() {
            Ok(Ok(xsk)) => xsk.to_string(),
            Ok(Err(e)) => {
                report.errors.push(format!("queue {}: {e:#}", worker.queue));
                "xsk unavailable".to_string()
            }
            Err(_) => {
                let message = format!("queue {} worker panicked", worker.queue);
                report.errors.push(message);
                "xsk unavailable".to_string()
            }
        };
        let snapshot = worker.stats.snapshot();
        report.afxdp_worker(worker.queue, worker.cpu, &snapshot, Some(&xsk));
    }
    report
}

/// The responder of xdp mode with its UDP listeners and TCP-lite: its MSS fits the interface's MTU
/// with IPv6 and TCP headers, and its cookie secret is fresh.
fn load_responder(bypass: &BypassConfig) -> Result<XdpProgram> {
    let mtu = crate::iface::mtu(&bypass.iface)?;
    let tcp = ResponderTcp {
        listeners: bypass.tcp_listeners.clone(),
        max_conns: bypass.tcp.max_conns,
        idle_timeout_secs: bypass.tcp.idle_timeout_secs,
        max_mss: mtu.saturating_sub(60).clamp(1, u32::from(u16::MAX)) as u16,
        secret: crate::tcp_lite::cookie::random_secret()
            .context("cannot read a SYN-cookie secret from /dev/urandom")?,
    };
    XdpProgram::load_responder(&bypass.udp_listeners, &tcp)
}
