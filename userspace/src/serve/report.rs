//! What `serve` prints: the `ready` line once everything runs, the SIGHUP status and the final
//! report at exit. Each worker line renders the statistics record's own field list.

use std::fmt::Write as _;
use std::io::Write;

use super::config::Config;
use super::datapaths::{Bypass, Datapaths};
use crate::http::HttpServer;
use crate::spec::{CpuId, CpuList};
use crate::stats::StatsSnapshot;
use crate::xdp::maps::XdpStat;
use crate::xdp::XdpProgram;

/// Per-worker totals, their sum, the counter and anything that went wrong.
#[derive(Debug, Default)]
pub struct Report {
    pub final_counter: u64,
    pub lines: Vec<String>,
    pub total: StatsSnapshot,
    pub errors: Vec<String>,
}

impl Report {
    pub fn new(counter: u64) -> Report {
        Report {
            final_counter: counter,
            ..Report::default()
        }
    }

    pub fn kernel_worker(&mut self, index: usize, cpu: CpuId, stats: &StatsSnapshot) {
        self.total.merge(stats);
        self.lines.push(format!("worker {index} cpu={cpu} {stats}"));
    }

    /// One AF_XDP worker; `xsk` is its socket's XDP_STATISTICS when known.
    pub fn afxdp_worker(
        &mut self,
        queue: u32,
        cpu: CpuId,
        stats: &StatsSnapshot,
        xsk: Option<&str>,
    ) {
        self.total.merge(stats);
        let mut line = format!("afxdp queue={queue} cpu={cpu} {stats}");
        if let Some(xsk) = xsk {
            let _ = write!(line, " {xsk}");
        }
        self.lines.push(line);
    }

    /// The XDP program's own counters; what it answered or dropped itself counts in the totals.
    pub fn xdp_program(&mut self, program: &XdpProgram) {
        match (program.stats(), program.in_kernel_totals()) {
            (Ok(stats), Ok((replies, drops))) => {
                let fields: Vec<String> = XdpStat::ALL
                    .iter()
                    .map(|s| format!("{}={}", s.as_str(), stats[*s as usize]))
                    .collect();
                self.lines.push(format!("xdp {}", fields.join(" ")));
                self.total.add_in_kernel(replies, &drops);
                let (tcp, closed, rejected) = crate::xdp::in_kernel_tcp(&stats);
                self.total.add_in_kernel_tcp(&tcp, closed, rejected);
            }
            (Err(e), _) | (_, Err(e)) => self
                .errors
                .push(format!("cannot read the XDP program's statistics: {e:#}")),
        }
    }

    /// The lines, each prefixed: `status` on SIGHUP, nothing at exit (where the counter line reads
    /// `final counter=`).
    pub fn render(&self, prefix: &str) -> String {
        let mut text = match prefix {
            "" => format!("final counter={}\n", self.final_counter),
            _ => format!("{prefix} counter={}\n", self.final_counter),
        };
        let pad = if prefix.is_empty() { "" } else { " " };
        for line in &self.lines {
            let _ = writeln!(text, "{prefix}{pad}{line}");
        }
        let _ = writeln!(text, "{prefix}{pad}total {}", self.total);
        text
    }
}

/// Writes `text` to stdout at once, so lines of one report are never interleaved.
pub fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// The start-up lines: every bound listener, the HTTP address and one `ready` line.
pub fn ready_text(config: &Config, paths: &Datapaths, http: Option<&HttpServer>) -> String {
    let mut text = String::new();
    for spec in &paths.bound {
        let _ = writeln!(text, "listening {spec}");
    }
    if let Some(server) = http {
        let _ = writeln!(text, "http {}", server.bound);
    }
    let iface = config.bypass.as_ref().map_or("", |b| b.iface.as_str());
    let kernel_workers = paths.kernel.len();
    let _ = match &paths.bypass {
        Bypass::Afxdp(dp) => {
            let queues: Vec<String> = dp
                .workers
                .iter()
                .map(|w| format!("{}@cpu{}", w.queue, w.cpu))
                .collect();
            let poll = config.bypass.as_ref().and_then(|b| b.afxdp.as_ref()).map(|a| a.socket.poll);
            writeln!(
                text,
                "ready mode=afxdp iface={iface} xdp={} zero_copy={} queues={} poll={} kernel_workers={kernel_workers} kernel_cpus={} kernel_poll={}",
                dp.attached,
                if dp.zero_copy { "on" } else { "off" },
                queues.join(","),
                poll.map_or("", |p| p.as_str()),
                CpuList(config.placement.kernel_cpus.clone()),
                config.kernel.poll,
            )
        }
        Bypass::Xdp(_, attached) => writeln!(
            text,
            "ready mode=xdp iface={iface} xdp={attached} kernel_workers={kernel_workers} kernel_poll={}",
            config.kernel.poll
        ),
        Bypass::None => writeln!(
            text,
            "ready mode={} workers={kernel_workers} cpus={} poll={}",
            config.mode,
            CpuList(config.cpus.clone()),
            config.kernel.poll
        ),
    };
    text
}
