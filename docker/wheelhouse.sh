#!/usr/bin/env bash
# Fill a wheelhouse on the host (which can reach PyPI) so image builds can install offline
# (`pip install --no-index --find-links`): the project's runtime dependencies (all pure Python:
# Pyro5, serpent, prometheus-client, python-json-logger, ...) plus a wheel of the project itself.
#
#   docker/wheelhouse.sh [WHEELHOUSE_DIR]      (default build/wheelhouse, relative to the repo root)
#
# PYTHON selects the interpreter whose pip is used (default: .venv/bin/python if present, else python3).
# Dependency wheels are pure Python, so the host's Python version does not matter for them.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${1:-build/wheelhouse}"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
log() { printf '[wheelhouse] %s\n' "$*" >&2; }

mkdir -p "$out"
out="$(cd "$out" && pwd)"
# The project wheel has a fixed version number: drop the old one so a rebuild always replaces it.
rm -f "$out"/remote_mvc-*.whl
# Build from a clean copy of the sources: an in-tree build would leave build/lib and *.egg-info
# behind, and a stale build/lib can smuggle deleted modules into the wheel.
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
tar -C "$root" --exclude='__pycache__' --exclude='*.pyc' -cf - \
    pyproject.toml shared services $(cd "$root" && ls -d README* LICENSE* setup.cfg setup.py MANIFEST.in 2>/dev/null) \
    | tar -C "$src" -xf -
log "building the project wheel and collecting its dependencies into $out (pip: $PYTHON)"
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$out" --find-links "$out" "$src[gateway]"
# The image builds the project from its sources (pip's isolated build): the build backend must be
# here too for that to work offline.
"$PYTHON" -m pip wheel --quiet --disable-pip-version-check --wheel-dir "$out" --find-links "$out" \
    "$(sed -n 's/^requires = \["\([^"]*\)".*/\1/p' pyproject.toml | head -1)" wheel
# Wheels only: an sdist in here would need a build backend inside the image.
if ls "$out" | grep -v -E '\.whl$' >/dev/null; then
    log "non-wheel files in $out:"; ls "$out" | grep -v -E '\.whl$' >&2; exit 1
fi
if ls "$out"/*.whl | grep -v -E -- '-none-any\.whl$' >/dev/null; then
    log "warning: platform-specific wheels (the image's Python must match the host's):"
    ls "$out"/*.whl | grep -v -E -- '-none-any\.whl$' >&2
fi
ls -1 "$out" >&2
