#!/usr/bin/env bash
# Install everything into a virtual environment (default .venv): torch + torchvision (pinned in
# constraints.txt), detectron2 from the patched pb1-detectron2==0.6 sdist, this project with its test
# extras, and Label Studio 1.23.2 in its own venv for the end-to-end tests.
# Idempotent: a second run checks each step and skips what is already in place.
#
# Environment: VENV (default .venv), SIM_CACHE_DIR (default ~/.cache/sim-prelabels: downloads and the
# Label Studio venv live there, outside the repo), SKIP_LABEL_STUDIO=1 to leave Label Studio out.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
CACHE=${SIM_CACHE_DIR:-$HOME/.cache/sim-prelabels}
D2_SDIST=pb1-detectron2-0.6.tar.gz
D2_SHA256=5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -c constraints.txt)
say() { printf '[install] %s\n' "$*"; }
mkdir -p "$CACHE"

if [ ! -x "$PY" ]; then
  say "creating virtual environment $VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --disable-pip-version-check -U pip wheel
fi

if "$PY" -c 'import torch, torchvision, sys; sys.exit(not (torch.__version__.startswith("2.14.1") and torchvision.__version__.startswith("0.29.2")))' 2>/dev/null; then
  say "torch 2.14.1 + torchvision 0.29.2 already installed"
else
  say "installing torch==2.14.1 torchvision==0.29.2 (CUDA build from PyPI, runs on the CPU; ~5.5 GB)"
  "${PIP[@]}" -q torch==2.14.1 torchvision==0.29.2
fi

if "$PY" -c 'import detectron2, detectron2.evaluation, detectron2.model_zoo; assert detectron2.__version__ == "0.6"' 2>/dev/null \
   && grep -q "patched by sim-prelabels" "$("$PY" -c 'import detectron2.model_zoo.model_zoo as m; print(m.__file__)')" \
   && grep -q "gloo on the CPU" "$("$PY" -c 'import detectron2.engine.launch as m; print(m.__file__)')"; then
  say "detectron2 0.6 (patched) already installed"
else
  if [ ! -f "$CACHE/$D2_SDIST" ] || ! echo "$D2_SHA256  $CACHE/$D2_SDIST" | sha256sum -c --status; then
    say "downloading $D2_SDIST from the package index"
    # pip cannot download this sdist (its metadata names a direct-URL extra), so resolve its file from
    # the index's simple page and check the sha256 ourselves.
    "$PY" - "$CACHE/$D2_SDIST" <<'PYEOF'
import os, re, sys, urllib.request
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
    echo "$D2_SHA256  $CACHE/$D2_SDIST" | sha256sum -c || { rm -f "$CACHE/$D2_SDIST"; say "sha256 mismatch"; exit 1; }
  fi
  say "patching and installing detectron2 0.6 (no C++ ops)"
  SRC=$(mktemp -d)
  tar xzf "$CACHE/$D2_SDIST" -C "$SRC"
  "$PY" scripts/patch_detectron2.py "$SRC/pb1-detectron2-0.6"
  "${PIP[@]}" -q --no-build-isolation "$SRC/pb1-detectron2-0.6"
  rm -rf "$SRC"
fi

say "installing this project (editable) with its test extras"
"${PIP[@]}" -q -e ".[test]"

if [ "${SKIP_LABEL_STUDIO:-0}" != "1" ]; then
  say "installing Label Studio 1.23.2 in its own venv (for the end-to-end tests)"
  bash scripts/install_label_studio.sh
fi

"$PY" -c 'import torch, torchvision, detectron2, cv2, pycocotools, label_studio_sdk, flask; print("[install] ok: torch", torch.__version__, "torchvision", torchvision.__version__, "detectron2", detectron2.__version__)'
