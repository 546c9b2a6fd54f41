#!/usr/bin/env bash
# What following another process costs on PostgreSQL: two server processes
# A and B on one fresh database, TransitionAgent load on A only, and the
# server CPU per transition read from A (its own commits) and, in the
# runs that alternate with those, from B (applying A's events to its table
# and publishing them). Then the same load on 1, 2 and 3 processes with
# the connections spread over all of them, for the total.
#
#   bash scripts/bench-postgres-apply.sh [BINARY] [RUNS]   (default target/release/agent-lifecycle, 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${1:-target/release/agent-lifecycle}
RUNS=${2:-3}
# shellcheck source=bench-pg.sh
source scripts/bench-pg.sh
load() { # SERVERS PID [ARGS...]
    local servers=$1 pid=$2; shift 2
    "$BIN" --server "$servers" bench transition --concurrency 64 --connections 6 \
        --duration 8s --warmup 2s --runs 1 --server-pid "$pid" "$@" | grep -E '^median'
}
serve_on 2 "$(fresh_database)"
echo "=== load on A (${urls[0]}); A = pid ${pids[0]}, B = pid ${pids[1]}"
for r in $(seq 1 "$RUNS"); do
    echo "run $r, CPU of A (own transitions): $(load "${urls[0]}" "${pids[0]}")"
    echo "run $r, CPU of B (applying A's):    $(load "${urls[0]}" "${pids[1]}")"
done
stop_servers
for n in 1 2 3; do
    serve_on "$n" "$(fresh_database)"
    all=$(IFS=,; echo "${pids[*]}")
    echo "=== $n process(es), 64 in flight over 6 connections spread over them"
    "$BIN" --server "$(server_list)" bench transition --concurrency 64 --connections 6 \
        --duration 8s --warmup 2s --runs "$RUNS" --server-pid "$all" | grep -E '^(run|median)'
    stop_servers
done
