#!/usr/bin/env bash
# bench/durability.sh: what the durable counter and the fleet cost UDP ping-pong, in one run. The kernel
# datapath on loopback answers `ricochet bench udp://127.0.0.1:PORT` (counter protocol, one socket,
# depth 1, spinning client) in four configurations, interleaved in rounds with the order rotated each
# round so that the VM's drift hits all of them alike:
#   A  no --state-dir (the baseline)
#   B  --state-dir: the live counter in a shared file mapping, snapshots with fdatasync every 100 ms,
#      the per-second history in SQLite
#   C  B plus --fleet: the history shipped to a PostgreSQL cluster that runs throughout
#   D  C with the cluster stopped (pg_ctl stop -m immediate, a crash) once the server is up and before
#      the bench starts; it is started again after the bench
# Every run is checked: the bench's replies are exact (no lost, invalid, non-increasing or repeated
# value), the server's counter (GET /counter) equals the last value the bench saw, and for C and D the
# fleet (ricochet fleet summary --json) shows the run's instance with increments equal to the counter
# once shipped (for D after the cluster is back). A failed check is reported loudly, the run goes on,
# and the script exits 1 at the end.
# The throwaway PostgreSQL cluster (Debian's binaries, initdb and pg_ctl as the postgres user, fsync
# on) lives in a temporary directory on a free loopback port and is stopped and removed on exit, also
# on failure or Ctrl-C; so is every ricochet started here. State directories are on disk (/var/tmp),
# so fdatasync does real work. Server worker on the last CPU, bench client on CPU 0.
# Writes OUT/durability.md (default bench/results/<UTC date>) and OUT/durability-runs/ with every run's
# JSON, .hgrm and server output, the fleet summaries and the exact commands.
# Run as root: sudo bench/durability.sh [--quick] [--rounds N] [--duration S] [--poll MODE] [--no-build] [--out DIR]
set -euo pipefail

usage() {
    cat <<'EOF'
usage: sudo bench/durability.sh [--quick] [--rounds N] [--duration S] [--poll MODE] [--no-build] [--out DIR]
  --quick          1 round of 1 s runs (CI): shows that every configuration serves and checks out
  --rounds N       rounds of the four configurations, order rotated each round (default 4: each
                   configuration once in each position)
  --duration S     measured seconds per ping-pong run, after a 1 s warm-up (default 10)
  --poll MODE      the server worker's --poll, block or spin (default block, serve's default)
  --no-build       use target/release/ricochet as it is (default: cargo build --release -p ricochet)
  --out DIR        results directory (default bench/results/<UTC date>)
EOF
}

INVOCATION="bench/durability.sh${*:+ $*}"
ROUNDS=4
DURATION=10
WARMUP=1s
POLL=block
BUILD=1
OUT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) ROUNDS=1; DURATION=1 ;;
        --rounds) ROUNDS="${2:?--rounds needs a number}"; shift ;;
        --duration) DURATION="${2:?--duration needs seconds}"; shift ;;
        --poll) POLL="${2:?--poll needs block or spin}"; shift ;;
        --no-build) BUILD=0 ;;
        --out) OUT="${2:?--out needs a directory}"; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench/durability.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
