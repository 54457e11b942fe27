#!/usr/bin/env bash
# The kernel matrix: boots Linux kernels from the package registry under
# QEMU (software emulation, -accel tcg: nested KVM does not work here) and
# runs tunnel checks inside each, under each engine: two namespaces, a
# tunnel, ping over IPv4 and IPv6, a verified TCP transfer (SHA-256 of 8 MiB),
# the startup lines that say what the io_uring probe found and which
# fallbacks were taken, `tunfwd bench --quick --compare poll,uring` (as a
# ratio: the guest is emulated), and tunfwd's WireGuard mode against the
# kernel's WireGuard (wireguard.ko from the same image, its dependencies
# loaded first): handshake, ping, a verified TCP transfer, per engine. One
# line per check:
#
#   KERNEL  CHECK  ENGINE  pass|fail|n/a  DETAIL
#
# usage (root):  [BENCH_COMPARE=poll,uring] bash bench-scripts/kernels.sh [KERNEL...]
#   KERNEL: 6.1 (Debian 12's newest linux-image-6.1.0-*-amd64-unsigned), 6.12
#   (linux-image-6.12.*+deb12-amd64-unsigned), another version, or a package
#   name (linux-image-...-unsigned). Default: 6.1.
# Installs qemu-system-x86, busybox-static, iproute2, iputils-ping, socat and
# wireguard-tools (wg, copied into the guest) and kmod (depmod)
# with apt-get when missing; kernels come from the package registry
# (apt-get download) and are cached, with the guest's tools, in
# target/kernels/. A guest that dies before its first check (an emulation
# flake at boot) boots once more, said in the matrix as an info line.
# Exits non-zero if any check fails. The markdown table and
# the raw lines go to target/kernels/matrix.md and matrix.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" = 0 ] || { echo "kernels.sh: needs root (apt-get, the kernel packages)" >&2; exit 2; }
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
[ -x /bin/busybox ] && /bin/busybox --list 2>/dev/null | grep -qx poweroff || need+=(busybox-static)
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v socat >/dev/null || need+=(socat)
command -v cpio >/dev/null || need+=(cpio)
command -v xz >/dev/null || need+=(xz-utils)
command -v wg >/dev/null || need+=(wireguard-tools)
command -v depmod >/dev/null || need+=(kmod)
if [ ${#need[@]} -gt 0 ]; then
    echo "kernels.sh: installing ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

cache=target/kernels
mkdir -p "$cache"
cargo build --release --quiet
tunfwd=target/release/tunfwd

# The newest package for a kernel name.
package_for() {
    case "$1" in
        linux-image-*) echo "$1" ;;
        6.1) apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$' |
            awk '{print $1}' | sort -V | tail -n 1 ;;
        # 6.1.0-57-amd64 (Debian 12's ABI numbering) or 6.12.107+deb12-amd64.
        *) apt-cache search --names-only \
            "^linux-image-${1//./\\.}[.0-9]*(-[0-9]+|\\+deb[0-9]+)-amd64-unsigned\$" |
            awk '{print $1}' | sort -V | tail -n 1 ;;
    esac
}

# Copies an executable and the shared libraries it loads into the tree.
copy_bin() {
    local root=$1 bin=$2 lib
    install -D -m 0755 "$(readlink -f "$bin")" "$root/usr/bin/$(basename "$bin")"
    for lib in $(ldd "$bin" 2>/dev/null | awk '/=>/ {print $3} /^[[:space:]]*\// {print $1}'); do
        if [ -e "$lib" ]; then cp -L --parents "$lib" "$root"; fi
    done
}

# The guest's /init: the checks. MATRIX lines go to the serial console.
guest_init() {
    cat <<'INIT'
#!/bin/sh
export PATH=/usr/bin:/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /run /tmp /dev/net /var/run
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
insmod /lib/modules/tun.ko
insmod /lib/modules/veth.ko
kver=$(uname -r)
# busybox's shell runs its own applets before anything on PATH: the real
# iproute2 and iputils, by path.
ip() { /usr/bin/ip "$@"; }
ping() { /usr/bin/ping "$@"; }
say() { echo "MATRIX $kver $*"; }
one_line() { tr '\n' ' ' | cut -c 1-300; }
ip link set lo up
ip netns add a
ip netns add b
ip link add veth0 netns a type veth peer name veth0 netns b
ip -n a addr add 198.18.0.1/30 dev veth0
ip -n b addr add 198.18.0.2/30 dev veth0
for n in a b; do ip -n $n link set veth0 up; ip -n $n link set lo up; done
head -c 8388608 /dev/urandom > /tmp/data
sum=$(sha256sum < /tmp/data | cut -d ' ' -f 1)

# Waits (up to 120 s: the guest is emulated) for a line in a file.
wait_for() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1)); [ $i -gt 1200 ] && return 1
        sleep 0.1
    done
}

