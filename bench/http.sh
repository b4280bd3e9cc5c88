#!/usr/bin/env bash
# bench/http.sh: ricochet's HTTP endpoints against nginx on loopback, in one run, with the same clients
# and settings for both servers (GET /healthz and GET /counter):
#   (a) latency, not pipelined: wrk --latency at 10, 100 and 1,000 connections (p50, p99);
#   (b) pipelined requests, 16 deep (bench/http-pipeline.lua): responses/s at 10 and 100 connections;
#   (c) server CPU time per request, not pipelined, at the same fixed rate (h2load --h1 --rps): the
#       serving process's utime + stime from /proc/PID/stat before and after, over the requests done;
#   (d) the memory of many idle keep-alive connections.
# On a small VM one wrk thread saturates its core near 200,000 requests/s before either server does, so
# (a)'s rates measure wrk; (b) and (c) measure what differs. One server worker pinned to the last CPU,
# the client pinned to CPU 0; nginx is configured here to return the same bodies with keep-alive.
# Writes OUT/http.md (default bench/results/<UTC date>) and OUT/http-runs/ with every run's raw output
# and the exact commands. Run as root: sudo bench/http.sh [--quick] [--duration S] [--rate N] [--out DIR]
set -euo pipefail

usage() {
    cat <<'EOF'
usage: sudo bench/http.sh [--quick] [--duration SECONDS] [--rate N] [--out DIR]
  --quick          short runs (2 s each, 2,000 idle connections, no 1,000-connection latency run)
  --duration S     seconds per wrk and h2load run (default 10)
  --rate N         requests/s of the fixed-rate CPU runs, over 100 connections (default 20000)
  --out DIR        results directory (default bench/results/<UTC date>)
EOF
}

DURATION=10
IDLE=10000
CONNS="10 100 1000"
PIPELINE_CONNS="10 100"
PIPELINE_DEPTH=16
RATE=20000
CPU_CONNS=100
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) DURATION=2; IDLE=2000; CONNS="10 100" ;;
        --duration) DURATION="${2:?--duration needs seconds}"; shift ;;
        --rate) RATE="${2:?--rate needs requests per second}"; shift ;;
        --out) OUT="${2:?--out needs a directory}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench/http.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if [ $((RATE % CPU_CONNS)) -ne 0 ] || [ "$RATE" -lt "$CPU_CONNS" ]; then
    echo "bench/http.sh: --rate must be a multiple of $CPU_CONNS (h2load paces each connection)" >&2
    exit 2
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. "$ROOT/bench/lib.sh"
require_root bench/http.sh
install_group http
require_cargo bench/http.sh
echo "== building ricochet (release)"
cargo build --release --quiet -p ricochet
RICOCHET="$ROOT/target/release/ricochet"
OUT="${OUT:-$ROOT/bench/results/$(date -u +%F)}"
RUNS="$OUT/http-runs"
rm -rf "$RUNS"
mkdir -p "$RUNS"
COMMANDS="$RUNS/commands.txt"
echo "# bench/http.sh $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >"$COMMANDS"

NCPU=$(nproc)
SERVER_CPU=$((NCPU - 1))
CLIENT_CPU=0
CLK_TCK=$(getconf CLK_TCK)
PORT_R=$((30000 + RANDOM % 10000))
PORT_N=$((PORT_R + 1))
PIDS=()
NGINX_DIR=$(mktemp -d)
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    # nginx runs with daemon off, so its master is in PIDS and takes its worker down with it.
    sleep 0.5
    rm -rf "$NGINX_DIR"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