case "$POLL" in block|spin) ;; *) echo "bench/durability.sh: --poll takes block or spin" >&2; exit 2 ;; esac
[[ "$ROUNDS" =~ ^[1-9][0-9]?$ ]] || { echo "bench/durability.sh: --rounds takes 1 to 99" >&2; exit 2; }
[[ "$DURATION" =~ ^[1-9][0-9]{0,3}$ ]] || { echo "bench/durability.sh: --duration takes whole seconds, 1 to 9999" >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
. "$ROOT/bench/lib.sh"
require_root bench/durability.sh
install_missing taskset:util-linux runuser:util-linux jq:jq curl:curl \
    /usr/lib/postgresql/15/bin/initdb:postgresql
RICOCHET="$ROOT/target/release/ricochet"
if [ "$BUILD" = 1 ]; then
    require_cargo bench/durability.sh
    echo "== building ricochet (release)"
    cargo build --release --quiet -p ricochet
fi
[ -x "$RICOCHET" ] || { echo "bench/durability.sh: $RICOCHET is missing: build it or drop --no-build" >&2; exit 1; }
OUT="${OUT:-$ROOT/bench/results/$(date -u +%F)}"
RUNS="$OUT/durability-runs"
rm -rf "$RUNS"
mkdir -p "$RUNS"
COMMANDS="$RUNS/commands.txt"
ROWS="$RUNS/rows.tsv"
FAILURES="$RUNS/failures.txt"
: >"$FAILURES"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
# Whether the sources differ from the commit (the binary may then not be the commit's).
DIRTY="$(git status --porcelain -- userspace/src userspace/build.rs userspace/Cargo.toml ebpf Cargo.toml Cargo.lock 2>/dev/null | wc -l)"
{
    echo "# bench/durability.sh $(date -u +%FT%TZ), commit $COMMIT ($DIRTY changed source files)"
    echo "# $ROUNDS round(s) of A B C D rotated; $DURATION s per run after a $WARMUP warm-up; server --poll $POLL"
    echo "# binary sha256 $(sha256sum "$RICOCHET" | cut -c1-16)"
} >"$COMMANDS"

NCPU=$(nproc)
SERVER_CPU=$((NCPU - 1))
CLIENT_CPU=0
CLK_TCK=$(getconf CLK_TCK)
START=$(date +%s)

# The PostgreSQL server's newest installed version, as the fleet tests pick it.
PGBIN=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -1)
[ -x "$PGBIN/initdb" ] || { echo "bench/durability.sh: no PostgreSQL server under /usr/lib/postgresql" >&2; exit 1; }
WORK=$(mktemp -d /var/tmp/ricochet-durability.XXXXXX)
PGDIR="$WORK/pg"
PG_STARTED=0
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "$PG_STARTED" = 1 ]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$PGDIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

die() { echo "bench/durability.sh: $*" >&2; exit 1; }
fail() { echo "CHECK FAILED: $*" | tee -a "$FAILURES" >&2; }

# free_port: a loopback TCP port nothing listens on (at most 50 tries).
free_port() {
    local port
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 30000))
        if [ -z "$(ss -Htan "( sport = :$port )")" ]; then echo "$port"; return 0; fi
    done
    die "no free loopback port found"
}

# as_postgres CMD...: a PostgreSQL tool run as the postgres user, its output kept in the run's pg.txt.
as_postgres() {
    log_cmd "runuser -u postgres -- $*"
    runuser -u postgres -- "$@" >>"$RUNS/pg.txt" 2>&1 || { tail -20 "$RUNS/pg.txt" >&2; die "'$*' failed"; }
}

pg_init() {
    # WORK stays root's (ricochet, without capabilities once set up, must still reach its state
    # directories in it); the postgres user may only pass through it to its own directory.
    chmod 711 "$WORK"
    mkdir -p "$PGDIR"
    chown postgres "$PGDIR"
    PGPORT=$(free_port)
    PGURL="postgresql://postgres@127.0.0.1:$PGPORT/postgres"
    as_postgres "$PGBIN/initdb" -D "$PGDIR/data" -A trust -U postgres --no-sync
    PG_STARTED=1
    pg_start
}
pg_start() {
    as_postgres "$PGBIN/pg_ctl" -D "$PGDIR/data" -o "-k $PGDIR -p $PGPORT -c listen_addresses=127.0.0.1" \
        -l "$PGDIR/log" -w -t 30 start
}
pg_crash() { as_postgres "$PGBIN/pg_ctl" -D "$PGDIR/data" -m immediate -w stop; }

# start_server TAG ARGS...: ricochet serve in the background; sets SERVER_PID, UDP_PORT and HTTP_PORT.
start_server() {
    local tag="$1" out="$RUNS/$1.server.txt"
    shift
    log_cmd "$RICOCHET $*"
    "$RICOCHET" "$@" >"$out" 2>&1 &
    SERVER_PID=$!
    wait_ready "$SERVER_PID" "$out" || { cat "$out" >&2; die "the server for $tag did not start"; }
    UDP_PORT=$(sed -n 's|^listening counter+udp://127\.0\.0\.1:||p' "$out")
    HTTP_PORT=$(sed -n 's|^http http://127\.0\.0\.1:||p' "$out")
    if [ -z "$UDP_PORT" ] || [ -z "$HTTP_PORT" ]; then die "no UDP or HTTP port in $out"; fi
}

