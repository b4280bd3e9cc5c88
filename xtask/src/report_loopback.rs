//! `cargo xtask report loopback DIR`: turns the runs bench/loopback.sh recorded (DIR/runs/index.jsonl
//! and the files it names) into DIR/loopback.md and prints it. Latency ratios compare ricochet with
//! sockperf's own server measured in the same run, same poll mode and same client: below 1.00 means
//! ricochet answered faster. sockperf's output is parsed by [`report::sockperf_run`], the one parser.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::report::{self, median_run, Run};

/// One recorded run: its index entry and what its file says.
struct Recorded {
    meta: Value,
    run: Run,
}

impl Recorded {
    fn field(&self, key: &str) -> &str {
        self.meta[key].as_str().unwrap_or_default()
    }

    fn number(&self, key: &str) -> u64 {
        self.field(key).parse().unwrap_or(0)
    }
}

/// The latency and throughput runs, and the idle-connection measurement if there is one.
fn load(runs: &Path) -> Result<(Vec<Recorded>, Option<Value>)> {
    let index = runs.join("index.jsonl");
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let (mut recorded, mut idle) = (Vec::new(), None);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let meta: Value = serde_json::from_str(line).context("a bad line in index.jsonl")?;
        let path = runs.join(meta["file"].as_str().unwrap_or_default());
        if meta["kind"] == "idle" {
            idle = Some(serde_json::from_slice(&std::fs::read(&path)?)?);
            continue;
        }
        let run = if meta["client"] == "sockperf" {
            report::sockperf_run(&std::fs::read_to_string(&path)?)
        } else {
            report::bench_run(&path)
        }
        .with_context(|| format!("cannot read {}", path.display()))?;
        recorded.push(Recorded { meta, run });
    }
    Ok((recorded, idle))
}

fn fmt(x: f64) -> String {
    if x < 1000.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.0}")
    }
}

/// Median over rounds of each statistic, per (server, poll, client), with ratios to sockperf's server.
fn latency_table(recorded: &[Recorded]) -> String {
    let mut groups: BTreeMap<(String, String, String), Vec<Run>> = BTreeMap::new();
    for r in recorded.iter().filter(|r| r.field("kind") == "latency") {
        let key = (r.field("server"), r.field("poll"), r.field("client"));
        let key = (key.0.to_string(), key.1.to_string(), key.2.to_string());
        groups.entry(key).or_default().push(r.run.clone());
    }
    let mut keys: Vec<_> = groups.keys().cloned().collect();
    keys.sort_by_key(|(server, poll, client)| (poll.clone(), client.clone(), server != "sockperf"));
    let mut out = String::from(
        "| server | poll | client | rounds | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | replies/s | lost | p50 ratio | p99 ratio |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for key in keys {
        let (server, poll, client) = &key;
        let m = median_run(&groups[&key]);
        let base = groups
            .get(&("sockperf".to_string(), poll.clone(), client.clone()))
            .map(|runs| median_run(runs));
        let ratio = |f: fn(&Run) -> f64| match &base {
            Some(b) if f(b) > 0.0 => format!("{:.2}", f(&m) / f(b)),
            _ => "–".to_string(),
        };
        let name = if server == "sockperf" {
            "sockperf server"
        } else {
            "ricochet"
        };
        let _ = writeln!(
            out,
            "| {name} | {poll} | {client} | {} | {} | {} | {} | {} | {} | {:.0} | {} | {} | {} |",
            groups[&key].len(),
            fmt(m.p50),
            fmt(m.p90),
            fmt(m.p99),
            fmt(m.p99_9),
            fmt(m.max),
            m.rps,
            m.lost,
            ratio(|r| r.p50),
            ratio(|r| r.p99),
        );
    }
    out
}

fn throughput_table(recorded: &[Recorded]) -> String {
    let mut runs: Vec<&Recorded> = recorded
        .iter()
        .filter(|r| r.field("kind") == "throughput")
        .collect();
    runs.sort_by_key(|r| {
        let key = (r.field("poll"), r.field("transport"));
        (
            key.0.to_string(),
            key.1.to_string(),
            r.number("connections"),
            r.number("depth"),
        )
    });
    let mut out = String::from(
        "| poll | transport | connections | depth | replies/s | p50 µs | p99 µs | p99.9 µs | lost | invalid |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in runs {
        let m = &r.run;
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} |",
            r.field("poll"),
            r.field("transport"),
            r.field("connections"),
            r.field("depth"),
            m.rps,
            fmt(m.p50),
            fmt(m.p99),
            fmt(m.p99_9),
            m.lost,
            m.invalid,
        );
    }
    out
}

fn idle_section(idle: Option<&Value>) -> String {
    let Some(i) = idle else {
        return "(not measured)".to_string();
    };
    let get = |k: &str| i[k].as_f64().unwrap_or(0.0);
    let n = get("connections").max(1.0);
    let rss = (get("server_rss_kib_after") - get("server_rss_kib_before")) * 1024.0 / n;
    let slab = (get("slab_kib_after") - get("slab_kib_before")) * 1024.0 / n;
    let mut out = format!(
        "| idle TCP connections | server RSS per connection | kernel slab per connection (both ends) |\n\
         |---|---|---|\n| {} | {rss:.0} B | {slab:.0} B |",
        get("connections")
    );
    if let Some(note) = i["note"].as_str().filter(|n| !n.is_empty()) {
        let _ = write!(out, "\n\n{note}.");
    }
    out
}

/// The report's text.
fn render(recorded: &[Recorded], idle: Option<&Value>, machine: &str, commands: &str) -> String {
    format!(
        "# ricochet kernel datapath on loopback vs sockperf's server\n\n\
         Machine: {machine}. Server pinned to the last CPU, client to CPU 0.\n\n\
         ## Ping-pong round trip (sockperf protocol, UDP, one request in flight)\n\n\
         Each figure is the median over alternating rounds; ratios are ricochet / sockperf's own server in the \
         same poll mode with the same client (below 1 is better). sockperf runs with --full-rtt, so every figure \
         is a round trip.\n\n{}\n## Counter throughput (bench client, one server worker)\n\n{}\n\
         ## Memory of idle connections\n\n{}\n\n## Commands\n\n```\n{}\n```\n",
        latency_table(recorded),
        throughput_table(recorded),
        idle_section(idle),
        commands.trim_end()
    )
}

/// Writes DIR/loopback.md from DIR/runs and prints it.
pub fn run(dir: &Path) -> Result<()> {
    let (recorded, idle) = load(&dir.join("runs"))?;
    let commands = std::fs::read_to_string(dir.join("commands.txt")).unwrap_or_default();
    let text = render(&recorded, idle.as_ref(), &report::machine(), &commands);
    std::fs::write(dir.join("loopback.md"), &text)?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/loopback");

    #[test]
    fn report_from_recorded_runs() {
        let (recorded, idle) = load(Path::new(FIXTURE)).unwrap();
        let text = render(&recorded, idle.as_ref(), "test machine", "cmd");
        // sockperf's server is its own reference: its ratios are exactly 1.
        let base = text
            .lines()
            .find(|l| l.starts_with("| sockperf server | block | sockperf |"))
            .unwrap();
        assert!(base.ends_with("| 1.00 | 1.00 |"), "{base}");
        assert!(
            text.contains("| ricochet | spin | ricochet-bench |"),
            "{text}"
        );
        assert!(text.contains("| block | tcp | 16 | 16 |"), "{text}");
        assert!(text.contains("| 2000 |") && text.contains(" B |"), "{text}");
        assert!(!text.contains("NaN"), "{text}");
    }
}
