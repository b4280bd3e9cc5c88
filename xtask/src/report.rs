//! `cargo xtask report DIR`: turns the runs bench/latency.sh recorded (DIR/runs/index.jsonl and the files
//! it names) into DIR/results.md and DIR/latency.svg, prints the table, and fails when any mode lost or
//! mis-answered a request.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;
use serde::Deserialize;

/// The modes in report order; ratios are against kernel-spin and sockperf-server.
const MODES: [&str; 5] = [
    "sockperf-server",
    "kernel-block",
    "kernel-spin",
    "afxdp",
    "xdp",
];

#[derive(Debug, Deserialize)]
struct Entry {
    kind: String,
    mode: String,
    file: String,
}

/// Latency in microseconds and counts of one run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
    pub rps: f64,
    pub sent: u64,
    pub received: u64,
    pub lost: u64,
    pub invalid: u64,
}

/// A `ricochet bench --json` run. Requests not answered are `lost` (datagrams) plus `unanswered`
/// (streams): both count as not answered.
pub fn bench_run(path: &Path) -> Result<Run> {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
    )?;
    let ns = |k: &str| v["latency_ns"][k].as_f64().unwrap_or(0.0) / 1e3;
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Run {
        p50: ns("p50"),
        p90: ns("p90"),
        p99: ns("p99"),
        p99_9: ns("p99_9"),
        max: ns("max"),
        rps: v["throughput_rps"].as_f64().unwrap_or(0.0),
        sent: n("sent"),
        received: n("received"),
        lost: n("lost") + n("unanswered"),
        invalid: n("invalid_replies"),
    })
}