# A TCP listener on port 7000 in namespace b (state 0A in /proc/net/tcp).
listening() { ip netns exec b cat /proc/net/tcp | grep -q ':1B58 00000000:0000 0A'; }

# ping_check CHECK LABEL ADDR [PING FLAGS]: every echo answered (ping
# exits 0 on one reply of three).
ping_check() {
    local check=$1 lab=$2 addr=$3
    shift 3
    if ip netns exec a ping "$@" -c 3 -W 10 "$addr" > /tmp/p 2>&1 &&
        grep -q ' 3 received, 0% packet loss' /tmp/p; then
        say "$check $lab pass $(grep 'packet loss' /tmp/p)"
    else say "$check $lab fail $(one_line < /tmp/p)"; fi
}

# tcp_check CHECK LABEL ADDR: 8 MiB from namespace a to ADDR:7000 in b,
# verified by SHA-256.
tcp_check() {
    local check=$1 lab=$2 addr=$3 r start got secs
    rm -f /tmp/recv
    (exec /usr/bin/ip netns exec b socat -u TCP-LISTEN:7000,reuseaddr OPEN:/tmp/recv,creat,trunc) &
    r=$!
    i=0; while ! listening && [ $i -lt 600 ]; do i=$((i + 1)); sleep 0.1; done
    start=$(date +%s)
    if ip netns exec a socat -u OPEN:/tmp/data "TCP:$addr:7000" 2> /tmp/s && wait $r; then
        got=$(sha256sum < /tmp/recv | cut -d ' ' -f 1)
        secs=$(( $(date +%s) - start ))
        if [ "$got" = "$sum" ]; then say "$check $lab pass 8 MiB, sha256 equal, ${secs} s"
        else say "$check $lab fail sha256 $got != $sum"; fi
    else
        say "$check $lab fail $(one_line < /tmp/s)"
        kill $r 2>/dev/null
    fi
}

# run_engine LABEL ENGINE [FLAGS...]: one tunnel's checks, reported under
# LABEL (the engine's name, or a name for a rerun under other conditions).
run_engine() {
    label=$1 engine=$2
    shift 2
    for side in a b; do
        if [ $side = a ]; then me=1; peer=2; else me=2; peer=1; fi
        # Emptied here, not by the background redirection: wait_for must
        # not find the previous engine's "tunnel up" before it starts.
        : > /tmp/$side.err
        # exec: $! is tunfwd itself (busybox would keep a forked shell
        # between), so SIGTERM reaches it.
        (exec /usr/bin/ip netns exec $side tunfwd tunnel --engine "$engine" --dev tun0 \
            --address 198.19.0.$me/24 --address 2001:db8:19::$me/64 \
            --listen 198.18.0.$me:5000 --peer 198.18.0.$peer:5000 "$@" \
            > /tmp/$side.out 2> /tmp/$side.err) &
        eval "pid_$side=\$!"
    done
    if ! wait_for /tmp/a.err "tunnel up" || ! wait_for /tmp/b.err "tunnel up"; then
        say "startup $label fail $(cat /tmp/a.err /tmp/b.err | one_line)"
        kill $pid_a $pid_b 2>/dev/null; wait
        return
    fi
    say "startup $label pass $(grep 'tunnel up' /tmp/a.err | sed 's/.*engine/engine/' | one_line)"
    # What the probe found and which fallbacks were taken, as tunfwd said it.
    grep -E 'io_uring|offload|poll engine' /tmp/a.err | while read -r line; do
        say "log $label info $line"
    done
    ping_check ping4 "$label" 198.19.0.2
    ping_check ping6 "$label" 2001:db8:19::2 -6
    tcp_check tcp_verified "$label" 198.19.0.2
    kill -TERM $pid_a $pid_b
    wait $pid_a; rc_a=$?
    wait $pid_b; rc_b=$?
    if [ $rc_a = 0 ] && [ $rc_b = 0 ] && grep -q 'summary total' /tmp/a.out; then
        say "stop $label pass SIGTERM: exit 0 with a summary: $(grep 'summary total' /tmp/a.out | cut -c 1-200)"
    else
        say "stop $label fail exit $rc_a/$rc_b: $(tail -c 300 /tmp/a.err | one_line) | $(one_line < /tmp/a.out)"
    fi
    # The ports are free again once the kernel has let go of the sockets.
    i=0
    while grep -q ':1388 ' /proc/net/udp /proc/net/udp6 2>/dev/null ||
        ip netns exec a grep -q ':1388 ' /proc/net/udp /proc/net/udp6 2>/dev/null ||
        ip netns exec b grep -q ':1388 ' /proc/net/udp /proc/net/udp6 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt 600 ]; then say "port_released $label fail UDP port 5000 still bound 60 s after exit"; break; fi
        sleep 0.1
    done
    [ $i -gt 0 ] && [ $i -le 600 ] && say "port_released $label info UDP port 5000 free $((i / 10)) s after exit"
    return 0
}

