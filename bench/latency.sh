#!/usr/bin/env bash
# bench/latency.sh: the main job. On a fresh machine, as root: installs what is missing, builds ricochet,
# brings up the veth lab, and for each datapath (kernel block, kernel spin, afxdp, xdp) runs the same
# ricochet bench ping-pong and throughput runs over UDP and over TCP, a fixed-rate run for machine CPU per
# request, and sockperf's client; sockperf's own server runs as the peer reference. Ping-pong uses the sockperf
# protocol everywhere, so every server answers the same messages. The lab is torn down on exit, also on
# failure or Ctrl-C. Writes bench/results/<date>/ (results.md, latency.svg, every run's JSON, .hgrm and
# raw output, commands.txt) and prints the table. Fails if any mode lost or mis-answered a request.
#
# usage: sudo bench/latency.sh [--quick] [--duration SECONDS] [--rounds N] [--out DIR]
#   --quick        1 s per run (CI)
#   --duration S   seconds per run (default 6: the whole run stays under 3 minutes)
#   --rounds N     repeat every run N times, alternating the order of the modes (default 1)
set -euo pipefail

DURATION=6
ROUNDS=1
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) DURATION=1 ;;
        --duration) DURATION="${2:?--duration needs seconds}"; shift ;;
        --rounds) ROUNDS="${2:?--rounds needs a number}"; shift ;;
        --out) OUT="${2:?--out needs a directory}"; shift ;;
        -h|--help) sed -n 2,14p "$0"; exit 0 ;;
        *) echo "bench/latency.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. "$ROOT/bench/lib.sh"
require_root bench/latency.sh
install_group latency
require_cargo bench/latency.sh

echo "== building ricochet (release)"
cargo build --release --quiet -p ricochet
cargo build --quiet -p xtask
RICOCHET="$ROOT/target/release/ricochet"
OUT="${OUT:-$ROOT/bench/results/$(date -u +%F)}"
RUNS="$OUT/runs"
rm -rf "$RUNS"
mkdir -p "$RUNS"
INDEX="$RUNS/index.jsonl"
COMMANDS="$RUNS/commands.txt"
: >"$INDEX"
{
    echo "# bench/latency.sh $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    echo "# $DURATION s per run, $ROUNDS round(s); responder on the last CPU, client on CPU 0"
} >"$COMMANDS"

NCPU=$(nproc)
SERVER_CPU=$((NCPU - 1))
CLIENT_CPU=0
SRV=ricochet-srv
CLI=ricochet-cli
ADDR=198.18.0.1
CPU_RATE=20000

