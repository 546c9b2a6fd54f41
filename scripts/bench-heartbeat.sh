#!/usr/bin/env bash
# bench heartbeat at fleet scale: 100,000 agents beating 10,000 times a
# second in all, 1,000 going silent, beside the bare echo under the same
# schedule. Rows: HeartbeatStream and unary Heartbeat on the memory store,
# HeartbeatStream on SQLite, and HeartbeatStream on two processes sharing a
# PostgreSQL database (a fresh database per run, on a server this script
# starts).
#
#   bash scripts/bench-heartbeat.sh [BINARY] [RUNS]   (default target/release/agent-lifecycle, 3)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${1:-target/release/agent-lifecycle}
RUNS=${2:-3}
ROWS=${ROWS:-"stream unary sqlite postgres"}
bench() { "$BIN" bench heartbeat --runs "$RUNS" --baseline "$@"; }
for row in $ROWS; do
    echo "=== $row"
    case $row in
        stream) bench --mode stream ;;
        unary) bench --mode unary ;;
        sqlite) bench --mode stream --store sqlite ;;
        postgres)
            PGDIR=${PGDIR:-target/bench-pg}
            line=$(bash scripts/postgres.sh start "$PGDIR" | tail -1)
            bench --mode stream --store "${line#TEST_DATABASE_URL=}" --processes 2
            bash scripts/postgres.sh stop "$PGDIR"
            ;;
        *) echo "unknown row $row" >&2; exit 2 ;;
    esac
done
