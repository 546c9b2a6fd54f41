#!/usr/bin/env bash
# Every figure of the performance table as a ratio to its baseline measured
# in the same run (`--baseline`: the bare tonic echo for unary calls, a bare
# broadcast fan-out for watch; for SQLite also the durable echo, each call a
# row of a bare SQLite file in the same directory, fsynced before the
# answer: the ceiling of fsync before ack on this disk). SERVER is the
# server binary measured (default: this build); the client is always this
# build's, so two servers compare under the same load.
#
#   cargo build --release
#   bash scripts/bench-ratios.sh [SERVER_BINARY] [RUNS] [SECONDS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=target/release/agent-lifecycle
SERVER=${1:-$BIN} RUNS=${2:-3} SECS=${3:-5}
# shellcheck source=scripts/bench-server.sh
source scripts/bench-server.sh
load() { # TITLE BENCH ARGS...
    local title=$1; shift
    echo "== $title"
    "$BIN" --server "$URL" bench "$@" --runs "$RUNS" --baseline | grep -E '^(run|  baseline echo|  durable echo|  ratios|  bare|median)'
}

serve memory
load "TransitionAgent, memory store, 64 in flight over 4 connections" transition --concurrency 64 --connections 4 --duration "${SECS}s" --warmup 1s
stop
rm -rf "${DATA:?}"/*.db*; serve "sqlite://$DATA/bench.db"
load "TransitionAgent, SQLite, 64 in flight over 4 connections" transition --concurrency 64 --connections 4 --duration "${SECS}s" --warmup 1s --durable-baseline "$DATA"
# The one-client p99 follows the disk: the durable echo beside it gives the
# disk's own p99 in the same run.
load "TransitionAgent, SQLite, one client" transition --concurrency 1 --connections 1 --duration "${SECS}s" --warmup 1s --durable-baseline "$DATA"
load "GetAgent, SQLite, 64 in flight over 4 connections" get --concurrency 64 --connections 4 --duration "${SECS}s" --warmup 1s
stop
serve memory
load "WatchEvents, 100 subscribers (a connection each), 10 000 commits/s" watch --subscribers 100 --rate 10000 --writers 64 --duration "${SECS}s"
load "WatchEvents, 1 000 subscribers (a connection each), 1 000 commits/s" watch --subscribers 1000 --rate 1000 --duration "${SECS}s"
stop
