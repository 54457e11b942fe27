#!/usr/bin/env bash
# iperf3 through tunfwd next to the bare veth underlay and the kernel VXLAN
# tunnel, all in one run on one topology, then a markdown table, a JSON file
# and an SVG plot (throughput and p99 ping latency per configuration).
#
#   sudo bash bench-scripts/iperf3.sh                      # configs: poll
#   sudo bash bench-scripts/iperf3.sh poll "poll --batch 8"
#   SECS=10 OUT=/tmp/res sudo -E bash bench-scripts/iperf3.sh poll
#
# Each argument is one tunfwd configuration: an engine name followed by any
# `tunfwd tunnel` flags. Per configuration: the forwarders' CPU while the
# tunnel is quiet (QUIET seconds, default 5, as a percentage of one CPU per
# forwarder), TCP 1 stream, TCP 4 streams, UDP with 64-byte and 1400-byte IP
# packets (unlimited rate), pings at 5 ms intervals while the one TCP
# stream runs (loaded: SECS x 100 probes, started once the stream's
# connection is up), and pings on the quiet tunnel at each spacing of
# PING_INTERVALS (seconds, default 0.005; 200 probes, or 20 seconds' worth
# if fewer) for latency percentiles:
#
#   PING_INTERVALS="0.001 0.01 0.1 1" sudo -E bash bench-scripts/iperf3.sh uring
#
# Needs root. Installs iperf3, jq and gnuplot-nox with apt-get if missing.
# Traffic stays inside the two namespaces this script creates (198.18.0.0/30
# underlay, 198.19.0.0/24 tunfwd overlay, 198.19.1.0/24 VXLAN overlay).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=bench-scripts/lib/topology.sh
. bench-scripts/lib/topology.sh

