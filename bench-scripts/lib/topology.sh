# shellcheck shell=bash
# shellcheck disable=SC2034 # PA, PB, BIN, STAMP are set here for the scripts that source this file.
# Shared by the bench scripts (sourced, not run): the two-namespace topology
# (underlay 198.18.0.0/30 on a veth pair, overlay 198.19.0.0/24 on the tunnel), and its removal.
#
#   topo_create A B   namespaces A and B, veth0 198.18.0.1/30 - 198.18.0.2/30
#   topo_destroy A B  kill what runs inside them, then delete them
#   need_root, install_missing, tunfwd_pair, bench_setup, rss_kib: see each

topo_create() {
    local a=$1 b=$2
    ip netns add "$a"
    ip netns add "$b"
    ip link add veth0 netns "$a" type veth peer name veth0 netns "$b"
    ip -n "$a" addr add 198.18.0.1/30 dev veth0
    ip -n "$b" addr add 198.18.0.2/30 dev veth0
    local ns
    for ns in "$a" "$b"; do
        ip -n "$ns" link set lo up
        ip -n "$ns" link set veth0 up
    done
}

topo_destroy() {
    local ns
    for ns in "$@"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
    done
    for ns in "$@"; do
        ip netns del "$ns" 2>/dev/null || true
    done
}

# need_root SCRIPT: exit unless root.
need_root() {
    if [ "$(id -u)" != 0 ]; then
        echo "$1: run as root: it creates network namespaces and devices" >&2
        exit 1
    fi
}

# install_missing COMMAND:PACKAGE...: apt-get install the packages whose
# command is missing.
install_missing() {
    local missing=() pair
    for pair in "$@"; do
        command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "installing ${missing[*]}" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
}

# tunfwd_pair BIN A B DIR ENGINE FLAGS...: a tunfwd in each namespace
# (overlay 198.19.0.1/24 in A, .2 in B, UDP port 5000), output in DIR/a.out,
# a.err, b.out, b.err; sets PA and PB to their pids; returns once both
# report the tunnel up (exits with their error otherwise). Where A runs
# several queues pinned by `--cpus auto` (worker k on the k-th CPU; FLAGS
# without --cpus), B's workers get the CPUs in the opposite order, so that
# the two ends of a flow (worker k of each) run on different CPUs as on two
# hosts, instead of taking turns on one.
tunfwd_pair() {
    local bin=$1 a=$2 b=$3 dir=$4 engine=$5
    shift 5
    ip netns exec "$a" "$bin" tunnel --engine "$engine" --dev tun0 --address 198.19.0.1/24 \
        --listen 198.18.0.1:5000 --peer 198.18.0.2:5000 "$@" >"$dir/a.out" 2>"$dir/a.err" &
    PA=$!
    wait_up "$dir/a.err"
    local opposite=()
    if [[ " $* " != *" --cpus "* ]] && grep -Eq ', ([2-9]|[1-9][0-9]+) queue\(s\)' "$dir/a.err"; then
        opposite=(--cpus "$(taskset -pc $$ | sed 's/.*: //' | tr ',' '\n' |
            awk -F- '{ for (c = $1; c <= ($2 == "" ? $1 : $2); c++) print c }' | tac | paste -sd,)")
    fi
    ip netns exec "$b" "$bin" tunnel --engine "$engine" --dev tun0 --address 198.19.0.2/24 \
        --listen 198.18.0.2:5000 --peer 198.18.0.1:5000 "$@" "${opposite[@]}" >"$dir/b.out" 2>"$dir/b.err" &
    PB=$!
    wait_up "$dir/b.err"
}

# wait_up FILE: waits (up to 10 s) for a forwarder's "tunnel up" in FILE;
# exits with what it said otherwise.
wait_up() {
    local f=$1
    for _ in $(seq 200); do
        grep -q "tunnel up" "$f" 2>/dev/null && break
        sleep 0.05
    done
    grep -q "tunnel up" "$f" || { cat "$f" >&2; exit 1; }
}

# bench_setup NAME TAG: builds the release binary and sets BIN, STAMP,
# A and B (namespace names), TMP (a scratch directory) and pids (forwarders
# to stop); on exit (normal, error, Ctrl-C) stops pids, removes the
# namespaces and TMP.
bench_setup() {
    local name=$1 tag=$2
    need_root "$name"
    cargo build --release --quiet
    BIN=$PWD/target/release/tunfwd
    STAMP=$(date -u +%Y%m%dT%H%M%SZ)
    A=$tag-$$-a
    B=$tag-$$-b
    TMP=$(mktemp -d)
    pids=()
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_cleanup() {
    trap - EXIT INT TERM
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    topo_destroy "$A" "$B"
    rm -rf "$TMP"
}

# rss_kib PID: resident memory in KiB (0 if the process is gone).
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }
