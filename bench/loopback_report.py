#!/usr/bin/env python3
"""Builds loopback.md from the runs recorded by bench/loopback.sh (runs/index.jsonl) and prints it.

Usage: bench/loopback_report.py RESULTS_DIR
Latency ratios compare ricochet with sockperf's own server measured in the same run, same poll mode
and same client: below 1.00 means ricochet answered faster.
"""

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

PERCENTILES = [("p50", "50.000"), ("p90", "90.000"), ("p99", "99.000"), ("p99.9", "99.900")]


def parse_sockperf(text):
    """Round trip in microseconds (run with --full-rtt) and throughput from sockperf ping-pong's summary."""
    lat = {}
    for key, pct in PERCENTILES:
        m = re.search(r"percentile %s =\s*([\d.]+)" % re.escape(pct), text)
        if not m:
            raise ValueError("sockperf output has no percentile %s" % pct)
        lat[key] = float(m.group(1))
    lat["max"] = float(re.search(r"<MAX> observation =\s*([\d.]+)", text).group(1))
    m = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=(\d+); ReceivedMessages=(\d+)", text)
    runtime, sent, received = float(m.group(1)), int(m.group(2)), int(m.group(3))
    dropped = int(re.search(r"# dropped messages = (\d+)", text).group(1))
    return {"latency_us": lat, "throughput_rps": received / runtime, "sent": sent, "received": received, "lost": dropped}


def parse_bench(data):
    ns = data["latency_ns"]
    lat = {"p50": ns["p50"] / 1e3, "p90": ns["p90"] / 1e3, "p99": ns["p99"] / 1e3, "p99.9": ns["p99_9"] / 1e3, "max": ns["max"] / 1e3}
    return {"latency_us": lat, "throughput_rps": data["throughput_rps"], "sent": data["sent"], "received": data["received"], "lost": data["lost"], "invalid": data["invalid_replies"]}


def load_runs(runs_dir):
    runs = []
    for line in (runs_dir / "index.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        meta = json.loads(line)
        path = runs_dir / meta["file"]
        if meta["kind"] == "idle":
            meta["result"] = json.loads(path.read_text())
        elif meta["client"] == "sockperf":
            meta["result"] = parse_sockperf(path.read_text())
        else:
            meta["result"] = parse_bench(json.loads(path.read_text()))
        runs.append(meta)
    return runs


def fmt(x):
    return "%.1f" % x if x < 1000 else "%.0f" % x


def median(values):
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def latency_table(runs):
    """Median over rounds of each statistic, per (server, poll, client)."""
    groups = {}
    for r in runs:
        if r["kind"] == "latency":
            groups.setdefault((r["server"], r["poll"], r["client"]), []).append(r["result"])
    med = {}
    for key, results in groups.items():
        lat = {k: median([x["latency_us"][k] for x in results]) for k in ["p50", "p90", "p99", "p99.9", "max"]}
        med[key] = {"latency_us": lat, "throughput_rps": median([x["throughput_rps"] for x in results]),
                    "lost": sum(x["lost"] for x in results), "rounds": len(results)}
    rows = ["| server | poll | client | rounds | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | replies/s | lost | p50 ratio | p99 ratio |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (server, poll, client) in sorted(med, key=lambda k: (k[1], k[2], k[0] != "sockperf")):
        res = med[(server, poll, client)]
        l = res["latency_us"]
        base = med.get(("sockperf", poll, client), {}).get("latency_us")
        ratio = lambda k: "%.2f" % (l[k] / base[k]) if base and base[k] > 0 else "–"
        rows.append("| %s | %s | %s | %d | %s | %s | %s | %s | %s | %.0f | %d | %s | %s |" % (
            "sockperf server" if server == "sockperf" else "ricochet", poll, client, res["rounds"],
            fmt(l["p50"]), fmt(l["p90"]), fmt(l["p99"]), fmt(l["p99.9"]), fmt(l["max"]),
            res["throughput_rps"], res["lost"], ratio("p50"), ratio("p99")))
    return "\n".join(rows)


def throughput_table(runs):
    tput = [r for r in runs if r["kind"] == "throughput"]
    rows = ["| poll | transport | connections | depth | replies/s | p50 µs | p99 µs | p99.9 µs | lost | invalid |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(tput, key=lambda r: (r["poll"], r["transport"], int(r["connections"]), int(r["depth"]))):
        res, l = r["result"], r["result"]["latency_us"]
        rows.append("| %s | %s | %s | %s | %.0f | %s | %s | %s | %d | %d |" % (
            r["poll"], r["transport"], r["connections"], r["depth"], res["throughput_rps"],
            fmt(l["p50"]), fmt(l["p99"]), fmt(l["p99.9"]), res["lost"], res["invalid"]))
    return "\n".join(rows)


def idle_section(runs):
    idle = [r for r in runs if r["kind"] == "idle"]
    if not idle:
        return "(not measured)"
    i = idle[0]["result"]
    n = max(i["connections"], 1)
    rss = (i["server_rss_kib_after"] - i["server_rss_kib_before"]) * 1024 / n
    slab = (i["slab_kib_after"] - i["slab_kib_before"]) * 1024 / n
    lines = [
        "| idle TCP connections | server RSS per connection | kernel slab per connection (both ends) |",
        "|---|---|---|",
        "| %d | %.0f B | %.0f B |" % (i["connections"], rss, slab),
    ]
    if i.get("note"):
        lines.append("\n" + i["note"] + ".")
    return "\n".join(lines)


def machine():
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "unknown"
    import os
    return "Linux %s, %s, %d CPUs, commit %s" % (platform.release(), cpu, os.cpu_count(), commit or "unknown")


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: bench/report.py RESULTS_DIR")
    out = Path(sys.argv[1])
    runs = load_runs(out / "runs")
    commands = (out / "commands.txt").read_text() if (out / "commands.txt").exists() else ""
    text = "\n".join([
        "# ricochet kernel datapath on loopback vs sockperf's server",
        "",
        "Machine: " + machine() + ". Server pinned to the last CPU, client to CPU 0.",
        "",
        "## Ping-pong round trip (sockperf protocol, UDP, one request in flight)",
        "",
        "Each figure is the median over alternating rounds; ratios are ricochet / sockperf's own server in the same poll mode with the same client (below 1 is better). sockperf runs with --full-rtt, so every figure is a round trip.",
        "",
        latency_table(runs),
        "",
        "## Counter throughput (bench client, one server worker)",
        "",
        throughput_table(runs),
        "",
        "## Memory of idle connections",
        "",
        idle_section(runs),
        "",
        "## Commands",
        "",
        "```",
        commands.rstrip(),
        "```",
        "",
    ])
    (out / "loopback.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
