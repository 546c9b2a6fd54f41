#!/usr/bin/env bash
# The fleet at scale on SQLite: a file of 1,000,000 agents and 10,000,000
# events (populated straight through the store, kept in DIR for reruns),
# the restart time to serving and memory per agent on it; then ListAgents
# paging and GetAgentHistory on a server on that file beside the same on a
# file of 1,000 agents and 10,000 events, each against the bare echo of
# the same run.
#
#   bash scripts/bench-scale.sh [BINARY] [RUNS] [DIR]   (default target/release/agent-lifecycle, 3, target/bench-scale)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=${1:-target/release/agent-lifecycle}
RUNS=${2:-3}
DIR=${3:-target/bench-scale}
SERVER=$BIN
# shellcheck source=scripts/bench-server.sh
source scripts/bench-server.sh
mkdir -p "$DIR/large" "$DIR/small"
echo "=== restart on 1 000 000 agents, 10 000 000 events"
"$BIN" bench recovery --direct --agents 1000000 --events 10000000 --dir "$DIR/large" --runs "$RUNS"
"$BIN" bench recovery --direct --agents 1000 --events 10000 --dir "$DIR/small" --runs 1 >/dev/null
for size in small large; do
    serve "sqlite://$DIR/$size/bench.db"
    for op in list history; do
        echo "=== $op, $size file, 64 in flight over 4 connections"
        "$BIN" --server "$URL" bench "$op" --concurrency 64 --connections 4 --duration 5s \
            --warmup 1s --runs "$RUNS" --baseline | grep -E '^(run|  baseline echo|median)'
    done
    stop
done
