# Sourced by the benchmark scripts: a scratch directory (DATA), a config
# with the per-agent transition limit raised out of the way (1000/s by
# default, it would refuse one client's transitions on its one agent), and
# `serve STORE`, which starts $SERVER on STORE and sets PID and URL; the
# server is stopped and DATA removed on exit.
DATA=$(mktemp -d)
PID=
stop() { if [ -n "$PID" ]; then kill -TERM "$PID" 2>/dev/null; wait "$PID" 2>/dev/null || true; PID=; fi; }
trap 'stop; rm -rf "$DATA"' EXIT
cat > "$DATA/limits.toml" <<'TOML'
[limits]
agent_transitions_per_second = 1000000
agent_transition_burst = 1000000
TOML
serve() {
    exec 3< <("$SERVER" serve --config "$DATA/limits.toml" --store "$1" --listen 127.0.0.1:0 --log warn)
    PID=$!
    read -r line <&3
    URL="http://${line#listening on }"
}
