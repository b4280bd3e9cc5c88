#!/usr/bin/env bash
# bench/loopback.sh: the kernel datapath on loopback against sockperf's own server, in one run:
#   (a) ping-pong round trip, sockperf's client and ricochet's bench client, against sockperf's server
#       and ricochet's sockperf listener, in block and spin poll modes;
#   (b) counter throughput with the bench client at several connection counts and depths (UDP, TCP);
#   (c) the memory of many idle TCP connections (100,000 where the fd limit allows).
# (bench/latency.sh, the main job, compares all datapaths in the veth lab.)
# Writes bench/results/<date>/loopback/ (loopback.md, every run's JSON, .hgrm and raw output,
# commands.txt) and prints the table. Run as root: sudo bench/loopback.sh [--quick] [--duration S]
set -euo pipefail

usage() {
    cat <<'EOF'
usage: sudo bench/loopback.sh [--quick] [--duration SECONDS] [--rounds N] [--connections N] [--out DIR]
  --quick          short runs for CI (1 s each, one round, 2,000 idle connections)
  --rounds N       latency rounds, alternating which server runs first (default 3)
  --duration S     seconds per latency and throughput run (default 5)
  --connections N  idle TCP connections for the memory run (default 100000)
  --out DIR        results directory (default bench/results/<UTC date>)
EOF
}

DURATION=5
ROUNDS=3
IDLE_CONNS=100000
QUICK=0
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; DURATION=1; ROUNDS=1; IDLE_CONNS=2000 ;;
        --rounds) ROUNDS="${2:?--rounds needs a number}"; shift ;;
        --duration) DURATION="${2:?--duration needs seconds}"; shift ;;
        --connections) IDLE_CONNS="${2:?--connections needs a number}"; shift ;;
        --out) OUT="${2:?--out needs a directory}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench/loopback.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. "$ROOT/bench/lib.sh"
require_root bench/loopback.sh
install_group loopback
require_cargo bench/loopback.sh

echo "== building ricochet (release)"
cargo build --release --quiet -p ricochet
RICOCHET="$ROOT/target/release/ricochet"

OUT="${OUT:-$ROOT/bench/results/$(date -u +%F)/loopback}"
RUNS="$OUT/runs"
rm -rf "$RUNS"
mkdir -p "$RUNS"
INDEX="$RUNS/index.jsonl"
COMMANDS="$OUT/commands.txt"
: >"$INDEX"
{
    echo "# bench/loopback.sh $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "# duration per run: ${DURATION}s; latency rounds: $ROUNDS; quick=$QUICK"
} >"$COMMANDS"

# The server gets the last CPU, the client the first, so they never share a core.
NCPU=$(nproc)
SERVER_CPU=$((NCPU - 1))
CLIENT_CPU=0
PORT_BASE=$((20000 + RANDOM % 20000))

PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    PIDS=()
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

record() { # record KIND FILE key=value...
    local kind="$1" file="$2"; shift 2
    local fields="\"kind\":\"$kind\",\"file\":\"$file\""
    for kv in "$@"; do fields="$fields,\"${kv%%=*}\":\"${kv#*=}\""; done
    echo "{$fields}" >>"$INDEX"
}

# Starts ricochet serve in the background; sets SERVER_PID and waits until it is ready.
start_ricochet() { # start_ricochet NAME ARGS...
    local name="$1"; shift
    log_cmd "$RICOCHET serve $*"
    "$RICOCHET" serve "$@" >"$RUNS/$name.serve.txt" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    wait_ready "$SERVER_PID" "$RUNS/$name.serve.txt" && return 0
    echo "ricochet serve did not start:" >&2
    cat "$RUNS/$name.serve.txt" >&2
    exit 1
}

start_sockperf_server() { # start_sockperf_server NAME PORT EXTRA...
    local name="$1" port="$2"; shift 2
    log_cmd "taskset -c $SERVER_CPU sockperf server -i 127.0.0.1 -p $port $*"
    taskset -c "$SERVER_CPU" sockperf server -i 127.0.0.1 -p "$port" "$@" >"$RUNS/$name.server.txt" 2>&1 &
    SERVER_PID=$!
    PIDS+=("$SERVER_PID")
    sleep 0.5
}

sockperf_client() { # sockperf_client NAME PORT key=value...
    local name="$1" port="$2"; shift 2
    log_cmd "taskset -c $CLIENT_CPU sockperf ping-pong --full-rtt -i 127.0.0.1 -p $port -t $DURATION"
    taskset -c "$CLIENT_CPU" sockperf ping-pong --full-rtt -i 127.0.0.1 -p "$port" -t "$DURATION" >"$RUNS/$name.txt" 2>&1
    record latency "$name.txt" client=sockperf "$@"
}

bench_client() { # bench_client NAME KIND SPEC "BENCH ARGS" key=value...
    local name="$1" kind="$2" spec="$3" args="$4"; shift 4
    # shellcheck disable=SC2086
    log_cmd "$RICOCHET bench $spec $args --cpus $CLIENT_CPU --json --hgrm $name.hgrm"
    # shellcheck disable=SC2086
    "$RICOCHET" bench "$spec" $args --cpus "$CLIENT_CPU" --json --hgrm "$RUNS/$name.hgrm" >"$RUNS/$name.json"
    record "$kind" "$name.json" client=ricochet-bench "$@"
}

