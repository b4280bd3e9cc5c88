#!/usr/bin/env python3
"""Builds the HTTP benchmark table (ricochet vs nginx, same wrk settings) from bench/http.sh's runs.

Usage: bench/http_report.py RUNS_DIR OUT_MD
"""

import json
import re
import sys
from pathlib import Path

UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def ms(text):
    m = re.match(r"([\d.]+)(us|ms|s)$", text)
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(text):
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    pct = {p: ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", text, re.M)}
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(r"Socket errors: (.*)", text)
    return {"rps": rps, "p50_ms": pct.get("50"), "p99_ms": pct.get("99"),
            "non_2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": socket_errors.group(1) if socket_errors else ""}


def main():
    runs, out = Path(sys.argv[1]), Path(sys.argv[2])
    results = {}
    for f in sorted(runs.glob("wrk-*.txt")):
        _, server, path, conns = f.stem.split("-", 3)
        results[(path, int(conns[1:]), server)] = parse_wrk(f.read_text())
    rows = ["| path | connections | ricochet req/s | nginx req/s | ratio | ricochet p50 / p99 ms | nginx p50 / p99 ms | errors |",
            "|---|---|---|---|---|---|---|---|"]
    for (path, conns) in sorted({(k[0], k[1]) for k in results}):
        r, n = results.get((path, conns, "ricochet")), results.get((path, conns, "nginx"))
        if not r or not n:
            continue
        errors = []
        for name, x in (("ricochet", r), ("nginx", n)):
            if x["non_2xx"] or x["socket_errors"]:
                errors.append("%s: %d non-2xx %s" % (name, x["non_2xx"], x["socket_errors"]))
        rows.append("| /%s | %d | %.0f | %.0f | %.2f | %.3f / %.3f | %.3f / %.3f | %s |" % (
            path, conns, r["rps"], n["rps"], r["rps"] / n["rps"], r["p50_ms"], r["p99_ms"], n["p50_ms"], n["p99_ms"],
            "; ".join(errors) or "none"))
    idle = ["| server | idle keep-alive connections | RSS growth | per connection |", "|---|---|---|---|"]
    for server in ("ricochet", "nginx"):
        f = runs / ("idle-%s.json" % server)
        if f.exists():
            d = json.loads(f.read_text())
            growth = d["rss_kib_after"] - d["rss_kib_before"]
            idle.append("| %s | %d | %d KiB | %.0f B |" % (server, d["connections"], growth, growth * 1024 / max(d["connections"], 1)))
    commands = (runs / "commands.txt").read_text() if (runs / "commands.txt").exists() else ""
    text = "\n".join([
        "# HTTP endpoints: ricochet vs nginx on loopback", "",
        "One server worker each, pinned to the last CPU; wrk (one thread) pinned to CPU 0; keep-alive; same bodies.", "",
        "\n".join(rows), "", "## Memory of idle keep-alive connections", "", "\n".join(idle), "",
        "## Commands", "", "```", commands.rstrip(), "```", ""])
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