/// sockperf ping-pong's summary (run with --full-rtt: round trips in microseconds).
pub fn sockperf_run(text: &str) -> Result<Run> {
    let after = |key: &str| -> Option<f64> {
        let i = text.find(key)? + key.len();
        text[i..]
            .trim_start()
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?
            .parse()
            .ok()
    };
    let pct = |p: &str| {
        after(&format!("percentile {p} ="))
            .ok_or_else(|| anyhow!("sockperf output has no percentile {p}"))
    };
    let valid = text
        .find("[Valid Duration]")
        .ok_or_else(|| anyhow!("sockperf output has no [Valid Duration] line"))?;
    let line = &text[valid
        ..text[valid..]
            .find('\n')
            .map(|e| valid + e)
            .unwrap_or(text.len())];
    let field = |key: &str| -> f64 {
        line.find(key)
            .and_then(|i| {
                line[i + key.len()..]
                    .split(|c: char| !(c.is_ascii_digit() || c == '.'))
                    .next()
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let runtime = field("RunTime=");
    let received = field("ReceivedMessages=") as u64;
    Ok(Run {
        p50: pct("50.000")?,
        p90: pct("90.000")?,
        p99: pct("99.000")?,
        p99_9: pct("99.900")?,
        max: after("<MAX> observation =").unwrap_or(0.0),
        rps: if runtime > 0.0 {
            received as f64 / runtime
        } else {
            0.0
        },
        sent: field("SentMessages=") as u64,
        received,
        lost: after("# dropped messages =").unwrap_or(0.0) as u64,
        invalid: 0,
    })
}

/// The machine a report was measured on: kernel, CPU model, CPUs and the commit.
pub fn machine() -> String {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let commit = if commit.is_empty() {
        "unknown"
    } else {
        &commit
    };
    format!(
        "Linux {}, {model}, {cpus} CPUs, commit {commit}",
        release.trim()
    )
}

/// Machine CPU per request in microseconds: (wall time x CPUs - idle time) / replies.
fn cpu_per_request(dir: &Path, cpu_file: &str) -> Result<(f64, Run)> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(cpu_file))?)?;
    let wall_s = v["wall_ns"].as_f64().unwrap_or(0.0) / 1e9;
    let busy_s = wall_s * v["cpus"].as_f64().unwrap_or(1.0)
        - v["idle_jiffies"].as_f64().unwrap_or(0.0) / v["clk_tck"].as_f64().unwrap_or(100.0);
    let run = bench_run(&dir.join(v["bench"].as_str().unwrap_or_default()))?;
    Ok((busy_s.max(0.0) * 1e6 / run.received.max(1) as f64, run))
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Medians of the latencies and rates over rounds; counts are summed.
pub fn median_run(runs: &[Run]) -> Run {
    let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    Run {
        p50: m(|r| r.p50),
        p90: m(|r| r.p90),
        p99: m(|r| r.p99),
        p99_9: m(|r| r.p99_9),
        max: m(|r| r.max),
        rps: m(|r| r.rps),
        sent: runs.iter().map(|r| r.sent).sum(),
        received: runs.iter().map(|r| r.received).sum(),
        lost: runs.iter().map(|r| r.lost).sum(),
        invalid: runs.iter().map(|r| r.invalid).sum(),
    }
}

/// Everything the report shows, per mode (medians over rounds).
#[derive(Debug, Default)]
pub struct Summary {
    pub pingpong: BTreeMap<String, Run>,
    pub sockperf: BTreeMap<String, Run>,
    pub throughput: BTreeMap<String, Run>,
    /// The same ping-pong and closed-loop runs over TCP (TCP-lite in afxdp mode).
    pub pingpong_tcp: BTreeMap<String, Run>,
    pub throughput_tcp: BTreeMap<String, Run>,
    pub cpu_us: BTreeMap<String, f64>,
    pub cpu_tcp_us: BTreeMap<String, f64>,
    /// Runs that lost or mis-answered requests: "mode kind: details".
    pub failures: Vec<String>,
    /// The first round's ping-pong histogram per mode, over UDP and over TCP.
    pub hgrm: BTreeMap<String, PathBuf>,
    pub hgrm_tcp: BTreeMap<String, PathBuf>,
}

pub fn summarize(dir: &Path) -> Result<Summary> {
    let runs = dir.join("runs");
    let index = std::fs::read_to_string(runs.join("index.jsonl")).with_context(|| {
        format!(
            "no runs recorded in {} (run bench/latency.sh)",
            runs.display()
        )
    })?;
    let mut by: BTreeMap<(String, String), Vec<Run>> = BTreeMap::new();
    let mut cpu: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut s = Summary::default();
    for line in index.lines().filter(|l| !l.trim().is_empty()) {
        let e: Entry =
            serde_json::from_str(line).with_context(|| format!("bad index line {line}"))?;
        let run = match e.kind.as_str() {
            "pingpong" | "throughput" | "pingpong-tcp" | "throughput-tcp" => {
                bench_run(&runs.join(&e.file))?
            }
            "sockperf" => sockperf_run(&std::fs::read_to_string(runs.join(&e.file))?)?,
            "cpu" | "cpu-tcp" => {
                let (per_request, run) = cpu_per_request(&runs, &e.file)?;
                let key = (e.kind.clone(), e.mode.clone());
                cpu.entry(key).or_default().push(per_request);
                run
            }
            other => bail!("unknown run kind '{other}'"),
        };
        if run.lost > 0 || run.invalid > 0 || run.received == 0 {
            s.failures.push(format!(
                "{} {}: sent {} received {} lost {} invalid {}",
                e.mode, e.kind, run.sent, run.received, run.lost, run.invalid
            ));
        }
        let hgrm = match e.kind.as_str() {
            "pingpong" => Some(&mut s.hgrm),
            "pingpong-tcp" => Some(&mut s.hgrm_tcp),
            _ => None,
        };
        if let Some(hgrm) = hgrm {
            hgrm.entry(e.mode.clone())
                .or_insert_with(|| runs.join(e.file.replace(".json", ".hgrm")));
        }
        if !e.kind.starts_with("cpu") {
            by.entry((e.kind, e.mode)).or_default().push(run);
        }
    }
    for ((kind, mode), runs) in by {
        let m = median_run(&runs);
        match kind.as_str() {
            "pingpong" => s.pingpong.insert(mode, m),
            "sockperf" => s.sockperf.insert(mode, m),
            "pingpong-tcp" => s.pingpong_tcp.insert(mode, m),
            "throughput-tcp" => s.throughput_tcp.insert(mode, m),
            _ => s.throughput.insert(mode, m),
        };
    }
    for ((kind, mode), v) in cpu {
        let target = if kind == "cpu" {
            &mut s.cpu_us
        } else {
            &mut s.cpu_tcp_us
        };
        target.insert(mode, median(v));
    }
    Ok(s)
}

fn ratio(a: f64, b: Option<f64>) -> String {
    match b {
        Some(b) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".into(),
    }
}

fn latency_table(runs: &BTreeMap<String, Run>) -> String {
    let mut t = String::from(
        "| mode | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | replies/s | lost | p50 / kernel spin | p99 / kernel spin | p50 / sockperf server | p99 / sockperf server |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    let spin = runs.get("kernel-spin");
    let sock = runs.get("sockperf-server");
    for mode in MODES {
        let Some(r) = runs.get(mode) else { continue };
        let _ = writeln!(
            t,
            "| {mode} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            r.p50,
            r.p90,
            r.p99,
            r.p99_9,
            r.max,
            r.rps,
            r.lost,
            ratio(r.p50, spin.map(|s| s.p50)),
            ratio(r.p99, spin.map(|s| s.p99)),
            ratio(r.p50, sock.map(|s| s.p50)),
            ratio(r.p99, sock.map(|s| s.p99)),
        );
    }
    t
}

pub fn render(s: &Summary, commands: &str) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "# ricochet: kernel vs AF_XDP vs XDP in the veth lab\n");
    let _ = writeln!(
        t,
        "Two namespaces joined by a one-queue veth pair (the client side runs an XDP_PASS program so XDP_TX replies arrive); \
         responder on the last CPU, client on CPU 0. Ping-pong uses the sockperf protocol, so sockperf's own server answers \
         the same messages. Figures are medians over the rounds; round trips in microseconds.\n"
    );
    let _ = writeln!(
        t,
        "## Ping-pong, ricochet's bench client (spinning)\n\n{}",
        latency_table(&s.pingpong)
    );
    let _ = writeln!(
        t,
        "## Ping-pong, sockperf's client (`--full-rtt`, blocking)\n\n{}",
        latency_table(&s.sockperf)
    );
    let _ = writeln!(
        t,
        "## Throughput and machine CPU\n\nClosed loop: 16 connections x 16 in flight. CPU per request: the whole machine's busy time \
         (wall time x CPUs - idle time from /proc/stat) during an open-loop run at a fixed rate, divided by the replies; it \
         includes the client, the same in every mode.\n\n| mode | closed-loop replies/s | p50 µs | p99 µs | machine CPU per request µs | lost |\n|---|---|---|---|---|---|"
    );
    for mode in MODES {
        let Some(r) = s.throughput.get(mode) else {
            continue;
        };
        let cpu = s
            .cpu_us
            .get(mode)
            .map(|c| format!("{c:.1}"))
            .unwrap_or_else(|| "–".into());
        let _ = writeln!(
            t,
            "| {mode} | {:.0} | {:.1} | {:.1} | {cpu} | {} |",
            r.rps, r.p50, r.p99, r.lost
        );
    }
    t.push_str(&tcp_section(s));
    let _ = writeln!(
        t,
        "\n## Check\n\n{}\n",
        if s.failures.is_empty() {
            "Every mode answered every request: no run lost or mis-answered one.".to_string()
        } else {
            format!(
                "FAILED, runs that lost or mis-answered requests:\n\n- {}",
                s.failures.join("\n- ")
            )
        }
    );
    let _ = writeln!(
        t,
        "![latency percentile distribution](latency.svg)\n\n## Commands\n\n```\n{}\n```",
        commands.trim_end()
    );
    t
}

