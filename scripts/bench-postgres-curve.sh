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
PGDIR=${PGDIR:-target/bench-pg}
line=$(bash scripts/postgres.sh start "$PGDIR")
ADMIN=${line#TEST_DATABASE_URL=}
# shellcheck disable=SC1091
source "$PGDIR/env"
limits=$(mktemp)
pids=()
cleanup() {
    if [ "${#pids[@]}" -gt 0 ]; then kill -TERM "${pids[@]}" 2>/dev/null || true; fi
    rm -f "$limits"
    bash scripts/postgres.sh stop "$PGDIR"
}
trap cleanup EXIT
printf '[limits]\nagent_transitions_per_second = 1000000\nagent_transition_burst = 1000000\n' > "$limits"
shopt -s inherit_errexit
fresh_database() {
    local db="curve_$$_$(date +%s%N)"
    "$PGSH_BINDIR/psql" -X -q "$ADMIN" -c "CREATE DATABASE $db"
    echo "${ADMIN%/*}/$db"
}
# run PROCESSES DATABASES (shared or separate): sets RATE (transitions/s)
# and CPU (server CPU per transition, all processes), medians of 3 runs.
run() {
    local n=$1 databases=$2 url urls=() l out
    url=$(fresh_database)
    for i in $(seq 1 "$n"); do
        if [ "$databases" = separate ] && [ "$i" -gt 1 ]; then url=$(fresh_database); fi
        exec {fd}< <("$BIN" serve --config "$limits" --store "$url" --listen 127.0.0.1:0 --log warn)
        pids+=($!)
        read -r l <&"$fd"
        urls+=("http://${l#listening on }")
    done
    out=$("$BIN" --server "$(IFS=,; echo "${urls[*]}")" bench transition --concurrency 64 \
        --connections 6 --duration "${SECS}s" --warmup 2s --runs 3 | grep '^median')
    kill -TERM "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
    pids=()
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
