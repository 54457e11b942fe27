#!/usr/bin/env bash
# The whole test suite, as CI runs it. First the tools the real-kernel tests
# need: installed when missing (as root, with apt-get), or the script stops
# and names the packages. Then `cargo test --no-fail-fast`. Every skipped
# test or case prints a SKIP line where it happens, and the last line says
# passed or failed and how many were skipped.
#
#   sudo bash tests/run.sh                          # everything
#   sudo bash tests/run.sh --test tunnel            # arguments go to cargo test
#   TUNFWD_SKIP_KERNEL_TESTS=1 bash tests/run.sh    # no root: real-kernel tests
#                                                   # skipped (never under CI=true)
#   TUNFWD_SKIP_URING=1 sudo -E bash tests/run.sh   # io_uring disabled here:
#                                                   # its cases skipped
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

missing=()
for pair in ip:iproute2 ss:iproute2 ping:iputils-ping socat:socat iperf3:iperf3 \
    ethtool:ethtool setcap:libcap2-bin setpriv:util-linux prlimit:util-linux \
    promtool:prometheus prometheus:prometheus systemd-analyze:systemd; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ] && [ "${TUNFWD_SKIP_KERNEL_TESTS:-}" != 1 ]; then
    # One package may provide several tools.
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "tests/run.sh: installing ${missing[*]}"
        if ! { apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
                "${missing[@]}" >/dev/null; }; then
            echo "tests/run.sh: could not install ${missing[*]}" >&2
            exit 2
        fi
    else
        echo "tests/run.sh: the real-kernel tests need ${missing[*]}:" \
            "install them (apt-get install -y ${missing[*]}) and run as root," \
            "or set TUNFWD_SKIP_KERNEL_TESTS=1 to skip those tests" >&2
        exit 2
    fi
fi

skip_log=$(mktemp)
trap 'rm -f "$skip_log"' EXIT
TUNFWD_SKIP_LOG=$skip_log cargo test --no-fail-fast "$@"
rc=$?
# A test that skips the same case more than once (one per loop round)
# counts once.
sort -u -o "$skip_log" "$skip_log"
skipped=$(grep -c '^SKIP ' "$skip_log")
if [ "$skipped" -gt 0 ]; then
    echo
    echo "skipped (asked for by TUNFWD_SKIP_KERNEL_TESTS or TUNFWD_SKIP_URING):"
    sed 's/^SKIP /  /' "$skip_log"
fi
if [ "$rc" = 0 ]; then
    echo "tests/run.sh: all tests passed, $skipped skipped"
else
    echo "tests/run.sh: FAILED (cargo test exit $rc), $skipped skipped"
fi
exit "$rc"
