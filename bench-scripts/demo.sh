#!/usr/bin/env bash
# tunfwd demo: builds two network namespaces joined by a veth pair, runs one
# tunfwd forwarder in each, shows ping (IPv4 and IPv6) and iperf3 TCP
# throughput through the tunnel next to the bare veth underlay, then removes
# everything (also on Ctrl-C or error).
#
#   sudo bash bench-scripts/demo.sh            # poll engine, 5 s iperf3 runs
#   ENGINE=poll SECS=10 sudo -E bash bench-scripts/demo.sh
#   TUNFWD_ARGS="--batch 32" sudo -E bash bench-scripts/demo.sh
#
# Addresses: underlay 198.18.0.1/30 - 198.18.0.2/30, overlay 198.19.0.1/24 -
# 198.19.0.2/24 and 2001:db8:19::1/64 - ::2/64. No traffic leaves the
# namespaces this script creates.
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-poll}
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
    ip netns del "$A" 2>/dev/null || true
    ip netns del "$B" 2>/dev/null || true
    rm -rf "$LOG"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$A"
ip netns add "$B"
ip link add veth0 netns "$A" type veth peer name veth0 netns "$B"
ip -n "$A" addr add 198.18.0.1/30 dev veth0
ip -n "$B" addr add 198.18.0.2/30 dev veth0
for ns in "$A" "$B"; do
    ip -n "$ns" link set lo up
    ip -n "$ns" link set veth0 up
done

start() { # ns, log, local underlay, peer underlay, overlay v4, overlay v6
    # shellcheck disable=SC2086
    ip netns exec "$1" "$BIN" tunnel --engine "$ENGINE" --dev tun0 \
        --address "$5/24" --address "$6/64" \
        --listen "$3:5000" --peer "$4:5000" $TUNFWD_ARGS >"$2.out" 2>"$2.err" &
    pids+=($!)
    for _ in $(seq 100); do
        grep -q "tunnel up" "$2.err" 2>/dev/null && return 0
        sleep 0.05
    done
    echo "demo.sh: tunfwd did not come up:" >&2
    cat "$2.err" >&2
    exit 1
}
start "$A" "$LOG/a" 198.18.0.1 198.18.0.2 198.19.0.1 2001:db8:19::1
start "$B" "$LOG/b" 198.18.0.2 198.18.0.1 198.19.0.2 2001:db8:19::2
sed 's/^/  a: /' "$LOG/a.err"
sed 's/^/  b: /' "$LOG/b.err"

echo
echo "== ping through the tunnel"
ip netns exec "$A" ping -c 3 -i 0.2 198.19.0.2 | tail -2
ip netns exec "$A" ping -c 3 -i 0.2 2001:db8:19::2 | tail -2

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

echo
echo "== iperf3 TCP, 1 stream, ${SECS} s (same run, same machine)"
veth=$(iperf 198.18.0.2)
tun=$(iperf 198.19.0.2)
ratio=$(awk -v t="$tun" -v v="$veth" 'BEGIN { if (v > 0) printf "%.3f", t / v; else print "n/a" }')
printf '%-34s %12s\n' "path" "Mbit/s"
printf '%-34s %12s\n' "bare veth underlay" "$veth"
printf '%-34s %12s\n' "tunfwd tunnel (engine $ENGINE)" "$tun"
printf '%-34s %12s\n' "ratio tunnel/veth" "$ratio"
echo "kernel $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) CPUs"

echo
echo "== forwarder summaries"
for p in "${pids[@]}"; do kill -TERM "$p"; done
wait "${pids[@]}" || true
pids=()
sed 's/^/  a: /' "$LOG/a.out"
sed 's/^/  b: /' "$LOG/b.out"