major=${kver%%.*}; rest=${kver#*.}; minor=${rest%%.*}
old_kernel=no
if [ "$major" -lt 6 ] || { [ "$major" -eq 6 ] && [ "$minor" -lt 7 ]; }; then old_kernel=yes; fi
for engine in poll uring auto; do
    run_engine $engine $engine
    cp /tmp/a.err /tmp/$engine.err
done
# Offload as the README says: poll keeps it on every kernel (TSO; USO from
# 6.2); the uring engine has it, with multishot reads, from 6.7 and not
# before.
if grep -q 'offload: TSO on' /tmp/poll.err; then
    say "offload poll pass $(grep 'offload: TSO' /tmp/poll.err | one_line)"
else say "offload poll fail $(one_line < /tmp/poll.err)"; fi
if [ $old_kernel = no ]; then
    if grep -q 'offload: TSO on' /tmp/uring.err && ! grep -q 'single-shot' /tmp/uring.err; then
        say "offload uring pass multishot reads, $(grep 'offload: TSO' /tmp/uring.err | one_line)"
    else say "offload uring fail $(one_line < /tmp/uring.err)"; fi
elif grep -q 'offload: the uring engine needs multishot receives for it: off' /tmp/uring.err; then
    say "offload uring pass off before 6.7, and said so"
else say "offload uring fail $(one_line < /tmp/uring.err)"; fi
# What auto chose: before 6.7 (no READ_MULTISHOT, so no offload for the
# uring engine) poll, saying why; from 6.7 on, uring.
if [ $old_kernel = yes ]; then
    if grep -q 'engine poll' /tmp/a.err && grep -q 'using the poll engine' /tmp/a.err; then
        say "auto_choice auto pass $(grep 'using the poll engine' /tmp/a.err | one_line)"
    else say "auto_choice auto fail $(one_line < /tmp/a.err)"; fi
elif grep -q 'engine uring' /tmp/a.err; then
    say "auto_choice auto pass engine uring"
else say "auto_choice auto fail $(one_line < /tmp/a.err)"; fi

# What the probe must have said on a kernel without READ_MULTISHOT
# (before 6.7): the uring engine runs with single-shot reads and says so,
# and offload is off for it; poll keeps offload.
if [ $old_kernel = yes ]; then
    if grep -q 'no READ_MULTISHOT (Linux 6.7+): single-shot reads' /tmp/uring.err &&
        grep -q 'engine uring' /tmp/uring.err; then
        say "probe_single_shot uring pass $(grep 'single-shot' /tmp/uring.err | one_line)"
    else say "probe_single_shot uring fail $(one_line < /tmp/uring.err)"; fi
fi
# io_uring disabled by sysctl (Linux 6.6+): auto must take poll and say so.
if [ -e /proc/sys/kernel/io_uring_disabled ]; then
    echo 2 > /proc/sys/kernel/io_uring_disabled
    run_engine auto-uring-disabled auto
    if grep -q 'using the poll engine' /tmp/a.err && grep -q 'engine poll' /tmp/a.err; then
        say "uring_disabled auto pass $(grep 'using the poll engine' /tmp/a.err | one_line)"
    else say "uring_disabled auto fail $(one_line < /tmp/a.err)"; fi
    echo 0 > /proc/sys/kernel/io_uring_disabled
else
    say "uring_disabled auto n/a kernel.io_uring_disabled needs Linux 6.6+"
fi

# The engines compared inside the guest: a ratio, not a speed.
if tunfwd bench --quick --compare "$(cat /etc/bench-compare)" > /tmp/bench.out 2> /tmp/bench.err; then
    grep -E '^(udp|tcp|latency)' /tmp/bench.out | while read -r line; do
        say "bench uring/poll info $(echo "$line" | one_line)"
    done
else
    say "bench - fail $(tail -c 300 /tmp/bench.err | one_line)"
fi
# tunfwd's WireGuard mode against the kernel's WireGuard, per engine.
for m in $(cat /lib/modules/wg/order 2>/dev/null); do insmod /lib/modules/wg/$m 2>/dev/null; done
if ip -n b link add wg0 type wireguard 2> /tmp/wgerr; then
    umask 077
    tunfwd genkey > /tmp/ka; tunfwd pubkey < /tmp/ka > /tmp/pa
    tunfwd genkey > /tmp/kb; tunfwd pubkey < /tmp/kb > /tmp/pb
    printf '[Interface]\nPrivateKey = %s\nListenPort = 51820\n[Peer]\nPublicKey = %s\nEndpoint = 198.18.0.2:51820\nAllowedIPs = 198.19.5.2/32\n' \
        "$(cat /tmp/ka)" "$(cat /tmp/pb)" > /tmp/a.conf
    printf '[Interface]\nPrivateKey = %s\nListenPort = 51820\n[Peer]\nPublicKey = %s\nAllowedIPs = 198.19.5.1/32\n' \
        "$(cat /tmp/kb)" "$(cat /tmp/pa)" > /tmp/b.conf
    ip netns exec b wg setconf wg0 /tmp/b.conf
    ip -n b addr add 198.19.5.2/24 dev wg0
    ip -n b link set wg0 up
    for engine in poll uring; do
        : > /tmp/wa.err # not the previous engine's "tunnel up" (see above)
        (exec /usr/bin/ip netns exec a tunfwd tunnel --engine $engine --dev tun1 \
            --address 198.19.5.1/24 --wg-config /tmp/a.conf > /tmp/wa.out 2> /tmp/wa.err) &
        pid=$!
        if ! wait_for /tmp/wa.err "tunnel up"; then
            say "wg_startup $engine fail $(one_line < /tmp/wa.err)"
            kill $pid 2>/dev/null; wait $pid
            continue
        fi
        ping_check wg_ping $engine 198.19.5.2
        tcp_check wg_tcp_verified $engine 198.19.5.2
        if ip netns exec b wg show wg0 latest-handshakes | grep -q "$(cat /tmp/pa)"; then
            say "wg_handshake $engine pass the kernel's wg0 holds a handshake with tunfwd's key"
        else say "wg_handshake $engine fail $(ip netns exec b wg show wg0 | one_line)"; fi
        kill -TERM $pid; wait $pid
    done
else
    say "wireguard - fail no wireguard in this kernel: $(one_line < /tmp/wgerr)"
fi
say "done - info"
poweroff -f
INIT
}

