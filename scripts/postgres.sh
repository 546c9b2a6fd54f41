#!/usr/bin/env bash
# postgres.sh - install (if missing) and run a throwaway PostgreSQL server for tests.
#
# Usage:
#   postgres.sh [start] DIR   install PostgreSQL from Debian's packages if missing, then
#                             start (or reuse) a private server whose data lives under DIR.
#                             stdout: exactly one line  TEST_DATABASE_URL=postgres://...
#                             also written: DIR/url (the URL), DIR/env (export lines).
#   postgres.sh stop DIR      stop the server started for DIR (by its data directory's
#                             postmaster.pid only; nothing else is touched).
#   postgres.sh status DIR    exit 0 and print the URL if that server is running.
#   postgres.sh destroy DIR   stop it and delete its data directory.
#   postgres.sh install       only install the packages.
#
# The server: own data directory (DIR/data, or a /tmp fallback when the postgres OS user
# cannot reach DIR, e.g. a checkout under /root), listens on 127.0.0.1 only, on a free port
# chosen at run time, no Unix socket, run as the `postgres` OS user when invoked as root,
# trust auth on loopback TCP (or scram if PGSH_PASSWORD is set), durable settings
# (fsync, synchronous_commit, full_page_writes all on).
#
# Environment knobs (all optional):
#   PGSH_DB              test database name            (default agent_lifecycle_test)
#   PGSH_USER            database superuser name       (default postgres)
#   PGSH_PASSWORD        if set: scram-sha-256 auth with this password (URL-safe chars only)
#   PGSH_PORT            fixed port instead of a free one picked at run time
#   PGSH_MAX_CONNECTIONS (default 200)
#   PGSH_SHARED_BUFFERS  (default 128MB)
#   PGSH_PG_MAJOR        use /usr/lib/postgresql/<major>/bin (default: newest installed)
#   PGSH_CREATE_MAIN_CLUSTER=1  let a first-time package install create and start Debian's
#                        default cluster 15/main on port 5432 (default: suppressed, see below)
set -euo pipefail

