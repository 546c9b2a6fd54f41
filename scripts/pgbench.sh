#!/usr/bin/env bash
# pgbench.sh DIR - reproducible lifecycle-transition baseline against the postgres.sh server of DIR.
#
# Ensures the server runs (postgres.sh start DIR: reuses a running one), then for each variant
# (transition.sql = bigserial event ids, transition-counter.sql = counter-row event ids) and each
# client count: re-creates the schema (pgbench-init.sql, 10,000 agents), then RUNS times:
# CHECKPOINT; pgbench -n -f VARIANT -c C -j 2 -T SECONDS.  Prints the median TPS and median
# average latency per configuration (markdown table on stdout), raw logs in DIR/pgbench/.
#
# Knobs: PGBENCH_SECONDS (20)  PGBENCH_RUNS (3)  PGBENCH_CLIENTS ("8 32")  PGBENCH_JOBS (2)
#        PGBENCH_VARIANTS ("transition transition-counter")  PGBENCH_PROTOCOL (simple|extended|prepared)
#        PGBENCH_AGENTS (10000; transition*.sql draw ids from 1..10000, so keep it >= 10000)
# Also records the disk's fdatasync latency (pg_test_fsync) before and after: on a shared VM disk
# it swings by 40x (90 us .. 3.5 ms seen), and the TPS of the commit-serialised variant follows it.
# Wall time with the defaults: 2 variants x 2 client counts x 3 runs x 20 s + 2 x 15 s = ~5 minutes.
set -euo pipefail
[[ $# -eq 1 ]] || { echo "usage: $0 DIR" >&2; exit 2; }
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
DIR=$1
SECONDS_PER_RUN=${PGBENCH_SECONDS:-20}
RUNS=${PGBENCH_RUNS:-3}
CLIENTS=${PGBENCH_CLIENTS:-"8 32"}
JOBS=${PGBENCH_JOBS:-2}
VARIANTS=${PGBENCH_VARIANTS:-"transition transition-counter"}
PROTOCOL=${PGBENCH_PROTOCOL:-simple}
AGENTS=${PGBENCH_AGENTS:-10000}

bash "$HERE/postgres.sh" start "$DIR" >/dev/null
# shellcheck disable=SC1091
source "$DIR/env"            # TEST_DATABASE_URL, PGHOST/PGPORT/PGUSER/PGDATABASE, PGSH_BINDIR
BIN=$PGSH_BINDIR
OUT=$DIR/pgbench
mkdir -p "$OUT"
psql() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 "$@"; }

fsync_lat() { # fdatasync latency of this disk right now (pg_test_fsync, 1 s per test, ~15 s)
    "$BIN/pg_test_fsync" -s 1 -f "$OUT/fsync.test" 2>/dev/null |
        awk '/^[[:space:]]+fdatasync/ { print $4 " us/op"; exit }'
    rm -f "$OUT/fsync.test"
}

median() { # numbers on stdin -> median
    sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) { print "nan"; exit }
        if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

{
    echo "# pgbench baseline $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "server: $(psql -Atc 'SHOW server_version') at $PGHOST:$PGPORT;" \
        "$(psql -Atc "SELECT string_agg(name || '=' || current_setting(name), ' ' ORDER BY name) FROM pg_settings
           WHERE name IN ('fsync','synchronous_commit','wal_sync_method','shared_buffers','max_connections','commit_delay')")"
    echo "machine: $(nproc) cores, load average before: $(cut -d' ' -f1-3 /proc/loadavg);" \
        "disk fdatasync before: $(fsync_lat)"
    echo "pgbench -n -M $PROTOCOL -j $JOBS -T $SECONDS_PER_RUN, $RUNS runs per row, $AGENTS agents, medians"
    echo
} | tee "$OUT/results.md"

rows=()
for variant in $VARIANTS; do
    for c in $CLIENTS; do
        psql -v agents="$AGENTS" -f "$HERE/pgbench/pgbench-init.sql"
        : >"$OUT/$variant-c$c.tps"; : >"$OUT/$variant-c$c.lat"
        for r in $(seq 1 "$RUNS"); do
            psql -c CHECKPOINT
            log=$OUT/$variant-c$c-run$r.log
            "$BIN/pgbench" -n -M "$PROTOCOL" -f "$HERE/pgbench/$variant.sql" -c "$c" -j "$JOBS" \
                -T "$SECONDS_PER_RUN" >"$log" 2>&1 || { cat "$log" >&2; exit 1; }
            tps=$(sed -n 's/^tps = \([0-9.]*\) .*/\1/p' "$log")
            lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$log")
            fails=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$log")
            echo "$tps" >>"$OUT/$variant-c$c.tps"; echo "$lat" >>"$OUT/$variant-c$c.lat"
            printf '%s c=%s run %s: tps %s, latency avg %s ms, failed %s, load %s\n' \
                "$variant" "$c" "$r" "$tps" "$lat" "${fails:-0}" "$(cut -d' ' -f1 /proc/loadavg)" >&2
        done
        rows+=("| $variant.sql | $c | $(median <"$OUT/$variant-c$c.tps" | xargs printf '%.0f') | $(median <"$OUT/$variant-c$c.lat") | $(xargs printf '%.0f\n' <"$OUT/$variant-c$c.tps" | paste -sd/) |")
    done
done

{
    echo "| script | clients | TPS (median) | latency avg ms (median) | TPS of each run |"
    echo "|---|---:|---:|---:|---|"
    printf '%s\n' "${rows[@]}"
    echo
    echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg); disk fdatasync after: $(fsync_lat)"
} | tee -a "$OUT/results.md"