/// The ping-pong and closed-loop runs over TCP.
fn tcp_section(s: &Summary) -> String {
    format!(
        "\n## Over TCP\n\nThe same server, clients and runs over TCP: the kernel's TCP stack in kernel mode, TCP-lite in \
         the AF_XDP workers (afxdp) and in the XDP program (xdp).\n\n### Ping-pong, ricochet's bench client (spinning)\n\n{}\n### Closed loop\n\n{}\n",
        latency_table(&s.pingpong_tcp),
        throughput_table(&s.throughput_tcp, &s.cpu_tcp_us)
    )
}

/// Closed-loop replies per second by mode, with the ratio to kernel block, and the machine CPU per
/// request of the fixed-rate run.
fn throughput_table(runs: &BTreeMap<String, Run>, cpu: &BTreeMap<String, f64>) -> String {
    let mut t = String::from(
        "| mode | closed-loop replies/s | p50 µs | p99 µs | lost | replies/s / kernel block | machine CPU per request µs | CPU / kernel block |\n|---|---|---|---|---|---|---|---|\n",
    );
    let block = runs.get("kernel-block").map(|r| r.rps);
    let cpu_block = cpu.get("kernel-block").copied();
    for mode in MODES {
        let Some(r) = runs.get(mode) else { continue };
        let (cpu_text, cpu_ratio) = match cpu.get(mode) {
            Some(c) => (format!("{c:.1}"), ratio(*c, cpu_block)),
            None => ("–".into(), "–".into()),
        };
        let _ = writeln!(
            t,
            "| {mode} | {:.0} | {:.1} | {:.1} | {} | {} | {cpu_text} | {cpu_ratio} |",
            r.rps,
            r.p50,
            r.p99,
            r.lost,
            ratio(r.rps, block)
        );
    }
    t
}

