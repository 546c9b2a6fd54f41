#!/usr/bin/env bash
# Before/after comparison of two builds on one machine: the servers of OLD
# and NEW alternate, ROUNDS rounds of one `bench transition` run each (memory
# and SQLite), with NEW's client. Prints one line per run; compare the
# paired ratios of each round (a noisy machine moves both builds alike).
#
#   bash scripts/bench-compare.sh OLD_BINARY NEW_BINARY [ROUNDS]
set -euo pipefail
OLD=$1 NEW=$2 ROUNDS=${3:-5}
DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
serve() { # BINARY STORE: starts a server, sets PID and URL
    exec 3< <("$1" serve --store "$2" --listen 127.0.0.1:0 --log warn)
    PID=$!
    read -r line <&3
    URL="http://${line#listening on }"
}
for round in $(seq 1 "$ROUNDS"); do
    for store in memory sqlite; do
        for which in OLD NEW; do
            rm -rf "${DATA:?}"/*
            url=$store; [ "$store" = sqlite ] && url="sqlite://$DATA/bench.db"
            serve "${!which}" "$url"
            result=$("$NEW" --server "$URL" bench transition --concurrency 64 --connections 4 \
                --duration 8s --warmup 2s --runs 1 | grep '^run 1/1')
            echo "$round $store $which $result"
            kill -TERM "$PID"; wait "$PID" 2>/dev/null || true
        done
    done
done
