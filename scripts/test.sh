#!/usr/bin/env bash
# Runs the test suite on $TEST_WORKERS workers (default 2, pytest-xdist; an idle worker takes tests queued for a
# busy one), creating .venv first if needed.
# Extra args go to pytest (-n 0: one process).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/ensure_env.sh"
cd "$ROOT"
exec env JAX_PLATFORMS=cpu "$VENV_PYTHON" -m pytest -q -n "${TEST_WORKERS:-2}" --dist worksteal "$@"
