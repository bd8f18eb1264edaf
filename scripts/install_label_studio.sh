#!/usr/bin/env bash
# Install Label Studio into its OWN virtual environment, exactly as locks/label-studio.txt says, for the
# end-to-end tests.
#
# Label Studio pins Django, numpy and friends in ways that clash with torch / detectron2, so it never
# shares the project's .venv. The venv lives OUTSIDE the repository (a fresh clone reuses it):
#
#   ${SIM_CACHE_DIR:-$HOME/.cache/sim-prelabels}/label-studio-venv      the venv (bin/label-studio)
#   ${SIM_CACHE_DIR:-$HOME/.cache/sim-prelabels}/label-studio-template/ a migrated, empty sqlite database
#
# The venv is synced to the lock on every run (uv pip sync: a drifted package, say a newer sentry-sdk put
# in by hand, is put back; a second run only checks). The first start of Label Studio migrates its sqlite
# database (50-85 s on 2 cores); the tests start from a copy of the migrated template instead (~8 s). The
# template is made again when the lock changes (its LOCK_SHA256 stamp).
#
# Environment:
#   SIM_CACHE_DIR         cache root (default $HOME/.cache/sim-prelabels)
#   LABEL_STUDIO_VENV     venv location (default $SIM_CACHE_DIR/label-studio-venv)
#   LS_PYTHON             interpreter for a new venv (default python3; CPython 3.11, as the lock)
#   UV                    the uv to sync with (default .venv/bin/uv, put there by scripts/install.sh)
#   SKIP_LS_TEMPLATE=1    install only; do not prepare the migrated database
set -euo pipefail
cd "$(dirname "$0")/.."

LOCK=locks/label-studio.txt
LS_VERSION="$(sed -n 's/^label-studio==\([^ ;]*\).*/\1/p' "$LOCK")"
CACHE_DIR="${SIM_CACHE_DIR:-$HOME/.cache/sim-prelabels}"
export UV_CACHE_DIR="${UV_CACHE_DIR:-$CACHE_DIR/uv}"
VENV="${LABEL_STUDIO_VENV:-$CACHE_DIR/label-studio-venv}"
TEMPLATE_DIR="$CACHE_DIR/label-studio-template"
PY="${LS_PYTHON:-python3}"
UV="${UV:-.venv/bin/uv}"
LOCK_SHA256="$(sha256sum "$LOCK" | cut -d' ' -f1)"

log() { echo "[install_label_studio] $*"; }

if ! [ -x "$UV" ]; then
    log "ERROR: no uv at $UV: run scripts/install.sh (it installs the locked uv into .venv), or set UV" >&2
    exit 1
fi

# One install at a time per cache (scripts/install.sh and a developer may run it together).
mkdir -p "$CACHE_DIR"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_DIR/.label-studio-install.lock"
    flock 9
fi

installed_version() {
    [ -x "$VENV/bin/python" ] || return 1
    "$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("label-studio"))' 2>/dev/null
}

if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV with $PY ($("$PY" --version 2>&1))"
    mkdir -p "$(dirname "$VENV")"
    "$PY" -m venv "$VENV"
fi
log "syncing $VENV to $LOCK (label-studio $LS_VERSION; the first time takes a minute or two)"
"$UV" pip sync --quiet --python "$VENV/bin/python" --build-constraints "$LOCK" "$LOCK"
got="$(installed_version || true)"
if [ "$got" != "$LS_VERSION" ] || ! [ -x "$VENV/bin/label-studio" ]; then
    log "ERROR: expected label-studio $LS_VERSION in $VENV, found '${got:-nothing}'" >&2
    exit 1
fi
log "label-studio $got in $VENV, every package as $LOCK says"

if [ "${SKIP_LS_TEMPLATE:-0}" = "1" ]; then
    log "SKIP_LS_TEMPLATE=1: not preparing the migrated database"
    exit 0
fi

# The migrated template is tied to the installed version and to the lock (stamp files record both).
if [ -f "$TEMPLATE_DIR/label_studio.sqlite3" ] && [ "$(cat "$TEMPLATE_DIR/VERSION" 2>/dev/null)" = "$LS_VERSION" ] \
   && [ "$(cat "$TEMPLATE_DIR/LOCK_SHA256" 2>/dev/null)" = "$LOCK_SHA256" ]; then
    log "migrated sqlite template ready: $TEMPLATE_DIR/label_studio.sqlite3"
    exit 0
fi

log "migrating an empty Label Studio database once (50-85 s on 2 cores) into $TEMPLATE_DIR"
work="$(mktemp -d "${TMPDIR:-/tmp}/ls-template.XXXXXX")"
trap 'rm -rf "$work"' EXIT
# `label-studio version` applies Django's migrations to <data dir>/label_studio.sqlite3, prints the
# version and exits without starting a server. env -i: Label Studio also reads bare USERNAME, PORT, HOST... from the env.
env -i PATH="$VENV/bin:/usr/bin:/bin" HOME="$work" LANG=C.UTF-8 \
    LABEL_STUDIO_BASE_DATA_DIR="$work/data" COLLECT_ANALYTICS=false \
    "$VENV/bin/label-studio" version --data-dir "$work/data" >"$work/migrate.log" 2>&1 || {
        log "ERROR: migration failed; last lines of its log:" >&2
        tail -n 40 "$work/migrate.log" >&2
        exit 1
    }
if [ ! -f "$work/data/label_studio.sqlite3" ]; then
    log "ERROR: migration produced no $work/data/label_studio.sqlite3; last lines of its log:" >&2
    tail -n 40 "$work/migrate.log" >&2
    exit 1
fi
mkdir -p "$TEMPLATE_DIR"
cp "$work/data/label_studio.sqlite3" "$TEMPLATE_DIR/label_studio.sqlite3.tmp"
mv "$TEMPLATE_DIR/label_studio.sqlite3.tmp" "$TEMPLATE_DIR/label_studio.sqlite3"
echo "$LS_VERSION" >"$TEMPLATE_DIR/VERSION"
echo "$LOCK_SHA256" >"$TEMPLATE_DIR/LOCK_SHA256"
log "migrated sqlite template ready: $TEMPLATE_DIR/label_studio.sqlite3"