/// HdrHistogram percentile text: (1/(1-p), value in µs) points.
pub fn hgrm_points(text: &str) -> Vec<(f64, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            if cols.len() < 4 {
                return None;
            }
            let value: f64 = cols[0].parse().ok()?;
            let q: f64 = cols[1].parse().ok()?;
            (q < 1.0).then(|| (1.0 / (1.0 - q), value))
        })
        .collect()
}

/// One line of the chart: a mode over one transport, and its percentile points.
struct Series {
    label: String,
    color: RGBColor,
    width: u32,
    points: Vec<(f64, f64)>,
}

/// Every mode's ping-pong percentiles, UDP (thick) and TCP (thin, same colour), from the hgrm files.
fn chart_series(s: &Summary) -> Result<Vec<Series>> {
    let colors = [
        RGBColor(120, 120, 120),
        RGBColor(200, 60, 40),
        RGBColor(230, 150, 20),
        RGBColor(40, 110, 200),
        RGBColor(30, 160, 80),
    ];
    let mut series = Vec::new();
    for (i, mode) in MODES.iter().enumerate() {
        for (hgrm, transport, width) in [(&s.hgrm, "UDP", 3), (&s.hgrm_tcp, "TCP", 1)] {
            let Some(path) = hgrm.get(*mode) else {
                continue;
            };
            let points = hgrm_points(&std::fs::read_to_string(path)?);
            if !points.is_empty() {
                let label = format!("{mode} {transport}");
                let color = colors[i % colors.len()];
                series.push(Series {
                    label,
                    color,
                    width,
                    points,
                });
            }
        }
    }
    Ok(series)
}

