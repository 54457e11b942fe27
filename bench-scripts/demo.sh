#!/usr/bin/env bash
# tunfwd demo: builds two network namespaces joined by a veth pair, runs one
# tunfwd forwarder in each (once per engine), shows ping (IPv4 and IPv6) and
# iperf3 TCP throughput through the tunnel next to the bare veth underlay,
# then removes everything (also on Ctrl-C or error). Where the kernel refuses
# io_uring, the uring engine is skipped with a SKIP line and the table says so.
#
#   sudo bash bench-scripts/demo.sh            # poll and uring, 5 s iperf3 runs
#   SECS=1 sudo -E bash bench-scripts/demo.sh  # the short run CI does
#   ENGINES=uring SECS=10 sudo -E bash bench-scripts/demo.sh
#   TUNFWD_ARGS="--batch 32" sudo -E bash bench-scripts/demo.sh
#
# Addresses: underlay 198.18.0.1/30 - 198.18.0.2/30, overlay 198.19.0.1/24 -
# 198.19.0.2/24 and 2001:db8:19::1/64 - ::2/64. No traffic leaves the
# namespaces this script creates.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench-scripts/lib/topology.sh
. bench-scripts/lib/topology.sh

ENGINES=${ENGINES:-poll uring}
SECS=${SECS:-5}
TUNFWD_ARGS=${TUNFWD_ARGS:-}

if [ "$(id -u)" != 0 ]; then
    echo "demo.sh: run as root: it creates network namespaces and TUN devices" >&2
    exit 1
fi

missing=()
command -v iperf3 >/dev/null || missing+=(iperf3)
command -v ping >/dev/null || missing+=(iputils-ping)
command -v ip >/dev/null || missing+=(iproute2)
if [ ${#missing[@]} -gt 0 ]; then
    echo "demo.sh: installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

echo "demo.sh: building tunfwd (release)"
cargo build --release --quiet
BIN=$PWD/target/release/tunfwd

A=tfdemo-$$-a
B=tfdemo-$$-b
LOG=$(mktemp -d)
pids=()
cleanup() {
    trap - EXIT INT TERM
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    topo_destroy "$A" "$B"
    rm -rf "$LOG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

topo_create "$A" "$B"

start() { # ns, log, local underlay, peer underlay, overlay v4, overlay v6
    # shellcheck disable=SC2086
    ip netns exec "$1" "$BIN" tunnel --engine "$engine" --dev tun0 \
        --address "$5/24" --address "$6/64" \
        --listen "$3:5000" --peer "$4:5000" $TUNFWD_ARGS >"$2.out" 2>"$2.err" &
    pids+=($!)
    for _ in $(seq 100); do
        grep -q "tunnel up" "$2.err" 2>/dev/null && return 0
        kill -0 "$!" 2>/dev/null || break
        sleep 0.05
    done
    return 1
}
stop_all() {
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait "${pids[@]}" 2>/dev/null || true
    pids=()
}
up_or_skip() { # ns, log, ...: start's arguments; 1 if the engine is skipped
    start "$@" && return 0
    if [ "$engine" = uring ] && grep -q "io_uring" "$2.err"; then
        # The kernel refuses io_uring (e.g. kernel.io_uring_disabled=2).
        echo "SKIP engine uring: $(tail -1 "$2.err")"
        stop_all
        return 1
    fi
    echo "demo.sh: tunfwd did not come up:" >&2
    cat "$2.err" >&2
    exit 1
}
iperf() { # server address; prints Mbit/s received
    ip netns exec "$B" iperf3 -s -1 -B "$1" -p 5201 >/dev/null 2>&1 &
    local srv=$!
    for _ in $(seq 100); do
        ip netns exec "$B" ss -ltn 2>/dev/null | grep -q ":5201 " && break
        sleep 0.05
    done
    ip netns exec "$A" iperf3 -c "$1" -p 5201 -t "$SECS" -f m |
        awk '/receiver/ {print $(NF-2)}'
    wait "$srv" 2>/dev/null || true
}


echo "== iperf3 TCP, 1 stream, ${SECS} s, bare veth underlay"
veth=$(iperf 198.18.0.2)
results=()
for engine in $ENGINES; do
    echo
    echo "== engine $engine"
    if ! up_or_skip "$A" "$LOG/a" 198.18.0.1 198.18.0.2 198.19.0.1 2001:db8:19::1 ||
        ! up_or_skip "$B" "$LOG/b" 198.18.0.2 198.18.0.1 198.19.0.2 2001:db8:19::2; then
        results+=("$engine skipped")
        continue
    fi
    sed 's/^/  a: /' "$LOG/a.err"
    echo "-- ping through the tunnel"
    ip netns exec "$A" ping -c 3 -i 0.2 198.19.0.2 | tail -2
    ip netns exec "$A" ping -c 3 -i 0.2 2001:db8:19::2 | tail -2
    echo "-- iperf3 TCP, 1 stream, ${SECS} s through the tunnel"
    tun=$(iperf 198.19.0.2)
    results+=("$engine $tun")
    stop_all
    echo "-- forwarder summaries"
    sed 's/^/  a: /' "$LOG/a.out"
    sed 's/^/  b: /' "$LOG/b.out"
done

echo
echo "== iperf3 TCP, 1 stream, ${SECS} s each (same run, same machine)"
printf '%-34s %12s %10s\n' "path" "Mbit/s" "ratio"
printf '%-34s %12s %10s\n' "bare veth underlay" "$veth" "1.000"
for r in "${results[@]}"; do
    # Word splitting wanted: "label gbps" into $1 $2.
    # shellcheck disable=SC2086
    set -- $r
    if [ "$2" = skipped ]; then
        printf '%-34s %12s %10s\n' "tunfwd, engine $1" "skipped" "-"
        continue
    fi
    ratio=$(awk -v t="$2" -v v="$veth" 'BEGIN { if (v > 0) printf "%.3f", t / v; else print "n/a" }')
    printf '%-34s %12s %10s\n' "tunfwd, engine $1" "$2" "$ratio"
done
echo "kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) CPUs"
