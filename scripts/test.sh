#!/usr/bin/env bash
# Run the test suite: unit tests, real-data tests and the real Label Studio end-to-end tests.
# Tests marked `slow` (real training runs of several minutes) run only with RUN_SLOW=1.
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
markers="not slow"
[ "${RUN_SLOW:-0}" = "1" ] && markers=""
exec .venv/bin/python -m pytest -q -ra ${markers:+-m "$markers"} "$@"
