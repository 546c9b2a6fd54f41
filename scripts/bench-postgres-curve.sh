#!/usr/bin/env bash
# The PostgreSQL curve beside its bound: one process, three processes on
# one database, and three processes each on a database of its own, which
# share nothing (no turn to commit, no other process's events to follow):
# what three processes can reach on this machine with any ordering design.
# The three cases alternate ROUNDS times under the same client load (64 in
# flight over 6 connections), each on a fresh database, so that every
# round's ratios compare figures from the same minutes.
#
#   cargo build --release
#   bash scripts/bench-postgres-curve.sh [BINARY] [ROUNDS] [SECONDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${1:-target/release/agent-lifecycle}
ROUNDS=${2:-3} SECS=${3:-8}
# shellcheck source=bench-pg.sh
source scripts/bench-pg.sh
# run PROCESSES DATABASES (shared or separate): sets RATE (transitions/s)
# and CPU (server CPU per transition, all processes), medians of 3 runs.
run() {
    local n=$1 databases=$2 url out
    url=$(fresh_database)
    serve_on 1 "$url"
    for _ in $(seq 2 "$n"); do
        if [ "$databases" = separate ]; then url=$(fresh_database); fi
        serve_on 1 "$url"
    done
    out=$("$BIN" --server "$(server_list)" bench transition --concurrency 64 \
        --connections 6 --duration "${SECS}s" --warmup 2s --runs 3 | grep '^median')
    stop_servers
    RATE=$(echo "$out" | grep -oE '[0-9.]+ transitions/s' | grep -oE '^[0-9.]+')
    CPU=$(echo "$out" | grep -oE '[0-9.]+ us/op' | grep -oE '^[0-9.]+')
}
printf '%-6s %15s %23s %23s\n' round "1 process/s" "3 on one database" "3 sharing nothing"
for r in $(seq 1 "$ROUNDS"); do
    run 1 shared; one=$RATE one_cpu=$CPU
    run 3 shared; shared=$RATE shared_cpu=$CPU
    run 3 separate; apart=$RATE apart_cpu=$CPU
    awk -v r="$r" -v a="$one" -v ac="$one_cpu" -v b="$shared" -v bc="$shared_cpu" \
        -v c="$apart" -v cc="$apart_cpu" 'BEGIN { printf "%-6s %8.0f %5.1fus %9.0f %5.2f %5.1fus %9.0f %5.2f %5.1fus\n", r, a, ac, b, b / a, bc, c, c / a, cc }'
done
echo "(each figure the median of 3 runs of ${SECS} s; ratios to the same round's 1 process; us: server CPU per transition, all processes)"
