#!/usr/bin/env bash
# What the SQLite commit thread spends per transition under the 64-in-flight
# load: WAL and checkpoint writes (`pwrite64` calls), syncs (`fsync` and
# `fdatasync` calls) and CPU time of
# the server's thread named `commit`, over 3 s in the middle of a 7 s run.
# Needs `perf` (for the system-call counts). SERVER is the server binary
# measured (default: this build); the client is always this build's.
#
#   cargo build --release
#   bash scripts/commit-cost.sh [SERVER_BINARY]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=target/release/agent-lifecycle
SERVER=${1:-$BIN}
# shellcheck source=scripts/bench-server.sh
source scripts/bench-server.sh
serve "sqlite://$DATA/bench.db"
"$BIN" --server "$URL" bench transition --concurrency 64 --connections 4 --duration 7s --warmup 1s --runs 1 > "$DATA/bench.out" 2>&1 &
CLIENT=$!
sleep 3
TID=$(grep -l '^commit$' /proc/"$PID"/task/*/comm | cut -d/ -f5)
read -r -a before < <(cut -d' ' -f14,15 "/proc/$PID/task/$TID/stat")
perf stat -x, -e syscalls:sys_enter_pwrite64,syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -t "$TID" -- sleep 3 2> "$DATA/perf.out"
read -r -a after < <(cut -d' ' -f14,15 "/proc/$PID/task/$TID/stat")
wait "$CLIENT"
stop
grep -E '^run' "$DATA/bench.out"
rate=$(grep -o '^run 1/1: [0-9.]*' "$DATA/bench.out" | awk '{print $3}')
ticks=$(( after[0] + after[1] - before[0] - before[1] ))
awk -F, -v rate="$rate" -v ticks="$ticks" -v hz="$(getconf CLK_TCK)" '
    /pwrite64/ { pw = $1 } /sys_enter_fsync/ { fs += $1 } /fdatasync/ { fs += $1; fd = $1 }
    END {
        n = rate * 3
        printf "commit thread per transition: pwrite64 %.2f, sync %.3f (fdatasync %.3f), CPU %.1f us\n",
            pw / n, fs / n, fd / n, ticks / hz * 1e6 / n
    }' "$DATA/perf.out"
