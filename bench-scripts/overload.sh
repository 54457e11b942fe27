#!/usr/bin/env bash
# Overload: UDP offered at twice what the tunnel carries (the most it
# delivered over a ladder of offered rates), for SECS seconds
# (default 60), per engine. Reports whether the forwarder stayed responsive
# (a stats line every second, pings answered), memory (RSS at start, peak,
# end), drops (tunfwd's by reason, the kernel's at the UDP socket and at the
# TUN queue, iperf3's loss), and how long after the load stops the ping
# latency is back at its idle level.
#
#   sudo bash bench-scripts/overload.sh               # uring then poll
#   SECS=20 SIZE=512 sudo -E bash bench-scripts/overload.sh poll
#   SECS=20 sudo -E bash bench-scripts/overload.sh uring "uring --queues 1"
#       (each argument an engine name followed by any `tunfwd tunnel` flags)
#   CAP_KPPS=94 sudo -E bash bench-scripts/overload.sh  # skip the ladder:
#       offer 2 x 94 kpps (the same load in every run, for comparing runs)
#
# Needs root; installs iperf3 and jq if missing. Traffic stays in the two
# namespaces this script creates.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench-scripts/lib/topology.sh
. bench-scripts/lib/topology.sh

SECS=${SECS:-60}
CAP_KPPS=${CAP_KPPS:-}  # capacity to assume instead of measuring it
SIZE=${SIZE:-1400}   # IP packet bytes
OUT=${OUT:-$PWD/target/bench-results}
ENGINES=("$@")
[ ${#ENGINES[@]} -gt 0 ] || ENGINES=(uring poll)
PAYLOAD=$((SIZE - 28))

bench_setup overload.sh tfov
install_missing iperf3:iperf3 jq:jq ping:iputils-ping
mkdir -p "$OUT"
MD=$OUT/overload-$STAMP.md

median_ms() { sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | sort -n | awk '{ v[NR] = $1 } END { print (NR ? v[int((NR + 1) / 2)] : 0) }'; }
tun_stat() { ip netns exec "$1" cat "/sys/class/net/tun0/statistics/$2"; }
iperf_udp() { # rate-bits/s secs -> JSON
    ip netns exec "$B" iperf3 -s -1 -B 198.19.0.2 -p 5201 >/dev/null 2>&1 &
    sleep 0.3
    ip netns exec "$A" iperf3 -c 198.19.0.2 -p 5201 -u -b "$1" -l "$PAYLOAD" -t "$2" -P 2 -J 2>/dev/null || true
}

{
    echo "# tunfwd overload, $(date -u +%F) UTC"
    echo
    echo "Kernel $(uname -r), $(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)); UDP ${SIZE}-byte IP packets a -> b for ${SECS} s at 2x the measured capacity."
    echo
    echo "| engine | capacity kpps | offered kpps (x capacity) | delivered kpps | iperf3 loss % | stats lines / s | pings answered under load | ping p50 idle / loaded ms | back to idle latency after | RSS a KiB start / peak / end | RSS b KiB start / peak / end | drops a (tunfwd) | kernel: TUN a tx_dropped, UDP b rcvbuf drops |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
} >"$MD"

for engine in "${ENGINES[@]}"; do
    echo "overload.sh: $engine" >&2
    read -r -a words <<<"$engine"
    topo_create "$A" "$B"
    tunfwd_pair "$BIN" "$A" "$B" "$TMP" "${words[@]}" --stats-interval 1
    pa=$PA pb=$PB
    pids=("$pa" "$pb")
    idle=$(ip netns exec "$A" ping -c 40 -i 0.05 198.19.0.2 | median_ms)
    # Capacity: the most delivered over a ladder of offered rates (an
    # unlimited flood alone under-reads it: receive livelock).
    cap=0
    ladder=(25 50 100 150 200 300 0)
    if [ -n "$CAP_KPPS" ]; then
        cap=$((CAP_KPPS * 1000))
        ladder=()
        echo "overload.sh: $engine capacity taken as ${CAP_KPPS}k pps (CAP_KPPS)" >&2
    fi
    for kpps in "${ladder[@]}"; do
        per_stream=$((kpps * 1000 * PAYLOAD * 8 / 2))
        got=$(iperf_udp "$per_stream" 3 | jq --argjson p "$PAYLOAD" '(.end.sum_received.bytes // 0) / $p / (.end.sum_received.seconds // 1) | floor')
        echo "overload.sh: $engine offered ${kpps}k pps (0: unlimited): delivered $got pps" >&2
        [ "$got" -gt "$cap" ] && cap=$got
    done
    # iperf3 applies -b per stream: 2 streams at capacity each = 2x.
    rate=$((cap * PAYLOAD * 8))
    rss_a0=$(rss_kib "$pa") rss_b0=$(rss_kib "$pb")
    lines0=$(grep -c 'tunfwd: stats' "$TMP/a.out" || true)
    t0=$(date +%s.%N)
    drop_tun0=$(tun_stat "$A" tx_dropped)
    ip netns exec "$A" ping -i 0.2 -c $((SECS * 5)) 198.19.0.2 >"$TMP/ping-load.txt" 2>&1 &
    png=$!
    iperf_udp "$rate" "$SECS" >"$TMP/load.json" &
    load=$!
    peak_a=$rss_a0 peak_b=$rss_b0
    while kill -0 "$load" 2>/dev/null; do
        r=$(rss_kib "$pa"); [ "$r" -gt "$peak_a" ] && peak_a=$r
        r=$(rss_kib "$pb"); [ "$r" -gt "$peak_b" ] && peak_b=$r
        sleep 1
    done
    wait "$load" || true
    # Right after the load: pings every 10 ms, each line timestamped.
    ip netns exec "$A" ping -D -i 0.01 -c 300 198.19.0.2 >"$TMP/ping-after.txt" 2>&1 || true
    wait "$png" || true
    lines1=$(grep -c 'tunfwd: stats' "$TMP/a.out" || true)
    t1=$(date +%s.%N)
    rss_a1=$(rss_kib "$pa") rss_b1=$(rss_kib "$pb")
    drop_tun1=$(tun_stat "$A" tx_dropped)
    kill -TERM "$pa" "$pb"
    wait "$pa" || true
    wait "$pb" || true
    pids=()
    tag=$(tr -c 'a-z0-9\n-' _ <<<"$engine")
    cp "$TMP/a.out" "$OUT/overload-$STAMP-$tag-a.txt"
    cp "$TMP/b.out" "$OUT/overload-$STAMP-$tag-b.txt"

    offered=$(jq --argjson p "$PAYLOAD" '(.end.sum_sent.bytes // 0) / $p / (.end.sum_sent.seconds // 1) / 1000 | floor' "$TMP/load.json")
    delivered=$(jq --argjson p "$PAYLOAD" '(.end.sum_received.bytes // 0) / $p / (.end.sum_received.seconds // 1) / 1000 | floor' "$TMP/load.json")
    loss=$(jq '.end.sum_received.lost_percent // .end.sum.lost_percent // 0 | . * 10 | round / 10' "$TMP/load.json")
    ratio=$(awk -v o="$offered" -v c="$cap" 'BEGIN { printf "%.1f", c ? o * 1000 / c : 0 }')
    loaded=$(median_ms <"$TMP/ping-load.txt")
    answered=$(sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) received.*/\2\/\1/p' "$TMP/ping-load.txt")
    # First reply within 2x the idle median, in ms after the first ping.
    back=$(awk -v idle="$idle" '/time=/ {
            t = substr($1, 2, length($1) - 2); sub(/.*time=/, ""); rtt = $1
            if (start == "") start = t
            if (rtt <= 2 * idle + 0.05) { printf "%.0f ms", (t - start) * 1000; found = 1; exit }
        } END { if (!found) print "not within 3 s" }' "$TMP/ping-after.txt")
    rate_lines=$(awk -v a="$lines0" -v b="$lines1" -v t0="$t0" -v t1="$t1" 'BEGIN { printf "%.2f", (b - a) / (t1 - t0) }')
    drops=$(grep "summary total" "$TMP/a.out" | grep -o '\[[^]]*\]' | tr '\n' ' ' || true)
    kd=$(grep "summary kernel" "$TMP/b.out" | grep -o 'udp_rcvbuf_drops=[0-9]*' | cut -d= -f2)
    echo "| $engine | $((cap / 1000)) | $offered ($ratio) | $delivered | $loss | $rate_lines | $answered | $idle / $loaded | $back | $rss_a0 / $peak_a / $rss_a1 | $rss_b0 / $peak_b / $rss_b1 | ${drops:-none} | $((drop_tun1 - drop_tun0)), ${kd:-?} |" >>"$MD"
    topo_destroy "$A" "$B"
done
cat "$MD"
echo "overload.sh: table in $MD" >&2
