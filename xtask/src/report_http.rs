//! `cargo xtask report http RUNS OUT`: ricochet against nginx from bench/http.sh's runs: pipelined
//! responses/s, server CPU time per request at a fixed rate (with issue 13's goals and whether they
//! are met), latency not pipelined, and the memory of idle keep-alive connections.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

/// Goal: ricochet answers at least this many times nginx's pipelined responses/s.
const PIPELINED_GOAL: f64 = 3.0;
/// Goal: ricochet spends at most this fraction of nginx's server CPU time per request.
const CPU_GOAL: f64 = 0.8;

/// What one wrk run printed.
#[derive(Debug, Clone, PartialEq)]
struct Wrk {
    /// Responses parsed per second: wrk counts each response, pipelined or not.
    rps: f64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    non_2xx: u64,
    socket_errors: String,
}

/// What one h2load run printed.
#[derive(Debug, Clone, PartialEq)]
struct H2load {
    rps: f64,
    succeeded: u64,
    /// Requests failed, errored or timed out.
    failed: u64,
}

/// The serving process's CPU times (all threads) around one client run, in clock ticks, from the
/// JSON bench/http.sh writes beside the client's output.
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Ticks {
    clk_tck: f64,
    utime_before: f64,
    stime_before: f64,
    utime_after: f64,
    stime_after: f64,
}

impl Ticks {
    /// User and system CPU time over the run.
    fn seconds(&self) -> f64 {
        self.user_seconds() + (self.stime_after - self.stime_before) / self.clk_tck
    }

    fn user_seconds(&self) -> f64 {
        (self.utime_after - self.utime_before) / self.clk_tck
    }
}