echo "== (a) ping-pong latency: sockperf's server vs ricochet's sockperf listener ($ROUNDS rounds of ${DURATION}s runs)"
# Rounds alternate which server goes first, so drift on the VM hits both alike; the report takes the
# median of each statistic over the rounds.
port=$PORT_BASE
latency_sockperf_server() { # ROUND POLL
    local round="$1" poll="$2" extra=()
    [ "$poll" = spin ] && extra=(--nonblocked)
    port=$((port + 1))
    start_sockperf_server "sockperf-server-$poll-r$round" "$port" "${extra[@]}"
    sockperf_client "lat-sockperf-$poll-sockperf-r$round" "$port" server=sockperf poll="$poll" round="$round"
    bench_client "lat-sockperf-$poll-bench-r$round" latency "sockperf+udp://127.0.0.1:$port" "--duration ${DURATION}s --warmup 200ms" server=sockperf poll="$poll" round="$round"
    stop_server
}
latency_ricochet() { # ROUND POLL
    local round="$1" poll="$2"
    port=$((port + 1))
    start_ricochet "ricochet-sockperf-$poll-r$round" --listen "sockperf+udp://127.0.0.1:$port" --cpus "$SERVER_CPU" --poll "$poll"
    sockperf_client "lat-ricochet-$poll-sockperf-r$round" "$port" server=ricochet poll="$poll" round="$round"
    bench_client "lat-ricochet-$poll-bench-r$round" latency "sockperf+udp://127.0.0.1:$port" "--duration ${DURATION}s --warmup 200ms" server=ricochet poll="$poll" round="$round"
    stop_server
}
for round in $(seq "$ROUNDS"); do
    for poll in block spin; do
        if [ $((round % 2)) = 1 ]; then
            latency_sockperf_server "$round" "$poll"; latency_ricochet "$round" "$poll"
        else
            latency_ricochet "$round" "$poll"; latency_sockperf_server "$round" "$poll"
        fi
    done
done

echo "== (b) counter throughput with the bench client"
if [ "$QUICK" = 1 ]; then conn_list="1 16"; depth_list="1 16"; else conn_list="1 16 64"; depth_list="1 16"; fi
for poll in block spin; do
    port=$((port + 1))
    start_ricochet "ricochet-counter-$poll" --listen "udp://127.0.0.1:$port" --listen "tcp://127.0.0.1:$port" --cpus "$SERVER_CPU" --poll "$poll"
    for transport in udp tcp; do
        for c in $conn_list; do
            for d in $depth_list; do
                bench_client "tput-$poll-$transport-c$c-d$d" throughput "$transport://127.0.0.1:$port" \
                    "--duration ${DURATION}s --warmup 200ms -c $c -d $d" server=ricochet poll="$poll" transport="$transport" connections="$c" depth="$d"
            done
        done
    done
    stop_server
    cp "$RUNS/ricochet-counter-$poll.serve.txt" "$RUNS/ricochet-counter-$poll.final.txt"
done

echo "== (c) memory of idle TCP connections"
# One process may hold at most RLIMIT_NOFILE descriptors. Raise it if we can (needs CAP_SYS_RESOURCE);
# otherwise measure as many connections as the limit allows and say so.
want=$((IDLE_CONNS + 1000))
ulimit -Hn "$want" 2>/dev/null || true
ulimit -n "$(ulimit -Hn)"
limit=$(ulimit -n)
conns=$IDLE_CONNS
note=""
if [ "$limit" -lt "$want" ]; then
    conns=$((limit - 1000))
    note="RLIMIT_NOFILE is $limit here and cannot be raised (no CAP_SYS_RESOURCE): measured $conns connections instead of $IDLE_CONNS"
    echo "   $note"
fi
port=$((port + 1))
sources="127.0.0.2,127.0.0.3,127.0.0.4,127.0.0.5,127.0.0.6,127.0.0.7,127.0.0.8,127.0.0.9"
kernel_kib() { awk '/^Slab:/ {print $2}' /proc/meminfo; }
start_ricochet "ricochet-idle" --listen "tcp://127.0.0.1:$port" --cpus "$SERVER_CPU"
sync; echo 2 >/proc/sys/vm/drop_caches 2>/dev/null || true
sleep 0.5
rss0=$(rss_kib "$SERVER_PID"); slab0=$(kernel_kib)
per_client=$((limit - 1000))
remaining=$conns
client_pids=()
while [ "$remaining" -gt 0 ]; do
    n=$(( remaining < per_client ? remaining : per_client ))
    log_cmd "$RICOCHET bench tcp://127.0.0.1:$port --connections $n --hold 600s --sources $sources"
    "$RICOCHET" bench "tcp://127.0.0.1:$port" --connections "$n" --hold 600s --sources "$sources" >>"$RUNS/idle-clients.txt" 2>&1 &
    client_pids+=($!)
    PIDS+=($!)
    remaining=$((remaining - n))
done
established=$(wait_established "$port" "$conns")
sleep 1
rss1=$(rss_kib "$SERVER_PID"); slab1=$(kernel_kib)
for pid in "${client_pids[@]}"; do kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; done
stop_server
cat >"$RUNS/idle.json" <<EOF
{"requested": $IDLE_CONNS, "connections": $established, "fd_limit": $limit, "note": "$note",
 "server_rss_kib_before": $rss0, "server_rss_kib_after": $rss1,
 "slab_kib_before": $slab0, "slab_kib_after": $slab1}
EOF
record idle idle.json

echo "== report"
cargo xtask report loopback "$OUT"