SECS=${SECS:-5}
QUIET=${QUIET:-5}
PING_INTERVALS=${PING_INTERVALS:-0.005}
OUT=${OUT:-$PWD/target/bench-results}
CONFIGS=("$@")
[ ${#CONFIGS[@]} -gt 0 ] || CONFIGS=(poll)

need_root iperf3.sh
install_missing iperf3:iperf3 jq:jq gnuplot:gnuplot-nox ping:iputils-ping

cargo build --release --quiet
BIN=$PWD/target/release/tunfwd
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
JSON=$OUT/iperf3-$STAMP.json
SVG=$OUT/iperf3-$STAMP.svg
MD=$OUT/iperf3-$STAMP.md

A=tfip-$$-a
B=tfip-$$-b
TMP=$(mktemp -d)
fwd_pids=()
stop_forwarders() {
    for p in "${fwd_pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${fwd_pids[@]}"; do wait "$p" 2>/dev/null || true; done
    fwd_pids=()
}
cleanup() {
    trap - EXIT INT TERM
    stop_forwarders
    topo_destroy "$A" "$B"
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

topo_create "$A" "$B"
ip -n "$A" link add vxlan0 type vxlan id 42 local 198.18.0.1 remote 198.18.0.2 dstport 4789 dev veth0
ip -n "$B" link add vxlan0 type vxlan id 42 local 198.18.0.2 remote 198.18.0.1 dstport 4789 dev veth0
ip -n "$A" addr add 198.19.1.1/24 dev vxlan0
ip -n "$B" addr add 198.19.1.2/24 dev vxlan0
ip -n "$A" link set vxlan0 up
ip -n "$B" link set vxlan0 up

start_forwarders() { # engine flags...
    tunfwd_pair "$BIN" "$A" "$B" "$TMP" "$@"
    fwd_pids+=("$PA" "$PB")
}

iperf_json() { # server-address extra-client-args...
    local dst=$1
    shift
    ip netns exec "$B" iperf3 -s -1 -B "$dst" -p 5201 >/dev/null 2>&1 &
    local srv=$!
    for _ in $(seq 100); do
        ip netns exec "$B" ss -ltn 2>/dev/null | grep -q ":5201 " && break
        sleep 0.05
    done
    ip netns exec "$A" iperf3 -c "$dst" -p 5201 -t "$SECS" -J "$@" || true
    wait "$srv" 2>/dev/null || true
}

ping_p() { # address [count [interval]] -> "p50 p99" in microseconds
    ip netns exec "$A" ping -c "${2:-200}" -i "${3:-0.005}" "$1" 2>/dev/null |
        sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' | sort -n |
        awk '{ v[NR] = $1 * 1000 } END {
            if (NR == 0) { print "0 0"; exit }
            i50 = int(NR * 0.50); if (i50 < 1) i50 = 1
            i99 = int(NR * 0.99); if (i99 < 1) i99 = 1
            printf "%.0f %.0f\n", v[i50], v[i99] }'
}

udp_summary() { # IP packet size; reads iperf3 JSON: sent and received pps, loss, IP-level Gbit/s
    jq -c --argjson ip "$1" '($ip - 28) as $payload | .end.sum_sent as $s | .end.sum_received as $r |
        {offered_pps: (($s.bytes // 0) / $payload / ($s.seconds // 1)),
         delivered_pps: (($r.bytes // 0) / $payload / ($r.seconds // 1)),
         lost_pct: ($r.lost_percent // 100),
         ip_gbps: (($r.bytes // 0) / $payload * $ip * 8 / ($r.seconds // 1) / 1e9)}'
}

# TCP, one stream, with pings every 5 ms while it runs: prints the iperf3
# JSON, and the pings' "p50 p99" into $TMP/loaded.
tcp1_loaded() { # address
    local dst=$1
    : >"$TMP/loaded"
    (
        # Both of iperf3's connections (control, then data) up.
        for _ in $(seq 200); do
            [ "$(ip netns exec "$A" ss -Htn state established "dst $dst:5201" | wc -l)" -ge 2 ] && break
            sleep 0.02
        done
        ping_p "$dst" $((SECS * 100)) >"$TMP/loaded"
    ) &
    local pinger=$!
    iperf_json "$dst"
    wait "$pinger" || true
}

# Idle pings at each of PING_INTERVALS: a JSON array of
# {interval_s, p50_us, p99_us}.
idle_pings() { # address
    local dst=$1 iv n lat out=()
    for iv in $PING_INTERVALS; do
        n=$(awk -v i="$iv" 'BEGIN { n = int(20 / i); if (n > 200) n = 200; if (n < 2) n = 2; print n }')
        lat=$(ping_p "$dst" "$n" "$iv")
        out+=("{\"interval_s\": $iv, \"p50_us\": ${lat% *}, \"p99_us\": ${lat#* }}")
    done
    local IFS=,
    echo "[${out[*]}]"
}

# The forwarders' CPU over QUIET seconds without traffic, in percent of one
# CPU per forwarder (utime + stime of every thread, from /proc).
quiet_cpu() { # pids...
    local t0 t1 hz p stats=()
    hz=$(getconf CLK_TCK)
    for p in "$@"; do stats+=("/proc/$p/stat"); done
    t0=$(awk '{ s += $14 + $15 } END { print s }' "${stats[@]}")
    sleep "$QUIET"
    t1=$(awk '{ s += $14 + $15 } END { print s }' "${stats[@]}")
    awk -v a="$t0" -v b="$t1" -v hz="$hz" -v s="$QUIET" -v n=$# \
        'BEGIN { printf "%.2f\n", (b - a) / hz / s / n * 100 }'
}

rows=$TMP/rows.jsonl
: >"$rows"
measure() { # name dst flags-string [quiet CPU %]
    local name=$1 dst=$2 flags=$3 quiet=${4:-null}
    echo "iperf3.sh: measuring $name" >&2
    local t1 t4 u64 u1400 lat loaded
    # TCP: received bit/s and the sender's retransmitted segments.
    t1=$(tcp1_loaded "$dst" | jq -c '{bps: (.end.sum_received.bits_per_second // 0), retransmits: (.end.sum_sent.retransmits // 0)}')
    t4=$(iperf_json "$dst" -P 4 | jq -c '{bps: (.end.sum_received.bits_per_second // 0), retransmits: (.end.sum_sent.retransmits // 0)}')
    # -l is the UDP payload: IP packet minus 28 bytes of IPv4 + UDP header.
    u64=$(iperf_json "$dst" -u -b 0 -l 36 | udp_summary 64)
    u1400=$(iperf_json "$dst" -u -b 0 -l 1372 | udp_summary 1400)
    loaded=$(cat "$TMP/loaded")
    [ -n "$loaded" ] || loaded="0 0"
    lat=$(idle_pings "$dst")
    jq -cn --arg name "$name" --arg flags "$flags" --argjson t1 "$t1" --argjson t4 "$t4" \
        --argjson u64 "$u64" --argjson u1400 "$u1400" \
        --argjson idle "$lat" --argjson quiet "$quiet" \
        --argjson lp50 "${loaded% *}" --argjson lp99 "${loaded#* }" \
        '{config: $name, flags: $flags, quiet_cpu_pct: $quiet,
          tcp1_bps: $t1.bps, tcp1_retransmits: $t1.retransmits,
          tcp4_bps: $t4.bps, tcp4_retransmits: $t4.retransmits,
          udp64: $u64, udp1400: $u1400, idle_pings: $idle,
          loaded_ping_p50_us: $lp50, loaded_ping_p99_us: $lp99}' >>"$rows"
}

measure veth 198.18.0.2 ""
measure vxlan 198.19.1.2 ""
for cfg in "${CONFIGS[@]}"; do
    read -r -a words <<<"$cfg"
    start_forwarders "${words[@]}"
    measure "tunfwd ${cfg}" 198.19.0.2 "tunnel --engine $cfg" "$(quiet_cpu "${fwd_pids[@]}")"
    stop_forwarders
done

KERNEL=$(uname -r)
CPU=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
NPROC=$(nproc)
IPERF=$(iperf3 --version | head -1)
jq -s --arg kernel "$KERNEL" --arg cpu "$CPU" --argjson cpus "$NPROC" --arg iperf3 "$IPERF" \
    --argjson secs "$SECS" --argjson quiet "$QUIET" --arg intervals "$PING_INTERVALS" \
    --arg command "bench-scripts/iperf3.sh $*" \
    '{meta: {kernel: $kernel, cpu: $cpu, cpus: $cpus, iperf3: $iperf3, seconds: $secs,
             quiet_seconds: $quiet, ping_intervals: $intervals, command: $command}, results: .}' \
    "$rows" >"$JSON"

{
    head="| config | TCP 1 stream Gbit/s (retransmits) | ratio to veth | TCP 4 streams Gbit/s (retransmits) | UDP 64 B delivered kpps (loss %) | UDP 1400 B delivered Gbit/s (loss %) | ping under TCP x1 p50 / p99 us |"
    sep="|---|---|---|---|---|---|---|"
    for iv in $PING_INTERVALS; do
        head="$head ping every $iv s p50 / p99 us |"
        sep="$sep---|"
    done
    echo "$head quiet CPU % per forwarder |"
    echo "$sep---|"
    jq -r 'def r3: . * 1000 | round / 1000;
        .results as $r | ($r[0].tcp1_bps) as $base | $r[] |
        "| \(.config) | \(.tcp1_bps / 1e9 | r3) (\(.tcp1_retransmits)) | \(if $base > 0 then (.tcp1_bps / $base | r3) else "-" end) | \(.tcp4_bps / 1e9 | r3) (\(.tcp4_retransmits)) | \(.udp64.delivered_pps / 1000 | round) (\(.udp64.lost_pct | round)) | \(.udp1400.ip_gbps | r3) (\(.udp1400.lost_pct | round)) | \(.loaded_ping_p50_us) / \(.loaded_ping_p99_us) | \([.idle_pings[] | "\(.p50_us) / \(.p99_us)"] | join(" | ")) | \(.quiet_cpu_pct // "-") |"' "$JSON"
    echo
    echo "$IPERF, ${SECS} s per run, kernel $KERNEL, $CPU, $NPROC CPUs. Command: \`bench-scripts/iperf3.sh $*\`."
    echo "UDP: iperf3 at unlimited rate (-b 0); delivered = what its receiver got, loss = its receiver's count; sizes are IP packet bytes."
    echo "Ping under TCP x1: every 5 ms while one stream runs; the other pings on the quiet tunnel (PING_INTERVALS=\"$PING_INTERVALS\"); quiet CPU: the forwarders' CPU over QUIET=$QUIET s without traffic, per forwarder."
} | tee "$MD"

jq -r '.results[] | [.config, (.tcp1_bps / 1e9), .loaded_ping_p99_us] | @tsv' "$JSON" >"$TMP/plot.tsv"
gnuplot <<EOF
set terminal svg size 900,420 dynamic font "sans,11"
set output "$SVG"
set datafile separator "\t"
set style data histograms
set style fill solid 0.8 border -1
set boxwidth 0.8
set multiplot layout 1,2 title "tunfwd vs veth vs kernel VXLAN (kernel $KERNEL, $NPROC CPUs)"
set title "TCP, 1 stream (Gbit/s)"
set xtics rotate by -20
set yrange [0:*]
plot "$TMP/plot.tsv" using 2:xtic(1) notitle lc rgb "#3b75af"
set title "ping p99 under one TCP stream (us)"
plot "$TMP/plot.tsv" using 3:xtic(1) notitle lc rgb "#ef8636"
unset multiplot
EOF
echo "iperf3.sh: wrote $JSON, $MD and $SVG" >&2
