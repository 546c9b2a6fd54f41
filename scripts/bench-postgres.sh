#!/usr/bin/env bash
# TransitionAgent with 1, 2 and 3 server processes on one PostgreSQL
# database (a fresh database each), then the pgbench baseline on the same
# server, in one session.
#
#   bash scripts/bench-postgres.sh [BINARY]   (default target/release/agent-lifecycle)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${1:-target/release/agent-lifecycle}
# shellcheck source=bench-pg.sh
source scripts/bench-pg.sh
for n in 1 2 3; do
    serve_on "$n" "$(fresh_database)"
    list=$(server_list)
    echo "=== $n process(es) on PostgreSQL"
    "$BIN" --server "$list" bench transition --concurrency 64 --connections 6 \
        --duration 10s --warmup 3s --runs 3 | grep -E '^run|median|sequences'
    if [ "$n" = 1 ]; then
        echo "=== 1 process, one client"
        "$BIN" --server "$list" bench transition --concurrency 1 --connections 1 \
            --duration 10s --warmup 2s --runs 3 | grep -E '^run|median'
    fi
    stop_servers
done
echo "=== pgbench baseline"
PGBENCH_SECONDS=10 PGBENCH_RUNS=3 bash scripts/pgbench.sh "$PGDIR"
