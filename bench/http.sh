#!/usr/bin/env bash
# bench/http.sh: ricochet's HTTP endpoints against nginx on loopback, in one run, with the same wrk
# settings: GET /healthz and GET /counter at several connection counts, and the memory of 10,000 idle
# keep-alive connections. One server worker pinned to the last CPU, wrk pinned to CPU 0; nginx is
# configured here to return the same bodies with keep-alive.
# Writes bench/results/<date>/http.md with every run's raw output and the exact commands.
# Run as root: sudo bench/http.sh [--quick] [--duration SECONDS] [--out DIR]
set -euo pipefail

DURATION=10
IDLE=10000
CONNS="10 100 1000"
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) DURATION=2; IDLE=2000; CONNS="10 100" ;;
        --duration) DURATION="${2:?}"; shift ;;
        --out) OUT="${2:?}"; shift ;;
        -h|--help) sed -n 2,8p "$0"; exit 0 ;;
        *) echo "bench/http.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. "$ROOT/bench/lib.sh"
require_root bench/http.sh
install_group http
require_cargo bench/http.sh
cargo build --release --quiet -p ricochet
RICOCHET="$ROOT/target/release/ricochet"
OUT="${OUT:-$ROOT/bench/results/$(date -u +%F)}"
RUNS="$OUT/http-runs"
rm -rf "$RUNS"; mkdir -p "$RUNS"
COMMANDS="$RUNS/commands.txt"
echo "# bench/http.sh $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >"$COMMANDS"

NCPU=$(nproc)
SERVER_CPU=$((NCPU - 1))
CLIENT_CPU=0
PORT_R=$((30000 + RANDOM % 10000))
PORT_N=$((PORT_R + 1))
PIDS=()
NGINX_DIR=$(mktemp -d)
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    [ -f "$NGINX_DIR/nginx.pid" ] && kill "$(cat "$NGINX_DIR/nginx.pid")" 2>/dev/null || true
    sleep 0.5
    rm -rf "$NGINX_DIR"
}
trap cleanup EXIT

# ricochet: the packet worker on CPU 0 (idle here), so its one HTTP worker runs on the last CPU.
echo "$RICOCHET serve --listen udp://127.0.0.1:0 --cpus $CLIENT_CPU --http 127.0.0.1:$PORT_R --http-workers 1 --http-rate-limit 0" >>"$COMMANDS"
"$RICOCHET" serve --listen udp://127.0.0.1:0 --cpus "$CLIENT_CPU" --http "127.0.0.1:$PORT_R" --http-workers 1 --http-rate-limit 0 >"$RUNS/ricochet.txt" 2>&1 &
RPID=$!
PIDS+=("$RPID")

# nginx's CPU mask in binary: a 1 followed by SERVER_CPU zeros.
AFFINITY=1
for ((i = 0; i < SERVER_CPU; i++)); do AFFINITY="${AFFINITY}0"; done
cat >"$NGINX_DIR/nginx.conf" <<EOF
worker_processes 1;
worker_cpu_affinity $AFFINITY;
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
echo "nginx -c nginx.conf (bench/results/.../http-runs/nginx.conf)" >>"$COMMANDS"
nginx -c "$NGINX_DIR/nginx.conf" -p "$NGINX_DIR" &
PIDS+=($!)
for _ in $(seq 50); do (echo >"/dev/tcp/127.0.0.1/$PORT_N") 2>/dev/null && break; sleep 0.1; done
for _ in $(seq 50); do (echo >"/dev/tcp/127.0.0.1/$PORT_R") 2>/dev/null && break; sleep 0.1; done
NPID=$(cat "$NGINX_DIR/nginx.pid")
NWORKER=$(pgrep -P "$NPID" | head -1)

for path in /healthz /counter; do
    for c in $CONNS; do
        for server in ricochet nginx; do
            port=$PORT_R; [ $server = nginx ] && port=$PORT_N
            name="wrk-$server-${path#/}-c$c"
            echo "taskset -c $CLIENT_CPU wrk -t1 -c$c -d${DURATION}s --latency http://127.0.0.1:$port$path" >>"$COMMANDS"
            taskset -c "$CLIENT_CPU" wrk -t1 -c"$c" -d"${DURATION}s" --latency "http://127.0.0.1:$port$path" >"$RUNS/$name.txt" 2>&1
        done
    done
done

# Memory of idle keep-alive connections: RSS of the serving process before and after.
for server in ricochet nginx; do
    port=$PORT_R; pid=$RPID
    [ $server = nginx ] && { port=$PORT_N; pid=$NWORKER; }
    before=$(rss_kib "$pid")
    echo "$RICOCHET bench tcp://127.0.0.1:$port --connections $IDLE --hold 600s --sources 127.0.0.2,127.0.0.3" >>"$COMMANDS"
    "$RICOCHET" bench "tcp://127.0.0.1:$port" --connections "$IDLE" --hold 600s --sources 127.0.0.2,127.0.0.3 >/dev/null 2>&1 &
    hold=$!
    for _ in $(seq 300); do
        n=$(ss -Htn state established "( sport = :$port )" | wc -l)
        [ "$n" -ge "$IDLE" ] && break
        sleep 0.1
    done
    sleep 1
    after=$(rss_kib "$pid")
    kill "$hold"; wait "$hold" 2>/dev/null || true
    echo "{\"server\": \"$server\", \"connections\": $n, \"rss_kib_before\": $before, \"rss_kib_after\": $after}" >"$RUNS/idle-$server.json"
    sleep 1
done

cargo xtask report http "$RUNS" "$OUT/http.md"