SERVER_PID=""
lab_down() { ip netns del "$SRV" 2>/dev/null || true; ip netns del "$CLI" 2>/dev/null || true; }
cleanup() {
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    lab_down
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

record() { # record KIND MODE FILE
    echo "{\"kind\":\"$1\",\"mode\":\"$2\",\"file\":\"$3\",\"round\":$round}" >>"$INDEX"
}

echo "== lab up (one queue)"
log_cmd "cargo xtask lab up --queues 1"
cargo xtask lab up --queues 1 >/dev/null

start_server() { # start_server NAME ARGS...
    local name="$1"; shift
    log_cmd "ip netns exec $SRV $*"
    ip netns exec "$SRV" "$@" >"$RUNS/$name.server.txt" 2>&1 &
    SERVER_PID=$!
    wait_ready "$SERVER_PID" "$RUNS/$name.server.txt" && return 0
    # sockperf's server prints no ready line: give it a moment.
    kill -0 "$SERVER_PID" 2>/dev/null && { sleep 0.5; return 0; }
    echo "the server did not start:" >&2
    cat "$RUNS/$name.server.txt" >&2
    exit 1
}

bench() { # bench NAME SPEC ARGS...
    local name="$1" spec="$2"; shift 2
    log_cmd "ip netns exec $CLI $RICOCHET bench $spec $* --cpus $CLIENT_CPU --json --hgrm $name.hgrm"
    ip netns exec "$CLI" "$RICOCHET" bench "$spec" "$@" --cpus "$CLIENT_CPU" --json --hgrm "$RUNS/$name.hgrm" >"$RUNS/$name.json"
}

sockperf_client() { # sockperf_client NAME
    log_cmd "ip netns exec $CLI taskset -c $CLIENT_CPU sockperf ping-pong --full-rtt -i $ADDR -p 11111 -t $DURATION"
    ip netns exec "$CLI" taskset -c "$CLIENT_CPU" sockperf ping-pong --full-rtt -i "$ADDR" -p 11111 -t "$DURATION" >"$RUNS/$1.txt" 2>&1
}

# Whole-machine CPU during a fixed-rate run: busy = wall time x CPUs - idle time. On veth the XDP
# program and softirqs run in the sender's context, so the responder's own CPU time would hide them;
# /proc/stat's busy fields are tick samples that miss short bursts, its idle time is exact (NOHZ).
cpu_run() { # cpu_run NAME SPEC
    local idle0 idle1 wall0 wall1
    idle0=$(awk '/^cpu / {print $5+$6}' /proc/stat); wall0=$(date +%s%N)
    bench "$1" "$2" --duration "${DURATION}s" --rate "$CPU_RATE" -c 4 --timeout 2s
    wall1=$(date +%s%N); idle1=$(awk '/^cpu / {print $5+$6}' /proc/stat)
    echo "{\"wall_ns\": $((wall1 - wall0)), \"idle_jiffies\": $((idle1 - idle0)), \"clk_tck\": $(getconf CLK_TCK), \"cpus\": $NCPU, \"rate\": $CPU_RATE, \"bench\": \"$1.json\"}" >"$RUNS/$1.cpu.json"
}

listeners=(--listen "udp://$ADDR:7777" --listen "sockperf+udp://$ADDR:11111" --listen "tcp://$ADDR:7777"
    --listen "sockperf+tcp://$ADDR:11112" --cpus "$SERVER_CPU" --http off)
run_mode() { # run_mode MODE
    local mode="$1" args=()
    case "$mode" in
        kernel-block) args=(--mode kernel --poll block) ;;
        kernel-spin) args=(--mode kernel --poll spin) ;;
        afxdp) args=(--mode afxdp --iface veth-srv --poll spin) ;;
        xdp) args=(--mode xdp --iface veth-srv) ;;
        sockperf-server) ;;
    esac
    local tag="$mode-r$round"
    if [ "$mode" = sockperf-server ]; then
        start_server "$tag" taskset -c "$SERVER_CPU" sockperf server -i "$ADDR" -p 11111
    else
        start_server "$tag" "$RICOCHET" serve "${args[@]}" "${listeners[@]}"
    fi
    # The bench client spins so its own wake-up does not hide the servers' differences.
    bench "pingpong-$tag" "sockperf+udp://$ADDR:11111" --duration "${DURATION}s" --warmup 300ms --spin
    record pingpong "$mode" "pingpong-$tag.json"
    sockperf_client "sockperf-$tag"
    record sockperf "$mode" "sockperf-$tag.txt"
    if [ "$mode" != sockperf-server ]; then
        bench "throughput-$tag" "udp://$ADDR:7777" --duration "${DURATION}s" --warmup 300ms -c 16 -d 16 --timeout 2s
        record throughput "$mode" "throughput-$tag.json"
        cpu_run "cpu-$tag" "udp://$ADDR:7777"
        record cpu "$mode" "cpu-$tag.cpu.json"
        # The same over TCP: the kernel's TCP stack (kernel modes), TCP-lite (afxdp and xdp).
        bench "pingpong-tcp-$tag" "sockperf+tcp://$ADDR:11112" --duration "${DURATION}s" --warmup 300ms --spin
        record pingpong-tcp "$mode" "pingpong-tcp-$tag.json"
        bench "throughput-tcp-$tag" "tcp://$ADDR:7777" --duration "${DURATION}s" --warmup 300ms -c 16 -d 16 --timeout 2s
        record throughput-tcp "$mode" "throughput-tcp-$tag.json"
        cpu_run "cpu-tcp-$tag" "tcp://$ADDR:7777"
        record cpu-tcp "$mode" "cpu-tcp-$tag.cpu.json"
    fi
    stop_server
}

for round in $(seq "$ROUNDS"); do
    if [ $((round % 2)) = 1 ]; then
        order="sockperf-server kernel-block kernel-spin afxdp xdp"
    else
        order="xdp afxdp kernel-spin kernel-block sockperf-server"
    fi
    for mode in $order; do
        echo "== round $round: $mode"
        run_mode "$mode"
    done
done
lab_down

echo "== report"
cargo xtask report "$OUT"
