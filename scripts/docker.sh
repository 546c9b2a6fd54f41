#!/usr/bin/env bash
# docker.sh - install (if missing) and run a private Docker daemon for tests.
#
# Usage:
#   docker.sh [start] DIR   install Debian's docker.io and busybox-static if missing, start
#                           (or reuse) a daemon whose state lives under DIR, and build the
#                           test image from busybox-static (no registry is needed).
#                           stdout: exactly one line  DOCKER_HOST=unix://DIR/docker.sock
#   docker.sh stop DIR      stop the daemon started for DIR (by its pid file only).
#   docker.sh status DIR    exit 0 and print DOCKER_HOST if that daemon answers.
#   docker.sh debian DIR    also give that daemon BASE_IMAGE (default debian:bookworm-slim),
#                           a minimal Debian bookworm made with debootstrap from Debian's
#                           mirror and imported (for building deploy/docker/Dockerfile.runtime).
#
# The daemon: its own --data-root, --exec-root, pid file and socket under DIR, no
# iptables rules and no bridge (--iptables=false --bridge=none), so it changes nothing
# on the host's network and leaves any other daemon alone. Containers get no network.
# Stopping it gives running containers 2 s (--shutdown-timeout) before SIGKILL.
#
# The test image, TEST_IMAGE (default agent-lifecycle-test/busybox:latest), is a rootfs
# of busybox-static with its applets linked in /bin, imported with `docker import`.
set -euo pipefail

PROG=${0##*/}
IMAGE=${TEST_IMAGE:-agent-lifecycle-test/busybox:latest}

log() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    command -v dockerd >/dev/null 2>&1 && [ -x /bin/busybox ] && return 0
    [ "$(id -u)" = 0 ] || die "dockerd or busybox-static is missing and this is not root"
    log "installing docker.io and busybox-static (Debian packages)"
    # Keep the packaged service from starting: this script runs its own daemon.
    local made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        docker.io busybox-static >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            docker.io busybox-static >/dev/null
    fi
    [ "$made_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return 0
}

# The client of the daemon's own version: Debian's, not another one on PATH.
client() { /usr/bin/docker -H "unix://$DIR/docker.sock" "$@"; }

answers() { [ -S "$DIR/docker.sock" ] && client version >/dev/null 2>&1; }

build_image() {
    client image inspect "$IMAGE" >/dev/null 2>&1 && return 0
    local rootfs
    rootfs=$(mktemp -d)
    mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" "$rootfs/etc"
    cp /bin/busybox "$rootfs/bin/busybox"
    local applet
    for applet in $("$rootfs/bin/busybox" --list); do
        [ -e "$rootfs/bin/$applet" ] || ln -s busybox "$rootfs/bin/$applet"
    done
    tar -C "$rootfs" -c . | client import -c 'ENV PATH=/bin' - "$IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "built $IMAGE"
}

debian_image() {
    local base=${BASE_IMAGE:-debian:bookworm-slim}
    client image inspect "$base" >/dev/null 2>&1 && return 0
    if ! command -v debootstrap >/dev/null 2>&1; then
        [ "$(id -u)" = 0 ] || die "debootstrap is missing and this is not root"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null 2>&1 || {
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
        }
    fi
    local rootfs
    rootfs=$(mktemp -d)
    log "making $base with debootstrap (minbase bookworm)"
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$DIR/debootstrap.log" 2>&1 \
        || die "debootstrap failed; see $DIR/debootstrap.log"
    tar -C "$rootfs" -c . | client import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["bash"]' - "$base" >/dev/null
    rm -rf "$rootfs"
    log "built $base"
}

start() {
    install_packages
    mkdir -p "$DIR"
    if ! answers; then
        rm -f "$DIR/docker.sock"
        dockerd --data-root "$DIR/data" --exec-root "$DIR/exec" --pidfile "$DIR/dockerd.pid" \
            -H "unix://$DIR/docker.sock" --iptables=false --ip-masq=false --bridge=none \
            --shutdown-timeout 2 \
            >"$DIR/dockerd.log" 2>&1 &
        local i
        for i in $(seq 1 300); do
            answers && break
            kill -0 $! 2>/dev/null || die "dockerd exited; see $DIR/dockerd.log"
            sleep 0.1
        done
        answers || die "dockerd did not answer within 30 s; see $DIR/dockerd.log"
        log "dockerd started: pid $(cat "$DIR/dockerd.pid"), socket $DIR/docker.sock"
    fi
    build_image
    echo "DOCKER_HOST=unix://$DIR/docker.sock"
}

stop() {
    [ -f "$DIR/dockerd.pid" ] || return 0
    local pid
    pid=$(cat "$DIR/dockerd.pid")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        local i
        for i in $(seq 1 300); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
    fi
    rm -f "$DIR/dockerd.pid" "$DIR/docker.sock"
    # The daemon leaves its default network namespace mounted.
    if [ -e "$DIR/exec/netns/default" ]; then
        umount "$DIR/exec/netns/default" 2>/dev/null || true
    fi
}

case ${1:-} in
    start) DIR=$(realpath -m "${2:?usage: $PROG start DIR}"); start ;;
    stop) DIR=$(realpath -m "${2:?usage: $PROG stop DIR}"); stop ;;
    status) DIR=$(realpath -m "${2:?usage: $PROG status DIR}"); answers && echo "DOCKER_HOST=unix://$DIR/docker.sock" ;;
    debian) DIR=$(realpath -m "${2:?usage: $PROG debian DIR}"); answers || die "no daemon for $DIR"; debian_image ;;
    *) DIR=$(realpath -m "${1:?usage: $PROG [start|stop|status] DIR}"); start ;;
esac
