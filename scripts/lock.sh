#!/usr/bin/env bash
# Regenerate the lock files of both virtual environments from their top-level requirements:
#
#   locks/project.txt       the project's venv (.venv): setup.cfg's install_requires and [test] extra,
#                           plus locks/project.in (torch/torchvision pins, detectron2's own requirements,
#                           the build and install tools)
#   locks/label-studio.txt  Label Studio's venv for the end-to-end tests: locks/label-studio.in
#
# Why: until 2026-12 only torch and torchvision were pinned. A fresh machine then resolved sentry-sdk 3.0.1
# into the Label Studio venv, and Label Studio 1.23.2 died at start-up (sentry_sdk.init: "Unknown option
# 'send_default_pii'"), while CI stayed green on a cached venv. scripts/install.sh now installs exactly
# these locks (uv pip sync), so a fresh machine gets what CI tested, and a cached venv that drifted is
# put back. Every transitive package is pinned to one version (tests/test_locks.py checks it).
#
# When: after changing setup.cfg's requirements or a locks/*.in file, or to upgrade on purpose. Then run
# `bash scripts/install.sh && RUN_SLOW=1 bash scripts/test.sh` and commit the locks with the results.
# UPGRADE=1 re-resolves every package to its newest allowed version; without it, versions already in a
# lock are kept where they still satisfy the requirements (uv's default for an existing output file).
#
# The locks are for CPython 3.11 on Linux x86_64 (manylinux_2_28), the machines, CI and Dockerfile here.
# The resolver is uv, pinned in locks/project.in; without a .venv that holds it, it runs from a
# temporary venv.
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VERSION=$(sed -n 's/^uv==\([0-9.]*\).*/\1/p' locks/project.in)
UV=.venv/bin/uv
if ! [ -x "$UV" ] || [ "$("$UV" --version | cut -d' ' -f2)" != "$UV_VERSION" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION"
  UV="$tmp/venv/bin/uv"
fi
args=(pip compile --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28
      --custom-compile-command "bash scripts/lock.sh")
[ "${UPGRADE:-0}" = "1" ] && args+=(--upgrade)
"$UV" "${args[@]}" setup.cfg --extra test locks/project.in -o locks/project.txt
"$UV" "${args[@]}" locks/label-studio.in -o locks/label-studio.txt
echo "[lock] locks/project.txt: $(grep -c '^[a-z0-9]' locks/project.txt) packages;" \
     "locks/label-studio.txt: $(grep -c '^[a-z0-9]' locks/label-studio.txt) packages"
