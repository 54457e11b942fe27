#!/usr/bin/env bash
# Nothing lost below capacity, at scale: tests/load.rs with 1,000,000
# numbered UDP datagrams (4 flows, 512-byte payload) per engine, sent at
# half the capacity the test measures first; every datagram must arrive, in
# order within its flow, except those the receiving forwarder's CoDel (on by
# default) dropped and counted, which must account for every missing one.
# Release build.
#
#   sudo bash bench-scripts/lossless.sh
#   COUNT=200000 sudo -E bash bench-scripts/lossless.sh
set -euo pipefail
cd "$(dirname "$0")/.."
COUNT=${COUNT:-1000000}
if [ "$(id -u)" != 0 ]; then
    echo "lossless.sh: run as root: the test creates network namespaces" >&2
    exit 1
fi
TUNFWD_LOSSLESS_COUNT=$COUNT cargo test --release --quiet --test load -- --nocapture 2>&1 |
    grep -E '^(poll|uring):|test result|panicked|lost'
