#!/usr/bin/env bash
# Runs the test suite, creating .venv first if needed. Extra args go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/ensure_env.sh"
cd "$ROOT"
exec env JAX_PLATFORMS=cpu "$VENV_PYTHON" -m pytest -q "$@"
