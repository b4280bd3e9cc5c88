//! `cargo xtask report http RUNS OUT`: the HTTP benchmark table (ricochet against nginx with the same
//! wrk settings) and the memory of idle keep-alive connections, from bench/http.sh's runs.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Context, Result};

/// What one wrk run printed.
#[derive(Debug, Clone, PartialEq)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    socket_errors: String,
}

/// A wrk latency such as `49.00us`, `1.71ms` or `2.01s`, in milliseconds.
fn millis(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let value: f64 = text[..split].parse().ok()?;
    let scale = match &text[split..] {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        _ => return None,
    };
    Some(value * scale)
}

/// The value after `key` on the line that starts with it (leading spaces ignored).
fn after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(key))
        .map(str::trim)
}

fn parse_wrk(text: &str) -> Result<Wrk> {
    let rps = after(text, "Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("wrk output has no Requests/sec line"))?;
    let percentile = |p: &str| {
        after(text, p)
            .and_then(millis)
            .ok_or_else(|| anyhow!("wrk output has no {p} latency (run wrk with --latency)"))
    };
    Ok(Wrk {
        rps,
        p50_ms: percentile("50%")?,
        p99_ms: percentile("99%")?,
        non_2xx: after(text, "Non-2xx or 3xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        socket_errors: after(text, "Socket errors:")
            .unwrap_or_default()
            .to_string(),
    })
}

/// (path, connections) -> server -> run, from the `wrk-SERVER-PATH-cN.txt` files.
type Runs = BTreeMap<(String, u32), BTreeMap<String, Wrk>>;

fn load(runs: &Path) -> Result<Runs> {
    let mut out = Runs::new();
    for entry in
        std::fs::read_dir(runs).with_context(|| format!("cannot read {}", runs.display()))?
    {
        let path = entry?.path();
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let parts: Vec<&str> = name.splitn(4, '-').collect();
        let ["wrk", server, route, conns] = parts[..] else {
            continue;
        };
        let conns: u32 = conns.trim_start_matches('c').parse().unwrap_or(0);
        let text = std::fs::read_to_string(&path)?;
        let run = parse_wrk(&text).with_context(|| format!("in {}", path.display()))?;
        out.entry((route.to_string(), conns))
            .or_default()
            .insert(server.to_string(), run);
    }
    Ok(out)
}

fn table(runs: &Runs) -> String {
    let mut out = String::from(
        "| path | connections | ricochet req/s | nginx req/s | ratio | ricochet p50 / p99 ms | nginx p50 / p99 ms | errors |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for ((route, conns), servers) in runs {
        let (Some(r), Some(n)) = (servers.get("ricochet"), servers.get("nginx")) else {
            continue;
        };
        let errors: Vec<String> = [("ricochet", r), ("nginx", n)]
            .iter()
            .filter(|(_, x)| x.non_2xx > 0 || !x.socket_errors.is_empty())
            .map(|(name, x)| format!("{name}: {} non-2xx {}", x.non_2xx, x.socket_errors))
            .collect();
        let errors = if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join("; ")
        };
        let _ = writeln!(
            out,
            "| /{route} | {conns} | {:.0} | {:.0} | {:.2} | {:.3} / {:.3} | {:.3} / {:.3} | {errors} |",
            r.rps,
            n.rps,
            r.rps / n.rps,
            r.p50_ms,
            r.p99_ms,
            n.p50_ms,
            n.p99_ms
        );
    }
    out
}

fn idle_table(runs: &Path) -> Result<String> {
    let mut out = String::from(
        "| server | idle keep-alive connections | RSS growth | per connection |\n|---|---|---|---|\n",
    );
    for server in ["ricochet", "nginx"] {
        let Ok(bytes) = std::fs::read(runs.join(format!("idle-{server}.json"))) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes)?;
        let get = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let growth = get("rss_kib_after") - get("rss_kib_before");
        let per = growth * 1024.0 / get("connections").max(1.0);
        let _ = writeln!(
            out,
            "| {server} | {} | {growth:.0} KiB | {per:.0} B |",
            get("connections")
        );
    }
    Ok(out)
}

fn render(runs_dir: &Path) -> Result<String> {
    let commands = std::fs::read_to_string(runs_dir.join("commands.txt")).unwrap_or_default();
    Ok(format!(
        "# HTTP endpoints: ricochet vs nginx on loopback\n\n\
         One server worker each, pinned to the last CPU; wrk (one thread) pinned to CPU 0; keep-alive; same bodies.\n\n\
         {}\n## Memory of idle keep-alive connections\n\n{}\n## Commands\n\n```\n{}\n```\n",
        table(&load(runs_dir)?),
        idle_table(runs_dir)?,
        commands.trim_end()
    ))
}

/// Writes OUT from the runs in RUNS and prints it.
pub fn run(runs: &Path, out: &Path) -> Result<()> {
    let text = render(runs)?;
    std::fs::write(out, &text).with_context(|| format!("cannot write {}", out.display()))?;
    println!("{text}");
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/http");

    #[test]
    fn wrk_latencies_in_every_unit() {
        let close = |text: &str, ms: f64| (millis(text).unwrap() - ms).abs() < 1e-9;
        assert!(close("49.00us", 0.049));
        assert!(close("1.71ms", 1.71));
        assert!(close("2.01s", 2010.0));
        assert_eq!(millis("fast"), None);
    }

    #[test]
    fn report_from_recorded_runs() {
        let text = render(Path::new(FIXTURE)).unwrap();
        let row = text
            .lines()
            .find(|l| l.starts_with("| /counter | 10 |"))
            .unwrap();
        assert!(row.ends_with("| none |"), "{row}");
        assert!(
            text.contains("| ricochet | 2000 |") && text.contains("| nginx | 2000 |"),
            "{text}"
        );
        assert!(!text.contains("NaN") && !text.contains("inf"), "{text}");
    }
}
