#!/usr/bin/env bash
# Soak: a mixed load through the tunnel for DURATION seconds per engine,
# then delivered vs sent, drops by reason (tunfwd's and the kernel's), and
# RSS and open fds of both forwarders at start and end.
#
#   sudo bash bench-scripts/soak.sh                 # uring then poll, 600 s each
#   DURATION=60 sudo -E bash bench-scripts/soak.sh uring
#
# Load, all at once for DURATION: one iperf3 TCP stream a -> b at full
# speed, iperf3 UDP b -> a at UDP_RATE (default 20M bit/s, 1200-byte
# datagrams), and 5 pings per second a -> b. The forwarders print a stats
# line every 60 s (kept in OUT). Needs root; installs iperf3 and jq if
# missing. Traffic stays in the two namespaces this script creates.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench-scripts/lib/topology.sh
. bench-scripts/lib/topology.sh

DURATION=${DURATION:-600}
UDP_RATE=${UDP_RATE:-20M}
OUT=${OUT:-$PWD/target/bench-results}
ENGINES=("$@")
[ ${#ENGINES[@]} -gt 0 ] || ENGINES=(uring poll)

bench_setup soak.sh tfsk
install_missing iperf3:iperf3 jq:jq ping:iputils-ping
mkdir -p "$OUT"
MD=$OUT/soak-$STAMP.md

fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 | wc -l; }
# The bracketed drop list of a summary line, or "none".
drops_of() {
    local d
    d=$(grep "summary total" "$1" | grep -o '\[[^]]*\]' | tr '\n' ' ' || true)
    echo "${d:-none}"
}
kernel_drops() { grep -o 'udp_rcvbuf_drops=[0-9]*' "$1" | tail -1 | cut -d= -f2; }

{
    echo "# tunfwd soak, $(date -u +%F) UTC"
    echo
    echo "Kernel $(uname -r), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))."
    echo "Load for ${DURATION} s per engine: iperf3 TCP a->b unlimited, iperf3 UDP b->a ${UDP_RATE}bit/s (1200 B), ping a->b 5/s."
    echo
    echo "| engine | TCP GB sent / received | UDP datagrams sent / lost (%) | pings sent / received | drops a | drops b | kernel rcvbuf drops a / b | RSS a KiB start / half / end | RSS b KiB | fds a start -> end | fds b |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
} >"$MD"

for engine in "${ENGINES[@]}"; do
    echo "soak.sh: $engine for ${DURATION} s" >&2
    topo_create "$A" "$B"
    tunfwd_pair "$BIN" "$A" "$B" "$TMP" "$engine" --stats-interval 60
    pa=$PA pb=$PB
    pids=("$pa" "$pb")
    ip netns exec "$B" iperf3 -s -1 -B 198.19.0.2 -p 5201 >/dev/null 2>&1 &
    ip netns exec "$A" iperf3 -s -1 -B 198.19.0.1 -p 5202 >/dev/null 2>&1 &
    sleep 2
    rss_a0=$(rss_kib "$pa") rss_b0=$(rss_kib "$pb") fds_a0=$(fds "$pa") fds_b0=$(fds "$pb")
    ip netns exec "$A" iperf3 -c 198.19.0.2 -p 5201 -t "$DURATION" -J >"$TMP/tcp.json" 2>/dev/null &
    tcp=$!
    ip netns exec "$B" iperf3 -c 198.19.0.1 -p 5202 -u -b "$UDP_RATE" -l 1200 -t "$DURATION" -J >"$TMP/udp.json" 2>/dev/null &
    udp=$!
    ip netns exec "$A" ping -q -i 0.2 -c $((DURATION * 5)) 198.19.0.2 >"$TMP/ping.txt" 2>&1 &
    png=$!
    # Halfway: tells first-touch growth of the buffer pool from a leak.
    sleep $((DURATION / 2))
    rss_ah=$(rss_kib "$pa") rss_bh=$(rss_kib "$pb")
    wait "$tcp" || true
    wait "$udp" || true
    wait "$png" || true
    sleep 1
    rss_a1=$(rss_kib "$pa") rss_b1=$(rss_kib "$pb") fds_a1=$(fds "$pa") fds_b1=$(fds "$pb")
    kill -TERM "$pa" "$pb"
    wait "$pa" || true
    wait "$pb" || true
    pids=()
    cp "$TMP/a.out" "$OUT/soak-$STAMP-$engine-a.txt"
    cp "$TMP/b.out" "$OUT/soak-$STAMP-$engine-b.txt"

    tcp_s=$(jq '(.end.sum_sent.bytes // 0) / 1e9 | . * 100 | round / 100' "$TMP/tcp.json")
    tcp_r=$(jq '(.end.sum_received.bytes // 0) / 1e9 | . * 100 | round / 100' "$TMP/tcp.json")
    udp_n=$(jq '.end.sum.packets // 0' "$TMP/udp.json")
    udp_l=$(jq '.end.sum.lost_packets // 0' "$TMP/udp.json")
    udp_p=$(jq '.end.sum.lost_percent // 0 | . * 1000 | round / 1000' "$TMP/udp.json")
    ping_s=$(sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\1/p' "$TMP/ping.txt")
    ping_r=$(sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\2/p' "$TMP/ping.txt")
    echo "| $engine | $tcp_s / $tcp_r | $udp_n / $udp_l ($udp_p) | $ping_s / $ping_r | $(drops_of "$TMP/a.out") | $(drops_of "$TMP/b.out") | $(kernel_drops "$TMP/a.out") / $(kernel_drops "$TMP/b.out") | $rss_a0 / $rss_ah / $rss_a1 | $rss_b0 / $rss_bh / $rss_b1 | $fds_a0 -> $fds_a1 | $fds_b0 -> $fds_b1 |" >>"$MD"
    topo_destroy "$A" "$B"
done

cat "$MD"
echo "soak.sh: table in $MD, forwarder stats in $OUT/soak-$STAMP-*.txt" >&2