# counter_now: the server's counter from GET /counter.
counter_now() {
    curl -sf --max-time 5 "http://127.0.0.1:$HTTP_PORT/counter" | jq -er .value
}

# cpu_ticks PID: utime + stime of every thread of PID, in clock ticks.
cpu_ticks() { sed 's/^.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }

# fleet_increments INSTANCE FILE: the instance's increments in the fleet database (empty if none yet);
# the summary is saved in FILE.
fleet_increments() {
    "$RICOCHET" fleet summary --fleet "$PGURL" --json >"$2" 2>&1 || { echo ""; return 0; }
    jq -r --arg i "$1" '.instances[$i].increments // empty' "$2"
}

# wait_instance INSTANCE: waits (at most 15 s) until the instance has shipped its first records, so
# that the run starts with the shipper connected (and D then takes that connection away).
wait_instance() {
    for _ in $(seq 30); do
        [ -n "$(fleet_increments "$1" "$RUNS/$1.fleet-first.json")" ] && return 0
        sleep 0.5
    done
    fail "$1: nothing shipped to the fleet within 15 s of start-up"
}

# wait_shipped INSTANCE WANT: waits (at most 90 s: after an outage the shipper's backoff reaches
# tens of seconds) until the fleet holds exactly WANT increments for INSTANCE; prints the seconds waited.
wait_shipped() {
    local t0 got=""
    t0=$(date +%s%N)
    for _ in $(seq 180); do
        got=$(fleet_increments "$1" "$RUNS/$1.fleet.json")
        [ "$got" = "$2" ] && break
        sleep 0.5
    done
    if [ "$got" = "$2" ]; then
        awk -v a="$t0" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'
    else
        echo never
        fail "$1: the fleet holds ${got:-no} increments, the counter is $2 (after 90 s)"
    fi
}

# run_config CONFIG ROUND: one ping-pong run of a configuration, checked; appends a row to ROWS.
run_config() {
    local config="$1" round="$2" tag="$1-r$2" state="$WORK/state-$1-r$2" instance
    instance="durability-$tag"
    local args=(serve --mode kernel --listen udp://127.0.0.1:0 --cpus "$SERVER_CPU" --poll "$POLL"
        --http 127.0.0.1:0 --http-workers 1)
    case "$config" in
        B) args+=(--state-dir "$state") ;;
        C|D) args+=(--state-dir "$state" --fleet "$PGURL" --instance "$instance" --fleet-interval 1s) ;;
    esac
    start_server "$tag" "${args[@]}"
    case "$config" in C|D) wait_instance "$instance" ;; *) sleep 1 ;; esac
    if [ "$config" = D ]; then pg_crash; fi

    local cmd=("$RICOCHET" bench "udp://127.0.0.1:$UDP_PORT" --duration "${DURATION}s" --warmup "$WARMUP"
        --cpus "$CLIENT_CPU" --spin --json --hgrm "$RUNS/$tag.hgrm")
    log_cmd "${cmd[*]}"
    local ticks0 ticks1 wall0 wall1 rc=0
    ticks0=$(cpu_ticks "$SERVER_PID"); wall0=$(date +%s%N)
    "${cmd[@]}" >"$RUNS/$tag.json" 2>"$RUNS/$tag.stderr" || rc=$?
    [ -s "$RUNS/$tag.stderr" ] || rm "$RUNS/$tag.stderr"
    wall1=$(date +%s%N); ticks1=$(cpu_ticks "$SERVER_PID")
    local counter
    counter=$(counter_now) || die "$tag: GET /counter failed"

    [ "$rc" = 0 ] || fail "$tag: ricochet bench exited $rc ($(tr '\n' ' ' <"$RUNS/$tag.stderr" 2>/dev/null))"
    jq -e . "$RUNS/$tag.json" >/dev/null 2>&1 || die "$tag: the bench printed no JSON"
    local bad
    bad=$(jq -r '{lost, late, invalid_replies, non_increasing, duplicate_values, unanswered: (.sent - .received)}
        | to_entries[] | select(.value != 0) | "\(.key)=\(.value)"' "$RUNS/$tag.json" | tr '\n' ' ')
    [ -z "$bad" ] || fail "$tag: the bench's replies are not exact: $bad"
    local last
    last=$(jq -r .last_counter_value "$RUNS/$tag.json")
    [ "$last" = "$counter" ] || fail "$tag: GET /counter says $counter, the bench's last reply $last"

    local shipped_s=-
    if [ "$config" = D ]; then pg_start; fi
    if [ "$config" = C ] || [ "$config" = D ]; then
        shipped_s=$(wait_shipped "$instance" "$counter")
    fi
    stop_server
    case "$shipped_s" in
        -) echo "== $tag: counter $counter" ;;
        never) echo "== $tag: counter $counter, NOT in the fleet" ;;
        *) echo "== $tag: counter $counter, in the fleet after $shipped_s s" ;;
    esac

    jq -r --arg c "$config" --arg r "$round" --arg counter "$counter" --arg shipped "$shipped_s" \
        --arg cpu "$(awk -v t=$((ticks1 - ticks0)) -v hz="$CLK_TCK" -v w=$((wall1 - wall0)) 'BEGIN { printf "%.1f", 100 * t / hz / (w / 1e9) }')" \
        '.latency_ns as $l | [$c, $r, ($l.p50 // 0) / 1e3, ($l.p99 // 0) / 1e3, ($l.p99_9 // 0) / 1e3, ($l.max // 0) / 1e3,
          .throughput_rps, .sent, .received, .lost, $counter, $shipped, $cpu] | @tsv' \
        "$RUNS/$tag.json" >>"$ROWS"
}

