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

# require_cargo SCRIPT: sudo often drops the user's PATH.
require_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "$1: cargo is not on root's PATH: run 'sudo env PATH=\"\$PATH\" $1'" >&2
        exit 1
    fi
}
