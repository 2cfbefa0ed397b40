#!/usr/bin/env bash
# Decide which base image docker/Dockerfile builds FROM, and make sure it exists locally.
#
# Prints exactly one line on stdout: the image reference to pass as --build-arg BASE_IMAGE.
# Everything else (progress) goes to stderr, so callers can do
#     BASE_IMAGE=$(docker/base-image.sh)
#
# Order (fast when cached, no network when something usable is already present):
#   1. $BASE_IMAGE (default python:3.11-slim) already present locally  -> use it
#   2. the local debootstrap image ($LOCAL_BASE_IMAGE) already present  -> use it
#   3. `docker pull $BASE_IMAGE` succeeds within $PULL_TIMEOUT seconds  -> use it
#   4. build a minimal Debian rootfs with debootstrap, `docker import` it as $LOCAL_BASE_IMAGE
#
# Knobs: BASE_IMAGE, LOCAL_BASE_IMAGE (remote-mvc/base:bookworm), DEBIAN_SUITE (bookworm),
#        DEBIAN_MIRROR (http://deb.debian.org/debian), PULL_TIMEOUT (20),
#        BASE_IMAGE_FORCE_LOCAL=1 (skip 1 and 3: always use/build the debootstrap image).
set -euo pipefail

BASE_IMAGE="${BASE_IMAGE:-python:3.11-slim}"
DEBIAN_SUITE="${DEBIAN_SUITE:-bookworm}"
LOCAL_BASE_IMAGE="${LOCAL_BASE_IMAGE:-remote-mvc/base:${DEBIAN_SUITE}}"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
PULL_TIMEOUT="${PULL_TIMEOUT:-20}"
FORCE_LOCAL="${BASE_IMAGE_FORCE_LOCAL:-0}"

log() { printf '[base-image] %s\n' "$*" >&2; }
have_image() { docker image inspect "$1" >/dev/null 2>&1; }

if ! docker info >/dev/null 2>&1; then
    log "no Docker engine reachable (run: make docker-engine)"
    exit 1
fi

if [ "$FORCE_LOCAL" != "1" ] && have_image "$BASE_IMAGE"; then
    log "using $BASE_IMAGE (present locally)"
    echo "$BASE_IMAGE"; exit 0
fi
if have_image "$LOCAL_BASE_IMAGE"; then
    log "using $LOCAL_BASE_IMAGE (debootstrap base, present locally)"
    echo "$LOCAL_BASE_IMAGE"; exit 0
fi
if [ "$FORCE_LOCAL" != "1" ]; then
    log "trying: docker pull $BASE_IMAGE (timeout ${PULL_TIMEOUT}s)"
    if timeout "$PULL_TIMEOUT" docker pull -q "$BASE_IMAGE" >&2 2>/dev/null && have_image "$BASE_IMAGE"; then
        log "using $BASE_IMAGE (pulled)"
        echo "$BASE_IMAGE"; exit 0
    fi
    log "cannot pull $BASE_IMAGE; building $LOCAL_BASE_IMAGE with debootstrap instead"
fi

command -v debootstrap >/dev/null 2>&1 || { log "debootstrap missing (run: make docker-engine)"; exit 1; }
[ "$(id -u)" -eq 0 ] || { log "debootstrap needs root"; exit 1; }

work="$(mktemp -d /var/tmp/remote-mvc-rootfs.XXXXXX)"
cleanup() { rm -rf --one-file-system "$work"; }
trap cleanup EXIT
rootfs="$work/rootfs"

log "debootstrap --variant=minbase $DEBIAN_SUITE (takes a few minutes; log: $work/debootstrap.log)"
if ! debootstrap --variant=minbase \
        --include=python3,python3-venv,ca-certificates \
        "$DEBIAN_SUITE" "$rootfs" "$DEBIAN_MIRROR" >"$work/debootstrap.log" 2>&1; then
    tail -n 40 "$work/debootstrap.log" >&2
    log "debootstrap failed"
    exit 1
fi

# Slim it down and make apt usable inside builds (docker/prometheus.Dockerfile installs with apt).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/var/log/*.log "$rootfs"/tmp/* 2>/dev/null || true
cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $DEBIAN_MIRROR $DEBIAN_SUITE main
deb $DEBIAN_MIRROR $DEBIAN_SUITE-updates main
deb http://deb.debian.org/debian-security $DEBIAN_SUITE-security main
EOF
# Do not keep the host's resolver config or hostname in the image.
: >"$rootfs/etc/resolv.conf"
echo localhost >"$rootfs/etc/hostname"
# Keep downloaded .debs out of image layers.
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
EOF
echo 'APT::Install-Recommends "false";' >"$rootfs/etc/apt/apt.conf.d/99no-recommends"

log "docker import -> $LOCAL_BASE_IMAGE"
tar --numeric-owner -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase $DEBIAN_SUITE + python3" \
    - "$LOCAL_BASE_IMAGE" >&2
log "built $LOCAL_BASE_IMAGE"
echo "$LOCAL_BASE_IMAGE"
