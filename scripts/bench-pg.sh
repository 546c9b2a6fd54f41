# Sourced by the PostgreSQL benchmark scripts, after BIN is set. Starts the
# scripts/postgres.sh server of $PGDIR (default target/bench-pg) and sets
# ADMIN (its admin URL) and PGSH_BINDIR, and provides:
#   fresh_database        prints the URL of a new, empty database;
#   serve_on N URL        starts N servers of $BIN on URL, appending to
#                         `pids` and to `urls` (http://HOST:PORT each);
#   server_list           prints `urls` comma-separated, for --server;
#   stop_servers          stops every server started and empties both.
# The servers run with the per-agent transition limit (1000/s by default)
# raised out of the way: a one-client run drives one agent faster than that.
# On exit, whatever the path, the servers and PostgreSQL are stopped.
shopt -s inherit_errexit
PGDIR=${PGDIR:-target/bench-pg}
line=$(bash scripts/postgres.sh start "$PGDIR" | tail -1)
ADMIN=${line#TEST_DATABASE_URL=}
# shellcheck disable=SC1091
source "$PGDIR/env"
BENCH_LIMITS=$(mktemp)
printf '[limits]\nagent_transitions_per_second = 1000000\nagent_transition_burst = 1000000\n' > "$BENCH_LIMITS"
pids=() urls=()
stop_servers() {
    if [ "${#pids[@]}" -gt 0 ]; then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        wait "${pids[@]}" 2>/dev/null || true
    fi
    pids=() urls=()
}
trap 'stop_servers; rm -f "$BENCH_LIMITS"; bash scripts/postgres.sh stop "$PGDIR"' EXIT
fresh_database() {
    local db
    db="bench_$$_$(date +%s%N)"
    "$PGSH_BINDIR/psql" -X -q "$ADMIN" -c "CREATE DATABASE $db"
    echo "${ADMIN%/*}/$db"
}
serve_on() {
    local l fd
    for _ in $(seq 1 "$1"); do
        exec {fd}< <("$BIN" serve --config "$BENCH_LIMITS" --store "$2" --listen 127.0.0.1:0 --log warn)
        pids+=($!)
        read -r l <&"$fd"
        urls+=("http://${l#listening on }")
    done
}
server_list() { (IFS=,; echo "${urls[*]}"); }