echo "== PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') cluster in $PGDIR"
pg_init
printf 'config\tround\tp50_us\tp99_us\tp99_9_us\tmax_us\trps\tsent\treceived\tlost\tcounter\tshipped_s\tserver_cpu_pct\n' >"$ROWS"
CONFIGS=(A B C D)
for round in $(seq "$ROUNDS"); do
    order=()
    for i in 0 1 2 3; do order+=("${CONFIGS[$(((i + round - 1) % 4))]}"); done
    echo "== round $round: ${order[*]}"
    for config in "${order[@]}"; do run_config "$config" "$round"; done
done
RUNTIME=$(($(date +%s) - START))

# --- the report -------------------------------------------------------------------------------------

# stats CONFIG COLUMN: "median min max" of a column over the configuration's rounds.
stats() {
    awk -F'\t' -v c="$1" -v col="$2" 'NR > 1 && $1 == c { print $col }' "$ROWS" | sort -g |
        awk '{ v[NR] = $1 } END { m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; print m, v[1], v[NR] }'
}
# cell CONFIG COLUMN DECIMALS: "median (min–max)".
cell() {
    stats "$1" "$2" | awk -v d="$3" '{ printf "%.*f (%.*f–%.*f)", d, $1, d, $2, d, $3 }'
}
# ratio NUM DEN COLUMN: the ratio of the medians, and the min–max of the per-round ratios (the rounds
# pair the runs that ran close together in time).
ratio() {
    local m
    m=$(awk -v a="$(stats "$1" "$3" | cut -d' ' -f1)" -v b="$(stats "$2" "$3" | cut -d' ' -f1)" 'BEGIN { printf "%.2f", a / b }')
    awk -F'\t' -v n="$1" -v d="$2" -v col="$3" -v m="$m" '
        NR > 1 && $1 == n { num[$2] = $col }
        NR > 1 && $1 == d { den[$2] = $col }
        END {
            lo = ""; hi = ""
            for (r in num) if (r in den) { x = num[r] / den[r]; if (lo == "" || x < lo) lo = x; if (hi == "" || x > hi) hi = x }
            printf "%s (%.2f–%.2f)", m, lo, hi
        }' "$ROWS"
}

