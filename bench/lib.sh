# bench/lib.sh: shared by the benchmark scripts (sourced, not run).

# require_root SCRIPT: benchmarks need root (namespaces, XDP, CPU pinning, nginx).
require_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "$1: needs root: run 'sudo $1'" >&2
        exit 1
    fi
}

# install_missing TOOL:PACKAGE...: apt-get installs the packages of missing tools; a TOOL starting
# with / is a file that must exist (a header, say).
install_missing() {
    local missing=() pair tool
    for pair in "$@"; do
        tool="${pair%%:*}"
        if [ "${tool#/}" != "$tool" ]; then
            [ -e "$tool" ] || missing+=("${pair#*:}")
        else
            command -v "$tool" >/dev/null 2>&1 || missing+=("${pair#*:}")
        fi
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "== installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# install_group GROUP: install_missing for every tool of GROUP in .ci/packages, the project's one
# list of system packages.
install_group() {
    local list
    list="$(dirname "${BASH_SOURCE[0]}")/../.ci/packages"
    # shellcheck disable=SC2046
    install_missing $(awk -v g="$1" '!/^#/ && NF >= 3 { for (i = 3; i <= NF; i++) if ($i == g) print $1 ":" $2 }' "$list")
}

# require_cargo SCRIPT: sudo often drops the user's PATH.
require_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "$1: cargo is not on root's PATH: run 'sudo env PATH=\"\$PATH\" $1'" >&2
        exit 1
    fi
}

# log_cmd WORDS...: appends a command line to $COMMANDS, the run's commands.txt.
log_cmd() { echo "$*" >>"$COMMANDS"; }

# wait_ready PID FILE: waits up to 5 s for a `ready` line in FILE (ricochet serve's start-up output);
# fails at once if PID dies first.
wait_ready() {
    for _ in $(seq 100); do
        grep -q '^ready ' "$2" 2>/dev/null && return 0
        kill -0 "$1" 2>/dev/null || return 1
        sleep 0.05
    done
    return 1
}

# stop_server: stops the background server in $SERVER_PID (SIGTERM, so ricochet prints its report).
stop_server() {
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
}

# rss_kib PID: the resident set size of a process, in KiB.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# wait_established PORT N: waits (at most 2 minutes) until N TCP connections to local PORT are
# established, then prints how many there are.
wait_established() {
    local port=$1 want=$2 n=0
    for _ in $(seq 600); do
        n=$(ss -Htn state established "( sport = :$port )" | wc -l)
        [ "$n" -ge "$want" ] && break
        sleep 0.2
    done
    echo "$n"
}