run_kernel() {
    local name=$1 pkg dir root ver log started
    pkg=$(package_for "$name")
    [ -n "$pkg" ] || { echo "kernels.sh: no package for kernel $name in the registry" >&2; return 1; }
    dir=$cache/$pkg
    if [ ! -d "$dir/x/boot" ]; then
        mkdir -p "$dir"
        (cd "$dir" && rm -f ./*.deb && apt-get download "$pkg" >/dev/null 2>&1 && dpkg-deb -x ./*.deb x && rm -f ./*.deb)
    fi
    ver=$(ls "$dir/x/lib/modules")
    root=$dir/root
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,usr/bin,lib/modules,etc,proc,sys,dev,run,tmp}
    cp /bin/busybox "$root/bin/busybox"
    for a in $(/bin/busybox --list); do
        [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
    done
    for b in "$tunfwd" "$(command -v ip)" "$(command -v ping)" "$(command -v socat)" "$(command -v wg)"; do
        copy_bin "$root" "$b"
    done
    # The modules, uncompressed where the image has them as .ko.xz (busybox's
    # insmod takes a plain module).
    local m src
    for m in tun veth; do
        src=$dir/x/lib/modules/$ver/kernel/drivers/net/$m.ko
        if [ -e "$src" ]; then cp "$src" "$root/lib/modules/"
        elif [ -e "$src.xz" ]; then xz -dc "$src.xz" > "$root/lib/modules/$m.ko"
        else echo "kernels.sh: no $m module in $pkg" >&2; return 1
        fi
    done
    # WireGuard and what it needs, in the order modprobe would load them
    # (modules.dep, which depmod writes for the unpacked tree, lists a
    # module's dependencies, the last needing none).
    local deps wgdir
    [ -e "$dir/x/lib/modules/$ver/modules.dep" ] || depmod -b "$dir/x" "$ver"
    wgdir=$root/lib/modules/wg
    mkdir -p "$wgdir"
    : > "$wgdir/order"
    deps=$(grep -E '^kernel/drivers/net/wireguard/wireguard\.ko(\.xz)?:' "$dir/x/lib/modules/$ver/modules.dep" || true)
    if [ -n "$deps" ]; then
        local mods=() i
        read -r -a mods <<< "${deps#*:}"
        for ((i = ${#mods[@]} - 1; i >= 0; i--)); do
            m=${mods[$i]}
            xz -dcf "$dir/x/lib/modules/$ver/$m" > "$wgdir/$(basename "${m%.xz}")"
            basename "${m%.xz}" >> "$wgdir/order"
        done
        xz -dcf "$dir/x/lib/modules/$ver/${deps%%:*}" > "$wgdir/wireguard.ko"
        echo wireguard.ko >> "$wgdir/order"
    fi
    guest_init > "$root/init"
    echo "${BENCH_COMPARE:-poll,uring}" > "$root/etc/bench-compare"
    chmod +x "$root/init"
    (cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 > "$dir/initrd.gz"
    log=$dir/console.log
    started=$(date +%s)
    local boot
    for boot in 1 2; do
        echo "kernels.sh: booting $pkg ($ver) under QEMU (tcg, 2 vCPUs, 1 GiB)" >&2
        timeout 1200 qemu-system-x86_64 -accel tcg -smp 2 -m 1024 -nographic -no-reboot \
            -kernel "$dir/x/boot/vmlinuz-$ver" -initrd "$dir/initrd.gz" \
            -append "console=ttyS0 panic=-1 quiet" < /dev/null > "$log" 2>&1 || true
        grep -aq 'MATRIX ' "$log" && break
        [ "$boot" = 2 ] && break
        # A guest that died before its first check ran nothing of ours:
        # under software emulation a kernel now and then oopses while it
        # patches its own text at boot. One more boot, said in the matrix;
        # a second death fails below.
        mv "$log" "$dir/console-boot1.log"
        echo "kernels.sh: $pkg died before its first check: $(grep -a -m1 -E 'Oops|Kernel panic' "$dir/console-boot1.log" | tr -d '\r')" >&2
        echo "$ver boot - info the first boot died before its first check (console-boot1.log); booted again" >> "$cache/matrix.txt"
    done
    # (The first line may follow the firmware's escape codes.)
    grep -ao 'MATRIX .*' "$log" | tr -d '\r' | sed 's/^MATRIX //' >> "$cache/matrix.txt"
    echo "$ver time $(( $(date +%s) - started )) s" >> "$cache/times.txt"
    grep -aq 'MATRIX .* done - info' "$log" || {
        echo "kernels.sh: $pkg did not finish its checks; console: $log" >&2
        return 1
    }
}

: > "$cache/matrix.txt"
: > "$cache/times.txt"
rc=0
for k in "${@:-6.1}"; do
    run_kernel "$k" || rc=1
done
{
    echo "| kernel | check | engine | result | detail |"
    echo "|---|---|---|---|---|"
    awk '{ k=$1; c=$2; e=$3; r=$4; $1=$2=$3=$4=""; sub(/^ +/, ""); gsub(/\|/, "\\|"); printf "| %s | %s | %s | %s | %s |\n", k, c, e, r, $0 }' "$cache/matrix.txt"
} > "$cache/matrix.md"
cat "$cache/matrix.txt"
cat "$cache/times.txt"
if grep -q ' fail ' "$cache/matrix.txt"; then
    echo "kernels.sh: failed checks above" >&2
    rc=1
fi
exit $rc