PROG=${0##*/}
DB_NAME=${PGSH_DB:-agent_lifecycle_test}
DB_USER=${PGSH_USER:-postgres}
MAX_CONN=${PGSH_MAX_CONNECTIONS:-200}
SHARED_BUFFERS=${PGSH_SHARED_BUFFERS:-128MB}
OS_USER=postgres

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- installation
find_bindir() {
    local d
    if [[ -n ${PGSH_PG_MAJOR:-} ]]; then
        d=/usr/lib/postgresql/$PGSH_PG_MAJOR/bin
    else
        d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    fi
    [[ -n $d ]] || return 1
    local b
    for b in initdb pg_ctl postgres psql pgbench pg_isready; do
        [[ -x $d/$b ]] || return 1
    done
    printf '%s\n' "$d"
}

install_packages() {
    if find_bindir >/dev/null; then
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "PostgreSQL is not installed and I am not root: apt-get install postgresql postgresql-client"
    command -v apt-get >/dev/null || die "no apt-get: this script targets Debian"
    local t0; t0=$(now)
    export DEBIAN_FRONTEND=noninteractive
    # On a first install, Debian's postgresql-common creates cluster <ver>/main on port 5432 and
    # starts it (where services may start).  We do not use it, so ask it not to create one:
    # createcluster.conf is a ucf-managed file, a pre-existing copy is kept with UCF_FORCE_CONFFOLD.
    if [[ ${PGSH_CREATE_MAIN_CLUSTER:-0} != 1 ]] && ! dpkg -s postgresql-common >/dev/null 2>&1 \
        && [[ ! -e /etc/postgresql-common/createcluster.conf ]]; then
        mkdir -p /etc/postgresql-common
        printf '%s\n' '# written by postgres.sh before postgresql-common was installed' \
            'create_main_cluster = false' >/etc/postgresql-common/createcluster.conf
        export UCF_FORCE_CONFFOLD=1
        log "first install: default cluster creation disabled (create_main_cluster = false)"
    fi
    # Debian 12: pgbench ships in postgresql-15 (the server package); psql in postgresql-client-15.
    # postgresql-client is listed too for releases where pgbench moved to the client package.
    local pkgs=(postgresql postgresql-client)
    local aptopts=(-y -q --no-install-recommends -o DPkg::Lock::Timeout=300)
    log "installing ${pkgs[*]} from Debian's packages"
    if ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
        apt-get update -q >&2
    fi
    if ! apt-get install "${aptopts[@]}" "${pkgs[@]}" >&2; then
        log "apt-get install failed; refreshing the package lists once and retrying"
        apt-get update -q >&2
        apt-get install "${aptopts[@]}" "${pkgs[@]}" >&2
    fi
    find_bindir >/dev/null || die "installed ${pkgs[*]} but initdb/pg_ctl/pgbench are still missing"
    log "install took $(elapsed "$t0") s"
}

# ---------------------------------------------------------------- helpers
# Run a command as the postgres OS user when we are root (initdb refuses root).
as_pg() {
    if [[ $EUID -eq 0 ]]; then
        (cd / && LC_ALL=C runuser -u "$OS_USER" -- "$@")
    else
        (cd / && LC_ALL=C "$@")
    fi
}

abspath() { # like realpath -m, without requiring the path to exist
    local p=$1
    [[ $p == /* ]] || p=$PWD/$p
    realpath -m -- "$p"
}

pick_port() {
    if [[ -n ${PGSH_PORT:-} ]]; then echo "$PGSH_PORT"; return; fi
    if command -v python3 >/dev/null 2>&1 && python3 -c 'import socket' 2>/dev/null; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    if command -v perl >/dev/null 2>&1; then
        perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(LocalAddr => "127.0.0.1", LocalPort => 0, Listen => 1) or die; print $s->sockport, "\n"'
        return
    fi
    local p
    for _ in $(seq 1 50); do
        p=$(( 20000 + RANDOM % 30000 ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    die "could not find a free port"
}

# The postgres-owned base directory holding data/ and server.log.  DIR itself when the
# postgres user can reach it, else a per-DIR directory under /tmp (recorded in DIR/base).
resolve_base() {
    local dir=$1
    if [[ -f $dir/base ]]; then cat "$dir/base"; return; fi
    echo "$dir"
}

setup_base() {
    local dir=$1 base
    if [[ -f $dir/base ]]; then base=$(cat "$dir/base"); else base=$dir; fi
    mkdir -p "$base/data"
    if [[ $EUID -eq 0 ]]; then
        chown "$OS_USER:$OS_USER" "$base/data"
        if ! runuser -u "$OS_USER" -- test -w "$base/data" 2>/dev/null; then
            [[ $base == "$dir" ]] || die "postgres user cannot write $base/data"
            rmdir "$base/data" 2>/dev/null || true
            base=/tmp/pgsh-$(printf '%s' "$dir" | sha1sum | cut -c1-12)
            log "postgres OS user cannot reach $dir; data directory goes to $base/data"
            mkdir -p "$base/data"
            chown "$OS_USER:$OS_USER" "$base" "$base/data"
            echo "$base" >"$dir/base"
            ln -sfn "$base/data" "$dir/data"
        fi
        touch "$base/server.log"; chown "$OS_USER:$OS_USER" "$base/server.log"
    fi
    chmod 700 "$base/data"
    echo "$base"
}

pid_port() { # port of a running server, from line 4 of postmaster.pid
    sed -n 4p "$1/postmaster.pid" 2>/dev/null
}

pid_alive() { # a live (not zombie) process named postgres; an init that does not reap leaves
              # zombies around, and a reboot can hand the pid to an unrelated process
    local st
    [[ $1 =~ ^[0-9]+$ ]] || return 1
    st=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -n $st && $st != Z && $st != X ]] || return 1
    [[ $(cat "/proc/$1/comm" 2>/dev/null) == postgres ]]
}

is_running() { as_pg "$BINDIR/pg_ctl" -D "$1" status >/dev/null 2>&1; }

write_outputs() {
    local dir=$1 port=$2 auth="$DB_USER"
    [[ -z ${PGSH_PASSWORD:-} ]] || auth="$DB_USER:$PGSH_PASSWORD"
    local url="postgres://$auth@127.0.0.1:$port/$DB_NAME"
    echo "$url" >"$dir/url"
    echo "$port" >"$dir/port"
    {
        echo "export TEST_DATABASE_URL='$url'"
        echo "export PGHOST=127.0.0.1 PGPORT=$port PGUSER='$DB_USER' PGDATABASE='$DB_NAME'"
        [[ -z ${PGSH_PASSWORD:-} ]] || echo "export PGPASSWORD='$PGSH_PASSWORD'"
        echo "export PGSH_BINDIR='$BINDIR'"
    } >"$dir/env"
    echo "TEST_DATABASE_URL=$url"
}

psql_admin() { # psql against the maintenance db over TCP
    local port=$1; shift
    PGPASSWORD=${PGSH_PASSWORD:-} as_pg "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 \
        -h 127.0.0.1 -p "$port" -U "$DB_USER" -d postgres "$@"
}

ensure_db() {
    local port=$1
    local exists
    exists=$(psql_admin "$port" -tAc "SELECT 1 FROM pg_database WHERE datname = '$DB_NAME'")
    if [[ $exists != 1 ]]; then
        psql_admin "$port" -c "CREATE DATABASE \"$DB_NAME\""
        log "created database $DB_NAME"
    fi
}

do_initdb() {
    local pgdata=$1 t0; t0=$(now)
    local authargs=(--auth-host=trust --auth-local=trust)
    local pwfile=
    if [[ -n ${PGSH_PASSWORD:-} ]]; then
        pwfile=$(dirname "$pgdata")/.pwfile
        printf '%s\n' "$PGSH_PASSWORD" >"$pwfile"
        [[ $EUID -ne 0 ]] || chown "$OS_USER" "$pwfile"
        chmod 600 "$pwfile"
        authargs=(--auth-host=scram-sha-256 --auth-local=scram-sha-256 --pwfile="$pwfile")
    fi
    # --no-sync: the data directory is throwaway; it only skips initdb's final fsync of the
    # freshly created files, the running server keeps fsync = on.
    as_pg "$BINDIR/initdb" -D "$pgdata" -U "$DB_USER" --encoding=UTF8 --locale=C \
        "${authargs[@]}" --no-sync --no-instructions >/dev/null
    [[ -z $pwfile ]] || rm -f "$pwfile"
    as_pg tee -a "$pgdata/postgresql.conf" >/dev/null <<EOF

# ---- added by postgres.sh: throwaway test server ----
listen_addresses = '127.0.0.1'
unix_socket_directories = ''            # TCP only; avoids socket path length/permission issues
include_if_exists = 'port.conf'         # port chosen at start time
max_connections = $MAX_CONN
shared_buffers = $SHARED_BUFFERS
work_mem = 4MB
maintenance_work_mem = 64MB
huge_pages = off
# durability: same as production defaults
fsync = on
synchronous_commit = on
full_page_writes = on
wal_sync_method = fdatasync
max_wal_size = 1GB
# detect dead clients (advisory-lock leases): idle 10s, then 3 probes 5s apart
tcp_keepalives_idle = 10
tcp_keepalives_interval = 5
tcp_keepalives_count = 3
tcp_user_timeout = 30000                # ms; unacknowledged data to a dead peer
timezone = 'UTC'
log_timezone = 'UTC'
log_line_prefix = '%m [%p] %q%u@%d '
log_min_messages = warning
log_checkpoints = off
EOF
    log "initdb took $(elapsed "$t0") s ($pgdata)"
}

start_server() { # start with a fresh port; retry if the port got taken meanwhile
    local base=$1 pgdata=$1/data port
    for _ in 1 2 3 4 5; do
        port=$(pick_port)
        echo "port = $port" | as_pg tee "$pgdata/port.conf" >/dev/null
        # 9>&-: the postmaster must not inherit the DIR/.lock descriptor
        if as_pg "$BINDIR/pg_ctl" -D "$pgdata" -l "$base/server.log" -w -t 60 start >/dev/null 9>&-; then
            echo "$port"
            return 0
        fi
        if tail -n 5 "$base/server.log" | grep -q 'pre-existing shared memory block'; then
            log "children of a killed postmaster still hold shared memory; waiting"
            sleep 2; continue
        fi
        if [[ -n ${PGSH_PORT:-} ]] || ! tail -n 20 "$base/server.log" | grep -q 'could not bind\|Address already in use'; then
            tail -n 20 "$base/server.log" >&2 || true
            die "pg_ctl start failed (log: $base/server.log)"
        fi
        log "port $port was taken, retrying with another one"
    done
    die "could not start the server on a free port"
}

# ---------------------------------------------------------------- commands
cmd_start() {
    local dir; dir=$(abspath "$1")
    local t0; t0=$(now)
    install_packages
    BINDIR=$(find_bindir) || die "no PostgreSQL binaries found"
    local major; major=$(basename "$(dirname "$BINDIR")")
    mkdir -p "$dir"
    exec 9>"$dir/.lock"
    flock -w 120 9 || die "another postgres.sh holds $dir/.lock"
    touch "$dir/.postgres-sh"                    # marks DIR as ours (destroy/reinit allowed)

    local base; base=$(setup_base "$dir")
    local pgdata=$base/data port

    if [[ -f $pgdata/PG_VERSION && $(cat "$pgdata/PG_VERSION") != "$major" ]]; then
        log "data directory is for PostgreSQL $(cat "$pgdata/PG_VERSION"), binaries are $major: re-creating"
        if is_running "$pgdata"; then
            as_pg "$BINDIR/pg_ctl" -D "$pgdata" -m immediate -w stop >/dev/null || true
        fi
        find "$pgdata" -mindepth 1 -delete
    fi

    if [[ -f $pgdata/PG_VERSION && -f $pgdata/postmaster.pid ]]; then
        local pid; pid=$(head -n 1 "$pgdata/postmaster.pid")
        if pid_alive "$pid"; then
            port=$(pid_port "$pgdata")
            # -t 30: a server still in crash recovery answers "rejecting connections" for a while
            if "$BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" -t 30; then
                log "reusing the running server (pid $pid, port $port)"
                ensure_db "$port"
                write_outputs "$dir" "$port"
                return 0
            fi
            log "server pid $pid is not answering on port $port: restarting it"
            as_pg "$BINDIR/pg_ctl" -D "$pgdata" -m fast -w -t 20 stop >/dev/null 2>&1 ||
                as_pg "$BINDIR/pg_ctl" -D "$pgdata" -m immediate -w -t 10 stop >/dev/null 2>&1 || true
        fi
        if [[ -f $pgdata/postmaster.pid ]] && ! pid_alive "$(head -n 1 "$pgdata/postmaster.pid")"; then
            # postmaster killed (kill -9, OOM, reboot): a zombie or a reused pid would make the
            # new postmaster refuse to start, so drop the stale lock file ourselves.
            log "removing stale postmaster.pid (pid $pid is gone)"
            rm -f "$pgdata/postmaster.pid"
        fi
    fi

    if [[ ! -f $pgdata/PG_VERSION ]]; then
        if [[ -n $(ls -A "$pgdata") ]]; then  # half-made data dir from an interrupted run
            log "removing incomplete data directory $pgdata"
            find "$pgdata" -mindepth 1 -delete
        fi
        do_initdb "$pgdata"
    fi

    local t1; t1=$(now)
    port=$(start_server "$base")
    ensure_db "$port"
    log "server started in $(elapsed "$t1") s: pid $(head -n 1 "$pgdata/postmaster.pid"), 127.0.0.1:$port, data $pgdata, log $base/server.log (total $(elapsed "$t0") s)"
    write_outputs "$dir" "$port"
}

cmd_stop() {
    local dir; dir=$(abspath "$1")
    [[ -d $dir ]] || { log "$dir does not exist: nothing to stop"; return 0; }
    BINDIR=$(find_bindir) || die "no PostgreSQL binaries found"
    local pgdata; pgdata=$(resolve_base "$dir")/data
    if [[ ! -f $pgdata/postmaster.pid ]]; then
        log "no server running for $dir"
        return 0
    fi
    if ! as_pg "$BINDIR/pg_ctl" -D "$pgdata" -m fast -w -t 60 stop >/dev/null; then
        log "fast shutdown failed, using immediate"
        as_pg "$BINDIR/pg_ctl" -D "$pgdata" -m immediate -w -t 60 stop >/dev/null
    fi
    log "stopped the server of $pgdata"
}

cmd_status() {
    local dir; dir=$(abspath "$1")
    BINDIR=$(find_bindir) || die "no PostgreSQL binaries found"
    local pgdata; pgdata=$(resolve_base "$dir")/data
    if [[ -f $pgdata/PG_VERSION ]] && is_running "$pgdata"; then
        echo "TEST_DATABASE_URL=$(cat "$dir/url" 2>/dev/null)"
        return 0
    fi
    log "not running"
    return 3
}

cmd_destroy() {
    local dir; dir=$(abspath "$1")
    [[ -d $dir ]] || return 0
    [[ -f $dir/.postgres-sh ]] || die "$dir was not created by postgres.sh; refusing to delete"
    cmd_stop "$dir"
    local base; base=$(resolve_base "$dir")
    rm -rf -- "$base/data" "$base/server.log" "$dir/data" "$dir/url" "$dir/port" "$dir/env" "$dir/base"
    [[ $base == "$dir" ]] || rmdir "$base" 2>/dev/null || true
    log "destroyed $dir"
}

main() {
    local cmd=${1:-}
    case $cmd in
        start|stop|status|destroy)
            [[ $# -eq 2 ]] || die "usage: $PROG $cmd DIR"
            "cmd_$cmd" "$2" ;;
        install) install_packages; BINDIR=$(find_bindir); log "binaries: $BINDIR" ;;
        ""|-h|--help) sed -n '2,30p' "$0" >&2; [[ -n $cmd ]] ;;
        *)
            [[ $# -eq 1 ]] || die "usage: $PROG [start|stop|status|destroy] DIR"
            cmd_start "$1" ;;
    esac
}

main "$@"
