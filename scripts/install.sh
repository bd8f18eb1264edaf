#!/usr/bin/env bash
# Install everything from the lock files: the project's venv (default .venv) exactly as
# locks/project.txt says (torch/torchvision, every library, the test tools), detectron2 from the patched
# pb1-detectron2==0.6 sdist, this project (editable), and Label Studio in its own venv from
# locks/label-studio.txt for the end-to-end tests (scripts/install_label_studio.sh).
#
# The venvs are synced to the locks (uv pip sync): a package missing is installed, one at another version
# is put back to the locked one, one the lock does not hold is removed. So a fresh machine gets exactly
# what CI tested, and a cached venv that drifted cannot hide a broken lock. Idempotent: a second run only
# checks (seconds). The locks are made by scripts/lock.sh (CPython 3.11, Linux x86_64).
#
# Environment: VENV (default .venv), PYTHON (the interpreter for new venvs, default python3; it must be
# CPython 3.11), SIM_CACHE_DIR (default ~/.cache/sim-prelabels: downloads, uv's cache, the detectron2
# wheel and the Label Studio venv live there, outside the repo), SKIP_LABEL_STUDIO=1 to leave Label
# Studio out.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CACHE=${SIM_CACHE_DIR:-$HOME/.cache/sim-prelabels}
export UV_CACHE_DIR=${UV_CACHE_DIR:-$CACHE/uv}
LOCK=locks/project.txt
D2_SDIST=pb1-detectron2-0.6.tar.gz
D2_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29
PY="$VENV/bin/python"
say() { printf '[install] %s\n' "$*"; }
mkdir -p "$CACHE"

if [ ! -x "$PY" ]; then
  say "creating virtual environment $VENV with $PYTHON"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$PY" -c 'import sys, platform; sys.exit(not (sys.version_info[:2] == (3, 11) and platform.machine() == "x86_64"))'; then
  say "ERROR: $VENV runs Python $("$PY" -c 'import platform; print(platform.python_version(), platform.machine())');" \
      "the locks are for CPython 3.11 on x86_64: remove $VENV and run again with PYTHON=<a python3.11>" >&2
  exit 1
fi

# uv, the installer, at the version the lock pins (bootstrapped with the venv's own pip).
UV="$VENV/bin/uv"
UV_VERSION=$(sed -n 's/^uv==\([0-9.]*\).*/\1/p' "$LOCK")
if ! [ -x "$UV" ] || [ "$("$UV" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  say "installing uv==$UV_VERSION (the locks' installer) into $VENV"
  "$PY" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
fi
sync() {  # sync "$VENV" to the lock plus the requirement files given
  "$UV" pip sync --quiet --python "$PY" --build-constraints "$LOCK" "$LOCK" "$@"
}

# detectron2: built once into a wheel, kept in the cache under the sdist's and the patch script's hashes.
D2_KEY=$(cat scripts/patch_detectron2.py | sha256sum | cut -c1-12)
D2_WHEELS="$CACHE/wheels/detectron2-0.6-${D2_SHA256:0:12}-$D2_KEY"
D2_WHEEL=$(ls "$D2_WHEELS"/*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$D2_WHEEL" ]; then
  say "syncing $VENV to $LOCK (torch, torchvision and the rest; first run: a few GB from the package index)"
  sync
  if [ ! -f "$CACHE/$D2_SDIST" ] || ! echo "$D2_SHA256  $CACHE/$D2_SDIST" | sha256sum -c --status; then
    say "downloading $D2_SDIST from the package index"
    # pip cannot download this sdist (its metadata names a direct-URL extra), so resolve its file from
    # the index's simple page and check the sha256 ourselves.
    "$PY" - "$CACHE/$D2_SDIST" <<'PYEOF'
import os, re, sys, urllib.parse, urllib.request
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
html = urllib.request.urlopen(f"{index}/pb1-detectron2/", timeout=120).read().decode()
urls = [u for u in re.findall(r'href="([^"]+)"', html) if "pb1-detectron2-0.6.tar.gz" in u]
if not urls:
    sys.exit("pb1-detectron2-0.6.tar.gz not found on " + index)
url = urllib.parse.urljoin(f"{index}/pb1-detectron2/", urls[0].split("#")[0])
tmp = sys.argv[1] + ".part"
with urllib.request.urlopen(url, timeout=300) as r, open(tmp, "wb") as f:
    f.write(r.read())
os.replace(tmp, sys.argv[1])
PYEOF
    echo "$D2_SHA256  $CACHE/$D2_SDIST" | sha256sum -c --status || { rm -f "$CACHE/$D2_SDIST"; say "ERROR: sha256 mismatch of $D2_SDIST" >&2; exit 1; }
  fi
  say "patching detectron2 0.6 and building its wheel (no C++ ops) into $D2_WHEELS"
  SRC=$(mktemp -d)
  tar xzf "$CACHE/$D2_SDIST" -C "$SRC"
  "$PY" scripts/patch_detectron2.py "$SRC/pb1-detectron2-0.6"
  # its setup.py imports torch: built in the synced venv, its requirements already in the lock
  "$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$SRC/wheel" "$SRC/pb1-detectron2-0.6"
  mkdir -p "$D2_WHEELS"
  mv "$SRC"/wheel/*.whl "$D2_WHEELS/"
  rm -rf "$SRC"
  D2_WHEEL=$(ls "$D2_WHEELS"/*.whl | head -n 1)
fi

say "syncing $VENV to $LOCK + detectron2 ($(basename "$D2_WHEEL")) + this project (editable, with its test extras)"
extra=$(mktemp)
trap 'rm -f "$extra"' EXIT
printf '%s\n-e %s\n' "$D2_WHEEL" "$PWD" >"$extra"
sync "$extra"
"$UV" pip check --quiet --python "$PY"

if [ "${SKIP_LABEL_STUDIO:-0}" != "1" ]; then
  say "syncing Label Studio's venv to locks/label-studio.txt (for the end-to-end tests)"
  UV="$UV" bash scripts/install_label_studio.sh
fi

"$PY" -c 'import torch, torchvision, detectron2, cv2, pycocotools, label_studio_sdk, flask; print("[install] ok: torch", torch.__version__, "torchvision", torchvision.__version__, "detectron2", detectron2.__version__)'