# wait_port PORT: waits up to 5 s until something accepts on 127.0.0.1:PORT.
wait_port() {
    for _ in $(seq 50); do
        (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench/http.sh: nothing listens on 127.0.0.1:$1" >&2
    exit 1
}

# ricochet: the packet worker on CPU 0 (idle here), so its one HTTP worker runs on the last CPU.
start_ricochet() {
    local args=(serve --listen udp://127.0.0.1:0 --cpus "$CLIENT_CPU" --http "127.0.0.1:$PORT_R" --http-workers 1 --http-rate-limit 0)
    log_cmd "$RICOCHET ${args[*]}"
    "$RICOCHET" "${args[@]}" >"$RUNS/ricochet.txt" 2>&1 &
    RPID=$!
    PIDS+=("$RPID")
    wait_ready "$RPID" "$RUNS/ricochet.txt" || { cat "$RUNS/ricochet.txt" >&2; exit 1; }
    wait_port "$PORT_R"
}

# nginx: one worker on the last CPU (worker_cpu_affinity takes a mask in binary: a 1 followed by
# SERVER_CPU zeros); sets NWORKER, the worker's PID.
start_nginx() {
    local affinity=1 i
    for ((i = 0; i < SERVER_CPU; i++)); do affinity="${affinity}0"; done
    cat >"$NGINX_DIR/nginx.conf" <<EOF
worker_processes 1;
worker_cpu_affinity $affinity;
pid $NGINX_DIR/nginx.pid;
error_log $NGINX_DIR/error.log;
daemon off;
events { worker_connections 20000; }
worker_rlimit_nofile 20000;
http {
    access_log off;
    keepalive_requests 100000000;
    keepalive_timeout 60s;
    server {
        listen 127.0.0.1:$PORT_N;
        location = /healthz { default_type text/plain; return 200 "ok\n"; }
        location = /counter { default_type application/json; return 200 '{"value":0}\n'; }
    }
}
EOF
    cp "$NGINX_DIR/nginx.conf" "$RUNS/nginx.conf"
    log_cmd "nginx -c nginx.conf (bench/results/.../http-runs/nginx.conf)"
    nginx -c "$NGINX_DIR/nginx.conf" -p "$NGINX_DIR" &
    PIDS+=($!)
    wait_port "$PORT_N"
    NWORKER=$(pgrep -P "$(cat "$NGINX_DIR/nginx.pid")" | head -1)
}

# port_of SERVER / pid_of SERVER: where a server listens, and the process that serves (the one whose
# CPU time and memory are measured: all of ricochet, nginx's worker).
port_of() { if [ "$1" = nginx ]; then echo "$PORT_N"; else echo "$PORT_R"; fi; }
pid_of() { if [ "$1" = nginx ]; then echo "$NWORKER"; else echo "$RPID"; fi; }

# cpu_times PID: "UTIME STIME" of every thread of PID together, in clock ticks (fields 14 and 15 of
# /proc/PID/stat, counted after the parenthesised command name, which may hold spaces).
cpu_times() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12, $13}'; }

# measured FILE SERVER CMD...: runs a client command (output to FILE.txt) and writes FILE.json with the
# serving process's CPU times before and after it.
measured() {
    local file="$1" server="$2" pid before after
    shift 2
    pid=$(pid_of "$server")
    read -ra before <<<"$(cpu_times "$pid")"
    "$@" >"$file.txt" 2>&1
    read -ra after <<<"$(cpu_times "$pid")"
    printf '{"server": "%s", "pid": %s, "clk_tck": %s, "utime_before": %s, "stime_before": %s, "utime_after": %s, "stime_after": %s}\n' \
        "$server" "$pid" "$CLK_TCK" "${before[0]}" "${before[1]}" "${after[0]}" "${after[1]}" >"$file.json"
}

# (a) Latency and plain requests/s, not pipelined.
latency_runs() {
    local path c server port
    for path in /healthz /counter; do
        for c in $CONNS; do
            for server in ricochet nginx; do
                port=$(port_of "$server")
                log_cmd "taskset -c $CLIENT_CPU wrk -t1 -c$c -d${DURATION}s --latency http://127.0.0.1:$port$path"
                taskset -c "$CLIENT_CPU" wrk -t1 -c"$c" -d"${DURATION}s" --latency "http://127.0.0.1:$port$path" \
                    >"$RUNS/wrk-$server-${path#/}-c$c.txt" 2>&1
            done
        done
    done
}

# (b) Pipelined: wrk writes PIPELINE_DEPTH requests at once per connection and counts each response.
pipelined_runs() {
    local path c server port
    for path in /healthz /counter; do
        for c in $PIPELINE_CONNS; do
            for server in ricochet nginx; do
                port=$(port_of "$server")
                log_cmd "taskset -c $CLIENT_CPU wrk -t1 -c$c -d${DURATION}s --latency -s bench/http-pipeline.lua http://127.0.0.1:$port$path -- $PIPELINE_DEPTH"
                measured "$RUNS/pipelined-$server-${path#/}-c$c" "$server" \
                    taskset -c "$CLIENT_CPU" wrk -t1 -c"$c" -d"${DURATION}s" --latency \
                    -s bench/http-pipeline.lua "http://127.0.0.1:$port$path" -- "$PIPELINE_DEPTH"
            done
        done
    done
}

# (c) Server CPU per request at a fixed rate both servers sustain easily: h2load paces each of its
# CPU_CONNS connections at RATE / CPU_CONNS requests/s, one request in flight per connection.
cpu_runs() {
    local path server port per_conn=$((RATE / CPU_CONNS))
    for path in /healthz /counter; do
        for server in ricochet nginx; do
            port=$(port_of "$server")
            log_cmd "taskset -c $CLIENT_CPU h2load --h1 -t1 -c$CPU_CONNS --rps $per_conn -D $DURATION http://127.0.0.1:$port$path"
            measured "$RUNS/cpu-$server-${path#/}-c$CPU_CONNS" "$server" \
                taskset -c "$CLIENT_CPU" h2load --h1 -t1 -c"$CPU_CONNS" --rps "$per_conn" -D "$DURATION" \
                "http://127.0.0.1:$port$path"
        done
    done
}

# (d) Memory of idle keep-alive connections: RSS of the serving process before and after.
idle_runs() {
    local server port pid before after hold n=0
    for server in ricochet nginx; do
        port=$(port_of "$server")
        pid=$(pid_of "$server")
        before=$(rss_kib "$pid")
        log_cmd "$RICOCHET bench tcp://127.0.0.1:$port --connections $IDLE --hold 600s --sources 127.0.0.2,127.0.0.3"
        "$RICOCHET" bench "tcp://127.0.0.1:$port" --connections "$IDLE" --hold 600s --sources 127.0.0.2,127.0.0.3 >/dev/null 2>&1 &
        hold=$!
        n=$(wait_established "$port" "$IDLE")
        sleep 1
        after=$(rss_kib "$pid")
        kill "$hold"
        wait "$hold" 2>/dev/null || true
        echo "{\"server\": \"$server\", \"connections\": $n, \"rss_kib_before\": $before, \"rss_kib_after\": $after}" >"$RUNS/idle-$server.json"
        sleep 1
    done
}

start_ricochet
start_nginx
echo "== (a) latency, not pipelined (wrk --latency, ${DURATION}s runs at $CONNS connections)"
latency_runs
echo "== (b) pipelined, $PIPELINE_DEPTH deep (wrk -s bench/http-pipeline.lua at $PIPELINE_CONNS connections)"
pipelined_runs
echo "== (c) server CPU per request at $RATE requests/s (h2load --h1, $CPU_CONNS connections, ${DURATION}s)"
cpu_runs
echo "== (d) memory of $IDLE idle keep-alive connections"
idle_runs
cargo xtask report http "$RUNS" "$OUT/http.md"
