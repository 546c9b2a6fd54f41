#!/usr/bin/env bash
# TransitionAgent with 1, 2 and 3 server processes on one PostgreSQL
# database (a fresh database each), then the pgbench baseline on the same
# server, in one session.
#
#   bash scripts/bench-postgres.sh [BINARY]   (default target/release/agent-lifecycle)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${1:-target/release/agent-lifecycle}
PGDIR=${PGDIR:-target/bench-pg}
line=$(bash scripts/postgres.sh start "$PGDIR")
ADMIN=${line#TEST_DATABASE_URL=}
# shellcheck disable=SC1091
source "$PGDIR/env"
# The per-agent transition limit (1000/s by default) raised out of the way:
# the one-client run drives one agent faster than that.
limits=$(mktemp)
trap 'rm -f "$limits"' EXIT
printf '[limits]\nagent_transitions_per_second = 1000000\nagent_transition_burst = 1000000\n' > "$limits"
for n in 1 2 3; do
    db="bench_${n}_$$"
    "$PGSH_BINDIR/psql" -X -q "$ADMIN" -c "CREATE DATABASE $db"
    url="${ADMIN%/*}/$db"
    pids=() urls=()
    for _ in $(seq 1 "$n"); do
        exec {fd}< <("$BIN" serve --config "$limits" --store "$url" --listen 127.0.0.1:0 --log warn)
        pids+=($!)
        read -r l <&"$fd"
        urls+=("http://${l#listening on }")
    done
    list=$(IFS=,; echo "${urls[*]}")
    echo "=== $n process(es) on PostgreSQL"
    "$BIN" --server "$list" bench transition --concurrency 64 --connections 6 \
        --duration 10s --warmup 3s --runs 3 | grep -E '^run|median|sequences'
    if [ "$n" = 1 ]; then
        echo "=== 1 process, one client"
        "$BIN" --server "$list" bench transition --concurrency 1 --connections 1 \
            --duration 10s --warmup 2s --runs 3 | grep -E '^run|median'
    fi
    kill -TERM "${pids[@]}"; wait "${pids[@]}" 2>/dev/null || true
done
echo "=== pgbench baseline"
PGBENCH_SECONDS=10 PGBENCH_RUNS=3 bash scripts/pgbench.sh "$PGDIR"
bash scripts/postgres.sh stop "$PGDIR"
