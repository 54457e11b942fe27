#!/usr/bin/env bash
# The test suite and the demo on a kernel that refuses io_uring: sets
# `kernel.io_uring_disabled=2` for the run and restores the previous value on
# every exit path. The default engine must fall back to poll and say so, the
# io_uring cases must report a visible skip (TUNFWD_SKIP_URING=1 asks for
# that), and the demo must print its table. Needs root; the setting is
# machine-wide, so nothing else should use io_uring meanwhile.
#
#   sudo bash tests/without-io-uring.sh                  # suite and demo
#   sudo bash tests/without-io-uring.sh --test uring     # arguments go to cargo test
set -euo pipefail
cd "$(dirname "$0")/.."

knob=/proc/sys/kernel/io_uring_disabled
if [ ! -e "$knob" ]; then
    echo "tests/without-io-uring.sh: this kernel has no $knob (Linux 6.6+)" >&2
    exit 2
fi
if [ "$(id -u)" != 0 ]; then
    echo "tests/without-io-uring.sh: run as root (it sets $knob)" >&2
    exit 2
fi
# Build first, with io_uring still on (nothing in the build needs it, but a
# failed build should not leave the knob set for long).
cargo build --release --quiet
cargo test --no-run --quiet

before=$(cat "$knob")
restore() { echo "$before" >"$knob"; }
trap restore EXIT
trap 'exit 130' INT TERM
echo 2 >"$knob"
echo "tests/without-io-uring.sh: kernel.io_uring_disabled=2 (was $before)"

rc=0
TUNFWD_SKIP_URING=1 bash tests/run.sh "$@" || rc=$?
if [ $# -eq 0 ]; then
    demo=$(SECS=1 bash bench-scripts/demo.sh) || rc=$?
    echo "$demo"
    # The demo ran poll, skipped uring with a line, and printed its table.
    for want in "SKIP engine uring" "tunfwd, engine poll" "tunfwd, engine uring .*skipped"; do
        if ! grep -q "$want" <<<"$demo"; then
            echo "tests/without-io-uring.sh: the demo's output lacks \"$want\"" >&2
            rc=1
        fi
    done
fi
restore
echo "tests/without-io-uring.sh: kernel.io_uring_disabled restored to $(cat "$knob"); exit $rc"
exit "$rc"