FAILED=$(wc -l <"$FAILURES")
{
    echo "# The cost of durability on UDP ping-pong"
    echo
    echo "\`$INVOCATION\` (as root) on $(date -u +%F), commit $COMMIT; $(nproc) CPUs ($(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)),"
    echo "Linux $(uname -r), state directories on $(df -T /var/tmp | awk 'NR == 2 {print $2}') ($(findmnt -no SOURCE -T /var/tmp)), PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') (fsync on) on the same machine."
    echo "Run time $((RUNTIME / 60)) min $((RUNTIME % 60)) s. Raw outputs and the exact commands: [durability-runs/](durability-runs/)."
    echo
    echo "\`ricochet serve --mode kernel --poll $POLL\` with one worker pinned to CPU $SERVER_CPU, answering \`ricochet bench udp://127.0.0.1:PORT\`"
    echo "(counter protocol, one socket, depth 1, \`--spin\`, pinned to CPU $CLIENT_CPU) for $DURATION s after a ${WARMUP%s} s warm-up,"
    echo "$ROUNDS round(s) of the four configurations, the order rotated each round (A B C D, B C D A, ...):"
    echo
    echo "- **A**: no \`--state-dir\` (the baseline)"
    echo "- **B**: \`--state-dir\` (durable counter, snapshots with fdatasync every 100 ms, per-second history in SQLite)"
    echo "- **C**: B plus \`--fleet\` to a PostgreSQL cluster that is running (\`--fleet-interval 1s\`)"
    echo "- **D**: C with the cluster crashed (\`pg_ctl stop -m immediate\`) after the server shipped its first records"
    echo "  and before the bench; it is started again after the bench"
    echo
    echo "Median over the rounds, (min–max) in brackets; latencies in µs, round trips as the client sees them."
    echo "Server CPU is the whole process's utime + stime over the bench's wall time (warm-up included)."
    echo
    echo "| config | p50 µs | p99 µs | p99.9 µs | max µs | replies/s | server CPU % |"
    echo "|---|---|---|---|---|---|---|"
    for c in A B C D; do
        echo "| $c | $(cell $c 3 2) | $(cell $c 4 2) | $(cell $c 5 1) | $(cell $c 6 0) | $(cell $c 7 0) | $(cell $c 13 1) |"
    done
    echo
    echo "Ratios of the medians, and in brackets the min–max of the same ratio within each round:"
    echo
    echo "| ratio | p50 | p99 | replies/s |"
    echo "|---|---|---|---|"
    echo "| B / A (cost of durability) | $(ratio B A 3) | $(ratio B A 4) | $(ratio B A 7) |"
    echo "| C / A (durability and fleet) | $(ratio C A 3) | $(ratio C A 4) | $(ratio C A 7) |"
    echo "| D / C (a dead database) | $(ratio D C 3) | $(ratio D C 4) | $(ratio D C 7) |"
    echo
    echo "## Checks"
    echo
    if [ "$FAILED" = 0 ]; then
        echo "Every run passed: no request lost, late or mis-answered (\`lost\`, \`late\`, \`invalid_replies\`, \`non_increasing\`,"
        echo "\`duplicate_values\` all 0, every request answered), the server's counter (\`GET /counter\`) equal to the bench's"
        echo "last reply, and for C and D \`ricochet fleet summary --json\` showing the run's instance with increments equal to"
        echo "the counter (D: after PostgreSQL came back)."
    else
        echo "**$FAILED CHECK(S) FAILED:**"
        echo
        sed 's/^CHECK FAILED: /- /' "$FAILURES"
    fi
    echo
    echo "| run | requests measured | lost | counter (warm-up included) | shipped, s after the bench |"
    echo "|---|---|---|---|---|"
    awk -F'\t' 'NR > 1 { printf "| %s-r%s | %s | %s | %s | %s |\n", $1, $2, $8, $10, $11, $12 }' "$ROWS"
    echo
    echo "## Every run"
    echo
    echo "| run | p50 µs | p99 µs | p99.9 µs | max µs | replies/s | server CPU % |"
    echo "|---|---|---|---|---|---|---|"
    awk -F'\t' 'NR > 1 { printf "| %s-r%s | %.2f | %.2f | %.1f | %.0f | %.0f | %s |\n", $1, $2, $3, $4, $5, $6, $7, $13 }' "$ROWS"
} >"$OUT/durability.md"

sed -n '/^| config/,/^$/p; /^| ratio/,/^$/p' "$OUT/durability.md"
echo "== $OUT/durability.md (run time ${RUNTIME} s)"
if [ "$FAILED" != 0 ]; then
    echo "bench/durability.sh: $FAILED check(s) failed:" >&2
    cat "$FAILURES" >&2
    exit 1
fi