/// A wrk latency such as `49.00us`, `1.71ms` or `2.01s`, in milliseconds.
fn millis(text: &str) -> Option<f64> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let value: f64 = text[..split].parse().ok()?;
    let scale = match &text[split..] {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
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

/// The number just before `label` in a comma-separated line such as h2load's
/// `requests: 10 total, 10 started, 10 done, 9 succeeded, 1 failed, 0 errored, 0 timeout`.
fn count_before(line: &str, label: &str) -> Option<u64> {
    line.split(',')
        .find_map(|part| part.trim().strip_suffix(label))
        .and_then(|n| n.trim().parse().ok())
}

fn parse_wrk(text: &str) -> Result<Wrk> {
    let rps = after(text, "Requests/sec:")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("wrk output has no Requests/sec line"))?;
    // `5542832 requests in 3.00s, 724.19MB read`
    let seconds = text
        .lines()
        .find_map(|l| l.split_once(" requests in "))
        .and_then(|(_, rest)| millis(rest.split(',').next()?))
        .map(|ms| ms / 1e3)
        .ok_or_else(|| anyhow!("wrk output has no 'N requests in T' line"))?;
    let percentile = |p: &str| {
        after(text, p)
            .and_then(millis)
            .ok_or_else(|| anyhow!("wrk output has no {p} latency (run wrk with --latency)"))
    };
    Ok(Wrk {
        rps,
        seconds,
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

fn parse_h2load(text: &str) -> Result<H2load> {
    // `finished in 10.00s, 19998.10 req/s, 2.61MB/s`
    let rps = after(text, "finished in")
        .and_then(|rest| rest.split(',').nth(1))
        .and_then(|r| r.trim().strip_suffix(" req/s"))
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| anyhow!("h2load output has no 'finished in T, R req/s' line"))?;
    let requests =
        after(text, "requests:").ok_or_else(|| anyhow!("h2load output has no 'requests:' line"))?;
    let count = |label: &str| {
        count_before(requests, label)
            .ok_or_else(|| anyhow!("h2load's requests line has no '{label}' count: {requests}"))
    };
    Ok(H2load {
        rps,
        succeeded: count(" succeeded")?,
        failed: count(" failed")? + count(" errored")? + count(" timeout")?,
    })
}

/// A client run's output and, for the pipelined and CPU runs, the server's CPU time around it.
fn parse_pair<T>(txt: &Path, parse: fn(&str) -> Result<T>) -> Result<(T, Ticks)> {
    let run = parse(&std::fs::read_to_string(txt)?)?;
    let json = txt.with_extension("json");
    let bytes = std::fs::read(&json).with_context(|| format!("cannot read {}", json.display()))?;
    Ok((run, serde_json::from_slice(&bytes)?))
}

/// (path, connections) -> server -> run.
type Runs<T> = BTreeMap<(String, u32), BTreeMap<String, T>>;

/// Every `KIND-SERVER-PATH-cN.txt` file in `dir`, parsed.
fn load<T>(dir: &Path, kind: &str, parse: impl Fn(&Path) -> Result<T>) -> Result<Runs<T>> {
    let mut out = Runs::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("txt") {
            continue;
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default();
        let parts: Vec<&str> = name.splitn(4, '-').collect();
        let [file_kind, server, route, conns] = parts[..] else {
            continue;
        };
        if file_kind != kind {
            continue;
        }
        let conns: u32 = conns.trim_start_matches('c').parse().unwrap_or(0);
        let run = parse(&path).with_context(|| format!("in {}", path.display()))?;
        out.entry((route.to_string(), conns))
            .or_default()
            .insert(server.to_string(), run);
    }
    Ok(out)
}

/// The ricochet and nginx runs of every (path, connections) that has both.
fn pairs<T>(runs: &Runs<T>) -> impl Iterator<Item = (&str, u32, &T, &T)> {
    runs.iter().filter_map(|((route, conns), servers)| {
        Some((
            route.as_str(),
            *conns,
            servers.get("ricochet")?,
            servers.get("nginx")?,
        ))
    })
}

/// `none`, or each server's non-2xx responses and socket errors.
fn wrk_errors(r: &Wrk, n: &Wrk) -> String {
    let errors: Vec<String> = [("ricochet", r), ("nginx", n)]
        .iter()
        .filter(|(_, x)| x.non_2xx > 0 || !x.socket_errors.is_empty())
        .map(|(name, x)| format!("{name}: {} non-2xx {}", x.non_2xx, x.socket_errors))
        .collect();
    if errors.is_empty() {
        "none".to_string()
    } else {
        errors.join("; ")
    }
}

fn met(yes: bool) -> &'static str {
    if yes {
        "met"
    } else {
        "not met"
    }
}

/// One line of the goals section: in how many runs the ratio meets the goal, and the ratios' range.
fn goal_line(goal: &str, ratios: &[f64], meets: fn(f64) -> bool) -> String {
    if ratios.is_empty() {
        return format!("- {goal}: no runs\n");
    }
    let n_met = ratios.iter().filter(|&&r| meets(r)).count();
    let low = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let high = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let verdict = match n_met {
        n if n == ratios.len() => "met",
        0 => "not met",
        _ => "partly met",
    };
    format!(
        "- {goal}: **{verdict}** ({n_met} of {} runs meet it; ratio {low:.2} to {high:.2})\n",
        ratios.len()
    )
}

fn pipelined_ratio(r: &(Wrk, Ticks), n: &(Wrk, Ticks)) -> f64 {
    r.0.rps / n.0.rps
}

/// Server CPU time per request that succeeded, in µs: user + system, and user alone.
fn cpu_per_request_us((h2load, ticks): &(H2load, Ticks)) -> (f64, f64) {
    let per = |seconds: f64| seconds * 1e6 / h2load.succeeded.max(1) as f64;
    (per(ticks.seconds()), per(ticks.user_seconds()))
}

fn cpu_ratio(r: &(H2load, Ticks), n: &(H2load, Ticks)) -> f64 {
    cpu_per_request_us(r).0 / cpu_per_request_us(n).0
}

fn pipelined_table(runs: &Runs<(Wrk, Ticks)>) -> String {
    let mut out = format!(
        "| path | connections | ricochet responses/s | nginx responses/s | ratio | goal >= {PIPELINED_GOAL}x | ricochet / nginx server CPU busy | errors |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for (route, conns, r, n) in pairs(runs) {
        let ratio = pipelined_ratio(r, n);
        let busy = |(wrk, ticks): &(Wrk, Ticks)| 100.0 * ticks.seconds() / wrk.seconds;
        let _ = writeln!(
            out,
            "| /{route} | {conns} | {:.0} | {:.0} | {ratio:.2} | {} | {:.0}% / {:.0}% | {} |",
            r.0.rps,
            n.0.rps,
            met(ratio >= PIPELINED_GOAL),
            busy(r),
            busy(n),
            wrk_errors(&r.0, &n.0)
        );
    }
    out
}

fn cpu_table(runs: &Runs<(H2load, Ticks)>) -> String {
    let mut out = format!(
        "| path | connections | ricochet / nginx req/s | ricochet / nginx requests | ricochet µs CPU/request | nginx µs CPU/request | ratio | goal <= {CPU_GOAL}x | of which user space, ricochet / nginx µs | failed |\n\
         |---|---|---|---|---|---|---|---|---|---|\n"
    );
    for (route, conns, r, n) in pairs(runs) {
        let ratio = cpu_ratio(r, n);
        let ((r_us, r_user), (n_us, n_user)) = (cpu_per_request_us(r), cpu_per_request_us(n));
        let _ = writeln!(
            out,
            "| /{route} | {conns} | {:.0} / {:.0} | {} / {} | {r_us:.2} | {n_us:.2} | {ratio:.2} | {} | {r_user:.2} / {n_user:.2} | {} / {} |",
            r.0.rps,
            n.0.rps,
            r.0.succeeded,
            n.0.succeeded,
            met(ratio <= CPU_GOAL),
            r.0.failed,
            n.0.failed
        );
    }
    out
}

fn latency_table(runs: &Runs<Wrk>) -> String {
    let mut out = String::from(
        "| path | connections | ricochet req/s | nginx req/s | ratio | ricochet p50 / p99 ms | nginx p50 / p99 ms | errors |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for (route, conns, r, n) in pairs(runs) {
        let _ = writeln!(
            out,
            "| /{route} | {conns} | {:.0} | {:.0} | {:.2} | {:.3} / {:.3} | {:.3} / {:.3} | {} |",
            r.rps,
            n.rps,
            r.rps / n.rps,
            r.p50_ms,
            r.p99_ms,
            n.p50_ms,
            n.p99_ms,
            wrk_errors(r, n)
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

/// What the report explains before each table.
const INTRO: &str = "One server worker each, pinned to the last CPU; the client (wrk or h2load, one thread) pinned to \
CPU 0; keep-alive; the same bodies. One wrk thread saturates its core near 200,000 requests/s before either server \
does, so the plain requests/s of the latency table measure wrk more than the servers; the pipelined and CPU tables \
measure what differs.";
const PIPELINED: &str = "wrk writes 16 GET requests at once on each connection (bench/http-pipeline.lua, as \
TechEmpower's plaintext test does) and waits for all 16 responses; it counts every response it parses, so these \
are responses/s. Server CPU busy is the serving process's utime + stime over the run, in % of one core: near 100% \
the server is the limit, well below it the client is.";
const CPU: &str = "h2load --h1 sends the same fixed rate to both servers, one request in flight per connection, not \
pipelined. CPU is utime + stime (/proc/PID/stat, in clock ticks of 10 ms) of the serving process before and after \
the run, divided by the requests that succeeded: all of ricochet's process (its HTTP worker, an idle packet worker \
blocked in the kernel and the main thread), nginx's worker process. The last columns give the user-space part; the \
rest is system time, mostly the loopback TCP stack, which both servers enter once to read and once to write each \
request.";

fn render(runs_dir: &Path) -> Result<String> {
    let commands = std::fs::read_to_string(runs_dir.join("commands.txt")).unwrap_or_default();
    let pipelined = load(runs_dir, "pipelined", |p| parse_pair(p, parse_wrk))?;
    let cpu = load(runs_dir, "cpu", |p| parse_pair(p, parse_h2load))?;
    let latency = load(runs_dir, "wrk", |p| parse_wrk(&std::fs::read_to_string(p)?))?;
    let pipelined_ratios: Vec<f64> = pairs(&pipelined)
        .map(|(_, _, r, n)| pipelined_ratio(r, n))
        .collect();
    let cpu_ratios: Vec<f64> = pairs(&cpu).map(|(_, _, r, n)| cpu_ratio(r, n)).collect();
    Ok(format!(
        "# HTTP endpoints: ricochet vs nginx on loopback\n\n{INTRO}\n\n## Goals\n\n{}{}\n\
         ## Pipelined requests, 16 deep\n\n{PIPELINED}\n\n{}\n\
         ## Server CPU time per request at a fixed rate\n\n{CPU}\n\n{}\n\
         ## Latency and requests/s, not pipelined\n\n{}\n\
         ## Memory of idle keep-alive connections\n\n{}\n## Commands\n\n```\n{}\n```\n",
        goal_line(
            &format!("pipelined responses/s at least {PIPELINED_GOAL}x nginx's"),
            &pipelined_ratios,
            |r| r >= PIPELINED_GOAL
        ),
        goal_line(
            &format!("server CPU per request at most {CPU_GOAL}x nginx's"),
            &cpu_ratios,
            |r| r <= CPU_GOAL
        ),
        pipelined_table(&pipelined),
        cpu_table(&cpu),
        latency_table(&latency),
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
    fn h2load_counts_and_rate() {
        let run = parse_h2load(
            "finished in 10.00s, 19990.00 req/s, 2.61MB/s\n\
             requests: 199900 total, 199900 started, 199900 done, 199890 succeeded, 10 failed, 2 errored, 1 timeout\n",
        )
        .unwrap();
        assert_eq!(
            run,
            H2load {
                rps: 19990.0,
                succeeded: 199890,
                failed: 13
            }
        );
        assert!(parse_h2load("finished in 1.00s, 5 req/s, 1KB/s\n").is_err());
    }

    #[test]
    fn cpu_time_from_ticks() {
        let ticks = Ticks {
            clk_tck: 100.0,
            utime_before: 10.0,
            stime_before: 30.0,
            utime_after: 30.0,
            stime_after: 120.0,
        };
        assert!((ticks.seconds() - 1.1).abs() < 1e-9);
        let run = (
            H2load {
                rps: 20000.0,
                succeeded: 200_000,
                failed: 0,
            },
            ticks,
        );
        let (all, user) = cpu_per_request_us(&run);
        assert!((all - 5.5).abs() < 1e-9 && (user - 1.0).abs() < 1e-9);
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

    /// The pipelined and CPU figures of the recorded --quick run, worked out by hand from its files:
    /// wrk's Requests/sec; ticks over wrk's runtime; ticks * 10 ms over h2load's succeeded requests.
    #[test]
    fn pipelined_and_cpu_figures_from_recorded_runs() {
        let text = render(Path::new(FIXTURE)).unwrap();
        let has = |line: &str| assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        // ricochet 2018326.65 / nginx 208196.96 responses/s; (59 + 137) ticks in 2.10 s, 199 in 2.00 s.
        has("| /healthz | 100 | 2018327 | 208197 | 9.69 | met | 93% / 100% | none |");
        // 26 ticks (all system) and 31 ticks (4 user) over 39,900 requests each.
        has("| /counter | 100 | 19950 / 19950 | 39900 / 39900 | 6.52 | 7.77 | 0.84 | not met | 0.00 / 1.00 | 0 / 0 |");
        has("- pipelined responses/s at least 3x nginx's: **met** (4 of 4 runs meet it; ratio 8.79 to 9.69)");
        has("- server CPU per request at most 0.8x nginx's: **not met** (0 of 2 runs meet it; ratio 0.84 to 1.07)");
    }
}