/// All modes' latency percentile distributions, over UDP and TCP side by side, HdrHistogram style:
/// percentile on a log 1/(1-p) axis.
pub fn chart(s: &Summary, out: &Path) -> Result<()> {
    let series = chart_series(s)?;
    let all = || series.iter().flat_map(|l| l.points.iter().copied());
    let x_max = all().map(|(x, _)| x).fold(10.0f64, f64::max).min(1e6);
    let y_max = all().map(|(_, y)| y).fold(1.0f64, f64::max) * 1.2;
    let root = SVGBackend::new(out, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Round-trip latency by percentile (ping-pong, veth lab; thick UDP, thin TCP)",
            ("sans-serif", 20),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((1.0f64..x_max).log_scale(), (0.5f64..y_max).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("round trip (µs)")
        .x_label_formatter(&percentile_label)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for line in series {
        let style = line.color.stroke_width(line.width);
        let points = line.points.into_iter();
        chart
            .draw_series(LineSeries::new(
                points.filter(|(x, y)| *x <= x_max && *y > 0.0),
                style,
            ))
            .map_err(|e| anyhow!("{e}"))?
            .label(line.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// An x value of the chart (1/(1-p)) as a percentile.
fn percentile_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x);
    if p < 1e-9 {
        return "0%".into();
    }
    format!("{p:.4}")
        .trim_end_matches('0')
        .trim_end_matches('.')
        .to_string()
        + "%"
}

/// Writes results.md and latency.svg, prints the table; fails when a mode lost or mis-answered requests.
pub fn run(dir: &Path) -> Result<()> {
    let summary = summarize(dir)?;
    let commands = std::fs::read_to_string(dir.join("runs/commands.txt")).unwrap_or_default();
    chart(&summary, &dir.join("latency.svg"))?;
    let text = render(&summary, &commands);
    std::fs::write(dir.join("results.md"), &text)?;
    println!("{text}");
    println!(
        "written: {} and {}",
        dir.join("results.md").display(),
        dir.join("latency.svg").display()
    );
    if !summary.failures.is_empty() {
        bail!(
            "{} run(s) lost or mis-answered requests (see the Check section)",
            summary.failures.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod test {
    use super::*;

    const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/report");

    #[test]
    fn report_from_recorded_runs() {
        let dir = std::env::temp_dir().join(format!("ricochet-report-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("runs")).unwrap();
        for entry in std::fs::read_dir(FIXTURE).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.join("runs").join(entry.file_name())).unwrap();
        }
        let s = summarize(&dir).unwrap();
        for mode in MODES {
            assert!(s.pingpong.contains_key(mode), "{mode} ping-pong");
            assert!(s.sockperf.contains_key(mode), "{mode} sockperf");
        }
        for mode in &MODES[1..] {
            assert!(
                s.throughput.contains_key(*mode) && s.cpu_us.contains_key(*mode),
                "{mode}"
            );
        }
        for mode in &MODES[1..] {
            let tcp = s.pingpong_tcp.contains_key(*mode)
                && s.throughput_tcp.contains_key(*mode)
                && s.cpu_tcp_us.contains_key(*mode);
            assert!(tcp, "{mode} over TCP");
        }
        assert!(s.failures.is_empty(), "{:?}", s.failures);
        let text = render(&s, "cmd");
        assert!(text.contains("## Over TCP") && text.contains("CPU / kernel block"));
        assert!(text.contains("| xdp |") && text.contains("Every mode answered every request"));
        // The kernel-spin row's ratio to itself is exactly 1.
        let spin = text
            .lines()
            .find(|l| l.starts_with("| kernel-spin |"))
            .unwrap();
        assert!(spin.contains("| 1.00 | 1.00 |"), "{spin}");
        chart(&s, &dir.join("latency.svg")).unwrap();
        let svg = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("afxdp") && svg.contains("<polyline"));
        assert!(
            svg.contains("xdp UDP") && svg.contains("xdp TCP"),
            "UDP and TCP side by side"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn failures_are_reported() {
        let run = sockperf_run(
            "sockperf: [Valid Duration] RunTime=1.000 sec; SentMessages=10; ReceivedMessages=9\n\
             sockperf: # dropped messages = 1; # duplicated messages = 0\n\
             sockperf: ---> <MAX> observation =  30.5\n\
             sockperf: ---> percentile 99.900 =   20.0\n sockperf: ---> percentile 99.000 = 10.0\n\
             sockperf: ---> percentile 90.000 = 8.0\n sockperf: ---> percentile 50.000 = 5.0\n",
        )
        .unwrap();
        assert_eq!(
            (run.p50, run.p99, run.max, run.lost, run.received),
            (5.0, 10.0, 30.5, 1, 9)
        );
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        let points = hgrm_points("       Value     Percentile TotalCount 1/(1-Percentile)\n\n       5.000 0.500000000000          1           2.00\n      10.000 1.000000000000          2            inf\n");
        assert_eq!(points, vec![(2.0, 5.0)]);
    }
}
